"""What a copy job copies (meshblock.sds.resync.plan_copy): a pure function of the
map, the record of the writes made alone, what this SDS holds and what the copy's SDS
lists; no store, no socket (the jobs themselves: tests/test_sds_resync_units.py)."""

from __future__ import annotations

import pytest

from meshblock.chunks import pg_of
from meshblock.sds.maps import NO_COPY, PgMap
from meshblock.sds.resync import copy_kind, plan_copy

pytestmark = pytest.mark.unit

POOL, PG_COUNT, EPOCH = 3, 8, 41
ME, OTHER, THIRD = (1, 10), (2, 20), (3, 30)
PG = 5


def chunks_of(pg: int, volume: int, n: int) -> list[tuple[int, int]]:
    """The first ``n`` chunks of ``volume`` in ``pg``."""
    found = [(volume, c) for c in range(n * PG_COUNT) if pg_of(volume, c, PG_COUNT) == pg]
    return found[:n]


def pg_map(state: str, target: tuple[int, int] = NO_COPY) -> PgMap:
    """Our SDS primary of every PG, OTHER the secondary; PG 5 in ``state``."""
    states = ["clean"] * PG_COUNT
    states[PG] = state
    return PgMap(
        pool_id=POOL,
        epoch=EPOCH,
        pg_count=PG_COUNT,
        primary=(ME,) * PG_COUNT,
        secondary=(OTHER,) * PG_COUNT,
        sds={1: ("a", 1), 2: ("b", 2), 3: ("c", 3)},
        doc={},
        clean=tuple(s == "clean" for s in states),
        resyncing=tuple(s == "resyncing" for s in states),
        rebuilding=tuple(s == "rebuilding" for s in states),
        target=tuple(target if pg == PG else NO_COPY for pg in range(PG_COUNT)),
    )


HELD = chunks_of(PG, 7, 4) + chunks_of(PG - 1, 7, 3)  # ours, PG 5's and PG 4's
LISTED = chunks_of(PG, 9, 2) + chunks_of(PG + 1, 9, 2)  # the copy's, of PGs 5 and 6
RECORD = frozenset(chunks_of(PG, 7, 2) + chunks_of(PG, 8, 1))


def test_a_resync_with_a_complete_record_copies_the_record_only() -> None:
    plan = plan_copy(pg_map("resyncing"), PG, 39, record=RECORD, held=HELD, listed=LISTED)
    assert (plan.what, plan.kind, plan.full) == ("resync", "rebuild", False)
    assert plan.chunks == tuple(sorted(RECORD))
    assert (plan.pool, plan.pg, plan.epoch, plan.dest, plan.source) == (POOL, PG, 39, 2, 10)


def test_a_resync_without_a_record_copies_what_either_side_holds_of_the_pg() -> None:
    plan = plan_copy(pg_map("resyncing"), PG, EPOCH, record=None, held=HELD, listed=LISTED)
    assert (plan.what, plan.full) == ("resync", True)
    assert plan.chunks == tuple(sorted(chunks_of(PG, 7, 4) + chunks_of(PG, 9, 2)))


@pytest.mark.parametrize(
    ("state", "target", "what", "kind", "dest"),
    [
        ("rebuilding", NO_COPY, "rebuild", "rebuild", OTHER[0]),
        ("clean", THIRD, "move", "rebalance", THIRD[0]),
        ("rebuilding", THIRD, "move", "rebalance", THIRD[0]),  # the move's copy comes first
    ],
)
def test_rebuilds_and_moves_are_full_copies_even_with_a_record(
    state: str, target: tuple[int, int], what: str, kind: str, dest: int
) -> None:
    m = pg_map(state, target)
    assert copy_kind(m, PG, True) == (what, True)
    plan = plan_copy(m, PG, EPOCH, record=RECORD, held=HELD, listed=LISTED)
    assert (plan.what, plan.kind, plan.full, plan.dest) == (what, kind, True, dest)
    assert plan.chunks == tuple(sorted(chunks_of(PG, 7, 4) + chunks_of(PG, 9, 2)))


@pytest.mark.parametrize("record", [RECORD, None])
def test_a_deleted_volumes_chunks_are_never_copied(record: frozenset[tuple[int, int]]) -> None:
    plan = plan_copy(
        pg_map("resyncing"),
        PG,
        EPOCH,
        record=record,
        held=HELD,
        listed=LISTED,
        deleted=lambda volume: volume == 7,
    )
    assert plan.chunks and all(v != 7 for v, _ in plan.chunks)


def test_a_map_that_names_no_copy_has_no_plan() -> None:
    assert copy_kind(pg_map("resyncing"), PG, False) == ("resync", True)
    with pytest.raises(ValueError, match="names no copy"):
        plan_copy(pg_map("clean"), PG, EPOCH, record=None)
