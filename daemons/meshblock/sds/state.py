"""What one SDS knows and holds: :class:`SdsState`.

One object, made at start and shared by everything that serves or maintains the
SDS's copies: the request handler (:class:`meshblock.sds.io_path.DataService`), the
copy jobs (:class:`meshblock.sds.resync.Resync`), the tombstone worker
(:class:`meshblock.sds.deletion.Tombstones`, which it owns), the metrics and the MDM
link. None of them reaches into another for it. It holds:

- the chunk store, the cached PG maps, the peer connections and the counters;
- the per-chunk range locks (:class:`~meshblock.sds.replication.RangeLocks`) that
  order writes and copies of one chunk;
- the record of the writes made alone in PGs that are not ``clean``
  (:class:`~meshblock.sds.replication.DegradedWrites`), kept up to date from each map
  that arrives, and the last map of each pool seen in this process's life;
- the identity: our SDS id (0 until registered or loaded) and our devices by MDM id;
- what follows from those: which device serves a PG, whether we are a PG's whole
  acting set, which failed devices a map still counts on, and the garbage left by
  PGs that moved away (:meth:`SdsState.collect_garbage`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.access import SdcAccess
from meshblock.sds.deletion import Tombstones
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.replication import DegradedWrites, Peers, RangeLocks
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, Device, chunk_key
from meshblock.sds.tree_gc import TreeGc

log = logging.getLogger(__name__)

GC_RETRY_S: Final = 1.0  # garbage left because a write held it: looked at again after


class SdsState:
    """Store, maps, peers, locks, degraded record, tombstones and identity of one SDS."""

    def __init__(self, store: ChunkStore, maps: MapCache, peers: Peers, stats: SdsStats) -> None:
        self.store = store
        self.maps = maps
        self.peers = peers
        self.stats = stats
        self.locks = RangeLocks()
        self.degraded = DegradedWrites()
        # The last map of each pool received in this process's life (not from the
        # state file): a PG leaving clean between two of them starts a complete record.
        self.seen_maps: dict[int, PgMap] = {}
        # First listener of the maps: the copy jobs (registered later) see the
        # records pruned.
        maps.listeners.append(self._map_changed)
        self.tombstones = Tombstones(store, maps, self.seen_maps)
        # The garbage pass of snapshot trees, started by the maps' trees.
        self.tree_gc = TreeGc(store, maps, self.locks)
        # Which SDC may do client IO to which volume (the MDM's mappings documents).
        self.access = SdcAccess()
        self.sds_id = 0  # 0 until registered (or loaded from the state file)
        self.dev_by_id: dict[int, Device] = {}
        self.stopping = False  # requests are refused, no more garbage is collected
        # Called with a peer SDS's id when it does not answer (set by the MDM link).
        self.peer_unreachable: Callable[[int], None] | None = None
        # Called with a device that just failed (set by the MDM link: report, persist).
        self.device_failed: Callable[[Device], None] | None = None
        self._named: dict[int, frozenset[int]] = {}  # pool -> PGs placed on us (GC)
        store.on_failure = self._on_device_failure

    def _on_device_failure(self, dev: Device) -> None:
        if self.device_failed is not None:
            self.device_failed(dev)

    # -- identity and maps ------------------------------------------------------------

    def set_identity(self, sds_id: int, devices: dict[str, tuple[int, int]]) -> None:
        """Our SDS id and, per device path, ``(MDM device id, pool id)``."""
        self.sds_id = sds_id
        for dev in self.store.devices:
            ids = devices.get(dev.path)
            if ids is not None:
                dev.mdm_id, dev.pool_id = ids
        self.dev_by_id = {d.mdm_id: d for d in self.store.devices if d.mdm_id is not None}
        self.store.forget_pgs()  # indexed by pool: the devices' pools may have changed
        for m in self.maps.maps.values():
            self.store.index_pgs(m.pool_id, m.pg_count)

    def _map_changed(self, m: PgMap) -> None:
        self.store.index_pgs(m.pool_id, m.pg_count)
        prev = self.seen_maps.get(m.pool_id)
        me = self.sds_id
        if prev is not None and me and prev.pg_count == m.pg_count:
            for pg in range(m.pg_count):
                if (
                    not m.clean[pg]
                    and m.primary[pg][0] == me
                    and prev.clean[pg]
                    and me in (prev.primary[pg][0], prev.secondary[pg][0])
                ):
                    self.degraded.track(m.pool_id, pg)
                if m.primary[pg][0] == me and m.secondary[pg] not in (
                    prev.primary[pg],
                    prev.secondary[pg],
                ):
                    # A new secondary: what we recorded is not what it missed.
                    self.degraded.untrack(m.pool_id, pg)
        self.seen_maps[m.pool_id] = m
        self.degraded.prune(m, me)
        self.tombstones.map_changed(m.tombstones)
        self.tree_gc.map_changed()

    # -- what the maps say about us ---------------------------------------------------

    def alone(self, pool: int, pg: int) -> bool:
        """Whether our newest map of ``pool`` has us as the whole acting set of ``pg``:
        ``degraded`` (or ``inactive``), we primary. Not while resyncing or rebuilding:
        the copy being filled may be a clean copy in the MDM's next map already, so a
        write it missed must fail (and be retried) rather than be acknowledged."""
        m = self.maps.maps.get(pool)
        return (
            m is not None
            and bool(self.sds_id)
            and not m.forwards(pg)
            and m.primary[pg][0] == self.sds_id
        )

    def replicates_to(self, peer: int) -> bool:
        """Whether ``peer`` is the in-sync secondary of some PG we are primary of."""
        me = self.sds_id
        for m in self.maps.maps.values():
            for pg in range(m.pg_count):
                if m.secondary[pg][0] == peer and m.primary[pg][0] == me and m.clean[pg]:
                    return True
        return False

    def device(self, m: PgMap, pg: int, primary: bool) -> Device:
        """Our device that holds our copy of ``pg`` as ``m`` places it (as primary, or
        as secondary or move target)."""
        if primary:
            dev_id = m.primary[pg][1]
        elif m.target[pg][0] == self.sds_id and m.secondary[pg][0] != self.sds_id:
            dev_id = m.target[pg][1]
        else:
            dev_id = m.secondary[pg][1]
        dev = self.dev_by_id.get(dev_id)
        if dev is not None:
            return dev
        for d in self.store.devices:  # the map names a device we do not know: any in the pool
            if d.pool_id == m.pool_id:
                return d
        return self.store.devices[0]

    def target_device(self, dev: Device, volume: int, chunk: int) -> Device:
        """The device a write of the chunk reaches: where the chunk already lives (the
        map may name another device of ours, e.g. after a move), else ``dev``. FUA
        syncs this one."""
        loc = self.store.location(volume, chunk)
        return dev if loc is None else loc[0]

    # -- failed devices ---------------------------------------------------------------

    def failed_in_sync(self) -> list[Device]:
        """Failed devices that a map still names as an in-sync copy (or a move's
        target): their copies still count, so a FLUSH cannot succeed yet."""
        devs = self.store.failed_devices()
        me = self.sds_id
        if not devs or not me:
            return devs  # not registered: no map tells
        failed = {d.mdm_id: d for d in devs if d.mdm_id is not None}
        out: dict[int, Device] = {d.mdm_id or 0: d for d in devs if d.mdm_id is None}
        for m in self.maps.maps.values():
            for pg in range(m.pg_count):
                p, sec, tgt = m.primary[pg], m.secondary[pg], m.target[pg]
                if p[0] == me and p[1] in failed:
                    out[p[1]] = failed[p[1]]
                if sec[0] == me and sec[1] in failed and m.forwards(pg):
                    out[sec[1]] = failed[sec[1]]
                if tgt[0] == me and tgt[1] in failed:
                    out[tgt[1]] = failed[tgt[1]]
        return list(out.values())

    def unknown(self, pool: int) -> bool:
        """Whether a device of ``pool`` failed before its index was loaded: a chunk
        missing from the index may have been on it."""
        return any(d.failed and not d.loaded and d.pool_id == pool for d in self.store.devices)

    # -- garbage ----------------------------------------------------------------------

    def collect_garbage(self, m: PgMap) -> int:
        """Free the chunks of clean PGs that ``m``, a map fresh from the MDM, places on
        other SDSs only: copies rebuilt or moved elsewhere (we were down, or drained).
        The MDM never places a PG on a device again without a full copy to it, so they
        are garbage. Runs when a PG left us since the last map; returns chunks freed."""
        me = self.sds_id
        if not me:
            return 0
        # Kept: PGs placed on us, and PGs not clean (until two in-sync copies exist
        # elsewhere, a stale copy here is the last resort of a manual recovery).
        named = frozenset(pg for pg in range(m.pg_count) if m.names(pg, me) or not m.clean[pg])
        before = self._named.get(m.pool_id)
        self._named[m.pool_id] = named
        if before is not None and before <= named:
            return 0
        freed = 0
        busy: set[int] = set()
        for volume, chunk in self.store.chunk_ids_of_pool(m.pool_id):
            pg = pg_of(volume, chunk, m.pg_count)
            if pg in named or self.tombstones.deleted(volume):
                continue  # a deleted volume's chunks: freed by the tombstones' worker
            loc = self.store.location(volume, chunk)
            if loc is not None and loc[0].failed:
                continue  # no IO on a failed device
            if self.locks.busy(chunk_key(volume, chunk)):
                busy.add(pg)  # a write from before the map changed: next time
                continue
            try:
                self.store.zero(volume, chunk, 0, CHUNK_SIZE)
            except OSError as exc:
                log.error("cannot free chunk %d/%d: %s", volume, chunk, exc)
                continue
            freed += 1
        if busy:
            # Counted as still ours until a pass frees them: try again in a second.
            self._named[m.pool_id] = named | busy
            asyncio.get_running_loop().call_later(GC_RETRY_S, self._collect_again, m.pool_id)
        if freed:
            log.info(
                "pool %d: freed %d chunk(s) of PGs now placed on other SDSs (map epoch %d)",
                m.pool_id,
                freed,
                m.epoch,
            )
        return freed

    def _collect_again(self, pool: int) -> None:
        m = self.maps.maps.get(pool)
        if m is not None and not self.stopping:
            self.collect_garbage(m)
