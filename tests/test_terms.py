"""Maps carry (term, epoch) (docs/mdm.md, "High availability"): the MDM puts its
leader term in every PG map (and so in its deltas and their digests), and SDSs and
SDCs refuse a map of an older term than one they have seen (a deposed MDM's), while a
map without a term (an older MDM's) is taken as before. In-process; the raise of the
term by a restore is in tests/test_leader.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock import pgmap_delta
from meshblock.mdm import pgmaps
from meshblock.mdm.pgmaps import MapCache, MapDocument
from meshblock.sdc.maps import MapError
from meshblock.sdc.mdm_client import MdmClient
from meshblock.sds.maps import MapCache as SdsMapCache
from meshblock.sds.maps import PgMap
from meshblock.sds.mdm_client import MdmLink
from meshblock.terms import Terms
from test_map_follower_deltas import (
    follower,
    pool_doc,
    primary_of_pg0,
    same_epoch_answer,
    sdc_doc,
    sds_follow,
)
from test_mdm_map_cache import in_session, new_pool
from test_sds_state_file import link

pytestmark = pytest.mark.unit

GUID = "0f0e0d0c-0000-4000-8000-000000000001"


def termed(doc: dict[str, Any], term: int) -> dict[str, Any]:
    return {**doc, "term": term}


def test_map_documents_carry_the_term_and_deltas_cover_it(tmp_path: Path) -> None:
    async def go(s: AsyncSession) -> None:
        pool, _ = await new_pool(s)
        doc = (await pgmaps.map_documents(s, [pool], MapCache(7)))[pool.id]
        assert doc.doc["term"] == 7 and b'"term": 7' in doc.body

    in_session(tmp_path, go)
    # the same map under a new leader: the delta says so and its digest covers it
    cache = MapCache(8)
    cache.put(1, MapDocument(7, termed(pool_doc(7, 1), 7)))
    new = termed(pool_doc(8, 1), 8)
    document = MapDocument(8, new)
    cache.put(1, document)
    delta = cache.delta(1, 7, document)
    assert delta is not None and delta.doc["term"] == 8 and delta.doc["pgs"] == []
    assert delta.doc["digest"] == pgmap_delta.digest_hex(pgmap_delta.digest(new))
    made, _ = pgmap_delta.apply_digested(termed(pool_doc(7, 1), 7), delta.doc, None)
    assert made["term"] == 8


def test_the_sds_refuses_a_map_of_an_older_term(caplog: pytest.LogCaptureFixture) -> None:
    got, _ = sds_follow(termed(pool_doc(7, 1), 5), [termed(pool_doc(8, 2), 4)])
    assert (got.epoch, got.primary[0]) == (7, (1, 1))
    assert "leader term 4 refused: term 5 has been seen" in caplog.text
    # the same term, a newer one, and none (an older MDM) are taken
    got, _ = sds_follow(termed(pool_doc(7, 1), 5), [termed(pool_doc(8, 2), 5)])
    assert got.epoch == 8
    got, _ = sds_follow(termed(pool_doc(7, 1), 5), [pool_doc(9, 2)])
    assert got.epoch == 9


def test_the_sdc_refuses_maps_of_an_older_term_also_after_a_restart(tmp_path: Path) -> None:
    f = follower(tmp_path)
    f._apply(termed(sdc_doc(100, {1: termed(pool_doc(7, 1), 5)}), 5))
    with pytest.raises(MapError, match="older MDM leader term"):
        f._apply(termed(sdc_doc(101, {1: termed(pool_doc(8, 2), 4)}), 4))
    assert f.epoch == 100 and (f.terms.highest, f.terms.refused) == (5, 1)
    saved = json.loads((tmp_path / "maps.json").read_text())
    assert saved["maps"]["term"] == 5
    again = follower(tmp_path)  # restarted: the term of the maps it kept is the highest
    again.load_cached()
    assert again.terms.highest == 5
    with pytest.raises(MapError):
        again._apply(termed(sdc_doc(101, {1: termed(pool_doc(8, 2), 4)}), 4))
    again._apply(sdc_doc(102, {1: pool_doc(9, 2)}))  # an older MDM's: no term
    assert again.epoch == 102


def test_terms_count_what_they_refuse() -> None:
    t = Terms()
    assert t.admit({"term": 3}, "x") and t.admit({}, "x") and t.admit({"term": True}, "x")
    assert not t.admit({"term": 2}, "x")
    t.saw({"term": 9})
    assert not t.admit({"term": 8}, "x") and t.admit({"term": 9}, "x")
    assert (t.highest, t.refused) == (9, 2)


# -- what an SDS and an SDC do with each document of an older or a newer term ----------
# Each test below fails when the check it names is removed (see the commit message).


class Done(Exception):
    """Ends a follower's loop once its answers are used up."""


