"""MGMT's cluster pages in a real browser (docs/mgmt.md, "Cluster pages"): pools,
volumes, SDSs and SDCs with their detail pages, read from a real MDM; a volume's life
(create, resize, map, unmap, delete with its confirmation) and an SDS's maintenance
through the pages' forms, each checked on the MDM's API; the MDM's refusals shown with
its own message; a
viewer who sees no button and gets 403 on a POST; and an MGMT without an admin
credential for the MDM that changes nothing.

Chromium (Debian's, trusting exactly MGMT's key) and the screenshots
(``artifacts/mgmt-browser/gui-*.png``, kept as CI artifacts) are those of
``tests/test_mgmt_browser.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import _tls
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon, WebClient, form_value
from test_api import Heartbeats
from test_mgmt_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, mgmt_spki, screenshot

pytestmark = pytest.mark.cluster

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

GIB = 1 << 30
NO_VOLUME = "\u2013"  # an en dash: what a list shows for none


@dataclass
class Cluster:
    mdm: MdmDaemon
    gui: MgmtDaemon  # with an admin: certificate for its actions
    bare: MgmtDaemon  # without any admin credential: it only reads
    pool: dict[str, Any]
    sds: list[dict[str, Any]]
    sdc: dict[str, Any]


def ok(resp: Any, status: int = 200) -> Any:
    got, body = resp
    assert got == status, (got, body)
    return body


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("mgmt-gui")
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm' / 'mdm.db'}", tls=True)
    actor = _tls.identity("admin:mgmt")
    gui = MgmtDaemon(
        root / "mgmt",
        f"sqlite+aiosqlite:///{root / 'mgmt' / 'mgmt.db'}",
        {"mdm": {"url": mdm.url, "admin_cert": str(actor.cert), "admin_key": str(actor.key)}},
    )
    bare = MgmtDaemon(
        root / "bare", f"sqlite+aiosqlite:///{root / 'bare' / 'mgmt.db'}", {"mdm": {"url": mdm.url}}
    )
    rcs: dict[str, int | None] = {}
    try:
        mdm.start()
        api = mdm.api()
        pool = mdm.create_pool("pd1", "sp1", 64)
        sds = [
            ok(
                api.post(
                    "/api/v1/sds",
                    {
                        "name": f"sds{i}",
                        "protection_domain_id": pool["protection_domain_id"],
                        "address": "127.0.0.1",
                        "data_port": 17470 + i,
                        "devices": [
                            {"path": f"/dev/gui{i}", "capacity": "100GiB", "pool_id": pool["id"]}
                        ],
                    },
                ),
                201,
            )
            for i in (1, 2)
        ]
        sdc = ok(api.post("/api/v1/sdc", {"guid": "guid-gui1", "name": "host-gui1"}), 201)
        gui.create_users()
        bare.create_users(viewer=False)
        gui.start()
        bare.start()
        yield Cluster(mdm, gui, bare, pool, sds, sdc)
        rcs = {"gui": gui.stop(), "bare": bare.stop()}
    finally:
        for server in (gui, bare, mdm):
            server.kill()
    assert rcs == {"gui": 0, "bare": 0}, f"MGMT exit codes {rcs}:\n{gui.log_text()}"
    gui.assert_clean_log()
    bare.assert_clean_log()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Headless chromium with a profile of its own, trusting MGMT's key, as in
    test_mgmt_browser.py (whose fixture fails when chromium or playwright is missing)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: `apt-get install -y chromium`", pytrace=False)
    from playwright.sync_api import sync_playwright

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


def login(page: Page, mgmt: MgmtDaemon, user: str, password: str, path: str) -> None:
    page.goto(mgmt.url + path)
    page.fill("#username", user)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("#login-submit")
    assert page.url.split("?")[0].endswith(path), page.url


def submit(page: Page, selector: str) -> int:
    """Click a form's button; the status of the page it leads to."""
    with page.expect_navigation() as nav:
        page.click(selector)
    response = nav.value  # after a 303, the page it pointed to
    assert response is not None
    return response.status


