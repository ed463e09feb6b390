"""Capacity accounting of storage pools.

- ``total``: the capacity of the pool's devices (a failed device does not count);
- ``spare``: ``spare_percent`` of the total, held back so that the loss of an SDS can
  be rebuilt;
- ``usable = total - spare``;
- ``thick_reserved``: twice the size of every active thick volume (two copies),
  reserved at creation;
- ``thin_used``: the chunks of thin volumes, and of deleting volumes of either type
  until the SDSs have freed them, that SDSs report stored, every copy counted, times
  the chunk size;
- ``free = usable - thick_reserved - thin_used`` (never below zero).

A thick volume fits when twice its size is at most ``free``. Thin volumes may be
over-committed: they take space as they are written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.models import (
    Device,
    DeviceState,
    StoragePool,
    Volume,
    VolumeState,
    VolumeType,
    VolumeUsage,
)

CHUNK_BYTES = 1 << 20
COPIES = 2


@dataclass(frozen=True)
class PoolCapacity:
    pool_id: int
    total_bytes: int
    spare_bytes: int
    usable_bytes: int
    thick_reserved_bytes: int
    thin_used_bytes: int
    allocated_bytes: int
    free_bytes: int
    used_percent: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compute(
    pool_id: int, spare_percent: int, total: int, thick_size: int, thin_chunks: int
) -> PoolCapacity:
    spare = total * spare_percent // 100
    usable = total - spare
    thick_reserved = COPIES * thick_size
    thin_used = thin_chunks * CHUNK_BYTES
    allocated = thick_reserved + thin_used
    free = max(0, usable - allocated)
    used_percent = round(100.0 * allocated / usable, 2) if usable else 0.0
    return PoolCapacity(
        pool_id, total, spare, usable, thick_reserved, thin_used, allocated, free, used_percent
    )


async def pool_capacities(
    session: AsyncSession, pool_ids: list[int] | None = None
) -> dict[int, PoolCapacity]:
    """Capacity of the given pools (all when None), in four grouped queries."""
    pools_q = select(StoragePool.id, StoragePool.spare_percent)
    if pool_ids is not None:
        pools_q = pools_q.where(StoragePool.id.in_(pool_ids))
    pools = dict((await session.execute(pools_q)).all())
    if not pools:
        return {}
    ids = list(pools)
    total = dict(
        (
            await session.execute(
                select(Device.pool_id, func.sum(Device.capacity_bytes))
                .where(Device.pool_id.in_(ids), Device.state != DeviceState.FAILED)
                .group_by(Device.pool_id)
            )
        ).all()
    )
    thick = dict(
        (
            await session.execute(
                select(Volume.pool_id, func.sum(Volume.size_bytes))
                .where(
                    Volume.pool_id.in_(ids),
                    Volume.type == VolumeType.THICK,
                    Volume.state == VolumeState.ACTIVE,
                )
                .group_by(Volume.pool_id)
            )
        ).all()
    )
    thin = dict(
        (
            await session.execute(
                select(Volume.pool_id, func.sum(VolumeUsage.chunks))
                .join(VolumeUsage, VolumeUsage.volume_id == Volume.id)
                .where(
                    Volume.pool_id.in_(ids),
                    (Volume.type == VolumeType.THIN) | (Volume.state == VolumeState.DELETING),
                )
                .group_by(Volume.pool_id)
            )
        ).all()
    )
    return {
        pid: _compute(
            pid, spare, int(total.get(pid) or 0), int(thick.get(pid) or 0), int(thin.get(pid) or 0)
        )
        for pid, spare in pools.items()
    }


async def pool_capacity(session: AsyncSession, pool_id: int) -> PoolCapacity:
    return (await pool_capacities(session, [pool_id]))[pool_id]


async def volume_allocated(session: AsyncSession, volumes: list[Volume]) -> dict[int, int]:
    """Bytes each volume takes in its pool (thick: reservation; thin: written copies)."""
    thin_ids = [v.id for v in volumes if _by_chunks(v)]
    chunks: dict[int, int] = {}
    if thin_ids:
        chunks = {
            vid: int(n or 0)
            for vid, n in (
                await session.execute(
                    select(VolumeUsage.volume_id, func.sum(VolumeUsage.chunks))
                    .where(VolumeUsage.volume_id.in_(thin_ids))
                    .group_by(VolumeUsage.volume_id)
                )
            )
        }
    return {
        v.id: chunks.get(v.id, 0) * CHUNK_BYTES if _by_chunks(v) else COPIES * v.size_bytes
        for v in volumes
    }


def _by_chunks(v: Volume) -> bool:
    """Counted by the chunks stored: thin volumes, and deleting ones until freed."""
    return v.type == VolumeType.THIN or v.state == VolumeState.DELETING
