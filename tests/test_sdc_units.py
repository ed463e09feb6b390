"""SDC parts in isolation: IO routing and retries (with injected SDS faults), flush
fan-out, QoS buckets, the nbd-client command lines, configuration and map parsing."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from _owner import Owner
from meshblock.chunks import CHUNK_SIZE, ChunkRef, chunk_span, pg_of
from meshblock.config import ConfigError, from_mapping
from meshblock.nbd.protocol import Cmd, CmdFlag, Errno, RequestError
from meshblock.nbd.server import Chunk, IoRequest
from meshblock.sdc.attach import NbdAttacher
from meshblock.sdc.config import SdcConfig, cluster_secret, sdc_guid
from meshblock.sdc.datapath import (
    CLIENT_CHECKS,
    FUA,
    DataPathError,
    Op,
    Piece,
    Reply,
    ReplyWaiter,
)
from meshblock.sdc.maps import MapError, PoolMap, SdsEndpoint, VolumeMapping, parse_maps
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sdc.qos import TokenBucket
from meshblock.sdc.volume_io import CHECKSUM_ATTEMPTS, MAX_PARALLEL_PIECES, VolumeIO
from meshblock.sdc.wire_path import classify
from meshblock.timeouts import LatencyBudgets
from meshblock.wire import RequestError as WireRequestError
from meshblock.wire import Status
from meshblock.wire.protocol import ReqFlag

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

PG_COUNT = 8
VOLUME = VolumeMapping(7, "v", 1, 64 * CHUNK_SIZE, False, None, None)


def pool_map(epoch: int, shift: int = 0) -> PoolMap:
    """Three SDSs; PG p has primary (p + shift) % 3 and secondary (p + shift + 1) % 3."""
    return PoolMap(
        pool_id=1,
        epoch=epoch,
        pg_count=PG_COUNT,
        primaries=tuple((p + shift) % 3 for p in range(PG_COUNT)),
        secondaries=tuple((p + shift + 1) % 3 for p in range(PG_COUNT)),
        sds={i: SdsEndpoint(i, "127.0.0.1", 7000 + i) for i in range(3)},
    )


class Maps:
    """The SDC's view of the maps; ``after_refresh`` is what the MDM would answer."""

    def __init__(self, current: PoolMap | None) -> None:
        self.current = current
        self.after_refresh: PoolMap | None = None
        self.refreshes = 0
        self.unreachable: list[int] = []

    def pool(self, pool_id: int) -> PoolMap | None:
        return self.current

    async def refresh(self) -> None:
        self.refreshes += 1
        if self.after_refresh is not None:
            self.current, self.after_refresh = self.after_refresh, None

    def report_unreachable(self, sds_id: int) -> None:
        self.unreachable.append(sds_id)


NAMES = {
    Op.READ: "read",
    Op.WRITE: "write",
    Op.WRITE_ZEROES: "write_zeroes",
    Op.TRIM: "trim",
    Op.FLUSH: "flush",
}


class Faulty:
    """A data path that stores chunks in memory and fails as the test injects. What
    it sends at once (``submit``) is answered in the next pass of the event loop, as
    an SDS's reply would be; a fault reaches the waiter as its exception, a refusal
    (a Status) as a reply with that status, classified as the wire path does."""

    def __init__(self) -> None:
        self.chunks: dict[int, bytearray] = {}
        self.calls: list[tuple[str, int, ChunkRef | None, int, int]] = []
        self.flags: list[int] = []  # each request's, as self.calls
        # next failures, in order: an exception, a refusal, or "hang"
        self.faults: list[DataPathError | Status | str] = []
        self.failing_sds: dict[int, DataPathError] = {}
        self.connections: dict[int, int] = {}  # per SDS, connects() (1 unless set)

    def _record(self, sds: SdsEndpoint, piece: Piece) -> DataPathError | Status | str | None:
        """Note the request; the fault it meets, if any."""
        op, flags, ref, off, n, _ = piece
        self.calls.append((NAMES[op], sds.sds_id, None if op == Op.FLUSH else ref, off, n))
        self.flags.append(flags)
        if sds.sds_id in self.failing_sds:
            return self.failing_sds[sds.sds_id]
        return self.faults.pop(0) if self.faults else None

    def _chunk(self, idx: int) -> bytearray:
        return self.chunks.setdefault(idx, bytearray(CHUNK_SIZE))

    def _apply(self, piece: Piece) -> Reply:
        op, _, ref, offset, length, payload = piece
        chunk, end = self._chunk(ref.chunk_index), offset + length
        data = memoryview(b"")
        if op == Op.READ:
            data = memoryview(bytes(chunk[offset:end]))
        elif op == Op.WRITE:
            assert payload is not None and len(payload) == length
            chunk[offset:end] = payload
        elif op in (Op.WRITE_ZEROES, Op.TRIM):
            chunk[offset:end] = bytes(length)
        return Reply(0, 0, ref.epoch, data)

    def submit(self, sds: SdsEndpoint, piece: Piece, waiter: ReplyWaiter) -> bool:
        fault = self._record(sds, piece)

        def reply() -> None:
            if waiter.done():
                return
            if isinstance(fault, Status):
                waiter.set_result(Reply(fault, 0, piece.ref.epoch, memoryview(b"")))
            elif isinstance(fault, DataPathError):
                waiter.set_exception(fault)
            else:
                waiter.set_result(self._apply(piece))

        if fault != "hang":
            asyncio.get_running_loop().call_soon(reply)
        return True

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        fault = self._record(sds, piece)
        await asyncio.sleep(0)
        if fault == "hang":
            await asyncio.sleep(3600)
        if isinstance(fault, Status):
            raise classify(WireRequestError(piece.op, fault, piece.ref.epoch))
        if isinstance(fault, DataPathError):
            raise fault
        return self._apply(piece)

    def progress(self, sds: SdsEndpoint) -> float:
        return 0.0  # nothing received: an attempt is given up after its budget

    def connects(self, sds: SdsEndpoint) -> int:
        return self.connections.get(sds.sds_id, 1)

    def error(self, op: Op, outcome: Reply | BaseException) -> DataPathError:
        if isinstance(outcome, Reply):
            return classify(WireRequestError(op, outcome.status, outcome.epoch))
        assert isinstance(outcome, DataPathError), outcome
        return outcome

    async def close(self) -> None:
        pass


