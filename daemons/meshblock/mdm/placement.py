"""PG placement: computes a storage pool's PG map.

A pool has ``pg_count`` placement groups (PGs); each PG has two copies, a primary and a
secondary, on devices of the pool. This module decides where they go. It is pure: no
I/O, no database, the same input always gives the same output.

Rules
-----
- The two copies of a PG are in different *failure domains*. A failure domain is a
  fault set, or an SDS that is in no fault set (``fault_set_id is None``). Two domains
  never share an SDS, so the two copies are always on two different SDSs too.
- Copies are balanced by capacity. :func:`ideal_copies` gives every device its target:
  its capacity's share of the ``2 * pg_count`` copies, water-filled so that no domain
  gets more than ``pg_count`` (it can hold at most one copy of each PG): the excess of a
  capped domain goes to the others in proportion to their capacity; inside a domain the
  domain's share is split by device capacity. Devices without capacity get nothing.
- Balance guarantee: every device holds ``ideal +- tolerance`` copies, where
  ``tolerance = max(TOLERANCE_COPIES, TOLERANCE_FRACTION * ideal)``, i.e.
  ``max(2, 5% of ideal)``; see :func:`copy_tolerance`. The algorithm works for any
  tolerance of at least one copy; the slack above that is what lets a small change of
  the device set leave most copies where they are.
- Partners are spread: a new PG's second copy goes to the device, among the least
  filled ones, that shares the fewest PGs with its first copy's device, so that each
  device's PGs pair with every other failure domain about equally and a lost device is
  rebuilt from all the survivors at once (:meth:`_RoomQueue.pick_spread`).
- Reads go to primaries, so every device is primary for half of its copies,
  ``+- PRIMARY_TOLERANCE`` (one).
- With fewer than two failure domains that have capacity no PG can be placed: every PG
  maps to ``(None, None)`` and :func:`validate_map` accepts that as the legal "no
  capacity" map. We return it rather than raise so that a pool can exist before its
  devices do. It is a *target* without copies: a caller whose pool already holds data
  must not apply it over the old map (a degraded pool keeps serving from its survivors
  until capacity comes back).

Algorithm
---------
Inside one domain devices are interchangeable as far as the rules go, so moving a copy
between two devices of one domain is always legal. :func:`compute_map` works in phases
on a map that starts as the previous one:

1. *Keep.* Every previous copy on a device that still has capacity stays, unless its PG
   already kept a copy in the same domain.
2. *Shed.* A device above its upper bound ``floor(ideal + tolerance)`` drops copies down
   to the bound, preferring PGs whose other copy is still in place.
3. *Fill.* Every missing copy goes to the least filled device (lowest
   ``(copies + 1) / ideal``) that is below its upper bound and outside the domain of the
   PG's other copy; PGs with no copy at all go first. A priority queue of domains, each
   with a queue of devices, makes each choice O(log devices). When the only devices with
   room are in the forbidden domain ``F``, a *swap* is made: a PG with no copy in ``F``
   (one exists, by counting) moves one copy into ``F`` and our PG takes its place.
4. *Pull.* A device below its lower bound ``ceil(ideal - tolerance)`` takes copies, one
   at a time, from the device most above its rounded target: a device of its own domain
   if one is above target (always legal), else a device elsewhere that holds a copy
   whose PG has no copy in the receiver's domain; failing that, through a two-move
   chain via a third device (which, by counting, always exists).
5. *Orient.* A PG keeps its previous primary if that copy stayed, else its surviving
   copy becomes primary (it has the data), else the device with fewer primaries relative
   to half its copies. Then devices outside ``half +- 1`` are repaired by flipping the
   PGs along a path of primary->secondary edges (found by breadth-first search) that
   ends at a device with room; the path always exists and never breaks another device.

Phases 2-4 move only what the bounds force, so a balanced map changes little when the
device set changes. Counting moved copies (a copy on a device it was not on; swapping
roles moves no data): adding devices lowers every other device's ideal and bounds, so
the only forced moves are the ``F`` copies above the new upper bounds and the new
devices' lower bounds ``L``: at most ``2 * (F + L)`` copies move (each refill may cost
one swap, each pull one chain) and usually about ``max(F, L)``, the new devices' share.
Removing an SDS raises the others' bounds: its copies are refilled, and the survivors'
copies move only to lift a survivor to its new lower bound. Without a previous map
phase 3 does all the work and every device ends within about one copy of its ideal.

Cost: O(pg_count * log(devices)) for the phases; each swap or chain is O(pg_count) and
each orientation repair O(device pairs that share a PG), and both are rare.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import inf

__all__ = [
    "COPIES",
    "PRIMARY_TOLERANCE",
    "TOLERANCE_COPIES",
    "TOLERANCE_FRACTION",
    "DeviceInfo",
    "PgAssignment",
    "compute_map",
    "copy_tolerance",
    "failure_domain",
    "ideal_copies",
    "validate_map",
]

COPIES = 2
"""Copies of each PG: a primary and a secondary (the algorithm is written for two)."""

TOLERANCE_COPIES = 2
"""A device's copy count may differ from its ideal by this many copies..."""

