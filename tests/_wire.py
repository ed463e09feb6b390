"""Helpers of the data protocol's tests: the handshake run in memory, and the SDS's
data server in this process on a real store file."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.server import DataServer
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec
from meshblock.wire.handshake import ClientHandshake, ServerHandshake
from meshblock.wire.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION

SECRET = "wire-test-secret"
POOL, PG_COUNT, EPOCH = 5, 16, 3


def exchange(client: ClientHandshake, server: ServerHandshake) -> tuple[str | None, bytes]:
    """Run both sides of a handshake against each other, each reading what the other
    sent in the sizes it asks for (``need``), until neither can go on. Returns the
    server's reason to close (None: it went on to the end) and every byte sent, both
    ways. The client's errors are raised."""
    c2s = bytearray(client.hello())
    s2c = bytearray()
    transcript = bytearray(c2s)
    reason: str | None = None
    while True:
        if reason is None and server.need and len(c2s) >= server.need:
            n = server.need
            out, reason = server.feed(memoryview(bytes(c2s[:n])))
            del c2s[:n]
            s2c += out
            transcript += out
        elif client.need and len(s2c) >= client.need:
            n = client.need
            out = client.feed(memoryview(bytes(s2c[:n])))
            del s2c[:n]
            c2s += out
            transcript += out
        else:
            return reason, bytes(transcript)


@asynccontextmanager
async def sds_server(
    tmp_path: Path,
    sds_id: int = 1,
    *,
    max_version: int = PROTOCOL_VERSION,
    min_version: int = MIN_PROTOCOL_VERSION,
    checksums: bool = True,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[DataServer, SdsState]]:
    """The data server of SDS ``sds_id``, primary of every PG of pool ``POOL`` (no
    secondary), speaking protocol versions ``min_version`` to ``max_version``, and
    its state; ``checksums``: the store's ``[store] checksums``."""
    spec = DeviceSpec(str(tmp_path / "dev.img"), 1 << 30, "pool")  # sparse
    store = ChunkStore([spec], checksums=checksums)
    store.open()
    maps = MapCache()
    maps.update(
        PgMap(
            pool_id=POOL,
            epoch=EPOCH,
            pg_count=PG_COUNT,
            primary=((1, 10),) * PG_COUNT,
            secondary=((0, 0),) * PG_COUNT,  # degraded: no secondary
            sds={1: ("127.0.0.1", 0)},
            doc={},
        )
    )
    sds = SdsState(store, maps, Peers(SECRET, 5.0), SdsStats())
    sds.set_identity(sds_id, {str(tmp_path / "dev.img"): (10, POOL)})
    service = DataService(sds, Resync(sds))
    server = DataServer(service, SECRET, max_version=max_version, min_version=min_version, tls=tls)
    await server.start("127.0.0.1", 0)
    try:
        yield server, sds
    finally:
        await server.stop()
        store.close()
