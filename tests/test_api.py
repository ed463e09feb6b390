"""The MDM's REST API against a real MDM process, on SQLite and on PostgreSQL.

The module builds the topology of the issue's "done" criterion step by step (a
protection domain, three fault sets with an SDS each, a pool, an SDC, a thin and a
thick volume, both mapped) and checks every refusal on the way: a refused request
answers with a JSON error and changes nothing (the epoch does not move).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _http import Api
from _mdm import MdmDaemon
from _wait import wait_until

pytestmark = pytest.mark.cluster

GiB = 1 << 30


def ok(resp: Any, status: int = 200) -> Any:
    code, body = resp
    assert code == status, f"expected {status}, got {code}: {body}"
    return body


def err(resp: Any, status: int, code: str) -> dict[str, Any]:
    got_status, body = resp
    assert got_status == status, f"expected {status}, got {got_status}: {body}"
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def epoch(api: Api) -> int:
    return int(ok(api("GET", "/health", token=None))["epoch"])


def unchanged(api: Api, resp: Any, status: int, code: str) -> dict[str, Any]:
    """Check a refusal and that it changed nothing (the cluster epoch is the same)."""
    before = epoch(api)
    e = err(resp() if callable(resp) else resp, status, code)
    assert epoch(api) == before, "a refused request moved the epoch"
    return e


class Heartbeats:
    """Heartbeats once a second for the SDSs in ``ids``, as their daemons would send."""

    def __init__(self, api: Api, secret: str) -> None:
        self.api, self.secret = api, secret
        self.ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def beat_now(self) -> None:
        for i in sorted(self.ids):
            self.api("POST", f"/api/v1/sds/{i}/heartbeat", {}, token=self.secret)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.beat_now()

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def heartbeats(api: Api, mdm: MdmDaemon) -> Iterator[Heartbeats]:
    with Heartbeats(api, mdm.cluster_secret) as hb:
        yield hb


@pytest.fixture(scope="module")
def topo(api: Api, heartbeats: Heartbeats) -> dict[str, Any]:
    """The base topology: pd1, fs1..fs3, sds1..sds3 (one 100 GiB device each, sending
    heartbeats), sp1."""
    t: dict[str, Any] = {}
    t["pd"] = ok(api("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
    pd_id = t["pd"]["id"]
    t["fs"] = [
        ok(
            api("POST", "/api/v1/fault-sets", {"name": f"fs{i}", "protection_domain_id": pd_id}),
            201,
        )
        for i in (1, 2, 3)
    ]
    t["pool"] = ok(
        api(
            "POST", "/api/v1/pools", {"name": "sp1", "protection_domain_id": pd_id, "pg_count": 64}
        ),
        201,
    )
    t["sds"] = [
        ok(
            api(
                "POST",
                "/api/v1/sds",
                {
                    "name": f"sds{i}",
                    "protection_domain_id": pd_id,
                    "fault_set_id": t["fs"][i - 1]["id"],
                    "address": "127.0.0.1",
                    "data_port": 17070 + i,
                    "control_port": 17170 + i,
                    "devices": [
                        {
                            "path": f"/var/lib/meshblock/dev{i}",
                            "capacity": "100GiB",
                            "pool_id": t["pool"]["id"],
                        }
                    ],
                },
            ),
            201,
        )
        for i in (1, 2, 3)
    ]
    t["sdc"] = ok(api("POST", "/api/v1/sdc", {"guid": "guid-host1", "name": "host1"}), 201)
    heartbeats.ids.update(x["id"] for x in t["sds"])
    heartbeats.beat_now()
    return t


def test_health_is_open(api: Api) -> None:
    body = ok(api("GET", "/health", token=None))
    assert body["status"] in ("ok", "degraded")
    assert body["epoch"] >= 1


def test_api_requires_token(api: Api, mdm: MdmDaemon) -> None:
    e = err(api("GET", "/api/v1/protection-domains", token=None), 401, "unauthorized")
    assert "Bearer" in e["message"]
    err(api("GET", "/api/v1/protection-domains", token="wrong"), 401, "unauthorized")
    # The read-only token reads but cannot change; the cluster secret only does what
    # daemons do.
    ok(api("GET", "/api/v1/protection-domains", token=mdm.readonly_token))
    unchanged(
        api,
        lambda: api("POST", "/api/v1/protection-domains", {"name": "ro"}, token=mdm.readonly_token),
        403,
        "forbidden",
    )
    err(api("GET", "/api/v1/protection-domains", token=mdm.cluster_secret), 403, "forbidden")


def test_topology_build(api: Api, topo: dict[str, Any]) -> None:
    pool = ok(api("GET", f"/api/v1/pools/{topo['pool']['id']}"))
    cap = pool["capacity"]
    assert cap["total_bytes"] == 300 * GiB
    assert cap["spare_bytes"] == 30 * GiB
    assert cap["free_bytes"] == 270 * GiB
    assert pool["map_epoch"] >= 1


def test_duplicates_conflict(api: Api, topo: dict[str, Any]) -> None:
    pd_id = topo["pd"]["id"]
    unchanged(
        api, lambda: api("POST", "/api/v1/protection-domains", {"name": "pd1"}), 409, "conflict"
    )
    unchanged(
        api,
        lambda: api("POST", "/api/v1/fault-sets", {"name": "fs1", "protection_domain_id": pd_id}),
        409,
        "conflict",
    )
    unchanged(
        api,
        lambda: api("POST", "/api/v1/pools", {"name": "sp1", "protection_domain_id": pd_id}),
        409,
        "conflict",
    )
    unchanged(
        api,
        lambda: api("POST", "/api/v1/sdc", {"guid": "guid-host1", "name": "x"}),
        409,
        "conflict",
    )
    unchanged(
        api,
        lambda: api(
            "POST",
            "/api/v1/sds",
            {"name": "sds1", "protection_domain_id": pd_id, "address": "127.0.0.1"},
        ),
        409,
        "conflict",
    )


def test_unknown_ids_404(api: Api, topo: dict[str, Any]) -> None:
    for path in (
        "/api/v1/protection-domains/9999",
        "/api/v1/pools/9999",
        "/api/v1/sds/9999",
        "/api/v1/sdc/9999",
        "/api/v1/volumes/9999",
        "/api/v1/mappings/9999",
        "/api/v1/fault-sets/9999",
        "/api/v1/pools/99999999999/pgmap",
        "/api/v1/nothing-here",
    ):
        err(api("GET", path), 404, "not_found")
    unchanged(
        api,
        lambda: api("POST", "/api/v1/volumes", {"name": "v", "pool_id": 9999, "size": "1GiB"}),
        404,
        "not_found",
    )
    unchanged(
        api,
        lambda: api("POST", "/api/v1/fault-sets", {"name": "fsx", "protection_domain_id": 9999}),
        404,
        "not_found",
    )


def test_scrub_and_flapping_refusals_change_nothing(api: Api, topo: dict[str, Any]) -> None:
    """The scrub's start/pause of an unknown pool and clear-flapping of an unknown SDS
    are 404s; clear-flapping of an SDS that is not flapping is a 409; none moves the
    epoch, and the real pool's scrub is not started by them."""
    for verb in ("start", "pause"):
        unchanged(
            api, lambda v=verb: api("POST", f"/api/v1/pools/9999/scrub/{v}"), 404, "not_found"
        )
    unchanged(api, lambda: api("POST", "/api/v1/sds/9999/clear-flapping"), 404, "not_found")
    sds_id = topo["sds"][0]["id"]
    e = unchanged(api, lambda: api("POST", f"/api/v1/sds/{sds_id}/clear-flapping"), 409, "conflict")
    assert "not flapping" in e["message"]
    pool = ok(api("GET", f"/api/v1/pools/{topo['pool']['id']}/scrub"))
    assert pool["state"] != "running", pool


