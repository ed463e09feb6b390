"""After a database restore: the MDM catches up with what the SDSs and SDCs have seen.

An older copy of the MDM's database put back (``meshblock-mdm restore``, or a file
copied back) knows fewer volumes and lower epochs than the cluster has seen. The
components report what they hold: an SDS per heartbeat the highest cluster epoch it
was told, its map epochs, the volumes it stores chunks of and its tombstones; an SDC
its cluster epoch. Once a second :func:`reconcile`, in a write transaction of its
own (apart from the purge of deleted volumes, which a failure here never stops):

- raises each pool's map epoch above the highest an SDS reports (an SDS ignores a map
  older than its own, and would go on serving by the newer one it has);
- raises the cluster epoch above the highest an SDS or SDC reports (an SDC ignores
  older maps too);
- the first time either shows the database restored, raises every pool's mappings
  epoch by :data:`~meshblock.mdm.backup.EPOCH_MARGIN`, as ``meshblock-mdm restore``
  does: an SDS keeps only a mappings document newer than its own (sds/access.py), and
  the mappings made after the copy was taken moved the epochs it holds past the copy's,
  so a mapping made now would not reach it and its client IO would be refused.

The volumes are reconciled against an SDS's report while the database is marked
restored: ``meshblock-mdm restore`` writes one ``restore_pending`` row per SDS the copy
knows (and raises ids and epochs by a wide margin: mdm/backup.py); a reported epoch
above the store's (a file copied back by hand) marks the database restored for the life
of the process. Then, for the SDSs not yet reconciled, it:

- raises the volume id counter above every volume id reported, so no id that names
  chunks anywhere is handed out again;
- tombstones the volumes that SDSs store chunks of but the database does not know
  (created after the copy was taken): they come back in state ``deleting``, named
  ``unknown-<id>``, in the pool of the reporting SDS's device, and are freed and
  purged like any deleted volume;
- puts in state ``deleting`` a volume that an SDS holds a tombstone of (deleted after
  the copy was taken: its data is being freed), and unmaps it, only if that SDS has a
  device in the volume's pool and the tombstone's epoch is above the pool's map epoch
  in the copy (``restore_pool_epochs``, or the one before a reported epoch raised it).

An SDS's ``restore_pending`` row goes once its report is reconciled; once none is
left, the database has caught up. The reports are kept in memory; a pass that fails
(its transaction does not commit) gives back what it took (:meth:`Reported.give_back`):
an SDS reports its epochs only when they change, so they would not come again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.backup import EPOCH_MARGIN
from meshblock.mdm.epochs import CLUSTER_ROW_ID, current
from meshblock.mdm.heartbeats import SdsView
from meshblock.mdm.idcounters import highest_id, raise_id_counter
from meshblock.mdm.models import (
    Cluster,
    Device,
    Mapping,
    RestorePending,
    RestorePoolEpoch,
    StoragePool,
    Volume,
    VolumeState,
    VolumeType,
)

log = logging.getLogger(__name__)

UNKNOWN_VOLUME_BYTES = 1 << 20
#: A reported volume id more than this above the highest id the database has handed
#: out is no evidence of a restore (no restore loses a million volumes): a broken or
#: hostile SDS (or a fuzzer) reporting volume 2^31-1 would otherwise push the id counter
#: to the end of what the API addresses, and every later create would fail.
PLAUSIBLE_ID_GAP = 1 << 20


@dataclass
class Reported:
    """The newest of what components reported, not yet reconciled."""

    map_epochs: dict[int, int] = field(default_factory=dict)  # pool -> highest seen
    cluster_epoch: int = 0
    reporters: set[int] = field(default_factory=set)  # SDSs that reported since
    # What each SDS holds, as its heartbeats told (mdm/heartbeats.py): its volumes and
    # tombstones are read from here for the SDSs being reconciled.
    views: dict[int, SdsView] = field(default_factory=dict)
    # Set for the process's life once a component reported an epoch above the store's:
    # the database was restored from an older copy. Volumes are reconciled only then
    # (a volume id that no row names is otherwise not evidence of anything).
    restored: bool = False
    # Each pool's map epoch before a reported epoch raised it (the hand-copied case).
    pool_epochs_before: dict[int, int] = field(default_factory=dict)

    def sds(self, sds_id: int, epoch: int | None, map_epochs: list[tuple[int, int]]) -> None:
        """An SDS's heartbeat: the epochs it reported (those that changed, in a
        heartbeat that carries what changed); its state is in :attr:`views`."""
        self.epoch(epoch)
        self.reporters.add(sds_id)
        for pool, e in map_epochs:
            if e > self.map_epochs.get(pool, 0):
                self.map_epochs[pool] = e

    def taken(self) -> Reported:
        """A copy of what :func:`reconcile` takes (and clears) when it starts: for
        :meth:`give_back` if its pass fails (an SDS reports its epochs only when they
        change, so a report lost with a failed pass would never come again)."""
        return Reported(
            map_epochs=dict(self.map_epochs),
            cluster_epoch=self.cluster_epoch,
            reporters=set(self.reporters),
            restored=self.restored,
            pool_epochs_before=dict(self.pool_epochs_before),
        )

    def give_back(self, taken: Reported) -> None:
        """Undo a failed pass that started from ``taken``: its reports join those that
        came since, and what the pass set in memory (``restored``, the pools' epochs
        before it raised them) is as it was, since its transaction did not commit."""
        for pool, e in taken.map_epochs.items():
            if e > self.map_epochs.get(pool, 0):
                self.map_epochs[pool] = e
        self.epoch(taken.cluster_epoch)
        self.reporters |= taken.reporters
        self.restored = taken.restored
        self.pool_epochs_before = taken.pool_epochs_before

    def epoch(self, epoch: int | None) -> None:
        """An SDS's or SDC's cluster epoch."""
        if epoch is not None and epoch > self.cluster_epoch:
            self.cluster_epoch = epoch

    def held_by(self, sds_ids: set[int]) -> tuple[dict[int, set[int]], dict[int, dict[int, int]]]:
        """Of these SDSs: volume -> the SDSs storing chunks of it; volume -> {SDS:
        epoch of the delete whose tombstone it holds (0: not said)}."""
        volumes: dict[int, set[int]] = {}
        tombstones: dict[int, dict[int, int]] = {}
        for sds_id in sds_ids:
            view = self.views.get(sds_id)
            if view is None:
                continue
            for v, n in view.volumes.items():
                if n:
                    volumes.setdefault(v, set()).add(sds_id)
            for v, t in view.tombstones.items():
                tombstones.setdefault(v, {})[sds_id] = t.epoch
        return volumes, tombstones


async def reconcile(session: AsyncSession, r: Reported) -> bool:
    """Apply ``r`` (see the module's docstring) and clear it; True if anything changed."""
    changed = False
    was_restored = r.restored
    map_epochs, r.map_epochs = r.map_epochs, {}
    cluster_epoch, r.cluster_epoch = r.cluster_epoch, 0
    reporters, r.reporters = r.reporters, set()
    pools = {p.id: p for p in (await session.execute(select(StoragePool))).scalars()}
    for pool_id, seen in map_epochs.items():
        pool = pools.get(pool_id)
        if pool is not None and pool.map_epoch < seen:
            log.warning(
                "pool %s: map epoch raised from %d to %d, above the %d an SDS has seen "
                "(the database was restored from an older copy?)",
                pool.name,
                pool.map_epoch,
                seen + 1,
                seen,
            )
            r.pool_epochs_before.setdefault(pool.id, pool.map_epoch)
            pool.map_epoch = seen + 1
            changed = r.restored = True
    if cluster_epoch and await current(session) < cluster_epoch:
        log.warning(
            "cluster epoch raised to %d, above the %d an SDC has seen (database restored?)",
            cluster_epoch + 1,
            cluster_epoch,
        )
        await session.execute(
            update(Cluster).where(Cluster.id == CLUSTER_ROW_ID).values(epoch=cluster_epoch)
        )
        changed = r.restored = True
    if r.restored and not was_restored:
        log.warning("every pool's mappings epoch raised by %d (database restored)", EPOCH_MARGIN)
        for pool in pools.values():
            pool.mappings_epoch += EPOCH_MARGIN
    pending = set((await session.execute(select(RestorePending.sds_id))).scalars())
    acting = set(reporters) if r.restored else reporters & pending
    if acting & pending:
        await session.execute(delete(RestorePending).where(RestorePending.sds_id.in_(acting)))
        left = len(pending - acting)
        log.warning(
            "after the restore: reconciled the report of SDS %s; %d SDS(s) not yet reported",
            ", ".join(str(i) for i in sorted(acting & pending)),
            left,
        )
        changed = True
    volumes, tombstones = r.held_by(acting)
    reported = set(volumes) | set(tombstones)
    if not reported:
        return changed
    conn = await session.connection()
    limit = await highest_id(conn, "volumes") + PLAUSIBLE_ID_GAP
    implausible = {v for v in reported if v > limit}
    if implausible:
        log.warning(
            "reported volume ids ignored, more than %d above the highest id handed out: %s",
            PLAUSIBLE_ID_GAP,
            ", ".join(str(v) for v in sorted(implausible)[:10]),
        )
        volumes = {v: s for v, s in volumes.items() if v not in implausible}
        tombstones = {v: s for v, s in tombstones.items() if v not in implausible}
        reported -= implausible
        if not reported:
            return changed
    rows = await session.execute(select(Volume.id, Volume.state).where(Volume.id.in_(reported)))
    backup_epochs: dict[int, int] = dict(
        (await session.execute(select(RestorePoolEpoch.pool_id, RestorePoolEpoch.map_epoch))).all()
    )
    known = dict(rows.all())
    await raise_id_counter(conn, "volumes", max(reported))
    for vid, by in sorted(volumes.items()):
        if vid in known:
            continue
        sds_id = min(by & acting)
        dev_pool = (
            await session.execute(
                select(Device.pool_id).where(Device.sds_id == sds_id).order_by(Device.id).limit(1)
            )
        ).scalar()
        pool = pools.get(dev_pool) if dev_pool is not None else None
        if pool is None:
            continue
        pool.map_epoch += 1
        session.add(
            Volume(
                id=vid,
                name=f"unknown-{vid}",
                pool_id=pool.id,
                type=VolumeType.THIN,
                size_bytes=UNKNOWN_VOLUME_BYTES,
                state=VolumeState.DELETING,
                deleted_epoch=pool.map_epoch,
            )
        )
        known[vid] = VolumeState.DELETING
        log.warning(
            "volume %d: SDS %d stores chunks of it, the database does not know it "
            "(restored from an older copy?): tombstoned in pool %s at map epoch %d",
            vid,
            sds_id,
            pool.name,
            pool.map_epoch,
        )
        changed = True
    for vid in sorted(tombstones):
        if known.get(vid) == VolumeState.ACTIVE:
            v = await session.get(Volume, vid)
            assert v is not None
            before = backup_epochs.get(v.pool_id, r.pool_epochs_before.get(v.pool_id))
            if before is None:
                continue  # no epoch of the backup to tell a newer delete by
            # Only an SDS that stores the volume's pool may say it was deleted, and only
            # a delete newer than the backup counts.
            said = [i for i, epoch in tombstones[vid].items() if epoch > before]
            holders = (
                await session.execute(
                    select(Device.id)
                    .where(Device.pool_id == v.pool_id, Device.sds_id.in_(said))
                    .limit(1)
                )
            ).scalar()
            if holders is None:
                log.warning(
                    "volume %s (id %d): a tombstone reported by SDS %s ignored (no device "
                    "in its pool, or not newer than the backup's map epoch %d)",
                    v.name,
                    vid,
                    ", ".join(str(i) for i in sorted(tombstones[vid])),
                    before,
                )
                continue
            pool = pools[v.pool_id]
            pool.map_epoch += 1
            await session.execute(delete(Mapping).where(Mapping.volume_id == vid))
            v.state = VolumeState.DELETING
            v.deleted_epoch = pool.map_epoch
            log.warning(
                "volume %s (id %d): an SDS holds its tombstone, it was deleted after the "
                "database's copy was taken: deleting it again",
                v.name,
                vid,
            )
            changed = True
    await session.flush()
    return changed
