"""MGMT against a real MGMT process, on SQLite and on PostgreSQL.

The webhook contract (authentication, validation, idempotency, resolution), the
alert API (filters, paging, acknowledge, resolve), users (the CLI, login and logout,
sessions, roles, API tokens, CSRF), the pages, /metrics, and the dashboard while the
MDM and Prometheus cannot be reached. Refused requests must change nothing.

Alertmanager, Prometheus and a live MDM are in ``test_mgmt_upstream.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client.parser import text_string_to_metric_families

import _control
from _http import Api
from _mgmt import MgmtDaemon, WebClient
from _process import started
from _wait import wait_until
from conftest import BACKENDS, new_database_url
from meshblock.mgmt.db import VERSION_TABLE, create_engine, migrate
from meshblock.mgmt.models import Base

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_fingerprints = itertools.count(1)


def iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def alert(
    name: str = "MeshblockSdsDown",
    *,
    status: str = "firing",
    starts: dt.datetime = T0,
    ends: dt.datetime | None = None,
    fingerprint: str | None = None,
    severity: str = "critical",
    summary: str = "An SDS is down",
    description: str = "",
    **labels: str,
) -> dict[str, Any]:
    annotations = {"summary": summary}
    if description:
        annotations["description"] = description
    return {
        "status": status,
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": annotations,
        "startsAt": iso(starts),
        "endsAt": iso(ends) if ends else "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example/graph",
        "fingerprint": fingerprint or f"{next(_fingerprints):016x}",
    }


def notification(*alerts: dict[str, Any]) -> dict[str, Any]:
    firing = any(a["status"] == "firing" for a in alerts)
    return {
        "version": "4",
        "groupKey": '{}:{alertname="x"}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": "meshblock-mgmt",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": list(alerts),
    }


def ok(resp: Any, status: int = 200) -> Any:
    code, body = resp
    assert code == status, f"expected {status}, got {code}: {body}"
    return body


def err(resp: Any, status: int, code: str) -> dict[str, Any]:
    got, body = resp
    assert got == status, f"expected {status}, got {got}: {body}"
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


@pytest.fixture(scope="module", params=BACKENDS)
def mgmt(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MgmtDaemon]:
    workdir = tmp_path_factory.mktemp(f"mgmt-{request.param}")
    daemon = MgmtDaemon(workdir, new_database_url(request.param, request, workdir))
    daemon.create_users()
    with started(daemon):
        yield daemon
    daemon.assert_clean_log()


@pytest.fixture(scope="module")
def api(mgmt: MgmtDaemon) -> Api:
    return mgmt.api()


def all_alerts(api: Api, **query: str) -> dict[str, Any]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    body: dict[str, Any] = ok(api.get(f"/api/alerts?limit=1000&{qs}"))
    return body


DISPLAY_FIELDS = [
    "id",
    "severity",
    "status",
    "message",
    "component_id",
    "fired_at",
    "age_seconds",
    "acknowledged_at",
    "resolved_at",
    "metric_value",
    "threshold_value",
]


def stable(a: dict[str, Any]) -> dict[str, Any]:
    """An alert's display form without ``age_seconds``, which grows while a test runs."""
    assert list(a) == DISPLAY_FIELDS, a
    assert isinstance(a["age_seconds"], int) and a["age_seconds"] >= 0, a
    return {k: v for k, v in a.items() if k != "age_seconds"}


def by_component(api: Api, component: str) -> list[dict[str, Any]]:
    """The alerts of ``component`` (each test gives its alerts a component of its own)."""
    return [stable(a) for a in all_alerts(api, component_id=component)["alerts"]]


def one(api: Api, alert_id: int) -> dict[str, Any]:
    return stable(ok(api.get(f"/api/alerts/{alert_id}")))


def details(api: Api, alert_id: int) -> dict[str, Any]:
    body: dict[str, Any] = ok(api.get(f"/api/alerts/{alert_id}/details"))
    return body


def snapshot(api: Api) -> list[dict[str, Any]]:
    return [stable(a) for a in all_alerts(api)["alerts"]]


# -- schema ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_match_the_models(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = new_database_url(backend, request, tmp_path)

    async def main() -> list[Any]:
        engine = create_engine(url)
        try:
            await migrate(engine)
            await migrate(engine)  # the second time does nothing
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: compare_metadata(
                        MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata
                    )
                )
        finally:
            await engine.dispose()

    diff = [
        d
        for d in asyncio.run(main())
        if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)
    ]
    assert diff == []


