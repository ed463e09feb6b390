"""PG-map documents built once per map epoch (``meshblock.mdm.pgmaps.MapCache``),
in process on SQLite: a second request at the same map epoch costs no build, a change
of the cluster alone (a volume) keeps the document, a new map epoch replaces it, and a
document whose pool moved on while it was built is served but not kept."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

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
from meshblock.mdm.pgmaps import MapCache, MapDocument, MapEpochs
from meshblock.mdm.pgtable import PgChange, PgRow

pytestmark = pytest.mark.unit


def in_session(tmp: Path, fn: Callable[[AsyncSession], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp / 'mdm.db'}")
        try:
            await migrate(engine)
            async with session_factory(engine)() as s, s.begin():
                await fn(s)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def new_pool(s: AsyncSession) -> tuple[StoragePool, list[int]]:
    """A pool of 4 PGs over a device on each of two SDSs."""
    pd = ProtectionDomain(name="pd")
    s.add(pd)
    await s.flush()
    pool = StoragePool(
        name="p", protection_domain_id=pd.id, pg_count=4, allocation_granularity_bytes=1 << 30
    )
    s.add(pool)
    await s.flush()
    devices = []
    for n in range(2):
        sds = Sds(
            name=f"sds{n}", protection_domain_id=pd.id, address="127.0.0.1", data_port=7000 + n
        )
        s.add(sds)
        await s.flush()
        dev = Device(sds_id=sds.id, pool_id=pool.id, path="/d", capacity_bytes=1 << 30)
        s.add(dev)
        await s.flush()
        devices.append(dev.id)
    a, b = devices
    await pgtable.write(
        s, pool, [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
    )
    return pool, devices


def test_a_document_is_built_once_per_map_epoch(tmp_path: Path) -> None:
    async def go(s: AsyncSession) -> None:
        pool, _ = await new_pool(s)
        cache = MapCache()
        first = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert first.epoch == pool.map_epoch == first.doc["epoch"]
        assert pgmaps.encode(first.doc) == first.body
        # a change of the cluster that is not one of the map: same document
        s.add(Volume(name="v", pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 30))
        await s.flush()
        again = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert again is first and cache.builds == 1
        # a new map epoch: a new document, with the change
        rows = await pgtable.load(s, pool_id=pool.id)
        await pgtable.write(s, pool, [PgChange(rows[2], replace(rows[2], state=PgState.DEGRADED))])
        new = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert cache.builds == 2
        assert new.epoch == first.epoch + 1 == new.doc["epoch"]
        assert [pg["state"] for pg in new.doc["pgs"]] == ["clean", "clean", "degraded", "clean"]
        assert cache.get(pool.id, first.epoch) is None
        assert cache.get(pool.id, new.epoch) is new

    in_session(tmp_path, go)


def test_the_pgs_part_is_reused_while_the_pg_rows_are_the_same(tmp_path: Path) -> None:
    """A volume deleted is a new map epoch (its tombstone) but no PG row changes: the
    new document reuses the PGs' part of the previous one; a PG row changed is built
    again. Either way the document is the same bytes as encoding it whole."""

    async def go(s: AsyncSession) -> None:
        pool, _ = await new_pool(s)
        cache = MapCache()
        first = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        v = Volume(name="v", pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 30)
        s.add(v)
        pool.map_epoch += 1  # as DELETE /volumes/{id} does
        v.state, v.deleted_epoch = VolumeState.DELETING, pool.map_epoch
        await s.flush()
        deleted = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert deleted.doc["tombstones"] == {str(v.id): pool.map_epoch}
        assert deleted.doc["pgs"] is first.doc["pgs"]
        assert deleted.body == pgmaps.encode(deleted.doc)
        assert {k: x for k, x in deleted.doc.items() if k not in ("epoch", "tombstones")} == {
            k: x for k, x in first.doc.items() if k not in ("epoch", "tombstones")
        }
        rows = await pgtable.load(s, pool_id=pool.id)
        await pgtable.write(s, pool, [PgChange(rows[0], replace(rows[0], state=PgState.DEGRADED))])
        changed = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert changed.doc["pgs"] is not first.doc["pgs"]
        assert changed.doc["pgs"][0]["state"] == "degraded"
        assert changed.body == pgmaps.encode(changed.doc)

    in_session(tmp_path, go)


def test_changed_pg_rows_are_patched_into_the_previous_part(tmp_path: Path) -> None:
    """A new map epoch that changed some PG rows reads only those rows and patches
    them into the previous PGs' part: the other entries are the same objects, and the
    document is the one a build from scratch makes (and its body that one's JSON)."""

    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s)
        cache = MapCache()
        first = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        rows = await pgtable.load(s, pool_id=pool.id)
        changes = [
            PgChange(rows[1], replace(rows[1], state=PgState.DEGRADED)),
            PgChange(rows[3], replace(rows[3], primary=b, secondary=a, target=a, moving="primary")),
        ]
        await pgtable.write(s, pool, changes)
        patched = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        fresh = (await pgmaps.map_documents(s, [pool]))[pool.id]
        assert patched.doc == fresh.doc and patched.body == fresh.body == pgmaps.encode(fresh.doc)
        assert patched.doc["pgs"][1]["state"] == "degraded"
        assert patched.doc["pgs"][3]["moving"] == "primary"
        for n in (0, 2):  # unchanged: shared with the previous document
            assert patched.doc["pgs"][n] is first.doc["pgs"][n]
        assert patched.doc["pgs"][1] is not first.doc["pgs"][1]

    in_session(tmp_path, go)