TOLERANCE_FRACTION = Fraction(1, 20)
"""...or by this fraction of its ideal (5%), whichever is larger."""

PRIMARY_TOLERANCE = 1

SPREAD_DOMAINS = 16
"""A PG's second copy is chosen among the least filled device of at most this many of
the least filled failure domains..."""

SPREAD_SLACK = 1.5
"""...whose fill is within this many copies of the least filled (and that stay within
their ideal, unless the least filled does not): the one that shares the fewest PGs
with the first copy's device (see :meth:`_Layout.fill`)."""
"""A device's primary count may differ from half its copy count by this much."""


@dataclass(frozen=True)
class DeviceInfo:
    """What placement needs to know about one device of the pool."""

    device_id: int
    sds_id: int
    fault_set_id: int | None  # None: the SDS is in no fault set (it is its own domain)
    capacity_bytes: int


PgAssignment = tuple[int | None, int | None]
"""(primary device_id, secondary device_id); (None, None) when the PG is unplaced."""

Domain = tuple[str, int]
"""A failure domain: ``("fs", fault_set_id)`` or ``("sds", sds_id)``."""


def failure_domain(device: DeviceInfo) -> Domain:
    """The failure domain of a device: its fault set, else its SDS."""
    if device.fault_set_id is not None:
        return ("fs", device.fault_set_id)
    return ("sds", device.sds_id)


def copy_tolerance(ideal: float) -> float:
    """How far a device's copy count may be from its ideal ``ideal``."""
    return max(float(TOLERANCE_COPIES), float(TOLERANCE_FRACTION) * ideal)


def ideal_copies(pg_count: int, devices: Sequence[DeviceInfo]) -> dict[int, float]:
    """The target number of PG copies of every device (0.0 when nothing can be placed).

    The values add up to ``2 * pg_count`` when at least two failure domains have
    capacity; no failure domain's values add up to more than ``pg_count``.
    """
    numerators, denominator = _ideals(pg_count, devices)
    return {device_id: numerator / denominator for device_id, numerator in numerators.items()}


def compute_map(
    pg_count: int,
    devices: Sequence[DeviceInfo],
    previous: Mapping[int, PgAssignment] | None = None,
) -> dict[int, PgAssignment]:
    """The PG map of a pool: PG -> (primary device_id, secondary device_id).

    ``previous`` is the pool's current map, if any: its copies stay where they are as
    far as the rules and the balance tolerance allow. PGs of ``previous`` outside
    ``range(pg_count)`` are ignored, PGs missing from it are placed afresh. Raises
    ``ValueError`` for an inconsistent device list (duplicate ids, negative capacity,
    one SDS in two fault sets) or a negative ``pg_count``.
    """
    plan = _Plan(pg_count, devices)
    if not plan.placeable:
        return dict.fromkeys(range(pg_count), (None, None))
    layout = _Layout(plan)
    if previous:
        layout.keep(previous)
        layout.shed()
    layout.fill()
    layout.pull()
    return layout.orient(previous or {})