async def serve(
    io: VolumeIO, cmd: Cmd, offset: int, length: int, data: bytes = b"", flags: int = 0
) -> Sequence[Chunk]:
    """One NBD request through the backend's one path, as the NBD server sends it."""
    owner = Owner()
    payload = bytearray(data) if cmd == Cmd.WRITE else None
    io.submit(IoRequest(owner, cmd, flags, 0, offset, length, payload))
    return await owner.answered


async def read(io: VolumeIO, offset: int, length: int) -> Sequence[Chunk]:
    return await serve(io, Cmd.READ, offset, length)


async def write(io: VolumeIO, offset: int, data: bytes, *, fua: bool) -> None:
    await serve(io, Cmd.WRITE, offset, len(data), data, CmdFlag.FUA if fua else 0)


async def write_zeroes(
    io: VolumeIO, offset: int, length: int, *, punch_hole: bool, fua: bool
) -> None:
    flags = (0 if punch_hole else CmdFlag.NO_HOLE) | (CmdFlag.FUA if fua else 0)
    await serve(io, Cmd.WRITE_ZEROES, offset, length, flags=flags)


async def trim(io: VolumeIO, offset: int, length: int, *, fua: bool) -> None:
    await serve(io, Cmd.TRIM, offset, length, flags=CmdFlag.FUA if fua else 0)


async def flush(io: VolumeIO) -> None:
    await serve(io, Cmd.FLUSH, 0, 0)


def make_io(
    maps: Maps,
    path: Faulty,
    timeout_s: float = 2.0,
    volume: VolumeMapping = VOLUME,
    attempt_timeout_s: float = 0.2,
) -> tuple[VolumeIO, SdcMetrics]:
    metrics = SdcMetrics(CollectorRegistry())
    io = VolumeIO(
        volume,
        maps,
        path,
        metrics.volume(volume.name),
        timeout_s=timeout_s,
        attempt_timeout_s=attempt_timeout_s,
    )
    return io, metrics


def retries(metrics: SdcMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("meshblock_sdc_retries_total", {"reason": reason})
    return value or 0.0


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def test_io_is_split_by_chunk_and_routed_to_primaries() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path)
    offset, payload = CHUNK_SIZE - 100, os.urandom(2 * CHUNK_SIZE + 300)
    run(write(io, offset, payload, fua=False))
    pieces = chunk_span(offset, len(payload))
    assert len(path.calls) == len(pieces) == 4
    for (op, sds_id, ref, off, n), (idx, poff, pn) in zip(
        sorted(path.calls, key=lambda c: c[2].chunk_index if c[2] else -1), pieces, strict=True
    ):
        pg = pg_of(VOLUME.id, idx, PG_COUNT)
        assert op == "write" and ref == ChunkRef(1, pg, 5, VOLUME.id, idx)
        assert sds_id == pg % 3 and (off, n) == (poff, pn)
    got = run(read(io, offset, len(payload)))
    assert b"".join(bytes(c) for c in got) == payload


def test_epoch_stale_refreshes_the_map_and_retries_on_the_new_primary() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)
    maps.after_refresh = pool_map(6, shift=1)
    path.faults = [DataPathError("epoch_stale", "stale", retriable=True)]
    run(write(io, 0, b"x" * 10, fua=True))
    first, second = path.calls
    assert first[2] is not None and first[2].epoch == 5
    assert second[2] is not None and second[2].epoch == 6
    assert second[1] == (first[1] + 1) % 3  # the new primary
    assert maps.refreshes == 1
    assert retries(metrics, "epoch_stale") == 1


def test_connection_failures_are_retried_until_they_clear() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)
    lost = DataPathError("connection", "lost", retriable=True)
    path.faults = [lost, lost, lost]
    assert b"".join(bytes(c) for c in run(read(io, 4096, 512))) == bytes(512)
    assert len(path.calls) == 4 and maps.refreshes == 3
    assert retries(metrics, "connection") == 3


def test_a_pg_without_primary_waits_for_the_map() -> None:
    empty = replace(pool_map(5), primaries=(None,) * PG_COUNT)
    maps, path = Maps(empty), Faulty()
    io, metrics = make_io(maps, path)
    maps.after_refresh = pool_map(6)
    run(write(io, 0, b"y", fua=False))
    assert retries(metrics, "no_primary") == 1 and len(path.calls) == 1


def test_errors_no_retry_can_fix_are_answered_at_once() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)
    path.faults = [DataPathError("no_space", "full", retriable=False, errno=Errno.ENOSPC)]
    with pytest.raises(RequestError) as err:
        run(write(io, 0, b"z" * 4096, fua=False))
    assert err.value.errno == Errno.ENOSPC
    assert len(path.calls) == 1 and maps.refreshes == 0
    errors = metrics.registry.get_sample_value("meshblock_sdc_io_errors_total", {"op": "write"})
    assert errors == 1


def test_gives_up_with_eio_after_the_io_timeout() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path, timeout_s=0.5)
    path.failing_sds = {s: DataPathError("connection", "refused", retriable=True) for s in range(3)}
    t0 = time.monotonic()
    with pytest.raises(RequestError) as err:
        run(read(io, 0, 4096))
    assert err.value.errno == Errno.EIO and "connection" in str(err.value)
    assert 0.45 <= time.monotonic() - t0 < 2.0
    assert len(path.calls) > 3


