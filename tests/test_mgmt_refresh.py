"""MGMT's pages refresh themselves (docs/mgmt.md, "Refresh"): in a real browser, a
change made on the MDM's API shows on an open page within the interval without a
reload; the refresh pauses while the user is in a form; a session that ends sends the
page to the login page; the script runs under the pages' CSP (no inline script).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

import _tls
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon, WebClient
from meshblock.mgmt.config import HttpConfig, MgmtConfig
from test_mgmt_browser import screenshot
from test_mgmt_gui import browser, login, ok, on_failure  # noqa: F401  (fixture)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

REFRESH_S = 1.0
WITHIN_MS = 5_000  # a few intervals: the change shows at the next one
CSP = re.compile(r"content security policy", re.IGNORECASE)


@dataclass
class Cluster:
    mdm: MdmDaemon
    gui: MgmtDaemon
    pool: dict[str, Any]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("mgmt-refresh")
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}", tls=True)
    actor = _tls.identity("admin:mgmt")
    gui = MgmtDaemon(
        root / "mgmt",
        f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}",
        {
            "http": {"page_refresh_s": REFRESH_S},
            "mdm": {"url": mdm.url, "admin_cert": str(actor.cert), "admin_key": str(actor.key)},
        },
    )
    rc: int | None = None
    try:
        mdm.start()
        api = mdm.api()
        pool = mdm.create_pool("pd1", "sp1", 16)
        ok(
            api.post(
                "/api/v1/sds",
                {
                    "name": "sds1",
                    "protection_domain_id": pool["protection_domain_id"],
                    "address": "127.0.0.1",
                    "data_port": 17491,
                    "devices": [
                        {"path": "/dev/refresh1", "capacity": "100GiB", "pool_id": pool["id"]}
                    ],
                },
            ),
            201,
        )
        gui.create_users(viewer=False)
        gui.start()
        yield Cluster(mdm, gui, pool)
        rc = gui.stop()
    finally:
        gui.kill()
        mdm.kill()
    assert rc == 0, f"MGMT exit code {rc}:\n{gui.log_text()}"
    gui.assert_clean_log()


def watch_console(page: Page) -> list[str]:
    """What the page logs as errors (a CSP violation is one; the favicon MGMT does not
    have is not)."""
    errors: list[str] = []

    def console(message: Any) -> None:
        where = str(message.location.get("url", ""))
        if message.type == "error" and not where.endswith("/favicon.ico"):
            errors.append(f"{message.text} ({where})")

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def mark(page: Page) -> None:
    """A value that a reload would lose."""
    page.evaluate("() => { window.__notReloaded = true; }")


def not_reloaded(page: Page) -> bool:
    return bool(page.evaluate("() => window.__notReloaded === true"))


def new_volume(c: Cluster, name: str) -> dict[str, Any]:
    body = {"name": name, "pool_id": c.pool["id"], "size": "1GiB"}
    return dict(ok(c.mdm.api().post("/api/v1/volumes", body), 201))


@pytest.mark.cluster
def test_an_open_page_shows_a_change_on_the_mdm_without_a_reload(
    cluster: Cluster,
    browser: BrowserContext,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    c = cluster
    page = browser.new_page()
    errors = watch_console(page)
    try:
        login(page, c.gui, "admin", c.gui.admin_password, "/volumes")
        expect(page.locator("body")).to_have_attribute("data-refresh-s", "1.0")
        expect(page.locator("#no-volumes")).to_be_visible()
        mark(page)
        made = new_volume(c, "refresh-vol1")
        row = page.locator(f"tr.volume#volume-{made['id']}")
        expect(row).to_have_attribute("data-state", "active", timeout=WITHIN_MS)
        assert not_reloaded(page), "the page was reloaded"
        expect(page.locator("#refresh-status")).to_have_attribute("data-state", "ok")
        expect(page.locator("#refresh-status")).to_contain_text("Updated")

        # the pool's page: its volume table and figures follow the MDM
        page.goto(c.gui.url + f"/pools/{c.pool['id']}")
        mark(page)
        second = new_volume(c, "refresh-vol2")
        expect(page.locator(f"#pool-volumes tr.volume#volume-{second['id']}")).to_have_count(
            1, timeout=WITHIN_MS
        )
        ok(c.mdm.api().patch(f"/api/v1/volumes/{second['id']}", {"size": 3 << 30}))
        expect(page.locator(f"#volume-{second['id']} td").nth(2)).to_have_text(
            "3 GiB", timeout=WITHIN_MS
        )
        assert not_reloaded(page), "the page was reloaded"
        screenshot(page, "gui-refresh-pool.png")
        assert not [e for e in errors if CSP.search(e)], errors
        assert not errors, errors
    except BaseException:
        on_failure(page)
        raise


@pytest.mark.cluster
def test_the_refresh_pauses_while_the_user_is_in_a_form(
    cluster: Cluster,
    browser: BrowserContext,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    c = cluster
    page = browser.new_page()
    try:
        login(page, c.gui, "admin", c.gui.admin_password, "/volumes")
        page.fill("#create-name", "half-typed")
        made = new_volume(c, "refresh-while-typing")
        status = page.locator("#refresh-status")
        expect(status).to_have_attribute("data-state", "paused", timeout=WITHIN_MS)
        page.wait_for_timeout(3 * REFRESH_S * 1000)
        expect(page.locator(f"tr.volume#volume-{made['id']}")).to_have_count(0)
        expect(page.locator("#create-name")).to_have_value("half-typed")
        expect(page.locator("#create-name")).to_be_focused()
        screenshot(page, "gui-refresh-paused.png")
        # left as it was (emptied, focus elsewhere): the page catches up
        page.fill("#create-name", "")
        page.locator("h1").click()
        expect(page.locator(f"tr.volume#volume-{made['id']}")).to_have_count(1, timeout=WITHIN_MS)
        expect(status).to_have_attribute("data-state", "ok")
    except BaseException:
        on_failure(page)
        raise


@pytest.mark.cluster
def test_a_panel_under_the_pointer_is_not_replaced(
    cluster: Cluster,
    browser: BrowserContext,  # noqa: F811
) -> None:
    """A panel the pointer is over (its buttons about to be pressed) keeps its rows in
    place; it catches up once the pointer leaves it."""
    from playwright.sync_api import expect

    c = cluster
    page = browser.new_page()
    try:
        login(page, c.gui, "admin", c.gui.admin_password, "/volumes")
        page.hover("#volumes-panel")
        made = new_volume(c, "refresh-under-pointer")
        page.wait_for_timeout(3 * REFRESH_S * 1000)
        expect(page.locator(f"tr.volume#volume-{made['id']}")).to_have_count(0)
        page.hover("h1")
        expect(page.locator(f"tr.volume#volume-{made['id']}")).to_have_count(1, timeout=WITHIN_MS)
    except BaseException:
        on_failure(page)
        raise


@pytest.mark.cluster
def test_a_session_that_ends_sends_the_page_to_the_login(
    cluster: Cluster,
    browser: BrowserContext,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    c = cluster
    page = browser.new_page()
    other = browser.new_page()
    try:
        login(page, c.gui, "admin", c.gui.admin_password, "/sds")
        expect(page.locator("tr.sds")).to_have_count(1)
        # logged out in another tab of the same browser: the session is gone
        other.goto(c.gui.url + "/pools")
        with other.expect_navigation():
            other.click("#logout-button")
        page.wait_for_url(re.compile(r"/login\?next=%2Fsds$"), timeout=WITHIN_MS)
        expect(page.locator("#login-form")).to_be_visible()
    except BaseException:
        on_failure(page)
        raise


@pytest.mark.cluster
def test_only_a_page_a_get_answered_refreshes(cluster: Cluster) -> None:
    """The page a refused action shows (its URL is the form's target) and error pages
    load no script; a refresh of an ended session is a 401, not a redirect."""
    c = cluster
    web = WebClient(c.gui.url)
    assert web.login("admin", c.gui.admin_password, "/volumes").status == 303
    page = web.get("/volumes")
    assert page.status == 200 and 'data-refresh-s="1.0"' in page.body, page.body[:300]
    assert '<script src="/static/refresh.js" defer></script>' in page.body
    assert "<script>" not in page.body  # no inline script: the CSP forbids them
    assert "script-src" not in page.headers["Content-Security-Policy"]
    assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
    script = web.get("/static/refresh.js")
    assert script.status == 200 and "X-Meshblock-Refresh" in script.body
    csrf = re.search(r'name="csrf_token" value="([^"]*)"', page.body)
    assert csrf is not None
    refused = web.post("/volumes", {"name": "", "csrf_token": csrf.group(1)})
    assert refused.status == 422 and "data-refresh-s" not in refused.body, refused.status
    missing = web.get("/volumes/999999")
    assert missing.status == 404 and "refresh.js" not in missing.body
    anonymous = WebClient(c.gui.url)
    assert anonymous.get("/volumes").status == 303
    told = anonymous.request("GET", "/volumes", headers={"X-Meshblock-Refresh": "1"})
    assert told.status == 401, told


@pytest.mark.unit
def test_the_interval_is_0_or_1_to_86400_seconds() -> None:
    assert MgmtConfig().http.page_refresh_s == 10.0
    for good in (0.0, 1.0, 86400.0):
        MgmtConfig(http=HttpConfig(page_refresh_s=good))
    for bad in (0.5, -1.0, 86401.0):
        with pytest.raises(ValueError, match="page_refresh_s"):
            MgmtConfig(http=HttpConfig(page_refresh_s=bad))