# -- the CLI ---------------------------------------------------------------------------


def test_user_add_refuses_a_duplicate_unless_exist_ok(mgmt: MgmtDaemon) -> None:
    r = mgmt.cli("user", "add", "admin", "--role", "admin", stdin="another-password\n")
    assert r.returncode == 4 and "already exists" in r.stderr
    r = mgmt.cli("user", "add", "admin", "--role", "admin", "--exist-ok", stdin="x-password\n")
    assert r.returncode == 0, r.stderr
    # The password did not change: the original one still logs in.
    web = WebClient(mgmt.url)
    assert web.login("admin", mgmt.admin_password).status == 303


def test_user_add_checks_the_password_and_reads_a_password_file(
    mgmt: MgmtDaemon, tmp_path: Path
) -> None:
    r = mgmt.cli("user", "add", "shorty", stdin="short\n")
    assert r.returncode == 4 and "at least 8" in r.stderr
    pw = tmp_path / "pw"
    pw.write_text("from-a-file-123\nignored second line\n")
    r = mgmt.cli("user", "add", "filed", "--password-file", str(pw))
    assert r.returncode == 0, r.stderr
    assert WebClient(mgmt.url).login("filed", "from-a-file-123").status == 303
    listing = mgmt.cli("user", "list").stdout
    assert "admin\tadmin" in listing and "viewer\tviewer" in listing and "filed\tviewer" in listing


# -- the webhook -----------------------------------------------------------------------


def test_webhook_requires_its_token(mgmt: MgmtDaemon, api: Api) -> None:
    before = snapshot(api)
    payload = notification(alert())
    for token in ("", "wrong-token", mgmt.admin_token):
        resp = mgmt.webhook(payload, token=token) if token else _no_token(mgmt, payload)
        err(resp, 401, "unauthorized")
    assert snapshot(api) == before


def _no_token(mgmt: MgmtDaemon, payload: Any) -> Any:
    return Api(mgmt.url, None).post("/api/alerts/webhook", payload)


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (lambda p: p.update(version="3"), 422),
        (lambda p: p.pop("alerts"), 422),
        (lambda p: p["alerts"][1]["labels"].pop("alertname"), 422),
        (lambda p: p["alerts"][1].update(startsAt="yesterday"), 422),
        (lambda p: p["alerts"][1].update(status="pending"), 422),
        (lambda p: p["alerts"][1]["labels"].update(sds=7), 422),
    ],
)
def test_webhook_refuses_a_malformed_notification_whole(
    mgmt: MgmtDaemon, api: Api, mutate: Any, status: int
) -> None:
    before = snapshot(api)
    payload = notification(alert(), alert())  # the first alert is fine: nothing is stored
    mutate(payload)
    err(mgmt.webhook(payload), status, "invalid")
    err(mgmt.webhook([1, 2]), 400, "bad_request")
    raw = Api(mgmt.url, mgmt.webhook_token)("POST", "/api/alerts/webhook", data=b"{not json")
    err(raw, 400, "bad_request")
    assert snapshot(api) == before


def test_webhook_refuses_deeply_nested_json(mgmt: MgmtDaemon, api: Api) -> None:
    before = snapshot(api)
    webhook = Api(mgmt.url, mgmt.webhook_token)
    for raw in (b"[" * 10_000, b'{"alerts": ' * 100 + b"[]" + b"}" * 100):
        resp = webhook("POST", "/api/alerts/webhook", data=raw)
        e = err(resp, 400, "bad_request")
        assert "nested deeper than 64 levels" in e["message"], e
    assert snapshot(api) == before


