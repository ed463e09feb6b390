"""The failure checks' decision (``meshblock.mdm.failures.decide``), pure: PG rows and
what is known of the SDSs and devices in, the changes out; no database, no clock.

The cases the cluster tests go through with real daemons (test_api, test_failover,
test_rebuild, test_device_failure): a primary, a secondary or both lost, a return and
its resync, a rebuild target chosen and spread, a failed device, maintenance, a
draining SDS, and a rebalance move cancelled. Then the copy reports
(``decide_synced``): accepted from the primary only, for a PG still being copied and
unchanged since the report's map epoch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from meshblock.mdm.errors import ApiError, Conflict, NotFound
from meshblock.mdm.failures import (
    Conditions,
    PoolDevice,
    decide,
    decide_synced,
    inactive_without,
    next_state,
    rebuild_target,
)
from meshblock.mdm.models import PgState
from meshblock.mdm.pgtable import PgRow

pytestmark = pytest.mark.unit

GiB = 1 << 30
POOL = 1
CLEAN, DEGRADED, INACTIVE = PgState.CLEAN, PgState.DEGRADED, PgState.INACTIVE
RESYNCING, REBUILDING = PgState.RESYNCING, PgState.REBUILDING


def cluster(*sds_ids: int, fault_sets: dict[int, int] | None = None) -> dict[int, PoolDevice]:
    """One 100 GiB device per SDS, device id = 10 * SDS id, all in pool ``POOL``."""
    fs = fault_sets or {}
    return {10 * i: PoolDevice(10 * i, i, fs.get(i), 100 * GiB, POOL) for i in sds_ids}


DEVICES = cluster(1, 2, 3, 4)
EVERYONE = frozenset({1, 2, 3, 4})


def up(*sds_ids: int, failed: Sequence[int] = (), gone: Sequence[int] = ()) -> Conditions:
    """SDSs ``sds_ids`` connected and usable, the others down (``gone`` among them
    lost for good); ``failed``: failed devices."""
    live = frozenset(sds_ids)
    return Conditions(
        down=EVERYONE - live,
        connected=live,
        gone=frozenset(gone),
        usable=live,
        failed=frozenset(failed),
    )


def pg(n: int, primary: int | None, secondary: int | None, state: PgState = CLEAN) -> PgRow:
    return PgRow(POOL, n, primary, secondary, state, epoch=7)


def after(rows: Sequence[PgRow], seen: Conditions) -> dict[int, tuple[object, ...]]:
    """PG -> (primary, secondary, state, target) of every PG the decision changes."""
    plan = decide(rows, DEVICES, seen)
    for change in plan.changes:
        assert change.before in rows, "a change names the row it was decided on"
        assert change.after.epoch == rows[0].epoch, "the writer stamps the epoch"
    return {
        c.after.pg: (c.after.primary, c.after.secondary, c.after.state, c.after.target)
        for c in plan.changes
    }


def test_nothing_changes_while_every_copy_is_up() -> None:
    rows = [pg(0, 10, 20), pg(1, 20, 30), pg(2, None, None)]
    assert after(rows, up(1, 2, 3, 4)) == {}


def test_a_lost_primary_promotes_the_secondary() -> None:
    assert after([pg(0, 10, 20)], up(2, 3, 4)) == {0: (20, 10, DEGRADED, None)}


def test_a_lost_secondary_degrades_the_pg() -> None:
    assert after([pg(0, 10, 20)], up(1, 3, 4)) == {0: (10, 20, DEGRADED, None)}


def test_both_copies_lost_make_the_pg_inactive_and_its_primary_stays() -> None:
    assert after([pg(0, 10, 20)], up(3, 4)) == {0: (10, 20, INACTIVE, None)}


def test_a_degraded_pg_whose_only_in_sync_copy_is_lost_is_inactive() -> None:
    # the secondary's SDS is back, but its copy is stale: never promoted
    assert after([pg(0, 10, 20, DEGRADED)], up(2, 3, 4)) == {0: (10, 20, INACTIVE, None)}


def test_a_returning_secondary_resyncs_once_settled() -> None:
    rows = [pg(0, 10, 20, DEGRADED)]
    assert after(rows, up(1, 2, 3, 4)) == {0: (10, 20, RESYNCING, None)}
    # heartbeating, but not for resync_delay_s yet: not connected in the decision's sense
    not_settled = replace(up(1, 2, 3, 4), connected=frozenset({1, 3, 4}))
    assert after(rows, not_settled) == {}


def test_a_resyncing_pg_falls_back_when_a_copy_is_lost_again() -> None:
    rows = [pg(0, 10, 20, RESYNCING), pg(1, 20, 10, RESYNCING)]
    assert after(rows, up(1, 3, 4)) == {
        0: (10, 20, DEGRADED, None),  # the secondary lost again
        1: (20, 10, INACTIVE, None),  # the primary, its only in-sync copy, lost
    }


def test_a_rebuilding_pg_whose_new_copy_is_lost_rebuilds_it_whole_elsewhere() -> None:
    """The copy being filled holds part of the PG (or, after an unclean start, misses
    writes no record lists): it is dropped, never resynced with a delta on its return.
    Another SDS takes a new copy at once, or, with no room, the PG stays degraded
    without a secondary until one is usable."""
    rows = [pg(0, 10, 20, REBUILDING), pg(1, 30, 10), pg(2, 30, 10)]
    assert after(rows, up(1, 3, 4)) == {0: (10, 40, REBUILDING, None)}
    alone = cluster(1, 2)
    plan = decide([pg(0, 10, 20, REBUILDING)], alone, replace(up(1), down=frozenset({2})))
    assert [(c.after.secondary, c.after.state) for c in plan.changes] == [(None, DEGRADED)]
    assert plan.no_room == {POOL: 1}
    back = decide([plan.changes[0].after], alone, up(1, 2))
    assert [(c.after.secondary, c.after.state) for c in back.changes] == [(20, REBUILDING)]


def test_an_inactive_pg_comes_back_with_its_primary() -> None:
    rows = [pg(0, 10, 20, INACTIVE)]
    assert after(rows, up(1, 3, 4)) == {0: (10, 20, DEGRADED, None)}
    assert after(rows, up(1, 2, 3, 4)) == {0: (10, 20, RESYNCING, None)}
    assert after(rows, up(2, 3, 4)) == {}, "the stale secondary does not bring it back"


def test_a_secondary_gone_for_good_is_rebuilt_on_the_least_filled_device() -> None:
    # device 30 holds two copies already, device 40 none: 40 takes the new copy
    rows = [pg(0, 10, 20, DEGRADED), pg(1, 30, 10), pg(2, 30, 10)]
    assert after(rows, up(1, 3, 4, gone=[2])) == {0: (10, 40, REBUILDING, None)}


def test_a_lost_sds_is_rebuilt_on_every_other_sds() -> None:
    """Many-to-many: each choice counts, so the new copies spread."""
    rows = [pg(n, 10, 20) for n in range(6)]
    plan = decide(rows, DEVICES, up(1, 3, 4, gone=[2]))
    targets = [c.after.secondary for c in plan.changes]
    assert all(c.after.state == REBUILDING for c in plan.changes)
    assert targets == [30, 40, 30, 40, 30, 40]
    assert plan.rebuilt == {POOL: 6} and plan.no_room == {}


def test_a_sds_down_but_not_gone_keeps_its_copies() -> None:
    assert after([pg(0, 10, 20, DEGRADED)], up(1, 3, 4)) == {}


def test_maintenance_degrades_and_never_rebuilds() -> None:
    # in maintenance: down for its PGs, never connected nor gone
    seen = Conditions(
        down=frozenset({2}), connected=frozenset({1, 3, 4}), usable=frozenset({1, 3, 4})
    )
    assert after([pg(0, 20, 10)], seen) == {0: (10, 20, DEGRADED, None)}
    assert after([pg(0, 10, 20, DEGRADED)], seen) == {}


def test_no_room_leaves_the_pg_degraded_and_counts_it() -> None:
    devices = cluster(1, 2)
    plan = decide([pg(0, 10, 20, DEGRADED)], devices, up(1, gone=[2]))
    assert plan.changes == [] and plan.no_room == {POOL: 1} and plan.rebuilt == {}


def test_a_rebuild_stays_out_of_the_primarys_fault_set_and_off_draining_sds() -> None:
    devices = cluster(1, 2, 3, 4, fault_sets={1: 100, 3: 100})
    # SDS 4 drains: connected but not usable
    seen = replace(up(1, 3, 4, gone=[2]), usable=frozenset({1, 3}))
    plan = decide([pg(0, 10, 20, DEGRADED)], devices, seen)
    assert plan.changes == [] and plan.no_room == {POOL: 1}
    seen = replace(seen, usable=frozenset({1, 3, 4}))
    (change,) = decide([pg(0, 10, 20, DEGRADED)], devices, seen).changes
    assert change.after.secondary == 40


def test_a_failed_device_fails_over_and_is_rebuilt_at_once() -> None:
    """Its SDS is up, but the copy is down and gone for good: the secondary is
    promoted and a new one rebuilt in the same decision, without rebuild_delay_s."""
    rows = [pg(0, 10, 20), pg(1, 30, 10), pg(2, 30, 40)]
    assert after(rows, up(1, 2, 3, 4, failed=[10])) == {
        0: (20, 40, REBUILDING, None),
        1: (30, 20, REBUILDING, None),
    }


def test_a_failed_device_is_never_a_rebuild_target() -> None:
    rows = [pg(0, 10, 20, DEGRADED), pg(1, 30, 10), pg(2, 30, 10)]
    assert after(rows, up(1, 3, 4, gone=[2], failed=[40])) == {0: (10, 30, REBUILDING, None)}


def test_a_secondary_on_a_failed_device_does_not_resync() -> None:
    rows = [pg(0, 10, 20, DEGRADED)]
    assert after(rows, up(1, 2, 3, 4, failed=[20])) == {0: (10, 30, REBUILDING, None)}


def move(n: int, primary: int, secondary: int, target: int, moving: str) -> PgRow:
    return replace(pg(n, primary, secondary), target=target, moving=moving)


def test_a_move_carries_on_while_the_pg_is_clean_and_the_target_usable() -> None:
    assert after([move(0, 10, 20, 30, "secondary")], up(1, 2, 3, 4)) == {}


def test_a_move_is_cancelled_when_the_pg_degrades() -> None:
    plan = decide([move(0, 10, 20, 30, "primary")], DEVICES, up(2, 3, 4))
    (change,) = plan.changes
    assert (change.after.primary, change.after.secondary) == (20, 10)
    assert (change.after.state, change.after.target, change.after.moving) == (
        DEGRADED,
        None,
        None,
    )


@pytest.mark.parametrize(
    "seen",
    [
        up(1, 2, 4),  # the target's SDS is down
        replace(up(1, 2, 3, 4), usable=frozenset({1, 2, 4})),  # draining
        up(1, 2, 3, 4, failed=[30]),  # the target's device failed
    ],
    ids=["down", "draining", "failed"],
)
def test_a_move_is_cancelled_when_its_target_may_not_take_copies(seen: Conditions) -> None:
    assert after([move(0, 10, 20, 30, "secondary")], seen) == {0: (10, 20, CLEAN, None)}


def test_move_targets_count_as_copies_for_rebuild_choices() -> None:
    # device 30 is the target of two moves: 40 is less filled
    rows = [
        pg(0, 10, 20, DEGRADED),
        move(1, 10, 40, 30, "secondary"),
        move(2, 40, 10, 30, "primary"),
        pg(3, 10, 30),
    ]
    got = after(rows, up(1, 3, 4, gone=[2]))
    assert got == {0: (10, 40, REBUILDING, None)}


def test_a_cancelled_move_frees_its_target_for_a_rebuild() -> None:
    # the move's PG degrades (SDS 2 lost): its target 30 no longer counts, so both
    # rebuilds find 30 no fuller than 40 (counted, 30 would be full after the first)
    rows = [move(0, 20, 10, 30, "primary"), pg(1, 10, 20, DEGRADED), pg(2, 40, 10)]
    assert after(rows, up(1, 3, 4, gone=[2])) == {
        0: (10, 30, REBUILDING, None),
        1: (10, 30, REBUILDING, None),
    }


@pytest.mark.parametrize(
    ("primary_up", "secondary_up", "state", "connected", "expected"),
    [
        (True, True, CLEAN, True, (False, CLEAN)),
        (False, True, CLEAN, True, (True, DEGRADED)),
        (True, False, CLEAN, False, (False, DEGRADED)),
        (False, False, CLEAN, False, (False, INACTIVE)),
        (True, None, CLEAN, False, (False, DEGRADED)),
        (True, True, DEGRADED, True, (False, RESYNCING)),
        (True, True, DEGRADED, False, (False, DEGRADED)),
        (False, True, DEGRADED, True, (False, INACTIVE)),
        (True, True, REBUILDING, True, (False, REBUILDING)),
        (True, False, REBUILDING, False, (False, DEGRADED)),
        (True, True, INACTIVE, True, (False, RESYNCING)),
    ],
)
def test_next_state(
    primary_up: bool | None,
    secondary_up: bool | None,
    state: PgState,
    connected: bool,
    expected: tuple[bool, PgState],
) -> None:
    assert next_state(primary_up, secondary_up, state, connected) == expected


def test_rebuild_target_ties_go_to_the_lowest_id_and_other_pools_are_ignored() -> None:
    devices = [*cluster(1, 2, 3).values(), PoolDevice(50, 5, None, 100 * GiB, POOL + 1)]
    seen = Conditions(usable=frozenset({1, 2, 3, 5}))
    assert rebuild_target(devices, {}, devices[0], seen) == 20
    assert rebuild_target(devices, {20: 1}, devices[0], seen) == 30


# -- copy reports (decide_synced) -------------------------------------------------------

SDS_OF = {10: 1, 20: 2, 30: 3, 40: 4}  # device -> SDS
MAP_EPOCH = 9


def synced(
    reports: list[tuple[int, int, int]], rows: Sequence[PgRow], sds_id: int = 1
) -> tuple[list[int | ApiError], dict[int, PgRow]]:
    """Results, and PG -> row after of every PG changed."""
    results, changes = decide_synced(sds_id, reports, rows, SDS_OF, {POOL: MAP_EPOCH})
    for change in changes:
        assert change.before in rows
    return results, {c.after.pg: c.after for c in changes}


@pytest.mark.parametrize("state", [RESYNCING, REBUILDING])
def test_a_report_from_the_primary_makes_the_pg_clean(state: PgState) -> None:
    results, done = synced([(POOL, 0, 7)], [pg(0, 10, 20, state)])
    assert results == [MAP_EPOCH + 1]
    assert done == {0: replace(pg(0, 10, 20), epoch=MAP_EPOCH + 1)}


def test_a_finished_move_puts_the_target_in_place_of_the_copy_that_moved() -> None:
    rows = [move(0, 10, 20, 30, "secondary"), move(1, 10, 20, 30, "primary")]
    results, done = synced([(POOL, 0, 7), (POOL, 1, 8)], rows)
    assert results == [MAP_EPOCH + 1, MAP_EPOCH + 1], "one new map epoch for the pool"
    assert (done[0].primary, done[0].secondary, done[0].target) == (10, 30, None)
    assert (done[1].primary, done[1].secondary, done[1].moving) == (20, 30, None)
    assert done[0].state == done[1].state == CLEAN


def test_a_report_of_a_rebuild_makes_the_pg_clean_without_finishing_its_move() -> None:
    """Only a clean PG's report finishes a move: a rebuilding PG that still names a
    target (a move it should have lost) keeps its copies, the target does not replace
    the primary that holds the data."""
    row = replace(pg(0, 20, 30, REBUILDING), target=40, moving="primary")
    results, done = synced([(POOL, 0, 7)], [row], sds_id=2)
    assert results == [MAP_EPOCH + 1]
    assert done == {0: replace(row, state=CLEAN, epoch=MAP_EPOCH + 1)}


def conflict(result: int | ApiError) -> dict[str, object]:
    assert isinstance(result, Conflict), result
    return result.details or {}


def test_reports_not_from_the_primary_from_an_old_map_or_of_a_clean_pg_are_refused() -> None:
    rows = [pg(0, 10, 20, RESYNCING), pg(1, 10, 20, RESYNCING), pg(2, 10, 20)]
    results, done = synced([(POOL, 0, 7)], rows, sds_id=2)
    assert conflict(results[0]) == {"state": "resyncing", "pg_epoch": 7, "map_epoch": MAP_EPOCH}
    results, done = synced([(POOL, 1, 6), (POOL, 2, 7)], rows)
    assert conflict(results[0])["pg_epoch"] == 7, "copy started before the PG changed"
    assert conflict(results[1])["state"] == "clean"
    assert done == {}


def test_a_second_report_of_a_pg_in_one_call_is_refused() -> None:
    results, done = synced([(POOL, 0, 7), (POOL, 0, 7)], [pg(0, 10, 20, RESYNCING)])
    assert results[0] == MAP_EPOCH + 1
    new = MAP_EPOCH + 1
    assert conflict(results[1]) == {"state": "clean", "pg_epoch": new, "map_epoch": new}
    assert list(done) == [0]


def test_unknown_pools_and_pgs_are_not_found() -> None:
    results, done = synced([(POOL + 1, 0, 7), (POOL, 5, 7)], [pg(0, 10, 20, RESYNCING)])
    assert [type(r) for r in results] == [NotFound, NotFound]
    assert done == {}


def test_an_sds_whose_down_would_leave_a_pg_with_no_serving_copy_is_named() -> None:
    """The guard of the isolation rule: SDS 1 is primary of a PG resyncing
    to SDS 2 and of one rebuilding on SDS 3; taken down, both would be inactive (only
    the primary may serve them). Its clean PG (the secondary takes over) and a PG it
    is the stale secondary of are no reason to keep it up."""
    rows = [
        pg(0, 10, 20, RESYNCING),
        pg(1, 10, 30, REBUILDING),
        pg(2, 10, 20),
        pg(3, 30, 10, DEGRADED),
        pg(4, 20, 30, INACTIVE),
    ]
    everyone = up(1, 2, 3, 4)
    assert [r.pg for r in inactive_without(rows, DEVICES, everyone, 1)] == [0, 1]
    assert inactive_without(rows[2:], DEVICES, everyone, 1) == []
    # its clean PG whose other copy is down already: it is the last copy
    assert [r.pg for r in inactive_without([pg(2, 10, 20)], DEVICES, up(1, 3, 4), 1)] == [2]
    # what is inactive already is not counted
    assert inactive_without([pg(4, 10, 20, INACTIVE)], DEVICES, up(1, 3, 4), 1) == []
