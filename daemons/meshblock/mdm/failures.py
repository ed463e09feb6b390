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

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from meshblock.mdm.db import WriteGate
from meshblock.mdm.epochs import EpochNotifier, bump
from meshblock.mdm.errors import ApiError, Conflict, NotFound
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import (
    Device,
    DeviceState,
    PgState,
    PlacementGroup,
    Sds,
    SdsMode,
    StoragePool,
)

log = logging.getLogger(__name__)

Assignment = tuple[int | None, int | None, PgState]


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

    async def _check(self) -> int:
        async with self.gate(), self.sessions() as s, s.begin():
            modes = dict((await s.execute(select(Sds.id, Sds.mode))).all())
            sds_ids = list(modes)
            if time.monotonic() - self.started < self.grace_s:
                # SDSs may not have reached a restarted MDM yet: only a confirmed
                # report (the MDM could not connect either) counts as down now.
                lost = frozenset(i for i in sds_ids if ("sds", i) in self.liveness.reported_down)
            else:
                lost = self.down_sds(sds_ids)
            maintenance = frozenset(i for i, m in modes.items() if m == SdsMode.MAINTENANCE)
            down = lost | maintenance
            failed = frozenset(
                (
                    await s.execute(select(Device.id).where(Device.state == DeviceState.FAILED))
                ).scalars()
            )
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
            changed = await self._apply(s, down, connected, gone, usable, failed)
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

    async def _apply(
        self,
        s: AsyncSession,
        down: frozenset[int],
        connected: frozenset[int],
        gone: frozenset[int],
        usable: frozenset[int],
        failed: frozenset[int],
    ) -> int:
        """``down``, ``connected``, ``gone``, ``usable``: sets of SDS ids; ``failed``:
        failed devices (a copy there is down, and gone for good)."""
        dev_rows = (
            await s.execute(
                select(
                    Device.id,
                    Device.pool_id,
                    Device.sds_id,
                    Sds.fault_set_id,
                    Device.capacity_bytes,
                ).join(Sds, Sds.id == Device.sds_id)
            )
        ).all()
        devices = {d: _Dev(d, pool, sds, fs, cap) for d, pool, sds, fs, cap in dev_rows}
        rows = (
            await s.execute(
                select(
                    PlacementGroup.pool_id,
                    PlacementGroup.pg,
                    PlacementGroup.primary_device_id,
                    PlacementGroup.secondary_device_id,
                    PlacementGroup.state,
                    PlacementGroup.target_device_id,
                    PlacementGroup.moving,
                    PlacementGroup.epoch,
                )
            )
        ).all()
        copies: dict[int, int] = defaultdict(int)  # copies (and targets) per device
        for row in rows:
            for dev in (row[2], row[3], row[5]):
                if dev is not None:
                    copies[dev] += 1

        def sds_of(dev: int | None) -> int | None:
            return None if dev is None else devices[dev].sds_id

        updates: list[dict[str, object]] = []
        pools: dict[int, int] = defaultdict(int)
        rebuilt: dict[int, int] = defaultdict(int)
        no_room: dict[int, int] = defaultdict(int)
        for pool_id, pg, p_dev, s_dev, state, t_dev, moving, old_epoch in rows:
            if p_dev is None and s_dev is None:
                continue  # unplaced: nothing to fail over
            p_sds, s_sds = sds_of(p_dev), sds_of(s_dev)
            p_up = None if p_sds is None else p_sds not in down and p_dev not in failed
            s_up = None if s_sds is None else s_sds not in down and s_dev not in failed
            s_connected = s_sds in connected and s_dev not in failed
            swap, new_state = next_state(p_up, s_up, state, s_connected)
            new_p, new_s = (s_dev, p_dev) if swap else (p_dev, s_dev)
            new_t, new_moving = t_dev, moving
            if t_dev is not None and (
                new_state != PgState.CLEAN or sds_of(t_dev) not in usable or t_dev in failed
            ):
                # A move needs a clean PG and a reachable target: cancel it (the
                # rebalancer starts it again later, from scratch).
                new_t, new_moving = None, None
                copies[t_dev] -= 1
            if (
                new_state == PgState.DEGRADED
                and new_p is not None
                and (new_s is None or sds_of(new_s) in gone or new_s in failed)
            ):
                # The stale copy's SDS (or device) is gone for good: a new copy elsewhere.
                pick = self._rebuild_target(devices, copies, devices[new_p], usable, failed)
                if pick is None:
                    no_room[pool_id] += 1
                else:
                    if new_s is not None:
                        copies[new_s] -= 1
                    copies[pick] += 1
                    new_s, new_state = pick, PgState.REBUILDING
                    rebuilt[pool_id] += 1
            if (new_p, new_s, new_state, new_t) == (p_dev, s_dev, state, t_dev):
                continue
            updates.append(
                {
                    "b_pool": pool_id,
                    "b_pg": pg,
                    "b_p": new_p,
                    "b_s": new_s,
                    "b_state": new_state,
                    "b_t": new_t,
                    "b_m": new_moving,
                    "b_old": old_epoch,
                }
            )
            pools[pool_id] += 1
        if no_room != self._no_room:
            for pool_id, n in sorted(no_room.items()):
                log.warning(
                    "pool %d: %d degraded PG(s) cannot be rebuilt: no connected SDS with a "
                    "device in the pool outside the surviving copy's fault set",
                    pool_id,
                    n,
                )
            self._no_room = no_room
        if not updates:
            return 0
        epochs = {}
        for pool in (
            await s.execute(select(StoragePool).where(StoragePool.id.in_(list(pools))))
        ).scalars():
            pool.map_epoch += 1
            epochs[pool.id] = pool.map_epoch
            log.warning(
                "pool %s: %d PG(s) changed state after SDS or device failures or returns "
                "(map epoch %d)%s",
                pool.name,
                pools[pool.id],
                pool.map_epoch,
                f"; {rebuilt[pool.id]} rebuilding on other SDSs" if rebuilt[pool.id] else "",
            )
        self.rebuilds_started += sum(rebuilt.values())
        for u in updates:
            u["b_epoch"] = epochs[u["b_pool"]]  # type: ignore[index]
        table = PlacementGroup.metadata.tables[PlacementGroup.__tablename__]
        conn = await s.connection()
        # Only where the PG is still as we read it (its epoch unchanged): a report or
        # a rebalance committed meanwhile is not overwritten; the next check sees it.
        await conn.execute(
            update(table)
            .where(
                table.c.pool_id == bindparam("b_pool"),
                table.c.pg == bindparam("b_pg"),
                table.c.epoch == bindparam("b_old"),
            )
            .values(
                primary_device_id=bindparam("b_p"),
                secondary_device_id=bindparam("b_s"),
                state=bindparam("b_state"),
                epoch=bindparam("b_epoch"),
                target_device_id=bindparam("b_t"),
                moving=bindparam("b_m"),
            ),
            updates,
        )
        await s.flush()
        return len(updates)

    @staticmethod
    def _rebuild_target(
        devices: dict[int, _Dev],
        copies: dict[int, int],
        primary: _Dev,
        usable: frozenset[int],
        failed: frozenset[int],
    ) -> int | None:
        """The device of the pool that takes a new copy next to ``primary``: on a
        usable SDS outside the primary's failure domain, not failed, the least filled
        relative to its capacity (so that rebuilds spread over every SDS:
        many-to-many)."""
        best: tuple[float, int] | None = None
        for d in devices.values():
            if (
                d.id in failed
                or d.pool_id != primary.pool_id
                or d.sds_id not in usable
                or d.sds_id == primary.sds_id
                or d.domain == primary.domain
                or d.capacity <= 0
            ):
                continue
            score = (copies[d.id] + 1) / d.capacity
            if best is None or (score, d.id) < best:
                best = (score, d.id)
        return None if best is None else best[1]

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("failure check failed; trying again in %.0f s", interval_s)


