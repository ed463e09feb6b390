"""What stopping SDSs, or a planned change, would do to the PGs.

``GET /api/v1/sds/ok-to-stop`` (``meshctl sds ok-to-stop``) and the dry runs
(``?dry_run=true``) of maintenance, drain, removal and pool settings answer from here.

**Copies that count.** A PG's up-to-date copies are those that serve it: both copies
of a ``clean`` PG, the primary alone of a ``degraded``, ``resyncing`` or
``rebuilding`` one (the secondary is stale or still being filled), none of an
``inactive`` one. A copy on an SDS that is disconnected, in maintenance, or on a
failed device does not serve. The states are not taken from the table as stored but
as the failure checks would decide them (:func:`meshblock.mdm.failures.decide`), once
with the SDSs as they are and once with the named SDSs down as well: the same
transitions the MDM applies when they stop (a PG resyncing or rebuilding from a
stopped primary goes inactive, a clean one whose copy stops goes degraded).

Of the PGs with a copy on the named SDSs, those not ``clean`` now are counted
(``pgs_with_copy_not_clean``): a rolling restart waits for none before it stops the
next SDS (its resync, or a rebuild onto it, is over).

**Safe** means: no PG with a copy on the named SDSs is left without an up-to-date
copy. Such a PG is *unavailable* after the stop (IO to it waits), also when it has
none already (it is then marked ``already``). A PG left with one copy is reported too
(*single copy*): safe, but one more failure makes it unavailable. PGs without a copy
on the named SDSs are only counted (``already_unavailable``, ``already_single_copy``).

**Bytes and time** are estimates. A volume's data is spread evenly over the PGs its
chunks land on (:func:`meshblock.chunks.pgs_of_volume`): a thick volume counts its
size, a thin one the chunks its SDSs report. A PG's copy is read from its primary's
device, and the pool's throttle (``rebuild_bandwidth_mibps`` for resyncs and
rebuilds, ``rebalance_bandwidth_mibps`` for moves) paces each source device on its
own, so the estimated time is that of the busiest source device at the throttle: a
lower bound (disks, the network and client IO may be slower), none when the throttle
is 0 (unlimited).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.chunks import pgs_of_volume
from meshblock.mdm import pgtable
from meshblock.mdm.capacity import COPIES, volume_allocated
from meshblock.mdm.failures import Conditions, PoolDevice, decide, load_devices
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import (
    Device,
    DeviceState,
    PgState,
    Sds,
    SdsMode,
    StoragePool,
    Volume,
    VolumeState,
)
from meshblock.mdm.pgtable import PgRow
from meshblock.mdm.progress import CopyProgress
from meshblock.sizes import MiB

LISTED = 100
"""At most this many PGs (and volumes) are listed per kind; ``count`` says how many."""

Key = tuple[int, int]  # (pool id, pg)


def serving(state: PgState) -> int:
    """How many up-to-date copies serve a PG in ``state``."""
    if state == PgState.INACTIVE:
        return 0
    return 2 if state == PgState.CLEAN else 1


@dataclass(frozen=True)
class PgOutcome:
    pool_id: int
    pg: int
    now: int  # serving copies now
    after: int  # serving copies once the named SDSs are down


@dataclass
class Assessment:
    """:func:`assess`'s answer: the PGs with a copy on the stopped SDSs left with no
    serving copy (``unavailable``) or one (``single_copy``), and how many PGs without
    a copy there have none or one already."""

    unavailable: list[PgOutcome] = field(default_factory=list)
    single_copy: list[PgOutcome] = field(default_factory=list)
    touched: int = 0
    not_clean: int = 0
    already_unavailable: int = 0
    already_single_copy: int = 0

    @property
    def safe(self) -> bool:
        return not self.unavailable


def _states(
    rows: Sequence[PgRow], devices: Mapping[int, PoolDevice], seen: Conditions
) -> dict[Key, PgState]:
    out = {(r.pool_id, r.pg): r.state for r in rows}
    for ch in decide(rows, devices, seen).changes:
        out[(ch.after.pool_id, ch.after.pg)] = ch.after.state
    return out


def assess(
    rows: Sequence[PgRow],
    devices: Mapping[int, PoolDevice],
    seen: Conditions,
    stopping: Collection[int],
) -> Assessment:
    """What stopping the SDSs ``stopping`` (ids) does to the PGs, pure (see the
    module's text). ``seen``: the SDSs and devices as they are (:func:`conditions`);
    nothing is rebuilt away from anything in either view (``gone`` is ignored)."""
    stop = frozenset(stopping)
    base = replace(seen, gone=frozenset())
    worse = replace(
        base,
        down=base.down | stop,
        connected=base.connected - stop,
        usable=base.usable - stop,
    )
    now, after = _states(rows, devices, base), _states(rows, devices, worse)
    out = Assessment()
    for row in rows:
        if row.primary is None and row.secondary is None:
            continue  # not placed: no copy to lose
        key = (row.pool_id, row.pg)
        before_n, after_n = serving(now[key]), serving(after[key])
        touched = any(
            devices[d].sds_id in stop for d in (row.primary, row.secondary) if d is not None
        )
        if not touched:
            out.already_unavailable += before_n == 0
            out.already_single_copy += before_n == 1
            continue
        out.touched += 1
        out.not_clean += now[key] != PgState.CLEAN
        outcome = PgOutcome(row.pool_id, row.pg, before_n, after_n)
        if after_n == 0:
            out.unavailable.append(outcome)
        elif after_n == 1:
            out.single_copy.append(outcome)
    return out


def pg_bytes(pg_count: int, volumes: Iterable[tuple[int, int, int]]) -> list[int]:
    """Estimated bytes of one copy of each PG of a pool: each volume, given as
    ``(vtree id, size in bytes, bytes of one copy)``, spread evenly over the PGs its
    chunks land on (a run of PGs modulo ``pg_count``)."""
    diff = [0.0] * (pg_count + 1)
    for vtree_id, size_bytes, copy_bytes in volumes:
        first, count = pgs_of_volume(vtree_id, size_bytes, pg_count)
        if count <= 0 or copy_bytes <= 0:
            continue
        share = copy_bytes / count
        end = first + count
        diff[first] += share
        if end <= pg_count:
            diff[end] -= share
        else:  # wraps around
            diff[pg_count] -= share
            diff[0] += share
            diff[end - pg_count] -= share
    out, running = [], 0.0
    for pg in range(pg_count):
        running += diff[pg]
        out.append(round(running))
    return out


def copy_seconds(per_source: Mapping[int, int], bandwidth_mibps: int) -> float | None:
    """Seconds to copy ``per_source`` (bytes per source device) when each device is
    paced to ``bandwidth_mibps`` on its own: the busiest device's time. None when
    unthrottled (0) and there is something to copy."""
    busiest = max(per_source.values(), default=0)
    if busiest <= 0:
        return 0.0
    if bandwidth_mibps <= 0:
        return None
    return round(busiest / (bandwidth_mibps * MiB), 1)


# -- reading the store -----------------------------------------------------------------


async def conditions(s: AsyncSession, live: Liveness) -> Conditions:
    """The SDSs and devices as they are: down (not heartbeating, or in maintenance),
    connected, usable (connected and not draining) and the failed devices."""
    modes = dict((await s.execute(select(Sds.id, Sds.mode))).all())
    up = {i for i in modes if live.state("sds", i) == "connected"}
    connected = frozenset(i for i in up if modes[i] != SdsMode.MAINTENANCE)
    failed = frozenset(
        (await s.execute(select(Device.id).where(Device.state == DeviceState.FAILED))).scalars()
    )
    return Conditions(
        down=frozenset(modes) - connected,
        connected=connected,
        usable=frozenset(i for i in connected if modes[i] != SdsMode.DRAINING),
        failed=failed,
    )


@dataclass
class _Pool:
    pool: StoragePool
    volumes: list[tuple[str, int, int, int]]  # (name, vtree id, size, bytes of one copy)
    sizes: list[int] | None = None

    def pg_bytes(self) -> list[int]:
        if self.sizes is None:
            self.sizes = pg_bytes(self.pool.pg_count, [v[1:] for v in self.volumes])
        return self.sizes

    def volumes_on(self, pgs: set[int]) -> list[str]:
        names = []
        for name, vtree_id, size, _ in self.volumes:
            first, count = pgs_of_volume(vtree_id, size, self.pool.pg_count)
            if any((first + i) % self.pool.pg_count in pgs for i in range(count)):
                names.append(name)
        return names


async def _pools(s: AsyncSession, pool_ids: Collection[int]) -> dict[int, _Pool]:
    pools = list(
        (await s.execute(select(StoragePool).where(StoragePool.id.in_(list(pool_ids))))).scalars()
    )
    vols = list(
        (
            await s.execute(
                select(Volume).where(Volume.pool_id.in_(list(pool_ids))).order_by(Volume.id)
            )
        ).scalars()
    )
    allocated = await volume_allocated(s, vols)
    out = {p.id: _Pool(p, []) for p in pools}
    for v in vols:
        name = v.name if v.state == VolumeState.ACTIVE else f"{v.name} (deleting)"
        out[v.pool_id].volumes.append((name, v.vtree_id, v.size_bytes, allocated[v.id] // COPIES))
    return out


def _pg_list(outcomes: list[PgOutcome], pools: Mapping[int, _Pool]) -> dict[str, Any]:
    return {
        "count": len(outcomes),
        "pgs": [
            {
                "pool_id": o.pool_id,
                "pool": pools[o.pool_id].pool.name,
                "pg": o.pg,
                "copies_now": o.now,
                "already": o.now == o.after,
            }
            for o in outcomes[:LISTED]
        ],
    }


def _volumes(outcomes: list[PgOutcome], pools: Mapping[int, _Pool]) -> list[str]:
    by_pool: dict[int, set[int]] = defaultdict(set)
    for o in outcomes:
        by_pool[o.pool_id].add(o.pg)
    names: list[str] = []
    for pool_id in sorted(by_pool):
        names += pools[pool_id].volumes_on(by_pool[pool_id])
    return names[:LISTED]


async def stop_report(s: AsyncSession, live: Liveness, sds: Sequence[Sds]) -> dict[str, Any]:
    """The answer of ``GET /api/v1/sds/ok-to-stop`` for the SDSs ``sds``."""
    ids = {x.id for x in sds}
    rows = await pgtable.load(s)
    devices = await load_devices(s)
    found = assess(rows, devices, await conditions(s, live), ids)
    pools = await _pools(s, {r.pool_id for r in rows})
    return {
        "safe": found.safe,
        "sds": [
            {"id": x.id, "name": x.name, "state": live.state("sds", x.id), "mode": x.mode.value}
            for x in sds
        ],
        "pgs_with_copy": found.touched,
        "pgs_with_copy_not_clean": found.not_clean,
        "unavailable": _pg_list(found.unavailable, pools),
        "single_copy": _pg_list(found.single_copy, pools),
        "volumes_unavailable": _volumes(found.unavailable, pools),
        "volumes_single_copy": _volumes(found.single_copy, pools),
        "already_unavailable": found.already_unavailable,
        "already_single_copy": found.already_single_copy,
    }


ESTIMATE = (
    "bytes: each volume's data (thick: its size, thin: the chunks its SDSs report) "
    "spread evenly over the PGs it lands on; time: the busiest source device (each PG "
    "is copied from its primary) at the pool's {kind} throttle per device, a lower "
    "bound; null when the throttle is 0 (unlimited)"
)


def _plan(action: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"dry_run": True, "action": action, "target": target, **extra}


async def maintenance_plan(
    s: AsyncSession, live: Liveness, sds: Sds, enter: bool
) -> dict[str, Any]:
    """Entering: the PGs left with one copy (or none) while the SDS is out; nothing is
    copied. Exiting: its stale copies get a delta resync of what was written meanwhile
    (not known in advance)."""
    report = await stop_report(s, live, [sds])
    if enter:
        note = (
            "entering copies nothing; on exit a delta resync copies only what was "
            "written meanwhile, at the pool's rebuild throttle"
        )
        return _plan(
            "maintenance_enter",
            sds.name,
            **{k: report[k] for k in _IMPACT},
            bytes_to_copy=0,
            estimated_seconds=0.0,
            pools=[],
            estimate=note,
        )
    note = "a delta resync copies what was written while it was out: not known in advance"
    empty = {"count": 0, "pgs": []}
    return _plan(
        "maintenance_exit",
        sds.name,
        unavailable=empty,
        single_copy=empty,
        volumes_unavailable=[],
        volumes_single_copy=[],
        bytes_to_copy=None,
        estimated_seconds=None,
        pools=[],
        estimate=note,
    )


def _slowest(seconds: list[float | None]) -> float | None:
    """Pools copy on their own devices at once: the slowest one's time (None: one is
    unthrottled, its time not known)."""
    if None in seconds:
        return None
    return max((x for x in seconds if x is not None), default=0.0)


_IMPACT = ("unavailable", "single_copy", "volumes_unavailable", "volumes_single_copy")


async def drain_plan(s: AsyncSession, sds: Sds, action: str) -> dict[str, Any]:
    """A drain (``meshctl sds remove``): every PG copy on the SDS moves to another
    SDS of its pool, copied from the PG's primary while the PG stays clean (no PG is
    left with one copy by it). Bytes and time at each pool's rebalance throttle."""
    dev_ids = {d.id for d in sds.devices}
    rows = [r for r in await pgtable.load(s, devices=dev_ids) if {r.primary, r.secondary} & dev_ids]
    pools = await _pools(s, {r.pool_id for r in rows})
    per_pool = []
    total = 0
    seconds: list[float | None] = []
    for pool_id in sorted(pools):
        p = pools[pool_id]
        sizes = p.pg_bytes()
        per_source: dict[int, int] = defaultdict(int)
        moves = 0
        for r in rows:
            if r.pool_id == pool_id and r.primary is not None:
                per_source[r.primary] += sizes[r.pg]
                moves += 1
        nbytes = sum(per_source.values())
        eta = copy_seconds(per_source, p.pool.rebalance_bandwidth_mibps)
        total += nbytes
        seconds.append(eta)
        per_pool.append(
            {
                "pool": p.pool.name,
                "pg_copies_to_move": moves,
                "bytes_to_copy": nbytes,
                "throttle": "rebalance",
                "bandwidth_mibps": p.pool.rebalance_bandwidth_mibps,
                "estimated_seconds": eta,
            }
        )
    empty = {"count": 0, "pgs": []}
    return _plan(
        action,
        sds.name,
        unavailable=empty,
        single_copy=empty,
        volumes_unavailable=[],
        volumes_single_copy=[],
        bytes_to_copy=total,
        # pools copy on their own devices at once: the slowest one's time
        estimated_seconds=_slowest(seconds),
        pools=per_pool,
        estimate=ESTIMATE.format(kind="rebalance"),
    )


