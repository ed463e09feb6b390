"""PG placement (``meshblock.mdm.placement``): rules, balance and minimal movement."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from math import ceil, floor

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from meshblock.mdm.placement import (
    DeviceInfo,
    PgAssignment,
    compute_map,
    copy_tolerance,
    failure_domain,
    ideal_copies,
    validate_map,
)

pytestmark = pytest.mark.unit

GiB = 1 << 30
EPSILON = 1e-9  # ideal_copies is a float; the bounds are exact fractions


def sds(sds_id: int, *capacities_gib: int, fault_set: int | None = None) -> list[DeviceInfo]:
    """The devices of one SDS; device ids are ``sds_id * 10 + n``."""
    return [
        DeviceInfo(sds_id * 10 + n, sds_id, fault_set, capacity * GiB)
        for n, capacity in enumerate(capacities_gib)
    ]


def copies_per_device(pg_map: Mapping[int, PgAssignment]) -> Counter[int | None]:
    return Counter(device for pair in pg_map.values() for device in pair)


def primaries_per_device(pg_map: Mapping[int, PgAssignment]) -> Counter[int | None]:
    return Counter(primary for primary, _ in pg_map.values())


def moved(previous: Mapping[int, PgAssignment], new: Mapping[int, PgAssignment]) -> int:
    """Copies that are on a device they were not on before (role changes are free)."""
    return sum(len(set(new[pg]) - set(previous.get(pg, ()))) for pg in new)


def unbalanced(pg_map: Mapping[int, PgAssignment], devices: Sequence[DeviceInfo]) -> list[str]:
    """Devices outside the stated tolerances, worked out independently of the module."""
    copies = copies_per_device(pg_map)
    primaries = primaries_per_device(pg_map)
    problems = []
    for device_id, ideal in ideal_copies(len(pg_map), devices).items():
        count = copies[device_id]
        if abs(count - ideal) > copy_tolerance(ideal) + EPSILON:
            problems.append(f"{device_id}: {count} copies, ideal {ideal}")
        if abs(2 * primaries[device_id] - count) > 2:
            problems.append(f"{device_id}: {primaries[device_id]} primaries of {count}")
    return problems


def check(pg_map: Mapping[int, PgAssignment], devices: Sequence[DeviceInfo]) -> None:
    assert validate_map(pg_map, devices) == []
    assert unbalanced(pg_map, devices) == []
    by_id = {device.device_id: device for device in devices}
    for primary, secondary in pg_map.values():
        if primary is None or secondary is None:
            continue
        first, second = by_id[primary], by_id[secondary]
        assert first.sds_id != second.sds_id
        assert failure_domain(first) != failure_domain(second)


# --- fixed cases -----------------------------------------------------------------------


def test_two_sdss_hold_every_pg_and_share_primaries() -> None:
    devices = sds(1, 100) + sds(2, 100)
    pg_map = compute_map(64, devices)
    check(pg_map, devices)
    assert sorted(pg_map) == list(range(64))
    assert all(set(pair) == {10, 20} for pair in pg_map.values())
    assert primaries_per_device(pg_map) == {10: 32, 20: 32}


def test_two_sdss_of_different_sizes_each_hold_every_pg() -> None:
    # One domain can hold at most one copy of a PG: the bigger SDS is capped.
    devices = sds(1, 1000) + sds(2, 10)
    assert ideal_copies(50, devices) == {10: 50.0, 20: 50.0}
    check(compute_map(50, devices), devices)


def test_three_sdss_in_three_fault_sets() -> None:
    devices = sds(1, 100, fault_set=1) + sds(2, 100, fault_set=2) + sds(3, 100, fault_set=3)
    pg_map = compute_map(300, devices)
    check(pg_map, devices)
    assert copies_per_device(pg_map) == {10: 200, 20: 200, 30: 200}
    pairs = Counter(frozenset(pair) for pair in pg_map.values())
    assert set(pairs) == {frozenset({10, 20}), frozenset({10, 30}), frozenset({20, 30})}


def test_two_fault_sets_of_two_sdss_each() -> None:
    devices = (
        sds(1, 100, fault_set=7)
        + sds(2, 100, fault_set=7)
        + sds(3, 100, fault_set=8)
        + sds(4, 100, fault_set=8)
    )
    pg_map = compute_map(256, devices)
    check(pg_map, devices)
    fault_set = {device.device_id: device.fault_set_id for device in devices}
    for primary, secondary in pg_map.values():
        assert {fault_set[primary], fault_set[secondary]} == {7, 8}  # type: ignore[index]
    assert copies_per_device(pg_map) == {10: 128, 20: 128, 30: 128, 40: 128}


def test_sds_without_fault_set_is_its_own_domain_next_to_fault_sets() -> None:
    devices = sds(1, 100, fault_set=1) + sds(2, 100, fault_set=1) + sds(3, 200)
    assert ideal_copies(100, devices) == {10: 50.0, 20: 50.0, 30: 100.0}
    pg_map = compute_map(100, devices)
    check(pg_map, devices)
    assert all(30 in pair for pair in pg_map.values())


def test_skewed_capacities_are_balanced_by_capacity() -> None:
    devices = sds(1, 1, 2) + sds(2, 3) + sds(3, 4, 4) + sds(4, 6)
    pg_count = 1000
    ideal = ideal_copies(pg_count, devices)
    assert sum(ideal.values()) == pytest.approx(2 * pg_count)
    assert ideal[10] == pytest.approx(2 * pg_count * 1 / 20)
    pg_map = compute_map(pg_count, devices)
    check(pg_map, devices)
    copies = copies_per_device(pg_map)
    for device_id, share in ideal.items():
        assert abs(copies[device_id] - share) <= 1  # a fresh map is near its rounded ideal


def test_a_big_domain_is_capped_and_the_rest_water_filled() -> None:
    devices = sds(1, 50, 50, fault_set=1) + sds(2, 10) + sds(3, 30)
    pg_count = 400
    ideal = ideal_copies(pg_count, devices)
    assert ideal == {10: 200.0, 11: 200.0, 20: 100.0, 30: 300.0}
    pg_map = compute_map(pg_count, devices)
    check(pg_map, devices)
    # The capped domain holds a copy of (nearly) every PG: its devices are at their
    # ideal within the tolerance, which second copies spread over partners may use.
    without = [pg for pg, pair in pg_map.items() if not {10, 11} & set(pair)]
    assert len(without) <= copy_tolerance(200.0), without


@pytest.mark.parametrize(("n", "pg_count"), [(4, 32), (6, 128), (10, 1024), (24, 4096)])
def test_second_copies_spread_over_partners(n: int, pg_count: int) -> None:
    """The PGs of a device pair with every other domain about equally: a lost device
    is rebuilt from all the survivors, not from one partner (many-to-many)."""
    devices = [DeviceInfo(i, i, i, 100 * GiB) for i in range(1, n + 1)]
    pg_map = compute_map(pg_count, devices)
    check(pg_map, devices)
    partners: dict[int, dict[int, int]] = {d.device_id: {} for d in devices}
    for p, sec in pg_map.values():
        assert p is not None and sec is not None
        partners[p][sec] = partners[p].get(sec, 0) + 1
        partners[sec][p] = partners[sec].get(p, 0) + 1
    for device, counts in partners.items():
        assert len(counts) == n - 1, (device, counts)  # pairs with every other device
        fair = sum(counts.values()) / (n - 1)
        assert max(counts.values()) <= fair + 2 and min(counts.values()) >= fair - 2, (
            device,
            counts,
        )


def test_zero_capacity_devices_get_nothing() -> None:
    devices = sds(1, 100, 0) + sds(2, 100) + sds(3, 0)
    pg_map = compute_map(32, devices)
    check(pg_map, devices)
    copies = copies_per_device(pg_map)
    assert copies[11] == copies[30] == 0


@pytest.mark.parametrize(
    "devices",
    [
        [],
        sds(1, 100, 100),
        sds(1, 100, fault_set=1) + sds(2, 100, fault_set=1),
        sds(1, 100) + sds(2, 0),
    ],
    ids=["no devices", "one sds", "one fault set", "one sds with capacity"],
)
def test_fewer_than_two_domains_leave_pgs_unplaced(devices: list[DeviceInfo]) -> None:
    previous = compute_map(16, sds(8, 100) + sds(9, 100))
    for before in (None, previous):
        pg_map = compute_map(16, devices, before)
        assert pg_map == dict.fromkeys(range(16), (None, None))
        assert validate_map(pg_map, devices) == []
        assert set(ideal_copies(16, devices).values()) <= {0.0}


def test_unplaced_map_is_placed_once_capacity_arrives() -> None:
    empty = compute_map(16, sds(1, 100))
    devices = sds(1, 100) + sds(2, 100)
    check(compute_map(16, devices, empty), devices)


def test_a_device_removed_keeps_every_copy_on_the_survivors() -> None:
    devices = sds(1, 100) + sds(2, 100) + sds(3, 100) + sds(4, 100, 100)
    before = compute_map(512, devices)
    check(before, devices)
    survivors = [device for device in devices if device.device_id != 41]
    after = compute_map(512, survivors, before)
    check(after, survivors)
    lost = copies_per_device(before)[41]
    for pg, pair in before.items():
        kept = set(pair) - {41}
        assert kept <= set(after[pg])
    assert moved(before, after) == lost


def test_adding_an_sds_moves_only_its_share() -> None:
    devices = [DeviceInfo(i, i, None, (1 + i % 4) * GiB) for i in range(40)]
    before = compute_map(1024, devices)
    check(before, devices)
    grown = [*devices, DeviceInfo(40, 40, None, 2 * GiB)]
    after = compute_map(1024, grown, before)
    check(after, grown)
    share = ideal_copies(1024, grown)[40]
    assert copies_per_device(after)[40] <= moved(before, after) <= share + copy_tolerance(share)


def test_adding_to_a_thousand_sdss_moves_about_one_share() -> None:
    devices = [DeviceInfo(i, i, i % 10 if i % 3 else None, GiB << (i % 3)) for i in range(1000)]
    before = compute_map(4096, devices)
    check(before, devices)
    grown = [*devices, DeviceInfo(1000, 1000, None, 2 * GiB)]
    after = compute_map(4096, grown, before)
    check(after, grown)
    share = ideal_copies(4096, grown)[1000]
    assert moved(before, after) <= share + copy_tolerance(share)


def test_a_valid_map_is_kept_as_it_is() -> None:
    devices = sds(1, 3, fault_set=1) + sds(2, 5, 1) + sds(3, 2, fault_set=2) + sds(4, 7)
    pg_map = compute_map(333, devices)
    assert compute_map(333, devices, pg_map) == pg_map


def test_output_depends_only_on_the_input() -> None:
    devices = sds(1, 3, 4, fault_set=1) + sds(2, 5) + sds(3, 2, 9, fault_set=2) + sds(4, 7)
    first = compute_map(500, devices)
    assert compute_map(500, devices) == first
    assert compute_map(500, list(reversed(devices))) == first


def test_previous_copies_in_one_domain_are_split() -> None:
    # The two SDSs have been put in one fault set since the previous map was made.
    devices = sds(1, 100, fault_set=1) + sds(2, 100, fault_set=1) + sds(3, 200)
    previous: dict[int, PgAssignment] = {pg: (10, 20) for pg in range(20)}
    pg_map = compute_map(20, devices, previous)
    check(pg_map, devices)
    assert all(10 in pair or 20 in pair for pair in pg_map.values())


def test_pg_count_zero() -> None:
    assert compute_map(0, sds(1, 1) + sds(2, 1)) == {}


@pytest.mark.parametrize(
    "devices",
    [
        [DeviceInfo(1, 1, None, GiB), DeviceInfo(1, 2, None, GiB)],
        [DeviceInfo(1, 1, None, -1), DeviceInfo(2, 2, None, GiB)],
        [DeviceInfo(1, 1, 5, GiB), DeviceInfo(2, 1, None, GiB), DeviceInfo(3, 2, None, GiB)],
    ],
    ids=["duplicate device", "negative capacity", "sds in two fault sets"],
)
def test_inconsistent_devices_are_refused(devices: list[DeviceInfo]) -> None:
    with pytest.raises(ValueError):
        compute_map(8, devices)


def test_validate_map_names_each_violation() -> None:
    devices = sds(1, 100, 100) + sds(2, 100, fault_set=3) + sds(3, 100, fault_set=3) + sds(4, 0)
    good = compute_map(8, devices)
    assert validate_map(good, devices) == []
    cases: list[tuple[dict[int, PgAssignment], str]] = [
        ({**good, 0: (10, 11)}, "both copies on SDS 1"),
        ({**good, 0: (20, 30)}, "both copies in fault set 3"),
        ({**good, 0: (10, 99)}, "unknown device 99"),
        ({**good, 0: (10, 40)}, "device 40 without capacity"),
        ({**good, 0: (None, None)}, "PG 0 is unplaced"),
        ({**good, 0: (10, None)}, "PG 0 has a single copy"),
        ({pg + 1: pair for pg, pair in good.items()}, "PG ids are not 0..7"),
        ({pg: (10, 20) for pg in range(8)}, "device 10 holds 8 copies"),
        ({pg: (10, 20) for pg in range(8)}, "device 10 is primary for 8 of its 8 copies"),
    ]
    for pg_map, message in cases:
        problems = validate_map(pg_map, devices)
        assert any(message in problem for problem in problems), (message, problems)


# --- properties ------------------------------------------------------------------------


class ClusterChanges(RuleBasedStateMachine):
    """SDSs and devices come and go; after each change the recomputed map is checked.

    Movement bounds (the previous map is valid and balanced, see the module docstring):
    adding devices moves at most ``2 * (F + sum of the new devices' lower bounds)``
    copies, where F is the number of copies above their device's new upper bound;
    removing an SDS moves at most ``2 * (L + P)``, L its copies and P the copies the
    survivors lack to reach their new lower bounds. Usually it is about one share.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pg_count = 0
        self.devices: list[DeviceInfo] = []
        self.fault_sets: dict[int, int | None] = {}
        self.pg_map: dict[int, PgAssignment] = {}
        self.next_id = 1

    @initialize(pg_count=st.sampled_from([1, 2, 7, 64, 250]))
    def start(self, pg_count: int) -> None:
        self.pg_count = pg_count
        self.pg_map = compute_map(pg_count, [])

    def placed(self) -> bool:
        return any(primary is not None for primary, _ in self.pg_map.values())

    def bounds(self, devices: Sequence[DeviceInfo]) -> dict[int, tuple[float, float]]:
        ideal = ideal_copies(self.pg_count, devices)
        return {
            device_id: (share - copy_tolerance(share), share + copy_tolerance(share))
            for device_id, share in ideal.items()
        }

    def change(self, devices: list[DeviceInfo]) -> None:
        pg_map = compute_map(self.pg_count, devices, self.pg_map)
        check(pg_map, devices)
        assert compute_map(self.pg_count, devices, pg_map) == pg_map  # a fixpoint
        old_ids = {device.device_id for device in self.devices}
        new_ids = {device.device_id for device in devices}
        if self.placed() and any(pair[0] is not None for pair in pg_map.values()):
            copies = copies_per_device(self.pg_map)
            bounds = self.bounds(devices)
            if new_ids > old_ids:
                over = sum(max(0, copies[i] - floor(bounds[i][1] + EPSILON)) for i in old_ids)
                lower = sum(max(0, ceil(bounds[i][0] - EPSILON)) for i in new_ids - old_ids)
                assert moved(self.pg_map, pg_map) <= 2 * (over + lower)
            elif new_ids < old_ids:
                lost = sum(copies[i] for i in old_ids - new_ids)
                short = sum(max(0, ceil(bounds[i][0] - EPSILON) - copies[i]) for i in new_ids)
                assert moved(self.pg_map, pg_map) <= 2 * (lost + short)
        self.devices = devices
        self.pg_map = pg_map

    @rule(
        fault_set=st.none() | st.integers(1, 3),
        capacities=st.lists(st.integers(0, 16), min_size=1, max_size=3),
    )
    def add_sds(self, fault_set: int | None, capacities: list[int]) -> None:
        sds_id = self.next_id
        self.next_id += 1
        self.fault_sets[sds_id] = fault_set
        self.change(self.devices + sds(sds_id, *capacities, fault_set=fault_set))

    @precondition(lambda self: self.fault_sets)
    @rule(data=st.data(), capacity=st.integers(1, 16))
    def add_device(self, data: st.DataObject, capacity: int) -> None:
        sds_id = data.draw(st.sampled_from(sorted(self.fault_sets)))
        device = DeviceInfo(self.next_id * 10, sds_id, self.fault_sets[sds_id], capacity * GiB)
        self.next_id += 1
        self.change([*self.devices, device])

    @precondition(lambda self: self.fault_sets)
    @rule(data=st.data())
    def remove_sds(self, data: st.DataObject) -> None:
        sds_id = data.draw(st.sampled_from(sorted(self.fault_sets)))
        del self.fault_sets[sds_id]
        self.change([device for device in self.devices if device.sds_id != sds_id])

    @invariant()
    def every_pg_is_mapped(self) -> None:
        assert sorted(self.pg_map) == list(range(self.pg_count))


ClusterChanges.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cluster_changes = ClusterChanges.TestCase
