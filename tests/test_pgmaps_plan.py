"""A pool's map after a change of its membership (``meshblock.mdm.pgmaps.plan_map``),
pure: the PG rows, the devices that take copies and those that keep theirs in, the
changes out; no database.

What the cluster tests do through the API (test_api's joins and removals, test_rebuild's
drain and remove, test_device_failure's device-remove): a new pool laid out, a pool
without data laid out afresh, a pool with data only filled, a removed device taken out
of every PG (its moves too), a failed device's copies left to the failure checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from meshblock.mdm.models import PgState
from meshblock.mdm.pgmaps import _without_removed, plan_map
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, compute_map, validate_map

pytestmark = pytest.mark.unit

GiB = 1 << 30
POOL = 2
PGS = 16


def devices(*sds_ids: int) -> list[DeviceInfo]:
    return [DeviceInfo(10 * i, i, None, 100 * GiB) for i in sds_ids]


def rows_of(members: Sequence[DeviceInfo]) -> list[PgRow]:
    return [
        PgRow(POOL, n, p, s, PgState.CLEAN, epoch=3)
        for n, (p, s) in compute_map(PGS, members).items()
    ]


def applied(rows: Sequence[PgRow], changes: list[PgChange]) -> dict[int, PgRow]:
    out = {r.pg: r for r in rows}
    for change in changes:
        assert change.before is None or out[change.before.pg] == change.before
        out[change.after.pg] = change.after
    return out


def test_a_new_pool_gets_every_pg_clean_and_valid() -> None:
    members = devices(1, 2, 3)
    changes = plan_map(POOL, PGS, [], members, members, has_data=False)
    assert [c.before for c in changes] == [None] * PGS
    new = {c.after.pg: (c.after.primary, c.after.secondary) for c in changes}
    assert sorted(new) == list(range(PGS))
    assert validate_map(new, members) == []
    assert {c.after.state for c in changes} == {PgState.CLEAN}


def test_a_pool_without_data_is_laid_out_afresh() -> None:
    members = devices(1, 2, 3, 4)
    rows = rows_of(devices(1, 2, 3))
    after = applied(rows, plan_map(POOL, PGS, rows, members, members, has_data=False))
    assert {(r.primary, r.secondary) for r in after.values()} == set(
        compute_map(PGS, members).values()
    )
    assert {r.state for r in after.values()} == {PgState.CLEAN}


def test_a_pool_with_data_keeps_its_copies_when_a_device_joins() -> None:
    members = devices(1, 2, 3, 4)
    rows = rows_of(devices(1, 2, 3))
    assert plan_map(POOL, PGS, rows, members, members, has_data=True) == []


def test_a_removed_device_leaves_every_pg_and_its_copies_are_refilled() -> None:
    rows = rows_of(devices(1, 2, 3, 4))
    rows[0] = replace(rows[0], target=40, moving="secondary")
    if 40 in (rows[0].primary, rows[0].secondary):
        rows[0] = replace(rows[0], target=None, moving=None)
    left = devices(1, 2, 3)
    changes = plan_map(POOL, PGS, rows, left, left, has_data=True)
    after = applied(rows, changes)
    for before in rows:
        row = after[before.pg]
        assert 40 not in (row.primary, row.secondary, row.target)
        if 40 in (before.primary, before.secondary):
            assert row.state == PgState.REBUILDING, "a refilled copy is empty: rebuilt"
            kept = before.secondary if before.primary == 40 else before.primary
            assert kept in (row.primary, row.secondary), "the copy with data stays"
        elif before.target is None:
            assert row == before
    assert after[0].target is None and after[0].moving is None


def test_a_pg_refilled_after_a_removal_loses_its_move() -> None:
    """A move needs a clean PG: one whose copy is refilled (rebuilding) drops it, as
    the failure checks and an unclean start do."""
    rows = rows_of(devices(1, 2, 3, 4, 5))
    n, row = next((n, r) for n, r in enumerate(rows) if r.primary == 50)
    spare = next(d for d in (10, 20, 30, 40) if d != row.secondary)
    rows[n] = replace(row, target=spare, moving="secondary")
    left = devices(1, 2, 3, 4)
    after = applied(rows, plan_map(POOL, PGS, rows, left, left, has_data=True))
    assert after[row.pg].primary == row.secondary, "the copy with data stays primary"
    assert after[row.pg].state == PgState.REBUILDING
    assert (after[row.pg].target, after[row.pg].moving) == (None, None)


def test_a_removed_device_without_room_is_still_taken_out() -> None:
    rows = rows_of(devices(1, 2))
    left = devices(1)
    changes = plan_map(POOL, PGS, rows, left, left, has_data=True)
    assert len(changes) == PGS, "every PG named device 20"
    for change in changes:
        assert (change.after.primary, change.after.secondary) == (10, None)


def test_a_failed_device_keeps_its_copies_for_the_failure_checks() -> None:
    rows = rows_of(devices(1, 2, 3))
    every = devices(1, 2, 3)
    usable = devices(1, 2)  # device 30 failed: takes no copy, keeps its own
    assert plan_map(POOL, PGS, rows, usable, every, has_data=True) == []


def test_a_row_on_present_devices_is_kept_as_it_is_and_others_lose_what_is_gone() -> None:
    """``_without_removed``: a row whose copies and move target are all present is the
    row itself (a pool of 4096 PGs makes no new row per PG at every change of its
    membership); otherwise the copies on removed devices go, and the move with its
    target (a move without a target is dropped)."""
    present = {10, 20, 30}
    base = PgRow(POOL, 0, 10, 20, PgState.CLEAN, epoch=3)
    for row in (
        base,
        replace(base, secondary=None),
        replace(base, primary=None, secondary=None),
        replace(base, target=30, moving="secondary"),
    ):
        assert _without_removed(row, present) is row
    assert _without_removed(replace(base, primary=40), present) == replace(base, primary=None)
    assert _without_removed(replace(base, secondary=40), present) == replace(base, secondary=None)
    moved = replace(base, target=40, moving="primary")
    assert _without_removed(moved, present) == base
    assert _without_removed(replace(base, moving="primary"), present) == base