async def pool_update_plan(
    s: AsyncSession,
    pool: StoragePool,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    progress: CopyProgress,
) -> dict[str, Any]:
    """A change of a pool's settings moves no data: the plan is the settings that
    change and, per kind of copy in progress (``rebuild``: resyncs and rebuilds,
    ``rebalance``: moves), the bytes the SDSs report left and the time they take at
    the old and at the new throttle (spread evenly over the devices copying)."""
    rows = await pgtable.load(s, pool_id=pool.id)
    sources = {
        "rebuild": {
            r.primary
            for r in rows
            if r.state in (PgState.RESYNCING, PgState.REBUILDING) and r.primary is not None
        },
        "rebalance": {r.primary for r in rows if r.target is not None and r.primary is not None},
    }
    backlog = []
    for kind, devs in sources.items():
        left = progress.remaining(pool.id, kind)
        n = max(len(devs), 1)
        share = {i: -(-left // n) for i in range(n)} if left else {}
        backlog.append(
            {
                "kind": kind,
                "bytes_left": left,
                "source_devices": len(devs),
                "estimated_seconds_before": copy_seconds(share, before[f"{kind}_bandwidth_mibps"]),
                "estimated_seconds_after": copy_seconds(share, after[f"{kind}_bandwidth_mibps"]),
            }
        )
    empty = {"count": 0, "pgs": []}
    return _plan(
        "pool_update",
        str(before["name"]),
        changes={k: {"from": before[k], "to": after[k]} for k in after if before[k] != after[k]},
        unavailable=empty,
        single_copy=empty,
        volumes_unavailable=[],
        volumes_single_copy=[],
        bytes_to_copy=0,
        estimated_seconds=0.0,
        copies_in_progress=backlog,
        pools=[],
        estimate=(
            "a settings change copies nothing; copies in progress: the bytes the SDSs "
            "report left, spread evenly over the devices copying, at the throttle per "
            "device; null when the throttle is 0 (unlimited)"
        ),
    )
