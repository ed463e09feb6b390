"""IO on one mapped volume: the NBD backend of its export.

Every NBD request takes one path, :meth:`VolumeIO.submit`. It is cut into chunk
pieces (:func:`meshblock.chunks.chunk_span`); each piece goes to the primary of its
PG (:func:`meshblock.chunks.pg_of`) with the pool's map epoch, all pieces of a request
at once. A one-chunk READ or WRITE (most IO) whose first attempt needs no wait (no
QoS limit, a primary in the map, an open connection to it with a free slot) is sent
from ``submit`` itself and answered from its reply's callback, without a task or a
future (:class:`_Attempt`). Everything else is finished in a task
(:meth:`VolumeIO._serve`): other commands, several chunks, a QoS wait, no connection
yet, and a first attempt that fails or gets no reply within its budget, which the
task takes as its own attempt (same start, so same deadlines) and goes on from.

A piece that fails in a retriable way (``EPOCH_STALE``, ``NOT_PRIMARY``, a lost
connection, a PG without a primary, ...) makes the SDC ask the MDM for fresh maps
right away and try again, with a growing pause while the map does not change, for up
to ``io.timeout_s``; only then does the NBD client see an error (EIO). Errors that no
retry can fix (no space, a device IO error, an invalid range) are answered at once.

FLUSH reaches the SDSs that acknowledged a write (without FUA) of the volume since
the last FLUSH began, on any connection to the export (:attr:`VolumeIO.written`),
and those of the FLUSHes still in progress; none at all when there are none, but
the first FLUSH of a VolumeIO goes to every holder (:attr:`VolumeIO.flush_all`). Each
makes the devices it wrote durable and flushes the peers it replicated to. When one
of them fails, the FLUSH goes to every SDS of the pool's current map, until every
primary answered: a write acknowledged by an SDS that failed over since is made
durable by whoever holds its PG now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar, cast

from meshblock.chunks import CHUNK_SHIFT, CHUNK_SIZE, ChunkRef, chunk_span, pgs_of_volume
from meshblock.nbd.protocol import Cmd, CmdFlag, Errno, RequestError
from meshblock.nbd.server import Chunk, IoRequest
from meshblock.sdc.datapath import (
    CLIENT_CHECKS,
    FUA,
    HOLE,
    REPLICA,
    Buffer,
    DataPath,
    DataPathError,
    Op,
    Piece,
    Reply,
)
from meshblock.sdc.maps import PoolMap, SdsEndpoint, VolumeMapping
from meshblock.sdc.metrics import VolumeStats
from meshblock.sdc.qos import Qos
from meshblock.timeouts import LatencyBudgets

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Pieces of one request sent at once (a 4 GiB write-zeroes has 4096 of them).
MAX_PARALLEL_PIECES = 32
#: Pause between attempts while the map has not changed: doubles from the first value.
BACKOFF_FIRST_S = 0.02
BACKOFF_MAX_S = 1.0
#: Attempts of one piece answered CHECKSUM_MISMATCH (its payload damaged on the way,
#: the SDS's or ours: docs/sdc.md, "Checksums") before the request fails with EIO.
CHECKSUM_ATTEMPTS = 4
_MISMATCH: Final = "checksum_mismatch"
#: The attempt timer checks the deadlines of the attempts in flight this often (at
#: most), so an attempt is given up between its deadline and one tick later.
TIMER_TICK_S = 0.1

_ZEROES = memoryview(bytes(CHUNK_SIZE))
_IN_CHUNK = CHUNK_SIZE - 1
_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_TRIM: Final = int(Cmd.TRIM)
_FLUSH: Final = int(Cmd.FLUSH)
#: In VolumeIO.written: the SDS's connection is to be taken as new (a FLUSH that
#: failed): the next FLUSH goes to every holder.
_RECONNECTED: Final = -1
_NBD_FUA: Final = int(CmdFlag.FUA)
_NO_HOLE: Final = int(CmdFlag.NO_HOLE)
#: The label of each command in the metrics and logs.
_WHAT: Final[dict[int, str]] = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.WRITE_ZEROES: "write_zeroes",
    Cmd.TRIM: "trim",
    Cmd.FLUSH: "flush",
}
#: Builds a ChunkRef or a Piece 100 ns faster than its class, whose ``__new__`` is a
#: Python function.
_new_tuple: Final = tuple.__new__

# DataPathError reasons that say the SDS itself did not answer (reported to the MDM):
# a READ that failed so is sent at once to the PG's other copy when the PG is clean.
# An SDS that let an attempt time out gets no new one for its budget (``silent``: the
# IO waits for a newer map instead, or reads the other copy), so that each IO does not
# wait its whole budget for it again.
UNREACHABLE_REASONS = frozenset({"connect", "connection", "timeout"})
FAILOVER_REASONS = UNREACHABLE_REASONS | {"silent"}


def _read_data(reply: Reply, length: int) -> Chunk:
    """What a READ's reply holds; an unallocated range reads as zeroes."""
    return _ZEROES[:length] if reply.flags & HOLE else reply.payload


