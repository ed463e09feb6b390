"""The decision after an SDS's unclean start (``meshblock.mdm.unclean.decide``), pure:
every PG with a copy on a device that lost its page cache gets a full copy from its
other copy (docs/mdm.md, "Unclean starts"); no database.

The cluster tests (test_sds_powercut, test_unclean_move_target) cut the power of real
SDSs; these go through each rule of the table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshblock.mdm.models import PgState
from meshblock.mdm.pgtable import PgRow
from meshblock.mdm.unclean import decide

pytestmark = pytest.mark.unit

CLEAN, DEGRADED, INACTIVE = PgState.CLEAN, PgState.DEGRADED, PgState.INACTIVE
RESYNCING, REBUILDING = PgState.RESYNCING, PgState.REBUILDING
UNCLEAN = 10  # the device that started uncleanly; 20 and 30 are on other SDSs


def pg(primary: int | None, secondary: int | None, state: PgState = CLEAN) -> PgRow:
    return PgRow(1, 0, primary, secondary, state, epoch=4)


def after(row: PgRow, in_maintenance: bool = False) -> PgRow:
    """The row once decided (itself when unchanged)."""
    changes = decide([row], {UNCLEAN}, in_maintenance)
    assert len(changes) <= 1
    for change in changes:
        assert change.before == row and change.after != row
        return change.after
    return row


@pytest.mark.parametrize("state", [CLEAN, RESYNCING, DEGRADED, REBUILDING])
def test_an_unclean_secondary_is_rebuilt_from_the_primary(state: PgState) -> None:
    assert after(pg(20, UNCLEAN, state)) == pg(20, UNCLEAN, REBUILDING)


def test_an_unclean_secondary_of_an_inactive_pg_is_left_to_the_failure_checks() -> None:
    assert after(pg(20, UNCLEAN, INACTIVE)) == pg(20, UNCLEAN, INACTIVE)


def test_in_maintenance_an_unclean_secondary_is_dropped() -> None:
    assert after(pg(20, UNCLEAN), in_maintenance=True) == pg(20, None, DEGRADED)


def test_an_unclean_primary_of_a_clean_pg_hands_over_and_is_rebuilt() -> None:
    assert after(pg(UNCLEAN, 20)) == pg(20, UNCLEAN, REBUILDING)


@pytest.mark.parametrize("state", [DEGRADED, INACTIVE, RESYNCING, REBUILDING])
def test_an_unclean_primary_that_is_the_only_in_sync_copy_stays(state: PgState) -> None:
    assert after(pg(UNCLEAN, 20, state)) == pg(UNCLEAN, 20, state)


def test_an_unclean_primary_without_a_secondary_stays() -> None:
    assert after(pg(UNCLEAN, None)) == pg(UNCLEAN, None)


def test_a_move_towards_an_unclean_device_is_cancelled() -> None:
    moving = replace(pg(20, 30), target=UNCLEAN, moving="secondary")
    assert after(moving) == pg(20, 30)


def test_a_pg_rebuilt_after_an_unclean_start_loses_its_move() -> None:
    moving = replace(pg(UNCLEAN, 20), target=30, moving="primary")
    assert after(moving) == pg(20, UNCLEAN, REBUILDING)


def test_when_both_copies_start_uncleanly_one_copy_is_picked() -> None:
    """The first SDS to register hands the primary role over; the second finds its copy
    primary of a PG already rebuilding and keeps it."""
    first = after(pg(UNCLEAN, 20))
    assert first == pg(20, UNCLEAN, REBUILDING)
    assert decide([first], {20}, in_maintenance=False) == []


def test_pgs_without_a_copy_on_the_devices_are_left_alone() -> None:
    rows = [pg(20, 30), replace(pg(30, 20, DEGRADED), pg=1)]
    assert decide(rows, {UNCLEAN}, in_maintenance=False) == []
