"""Maps carry (term, epoch) (docs/mdm.md, "High availability"): the MDM puts its
leader term in every PG map (and so in its deltas and their digests), and SDSs and
SDCs refuse a map of an older term than one they have seen (a deposed MDM's), while a
map without a term (an older MDM's) is taken as before. In-process; the raise of the
term by a restore is in tests/test_leader.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock import pgmap_delta
from meshblock.mdm import pgmaps
from meshblock.mdm.pgmaps import MapCache, MapDocument
from meshblock.sdc.maps import MapError
from meshblock.terms import Terms
from test_map_follower_deltas import follower, pool_doc, sdc_doc, sds_follow
from test_mdm_map_cache import in_session, new_pool

pytestmark = pytest.mark.unit


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
