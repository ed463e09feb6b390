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
from collections.abc import Collection, Sequence
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm import pgtable
from meshblock.mdm.models import Device, PgState, Sds, SdsMode
from meshblock.mdm.pgtable import PgChange, PgRow

log = logging.getLogger(__name__)


async def after_unclean_start(s: AsyncSession, sds: Sds, device_ids: set[int]) -> int:
    """Make every PG with a copy on ``device_ids`` (devices of ``sds`` that started
    uncleanly) get a full copy from its other copy; return how many PGs changed.
    Load, decide (:func:`decide`), write."""
    if not device_ids:
        return 0
    rows = await pgtable.load(s, devices=device_ids)
    changes = decide(rows, device_ids, in_maintenance=sds.mode == SdsMode.MAINTENANCE)
    for pool, pool_changes in await pgtable.write_pools(s, changes):
        log.warning(
            "pool %s: SDS %s started after an unclean stop: %d PG(s) get a full copy "
            "from their other copy (map epoch %d)",
            pool.name,
            sds.name,
            len(pool_changes),
            pool.map_epoch,
        )
    return len(changes)


def decide(rows: Sequence[PgRow], unclean: Collection[int], in_maintenance: bool) -> list[PgChange]:
    """The changes that give every PG with a copy on the ``unclean`` devices a full
    copy from its other copy (the rules above), pure. ``in_maintenance``: the SDS of
    those devices is in maintenance (its unclean secondaries are dropped)."""
    changes = []
    for row in rows:
        after = _full_copy(row, unclean, in_maintenance)
        if after != row:
            changes.append(PgChange(row, after))
    return changes


def _full_copy(row: PgRow, unclean: Collection[int], in_maintenance: bool) -> PgRow:
    primary, secondary, state = row.primary, row.secondary, row.state
    target, moving = row.target, row.moving
    if target in unclean:
        target, moving = None, None
    if secondary in unclean:
        if in_maintenance:
            secondary, state = None, PgState.DEGRADED  # rebuilt elsewhere by the failure checks
        elif state != PgState.INACTIVE:
            state = PgState.REBUILDING
    elif primary in unclean and state == PgState.CLEAN and secondary is not None:
        primary, secondary, state = secondary, primary, PgState.REBUILDING
    if state != PgState.CLEAN and target is not None:
        target, moving = None, None  # a move needs a clean PG
    return replace(
        row, primary=primary, secondary=secondary, state=state, target=target, moving=moving
    )


async def device_ids_of(s: AsyncSession, sds_id: int, paths: list[str]) -> dict[str, int]:
    """``path -> device id`` of the SDS's devices among ``paths``."""
    rows = await s.execute(
        select(Device.path, Device.id).where(Device.sds_id == sds_id, Device.path.in_(paths))
    )
    return {path: int(i) for path, i in rows}
