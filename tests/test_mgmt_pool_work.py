"""MGMT's pool pages show each pool's background work (docs/mgmt.md, "Cluster pages"):
rebuild, rebalance and scrub, with the bytes left, the rate and an ETA, "waiting out
rebuild_delay_s" while a lost SDS is waited for, or "idle"; in a real browser, against a
real MDM whose SDSs are heartbeats sent by the test (as their daemons would, with the
copies they report).

The formatting of the figures is checked in-process (``unit``) below.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from _http import Api
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from meshblock.mgmt import progress
from test_mgmt_browser import screenshot
from test_mgmt_gui import browser, login, ok, on_failure  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

GIB = 1 << 30
MIB = 1 << 20
REBUILD_DELAY_S = 20.0


class Beats:
    """A heartbeat a second for each SDS in ``ids``; ``copies`` (per SDS id) is what
    it reports copying, its ``copied_bytes`` growing by ``step`` each beat."""

    def __init__(self, api: Api, secret: str) -> None:
        self.api, self.secret = api, secret
        self.ids: set[int] = set()
        self.copying: dict[int, int] = {}  # sds id -> pool id it reports a rebuild of
        self.copied = 0
        self.step = 64 * MIB
        self.remaining = 10 * GIB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.lock = threading.Lock()

    def beat_now(self) -> None:
        with self.lock:
            ids = sorted(self.ids)
            self.copied += self.step
            self.remaining = max(self.remaining - self.step, self.step)
            copied, remaining = self.copied, self.remaining
            copying = dict(self.copying)
        for i in ids:
            body: dict[str, Any] = {}
            if i in copying:
                body["copies"] = [
                    {
                        "pool_id": copying[i],
                        "kind": "rebuild",
                        "remaining_bytes": remaining,
                        "copied_bytes": copied,
                    }
                ]
            self.api("POST", f"/api/v1/sds/{i}/heartbeat", body, token=self.secret)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.beat_now()

    def __enter__(self) -> Beats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclass
class Cluster:
    mdm: MdmDaemon
    gui: MgmtDaemon
    pool: dict[str, Any]
    sds: list[dict[str, Any]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("mgmt-work")
    mdm = MdmDaemon(
        root / "mdm",
        f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}",
        {"cluster": {"rebuild_delay_s": REBUILD_DELAY_S}},
        tls=True,
    )
    gui = MgmtDaemon(
        root / "mgmt", f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}", {"mdm": {"url": mdm.url}}
    )
    rc: int | None = None
    try:
        mdm.start()
        api = mdm.api()
        pool = mdm.create_pool("pd1", "sp1", 16)
        sds = [
            ok(
                api.post(
                    "/api/v1/sds",
                    {
                        "name": f"sds{i}",
                        "protection_domain_id": pool["protection_domain_id"],
                        "address": "127.0.0.1",
                        "data_port": 17480 + i,
                        "devices": [
                            {"path": f"/dev/work{i}", "capacity": "100GiB", "pool_id": pool["id"]}
                        ],
                    },
                ),
                201,
            )
            for i in (1, 2, 3)
        ]
        gui.create_users(viewer=False)
        gui.start()
        yield Cluster(mdm, gui, pool, sds)
        rc = gui.stop()
    finally:
        gui.kill()
        mdm.kill()
    assert rc == 0, f"MGMT exit code {rc}:\n{gui.log_text()}"
    gui.assert_clean_log()


def rebuild_of(api: Api, pool_id: int) -> dict[str, Any]:
    return next(p for p in ok(api.get("/api/v1/rebuild"))["pools"] if p["pool_id"] == pool_id)


@pytest.mark.cluster
def test_pool_pages_show_rebuild_waiting_then_running_with_eta(
    cluster: Cluster,
    browser: BrowserContext,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    c = cluster
    api = c.mdm.api()
    pool_id = c.pool["id"]
    page = browser.new_page()
    try:
        with Beats(api, c.mdm.cluster_secret) as beats:
            beats.ids.update(s["id"] for s in c.sds)
            beats.beat_now()
            # -- all connected, clean: idle
            login(page, c.gui, "admin", c.gui.admin_password, f"/pools/{pool_id}")
            expect(page.locator("#progress-rebuild")).to_have_attribute("data-state", "idle")
            expect(page.locator("#progress-rebuild .progress-state")).to_have_text("idle")
            expect(page.locator("#progress-rebalance")).to_have_attribute("data-state", "idle")
            expect(page.locator("#progress-scrub")).to_have_count(1)
            page.goto(c.gui.url + "/pools")
            expect(page.locator(f"#pool-{pool_id} .pool-work .work")).to_have_text("idle")
            page.goto(c.gui.url + "/health")
            expect(page.locator("#rebuild-idle")).to_be_visible()

            # -- an SDS lost: its PGs wait out rebuild_delay_s
            lost = c.sds[2]["id"]
            with beats.lock:
                beats.ids.discard(lost)
            waited = _until(
                lambda: (r := rebuild_of(api, pool_id))["rebuild_delay_left_s"] is not None and r
            )
            assert 0 < waited["rebuild_delay_left_s"] <= REBUILD_DELAY_S, waited
            page.goto(c.gui.url + f"/pools/{pool_id}")
            row = page.locator("#progress-rebuild")
            expect(row).to_have_attribute("data-state", "waiting")
            expect(row.locator(".progress-state")).to_contain_text("waiting out rebuild_delay_s")
            expect(row.locator(".progress-state")).to_contain_text(re.compile(r"starts in \d+s"))
            screenshot(page, "gui-pool-waiting.png")
            page.goto(c.gui.url + "/health")
            waiting = page.locator(f"#rebuild tr.work#work-{pool_id}-rebuild")
            expect(waiting).to_have_attribute("data-state", "waiting")
            expect(waiting.locator(".progress-state")).to_contain_text("rebuild_delay_s")
            page.goto(c.gui.url + "/pools")
            expect(
                page.locator(f"#pool-{pool_id} .pool-work .work[data-kind=rebuild]")
            ).to_have_attribute("data-state", "waiting")

            # -- the delay out, the PGs rebuild; the SDSs report what they copy
            _until(
                lambda: rebuild_of(api, pool_id)["rebuild"]["active"], timeout=REBUILD_DELAY_S + 30
            )
            with beats.lock:
                beats.copying = {s["id"]: pool_id for s in c.sds[:1]}
            doc = _until(
                lambda: (r := rebuild_of(api, pool_id))["rebuild"]["eta_s"] is not None and r
            )
            page.goto(c.gui.url + f"/pools/{pool_id}")
            row = page.locator("#progress-rebuild")
            expect(row).to_have_attribute("data-state", "running")
            expect(row.locator(".progress-state")).to_have_text("rebuild running")
            left = int(row.locator(".progress-left").get_attribute("data-bytes") or "0")
            assert 0 < left <= doc["rebuild"]["remaining_bytes"] + GIB, (left, doc)
            expect(row.locator(".progress-left")).to_contain_text("GiB")
            expect(row.locator(".progress-rate")).to_contain_text(re.compile(r"MiB/s$"))
            expect(row.locator(".progress-eta")).to_have_text(re.compile(r"^(\d+m\d\ds|\d+s)$"))
            screenshot(page, "gui-pool-rebuilding.png")
            page.goto(c.gui.url + "/pools")
            work = page.locator(f"#pool-{pool_id} .pool-work .work[data-kind=rebuild]")
            expect(work).to_have_attribute("data-state", "running")
            expect(work).to_contain_text("ETA")
            page.goto(c.gui.url + "/health")
            running = page.locator(f"#rebuild tr.work#work-{pool_id}-rebuild")
            expect(running).to_have_attribute("data-state", "running")
            expect(running.locator(".progress-eta")).to_have_text(re.compile(r"^(\d+m\d\ds|\d+s)$"))
            expect(page.locator("#rebuild-idle")).to_have_count(0)
    except BaseException:
        on_failure(page)
        raise


def _until(check: Any, timeout: float = 30.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {check}")
        time.sleep(0.5)


@pytest.mark.unit
def test_the_figures_for_each_state() -> None:
    pool = {
        "pool_id": 1,
        "pgs": {"clean": 10, "degraded": 0},
        "rebuild": {
            "active": True,
            "remaining_bytes": 3 * GIB,
            "rate_bytes_per_s": 50.0 * MIB,
            "eta_s": 61.4,
        },
        "rebalance": {"active": False, "remaining_bytes": 0, "eta_s": None},
        "rebuild_delay_left_s": None,
    }
    scrub = {
        "pool_id": 1,
        "state": "running",
        "pass": 3,
        "pgs_total": 10,
        "pgs_done": 4,
        "pass_started_at": 1000.0,
        "bandwidth_mibps": 20,
    }
    rebuild, rebalance, scr = progress.of_pool(pool, scrub, now=1100.0)
    assert (rebuild.state, rebuild.left, rebuild.left_bytes) == ("running", "3 GiB", 3 * GIB)
    assert (rebuild.rate, rebuild.eta) == ("50 MiB/s", "1m01s")
    assert (rebalance.state, rebalance.text, rebalance.eta) == ("idle", "idle", "\u2013")
    assert (scr.state, scr.left, scr.eta) == ("running", "6 of 10 PGs", "2m30s")
    waiting = {**pool, "rebuild": {"active": False}, "rebuild_delay_left_s": 4000.0}
    w = progress.of_pool(waiting, None)[0]
    assert w.state == "waiting" and "waiting out rebuild_delay_s" in w.text, w
    assert "1h06m" in w.text, w
    stuck = {**pool, "rebuild": {"active": False}, "pgs": {"degraded": 2, "inactive": 1}}
    assert progress.of_pool(stuck, None)[0].state == "degraded"
    assert progress.duration(None) == "\u2013" and progress.duration(3600) == "1h00m"
    idle = {"pool_id": 1, "state": "idle", "next_pass_at": 1000.0 + 7200}
    assert progress.of_pool(None, idle, now=1000.0)[2].text == "idle, next pass in 2h00m"
    both = progress.by_pool({"pools": [pool]}, {"pools": [scrub]}, now=1100.0)
    assert list(both) == [1] and [w.kind for w in both[1]] == ["rebuild", "rebalance", "scrub"]
