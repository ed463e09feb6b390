"""The alert pipeline end to end, with every server real: an SDS dies, and the alert
travels MDM → Prometheus → Alertmanager → MGMT, is acknowledged there by a user, and
is resolved when the SDS comes back.

- the cluster: an MDM (``cluster.heartbeat_timeout_s = 3``: ``meshctl lab up`` has no
  option for it), three SDSs in fault sets fs1..fs3 and an SDC, from ``tests/_mdm.py``,
  ``_sds.py`` and ``_sdc.py``;
- Prometheus (Debian package) with ``monitoring/prometheus/prometheus.yml`` as shipped
  except for its intervals (1 s), its file_sd target files written for the test's
  ports, and the rules of ``monitoring/prometheus/rules/`` with every ``for:``
  divided by 30 (1m → 2s, 2m → 4s: the rules' relative order is kept, which the
  SdsDown → PgsDegraded inhibition relies on) — the YAML copies are rewritten by the
  test, the repository's files are not touched;
- Alertmanager (Debian package) with ``monitoring/alertmanager/alertmanager.yml`` whose
  webhook points at the test's MGMT with its token file, and group_wait 1s /
  group_interval 2s;
- MGMT (``python -m meshblock.mgmt``) on SQLite, reading the MDM, Prometheus and
  Alertmanager.

Every wait is bounded; a failure shows every server's log, and what Prometheus,
Alertmanager and MGMT hold at that moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

import _control
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from _monitoring import (
    AlertmanagerServer,
    PrometheusServer,
    ToolMissing,
    repo_alertmanager_config,
    repo_prometheus_config,
    repo_rule_files,
    target_files,
)
from _process import ServerProcess
from _sdc import SdcDaemon
from _sds import PG_COUNT, POOL, SdsDaemon
from _wait import wait_until

pytestmark = pytest.mark.cluster

HEARTBEAT_TIMEOUT_S = 3.0
INTERVAL = "1s"  # Prometheus's scrape and evaluation interval
FOR_FACTOR = 1 / 30  # every rule's `for:` is scaled by this
GROUP_WAIT = "1s"
GROUP_INTERVAL = "2s"
READY_TIMEOUT_S = 30.0
FIRE_TIMEOUT_S = 45.0  # heartbeat timeout + scrape + for: + group_wait, with room
RESOLVE_TIMEOUT_S = 60.0
KILLED = "sds2"
ALERT = "MeshblockSdsDown"
# The scrape jobs of monitoring/prometheus/prometheus.yml whose targets must be up.
JOBS = ("meshblock_mdm", "meshblock_sds", "meshblock_sdc", "meshblock_mgmt")

T = TypeVar("T")


@dataclasses.dataclass
class Pipeline:
    mdm: MdmDaemon
    sds: dict[str, SdsDaemon]
    sdc: SdcDaemon
    prometheus: PrometheusServer
    alertmanager: AlertmanagerServer
    mgmt: MgmtDaemon
    killed: set[str] = dataclasses.field(default_factory=set)  # SIGKILLed, not restarted

    def mgmt_alerts(self, **query: str) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in {"limit": "1000", **query}.items())
        status, body = self.mgmt.api().get(f"/api/alerts?{qs}")
        assert status == 200, body
        alerts: list[dict[str, Any]] = body["alerts"]
        return alerts

    def diagnostics(self) -> str:
        """What every server says: its log's tail, and the alerts each one holds."""
        out = []
        for name, read in (
            ("Prometheus alerts", lambda: self.prometheus.get("alerts")["alerts"]),
            ("Prometheus targets", self.prometheus.targets_health),
            ("Alertmanager alerts", self.alertmanager.alerts),
            ("MGMT alerts", self.mgmt_alerts),
        ):
            try:
                text = json.dumps(read(), indent=1, default=str)[-4000:]
            except Exception as exc:  # diagnostics must not hide the failure
                text = f"unavailable: {exc!r}"
            out.append(f"--- {name} ---\n{text}")
        logs = [
            (self.mdm.log_path, self.mdm.log_text()),
            *((d.log_path, d.log_text()) for d in self.sds.values()),
            (self.sdc.log_path, self.sdc.log_text()),
        ]
        out += [f"--- {path} ---\n{text[-3000:]}" for path, text in logs]
        out += [s.log_tail(4000) for s in (self.prometheus, self.alertmanager, self.mgmt)]
        return "\n".join(out)

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float) -> T:
        """Poll ``probe`` until it returns something truthy; fail after ``timeout``."""
        return wait_until(probe, timeout, what, interval=0.25)

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """Re-raise a failure with :meth:`diagnostics` appended."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\n{self.diagnostics()}") from exc


def _ok(resp: Any, status: int = 200) -> Any:
    code, body = resp
    assert code == status, f"expected {status}, got {code}: {body}"
    return body


def _build_cluster(
    root: Path, mdm: MdmDaemon, stoppers: list[tuple[str, Callable[[], object]]]
) -> tuple[dict[str, SdsDaemon], SdcDaemon]:
    api = mdm.api()
    pd = _ok(api.post("/api/v1/protection-domains", {"name": "pd1"}), 201)
    for i in range(1, 4):
        _ok(
            api.post("/api/v1/fault-sets", {"name": f"fs{i}", "protection_domain_id": pd["id"]}),
            201,
        )
    _ok(
        api.post(
            "/api/v1/pools", {"name": POOL, "protection_domain_id": pd["id"], "pg_count": PG_COUNT}
        ),
        201,
    )
    sds = {f"sds{i}": SdsDaemon(root / f"sds{i}", f"sds{i}", mdm, f"fs{i}") for i in range(1, 4)}
    for name, d in sds.items():
        stoppers.insert(0, (name, d.stop))
        d.start()
    for d in sds.values():
        d.wait_serving()
    sdc = SdcDaemon(root / "sdc", mdm)
    stoppers.insert(0, ("sdc", sdc.stop))
    sdc.start()
    return sds, sdc


def stop_and_kill(server: ServerProcess) -> int:
    """SIGTERM's exit code; then a kill in case it hung."""
    rc = server.stop()
    server.kill()
    return rc