class _Dev:
    __slots__ = ("capacity", "domain", "id", "pool_id", "sds_id")

    def __init__(
        self, id_: int, pool_id: int, sds_id: int, fault_set_id: int | None, capacity: int
    ) -> None:
        self.id = id_
        self.pool_id = pool_id
        self.sds_id = sds_id
        self.capacity = capacity
        self.domain = ("fs", fault_set_id) if fault_set_id is not None else ("sds", sds_id)


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
    fetch one new map for them, not one per PG."""
    pools: dict[int, StoragePool | None] = {}
    bumped: set[int] = set()
    out: list[int | ApiError] = []
    primary = aliased(Device)
    for pool_id, pg, epoch in reports:
        if pool_id not in pools:
            pools[pool_id] = await s.get(StoragePool, pool_id)
        pool = pools[pool_id]
        if pool is None:
            out.append(NotFound(f"no storage pool with id {pool_id}"))
            continue
        row = (
            await s.execute(
                select(PlacementGroup, primary.sds_id)
                .outerjoin(primary, primary.id == PlacementGroup.primary_device_id)
                .where(PlacementGroup.pool_id == pool_id, PlacementGroup.pg == pg)
            )
        ).one_or_none()
        if row is None:
            out.append(NotFound(f"no PG {pg} in storage pool {pool_id}"))
            continue
        pgrow, primary_sds = row
        copying = pgrow.state in (PgState.RESYNCING, PgState.REBUILDING) or (
            pgrow.state == PgState.CLEAN and pgrow.target_device_id is not None
        )
        if not copying or primary_sds != sds_id or pgrow.epoch > int(epoch):
            out.append(
                Conflict(
                    f"PG {pool_id}/{pg} is not being copied from SDS {sds_id} "
                    f"since map epoch {epoch}",
                    {
                        "state": pgrow.state.value,
                        "pg_epoch": pgrow.epoch,
                        "map_epoch": pool.map_epoch,
                    },
                )
            )
            continue
        if pool_id not in bumped:
            pool.map_epoch += 1
            bumped.add(pool_id)
        what = pgrow.state.value
        if pgrow.state == PgState.CLEAN:
            what = f"move of its {pgrow.moving} to device {pgrow.target_device_id}"
            if pgrow.moving == "primary":
                pgrow.primary_device_id = pgrow.secondary_device_id
            pgrow.secondary_device_id = pgrow.target_device_id
            pgrow.target_device_id = None
            pgrow.moving = None
        pgrow.state = PgState.CLEAN
        pgrow.epoch = pool.map_epoch
        await s.flush()
        log.info(
            "pool %s: PG %d %s done, clean (map epoch %d)", pool.name, pg, what, pool.map_epoch
        )
        out.append(pool.map_epoch)
    return out