def test_a_document_whose_pool_moved_on_while_it_was_built_is_not_kept(tmp_path: Path) -> None:
    async def go(s: AsyncSession) -> None:
        pool, _ = await new_pool(s)
        read_at = pool.map_epoch
        # another transaction publishes a new map after this request read the pool
        await s.execute(
            update(StoragePool)
            .where(StoragePool.id == pool.id)
            .values(map_epoch=StoragePool.map_epoch + 1)
            .execution_options(synchronize_session=False)
        )
        cache = MapCache()
        served = (await pgmaps.map_documents(s, [pool], cache))[pool.id]
        assert served.epoch == read_at
        assert cache.get(pool.id, read_at) is None

    in_session(tmp_path, go)


def test_an_older_document_never_replaces_a_newer_one() -> None:
    cache = MapCache()
    newer = MapDocument(5, {"epoch": 5}, b'{"epoch": 5}')
    cache.put(1, newer)
    cache.put(1, MapDocument(4, {"epoch": 4}, b'{"epoch": 4}'))
    assert cache.get(1, 5) is newer and cache.get(1, 4) is None

    async def twice() -> tuple[bytes, bytes]:
        return await newer.gzipped(), await newer.gzipped()

    first, second = asyncio.run(twice())
    assert first is second and gzip.decompress(first) == newer.body  # compressed once


def test_a_deleted_pool_is_forgotten() -> None:
    cache = MapCache()
    for epoch in (4, 5):
        doc = {"pool_id": 1, "epoch": epoch, "pg_count": 1, "pgs": [{"pg": 0, "e": epoch}]}
        cache.put(1, MapDocument(epoch, doc))
    kept = MapDocument(3, {"pool_id": 2, "epoch": 3, "pg_count": 1, "pgs": []})
    cache.put(2, kept)
    cache.pg_parts[1] = cache.pg_parts[2] = cast(Any, "a PG part")
    assert cache.delta(1, 4, MapDocument(5, {})) is not None
    cache.forget(1)
    assert cache.get(1, 5) is None and cache.delta(1, 4, MapDocument(5, {})) is None
    assert cache._docs.keys() == cache._deltas.keys() == {2}
    assert cache.get(2, 3) is kept and cache.pg_parts.keys() == {2}


