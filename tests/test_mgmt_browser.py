"""MGMT in a real browser: Playwright drives Debian's chromium (headless) through the
login form, finds an alert on ``/alerts``, acknowledges it with its button, and
saves screenshots of the dashboard and the alerts page under ``artifacts/mgmt-browser/``
at the repository root (gitignored; CI keeps them as test artifacts).

MGMT runs with a real MDM (the dashboard's cluster figures and components) and a
real Prometheus scraping that MDM (the charts). The alerts come from Alertmanager's
webhook contract, posted by the test; ``test_alert_pipeline.py`` covers a real
Alertmanager sending them.

Chromium is Debian's ``/usr/bin/chromium`` (``apt-get install -y chromium``), never a
browser that Playwright downloads: the test fails, and does not skip, without it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import _tls
from _mdm import MdmDaemon
from _mgmt import MGMT_IDENTITY, MgmtDaemon
from _monitoring import REPO, PrometheusServer, ToolMissing
from test_mgmt import alert, notification, ok

pytestmark = pytest.mark.cluster

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # chromium's own connections to the outside are refused here: do not make them.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts" / "mgmt-browser"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def mgmt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MgmtDaemon]:
    root = tmp_path_factory.mktemp("mgmt-browser")
    # MGMT's [tls] makes it reach the MDM over HTTPS; Prometheus scrapes it with a
    # certificate of its own (docs/monitoring.md, "Scraping over HTTPS").
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}", tls=True)
    scraper = _tls.identity("mgmt:prometheus")
    try:
        prometheus = PrometheusServer(
            root / "prometheus",
            {},
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "meshblock_mdm",
                        "scheme": "https",
                        "tls_config": {
                            "ca_file": str(scraper.ca),
                            "cert_file": str(scraper.cert),
                            "key_file": str(scraper.key),
                        },
                        "static_configs": [{"targets": [f"127.0.0.1:{mdm.port}"]}],
                    }
                ],
            },
        )
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    daemon = MgmtDaemon(
        root / "mgmt",
        f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}",
        {
            "mdm": {"url": mdm.url},
            "prometheus": {"url": prometheus.url, "chart_range_s": 300.0, "chart_step_s": 5.0},
        },
    )
    rc: int | None = None
    try:
        # The user and token commands (two Python start-ups) run while the MDM starts.
        with ThreadPoolExecutor(max_workers=1) as background:
            users = background.submit(daemon.create_users, viewer=False)
            mdm.start()
            prometheus.start()
            users.result()
        daemon.start()
        yield daemon
        rc = daemon.stop()
    finally:
        for server in (daemon, prometheus, mdm):
            server.kill()
    assert rc == 0, f"MGMT exited with code {rc} on SIGTERM:\n{daemon.log_text()}"
    daemon.assert_clean_log()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """A fresh chromium profile (its own user-data-dir), headless."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} not found: the browser test needs Debian's chromium; install it "
            "with `make deps` (as root: `apt-get install -y chromium`)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: `.venv/bin/pip install -e '.[test]'` "
            "(never `playwright install`: the test uses /usr/bin/chromium)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={mgmt_spki()}"],
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def mgmt_spki() -> str:
    """The base64 SHA-256 of the public key MGMT serves with (``tests/_mgmt.py``).

    Chromium on Linux takes its trusted CAs from an NSS database, which nothing here
    can write (no ``certutil``) short of a system-wide policy; so it is told to accept
    this one key instead (``--ignore-certificate-errors-spki-list``, honoured with a
    profile directory of its own). Every other certificate is still checked: the
    browser trusts exactly the server under test, not "any certificate"."""
    cert = x509.load_pem_x509_certificate(_tls.component_identity(MGMT_IDENTITY).cert.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000, f"{path} is too small to be a screenshot"
    return path


def test_login_acknowledge_and_screenshots(mgmt: MgmtDaemon, browser: BrowserContext) -> None:
    from playwright.sync_api import expect

    api = mgmt.api()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    down = alert(
        starts=now - dt.timedelta(minutes=3),
        description="SDS sds2 (protection domain pd1, fault set fs2) has sent no heartbeat.",
        sds="sds2",
        protection_domain="pd1",
        fault_set="fs2",
    )
    full = alert(
        "MeshblockPoolNearFull",
        starts=now - dt.timedelta(minutes=1),
        severity="warning",
        summary="A pool is nearly full",
        pool="sp1",
        protection_domain="pd1",
    )
    runbook = "https://github.com/meshblock/meshblock/blob/main/docs/runbook.md#meshblocksdsdown"
    down["annotations"]["runbook_url"] = runbook
    ok(mgmt.webhook(notification(down, full)))
    (target,) = ok(api.get("/api/alerts?component_id=sds2"))["alerts"]
    (other,) = ok(api.get("/api/alerts?component_id=sp1"))["alerts"]
    assert target["status"] == other["status"] == "active"

    page = browser.new_page()
    try:
        # Anonymous: sent to the login form, which refuses a wrong password.
        page.goto(mgmt.url + "/alerts")
        expect(page.locator("form#login-form")).to_be_visible()
        assert "/login" in page.url
        page.fill("#username", "admin")
        page.fill("#password", "not-the-password")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_be_visible()

        page.fill("#username", "admin")
        page.fill("#password", mgmt.admin_password)
        with page.expect_navigation():
            page.click("#login-submit")
        assert page.url.split("?")[0].endswith("/alerts"), page.url

        row = page.locator(f"tr.alert-row#alert-{target['id']}")
        expect(row).to_be_visible()
        expect(row).to_have_attribute("data-status", "active")
        expect(row.locator(".alert-rule")).to_have_text("MeshblockSdsDown")
        expect(row.locator(".alert-component")).to_have_text("sds2")
        expect(row.locator(f".alert-runbook a#runbook-{target['id']}")).to_have_attribute(
            "href", runbook
        )
        expect(page.locator(f"tr#alert-{other['id']} .alert-runbook a")).to_have_count(0)
        expect(page.locator(f"tr.alert-row#alert-{other['id']}")).to_have_attribute(
            "data-status", "active"
        )

        with page.expect_navigation():
            page.click(f"#acknowledge-{target['id']}")
        expect(page.locator("#notice")).to_be_visible()
        expect(row).to_have_attribute("data-status", "acknowledged")
        expect(row.locator(".alert-status")).to_have_text("acknowledged")
        expect(row.locator(".alert-handled")).to_contain_text("ack. by admin")
        expect(page.locator(f"#acknowledge-{target['id']}")).to_have_count(0)
        # The other alert is untouched.
        expect(page.locator(f"tr.alert-row#alert-{other['id']}")).to_have_attribute(
            "data-status", "active"
        )
        screenshot(page, "alerts.png")

        after = ok(api.get(f"/api/alerts/{target['id']}"))
        me = ok(mgmt.api().get("/api/me"))
        assert after["status"] == "acknowledged"
        more = ok(api.get(f"/api/alerts/{target['id']}/details"))
        assert more["acknowledged_by_user_id"] == me["id"]
        assert ok(api.get(f"/api/alerts/{other['id']}"))["status"] == "active"

        page.goto(mgmt.url + "/health")
        expect(page.locator("#cluster-status")).to_have_attribute("data-status", "ok")
        expect(page.locator("#component-mdm-1")).to_be_visible()
        expect(page.locator("#alert-counts")).to_be_visible()
        expect(page.locator("svg#chart-capacity")).to_be_visible()
        expect(page.locator("svg#chart-io")).to_be_visible()
        expect(page.locator(".chart-error")).to_have_count(0)
        screenshot(page, "health.png")
    except BaseException:
        try:
            screenshot(page, "failure.png")
        except Exception as exc:  # keep the original failure
            print(f"no failure screenshot: {exc!r}")
        raise