POST_FORM = """([action, fields]) => {
    const form = document.createElement("form");
    form.method = "post";
    form.action = action;
    for (const [name, value] of Object.entries(fields)) {
        const input = document.createElement("input");
        input.type = "hidden";
        input.name = name;
        input.value = value;
        form.appendChild(input);
    }
    document.body.appendChild(form);
    form.submit();
}"""


def post_form(page: Page, action: str, fields: dict[str, str]) -> int:
    """Post a form the page does not have, from the page (its cookies, its origin):
    what a user who rebuilds a hidden form does. The status of the answer."""
    with page.expect_navigation() as nav:
        page.evaluate(POST_FORM, [action, fields])
    response = nav.value
    assert response is not None
    return response.status


def mdm_refusal(resp: Any, status: int) -> str:
    """What the pages must show for a refusal the MDM answers ``resp`` to."""
    got, body = resp
    assert got == status, (got, body)
    return f"The MDM refused: {body['error']['message']}"


def volumes_named(c: Cluster, name: str) -> list[dict[str, Any]]:
    return [v for v in ok(c.mdm.api().get("/api/v1/volumes"))["volumes"] if v["name"] == name]


def on_failure(page: Page) -> None:
    try:
        screenshot(page, "gui-failure.png")
    except Exception as exc:  # keep the original failure
        print(f"no failure screenshot: {exc!r}")


