"""Failure handling: SDSs that stop sending heartbeats lose their PGs' primaries.

Once a second the MDM compares every SDS's last heartbeat with
``cluster.heartbeat_timeout_s`` and applies these transitions to the PGs with a copy
on an SDS whose state changed (see docs/mdm.md, "Failures"):

| PG state | what happened | new state |
|---|---|---|
| clean | the primary's SDS is down | degraded, the secondary becomes primary |
| clean | the secondary's SDS is down | degraded |
| clean | both SDSs are down | inactive |
| degraded | the primary's (the only in-sync copy's) SDS is down | inactive |
| degraded | the secondary's SDS heartbeats again | resyncing |
| rebuilding | the secondary's SDS is down | degraded, without that partial copy |
| resyncing | the secondary's SDS is down again | degraded |
| resyncing | the primary's SDS is down | inactive |
| resyncing | the primary reports the copy done (``pg-synced``) | clean |
| inactive | the primary's SDS is back | degraded (resyncing if the secondary's is up) |

A copy on a **failed device** (its SDS reported an IO error on it: :func:`mark_failed`)
counts as a copy on a down SDS, and as one on an SDS gone for good: it is stale at
once and rebuilt on another device without waiting for ``rebuild_delay_s`` (the device
will not come back). It is never chosen as a rebuild target.

A degraded PG's secondary is stale: its primary writes alone and no client reads
from it, even after its SDS returns, until it is resynchronised (docs/design.md,
invariant 4). While ``resyncing`` the primary forwards new writes to the secondary
again and copies what it missed (``meshblock.sds.resync``); when done it reports to
the MDM (``POST /api/v1/sds/{id}/pg-synced``, :func:`mark_synced`), which makes the PG
clean. Every change bumps the pool's map epoch, so SDCs and SDSs learn of it through
their long-polls.

Nothing is declared down during the first ``heartbeat_timeout_s`` after the MDM
starts: SDSs need that long to reach a restarted MDM, and their heartbeats from
before the restart say nothing about now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import pgtable, stopping
from meshblock.mdm.db import WriteGate
from meshblock.mdm.epochs import EpochNotifier, bump
from meshblock.mdm.errors import ApiError, Conflict, NotFound
from meshblock.mdm.leader import writing
from meshblock.mdm.liveness import Liveness, write_holds
from meshblock.mdm.models import (
    Device,
    DeviceState,
    PgState,
    PlacementGroup,
    Sds,
    SdsMode,
    StoragePool,
)
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, failure_domain

log = logging.getLogger(__name__)


def next_state(
    primary_up: bool | None,
    secondary_up: bool | None,
    state: PgState,
    secondary_connected: bool = False,
) -> tuple[bool, PgState]:
    """(swap primary and secondary?, new state) of one PG; ``None``: no such copy.

    ``secondary_connected``: the secondary's SDS heartbeats now (not merely "not
    declared down", which an SDS unseen since the MDM started also is); only then
    does a stale secondary get a resync.
    """
    p, s = bool(primary_up), bool(secondary_up)
    if state == PgState.CLEAN:
        if p and s:
            return False, PgState.CLEAN
        if p:
            return False, PgState.DEGRADED
        if s:
            return True, PgState.DEGRADED
        return False, PgState.INACTIVE
    if not p:
        # only the copy that was serving last (the primary) may serve again
        return False, PgState.INACTIVE
    if state in (PgState.RESYNCING, PgState.REBUILDING):
        return False, state if s else PgState.DEGRADED
    # degraded, or inactive with its primary back
    return False, PgState.RESYNCING if s and secondary_connected else PgState.DEGRADED


class FailureDetector:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        liveness: Liveness,
        notifier: EpochNotifier,
        grace_s: float,
        gate: WriteGate,
        resync_delay_s: float = 0.0,
        rebuild_delay_s: float = 0.0,
    ) -> None:
        self.sessions = sessions
        self.gate = gate
        self.liveness = liveness
        self.notifier = notifier
        self.started = time.monotonic()
        self.grace_s = grace_s
        self._last_down: frozenset[int] | None = None
        self.resync_delay_s = resync_delay_s
        self.rebuild_delay_s = rebuild_delay_s
        self._connected_since: dict[int, float] = {}
        self._down_since: dict[int, float] = {}
        self._lock = asyncio.Lock()
        self.rebuilds_started = 0  # PGs given a new secondary since start
        self._no_room: dict[int, int] = {}

    def down_sds(self, sds_ids: list[int]) -> frozenset[int]:
        """SDSs that were seen and stopped heartbeating. One that never sent a heartbeat
        (added through the API, its daemon not started yet) has not failed: it holds
        no data, and its PGs wait for it as they would for any unreachable copy."""
        return frozenset(
            i
            for i in sds_ids
            if self.liveness.seen("sds", i) is not None
            and self.liveness.state("sds", i) != "connected"
        )

    async def check(self) -> int:
        """Apply the transitions once; return how many PGs changed."""
        async with self._lock:
            return await self._check()

    async def _down_now(
        self, s: AsyncSession
    ) -> tuple[dict[int, SdsMode], frozenset[int], frozenset[int], frozenset[int]]:
        """Every SDS's mode, the SDSs lost, those in maintenance, the failed devices."""
        modes = dict((await s.execute(select(Sds.id, Sds.mode))).all())
        sds_ids = list(modes)
        if time.monotonic() - self.started < self.grace_s:
            # SDSs may not have reached a restarted MDM yet: only a confirmed
            # report (the MDM could not connect either) counts as down now.
            lost = frozenset(i for i in sds_ids if ("sds", i) in self.liveness.reported_down)
        else:
            lost = self.down_sds(sds_ids)
        maintenance = frozenset(i for i, m in modes.items() if m == SdsMode.MAINTENANCE)
        failed = frozenset(
            (await s.execute(select(Device.id).where(Device.state == DeviceState.FAILED))).scalars()
        )
        return modes, lost, maintenance, failed

    async def leaves_inactive(self, sds_id: int) -> list[PgRow]:
        """The PGs that taking ``sds_id`` down now would leave with no serving copy
        (:func:`inactive_without`), as the next check would decide them."""
        async with self.sessions() as s:
            _, lost, maintenance, failed = await self._down_now(s)
            rows = await pgtable.load(s)
            devices = await load_devices(s)
        return inactive_without(
            rows, devices, Conditions(lost | maintenance, failed=failed), sds_id
        )

    async def _check(self) -> int:
        # The holds changed since the last heartbeat batch go in this transaction: a
        # map that takes an SDS down on a report is never committed without its hold
        # (an MDM crash in between would let its next heartbeat bring it back).
        holds = self.liveness.take_holds()
        try:
            return await self._check_writing(holds)
        except BaseException:
            self.liveness.untake_holds(holds)
            raise

    async def _check_writing(self, holds: dict[int, str | None]) -> int:
        async with writing(self.gate, self.sessions) as s:
            await write_holds(s, holds)
            modes, lost, maintenance, failed = await self._down_now(s)
            sds_ids = list(modes)
            down = lost | maintenance
            now = time.monotonic()
            for i in list(self._down_since):
                if i not in lost:
                    del self._down_since[i]
            for i in lost:
                self._down_since.setdefault(i, now)
            if down == self._last_down and not down and not await self._stale(s, failed):
                return 0
            connected = self._settled(sds_ids) - maintenance
            # Rebuilt away from: lost long enough, not in maintenance (a planned outage
            # keeps its copies and gets a delta resync on exit).
            gone = frozenset(
                i for i in lost - maintenance if now - self._down_since[i] >= self.rebuild_delay_s
            )
            usable = frozenset(
                i for i in sds_ids if i in connected and modes[i] != SdsMode.DRAINING
            )
            seen = Conditions(down, connected, gone, usable, failed)
            changed = await self._apply(s, seen)
            if changed:
                epoch = await bump(s)
        if changed:
            self.notifier.publish(epoch)
        if down != self._last_down:
            names = sorted(lost)
            log.info(
                "SDSs down: %s; in maintenance: %s",
                names if names else "none",
                sorted(maintenance) if maintenance else "none",
            )
        self._last_down = down
        return changed

    def rebuild_waits(self) -> dict[int, float]:
        """Per SDS lost as of the last check and not rebuilt away from yet: the seconds
        left of ``rebuild_delay_s`` before its copies are rebuilt on other SDSs (one in
        maintenance is in it too: the caller leaves those out)."""
        now = time.monotonic()
        return {
            i: round(self.rebuild_delay_s - (now - since), 1)
            for i, since in self._down_since.items()
            if now - since < self.rebuild_delay_s
        }

    def _settled(self, sds_ids: list[int]) -> frozenset[int]:
        """SDSs connected for at least ``resync_delay_s``: their stale copies resync."""
        now = time.monotonic()
        up = {i for i in sds_ids if self.liveness.state("sds", i) == "connected"}
        for i in list(self._connected_since):
            if i not in up:
                del self._connected_since[i]
        for i in up:
            self._connected_since.setdefault(i, now)
        return frozenset(i for i in up if now - self._connected_since[i] >= self.resync_delay_s)

    async def _stale(self, s: AsyncSession, failed: frozenset[int]) -> bool:
        """Whether some PG is not clean, has a move in progress or names a failed
        device."""
        found = await s.execute(
            select(PlacementGroup.pg)
            .where(
                (PlacementGroup.state != PgState.CLEAN)
                | PlacementGroup.target_device_id.is_not(None)
                | PlacementGroup.primary_device_id.in_(failed)
                | PlacementGroup.secondary_device_id.in_(failed)
            )
            .limit(1)
        )
        return found.scalar() is not None

    async def _apply(self, s: AsyncSession, seen: Conditions) -> int:
        """Load, decide (:func:`decide`), write; return how many PGs changed."""
        devices = await load_devices(s)
        plan = decide(await pgtable.load(s), devices, seen)
        if plan.no_room != self._no_room:
            for pool_id, n in sorted(plan.no_room.items()):
                log.warning(
                    "pool %d: %d degraded PG(s) cannot be rebuilt: no connected SDS with a "
                    "device in the pool outside the surviving copy's fault set",
                    pool_id,
                    n,
                )
            self._no_room = plan.no_room
        if not plan.changes:
            return 0
        for pool, changes in await pgtable.write_pools(s, plan.changes):
            rebuilt = plan.rebuilt.get(pool.id, 0)
            log.warning(
                "pool %s: %d PG(s) changed state after SDS or device failures or returns "
                "(map epoch %d)%s",
                pool.name,
                len(changes),
                pool.map_epoch,
                f"; {rebuilt} rebuilding on other SDSs" if rebuilt else "",
            )
        self.rebuilds_started += sum(plan.rebuilt.values())
        return len(plan.changes)

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await stopping.pause(interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("failure check failed; trying again in %.0f s", interval_s)


async def forward_peers(s: AsyncSession, sds_id: int) -> frozenset[int]:
    """The SDSs that ``sds_id`` forwards writes to: the secondaries of the PGs it is
    primary of, when the primary forwards (clean, resyncing, rebuilding), and their
    move targets (what :func:`meshblock.mdm.holddown.isolated_sds` weighs its reports
    against)."""
    owner = dict((await s.execute(select(Device.id, Device.sds_id))).all())
    mine = [d for d, o in owner.items() if o == sds_id]
    rows = await s.execute(
        select(
            PlacementGroup.state,
            PlacementGroup.secondary_device_id,
            PlacementGroup.target_device_id,
        ).where(PlacementGroup.primary_device_id.in_(mine))
    )
    out: set[int] = set()
    for state, sec, tgt in rows:
        if sec is not None and state in _FORWARDING:
            out.add(owner[sec])
        if tgt is not None:
            out.add(owner[tgt])
    out.discard(sds_id)
    return frozenset(out)


_FORWARDING = (PgState.CLEAN, PgState.RESYNCING, PgState.REBUILDING)


@dataclass(frozen=True)
class PoolDevice(DeviceInfo):
    """A device as the failure checks see it: placement's view and its pool."""

    pool_id: int


async def load_devices(s: AsyncSession) -> dict[int, PoolDevice]:
    """Every device (failed ones too), by id."""
    rows = await s.execute(
        select(
            Device.id, Device.sds_id, Sds.fault_set_id, Device.capacity_bytes, Device.pool_id
        ).join(Sds, Sds.id == Device.sds_id)
    )
    return {d: PoolDevice(d, sds, fs, cap, pool) for d, sds, fs, cap, pool in rows}


@dataclass(frozen=True)
class Conditions:
    """What the failure checks know of the SDSs and devices at one check (ids)."""

    down: frozenset[int] = frozenset()
    """SDSs down or in maintenance: their copies are stale."""
    connected: frozenset[int] = frozenset()
    """SDSs heartbeating for ``resync_delay_s`` and not in maintenance: their stale
    copies resync."""
    gone: frozenset[int] = frozenset()
    """SDSs lost for ``rebuild_delay_s`` (not in maintenance): rebuilt away from."""
    usable: frozenset[int] = frozenset()
    """SDSs that may take a new copy or a move: connected, in mode normal."""
    failed: frozenset[int] = frozenset()
    """Failed devices: a copy there is down, and gone for good."""

    def up(self, dev: PoolDevice | None) -> bool | None:
        """Whether a copy on ``dev`` is up; None: no such copy."""
        if dev is None:
            return None
        return dev.sds_id not in self.down and dev.device_id not in self.failed

    def lost(self, dev: PoolDevice | None) -> bool:
        """No copy, or one that will not come back: rebuild it elsewhere."""
        return dev is None or dev.sds_id in self.gone or dev.device_id in self.failed

    def takes_copies(self, dev: PoolDevice) -> bool:
        """Whether ``dev`` may take a new copy or a move's target."""
        return dev.sds_id in self.usable and dev.device_id not in self.failed


@dataclass
class FailurePlan:
    """What :func:`decide` makes of the PG rows: the changes, and per pool how many
    PGs get a new secondary (``rebuilt``) or wait for room to get one (``no_room``)."""

    changes: list[PgChange] = field(default_factory=list)
    rebuilt: dict[int, int] = field(default_factory=dict)
    no_room: dict[int, int] = field(default_factory=dict)


def decide(
    rows: Sequence[PgRow], devices: Mapping[int, PoolDevice], seen: Conditions
) -> FailurePlan:
    """The failure checks' decision, pure: per placed PG, its state after
    :func:`next_state` (the secondary promoted when the primary is lost), its move
    cancelled unless the PG stays clean and the target takes copies, and a new
    secondary (:func:`rebuild_target`) for a degraded PG whose stale copy is lost for
    good. Rows are taken in order; each rebuild counts towards the next choices."""
    plan = FailurePlan()
    copies: dict[int, int] = defaultdict(int)  # copies (and targets) per device
    for row in rows:
        for dev in row.copies:
            copies[dev] += 1
    for row in rows:
        if row.primary is None and row.secondary is None:
            continue  # unplaced: nothing to fail over
        after = _fail_over(row, devices, seen)
        if row.target is not None and after.target is None:
            copies[row.target] -= 1
        if row.secondary is not None and row.secondary not in (after.primary, after.secondary):
            copies[row.secondary] -= 1
        after = _rebuild(after, devices, copies, seen, plan)
        if after != row:
            plan.changes.append(PgChange(row, after))
    return plan


def inactive_without(
    rows: Sequence[PgRow], devices: Mapping[int, PoolDevice], seen: Conditions, sds_id: int
) -> list[PgRow]:
    """The PGs, not inactive now, that :func:`decide` would make inactive (no serving
    copy) were ``sds_id`` down too, besides ``seen.down``: a PG resyncing or rebuilding
    from it, or whose other copy is down already, pure."""
    worse = replace(
        seen,
        down=seen.down | {sds_id},
        connected=seen.connected - {sds_id},
        usable=seen.usable - {sds_id},
    )
    return [
        ch.after
        for ch in decide(rows, devices, worse).changes
        if ch.after.state == PgState.INACTIVE
        and (ch.before is None or ch.before.state != PgState.INACTIVE)
    ]


def _fail_over(row: PgRow, devices: Mapping[int, PoolDevice], seen: Conditions) -> PgRow:
    """``row`` with the state :func:`next_state` gives it, and without its move when
    the PG is no longer clean or the target may not take copies (the rebalancer starts
    it again later, from scratch)."""
    primary = None if row.primary is None else devices[row.primary]
    secondary = None if row.secondary is None else devices[row.secondary]
    s_connected = secondary is not None and (
        secondary.sds_id in seen.connected and secondary.device_id not in seen.failed
    )
    swap, state = next_state(seen.up(primary), seen.up(secondary), row.state, s_connected)
    p, s = (row.secondary, row.primary) if swap else (row.primary, row.secondary)
    if row.state == PgState.REBUILDING and state == PgState.DEGRADED:
        # The copy being filled is down: it holds part of the PG (a new copy, or one
        # that needs a full copy after an unclean start), and a resync on its return
        # would copy only what was written meanwhile. It is dropped: _rebuild gives
        # the PG a new secondary, filled whole.
        s = None
    target, moving = row.target, row.moving
    if target is not None and (state != PgState.CLEAN or not seen.takes_copies(devices[target])):
        target, moving = None, None
    return replace(row, primary=p, secondary=s, state=state, target=target, moving=moving)


def _rebuild(
    row: PgRow,
    devices: Mapping[int, PoolDevice],
    copies: dict[int, int],
    seen: Conditions,
    plan: FailurePlan,
) -> PgRow:
    """A degraded PG whose stale copy's SDS (or device) is gone for good gets a new
    secondary elsewhere, ``rebuilding``; it stays degraded when none qualifies."""
    if row.state != PgState.DEGRADED or row.primary is None:
        return row
    if not seen.lost(None if row.secondary is None else devices[row.secondary]):
        return row
    pick = rebuild_target(devices.values(), copies, devices[row.primary], seen)
    if pick is None:
        plan.no_room[row.pool_id] = plan.no_room.get(row.pool_id, 0) + 1
        return row
    if row.secondary is not None:
        copies[row.secondary] -= 1
    copies[pick] += 1
    plan.rebuilt[row.pool_id] = plan.rebuilt.get(row.pool_id, 0) + 1
    return replace(row, secondary=pick, state=PgState.REBUILDING)


def rebuild_target(
    devices: Iterable[PoolDevice],
    copies: Mapping[int, int],
    primary: PoolDevice,
    seen: Conditions,
) -> int | None:
    """The device of the pool that takes a new copy next to ``primary``: one that
    takes copies, on another SDS outside the primary's failure domain, the least
    filled relative to its capacity (so that rebuilds spread over every SDS:
    many-to-many); ties go to the lowest id."""
    domain = failure_domain(primary)
    candidates = [
        d
        for d in devices
        if d.pool_id == primary.pool_id
        and seen.takes_copies(d)
        and d.sds_id != primary.sds_id
        and failure_domain(d) != domain
        and d.capacity_bytes > 0
    ]
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda d: ((copies.get(d.device_id, 0) + 1) / d.capacity_bytes, d.device_id),
    )
    return best.device_id


