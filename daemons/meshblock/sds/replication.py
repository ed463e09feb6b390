"""Replication from a PG's primary to its secondary: ordering and peer connections.

- :class:`RangeLocks` orders overlapping writes to one chunk: a write waits for every
  earlier write whose byte range overlaps its own to finish on both copies, so both
  copies apply overlapping writes in the same order (docs/design.md, invariant 2).
  Writes that do not overlap run concurrently.
- :class:`Peers` keeps one persistent ``SDS_PEER`` data connection per peer SDS,
  opened on first use and again after it broke, and remembers which peers received
  writes since the last FLUSH. A connection with requests outstanding that receives
  nothing for the peer's budget (:class:`~meshblock.timeouts.LatencyBudgets`: short,
  adapted to the latency of the peer's answered forwards) is dropped: the forwards
  on it fail as a lost connection, and the peer is reported. Requests that wait for
  a device sync on the peer (REPL_FLUSH, FUA forwards) count only against the
  ceiling (``peer_timeout_s``) while no ordinary forward is outstanding. Its
  :class:`~meshblock.sds.peer_probe.SelfFence` (``fence``) hears of every forward
  answered and every peer lost.
- :class:`DegradedWrites` remembers, per PG that this SDS serves alone (not
  ``clean``), which chunks it wrote meanwhile: what a delta resync of the stale
  copy has to copy (docs/design.md, invariant 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import Iterable

from meshblock.chunks import ChunkRef
from meshblock.sds.maps import PgMap
from meshblock.sds.peer_probe import SelfFence
from meshblock.timeouts import LatencyBudgets
from meshblock.wire.client import ConnectionLost, WireClient, WireError
from meshblock.wire.handshake import FEATURE_CHUNK_LIST, HandshakeError
from meshblock.wire.protocol import HANDSHAKE_TIMEOUT_S, PeerRole

log = logging.getLogger(__name__)


class RangeLocks:
    """Per chunk, the byte ranges of the writes in progress, in arrival order."""

    def __init__(self) -> None:
        self._held: dict[int, list[tuple[int, int, asyncio.Future[None]]]] = {}

    def acquire(
        self, key: int, start: int, end: int
    ) -> tuple[tuple[int, int, asyncio.Future[None]], list[asyncio.Future[None]]]:
        """Register a write of ``[start, end)``; return its ticket and the futures of
        the earlier overlapping writes to wait for."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ticket = (start, end, fut)
        held = self._held.get(key)
        if held is None:
            self._held[key] = [ticket]
            return ticket, []
        waits = [f for s, e, f in held if s < end and start < e]
        held.append(ticket)
        return ticket, waits

    def release(self, key: int, ticket: tuple[int, int, asyncio.Future[None]]) -> None:
        held = self._held[key]
        held.remove(ticket)
        if not held:
            del self._held[key]
        ticket[2].set_result(None)

    def __len__(self) -> int:
        return sum(len(v) for v in self._held.values())

    def busy(self, key: int) -> bool:
        """Whether a write to the chunk ``key`` is in progress."""
        return key in self._held