def test_cluster_pages_and_a_volumes_life(cluster: Cluster, browser: BrowserContext) -> None:
    from playwright.sync_api import expect

    c = cluster
    api = c.mdm.api()
    page = browser.new_page()
    try:
        login(page, c.gui, "admin", c.gui.admin_password, "/pools")
        # -- pools: the list, then the detail page, with the MDM's figures
        expect(page.locator("#nav-pools")).to_have_class("current")
        row = page.locator(f"tr.pool#pool-{c.pool['id']}")
        expect(page.locator("tr.pool")).to_have_count(1)
        expect(row).to_have_attribute("data-name", "sp1")
        expect(row.locator(".pool-volumes")).to_have_text("0")
        screenshot(page, "gui-pools.png")
        with page.expect_navigation():
            row.locator(".pool-name a").click()
        capacity = ok(api.get(f"/api/v1/pools/{c.pool['id']}"))["capacity"]
        assert capacity["usable_bytes"] > 0, capacity
        expect(page.locator("#pool-name")).to_have_text("sp1")
        expect(page.locator("#pool-usable")).to_have_attribute(
            "data-bytes", str(capacity["usable_bytes"])
        )
        expect(page.locator("#pool-devices tr.device")).to_have_count(2)

        # -- SDSs: two, disconnected (no daemon heartbeats); maintenance is refused
        page.goto(c.gui.url + "/sds")
        expect(page.locator("tr.sds")).to_have_count(2)
        first = c.sds[0]
        row = page.locator(f"tr.sds#sds-{first['id']}")
        expect(row).to_have_attribute("data-state", "disconnected")
        expect(row).to_have_attribute("data-mode", "normal")
        expect(row.locator(".sds-devices")).to_have_text("1")
        screenshot(page, "gui-sds.png")
        with page.expect_navigation():
            row.locator(".sds-name a").click()
        expect(page.locator("#sds-name")).to_have_text("sds1")
        expect(page.locator("#devices-table tr.device .device-path")).to_have_text("/dev/gui1")
        assert submit(page, "#maintenance-enter") == 409
        refusal = mdm_refusal(
            api.post(f"/api/v1/sds/{first['id']}/maintenance", {"mode": "enter"}), 409
        )
        expect(page.locator("#action-error")).to_have_text(refusal)
        expect(page.locator("#sds-mode")).to_have_attribute("data-mode", "normal")
        assert ok(api.get(f"/api/v1/sds/{first['id']}"))["mode"] == "normal"
        # Connected (heartbeats as their daemons would send), it enters and leaves.
        with Heartbeats(api, c.mdm.cluster_secret) as beats:
            beats.ids.update(s["id"] for s in c.sds)
            beats.beat_now()
            page.goto(c.gui.url + f"/sds/{first['id']}")
            expect(page.locator("#sds-state")).to_have_attribute("data-state", "connected")
            assert submit(page, "#maintenance-enter") == 200
            expect(page.locator("#notice")).to_have_text("The SDS is in maintenance.")
            expect(page.locator("#sds-mode")).to_have_attribute("data-mode", "maintenance")
            assert ok(api.get(f"/api/v1/sds/{first['id']}"))["mode"] == "maintenance"
            screenshot(page, "gui-sds-maintenance.png")
            assert submit(page, "#maintenance-exit") == 200
            expect(page.locator("#notice")).to_have_text("The SDS left maintenance.")
            expect(page.locator("#sds-mode")).to_have_attribute("data-mode", "normal")
            assert ok(api.get(f"/api/v1/sds/{first['id']}"))["mode"] == "normal"

        # -- SDCs: one, nothing mapped
        page.goto(c.gui.url + "/sdc")
        sdc_row = page.locator(f"tr.sdc#sdc-{c.sdc['id']}")
        expect(sdc_row).to_have_attribute("data-name", "host-gui1")
        expect(sdc_row.locator(".sdc-volumes")).to_have_text(NO_VOLUME)

        # -- create: a size without a unit is GiB
        page.goto(c.gui.url + "/volumes")
        expect(page.locator("#no-volumes")).to_be_visible()
        page.fill("#create-name", "gui-vol1")
        page.select_option("#create-pool", str(c.pool["id"]))
        page.fill("#create-size", "4")
        assert submit(page, "#create-submit") == 200
        [made] = volumes_named(c, "gui-vol1")
        assert made["size_bytes"] == 4 * GIB and made["type"] == "thin", made
        assert page.url.endswith(f"/volumes/{made['id']}?done=created"), page.url
        expect(page.locator("#notice")).to_have_text("Volume created.")
        expect(page.locator("#volume-name")).to_have_text("gui-vol1")
        expect(page.locator("#volume-size")).to_have_attribute("data-bytes", str(4 * GIB))

        # -- resize: shrinking is the MDM's 409, with its message; growing works
        page.fill("#resize-size", "2")
        assert submit(page, "#resize-submit") == 409
        refusal = mdm_refusal(api.patch(f"/api/v1/volumes/{made['id']}", {"size": 2 * GIB}), 409)
        expect(page.locator("#action-error")).to_have_text(refusal)
        page.fill("#resize-size", "8GiB")
        assert submit(page, "#resize-submit") == 200
        expect(page.locator("#notice")).to_have_text("Volume resized.")
        expect(page.locator("#volume-size")).to_have_attribute("data-bytes", str(8 * GIB))
        assert ok(api.get(f"/api/v1/volumes/{made['id']}"))["size_bytes"] == 8 * GIB

        # -- map to the SDC
        expect(page.locator("#no-mappings")).to_be_visible()
        page.select_option("#map-sdc", str(c.sdc["id"]))
        assert submit(page, "#map-submit") == 200
        [mapping] = ok(api.get(f"/api/v1/mappings?volume_id={made['id']}"))["mappings"]
        assert mapping["sdc_id"] == c.sdc["id"] and mapping["access_mode"] == "read_write"
        mrow = page.locator(f"tr.mapping#mapping-{mapping['id']}")
        expect(page.locator("tr.mapping")).to_have_count(1)
        expect(mrow).to_have_attribute("data-sdc-id", str(c.sdc["id"]))
        expect(mrow.locator(".mapping-sdc")).to_have_text("host-gui1")
        screenshot(page, "gui-volume.png")
        page.goto(c.gui.url + "/sdc")
        expect(sdc_row.locator(".sdc-volumes")).to_have_text("gui-vol1")
        page.goto(c.gui.url + f"/sdc/{c.sdc['id']}")
        expect(page.locator("#sdc-mappings tr.mapping .mapping-volume")).to_have_text("gui-vol1")

        # -- delete while mapped: the confirmation, then the MDM's 409
        page.goto(c.gui.url + f"/volumes/{made['id']}")
        with page.expect_navigation():
            page.click("#delete-link")
        page.fill("#confirm-name", "gui-vol1")
        assert submit(page, "#delete-submit") == 409
        refusal = mdm_refusal(api.delete(f"/api/v1/volumes/{made['id']}"), 409)
        expect(page.locator("#action-error")).to_have_text(refusal)
        assert ok(api.get(f"/api/v1/volumes/{made['id']}"))["state"] == "active"

        # -- unmap
        page.goto(c.gui.url + f"/volumes/{made['id']}")
        assert submit(page, f"#unmap-{mapping['id']}") == 200
        expect(page.locator("#notice")).to_have_text("Volume unmapped.")
        expect(page.locator("tr.mapping")).to_have_count(0)
        assert ok(api.get(f"/api/v1/mappings?volume_id={made['id']}"))["mappings"] == []

        # -- delete: a wrong name is refused by MGMT itself, the right one deletes
        with page.expect_navigation():
            page.click("#delete-link")
        expect(page.locator("#delete-form")).to_be_visible()
        screenshot(page, "gui-delete.png")
        page.fill("#confirm-name", "gui-vol")
        assert submit(page, "#delete-submit") == 422
        expect(page.locator("#action-error")).to_contain_text("type the volume's name")
        assert ok(api.get(f"/api/v1/volumes/{made['id']}"))["state"] == "active"
        page.fill("#confirm-name", "gui-vol1")
        assert submit(page, "#delete-submit") == 200
        assert page.url.endswith("/volumes?done=deleted"), page.url
        expect(page.locator("#notice")).to_contain_text("Volume deleted")
        assert all(v["state"] == "deleting" for v in volumes_named(c, "gui-vol1"))
        gone = page.locator(f"tr.volume#volume-{made['id']}")
        if gone.count():
            expect(gone).to_have_attribute("data-state", "deleting")
        screenshot(page, "gui-volumes.png")
    except BaseException:
        on_failure(page)
        raise


