"""PG maps as deltas (``meshblock.pgmap_delta``, ``meshblock.mdm.pgmaps.MapCache.delta``):
over random sequences of map changes, the delta the MDM's cache answers from any epoch
it served, applied to that epoch's document (as a caller has it, through JSON), makes
the newest document and matches its digest; an epoch older than the window, or never
served, gets none (the whole document); a delta that does not make the MDM's map is
refused."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshblock import pgmap_delta
from meshblock.mdm import pgmaps
from meshblock.mdm.pgmaps import MapCache, MapDocument
from meshblock.pgmap_doc import PgMapError

pytestmark = pytest.mark.unit

POOL = 3


def base_doc(rng: random.Random, pg_count: int) -> dict[str, Any]:
    sds = {
        str(i): {"address": "127.0.0.1", "data_port": 7000 + i, "name": f"sds{i}"}
        for i in (1, 2, 3)
    }
    return {
        "pool_id": POOL,
        "epoch": 1,
        "pg_count": pg_count,
        "rebuild_concurrency": 4,
        "rebuild_bandwidth_mibps": 0,
        "rebalance_concurrency": 4,
        "rebalance_bandwidth_mibps": 0,
        "pgs": [
            {
                "pg": n,
                "primary": {"sds_id": 1, "device_id": 11},
                "secondary": {"sds_id": 2, "device_id": 12},
                "state": "clean",
            }
            for n in range(pg_count)
        ],
        "devices": [{"device_id": 10 + i, "sds_id": i} for i in (1, 2, 3)],
        "sds": sds,
        "tombstones": {},
    }


def copy_of(rng: random.Random) -> dict[str, int] | None:
    if rng.random() < 0.1:
        return None
    sds = rng.randint(1, 6)
    return {"sds_id": sds, "device_id": 10 + sds}


def changed(rng: random.Random, doc: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    """The next map: ``doc`` (left as it is) with the changes ``kinds`` name, one
    epoch later; unchanged parts shared, as the MDM's documents share them."""
    new = dict(doc)
    new["epoch"] = doc["epoch"] + 1
    for kind in kinds:
        if kind == "pg":
            pgs = list(new["pgs"])
            n = rng.randrange(len(pgs))
            entry: dict[str, Any] = {
                "pg": n,
                "primary": copy_of(rng),
                "secondary": copy_of(rng),
                "state": rng.choice(["clean", "degraded", "rebuilding", "resyncing", "inactive"]),
            }
            if rng.random() < 0.3:
                entry["target"] = copy_of(rng) or {"sds_id": 4, "device_id": 14}
                entry["moving"] = rng.choice(["primary", "secondary"])
            pgs[n] = entry
            new["pgs"] = pgs
        elif kind == "sds":
            sds = dict(new["sds"])
            i = str(rng.randint(1, 6))
            if i in sds and rng.random() < 0.4:
                del sds[i]
            else:
                sds[i] = {
                    "address": "127.0.0.1",
                    "data_port": rng.randint(7000, 7100),
                    "name": f"sds{i}",
                }
            new["sds"] = sds
        elif kind == "devices":
            ids = rng.sample(range(1, 7), rng.randint(0, 6))
            new["devices"] = [{"device_id": 10 + i, "sds_id": i} for i in sorted(ids)]
        elif kind == "tombstone":
            tombs = dict(new["tombstones"])
            v = str(rng.randint(1, 8))
            if v in tombs and rng.random() < 0.5:
                del tombs[v]
            else:
                tombs[v] = new["epoch"]
            new["tombstones"] = tombs
        elif kind == "throttle":
            new["rebuild_bandwidth_mibps"] = rng.randint(0, 100)
    return new


def as_sent(doc: Any) -> Any:
    return json.loads(json.dumps(doc))


