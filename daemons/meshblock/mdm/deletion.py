"""Deleting volumes: tombstones in the PG maps, and the purge once every copy is freed.

``DELETE /api/v1/volumes/{id}`` puts the volume in state ``deleting`` and bumps its
pool's map epoch: the map carries ``tombstones: {volume id: epoch}``. Each SDS makes
the tombstone durable before it serves anything more of that volume, then frees its
chunks in the background and reports, per tombstone, the chunks it has left (heartbeat
``tombstones``). :class:`Purger` removes the volume's row (its id stays reserved: ids
are never reused) once every SDS with a device in the pool has reported the tombstone
with no chunk left; the next map no longer carries it, and the SDSs drop it. An SDS
that is down or in maintenance holds the purge back until it returns and frees its
copies. Reports are kept in memory only: after an MDM restart the SDSs report again.

The same pass drops the records of snapshot trees' dead versions that every SDS of the
pool reports holding nothing of (:func:`meshblock.mdm.vtrees.drop_collected`), when
the SDSs' garbage reports changed since it last looked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import stopping
from meshblock.mdm.db import WriteGate
from meshblock.mdm.epochs import EpochNotifier, bump
from meshblock.mdm.heartbeats import Tombstone
from meshblock.mdm.leader import writing
from meshblock.mdm.models import Device, StoragePool, Volume, VolumeState, VolumeUsage
from meshblock.mdm.reconcile import Reported, reconcile
from meshblock.mdm.snapshot_gc import TreeGcReports
from meshblock.mdm.vtrees import collectable, drop_collected

log = logging.getLogger(__name__)

PURGE_INTERVAL_S = 1.0


class TombstoneReports:
    """The latest per-tombstone report of each SDS: volume id -> chunks left."""

    def __init__(self) -> None:
        self.by_sds: dict[int, dict[int, int]] = {}

    def report(self, sds_id: int, tombstones: list[dict[str, int]] | None) -> None:
        if tombstones is not None:
            self.by_sds[sds_id] = {int(t["id"]): int(t["chunks_left"]) for t in tombstones}

    def report_view(self, sds_id: int, tombstones: Mapping[int, Tombstone]) -> None:
        """An SDS's whole set of tombstones, as its heartbeats left it."""
        self.by_sds[sds_id] = {v: t.chunks_left for v, t in tombstones.items()}

    def freed_by(self, sds_id: int, volume_id: int) -> bool:
        return self.by_sds.get(sds_id, {}).get(volume_id) == 0


async def pool_tombstones(session: AsyncSession, pool_ids: list[int]) -> dict[int, dict[str, int]]:
    """Per pool, the tombstones its map carries: ``{str(volume id): epoch}``."""
    out: dict[int, dict[str, int]] = {p: {} for p in pool_ids}
    rows = await session.execute(
        select(Volume.pool_id, Volume.id, Volume.deleted_epoch).where(
            Volume.pool_id.in_(pool_ids), Volume.state == VolumeState.DELETING
        )
    )
    for pool_id, vid, epoch in rows:
        out[pool_id][str(vid)] = int(epoch or 0)
    return out


async def purge_freed(session: AsyncSession, reports: TombstoneReports) -> list[int]:
    """Remove the deleting volumes that every SDS of their pool reports freed; bump
    those pools' map epochs (the tombstone leaves the map). Returns the ids purged."""
    rows = (
        await session.execute(
            select(Volume.id, Volume.pool_id, Volume.name).where(
                Volume.state == VolumeState.DELETING
            )
        )
    ).all()
    if not rows:
        return []
    members: dict[int, set[int]] = {}
    for pool_id, sds_id in await session.execute(
        select(Device.pool_id, Device.sds_id).where(Device.pool_id.in_({r.pool_id for r in rows}))
    ):
        members.setdefault(pool_id, set()).add(sds_id)
    done = [
        (vid, pool_id, name)
        for vid, pool_id, name in rows
        if all(reports.freed_by(sds, vid) for sds in members.get(pool_id, ()))
    ]
    if not done:
        return []
    ids = [vid for vid, _, _ in done]
    await session.execute(delete(VolumeUsage).where(VolumeUsage.volume_id.in_(ids)))
    await session.execute(delete(Volume).where(Volume.id.in_(ids)))
    for pool_id in {p for _, p, _ in done}:
        await session.execute(
            update(StoragePool)
            .where(StoragePool.id == pool_id)
            .values(map_epoch=StoragePool.map_epoch + 1)
        )
    for vid, pool_id, name in done:
        log.info("volume %s (id %d) purged: every SDS of pool %d freed it", name, vid, pool_id)
    return ids


class Purger:
    """Once a second, purges the deleting volumes whose chunks are all freed (and
    reconciles the store with what components report: :mod:`meshblock.mdm.reconcile`)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        gate: WriteGate,
        notifier: EpochNotifier,
        reports: TombstoneReports,
        reported: Reported,
        tree_gc: TreeGcReports | None = None,
    ) -> None:
        self._sessions = sessions
        self._gate = gate
        self._notifier = notifier
        self._reports = reports
        self._reported = reported
        self._tree_gc = tree_gc
        self._tree_gc_seen = -1  # the reports' generation the last drop pass saw

    async def once(self) -> list[int]:
        epoch = 0
        # What components report after a database restore first (its tombstones), in
        # its own transaction: a failure there never stops the purge.
        # What the pass takes goes back if it fails (Reported.give_back): nothing awaits
        # between the copy and reconcile() taking it.
        taken: Reported | None = None
        try:
            async with writing(self._gate, self._sessions) as s:
                taken = self._reported.taken()
                if await reconcile(s, self._reported):
                    epoch = await bump(s)
        except Exception:
            if taken is not None:
                self._reported.give_back(taken)
            log.exception("could not reconcile what components report; retrying")
        async with writing(self._gate, self._sessions) as s:
            purged = await purge_freed(s, self._reports)
            if purged:
                epoch = await bump(s)
        gc = self._tree_gc
        if gc is not None and gc.generation != self._tree_gc_seen:
            # In its own transactions, and none while no SDS reports a version freed: a
            # failure never holds back the purge's epoch, and the next pass looks again.
            # The trees with a version to drop are found in a read transaction; a write
            # one (the gate, the fence) only for them, where they are looked at again.
            seen, dropped = gc.generation, 0
            try:
                trees: list[int] = []
                if gc.freed_somewhere():
                    async with self._sessions() as s, s.begin():
                        trees = await collectable(s, gc)
                if trees:
                    async with writing(self._gate, self._sessions) as s:
                        if await drop_collected(s, gc, trees):
                            dropped = await bump(s)
                self._tree_gc_seen = seen
            except Exception:
                log.exception("could not drop the freed versions of snapshot trees; retrying")
            epoch = dropped or epoch
        if epoch:
            self._notifier.publish(epoch)
        return purged

    async def run(self) -> None:
        while True:
            await stopping.pause(PURGE_INTERVAL_S)
            try:
                await self.once()
            except Exception:
                log.exception("could not purge deleted volumes; retrying")
