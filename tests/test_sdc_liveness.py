"""The SDC's per-attempt timeout judges an SDS by its progress (sdc/volume_io.py):
an attempt is given up when the SDS's connection has received nothing for the SDS's
budget since the attempt started, not when the attempt itself is older than the
budget. A healthy SDS under load (replies to the requests ahead flowing, a slow FUA
write) is not timed out; a hung one still is, within its budget. In-process: a data
path that answers after a delay and says what its connection last received."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _owner import Owner
from _wait import wait_until_async
from meshblock.chunks import CHUNK_SIZE
from meshblock.nbd.protocol import Cmd, CmdFlag, Errno, RequestError
from meshblock.nbd.server import IoRequest
from meshblock.sdc.datapath import DataPathError, Op, Piece, Reply, ReplyWaiter
from meshblock.sdc.maps import PoolMap, SdsEndpoint, VolumeMapping
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sdc.volume_io import VolumeIO
from meshblock.timeouts import LatencyBudgets

pytestmark = pytest.mark.unit

PG_COUNT = 8
VOLUME = VolumeMapping(7, "v", 1, 64 * CHUNK_SIZE, False, None, None)
BUDGET = 0.2  # the SDSs' budget (no samples: the floor)
POOL = PoolMap(
    pool_id=1,
    epoch=1,
    pg_count=PG_COUNT,
    primaries=tuple(p % 3 for p in range(PG_COUNT)),
    secondaries=tuple((p + 1) % 3 for p in range(PG_COUNT)),
    sds={i: SdsEndpoint(i, "127.0.0.1", 7000 + i) for i in range(3)},
)


class Maps:
    def __init__(self) -> None:
        self.unreachable: list[int] = []

    def pool(self, pool_id: int) -> PoolMap | None:
        return POOL

    async def refresh(self) -> None:
        pass

    def report_unreachable(self, sds_id: int) -> None:
        self.unreachable.append(sds_id)


class Slow:
    """Every SDS answers each request OK after ``delay`` seconds. ``busy``: its
    connection receives other replies all the while (progress is now); otherwise
    it has received nothing since the test began."""

    def __init__(self, delay: float, *, busy: bool) -> None:
        self.delay = delay
        self.busy = busy
        self.begun = time.monotonic()
        self.sent: list[int] = []  # the flags of each request

    @staticmethod
    def _reply(piece: Piece) -> Reply:
        data = memoryview(bytes(piece.length)) if piece.op == Op.READ else memoryview(b"")
        return Reply(0, 0, piece.ref.epoch, data)

    def submit(self, sds: SdsEndpoint, piece: Piece, waiter: ReplyWaiter) -> bool:
        self.sent.append(piece.flags)

        def answer() -> None:
            if not waiter.done():
                waiter.set_result(self._reply(piece))

        asyncio.get_running_loop().call_later(self.delay, answer)
        return True

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        self.sent.append(piece.flags)
        await asyncio.sleep(self.delay)
        return self._reply(piece)

    def progress(self, sds: SdsEndpoint) -> float:
        return time.monotonic() if self.busy else self.begun

    def connects(self, sds: SdsEndpoint) -> int:
        return 1

    def error(self, op: Op, outcome: Reply | BaseException) -> DataPathError:
        return DataPathError("wire", repr(outcome), retriable=False)

    async def close(self) -> None:
        pass


def make_io(path: Slow, maps: Maps, *, attempt_timeout_s: float = 5.0) -> tuple[VolumeIO, Any]:
    metrics = SdcMetrics(CollectorRegistry())
    io = VolumeIO(
        VOLUME,
        maps,
        path,
        metrics.volume(VOLUME.name),
        timeout_s=10.0,
        attempt_timeout_s=attempt_timeout_s,
        budgets=LatencyBudgets(floor=BUDGET, factor=4.0, ceiling=attempt_timeout_s),
    )
    return io, metrics


def write(io: VolumeIO, offset: int, length: int, flags: int = 0) -> asyncio.Future[Any]:
    owner = Owner()
    io.submit(IoRequest(owner, Cmd.WRITE, flags, 0, offset, length, bytearray(length)))
    return owner.answered


def test_a_busy_sds_answering_late_is_not_timed_out() -> None:
    """Replies reach the SDS's connection all the while (the requests ahead of ours):
    a one-chunk write (sent at once) and a two-chunk write (its pieces in a task)
    answered after 5 budgets succeed in one attempt each, and the SDS is not
    reported (before: timed out after 0.2 s, reported, retried)."""

    async def main() -> None:
        path, maps = Slow(5 * BUDGET, busy=True), Maps()
        io, metrics = make_io(path, maps)
        await asyncio.gather(write(io, 0, 4096), write(io, CHUNK_SIZE - 4096, 8192))
        assert maps.unreachable == []
        assert len(path.sent) == 3, path.sent
        timeouts = metrics.registry.get_sample_value(
            "meshblock_sdc_retries_total", {"reason": "timeout"}
        )
        assert not timeouts

    asyncio.run(main())


def test_a_fua_write_waiting_for_a_device_sync_is_not_timed_out() -> None:
    """Nothing else outstanding, a FUA write answered after 5 budgets (the SDS syncs a
    device): it gets the ceiling, one attempt, no report."""

    async def main() -> None:
        path, maps = Slow(5 * BUDGET, busy=False), Maps()
        io, _ = make_io(path, maps)
        await write(io, 0, 4096, int(CmdFlag.FUA))
        await write(io, CHUNK_SIZE - 4096, 8192, int(CmdFlag.FUA))
        assert maps.unreachable == []
        assert len(path.sent) == 3, path.sent

    asyncio.run(main())


def test_a_hung_sds_is_given_up_within_its_budget() -> None:
    """An SDS whose connection receives nothing: its attempt is given up about its
    budget after it started, and it is reported; one whose connection shows progress
    but never answers this request is given up at the ceiling (attempt_timeout_s)."""

    async def given_up_after(busy: bool) -> float:
        path, maps = Slow(3600.0, busy=busy), Maps()
        io, _ = make_io(path, maps, attempt_timeout_s=1.0)
        t0 = time.monotonic()
        answered = write(io, 0, 4096)
        await wait_until_async(lambda: maps.unreachable, 5.0, "the SDS reported")
        took = time.monotonic() - t0
        io.close()  # the retries end: the volume is unmapped
        with pytest.raises(RequestError) as ei:
            await asyncio.wait_for(answered, 5.0)
        assert ei.value.errno == Errno.ESHUTDOWN
        return took

    async def main() -> None:
        took = await given_up_after(busy=False)
        assert BUDGET <= took < 1.0, f"a hung SDS given up after {took:.2f} s"
        took = await given_up_after(busy=True)
        assert 1.0 <= took < 2.5, f"a busy SDS given up after {took:.2f} s"

    asyncio.run(main())