def validate_map(pg_map: Mapping[int, PgAssignment], devices: Sequence[DeviceInfo]) -> list[str]:
    """Every way ``pg_map`` breaks the placement rules, in words; ``[]`` when it is valid.

    The map's PG count is ``len(pg_map)``. Checks: PG ids are ``0..len-1``; every PG is
    placed (unless fewer than two failure domains have capacity, where every PG must be
    ``(None, None)``); copies are on known devices with capacity, on two SDSs in two
    failure domains; copy counts are within the tolerance of :func:`ideal_copies` and
    primary counts within ``PRIMARY_TOLERANCE`` of half the copy count. Raises
    ``ValueError`` for an inconsistent device list, as :func:`compute_map` does.
    """
    pg_count = len(pg_map)
    plan = _Plan(pg_count, devices)
    problems: list[str] = []
    if set(pg_map) != set(range(pg_count)):
        problems.append(f"PG ids are not 0..{pg_count - 1}")
    by_id = {device.device_id: device for device in devices}
    copies = dict.fromkeys(by_id, 0)
    primaries = dict.fromkeys(by_id, 0)
    for pg in sorted(pg_map):
        primary, secondary = pg_map[pg]
        if primary is None and secondary is None:
            if plan.placeable:
                problems.append(f"PG {pg} is unplaced")
            continue
        if primary is None or secondary is None:
            problems.append(f"PG {pg} has a single copy: {pg_map[pg]}")
            continue
        placed = [by_id.get(primary), by_id.get(secondary)]
        for device_id, device in zip((primary, secondary), placed, strict=True):
            if device is None:
                problems.append(f"PG {pg} has a copy on unknown device {device_id}")
            elif device.capacity_bytes <= 0:
                problems.append(f"PG {pg} has a copy on device {device_id} without capacity")
        first, second = placed
        if first is None or second is None:
            continue
        copies[primary] += 1
        copies[secondary] += 1
        primaries[primary] += 1
        if first.sds_id == second.sds_id:
            problems.append(f"PG {pg} has both copies on SDS {first.sds_id}")
        elif failure_domain(first) == failure_domain(second):
            problems.append(f"PG {pg} has both copies in fault set {first.fault_set_id}")
    if not plan.placeable:
        return problems
    for index, device in enumerate(plan.devices):
        device_id = device.device_id
        count = copies[device_id]
        if not plan.lower[index] <= count <= plan.upper[index]:
            ideal = plan.ideal[index]
            problems.append(
                f"device {device_id} holds {count} copies, ideal {ideal:.2f} "
                f"+- {copy_tolerance(ideal):.2f}"
            )
        if abs(2 * primaries[device_id] - count) > 2 * PRIMARY_TOLERANCE:
            problems.append(
                f"device {device_id} is primary for {primaries[device_id]} of its {count} copies"
            )
    return problems


# --- capacity shares ------------------------------------------------------------------


def _check_devices(devices: Sequence[DeviceInfo]) -> None:
    seen: set[int] = set()
    fault_sets: dict[int, int | None] = {}
    for device in devices:
        if device.device_id in seen:
            raise ValueError(f"device {device.device_id} is listed twice")
        seen.add(device.device_id)
        if device.capacity_bytes < 0:
            raise ValueError(f"device {device.device_id} has a negative capacity")
        fault_set = fault_sets.setdefault(device.sds_id, device.fault_set_id)
        if fault_set != device.fault_set_id:
            raise ValueError(f"SDS {device.sds_id} has devices in two fault sets")