def test_a_hung_sds_times_out_and_is_retried() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)
    path.faults = ["hang"]
    run(write(io, 0, b"h", fua=False))
    assert retries(metrics, "timeout") == 1 and len(path.calls) == 2


def clean_map(epoch: int, shift: int = 0) -> PoolMap:
    return replace(pool_map(epoch, shift), clean=(True,) * PG_COUNT)


def budgeted_io(maps: Maps, path: Faulty) -> tuple[VolumeIO, SdcMetrics]:
    """Attempts may take 5 s at most, but the SDSs' budgets start at 0.2 s."""
    metrics = SdcMetrics(CollectorRegistry())
    budgets = LatencyBudgets(floor=0.2, factor=4.0, ceiling=5.0)
    io = VolumeIO(
        VOLUME,
        maps,
        path,
        metrics.volume(VOLUME.name),
        timeout_s=10.0,
        attempt_timeout_s=5.0,
        budgets=budgets,
    )
    return io, metrics


@pytest.mark.parametrize("fault", ["hang", "connection"])
def test_a_read_the_primary_does_not_answer_is_read_from_the_clean_secondary(fault: str) -> None:
    maps, path = Maps(clean_map(5)), Faulty()
    io, metrics = budgeted_io(maps, path)
    run(write(io, 4096, b"r" * 512, fua=False))
    path.calls.clear()
    path.flags.clear()
    path.faults = ["hang" if fault == "hang" else DataPathError(fault, "lost", retriable=True)]
    t0 = time.monotonic()
    got = run(read(io, 4096, 512))
    took = time.monotonic() - t0
    assert b"".join(bytes(c) for c in got) == b"r" * 512
    (_, first, ref, _, _), (op, second, ref2, off, n) = path.calls
    assert ref is not None
    assert first == ref.pg % 3 and second == (ref.pg + 1) % 3  # primary, then secondary
    assert (op, ref2, off, n) == ("read", ref, 4096, 512)
    assert path.flags == [CLIENT_CHECKS, int(ReqFlag.REPLICA)]
    assert maps.unreachable == [first]  # reported to the MDM
    assert maps.refreshes == 0  # no wait for a new map
    assert retries(metrics, "replica_read") == 1
    assert took < 2.0, f"the read took {took:.2f} s (the primary's budget is 0.2 s, not 5 s)"


def test_no_replica_read_in_a_pg_that_is_not_clean() -> None:
    degraded = replace(clean_map(5), clean=(False,) * PG_COUNT)
    maps, path = Maps(degraded), Faulty()
    io, metrics = budgeted_io(maps, path)
    path.faults = ["hang"]
    run(read(io, 0, 4096))
    primary = pg_of(VOLUME.id, 0, PG_COUNT) % 3
    assert [c[1] for c in path.calls] == [primary] * 2  # the primary again, after its budget
    assert path.flags == [CLIENT_CHECKS] * 2 and retries(metrics, "replica_read") == 0
    assert retries(metrics, "timeout") == 1 and maps.unreachable == [primary]


def test_a_write_to_a_hung_primary_is_given_up_after_its_budget_and_reported() -> None:
    maps, path = Maps(clean_map(5)), Faulty()
    io, metrics = budgeted_io(maps, path)
    maps.after_refresh = clean_map(6)
    path.faults = ["hang"]
    t0 = time.monotonic()
    run(write(io, 0, b"w" * 4096, fua=False))
    took = time.monotonic() - t0
    primary = pg_of(VOLUME.id, 0, PG_COUNT) % 3
    assert [c[1] for c in path.calls] == [primary] * 2  # a write never goes to the secondary
    assert retries(metrics, "timeout") == 1 and maps.unreachable == [primary]
    assert took < 2.0, f"the write took {took:.2f} s (budget 0.2 s, attempt_timeout_s 5 s)"


def test_an_sds_that_timed_out_gets_no_new_attempt_for_its_budget() -> None:
    """After one attempt on SDS X timed out, the next write routed to X is not sent
    to it (it would wait its budget too): it waits for the map that fails X over."""
    maps, path = Maps(clean_map(5)), Faulty()
    io, metrics = budgeted_io(maps, path)
    path.faults = ["hang"]
    primary = pg_of(VOLUME.id, 0, PG_COUNT) % 3

    async def both() -> None:
        first = asyncio.ensure_future(write(io, 0, b"a" * 4096, fua=False))
        await asyncio.sleep(0.3)  # the first attempt timed out (0.2 s), X is silent
        maps.after_refresh = clean_map(6, shift=1)  # the MDM failed X over
        await write(io, 4096, b"b" * 4096, fua=False)
        await first

    run(both())
    sent_to = [c[1] for c in path.calls]
    assert sent_to.count(primary) == 1, sent_to  # only the attempt that hung
    assert retries(metrics, "silent") >= 1


def test_a_flush_does_not_wait_for_a_silent_primary() -> None:
    """A FLUSH while SDS X is silent (an attempt on it timed out) is not sent to X:
    it waits for the map in which X holds no PG, not for attempt_timeout_s (5 s)."""
    maps, path = Maps(clean_map(5)), Faulty()
    io, _ = budgeted_io(maps, path)
    x = 1
    run(write(io, chunk_on(clean_map(5), x) * CHUNK_SIZE, b"w" * 4096, fua=False))
    path.calls.clear()
    io.budgets.silence(x, time.monotonic())
    without_x = replace(
        clean_map(6),
        primaries=tuple(2 if p == x else p for p in clean_map(6).primaries),
        secondaries=tuple(0 if s == x else s for s in clean_map(6).secondaries),
    )
    maps.after_refresh = without_x
    t0 = time.monotonic()
    run(flush(io))
    assert time.monotonic() - t0 < 2.0
    assert x not in [c[1] for c in path.calls], path.calls