def test_webhook_is_idempotent(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(sds="sds-idem", summary="SDS down", description="sds-idem missed heartbeats")
    a["startsAt"] = "2026-01-01T00:00:00.123456789Z"  # Go's nanoseconds
    assert ok(mgmt.webhook(notification(a)))["inserted"] == 1
    second = ok(mgmt.webhook(notification(a)))
    assert (second["inserted"], second["updated"]) == (0, 1)
    a["annotations"]["description"] = "sds-idem still down"
    ok(mgmt.webhook(notification(a)))
    rows = by_component(api, "sds-idem")
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "active"
    assert row["component_id"] == "sds-idem"
    assert row["severity"] == "critical"
    assert row["message"] == "SDS down — sds-idem still down"
    assert row["fired_at"] == "2026-01-01T00:00:00.123456Z"
    assert row["resolved_at"] is None
    more = details(api, row["id"])
    assert stable(more["alert"]) == row
    assert more["alert_name"] == "MeshblockSdsDown"
    assert more["received"] == a
    assert (more["fingerprint"], more["labels"]) == (a["fingerprint"], a["labels"])
    # No Prometheus here: the alert's rule was made when it arrived.
    assert more["rule"]["name"] == "MeshblockSdsDown"
    assert (more["rule"]["group"], more["rule"]["last_synced"]) == ("", None)
    listed = {r["id"]: r for r in ok(api.get("/api/rules"))["rules"]}
    assert listed[more["rule"]["id"]]["name"] == "MeshblockSdsDown"


def test_a_new_start_of_the_same_labels_is_a_new_row(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(sds="sds-again")
    b = dict(a, startsAt=iso(T0 + dt.timedelta(hours=1)))
    ok(mgmt.webhook(notification(a, b)))
    assert len(by_component(api, "sds-again")) == 2


def test_resolved_notification_closes_the_alert(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert("MeshblockPoolNearFull", severity="warning", pool="pool-r", value="0.91")
    ok(mgmt.webhook(notification(a)))
    ends = T0 + dt.timedelta(minutes=7, seconds=3)
    ok(mgmt.webhook(notification(dict(a, status="resolved", endsAt=iso(ends)))))
    (row,) = by_component(api, "pool-r")
    assert row["status"] == "resolved"
    assert row["resolved_at"] == iso(ends)
    assert row["component_id"] == "pool-r"
    # A repeated resolution changes nothing more.
    ok(mgmt.webhook(notification(dict(a, status="resolved", endsAt=iso(ends)))))
    assert by_component(api, "pool-r") == [row]


def test_an_alert_first_seen_resolved_is_stored_resolved(mgmt: MgmtDaemon, api: Api) -> None:
    ends = T0 + dt.timedelta(minutes=1)
    a = alert(status="resolved", ends=ends, sds="sds-late")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "sds-late")
    assert (row["status"], row["resolved_at"]) == ("resolved", iso(ends))


def test_mapping_of_labels_and_annotations(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(
        "MeshblockHighIoLatency",
        severity="page",  # not one of ours: stored as warning
        summary="",
        description="p99 above 50 ms",
        instance="10.0.0.5:7073",
    )
    a["annotations"].update(value="0.0731", threshold="0.05")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "10.0.0.5:7073")
    assert row["severity"] == "warning"
    assert row["component_id"] == "10.0.0.5:7073"
    assert row["message"] == "p99 above 50 ms"
    assert (row["metric_value"], row["threshold_value"]) == (0.0731, 0.05)


# -- filters and paging ----------------------------------------------------------------


def test_filters_and_paging(mgmt: MgmtDaemon, api: Api) -> None:
    base = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)  # after every other test's alerts
    sent = []
    for i in range(12):
        sent.append(
            alert(
                "MeshblockFilterA" if i % 3 else "MeshblockFilterB",
                severity=("warning", "critical")[i % 2],
                starts=base + dt.timedelta(minutes=i),
                sds=f"sds-f{i % 4}",
            )
        )
    ok(mgmt.webhook(notification(*sent)))
    since = f"since={iso(base)}"

    page = ok(api.get(f"/api/alerts?{since}&limit=5"))
    assert (page["total"], page["limit"], page["offset"], len(page["alerts"])) == (12, 5, 0, 5)
    assert page["alerts"][0]["fired_at"] == iso(base + dt.timedelta(minutes=11))
    seen = []
    for offset in (0, 5, 10):
        p = ok(api.get(f"/api/alerts?{since}&limit=5&offset={offset}"))
        seen += [a["id"] for a in p["alerts"]]
    assert len(seen) == len(set(seen)) == 12

    def total(q: str) -> int:
        return int(ok(api.get(f"/api/alerts?{since}&{q}"))["total"])

    assert total("rule_id=MeshblockFilterB") == 4  # a name, as before rules had ids
    assert total("alertname=MeshblockFilterB") == 4
    assert total("alertname=MeshblockFilterA,MeshblockFilterB") == 12
    rule_b = details(api, page["alerts"][2]["id"])["rule"]["id"]  # minute 9: B
    assert total(f"rule_id={rule_b}") == 4
    assert total("rule_id=2147483647") == total("rule_id=99999999999999999999") == 0
    assert total("severity=critical") == 6
    assert total("severity=critical&rule_id=MeshblockFilterB") == 2
    assert total("component_id=sds-f1") == 3
    assert total("component_id=sds-f1,sds-f2") == 6
    assert total("component_id=sds-f1&component_id=sds-f2") == 6
    assert total("status=active") == 12
    assert total("status=resolved") == 0
    until = iso(base + dt.timedelta(minutes=3))
    assert total(f"until={until}") == 3
    epoch = int((base + dt.timedelta(minutes=10)).timestamp())
    assert int(ok(api.get(f"/api/alerts?since={epoch}"))["total"]) == 2

    for bad in (
        "status=firing",
        "severity=page",
        "limit=0",
        "limit=1001",
        "offset=-1",
        "limit=ten",
        "since=yesterday",
        f"since={iso(base)}&until={iso(base - dt.timedelta(days=1))}",
    ):
        err(api.get(f"/api/alerts?{bad}"), 400, "bad_request")


# -- acknowledge and resolve through the API -------------------------------------------


def test_api_tokens_and_roles(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(sds="sds-roles")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "sds-roles")
    path = f"/api/alerts/{row['id']}"

    err(api.get(path, token=None), 401, "unauthorized")
    err(api.get(path, token="mbt_not-a-real-token"), 401, "unauthorized")
    err(api.get(path, token=mgmt.webhook_token), 401, "unauthorized")
    viewer = mgmt.api(mgmt.viewer_token)
    assert ok(viewer.get(path))["id"] == row["id"]
    for action in ("acknowledge", "resolve", "silence"):
        err(viewer.post(f"{path}/{action}"), 403, "forbidden")
    err(viewer.get(f"{path}/details", token=None), 401, "unauthorized")
    err(api.post(f"{path}/acknowledge", token=None), 401, "unauthorized")
    assert one(api, row["id"]) == row

    me = ok(api.get("/api/me"))
    assert (me["name"], me["role"]) == ("admin", "admin") and "csrf_token" not in me
    acked = stable(ok(api.post(f"{path}/acknowledge")))
    assert acked["status"] == "acknowledged"
    assert acked["acknowledged_at"] is not None
    more = details(viewer, row["id"])
    assert (more["acknowledged_by_user_id"], more["acknowledged_by"]) == (me["id"], "admin")
    err(api.post(f"{path}/acknowledge"), 409, "conflict")
    assert one(api, row["id"]) == acked

    # A repeat notification keeps the operator's status.
    ok(mgmt.webhook(notification(a)))
    assert ok(api.get(path))["status"] == "acknowledged"

    resolved = stable(ok(api.post(f"{path}/resolve")))
    assert resolved["status"] == "resolved" and resolved["resolved_at"]
    err(api.post(f"{path}/resolve"), 409, "conflict")
    err(api.post(f"{path}/silence"), 409, "conflict")
    err(api.post("/api/alerts/999999/acknowledge"), 404, "not_found")
    err(api.get("/api/alerts/0"), 404, "not_found")
    err(api.get("/api/alerts/999999/details"), 404, "not_found")


def test_silence_refused_when_alertmanager_is_down(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(sds="sds-nosilence")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "sds-nosilence")
    path = f"/api/alerts/{row['id']}"
    err(api.post(f"{path}/silence", {"duration_s": 600}), 502, "upstream")
    err(api.post(f"{path}/silence", {"duration_s": 5}), 422, "invalid")
    err(api.post(f"{path}/silence", {"duration_s": "long"}), 422, "invalid")
    err(api.post(f"{path}/silence", {"comment": 5}), 422, "invalid")
    err(api("POST", f"{path}/silence", data=b"{nope"), 400, "bad_request")
    assert one(api, row["id"]) == row


# -- login, sessions, CSRF -------------------------------------------------------------


def test_pages_need_a_login(mgmt: MgmtDaemon) -> None:
    web = WebClient(mgmt.url)
    for page in ("/health", "/alerts"):
        resp = web.get(page)
        assert resp.status == 303
        target = urllib.parse.urlsplit(resp.headers["Location"])
        assert target.path == "/login"
        assert urllib.parse.parse_qs(target.query) == {"next": [page]}
    resp = web.get("/health/api/summary")
    assert resp.status == 401 and resp.body["error"]["code"] == "unauthorized"


def test_healthz_answers_without_a_login(mgmt: MgmtDaemon) -> None:
    """GET /healthz is open (a probe has no session, no token); the rest is not."""
    web = WebClient(mgmt.url)
    resp = web.get("/healthz")
    assert resp.status == 200, resp
    assert resp.body == {"status": "ok"}
    assert web.cookie("meshblock_mgmt_session") is None
    for path in ("/api/me", "/health/api/components"):
        resp = web.get(path)
        assert resp.status == 401 and resp.body["error"]["code"] == "unauthorized", path
    assert web.get("/alerts").status == 303
    # The method is still checked, with a JSON error as under /api/.
    resp = web.request("POST", "/healthz", json_body={})
    assert resp.status == 405 and resp.body["error"]["code"] == "method_not_allowed", resp


def test_login_and_logout(mgmt: MgmtDaemon) -> None:
    web = WebClient(mgmt.url)
    bad = web.login("admin", "wrong password")
    assert bad.status == 401 and 'id="login-error"' in bad.body
    assert web.cookie("meshblock_mgmt_session") is None
    assert web.login("nobody", "wrong password").status == 401

    resp = web.login("admin", mgmt.admin_password, next_="/alerts")
    assert resp.status == 303 and resp.headers["Location"] == "/alerts"
    set_cookie = resp.headers["Set-Cookie"]
    assert "meshblock_mgmt_session=" in set_cookie
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert "Secure" in set_cookie  # served over HTTPS
    page = web.get("/alerts")
    assert page.status == 200 and 'id="current-user" data-role="admin"' in page.body

    summary = web.get("/health/api/summary")
    assert summary.status == 200 and "alert_counts" in summary.body

    token = web.csrf_token()
    assert web.post("/logout", {}).status == 403  # no CSRF token: still logged in
    assert web.get("/alerts").status == 200
    out = web.post("/logout", {"csrf_token": token})
    assert out.status == 303 and out.headers["Location"] == "/login"
    assert web.get("/alerts").status == 303


def test_https_by_default_plain_http_only_when_configured(mgmt: MgmtDaemon, tmp_path: Path) -> None:
    assert mgmt.url.startswith("https://")
    assert f"MGMT starting on https://127.0.0.1:{mgmt.port}" in mgmt.log_text()
    with pytest.raises(OSError):  # plain HTTP to the HTTPS port: no answer
        urllib.request.urlopen(f"http://127.0.0.1:{mgmt.port}/login", timeout=10)
    # Neither [tls] nor [http] plain_http: refused at start, saying what to set.
    plain = MgmtDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mgmt.db'}", tls=False)
    plain.settings["http"]["plain_http"] = False
    plain.write_config()
    check = plain.cli("--check-config")
    assert check.returncode == 2, check
    assert "MGMT serves HTTPS: set [tls] cert" in check.stderr
    assert "[http] plain_http = true" in check.stderr
    # Plain HTTP, as configured: cookies are Secure only with auth.secure_cookies.
    plain.settings["http"]["plain_http"] = True
    plain.write_config()
    plain.create_users(viewer=False)
    with started(plain):
        resp = WebClient(plain.url).login("admin", plain.admin_password)
        assert resp.status == 303, resp
        assert "Secure" not in resp.headers["Set-Cookie"]
        assert "HttpOnly" in resp.headers["Set-Cookie"]
    assert "MGMT starting on http://127.0.0.1" in plain.log_text()


def test_a_stolen_cookie_dies_with_logout(mgmt: MgmtDaemon) -> None:
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)
    cookie = web.cookie("meshblock_mgmt_session")
    assert cookie is not None and cookie.value
    thief = Api(mgmt.url, None)
    headers = {"Cookie": f"meshblock_mgmt_session={cookie.value}"}
    assert thief.get("/api/me", headers=headers).status == 200
    web.post("/logout", {"csrf_token": web.csrf_token()})
    assert thief.get("/api/me", headers=headers).status == 401


