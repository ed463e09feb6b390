"""The garbage pass of snapshot trees on an SDS, started by the maps and paced.

A pool's PG map carries its snapshot trees (``trees``: each version's parent and each
volume's view; docs/snapshots.md, "The MDM's records"). When a map changes a tree's
versions or the views its volumes read (a snapshot or clone deleted, a volume
reverted), the SDS learns from the map alone what it may free: no per-chunk order
comes from the MDM. :class:`TreeGc` then runs one pass over the tree's chunks stored
here (``ChunkStore.tree_chunks``), each chunk under its range lock (a write or a copy
of the chunk in progress finishes first, a later one waits for the chunk's step):

1. ``ChunkStore.collect_garbage``: a block no live view reads is zeroed, a slot left
   with nothing in use freed (a version no live view descends from goes whole);
2. ``ChunkStore.collapse`` of each version no volume reads that has exactly one child,
   ancestors first: its slot merged into (or relabelled as) the child's, durable
   before the step returns.

Paced like the free of deleted volumes: at most ``rate`` chunks changed a second
(``delete_free_rate`` of ``sds.toml``; 0: unlimited), the event loop let through
between chunks, so that collecting a large tree does not crowd out client IO. A map
that changes the tree again during a pass ends the pass; the next one runs on the
newer tree. A tree whose last pass ran on the map's versions and views is not
visited again (a restart visits every tree of the maps once).

The report (:meth:`TreeGc.report`, in ``/health`` as ``tree_gc``; :meth:`TreeGc.
heartbeat`, in the heartbeats to the MDM, which sums the SDSs' in ``GET
/api/v1/snapshot-gc`` and ``meshctl snapshot-gc status``; and the metrics
``meshblock_sds_tree_gc_*``) gives per tree the pass's progress and, after a pass,
the slots still stored here of versions no volume reads (``unread_slots``): 0 for a
version means this SDS holds nothing of it, what the MDM needs to drop it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from meshblock.chunks import CHUNK_SIZE
from meshblock.sds import worker
from meshblock.sds.heartbeat import TREE_GC_MAX_ROWS
from meshblock.sds.maps import MapCache, MapTree
from meshblock.sds.replication import RangeLocks
from meshblock.sds.store import ChunkStore, StoreError, chunk_key

log = logging.getLogger(__name__)

YIELD_EVERY = 64  # chunks visited between two yields to the event loop when none changed
COUNT_YIELD_EVERY = 1024  # chunks counted between two yields (unread slots after a pass)
#: The IO path still reads and writes a tree's chunks as plain version-0 slots (the
#: root volume's, keyed by the tree id): it does not go through views yet (Step 3's
#: wire part, docs/snapshots.md). Until it does, the pass never changes a chunk's
#: plain slot: it neither zeroes blocks of it nor frees it (collect_garbage's
#: ``keep_plain``), nor collapses version 0 into its only child, which would relabel
#: the plain slot as the child's and leave the root volume reading zeroes (and a
#: later plain write allocating a new slot beside it). The range lock the pass takes
#: is the one the primary's writes take, but reads and a secondary's REPL ops take
#: none, and the harm is after the lock anyway: the IO path does not know versions.
PLAIN_IO = True
RECHECK_S = 5.0  # look again without a new map (after a failed pass)
#: A tree whose pass failed is tried again after this, doubled after each failure of
#: it in a row up to :data:`RETRY_MAX_S`, or at once when a map changes the tree.
RETRY_FIRST_S = RECHECK_S
RETRY_MAX_S = 300.0


@dataclass
class TreePass:
    """One pass over a tree's chunks here: its progress, then its outcome."""

    key: Any  # MapTree.key of the tree the pass runs on
    chunks: int  # chunks of the tree here when the pass started
    pool_id: int = 0  # the pool whose map carries the tree
    done: int = 0  # chunks visited
    blocks_freed: int = 0
    slots_freed: int = 0
    collapsed: int = 0  # chunks where a version was merged into its child
    finished: bool = False
    # after the pass: version no volume reads -> slots of it still here
    unread_slots: dict[int, int] = field(default_factory=dict)
    error: str | None = None  # the pass failed: why (tried again at retry_at)
    failures: int = 0  # failed passes of the tree in a row
    retry_at: float = 0.0  # time.monotonic() of the next try after a failure

    @property
    def state(self) -> str:
        return "failed" if self.error is not None else "done" if self.finished else "running"

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "state": self.state,
            "chunks": self.chunks,
            "chunks_done": self.done,
            "blocks_freed": self.blocks_freed,
            "slots_freed": self.slots_freed,
            "collapsed": self.collapsed,
            "unread_slots": {str(v): n for v, n in sorted(self.unread_slots.items())},
        }
        if self.error is not None:
            doc["error"] = self.error
        return doc


