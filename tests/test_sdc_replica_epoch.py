"""A failover read (REPLICA) never reads a copy that may miss the SDC's own
acknowledged write (sdc/volume_io.py). A primary that wrote alone acknowledges the
write at its newer map epoch (the PG degraded: the secondary did not get it); the
SDC remembers the highest epoch a reply of its pool carried and sends no REPLICA
read stamped below it: its retry refreshes its maps first, and the newer map says
the PG is not clean. In-process: a data path standing for the primary, which acknowledges
at a newer epoch and then hangs, and a stalled secondary still at the old map, which
would serve the bytes from before the write."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from _owner import Owner
from meshblock.chunks import CHUNK_SIZE
from meshblock.nbd.protocol import Cmd
from meshblock.nbd.server import Chunk, IoRequest
from meshblock.sdc.datapath import REPLICA, DataPathError, Op, Piece, Reply, ReplyWaiter
from meshblock.sdc.maps import PoolMap, SdsEndpoint, VolumeMapping
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sdc.volume_io import VolumeIO
from meshblock.timeouts import LatencyBudgets

pytestmark = pytest.mark.unit

VOLUME = VolumeMapping(7, "v", 1, 4 * CHUNK_SIZE, False, None, None)
OLD, NEW = b"o" * 4096, b"n" * 4096


def pool_map(epoch: int, primary: int, clean: bool) -> PoolMap:
    """One PG: ``primary`` and the other of SDSs 0 and 1 as its secondary."""
    return PoolMap(
        pool_id=1,
        epoch=epoch,
        pg_count=1,
        primaries=(primary,),
        secondaries=(1 - primary,),
        sds={i: SdsEndpoint(i, "127.0.0.1", 7000 + i) for i in range(2)},
        clean=(clean,),
    )


class Maps:
    """The SDC's maps: epoch 1 (SDS 0 primary, clean); each refresh gives the next of
    ``later`` (the MDM's maps after the primary wrote alone)."""

    def __init__(self, later: list[PoolMap]) -> None:
        self.current = pool_map(1, 0, True)
        self.later = later

    def pool(self, pool_id: int) -> PoolMap | None:
        return self.current

    async def refresh(self) -> None:
        if self.later:
            self.current = self.later.pop(0)

    def report_unreachable(self, sds_id: int) -> None:
        pass


class Cluster:
    """SDS 0, the primary, acknowledges writes at map epoch 2 (it wrote alone) and
    then hangs; SDS 1, the secondary, missed the write and, stalled, still has map 1:
    it serves a REPLICA read at epoch 1 (its map says the PG is clean) with the old
    bytes, and a READ as the primary of epoch 3 with the new ones (resynced)."""

    def __init__(self) -> None:
        self.hung = False
        self.sent: list[tuple[int, Op, int, int]] = []  # sds, op, flags, epoch

    def _answer(self, sds: SdsEndpoint, piece: Piece) -> Reply | None:
        self.sent.append((sds.sds_id, piece.op, piece.flags, piece.ref.epoch))
        empty = memoryview(b"")
        if sds.sds_id == 0:
            if self.hung:
                return None
            return Reply(0, 0, 2, empty)
        if piece.op == Op.READ and piece.flags & REPLICA and piece.ref.epoch == 1:
            return Reply(0, 0, 1, memoryview(OLD))
        if piece.op == Op.READ and piece.ref.epoch >= 3:
            return Reply(0, 0, piece.ref.epoch, memoryview(NEW))
        return Reply(2, 0, 1, empty)  # NOT_PRIMARY

    def submit(self, sds: SdsEndpoint, piece: Piece, waiter: ReplyWaiter) -> bool:
        reply = self._answer(sds, piece)
        if reply is not None:
            asyncio.get_running_loop().call_soon(waiter.set_result, reply)
        return True

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        reply = self._answer(sds, piece)
        if reply is None:
            await asyncio.sleep(3600)
            raise AssertionError("not reached")
        if reply.status:
            raise DataPathError("not_primary", "not primary", retriable=True)
        return reply

    def progress(self, sds: SdsEndpoint) -> float:
        return 0.0

    def connects(self, sds: SdsEndpoint) -> int:
        return 1

    def error(self, op: Op, outcome: Reply | BaseException) -> DataPathError:
        return DataPathError("not_primary", "not primary", retriable=True)

    async def close(self) -> None:
        pass


async def serve(io: VolumeIO, cmd: Cmd, data: bytes = b"") -> Sequence[Chunk]:
    owner = Owner()
    payload = bytearray(data) if cmd == Cmd.WRITE else None
    io.submit(IoRequest(owner, cmd, 0, 0, 0, 4096, payload))
    return await owner.answered


def test_a_failover_read_does_not_miss_the_sdcs_own_write() -> None:
    """Write acknowledged at epoch 2 by the primary alone, the primary hangs, the
    SDC's map is still epoch 1 (clean): the read is not sent to the stale secondary
    at epoch 1 (before: it was, and returned the old bytes); the SDC refreshes (epoch
    2: degraded, no failover read) and reads the new bytes once the map of epoch 3
    makes the secondary primary."""

    async def main() -> None:
        later = [pool_map(2, 0, False), pool_map(3, 1, False)]
        maps, cluster = Maps(later), Cluster()
        metrics = SdcMetrics(CollectorRegistry())
        io = VolumeIO(
            VOLUME,
            maps,
            cluster,
            metrics.volume(VOLUME.name),
            timeout_s=10.0,
            attempt_timeout_s=5.0,
            budgets=LatencyBudgets(floor=0.2, factor=4.0, ceiling=5.0),
        )
        await serve(io, Cmd.WRITE, NEW)
        cluster.hung = True
        (data,) = await asyncio.wait_for(serve(io, Cmd.READ), 8.0)
        stale = [s for s in cluster.sent if s[0] == 1 and s[3] < 2]
        assert stale == [], f"sent below the epoch of the write's reply: {stale}"
        assert bytes(data) == NEW

    asyncio.run(main())