class AttemptTimer:
    """Gives up the attempts that outlive their budget.

    One periodic timer checks every attempt in flight, instead of one timer handle
    per attempt: ``asyncio.timeout`` cost about 7 us per IO on the benchmark machine
    (docs/performance.md). The timer runs only while attempts are in flight. An
    attempt awaited in a task (:meth:`start`) is cancelled: as with ``asyncio.timeout``,
    it ends in a timeout unless its task was also cancelled from elsewhere. An attempt
    sent without a task (:meth:`watch`) is expired. Deadlines are ``time.monotonic()``.
    """

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        # per task, how to tell whether its attempt may go on past its deadline
        self._extend: dict[asyncio.Task[Any], Callable[[], float]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._watched: set[_Attempt] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        when: float,
        extend: Callable[[], float] | None = None,
    ) -> None:
        """Watch ``task``'s attempt until :meth:`stop`; cancel it once ``when`` is past,
        unless ``extend()`` then gives a later deadline (the SDS is making progress)."""
        self._deadlines[task] = when
        if extend is not None:
            self._extend[task] = extend
        if self._handle is None or self._loop is not loop:
            self._arm(loop)

    def stop(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching ``task``; True when its attempt was cancelled for its deadline."""
        self._deadlines.pop(task, None)
        self._extend.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def watch(self, attempt: _Attempt) -> None:
        """Call ``attempt.expire()`` once its ``deadline`` is past and
        ``attempt.extended()`` gives no later one, unless unwatched."""
        self._watched.add(attempt)
        if self._handle is None or self._loop is None or self._loop.is_closed():
            self._arm(asyncio.get_running_loop())

    def unwatch(self, attempt: _Attempt) -> None:
        self._watched.discard(attempt)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle = loop.call_later(self.tick_s, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        loop = self._loop
        if not (self._deadlines or self._watched) or loop is None or loop.is_closed():
            return
        now = time.monotonic()
        if self._watched:
            for attempt in [a for a in self._watched if a.deadline <= now]:
                later = attempt.extended()
                if later > now:
                    attempt.deadline = later
                    continue
                self._watched.discard(attempt)
                attempt.expire()
        for task, when in list(self._deadlines.items()):
            if when <= now and task not in self._expired:
                extend = self._extend.get(task)
                if extend is not None and (later := extend()) > now:
                    self._deadlines[task] = later
                    continue
                self._expired.add(task)
                task.cancel()
        self._arm(loop)


class MapSource(Protocol):
    """The SDC's current maps, and a way to ask the MDM for newer ones now."""

    def pool(self, pool_id: int) -> PoolMap | None: ...

    async def refresh(self) -> None: ...

    def report_unreachable(self, sds_id: int) -> None:
        """The SDS did not answer (refused or lost connections): tell the MDM."""


class _Attempt:
    """The first attempt of a one-chunk READ or WRITE, sent without a task: the waiter
    of its reply (:class:`~meshblock.sdc.datapath.ReplyWaiter`). A reply with status
    OK answers the request from the receive path; a failure, or no reply by
    ``deadline``, hands the request to the task path, which goes on from there."""

    __slots__ = ("_done", "budget", "deadline", "io", "req", "sds", "sds_id", "started")

    def __init__(
        self, io: VolumeIO, req: IoRequest, sds: SdsEndpoint, started: float, flags: int
    ) -> None:
        self.io = io
        self.req = req
        self.sds = sds
        self.sds_id = sds_id = sds.sds_id
        self.started = started
        self.budget = budget = io._budget(sds_id, flags)
        self.deadline = started + budget
        self._done = False

    def extended(self) -> float:
        """Its deadline now, by what its SDS's connection received (VolumeIO._alive)."""
        io = self.io
        return io._alive(self.sds, self.started, self.budget, self.started + io.ceiling)

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: Reply) -> None:
        self._done = True
        io = self.io
        io._timer.unwatch(self)
        req = self.req
        if reply.status:
            io._go_on(self, io.path.error(Op.READ if req.cmd == _READ else Op.WRITE, reply))
            return
        io.budgets.record(self.sds_id, time.monotonic() - self.started)
        if reply.epoch > io.epoch_seen:
            io.epoch_seen = reply.epoch
        if req.cmd == _READ:
            io.stats.done("read", req.length, self.started, True)
            req.reply((_read_data(reply, req.length),))
        else:
            if not req.flags & _NBD_FUA:
                io.wrote(self.sds_id, self.sds)
            io.stats.done("write", req.length, self.started, True)
            req.reply()

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        io = self.io
        io._timer.unwatch(self)
        io._go_on(self, io.path.error(Op.READ if self.req.cmd == _READ else Op.WRITE, exc))

    def expire(self) -> None:
        """No reply within the attempt's budget (the timer no longer watches it)."""
        self._done = True
        self.io._go_on(
            self,
            DataPathError(
                "timeout", f"nothing received from the SDS for {self.budget:.3g} s", retriable=True
            ),
        )


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
        budgets: LatencyBudgets | None = None,
    ) -> None:
        self.volume = volume
        self.maps = maps
        self.path = path
        self.stats = stats
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        #: Per SDS, the budget of one attempt, adapted to its latency (shared by the
        #: SDC's volumes); without one, every attempt may take ``attempt_timeout_s``.
        #: The longest one attempt may take, even on a connection that makes progress.
        self.ceiling = ceiling = min(attempt_timeout_s, max(timeout_s, 0.001))
        if budgets is None:
            budgets = LatencyBudgets(floor=ceiling, factor=1.0, ceiling=ceiling)
        self.budgets = budgets
        self.qos = Qos(volume.iops_limit, volume.bandwidth_limit_bps)
        self.closed = False
        shortest = min(budgets.floor, budgets.ceiling, ceiling)
        self._timer = AttemptTimer(min(TIMER_TICK_S, max(shortest / 4, 0.005)))
        self._last_retry_log = 0.0
        # The pool map routes were last taken from, and the volume's first PG in it.
        self._pool: PoolMap | None = None
        self._first_pg = 0
        #: The highest map epoch of the volume's pool that an answered request carried
        #: back: a REPLICA read is never sent stamped below it (:meth:`_read_replica`).
        self.epoch_seen = 0
        #: The SDSs that acknowledged a write without FUA since the last FLUSH began,
        #: each with the number of its connection then (DataPath.connects): the next
        #: FLUSH goes to them (:meth:`_flush`).
        self.written: dict[int, int] = {}
        # Per FLUSH in progress, the SDSs it flushes: a FLUSH that begins meanwhile
        # flushes them too (the writes they acknowledged before it are not durable
        # until that FLUSH is done).
        self._flushing: dict[object, dict[int, int]] = {}
        #: The next FLUSH goes to every holder of the pool's map whatever
        #: :attr:`written` says: at first (a VolumeIO made anew, at an SDC start or
        #: for a re-created export, knows nothing of the writes acknowledged before
        #: it, which a reconnected NBD client's FLUSH covers too) and after a FLUSH
        #: that failed while it was so.
        self.flush_all = True

    def update(self, volume: VolumeMapping) -> None:
        """The mapping changed (size, QoS limits)."""
        self.volume = volume
        self.qos.update(volume.iops_limit, volume.bandwidth_limit_bps)

    def close(self) -> None:
        self.closed = True

    # -- the one path -------------------------------------------------------------------

    def submit(self, req: IoRequest) -> None:
        """Serve one NBD request (see the module doc)."""
        cmd = req.cmd
        if (cmd == _READ or cmd == _WRITE) and not (self.closed or self.qos.limited):
            offset = req.offset
            length = req.length
            if length and offset >> CHUNK_SHIFT == (offset + length - 1) >> CHUNK_SHIFT:
                if self._send_first(req, offset, length):
                    return
        req.run(self._serve(req, time.monotonic()))

    def _send_first(self, req: IoRequest, offset: int, length: int) -> bool:
        """Send a one-chunk READ or WRITE's first attempt now, if nothing has to wait."""
        pool = self.maps.pool(self.volume.pool_id)
        if pool is None:
            return False
        target = self._target(pool, offset >> CHUNK_SHIFT)
        if target is None:
            return False
        sds_id, ref = target
        if self.budgets.silent_until and self.budgets.silent(sds_id, time.monotonic()):
            return False
        if req.cmd == _READ:
            op, flags = Op.READ, CLIENT_CHECKS
        else:
            op, flags = Op.WRITE, (FUA if req.flags & _NBD_FUA else 0)
        piece = _new_tuple(Piece, (op, flags, ref, offset & _IN_CHUNK, length, req.data))
        attempt = _Attempt(self, req, pool.sds[sds_id], time.monotonic(), flags)
        if not self.path.submit(pool.sds[sds_id], piece, attempt):
            return False
        self._timer.watch(attempt)
        return True

    def _go_on(self, attempt: _Attempt, failure: DataPathError) -> None:
        """A first attempt sent without a task failed: the task path goes on from it."""
        attempt.req.run(self._serve(attempt.req, attempt.started, failure, attempt.sds_id))

    def _target(self, pool: PoolMap, chunk_index: int) -> tuple[int, ChunkRef] | None:
        """The primary of the chunk's PG in ``pool`` and the chunk's address, or None
        when the PG has no primary."""
        if pool is not self._pool:
            self._pool = pool
            self._first_pg = pgs_of_volume(self.volume.id, CHUNK_SIZE, pool.pg_count)[0]
        pg = (self._first_pg + chunk_index) % pool.pg_count  # = pg_of(volume, chunk, count)
        sds_id = pool.primaries[pg]
        if sds_id is None:
            return None
        volume_id = self.volume.id
        return sds_id, _new_tuple(ChunkRef, (pool.pool_id, pg, pool.epoch, volume_id, chunk_index))

    async def _serve(
        self,
        req: IoRequest,
        started: float,
        failed: DataPathError | None = None,
        failed_sds: int = 0,
    ) -> Sequence[Chunk] | None:
        """Finish ``req`` in a task; a READ's data. ``failed``: how its first attempt,
        sent without a task to SDS ``failed_sds`` at ``started``, failed."""
        cmd = req.cmd
        nbytes = 0 if cmd == _FLUSH else req.length
        ok = False
        try:
            if cmd == _FLUSH:
                await self._flush()
                result = None
            else:
                if failed is None:
                    self._check_open()
                    if self.qos.limited:
                        await self.qos.admit(nbytes if cmd == _READ or cmd == _WRITE else 0)
                result = await self._pieces(req, started, failed, failed_sds)
            ok = True
            return result
        finally:
            self.stats.done(_WHAT[cmd], nbytes, started, ok)

    async def _pieces(
        self, req: IoRequest, started: float, failed: DataPathError | None, failed_sds: int
    ) -> Sequence[Chunk] | None:
        """Every chunk piece of a READ, WRITE, WRITE_ZEROES or TRIM, with retries."""
        cmd = req.cmd
        what = _WHAT[cmd]
        fua = FUA if req.flags & _NBD_FUA else 0
        data = None if req.data is None else memoryview(req.data)
        if cmd == _READ:
            op, flags = Op.READ, CLIENT_CHECKS
        elif cmd == _WRITE:
            op, flags = Op.WRITE, fua
        elif cmd == _TRIM:
            op, flags = Op.TRIM, 0
        elif req.flags & _NO_HOLE:  # the range must stay allocated: write real zeroes
            op, flags = Op.WRITE, fua
        else:
            op, flags = Op.WRITE_ZEROES, fua

        def piece(idx: int, off: int, n: int, pos: int) -> Awaitable[Chunk | None]:
            if data is not None:
                payload: Buffer | None = data[pos : pos + n]
            else:
                payload = _ZEROES[:n] if op == Op.WRITE else None
            return self._route(op, flags, idx, off, n, payload, what, started, failed, failed_sds)

        out = await self._each(req.offset, req.length, piece)
        if cmd == _TRIM and fua:
            await self._flush()
        return cast(list[Chunk], out) if cmd == _READ else None  # a READ's pieces have data

    # -- routing and retries ---------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")

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
        op: Op,
        flags: int,
        chunk_index: int,
        offset: int,
        length: int,
        payload: Buffer | None,
        what: str,
        started: float,
        failed: DataPathError | None = None,
        failed_sds: int = 0,
    ) -> Chunk | None:
        """Send one piece to its PG's primary, retrying as the module doc says; a READ's
        data. ``failed``: its first attempt, sent without a task to SDS ``failed_sds``
        at ``started``, failed so; the piece's deadlines count from then. Otherwise
        they count from now: a wait for QoS tokens or for a turn among the pieces of
        a large request is not spent retrying."""
        task = asyncio.current_task()
        assert task is not None
        if failed is None:
            started = time.monotonic()
        deadline = started + self.timeout_s
        attempt = mismatches = 0
        while True:
            pool = self.maps.pool(self.volume.pool_id)
            if self.closed:
                raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")
            target = None if pool is None else self._target(pool, chunk_index)
            tried = 0  # the SDS whose attempt failed
            if failed is not None:
                reason = self._failure(failed, failed_sds, what)
                tried, failed = failed_sds, None
            elif pool is None:
                reason = "no_map"
            elif target is None:
                reason = "no_primary"
            elif self.budgets.silent(target[0], time.monotonic()):
                reason, tried = "silent", target[0]
            else:
                sds_id, ref = target
                now = time.monotonic() if attempt else started
                try:
                    piece = Piece(op, flags, ref, offset, length, payload)
                    reply = await self._attempt(task, pool, sds_id, piece, now, deadline)
                    if op == Op.READ:
                        return _read_data(reply, length)
                    if not flags & FUA:
                        self.wrote(sds_id, pool.sds[sds_id])
                    return None
                except DataPathError as exc:
                    reason = self._failure(exc, sds_id, what)
                    tried = sds_id
            if op == Op.READ and reason in FAILOVER_REASONS and pool and target:
                ref = target[1]
                data = await self._read_replica(task, pool, ref, tried, offset, length, deadline)
                if data is not None:
                    return data
            if reason == _MISMATCH:
                mismatches += 1
                if mismatches >= CHECKSUM_ATTEMPTS:
                    raise RequestError(
                        Errno.EIO,
                        f"volume {self.volume.name!r}: {what} failed: the payload did not match "
                        f"its checksums in {mismatches} attempts",
                    )
                if flags & CLIENT_CHECKS:
                    # The SDS sent its stored checksums unchecked: read again at once,
                    # checked there (a bad copy is healed before the answer).
                    flags &= ~CLIENT_CHECKS
                    self.stats.retry(reason)
                    attempt += 1
                    continue
            attempt += 1
            await self._before_retry(pool, reason, attempt, deadline, what)

    async def _attempt(
        self,
        task: asyncio.Task[Any],
        pool: PoolMap,
        sds_id: int,
        piece: Piece,
        now: float,
        deadline: float,
    ) -> Reply:
        """One attempt on SDS ``sds_id`` started at ``now``, given up once its connection
        has received nothing for the SDS's budget (:meth:`_alive`): DataPathError
        ``timeout``. An answered attempt's time feeds the SDS's budget."""
        timer = self._timer
        budget = min(self._budget(sds_id, piece.flags), max(deadline - now, 0.001))
        cap = min(now + self.ceiling, deadline)
        sds = pool.sds[sds_id]
        cancelling = task.cancelling()
        timer.start(task.get_loop(), task, now + budget, lambda: self._alive(sds, now, budget, cap))
        try:
            reply = await self.path.call(sds, piece)
        except asyncio.CancelledError:
            if not (timer.stop(task) and task.uncancel() <= cancelling):
                raise
            raise DataPathError(
                "timeout", f"no reply from SDS {sds_id} in {budget:.3g} s", retriable=True
            ) from None
        finally:
            timer.stop(task)
        self.budgets.record(sds_id, time.monotonic() - now)
        if reply.epoch > self.epoch_seen:
            self.epoch_seen = reply.epoch
        return reply

    def _budget(self, sds_id: int, flags: int) -> float:
        """How long an attempt on ``sds_id`` may receive nothing: its budget, the
        ceiling for a FUA write (it waits for a device sync, which may take seconds)."""
        return self.ceiling if flags & FUA else self.budgets.budget(sds_id)

    def _alive(self, sds: SdsEndpoint, started: float, budget: float, cap: float) -> float:
        """The deadline of an attempt on ``sds`` started at ``started``: ``budget``
        after the later of its start and the last byte its connection received, and
        ``cap`` at the latest. A healthy SDS under load answers the requests ahead of
        this one (a wait for an in-flight slot, for 1 MiB payloads queued before it)
        and its attempts go on; a hung one answers nothing and they are given up."""
        return min(cap, max(started, self.path.progress(sds)) + budget)

    async def _read_replica(
        self,
        task: asyncio.Task[Any],
        pool: PoolMap,
        ref: ChunkRef,
        tried: int,
        offset: int,
        length: int,
        deadline: float,
    ) -> Chunk | None:
        """A READ whose attempt on SDS ``tried`` got no answer (timeout, lost or
        refused connection), sent at once to the other copy of a clean PG with the
        REPLICA flag: that copy holds every acknowledged write (docs/sdc.md). Its data,
        or None when the PG has no such copy or it failed too (then the usual retry)."""
        if pool.epoch < self.epoch_seen:
            # An SDS answered at a newer map than ours: the PG may no longer be clean
            # (a write of ours acknowledged by its primary alone, the secondary
            # missing it, possibly stalled at our epoch and still serving it). No
            # failover read before our map has caught up: the retry refreshes it.
            return None
        other = pool.replica(ref.pg)
        if other is None or other == tried or other not in pool.sds:
            return None
        if self.budgets.silent(other, time.monotonic()):
            return None
        self.stats.retry("replica_read")
        piece = Piece(Op.READ, REPLICA, ref, offset, length)
        try:
            reply = await self._attempt(task, pool, other, piece, time.monotonic(), deadline)
        except DataPathError as exc:
            if exc.reason in UNREACHABLE_REASONS:
                self.maps.report_unreachable(other)
                if exc.reason == "timeout":
                    self.budgets.silence(other, time.monotonic())
            return None
        return _read_data(reply, length)

    def _failure(self, exc: DataPathError, sds_id: int, what: str) -> str:
        """Why an attempt on SDS ``sds_id`` is retried; RequestError when no retry can
        fix it."""
        if not exc.retriable:
            raise RequestError(exc.errno, f"{what}: {exc}") from exc
        if exc.reason in UNREACHABLE_REASONS:
            self.maps.report_unreachable(sds_id)
            if exc.reason == "timeout":
                self.budgets.silence(sds_id, time.monotonic())
        return exc.reason

    async def _before_retry(
        self, pool: PoolMap | None, reason: str, attempt: int, deadline: float, what: str
    ) -> None:
        """Count the retry, refresh the maps, pause if they did not change; EIO when
        the IO timeout is spent."""
        self.stats.retry(reason)
        now = time.monotonic()
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
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))

    def wrote(self, sds_id: int, sds: SdsEndpoint) -> None:
        """SDS ``sds_id`` acknowledged a write without FUA: the next FLUSH goes to it,
        noted with the number of its connection now (:attr:`written`)."""
        if sds_id not in self.written:
            self.written[sds_id] = self.path.connects(sds)

    async def _flush(self) -> None:
        """FLUSH: every write acknowledged before it durable (the module doc). The
        SDSs it goes to leave :attr:`written` now: a write acknowledged from here on
        is the next FLUSH's; they go back to it if this one fails."""
        targets = self.written
        self.written = {}
        for earlier in self._flushing.values():
            for sds_id, conn in earlier.items():
                if targets.setdefault(sds_id, conn) != conn:
                    targets[sds_id] = _RECONNECTED
        flush_all, self.flush_all = self.flush_all, False
        if not targets and not flush_all:
            return
        token = object()
        self._flushing[token] = targets
        done = False
        try:
            pool = self.maps.pool(self.volume.pool_id)
            # An SDS connected to again since it acknowledged a write may have
            # restarted (a new process knows nothing of the peers it forwarded
            # to): every holder is flushed then.
            wide = (
                flush_all
                or pool is None
                or any(
                    s not in pool.sds or self.path.connects(pool.sds[s]) != c
                    for s, c in targets.items()
                )
            )
            await self._flush_to(targets, wide)
            done = True
        finally:
            del self._flushing[token]
            if not done:
                self.written.update(dict.fromkeys(targets, _RECONNECTED))
                self.flush_all = self.flush_all or flush_all

    async def _flush_to(self, conns: dict[int, int], widened: bool) -> None:
        """FLUSH the SDSs of ``conns``, retrying failures. Once one fails, or was
        connected to again since its write (``conns``: its DataPath.connects then),
        even by this FLUSH itself, or from the start (``widened``), every SDS holding
        a copy of some PG of the pool's current map is flushed too, and a failed one
        that is primary of no PG counts as done: the primaries' REPL_FLUSH reaches
        its in-sync copies (those of the PGs it failed over), and a stale one needs
        none."""
        targets = set(conns)
        deadline = time.monotonic() + self.timeout_s
        done: set[int] = set()
        attempt = 0
        while True:
            if self.closed:
                raise RequestError(Errno.ESHUTDOWN, f"volume {self.volume.name!r} is unmapped")
            pool = self.maps.pool(self.volume.pool_id)
            if pool is None:
                reason = "no_map"
            else:
                todo = sorted((targets | pool.holders() if widened else targets) - done)
                budget = min(self.attempt_timeout_s, max(deadline - time.monotonic(), 0.001))
                results = await asyncio.gather(
                    *(self._flush_one(pool, s, budget) for s in todo),
                    return_exceptions=True,
                )
                reason = ""
                primaries = set(pool.primaries)
                for sds_id, result in zip(todo, results, strict=True):
                    if result is None:
                        done.add(sds_id)
                        continue
                    if isinstance(result, DataPathError):
                        if not result.retriable:
                            raise RequestError(result.errno, f"flush: {result}") from result
                    elif not isinstance(result, TimeoutError):
                        raise result
                    widened = True
                    if sds_id not in primaries:
                        done.add(sds_id)
                    elif isinstance(result, DataPathError):
                        reason = result.reason
                    else:
                        reason = "timeout"
                # The FLUSH itself may have found the connection closed and opened a
                # new one (the SDS restarted since its write, and forgot its peers).
                widened = widened or any(
                    s in pool.sds and self.path.connects(pool.sds[s]) != c for s, c in conns.items()
                )
                if not reason:
                    if not widened or not (pool.holders() - done):
                        return
                    continue  # the holders not flushed yet, at once
            attempt += 1
            await self._before_retry(pool, reason, attempt, deadline, "flush")

    async def _flush_one(self, pool: PoolMap, sds_id: int, budget: float) -> None:
        """FLUSH SDS ``sds_id`` within ``budget``; an SDS left alone since an attempt
        on it timed out (silent) is not sent one: it fails as a timeout at once, so
        that the flush waits for the map that fails it over rather than ``budget``.
        One no longer in the map fails at once too."""
        sds = pool.sds.get(sds_id)
        if sds is None:
            raise DataPathError("no_map", f"SDS {sds_id} is not in the map", retriable=True)
        if self.budgets.silent(sds_id, time.monotonic()):
            raise TimeoutError(f"SDS {sds_id} did not answer lately")
        ref = ChunkRef(pool.pool_id, 0, 0, self.volume.id, 0)  # FLUSH names no chunk
        async with asyncio.timeout(budget):
            await self.path.call(sds, Piece(Op.FLUSH, 0, ref, 0, 0))