def test_a_viewer_sees_no_button_and_gets_403(cluster: Cluster, browser: BrowserContext) -> None:
    from playwright.sync_api import expect

    c = cluster
    api = c.mdm.api()
    vol = ok(
        api.post(
            "/api/v1/volumes", {"name": "viewer-vol", "pool_id": c.pool["id"], "size": "1GiB"}
        ),
        201,
    )
    sds_id = c.sds[0]["id"]
    page = browser.new_page()
    try:
        login(page, c.gui, "viewer", c.gui.viewer_password, "/volumes")
        expect(page.locator(f"tr.volume#volume-{vol['id']}")).to_have_attribute(
            "data-state", "active"
        )
        expect(page.locator("#create-form")).to_have_count(0)
        page.goto(c.gui.url + f"/volumes/{vol['id']}")
        expect(page.locator("#volume-name")).to_have_text("viewer-vol")
        for absent in ("#map-form", "#resize-form", "#delete-link", "form.action"):
            expect(page.locator(absent)).to_have_count(0)
        screenshot(page, "gui-viewer-volume.png")
        page.goto(c.gui.url + f"/volumes/{vol['id']}/delete")
        expect(page.locator("#delete-form")).to_have_count(0)
        page.goto(c.gui.url + f"/sds/{sds_id}")
        expect(page.locator("#sds-name")).to_have_text("sds1")
        expect(page.locator("#maintenance-form")).to_have_count(0)

        # The forms posted anyway, with the viewer's own valid CSRF token: 403 each.
        csrf = page.locator("#logout-form input[name=csrf_token]").get_attribute("value")
        assert csrf
        posts: list[tuple[str, dict[str, str]]] = [
            ("/volumes", {"name": "by-viewer", "pool_id": str(c.pool["id"]), "size": "1"}),
            (f"/volumes/{vol['id']}/resize", {"size": "2"}),
            (f"/volumes/{vol['id']}/map", {"sdc_id": str(c.sdc["id"])}),
            (f"/volumes/{vol['id']}/unmap", {"mapping_id": "1"}),
            (f"/volumes/{vol['id']}/delete", {"confirm_name": "viewer-vol"}),
            (f"/sds/{sds_id}/maintenance", {"mode": "enter"}),
        ]
        for path, form in posts:
            assert post_form(page, path, {**form, "csrf_token": csrf}) == 403, path
            expect(page.locator("section#error")).to_have_attribute("data-code", "forbidden")
    except BaseException:
        on_failure(page)
        raise
    after = ok(api.get(f"/api/v1/volumes/{vol['id']}"))
    assert (after["state"], after["size_bytes"], after["mapped_sdc_ids"]) == ("active", GIB, [])
    assert volumes_named(c, "by-viewer") == []
    assert ok(api.get(f"/api/v1/sds/{sds_id}"))["mode"] == "normal"
    ok(api.delete(f"/api/v1/volumes/{vol['id']}"), 204)