async def mark_synced(s: AsyncSession, sds_id: int, pool_id: int, pg: int, epoch: int) -> int:
    """A primary reports that it has finished copying ``pg`` to the copy that needed it,
    a copy it started on the map of ``epoch``; returns the new map epoch.

    - a ``resyncing`` or ``rebuilding`` PG becomes clean;
    - a clean PG with a rebalance move: the target replaces the copy that moves (if
      that is the primary, the secondary becomes primary).

    Refused (409) unless the PG is still in that state with ``sds_id`` as its primary
    and has not changed since ``epoch`` (a copy that started before the PG changed
    again proves nothing).
    """
    (result,) = await mark_many_synced(s, sds_id, [(pool_id, pg, epoch)])
    if isinstance(result, ApiError):
        raise result
    return result


async def mark_many_synced(
    s: AsyncSession, sds_id: int, reports: list[tuple[int, int, int]]
) -> list[int | ApiError]:
    """:func:`mark_synced` for several ``(pool, pg, epoch)`` reports at once: per report
    the new map epoch, or the error that refused it (the others still apply). Each
    pool's map epoch moves once for all its PGs made clean here, so the SDSs and SDCs
    fetch one new map for them, not one per PG. Load, decide (:func:`decide_synced`),
    write."""
    wanted: dict[int, set[int]] = defaultdict(set)
    for pool_id, pg, _ in reports:
        wanted[pool_id].add(pg)
    pools = {
        pool.id: pool
        for pool in (
            await s.execute(select(StoragePool).where(StoragePool.id.in_(list(wanted))))
        ).scalars()
    }
    rows = [
        row
        for pool_id in sorted(pools)
        for row in await pgtable.load(s, pool_id=pool_id, pgs=wanted[pool_id])
    ]
    primaries = {row.primary for row in rows if row.primary is not None}
    sds_of = dict(
        (await s.execute(select(Device.id, Device.sds_id).where(Device.id.in_(primaries)))).all()
    )
    map_epochs = {pool_id: pool.map_epoch for pool_id, pool in pools.items()}
    results, changes = decide_synced(sds_id, reports, rows, sds_of, map_epochs)
    for pool, done in await pgtable.write_pools(s, changes):
        for change in done:
            log.info(
                "pool %s: PG %d %s done, clean (map epoch %d)",
                pool.name,
                change.after.pg,
                _copy_done(change),
                pool.map_epoch,
            )
    return results