KINDS = st.lists(st.sampled_from(["pg", "sds", "devices", "tombstone", "throttle"]), max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    pg_count=st.integers(1, 24),
    steps=st.lists(st.tuples(KINDS, st.booleans()), min_size=1, max_size=12),
)
def test_a_delta_applied_to_an_old_map_makes_the_newest(
    seed: int, pg_count: int, steps: list[tuple[list[str], bool]]
) -> None:
    rng = random.Random(seed)
    cache = MapCache()
    doc = base_doc(rng, pg_count)
    served = [doc]  # the documents callers were given, oldest first
    cache.put(POOL, MapDocument(doc["epoch"], doc, pgmaps.encode(doc)))
    for kinds, serve in steps:
        doc = changed(rng, doc, kinds)
        if serve:  # a map the MDM built (else: an epoch no caller saw)
            served.append(doc)
            cache.put(POOL, MapDocument(doc["epoch"], doc, pgmaps.encode(doc)))
    newest = served[-1]
    document = cache.get(POOL, newest["epoch"])
    assert document is not None
    for old in served:
        delta = cache.delta(POOL, old["epoch"], document)
        assert delta is not None
        sent = json.loads(delta.body)
        assert sent["from_epoch"] == old["epoch"] and sent["epoch"] == newest["epoch"]
        assert pgmap_delta.apply(as_sent(old), sent) == as_sent(newest)
        assert sent["digest"] == pgmap_delta.digest_hex(pgmap_delta.digest(as_sent(newest)))
        # the caller's digest updated from the items the delta changes is the MDM's
        held = pgmap_delta.digest(as_sent(old))
        made, value = pgmap_delta.apply_digested(as_sent(old), sent, held)
        assert made == as_sent(newest) and pgmap_delta.digest_hex(value) == sent["digest"]
        # and a map that is not the MDM's at that epoch is found out as when the
        # digest is computed afresh (or made right, when the delta replaces what differs)
        wrong = {**changed(rng, as_sent(old), ["pg", "sds"]), "epoch": old["epoch"]}
        outcomes: list[dict[str, Any] | None] = []
        for held_digest in (None, pgmap_delta.digest(wrong)):
            try:
                outcomes.append(pgmap_delta.apply_digested(wrong, sent, held_digest)[0])
            except PgMapError:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1] and outcomes[0] in (None, as_sent(newest))
        # only what changed travels: every PG that differs, and no PG that no step
        # since ``old`` changed (a delta over several steps is their composition, so
        # a PG changed and changed back again travels too, with its newest content)
        before = {e["pg"]: e for e in old["pgs"]}
        differs = {e["pg"] for e in newest["pgs"] if before[e["pg"]] != e}
        stepped: set[int] = set()
        later = served[served.index(old) :]
        for a, b in itertools.pairwise(later):
            prior = {e["pg"]: e for e in a["pgs"]}
            stepped |= {e["pg"] for e in b["pgs"] if prior[e["pg"]] != e}
        assert differs <= {e["pg"] for e in sent["pgs"]} <= stepped
        # made once, shared by every caller at that epoch
        assert cache.delta(POOL, old["epoch"], document) is delta


def test_only_the_changed_pg_travels_and_the_answer_is_built_once() -> None:
    rng = random.Random(1)
    cache = MapCache()
    old = base_doc(rng, 4096)
    new = dict(
        old, epoch=2, pgs=[*old["pgs"][:7], dict(old["pgs"][7], state="degraded"), *old["pgs"][8:]]
    )
    for d in (old, new):
        cache.put(POOL, MapDocument(d["epoch"], d, pgmaps.encode(d)))
    document = cache.get(POOL, 2)
    assert document is not None
    delta = cache.delta(POOL, 1, document)
    assert delta is not None
    sent = json.loads(delta.body)
    assert sent["pgs"] == [new["pgs"][7]]
    assert len(delta.body) < 1000 < len(document.body) // 100
    for _ in range(100):
        assert cache.delta(POOL, 1, document) is delta
    assert cache.delta_builds == 1
    # unchanged since: an empty delta at the same epoch
    same = cache.delta(POOL, 2, document)
    assert same is not None
    assert json.loads(same.body)["pgs"] == [] and pgmap_delta.apply(
        as_sent(new), json.loads(same.body)
    ) == as_sent(new)


def test_an_epoch_too_old_or_never_served_gets_the_whole_document() -> None:
    rng = random.Random(2)
    cache = MapCache()
    doc = base_doc(rng, 8)
    docs = [doc]
    cache.put(POOL, MapDocument(1, doc, pgmaps.encode(doc)))
    for _ in range(pgmaps.DELTA_WINDOW + 5):
        doc = changed(rng, doc, ["pg"])
        docs.append(doc)
        cache.put(POOL, MapDocument(doc["epoch"], doc, pgmaps.encode(doc)))
    document = cache.get(POOL, doc["epoch"])
    assert document is not None
    oldest_kept = doc["epoch"] - pgmaps.DELTA_WINDOW
    assert cache.delta(POOL, oldest_kept, document) is not None
    assert cache.delta(POOL, oldest_kept - 1, document) is None  # too old
    assert cache.delta(POOL, 1, document) is None
    assert cache.delta(POOL, doc["epoch"] + 1, document) is None  # never served
    assert cache.delta(POOL + 1, 1, document) is None  # another pool
    # a restarted MDM: an empty window, the whole document for every epoch but its first
    fresh = MapCache()
    fresh.put(POOL, document)
    assert fresh.delta(POOL, doc["epoch"] - 1, document) is None


def test_a_delta_that_does_not_make_the_mdms_map_is_refused() -> None:
    rng = random.Random(3)
    old = base_doc(rng, 16)
    new = changed(rng, old, ["pg", "sds", "tombstone"])
    cache = MapCache()
    for d in (old, new):
        cache.put(POOL, MapDocument(d["epoch"], d, pgmaps.encode(d)))
    document = cache.get(POOL, new["epoch"])
    assert document is not None
    delta = cache.delta(POOL, 1, document)
    assert delta is not None
    sent = json.loads(delta.body)
    assert pgmap_delta.apply(as_sent(old), sent) == as_sent(new)
    # the caller's map differs from the MDM's at that epoch: the digest says so
    drifted = as_sent(old)
    drifted["pgs"][5]["state"] = "inactive"
    with pytest.raises(PgMapError, match="digest"):
        pgmap_delta.apply(drifted, sent)
    with pytest.raises(PgMapError, match="does not apply"):
        pgmap_delta.apply(as_sent(new), sent)  # from another epoch
    with pytest.raises(PgMapError, match="malformed"):
        pgmap_delta.apply(as_sent(old), {**sent, "pgs": [{"no": "pg"}]})
