"""Volume trees, step 1 (docs/snapshots.md, "Plan"): every volume has a tree id, its
own id unless it is a snapshot or a clone, and placement hashes the tree id, so a
volume that exists is placed exactly where it always was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from meshblock.chunks import CHUNK_SIZE, pg_of, pgs_of_volume
from meshblock.mdm.health import ACTIVE_VOLUME_PLACEMENT, degraded_volumes_of
from meshblock.mdm.models import (
    Base,
    ProtectionDomain,
    StoragePool,
    Volume,
    VolumeState,
    VolumeType,
)

pytestmark = pytest.mark.unit

# (volume id, chunk, pg_count) -> PG, computed by the placement that hashed the volume
# id (before trees): a volume that is its own tree must keep every chunk there.
PLACED_BY_VOLUME_ID = {
    (1, 0, 256): 229,
    (1, 1, 256): 230,
    (2, 0, 256): 138,
    (7, 12, 256): 32,
    (42, 1000, 4096): 2570,
    (1234567, 3, 64): 27,
    (2**31 - 1, 2**20, 16384): 11660,
    (99, 0, 2): 1,
}
SPANS_BY_VOLUME_ID = {
    (1, 2**30, 256): (229, 256),
    (7, 5 * CHUNK_SIZE + 1, 4096): (3860, 6),
    (123456, 2**40, 512): (280, 512),
}


def test_placement_of_a_volume_that_is_its_own_tree_is_unchanged() -> None:
    for (volume, chunk, count), pg in PLACED_BY_VOLUME_ID.items():
        assert pg_of(volume, chunk, count) == pg, (volume, chunk, count)
    for (volume, size, count), span in SPANS_BY_VOLUME_ID.items():
        assert pgs_of_volume(volume, size, count) == span, (volume, size, count)


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        pd = ProtectionDomain(name="pd1")
        s.add(pd)
        s.flush()
        s.add(
            StoragePool(name="sp1", protection_domain_id=pd.id, allocation_granularity_bytes=2**30)
        )
        s.flush()
        yield s
    engine.dispose()


def _volume(s: Session, name: str, vtree_id: int | None = None) -> Volume:
    pool = s.scalars(select(StoragePool)).one()
    v = Volume(name=name, pool_id=pool.id, type=VolumeType.THIN, size_bytes=2**30)
    if vtree_id is not None:
        v.vtree_id = vtree_id
    s.add(v)
    s.flush()
    return v


def test_a_new_volume_is_its_own_tree(session: Session) -> None:
    """Inserted without a tree, a volume's vtree_id is its id, in the flush that
    inserts it (in memory and in the database); one given a tree keeps it."""
    first = _volume(session, "a")
    second = _volume(session, "b")
    assert (first.vtree_id, second.vtree_id) == (first.id, second.id)
    in_tree = _volume(session, "a-snap", vtree_id=first.id)  # as a snapshot will be
    session.commit()
    session.expire_all()
    rows = session.execute(select(Volume.id, Volume.vtree_id).order_by(Volume.id)).all()
    assert [tuple(r) for r in rows] == [
        (first.id, first.id),
        (second.id, second.id),
        (in_tree.id, first.id),
    ]


def test_the_mdm_places_a_volume_by_its_tree(session: Session) -> None:
    """The health report's degraded volumes: a volume whose tree differs from its id
    (a snapshot, later) is degraded by the PGs of its tree, not of its id."""
    tree = _volume(session, "src")
    _volume(session, "src-snap", vtree_id=tree.id)  # a one-chunk-wide PG span each
    for v in session.scalars(select(Volume)):
        v.size_bytes = CHUNK_SIZE
    deleting = _volume(session, "gone")
    deleting.state = VolumeState.DELETING
    session.commit()
    rows = session.execute(ACTIVE_VOLUME_PLACEMENT).all()
    assert sorted(tuple(r) for r in rows) == [(tree.id, 1, CHUNK_SIZE)] * 2
    count = 4096
    snap = session.scalars(select(Volume).where(Volume.name == "src-snap")).one()
    assert pg_of(tree.id, 0, count) != pg_of(snap.id, 0, count)
    by_tree = [(1, pg_of(tree.id, 0, count))]
    assert degraded_volumes_of(by_tree, rows, {1: count}) == {1: 2}
    by_snapshot_id = [(1, pg_of(snap.id, 0, count))]
    assert degraded_volumes_of(by_snapshot_id, rows, {1: count}) == {}
