"""The MDM's records of volume trees, as the pool maps carry them (docs/snapshots.md,
"The MDM's records").

A tree with more than one volume or version has a row in ``vtrees`` and one per
version in ``vtree_versions``; each volume has its view (``volumes.view_version``) and
whether it writes it (``volumes.writable``). A tree of one volume, every volume made
before snapshots, has no rows: tree = volume id, view = head = version 0, and the
pool's map does not list it.

:func:`pool_trees` reads the trees of the pools whose maps are being built in one
query (none per volume: a pool of 10,000 volumes that were never snapshotted reads no
row), and :func:`trees_doc` gives a pool's map its ``trees`` in the shape
:func:`meshblock.pgmap_doc.parse` accepts: every version row, live or dead, with its
parent (the SDSs free what no view reads; a row goes once they hold nothing of it),
and every active volume of the tree with its view and whether it writes it.

:func:`drop_collected` removes a dead version's record once every SDS of the pool
reports, from a finished garbage pass, that it holds no slot of it (heartbeat
``tree_gc``, :mod:`meshblock.mdm.snapshot_gc`), and moves the pool's map epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.models import (
    Device,
    StoragePool,
    Volume,
    VolumeState,
    Vtree,
    VtreeVersion,
    VtreeVersionState,
)
from meshblock.mdm.snapshot_gc import TreeGcReports

log = logging.getLogger(__name__)

# One statement for every pool of a build: each version of each tree of the pools,
# with the active volumes that read it (none: NULLs). Built once, its compiled form
# cached.
_TREE_ROWS = (
    select(
        Vtree.pool_id,
        VtreeVersion.vtree_id,
        VtreeVersion.version,
        VtreeVersion.parent,
        Volume.id,
        Volume.writable,
    )
    .join(Vtree, Vtree.id == VtreeVersion.vtree_id)
    .outerjoin(
        Volume,
        and_(
            Volume.vtree_id == VtreeVersion.vtree_id,
            Volume.view_version == VtreeVersion.version,
            Volume.state == VolumeState.ACTIVE,
        ),
    )
    .where(Vtree.pool_id.in_(bindparam("pool_ids", expanding=True)))
    .order_by(VtreeVersion.vtree_id, VtreeVersion.version, Volume.id)
)


class Tree:
    """One tree as the map lists it: version -> parent, volume -> (view, writable)."""

    __slots__ = ("tree_id", "versions", "volumes")

    def __init__(self, tree_id: int) -> None:
        self.tree_id = tree_id
        self.versions: dict[int, int | None] = {}
        self.volumes: dict[int, tuple[int, bool]] = {}

    def of_one(self) -> bool:
        """Whether the map says nothing by listing it: version 0 alone, read and written
        by at most the volume whose id is the tree's (what an unlisted volume is)."""
        return self.versions == {0: None} and all(
            vid == self.tree_id and view == 0 and writable
            for vid, (view, writable) in self.volumes.items()
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "versions": {str(v): p for v, p in sorted(self.versions.items())},
            "volumes": {
                str(vid): {"view": view, "writable": writable}
                for vid, (view, writable) in sorted(self.volumes.items())
            },
        }


def trees_of_rows(rows: Iterable[Any]) -> dict[int, dict[int, Tree]]:
    """Per pool, its trees from ``_TREE_ROWS``' rows, pure."""
    out: dict[int, dict[int, Tree]] = {}
    for pool_id, tree_id, version, parent, volume_id, writable in rows:
        trees = out.setdefault(pool_id, {})
        tree = trees.get(tree_id)
        if tree is None:
            tree = trees[tree_id] = Tree(tree_id)
        tree.versions[int(version)] = None if parent is None else int(parent)
        if volume_id is not None:
            tree.volumes[int(volume_id)] = (int(version), bool(writable))
    return out


async def pool_trees(session: AsyncSession, pool_ids: list[int]) -> dict[int, dict[int, Tree]]:
    """Per pool of ``pool_ids``, the trees that have records (one query)."""
    conn = await session.connection()
    rows = await conn.execute(_TREE_ROWS, {"pool_ids": pool_ids})
    return trees_of_rows(rows)


def trees_doc(trees: dict[int, Tree]) -> dict[str, Any]:
    """A pool map's ``trees`` (docs/api.md, PgMap): the trees with more than one volume
    or version, by ascending id; empty when there are none (the map then has no
    ``trees`` at all, byte for byte the document of before trees)."""
    return {str(t): trees[t].to_doc() for t in sorted(trees) if not trees[t].of_one()}


def droppable(
    versions: dict[int, int | None],
    dead: set[int],
    viewed: set[int],
    freed: Iterable[int],
) -> tuple[list[int], dict[int, int | None]]:
    """Which of ``freed`` (versions every SDS of the pool holds nothing of) a tree
    drops, and its versions' parents after: a version goes if it is ``dead``, no
    active volume views it (``viewed``), and the tree keeps one root and one version at
    least (a root goes only with exactly one child, which becomes the root). Its
    children take its parent: it held nothing, so their block maps are unchanged.
    Pure; in ascending order, each drop seeing the ones before, and again until a pass
    drops nothing: a root skipped for its two children goes once one of them has gone
    later in the same pass."""
    after = dict(versions)
    dropped: list[int] = []
    left = sorted(freed)
    while True:
        kept = []
        for v in left:
            if v not in after or v not in dead or v in viewed or len(after) == 1:
                continue
            parent = after[v]
            children = [c for c, p in after.items() if p == v]
            if parent is None and len(children) != 1:
                kept.append(v)  # a root with no or two children: another look after
                continue
            for c in children:
                after[c] = parent
            del after[v]
            dropped.append(v)
        if len(kept) == len(left):
            return dropped, after
        left = kept


