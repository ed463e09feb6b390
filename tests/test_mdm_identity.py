"""The MDM authorises on the client certificate's identity (meshblock.mdm.authz).

A real MDM serves HTTPS with client certificates required, with identities of the
test CA (tests/_tls.py). Calls are made as each identity over real TLS on loopback:
an ``sds:NAME`` certificate registers, heartbeats and reports only as the SDS of that
name, an ``sdc:GUID`` only as that SDC; a mismatch is a 403 that changes nothing and is
logged. ``mgmt:`` reads, ``admin:`` does what the admin token does, and a bearer token
sent along with a certificate widens nothing. Revoked, foreign and missing
certificates never get as far as a request.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _http import Api, Response
from _mdm import MdmDaemon
from _process import started
from meshblock import pki

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

GUID_A = "0d5d2c8e-8a7e-4a54-9d3b-6f1e2a3b4c5d"
GUID_B = "7e1f3a9b-2c4d-4e6f-8a0b-1c2d3e4f5a6b"
GUID_M = "5a5a5a5a-0000-4000-8000-00000000abcd"
REVOKED = "sds:sds9"


def as_(mdm: MdmDaemon, who: str | None, token: str | None = None) -> Api:
    """Calls to ``mdm`` presenting ``who``'s certificate (None: none) and ``token``."""
    return Api(mdm.url, token, _tls.context(who))


@pytest.fixture(scope="module")
def revoked() -> _tls.Files:
    files = _tls.fresh(REVOKED)
    _tls.ca().revoke(files.serial())
    return files