def test_an_admins_action_without_the_sessions_csrf_token_is_refused(cluster: Cluster) -> None:
    """Each of the six actions, posted by a logged-in admin without the session's CSRF
    token or with another one (a forged cross-site form): 403 `csrf`, the MDM not
    called."""
    c = cluster
    api = c.mdm.api()
    vol = ok(
        api.post("/api/v1/volumes", {"name": "csrf-vol", "pool_id": c.pool["id"], "size": "1GiB"}),
        201,
    )
    web = WebClient(c.gui.url)
    assert web.login("admin", c.gui.admin_password, "/volumes").status == 303
    sds_id = c.sds[0]["id"]
    posts: list[tuple[str, dict[str, str]]] = [
        ("/volumes", {"name": "by-forgery", "pool_id": str(c.pool["id"]), "size": "1"}),
        (f"/volumes/{vol['id']}/resize", {"size": "2"}),
        (f"/volumes/{vol['id']}/map", {"sdc_id": str(c.sdc["id"])}),
        (f"/volumes/{vol['id']}/unmap", {"mapping_id": "1"}),
        (f"/volumes/{vol['id']}/delete", {"confirm_name": "csrf-vol"}),
        (f"/sds/{sds_id}/maintenance", {"mode": "enter"}),
    ]
    for path, form in posts:
        for token in ({}, {"csrf_token": "forged"}):
            answer = web.post(path, {**form, **token})
            assert answer.status == 403, (path, token, answer)
            assert 'data-code="csrf"' in answer.body, (path, token, answer.body[:500])
    after = ok(api.get(f"/api/v1/volumes/{vol['id']}"))
    assert (after["state"], after["size_bytes"], after["mapped_sdc_ids"]) == ("active", GIB, [])
    assert volumes_named(c, "by-forgery") == []
    assert ok(api.get(f"/api/v1/sds/{sds_id}"))["mode"] == "normal"
    ok(api.delete(f"/api/v1/volumes/{vol['id']}"), 204)


def test_without_an_admin_credential_mgmt_changes_nothing(cluster: Cluster) -> None:
    """The default: no [mdm] admin_cert nor admin_token_file. The pages read; an
    admin sees why there is no button; a POST is a 503 and the MDM is not called."""
    c = cluster
    web = WebClient(c.bare.url)
    assert web.login("admin", c.bare.admin_password, "/volumes").status == 303
    page = web.get("/volumes")
    assert page.status == 200, page
    assert 'id="actions-off"' in page.body and "admin_cert" in page.body
    assert 'id="create-form"' not in page.body
    sds_page = web.get(f"/sds/{c.sds[0]['id']}")
    assert sds_page.status == 200 and 'id="maintenance-form"' not in sds_page.body
    csrf = form_value(page.body, "csrf_token")
    form = {"name": "by-bare", "pool_id": str(c.pool["id"]), "size": "1", "csrf_token": csrf}
    refused = web.post("/volumes", form)
    assert refused.status == 503, refused
    assert "admin_cert" in refused.body
    assert volumes_named(c, "by-bare") == []
