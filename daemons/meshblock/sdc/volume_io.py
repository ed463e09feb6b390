"""IO on one mapped volume: the NBD backend of its export.

An NBD request is cut into chunk pieces (:func:`meshblock.chunks.chunk_span`); each
piece goes to the primary of its PG (:func:`meshblock.chunks.pg_of`) with the pool's
map epoch, all pieces of a request at once. A piece that fails in a retriable way
(``EPOCH_STALE``, ``NOT_PRIMARY``, a lost connection, a PG without a primary, ...)
makes the SDC ask the MDM for fresh maps right away and try again, with a growing
pause while the map does not change, for up to ``io.timeout_s``; only then does the
NBD client see an error (EIO). Errors that no retry can fix (no space, a device IO
error, an invalid range) are answered at once.

FLUSH reaches every SDS that holds a copy of some PG of the volume's pool (the
distinct primaries and secondaries of its map); each SDS makes its devices durable
and flushes the peers it replicated to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from meshblock.chunks import CHUNK_SHIFT, CHUNK_SIZE, ChunkRef, chunk_span, pg_of
from meshblock.nbd.protocol import Errno, RequestError
from meshblock.nbd.server import Chunk, FastDone
from meshblock.sdc.datapath import DataPath, DataPathError
from meshblock.sdc.maps import PoolMap, SdsEndpoint, VolumeMapping
from meshblock.sdc.metrics import VolumeStats
from meshblock.sdc.qos import Qos
from meshblock.sdc.wire_path import DirectReply
from meshblock.wire.client import ZEROES, Reply
from meshblock.wire.protocol import Op, ReplyFlag

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Pieces of one request sent at once (a 4 GiB write-zeroes has 4096 of them).
MAX_PARALLEL_PIECES = 32
#: Pause between attempts while the map has not changed: doubles from the first value.
BACKOFF_FIRST_S = 0.02
BACKOFF_MAX_S = 1.0

_ZEROES = memoryview(bytes(CHUNK_SIZE))
_IN_CHUNK = CHUNK_SIZE - 1
_HOLE = int(ReplyFlag.HOLE)
#: The attempt timer checks the deadlines of the attempts in flight this often (at
#: most), so an attempt is given up between its deadline and one tick later.
TIMER_TICK_S = 0.1


class AttemptTimer:
    """Cancels the attempts that outlive their budget.

    One periodic timer checks every attempt in flight, instead of one timer handle
    per attempt: ``asyncio.timeout`` cost about 7 us per IO on the benchmark machine
    (docs/performance.md). The timer runs only while
    attempts are in flight. As with ``asyncio.timeout``, an attempt it cancelled ends
    in a timeout unless its task was also cancelled from elsewhere.
    """

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Attempts started without a task (VolumeIO.start_read / start_write), by
        # the tick they were started in: those still in flight one tick later are
        # handed to a task (their callable), whose own deadline then applies.
        self._young: dict[DirectReply, Callable[[], None]] = {}
        self._old: dict[DirectReply, Callable[[], None]] = {}

    def start(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], when: float) -> None:
        """Watch ``task``'s attempt until :meth:`stop`; cancel it at ``loop.time() >= when``."""
        self._deadlines[task] = when
        if self._handle is None or self._loop is not loop:
            self._loop = loop
            self._handle = loop.call_later(self.tick_s, self._sweep)

    def watch(self, reply: DirectReply, to_task: Callable[[], None]) -> None:
        """Call ``to_task`` if ``reply`` is still watched at the second tick from now."""
        self._young[reply] = to_task
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._loop = loop
            self._handle = loop.call_later(self.tick_s, self._sweep)

    def unwatch(self, reply: DirectReply) -> None:
        if self._young.pop(reply, None) is None:
            self._old.pop(reply, None)

    def stop(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True when its attempt was cancelled for its deadline."""
        self._deadlines.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _sweep(self) -> None:
        self._handle = None
        loop = self._loop
        old, self._old, self._young = self._old, self._young, {}
        for to_task in old.values():
            to_task()
        if not (self._deadlines or self._old) or loop is None or loop.is_closed():
            return
        now = loop.time()
        for task, when in self._deadlines.items():
            if when <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        self._handle = loop.call_later(self.tick_s, self._sweep)


# DataPathError reasons that say the SDS itself did not answer (reported to the MDM).
UNREACHABLE_REASONS = frozenset({"connect", "connection"})


class MapSource(Protocol):
    """The SDC's current maps, and a way to ask the MDM for newer ones now."""

    def pool(self, pool_id: int) -> PoolMap | None: ...

    async def refresh(self) -> None: ...


class VolumeIO:
    """The backend of one export (see :class:`meshblock.nbd.server.Backend`)."""

    def __init__(
        self,
        volume: VolumeMapping,
        maps: MapSource,
        path: DataPath,
        stats: VolumeStats,
        *,
        timeout_s: float,
        attempt_timeout_s: float,
    ) -> None:
        self.volume = volume
        self.maps = maps
        self.path = path
        self.stats = stats
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.qos = Qos(volume.iops_limit, volume.bandwidth_limit_bps)
        self.closed = False
        self._timer = AttemptTimer(min(TIMER_TICK_S, max(attempt_timeout_s / 4, 0.005)))
        self._last_retry_log = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def update(self, volume: VolumeMapping) -> None:
        """The mapping changed (size, QoS limits)."""
        self.volume = volume
        self.qos.update(volume.iops_limit, volume.bandwidth_limit_bps)

    def close(self) -> None:
        self.closed = True

    # -- the NBD backend -------------------------------------------------------------

    async def read(self, offset: int, length: int) -> Sequence[Chunk]:
        started = time.monotonic()
        ok = False
        path = self.path
        try:
            self._check_open()
            if self.qos.limited:
                await self.qos.admit(length)
            out: list[Chunk]
            if length and offset >> CHUNK_SHIFT == (offset + length - 1) >> CHUNK_SHIFT:
                # One chunk (most IO): no piece list, no gather.
                off = offset & _IN_CHUNK
                out = [
                    await self._route(
                        offset >> CHUNK_SHIFT,
                        lambda sds, ref: path.read(sds, ref, off, length),
                        "read",
                    )
                ]
            else:
                out = await self._each(
                    offset,
                    length,
                    lambda idx, off, n, _pos: self._route(
                        idx, lambda sds, ref: path.read(sds, ref, off, n), "read"
                    ),
                )
            ok = True
            return out
        finally:
            self.stats.done("read", length, started, ok)

    async def write(self, offset: int, data: memoryview, *, fua: bool) -> None:
        started = time.monotonic()
        ok = False
        path = self.path
        length = len(data)
        try:
            self._check_open()
            if self.qos.limited:
                await self.qos.admit(length)
            if length and offset >> CHUNK_SHIFT == (offset + length - 1) >> CHUNK_SHIFT:
                off = offset & _IN_CHUNK
                await self._route(
                    offset >> CHUNK_SHIFT,
                    lambda sds, ref: path.write(sds, ref, off, data, fua=fua),
                    "write",
                )
            else:
                await self._each(
                    offset,
                    length,
                    lambda idx, off, n, pos: self._route(
                        idx,
                        lambda sds, ref: path.write(sds, ref, off, data[pos : pos + n], fua=fua),
                        "write",
                    ),
                )
            ok = True
        finally:
            self.stats.done("write", length, started, ok)

    # -- READ and WRITE without a task (meshblock.nbd.server.FastBackend) -------------
    #
    # The first attempt of a one-chunk READ or WRITE, when nothing has to wait (no QoS
    # limit, a primary in the map, an open connection with a free slot), is sent at
    # once and answered from the reply's callback. Any other outcome goes on in a task
    # exactly as ``read`` / ``write`` would have: an attempt that failed, or is still
    # in flight at the attempt timer's second tick, becomes the first attempt of
    # ``_route`` (started when it was), which waits for it, classifies its error and
    # retries.

    def _first_attempt(self, offset: int, length: int) -> tuple[SdsEndpoint, ChunkRef] | None:
        if (
            self.closed
            or self.qos.limited
            or not length
            or offset >> CHUNK_SHIFT != (offset + length - 1) >> CHUNK_SHIFT
        ):
            return None
        pool = self.maps.pool(self.volume.pool_id)
        if pool is None:
            return None
        volume_id = self.volume.id
        chunk = offset >> CHUNK_SHIFT
        pg = pg_of(volume_id, chunk, pool.pg_count)
        sds_id = pool.primaries[pg]
        if sds_id is None:
            return None
        return pool.sds[sds_id], ChunkRef(pool.pool_id, pg, pool.epoch, volume_id, chunk)

    def start_read(self, offset: int, length: int, done: FastDone) -> bool:
        submit: Any = getattr(self.path, "submit_read", None)
        target = self._first_attempt(offset, length) if submit is not None else None
        if target is None:
            return False
        return self._start(submit, target, Op.READ, "read", offset, length, None, False, done)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: FastDone) -> bool:
        submit: Any = getattr(self.path, "submit_write", None)
        length = len(data)
        target = self._first_attempt(offset, length) if submit is not None else None
        if target is None:
            return False
        return self._start(submit, target, Op.WRITE, "write", offset, length, data, fua, done)

    def _start(
        self,
        submit: Any,
        target: tuple[SdsEndpoint, ChunkRef],
        op: Op,
        what: str,
        offset: int,
        length: int,
        data: memoryview | None,
        fua: bool,
        done: FastDone,
    ) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():  # get_running_loop() costs a getpid() on 3.11
            loop = self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        first = loop.time()
        timer = self._timer
        reply: DirectReply | None = None

        def slow(res: Reply | None, exc: BaseException | None) -> Coroutine[Any, Any, Any]:
            fut: asyncio.Future[Reply] = loop.create_future()
            if exc is not None:
                fut.set_exception(exc)
                fut.exception()  # retrieved: _finish raises it, unless it never runs
            else:
                assert res is not None
                fut.set_result(res)
            return self._finish(fut, op, what, offset, length, data, fua, started, first)

        def replied(res: Reply | None, exc: BaseException | None) -> None:
            assert reply is not None
            timer.unwatch(reply)
            if res is None or res[0]:
                done((), slow(res, exc))
                return
            self.stats.done(what, length, started, True)
            if data is None:
                done((ZEROES[:length] if res[1] & _HOLE else res[3],), None)
            else:
                done((), None)

        sds, ref = target
        if data is None:
            reply = submit(sds, ref, offset & _IN_CHUNK, length, replied)
        else:
            reply = submit(sds, ref, offset & _IN_CHUNK, data, fua, replied)
        if reply is None:
            return False

        def to_task() -> None:
            assert reply is not None
            if reply.done():
                return
            fut: asyncio.Future[Reply] = loop.create_future()

            def forward(res: Reply | None, exc: BaseException | None) -> None:
                if fut.done():  # cancelled: the attempt timed out
                    return
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    assert res is not None
                    fut.set_result(res)

            reply.fn = forward
            done((), self._finish(fut, op, what, offset, length, data, fua, started, first))

        timer.watch(reply, to_task)
        return True

    async def _finish(
        self,
        fut: asyncio.Future[Reply],
        op: Op,
        what: str,
        offset: int,
        length: int,
        data: memoryview | None,
        fua: bool,
        started: float,
        first: float,
    ) -> Any:
        """The rest of ``read`` / ``write`` after a first attempt sent without a task."""
        ok = False
        path = self.path
        finish: Callable[..., Awaitable[Any]] = getattr(path, "finish")  # noqa: B009
        submitted: list[asyncio.Future[Reply]] = [fut]
        off = offset & _IN_CHUNK

        def call(sds: SdsEndpoint, ref: ChunkRef) -> Awaitable[Any]:
            if submitted:  # the attempt already sent
                return finish(op, submitted.pop(), length)
            if data is None:
                return path.read(sds, ref, off, length)
            return path.write(sds, ref, off, data, fua=fua)

        try:
            result = await self._route(offset >> CHUNK_SHIFT, call, what, first)
            ok = True
            return [result] if data is None else None
        finally:
            self.stats.done(what, length, started, ok)

    async def write_zeroes(self, offset: int, length: int, *, punch_hole: bool, fua: bool) -> None:
        started = time.monotonic()
        ok = False
        try:
            await self._admit(0)
            if punch_hole:
                await self._each(
                    offset,
                    length,
                    lambda idx, off, n, _pos: self._route(
                        idx,
                        lambda sds, ref: self.path.write_zeroes(sds, ref, off, n, fua=fua),
                        "write_zeroes",
                    ),
                )
            else:
                # NO_HOLE: the range must stay allocated, so write real zeroes.
                await self._each(
                    offset,
                    length,
                    lambda idx, off, n, _pos: self._route(
                        idx,
                        lambda sds, ref: self.path.write(sds, ref, off, _ZEROES[:n], fua=fua),
                        "write_zeroes",
                    ),
                )
            ok = True
        finally:
            self.stats.done("write_zeroes", length, started, ok)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        started = time.monotonic()
        ok = False
        try:
            await self._admit(0)
            await self._each(
                offset,
                length,
                lambda idx, off, n, _pos: self._route(
                    idx, lambda sds, ref: self.path.trim(sds, ref, off, n), "trim"
                ),
            )
            if fua:
                await self._flush()
            ok = True
        finally:
            self.stats.done("trim", length, started, ok)

    async def flush(self) -> None:
        started = time.monotonic()
        ok = False
        try:
            await self._flush()
            ok = True
        finally:
            self.stats.done("flush", 0, started, ok)

    # -- routing and retries ---------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")

    async def _admit(self, nbytes: int) -> None:
        self._check_open()
        if self.qos.limited:
            await self.qos.admit(nbytes)

    async def _each(
        self,
        offset: int,
        length: int,
        piece: Callable[[int, int, int, int], Awaitable[T]],
    ) -> list[T]:
        """Run ``piece(chunk_index, offset_in_chunk, n, position_in_request)`` for
        every chunk piece of the range, at most MAX_PARALLEL_PIECES at a time."""
        pieces = chunk_span(offset, length)
        if len(pieces) == 1:
            idx, off, n = pieces[0]
            return [await piece(idx, off, n, 0)]
        starts = []
        pos = 0
        for _, _, n in pieces:
            starts.append(pos)
            pos += n
        if len(pieces) <= MAX_PARALLEL_PIECES:
            return list(
                await asyncio.gather(
                    *(piece(i, o, n, p) for (i, o, n), p in zip(pieces, starts, strict=True))
                )
            )
        sem = asyncio.Semaphore(MAX_PARALLEL_PIECES)

        async def limited(i: int, o: int, n: int, p: int) -> T:
            async with sem:
                return await piece(i, o, n, p)

        return list(
            await asyncio.gather(
                *(limited(i, o, n, p) for (i, o, n), p in zip(pieces, starts, strict=True))
            )
        )

    async def _route(
        self,
        chunk_index: int,
        call: Callable[[SdsEndpoint, ChunkRef], Awaitable[T]],
        what: str,
        started: float | None = None,
    ) -> T:
        """Send one piece to its PG's primary, retrying as the module doc says.
        ``started``: the loop time its first attempt began, when that was earlier."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        timer = self._timer
        now = loop.time() if started is None else started
        deadline = now + self.timeout_s
        attempt = 0
        while True:
            pool = self.maps.pool(self.volume.pool_id)
            if self.closed:
                raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")
            if pool is None:
                reason = "no_map"
            else:
                volume_id = self.volume.id
                pg = pg_of(volume_id, chunk_index, pool.pg_count)
                sds_id = pool.primaries[pg]
                if sds_id is None:
                    reason = "no_primary"
                else:
                    ref = ChunkRef(pool.pool_id, pg, pool.epoch, volume_id, chunk_index)
                    if attempt:
                        now = loop.time()
                    budget = min(self.attempt_timeout_s, max(deadline - now, 0.001))
                    cancelling = task.cancelling()
                    timer.start(loop, task, now + budget)
                    try:
                        return await call(pool.sds[sds_id], ref)
                    except DataPathError as exc:
                        if not exc.retriable:
                            raise RequestError(exc.errno, f"{what}: {exc}") from exc
                        reason = exc.reason
                        if reason in UNREACHABLE_REASONS:
                            report = getattr(self.maps, "report_unreachable", None)
                            if report is not None:
                                report(sds_id)
                    except asyncio.CancelledError:
                        if not (timer.stop(task) and task.uncancel() <= cancelling):
                            raise
                        reason = "timeout"
                    finally:
                        timer.stop(task)
            attempt += 1
            await self._before_retry(pool, reason, attempt, deadline, what)

    async def _before_retry(
        self, pool: PoolMap | None, reason: str, attempt: int, deadline: float, what: str
    ) -> None:
        """Count the retry, refresh the maps, pause if they did not change; EIO when
        the IO timeout is spent."""
        loop = asyncio.get_running_loop()
        self.stats.retry(reason)
        now = loop.time()
        if now - self._last_retry_log >= 1.0:
            self._last_retry_log = now
            log.warning(
                "volume %r: %s retried (%s, attempt %d)", self.volume.name, what, reason, attempt
            )
        if now >= deadline:
            raise RequestError(
                Errno.EIO,
                f"volume {self.volume.name!r}: {what} failed after {attempt} attempts "
                f"in {self.timeout_s:g} s (last: {reason})",
                retriable=True,
            )
        before = pool.epoch if pool is not None else -1
        try:
            async with asyncio.timeout(max(deadline - now, 0.001)):
                await self.maps.refresh()
        except TimeoutError:
            pass
        after = self.maps.pool(self.volume.pool_id)
        if after is None or after.epoch == before:
            pause = min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_MAX_S)
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))

    async def _flush(self) -> None:
        """FLUSH on every SDS holding a copy of some PG of the pool, retrying failures."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        done: set[int] = set()
        attempt = 0
        while True:
            if self.closed:
                raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")
            pool = self.maps.pool(self.volume.pool_id)
            if pool is None:
                reason = "no_map"
            else:
                todo = sorted(pool.holders() - done)
                budget = min(self.attempt_timeout_s, max(deadline - loop.time(), 0.001))
                results = await asyncio.gather(
                    *(self._flush_one(pool, pool.sds[s], budget) for s in todo),
                    return_exceptions=True,
                )
                reason = ""
                primaries = set(pool.primaries)
                for sds_id, result in zip(todo, results, strict=True):
                    if result is None:
                        done.add(sds_id)
                    elif isinstance(result, DataPathError):
                        if not result.retriable:
                            raise RequestError(result.errno, f"flush: {result}") from result
                        if sds_id not in primaries:
                            # Primary of no PG: the primaries' REPL_FLUSH reaches its
                            # in-sync copies, and a stale (failed) one needs none.
                            done.add(sds_id)
                            continue
                        reason = result.reason
                    elif isinstance(result, TimeoutError):
                        if sds_id not in primaries:
                            done.add(sds_id)
                            continue
                        reason = "timeout"
                    elif isinstance(result, BaseException):
                        raise result
                if not reason:
                    return
            attempt += 1
            await self._before_retry(pool, reason, attempt, deadline, "flush")

    async def _flush_one(self, pool: PoolMap, sds: SdsEndpoint, budget: float) -> None:
        async with asyncio.timeout(budget):
            await self.path.flush(sds, pool.pool_id, self.volume.id)