def test_ok_to_stop(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    """Every PG has its copies in two of the three fault sets: one SDS may stop (its
    PGs keep one copy), two may not (the PGs with both copies on them would have
    none). Unknown names are a 404 naming them; read-only, for the read-only token."""
    one = ok(api("GET", "/api/v1/sds/ok-to-stop?names=sds1"))
    assert one["safe"] is True, one
    assert one["unavailable"]["count"] == 0
    assert one["single_copy"]["count"] == one["pgs_with_copy"] > 0
    assert one["pgs_with_copy_not_clean"] == 0
    assert [s["name"] for s in one["sds"]] == ["sds1"]
    two = ok(api("GET", "/api/v1/sds/ok-to-stop?names=sds1,sds2", token=mdm.readonly_token))
    assert two["safe"] is False, two
    assert two["unavailable"]["count"] > 0
    assert {p["pool"] for p in two["unavailable"]["pgs"]} == {"sp1"}
    e = err(api("GET", "/api/v1/sds/ok-to-stop?names=sds1,nosuch,sds9"), 404, "not_found")
    assert e["details"]["unknown"] == ["nosuch", "sds9"]
    err(api("GET", "/api/v1/sds/ok-to-stop"), 400, "bad_request")
    err(api("GET", "/api/v1/sds/ok-to-stop?names=sds1", token=mdm.cluster_secret), 403, "forbidden")


def test_dry_runs_change_nothing(api: Api, topo: dict[str, Any]) -> None:
    """A dry run of maintenance, drain, removal and pool settings answers what would
    change, from the handler's own checks, and changes nothing: the epoch, the SDS's
    mode and the pool's settings and map epoch stay as they were."""
    sds = f"/api/v1/sds/{topo['sds'][0]['id']}"
    pool = f"/api/v1/pools/{topo['pool']['id']}"
    before = (epoch(api), ok(api("GET", sds))["mode"], ok(api("GET", pool)))
    plan = ok(api("POST", f"{sds}/maintenance?dry_run=true", {"mode": "enter"}))
    assert (plan["dry_run"], plan["action"], plan["target"]) == (True, "maintenance_enter", "sds1")
    assert plan["single_copy"]["count"] > 0 and plan["unavailable"]["count"] == 0
    assert plan["bytes_to_copy"] == 0
    plan = ok(api("POST", f"{sds}/drain?dry_run=1", {}))
    assert plan["action"] == "drain"
    (sp1,) = plan["pools"]
    assert sp1["pg_copies_to_move"] > 0 and sp1["throttle"] == "rebalance"
    assert sp1["bandwidth_mibps"] == topo["pool"]["rebalance_bandwidth_mibps"]
    plan = ok(
        api("PATCH", f"{pool}?dry_run=true", {"spare_percent": 20, "rebuild_bandwidth_mibps": 7})
    )
    assert plan["changes"]["spare_percent"] == {"from": 10, "to": 20}
    assert plan["changes"]["rebuild_bandwidth_mibps"]["to"] == 7
    # the real removal's refusal, from the same code
    err(api("DELETE", f"{sds}?dry_run=true"), 409, "conflict")
    err(api("PATCH", f"{pool}?dry_run=maybe", {"spare_percent": 20}), 400, "bad_request")
    assert (epoch(api), ok(api("GET", sds))["mode"], ok(api("GET", pool))) == before


def test_bad_input(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    pool_id = topo["pool"]["id"]
    for body, field in (
        ({"name": "v", "pool_id": pool_id, "size": "-3GiB"}, "size"),
        ({"name": "v", "pool_id": pool_id, "size": "12 parsecs"}, "size"),
        ({"name": "v", "pool_id": pool_id, "size": 0}, "size"),
        ({"name": "v", "pool_id": pool_id, "size": "9999PiB"}, "size"),
        ({"name": "v", "pool_id": pool_id, "size": True}, "size"),
        ({"name": "v", "pool_id": pool_id, "size": "1GiB", "type": "fat"}, "type"),
        ({"name": "bad name!", "pool_id": pool_id, "size": "1GiB"}, "name"),
        ({"name": "v", "pool_id": pool_id, "size": "1GiB", "colour": "red"}, None),
        ({"pool_id": pool_id, "size": "1GiB"}, None),
    ):
        e = unchanged(api, lambda b=body: api("POST", "/api/v1/volumes", b), 422, "invalid")
        if field:
            assert field in e["message"], e
    # Not JSON, not an object: 400.
    raw = urllib.request.Request(
        mdm.url + "/api/v1/protection-domains",
        data=b"{nope",
        method="POST",
        headers={"Authorization": f"Bearer {mdm.admin_token}", "Content-Type": "application/json"},
    )
    try:
        urllib.request.urlopen(raw)
        raise AssertionError("malformed JSON was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400
        assert json.loads(exc.read())["error"]["code"] == "bad_request"
    err(api("POST", "/api/v1/protection-domains", ["pd9"]), 400, "bad_request")
    err(api("GET", "/api/v1/volumes?pool_id=abc"), 400, "bad_request")
    # Pool settings out of range, thresholds inverted.
    unchanged(
        api, lambda: api("PATCH", f"/api/v1/pools/{pool_id}", {"spare_percent": 95}), 422, "invalid"
    )
    unchanged(
        api,
        lambda: api(
            "PATCH",
            f"/api/v1/pools/{pool_id}",
            {"capacity_alert_high_percent": 95, "capacity_alert_critical_percent": 90},
        ),
        422,
        "invalid",
    )


def test_deeply_nested_json_is_a_400(api: Api, mdm: MdmDaemon) -> None:
    """A body nested 10,000 arrays deep (the decoder's recursion limit) or 100 objects
    deep (decodable, over the 64 levels allowed) is refused with a clear 400, not a 500."""
    for raw in (b"[" * 10_000 + b"]" * 10_000, b'{"name": ' * 100 + b'"pd"' + b"}" * 100):
        post = api("POST", "/api/v1/protection-domains", data=raw)
        e = unchanged(api, post, 400, "bad_request")
        assert "nested deeper than 64 levels" in e["message"], e
    assert "Traceback" not in mdm.log_text()


def test_volumes_and_capacity(api: Api, topo: dict[str, Any]) -> None:
    pool_id = topo["pool"]["id"]
    thin = ok(
        api(
            "POST",
            "/api/v1/volumes",
            {"name": "thin1", "pool_id": pool_id, "size": "16GiB", "type": "thin"},
        ),
        201,
    )
    assert thin["size_bytes"] == 16 * GiB and thin["type"] == "thin"
    assert thin["allocated_bytes"] == 0
    # Rounded up to the pool's 1 GiB granularity.
    thick = ok(
        api(
            "POST",
            "/api/v1/volumes",
            {"name": "thick1", "pool_id": pool_id, "size": 10 * GiB - 5, "type": "thick"},
        ),
        201,
    )
    assert thick["size_bytes"] == 10 * GiB
    assert thick["allocated_bytes"] == 20 * GiB
    # What a create answers is the volume as shown afterwards, created_at included.
    for created in (thin, thick):
        assert ok(api("GET", f"/api/v1/volumes/{created['id']}")) == created
    cap = ok(api("GET", f"/api/v1/pools/{pool_id}"))["capacity"]
    assert cap["thick_reserved_bytes"] == 20 * GiB
    assert cap["free_bytes"] == 250 * GiB
    # 126 GiB thick needs 252 GiB: does not fit in 250; the refusal says the numbers.
    e = unchanged(
        api,
        lambda: api(
            "POST",
            "/api/v1/volumes",
            {"name": "big", "pool_id": pool_id, "size": "126GiB", "type": "thick"},
        ),
        409,
        "insufficient_capacity",
    )
    assert e["details"]["requested_bytes"] == 252 * GiB
    assert e["details"]["free_bytes"] == 250 * GiB
    ok(
        api(
            "POST",
            "/api/v1/volumes",
            {"name": "big", "pool_id": pool_id, "size": "125GiB", "type": "thick"},
        ),
        201,
    )
    # Thin volumes may over-commit.
    ok(
        api("POST", "/api/v1/volumes", {"name": "huge-thin", "pool_id": pool_id, "size": "10TiB"}),
        201,
    )
    # Extending a thick volume needs room too; shrinking is refused.
    unchanged(
        api,
        lambda: api("PATCH", f"/api/v1/volumes/{thick['id']}", {"size": "11GiB"}),
        409,
        "insufficient_capacity",
    )
    unchanged(
        api,
        lambda: api("PATCH", f"/api/v1/volumes/{thin['id']}", {"size": "8GiB"}),
        409,
        "conflict",
    )
    grown = ok(api("PATCH", f"/api/v1/volumes/{thin['id']}", {"size": "32GiB"}))
    assert grown["size_bytes"] == 32 * GiB
    renamed = ok(api("PATCH", f"/api/v1/volumes/{thin['id']}", {"name": "thin-a"}))
    assert renamed["name"] == "thin-a"
    unchanged(
        api,
        lambda: api("PATCH", f"/api/v1/volumes/{thin['id']}", {"name": "thick1"}),
        409,
        "conflict",
    )
    for name in ("big", "huge-thin"):
        (v,) = [x for x in ok(api("GET", "/api/v1/volumes"))["volumes"] if x["name"] == name]
        ok(api("DELETE", f"/api/v1/volumes/{v['id']}"), 204)


def test_thin_usage_from_heartbeats(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    (thin,) = [v for v in ok(api("GET", "/api/v1/volumes"))["volumes"] if v["name"] == "thin-a"]
    sds1, sds2 = topo["sds"][0], topo["sds"][1]
    for sds in (sds1, sds2):
        ok(
            api(
                "POST",
                f"/api/v1/sds/{sds['id']}/heartbeat",
                {
                    "devices": [{"id": sds["devices"][0]["id"], "used_bytes": 5 << 20}],
                    "volumes": [{"id": thin["id"], "chunks": 5}],
                },
                token=mdm.cluster_secret,
            )
        )

    def allocated() -> dict[str, Any] | None:
        v: dict[str, Any] = ok(api("GET", f"/api/v1/volumes/{thin['id']}"))
        return v if v["allocated_bytes"] else None

    # heartbeats are written once a second
    v = wait_until(allocated, 5, "the volume's allocated bytes", interval=0.2)
    assert v["allocated_bytes"] == 10 << 20  # 5 chunks on each of two SDSs
    cap = ok(api("GET", f"/api/v1/pools/{topo['pool']['id']}"))["capacity"]
    assert cap["thin_used_bytes"] == 10 << 20
    sds = ok(api("GET", f"/api/v1/sds/{sds1['id']}"))
    assert sds["state"] == "connected" and sds["last_seen"]
    assert sds["devices"][0]["used_bytes"] == 5 << 20
    # An SDS reports only its own devices: sds3 cannot rewrite sds1's usage.
    sds3 = topo["sds"][2]
    ok(
        api(
            "POST",
            f"/api/v1/sds/{sds3['id']}/heartbeat",
            {"devices": [{"id": sds1["devices"][0]["id"], "used_bytes": 1 << 30}]},
            token=mdm.cluster_secret,
        )
    )
    time.sleep(1.5)  # past the next write of heartbeats
    sds = ok(api("GET", f"/api/v1/sds/{sds1['id']}"))
    assert sds["devices"][0]["used_bytes"] == 5 << 20
    # An SDS that holds data cannot be removed (it must be drained first).
    e = unchanged(api, lambda: api("DELETE", f"/api/v1/sds/{sds1['id']}"), 409, "conflict")
    assert "drain" in e["message"]
    # Heartbeats need the cluster secret, and a registered SDS.
    err(
        api("POST", f"/api/v1/sds/{sds1['id']}/heartbeat", {}, token=mdm.readonly_token),
        403,
        "forbidden",
    )
    err(api("POST", "/api/v1/sds/9999/heartbeat", {}, token=mdm.cluster_secret), 404, "not_found")


def test_mappings(api: Api, topo: dict[str, Any]) -> None:
    vols = {v["name"]: v for v in ok(api("GET", "/api/v1/volumes"))["volumes"]}
    sdc_id = topo["sdc"]["id"]
    m1 = ok(
        api(
            "POST",
            "/api/v1/mappings",
            {
                "volume_id": vols["thin-a"]["id"],
                "sdc_id": sdc_id,
                "iops_limit": 5000,
                "bandwidth_limit": "100MiB",
            },
        ),
        201,
    )
    assert m1["access_mode"] == "read_write"
    assert m1["bandwidth_limit_bps"] == 100 << 20 and m1["iops_limit"] == 5000
    m2 = ok(
        api(
            "POST",
            "/api/v1/mappings",
            {"volume_id": vols["thick1"]["id"], "sdc_id": sdc_id, "access_mode": "read_only"},
        ),
        201,
    )
    unchanged(
        api,
        lambda: api(
            "POST", "/api/v1/mappings", {"volume_id": vols["thick1"]["id"], "sdc_id": sdc_id}
        ),
        409,
        "conflict",
    )
    unchanged(
        api,
        lambda: api(
            "POST",
            "/api/v1/mappings",
            {"volume_id": vols["thick1"]["id"], "sdc_id": sdc_id, "access_mode": "rw"},
        ),
        422,
        "invalid",
    )
    cleared = ok(api("PATCH", f"/api/v1/mappings/{m1['id']}", {"iops_limit": None}))
    assert cleared["iops_limit"] is None and cleared["bandwidth_limit_bps"] == 100 << 20
    # Mapped volumes and SDCs with mappings cannot be deleted.
    unchanged(
        api, lambda: api("DELETE", f"/api/v1/volumes/{vols['thick1']['id']}"), 409, "conflict"
    )
    unchanged(api, lambda: api("DELETE", f"/api/v1/sdc/{sdc_id}"), 409, "conflict")
    v = ok(api("GET", f"/api/v1/volumes/{vols['thick1']['id']}"))
    assert v["mapped_sdc_ids"] == [sdc_id]
    assert {m["id"] for m in ok(api("GET", f"/api/v1/mappings?sdc_id={sdc_id}"))["mappings"]} == {
        m1["id"],
        m2["id"],
    }


def test_delete_guards(api: Api, topo: dict[str, Any]) -> None:
    pd_id, pool_id = topo["pd"]["id"], topo["pool"]["id"]
    e = unchanged(
        api, lambda: api("DELETE", f"/api/v1/protection-domains/{pd_id}"), 409, "conflict"
    )
    assert "pool" in e["message"]
    unchanged(api, lambda: api("DELETE", f"/api/v1/pools/{pool_id}"), 409, "conflict")
    unchanged(
        api, lambda: api("DELETE", f"/api/v1/fault-sets/{topo['fs'][0]['id']}"), 409, "conflict"
    )
    # An empty protection domain goes.
    pd2 = ok(api("POST", "/api/v1/protection-domains", {"name": "pd-empty"}), 201)
    renamed = ok(api("PATCH", f"/api/v1/protection-domains/{pd2['id']}", {"name": "pd-gone"}))
    assert renamed["name"] == "pd-gone"
    ok(api("DELETE", f"/api/v1/protection-domains/{pd2['id']}"), 204)
    err(api("GET", f"/api/v1/protection-domains/{pd2['id']}"), 404, "not_found")


def test_pg_map_valid(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    m = ok(api("GET", f"/api/v1/pools/{topo['pool']['id']}/pgmap", token=mdm.cluster_secret))
    assert m["pg_count"] == 64 and len(m["pgs"]) == 64
    fault_set = {s["id"]: s["fault_set_id"] for s in topo["sds"]}
    for pg in m["pgs"]:
        p, s = pg["primary"], pg["secondary"]
        assert p and s, pg
        assert p["sds_id"] != s["sds_id"]
        assert fault_set[p["sds_id"]] != fault_set[s["sds_id"]]
    counts: dict[int, int] = {}
    for pg in m["pgs"]:
        for c in (pg["primary"], pg["secondary"]):
            counts[c["sds_id"]] = counts.get(c["sds_id"], 0) + 1
    # three equal devices: 128 copies, about 43 each
    assert max(counts.values()) - min(counts.values()) <= 4, counts
    assert set(m["sds"]) == {str(s["id"]) for s in topo["sds"]}


def test_sds_join_recomputes_map_and_wakes_long_poll(
    api: Api, mdm: MdmDaemon, topo: dict[str, Any]
) -> None:
    pool_id = topo["pool"]["id"]
    before = ok(api("GET", f"/api/v1/pools/{pool_id}/pgmap", token=mdm.cluster_secret))
    result: dict[str, Any] = {}

    def wait() -> None:
        t0 = time.monotonic()
        result["map"] = ok(
            api(
                "GET",
                f"/api/v1/pools/{pool_id}/pgmap?wait_epoch={before['epoch']}&timeout=20",
                token=mdm.cluster_secret,
            )
        )
        result["waited"] = time.monotonic() - t0

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    t_change = time.monotonic()
    sds4 = ok(
        api(
            "POST",
            "/api/v1/sds/register",
            {
                "name": "sds4",
                "protection_domain": "pd1",
                "fault_set": "fs1",
                "address": "127.0.0.1",
                "data_port": 17074,
                "devices": [
                    {"path": "/var/lib/meshblock/dev4", "capacity": "100GiB", "pool": "sp1"}
                ],
                "join_token": mdm.join_token(),
            },
            token=mdm.cluster_secret,
        ),
        201,
    )
    waiter.join(25)
    assert not waiter.is_alive()
    assert result["map"]["epoch"] > before["epoch"]
    assert result["waited"] - (t_change - (time.monotonic() - result["waited"])) < 20
    assert time.monotonic() - t_change < 5  # the waiter returned soon after the change
    assert str(sds4["id"]) in result["map"]["sds"]
    assert sds4["devices"][0]["id"] in [d["device_id"] for d in result["map"]["devices"]]
    # The pool holds volumes: no copy moved (that is rebalance's job, with the data).
    assert [(pg["primary"], pg["secondary"]) for pg in result["map"]["pgs"]] == [
        (pg["primary"], pg["secondary"]) for pg in before["pgs"]
    ]
    # Re-registering the same SDS is idempotent and keeps its id.
    again = ok(
        api(
            "POST",
            "/api/v1/sds/register",
            {
                "name": "sds4",
                "protection_domain": "pd1",
                "fault_set": "fs1",
                "address": "127.0.0.1",
                "data_port": 17074,
                "devices": [
                    {"path": "/var/lib/meshblock/dev4", "capacity": "100GiB", "pool": "sp1"}
                ],
            },
            token=mdm.cluster_secret,
        ),
        200,
    )
    assert again["id"] == sds4["id"] and len(again["devices"]) == 1
    # Registration names an unknown pool: 404 naming the field, nothing changes.
    e = unchanged(
        api,
        lambda: api(
            "POST",
            "/api/v1/sds/register",
            {
                "name": "sds9",
                "protection_domain": "pd1",
                "address": "127.0.0.9",
                "devices": [{"path": "/d", "capacity": "1GiB", "pool": "nope"}],
            },
            token=mdm.cluster_secret,
        ),
        404,
        "not_found",
    )
    assert e["details"]["field"] == "devices.0.pool"
    # A long-poll with nothing new returns the current map after its timeout.
    t0 = time.monotonic()
    same = ok(
        api(
            "GET",
            f"/api/v1/pools/{pool_id}/pgmap?wait_epoch={10**9}&timeout=1",
            token=mdm.cluster_secret,
        )
    )
    assert 0.9 <= time.monotonic() - t0 < 5
    # (the rebalancer may have started moves onto sds4 meanwhile: a newer epoch)
    assert same["epoch"] >= result["map"]["epoch"]
    # SDS without data can be removed; the map refills without it.
    ok(api("DELETE", f"/api/v1/sds/{sds4['id']}"), 204)
    after = ok(api("GET", f"/api/v1/pools/{pool_id}/pgmap", token=mdm.cluster_secret))
    assert str(sds4["id"]) not in after["sds"]
    assert all(pg["primary"] and pg["secondary"] for pg in after["pgs"])


def all_at_once(api: Api, calls: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """Send the requests ``(method, path, body)`` from one thread each, released
    together; their answers in the same order."""
    start = threading.Barrier(len(calls))
    answers: list[tuple[int, Any]] = [(0, None)] * len(calls)

    def call(i: int) -> None:
        method, path, body = calls[i]
        start.wait(10)
        status, doc = api(method, path, body)
        answers[i] = (status, doc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_concurrent_removals_answer_cleanly(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    """An SDS removed while its devices are removed and added, all at once: every
    request gets a definite answer (never a 500), and what is left is consistent: the
    SDS and all its devices are gone, and its pool's PG map names none of them. On
    PostgreSQL these requests run in concurrent transactions (schemathesis once
    found a 500 here; without the MDM's write gate there the SDS removal could fail
    as a conflict with the device added meanwhile). The devices are the only ones of
    their pool: no PG can have a copy there, so nothing keeps the SDS."""
    pool = ok(
        api(
            "POST",
            "/api/v1/pools",
            {"name": "race", "protection_domain_id": topo["pd"]["id"], "pg_count": 8},
        ),
        201,
    )
    pool_id = pool["id"]
    for round_ in range(6):
        sds = ok(
            api(
                "POST",
                "/api/v1/sds",
                {
                    "name": f"race{round_}",
                    "protection_domain_id": topo["pd"]["id"],
                    "fault_set_id": topo["fs"][1]["id"],
                    "address": "127.0.0.1",
                    "data_port": 17200 + round_,
                    "devices": [
                        {"path": f"/r{round_}/d{i}", "capacity": "10GiB", "pool_id": pool_id}
                        for i in range(3)
                    ],
                },
            ),
            201,
        )
        sid = sds["id"]
        calls: list[tuple[str, str, Any]] = [("DELETE", f"/api/v1/sds/{sid}", None)]
        calls += [("DELETE", f"/api/v1/sds/{sid}/devices/{d['id']}", None) for d in sds["devices"]]
        calls.append(
            (
                "POST",
                f"/api/v1/sds/{sid}/devices",
                {"path": f"/r{round_}/new", "capacity": "10GiB", "pool_id": pool_id},
            )
        )
        answers = all_at_once(api, calls)
        statuses = [a[0] for a in answers]
        assert statuses[0] == 204, answers  # it held no data: its removal goes through
        assert all(st in (204, 404) for st in statuses[1:-1]), answers
        assert statuses[-1] in (201, 404, 409), answers
        for st, doc in answers:
            if st >= 400:
                assert doc["error"]["message"], doc
        err(api("GET", f"/api/v1/sds/{sid}"), 404, "not_found")
        m = ok(api("GET", f"/api/v1/pools/{pool_id}/pgmap", token=mdm.cluster_secret))
        assert str(sid) not in m["sds"], m["sds"]
        assert not m["devices"], m["devices"]
        assert not any(pg["primary"] or pg["secondary"] for pg in m["pgs"]), m
    ok(api("DELETE", f"/api/v1/pools/{pool_id}"), 204)


def test_sdc_register_and_maps(api: Api, mdm: MdmDaemon, topo: dict[str, Any]) -> None:
    body = {"guid": "guid-host1", "name": "host1", "address": "127.0.0.1", "nbd_port": 10809}
    sdc = ok(api("POST", "/api/v1/sdc/register", body, token=mdm.cluster_secret), 200)
    assert sdc["id"] == topo["sdc"]["id"] and sdc["state"] == "connected"
    ok(api("POST", f"/api/v1/sdc/{sdc['id']}/heartbeat", {}, token=mdm.cluster_secret))
    maps = ok(api("GET", f"/api/v1/sdc/{sdc['id']}/maps", token=mdm.cluster_secret))
    names = {v["name"]: v for v in maps["volumes"]}
    assert set(names) == {"thin-a", "thick1"}
    assert names["thick1"]["access_mode"] == "read_only"
    assert set(maps["pools"]) == {str(topo["pool"]["id"])}
    # The maps long-poll wakes on a mapping change.
    result: dict[str, Any] = {}

    def wait() -> None:
        result["maps"] = ok(
            api(
                "GET",
                f"/api/v1/sdc/{sdc['id']}/maps?wait_epoch={maps['epoch']}&timeout=20",
                token=mdm.cluster_secret,
            )
        )

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    (m,) = [
        m
        for m in ok(api("GET", f"/api/v1/mappings?sdc_id={sdc['id']}"))["mappings"]
        if m["volume_id"] == names["thick1"]["id"]
    ]
    t0 = time.monotonic()
    ok(api("DELETE", f"/api/v1/mappings/{m['id']}"), 204)
    waiter.join(25)
    assert time.monotonic() - t0 < 2  # clients learn of a change within a second or so
    assert {v["name"] for v in result["maps"]["volumes"]} == {"thin-a"}


def test_topology_document(api: Api, topo: dict[str, Any]) -> None:
    vols = {v["name"]: v for v in ok(api("GET", "/api/v1/volumes"))["volumes"]}
    ok(
        api(
            "POST",
            "/api/v1/mappings",
            {"volume_id": vols["thick1"]["id"], "sdc_id": topo["sdc"]["id"]},
        ),
        201,
    )
    t = ok(api("GET", "/api/v1/topology"))
    (pd,) = [p for p in t["protection_domains"] if p["name"] == "pd1"]
    assert [f["name"] for f in pd["fault_sets"]] == ["fs1", "fs2", "fs3"]
    assert [[s["name"] for s in f["sds"]] for f in pd["fault_sets"]] == [
        ["sds1"],
        ["sds2"],
        ["sds3"],
    ]
    assert all(len(s["devices"]) == 1 for f in pd["fault_sets"] for s in f["sds"])
    (pool,) = pd["pools"]
    assert pool["name"] == "sp1"
    got = {v["name"]: v for v in pool["volumes"]}
    assert got["thin-a"]["type"] == "thin" and got["thick1"]["type"] == "thick"
    assert [m["sdc_name"] for m in got["thin-a"]["mappings"]] == ["host1"]
    assert [m["sdc_name"] for m in got["thick1"]["mappings"]] == ["host1"]
    assert [c["name"] for c in t["sdc"]] == ["host1"]
    assert t["cluster"]["epoch"] == epoch(api)


def test_health_components_and_metrics(api: Api, topo: dict[str, Any]) -> None:
    comps = ok(api("GET", "/health/components"))["components"]
    types = [c["component_type"] for c in comps]
    assert types.count("mdm") == 1 and types.count("sds") == 3 and types.count("sdc") == 1
    for c in comps:
        assert {
            "address",
            "component_id",
            "component_type",
            "control_port",
            "data_port",
            "state",
            "last_seen",
        } <= set(c)
    m = ok(api("GET", "/health/metrics"))
    assert m["sds_total"] == 3 and m["pools"] == 1 and m["volumes"] == 2
    assert m["capacity_total_bytes"] == 300 * GiB
    status, text = api("GET", "/metrics")
    assert status == 200
    samples = {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }
    pool_label = (("pool", "sp1"), ("protection_domain", "pd1"))
    assert samples[("meshblock_pool_total_bytes", pool_label)] == 300 * GiB
    assert samples[("meshblock_pool_spare_bytes", pool_label)] == 30 * GiB
    assert (
        samples[("meshblock_sds", (("state", "connected"),))]
        + samples[("meshblock_sds", (("state", "disconnected"),))]
        == 3
    )
    pg_states = {
        state: samples[("meshblock_pgs", (*pool_label, ("state", state)))]
        for state in ("clean", "degraded", "inactive")
    }
    assert sum(pg_states.values()) == 64
    sds_up = {
        dict(labels)["sds"]: value
        for (name, labels), value in samples.items()
        if name == "meshblock_sds_connected"
    }
    assert set(sds_up) == {"sds1", "sds2", "sds3"}
    # Only SDSs that sent heartbeats within the timeout count as connected, and a PG is
    # clean only when both of its SDSs are.
    if all(sds_up.values()):
        assert pg_states["clean"] == 64
    ratio = samples[("meshblock_pool_used_ratio", pool_label)]
    assert 0 < ratio < 1
    assert samples[("meshblock_pool_alert_high_ratio", pool_label)] == 0.8
    assert samples[("meshblock_volumes", ())] == 2


def pg_states(api: Api) -> dict[str, float]:
    _, text = api("GET", "/metrics")
    return {
        smp.labels["state"]: smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
        if smp.name == "meshblock_pgs" and smp.labels["pool"] == "sp1"
    }


def test_sds_failure_degrades_its_pgs(
    api: Api, mdm: MdmDaemon, topo: dict[str, Any], heartbeats: Heartbeats
) -> None:
    """An SDS that stops heartbeating loses its primaries: its PGs become degraded with
    the other copy as primary, in a new map epoch; they stay degraded when it returns
    (its copies are stale until resynchronised)."""
    ids = [s["id"] for s in topo["sds"]]
    pool_id = topo["pool"]["id"]

    def pgmap() -> dict[str, Any]:
        m: dict[str, Any] = ok(
            api("GET", f"/api/v1/pools/{pool_id}/pgmap", token=mdm.cluster_secret)
        )
        return m

    heartbeats.beat_now()
    before = pgmap()
    assert pg_states(api) == {
        "clean": 64,
        "degraded": 0,
        "rebuilding": 0,
        "resyncing": 0,
        "inactive": 0,
    }
    assert {pg["state"] for pg in before["pgs"]} == {"clean"}
    assert ok(api("GET", "/health", token=None))["status"] == "ok"
    with_sds1 = {
        pg["pg"]
        for pg in before["pgs"]
        if ids[0] in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])
    }
    heartbeats.ids.discard(ids[0])  # sds1 goes quiet
    # the fixture's heartbeat timeout is 5 s
    wait_until(lambda: pg_states(api)["degraded"], 20, "sds1's PGs degraded", interval=0.5)
    after = pgmap()
    assert after["epoch"] > before["epoch"]
    assert pg_states(api) == {
        "clean": 64 - len(with_sds1),
        "degraded": len(with_sds1),
        "rebuilding": 0,
        "resyncing": 0,
        "inactive": 0,
    }
    for old, new in zip(before["pgs"], after["pgs"], strict=True):
        if old["pg"] not in with_sds1:
            assert new == old
            continue
        assert new["state"] == "degraded"
        assert new["primary"]["sds_id"] != ids[0]  # the surviving copy serves
        assert new["secondary"]["sds_id"] == ids[0]  # the stale one, kept for resync
        assert {new["primary"]["device_id"], new["secondary"]["device_id"]} == {
            old["primary"]["device_id"],
            old["secondary"]["device_id"],
        }
    assert ok(api("GET", f"/api/v1/sds/{ids[0]}"))["state"] == "disconnected"
    health = ok(api("GET", "/health", token=None))
    assert health["status"] == "degraded"
    totals = ok(api("GET", "/health/metrics"))
    assert totals["pgs_degraded"] == len(with_sds1)
    assert totals["volumes_degraded"] == 2  # both volumes span every PG of the pool
    # sds1 returns: its copies are stale; its PGs are resynced (docs/design.md,
    # invariant 4), and are clean only when the primary reports the copy done, at a map
    # that is still current.
    heartbeats.ids.add(ids[0])
    heartbeats.beat_now()
    wait_until(
        lambda: pg_states(api)["resyncing"] >= len(with_sds1),
        10,
        "sds1's PGs resyncing",
        interval=0.2,
        detail=lambda: str(pg_states(api)),
    )
    back = pgmap()
    assert back["epoch"] > after["epoch"]
    for old, new in zip(after["pgs"], back["pgs"], strict=True):
        want = "resyncing" if old["pg"] in with_sds1 else old["state"]
        assert new == {**old, "state": want}
    assert ok(api("GET", "/health", token=None))["status"] == "degraded"
    n = min(with_sds1)
    pg = back["pgs"][n]
    primary = pg["primary"]["sds_id"]
    report = {"pool_id": pool_id, "pg": n, "epoch": back["epoch"]}
    path = "/api/v1/sds/{}/pg-synced"
    # only the PG's primary may report, and not from a map older than the resync
    ok(api("POST", path.format(ids[0]), report, token=mdm.cluster_secret), 409)
    stale = {**report, "epoch": after["epoch"]}
    ok(api("POST", path.format(primary), stale, token=mdm.cluster_secret), 409)
    done = ok(api("POST", path.format(primary), report, token=mdm.cluster_secret))
    assert done == {"pool_id": pool_id, "pg": n, "state": "clean", "epoch": back["epoch"] + 1}
    synced = pgmap()
    assert synced["epoch"] == back["epoch"] + 1
    assert synced["pgs"][n]["state"] == "clean"
    assert pg_states(api)["resyncing"] == len(with_sds1) - 1
    ok(api("POST", path.format(primary), report, token=mdm.cluster_secret), 409)  # once
    # Several at once (pgs-synced): one map epoch for all the PGs it makes clean, a
    # refusal per report that does not hold, and nothing moves when none holds.
    batch = "/api/v1/sds/{}/pgs-synced"
    by_primary: dict[int, list[int]] = {}
    for p in synced["pgs"]:
        if p["state"] == "resyncing":
            by_primary.setdefault(p["primary"]["sds_id"], []).append(p["pg"])
    mine, theirs = sorted(by_primary.items(), key=lambda kv: -len(kv[1]))[:2]
    assert len(mine[1]) >= 2, by_primary

    def rep(pg_: int) -> dict[str, int]:
        return {"pool_id": pool_id, "pg": pg_, "epoch": synced["epoch"]}

    e0 = epoch(api)
    none = ok(
        api(
            "POST",
            batch.format(mine[0]),
            {"reports": [rep(theirs[1][0]), rep(n)]},
            token=mdm.cluster_secret,
        )
    )
    assert [r["accepted"] for r in none["results"]] == [False, False], none
    assert {r["error"]["code"] for r in none["results"]} == {"conflict"}, none
    assert epoch(api) == e0 and pgmap()["epoch"] == synced["epoch"]
    two = mine[1][:2]
    done2 = ok(
        api(
            "POST",
            batch.format(mine[0]),
            {"reports": [rep(two[0]), rep(theirs[1][0]), rep(two[1])]},
            token=mdm.cluster_secret,
        )
    )
    new_epoch = synced["epoch"] + 1
    assert done2["results"] == [
        {"pool_id": pool_id, "pg": two[0], "accepted": True, "epoch": new_epoch},
        {
            "pool_id": pool_id,
            "pg": theirs[1][0],
            "accepted": False,
            "error": done2["results"][1]["error"],
        },
        {"pool_id": pool_id, "pg": two[1], "accepted": True, "epoch": new_epoch},
    ], done2
    assert done2["results"][1]["error"]["code"] == "conflict"
    m2 = pgmap()
    assert m2["epoch"] == new_epoch
    assert [m2["pgs"][x]["state"] for x in two] == ["clean", "clean"]
    assert m2["pgs"][theirs[1][0]]["state"] == "resyncing"
    assert pg_states(api)["resyncing"] == len(with_sds1) - 3
    err(
        api("POST", batch.format(10**6), {"reports": [rep(two[0])]}, token=mdm.cluster_secret),
        404,
        "not_found",
    )
    err(
        api("POST", batch.format(mine[0]), {"reports": []}, token=mdm.cluster_secret),
        422,
        "invalid",
    )


def test_sigterm_answers_waiting_long_polls(tmp_path: Any) -> None:
    """A long-poll in progress does not hold the MDM's exit back."""

    daemon = MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}", {})
    daemon.start()
    try:
        a = Api(daemon.url, daemon.admin_token)
        pd = ok(a("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
        pool = ok(
            a("POST", "/api/v1/pools", {"name": "sp1", "protection_domain_id": pd["id"]}), 201
        )
        result: dict[str, Any] = {}

        def wait() -> None:
            result["resp"] = a(
                "GET",
                f"/api/v1/pools/{pool['id']}/pgmap?wait_epoch={pool['map_epoch']}&timeout=25",
                token=daemon.cluster_secret,
            )

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - t0 < 4
        waiter.join(5)
        assert result["resp"].status == 200
    finally:
        daemon.kill()


def test_sds_link_reports_copies_together(api: Api, mdm: MdmDaemon, tmp_path: Any) -> None:
    """The SDS's MDM link (the daemon's own code, against this MDM) sends the copies
    done within SYNCED_BATCH_S in one pgs-synced call. An SDS the MDM does not know
    gets 404 there, as from an MDM of a release without pgs-synced; the link then
    reports PG by PG, and each report is refused (None) rather than lost in an error."""
    import aiohttp

    from meshblock.sds.config import DeviceConfig, SdsConfig
    from meshblock.sds.maps import MapCache
    from meshblock.sds.mdm_client import MdmLink
    from meshblock.sds.replication import Peers
    from meshblock.sds.resync import Resync
    from meshblock.sds.state import SdsState
    from meshblock.sds.stats import SdsStats
    from meshblock.sds.store import ChunkStore, DeviceSpec

    dev = DeviceConfig(str(tmp_path / "dev.img"), "64MiB", "sp1")
    config = SdsConfig(
        name="ghost",
        protection_domain="pd1",
        address="127.0.0.1",
        mdm_urls=(mdm.url,),
        cluster_secret=mdm.cluster_secret,
        state_dir=str(tmp_path),
        devices=(dev,),
    )
    store = ChunkStore([DeviceSpec(dev.path, dev.capacity_bytes, dev.pool)])
    store.open()
    sds = SdsState(store, MapCache(), Peers(mdm.cluster_secret, 5.0), SdsStats())
    sds.sds_id = 10**6  # unknown to the MDM
    resync = Resync(sds)
    calls: list[str] = []

    async def main() -> list[int | None]:
        link = MdmLink(config, mdm.cluster_secret, sds, resync)
        # its HTTP session only: start() would register "ghost" with the MDM
        headers = {"Authorization": f"Bearer {mdm.cluster_secret}"}
        link._session = aiohttp.ClientSession(headers=headers)
        call = link._call

        async def counted(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
            calls.append(path.rsplit("/", 1)[-1])
            return await call(method, path, body, wait_s)

        link._call = counted  # type: ignore[method-assign]
        try:
            reporter = resync.reporter
            assert reporter is not None
            return list(await asyncio.gather(*(reporter(1, pg, 5) for pg in (3, 4, 5))))
        finally:
            await link.stop()

    try:
        results = asyncio.run(main())
    finally:
        store.close()
    assert results == [None, None, None]
    assert calls == ["pgs-synced", "pg-synced", "pg-synced", "pg-synced"], calls


def test_rebalance_moves_copies_off_an_sds_that_never_heartbeated(tmp_path: Any) -> None:
    """An SDS added but never started holds copies of a pool laid out before it had
    data. The rebalancer waits for the failure detector only for SDSs that heartbeated
    and stopped (the detector never acts on this one), so it moves these copies to the
    live SDSs: their PGs get move targets. An MDM of its own, with the rebalancer on."""
    daemon = MdmDaemon(
        tmp_path,
        f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}",
        {"cluster": {"rebalance_interval_s": 0.5}},
    )
    daemon.start()
    try:
        a = Api(daemon.url, daemon.admin_token)
        pd = ok(a("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
        pool = ok(
            a(
                "POST",
                "/api/v1/pools",
                {"name": "sp1", "protection_domain_id": pd["id"], "pg_count": 8},
            ),
            201,
        )
        ids = []
        for i in range(3):
            fs = ok(
                a(
                    "POST",
                    "/api/v1/fault-sets",
                    {"name": f"fs{i}", "protection_domain_id": pd["id"]},
                ),
                201,
            )
            body = {
                "name": f"sds{i}",
                "protection_domain_id": pd["id"],
                "fault_set_id": fs["id"],
                "address": f"127.0.0.{i + 1}",
                "devices": [{"path": "/d", "capacity": "10GiB", "pool_id": pool["id"]}],
            }
            ids.append(ok(a("POST", "/api/v1/sds", body), 201))
        ghost = ids[2]  # never heartbeats
        gdev = ghost["devices"][0]["id"]

        def pgmap() -> dict[str, Any]:
            path = f"/api/v1/pools/{pool['id']}/pgmap"
            return dict(ok(a("GET", path, token=daemon.cluster_secret)))

        on_ghost = {
            pg["pg"]
            for pg in pgmap()["pgs"]
            if gdev in (pg["primary"]["device_id"], pg["secondary"]["device_id"])
        }
        assert on_ghost, "the pool without data was laid out over the ghost's device too"
        with Heartbeats(a, daemon.cluster_secret) as hb:
            hb.ids.update(x["id"] for x in ids[:2])
            hb.beat_now()
            body = {"name": "v1", "pool_id": pool["id"], "size": "1GiB"}
            ok(a("POST", "/api/v1/volumes", body), 201)
            moving = wait_until(
                lambda: {pg["pg"] for pg in pgmap()["pgs"] if pg.get("target")},
                20,
                "a move off the ghost SDS",
                interval=0.3,
                detail=lambda: str(pgmap()),
            )
        assert moving <= on_ghost, (moving, on_ghost)
    finally:
        daemon.stop()


def test_drain_lays_out_a_pool_without_data_at_once(tmp_path: Any) -> None:
    """A pool without a volume holds no data, and the rebalancer plans only pools with
    volumes: draining an SDS lays such a pool out afresh without it at once (before
    the fix its copies stayed, pg-copies never reached 0 and ``meshctl sds remove``
    waited forever). A later recompute (a device joining) puts none back on the
    draining SDS; a cancelled drain lays the pool out with it again. An MDM of its
    own."""
    daemon = MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
    daemon.start()
    try:
        a = Api(daemon.url, daemon.admin_token)
        pd = ok(a("POST", "/api/v1/protection-domains", {"name": "pd1"}), 201)
        body = {"name": "sp1", "protection_domain_id": pd["id"], "pg_count": 16}
        pool = ok(a("POST", "/api/v1/pools", body), 201)
        ids = []
        for i in range(4):
            fs = ok(
                a(
                    "POST",
                    "/api/v1/fault-sets",
                    {"name": f"fs{i}", "protection_domain_id": pd["id"]},
                ),
                201,
            )
            body = {
                "name": f"sds{i}",
                "protection_domain_id": pd["id"],
                "fault_set_id": fs["id"],
                "address": f"127.0.0.{i + 1}",
                "devices": [{"path": "/d", "capacity": "10GiB", "pool_id": pool["id"]}],
            }
            ids.append(ok(a("POST", "/api/v1/sds", body), 201)["id"])

        def copies(sid: int) -> int:
            return int(ok(a("GET", f"/api/v1/sds/{sid}/pg-copies"))["pg_copies"])

        def pgmap() -> dict[str, Any]:
            path = f"/api/v1/pools/{pool['id']}/pgmap"
            return dict(ok(a("GET", path, token=daemon.cluster_secret)))

        assert copies(ids[0]) > 0 and copies(ids[1]) > 0
        before = pgmap()["epoch"]
        assert ok(a("POST", f"/api/v1/sds/{ids[0]}/drain", {}), 202)["mode"] == "draining"
        after = pgmap()
        assert after["epoch"] > before  # a new map epoch
        assert copies(ids[0]) == 0  # at once, not after a rebalance that never comes
        assert all(pg["primary"] and pg["secondary"] for pg in after["pgs"])
        # A recompute (a device joining the pool) places no copy on the draining SDS.
        dev = {"path": "/d2", "capacity": "10GiB", "pool_id": pool["id"]}
        ok(a("POST", f"/api/v1/sds/{ids[3]}/devices", dev), 201)
        assert copies(ids[0]) == 0
        # A cancelled drain lays the pool out with the SDS again.
        ok(a("POST", f"/api/v1/sds/{ids[1]}/drain", {}), 202)
        assert copies(ids[1]) == 0
        assert ok(a("POST", f"/api/v1/sds/{ids[1]}/drain", {"cancel": True}), 202)["mode"] == (
            "normal"
        )
        assert copies(ids[1]) > 0
        # The drained SDS is removed (what `meshctl sds remove` waits for).
        ok(a("DELETE", f"/api/v1/sds/{ids[0]}"), 204)
        err(a("GET", f"/api/v1/sds/{ids[0]}"), 404, "not_found")
    finally:
        daemon.stop()
