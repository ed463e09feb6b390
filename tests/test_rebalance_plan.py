"""The rebalancer's decision (``meshblock.mdm.rebalance.plan_moves``), pure: a pool's PG
rows and its usable devices in, the moves to start out; no database, no liveness.

The cases the cluster tests go through with real daemons (test_faults'
``test_added_sds_is_rebalanced``, test_rebuild's drain and rebalance back, test_api's
moves off an SDS that never heartbeated): an SDS joins, an SDS drains, moves in flight
use up the budget, and nothing moves while a PG is not clean or with one failure
domain."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from meshblock.mdm.models import PgState
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, compute_map, failure_domain
from meshblock.mdm.rebalance import _one_move, all_clean, copy_holders, plan_moves

pytestmark = pytest.mark.unit

GiB = 1 << 30
POOL = 3
PGS = 24


def devices(*sds_ids: int, fault_set: int | None = None) -> list[DeviceInfo]:
    """One 100 GiB device per SDS, device id = 10 * SDS id."""
    return [DeviceInfo(10 * i, i, fault_set, 100 * GiB) for i in sds_ids]


def balanced(members: Sequence[DeviceInfo]) -> list[PgRow]:
    """The clean rows of the map placement computes over ``members``."""
    pg_map = compute_map(PGS, members)
    return [PgRow(POOL, pg, p, s, PgState.CLEAN, epoch=5) for pg, (p, s) in pg_map.items()]


def moved_copy(change: PgChange) -> int | None:
    before = change.before
    assert before is not None
    return before.primary if change.after.moving == "primary" else before.secondary


def check_moves(moves: list[PgChange], usable: Sequence[DeviceInfo]) -> None:
    """What every move keeps: only target and moving change, in a PG without a move,
    to a usable device outside the failure domain of the copy that stays."""
    info = {d.device_id: d for d in usable}
    assert len({m.after.pg for m in moves}) == len(moves), "one move per PG"
    for m in moves:
        before = m.before
        assert before is not None and before.target is None
        assert m.after == replace(before, target=m.after.target, moving=m.after.moving)
        assert m.after.moving in ("primary", "secondary")
        assert m.after.target in info
        stays = before.secondary if m.after.moving == "primary" else before.primary
        assert stays is not None
        if stays in info:
            assert failure_domain(info[m.after.target]) != failure_domain(info[stays])


def test_a_balanced_pool_moves_nothing() -> None:
    usable = devices(1, 2, 3)
    assert plan_moves(PGS, balanced(usable), usable) == []


def test_a_joining_sds_gets_copies_up_to_the_budget() -> None:
    rows = balanced(devices(1, 2, 3))
    usable = devices(1, 2, 3, 4)
    moves = plan_moves(PGS, rows, usable)
    check_moves(moves, usable)
    assert len(moves) == 4, "max(2, usable devices) moves at a time"
    assert {m.after.target for m in moves} == {40}


def test_moves_in_flight_use_up_the_budget_and_get_no_second_move() -> None:
    rows = balanced(devices(1, 2, 3))
    usable = devices(1, 2, 3, 4)
    first = {m.after.pg: m.after for m in plan_moves(PGS, rows, usable)}
    three = dict(list(first.items())[:3])
    moves = plan_moves(PGS, [three.get(r.pg, r) for r in rows], usable)
    check_moves(moves, usable)
    assert len(moves) == 1 and moves[0].after.pg not in three
    assert plan_moves(PGS, [first.get(r.pg, r) for r in rows], usable) == []


def test_a_draining_sds_has_its_copies_moved_first() -> None:
    rows = balanced(devices(1, 2, 3, 4))
    usable = devices(1, 2, 3)  # SDS 4 drains: not usable
    moves = plan_moves(PGS, rows, usable)
    check_moves(moves, usable)
    assert len(moves) == 3
    assert all(moved_copy(m) == 40 for m in moves), "the copies on the draining device"


def test_drain_moves_go_before_balance_moves() -> None:
    # SDS 4 drains while SDSs 5 and 6 join: copies move off 4 first, the other
    # copies that the balance moves to 5 and 6 wait for later rounds
    rows = balanced(devices(1, 2, 3, 4))
    usable = devices(1, 2, 3, 5, 6)
    moves = plan_moves(PGS, rows, usable)
    check_moves(moves, usable)
    assert len(moves) == 5
    assert all(moved_copy(m) == 40 for m in moves)


def test_one_move_never_puts_both_copies_in_one_failure_domain() -> None:
    info = {
        d.device_id: d
        for d in [*devices(1, fault_set=1), *devices(2), *devices(3, fault_set=1), *devices(4)]
    }
    # neither copy is wanted: the secondary moves, but not into the primary's fault set
    assert _one_move(10, 20, (30, 40), info) == (40, "secondary")


def test_a_move_keeps_the_copies_out_of_one_failure_domain() -> None:
    # SDS 4 joins fault set 1, with SDS 1: no PG gets both copies in it
    rows = balanced(devices(1, 2, 3))
    usable = [*devices(1, fault_set=1), *devices(2, 3), *devices(4, fault_set=1)]
    moves = plan_moves(PGS, rows, usable)
    assert moves, "SDS 4 gets copies"
    check_moves(moves, usable)


@pytest.mark.parametrize("state", [PgState.DEGRADED, PgState.REBUILDING, PgState.RESYNCING])
def test_nothing_moves_while_a_pg_is_not_clean(state: PgState) -> None:
    rows = balanced(devices(1, 2, 3))
    rows[7] = replace(rows[7], state=state)
    assert not all_clean(rows)
    assert plan_moves(PGS, rows, devices(1, 2, 3, 4)) == []


def test_nothing_moves_without_two_failure_domains_or_rows() -> None:
    rows = balanced(devices(1, 2, 3))
    assert plan_moves(PGS, rows, devices(1, 2, 3, 4, fault_set=9)) == []
    assert plan_moves(PGS, [], devices(1, 2, 3, 4)) == []


def test_copy_holders_are_the_sds_of_primaries_and_secondaries_among_members() -> None:
    rows = [
        PgRow(POOL, 0, 10, 20, PgState.CLEAN, target=30, moving="secondary"),
        PgRow(POOL, 1, 20, 50, PgState.CLEAN),  # 50: not a member (failed)
    ]
    assert copy_holders(rows, devices(1, 2, 3, 4)) == {1, 2}
