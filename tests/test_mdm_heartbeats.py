"""SDS heartbeats that carry what changed, against the real MDM (docs/mdm.md,
"Heartbeats"): a full state, then deltas onto the state of the last heartbeat the MDM
acknowledged; a volume's chunk count that moves, a volume gone (its count 0), a delta
onto a state the MDM does not have (refused: ``send_full``), an MDM restart (it asks
for the whole state), the interval the cluster sets, and bad input refused with the
field named."""

from __future__ import annotations

from typing import Any

import pytest

from _http import Api
from _mdm import MdmDaemon
from _wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1 << 20


def _ok(resp: Any, status: int = 200) -> Any:
    code, doc = resp
    assert code == status, doc
    return doc


@pytest.fixture(scope="module")
def cluster(mdm: MdmDaemon) -> dict[str, Any]:
    api = mdm.api()
    pool = mdm.create_pool("pd-hb", "pool-hb", 16)
    pd_id = pool["protection_domain_id"]
    sds = [
        _ok(
            api.post(
                "/api/v1/sds",
                {
                    "name": f"hb{i}",
                    "protection_domain_id": pd_id,
                    "address": "127.0.0.1",
                    "data_port": 17270 + i,
                    "devices": [
                        {"path": f"/dev/hb{i}", "capacity": "100GiB", "pool_id": pool["id"]}
                    ],
                },
            ),
            201,
        )
        for i in (1, 2)
    ]
    vols = [
        _ok(api.post("/api/v1/volumes", {"name": n, "pool_id": pool["id"], "size": "1GiB"}), 201)
        for n in ("hb-a", "hb-b")
    ]
    return {"sds": sds[0], "volumes": [v["id"] for v in vols]}


def _allocated(api: Api, volume_id: int) -> int:
    return int(_ok(api.get(f"/api/v1/volumes/{volume_id}"))["allocated_bytes"])


