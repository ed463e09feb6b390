"""The MDM's records of volume trees in its pool maps (docs/snapshots.md, "The MDM's
records"; ``meshblock.mdm.vtrees``), in process on SQLite with the rows written
directly (nothing creates snapshots yet): a map lists the trees with more than one
volume or version in the shape the SDS and the SDC parse, in the whole document and in
the head of every delta; a pool without such trees gets, byte for byte, the document
of the release before trees; and a build reads the trees of all its pools in one
statement, searching the volumes by tree (no statement, no scan per volume)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock import pgmap_delta, pgmap_doc
from meshblock.mdm import pgmaps, pgtable
from meshblock.mdm.db import create_engine, migrate, session_factory
from meshblock.mdm.models import (
    Device,
    PgState,
    ProtectionDomain,
    Sds,
    StoragePool,
    Volume,
    VolumeState,
    VolumeType,
)
from meshblock.mdm.pgmaps import MapCache
from meshblock.mdm.pgtable import PgChange, PgRow

pytestmark = pytest.mark.unit

# sha256 of the map bodies of ``populate``'s two pools (term 0, then term 3), built by
# the MDM of the release before trees (commit 22874c3, ``print_pins`` below run with
# that release's daemons on PYTHONPATH): without tree records the documents must not
# change by one byte.
PINNED = {
    (1, 0): "4f60281cad659a96ecbdecdfba865439dd1314836f7d9c602c562783e250f1ba",
    (2, 0): "12b5d87348c613c645347c50f20fb58d3d409a55aceb7381b87c1fe839260c14",
    (1, 3): "9982d28b9b05809057aec37bd1b2c84b4ce6926d15a72726c29c4267859c4fc6",
    (2, 3): "1ebf3bbb8426f873b2b69ef1fcebd89867b1954c561b539c65a8c27782a47d00",
}


def in_session(tmp: Path, fn: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp / 'mdm.db'}")
        try:
            await migrate(engine)
            async with session_factory(engine)() as s, s.begin():
                return await fn(s)
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def populate(s: AsyncSession) -> tuple[list[StoragePool], list[int]]:
    """Two pools of 4 PGs over a device on each of two SDSs; pool 1 with five
    volumes, one of them deleting (a tombstone), pool 2 with one. Only the columns of
    the release before trees are set. Returns the pools and the volume ids."""
    pd = ProtectionDomain(name="pd")
    s.add(pd)
    await s.flush()
    pools = []
    for n in (1, 2):
        pool = StoragePool(
            name=f"p{n}",
            protection_domain_id=pd.id,
            pg_count=4,
            allocation_granularity_bytes=1 << 30,
        )
        s.add(pool)
        await s.flush()
        pools.append(pool)
    devices: dict[int, list[int]] = {p.id: [] for p in pools}
    for n in range(2):
        sds = Sds(
            name=f"sds{n}", protection_domain_id=pd.id, address="127.0.0.1", data_port=7000 + n
        )
        s.add(sds)
        await s.flush()
        for pool in pools:
            dev = Device(
                sds_id=sds.id, pool_id=pool.id, path=f"/d{pool.id}", capacity_bytes=1 << 30
            )
            s.add(dev)
            await s.flush()
            devices[pool.id].append(dev.id)
    for pool in pools:
        a, b = devices[pool.id]
        await pgtable.write(
            s, pool, [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
        )
    volumes = []
    for name in ("db", "db-mon", "db-tue", "test", "gone"):
        v = Volume(name=name, pool_id=pools[0].id, type=VolumeType.THIN, size_bytes=1 << 30)
        s.add(v)
        await s.flush()
        volumes.append(v.id)
    other = Volume(name="other", pool_id=pools[1].id, type=VolumeType.THIN, size_bytes=1 << 30)
    s.add(other)
    await s.flush()
    volumes.append(other.id)
    pools[0].map_epoch += 1  # as DELETE /volumes/{id} does
    await s.execute(
        update(Volume)
        .where(Volume.id == volumes[4])
        .values(state=VolumeState.DELETING, deleted_epoch=pools[0].map_epoch)
    )
    await s.flush()
    return pools, volumes


async def bodies(s: AsyncSession, pools: list[StoragePool], term: int) -> dict[int, bytes]:
    docs = await pgmaps.map_documents(s, pools, MapCache(term))
    return {i: d.body for i, d in docs.items()}


def sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def print_pins(tmp: Path) -> None:  # pragma: no cover - run by hand to make PINNED
    async def go(s: AsyncSession) -> None:
        pools, _ = await populate(s)
        for term in (0, 3):
            for pool_id, body in (await bodies(s, pools, term)).items():
                print(f"    ({pool_id}, {term}): {sha(body)!r},")

    in_session(tmp, go)


async def add_tree(
    s: AsyncSession,
    pool_id: int,
    tree_id: int,
    versions: dict[int, int | None],
    *,
    next_version: int | None = None,
    dead: tuple[int, ...] = (),
) -> None:
    from meshblock.mdm.models import Vtree, VtreeVersion, VtreeVersionState

    s.add(Vtree(id=tree_id, pool_id=pool_id, next_version=next_version or len(versions)))
    await s.flush()
    for version, parent in versions.items():
        s.add(
            VtreeVersion(
                vtree_id=tree_id,
                version=version,
                parent=parent,
                state=VtreeVersionState.DEAD if version in dead else VtreeVersionState.LIVE,
                created_epoch=1,
                dead_epoch=1 if version in dead else None,
            )
        )
    await s.flush()


async def set_view(
    s: AsyncSession, volume_id: int, tree_id: int, view: int, writable: bool
) -> None:
    await s.execute(
        update(Volume)
        .where(Volume.id == volume_id)
        .values(vtree_id=tree_id, view_version=view, writable=writable, source_volume_id=tree_id)
    )


def test_without_tree_records_the_documents_are_those_of_before_trees(tmp_path: Path) -> None:
    """No rows in ``vtrees``: each pool's document is, byte for byte, the one the MDM
    of the release before trees built (pinned digests), with and without a leader
    term. A tree of one recorded all the same (version 0 alone, read and written by
    the volume whose id is the tree's) says nothing, and changes nothing either."""

    async def go(s: AsyncSession) -> None:
        pools, volumes = await populate(s)
        for term in (0, 3):
            built = await bodies(s, pools, term)
            assert {(i, term): sha(b) for i, b in built.items()} == {
                k: v for k, v in PINNED.items() if k[1] == term
            }
            assert all(b"trees" not in b for b in built.values())
        await add_tree(s, pools[0].id, volumes[0], {0: None})
        for term in (0, 3):
            built = await bodies(s, pools, term)
            assert {(i, term): sha(b) for i, b in built.items()} == {
                k: v for k, v in PINNED.items() if k[1] == term
            }

    in_session(tmp_path, go)


def picture_tree(volumes: list[int]) -> dict[str, Any]:
    """The tree of docs/snapshots.md, "A tree", as the map must carry it: ``db`` writes
    2, ``db-mon`` reads 0, ``db-tue`` reads 1, the clone ``test`` writes 4 (its
    snapshot ``test-a`` left out: 3 is read by nobody, a dead version the SDSs free),
    and ``gone`` (deleting) is not listed whatever its view."""
    db, mon, tue, test, _gone, _ = volumes
    return {
        "versions": {"0": None, "1": 0, "2": 1, "3": 0, "4": 3},
        "volumes": {
            str(db): {"view": 2, "writable": True},
            str(mon): {"view": 0, "writable": False},
            str(tue): {"view": 1, "writable": False},
            str(test): {"view": 4, "writable": True},
        },
    }


async def record_picture(s: AsyncSession, pools: list[StoragePool], volumes: list[int]) -> None:
    db, mon, tue, test, gone, _ = volumes
    await add_tree(s, pools[0].id, db, {0: None, 1: 0, 2: 1, 3: 0, 4: 3}, dead=(3,))
    for vid, view, writable in [
        (db, 2, True),
        (mon, 0, False),
        (tue, 1, False),
        (test, 4, True),
        (gone, 3, False),
    ]:
        await set_view(s, vid, db, view, writable)
    pools[0].map_epoch += 1
    await s.flush()


def test_a_map_carries_its_pools_trees_as_the_sds_and_the_sdc_parse_them(tmp_path: Path) -> None:
    """Rows written as a snapshot would: the pool's document lists the tree, every
    version (live or dead) with its parent and every active volume with its view; the
    shared parser, the SDS's map and the SDC's map accept it and give it back; the
    other pool's document is unchanged."""
    from meshblock.sdc.maps import parse_pool
    from meshblock.sds.maps import PgMap

    async def go(s: AsyncSession) -> None:
        pools, volumes = await populate(s)
        before = await bodies(s, pools, 0)
        await record_picture(s, pools, volumes)
        docs = await pgmaps.map_documents(s, pools, MapCache())
        db = volumes[0]
        doc = json.loads(docs[pools[0].id].body)  # as a caller has it
        assert doc["trees"] == {str(db): picture_tree(volumes)}
        assert list(doc)[-1] == "trees"
        assert docs[pools[1].id].body == before[pools[1].id]

        parsed = pgmap_doc.parse(doc)
        assert parsed.to_doc()["trees"] == doc["trees"]
        tree = parsed.trees[db]
        assert tree.versions == {0: None, 1: 0, 2: 1, 3: 0, 4: 3}
        assert parsed.read_only_volumes() == {volumes[1], volumes[2]}
        sds_map = PgMap.from_doc(doc)
        assert sds_map.trees[db].unread() == [3]  # what the SDSs' garbage pass frees
        assert sds_map.read_only == {volumes[1], volumes[2]}
        assert parse_pool(doc).read_only == {volumes[1], volumes[2]}

    in_session(tmp_path, go)


def test_trees_travel_whole_in_the_head_of_every_delta(tmp_path: Path) -> None:
    """Maps served before the tree, with it, with it changed and after it goes: from
    every epoch served before, the delta to the newest map carries the newest
    ``trees`` whole in its head (none once the tree is gone), and applied to that
    epoch's document (as the caller has it, through JSON) makes the MDM's map and
    matches its digest."""
    from sqlalchemy import delete

    from meshblock.mdm.models import Vtree, VtreeVersion

    async def go(s: AsyncSession) -> None:
        pools, volumes = await populate(s)
        pool = pools[0]
        cache = MapCache()
        served: dict[int, dict[str, Any]] = {}

        async def serve_and_check() -> dict[str, Any]:
            newest = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
            doc: dict[str, Any] = json.loads(newest.body)
            served[newest.epoch] = doc
            for since in [e for e in served if e < newest.epoch]:
                delta = cache.delta(pool.id, since, newest)
                assert delta is not None, since
                head = json.loads(delta.body)
                assert head.get("trees") == doc.get("trees"), since
                assert pgmap_delta.apply(served[since], head) == doc, since
            return doc

        assert "trees" not in await serve_and_check()
        await record_picture(s, pools, volumes)
        assert (await serve_and_check())["trees"] == {str(volumes[0]): picture_tree(volumes)}
        # test (head 4) gets a new head 5; 4 is read by nobody now
        s.add(VtreeVersion(vtree_id=volumes[0], version=5, parent=4, created_epoch=2))
        await set_view(s, volumes[3], volumes[0], 5, True)
        pool.map_epoch += 1
        await s.flush()
        tree = (await serve_and_check())["trees"][str(volumes[0])]
        assert tree["versions"]["5"] == 4 and tree["volumes"][str(volumes[3])]["view"] == 5
        # the tree's records go: the map lists no tree any more
        await s.execute(delete(VtreeVersion))
        await s.execute(delete(Vtree))
        pool.map_epoch += 1
        await s.flush()
        assert "trees" not in await serve_and_check()
        assert len(served) == 4

    in_session(tmp_path, go)


def test_a_build_reads_the_trees_of_all_its_pools_in_one_statement(tmp_path: Path) -> None:
    """A build of both pools' maps, 200 volumes and two trees among them, runs one
    statement that reads tree records, whatever the number of volumes, and SQLite's
    plan finds the volumes reading a version of a tree through ``ix_volumes_vtree_view``
    by both columns (no scan of every volume, nor of every volume of a tree, per
    build)."""
    from meshblock.mdm import vtrees

    async def go(s: AsyncSession) -> None:
        pools, volumes = await populate(s)
        for n in range(200):
            s.add(Volume(name=f"x{n}", pool_id=pools[n % 2].id, type=VolumeType.THIN, size_bytes=1))
        await record_picture(s, pools, volumes)
        await add_tree(s, pools[1].id, volumes[5], {0: None, 1: 0})
        await set_view(s, volumes[5], volumes[5], 1, True)
        await s.flush()
        conn = await s.connection()
        statements: list[str] = []

        def seen(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
            statements.append(sql)

        event.listen(conn.sync_connection, "before_cursor_execute", seen)
        try:
            docs = await pgmaps.map_documents(s, pools, MapCache())
        finally:
            event.remove(conn.sync_connection, "before_cursor_execute", seen)
        assert [str(t) for t in docs[pools[1].id].doc["trees"]] == [str(volumes[5])]
        assert len(docs[pools[0].id].doc["trees"]) == 1
        tree_reads = [q for q in statements if "vtree" in q.replace("vtree_id", "")]
        assert len(tree_reads) == 1, tree_reads

        sql = vtrees._TREE_ROWS.params(pool_ids=[1, 2]).compile(
            dialect=conn.dialect, compile_kwargs={"literal_binds": True}
        )
        plan = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
        steps = " | ".join(str(r[-1]) for r in plan)
        assert (
            "volumes USING INDEX ix_volumes_vtree_view (vtree_id=? AND view_version=?)" in steps
        ), steps

    in_session(tmp_path, go)


# -- dropping a version every SDS of the pool holds nothing of ---------------------------


def gc_pass(tree: int, state: str, unread: dict[int, int]) -> dict[str, Any]:
    """One SDS's garbage pass over a tree, as the MDM keeps it from a heartbeat."""
    return {
        "tree_id": tree,
        "pool_id": 1,
        "state": state,
        "chunks": 4,
        "chunks_done": 4 if state == "done" else 1,
        "blocks_freed": 0,
        "slots_freed": 0,
        "collapsed": 0,
        "unread_slots": unread,
    }


def test_which_versions_a_tree_drops() -> None:
    """Only dead versions nobody views; children take the parent; a root goes only
    with one child (it becomes the root); the last version stays."""
    from meshblock.mdm.vtrees import droppable

    picture = {0: None, 1: 0, 2: 1, 3: 0, 4: 3}
    assert droppable(picture, {3}, {0, 1, 2, 4}, [3]) == ([3], {0: None, 1: 0, 2: 1, 4: 0})
    assert droppable(picture, set(), {0, 1, 2, 4}, [3]) == ([], picture)  # live
    assert droppable(picture, {3}, {3}, [3]) == ([], picture)  # viewed
    assert droppable(picture, {0}, set(), [0]) == ([], picture)  # a root of two
    chain = {0: None, 1: 0, 2: 1}
    assert droppable(chain, {0, 1}, {2}, [1, 0]) == ([0, 1], {2: None})
    assert droppable({5: None}, {5}, set(), [5]) == ([], {5: None})


def test_a_root_left_with_one_child_by_a_later_drop_goes_in_the_same_look() -> None:
    """The root 0 has two children when its turn comes; its dead child 1 goes after it
    in ascending order, leaving it one child: it goes in the same look, not only once
    the reports change again (they may never)."""
    from meshblock.mdm.vtrees import droppable

    assert droppable({0: None, 1: 0, 2: 0}, {0, 1}, {2}, [0, 1]) == ([1, 0], {2: None})
    # the root's children 1 and 4 and 1's child 2 all go after it: it goes last
    tree = {0: None, 1: 0, 2: 1, 3: 1, 4: 0}
    assert droppable(tree, {0, 1, 4, 2}, {3}, [0, 1, 2, 4]) == ([1, 2, 4, 0], {3: None})


def test_a_dead_version_goes_once_every_sds_of_the_pool_reports_none_of_it(
    tmp_path: Path,
) -> None:
    """Version 3 of the picture's tree is dead (test-a deleted) and collapsed into 4:
    nothing happens while one SDS's pass runs or still holds slots of it; once both
    SDSs of the pool report 0 from a finished pass the row goes, 4 takes 3's parent,
    and the pool's map moves to a new epoch without it (the other pool's does not)."""
    from sqlalchemy import select

    from meshblock.mdm.models import VtreeVersion
    from meshblock.mdm.snapshot_gc import TreeGcReports
    from meshblock.mdm.vtrees import drop_collected

    async def go(s: AsyncSession) -> None:
        pools, volumes = await populate(s)
        await record_picture(s, pools, volumes)
        tree = volumes[0]
        a, b = sorted({d for (d,) in await s.execute(select(Device.sds_id))})
        reports = TreeGcReports()

        async def drop() -> list[tuple[int, int]]:
            epochs = [p.map_epoch for p in pools]
            dropped = await drop_collected(s, reports)
            for p in pools:
                await s.refresh(p)
            moved = [p.map_epoch - e for p, e in zip(pools, epochs, strict=True)]
            assert moved == [1 if dropped else 0, 0]
            return dropped

        assert await drop() == []  # no report at all
        reports.report(a, [gc_pass(tree, "done", {3: 0})])
        reports.report(b, [gc_pass(tree, "running", {3: 0})])
        assert await drop() == []
        reports.report(b, [gc_pass(tree, "done", {3: 2})])
        assert await drop() == []
        # a version a volume views (1: db-tue's), live, is never dropped
        reports.report(a, [gc_pass(tree, "done", {3: 0, 1: 0})])
        reports.report(b, [gc_pass(tree, "done", {3: 0, 1: 0})])
        assert await drop() == [(tree, 3)]
        rows = await s.execute(
            select(VtreeVersion.version, VtreeVersion.parent).where(VtreeVersion.vtree_id == tree)
        )
        assert dict(rows.all()) == {0: None, 1: 0, 2: 1, 4: 0}
        assert await drop() == []  # the reports still say 3: there is no 3 any more
        doc = (await pgmaps.map_documents(s, pools, MapCache()))[pools[0].id].doc
        assert pgmap_doc.parse(json.loads(pgmaps.encode(doc))).trees[tree].versions == {
            0: None,
            1: 0,
            2: 1,
            4: 0,
        }

    in_session(tmp_path, go)


def test_the_purger_drops_a_freed_version_and_publishes_the_epoch(tmp_path: Path) -> None:
    """The MDM's purge loop drops the version in its own transaction and publishes the
    new cluster epoch (the SDSs' map long-polls wake); a pass while the reports have not
    changed reads nothing."""
    import contextlib
    from collections.abc import AsyncIterator

    from sqlalchemy import select

    from meshblock.mdm.deletion import Purger, TombstoneReports
    from meshblock.mdm.epochs import CLUSTER_ROW_ID, EpochNotifier
    from meshblock.mdm.models import Cluster, VtreeVersion
    from meshblock.mdm.reconcile import Reported
    from meshblock.mdm.snapshot_gc import TreeGcReports

    @contextlib.asynccontextmanager
    async def gate() -> AsyncIterator[None]:
        yield

    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
        try:
            await migrate(engine)
            sessions = session_factory(engine)
            async with sessions() as s, s.begin():
                s.add(Cluster(id=CLUSTER_ROW_ID, name="c", epoch=1))
                pools, volumes = await populate(s)
                await record_picture(s, pools, volumes)
                sds = {d for (d,) in await s.execute(select(Device.sds_id))}
                pool_id, epoch, tree = pools[0].id, pools[0].map_epoch, volumes[0]
            reports = TreeGcReports()
            for i in sds:
                reports.report(i, [gc_pass(tree, "done", {3: 0})])
            notifier = EpochNotifier(1)
            purger = Purger(
                sessions,
                cast(Any, gate),
                notifier,
                TombstoneReports(),
                Reported(),
                reports,
            )
            await purger.once()
            assert notifier.epoch == 2
            async with sessions() as s:
                assert (await s.get(StoragePool, pool_id)).map_epoch == epoch + 1  # type: ignore[union-attr]
                versions = await s.execute(
                    select(VtreeVersion.version).where(VtreeVersion.vtree_id == tree)
                )
                assert sorted(versions.scalars()) == [0, 1, 2, 4]
            statements: list[str] = []

            def seen(_c: Any, _cur: Any, sql: str, *_: Any) -> None:
                statements.append(sql)

            event.listen(engine.sync_engine, "before_cursor_execute", seen)
            await purger.once()
            event.remove(engine.sync_engine, "before_cursor_execute", seen)
            assert not [q for q in statements if "vtree" in q], statements
            assert notifier.epoch == 2
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_the_purger_writes_only_for_a_tree_it_can_drop_from_and_reads_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions at 0 that cannot be dropped (live, or a tree without records) are
    looked at in a read transaction: the purge loop enters no write transaction for
    them (each one takes the write gate and the fence's UPDATE). Reports naming 2500
    trees are read with IN lists of at most 1000 ids (asyncpg takes at most 32767
    parameters a statement), and a droppable tree among them is still found."""
    import contextlib
    from collections.abc import AsyncIterator

    from sqlalchemy import select

    from meshblock.mdm import deletion, leader, vtrees
    from meshblock.mdm.deletion import Purger, TombstoneReports
    from meshblock.mdm.epochs import CLUSTER_ROW_ID, EpochNotifier
    from meshblock.mdm.models import Cluster, VtreeVersion
    from meshblock.mdm.reconcile import Reported
    from meshblock.mdm.snapshot_gc import TreeGcReports

    @contextlib.asynccontextmanager
    async def gate() -> AsyncIterator[None]:
        yield

    writes: list[int] = []
    plain_writing = leader.writing

    @contextlib.asynccontextmanager
    async def counted(*args: Any) -> AsyncIterator[AsyncSession]:
        writes.append(1)
        async with plain_writing(*args) as s:
            yield s

    monkeypatch.setattr(deletion, "writing", counted)

    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
        try:
            await migrate(engine)
            sessions = session_factory(engine)
            async with sessions() as s, s.begin():
                s.add(Cluster(id=CLUSTER_ROW_ID, name="c", epoch=1))
                pools, volumes = await populate(s)
                await record_picture(s, pools, volumes)
                sds = {d for (d,) in await s.execute(select(Device.sds_id))}
                tree = volumes[0]
            reports = TreeGcReports()
            notifier = EpochNotifier(1)
            purger = Purger(
                sessions, cast(Any, gate), notifier, TombstoneReports(), Reported(), reports
            )
            await purger.once()
            baseline = len(writes)  # no report: the tombstones' reconcile and purge
            for i in sds:  # 1 is live (and viewed): at 0, but it stays
                reports.report(i, [gc_pass(tree, "done", {1: 0, 3: 2})])
            writes.clear()
            await purger.once()
            assert len(writes) == baseline, "a write transaction for nothing to drop"
            reports.report(min(sds), [gc_pass(tree, "done", {1: 0, 3: 0})])  # one SDS only
            writes.clear()
            await purger.once()
            assert len(writes) == baseline, "a write transaction for nothing to drop"

            many = [gc_pass(t, "done", {1: 0}) for t in range(100_000, 102_500)]
            for i in sds:
                reports.report(i, [*many, gc_pass(tree, "done", {3: 0})])
            params: list[int] = []

            def seen(_c: Any, _cur: Any, sql: str, parameters: Any, *_: Any) -> None:
                if "vtree" in sql:
                    params.append(len(parameters))

            event.listen(engine.sync_engine, "before_cursor_execute", seen)
            writes.clear()
            await purger.once()
            event.remove(engine.sync_engine, "before_cursor_execute", seen)
            assert len(writes) == baseline + 1
            assert params and max(params) <= vtrees.IN_CHUNK + 2, params
            assert notifier.epoch == 2
            async with sessions() as s:
                versions = await s.execute(
                    select(VtreeVersion.version).where(VtreeVersion.vtree_id == tree)
                )
                assert sorted(versions.scalars()) == [0, 1, 2, 4]
        finally:
            await engine.dispose()

    asyncio.run(main())