class Peers:
    """Persistent data connections to the other SDSs."""

    def __init__(
        self,
        secret: str,
        request_timeout: float,
        *,
        min_version: int = 1,
        timeout_min: float | None = None,
        timeout_factor: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = secret
        self.tls = tls  # dial peers over TLS with it (meshblock.wire.tls); None: plain TCP
        #: Per peer, how long a connection with forwards outstanding may receive
        #: nothing: ``request_timeout`` at most, ``timeout_min`` at least (without it:
        #: always ``request_timeout``).
        self.budgets = LatencyBudgets(
            floor=request_timeout if timeout_min is None else timeout_min,
            factor=timeout_factor,
            ceiling=request_timeout,
        )
        self._min_version = min_version  # wire_min_version
        self._clients: dict[int, WireClient] = {}
        self._addresses: dict[int, tuple[str, int]] = {}
        self._connecting: dict[int, asyncio.Task[WireClient]] = {}
        self.dirty: set[int] = set()  # peers written to since the last flush (mark)
        # Per peer, how many times it was marked (:meth:`mark`), and that count when
        # its last REPL_FLUSH began: a mark since then is not for that REPL_FLUSH to
        # drop (:meth:`drop_unmarked`).
        self._marks: dict[int, int] = {}
        self._marks_at_flush: dict[int, int] = {}
        # Per peer, its REPL_FLUSH in progress (Peers.flush).
        self._flushing: dict[int, asyncio.Task[bool]] = {}
        self._unlisted: set[int] = set()  # peers found unable to list their chunks
        # Whether this SDS has fenced itself (no peer answers); never, until the SDS
        # sets one with its [self_fence_after_s] (meshblock.sds.app).
        self.fence = SelfFence(0.0)

    def answered(self, sds_id: int, seconds: float) -> None:
        """A forward to ``sds_id`` was answered after ``seconds``: its budget follows."""
        budgets = self.budgets
        budgets.record(sds_id, seconds)
        self.fence.peer_ok()
        client = self._clients.get(sds_id)
        if client is not None:
            client.request_timeout = budgets.budget(sds_id)

    def connected(self, sds_id: int, address: tuple[str, int]) -> WireClient | None:
        """The open connection to ``sds_id`` at ``address``, if there is one."""
        client = self._clients.get(sds_id)
        if client is None or client.closed or self._addresses.get(sds_id) != address:
            return None
        return client

    def lost(self, sds_id: int) -> None:
        """A forward to ``sds_id`` lost its connection: for the peer's budget, a forward
        that would connect to it again fails at once instead of waiting for a connect
        that will likely time out (its client retries on the MDM's newer map)."""
        self.budgets.silence(sds_id, time.monotonic())
        self.fence.peer_failed()

    async def get(self, sds_id: int, address: tuple[str, int]) -> WireClient:
        """A connection to ``sds_id``; connects (once, for all callers) when needed;
        :class:`ConnectionLost` at once while the peer was found silent lately
        (:meth:`lost`)."""
        client = self.connected(sds_id, address)
        if client is not None:
            return client
        task = self._connecting.get(sds_id)
        if task is None:
            if self.budgets.silent(sds_id, time.monotonic()):
                raise ConnectionLost(f"SDS {sds_id} did not answer lately: not connected to yet")
            old = self._clients.pop(sds_id, None)
            if old is not None:
                await old.close()
            task = asyncio.get_running_loop().create_task(
                self._connect(sds_id, address), name=f"peer-connect-{sds_id}"
            )
            self._connecting[sds_id] = task
        return await asyncio.shield(task)

    async def _connect(self, sds_id: int, address: tuple[str, int]) -> WireClient:
        budget = self.budgets.budget(sds_id)
        try:
            client = await WireClient.connect(
                address[0],
                address[1],
                self._secret,
                PeerRole.SDS_PEER,
                connect_timeout=min(HANDSHAKE_TIMEOUT_S, max(budget, 1.0)),
                request_timeout=budget,
                min_version=self._min_version,
                tls=self.tls,
            )
        except HandshakeError as exc:
            log.error("peer SDS %d at %s:%d refused us: %s", sds_id, *address, exc)
            raise
        except (OSError, TimeoutError) as exc:
            log.warning("cannot connect to peer SDS %d at %s:%d: %r", sds_id, *address, exc)
            self.lost(sds_id)
            raise ConnectionLost(f"cannot connect to SDS {sds_id}: {exc}") from exc
        finally:
            self._connecting.pop(sds_id, None)
        # REPL_FLUSH and FUA forwards wait for a whole-device fdatasync on the peer,
        # which may take seconds on a healthy one: those alone get the ceiling
        client.sync_timeout = self.budgets.ceiling
        log.info("connected to peer SDS %d at %s:%d", sds_id, *address)
        self._clients[sds_id] = client
        self._addresses[sds_id] = address
        return client

    def mark(self, sds_id: int, address: tuple[str, int] | None = None) -> None:
        """``sds_id`` was written to (a forward sent or acknowledged): the next flush
        REPL_FLUSHes it. ``address``: where to reach it if not connected to yet."""
        self.dirty.add(sds_id)
        self._marks[sds_id] = self._marks.get(sds_id, 0) + 1
        if address is not None:
            self._addresses.setdefault(sds_id, address)

    def drop_unmarked(self, ids: Iterable[int]) -> set[int]:
        """Take out of :attr:`dirty` those of ``ids`` (peers whose REPL_FLUSH failed)
        not marked since their last REPL_FLUSH began; return them. One marked since
        stays: a forward it acknowledged meanwhile is owed to the next flush."""
        dropped = {
            i
            for i in ids
            if self._marks.get(i, 0) == self._marks_at_flush.get(i, -1) and i not in self._flushing
        }
        self.dirty.difference_update(dropped)
        return dropped

    @property
    def unflushed(self) -> bool:
        """Whether a FLUSH has peers to flush or to wait for (:meth:`flush`)."""
        return bool(self.dirty or self._flushing)

    async def flush(self) -> list[int]:
        """REPL_FLUSH every peer written to since the last flush, and wait for the
        REPL_FLUSHes of an earlier flush still in progress (they cover what it took
        out of :attr:`dirty`); return the ids of the peers that failed (they stay
        dirty)."""
        dirty, self.dirty = self.dirty, set()
        loop = asyncio.get_running_loop()
        flushing = self._flushing
        waits = {i: t for i, t in flushing.items() if i not in dirty}
        for sds_id in dirty:
            self._marks_at_flush[sds_id] = self._marks.get(sds_id, 0)
            task = loop.create_task(self._flush_peer(sds_id), name=f"repl-flush-{sds_id}")
            flushing[sds_id] = waits[sds_id] = task
            task.add_done_callback(functools.partial(self._flushed, sds_id))
        if not waits:
            return []
        ids = list(waits)
        results = await asyncio.gather(*(asyncio.shield(waits[i]) for i in ids))
        return [i for i, ok in zip(ids, results, strict=True) if not ok]

    async def _flush_peer(self, sds_id: int) -> bool:
        """REPL_FLUSH one peer; False (and dirty again) when it failed."""
        address = self._addresses.get(sds_id)
        try:
            if address is None:
                raise ConnectionLost(f"no address of SDS {sds_id}")
            client = await self.get(sds_id, address)
            await client.repl_flush()
        except (WireError, HandshakeError) as exc:
            log.warning("flush of peer SDS %d failed: %s", sds_id, exc)
            self.dirty.add(sds_id)
            return False
        except Exception:  # a bug: the peer stays marked and the FLUSH fails
            log.exception("flush of peer SDS %d failed", sds_id)
            self.dirty.add(sds_id)
            return False
        return True

    def _flushed(self, sds_id: int, task: asyncio.Task[bool]) -> None:
        if self._flushing.get(sds_id) is task:
            del self._flushing[sds_id]

    async def list_chunks(
        self, sds_id: int, address: tuple[str, int], pool: int, pg: int
    ) -> list[tuple[int, int]] | None:
        """The chunks of ``pg`` that ``sds_id`` stores (CHUNK_LIST). None when it is of
        a release that cannot list them (its handshake lacks FEATURE_CHUNK_LIST);
        failures raise as for any request."""
        client = await self.get(sds_id, address)
        if not client.features & FEATURE_CHUNK_LIST:
            if sds_id not in self._unlisted:
                self._unlisted.add(sds_id)
                log.warning(
                    "SDS %d cannot list its chunks (an older release): full copies to "
                    "it cannot remove chunks only it stores",
                    sds_id,
                )
            return None
        return await client.list_chunks(pool, pg)

    async def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()


class DegradedWrites:
    """Per (pool, PG) served alone, the ``(volume, chunk)`` pairs written since the PG
    left ``clean`` while this SDS was its primary.

    In memory only: an SDS restart loses it, and the resync of such a PG must then
    copy every chunk of the PG instead of just these. A record is *complete*
    (:meth:`complete`) only when this process saw the PG leave ``clean`` with an
    in-sync copy here (:meth:`track`); a PG's record is dropped when a newer map shows
    it ``clean`` again (resynchronised) or with another primary. A chunk leaves the
    record once the resync has copied it (:meth:`discard`).
    """

    def __init__(self) -> None:
        self._pgs: dict[tuple[int, int], set[tuple[int, int]]] = {}
        self._tracked: set[tuple[int, int]] = set()

    def track(self, pool_id: int, pg: int) -> None:
        """The PG just left ``clean`` with our copy in sync: record from now on."""
        self._pgs.setdefault((pool_id, pg), set())
        self._tracked.add((pool_id, pg))

    def complete(self, pool_id: int, pg: int) -> bool:
        """Whether the record lists every chunk written since the PG left ``clean``."""
        return (pool_id, pg) in self._tracked

    def untrack(self, pool_id: int, pg: int) -> None:
        """The record no longer describes what the secondary missed: a full copy."""
        self._tracked.discard((pool_id, pg))

    def discard(self, ref: ChunkRef) -> None:
        """The chunk was copied to the secondary: it no longer misses it."""
        chunks = self._pgs.get((ref.pool_id, ref.pg))
        if chunks is not None:
            chunks.discard((ref.volume_id, ref.chunk_index))

    def record(self, ref: ChunkRef) -> None:
        """The chunk was written while we served its PG alone."""
        key = (ref.pool_id, ref.pg)
        chunks = self._pgs.get(key)
        if chunks is None:
            chunks = self._pgs[key] = set()
        chunks.add((ref.volume_id, ref.chunk_index))

    def chunks(self, pool_id: int, pg: int) -> frozenset[tuple[int, int]]:
        return frozenset(self._pgs.get((pool_id, pg), ()))

    def prune(self, m: PgMap, sds_id: int) -> None:
        """Forget the PGs of ``m``'s pool that are clean or no longer ours."""
        for pool_id, pg in list(self._pgs):
            if pool_id == m.pool_id and (
                pg >= m.pg_count or m.clean[pg] or m.primary[pg][0] != sds_id
            ):
                del self._pgs[(pool_id, pg)]
                self._tracked.discard((pool_id, pg))
        self._tracked.intersection_update(self._pgs)

    def counts(self) -> dict[int, dict[int, int]]:
        """``{pool_id: {pg: chunks written}}`` of every PG with a record."""
        out: dict[int, dict[int, int]] = {}
        for (pool_id, pg), chunks in sorted(self._pgs.items()):
            out.setdefault(pool_id, {})[pg] = len(chunks)
        return out