class TreeGc:
    """The garbage-pass worker of one SDS's snapshot trees (see the module's
    docstring)."""

    def __init__(self, store: ChunkStore, maps: MapCache, locks: RangeLocks) -> None:
        self._store = store
        self._maps = maps
        self._locks = locks
        self.rate = 0  # chunks changed per second at most (0: unlimited)
        self.passes: dict[int, TreePass] = {}  # tree -> its newest pass
        self.passes_total = 0  # passes completed
        self.blocks_freed_total = 0
        self.slots_freed_total = 0
        self.collapsed_total = 0
        self.errors_total = 0
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the pace
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what the maps say ------------------------------------------------------------

    def trees(self) -> dict[int, MapTree]:
        """Every snapshot tree of the newest maps, by tree id."""
        out: dict[int, MapTree] = {}
        for m in self._maps.maps.values():
            out.update(m.trees)
        return out

    def tree(self, tree: int) -> MapTree | None:
        """``tree`` as the newest maps carry it (one look-up per pool's map)."""
        for m in self._maps.maps.values():
            mt = m.trees.get(tree)
            if mt is not None:
                return mt
        return None

    def map_changed(self) -> None:
        """A newer map arrived: look for trees to collect."""
        self._work.set()

    def pending(self) -> list[int]:
        """The trees of the maps whose last pass did not run on their current tree,
        less those whose pass on it failed and whose retry is not due yet."""
        now = time.monotonic()
        return sorted(
            t
            for t, mt in self.trees().items()
            if (p := self.passes.get(t)) is None
            or p.key != mt.key
            or (not p.finished and (p.error is None or p.retry_at <= now))
        )

    def report(self) -> dict[str, dict[str, Any]]:
        """Per tree, its newest pass (``/health``)."""
        return {str(t): p.to_doc() for t, p in sorted(self.passes.items())}

    def heartbeat(self) -> list[dict[str, Any]]:
        """Per tree, its newest pass, for the heartbeat (``tree_gc``, docs/api.md),
        which carries a bounded part of them at a time (:mod:`meshblock.sds.heartbeat`)."""
        return [
            {
                "tree_id": t,
                "pool_id": p.pool_id,
                "state": p.state,
                "chunks": p.chunks,
                "chunks_done": p.done,
                "blocks_freed": p.blocks_freed,
                "slots_freed": p.slots_freed,
                "collapsed": p.collapsed,
                # the lowest versions, as many as one heartbeat carries (heartbeat.py)
                "unread_slots": [
                    {"version": v, "slots": n} for v, n in sorted(p.unread_slots.items())
                ][:TREE_GC_MAX_ROWS],
            }
            for t, p in sorted(self.passes.items())
        ]

    def chunks_left(self) -> int:
        """Chunks the passes in progress have still to visit."""
        return sum(p.chunks - p.done for p in self.passes.values() if not p.finished)

    def unread_slots(self) -> int:
        """Slots here of versions no volume reads, after the trees' last passes."""
        return sum(sum(p.unread_slots.values()) for p in self.passes.values() if p.finished)

    # -- the worker -------------------------------------------------------------------

    def start(self) -> None:
        self._work.set()  # the maps of the state file: visit their trees once
        self._task = asyncio.create_task(self._run(), name="tree-gc")

    async def close(self) -> None:
        await worker.cancel(self._task)

    async def _run(self) -> None:
        await worker.run_steps(
            self._work, self.step, RECHECK_S, (OSError, StoreError, ValueError), self._failed
        )

    def _failed(self, exc: Exception) -> None:
        """A step failed: an expected error (tried again at the next wake-up) or an
        unexpected one (logged with its traceback by the worker's loop, which backs
        off); both counted in ``meshblock_sds_tree_gc_errors_total``."""
        self.errors_total += 1
        log.error("snapshot garbage pass: %s; trying again in %.0f s", exc, RECHECK_S)

    async def step(self) -> None:
        """Run a pass over each pending tree; forget the trees the maps dropped. A
        tree whose pass fails is recorded ``failed`` and tried again later
        (:data:`RETRY_FIRST_S`, doubling), and the trees after it still get theirs."""
        trees = self.trees()
        for gone in [t for t in self.passes if t not in trees]:
            del self.passes[gone]
        pending = self.pending()
        if not pending:
            return
        # One scan of the store for every pending tree, in a thread.
        chunks = await self._store.trees_chunks(pending)
        for tree in pending:
            before = self.passes.get(tree)
            try:
                await self.collect(tree, chunks.get(tree, []))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._tree_failed(tree, before, exc)

    def _tree_failed(self, tree: int, before: TreePass | None, exc: Exception) -> None:
        """The pass over ``tree`` raised ``exc``: its pass is recorded failed, counted,
        logged (an unexpected error with its traceback), and tried again later."""
        self.errors_total += 1
        p = self.passes.get(tree)
        if p is None:  # it failed before its pass began
            mt = self.trees().get(tree)
            key = mt.key if mt is not None else None
            p = self.passes[tree] = TreePass(key, 0, self._pool_of(tree))
        failures = before.failures if before is not None and before.key == p.key else 0
        p.failures = failures + 1
        p.error = f"{type(exc).__name__}: {exc}"
        wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (p.failures - 1))
        p.retry_at = time.monotonic() + wait
        expected = isinstance(exc, (OSError, StoreError, ValueError))
        log.log(
            logging.ERROR,
            "snapshot tree %d: garbage pass failed (%s); trying it again in %.0f s, "
            "the other trees go on",
            tree,
            p.error,
            wait,
            exc_info=None if expected else exc,
        )

    def _pool_of(self, tree: int) -> int:
        """The pool whose map carries ``tree`` (0: no map does any more)."""
        return next((m.pool_id for m in self._maps.maps.values() if tree in m.trees), 0)

    async def collect(self, tree: int, chunks: list[int] | None = None) -> TreePass | None:
        """One pass over ``tree``'s chunks here (``chunks``, as a scan found them;
        None: scanned now, in a thread), on the newest map's tree; None when the maps
        do not carry the tree. A map that changes the tree meanwhile ends the pass
        unfinished (:meth:`step` runs the next). A chunk the tree gains after the
        scan is not visited by this pass (nothing writes a version no volume reads)."""
        store = self._store
        if chunks is None:
            chunks = (await store.trees_chunks((tree,))).get(tree, [])
        mt = self.tree(tree)
        if mt is None:
            return None
        p = self.passes[tree] = TreePass(mt.key, len(chunks), self._pool_of(tree))
        unread = mt.unread()
        quiet = 0
        for chunk in chunks:
            now = self.tree(tree)
            if now is None or now.key != mt.key:
                log.info("snapshot tree %d changed during its garbage pass: passing again", tree)
                self._work.set()
                return p
            changed = await self._chunk(mt, unread, tree, chunk, p)
            p.done += 1
            quiet += 1
            if changed:
                quiet = 0
                # At most ``rate`` chunks changed a second; requests go first.
                await self.sleep(1 / self.rate if self.rate else 0)
            elif quiet >= YIELD_EVERY:
                quiet = 0
                await self.sleep(0)
        await store.sync()  # what was freed is durable before the report says so
        counts: dict[int, int] = dict.fromkeys(unread, 0)
        for i, chunk in enumerate(chunks, 1):
            for version in store.versions(tree, chunk):
                if version in counts:
                    counts[version] += 1
            if not i % COUNT_YIELD_EVERY:
                await self.sleep(0)
        p.unread_slots = counts
        p.finished = True
        self.passes_total += 1
        log.info(
            "snapshot tree %d: garbage pass over %d chunk(s) freed %d block(s) and %d slot(s), "
            "collapsed %d; %d slot(s) of unread versions left",
            tree,
            p.chunks,
            p.blocks_freed,
            p.slots_freed,
            p.collapsed,
            sum(counts.values()),
        )
        return p

    async def _chunk(
        self, mt: MapTree, unread: list[int], tree: int, chunk: int, p: TreePass
    ) -> bool:
        """Collect one chunk under its range lock; whether anything changed."""
        store = self._store
        key = chunk_key(tree, chunk)
        ticket, earlier = self._locks.acquire(key, 0, CHUNK_SIZE)
        try:
            for write in earlier:
                await write
            before = store.versions(tree, chunk)
            freed = store.collect_garbage(mt.vtree, mt.views, tree, chunk, keep_plain=PLAIN_IO)
            blocks = sum(b.bit_count() for b in freed.values())
            slots = len(before) - len(store.versions(tree, chunk))
            collapsed = False
            children = mt.vtree.children
            for version in unread:
                if PLAIN_IO and not version and store.location(tree, chunk) is not None:
                    continue  # the root's plain slot: see PLAIN_IO
                if len(children.get(version, ())) == 1 and version in store.versions(tree, chunk):
                    await store.collapse(mt.vtree, version, tree, chunk)
                    collapsed = True
        finally:
            self._locks.release(key, ticket)
        p.blocks_freed += blocks
        p.slots_freed += slots
        p.collapsed += collapsed
        self.blocks_freed_total += blocks
        self.slots_freed_total += slots
        self.collapsed_total += collapsed
        return bool(freed) or collapsed
