"""Deleted volumes on an SDS: tombstones made durable, chunks freed in the background.

The MDM tombstones a deleted volume in its pool's PG map (``tombstones``: volume id ->
map epoch of the delete). From the moment a map carrying a tombstone arrives (from the
MDM, or from the state file at start), the request handler
(:class:`~meshblock.sds.io_path.DataService`) refuses every request about that volume
(status ``DELETED``), whether a client's or a peer's, and resync, rebuild and moves
skip its chunks. :class:`Tombstones` then:

1. makes the tombstone durable on every device (``ChunkStore.add_tombstones``); until
   it is, the volume is refused from memory and not reported to the MDM;
2. frees the volume's chunks through the store's crash-safe free path, a batch at a
   time, yielding to the event loop between batches;
3. reports per tombstone the chunks left (heartbeat ``tombstones``), so the MDM shows
   the progress and purges the volume once every SDS of the pool reports 0;
4. drops a tombstone once its volume has no chunk left and no map from the MDM in
   this process's life carries it any more.

After a restart the store's tombstones are loaded before anything is served, so an
interrupted free resumes and a freed chunk never comes back.
"""

from __future__ import annotations

import asyncio
import logging

from meshblock.sds import worker
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.store import TOMBSTONE_CAPACITY, ChunkStore, StoreError

log = logging.getLogger(__name__)

FREE_BATCH = 64  # chunks freed per step; the event loop runs between steps
RECHECK_S = 5.0  # look again without a new map (a tombstone to drop, a failed step)


class Tombstones:
    """The background worker of one SDS's tombstones (see the module's docstring).

    ``seen_maps``: the last map of each pool received from the MDM in this process's
    life (kept up to date by the SDS's state, :class:`meshblock.sds.state.SdsState`)."""

    def __init__(self, store: ChunkStore, maps: MapCache, seen_maps: dict[int, PgMap]) -> None:
        self._store = store
        self._maps = maps
        self._seen_maps = seen_maps
        self.pending: set[int] = set()  # in a map, not yet durable in the store
        # Every volume refused: pending or tombstoned in the store (the request path
        # tests membership here; changed in place, never replaced).
        self.refused: set[int] = set()
        self.waiting = 0  # tombstones that did not fit in the store's table yet
        self.freed_total = 0
        self.rate = 0  # chunks freed per second at most (0: unlimited)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- what the data path asks ------------------------------------------------------

    def deleted(self, volume: int) -> bool:
        """Whether requests about ``volume`` are refused: tombstoned (or being so)."""
        return volume in self.refused

    def map_changed(self, tombstones: dict[int, int]) -> None:
        """A newer map arrived: its tombstones are refused from now on."""
        store = self._store
        for volume in tombstones:
            self.refused.add(volume)
            if not store.is_tombstoned(volume):
                self.pending.add(volume)
        self._work.set()

    def report(self) -> list[dict[str, int]]:
        """Per durable tombstone, the chunks of it still stored here (heartbeat)."""
        store = self._store
        return [
            {"id": v, "chunks_left": store.tombstone_chunks_left(v), "epoch": epoch}
            for v, epoch in sorted(store.tombstones().items())
            if v not in self.pending
        ]

    # -- the worker -------------------------------------------------------------------

    def start(self) -> None:
        self.refused.update(self._store.tombstones())
        self._work.set()  # tombstones loaded from the store: resume their frees
        self._task = asyncio.create_task(self._run(), name="tombstones")

    async def close(self) -> None:
        await worker.cancel(self._task)

    async def _run(self) -> None:
        await worker.run_steps(
            self._work, self.step, RECHECK_S, (OSError, StoreError), self._failed
        )

    def _failed(self, exc: Exception) -> None:
        log.error("tombstones: %s; trying again in %.0f s", exc, RECHECK_S)

    async def step(self) -> None:
        """Make new tombstones durable (as many as the store's table has room for, the
        oldest deletes first; the rest stay refused and wait for room), free what is
        left, drop what is done, and add what waited if that made room. A tombstone
        that cannot be added never holds back the free of those already durable."""
        store = self._store
        self.refused.update(store.tombstones())
        failed: OSError | StoreError | None = None
        try:
            await self._add_new()
        except (OSError, StoreError) as exc:
            failed = exc  # raised once the durable ones are freed
        await self._free()
        if await self._drop_done() and self.waiting and await self._add_new():
            await self._free()
        if failed is not None:
            raise failed

    async def _add_new(self) -> bool:
        """Make the maps' new tombstones durable, as many as fit; whether any was."""
        store = self._store
        wanted: dict[int, int] = {}
        for m in self._maps.maps.values():
            wanted.update(m.tombstones)
        new = sorted((e, v) for v, e in wanted.items() if not store.is_tombstoned(v))
        self.refused.update(v for _, v in new)  # also those of maps from before our start
        room = max(0, TOMBSTONE_CAPACITY - len(store.tombstones()))
        fits = {v: e for e, v in new[:room]}
        if len(new) - len(fits) != self.waiting:
            self.waiting = len(new) - len(fits)
            if self.waiting:
                log.warning(
                    "tombstone table full (%d): %d deleted volume(s) refused, their "
                    "chunks freed once purged volumes make room",
                    TOMBSTONE_CAPACITY,
                    self.waiting,
                )
        if fits:
            await store.add_tombstones(fits)
            log.info("tombstoned volume(s) %s: durable; freeing their chunks", sorted(fits))
        self.pending -= {v for v in self.pending if store.is_tombstoned(v)}
        return bool(fits)

    async def _free(self) -> None:
        store = self._store
        for volume in sorted(store.tombstones()):
            freed = 0
            while n := await store.free_tombstoned(volume, FREE_BATCH):
                freed += n
                self.freed_total += n
                # Let requests and heartbeats through; at most ``rate`` chunks a second.
                await asyncio.sleep(n / self.rate if self.rate else 0)
            if freed:
                log.info("deleted volume %d: freed %d chunk(s) here", volume, freed)

    async def _drop_done(self) -> bool:
        # Dropped once no map from the MDM in this life lists it (a cached map from the
        # state file may be older than the purge, or than the delete).
        store = self._store
        fresh = self._seen_maps
        follows = {d.pool_id for d in store.devices if d.pool_id is not None}
        if not follows or not follows <= fresh.keys():
            return False
        listed = {v for m in fresh.values() for v in m.tombstones}
        done = [
            v for v in store.tombstones() if v not in listed and not store.tombstone_chunks_left(v)
        ]
        if not done:
            return False
        await store.drop_tombstones(done)
        log.info("dropped the tombstone(s) of purged volume(s) %s", sorted(done))
        # Still refused if a map that arrived meanwhile lists it again.
        listed = {v for m in self._maps.maps.values() for v in m.tombstones}
        self.refused.difference_update(v for v in done if v not in listed and v not in self.pending)
        return True
