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
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.models import Volume, VolumeState, Vtree, VtreeVersion

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
