"""FUA on an SDS with several devices: the write is durable on the device the bytes
went to (where the chunk lives), also when the PG map names another device of the
SDS. One real data service on loopback with two devices, the store's test fault hook
(meshblock.sds.device_io) simulating the power cut."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.sds import device_io
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.server import DataServer
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec
from meshblock.wire.client import WireClient
from meshblock.wire.protocol import Op, ReqFlag, Status

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

SECRET = "fua-test-secret"
POOL, PG_COUNT, VOLUME, CHUNK = 3, 4, 5, 7
PRIMARY = (1, 10)
ME, DEV_A, DEV_B = 2, 20, 21
PAGE = 4096


def _map(epoch: int, device: int, port: int, role: str) -> PgMap:
    """As ``role`` of every PG, with ``device``: the secondary of clean PGs, or the
    primary of degraded ones (it writes alone)."""
    if role == "secondary":
        primary, secondary, clean = PRIMARY, (ME, device), True
    else:
        primary, secondary, clean = (ME, device), (0, 0), False
    return PgMap(
        pool_id=POOL,
        epoch=epoch,
        pg_count=PG_COUNT,
        primary=(primary,) * PG_COUNT,
        secondary=(secondary,) * PG_COUNT,
        sds={1: ("127.0.0.1", 1), ME: ("127.0.0.1", port)},
        doc={},
        clean=(clean,) * PG_COUNT,
    )


@pytest.fixture
def fault_hook() -> Iterator[device_io.FaultHook]:
    hook = device_io.install_fault_hook()
    yield hook
    device_io.uninstall_fault_hook()


@pytest.mark.parametrize("role", ["secondary", "primary"])
def test_fua_write_survives_a_power_cut_on_the_device_the_chunk_lives_on(
    tmp_path: Path, fault_hook: device_io.FaultHook, role: str
) -> None:
    """The chunk lives on device A; the map then names device B for its PG (a move
    between two devices of this SDS). A write with FUA (replicated to us as the
    secondary, or from a client to us as the primary) is acknowledged; after a power
    cut that loses every unsynced page, it reads back."""
    paths = {str(tmp_path / f"dev{d}.img"): (d, POOL) for d in (DEV_A, DEV_B)}
    pg = pg_of(VOLUME, CHUNK, PG_COUNT)
    old, new = b"\x11" * CHUNK_SIZE, b"\x22" * PAGE

    async def main() -> None:
        store = ChunkStore([DeviceSpec(path, 64 << 20, "pool") for path in paths])
        store.open()
        sds = SdsState(store, MapCache(), Peers(SECRET, 5.0), SdsStats())
        sds.set_identity(ME, paths)
        resync = Resync(sds)
        server = DataServer(DataService(sds, resync), SECRET)
        await server.start("127.0.0.1", 0)
        client = Peers(SECRET, 5.0)
        stack = AsyncExitStack()
        try:
            sds.maps.update(_map(1, DEV_A, server.port, role))
            if role == "secondary":
                peer = await client.get(ME, ("127.0.0.1", server.port))
            else:
                peer = await WireClient.connect("127.0.0.1", server.port, SECRET)
                stack.push_async_callback(peer.close)
            op = Op.REPL_WRITE if role == "secondary" else Op.WRITE

            async def write(epoch: int, data: bytes, flags: int) -> int:
                ref = ChunkRef(POOL, pg, epoch, VOLUME, CHUNK)
                return (await peer.submit(op, flags, ref, 0, len(data), data, peer.future())).status

            assert await write(1, old, 0) == Status.OK
            await store.sync()  # the old contents are durable
            loc = store.location(VOLUME, CHUNK)
            assert loc is not None and loc[0].mdm_id == DEV_A

            sds.maps.update(_map(2, DEV_B, server.port, role))
            assert await write(2, new, int(ReqFlag.FUA)) == Status.OK
            fault_hook.restore_unsynced("all")  # the power cut
        finally:
            await stack.aclose()
            await client.close()
            await server.stop()
            await resync.close()
            await sds.peers.close()
        device_io.uninstall_fault_hook()  # the hook keeps its lock: nothing more gets through
        for dev in store.devices:  # the process died: no clean close
            dev.close()

        after = ChunkStore([DeviceSpec(path, 64 << 20, "pool") for path in paths])
        after.open()
        try:
            got = after.read(VOLUME, CHUNK, 0, 2 * PAGE)
            assert got is not None
            assert bytes(got) == new + old[:PAGE], "the FUA write was lost in the power cut"
        finally:
            after.close()

    asyncio.run(main())
