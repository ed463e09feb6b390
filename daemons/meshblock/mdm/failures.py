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
| inactive | the primary's SDS is back | degraded |

A degraded PG's secondary is stale: its primary writes alone and no client reads
from it, even after its SDS returns, until it is resynchronised (invariant 4; the
resync itself belongs to the rebuild work). Every change bumps the pool's map epoch,
so SDCs and SDSs learn of it through their long-polls.

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
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import Device, PgState, PlacementGroup, Sds, StoragePool

log = logging.getLogger(__name__)

Assignment = tuple[int | None, int | None, PgState]


def next_state(
    primary_up: bool | None, secondary_up: bool | None, state: PgState
) -> tuple[bool, PgState]:
    """(swap primary and secondary?, new state) of one PG; ``None``: no such copy."""
    p, s = bool(primary_up), bool(secondary_up)
    if state == PgState.CLEAN:
        if p and s:
            return False, PgState.CLEAN
        if p:
            return False, PgState.DEGRADED
        if s:
            return True, PgState.DEGRADED
        return False, PgState.INACTIVE
    if state == PgState.DEGRADED:
        return False, PgState.DEGRADED if p else PgState.INACTIVE
    # inactive: only the copy that was serving last (the primary) may serve again
    return False, PgState.DEGRADED if p else PgState.INACTIVE


class FailureDetector:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        liveness: Liveness,
        notifier: EpochNotifier,
        grace_s: float,
        gate: WriteGate,
    ) -> None:
        self.sessions = sessions
        self.gate = gate
        self.liveness = liveness
        self.notifier = notifier
        self.started = time.monotonic()
        self.grace_s = grace_s
        self._last_down: frozenset[int] | None = None

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
            if down == self._last_down and not down:
                return 0
            changed = await self._apply(s, down)
            if changed:
                epoch = await bump(s)
        if changed:
            self.notifier.publish(epoch)
        if down != self._last_down:
            names = sorted(down)
            log.info("SDSs down: %s", names if names else "none")
        self._last_down = down
        return changed

    async def _apply(self, s: AsyncSession, down: frozenset[int]) -> int:
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
            swap, new_state = next_state(p_up, s_up, state)
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