def decide_synced(
    sds_id: int,
    reports: Sequence[tuple[int, int, int]],
    rows: Sequence[PgRow],
    sds_of: Mapping[int, int],
    map_epochs: Mapping[int, int],
) -> tuple[list[int | ApiError], list[PgChange]]:
    """What copy reports of ``sds_id`` make of the PGs, pure: per report the pool's new
    map epoch (its ``map_epochs`` value + 1) or the error that refuses it, and the
    changes. ``rows``: the reported PGs; ``sds_of``: the SDS of each primary device.
    Reports are taken in order: a PG made clean by one is not being copied for the
    next."""
    current = {(row.pool_id, row.pg): row for row in rows}
    before = dict(current)
    accepted: set[int] = set()  # pools with a report accepted: their epoch moves
    out: list[int | ApiError] = []
    for pool_id, pg, epoch in reports:
        if pool_id not in map_epochs:
            out.append(NotFound(f"no storage pool with id {pool_id}"))
            continue
        new_epoch = map_epochs[pool_id] + 1
        row = current.get((pool_id, pg))
        if row is None:
            out.append(NotFound(f"no PG {pg} in storage pool {pool_id}"))
        elif not _copying(row) or _sds(row.primary, sds_of) != sds_id or row.epoch > epoch:
            out.append(
                Conflict(
                    f"PG {pool_id}/{pg} is not being copied from SDS {sds_id} "
                    f"since map epoch {epoch}",
                    {
                        "state": row.state.value,
                        "pg_epoch": row.epoch,
                        "map_epoch": new_epoch if pool_id in accepted else map_epochs[pool_id],
                    },
                )
            )
        else:
            accepted.add(pool_id)
            current[(pool_id, pg)] = replace(_synced(row), epoch=new_epoch)
            out.append(new_epoch)
    changes = [PgChange(before[key], row) for key, row in current.items() if row != before[key]]
    return out, changes


def _copying(row: PgRow) -> bool:
    """Whether the PG's primary is copying it: a resync, a rebuild or a move."""
    return row.state in (PgState.RESYNCING, PgState.REBUILDING) or (
        row.state == PgState.CLEAN and row.target is not None
    )


def _synced(row: PgRow) -> PgRow:
    """The PG once its copy is done: clean; after a move (a clean PG's target), the
    target in place of the copy that moved (the secondary promoted if that was the
    primary). A resync or rebuild finishes no move, even one the PG still names."""
    if row.state != PgState.CLEAN or row.target is None:
        return replace(row, state=PgState.CLEAN)
    primary = row.secondary if row.moving == "primary" else row.primary
    return replace(
        row, primary=primary, secondary=row.target, state=PgState.CLEAN, target=None, moving=None
    )


def _sds(device: int | None, sds_of: Mapping[int, int]) -> int | None:
    return None if device is None else sds_of.get(device)


def _copy_done(change: PgChange) -> str:
    """What was copied, for the log."""
    before = change.before or change.after
    if before.state != PgState.CLEAN:
        return before.state.value
    return f"move of its {before.moving} to device {before.target}"
