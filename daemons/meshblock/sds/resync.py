"""The copies a PG's primary makes: resync, rebuild and rebalance moves.

One job per PG this SDS is primary of, whenever the map names a copy to fill
(:meth:`meshblock.sds.maps.PgMap.copy_to`); new writes are forwarded to that copy
meanwhile (io_path):

- ``resyncing`` (the stale secondary's SDS is back, docs/design.md, invariant 4): the chunks
  in the PG's :class:`~meshblock.sds.replication.DegradedWrites` record when it is
  complete (this process saw the PG leave ``clean`` and the secondary did not change
  since): the delta; else every chunk of the PG this SDS holds: a full copy;
- ``rebuilding`` (a new secondary on another SDS): a full copy;
- a rebalance move (the PG has a ``target``): a full copy to the target. A forwarded
  write the target missed does not fail the client's write (the PG's two copies
  have it); it is recorded (:meth:`Resync.missed`) and copied again before the job
  reports.

Each chunk is copied under the chunk's range lock over the whole chunk, the lock the
replication path takes, so a client write to it is applied on both copies either
before the copy (which then carries it) or after it (forwarded as usual). A chunk
we hold is sent as a whole-chunk REPL_WRITE, one we no longer hold as a whole-chunk
REPL_TRIM. Copies run ``rebuild_concurrency`` (moves: ``rebalance_concurrency``) at a
time per source device (the PG's primary device here) and are paced per source device
to ``rebuild_bandwidth_mibps`` (moves: ``rebalance_bandwidth_mibps``; 0: unlimited),
read from the pool's newest map, so a change of the pool's settings applies to the
next chunk. When every chunk is copied the secondary is flushed and the MDM told
(``POST /api/v1/sds/{id}/pgs-synced``), which makes the PG clean at a new map epoch.

A full copy also trims on the copy every chunk of the PG that the copy stores and we
do not (``CHUNK_LIST`` of its chunks first): chunks trimmed or zeroed here while no
record was kept, or left there from an earlier placement, would read there as stale
data once it serves the PG.

A job runs in three steps: its plan (:func:`plan_copy`, a pure function of the map,
the record, what we hold and what the copy lists: :class:`CopyPlan`), the copy
(:meth:`Resync._copy_all`: the chunks, then those forwards missed meanwhile, then a
flush of the copy) and the report to the MDM (:meth:`Resync._report`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.sds.checksums import BLOCK_SHIFT, ChecksumError
from meshblock.sds.heal import repair_from_peer
from meshblock.sds.maps import PgMap
from meshblock.sds.state import SdsState
from meshblock.sds.store import chunk_key
from meshblock.wire.client import WireError
from meshblock.wire.handshake import FEATURE_MARK_BAD
from meshblock.wire.protocol import Op, ProtocolError, Status

log = logging.getLogger(__name__)

RESTART_S = 1.0  # pause before restarting a PG's resync that did not finish
#: ... doubled after each further job of the PG that did not finish, up to this
RESTART_MAX_S = 16.0
RETRY_S = 0.5  # pause before retrying a chunk the secondary refused (map not there yet)
#: Times a chunk is tried again (RETRY_S apart, its lock released) when a copy refused
#: the repair of its bad blocks for map lag, before the job gives up (and starts over).
LAG_RETRIES = 4
#: Times a chunk is sent again after the copy found it damaged on the wire
#: (CHECKSUM_MISMATCH) before the job gives up (and starts over).
MISMATCH_RETRIES = 4
#: The copy a job makes: (sds id, device id) and whether it is a new copy (a rebuild
#: or a move) rather than a resync.
_Copy = tuple[tuple[int, int], bool]
# Tells the MDM a PG is synced: (pool, pg, epoch) -> the pool's new map epoch, at
# which the copy is done, or None (refused).
Reporter = Callable[[int, int, int], Awaitable[int | None]]


class ResyncAborted(Exception):
    """The PG is no longer ours to resync at this map (or the secondary is gone)."""


class SourceLagging(ResyncAborted):
    """A chunk's bad blocks could not be repaired now: a copy refused us for map lag."""


