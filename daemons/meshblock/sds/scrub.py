"""Background scrub of the PGs this SDS is primary of (``docs/sds.md``, "Scrub").

The MDM schedules a pool's passes (:mod:`meshblock.mdm.scrub`) and hands each SDS,
in every heartbeat reply, its order per pool: the pass number, whether it runs, and
the bandwidth per source device. For a running pass the PG's primary scrubs every
chunk that it or the PG's secondary stores, one chunk at a time under the chunk's
range lock (the lock the replication path takes, so no write is in flight on either
copy meanwhile):

- a light scrub of both copies: the primary reads its copy and checks every 4 KiB
  block against its stored CRC32C; the secondary does the same for its copy when
  asked (``CHUNK_CSUMS``: no data crosses the network, 2 KiB of checksums do);
- a deep scrub: the two copies' checksums compared block by block.

:func:`classify` judges each block (a pure function). A block bad on one copy is
rewritten from the other by the SDS that holds it (:meth:`Scrubber.repair`, with
``heal.repair_from_peer``); bad on both it is reported
``unrecoverable``; two copies that each match their own checksums but differ from
each other are a ``divergent`` block: reported, not repaired (nothing says which is
right). A block without a checksum recorded (upgrade: written before checksums were
kept) that both copies hold alike is given the CRC32C of its bytes where it lacks one
(:func:`to_checksum`, :meth:`Scrubber._give_checksums`), counted as ``checksummed``
and not as an error; one that differs from the other copy's good block is bad and
really rewritten. A repair is counted once the rows read back show it (:func:`fixed`).
The PGs done in the pass, the counters and the findings go to the MDM in the
heartbeats (:meth:`Scrubber.report`). A pool that is rebuilding, resyncing or moving
a PG is not scrubbed (its map says so); a pass paused or held stops at the next chunk
and goes on with the PG it was in, from its first chunk, when it runs again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.checksums import BLOCKS, ROWS, ZERO_ROW
from meshblock.sds.heal import repair_from_peer, runs
from meshblock.sds.maps import PgMap
from meshblock.sds.state import SdsState
from meshblock.sds.store import chunk_key
from meshblock.wire.client import WireClient
from meshblock.wire.handshake import FEATURE_CHUNK_CSUMS
from meshblock.wire.protocol import ProtocolError, WireError

log = logging.getLogger(__name__)

#: What a block can be found to be (:func:`classify`).
PRIMARY_BAD: Final = "primary"  # the primary's copy does not match its checksum
SECONDARY_BAD: Final = "secondary"
BOTH_BAD: Final = "unrecoverable"  # neither copy matches: nothing to repair from
DIVERGENT: Final = "divergent"  # each matches its own checksum, they differ
KINDS: Final = (PRIMARY_BAD, SECONDARY_BAD, BOTH_BAD, DIVERGENT)
#: Findings kept for the heartbeats (the newest; each sent until the MDM has it).
FINDINGS_KEPT: Final = 256
IDLE_S: Final = 1.0  # how often an SDS with nothing to scrub looks at its orders again
RETRY_S: Final = 2.0  # pause after a PG's scrub failed (peer unreachable, map moved)

Rows = tuple[bytes, bytes]  # (stored, computed) checksum rows of one copy of a chunk
At = tuple[int, int, int, int]  # a chunk of a PG: pool, PG, volume, chunk


def classify(primary: Rows | None, secondary: Rows | None) -> list[tuple[int, str]]:
    """The blocks of a chunk whose copies are not both right, as ``(block, kind)``.

    Each copy is ``(stored, computed)``: the checksum row kept for its slot and the
    row of the bytes it holds; None when it holds no slot (it reads as zeroes, which
    is right). A stored 0 is "no checksum recorded" (written before checksums were
    kept): such a block is judged by the other copy when that one has a checksum
    (the copy whose bytes match a recorded checksum is the right one), and two such
    blocks that differ are divergent."""
    p_stored, p_data = primary if primary is not None else (ZERO_ROW, ZERO_ROW)
    s_stored, s_data = secondary if secondary is not None else (ZERO_ROW, ZERO_ROW)
    if p_stored == p_data and s_stored == s_data and p_data == s_data:
        return []
    unpack = ROWS[BLOCKS].unpack
    ps, pd, ss, sd = unpack(p_stored), unpack(p_data), unpack(s_stored), unpack(s_data)
    out: list[tuple[int, str]] = []
    for b in range(BLOCKS):
        p_bad = bool(ps[b]) and ps[b] != pd[b]
        s_bad = bool(ss[b]) and ss[b] != sd[b]
        if p_bad and s_bad:
            out.append((b, BOTH_BAD))
        elif p_bad:
            out.append((b, PRIMARY_BAD))
        elif s_bad:
            out.append((b, SECONDARY_BAD))
        elif pd[b] != sd[b]:
            if ps[b] and not ss[b]:
                out.append((b, SECONDARY_BAD))  # only the primary's is known right
            elif ss[b] and not ps[b]:
                out.append((b, PRIMARY_BAD))
            else:
                out.append((b, DIVERGENT))
    return out


def unchecked_in(stored: bytes, first: int, count: int) -> list[int]:
    """The blocks from ``first`` on (``count`` of them) that have no checksum in the
    row ``stored``."""
    values = ROWS[BLOCKS].unpack(stored)
    return [b for b in range(first, min(first + count, BLOCKS)) if not values[b]]


def crcs_of(row: bytes, blocks: list[int]) -> dict[int, int]:
    """``blocks``' values in ``row``: block -> CRC32C."""
    values = ROWS[BLOCKS].unpack(row)
    return {b: values[b] for b in blocks}