#: At most this many ids in one ``IN`` list: asyncpg takes at most 32767 parameters
#: a statement, and thousands of trees may report a version at 0 at once.
IN_CHUNK = 1000


def _in_chunks(ids: Iterable[int]) -> list[list[int]]:
    ordered = sorted(ids)
    return [ordered[i : i + IN_CHUNK] for i in range(0, len(ordered), IN_CHUNK)]


class _Drop:
    """What one tree drops: its pool, its versions' parents before and after."""

    __slots__ = ("after", "before", "gone", "pool_id")

    def __init__(
        self,
        pool_id: int,
        before: dict[int, int | None],
        gone: list[int],
        after: dict[int, int | None],
    ) -> None:
        self.pool_id = pool_id
        self.before = before
        self.gone = gone
        self.after = after


async def _plan(
    session: AsyncSession, reports: TreeGcReports, only: Iterable[int] | None = None
) -> dict[int, _Drop]:
    """Per tree (of ``only``, if given) with a version to drop, what it drops; reads
    only (nothing while no SDS reports a version at 0), its ``IN`` lists in chunks of
    :data:`IN_CHUNK`."""
    freed = reports.freed_somewhere()
    if only is not None:
        keep = set(only)
        freed = {t: v for t, v in freed.items() if t in keep}
    if not freed:
        return {}
    pools: dict[int, int] = {}
    versions: dict[int, dict[int, int | None]] = {}
    dead: dict[int, set[int]] = {}
    for chunk in _in_chunks(freed):
        for pool_id, tree_id, version, parent, state in await session.execute(
            select(
                Vtree.pool_id,
                VtreeVersion.vtree_id,
                VtreeVersion.version,
                VtreeVersion.parent,
                VtreeVersion.state,
            )
            .join(Vtree, Vtree.id == VtreeVersion.vtree_id)
            .where(VtreeVersion.vtree_id.in_(chunk))
        ):
            pools[tree_id] = pool_id
            versions.setdefault(tree_id, {})[int(version)] = None if parent is None else int(parent)
            if state == VtreeVersionState.DEAD:
                dead.setdefault(tree_id, set()).add(int(version))
    if not dead:
        return {}
    viewed: dict[int, set[int]] = {}
    for chunk in _in_chunks(dead):
        for tree_id, view in await session.execute(
            select(Volume.vtree_id, Volume.view_version)
            .where(Volume.vtree_id.in_(chunk), Volume.state == VolumeState.ACTIVE)
            .distinct()
        ):
            viewed.setdefault(tree_id, set()).add(int(view))
    members: dict[int, set[int]] = {}
    for chunk in _in_chunks({pools[t] for t in dead}):
        for pool_id, sds_id in await session.execute(
            select(Device.pool_id, Device.sds_id).where(Device.pool_id.in_(chunk))
        ):
            members.setdefault(pool_id, set()).add(sds_id)
    out: dict[int, _Drop] = {}
    for tree_id in sorted(dead):
        sds = members.get(pools[tree_id], set())
        everywhere = [
            v for v in freed[tree_id] if all(reports.freed_by(i, tree_id, v) for i in sds)
        ]
        gone, after = droppable(
            versions[tree_id], dead[tree_id], viewed.get(tree_id, set()), everywhere
        )
        if gone:
            out[tree_id] = _Drop(pools[tree_id], versions[tree_id], gone, after)
    return out


async def collectable(session: AsyncSession, reports: TreeGcReports) -> list[int]:
    """The trees that have a version to drop now (reads only: the purge loop looks in
    a read transaction and enters a write one only for these, see
    :func:`drop_collected`)."""
    return sorted(await _plan(session, reports))


async def drop_collected(
    session: AsyncSession, reports: TreeGcReports, only: Iterable[int] | None = None
) -> list[tuple[int, int]]:
    """Remove the records of the dead versions every SDS with a device in the tree's
    pool reports holding no slot of (its newest pass over the tree done), re-parent
    their children, and move those pools' map epochs (the maps drop the versions).
    Returns the (tree, version) pairs dropped. Reads nothing unless some SDS's report
    has such a version; ``only``: the trees :func:`collectable` found, looked at again
    here (in the write transaction) before anything is dropped."""
    out: list[tuple[int, int]] = []
    moved: set[int] = set()
    for tree_id, drop in (await _plan(session, reports, only)).items():
        for version, parent in drop.after.items():
            if drop.before[version] != parent:
                await session.execute(
                    update(VtreeVersion)
                    .where(VtreeVersion.vtree_id == tree_id, VtreeVersion.version == version)
                    .values(parent=parent)
                )
        await session.execute(
            delete(VtreeVersion).where(
                VtreeVersion.vtree_id == tree_id, VtreeVersion.version.in_(drop.gone)
            )
        )
        moved.add(drop.pool_id)
        out += [(tree_id, v) for v in drop.gone]
        log.info(
            "tree %d of pool %d: versions %s dropped, every SDS of the pool holds nothing of them",
            tree_id,
            drop.pool_id,
            ", ".join(map(str, drop.gone)),
        )
    for pool_id in sorted(moved):
        await session.execute(
            update(StoragePool)
            .where(StoragePool.id == pool_id)
            .values(map_epoch=StoragePool.map_epoch + 1)
        )
    return out