def test_the_budget_follows_the_sds_latency() -> None:
    maps, path = Maps(clean_map(5)), Faulty()
    io, _ = budgeted_io(maps, path)
    for _ in range(40):
        io.budgets.record(1, 0.3)  # a slow SDS: p99 0.3 s
    assert io.budgets.budget(1) == pytest.approx(1.2)
    assert io.budgets.budget(0) == pytest.approx(0.2)


def chunk_on(pool: PoolMap, sds_id: int) -> int:
    """The first chunk of VOLUME whose PG has ``sds_id`` as primary."""
    return next(c for c in range(64) if pool.primaries[pg_of(VOLUME.id, c, PG_COUNT)] == sds_id)


def flushed_to(path: Faulty) -> list[int]:
    return [c[1] for c in path.calls if c[0] == "flush"]


def test_flush_reaches_every_holder_and_retries_only_the_failed_one() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)
    run(write(io, 0, b"w" * 3 * CHUNK_SIZE, fua=False))  # one chunk on each SDS
    path.failing_sds = {2: DataPathError("connection", "lost", retriable=True)}

    async def heal() -> None:
        await asyncio.sleep(0.1)
        del path.failing_sds[2]

    async def main() -> None:
        await asyncio.gather(flush(io), heal())

    asyncio.run(main())
    flushed = [c[1] for c in path.calls if c[0] == "flush"]
    assert set(flushed) == {0, 1, 2}
    assert flushed.count(0) == 1 and flushed.count(1) == 1 and flushed.count(2) >= 2
    assert retries(metrics, "connection") >= 1


def test_flush_goes_only_to_the_sdss_written_to_since_the_last_one() -> None:
    """The first FLUSH goes to every holder; then, writes acknowledged by SDSs 0 and
    2: the FLUSH reaches both and only them; a FLUSH with nothing written since (or
    only FUA writes) is answered at once."""
    pool = pool_map(5)
    maps, path = Maps(pool), Faulty()
    io, _ = make_io(maps, path)

    async def main() -> None:
        await flush(io)
        assert sorted(flushed_to(path)) == sorted(pool.holders())
        path.calls.clear()
        await flush(io)
        assert path.calls == []
        await write(io, chunk_on(pool, 0) * CHUNK_SIZE, b"a" * 4096, fua=False)
        await write(io, chunk_on(pool, 2) * CHUNK_SIZE + 8192, b"b" * 100, fua=False)
        await write(io, chunk_on(pool, 1) * CHUNK_SIZE, b"c" * 4096, fua=True)
        await flush(io)
        assert sorted(flushed_to(path)) == [0, 2]
        path.calls.clear()
        await flush(io)
        await write(io, chunk_on(pool, 1) * CHUNK_SIZE, b"d" * 4096, fua=True)
        await flush(io)
        assert path.calls[1:] == [] and flushed_to(path) == []
        # a multi-chunk WRITE_ZEROES and a TRIM count too
        await write_zeroes(io, 0, 2 * CHUNK_SIZE, punch_hole=True, fua=False)
        await flush(io)
        expected = {pool.primaries[pg_of(VOLUME.id, c, PG_COUNT)] for c in (0, 1)}
        assert set(flushed_to(path)) == expected and len(flushed_to(path)) == len(expected)

    run(main())