@dataclass(frozen=True)
class CopyPlan:
    """What one copy job copies (:func:`plan_copy`)."""

    pool: int
    pg: int
    epoch: int  # the map epoch the job started at: reported with the copy done
    dest: int  # the SDS copied to
    what: str  # "resync", "rebuild" or "move"
    full: bool  # every chunk of the PG, not the record of the writes made alone
    source: int  # our device that holds the PG: the copies are throttled per source
    chunks: tuple[tuple[int, int], ...]  # (volume, chunk), ascending

    @property
    def kind(self) -> str:
        """Its throttle and progress: ``rebalance`` for a move, else ``rebuild``."""
        return "rebalance" if self.what == "move" else "rebuild"


def copy_kind(m: PgMap, pg: int, record_complete: bool) -> tuple[str, bool]:
    """What the copy of ``pg`` that ``m`` names is (``move``, ``rebuild`` or
    ``resync``), and whether it copies every chunk of the PG: a move and a rebuild
    (a new, empty copy) always do, a resync when the PG's record of the writes made
    alone is not complete."""
    if m.target[pg][0]:
        return "move", True
    if m.rebuilding[pg]:
        return "rebuild", True
    return "resync", not record_complete


def plan_copy(
    m: PgMap,
    pg: int,
    epoch: int,
    *,
    record: Iterable[tuple[int, int]] | None,
    held: Iterable[tuple[int, int]] = (),
    listed: Iterable[tuple[int, int]] = (),
    deleted: Callable[[int], bool] = lambda volume: False,
) -> CopyPlan:
    """The plan of the copy of ``pg`` that ``m`` names, started at map ``epoch``; a
    pure function (no store, no socket).

    ``record``: the PG's record of the writes made alone when it is complete, else
    None. ``held``: the chunks this SDS stores (of the PG, or more: only the PG's
    count); ``listed``: those the copy's SDS stores (CHUNK_LIST), likewise. A delta
    copies the record; a full copy what we hold and what the copy holds (trimmed
    there, as we hold no slot for it: zeroed or trimmed here while no record was
    kept, or left there from an earlier placement). A chunk of a ``deleted`` volume
    is never copied. :class:`ValueError` when ``m`` names no copy of the PG."""
    dest = m.copy_to(pg)
    if dest is None:
        raise ValueError(f"map epoch {m.epoch} names no copy of PG {m.pool_id}/{pg}")
    what, full = copy_kind(m, pg, record is not None)
    if full:
        count = m.pg_count
        chunks = {k for k in itertools.chain(held, listed) if pg_of(k[0], k[1], count) == pg}
    else:
        chunks = set(record or ())
    return CopyPlan(
        pool=m.pool_id,
        pg=pg,
        epoch=epoch,
        dest=dest[0],
        what=what,
        full=full,
        source=m.primary[pg][1],
        chunks=tuple(sorted(k for k in chunks if not deleted(k[0]))),
    )