def test_the_sds_map_cache_refuses_a_map_of_an_older_term() -> None:
    # MapCache.update: the check of maps the follower passes on and of those a restart
    # loads from the state file
    maps = SdsMapCache()
    assert maps.update(PgMap.from_doc(termed(pool_doc(7, 1), 5)))
    assert not maps.update(PgMap.from_doc(termed(pool_doc(8, 2), 4)))
    got = maps.get(1)
    assert got is not None and (got.epoch, got.primary[0]) == (7, (1, 1))
    assert (maps.terms.highest, maps.terms.refused) == (5, 1)
    assert maps.update(PgMap.from_doc(termed(pool_doc(8, 2), 6)))
    assert maps.epoch(1) == 8 and (maps.terms.highest, maps.terms.refused) == (6, 1)


def test_the_sds_follower_refuses_an_unchanged_answer_of_an_older_term(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MdmLink._follow: a deposed MDM's long-poll timeout ("no change since epoch 7",
    # its digest over its own head, term 4) is refused as it comes, before its digest
    # is compared with ours: without the check the SDS took the digest mismatch for a
    # map gone astray and asked that MDM for the whole map
    got, paths = sds_follow(
        termed(pool_doc(7, 1), 5), [same_epoch_answer(termed(pool_doc(7, 1), 4))]
    )
    assert got.primary[0] == (1, 1)
    assert all("since=7" in p for p in paths), paths
    assert "the map of pool 1 of MDM leader term 4 refused: term 5 has been seen" in caplog.text


def heartbeat_link(tmp_path: Path, answers: list[dict[str, Any]]) -> MdmLink:
    """An SDS's MDM link whose MDM answers its heartbeats from ``answers``."""
    lk = link(tmp_path)
    lk._sds.set_identity(7, {})

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        assert path == "/api/v1/sds/7/heartbeat"
        return 200, answers.pop(0)

    lk._call = call  # type: ignore[method-assign]
    return lk


def test_the_sds_refuses_a_heartbeat_answer_of_an_older_term(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # MdmLink._heartbeat: a deposed MDM's answer is taken as no answer: neither its
    # cluster epoch, nor its interval, nor its acknowledgement of our state
    answer = {"state": "up", "epoch": 40, "heartbeat_interval_s": 7.0, "send_full": False}
    lk = heartbeat_link(tmp_path, [termed(answer, 4), termed(answer, 6)])
    terms = lk._sds.maps.terms
    terms.saw({"term": 5})
    interval = lk.heartbeat_interval_s
    assert interval != 7.0
    asyncio.run(lk._heartbeat())
    assert (lk.cluster_epoch, lk.heartbeat_interval_s) == (0, interval)
    assert lk.beats._acked is None  # its acknowledgement of our state is not taken
    assert (terms.highest, terms.refused) == (5, 1)
    assert "a heartbeat answer of MDM leader term 4 refused: term 5 has been seen" in caplog.text
    asyncio.run(lk._heartbeat())  # a newer leader's: taken, and its term the highest
    assert (lk.cluster_epoch, lk.heartbeat_interval_s) == (40, 7.0)
    assert lk.beats._acked is not None
    assert (terms.highest, terms.refused) == (6, 1)


def mappings(epoch: int, term: int, *volumes: int) -> dict[str, Any]:
    return {
        "pool_id": 1,
        "epoch": epoch,
        "term": term,
        "volumes": [{"id": v, "sdcs": [{"guid": GUID, "read_only": False}]} for v in volumes],
    }


def test_the_sds_refuses_mappings_of_an_older_term(tmp_path: Path) -> None:
    # MdmLink._follow_mappings (the long-poll) and _fetch_mappings (the fetch before an
    # IO is refused): the mappings of a deposed MDM neither replace ours nor are given
    # to the IO check
    lk = link(tmp_path)
    lk._sds.set_identity(7, {})
    access, terms = lk._sds.access, lk._sds.maps.terms
    answers = [mappings(3, 5, 10), mappings(4, 4, 11), mappings(5, 6, 12)]
    held: list[int] = []  # the mappings epoch the SDS has at each request

    async def call(method: str, path: str, body: Any = None, wait_s: float = 10.0) -> Any:
        held.append(access.epoch(1))
        if not answers:
            raise Done
        return 200, answers.pop(0)

    lk._call = call  # type: ignore[method-assign]
    with pytest.raises(Done):
        asyncio.run(lk._follow_mappings(1))
    assert held == [-1, 3, 3, 5]  # the term 4 document (epoch 4) was not taken
    assert access.refusal(1, 11, GUID, write=True) is not None  # the deposed MDM's mapping
    assert access.refusal(1, 12, GUID, write=True) is None
    assert (terms.highest, terms.refused) == (6, 1)

    answers[:] = [mappings(6, 5, 11), mappings(6, 7, 13)]
    assert asyncio.run(lk._fetch_mappings(1)) is None  # term 5 < 6: refused
    assert terms.refused == 2
    fetched = asyncio.run(lk._fetch_mappings(1))
    assert fetched is not None and fetched["volumes"][0]["id"] == 13
    assert terms.highest == 7


def test_the_sdc_takes_maps_of_the_same_or_a_newer_term(tmp_path: Path) -> None:
    # MapFollower._apply: the other side of the refusal (tested above)
    f = follower(tmp_path)
    f._apply(termed(sdc_doc(100, {1: termed(pool_doc(7, 1), 5)}), 5))
    f._apply(termed(sdc_doc(101, {1: termed(pool_doc(8, 2), 5)}), 5))
    assert f.epoch == 101
    f._apply(termed(sdc_doc(102, {1: termed(pool_doc(9, 2), 6)}), 6))
    assert f.epoch == 102 and (f.terms.highest, f.terms.refused) == (6, 0)
    with pytest.raises(MapError):  # term 5, once 6 was seen
        f._apply(termed(sdc_doc(103, {1: termed(pool_doc(10, 1), 5)}), 5))
    assert f.epoch == 102 and primary_of_pg0(f) == 2 and f.terms.refused == 1


def test_the_sdc_refuses_a_heartbeat_answer_of_an_older_term(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # MapFollower._heartbeats: a deposed MDM's answer does not set the interval
    f = follower(tmp_path, None)
    # (interval, highest term, refused, MDM reachable) at each heartbeat
    seen: list[tuple[float, int, int, bool]] = []

    class Client:
        def __init__(self, answers: list[dict[str, Any]]) -> None:
            self.answers = answers

        async def heartbeat(self, sdc_id: int, epoch: int) -> Any:
            seen.append((f.heartbeat_interval_s, f.terms.highest, f.terms.refused, f.mdm_reachable))
            if not self.answers:
                raise Done
            return self.answers.pop(0)

    answers = [{"term": 4, "heartbeat_interval_s": 0.2}, {"term": 6, "heartbeat_interval_s": 0.1}]
    f.client = cast(MdmClient, Client(answers))
    f.sdc_id = 1
    f._registered.set()
    f.heartbeat_interval_s = 0.05
    f.terms.saw({"term": 5})
    f.mdm_reachable = True
    with pytest.raises(Done):
        asyncio.run(f._heartbeats())
    # the deposed MDM's answer (term 4) leaves the MDM unreachable: no leader heard us
    assert seen == [(0.05, 5, 0, True), (0.05, 5, 1, False), (0.1, 6, 1, True)]
    assert "a heartbeat answer of MDM leader term 4 refused: term 5 has been seen" in caplog.text