def test_login_form_needs_its_csrf_token_and_redirects_only_locally(mgmt: MgmtDaemon) -> None:
    web = WebClient(mgmt.url)
    web.get("/login")
    resp = web.post(
        "/login", {"username": "admin", "password": mgmt.admin_password, "csrf_token": "forged"}
    )
    assert resp.status == 403 and 'data-code="csrf"' in resp.body
    assert web.cookie("meshblock_mgmt_session") is None
    for evil in (
        "//evil.example/",
        "https://evil.example/",
        "/\\evil.example",
        "/\t/evil.example",
        "/\t\\evil.example",
        "/\n/evil.example",
    ):
        resp = WebClient(mgmt.url).login("admin", mgmt.admin_password, next_=evil)
        assert resp.status == 303 and resp.headers["Location"] == "/health"


def test_logins_are_throttled_per_account_and_address(tmp_path: Path) -> None:
    """After 3 failures (this daemon's login_max_failures) a login is a 429 with
    Retry-After, even with the right password, until the backoff (2 s, then 4 s) has
    passed; a successful login clears the record."""
    daemon = MgmtDaemon(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'mgmt.db'}",
        {"auth": {"login_max_failures": 3, "login_backoff_s": 2.0, "login_max_backoff_s": 4.0}},
    )
    daemon.create_users()
    with started(daemon):
        web = WebClient(daemon.url)

        def fail_three_times() -> None:
            for _ in range(3):
                assert web.login("admin", "wrong password").status == 401

        fail_three_times()
        refused = web.login("admin", daemon.admin_password)
        assert refused.status == 429 and refused.headers["Retry-After"] == "2", refused
        assert "Too many failed logins" in refused.body
        assert web.cookie("meshblock_mgmt_session") is None
        # the address is locked too: another account from here is refused as well
        assert web.login("viewer", daemon.viewer_password).status == 429
        wait_until(lambda: web.login("admin", daemon.admin_password).status == 303, 30, "login")
        # cleared by the success: three more failures lock it for 2 s again, not 4 s
        fail_three_times()
        again = web.login("admin", daemon.admin_password)
        assert again.status == 429 and again.headers["Retry-After"] == "2", again
        status, text = _control.get(daemon.url, "/metrics")
        assert status == 200
        throttled = re.search(r'meshblock_mgmt_logins_total\{outcome="throttled"\} (\S+)', text)
        assert throttled is not None and float(throttled.group(1)) >= 3, text
        assert "too many failures" in daemon.log_text()