def test_map_epochs_are_read_once_per_cluster_epoch_for_every_long_poll(tmp_path: Path) -> None:
    """A change wakes every SDS following a map: the first long-poll reads every
    pool's map epoch, the others at that cluster epoch take its answer; a newer
    cluster epoch reads again and sees the new map epoch."""

    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'mdm.db'}")
        try:
            await migrate(engine)
            sessions = session_factory(engine)
            async with sessions() as s, s.begin():
                pool, _ = await new_pool(s)
                pool_id, before = pool.id, pool.map_epoch
            epochs = MapEpochs()
            seen = await asyncio.gather(*(epochs.get(sessions, 7) for _ in range(50)))
            assert all(e == {pool_id: before} for e in seen) and epochs.reads == 1
            async with sessions() as s, s.begin():
                await s.execute(
                    update(StoragePool)
                    .where(StoragePool.id == pool_id)
                    .values(map_epoch=StoragePool.map_epoch + 1)
                )
            assert await epochs.get(sessions, 7) == {pool_id: before}  # same cluster epoch
            assert await epochs.get(sessions, 8) == {pool_id: before + 1}
            assert epochs.reads == 2
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_rows_since_a_map_epoch_are_read_through_the_pool_epoch_index(tmp_path: Path) -> None:
    """The rows a new map epoch patches in (``_PG_ROWS_SINCE``) and each pool's highest
    row epoch (``pgtable.row_keys``) are searched by (pool_id, epoch), the index of
    migration 0013, not by scanning every row of the pool."""

    async def go(s: AsyncSession) -> None:
        conn = await s.connection()

        async def plan(stmt: Any) -> str:
            sql = stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
            return " | ".join(str(r[-1]) for r in rows)

        since = await plan(pgmaps._PG_ROWS_SINCE.params(pool_id=1, since=5))
        assert "placement_groups USING INDEX ix_placement_groups_pool_epoch" in since, since
        assert "(pool_id=? AND epoch>?)" in since, since
        keys = await plan(pgtable.row_keys_query([1, 2]))
        assert "ix_placement_groups_pool_epoch" in keys, keys

    in_session(tmp_path, go)


def test_a_delta_larger_than_half_the_whole_map_is_answered_whole() -> None:
    """A delta that replaces most of a large map (a rebalance that moved most PGs) is
    not served: the caller gets the whole document, which is smaller; a small delta
    of the same pool, and any delta below DELTA_ALWAYS_BELOW, still is."""
    cache = MapCache()
    pgs = [{"pg": n, "primary": 1, "secondary": 2, "state": "clean"} for n in range(400)]

    def put(epoch: int, changed: range) -> MapDocument:
        for n in changed:
            pgs[n] = {**pgs[n], "primary": epoch}
        doc = {"pool_id": 1, "epoch": epoch, "pg_count": 400, "pgs": list(pgs)}
        document = MapDocument(epoch, doc)
        cache.put(1, document)
        return document

    put(1, range(0))
    two = put(2, range(1))  # one PG
    assert cache.delta(1, 1, two) is not None
    three = put(3, range(300))  # most PGs
    assert len(pgmaps.encode(three.doc)) > 4 * pgmaps.DELTA_ALWAYS_BELOW
    assert cache.delta(1, 2, three) is None and cache.delta(1, 1, three) is None
    assert cache.delta(1, 2, three) is None  # the verdict is kept
    four = put(4, range(1))
    small = cache.delta(1, 3, four)
    assert small is not None and len(small.body) < len(four.body) // 10
    assert cache.delta(1, 2, four) is None  # steps 2-3 and 3-4 composed: still most PGs
    # a small pool: a delta replacing every PG is served (a few hundred bytes)
    tiny = MapCache()
    for epoch in (1, 2):
        doc = {"pool_id": 2, "epoch": epoch, "pg_count": 2, "pgs": [{"pg": 0, "e": epoch}]}
        tiny.put(2, MapDocument(epoch, doc))
    assert tiny.delta(2, 1, MapDocument(2, {})) is not None