class FlushGate(Faulty):
    """FLUSHes wait until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        if piece.op == Op.FLUSH:
            self._record(sds, piece)
            await self.gate.wait()
            return Reply(0, 0, 0, memoryview(b""))
        return await super().call(sds, piece)


def test_a_write_acked_during_a_flush_is_covered_by_the_next() -> None:
    """FLUSH 1 covers SDS 0's write; SDS 1's write is acknowledged while FLUSH 1 is in
    progress: FLUSH 2, begun meanwhile, flushes SDS 1 and SDS 0 again (FLUSH 1 is not
    done) and is not answered before; FLUSH 3, after both, reaches SDS 1 only if it
    acknowledged a write after FLUSH 2 began."""
    pool = pool_map(5)
    maps, path = Maps(pool), FlushGate()
    io, _ = make_io(maps, path, timeout_s=30.0, attempt_timeout_s=30.0)
    io.flush_all = False  # as after its first FLUSH (the test below)

    async def main() -> None:
        await write(io, chunk_on(pool, 0) * CHUNK_SIZE, b"a" * 4096, fua=False)
        first = asyncio.ensure_future(flush(io))
        await asyncio.sleep(0.01)
        assert flushed_to(path) == [0]
        await write(io, chunk_on(pool, 1) * CHUNK_SIZE, b"b" * 4096, fua=False)
        second = asyncio.ensure_future(flush(io))
        await asyncio.sleep(0.01)
        assert sorted(flushed_to(path)) == [0, 0, 1]
        assert not first.done() and not second.done()
        path.gate.set()
        await asyncio.gather(first, second)
        path.calls.clear()
        await flush(io)
        assert flushed_to(path) == []
        await write(io, chunk_on(pool, 1) * CHUNK_SIZE, b"c" * 4096, fua=False)
        await flush(io)
        assert flushed_to(path) == [1]

    run(main())


def test_a_failed_flush_is_retried_on_every_holder_of_the_new_map() -> None:
    """SDS 0 acknowledged a write, then fails (its PGs failed over to 1 and 2): the
    FLUSH goes to the holders of the new map, which hold the write now. A written-to
    SDS connected to again since (it may have restarted, forgetting its peers) makes
    the FLUSH go to every holder at once."""
    pool = pool_map(5)
    maps, path = Maps(pool), Faulty()
    io, _ = make_io(maps, path)
    io.flush_all = False  # as after its first FLUSH (test_a_new_volume_io_flushes_all)
    run(write(io, chunk_on(pool, 0) * CHUNK_SIZE, b"a" * 4096, fua=False))
    path.failing_sds = {0: DataPathError("connection", "lost", retriable=True)}
    maps.after_refresh = replace(
        pool_map(6),
        primaries=tuple(1 if p == 0 else p for p in pool.primaries),
        secondaries=tuple(2 if s == 0 else s for s in pool.secondaries),
    )
    run(flush(io))
    assert set(flushed_to(path)) == {0, 1, 2}

    path.calls.clear()
    path.failing_sds = {}
    new = maps.current
    assert new is not None
    run(write(io, chunk_on(new, 1) * CHUNK_SIZE, b"b" * 4096, fua=False))
    path.connections[1] = 2
    run(flush(io))
    assert sorted(flushed_to(path)) == [1, 2]


def test_a_new_volume_io_flushes_all() -> None:
    """A VolumeIO made anew (an SDC restart, a re-created export) knows nothing of the
    writes acknowledged before it, which the FLUSH of an NBD client that reconnected
    covers too: its first FLUSH goes to every holder, and so does the next one when
    that one failed. (Before: sent nowhere.)"""
    pool = pool_map(5)
    maps, path = Maps(pool), Faulty()
    io, _ = make_io(maps, path)
    path.failing_sds = {2: DataPathError("io", "device failed", retriable=False)}
    with pytest.raises(RequestError):
        run(flush(io))
    assert sorted(set(flushed_to(path))) == [0, 1, 2]
    path.calls.clear()
    path.failing_sds = {}
    run(flush(io))
    assert sorted(flushed_to(path)) == [0, 1, 2]
    path.calls.clear()
    run(flush(io))
    assert flushed_to(path) == []


class ReconnectOnFlush(Faulty):
    """SDS 0 restarted after it acknowledged a write, and nothing was sent to it since:
    the FLUSH itself finds the connection closed and opens a new one (connects + 1),
    as WireDataPath.call does."""

    def __init__(self) -> None:
        super().__init__()
        self.restarted = False

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        if self.restarted and sds.sds_id == 0:
            self.connections[0] = self.connections.get(0, 1) + 1
            self.restarted = False
        return await super().call(sds, piece)


def test_a_flush_that_reconnects_to_a_restarted_sds_goes_to_every_holder() -> None:
    """The restarted SDS 0 does not know that its predecessor forwarded the write to
    its secondary: the FLUSH, which reached the new process on a new connection, goes
    to every holder. (Before: to SDS 0 only.)"""
    pool = pool_map(5)
    maps, path = Maps(pool), ReconnectOnFlush()
    io, _ = make_io(maps, path)
    io.flush_all = False  # as after its first FLUSH
    run(write(io, chunk_on(pool, 0) * CHUNK_SIZE, b"a" * 4096, fua=False))
    path.restarted = True
    run(flush(io))
    assert sorted(set(flushed_to(path))) == [0, 1, 2], flushed_to(path)


def test_write_zeroes_no_hole_writes_zeroes_and_trim_with_fua_flushes() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path)
    run(write_zeroes(io, 100, CHUNK_SIZE, punch_hole=False, fua=False))
    assert {c[0] for c in path.calls} == {"write"}
    path.calls.clear()
    run(write_zeroes(io, 100, CHUNK_SIZE, punch_hole=True, fua=False))
    assert {c[0] for c in path.calls} == {"write_zeroes"}
    path.calls.clear()
    run(trim(io, 0, 3 * CHUNK_SIZE, fua=True))
    ops = [c[0] for c in path.calls]
    assert ops.count("trim") == 3 and ops.count("flush") == 3


def test_many_pieces_are_bounded_in_parallel() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path, volume=replace(VOLUME, size_bytes=200 * CHUNK_SIZE))
    run(trim(io, 0, 100 * CHUNK_SIZE, fua=False))
    assert len(path.calls) == 100


def test_a_refusal_in_the_reply_of_a_first_attempt_is_never_acknowledged() -> None:
    """A one-chunk WRITE sent without a task whose reply carries a status other than
    OK is not answered as written: EPOCH_STALE is retried on the newer map, NO_SPACE
    is answered ENOSPC; the same in the task's attempts."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)

    async def main() -> None:
        maps.after_refresh = pool_map(6, shift=1)
        path.faults = [Status.EPOCH_STALE]
        await write(io, 4096, b"a" * 512, fua=False)
        (_, _, ref1, _, _), (_, _, ref2, _, _) = path.calls
        assert ref1 is not None and ref1.epoch == 5 and ref2 is not None and ref2.epoch == 6
        assert retries(metrics, "epoch_stale") == 1
        for first in (Status.NO_SPACE, Status.NOT_PRIMARY):  # then NO_SPACE in the task
            path.calls.clear()
            path.faults = [first, Status.NO_SPACE]
            with pytest.raises(RequestError) as err:
                await write(io, 4096, b"b" * 512, fua=False)
            assert err.value.errno == Errno.ENOSPC
            assert len(path.calls) == (1 if first == Status.NO_SPACE else 2)
        assert bytes(path.chunks[0][4096 : 4096 + 512]) == b"a" * 512

    asyncio.run(main())