def test_forms_acknowledge_with_csrf_and_role(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert(sds="sds-form")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "sds-form")
    action = f"/alerts/{row['id']}/acknowledge"

    admin = WebClient(mgmt.url)
    admin.login("admin", mgmt.admin_password)
    page = admin.get("/alerts")
    assert f'id="alert-{row["id"]}"' in page.body
    assert f'id="acknowledge-{row["id"]}"' in page.body
    token = admin.csrf_token()

    for form in ({}, {"csrf_token": "forged"}):
        resp = admin.post(action, form)
        assert resp.status == 403 and 'data-code="csrf"' in resp.body
    # The JSON API on a session needs the token in a header.
    resp = admin.request("POST", f"/api/alerts/{row['id']}/acknowledge")
    assert resp.status == 403 and resp.body["error"]["code"] == "csrf"

    viewer = WebClient(mgmt.url)
    viewer.login("viewer", mgmt.viewer_password)
    assert f'id="acknowledge-{row["id"]}"' not in viewer.get("/alerts").body
    resp = viewer.post(action, {"csrf_token": viewer.csrf_token()})
    assert resp.status == 403 and 'data-code="forbidden"' in resp.body
    assert one(api, row["id"]) == row

    resp = admin.post(action, {"csrf_token": token})
    assert resp.status == 303 and resp.headers["Location"].startswith("/alerts?notice=")
    after = one(api, row["id"])
    admin_id = ok(api.get("/api/me"))["id"]
    assert after["status"] == "acknowledged"
    assert details(api, row["id"])["acknowledged_by_user_id"] == admin_id
    notice = admin.get(resp.headers["Location"].split("#")[0])
    assert f"Alert {row['id']} acknowledged." in notice.body

    # The same through the JSON API with the header, on a fresh alert.
    b = alert(sds="sds-form-json")
    ok(mgmt.webhook(notification(b)))
    (row_b,) = by_component(api, "sds-form-json")
    resp = admin.request(
        "POST", f"/api/alerts/{row_b['id']}/resolve", headers={"X-CSRF-Token": token}
    )
    assert resp.status == 200 and resp.body["status"] == "resolved"