def _beat(mdm: MdmDaemon, sds_id: int, body: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = _ok(
        mdm.api(mdm.cluster_secret).post(f"/api/v1/sds/{sds_id}/heartbeat", body)
    )
    return doc


def _until(api: Api, what: str, want: dict[int, int]) -> None:
    wait_until(
        lambda: all(_allocated(api, v) == n for v, n in want.items()),
        15,
        what,
        interval=0.2,
    )


def test_deltas_move_a_count_and_drop_a_volume_and_a_restart_asks_for_all(
    mdm: MdmDaemon, cluster: dict[str, Any]
) -> None:
    api = mdm.api()
    sds = cluster["sds"]
    dev = sds["devices"][0]["id"]
    a, b = cluster["volumes"]
    reply = _beat(
        mdm,
        sds["id"],
        {
            "seq": 10,
            "full": True,
            "devices": [{"id": dev, "used_bytes": 8 * MiB}],
            "volumes": [{"id": a, "chunks": 5}, {"id": b, "chunks": 3}],
            "tombstones": [],
            "map_epochs": [],
            "copies": [],
        },
    )
    assert reply["send_full"] is False
    assert reply["heartbeat_interval_s"] == 1.0  # tests/_mdm.py's [cluster] setting
    _until(api, "the full state's counts", {a: 5 * MiB, b: 3 * MiB})

    # a's count moves, b is gone: nothing else is sent
    reply = _beat(
        mdm,
        sds["id"],
        {"seq": 11, "base": 10, "volumes": [{"id": a, "chunks": 7}], "volumes_gone": [b]},
    )
    assert reply["send_full"] is False
    _until(api, "the delta's counts", {a: 7 * MiB, b: 0})

    # a delta onto a state the MDM does not have (10 is not the last one): refused
    reply = _beat(mdm, sds["id"], {"seq": 12, "base": 10, "volumes": [{"id": a, "chunks": 99}]})
    assert reply["send_full"] is True
    # one onto the last acknowledged state goes on
    reply = _beat(
        mdm, sds["id"], {"seq": 13, "base": 11, "devices": [{"id": dev, "used_bytes": 9 * MiB}]}
    )
    assert reply["send_full"] is False

    def used() -> bool:
        doc = _ok(api.get(f"/api/v1/sds/{sds['id']}"))
        return bool(doc["devices"][0]["used_bytes"] == 9 * MiB)

    wait_until(used, 15, "the device's usage of the last delta", interval=0.2)
    assert _allocated(api, a) == 7 * MiB  # the refused delta's 99 never applied

    mdm.restart()
    reply = _beat(mdm, sds["id"], {"seq": 14, "base": 13, "volumes": [{"id": a, "chunks": 8}]})
    assert reply["send_full"] is True, "a restarted MDM knows no state to apply a delta onto"
    assert _allocated(api, a) == 7 * MiB
    full = {"seq": 15, "full": True, "volumes": [{"id": a, "chunks": 8}, {"id": b, "chunks": 1}]}
    assert _beat(mdm, sds["id"], full)["send_full"] is False
    _until(api, "the full state after the restart", {a: 8 * MiB, b: 1 * MiB})
    assert _beat(mdm, sds["id"], {"seq": 16, "base": 15})["send_full"] is False


def test_an_sds_of_an_earlier_release_sends_everything_every_time(
    mdm: MdmDaemon, cluster: dict[str, Any]
) -> None:
    """No ``seq``: merged as before (a volume not in it keeps its count)."""
    api = mdm.api()
    sds2 = _ok(api.get("/api/v1/sds"))["sds"]
    other = next(s for s in sds2 if s["name"] == "hb2")
    a, b = cluster["volumes"]
    assert _beat(mdm, other["id"], {"volumes": [{"id": b, "chunks": 4}]})["send_full"] is False
    assert _beat(mdm, other["id"], {"volumes": [{"id": a, "chunks": 2}]})["send_full"] is False
    wait_until(
        lambda: _allocated(api, b) >= 4 * MiB and _allocated(api, a) >= 2 * MiB,
        15,
        "the legacy heartbeats' counts",
        interval=0.2,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seq": 1, "full": True, "volumes": [{"id": 1, "chunks": -1}]}, "volumes.0.chunks"),
        ({"seq": 1, "full": True, "volumes": [{"id": 1, "chunks": 1, "x": 1}]}, "volumes.0"),
        ({"seq": "1", "full": True}, "seq"),
        ({"seq": 2}, "base"),
        ({"full": True}, "seq"),
        ({"seq": 2, "base": 1, "volumes_gone": [0]}, "volumes_gone.0"),
        ({"seq": 2, "full": True, "volumes_gone": [1]}, "volumes_gone"),
        ({"seq": 2, "base": 1, "tombstones": [{"id": 1, "chunks_left": 0, "epoch": None}]},
         "tombstones.0.epoch"),
        ({"devices": [{"id": True, "used_bytes": 1}]}, "devices.0.id"),
        ({"copies": [{"pool_id": 1, "kind": "x", "remaining_bytes": 0, "copied_bytes": 0}]},
         "copies.0.kind"),
        ({"scrub": {"pools": "x"}}, "scrub.pools"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_naming_the_field(
    mdm: MdmDaemon, cluster: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    status, doc = mdm.api(mdm.cluster_secret).post(
        f"/api/v1/sds/{cluster['sds']['id']}/heartbeat", body
    )
    assert status == 422, doc
    assert doc["error"]["message"].startswith(field), doc
    assert doc["error"]["details"]["field"] == field, doc


def test_an_unknown_field_and_malformed_json_are_refused(
    mdm: MdmDaemon, cluster: dict[str, Any]
) -> None:
    api = mdm.api(mdm.cluster_secret)
    path = f"/api/v1/sds/{cluster['sds']['id']}/heartbeat"
    status, doc = api.post(path, {"volume": []})
    assert status == 422 and "'volume'" in doc["error"]["message"], doc
    status, doc = api("POST", path, data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400, doc