@pytest.fixture(scope="module")
def mdm(tmp_path_factory: pytest.TempPathFactory, revoked: _tls.Files) -> Iterator[MdmDaemon]:
    """An HTTPS MDM (its CRL read at start, after ``revoked``), with pool ``p1``."""
    workdir = tmp_path_factory.mktemp("mdm-identity")
    with started(MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", tls=True)) as d:
        d.create_pool("pd1", "p1", 8)
        yield d


def registration(name: str, data_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "protection_domain": "pd1",
        "address": "127.0.0.1",
        "data_port": data_port,
        "control_port": data_port + 1,
        "devices": [{"path": f"/srv/{name}/dev0", "capacity": "1GiB", "pool": "p1"}],
    }


def ok(resp: Response, status: int = 200) -> Any:
    assert resp.status == status, resp
    return resp.body


def refused(resp: Response, mdm: MdmDaemon, what: str) -> None:
    assert resp.status == 403, resp
    assert resp.body["error"]["code"] == "forbidden", resp.body
    assert f"refused {what}" in mdm.log_text()


@pytest.fixture(scope="module")
def sds_ids(mdm: MdmDaemon) -> dict[str, int]:
    """sds1 and sds2, each registered with its own certificate."""
    ids = {}
    for i, name in enumerate(("sds1", "sds2")):
        doc = ok(
            as_(mdm, f"sds:{name}").post("/api/v1/sds/register", registration(name, 7100 + 10 * i)),
            201,
        )
        ids[name] = int(doc["id"])
    return ids


def test_an_sds_may_register_only_as_itself(mdm: MdmDaemon, sds_ids: dict[str, int]) -> None:
    admin = mdm.api()
    before = ok(admin.get(f"/api/v1/sds/{sds_ids['sds1']}"))
    # sds2's certificate re-registers sds1 at another port (as the cluster secret could):
    moved = registration("sds1", 7900)
    refused(
        as_(mdm, "sds:sds2").post("/api/v1/sds/register", moved),
        mdm,
        "POST /api/v1/sds/register from sds:sds2",
    )
    # ... or registers a new SDS of a name of its choosing.
    refused(as_(mdm, "sds:sds2").post("/api/v1/sds/register", registration("evil", 7950)), mdm, "")
    assert ok(admin.get(f"/api/v1/sds/{sds_ids['sds1']}")) == before
    assert {s["name"] for s in ok(admin.get("/api/v1/sds"))["sds"]} == {"sds1", "sds2"}
    # Its own certificate may move it.
    doc = ok(as_(mdm, "sds:sds1").post("/api/v1/sds/register", registration("sds1", 7100)))
    assert doc["data_port"] == 7100


def test_an_sds_may_heartbeat_and_report_only_for_itself(
    mdm: MdmDaemon, sds_ids: dict[str, int]
) -> None:
    admin = mdm.api()
    sds1, sds2 = sds_ids["sds1"], sds_ids["sds2"]
    device = ok(admin.get(f"/api/v1/sds/{sds1}"))["devices"][0]
    thief = as_(mdm, "sds:sds2")
    seen = ok(admin.get(f"/api/v1/sds/{sds1}"))["last_seen"]
    report = {"pool_id": device["pool_id"], "pg": 0, "epoch": 1}
    for path, body in (
        (f"/api/v1/sds/{sds1}/heartbeat", {}),
        (f"/api/v1/sds/{sds1}/pg-synced", report),
        (f"/api/v1/sds/{sds1}/pgs-synced", {"reports": [report]}),
        (f"/api/v1/sds/{sds1}/devices/{device['id']}/failed", {"error": "forged"}),
    ):
        refused(thief.post(path, body), mdm, f"POST {path} from sds:sds2")
    after = ok(admin.get(f"/api/v1/sds/{sds1}"))
    assert after["last_seen"] == seen
    assert after["devices"][0]["state"] == device["state"] != "failed"
    # Each for itself: accepted.
    assert (
        ok(as_(mdm, "sds:sds1").post(f"/api/v1/sds/{sds1}/heartbeat", {}))["state"] == "connected"
    )
    assert ok(thief.post(f"/api/v1/sds/{sds2}/heartbeat", {}))["state"] == "connected"
    # An id that names no SDS is the usual 404 (the SDS registers again on it).
    assert thief.post("/api/v1/sds/999999/heartbeat", {}).status == 404
    # Any SDS may read a pool's map and report another SDS unreachable (the MDM checks).
    assert ok(thief.get(f"/api/v1/pools/{device['pool_id']}/pgmap"))["epoch"] >= 1
    assert thief.post(f"/api/v1/sds/{sds1}/unreachable", {"reporter": "sds2"}).status == 200


def test_an_sdc_may_register_heartbeat_and_read_maps_only_as_itself(mdm: MdmDaemon) -> None:
    a, b = as_(mdm, f"sdc:{GUID_A}"), as_(mdm, f"sdc:{GUID_B}")
    id_a = ok(a.post("/api/v1/sdc/register", {"guid": GUID_A, "name": "host-a"}), 201)["id"]
    refused(
        b.post("/api/v1/sdc/register", {"guid": GUID_A, "name": "host-evil", "nbd_port": 1}),
        mdm,
        f"POST /api/v1/sdc/register from sdc:{GUID_B}",
    )
    sdc = ok(mdm.api().get(f"/api/v1/sdc/{id_a}"))
    assert (sdc["name"], sdc["guid"]) == ("host-a", GUID_A)
    refused(b.post(f"/api/v1/sdc/{id_a}/heartbeat", {}), mdm, f"POST /api/v1/sdc/{id_a}/heartbeat")
    refused(b.get(f"/api/v1/sdc/{id_a}/maps"), mdm, f"GET /api/v1/sdc/{id_a}/maps")
    assert ok(a.post(f"/api/v1/sdc/{id_a}/heartbeat", {}))["state"] == "connected"
    assert ok(a.get(f"/api/v1/sdc/{id_a}/maps"))["volumes"] == []


@pytest.mark.parametrize(
    ("who", "method", "path"),
    [
        ("sds:sds1", "GET", "/api/v1/sds"),  # a read of the admin API
        ("sds:sds1", "POST", "/api/v1/protection-domains"),
        ("sds:sds1", "POST", "/api/v1/sdc/register"),  # another kind's route
        (f"sdc:{GUID_A}", "GET", "/api/v1/pools/1/pgmap"),  # an SDC reads its own maps
        (f"sdc:{GUID_A}", "POST", "/api/v1/sds/register"),
        ("mgmt:mgmt1", "POST", "/api/v1/protection-domains"),
        ("mgmt:mgmt1", "POST", "/api/v1/sds/register"),
        ("mdm:mdm2", "GET", "/api/v1/sds"),
    ],
)
def test_each_kind_may_not_leave_its_job(mdm: MdmDaemon, who: str, method: str, path: str) -> None:
    refused(
        as_(mdm, who)(method, path, {"name": "x"} if method == "POST" else None),
        mdm,
        f"{method} {path} from {who}",
    )


def test_admin_and_mgmt_certificates_need_no_token(mdm: MdmDaemon) -> None:
    admin = as_(mdm, "admin:alice")
    ok(admin.post("/api/v1/protection-domains", {"name": "by-certificate"}), 201)
    names = {
        p["name"]
        for p in ok(as_(mdm, "mgmt:mgmt1").get("/api/v1/protection-domains"))["protection_domains"]
    }
    assert "by-certificate" in names


def test_a_token_sent_with_a_certificate_widens_nothing(mdm: MdmDaemon) -> None:
    """The certificate decides: a stolen SDS certificate and a stolen admin token
    together are still only that SDS."""
    thief = as_(mdm, "sds:sds1", token=mdm.admin_token)
    refused(
        thief.post("/api/v1/protection-domains", {"name": "stolen"}),
        mdm,
        "POST /api/v1/protection-domains from sds:sds1",
    )
    assert (
        as_(mdm, "mgmt:mgmt1", token=mdm.admin_token).delete("/api/v1/protection-domains/1").status
        == 403
    )
    names = {
        p["name"] for p in ok(mdm.api().get("/api/v1/protection-domains"))["protection_domains"]
    }
    assert "stolen" not in names and "pd1" in names


def handshake_refused(mdm: MdmDaemon, ctx: ssl.SSLContext) -> bool:
    """Whether the MDM ends a connection made with ``ctx`` without answering."""
    try:
        with (
            socket.create_connection((mdm.host, mdm.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=mdm.host) as tls,
        ):
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: mdm\r\nConnection: close\r\n\r\n")
            return tls.recv(64) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_revoked_foreign_and_missing_certificates_are_refused(
    mdm: MdmDaemon, revoked: _tls.Files, tmp_path: Path
) -> None:
    ca = _tls.ca()
    assert not handshake_refused(mdm, _tls.context("sds:sds1"))
    assert handshake_refused(
        mdm, pki.client_context(ca.cert_path, cert=revoked.cert, key=revoked.key)
    )
    assert handshake_refused(mdm, _tls.context(None))
    other = pki.Ca.init(tmp_path / "other")
    ident = pki.Identity.parse("sds:sds1")
    cert, key = other.issue(ident)
    paths = pki.write_identity(tmp_path / "id", ident, cert, key, other.load()[0])
    assert handshake_refused(
        mdm, pki.client_context(ca.cert_path, cert=paths["cert"], key=paths["key"])
    )
    assert f"{REVOKED}" not in mdm.log_text()  # never got as far as a request


def test_with_optional_certificates_a_token_alone_acts_as_before(tmp_path: Path) -> None:
    """``client_certs = "optional"``: no certificate, the token decides (the cluster
    secret for any SDS, as without TLS, a new one with a join token); a certificate
    sent still binds."""
    mdm = MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mdm.db", tls=True)
    mdm.settings["tls"]["client_certs"] = "optional"
    mdm.write_config()
    with started(mdm):
        admin = mdm.api()
        pd = ok(admin.post("/api/v1/protection-domains", {"name": "pd1"}), 201)
        ok(
            admin.post(
                "/api/v1/pools", {"name": "p1", "protection_domain_id": pd["id"], "pg_count": 8}
            ),
            201,
        )
        secret = as_(mdm, None, token=mdm.cluster_secret)
        joining = registration("sds1", 7100) | {"join_token": mdm.join_token()}
        ok(secret.post("/api/v1/sds/register", joining), 201)
        refused(
            as_(mdm, "sds:sds2").post("/api/v1/sds/register", registration("sds1", 7200)), mdm, ""
        )
        assert as_(mdm, None).get("/api/v1/sds").status == 401


def test_an_sds_reports_a_peer_unreachable_only_as_itself(
    mdm: MdmDaemon, sds_ids: dict[str, int]
) -> None:
    sds1, sds2 = sds_ids["sds1"], sds_ids["sds2"]
    thief = as_(mdm, "sds:sds2")
    path = f"/api/v1/sds/{sds1}/unreachable"
    for forged in ("sds1", "sds:sds1", f"sds:{sds1}", f"sdc:{GUID_A}", "sds:999999"):
        refused(thief.post(path, {"reporter": forged}), mdm, f"POST {path} from sds:sds2")
        assert f"not as {forged!r}" in mdm.log_text()
    # As itself, in each form: its identity, its name, its id (what an SDS sends).
    for own in ("sds:sds2", "sds2", f"sds:{sds2}"):
        assert ok(thief.post(path, {"reporter": own}))["sds_id"] == sds1
    # An SDC certificate likewise, and the admin may name anyone.
    sdc = as_(mdm, f"sdc:{GUID_B}")
    refused(sdc.post(path, {"reporter": f"sdc:{GUID_A}"}), mdm, f"POST {path} from sdc:{GUID_B}")
    assert ok(sdc.post(path, {"reporter": f"sdc:{GUID_B}"}))["sds_id"] == sds1
    assert ok(as_(mdm, "admin:alice").post(path, {"reporter": "sds:sds1"}))["sds_id"] == sds1


def test_an_sds_reads_only_the_maps_of_pools_it_has_devices_in(
    mdm: MdmDaemon, sds_ids: dict[str, int]
) -> None:
    admin = mdm.api()
    pool1 = ok(admin.get(f"/api/v1/sds/{sds_ids['sds1']}"))["devices"][0]["pool_id"]
    pd = ok(admin.get("/api/v1/protection-domains"))["protection_domains"][0]["id"]
    status, other = admin.post(
        "/api/v1/pools", {"name": "p-elsewhere", "protection_domain_id": pd, "pg_count": 8}
    )
    assert status == 201, other
    thief = as_(mdm, "sds:sds2")
    assert ok(thief.get(f"/api/v1/pools/{pool1}/pgmap"))["epoch"] >= 1
    for pool in (other["id"], 999999):
        path = f"/api/v1/pools/{pool}/pgmap"
        refused(thief.get(path), mdm, f"GET {path} from sds:sds2")
        assert f"sds:sds2 has no device in pool {pool}" in mdm.log_text()
    # An SDS that registered no device reads no map; the admin and MGMT read any.
    ok(
        as_(mdm, "sds:sds3").post(
            "/api/v1/sds/register", {**registration("sds3", 7300), "devices": []}
        ),
        201,
    )
    refused(as_(mdm, "sds:sds3").get(f"/api/v1/pools/{pool1}/pgmap"), mdm, "")
    assert ok(as_(mdm, "mgmt:mgmt1").get(f"/api/v1/pools/{other['id']}/pgmap"))["epoch"] >= 1


def test_an_sds_reads_the_mappings_of_its_pools_and_an_sdc_none(
    mdm: MdmDaemon, sds_ids: dict[str, int]
) -> None:
    """GET /api/v1/pools/{id}/mappings: which SDC each mapped volume of the pool is
    mapped to and whether read-only, with an epoch that only mappings move; an SDS
    with a device in the pool reads it, an SDC or another SDS may not."""
    admin = mdm.api()
    pool = ok(admin.get("/api/v1/pools"))["pools"][0]["id"]
    path = f"/api/v1/pools/{pool}/mappings"
    sdc = ok(admin.post("/api/v1/sdc", {"guid": GUID_M, "name": "mapped-sdc"}), 201)
    vol = ok(
        admin.post("/api/v1/volumes", {"name": "m1", "pool_id": pool, "size": "1GiB"}),
        201,
    )
    reader = as_(mdm, "sds:sds1")
    start = ok(reader.get(path))
    assert start["pool_id"] == pool and start["volumes"] == []
    body = {"volume_id": vol["id"], "sdc_id": sdc["id"], "access_mode": "read_only"}
    mapping = ok(admin.post("/api/v1/mappings", body), 201)
    mapped = ok(reader.get(f"{path}?wait_epoch={start['epoch']}&timeout=5"))
    assert mapped["epoch"] == start["epoch"] + 1
    assert mapped["volumes"] == [{"id": vol["id"], "sdcs": [{"guid": GUID_M, "read_only": True}]}]
    # another volume, unmapped, moves nothing; a wait for a change times out unchanged
    ok(admin.post("/api/v1/volumes", {"name": "m2", "pool_id": pool, "size": "1GiB"}), 201)
    assert ok(reader.get(f"{path}?wait_epoch={mapped['epoch']}&timeout=0.3")) == mapped
    # since= the epoch the caller has: "unchanged", without the volumes (also at a
    # long-poll's timeout); since an older one: the whole document
    same = {"pool_id": pool, "epoch": mapped["epoch"], "term": mapped["term"], "unchanged": True}
    assert ok(reader.get(f"{path}?since={mapped['epoch']}")) == same
    waited = f"{path}?wait_epoch={mapped['epoch']}&timeout=0.3&since={mapped['epoch']}"
    assert ok(reader.get(waited)) == same
    assert ok(reader.get(f"{path}?since={start['epoch']}")) == mapped
    ok(admin.patch(f"/api/v1/mappings/{mapping['id']}", {"access_mode": "read_write"}))
    rw = ok(reader.get(path))
    assert rw["epoch"] == mapped["epoch"] + 1
    assert rw["volumes"][0]["sdcs"] == [{"guid": GUID_M, "read_only": False}]
    assert admin.delete(f"/api/v1/mappings/{mapping['id']}").status == 204
    gone = ok(reader.get(path))
    assert gone["epoch"] == rw["epoch"] + 1 and gone["volumes"] == []
    refused(as_(mdm, f"sdc:{GUID_M}").get(path), mdm, f"GET {path} from sdc:{GUID_M}")
    refused(as_(mdm, "sds:sds7").get(path), mdm, f"GET {path} from sds:sds7")
