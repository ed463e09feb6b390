"""The SDC's and the SDS's map followers with PG-map deltas (meshblock.pgmap_delta):
an answer at the epoch the caller has is checked against the digest of its map, and
the SDC's request stays short whatever the number of its pools."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

from meshblock import pgmap_delta
from meshblock.mdm.api.sdc import _map_epochs as mdm_map_epochs
from meshblock.mdm.pgmaps import MapCache, MapDocument
from meshblock.sdc.map_follower import MapFollower
from meshblock.sdc.maps import MapError
from meshblock.sdc.mdm_client import MdmClient
from meshblock.sds.maps import MapCache as SdsMapCache
from meshblock.sds.maps import PgMap
from meshblock.sds.mdm_client import MdmLink

pytestmark = pytest.mark.unit


def pool_doc(epoch: int, primary: int, pool_id: int = 1) -> dict[str, Any]:
    return {
        "pool_id": pool_id,
        "epoch": epoch,
        "pg_count": 2,
        "rebuild_concurrency": 4,
        "rebuild_bandwidth_mibps": 0,
        "rebalance_concurrency": 2,
        "rebalance_bandwidth_mibps": 50,
        "pgs": [
            {
                "pg": n,
                "primary": {"sds_id": primary, "device_id": primary},
                "secondary": {"sds_id": 3, "device_id": 3},
                "state": "clean",
            }
            for n in range(2)
        ],
        "devices": [{"device_id": d, "sds_id": d} for d in (1, 2, 3)],
        "sds": {
            str(i): {"address": f"10.0.0.{i}", "data_port": 7072, "name": f"sds{i}"}
            for i in (1, 2, 3)
        },
        "tombstones": {},
    }


def sdc_doc(epoch: int, pools: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "sdc_id": 1,
        "volumes": [
            {
                "id": p,
                "name": f"v{p}",
                "pool_id": p,
                "size_bytes": 1 << 30,
                "access_mode": "read_write",
                "iops_limit": 0,
                "bandwidth_limit_bps": 0,
            }
            for p in pools
        ],
        "pools": {str(p): doc for p, doc in pools.items()},
    }


def same_epoch_answer(mdm_doc: dict[str, Any]) -> dict[str, Any]:
    """What the MDM answers a caller that says it has the map at ``mdm_doc``'s epoch."""
    cache = MapCache()
    document = MapDocument(mdm_doc["epoch"], mdm_doc)
    cache.put(mdm_doc["pool_id"], document)
    answer = cache.delta(mdm_doc["pool_id"], mdm_doc["epoch"], document)
    assert answer is not None
    body: dict[str, Any] = json.loads(answer.body)
    assert pgmap_delta.is_delta(body) and body["pgs"] == []
    return body