def to_checksum(primary: Rows | None, secondary: Rows | None) -> tuple[list[int], list[int]]:
    """Upgrade: the blocks of each copy (the primary's, the secondary's) that have no
    checksum recorded and hold the same bytes as the other copy, whose block matches
    its own checksum or has none: they are given the CRC32C of their bytes. A copy
    without a slot (zeroes) is given nothing. Blocks whose copies differ are
    :func:`classify`'s."""
    if primary is None and secondary is None:
        return [], []
    p_stored, p_data = primary if primary is not None else (ZERO_ROW, ZERO_ROW)
    s_stored, s_data = secondary if secondary is not None else (ZERO_ROW, ZERO_ROW)
    unpack = ROWS[BLOCKS].unpack
    ps, ss = unpack(p_stored), unpack(s_stored)
    if 0 not in ps and 0 not in ss:
        return [], []
    pd, sd = unpack(p_data), unpack(s_data)
    mine: list[int] = []
    theirs: list[int] = []
    for b in range(BLOCKS):
        if pd[b] != sd[b] or (ps[b] and ps[b] != pd[b]) or (ss[b] and ss[b] != sd[b]):
            continue
        if not ps[b] and primary is not None:
            mine.append(b)
        if not ss[b] and secondary is not None:
            theirs.append(b)
    return mine, theirs


def fixed(copy: Rows | None, other: Rows | None, blocks: list[int]) -> list[int]:
    """The blocks of ``blocks`` that are right on ``copy`` now: a checksum recorded,
    its bytes matching it, and the same bytes as ``other`` (None: zeroes)."""
    if copy is None:
        return []
    unpack = ROWS[BLOCKS].unpack
    stored, data = unpack(copy[0]), unpack(copy[1])
    theirs = unpack(other[1] if other is not None else ZERO_ROW)
    return [b for b in blocks if stored[b] and stored[b] == data[b] == theirs[b]]


def with_adopted(rows: Rows, blocks: list[int]) -> Rows:
    """``rows`` once ``blocks`` were given the checksums of their bytes
    (:meth:`ChunkStore.adopt_checksums`): their stored values are the computed ones."""
    if not blocks:
        return rows
    stored = bytearray(rows[0])
    for b in blocks:
        stored[4 * b : 4 * b + 4] = rows[1][4 * b : 4 * b + 4]
    return bytes(stored), rows[1]


def unchecked_of(rows: Rows | None, blocks: list[int]) -> list[int]:
    """The blocks of ``blocks`` that have no checksum recorded in ``rows`` (a copy's)."""
    return [] if rows is None else sorted(set(blocks) & set(unchecked_in(rows[0], 0, BLOCKS)))


async def ask_csums(
    client: WireClient, volume: int, chunk: int, blocks: list[int], heal: bool
) -> Rows | None:
    """CHUNK_CSUMS to ``client``'s SDS with HEAL (``heal``; ``blocks``: those without a
    checksum to replace too) or ADOPT (``blocks``: those to give one), one request per
    run of ``blocks`` (one without a range when there are none); its last answer."""
    rows = None
    for lo, hi in runs(blocks) or [(0, 0)]:
        rows = await client.chunk_csums(
            volume, chunk, heal=heal, adopt=not heal, blocks=(lo, hi - lo)
        )
    return rows


@dataclass
class Order:
    """The MDM's order for one pool (from a heartbeat reply)."""

    pass_: int = 0
    state: str = "idle"  # running | paused | held | idle
    bandwidth_mibps: int = 0  # per source device; 0: unlimited

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Order:
        return cls(int(doc["pass"]), str(doc["state"]), int(doc.get("bandwidth_mibps", 0)))


