"""The PG maps this SDS serves by: one per pool, newest epoch wins.

A map comes from the MDM (``GET /api/v1/pools/{id}/pgmap``, long-polled by
:mod:`meshblock.sds.mdm_client`) or from the state file at start, so that the SDS
keeps serving on its cached maps while the MDM is away (docs/design.md, invariant 5).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshblock import pgmap_doc
from meshblock.sds.versions import VersionTree
from meshblock.terms import Terms

NO_COPY = (0, 0)  # (sds_id, device_id) of a PG copy that is not placed
CLEAN = pgmap_doc.CLEAN  # the state of a PG without ``state`` (state files of older versions)
RESYNCING = "resyncing"  # the primary forwards writes to the secondary and copies to it
REBUILDING = "rebuilding"  # the same, to a new (empty) secondary: always a full copy
DEFAULT_REBUILD_CONCURRENCY = 4  # a map without the pool's throttles (older MDM)


@dataclass(frozen=True)
class MapTree:
    """A snapshot tree of a map (docs/snapshots.md): its versions as a
    :class:`~meshblock.sds.versions.VersionTree`, the views its volumes read (the live
    views) and per volume ``(view, writable)``. ``key`` is equal for two maps' trees
    with the same versions and views (the garbage pass of one is the other's)."""

    vtree: VersionTree
    views: frozenset[int]
    volumes: dict[int, tuple[int, bool]]
    key: tuple[tuple[tuple[int, int | None], ...], frozenset[int]]

    @classmethod
    def from_doc(cls, tree: pgmap_doc.TreeDoc) -> MapTree:
        views = frozenset(v.view for v in tree.volumes.values())
        return cls(
            vtree=VersionTree(tree.versions),
            views=views,
            volumes={i: (v.view, v.writable) for i, v in tree.volumes.items()},
            key=(tuple(sorted(tree.versions.items())), views),
        )

    def unread(self) -> list[int]:
        """The versions no volume reads, ancestors first: a version no live view
        descends from is garbage whole; one with one child is collapsed into it."""
        vt = self.vtree
        return sorted((v for v in vt.parents if v not in self.views), key=vt.enter.__getitem__)


@dataclass(frozen=True)
class PgMap:
    """One pool's map at one epoch; per PG ``(sds_id, device_id)`` of each copy and
    whether the PG is ``clean`` (both copies in sync). In a PG that is not clean
    (``degraded`` or ``inactive``) the secondary is stale: the primary writes alone;
    in a ``resyncing`` one the primary forwards writes to the secondary again and
    copies to it what it missed (:mod:`meshblock.sds.resync`), which is still not
    read. ``rebuild_*``: the pool's copy throttles (0 MiB/s: unlimited)."""

    pool_id: int
    epoch: int
    pg_count: int
    primary: tuple[tuple[int, int], ...]
    secondary: tuple[tuple[int, int], ...]
    sds: dict[int, tuple[str, int]]  # sds id -> (address, data port)
    doc: dict[str, Any]
    clean: tuple[bool, ...] = ()  # per PG; empty: every PG is clean
    resyncing: tuple[bool, ...] = ()  # per PG; empty: none is
    rebuilding: tuple[bool, ...] = ()  # per PG; empty: none is
    # per PG the rebalance target (NO_COPY: none): takes forwarded writes and a copy
    target: tuple[tuple[int, int], ...] = ()
    rebuild_concurrency: int = DEFAULT_REBUILD_CONCURRENCY
    rebuild_bandwidth_mibps: int = 0
    rebalance_concurrency: int = DEFAULT_REBUILD_CONCURRENCY
    rebalance_bandwidth_mibps: int = 0
    # Deleted volumes of the pool (volume id -> map epoch of the delete): their chunks
    # are refused and freed (meshblock.sds.deletion).
    tombstones: dict[int, int] = field(default_factory=dict)
    # SDS name -> id (the map's sds entries; empty from an MDM that sends no names): whose
    # certificate (sds:NAME) is which SDS of the map
    sds_names: dict[str, int] = field(default_factory=dict)
    # Snapshot trees of the pool (tree id -> MapTree): their versions are collected
    # by meshblock.sds.tree_gc; a volume not in one is its own tree, view 0.
    trees: dict[int, MapTree] = field(default_factory=dict)
    # Volumes of those trees that read a frozen version (read-only snapshots): client
    # writes to them are refused NOT_PERMITTED, whatever the mapping.
    read_only: frozenset[int] = frozenset()

    def throttle(self, kind: str) -> tuple[int, int]:
        """(concurrent chunk copies, MiB/s or 0) for ``rebuild`` or ``rebalance``."""
        if kind == "rebalance":
            return self.rebalance_concurrency, self.rebalance_bandwidth_mibps
        return self.rebuild_concurrency, self.rebuild_bandwidth_mibps

    def __post_init__(self) -> None:
        if len(self.clean) != self.pg_count:
            object.__setattr__(self, "clean", (True,) * self.pg_count)
        if len(self.resyncing) != self.pg_count:
            object.__setattr__(self, "resyncing", (False,) * self.pg_count)
        if len(self.rebuilding) != self.pg_count:
            object.__setattr__(self, "rebuilding", (False,) * self.pg_count)
        if len(self.target) != self.pg_count:
            object.__setattr__(self, "target", (NO_COPY,) * self.pg_count)

    def forwards(self, pg: int) -> bool:
        """Whether the primary of ``pg`` forwards writes to its secondary."""
        return self.clean[pg] or self.resyncing[pg] or self.rebuilding[pg]

    def copy_to(self, pg: int) -> tuple[int, int] | None:
        """``(sds_id, device_id)`` the primary of ``pg`` copies the PG to, if any: the
        rebalance target, else a resyncing or rebuilding secondary."""
        if self.target[pg][0]:
            return self.target[pg]
        if self.resyncing[pg] or self.rebuilding[pg]:
            return self.secondary[pg]
        return None

    def names(self, pg: int, sds_id: int) -> bool:
        """Whether ``sds_id`` holds a copy (or the move target) of ``pg`` in this map."""
        return sds_id in (self.primary[pg][0], self.secondary[pg][0], self.target[pg][0])

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PgMap:
        """The map of a PG-map document (:class:`meshblock.pgmap_doc.PgMapError`, a
        ``ValueError``, if it is malformed); ``doc`` is kept for the state file."""
        parsed = pgmap_doc.parse(doc)

        def where(copy: pgmap_doc.PgCopy | None) -> tuple[int, int]:
            return NO_COPY if copy is None else (copy.sds_id, copy.device_id)

        def throttle(name: str, default: int, least: int) -> int:
            value = parsed.throttle(name)
            return max(least, default if value is None else value)

        pgs = parsed.pgs
        return cls(
            pool_id=parsed.pool_id,
            epoch=parsed.epoch,
            pg_count=parsed.pg_count,
            primary=tuple(where(e.primary) for e in pgs),
            secondary=tuple(where(e.secondary) for e in pgs),
            sds={i: (e.address, e.data_port) for i, e in parsed.sds.items()},
            sds_names={e.name: i for i, e in parsed.sds.items() if e.name},
            doc=doc,
            clean=tuple(e.state == CLEAN for e in pgs),
            resyncing=tuple(e.state == RESYNCING for e in pgs),
            rebuilding=tuple(e.state == REBUILDING for e in pgs),
            target=tuple(where(e.target) for e in pgs),
            rebuild_concurrency=throttle("rebuild_concurrency", DEFAULT_REBUILD_CONCURRENCY, 1),
            rebuild_bandwidth_mibps=throttle("rebuild_bandwidth_mibps", 0, 0),
            rebalance_concurrency=throttle("rebalance_concurrency", DEFAULT_REBUILD_CONCURRENCY, 1),
            rebalance_bandwidth_mibps=throttle("rebalance_bandwidth_mibps", 0, 0),
            tombstones=dict(parsed.tombstones),
            trees={t: MapTree.from_doc(tree) for t, tree in parsed.trees.items()},
            read_only=parsed.read_only_volumes(),
        )


class MapCache:
    """The newest known map of each pool, and waiting for a newer one."""

    def __init__(self) -> None:
        self.maps: dict[int, PgMap] = {}
        self._changed = asyncio.Event()
        self.listeners: list[Callable[[PgMap], None]] = []  # called with each newer map
        # the highest MDM leader term seen (maps, mappings, heartbeat answers): a map or
        # an order of an older term is a deposed MDM's, refused (meshblock.terms)
        self.terms = Terms()

    def get(self, pool_id: int) -> PgMap | None:
        return self.maps.get(pool_id)

    def epoch(self, pool_id: int) -> int:
        m = self.maps.get(pool_id)
        return m.epoch if m is not None else 0

    def update(self, m: PgMap, *, same_epoch: bool = False) -> bool:
        """Keep ``m`` if it is newer than what we have (``same_epoch``: or at our epoch
        with another document, ours having been found not the MDM's); return whether
        it was. A map of an older MDM leader term than one seen is refused."""
        if not self.terms.admit(m.doc, f"the map of pool {m.pool_id} at epoch {m.epoch}"):
            return False
        old = self.maps.get(m.pool_id)
        if old is not None and (
            old.epoch > m.epoch or (old.epoch == m.epoch and (not same_epoch or old.doc == m.doc))
        ):
            return False
        self.maps[m.pool_id] = m
        for listener in self.listeners:
            listener(m)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def wait_for(self, pool_id: int, epoch: int, wait_s: float) -> PgMap | None:
        """The pool's map once its epoch reaches ``epoch``; None after ``wait_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            m = self.maps.get(pool_id)
            if m is not None and m.epoch >= epoch:
                return m
            left = deadline - loop.time()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