def _ideals(pg_count: int, devices: Sequence[DeviceInfo]) -> tuple[dict[int, int], int]:
    """Exact ideal copy counts by device id: numerators over one common denominator."""
    if pg_count < 0:
        raise ValueError(f"pg_count must not be negative, not {pg_count}")
    _check_devices(devices)
    capacity: dict[Domain, int] = {}
    for device in devices:
        if device.capacity_bytes > 0:
            domain = failure_domain(device)
            capacity[domain] = capacity.get(domain, 0) + device.capacity_bytes
    numerators = dict.fromkeys((device.device_id for device in devices), 0)
    if len(capacity) < COPIES:
        return numerators, 1
    # Water-filling: a domain whose proportional share reaches pg_count is capped there
    # and the rest is shared by the others; capping one only raises the others' shares.
    # A device of a capped domain D gets pg_count * capacity / capacity(D), one of the
    # others remaining * capacity / total (capacity of the uncapped domains).
    capped: set[Domain] = set()
    active = sorted(capacity)
    remaining = COPIES * pg_count
    total = 1
    while active:
        total = sum(capacity[domain] for domain in active)
        newly = [d for d in active if remaining * capacity[d] >= pg_count * total]
        if not newly:
            break
        capped.update(newly)
        remaining -= pg_count * len(newly)
        active = [domain for domain in active if domain not in capped]
    denominator = total if active else 1
    for domain in sorted(capped):
        denominator *= capacity[domain]
    for device in devices:
        if device.capacity_bytes > 0:
            domain = failure_domain(device)
            if domain in capped:
                scale = pg_count * (denominator // capacity[domain])
            else:
                scale = remaining * (denominator // total)
            numerators[device.device_id] = scale * device.capacity_bytes
    return numerators, denominator


class _Plan:
    """The devices that can take copies, their domains, ideals, targets and bounds.

    Devices are indexed ``0..n-1`` in device id order; domains ``0..m-1`` in sorted
    order. Ideals are exact: ``numerator[i] / denominator``. ``target`` is the ideal
    rounded so that the targets of a domain, and of all devices, add up to the rounded
    (integer) sums of their ideals: each target is within one copy of its ideal, so
    ``lower <= target <= upper``, and no domain's targets exceed ``pg_count``.
    """

    def __init__(self, pg_count: int, devices: Sequence[DeviceInfo]) -> None:
        numerators, denominator = _ideals(pg_count, devices)
        self.pg_count = pg_count
        self.devices = sorted(
            (device for device in devices if device.capacity_bytes > 0),
            key=lambda device: device.device_id,
        )
        domains = sorted({failure_domain(device) for device in self.devices})
        self.placeable = len(domains) >= COPIES
        domain_index = {domain: index for index, domain in enumerate(domains)}
        self.index = {device.device_id: i for i, device in enumerate(self.devices)}
        self.domain = [domain_index[failure_domain(device)] for device in self.devices]
        self.members: list[list[int]] = [[] for _ in domains]
        for i, domain in enumerate(self.domain):
            self.members[domain].append(i)
        self.numerator = [numerators[device.device_id] for device in self.devices]
        self.denominator = denominator
        self.ideal = [numerator / denominator for numerator in self.numerator]
        self.target = [0] * len(self.devices)
        running = 0
        for members in self.members:
            for i in members:
                before = (2 * running + denominator) // (2 * denominator)
                running += self.numerator[i]
                self.target[i] = (2 * running + denominator) // (2 * denominator) - before
        # In units of 1 / (scale * denominator): ideal +- max(copies, fraction * ideal).
        scale = TOLERANCE_FRACTION.denominator * denominator
        self.lower: list[int] = []
        self.upper: list[int] = []
        for numerator in self.numerator:
            ideal = TOLERANCE_FRACTION.denominator * numerator
            tolerance = max(TOLERANCE_COPIES * scale, TOLERANCE_FRACTION.numerator * numerator)
            self.lower.append(max(0, -((tolerance - ideal) // scale)))
            self.upper.append(min(pg_count, (ideal + tolerance) // scale))


# --- the map being built --------------------------------------------------------------


class _Layout:
    """A PG map under construction: PG -> the device indexes of its copies."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.domain = plan.domain
        self.copies: list[list[int]] = [[] for _ in range(plan.pg_count)]
        self.count = [0] * len(plan.devices)
        self.holds: list[set[int]] = [set() for _ in plan.devices]
        self._scan = 0  # where the search for a swap partner resumes

    def add(self, pg: int, i: int) -> None:
        self.copies[pg].append(i)
        self.holds[i].add(pg)
        self.count[i] += 1

    def remove(self, pg: int, i: int) -> None:
        self.copies[pg].remove(i)
        self.holds[i].discard(pg)
        self.count[i] -= 1

    def move(self, pg: int, source: int, destination: int) -> None:
        self.remove(pg, source)
        self.add(pg, destination)

    def other(self, pg: int, i: int) -> int:
        """The device of the PG's copy that is not on ``i`` (the map is complete)."""
        first, second = self.copies[pg]
        return second if first == i else first

    # phase 1
    def keep(self, previous: Mapping[int, PgAssignment]) -> None:
        """Keep every previous copy on a live device, one per domain and PG."""
        index = self.plan.index
        for pg, (primary, secondary) in previous.items():
            if not 0 <= pg < self.plan.pg_count:
                continue
            first = index.get(primary) if primary is not None else None
            second = index.get(secondary) if secondary is not None else None
            if first is not None:
                self.add(pg, first)
                if second is not None and self.domain[second] != self.domain[first]:
                    self.add(pg, second)
            elif second is not None:
                self.add(pg, second)

    # phase 2
    def shed(self) -> None:
        """Bring every device down to its upper bound."""
        for i, upper in enumerate(self.plan.upper):
            excess = self.count[i] - upper
            if excess <= 0:
                continue
            ranked = sorted(self.holds[i], key=lambda pg: (len(self.copies[pg]), pg))
            for pg in ranked[-excess:]:
                self.remove(pg, i)

    # phase 3
    def fill(self) -> None:
        """Give every PG its missing copies, never above a device's upper bound.

        A second copy goes, among the few least filled devices outside the first
        copy's domain (within ``SPREAD_SLACK`` copies of the least filled), to the one
        sharing the fewest PGs with the first copy's device: the PGs of a device pair
        with all the others, so a lost device is rebuilt from every survivor
        (many-to-many) rather than from one partner.
        """
        # shared[a][b]: the PGs with copies on devices a and b (both ways round)
        self.shared: list[dict[int, int]] = [{} for _ in self.count]
        for copies in self.copies:
            if len(copies) == 2:
                self._pair(*copies)
        queue = _RoomQueue(self)
        empty = [pg for pg, copies in enumerate(self.copies) if not copies]
        single = [pg for pg, copies in enumerate(self.copies) if len(copies) == 1]
        for pg in empty:
            self._place(pg, queue)
            self._place(pg, queue)
        for pg in single:
            self._place(pg, queue)

    def _pair(self, a: int, b: int) -> None:
        shared = self.shared
        shared[a][b] = shared[a].get(b, 0) + 1
        shared[b][a] = shared[b].get(a, 0) + 1

    def _place(self, pg: int, queue: _RoomQueue) -> None:
        copies = self.copies[pg]
        partner = copies[0] if copies else None
        if partner is None:
            i = queue.pick(-1)
        else:
            i = queue.pick_spread(self.domain[partner], self.shared[partner])
        if i is None:
            i = self._swap(-1 if partner is None else self.domain[partner], queue)
        self.add(pg, i)
        queue.update(i)
        if partner is not None:
            self._pair(partner, i)

    def _swap(self, forbidden: int, queue: _RoomQueue) -> int:
        """Free a slot outside ``forbidden`` when only ``forbidden`` has room.

        Counting shows the swap exists: the devices outside ``forbidden`` are full,
        and their upper bounds add up to at least ``pg_count`` copies, so some complete
        PG has both copies outside it. One of them moves into ``forbidden``.
        """
        destination = queue.pick(-1)
        if destination is None or self.domain[destination] != forbidden:
            raise AssertionError("placement: no room for a missing copy")
        pg_count = self.plan.pg_count
        for step in range(pg_count):
            pg = (self._scan + step) % pg_count
            copies = self.copies[pg]
            if len(copies) == 2 and all(self.domain[i] != forbidden for i in copies):
                self._scan = pg + 1
                source = copies[1]
                self.move(pg, source, destination)
                queue.update(destination)
                return source
        raise AssertionError("placement: no PG to swap with")

    # phase 4
    def pull(self) -> None:
        """Bring every device up to its lower bound, taking from the most loaded."""
        donors = _DonorQueue(self)
        for i, lower in enumerate(self.plan.lower):
            while self.count[i] < lower:
                self._pull_one(i, donors)

    def _pull_one(self, receiver: int, donors: _DonorQueue) -> None:
        target = self.plan.target
        domain = self.domain[receiver]
        siblings = [
            i for i in self.plan.members[domain] if self.count[i] > target[i] and i != receiver
        ]
        if siblings:
            source = max(siblings, key=lambda i: (self.count[i] - target[i], -i))
            self.move(next(iter(self.holds[source])), source, receiver)
            donors.update(source)
            return
        # No device of the receiver's domain is above target, so the domain is below
        # its target: devices elsewhere are above theirs, and some PGs have no copy in
        # the domain.
        found = donors.first(lambda source: self._free_copy(source, domain))
        if found is not None:
            source, pg = found
            self.move(pg, source, receiver)
            donors.update(source)
            return
        # Every copy on a donor belongs to a PG that has its other copy in the domain.
        # Some other device holds a copy of a PG without one there: it passes that copy
        # to the receiver and takes one from the donor in exchange.
        source = donors.top()
        for via, held in enumerate(self.holds):
            if via == source or self.domain[via] == domain or not held:
                continue
            free = self._free_copy(via, domain)
            if free is not None:
                self.move(next(iter(self.holds[source])), source, via)
                self.move(free, via, receiver)
                donors.update(source)
                return
        raise AssertionError("placement: nothing to pull")

    def _free_copy(self, i: int, domain: int) -> int | None:
        """A PG with a copy on ``i`` and none in ``domain``."""
        for pg in self.holds[i]:
            if self.domain[self.other(pg, i)] != domain:
                return pg
        return None

    # phase 5
    def orient(self, previous: Mapping[int, PgAssignment]) -> dict[int, PgAssignment]:
        """Choose each PG's primary, keeping previous roles, half +- 1 per device."""
        plan = self.plan
        degree = self.count
        primaries = [0] * len(degree)
        primary = [-1] * plan.pg_count
        for pg, copies in enumerate(self.copies):
            for device_id in previous.get(pg, (None, None)):
                i = plan.index.get(device_id) if device_id is not None else None
                if i is not None and i in copies:
                    primary[pg] = i
                    primaries[i] += 1
                    break
        for pg, copies in enumerate(self.copies):
            if primary[pg] < 0:
                chosen = min(copies, key=lambda i: (2 * primaries[i] - degree[i], i))
                primary[pg] = chosen
                primaries[chosen] += 1
        roles = _Roles(self, primary)
        roles.balance()
        ids = [device.device_id for device in plan.devices]
        return {
            pg: (ids[primary[pg]], ids[self.other(pg, primary[pg])]) for pg in range(plan.pg_count)
        }


class _Roles:
    """Primary roles as a directed multigraph on devices: PG = primary -> secondary.

    ``forward[x][y]`` and ``backward[y][x]`` are the same set: the PGs whose primary is
    ``x`` and secondary ``y``. Searching paths on devices rather than PGs keeps a search
    at O(device pairs) however many PGs a pair shares.
    """

    def __init__(self, layout: _Layout, primary: list[int]) -> None:
        self.degree = layout.count
        self.primary = primary
        self.primaries = [0] * len(self.degree)
        self.forward: list[dict[int, set[int]]] = [{} for _ in self.degree]
        self.backward: list[dict[int, set[int]]] = [{} for _ in self.degree]
        for pg, first in enumerate(primary):
            self._link(pg, first, layout.other(pg, first))

    def _link(self, pg: int, primary: int, secondary: int) -> None:
        pgs = self.forward[primary].get(secondary)
        if pgs is None:
            pgs = self.forward[primary][secondary] = self.backward[secondary][primary] = set()
        pgs.add(pg)
        self.primary[pg] = primary
        self.primaries[primary] += 1

    def _flip(self, primary: int, secondary: int) -> None:
        pgs = self.forward[primary][secondary]
        pg = min(pgs)
        pgs.discard(pg)
        if not pgs:
            del self.forward[primary][secondary]
            del self.backward[secondary][primary]
        self.primaries[primary] -= 1
        self._link(pg, secondary, primary)

    def balance(self) -> None:
        """Bring every device's primaries within PRIMARY_TOLERANCE of half its copies."""
        primaries, degree = self.primaries, self.degree
        limit = 2 * PRIMARY_TOLERANCE
        for i in range(len(degree)):
            # Too many: pass one along primary->secondary edges to a device with fewer
            # than half. The devices reachable that way hold the primaries of all their
            # PGs, so not all of them can have half or more: one is reachable. The path's
            # inner devices keep their counts, its end stays within the tolerance.
            while 2 * primaries[i] - degree[i] > limit:
                path = self._path(i, self.forward, lambda j: 2 * primaries[j] < degree[j])
                for x, y in path:
                    self._flip(x, y)
        for i in range(len(degree)):
            # Too few: the mirror image, along secondary->primary edges.
            while degree[i] - 2 * primaries[i] > limit:
                path = self._path(i, self.backward, lambda j: 2 * primaries[j] > degree[j])
                for y, x in path:
                    self._flip(x, y)

    @staticmethod
    def _path(
        start: int, graph: list[dict[int, set[int]]], wanted: Callable[[int], bool]
    ) -> list[tuple[int, int]]:
        """The edges of a shortest path in ``graph`` from ``start`` to a wanted device."""
        parent = {start: start}
        todo = deque([start])
        while todo:
            i = todo.popleft()
            for j in graph[i]:
                if j in parent:
                    continue
                parent[j] = i
                if wanted(j):
                    path = []
                    while j != start:
                        path.append((parent[j], j))
                        j = parent[j]
                    return path
                todo.append(j)
        raise AssertionError("placement: no path to rebalance primaries")


class _RoomQueue:
    """Devices below their upper bound, least filled first, by domain.

    One heap per domain of ``(fill, device, count)`` and one heap of domains by their
    best fill. Entries are never updated in place: a changed device pushes a new entry,
    and entries whose count is no longer the device's are dropped when they surface;
    a domain is queued again only when its best fill changes (``queued``), so the
    forbidden domain costs one skipped entry per pick.
    """

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.devices: list[list[tuple[float, int, int]]] = [[] for _ in layout.plan.members]
        self.domains: list[tuple[float, int]] = []
        self.queued: list[float | None] = [None] * len(self.devices)
        # SPREAD_SLACK copies in fill of each device (pick_spread's bound; a pool of 0
        # PGs has ideals of 0 and places nothing)
        self.slack = [SPREAD_SLACK / ideal if ideal else inf for ideal in layout.plan.ideal]
        for i in range(len(layout.count)):
            self._push_device(i)
        for domain in range(len(self.devices)):
            self._push_domain(domain)

    def _push_device(self, i: int) -> None:
        layout = self.layout
        count = layout.count[i]
        if count < layout.plan.upper[i]:
            fill = (count + 1) / layout.plan.ideal[i]
            heapq.heappush(self.devices[layout.domain[i]], (fill, i, count))

    def _best(self, domain: int) -> float | None:
        heap = self.devices[domain]
        count = self.layout.count
        while heap and count[heap[0][1]] != heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _push_domain(self, domain: int) -> None:
        best = self._best(domain)
        if best != self.queued[domain]:
            self.queued[domain] = best
            if best is not None:
                heapq.heappush(self.domains, (best, domain))

    def update(self, i: int) -> None:
        """Device ``i``'s count changed (:meth:`_push_device` and :meth:`_push_domain`
        in one: this runs for every copy placed)."""
        layout = self.layout
        count = layout.count
        n = count[i]
        domain = layout.domain[i]
        heap = self.devices[domain]
        if n < layout.plan.upper[i]:
            heapq.heappush(heap, ((n + 1) / layout.plan.ideal[i], i, n))
        while heap and count[heap[0][1]] != heap[0][2]:
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        if best != self.queued[domain]:
            self.queued[domain] = best
            if best is not None:
                heapq.heappush(self.domains, (best, domain))

    def pick_spread(self, forbidden: int, shared: Mapping[int, int]) -> int | None:
        """Like :meth:`pick`, but among the least filled device of each of the
        ``SPREAD_DOMAINS`` least filled domains outside ``forbidden`` whose fill is
        within ``SPREAD_SLACK`` copies of the best, the one with the least ``shared``
        (PGs it already shares with the partner copy's device, by device index)."""
        domains, queued, devices, slack = self.domains, self.queued, self.devices, self.slack
        pop = heapq.heappop
        popped: list[tuple[float, int]] = []
        candidates: list[tuple[int, float, int]] = []
        best: float | None = None
        while domains and len(candidates) < SPREAD_DOMAINS:
            entry = pop(domains)
            fill, domain = entry
            if queued[domain] != fill:
                continue  # superseded by a newer entry, or full
            popped.append(entry)
            if domain == forbidden:
                continue
            i = devices[domain][0][1]
            if best is None:
                best = fill
            elif fill > best + slack[i]:
                break
            elif fill > 1.0:
                continue  # above its ideal while the best is not: keep the water level
            candidates.append((shared.get(i, 0), fill, i))
        for entry in popped:
            heapq.heappush(domains, entry)
        return min(candidates)[2] if candidates else None

    def pick(self, forbidden: int) -> int | None:
        """The least filled device with room outside domain ``forbidden``, if any."""
        skipped = []
        found = None
        while self.domains:
            best, domain = self.domains[0]
            if self.queued[domain] != best:
                heapq.heappop(self.domains)  # superseded by a newer entry, or full
            elif domain == forbidden:
                skipped.append(heapq.heappop(self.domains))
            else:
                found = self.devices[domain][0][1]
                break
        for entry in skipped:
            heapq.heappush(self.domains, entry)
        return found


class _DonorQueue:
    """Devices above their target, most above first (lazy entries, as in _RoomQueue)."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.heap: list[tuple[int, int, int]] = []
        for i in range(len(layout.count)):
            self.update(i)

    def update(self, i: int) -> None:
        count = self.layout.count[i]
        excess = count - self.layout.plan.target[i]
        if excess > 0:
            heapq.heappush(self.heap, (-excess, i, count))

    def _clean(self) -> None:
        count = self.layout.count
        while self.heap and count[self.heap[0][1]] != self.heap[0][2]:
            heapq.heappop(self.heap)

    def top(self) -> int:
        self._clean()
        return self.heap[0][1]

    def first(self, choose: Callable[[int], int | None]) -> tuple[int, int] | None:
        """The first donor, most above target first, for which ``choose`` finds a PG."""
        popped = []
        found = None
        while self.heap:
            self._clean()
            if not self.heap:
                break
            entry = heapq.heappop(self.heap)
            popped.append(entry)
            pg = choose(entry[1])
            if pg is not None:
                found = (entry[1], pg)
                break
        for entry in popped:
            heapq.heappush(self.heap, entry)
        return found
