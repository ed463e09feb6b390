"""An SDS that starts after an unclean stop (a power cut, a kernel crash, SIGKILL).

Its devices' copies may lack any write that was acknowledged without FUA and not
followed by a completed FLUSH: those sat in its page cache. Its delta record (the
primary's :class:`~meshblock.sds.replication.DegradedWrites`) does not list them, so
a delta resync would leave the PG's two copies different and call it clean. The SDS
says so when it registers (``unclean_devices``: the devices whose superblock lacked
``CLEAN``) and :func:`after_unclean_start`, in the registration's transaction, gives
every PG with a copy on those devices a **full copy from the other copy** (the PG
becomes ``rebuilding`` towards the unclean copy, which the primary then overwrites
chunk by chunk and trims where only it holds a chunk):

- the unclean copy is the secondary (clean, resyncing, degraded or rebuilding PG):
  the PG becomes rebuilding (a full copy from the primary); if the SDS is in
  maintenance, the copy is dropped instead and rebuilt elsewhere (its delta resync
  on exit would not be enough); an inactive PG is left to the failure checks;
- the unclean copy is the primary of a clean PG: primary and secondary swap, the PG
  becomes rebuilding;
- the unclean copy is the primary of a degraded, inactive, resyncing or rebuilding
  PG: unchanged; it is the only in-sync copy, and its restart already makes its
  next copy full (its delta record was in memory);
- the unclean copy is a rebalance target: the move is cancelled (started again).

When both copies of a PG had unclean starts, the first SDS to register hands the
primary role to the other (or keeps it when it is the only in-sync copy); the second
finds itself primary of a PG already rebuilding and keeps it: one copy is picked and
the other made identical to it. Writes acknowledged with FUA or before a completed
FLUSH are on both copies' disks, so whichever copy is picked has them.

The cost: the PG's whole data crosses the network once (the SDS's used bytes in all),
at the pool's rebuild throttle; no write-intent record is kept on disk (see
docs/sds.md, "Power cuts").
"""

from __future__ import annotations

import logging
from collections import defaultdict

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.models import Device, PgState, PlacementGroup, Sds, SdsMode, StoragePool

log = logging.getLogger(__name__)


async def after_unclean_start(s: AsyncSession, sds: Sds, device_ids: set[int]) -> int:
    """Make every PG with a copy on ``device_ids`` (devices of ``sds`` that started
    uncleanly) get a full copy from its other copy; return how many PGs changed."""
    if not device_ids:
        return 0
    ids = list(device_ids)
    pgs = (
        (
            await s.execute(
                select(PlacementGroup).where(
                    or_(
                        PlacementGroup.primary_device_id.in_(ids),
                        PlacementGroup.secondary_device_id.in_(ids),
                        PlacementGroup.target_device_id.in_(ids),
                    )
                )
            )
        )
        .scalars()
        .all()
    )
    changed: dict[int, list[PlacementGroup]] = defaultdict(list)
    for pg in pgs:
        before = (pg.primary_device_id, pg.secondary_device_id, pg.state, pg.target_device_id)
        if pg.target_device_id in device_ids:
            pg.target_device_id, pg.moving = None, None
        if pg.secondary_device_id in device_ids:
            if sds.mode == SdsMode.MAINTENANCE:
                pg.secondary_device_id = None  # rebuilt elsewhere by the failure checks
                pg.state = PgState.DEGRADED
            elif pg.state != PgState.INACTIVE:
                pg.state = PgState.REBUILDING
        elif (
            pg.primary_device_id in device_ids
            and pg.state == PgState.CLEAN
            and pg.secondary_device_id is not None
        ):
            pg.primary_device_id, pg.secondary_device_id = (
                pg.secondary_device_id,
                pg.primary_device_id,
            )
            pg.state = PgState.REBUILDING
        if pg.state != PgState.CLEAN and pg.target_device_id is not None:
            pg.target_device_id, pg.moving = None, None  # a move needs a clean PG
        after = (pg.primary_device_id, pg.secondary_device_id, pg.state, pg.target_device_id)
        if after != before:
            changed[pg.pool_id].append(pg)
    for pool_id, rows in sorted(changed.items()):
        pool = await s.get(StoragePool, pool_id)
        assert pool is not None
        pool.map_epoch += 1
        for pg in rows:
            pg.epoch = pool.map_epoch
        log.warning(
            "pool %s: SDS %s started after an unclean stop: %d PG(s) get a full copy "
            "from their other copy (map epoch %d)",
            pool.name,
            sds.name,
            len(rows),
            pool.map_epoch,
        )
    await s.flush()
    return sum(len(rows) for rows in changed.values())


async def device_ids_of(s: AsyncSession, sds_id: int, paths: list[str]) -> dict[str, int]:
    """``path -> device id`` of the SDS's devices among ``paths``."""
    rows = await s.execute(
        select(Device.path, Device.id).where(Device.sds_id == sds_id, Device.path.in_(paths))
    )
    return {path: int(i) for path, i in rows}
