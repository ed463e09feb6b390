"""Read-only views (docs/snapshots.md, Decision 4): a volume that a map's snapshot tree
says reads a frozen version (``writable: false``) is never written. The SDS refuses
a client's WRITE, WRITE_ZEROES and TRIM of it NOT_PERMITTED at the request's map
epoch, whatever the mapping, and still serves its READs; the SDC exports it read-only
(NBD: writes refused EPERM) even when it is mapped read-write."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from _wait import wait_until_async
from meshblock.chunks import pg_of
from meshblock.sdc.maps import parse_maps
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec
from meshblock.wire.protocol import REQUEST_MAGIC, Op, Request, Status
from test_sds_deleted_requests import Replies

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
POOL, PG_COUNT = 3, 4
ME, DEVICE = 2, 20
TREE, SNAPSHOT, CLONE = 7, 31, 32  # volume 7 writes head 2, 31 reads 1, 32 writes 3


def pool_doc(epoch: int, *, trees: bool = True) -> dict[str, Any]:
    """Us the primary of every PG, degraded (we write alone)."""
    doc: dict[str, Any] = {
        "pool_id": POOL,
        "epoch": epoch,
        "pg_count": PG_COUNT,
        "pgs": [
            {
                "pg": pg,
                "primary": {"sds_id": ME, "device_id": DEVICE},
                "secondary": None,
                "state": "degraded",
            }
            for pg in range(PG_COUNT)
        ],
        "sds": {str(ME): {"address": "127.0.0.1", "data_port": 1}},
    }
    if trees:
        doc["trees"] = {
            str(TREE): {
                "versions": {"0": None, "1": 0, "2": 1, "3": 1},
                "volumes": {
                    str(TREE): {"view": 2, "writable": True},
                    str(SNAPSHOT): {"view": 1, "writable": False},
                    str(CLONE): {"view": 3, "writable": True},
                },
            }
        }
    return doc


def test_the_sds_refuses_client_writes_to_a_read_only_view_and_serves_its_reads(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        path = str(tmp_path / "dev.img")
        store = ChunkStore([DeviceSpec(path, 16 * MiB, "pool")])
        store.open()
        try:
            sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
            sds.set_identity(ME, {path: (DEVICE, POOL)})
            sds.maps.update(PgMap.from_doc(pool_doc(1)))
            assert sds.maps.maps[POOL].read_only == {SNAPSHOT}
            svc = DataService(sds, Resync(sds))
            conn = Replies()
            rid = 0

            def send(op: Op, volume: int, length: int = 4096, epoch: int = 1) -> None:
                nonlocal rid
                rid += 1
                pg = pg_of(volume, 0, PG_COUNT)
                req = Request(
                    REQUEST_MAGIC, int(op), 0, 0, rid, POOL, pg, epoch, volume, 0, 0, 4096
                )
                payload = b"\x05" * length if op == Op.WRITE else b""
                svc.handle(conn, req, memoryview(payload))

            for op in (Op.WRITE, Op.WRITE_ZEROES, Op.TRIM):
                send(op, SNAPSHOT)
            send(Op.READ, SNAPSHOT, 0)
            send(Op.WRITE, CLONE)  # writable volumes of the tree are written
            send(Op.WRITE, TREE)
            await wait_until_async(lambda: len(conn.got) == 6, 10, "the six replies")
            denied = int(Status.NOT_PERMITTED)
            assert sorted(conn.got) == [
                (1, denied),
                (2, denied),
                (3, denied),
                (4, int(Status.OK)),
                (5, int(Status.OK)),
                (6, int(Status.OK)),
            ]
            assert store.location(SNAPSHOT, 0) is None  # nothing of it written
            assert store.location(CLONE, 0) is not None
            # A map in which the volume is no read-only view (the tree not carried):
            # the same write, sent at that epoch, is served.
            sds.maps.update(PgMap.from_doc(pool_doc(2, trees=False)))
            send(Op.WRITE, SNAPSHOT, epoch=2)
            await wait_until_async(lambda: len(conn.got) == 7, 10, "the seventh reply")
            await svc.drain()
            assert conn.got[-1] == (7, int(Status.OK))
        finally:
            store.close()

    asyncio.run(main())


def test_the_sdc_exports_a_read_only_view_read_only_even_when_mapped_read_write() -> None:
    volumes = [
        {"id": v, "name": f"v{v}", "pool_id": POOL, "size_bytes": MiB, "access_mode": mode}
        for v, mode in ((TREE, "read_write"), (SNAPSHOT, "read_write"), (CLONE, "read_only"))
    ]
    doc = {"epoch": 4, "sdc_id": 1, "volumes": volumes, "pools": {str(POOL): pool_doc(1)}}
    maps = parse_maps(doc)
    assert maps.pools[POOL].read_only == {SNAPSHOT}
    assert {v.id: v.read_only for v in maps.volumes.values()} == {
        TREE: False,
        SNAPSHOT: True,  # a snapshot: read-only whatever the mapping says
        CLONE: True,  # mapped read-only
    }
    doc["pools"] = {str(POOL): pool_doc(1, trees=False)}
    assert not parse_maps(doc).volumes[SNAPSHOT].read_only