class Resync:
    """The resync jobs of the PGs this SDS is primary of, and their counters."""

    def __init__(self, state: SdsState) -> None:
        self._state = state
        self.reporter: Reporter | None = None
        self.jobs: dict[tuple[int, int], tuple[int, asyncio.Task[bool]]] = {}
        self._dest: dict[tuple[int, int], _Copy] = {}  # per job
        self._missed: dict[tuple[int, int], set[tuple[int, int]]] = {}
        # PGs whose report the MDM accepted -> the map epoch that has them done; a map
        # older than that (in flight meanwhile) still names the copy: no new job for it
        self._settled: dict[tuple[int, int], int] = {}
        # per job: [chunks to copy, chunks copied, "rebuild" or "rebalance"]
        self.progress: dict[tuple[int, int], list[int | str]] = {}
        self.copied_bytes: dict[tuple[int, str], int] = {}  # (pool, kind) -> counter
        self._slots: dict[tuple[int, str], int] = {}  # copies in flight per device, kind
        self._slot_freed = asyncio.Event()
        # per (device, kind): when the next chunk may go (bandwidth pacing)
        self._next_send: dict[tuple[int, str], float] = {}
        self.chunks_total = 0  # chunks copied (written or trimmed on the secondary)
        self.bytes_total = 0
        self.pgs_total = 0  # PGs resynchronised (the MDM accepted the report)
        self.full_total = 0  # of which were full copies (no complete record)
        self.marked_bad_total = 0  # 4 KiB blocks copied as bad (no good copy of them)
        self.mismatches_total = 0  # chunks sent again: the copy found them damaged
        # the last completed resync of each PG: chunks, full, target SDS, seconds
        self.done: dict[str, dict[str, int | float | bool | str]] = {}
        # per peer SDS, when a forwarded write to it last lost its connection (or got no
        # answer in the peer's budget): a job copying to it since then does not report
        self._lost: dict[int, float] = {}
        # PGs whose job did not finish, waiting for its restart: the copy it made (the
        # map names the same one: no new job before the pause ends) and the timer
        self._held: dict[tuple[int, int], tuple[_Copy, asyncio.TimerHandle]] = {}
        self._failures: dict[tuple[int, int], int] = {}  # jobs in a row that did not finish
        state.maps.listeners.append(self.map_changed)

    def map_changed(self, m: PgMap) -> None:
        me = self._state.sds_id
        for pg in range(m.pg_count):
            key = (m.pool_id, pg)
            settled = self._settled.get(key)
            if settled is not None:
                if m.epoch < settled:
                    continue
                del self._settled[key]
            dest = m.copy_to(pg) if me and m.primary[pg][0] == me else None
            want = None if dest is None else (dest, m.rebuilding[pg] or bool(m.target[pg][0]))
            held = self._held.get(key)
            if held is not None:
                if held[0] == want:
                    continue  # the same copy: restarted when its pause ends
                held[1].cancel()  # another copy (or none): a fresh start
                del self._held[key]
                self._failures.pop(key, None)
            job = self.jobs.get(key)
            if job is not None and self._dest.get(key) != want:
                job[1].cancel()
                self._failures.pop(key, None)
                del self.jobs[key]
                self._dest.pop(key, None)
                self.progress.pop(key, None)
                job = None
            if job is None and want is not None:
                self._start(m.pool_id, pg, m.epoch)
                self._dest[key] = want

    def missed(self, ref: ChunkRef) -> bool:
        """A forwarded write did not reach the PG's move target: copy it again, if the
        PG's job is still copying (True). False once the job is past its last copy
        (flushing, reporting, done): the caller must fail the client's write."""
        chunks = self._missed.get((ref.pool_id, ref.pg))
        if chunks is None:
            return False
        chunks.add((ref.volume_id, ref.chunk_index))
        return True

    def lost(self, peer: int) -> None:
        """A forward to ``peer`` lost its connection: no job that copies to it and was
        under way then may report its copy done (it could not reach the copy)."""
        self._lost[peer] = time.monotonic()

    def report(self) -> list[dict[str, int | str]]:
        """Per pool and kind, bytes left to copy and copied since start (heartbeats)."""
        left: dict[tuple[int, str], int] = {}
        for (pool, _), (total, done, kind) in self.progress.items():
            k = (pool, str(kind))
            left[k] = left.get(k, 0) + max(0, int(total) - int(done)) * CHUNK_SIZE
        keys = sorted(set(left) | set(self.copied_bytes))
        return [
            {
                "pool_id": pool,
                "kind": kind,
                "remaining_bytes": left.get((pool, kind), 0),
                "copied_bytes": self.copied_bytes.get((pool, kind), 0),
            }
            for pool, kind in keys
        ]

    def _start(self, pool: int, pg: int, epoch: int) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # maps loaded before the loop runs: the first live map starts it
        task = loop.create_task(self._job(pool, pg, epoch), name=f"resync-{pool}-{pg}")
        self.jobs[(pool, pg)] = (epoch, task)
        task.add_done_callback(lambda t: self._done(pool, pg, t))

    def _done(self, pool: int, pg: int, task: asyncio.Task[bool]) -> None:
        key = (pool, pg)
        job = self.jobs.get(key)
        want = None
        if job is not None and job[1] is task:
            del self.jobs[key]
            want = self._dest.pop(key, None)
            self.progress.pop(key, None)
            self._missed.pop(key, None)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.warning("resync of PG %d/%d stopped: %s", pool, pg, task.exception())
        if not task.exception() and task.result():
            self._failures.pop(key, None)
            return
        if want is None:
            return  # no longer the PG's job: the map that replaced it decided
        # Still resyncing (the copy failed, or the MDM refused an old epoch): again
        # from the newest map, after a pause that grows while jobs keep failing (a
        # copy that refuses us for long) and that maps naming the same copy do not cut.
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        pause = min(RESTART_S * 2**failures, RESTART_MAX_S)
        timer = asyncio.get_running_loop().call_later(pause, self._restart, pool, pg)
        self._held[key] = (want, timer)

    def _restart(self, pool: int, pg: int) -> None:
        self._held.pop((pool, pg), None)
        m = self._state.maps.maps.get(pool)
        if m is not None:
            self.map_changed(m)

    def active(self) -> dict[str, int]:
        return {f"{pool}/{pg}": epoch for (pool, pg), (epoch, _) in sorted(self.jobs.items())}

    async def close(self) -> None:
        tasks = [t for _, t in self.jobs.values()]
        self.jobs.clear()
        self._dest.clear()
        for _, timer in self._held.values():
            timer.cancel()
        self._held.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- one PG -----------------------------------------------------------------------

    async def _job(self, pool: int, pg: int, epoch: int) -> bool:
        """Plan, copy, then report; True once the MDM accepted the report."""
        plan = await self._plan(pool, pg, epoch)
        progress: list[int | str] = [len(plan.chunks), 0, plan.kind]
        self.progress[(pool, pg)] = progress
        log.info(
            "%s of PG %d/%d to SDS %d: %s copy of %d chunk(s)",
            plan.what,
            pool,
            pg,
            plan.dest,
            "full" if plan.full else "delta",
            len(plan.chunks),
        )
        t0 = time.monotonic()
        await self._copy_all(plan, progress, t0)
        return await self._report(plan, int(progress[0]), t0)

    async def _plan(self, pool: int, pg: int, epoch: int) -> CopyPlan:
        """The job's plan (:func:`plan_copy`) from the newest map, the record of the
        writes made alone, and for a full copy what we hold and what the copy's SDS
        lists. From here on, forwards the target misses are copied again."""
        st = self._state
        m = st.maps.maps[pool]
        complete = st.degraded.complete(pool, pg)
        self._missed[(pool, pg)] = set()
        deleted = st.tombstones.deleted
        if not copy_kind(m, pg, complete)[1]:
            return plan_copy(m, pg, epoch, record=st.degraded.chunks(pool, pg), deleted=deleted)
        held = st.store.chunks_of_pg(pool, pg)
        if held is None:  # not indexed: the pool's chunks (the plan keeps the PG's)
            held = st.store.chunk_ids_of_pool(pool)
        listed = await self._listed(pool, pg)
        return plan_copy(m, pg, epoch, record=None, held=held, listed=listed, deleted=deleted)

    async def _copy_all(self, plan: CopyPlan, progress: list[int | str], t0: float) -> None:
        """Copy the plan's chunks, then those that forwarded writes missed meanwhile,
        until none is left; then flush the copy's SDS: the round trip that shows it
        reachable now, also with no chunk to copy (the peer connection gives up after
        the peer's short budget). :class:`ResyncAborted` when it cannot be reached,
        could not be at some moment since the job started at ``t0`` (a forward to it
        lost its connection), or no longer is the copy; the other chunks' copies are
        cancelled first, so none goes on beside the job that starts over."""
        key = (plan.pool, plan.pg)
        try:
            chunks = plan.chunks
            while chunks:
                await _all_or_none(self._copy_limited(plan, v, c, progress) for v, c in chunks)
                chunks = tuple(sorted(self._missed.get(key, ())))
                self._missed[key] = set()
                progress[0] = int(progress[0]) + len(chunks)
            # Past the last copy (no await since the loop's test): from here on a
            # forward the target misses fails the client's write instead.
            self._missed.pop(key, None)
            sec_id, address = self._target(plan.pool, plan.pg)
            client = await self._state.peers.get(sec_id, address)
            await client.repl_flush()
        except WireError as exc:
            raise ResyncAborted(f"secondary unreachable: {exc}") from exc
        if self._lost.get(plan.dest, t0 - 1.0) >= t0:
            raise ResyncAborted(f"a forward to SDS {plan.dest} lost its connection meanwhile")

    async def _report(self, plan: CopyPlan, copied: int, t0: float) -> bool:
        """Tell the MDM that the copy is done, again while it cannot be reached; True
        once it accepted (the PG is done at the map epoch it answers), False when it
        refused."""
        pool, pg = plan.pool, plan.pg
        while self.reporter is not None:
            try:
                settled = await self.reporter(pool, pg, plan.epoch)
            except Exception as exc:  # MDM unreachable: keep trying, the copy stands
                log.warning("cannot report PG %d/%d synced: %s", pool, pg, exc)
                await asyncio.sleep(1.0)
                continue
            if settled is None:
                return False
            if self._state.maps.epoch(pool) < settled:
                self._settled[(pool, pg)] = settled
            self.pgs_total += 1
            self.full_total += plan.full
            seconds = time.monotonic() - t0
            self.done[f"{pool}/{pg}"] = {
                "chunks": copied,
                "full": plan.full,
                "kind": plan.what,
                "target": plan.dest,
                "seconds": round(seconds, 3),
            }
            log.info(
                "PG %d/%d %s done (%d chunk(s) in %.2f s)", pool, pg, plan.what, copied, seconds
            )
            return True
        return False

    async def _listed(self, pool: int, pg: int) -> list[tuple[int, int]]:
        """The chunks of the PG that the SDS we copy to stores (none if it is of a
        release that cannot list them)."""
        sec_id, address = self._target(pool, pg)
        try:
            listed = await self._state.peers.list_chunks(sec_id, address, pool, pg)
        except (WireError, ProtocolError) as exc:
            raise ResyncAborted(f"cannot list the chunks of SDS {sec_id}: {exc}") from exc
        return listed or []

    def _target(self, pool: int, pg: int) -> tuple[int, tuple[str, int]]:
        """The SDS the job copies to and its address, as the newest map has them."""
        m = self._state.maps.maps[pool]
        me = self._state.sds_id
        dest = m.copy_to(pg) if m.primary[pg][0] == me else None
        want = self._dest.get((pool, pg))
        if dest is None or want is None or want[0] != dest:
            raise ResyncAborted(f"PG {pool}/{pg} is no longer copied from us to that SDS")
        address = m.sds.get(dest[0])
        if address is None:
            raise ResyncAborted(f"no address of SDS {dest[0]} (PG {pool}/{pg})")
        return dest[0], address

    async def _copy_limited(
        self, plan: CopyPlan, volume: int, chunk: int, progress: list[int | str]
    ) -> None:
        """Copy one chunk within the pool's throttle of the plan's kind, per source
        device: a free slot among its concurrent copies, and its turn at its pace."""
        pool, kind, device = plan.pool, plan.kind, plan.source
        slot = (device, kind)
        while self._slots.get(slot, 0) >= self._state.maps.maps[pool].throttle(kind)[0]:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._slots[slot] = self._slots.get(slot, 0) + 1
        try:
            await self._pace(pool, device, kind)
            await self._copy(pool, plan.pg, volume, chunk)
            progress[1] = int(progress[1]) + 1
            key = (pool, kind)
            self.copied_bytes[key] = self.copied_bytes.get(key, 0) + CHUNK_SIZE
        finally:
            self._slots[slot] -= 1
            self._slot_freed.set()

    async def _pace(self, pool: int, device: int, kind: str) -> None:
        mibps = self._state.maps.maps[pool].throttle(kind)[1]
        if not mibps:
            return
        now = time.monotonic()
        start = max(now, self._next_send.get((device, kind), 0.0))
        self._next_send[(device, kind)] = start + CHUNK_SIZE / (mibps * 1024 * 1024)
        if start > now:
            await asyncio.sleep(start - now)

    async def _copy(self, pool: int, pg: int, volume: int, chunk: int) -> None:
        st = self._state
        key = chunk_key(volume, chunk)
        mismatches = lagged = 0
        pause = False
        while True:
            if pause:  # a copy refused our repair of the chunk's bad blocks (map lag)
                await asyncio.sleep(RETRY_S)  # the chunk's lock free meanwhile
                pause = False
            ticket, earlier = st.locks.acquire(key, 0, CHUNK_SIZE)
            try:
                for earlier_write in earlier:
                    await earlier_write
                if st.tombstones.deleted(volume):
                    return  # deleted since the job listed it: not copied
                sec_id, address = self._target(pool, pg)
                m = st.maps.maps[pool]
                try:
                    data, bad = await self._source(volume, chunk)
                except SourceLagging:
                    if lagged == LAG_RETRIES:
                        raise
                    lagged += 1
                    pause = True
                    continue  # the lock released (finally), then tried again
                peer = st.peers.connected(sec_id, address) or await st.peers.get(sec_id, address)
                if bad and not peer.features & FEATURE_MARK_BAD:
                    raise ResyncAborted(
                        f"chunk {volume}/{chunk} has blocks no copy could repair and SDS "
                        f"{sec_id} cannot mark them bad (an older release)"
                    )
                op = Op.REPL_TRIM if data is None else Op.REPL_WRITE
                ref = ChunkRef(pool, pg, m.epoch, volume, chunk)
                reply = peer.submit(op, 0, ref, 0, CHUNK_SIZE, data, peer.future())
                st.peers.mark(sec_id)
                status = (await reply)[0]
                for first, count in _runs(bad):
                    if status != Status.OK:
                        break
                    at, n = first << BLOCK_SHIFT, count << BLOCK_SHIFT
                    mark = peer.submit(Op.REPL_MARK_BAD, 0, ref, at, n, None, peer.future())
                    status = (await mark)[0]
            finally:
                st.locks.release(key, ticket)
            if status == Status.DELETED:
                return  # the copy knows the volume deleted before we do: nothing to copy
            if status == Status.OK:
                st.degraded.discard(ref)
                self.chunks_total += 1
                self.bytes_total += 0 if data is None else CHUNK_SIZE
                return
            if status == Status.CHECKSUM_MISMATCH and mismatches < MISMATCH_RETRIES:
                # damaged on the wire (nothing of it written there): sent again at once
                mismatches += 1
                self.mismatches_total += 1
                log.warning(
                    "SDS %d found chunk %d/%d damaged on the wire: sent again",
                    sec_id,
                    volume,
                    chunk,
                )
                continue
            if status not in (Status.MAP_PENDING, Status.EPOCH_STALE, Status.NOT_REPLICA):
                raise ResyncAborted(f"SDS {sec_id} refused chunk {volume}/{chunk}: {status}")
            await asyncio.sleep(RETRY_S)  # its map or ours is behind: try again

    async def _source(self, volume: int, chunk: int) -> tuple[memoryview | None, list[int]]:
        """What to copy of a chunk (None: we hold no slot), and its blocks to mark bad
        on the copy. Read checked under the chunk's lock: a bad block is repaired from
        another copy of the PG first (heal.py: the copy we fill too, whose stale block
        still serves when it is the one we recorded); one that none could repair is
        sent as zeroes and marked bad there, so that it reads as EIO and not as
        zeroes or stale bytes (docs/sds.md, "Healing"). Not when a copy refused our
        repair NOT_PERMITTED (a map lags): its blocks may be good, so the chunk is not
        copied now (:class:`SourceLagging`: :meth:`_copy` tries it again later, with
        the lock released meanwhile, rather than wait for our next map under it) and
        nothing is marked bad for it."""
        st = self._state
        lagging: set[int] = set()
        try:
            return st.store.read(volume, chunk, 0, CHUNK_SIZE), []
        except ChecksumError as exc:
            await repair_from_peer(
                st, volume, chunk, exc.blocks, locked=True, lagging=lagging, wait=False
            )
        data, bad = st.store.read_salvage(volume, chunk)
        if bad and lagging:
            raise SourceLagging(
                f"chunk {volume}/{chunk} has blocks to repair that SDS(s) "
                f"{', '.join(map(str, sorted(lagging)))} refused us (their map or ours "
                "lags): copied later, nothing marked bad"
            )
        if bad:
            self.marked_bad_total += len(bad)
            log.error(
                "chunk %d/%d: 4 KiB block(s) %s copied as bad (no good copy of them)",
                volume,
                chunk,
                ", ".join(map(str, bad)),
            )
        return data, bad


async def _all_or_none(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` side by side; the first to raise cancels the others (waited for:
    none runs on past this) and is raised as it is (not in an exception group)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as exc:
        raise exc.exceptions[0] from None


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive numbers in ``blocks`` (ascending)."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
