"""The mappings documents: which SDC may do client IO to which volume of a pool.

Each SDS follows, for every pool it has a device in, the pool's mappings document
(``GET /api/v1/pools/{id}/mappings``, docs/api.md): the pool's active volumes that
are mapped, and per volume the GUIDs of the SDCs they are mapped to and whether
read-only. With TLS identities on the data path the SDS serves client IO only to a
certificate ``sdc:GUID`` the document names for the volume (docs/security.md).

The document is apart from the PG map on purpose: a mapping changes only when an
operator maps, unmaps or changes an access mode, a PG map with every failure,
rebuild and move; keeping them apart, neither change makes a thousand SDSs fetch
the other, and the PG map's own form (incremental or whole) is its own affair.

Its epoch, ``storage_pools.mappings_epoch``, moves with every change of a mapping
of the pool's volumes (:func:`touch`, in the change's transaction); a long-poll
waits for it as the PG map's waits for the map epoch. A document is built once per
mappings epoch (:class:`MappingDocs`) and every pool's mappings epoch is read once
per cluster epoch for all the long-polls woken at it. 10,000 volumes mapped to one SDC
each make a document of 870 KB, 260 KB gzipped (each compressed once per epoch).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm.models import AccessMode, Mapping, Sdc, StoragePool, Volume, VolumeState
from meshblock.mdm.pgmaps import MapDocument


async def touch(session: AsyncSession, volume_id: int) -> None:
    """Move the mappings epoch of the pool of ``volume_id``: a mapping of it changed
    (in the caller's transaction, which bumps the cluster epoch too)."""
    pool_of = select(Volume.pool_id).where(Volume.id == volume_id).scalar_subquery()
    await session.execute(
        update(StoragePool)
        .where(StoragePool.id == pool_of)
        .values(mappings_epoch=StoragePool.mappings_epoch + 1)
    )


async def build(session: AsyncSession, pool_id: int, epoch: int) -> dict[str, Any]:
    """The mappings document of pool ``pool_id`` at mappings epoch ``epoch``."""
    rows = await session.execute(
        select(Volume.id, Sdc.guid, Mapping.access_mode)
        .join(Mapping, Mapping.volume_id == Volume.id)
        .join(Sdc, Sdc.id == Mapping.sdc_id)
        .where(Volume.pool_id == pool_id, Volume.state == VolumeState.ACTIVE)
        .order_by(Volume.id, Sdc.guid)
    )
    volumes: dict[int, list[dict[str, Any]]] = {}
    for volume_id, guid, mode in rows:
        volumes.setdefault(int(volume_id), []).append(
            {"guid": guid, "read_only": mode == AccessMode.READ_ONLY}
        )
    return {
        "pool_id": pool_id,
        "epoch": epoch,
        "volumes": [{"id": v, "sdcs": sdcs} for v, sdcs in volumes.items()],
    }


class MappingDocs:
    """The encoded mappings document of each pool, built once per mappings epoch; and
    every pool's mappings epoch as of a cluster epoch, read in one query for all the
    long-polls that a change wakes (a thousand SDSs follow their pools' documents)."""

    def __init__(self, term: int = 0) -> None:
        self.term = term  # this MDM's leader term, in every document (0: none)
        self._docs: dict[int, MapDocument] = {}  # pool -> its document at its epoch
        self._read_at = -1  # the cluster epoch the epochs were read at (or after)
        self._epochs: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self.builds = 0

    async def epoch(
        self, sessions: async_sessionmaker[AsyncSession], cluster_epoch: int, pool_id: int
    ) -> int | None:
        """Pool ``pool_id``'s mappings epoch at or after ``cluster_epoch`` (the epoch the
        caller has seen published); None: no such pool."""
        if self._read_at < cluster_epoch:
            async with self._lock:
                if self._read_at < cluster_epoch:
                    async with sessions() as s:
                        found = await s.execute(select(StoragePool.id, StoragePool.mappings_epoch))
                        self._epochs = {int(i): int(e) for i, e in found}
                    self._read_at = cluster_epoch
        return self._epochs.get(pool_id)

    async def document(self, session: AsyncSession, pool: StoragePool) -> MapDocument:
        """The document of ``pool`` at the mappings epoch its row carries, encoded (and
        gzipped, on the first request that accepts gzip) once for every SDS that asks.
        Cached only when the epoch read again after the build is still that one (on
        SQLite each statement of a read sees the store as of itself)."""
        epoch = int(pool.mappings_epoch)
        cached = self._docs.get(pool.id)
        if cached is not None and cached.epoch == epoch:
            return cached
        doc = await build(session, pool.id, epoch)
        if self.term:
            doc["term"] = self.term
        made = MapDocument(epoch, doc, json.dumps(doc, separators=(",", ":")).encode())
        self.builds += 1
        again = await session.execute(
            select(StoragePool.mappings_epoch).where(StoragePool.id == pool.id)
        )
        if again.scalar_one_or_none() == epoch:
            self._docs[pool.id] = made
        return made