class FakeClient:
    """Answers the SDC's maps requests from a list; records the map_epochs sent."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers
        self.asked: list[dict[int, int] | None] = []

    async def maps(
        self,
        sdc_id: int,
        wait_epoch: int | None = None,
        wait_s: float = 0,
        map_epochs: dict[int, int] | None = None,
    ) -> Any:
        self.asked.append(map_epochs)
        return self.answers.pop(0)


def follower(tmp_path: Path, client: object = None) -> MapFollower:
    return MapFollower(
        cast(MdmClient, client),
        guid="g",
        name="n",
        address="127.0.0.1",
        control_port=1,
        nbd_port=2,
        state_dir=tmp_path,
        heartbeat_interval_s=1,
        longpoll_s=1,
    )


def primary_of_pg0(f: MapFollower) -> int:
    assert f._doc is not None
    primary: int = f._doc["pools"]["1"]["pgs"][0]["primary"]["sds_id"]
    return primary


def test_sdc_same_epoch_answer_with_another_digest_fetches_the_whole_map(
    tmp_path: Path,
) -> None:
    # The SDC holds pool 1 at map epoch 7 with SDS 1 primary (maps.json of an earlier
    # cluster, say); the MDM's document at epoch 7 names SDS 2.
    client = FakeClient([sdc_doc(101, {1: same_epoch_answer(pool_doc(7, 2))})])
    f = follower(tmp_path, client)
    f._apply(sdc_doc(100, {1: pool_doc(7, 1)}))
    f.sdc_id = 1
    with pytest.raises(MapError, match="not the MDM's"):
        f._apply(client.answers[0])
    assert f._map_epochs() is None  # whole maps next
    assert primary_of_pg0(f) == 1

    # the refresh that an SDS's refusal starts asks again, whole, and takes the MDM's map
    client.answers = [
        sdc_doc(101, {1: same_epoch_answer(pool_doc(7, 2))}),
        sdc_doc(101, {1: pool_doc(7, 2)}),
    ]
    f._whole = False
    asyncio.run(f._refresh_once())
    assert client.asked == [{1: 7}, None]
    assert primary_of_pg0(f) == 2
    assert f.mdm_reachable


def test_sdc_same_epoch_answer_with_our_digest_keeps_our_map(tmp_path: Path) -> None:
    f = follower(tmp_path)
    f._apply(sdc_doc(100, {1: pool_doc(7, 1)}))
    held = f._doc
    assert held is not None
    f._apply(sdc_doc(101, {1: same_epoch_answer(pool_doc(7, 1))}))
    assert f._doc is not None and f._doc["pools"]["1"] is held["pools"]["1"]
    assert f._map_epochs() == {1: 7}


class Done(Exception):
    pass


def sds_follow(held: dict[str, Any], answers: list[dict[str, Any]]) -> tuple[PgMap, list[str]]:
    """Run the SDS's follower of pool 1, holding ``held``, over ``answers``; return its
    map after them and the paths it asked."""
    maps = SdsMapCache()
    maps.update(PgMap.from_doc(held))
    link = MdmLink.__new__(MdmLink)
    link._config = cast(Any, SimpleNamespace(map_poll_timeout_s=30.0))
    link._sds = cast(Any, SimpleNamespace(maps=maps, collect_garbage=lambda m: None))
    paths: list[str] = []

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        paths.append(path)
        if not answers:
            raise Done
        return 200, answers.pop(0)

    async def save_state() -> bool:
        return True

    link._call = call  # type: ignore[method-assign]
    link._save_state = save_state  # type: ignore[method-assign]
    with pytest.raises(Done):
        asyncio.run(link._follow(1))
    got = maps.get(1)
    assert got is not None
    return got, paths


def test_sds_same_epoch_answer_with_another_digest_fetches_the_whole_map() -> None:
    got, paths = sds_follow(pool_doc(7, 1), [same_epoch_answer(pool_doc(7, 2)), pool_doc(7, 2)])
    assert "since=7" in paths[0]
    assert paths[1] == "/api/v1/pools/1/pgmap"  # whole, and at once
    assert "since=7" in paths[2]
    assert got.primary[0] == (2, 2)


def test_sds_same_epoch_answer_with_our_digest_keeps_our_map() -> None:
    got, paths = sds_follow(pool_doc(7, 1), [same_epoch_answer(pool_doc(7, 1))])
    assert all("since=7" in p for p in paths)
    assert got.primary[0] == (1, 1)


@pytest.mark.parametrize("pools", [3, 600, 5000])
def test_sdc_map_epochs_query_stays_short_whatever_its_pools(pools: int) -> None:
    # 600 pools with 10-digit epochs (after a restore) made a 9,599-character request
    # line, which the MDM's HTTP server refuses (400) past about 8 KB: every maps
    # request failed from then on.
    have = {p: 4294967296 + p for p in range(1, pools + 1)}
    client = MdmClient.__new__(MdmClient)
    client.request_timeout = 10.0
    paths: list[str] = []

    async def call(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        paths.append(path)
        return {}

    client._call = call  # type: ignore[method-assign]
    asyncio.run(client.maps(1, 41, 30.0, have))
    (path,) = paths
    assert len(path) < 4096 + 100
    query = parse_qs(urlsplit(path).query)
    assert query["wait_epoch"] == ["41"]
    sent = mdm_map_epochs(query["map_epochs"][0])  # as the MDM reads it
    assert sent == {p: have[p] for p in range(1, len(sent) + 1)}  # the first pools
    assert len(sent) == pools or len(sent) > 200  # the others come whole


def delta_chain(epochs: range) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pool 1's map at the first epoch and the MDM's deltas to each next one (the
    primary of every PG alternating between SDS 1 and SDS 2)."""
    cache = MapCache()
    first = pool_doc(epochs[0], 1)
    cache.put(1, MapDocument(epochs[0], first))
    deltas = []
    for e in epochs[1:]:
        document = MapDocument(e, pool_doc(e, 1 + e % 2))
        cache.put(1, document)
        answer = cache.delta(1, e - 1, document)
        assert answer is not None
        deltas.append(json.loads(answer.body))
    return first, deltas


def count_whole_digests(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each whole-map digest computed from now on: True when on the calling thread of
    the test (the event loop's), False in a worker thread."""
    import threading

    calls: list[bool] = []
    whole = pgmap_delta.digest
    main = threading.get_ident()

    def counted(doc: Any) -> int:
        calls.append(threading.get_ident() == main)
        return whole(doc)

    monkeypatch.setattr(pgmap_delta, "digest", counted)
    return calls


def test_sds_updates_its_map_digest_per_delta_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The SDS digests the map it took whole once, in a thread; each delta after it
    updates that digest from the PGs it changes (about 20 ms of CPU a delta for a map
    of 4096 PGs before)."""
    first, deltas = delta_chain(range(7, 11))
    calls = count_whole_digests(monkeypatch)
    got, paths = sds_follow(first, deltas)
    assert got.epoch == 10 and got.primary[0] == (1, 1)
    assert [p.rsplit("since=", 1)[1] for p in paths] == ["7", "8", "9", "10"]
    assert calls == [False]


def test_sdc_updates_its_map_digest_per_delta_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, deltas = delta_chain(range(7, 11))
    client = FakeClient([sdc_doc(101 + n, {1: d}) for n, d in enumerate(deltas)])
    f = follower(tmp_path, client)
    f._apply(sdc_doc(100, {1: first}))
    calls = count_whole_digests(monkeypatch)
    for _ in deltas:
        asyncio.run(f._refresh_once())
    assert f.mdm_reachable and client.asked == [{1: 7}, {1: 8}, {1: 9}]
    assert f.deltas_applied == 3 and primary_of_pg0(f) == 1
    assert f._doc is not None and f._doc["pools"]["1"]["epoch"] == 10
    assert calls == [False]