@dataclass
class PoolScrub:
    """What this SDS did of one pool's scrub."""

    pass_: int = 0
    done: set[int] = field(default_factory=set)  # PGs scrubbed in the pass
    chunks: int = 0  # counters since the SDS started
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    repaired: int = 0  # blocks rewritten from the other copy
    checksummed: int = 0  # blocks without a checksum given one (upgrade; not errors)
    current: tuple[int, int, int] | None = None  # (pg, chunks done, chunks) in progress


def is_busy(m: PgMap) -> bool:
    """Whether the pool is rebuilding, resyncing or moving a PG (no scrub then)."""
    return any(m.rebuilding) or any(m.resyncing) or any(t[0] for t in m.target)


class Scrubber:
    """This SDS's part of every pool's scrub: the PGs it is primary of."""

    def __init__(self, state: SdsState) -> None:
        self._state = state
        self.orders: dict[int, Order] = {}
        self.pools: dict[int, PoolScrub] = {}
        self.findings: deque[dict[str, Any]] = deque(maxlen=FINDINGS_KEPT)
        self._seq = 0
        self._acked = 0  # the newest finding the MDM has
        # Numbers the findings of this process: the MDM starts over when it changes.
        self.instance = secrets.token_hex(8)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._next_send: dict[int, float] = {}  # per source device: bandwidth pacing
        self._wake = asyncio.Event()

    # -- orders and reports (heartbeats) ----------------------------------------------

    def order(self, docs: list[dict[str, Any]] | None, acked: int | None = None) -> None:
        """Take the MDM's orders (a heartbeat reply's ``scrub``)."""
        if acked is not None:
            self._acked = max(self._acked, acked)
        if docs is None:
            return
        self.orders = {int(d["pool_id"]): Order.from_doc(d) for d in docs}
        for pool, o in self.orders.items():
            ps = self.pools.setdefault(pool, PoolScrub())
            if ps.pass_ != o.pass_:
                ps.pass_, ps.done = o.pass_, set()
            if o.state == "running" and pool not in self._tasks:
                self._start(pool)
        self._wake.set()

    def report(self) -> dict[str, Any]:
        """Per pool the pass, the PGs done in it and the counters; the findings the
        MDM does not have yet (a heartbeat's ``scrub``)."""
        return {
            "instance": self.instance,
            "pools": [
                {
                    "pool_id": pool,
                    "pass": ps.pass_,
                    "pgs_done": sorted(ps.done),
                    "chunks": ps.chunks,
                    "bytes": ps.bytes,
                    "errors": dict(ps.errors),
                    "repaired": ps.repaired,
                    "checksummed": ps.checksummed,
                }
                for pool, ps in sorted(self.pools.items())
            ],
            "findings": [f for f in self.findings if f["seq"] > self._acked],
        }

    def _runs(self, pool: int) -> bool:
        o = self.orders.get(pool)
        m = self._state.maps.maps.get(pool)
        return (
            o is not None
            and o.state == "running"
            and m is not None
            and not is_busy(m)
            and not self._state.stopping
        )

    # -- the work ---------------------------------------------------------------------

    def _start(self, pool: int) -> None:
        task = asyncio.get_running_loop().create_task(self._pool(pool), name=f"scrub-{pool}")
        self._tasks[pool] = task
        task.add_done_callback(lambda t: self._tasks.pop(pool, None))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _pool(self, pool: int) -> None:
        """Scrub the pool's PGs this SDS is primary of, while its order says run."""
        while self.orders.get(pool, Order()).state == "running":
            pg = self._next_pg(pool) if self._runs(pool) else None
            if pg is None:
                self._wake.clear()
                try:
                    async with asyncio.timeout(IDLE_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            ps = self.pools[pool]
            pass_ = ps.pass_
            try:
                finished = await self._scrub_pg(pool, pg)
            except (WireError, ProtocolError, OSError, KeyError) as exc:
                log.warning("scrub of PG %d/%d stopped: %s", pool, pg, exc)
                ps.current = None
                await asyncio.sleep(RETRY_S)
                continue
            ps.current = None
            if finished and ps.pass_ == pass_:
                ps.done.add(pg)

    def _next_pg(self, pool: int) -> int | None:
        m = self._state.maps.maps[pool]
        me = self._state.sds_id
        done = self.pools[pool].done
        for pg in range(m.pg_count):
            clean = not m.clean or m.clean[pg]  # a stale secondary is resynced, not scrubbed
            if pg not in done and me and m.primary[pg][0] == me and m.secondary[pg][0] and clean:
                return pg
        return None

    async def _scrub_pg(self, pool: int, pg: int) -> bool:
        """Scrub every chunk of the PG either copy stores; False when stopped before
        the end (paused, held, or the PG is no longer ours to scrub)."""
        st = self._state
        m = st.maps.maps[pool]
        sec, address = self._secondary(m, pg)
        client = await st.peers.get(sec, address)
        if not client.features & FEATURE_CHUNK_CSUMS:
            log.warning("SDS %d cannot scrub (an older release): PG %d/%d skipped", sec, pool, pg)
            return True
        held = st.store.chunks_of_pg(pool, pg)
        if held is None:
            held = [k for k in st.store.chunk_ids_of_pool(pool) if pg_of(*k, m.pg_count) == pg]
        listed = await client.list_chunks(pool, pg)
        chunks = sorted(set(held) | set(listed))
        ps = self.pools[pool]
        device = m.primary[pg][1]
        for i, (volume, chunk) in enumerate(chunks):
            ps.current = (pg, i, len(chunks))
            if not self._still_ours(pool, pg, sec):
                return False
            await self._pace(pool, device)
            if st.tombstones.deleted(volume):
                continue
            if not await self._scrub_chunk(pool, pg, sec, volume, chunk):
                return False
            ps.chunks += 1
            ps.bytes += CHUNK_SIZE
        return True

    def _still_ours(self, pool: int, pg: int, sec: int) -> bool:
        """Whether the pass still runs and the PG is still ours to scrub as it was
        when its scrub began: clean, this SDS its primary, ``sec`` its secondary."""
        if not self._runs(pool):
            return False
        m = self._state.maps.maps[pool]
        clean = not m.clean or m.clean[pg]
        return clean and m.primary[pg][0] == self._state.sds_id and m.secondary[pg][0] == sec

    def _secondary(self, m: PgMap, pg: int) -> tuple[int, tuple[str, int]]:
        sec = m.secondary[pg][0]
        address = m.sds.get(sec)
        if not sec or address is None:
            raise KeyError(f"PG {m.pool_id}/{pg} has no secondary")
        return sec, address

    async def _pace(self, pool: int, device: int) -> None:
        mibps = self.orders.get(pool, Order()).bandwidth_mibps
        if not mibps:
            return
        now = time.monotonic()
        start = max(now, self._next_send.get(device, 0.0))
        self._next_send[device] = start + CHUNK_SIZE / (mibps * 1024 * 1024)
        if start > now:
            await asyncio.sleep(start - now)

    async def _scrub_chunk(self, pool: int, pg: int, sec: int, volume: int, chunk: int) -> bool:
        """Scrub one chunk under its range lock; False when the PG stopped being ours
        to scrub (:meth:`_still_ours`) before its copies were compared, or while they
        were: nothing is judged then (a write the PG took while it was not clean, or
        from another primary, would make the copies differ for no fault of theirs)."""
        st = self._state
        key = chunk_key(volume, chunk)
        ticket, earlier = st.locks.acquire(key, 0, CHUNK_SIZE)
        try:
            for write in earlier:
                await write
            # Checked again under the lock: the map may have moved while we waited
            # for the pace and for the writes in flight.
            if not self._still_ours(pool, pg, sec):
                return False
            _, address = self._secondary(st.maps.maps[pool], pg)
            local = st.store.checksum_rows(volume, chunk)
            peer = st.peers.connected(sec, address) or await st.peers.get(sec, address)
            remote = await peer.chunk_csums(volume, chunk)
            if not self._still_ours(pool, pg, sec):
                return False  # and while the secondary answered
            found = classify(local, remote)
            if found:
                await self._found(pool, pg, volume, chunk, sec, found, local, remote)
            mine, theirs = to_checksum(local, remote)
            if mine or theirs:
                await self._give_checksums(pool, pg, volume, chunk, mine, theirs, local, remote)
            return True
        finally:
            st.locks.release(key, ticket)

    async def _give_checksums(
        self,
        pool: int,
        pg: int,
        volume: int,
        chunk: int,
        mine: list[int],
        theirs: list[int],
        local: Rows | None,
        remote: Rows | None,
    ) -> None:
        """Upgrade (under the chunk's lock): the blocks without a checksum that both
        copies hold alike (:func:`to_checksum`) get the CRC32C of their bytes, ours
        here, the secondary's with CHUNK_CSUMS ``ADOPT`` (one request per run); counted
        as ``checksummed`` once the rows read back show it."""
        st = self._state
        done = 0
        try:
            if mine and st.store.checksums:  # none to give with [store] checksums off
                now = st.store.checksum_rows(volume, chunk, count=False)
                if now is not None:
                    given = st.store.adopt_checksums(volume, chunk, crcs_of(now[1], mine))
                    done += len(fixed(with_adopted(now, given), remote, mine))
            if theirs:
                rows = await self._secondary_csums((pool, pg, volume, chunk), theirs, False)
                done += len(fixed(rows, local, theirs))
        except (WireError, ProtocolError, OSError) as exc:
            log.warning("scrub could not give chunk %d/%d checksums: %s", volume, chunk, exc)
        self.pools[pool].checksummed += done
        if done:
            log.debug("scrub: chunk %d/%d: %d block(s) given a checksum", volume, chunk, done)

    async def _secondary_csums(self, at: At, blocks: list[int], heal: bool) -> Rows | None:
        """:func:`ask_csums` of the PG's secondary."""
        pool, pg, volume, chunk = at
        sec, address = self._secondary(self._state.maps.maps[pool], pg)
        st = self._state
        peer = st.peers.connected(sec, address) or await st.peers.get(sec, address)
        return await ask_csums(peer, volume, chunk, blocks, heal)

    async def _found(
        self,
        pool: int,
        pg: int,
        volume: int,
        chunk: int,
        sec: int,
        found: list[tuple[int, str]],
        local: Rows | None,
        remote: Rows | None,
    ) -> None:
        """Count, log and repair what :func:`classify` found (under the chunk's lock).
        A block counts as repaired once the rows read back after the repair show it
        right (:func:`fixed`), not because the repair said so."""
        ps = self.pools[pool]
        by_kind: dict[str, list[int]] = {}
        for block, kind in found:
            by_kind.setdefault(kind, []).append(block)
        for kind, blocks in sorted(by_kind.items()):
            ps.errors[kind] += len(blocks)
            repaired = False
            if kind in (PRIMARY_BAD, SECONDARY_BAD):
                try:
                    after = await self.repair(
                        pool, pg, volume, chunk, blocks, kind == PRIMARY_BAD, (local, remote)
                    )
                except (WireError, ProtocolError, OSError) as exc:
                    log.error("scrub could not repair chunk %d/%d: %s", volume, chunk, exc)
                    after = []
                repaired = len(after) == len(blocks)
                ps.repaired += len(after)
            me = self._state.sds_id
            self._seq += 1
            finding = {
                "seq": self._seq,
                "at": time.time(),
                "pool_id": pool,
                "pg": pg,
                "volume_id": volume,
                "chunk": chunk,
                "blocks": blocks,
                "kind": kind,
                "bad_sds_id": me if kind == PRIMARY_BAD else sec if kind == SECONDARY_BAD else None,
                "repaired": repaired,
            }
            self.findings.append(finding)
            log.error(
                "scrub: chunk %d/%d (PG %d/%d) block(s) %s: %s%s",
                volume,
                chunk,
                pool,
                pg,
                ",".join(map(str, blocks)),
                {
                    PRIMARY_BAD: "bad on this SDS (primary)",
                    SECONDARY_BAD: f"bad on SDS {sec} (secondary)",
                    BOTH_BAD: "bad on both copies: nothing to repair from",
                    DIVERGENT: f"the copies here and on SDS {sec} differ, each matching "
                    "its own checksums: not repaired (see docs/sds.md, Scrub)",
                }[kind],
                ", repaired" if repaired else "",
            )

    async def repair(
        self,
        pool: int,
        pg: int,
        volume: int,
        chunk: int,
        blocks: list[int],
        primary_bad: bool,
        rows: tuple[Rows | None, Rows | None],
    ) -> list[int]:
        """Have the SDS whose copy is bad (us when ``primary_bad``, else the secondary)
        rewrite ``blocks`` from the PG's other copy (``heal.repair_from_peer``; the
        secondary runs it when asked with CHUNK_CSUMS and HEAL). A bad block without a
        checksum recorded (it differs from the other copy, which matches its own) is
        named to be replaced all the same: ``unchecked`` here, the request's range on
        the secondary. ``rows``: both copies' rows as the scrub read them. The caller
        holds the chunk's range lock. Returns the blocks that the rows read back show
        right on that copy (:func:`fixed`)."""
        st = self._state
        local, remote = rows
        unknown = unchecked_of(local if primary_bad else remote, blocks)
        if primary_bad:
            await repair_from_peer(st, volume, chunk, blocks, locked=True, unchecked=unknown)
            return fixed(st.store.checksum_rows(volume, chunk, count=False), remote, blocks)
        after = await self._secondary_csums((pool, pg, volume, chunk), unknown, True)
        return fixed(after, local, blocks)
