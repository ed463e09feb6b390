"""Reads that heal: a block found not matching its checksum is rewritten from another
copy of its PG (``docs/sds.md``, "Healing").

:func:`repair_from_peer` is the one primitive: every reader that finds bad blocks
calls it (a client READ on the primary, a tool's CHUNK_READ_RAW such as ``meshctl
volume verify``, the copy jobs' source reads, the scrub). It fetches the bad blocks
from the PG's other copies with CHUNK_READ_RAW on the SDS peer connection, a run of
consecutive bad blocks at a time (the peer reads its own copy and checks it against
its own checksums: a bad block there answers ``IO_ERROR`` for the whole range, never
bytes, and the run is then asked again block by block), accepts a block when it
can be trusted, rewrites ours with it (the write-intent mark first, then the data
and its checksum), syncs the device, and counts what it repaired and what it could
not.

A fetched block is trusted when

- its CRC32C is the one we recorded for that block: the bytes that were written
  here (whichever copy it came from, even a stale one: the resync's destination, a
  move's target), or
- it comes from a copy that is in sync with ours (the primary, or the secondary of a
  ``clean`` PG): then it also repairs a block whose checksum, not its data, went bad.

A copy that refuses us ``NOT_PERMITTED`` (its map does not name us a holder of the
PG: its map or ours lags; it has already waited, within ``MAP_WAIT_S``, for the map
epoch our request carried) has not said its blocks are bad: the repair waits for our
map of the pool to change and asks the copies of the newer map once more, map after
map, but all within one ``MAP_WAIT_S`` from the first refusal, as the chunk's range
lock is held all along (a pool whose map keeps moving, e.g. in a rebuild, would
otherwise hold it for as long as it moves). A client's READ or write does not wait
at all (``wait=False``): the SDC retries after refreshing its map (``EPOCH_STALE``),
and the lock is free meanwhile. Blocks still left then are not "bad on every copy":
the caller learns which copies refused (``lagging``), and a copy job tries the chunk
again later rather than marking them bad on its target (resync.py).

The repair runs under the chunk's range lock (the one client writes and the copy
jobs take on the primary), and rewrites a block only if it still does not match its
checksum at that moment (:meth:`ChunkStore.rewrite_bad`, in one event-loop step): a
write that replaced the block meanwhile (on a secondary, forwarded writes take no
range lock) holds newer bytes, and wins.

Healing is done by the SDS that finds the error, not by the SDC: one path for client
reads, copy sources, verify and scrub, and for clients of either wire version. The
SDC reads from the primary only, so a bad block on the secondary is found by what
reads the secondary's own copy (``meshctl volume verify``, the scrub) or, once the
secondary is made primary, by the client's read, and is healed the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Final

from meshblock.chunks import pg_of
from meshblock.sds.checksums import BLOCK, BLOCK_SHIFT, crc
from meshblock.sds.store import chunk_key
from meshblock.wire.client import RequestError, WireError
from meshblock.wire.protocol import MAP_WAIT_S, ProtocolError, Status

if TYPE_CHECKING:
    from meshblock.sds.maps import PgMap
    from meshblock.sds.state import SdsState

log = logging.getLogger(__name__)

#: What a failure to fetch from a peer may raise (logged, the next copy is asked).
_FETCH_ERRORS: Final = (WireError, ProtocolError, OSError, TimeoutError)


def other_copies(m: PgMap, pg: int, me: int) -> list[tuple[int, bool]]:
    """``(sds id, in sync)`` of every copy of ``pg`` that ``m`` names besides ours,
    those in sync with ours first: the primary (when we are not it), the secondary
    (in sync in a ``clean`` PG), a move's target (never: it is being filled)."""
    seen = {0, me}
    out: list[tuple[int, bool]] = []
    for sds, in_sync in (
        (m.primary[pg][0], True),
        (m.secondary[pg][0], bool(m.clean[pg])),
        (m.target[pg][0], False),
    ):
        if sds not in seen:
            seen.add(sds)
            out.append((sds, in_sync))
    return sorted(out, key=lambda c: not c[1])