def test_fua_reaches_the_wire_on_every_path() -> None:
    """NBD FUA is the data protocol's FUA on each piece of a WRITE or WRITE_ZEROES:
    sent without a task (one chunk), from the task (several chunks, a retry)."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path)

    async def main() -> None:
        await write(io, 0, b"f" * 512, fua=True)
        await write(io, 0, b"n" * 512, fua=False)
        assert path.flags == [FUA, 0]
        path.flags.clear()
        path.faults = [DataPathError("connection", "lost", retriable=True)]
        await write(io, 0, b"r" * 512, fua=True)  # retried from the task
        await write(io, CHUNK_SIZE - 1, b"xy", fua=True)
        await write_zeroes(io, 0, 2 * CHUNK_SIZE, punch_hole=False, fua=True)
        await write_zeroes(io, 0, 2 * CHUNK_SIZE, punch_hole=True, fua=True)
        await read(io, 0, 512)
        assert path.flags == [FUA] * 8 + [CLIENT_CHECKS]

    asyncio.run(main())


def test_a_qos_wait_does_not_count_against_the_io_timeout() -> None:
    """The IO timeout is the time a piece may spend retrying: it starts when the piece
    is sent, not while the request waited for its QoS tokens (a throttled volume is
    slow, not failing)."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path, timeout_s=0.3, volume=replace(VOLUME, iops_limit=2))

    async def main() -> None:
        await read(io, 0, 512)  # takes the bucket's one token
        path.faults = [DataPathError("connection", "lost", retriable=True)]
        t0 = time.monotonic()
        await read(io, 0, 512)  # waits 0.5 s for its token, then is retried once
        assert time.monotonic() - t0 >= 0.4

    asyncio.run(main())
    assert retries(metrics, "connection") == 1 and len(path.calls) == 3


class Gated(Faulty):
    """Each piece's call waits until the test opens the gate of its chunk's batch:
    chunks 0-31 (the first MAX_PARALLEL_PIECES) or the others."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = (asyncio.Event(), asyncio.Event())

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        await self.gates[piece.ref.chunk_index >= MAX_PARALLEL_PIECES].wait()
        return await super().call(sds, piece)


def test_pieces_waiting_for_their_turn_get_the_whole_io_timeout() -> None:
    """A request of more than MAX_PARALLEL_PIECES pieces: those sent once earlier
    ones are done have the whole IO timeout from when they are sent."""
    maps = Maps(pool_map(5))
    volume = replace(VOLUME, size_bytes=200 * CHUNK_SIZE)

    async def main() -> Gated:
        path = Gated()
        io, _ = make_io(maps, path, timeout_s=1.0, volume=volume, attempt_timeout_s=5.0)
        trimming = asyncio.ensure_future(
            trim(io, 0, 2 * MAX_PARALLEL_PIECES * CHUNK_SIZE, fua=False)
        )
        await asyncio.sleep(0.6)
        path.gates[0].set()  # the first batch is answered within its timeout
        await asyncio.sleep(0.6)
        path.gates[1].set()  # the second, 0.6 s after it was sent
        await trimming
        return path

    path = asyncio.run(main())
    assert len(path.calls) == 2 * MAX_PARALLEL_PIECES


def test_unmapped_volume_refuses_io() -> None:
    maps, path = Maps(pool_map(5)), Faulty()
    io, _ = make_io(maps, path)
    io.close()
    with pytest.raises(RequestError) as err:
        run(read(io, 0, 1))
    assert err.value.errno == Errno.ESHUTDOWN


def test_one_chunk_io_needs_no_task_unless_it_must_wait_or_retry() -> None:
    """The one path: a one-chunk READ or WRITE is sent from submit and answered from
    its reply's callback, without a task; one whose first attempt fails goes on in a
    task (retried on the newer map, the SDS that did not answer reported); a QoS
    limit or several chunks take the task from the start. Each request is counted
    once."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path)

    async def submit(cmd: Cmd, offset: int, length: int, data: bytes = b"") -> Owner:
        owner = Owner()
        payload = bytearray(data) if cmd == Cmd.WRITE else None
        io.submit(IoRequest(owner, cmd, 0, 7, offset, length, payload))
        await owner.answered
        return owner

    async def main() -> None:
        owner = await submit(Cmd.WRITE, 4096, 512, b"w" * 512)
        assert owner.task is None and owner.answered.result() == ()
        owner = await submit(Cmd.READ, 4096, 512)
        assert owner.task is None and bytes(owner.answered.result()[0]) == b"w" * 512
        assert [c[0] for c in path.calls] == ["write", "read"]

        path.calls.clear()
        maps.after_refresh = pool_map(6, shift=1)
        path.faults = [DataPathError("connection", "lost", retriable=True)]
        owner = await submit(Cmd.READ, 4096, 512)
        assert owner.task is not None and bytes(owner.answered.result()[0]) == b"w" * 512
        (_, first, ref1, _, _), (_, second, ref2, _, _) = path.calls
        assert ref1 is not None and ref1.epoch == 5 and ref2 is not None and ref2.epoch == 6
        assert maps.unreachable == [first] and second == (first + 1) % 3

        owner = await submit(Cmd.WRITE, CHUNK_SIZE - 1, 2, b"xy")  # two chunks
        assert owner.task is not None
        io.update(replace(VOLUME, iops_limit=1000))
        owner = await submit(Cmd.READ, 0, 512)
        assert owner.task is not None

    asyncio.run(main())
    assert retries(metrics, "connection") == 1
    ops = metrics.registry.get_sample_value
    assert ops("meshblock_sdc_ops_total", {"volume": "v", "op": "read"}) == 3
    assert ops("meshblock_sdc_ops_total", {"volume": "v", "op": "write"}) == 2


def test_token_bucket_paces_and_changes_rate() -> None:
    async def main() -> tuple[float, float]:
        bucket = TokenBucket(100)  # burst: 10
        t0 = time.monotonic()
        for _ in range(40):
            await bucket.take(1)
        slow = time.monotonic() - t0
        bucket.set_rate(10000)
        t0 = time.monotonic()
        for _ in range(40):
            await bucket.take(1)
        return slow, time.monotonic() - t0

    slow, fast = asyncio.run(main())
    assert slow >= 0.28  # (40 - 10) / 100, less timer slack
    assert fast < slow


