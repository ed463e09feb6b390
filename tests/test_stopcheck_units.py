"""What stopping SDSs would do to the PGs (``meshblock.mdm.stopcheck``), pure: the
safety of ``meshctl sds ok-to-stop`` over PG rows and what is known of the SDSs, and
the estimates of the dry runs (bytes per PG, time at a throttle)."""

from __future__ import annotations

import pytest

from meshblock.chunks import pgs_of_volume
from meshblock.mdm.failures import Conditions, PoolDevice
from meshblock.mdm.models import PgState
from meshblock.mdm.pgtable import PgRow
from meshblock.mdm.stopcheck import PgOutcome, assess, copy_seconds, pg_bytes, serving
from meshblock.sizes import GiB, MiB

pytestmark = pytest.mark.unit

POOL = 1
CLEAN, DEGRADED, INACTIVE = PgState.CLEAN, PgState.DEGRADED, PgState.INACTIVE
RESYNCING, REBUILDING = PgState.RESYNCING, PgState.REBUILDING
SDS = frozenset({1, 2, 3, 4})


def devices(fault_sets: dict[int, int] | None = None) -> dict[int, PoolDevice]:
    """One device per SDS 1..4, device id = 10 * SDS id."""
    fs = fault_sets or {}
    return {10 * i: PoolDevice(10 * i, i, fs.get(i), 100 * GiB, POOL) for i in SDS}


def seen(*down: int, maintenance: tuple[int, ...] = (), failed: tuple[int, ...] = ()) -> Conditions:
    """SDSs ``down`` not heartbeating, ``maintenance`` in maintenance, the others up."""
    out = frozenset(down) | frozenset(maintenance)
    return Conditions(down=out, connected=SDS - out, usable=SDS - out, failed=frozenset(failed))


def row(pg: int, primary: int | None, secondary: int | None, state: PgState = CLEAN) -> PgRow:
    return PgRow(POOL, pg, primary, secondary, state)


def pgs(outcomes: list[PgOutcome]) -> list[int]:
    return [o.pg for o in outcomes]


def test_serving_copies_by_state() -> None:
    assert [serving(s) for s in (CLEAN, DEGRADED, RESYNCING, REBUILDING, INACTIVE)] == [
        2, 1, 1, 1, 0,
    ]  # fmt: skip


def test_one_sds_of_clean_pgs_is_safe_and_leaves_single_copies() -> None:
    rows = [row(0, 10, 20), row(1, 20, 30), row(2, 30, 40)]
    found = assess(rows, devices(), seen(), {2})
    assert found.safe
    assert pgs(found.single_copy) == [0, 1] and found.unavailable == []
    assert found.touched == 2 and found.already_single_copy == 0


def test_both_copies_of_a_pg_stopped_together_is_not_safe() -> None:
    rows = [row(0, 10, 20), row(1, 20, 30), row(2, 30, 40)]
    found = assess(rows, devices(), seen(), {1, 2})
    assert not found.safe
    assert pgs(found.unavailable) == [0]
    assert pgs(found.single_copy) == [1]
    assert found.unavailable[0].now == 2 and found.unavailable[0].after == 0


def test_a_degraded_pgs_last_copy_is_not_safe_to_stop() -> None:
    """The secondary's SDS is down already: the primary is the one up-to-date copy."""
    rows = [row(0, 10, 20, DEGRADED), row(1, 30, 40)]
    found = assess(rows, devices(), seen(2), {1})
    assert not found.safe and pgs(found.unavailable) == [0]
    # the stale secondary's SDS may stop: the primary still serves
    assert assess(rows, devices(), seen(2), {2}).safe


def test_resyncing_and_rebuilding_pgs_count_their_primary_only() -> None:
    rows = [row(0, 10, 20, RESYNCING), row(1, 30, 40, REBUILDING)]
    assert not assess(rows, devices(), seen(), {1}).safe  # the source of a resync
    assert not assess(rows, devices(), seen(), {3}).safe
    found = assess(rows, devices(), seen(), {2, 4})  # the copies being filled
    assert found.safe and pgs(found.single_copy) == [0, 1]


