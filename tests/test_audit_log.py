"""The access and audit log (meshblock.audit) of the MDM and of MGMT, read back.

Real daemons on loopback: an HTTPS MDM with client certificates writing to its own
file, a plain-HTTP MDM writing to its daemon log (bearer tokens), and MGMT. Every
change is an entry with its status and who made it; every refusal (401, 403, a failed
or throttled login) is an entry with its reason; an SDS's registration and
re-registration are entries of their own; reads and successful heartbeats are not
written; no secret is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _http import Api
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon, WebClient
from _process import started

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

Entry = dict[str, Any]


def entries_of(lines: list[str]) -> list[Entry]:
    return [json.loads(line) for line in lines if line.strip()]


def file_entries(path: Path) -> list[Entry]:
    return entries_of(path.read_text().splitlines())


def find(entries: list[Entry], **match: Any) -> list[Entry]:
    """The entries whose fields (``who_identity=`` for ``who["identity"]``) match."""
    found = []
    for e in entries:
        fields = e | {f"who_{k}": v for k, v in e.get("who", {}).items()}
        if all(fields.get(k) == v for k, v in match.items()):
            found.append(e)
    return found


def registration(name: str, data_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "protection_domain": "pd1",
        "address": "127.0.0.1",
        "data_port": data_port,
        "control_port": data_port + 1,
        "devices": [{"path": f"/srv/{name}/dev0", "capacity": "1GiB", "pool": "p1"}],
    }


@pytest.fixture(scope="module")
def tls_mdm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MdmDaemon]:
    workdir = tmp_path_factory.mktemp("audit-mdm")
    audit = {"audit": {"file": str(workdir / "audit.jsonl")}}
    with started(MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", audit, tls=True)) as d:
        d.create_pool("pd1", "p1", 8)
        yield d


def test_mdm_changes_refusals_and_registrations_are_in_its_audit_file(
    tls_mdm: MdmDaemon,
) -> None:
    path = tls_mdm.workdir / "audit.jsonl"
    sds1 = Api(tls_mdm.url, None, _tls.context("sds:sds1"))
    sds2 = Api(tls_mdm.url, None, _tls.context("sds:sds2"))
    assert sds1.post("/api/v1/sds/register", registration("sds1", 7100)).status == 201
    moved = sds1.post("/api/v1/sds/register", registration("sds1", 7200))
    assert moved.status == 200, moved
    sds_id = int(moved.body["id"])
    assert sds1.post(f"/api/v1/sds/{sds_id}/heartbeat", {}).status == 200
    stolen = sds2.post("/api/v1/sds/register", registration("sds1", 7300))
    assert stolen.status == 403, stolen
    assert sds2.post(f"/api/v1/sds/{sds_id}/heartbeat", {}).status == 403
    assert tls_mdm.api().get("/api/v1/sds").status == 200

    entries = file_entries(path)
    assert all(e["daemon"] == "mdm" and e["ts"].endswith("Z") for e in entries)
    # The admin's changes (the fixture's protection domain and pool), with the result.
    (pool,) = find(entries, event="request", method="POST", path="/api/v1/pools")
    assert pool["status"] == 201
    assert pool["who"] == {"identity": "admin:tests", "address": "127.0.0.1"}
    # A registration and a re-registration that moved the SDS.
    (new,) = find(entries, event="sds_register", sds="sds1")
    assert new["status"] == 201 and new["who"]["identity"] == "sds:sds1"
    assert new["data_port"] == 7100 and "previous_endpoint" not in new
    (again,) = find(entries, event="sds_reregister", sds="sds1")
    assert again["status"] == 200 and again["sds_id"] == sds_id
    assert again["previous_endpoint"] == "127.0.0.1:7100" and again["data_port"] == 7200
    # Refusals, with the identity and the reason.
    (refused_reg,) = find(entries, event="refused", path="/api/v1/sds/register")
    assert refused_reg["status"] == 403 and refused_reg["who"]["identity"] == "sds:sds2"
    assert "may act only as itself" in refused_reg["reason"]
    (refused_hb,) = find(entries, event="refused", path=f"/api/v1/sds/{sds_id}/heartbeat")
    assert refused_hb["who"]["identity"] == "sds:sds2" and refused_hb["method"] == "POST"
    # Neither reads nor a heartbeat that was accepted.
    assert not find(entries, method="GET")
    assert not find(entries, status=200, path=f"/api/v1/sds/{sds_id}/heartbeat")
    # Only the audit file has them: none in the daemon's own log.
    assert '"event"' not in tls_mdm.log_text()


def test_mdm_without_a_file_writes_its_audit_to_the_daemon_log_with_token_names(
    tmp_path: Path,
) -> None:
    """Plain HTTP, bearer tokens: the token's name (never the token) is the who."""
    overrides = {"logging": {"level": "WARNING"}}  # the audit lines are written anyway
    with started(MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mdm.db", overrides)) as d:
        api = d.api()
        assert api.post("/api/v1/protection-domains", {"name": "pd1"}).status == 201
        assert (
            api.with_token("wrong").post("/api/v1/protection-domains", {"name": "x"}).status == 401
        )
        ro = api.with_token(d.readonly_token).post("/api/v1/protection-domains", {"name": "y"})
        assert ro.status == 403
        assert api.post("/api/v1/protection-domains", {"name": "pd1"}).status == 409
        text = d.log_text()
    lines = [
        line.split("meshblock.audit: ", 1)[1]
        for line in text.splitlines()
        if "meshblock.audit: " in line
    ]
    entries = entries_of(lines)
    created, conflict = find(entries, event="request", path="/api/v1/protection-domains")
    assert created["status"] == 201 and created["who"]["token"] == "admin"
    assert conflict["status"] == 409 and conflict["reason"]
    (bad,) = find(entries, status=401)
    assert bad["event"] == "refused" and bad["who"]["token"] == "invalid"
    assert "Authorization" in bad["reason"]
    (readonly,) = find(entries, status=403)
    assert readonly["who"]["token"] == "readonly" and "may not POST" in readonly["reason"]
    for secret in (d.admin_token, d.readonly_token, d.cluster_secret, "wrong"):
        assert secret not in "\n".join(lines)


def test_mgmt_logins_changes_and_refusals_are_in_its_audit_file(tmp_path: Path) -> None:
    audit = tmp_path / "mgmt-audit.jsonl"
    overrides: dict[str, dict[str, Any]] = {
        "audit": {"file": str(audit)},
        "auth": {"login_max_failures": 2},
    }
    mgmt = MgmtDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mgmt.db", overrides)
    mgmt.create_users(viewer=False)
    with started(mgmt):
        web = WebClient(mgmt.url)
        assert web.login("admin", "wrong password").status == 401
        assert web.login("admin", "wrong again").status == 401
        assert web.login("admin", mgmt.admin_password).status == 429  # locked now
        assert mgmt.webhook({}, token="nope").status == 401
        assert mgmt.api().post("/api/alerts/1/acknowledge").status == 404
        assert mgmt.api(token="mbt_forged").post("/api/alerts/1/acknowledge").status == 401
        assert mgmt.api().get("/api/alerts").status == 200
        secrets = [mgmt.admin_password, mgmt.admin_token, mgmt.webhook_token]
    entries = file_entries(audit)
    assert all(e["daemon"] == "mgmt" for e in entries)
    failed = find(entries, event="login_failed", user_tried="admin")
    assert len(failed) == 2 and all(e["status"] == 401 for e in failed)
    assert failed[0]["reason"] == "wrong user name or password"
    assert failed[0]["who"] == {"address": "127.0.0.1"}
    (locked,) = find(entries, event="login_throttled")
    assert locked["status"] == 429 and locked["user_tried"] == "admin"
    (webhook_refused,) = find(entries, event="refused", path="/api/alerts/webhook")
    assert webhook_refused["status"] == 401 and "webhook" in webhook_refused["reason"]
    (ack,) = find(entries, event="request", path="/api/alerts/1/acknowledge")
    assert ack["status"] == 404 and ack["who"]["user"] == "admin"
    assert ack["who"]["token"] == "tests"
    (forged,) = find(entries, event="refused", path="/api/alerts/1/acknowledge")
    assert forged["status"] == 401 and "token" in forged["reason"]
    assert not find(entries, method="GET")
    text = audit.read_text()
    assert all(s not in text for s in secrets)


def test_mgmt_login_is_written_with_the_user(tmp_path: Path) -> None:
    audit = tmp_path / "mgmt-audit.jsonl"
    mgmt = MgmtDaemon(
        tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mgmt.db", {"audit": {"file": str(audit)}}
    )
    mgmt.create_users(viewer=False)
    with started(mgmt):
        web = WebClient(mgmt.url)
        assert web.login("admin", mgmt.admin_password).status in (302, 303)
        token = web.csrf_token()
        assert web.post("/logout", {"csrf_token": token}).status in (302, 303)
    entries = file_entries(audit)
    (login,) = find(entries, event="login")
    assert login["who"]["user"] == "admin" and login["method"] == "POST"
    (logout,) = find(entries, path="/logout")
    assert logout["event"] == "request" and logout["who"]["user"] == "admin"