def test_token_bucket_lets_a_request_larger_than_the_burst_pass() -> None:
    async def main() -> float:
        bucket = TokenBucket(1000)  # burst 100
        t0 = time.monotonic()
        await bucket.take(300)
        await bucket.take(1)
        return time.monotonic() - t0

    assert asyncio.run(main()) >= 0.19


# -- attaching to /dev/nbdN --------------------------------------------------------


def test_nbd_client_command_lines() -> None:
    tcp = NbdAttacher(host="0.0.0.0", port=10809, connections=4)
    assert tcp.attach_command("/dev/nbd3", "vol1", read_only=False) == [
        "nbd-client", "127.0.0.1", "10809", "/dev/nbd3", "-name", "vol1",
        "-block-size", "4096", "-timeout", "60", "-connections", "4",
    ]  # fmt: skip
    unix = NbdAttacher(unix_socket="/run/meshblock/nbd.sock")
    assert unix.attach_command("/dev/nbd0", "db", read_only=True) == [
        "nbd-client", "-unix", "/run/meshblock/nbd.sock", "/dev/nbd0", "-name", "db",
        "-block-size", "4096", "-timeout", "60", "-connections", "1", "-readonly",
    ]  # fmt: skip
    assert tcp.detach_command("/dev/nbd3") == ["nbd-client", "-d", "/dev/nbd3"]
    assert tcp.link_path("vol1") == Path("/dev/disk/by-meshblock/vol1")
    assert tcp.link_path("../etc") is None and tcp.link_path("a/b") is None


def test_attach_fails_clearly_without_the_nbd_module(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    attacher = NbdAttacher(sys_root=tmp_path / "sys", dev_root=tmp_path / "dev")
    assert not attacher.kernel_supported()
    assert run(attacher.attach("vol1", read_only=False)) is None
    assert "no nbd module" in caplog.text and "vol1" in caplog.text
    assert not (tmp_path / "dev").exists()


def test_this_machine_has_no_nbd_module() -> None:
    """The real check: this kernel lacks nbd, so attaching must refuse (see above)."""
    assert NbdAttacher().kernel_supported() == Path("/sys/module/nbd").is_dir()


def fake_sysfs(root: Path, busy: set[int]) -> None:
    (root / "module" / "nbd").mkdir(parents=True)
    for n in range(4):
        d = root / "block" / f"nbd{n}"
        d.mkdir(parents=True)
        if n in busy:
            (d / "pid").write_text("123\n")


def test_attach_and_detach_with_a_stand_in_nbd_client(tmp_path: Path) -> None:
    """With a stand-in for nbd-client (the kernel part cannot run here): the device
    choice, the stable link and the detach."""
    fake_sysfs(tmp_path / "sys", busy={0})
    record = tmp_path / "calls"
    script = tmp_path / "nbd-client"
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    dev = tmp_path / "dev"
    attacher = NbdAttacher(nbd_client=str(script), sys_root=tmp_path / "sys", dev_root=dev)

    async def main() -> None:
        assert await attacher.attach("vol1", read_only=False) == str(dev / "nbd1")
        assert await attacher.attach("vol2", read_only=True) == str(dev / "nbd2")
        link = dev / "disk" / "by-meshblock" / "vol1"
        assert os.readlink(link) == str(dev / "nbd1")
        await attacher.detach("vol1")
        assert not link.exists() and not link.is_symlink()
        await attacher.detach_all()

    asyncio.run(main())
    lines = record.read_text().splitlines()
    assert lines[0].startswith(f"127.0.0.1 10809 {dev / 'nbd1'} -name vol1")
    assert lines[1].endswith("-readonly")
    assert lines[2:] == [f"-d {dev / 'nbd1'}", f"-d {dev / 'nbd2'}"]


def test_attach_reports_a_failing_nbd_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    fake_sysfs(tmp_path / "sys", busy=set())
    script = tmp_path / "nbd-client"
    script.write_text("#!/bin/sh\necho 'Error: Socket failed' >&2\nexit 1\n")
    script.chmod(0o755)
    attacher = NbdAttacher(
        nbd_client=str(script), sys_root=tmp_path / "sys", dev_root=tmp_path / "dev"
    )
    assert run(attacher.attach("vol1", read_only=False)) is None
    assert "Socket failed" in caplog.text and not attacher.attached


# -- configuration and maps ---------------------------------------------------------


def test_guid_is_generated_once_and_kept(tmp_path: Path) -> None:
    cfg = from_mapping(
        SdcConfig, {"sdc": {"state_dir": str(tmp_path / "st")}, "mdm": {"cluster_secret": "s"}}
    )
    guid = sdc_guid(cfg)
    assert len(guid) == 36 and sdc_guid(cfg) == guid
    assert (tmp_path / "st" / "guid").read_text().strip() == guid
    fixed = from_mapping(SdcConfig, {"sdc": {"guid": "g-1"}, "mdm": {"cluster_secret": "s"}})
    assert sdc_guid(fixed) == "g-1"


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nbd\.prot"):
        from_mapping(SdcConfig, {"nbd": {"prot": 1}, "mdm": {"cluster_secret": "s"}})
    with pytest.raises(ConfigError, match="cluster_secret"):
        from_mapping(SdcConfig, {})
    with pytest.raises(ConfigError, match="not both"):
        from_mapping(SdcConfig, {"mdm": {"cluster_secret": "s", "cluster_secret_file": "/x"}})
    secret = tmp_path / "secret"
    secret.write_text("  top-secret\n")
    cfg = from_mapping(SdcConfig, {"mdm": {"cluster_secret_file": str(secret)}})
    assert cluster_secret(cfg) == "top-secret"
    assert "top-secret" not in repr(cfg)
    secret.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        cluster_secret(cfg)


GOOD_MAPS: dict[str, Any] = {
    "epoch": 9,
    "sdc_id": 2,
    "volumes": [
        {"id": 4, "name": "v", "pool_id": 1, "size_bytes": 1 << 30, "access_mode": "read_only",
         "iops_limit": 100, "bandwidth_limit_bps": None},
    ],
    "pools": {
        "1": {"pool_id": 1, "epoch": 3, "pg_count": 2,
              "sds": {"5": {"address": "h", "data_port": 7072}},
              "pgs": [{"pg": 0, "primary": {"sds_id": 5, "device_id": 1}, "secondary": None},
                      {"pg": 1, "primary": None, "secondary": None}]},
    },
}  # fmt: skip


def test_parse_maps() -> None:
    m = parse_maps(GOOD_MAPS)
    assert m.epoch == 9 and m.volumes[4].read_only and m.volumes[4].iops_limit == 100
    assert m.pools[1].primaries == (5, None) and m.pools[1].holders() == {5}


@pytest.mark.parametrize(
    "path, value",
    [
        (("epoch",), -1),
        (("volumes",), "x"),
        (("volumes", 0, "access_mode"), "rw"),
        (("volumes", 0, "pool_id"), 99),
        (("pools", "1", "pg_count"), 0),
        (("pools", "1", "pgs", 0, "pg"), 2),
        (("pools", "1", "pgs", 0, "primary"), {"sds_id": 6}),
        (("pools", "1", "sds", "5"), {"data_port": 1}),
    ],
)
def test_parse_maps_rejects_bad_documents(path: tuple[Any, ...], value: Any) -> None:
    import copy

    doc = copy.deepcopy(GOOD_MAPS)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MapError):
        parse_maps(doc)


