"""Requests about a volume deleted while they were in progress: the SDS's request
handler (meshblock.sds.io_path.DataService) driven directly, with a real store, and
the volume's tombstone added in the window between the dispatch check and the write
(docs/sds.md, "Tombstones")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import TOMBSTONE_CAPACITY, ChunkStore, DeviceSpec
from meshblock.wire.protocol import REQUEST_MAGIC, Op, Request, Status

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
POOL, PG_COUNT, VOLUME = 3, 4, 5
ME, DEVICE, OTHER = 2, 20, (1, 10)


class Replies:
    """Stands in for the client's connection: records each reply (request id, status)."""

    allowed = frozenset(int(op) for op in Op)
    role = "client"

    def __init__(self) -> None:
        self.got: list[tuple[int, int]] = []

    def reply(
        self,
        request_id: int,
        status: int,
        epoch: int,
        flags: int = 0,
        payload: object = None,
        length: int = -1,
    ) -> None:
        self.got.append((request_id, int(status)))


def _map(role: str, epoch: int = 1, tombstones: dict[int, int] | None = None) -> PgMap:
    """Us as the secondary of clean PGs, or the primary of degraded ones (alone)."""
    if role == "secondary":
        primary, secondary, clean = OTHER, (ME, DEVICE), True
    else:
        primary, secondary, clean = (ME, DEVICE), (0, 0), False
    return PgMap(
        pool_id=POOL,
        epoch=epoch,
        pg_count=PG_COUNT,
        primary=(primary,) * PG_COUNT,
        secondary=(secondary,) * PG_COUNT,
        sds={1: ("127.0.0.1", 1), ME: ("127.0.0.1", 2)},
        doc={},
        clean=(clean,) * PG_COUNT,
        tombstones=tombstones or {},
    )


@pytest.mark.parametrize("role", ["secondary", "primary"])
def test_write_waiting_for_a_free_slot_when_the_delete_lands_answers_deleted(
    tmp_path: Path, role: str
) -> None:
    """A write of a new chunk passes the dispatch check, then waits for the sync that
    frees a slot; meanwhile the volume's tombstone is added. The write must be
    answered DELETED (not left without a reply until the peer's timeout) and
    nothing of it stored."""

    async def main() -> None:
        path = str(tmp_path / "dev.img")
        store = ChunkStore([DeviceSpec(path, 4 * MiB, "pool")])
        store.open()
        try:
            sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
            sds.set_identity(ME, {path: (DEVICE, POOL)})
            sds.maps.update(_map(role))
            svc = DataService(sds, Resync(sds))
            dev = store.devices[0]
            full = dev.slot_count
            for chunk in range(full):
                store.write(dev, VOLUME, chunk, 0, b"\x01" * 4096)
            store.zero(VOLUME, 0, 0, CHUNK_SIZE)  # its slot is free only after a sync
            new = full  # a chunk with no slot yet
            assert store.needs_reclaim(dev, VOLUME, new)

            conn = Replies()
            op = Op.REPL_WRITE if role == "secondary" else Op.WRITE
            pg = pg_of(VOLUME, new, PG_COUNT)
            req = Request(REQUEST_MAGIC, int(op), 0, 0, 77, POOL, pg, 1, VOLUME, new, 0, 4096)
            svc.handle(conn, req, memoryview(b"\x02" * 4096))
            assert conn.got == []  # waiting for the reclaim
            await store.add_tombstones({VOLUME: 2})  # the delete lands in the window

            await wait_until_async(lambda: conn.got, 10, "the reply to the write")
            assert conn.got == [(77, Status.DELETED)]
            assert store.location(VOLUME, new) is None
            assert store.tombstone_chunks_left(VOLUME) == full - 1
            await svc.drain()
        finally:
            store.close()

    asyncio.run(main())


def test_a_full_tombstone_table_holds_back_neither_the_free_nor_later_deletes(
    tmp_path: Path,
) -> None:
    """The store's table is full of durable tombstones (an SDS in maintenance while
    thousands of volumes were deleted), the chunks of one of them not freed yet, and
    the map carries two more deletes. The durable ones are freed all the same; the two
    are refused meanwhile and made durable, the oldest delete first, as purges make
    room; then their chunks are freed too."""

    async def main() -> None:
        path = str(tmp_path / "dev.img")
        store = ChunkStore([DeviceSpec(path, 16 * MiB, "pool")])
        store.open()
        try:
            sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
            sds.set_identity(ME, {path: (DEVICE, POOL)})
            svc = DataService(sds, Resync(sds))
            dev = store.devices[0]
            for volume, chunks in ((1, 3), (9001, 2), (9002, 1)):
                for chunk in range(chunks):
                    store.write(dev, volume, chunk, 0, b"\x03" * 4096)
            full = {v: 1 for v in range(1, TOMBSTONE_CAPACITY + 1)}
            await store.add_tombstones(full)  # durable; volume 1's chunks still here
            tomb = sds.tombstones

            sds.maps.update(_map("secondary", 2, full | {9001: 9, 9002: 8}))
            await tomb.step()
            assert store.tombstone_chunks_left(1) == 0
            assert tomb.waiting == 2 and tomb.deleted(9001) and tomb.deleted(9002)
            assert not store.is_tombstoned(9001) and not store.is_tombstoned(9002)
            conn = Replies()
            hdr = (REQUEST_MAGIC, int(Op.READ), 0, 0, 5, POOL, pg_of(9001, 0, PG_COUNT), 2)
            svc.handle(conn, Request(*hdr, 9001, 0, 0, 4096), memoryview(b""))
            assert conn.got == [(5, Status.DELETED)]
            assert {t["id"] for t in tomb.report()} == set(full)  # not reported yet

            # The MDM purged volume 1: room for one, the older delete (epoch 8).
            del full[1]
            sds.maps.update(_map("secondary", 3, full | {9001: 9, 9002: 8}))
            await tomb.step()
            assert not store.is_tombstoned(1) and not tomb.deleted(1)
            assert store.is_tombstoned(9002) and store.tombstone_chunks_left(9002) == 0
            assert not store.is_tombstoned(9001) and tomb.deleted(9001) and tomb.waiting == 1

            del full[2]
            sds.maps.update(_map("secondary", 4, full | {9001: 9, 9002: 8}))
            await tomb.step()
            assert store.is_tombstoned(9001) and store.tombstone_chunks_left(9001) == 0
            assert tomb.waiting == 0 and dev.used == 0
        finally:
            store.close()

    asyncio.run(main())