# -- pages, errors, metrics ------------------------------------------------------------


def test_dashboard_with_mdm_and_prometheus_down(mgmt: MgmtDaemon) -> None:
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)
    page = web.get("/health")
    assert page.status == 200
    assert 'id="cluster-unreachable"' in page.body and "the MDM is unreachable" in page.body
    assert page.body.count('class="chart-error') == 2 and "Prometheus is unreachable" in page.body
    assert 'id="alert-counts"' in page.body
    summary = web.get("/health/api/summary").body
    assert summary["health_summary"]["mdm_reachable"] is False
    assert summary["health_summary"]["status"] == "unknown"
    assert summary["health_metrics"] == {}
    counts = summary["alert_counts"]
    assert (
        counts["total"] == sum(counts["by_status"].values()) == sum(counts["by_severity"].values())
    )
    comps = web.get("/health/api/components")
    assert comps.status == 502 and comps.body["error"]["code"] == "upstream"


def test_alerts_page_lists_open_and_recent_alerts(mgmt: MgmtDaemon, api: Api) -> None:
    a = alert("MeshblockPageCheck", sds="sds-page", summary="<b>escaped</b>")
    a["annotations"]["runbook_url"] = "https://docs.example/runbook.md#meshblockpagecheck"
    b = alert("MeshblockPageCheckNoLink", sds="sds-page-js")
    b["annotations"]["runbook_url"] = "javascript:alert(1)"
    ok(mgmt.webhook(notification(a, b)))
    (row,) = by_component(api, "sds-page")
    (row_b,) = by_component(api, "sds-page-js")
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)
    for query in ("rule_id=MeshblockPageCheck", "alertname=MeshblockPageCheck"):
        page = web.get(f"/alerts?{query}")
        assert page.status == 200
        assert re.search(rf'id="alert-{row["id"]}"[^>]*data-status="active"', page.body)
        assert f'id="recent-alert-{row["id"]}"' in page.body
        assert f'id="recent-alert-{row_b["id"]}"' not in page.body
    assert "&lt;b&gt;escaped&lt;/b&gt;" in page.body and "<b>escaped</b>" not in page.body
    assert 'id="history-summary"' in page.body
    # Each alert links to its rule's runbook section; only http(s) links are links.
    link = re.search(rf'id="runbook-{row["id"]}" href="([^"]*)"', page.body)
    assert link is not None and link.group(1) == a["annotations"]["runbook_url"]
    assert f'id="recent-runbook-{row["id"]}"' in page.body
    assert '<td class="alert-rule">MeshblockPageCheck</td>' in page.body
    assert f'id="runbook-{row_b["id"]}"' not in page.body and "javascript:" not in page.body
    assert web.get("/alerts?status=bogus").status == 400


def test_errors_are_json_under_api_and_html_elsewhere(mgmt: MgmtDaemon, api: Api) -> None:
    resp = api.get("/api/nothing-here")
    assert resp.status == 404 and resp.body["error"]["code"] == "not_found"
    web = WebClient(mgmt.url)
    page = web.get("/nothing-here")
    assert page.status == 404 and 'data-code="not_found"' in page.body
    assert "text/html" in page.headers["Content-Type"]
    resp = api("PUT", "/api/alerts/webhook")
    assert resp.status == 405 and resp.body["error"]["code"] == "method_not_allowed"


def test_metrics(mgmt: MgmtDaemon, api: Api) -> None:
    status, text = _control.get(mgmt.url, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["meshblock_mgmt_alerts"].samples
    counted = sum(s.value for s in samples)
    assert counted == ok(api.get("/api/alerts?limit=1"))["total"] > 0
    webhook = {
        s.labels["outcome"]: s.value
        for s in families["meshblock_mgmt_webhook_requests"].samples
        if s.name.endswith("_total")
    }
    assert webhook["ok"] > 0 and webhook["unauthorized"] > 0 and webhook["invalid"] > 0