def test_an_sds_dying_during_the_handshake_is_a_retriable_connect_failure() -> None:
    """An SDS killed just as the SDC connects accepts the connection and then resets
    it (the CI failure of test_sds_sigkill_during_fio_is_rebuilt): the write must be
    retried on the next map, not answered with EIO."""
    import socket
    import struct

    from meshblock.sdc.wire_path import WireDataPath

    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main() -> None:
        server = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        path = WireDataPath("secret", connect_timeout=2.0)
        try:
            for _ in range(3):
                with pytest.raises(DataPathError) as err:
                    piece = Piece(Op.WRITE, 0, ChunkRef(1, 0, 1, 7, 0), 0, 4096, b"x" * 4096)
                    await path.call(SdsEndpoint(1, "127.0.0.1", port), piece)
                assert err.value.retriable
                assert err.value.reason == "connect"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_read_lets_the_sds_skip_its_check_and_asks_for_it_after_a_mismatch() -> None:
    """A READ goes with CLIENT_CHECKS (the SDS may send its stored checksums
    unchecked: ours is the check). Answered CHECKSUM_MISMATCH it is sent again at
    once without the flag, so that the SDS checks its copy and heals it: no map
    refresh, no pause in between. Writes never carry the flag."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path, timeout_s=30.0)

    async def main() -> None:
        await write(io, 8192, b"r" * 4096, fua=False)
        (got,) = await read(io, 8192, 4096)  # first attempt, sent without a task
        assert bytes(got) == b"r" * 4096
        assert path.flags == [0, CLIENT_CHECKS]
        path.flags.clear()
        path.faults = [Status.CHECKSUM_MISMATCH]
        (got,) = await read(io, 8192, 4096)
        assert bytes(got) == b"r" * 4096
        assert path.flags == [CLIENT_CHECKS, 0]
        assert maps.refreshes == 0
        assert retries(metrics, "checksum_mismatch") == 1
        path.flags.clear()
        path.faults = [Status.CHECKSUM_MISMATCH]  # a piece of a read of two chunks
        got2 = await read(io, CHUNK_SIZE - 4096, 8192)
        assert len(got2) == 2
        assert sorted(path.flags) == [0, CLIENT_CHECKS, CLIENT_CHECKS]

    asyncio.run(main())


def test_a_checksum_mismatch_is_retried_a_bounded_number_of_times() -> None:
    """CHECKSUM_MISMATCH (a payload damaged between the SDC and the SDS, either way)
    is sent again; a piece that meets it CHECKSUM_ATTEMPTS times fails with EIO, long
    before the IO timeout, and nothing is acknowledged as written."""
    maps, path = Maps(pool_map(5)), Faulty()
    io, metrics = make_io(maps, path, timeout_s=30.0)

    async def main() -> None:
        path.faults = [Status.CHECKSUM_MISMATCH] * (CHECKSUM_ATTEMPTS - 1)
        await write(io, 8192, b"c" * 4096, fua=False)
        assert len(path.calls) == CHECKSUM_ATTEMPTS
        assert bytes(path.chunks[0][8192 : 8192 + 4096]) == b"c" * 4096
        path.faults = [Status.CHECKSUM_MISMATCH] * (CHECKSUM_ATTEMPTS - 1)
        (got,) = await read(io, 8192, 4096)
        assert bytes(got) == b"c" * 4096
        assert retries(metrics, "checksum_mismatch") == 2 * (CHECKSUM_ATTEMPTS - 1)
        for op in ("write", "read"):
            path.calls.clear()
            path.faults = [Status.CHECKSUM_MISMATCH] * (CHECKSUM_ATTEMPTS + 2)
            started = time.monotonic()
            with pytest.raises(RequestError) as err:
                if op == "write":
                    await write(io, 8192, b"d" * 4096, fua=False)
                else:
                    await read(io, 8192, 4096)
            assert err.value.errno == Errno.EIO and "checksums" in str(err.value)
            assert len(path.calls) == CHECKSUM_ATTEMPTS
            assert time.monotonic() - started < 10.0  # not the 30 s IO timeout
        assert bytes(path.chunks[0][8192 : 8192 + 4096]) == b"c" * 4096

    asyncio.run(main())
