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

A degraded PG's secondary is stale: its primary writes alone and no client reads
from it, even after its SDS returns, until it is resynchronised (invariant 4). While
``resyncing`` the primary forwards new writes to the secondary again and copies what
it missed (``meshblock.sds.resync``); when done it reports to the MDM
(``POST /api/v1/sds/{id}/pg-synced``, :func:`mark_synced`), which makes the PG clean.
Every change bumps the pool's map epoch, so SDCs and SDSs learn of it through their
long-polls.

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
from meshblock.mdm.errors import Conflict, NotFound
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import Device, PgState, PlacementGroup, Sds, StoragePool

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
    if state == PgState.RESYNCING:
        return False, PgState.RESYNCING if s else PgState.DEGRADED
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
    ) -> None:
        self.sessions = sessions
        self.gate = gate
        self.liveness = liveness
        self.notifier = notifier
        self.started = time.monotonic()
        self.grace_s = grace_s
        self._last_down: frozenset[int] | None = None
        self.resync_delay_s = resync_delay_s
        self._connected_since: dict[int, float] = {}

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
        if time.monotonic() - self.started < self.grace_s:
            return 0
        async with self.gate(), self.sessions() as s, s.begin():
            sds_ids = list((await s.execute(select(Sds.id))).scalars())
            down = self.down_sds(sds_ids)
            if down == self._last_down and not down and not await self._stale(s):
                return 0
            connected = self._settled(sds_ids)
            changed = await self._apply(s, down, connected)
            if changed:
                epoch = await bump(s)
        if changed:
            self.notifier.publish(epoch)
        if down != self._last_down:
            names = sorted(down)
            log.info("SDSs down: %s", names if names else "none")
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

    async def _stale(self, s: AsyncSession) -> bool:
        """Whether some PG is degraded or inactive (a returning SDS may resync it)."""
        found = await s.execute(
            select(PlacementGroup.pg)
            .where(PlacementGroup.state.in_([PgState.DEGRADED, PgState.INACTIVE]))
            .limit(1)
        )
        return found.scalar() is not None

    async def _apply(self, s: AsyncSession, down: frozenset[int], connected: frozenset[int]) -> int:
        primary, secondary = aliased(Device), aliased(Device)
        rows = await s.execute(
            select(
                PlacementGroup.pool_id,
                PlacementGroup.pg,
                PlacementGroup.primary_device_id,
                PlacementGroup.secondary_device_id,
                PlacementGroup.state,
                primary.sds_id,
                secondary.sds_id,
            )
            .outerjoin(primary, primary.id == PlacementGroup.primary_device_id)
            .outerjoin(secondary, secondary.id == PlacementGroup.secondary_device_id)
        )
        updates: list[dict[str, object]] = []
        pools: dict[int, int] = defaultdict(int)
        for pool_id, pg, p_dev, s_dev, state, p_sds, s_sds in rows:
            if p_dev is None and s_dev is None:
                continue  # unplaced: nothing to fail over
            p_up = None if p_sds is None else p_sds not in down
            s_up = None if s_sds is None else s_sds not in down
            swap, new_state = next_state(p_up, s_up, state, s_sds in connected)
            if not swap and new_state == state:
                continue
            new_p, new_s = (s_dev, p_dev) if swap else (p_dev, s_dev)
            updates.append(
                {"b_pool": pool_id, "b_pg": pg, "b_p": new_p, "b_s": new_s, "b_state": new_state}
            )
            pools[pool_id] += 1
        if not updates:
            return 0
        epochs = {}
        for pool in (
            await s.execute(select(StoragePool).where(StoragePool.id.in_(list(pools))))
        ).scalars():
            pool.map_epoch += 1
            epochs[pool.id] = pool.map_epoch
            log.warning(
                "pool %s: %d PG(s) changed state after SDS failures or returns (map epoch %d)",
                pool.name,
                pools[pool.id],
                pool.map_epoch,
            )
        for u in updates:
            u["b_epoch"] = epochs[u["b_pool"]]  # type: ignore[index]
        table = PlacementGroup.metadata.tables[PlacementGroup.__tablename__]
        conn = await s.connection()
        await conn.execute(
            update(table)
            .where(table.c.pool_id == bindparam("b_pool"), table.c.pg == bindparam("b_pg"))
            .values(
                primary_device_id=bindparam("b_p"),
                secondary_device_id=bindparam("b_s"),
                state=bindparam("b_state"),
                epoch=bindparam("b_epoch"),
            ),
            updates,
        )
        await s.flush()
        return len(updates)

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("failure check failed; trying again in %.0f s", interval_s)


async def mark_synced(s: AsyncSession, sds_id: int, pool_id: int, pg: int, epoch: int) -> int:
    """A primary reports that it has resynchronised ``pg``'s secondary, a resync it
    started on the map of ``epoch``: the PG becomes clean (a new map epoch, returned).

    Refused (409) unless the PG is still ``resyncing`` with ``sds_id`` as its primary
    and has not changed since ``epoch`` (a copy that started before the PG went
    degraded again and came back proves nothing).
    """
    epoch = int(epoch)
    pool = await s.get(StoragePool, pool_id)
    if pool is None:
        raise NotFound(f"no storage pool with id {pool_id}")
    primary = aliased(Device)
    row = (
        await s.execute(
            select(PlacementGroup, primary.sds_id)
            .outerjoin(primary, primary.id == PlacementGroup.primary_device_id)
            .where(PlacementGroup.pool_id == pool_id, PlacementGroup.pg == pg)
        )
    ).one_or_none()
    if row is None:
        raise NotFound(f"no PG {pg} in storage pool {pool_id}")
    pgrow, primary_sds = row
    if pgrow.state != PgState.RESYNCING or primary_sds != sds_id or pgrow.epoch > epoch:
        raise Conflict(
            f"PG {pool_id}/{pg} is not resyncing from SDS {sds_id} since map epoch {epoch}",
            {"state": pgrow.state.value, "pg_epoch": pgrow.epoch, "map_epoch": pool.map_epoch},
        )
    pool.map_epoch += 1
    pgrow.state = PgState.CLEAN
    pgrow.epoch = pool.map_epoch
    await s.flush()
    log.info("pool %s: PG %d resynchronised, clean (map epoch %d)", pool.name, pg, pool.map_epoch)
    return pool.map_epoch