def _stop_all(stoppers: list[tuple[str, Callable[[], object]]]) -> dict[str, object]:
    """Run every stopper (in order) even when one fails; return what each returned."""
    results: dict[str, object] = {}
    for name, stop in stoppers:
        try:
            results[name] = stop()
        except Exception as exc:
            results[name] = exc
    return results


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("alert-pipeline")
    mdm = MdmDaemon(
        root / "mdm",
        f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}",
        {"cluster": {"name": "pipeline", "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}},
    )
    # Plain HTTP ([http] plain_http), as this MDM serves and Alertmanager posts as
    # shipped; MGMT over HTTPS is test_mgmt.py's and test_mgmt_browser.py's.
    mgmt = MgmtDaemon(root / "mgmt", f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}", tls=False)
    stoppers: list[tuple[str, Callable[[], object]]] = []
    # The user and token commands (two Python start-ups) run while the cluster starts.
    with ThreadPoolExecutor(max_workers=1) as background:
        users = background.submit(mgmt.create_users, viewer=False)
        try:
            p = _start_pipeline(root, mdm, mgmt, users, stoppers)
        except ToolMissing as exc:
            _stop_all(stoppers)
            pytest.fail(str(exc), pytrace=False)
        except BaseException:
            _stop_all(stoppers)
            raise
    try:
        yield p
    finally:
        codes = _stop_all(stoppers)
    # An SDS that a failed test left killed exited with -SIGKILL: that is no news.
    bad = {k: v for k, v in codes.items() if v != 0 and not (k in p.killed and v == -9)}
    assert not bad, f"exit codes on SIGTERM: {bad}\n\n{p.diagnostics()}"
    mgmt.assert_clean_log()
    p.sdc.assert_clean_log()


def _start_pipeline(
    root: Path,
    mdm: MdmDaemon,
    mgmt: MgmtDaemon,
    users: Future[None],
    stoppers: list[tuple[str, Callable[[], object]]],
) -> Pipeline:
    """Start everything, adding to ``stoppers`` (newest first) what must be stopped."""
    mdm.start()
    stoppers.append(("mdm", lambda: stop_and_kill(mdm)))
    sds, sdc = _build_cluster(root, mdm, stoppers)

    token_file = root / "alertmanager" / "mgmt-webhook.token"
    token_file.parent.mkdir()
    token_file.write_text(mgmt.webhook_token)
    token_file.chmod(0o600)
    am = AlertmanagerServer(
        root / "alertmanager",
        repo_alertmanager_config(
            mgmt.url + "/api/alerts/webhook", str(token_file), GROUP_WAIT, GROUP_INTERVAL
        ),
    )
    targets = target_files(
        {
            "meshblock_mdm": [{"targets": [f"127.0.0.1:{mdm.port}"]}],
            "meshblock_sds": [
                {
                    "targets": [f"127.0.0.1:{d.control_port}"],
                    "labels": {"sds": name, "protection_domain": "pd1", "fault_set": f"fs{i}"},
                }
                for i, (name, d) in enumerate(sds.items(), start=1)
            ],
            "meshblock_sdc": [
                {"targets": [f"127.0.0.1:{sdc.control_port}"], "labels": {"sdc": "sdc1"}}
            ],
            "meshblock_mgmt": [{"targets": [f"{mgmt.host}:{mgmt.port}"]}],
            "alertmanager": [{"targets": [am.address]}],
        }
    )
    prom_dir = root / "prometheus"
    # The MDM's /metrics needs its read-only token: the file the job's
    # credentials_file names, as the Ansible role writes it.
    # The SDSs', the SDC's and MGMT's need the read token of their [metrics] token_file.
    read_token = {
        "mdm_read_token": mdm.readonly_token + "\n",
        "metrics_read_token": _control.METRICS_TOKEN + "\n",
    }
    prometheus = PrometheusServer(
        prom_dir,
        {**repo_rule_files(FOR_FACTOR), **targets, **read_token},
        repo_prometheus_config(INTERVAL),
    )
    # Prometheus scrapes itself too: its port is chosen when the object is made.
    (prom_dir / "targets" / "prometheus.yml").write_text(
        json.dumps([{"targets": [prometheus.address]}])
    )
    mgmt.settings["mdm"]["url"] = mdm.url
    mdm_token_file = root / "mgmt" / "mdm-read-token"  # as the Ansible role writes it
    mdm_token_file.write_text(mdm.readonly_token + "\n")
    mgmt.settings["mdm"]["token_file"] = str(mdm_token_file)
    mgmt.settings["prometheus"]["url"] = prometheus.url
    mgmt.settings["alertmanager"]["url"] = am.url
    users.result()
    mgmt.write_config()

    am.start()
    stoppers.insert(0, ("alertmanager", lambda: stop_and_kill(am)))
    prometheus.start()
    stoppers.insert(0, ("prometheus", lambda: stop_and_kill(prometheus)))
    mgmt.start()
    stoppers.insert(0, ("mgmt", lambda: stop_and_kill(mgmt)))
    return Pipeline(mdm, sds, sdc, prometheus, am, mgmt)


def _parse(t: str) -> dt.datetime:
    return dt.datetime.fromisoformat(t.replace("Z", "+00:00"))


def test_sds_down_is_alerted_acknowledged_and_resolved(pipeline: Pipeline) -> None:
    p = pipeline
    api = p.mgmt.api()
    timings: dict[str, float] = {}
    with p.explained():
        t = time.monotonic()

        def all_scraped() -> bool:
            health = p.prometheus.targets_health()
            return all(health.get(job) and set(health[job]) == {"up"} for job in JOBS)

        p.wait("every target scraped", all_scraped, READY_TIMEOUT_S)

        def all_connected() -> list[dict[str, Any]] | None:
            result: list[dict[str, Any]] = p.prometheus.get(
                "query?query=meshblock_sds_connected==1"
            )["result"]
            return result if len(result) == len(p.sds) else None

        connected = p.wait("Prometheus to see every SDS connected", all_connected, READY_TIMEOUT_S)
        assert {r["metric"]["sds"] for r in connected} == set(p.sds)
        # MGMT synced the shipped rules at start (with the test's shortened `for:`).
        rules = p.wait(
            f"MGMT to sync rule {ALERT}",
            lambda: {r["name"]: r for r in _ok(api.get("/api/rules"))["rules"]}.get(ALERT),
            READY_TIMEOUT_S,
        )
        assert rules["for_seconds"] == 2 and rules["severity"] == "critical", rules
        assert not p.mgmt_alerts(rule_id=ALERT), "an SDS alert before any SDS failed"
        timings["ready"] = time.monotonic() - t

        # -- an SDS dies --------------------------------------------------------------
        killed = p.sds[KILLED]
        t = time.monotonic()
        p.killed.add(KILLED)
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
        (row,) = p.wait(
            f"{ALERT} for {KILLED} to reach MGMT's history as active",
            lambda: [
                a
                for a in p.mgmt_alerts(rule_id=ALERT, status="active")
                if a["component_id"] == KILLED
            ],
            FIRE_TIMEOUT_S,
        )
        timings["kill → active in MGMT"] = time.monotonic() - t
        assert row["severity"] == "critical"
        more = _ok(api.get(f"/api/alerts/{row['id']}/details"))
        assert more["alert_name"] == ALERT
        assert more["rule"]["id"] == rules["id"], "the alert refers to the synced rule"
        assert more["labels"]["sds"] == KILLED
        assert more["labels"]["protection_domain"] == "pd1"
        assert more["labels"]["fault_set"] == "fs2"
        assert more["labels"]["job"] == "meshblock_mdm"
        assert more["labels"]["cluster"] == "meshblock"  # Prometheus's external label
        assert row["message"].startswith("An SDS is disconnected from the MDM — SDS sds2")
        assert more["annotations"]["runbook_url"].endswith("docs/runbook.md#meshblocksdsdown")
        assert more["rule"]["runbook_url"] == more["annotations"]["runbook_url"]
        assert row["resolved_at"] is None and row["acknowledged_at"] is None
        # Only the killed SDS is down.
        assert {a["component_id"] for a in p.mgmt_alerts(rule_id=ALERT)} == {KILLED}

        # -- a user acknowledges it through MGMT's API ---------------------------------
        me = _ok(api.get("/api/me"))
        acked = _ok(api.post(f"/api/alerts/{row['id']}/acknowledge"))
        assert acked["status"] == "acknowledged"
        assert acked["acknowledged_at"] is not None
        more = _ok(api.get(f"/api/alerts/{row['id']}/details"))
        assert (more["acknowledged_by_user_id"], more["acknowledged_by"]) == (me["id"], "admin")
        # Alertmanager's later notifications of the same occurrence keep the status.
        time.sleep(2 * 2)  # two group intervals
        again = _ok(api.get(f"/api/alerts/{row['id']}"))
        assert again["status"] == "acknowledged", again

        # -- the SDS comes back -------------------------------------------------------
        t = time.monotonic()
        killed.start()
        p.killed.discard(KILLED)
        killed.wait_serving()

        def resolved_row() -> dict[str, Any] | None:
            a: dict[str, Any] = _ok(api.get(f"/api/alerts/{row['id']}"))
            return a if a["status"] == "resolved" else None

        resolved = p.wait(
            f"{ALERT} for {KILLED} to be resolved in MGMT", resolved_row, RESOLVE_TIMEOUT_S
        )
        timings["restart → resolved in MGMT"] = time.monotonic() - t
        assert resolved["resolved_at"] is not None
        assert _parse(resolved["resolved_at"]) > _parse(resolved["fired_at"])
        assert resolved["acknowledged_at"] == acked["acknowledged_at"]
        # One row for the occurrence: every notification updated it.
        same = p.mgmt_alerts(alertname=ALERT, component_id=KILLED)
        assert [a["id"] for a in same] == [row["id"]]
    print("alert pipeline timings (s):", {k: round(v, 1) for k, v in timings.items()})