def test_an_sds_in_maintenance_or_down_already_counts_as_stopped() -> None:
    rows = [row(0, 10, 20), row(1, 30, 40)]
    assert not assess(rows, devices(), seen(maintenance=(2,)), {1}).safe
    assert not assess(rows, devices(), seen(2), {1}).safe
    found = assess(rows, devices(), seen(maintenance=(2,)), {3})
    assert found.safe and found.already_single_copy == 1


def test_a_copy_on_a_failed_device_does_not_serve() -> None:
    rows = [row(0, 10, 20)]
    assert not assess(rows, devices(), seen(failed=(20,)), {1}).safe
    assert assess(rows, devices(), seen(), {1}).safe


def test_pgs_without_a_copy_there_are_counted_not_judged() -> None:
    """An inactive PG elsewhere does not make stopping an unrelated SDS unsafe; one
    with a (stale) copy on it is reported unavailable, marked as already so."""
    rows = [row(0, 10, 20, INACTIVE), row(1, 30, 40)]
    found = assess(rows, devices(), seen(1, 2), {3})
    assert found.safe and found.already_unavailable == 1
    found = assess(rows, devices(), seen(1), {2})
    assert not found.safe
    (lost,) = found.unavailable
    assert (lost.pg, lost.now, lost.after) == (0, 0, 0)


def test_a_whole_fault_set_may_stop_when_copies_span_fault_sets() -> None:
    """Placement puts a PG's copies in two fault sets: stopping one fault set (SDSs 1
    and 2) leaves one copy of every PG; stopping SDSs of two fault sets does not."""
    devs = devices({1: 1, 2: 1, 3: 2, 4: 2})
    rows = [row(0, 10, 30), row(1, 20, 40), row(2, 30, 20), row(3, 40, 10)]
    found = assess(rows, devs, seen(), {1, 2})
    assert found.safe and len(found.single_copy) == 4
    assert not assess(rows, devs, seen(), {1, 3}).safe


def test_unplaced_pgs_are_ignored() -> None:
    found = assess([row(0, None, None)], devices(), seen(), {1})
    assert found.safe and found.touched == 0 and found.already_unavailable == 0


def test_pg_bytes_spread_each_volume_over_its_pgs() -> None:
    pg_count = 8
    vols = [(5, 4 * MiB, 4 * MiB), (9, 64 * MiB, 80 * MiB)]  # 4 PGs, then all 8
    sizes = pg_bytes(pg_count, vols)
    assert sum(sizes) == 84 * MiB
    first, count = pgs_of_volume(5, 4 * MiB, pg_count)
    small = {(first + i) % pg_count for i in range(count)}
    for pg in range(pg_count):
        assert sizes[pg] == 10 * MiB + (MiB if pg in small else 0), (pg, sizes)


def test_pg_bytes_wraps_around_the_last_pg() -> None:
    pg_count = 4
    vtree = next(v for v in range(1, 1000) if pgs_of_volume(v, 3 * MiB, pg_count)[0] == 3)
    assert pg_bytes(pg_count, [(vtree, 3 * MiB, 3 * MiB)]) == [MiB, MiB, 0, MiB]


def test_copy_time_is_the_busiest_source_devices_at_the_throttle() -> None:
    assert copy_seconds({10: 100 * MiB, 20: 300 * MiB}, 50) == 6.0
    assert copy_seconds({10: 100 * MiB}, 0) is None  # unlimited: not known
    assert copy_seconds({}, 0) == 0.0


def test_pgs_with_a_copy_there_not_clean_are_counted() -> None:
    """What a rolling restart waits for before the next SDS: no PG with a copy on the
    restarted SDS still resyncing, rebuilding or degraded. PGs elsewhere do not count."""
    rows = [row(0, 10, 20, RESYNCING), row(1, 20, 30), row(2, 30, 40, REBUILDING)]
    assert assess(rows, devices(), seen(), {2}).not_clean == 1
    assert assess(rows, devices(), seen(), {1}).not_clean == 1
    assert assess(rows, devices(), seen(), {3}).not_clean == 1  # pg 2 only; pg 1 clean
    clean = [row(0, 10, 20), row(1, 20, 30), row(2, 30, 40, DEGRADED)]
    assert assess(clean, devices(), seen(), {2}).not_clean == 0