async def repair_from_peer(
    state: SdsState,
    volume: int,
    chunk: int,
    blocks: Sequence[int],
    *,
    locked: bool = False,
    exclude: Collection[int] = (),
    unchecked: Collection[int] = (),
    lagging: set[int] | None = None,
    wait: bool = True,
) -> list[int]:
    """Repair the bad ``blocks`` (4 KiB block numbers) of our copy of a chunk from the
    PG's other copies; return those still bad (empty: all repaired, or rewritten
    meanwhile by a write). ``locked``: the caller holds the chunk's range lock over
    the blocks (a copy job); ``exclude``: SDS ids not to ask; ``unchecked``: blocks of
    ``blocks`` that have no checksum recorded and are to be replaced all the same
    (the scrub found them differing from a copy that matches its checksums);
    ``lagging``: gets the SDS ids of the copies that refused us NOT_PERMITTED at our
    newest map (a map lags: their blocks are not known bad); ``wait``: after such a
    refusal, ask again at our newer maps within ``MAP_WAIT_S`` of the first refusal
    (False: not at all, the caller answers a retryable status). The repaired blocks
    are durable when it returns. Raises :class:`DeviceFailed` when our device fails."""
    store = state.store
    loc = store.location(volume, chunk)
    if loc is None or not blocks:
        return []
    dev = loc[0]
    m = None if dev.pool_id is None else state.maps.get(dev.pool_id)
    bad = sorted(set(blocks))
    lo, hi = bad[0], bad[-1] + 1
    key = chunk_key(volume, chunk)
    ticket = None
    if not locked:
        ticket, earlier = state.locks.acquire(key, lo << BLOCK_SHIFT, hi << BLOCK_SHIFT)
    try:
        if ticket is not None:
            for fut in earlier:
                await fut
        left = set(bad)
        repaired: list[int] = []
        refused: set[int] = set()
        deadline: float | None = None  # of the waits for our next map, under the lock
        while m is not None:
            pg = pg_of(volume, chunk, m.pg_count)
            for sds, in_sync in other_copies(m, pg, state.sds_id):
                if not left or sds in exclude:
                    continue
                good = await _fetch(state, m, sds, in_sync, volume, chunk, left, refused)
                if not good:
                    continue
                if store.needs_reclaim(dev, volume, chunk):
                    await store.reclaim(dev)  # the write-intent mark, off the event loop
                repaired += store.rewrite_bad(volume, chunk, good, unchecked)
                left.difference_update(good)
            if not left or not refused or dev.pool_id is None or not wait:
                break
            # A copy's map or ours lags: once more with our next map, if it comes soon.
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + MAP_WAIT_S
            wait_s = deadline - loop.time()
            if wait_s <= 0:
                break
            newer = await state.maps.wait_for(dev.pool_id, m.epoch + 1, wait_s)
            if newer is None:
                break
            m = newer
            refused.clear()
        if lagging is not None and left:
            lagging.update(refused)
        if repaired:
            await store.sync([dev])
        dev.checksum_repaired += len(repaired)
        dev.checksum_unrepairable += len(left)
        if repaired:
            log.warning(
                "%s: chunk %d/%d: 4 KiB block(s) %s repaired from another copy",
                dev.path,
                volume,
                chunk,
                ", ".join(map(str, repaired)),
            )
        if left:
            log.error(
                "%s: chunk %d/%d: 4 KiB block(s) %s bad and no copy could repair them "
                "(reads of them fail with EIO)",
                dev.path,
                volume,
                chunk,
                ", ".join(map(str, sorted(left))),
            )
        return sorted(left)
    finally:
        if ticket is not None:
            state.locks.release(key, ticket)


def runs(blocks: Collection[int]) -> list[tuple[int, int]]:
    """The runs of consecutive block numbers in ``blocks``: ``[lo, hi)`` each,
    ascending."""
    out: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


async def _fetch(
    state: SdsState,
    m: PgMap,
    sds: int,
    in_sync: bool,
    volume: int,
    chunk: int,
    wanted: Collection[int],
    refused: set[int],
) -> dict[int, bytes]:
    """The blocks of ``wanted`` that SDS ``sds``'s copy gives and that can be trusted
    (see the module's doc): block -> its bytes.

    Each run of consecutive wanted blocks is fetched on its own, and a run the peer
    refuses (``IO_ERROR``: a block of it is bad there too) is asked again block by
    block: the peer's checked read fails a whole range for one bad block in it, and
    a block bad here and there must not cost the blocks the peer holds good. A peer
    that refuses NOT_PERMITTED (its map does not name us yet) is added to ``refused``
    and asked nothing more."""
    address = m.sds.get(sds)
    if address is None:
        return {}
    good: dict[int, bytes] = {}
    todo = runs(wanted)
    while todo:
        lo, hi = todo.pop(0)
        try:
            client = state.peers.connected(sds, address) or await state.peers.get(sds, address)
            raw = await client.read_raw_chunk(
                volume, chunk, lo << BLOCK_SHIFT, (hi - lo) << BLOCK_SHIFT, m.epoch
            )
        except RequestError as exc:
            if exc.status == Status.IO_ERROR and hi - lo > 1:
                todo[:0] = [(b, b + 1) for b in range(lo, hi)]
                continue
            if exc.status == Status.NOT_PERMITTED:
                log.warning(
                    "chunk %d/%d: SDS %d's map does not name us a holder of the PG "
                    "(ours is at epoch %d): not asked for now",
                    volume,
                    chunk,
                    sds,
                    m.epoch,
                )
                refused.add(sds)
                return good
            log.warning(
                "chunk %d/%d: SDS %d could not give blocks %d-%d of its copy: %s",
                volume,
                chunk,
                sds,
                lo,
                hi - 1,
                exc,
            )
            continue
        except _FETCH_ERRORS as exc:
            log.warning("chunk %d/%d: SDS %d could not give its copy: %s", volume, chunk, sds, exc)
            return good
        expected = state.store.stored_crcs(volume, chunk, lo, hi - lo)
        for b in range(lo, hi):
            block = bytes(raw.data[(b - lo) << BLOCK_SHIFT : (b - lo + 1) << BLOCK_SHIFT])
            if len(block) != BLOCK:
                continue
            if crc(block) == expected[b - lo] or (in_sync and raw.allocated):
                good[b] = block
    return good
