"""PG maps as the MDM serves them from its per-epoch cache, against a real MDM: an
SDS that moves to another port is a new map epoch (its peers' long-polls wake and see
the new port), the SDC maps embed each pool's document as the pool map serves it, and
a client that accepts gzip gets the same document gzipped."""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.request
import zlib
from typing import Any

import pytest

from _http import Api
from _mdm import MdmDaemon

pytestmark = pytest.mark.cluster


def ok(resp: Any, status: int = 200) -> Any:
    code, body = resp
    assert code == status, f"expected {status}, got {code}: {body}"
    return body


def registration(name: str, data_port: int) -> dict[str, Any]:
    return {
        "name": name,
        "protection_domain": "pd1",
        "address": "127.0.0.1",
        "data_port": data_port,
        "devices": [{"path": f"/srv/{name}/dev0", "capacity": "10GiB", "pool": "p1"}],
    }


@pytest.fixture(scope="module")
def mdm_overrides() -> dict[str, dict[str, Any]]:
    # The SDSs send no heartbeats: none is declared down (a map change) meanwhile.
    return {"cluster": {"heartbeat_timeout_s": 600.0}}


@pytest.fixture(scope="module")
def topo(api: Api, mdm: MdmDaemon) -> dict[str, Any]:
    """pd1, pool p1 (16 PGs), sds1..sds3 registered, an SDC with a volume mapped."""
    pd = ok(api("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
    pool = ok(
        api(
            "POST",
            "/api/v1/pools",
            {"name": "p1", "protection_domain_id": pd["id"], "pg_count": 16},
        ),
        201,
    )
    sds = [
        ok(
            api(
                "POST",
                "/api/v1/sds/register",
                registration(f"sds{i}", 17370 + i) | {"join_token": mdm.join_token()},
                token=mdm.cluster_secret,
            ),
            201,
        )
        for i in (1, 2, 3)
    ]
    sdc = ok(
        api(
            "POST",
            "/api/v1/sdc/register",
            {"guid": "00000000-0000-4000-8000-0000000000a1", "name": "c1"},
            token=mdm.cluster_secret,
        ),
        201,
    )
    vol = ok(
        api("POST", "/api/v1/volumes", {"name": "v1", "pool_id": pool["id"], "size": "1GiB"}), 201
    )
    ok(api("POST", "/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc["id"]}), 201)
    return {"pool": pool, "sds": sds, "sdc": sdc}


def pgmap(api: Api, mdm: MdmDaemon, pool_id: int, query: str = "") -> Any:
    return ok(api("GET", f"/api/v1/pools/{pool_id}/pgmap{query}", token=mdm.cluster_secret))


def test_the_sdc_maps_carry_the_pool_map_as_served_and_a_volume_keeps_it(
    api: Api, mdm: MdmDaemon, topo: dict[str, Any]
) -> None:
    pool_id, sdc_id = topo["pool"]["id"], topo["sdc"]["id"]
    before = pgmap(api, mdm, pool_id)
    maps = ok(api("GET", f"/api/v1/sdc/{sdc_id}/maps", token=mdm.cluster_secret))
    assert maps["pools"] == {str(pool_id): before}
    assert [v["name"] for v in maps["volumes"]] == ["v1"] and maps["sdc_id"] == sdc_id
    # A new volume moves the cluster epoch, not the pool's map
    ok(api("POST", "/api/v1/volumes", {"name": "v2", "pool_id": pool_id, "size": "1GiB"}), 201)
    assert pgmap(api, mdm, pool_id) == before
    later = ok(api("GET", f"/api/v1/sdc/{sdc_id}/maps", token=mdm.cluster_secret))
    assert later["epoch"] > maps["epoch"] and later["pools"] == maps["pools"]


def test_an_sds_moving_to_another_port_is_a_new_map_epoch(
    api: Api, mdm: MdmDaemon, topo: dict[str, Any]
) -> None:
    pool_id, sds1 = topo["pool"]["id"], topo["sds"][0]
    before = pgmap(api, mdm, pool_id)
    assert before["sds"][str(sds1["id"])]["data_port"] == 17371
    result: dict[str, Any] = {}

    def wait() -> None:  # a peer of sds1 following the pool's map
        result["map"] = pgmap(api, mdm, pool_id, f"?wait_epoch={before['epoch']}&timeout=20")

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    t_change = time.monotonic()
    # A move takes the SDS's own certificate or an admin (docs/security.md)
    ok(api("POST", "/api/v1/sds/register", registration("sds1", 17381)))
    waiter.join(25)
    assert time.monotonic() - t_change < 10, "the long-poll did not wake on the move"
    moved = result["map"]
    assert moved["epoch"] > before["epoch"]
    assert moved["sds"][str(sds1["id"])]["data_port"] == 17381
    assert pgmap(api, mdm, pool_id)["sds"][str(sds1["id"])]["data_port"] == 17381
    maps = ok(api("GET", f"/api/v1/sdc/{topo['sdc']['id']}/maps", token=mdm.cluster_secret))
    assert maps["pools"][str(pool_id)]["sds"][str(sds1["id"])]["data_port"] == 17381
    # Registering again at the same endpoint is no new map
    again = pgmap(api, mdm, pool_id)
    ok(api("POST", "/api/v1/sds/register", registration("sds1", 17381), token=mdm.cluster_secret))
    assert pgmap(api, mdm, pool_id)["epoch"] == again["epoch"]


def test_a_client_that_accepts_gzip_gets_the_same_document_gzipped(
    api: Api, mdm: MdmDaemon, topo: dict[str, Any]
) -> None:
    """The pool map, and the SDC maps, whose gzip splices each pool's deflated
    document (compressed once) between pieces compressed per request."""
    mappings = f"/api/v1/pools/{topo['pool']['id']}/mappings"
    for path, token in (
        (f"/api/v1/pools/{topo['pool']['id']}/pgmap", mdm.cluster_secret),
        (f"/api/v1/sdc/{topo['sdc']['id']}/maps", mdm.cluster_secret),
        (mappings, mdm.admin_token),  # compressed once per epoch too
    ):
        plain = ok(api("GET", path, token=token))
        req = urllib.request.Request(
            mdm.url + path,
            headers={"Authorization": f"Bearer {token}", "Accept-Encoding": "gzip"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=30) as resp:
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"].startswith("application/json")
            raw = resp.read()
        assert json.loads(gzip.decompress(raw)) == plain
        inflate = zlib.decompressobj(31)  # one gzip member, nothing after it
        assert json.loads(inflate.decompress(raw) + inflate.flush()) == plain
        assert inflate.eof and not inflate.unused_data
    # The mappings (every mapped volume and its SDCs' GUIDs) are not the cluster
    # secret's to read: only an SDS's certificate and an admin credential read them.
    code, body = api("GET", mappings, token=mdm.cluster_secret)
    assert code == 403 and "the cluster secret may not" in str(body), body
