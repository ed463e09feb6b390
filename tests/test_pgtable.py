"""The PG table's gateway (``meshblock.mdm.pgtable``) on SQLite and PostgreSQL: typed
rows loaded, new rows added, the compare-and-set writer that refuses a decision made on
a row changed since it was read (docs/design.md, invariant 9), and its fence: a deposed
leader's write is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import pgtable
from meshblock.mdm.db import create_engine, migrate, session_factory
from meshblock.mdm.leader import FENCE, Lease, NotLeader
from meshblock.mdm.models import (
    Device,
    MdmLeader,
    PgState,
    ProtectionDomain,
    Sds,
    StoragePool,
)
from meshblock.mdm.pgtable import PgChange, PgRow

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def in_session(url: str, fn: Callable[[AsyncSession], Awaitable[None]]) -> None:
    """Run ``fn`` in one transaction on a migrated database ``url`` (the module's:
    each test makes pools of its own names)."""

    async def main() -> None:
        engine = create_engine(url)
        try:
            await migrate(engine)
            async with session_factory(engine)() as s, s.begin():
                await fn(s)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def new_pool(s: AsyncSession, name: str) -> tuple[StoragePool, list[int]]:
    """A pool with a device on each of two SDSs; returns it and the device ids."""
    pd = ProtectionDomain(name=f"pd-{name}")
    s.add(pd)
    await s.flush()
    pool = StoragePool(
        name=name, protection_domain_id=pd.id, pg_count=4, allocation_granularity_bytes=1 << 30
    )
    s.add(pool)
    await s.flush()
    devices = []
    for n in range(2):
        sds = Sds(name=f"{name}-sds{n}", protection_domain_id=pd.id, address="127.0.0.1")
        s.add(sds)
        await s.flush()
        dev = Device(sds_id=sds.id, pool_id=pool.id, path="/d", capacity_bytes=1 << 30)
        s.add(dev)
        await s.flush()
        devices.append(dev.id)
    return pool, devices


def test_added_rows_load_typed_in_pg_order_with_the_new_map_epoch(db_url: str) -> None:
    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "added")
        new = [PgRow(pool.id, n, a, b, PgState.CLEAN) for n in (3, 1, 0, 2)]
        epoch = await pgtable.write(s, pool, [PgChange(None, row) for row in new])
        assert epoch == pool.map_epoch == 1
        rows = await pgtable.load(s, pool_id=pool.id)
        assert rows == [PgRow(pool.id, n, a, b, PgState.CLEAN, epoch=1) for n in range(4)]
        assert await pgtable.load(s, pool_id=pool.id, pgs=[2]) == [rows[2]]

    in_session(db_url, go)


def test_a_row_changed_since_it_was_read_is_not_overwritten(db_url: str) -> None:
    """A decision made on a row that changed meanwhile is refused whole (StaleRows),
    not only for that row: the update matched one row fewer than it was given."""

    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "cas")
        await pgtable.write(
            s, pool, [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
        )
        read = await pgtable.load(s, pool_id=pool.id)
        # another decision changes PG 0 meanwhile (a new map epoch)
        await pgtable.write(s, pool, [PgChange(read[0], replace(read[0], state=PgState.DEGRADED))])
        stale = [
            PgChange(read[0], replace(read[0], primary=b, secondary=a)),  # read before
            PgChange(read[1], replace(read[1], state=PgState.INACTIVE)),
        ]
        with pytest.raises(pgtable.StaleRows, match="1 of 2 PG row"):
            async with s.begin_nested():  # the caller's transaction, rolled back
                await pgtable.write(s, pool, stale)
        await s.refresh(pool)  # expired by the rollback
        rows = {row.pg: row for row in await pgtable.load(s, pool_id=pool.id)}
        assert rows[0] == replace(read[0], state=PgState.DEGRADED, epoch=2), "kept"
        assert rows[1] == read[1], "not written either: the decision is refused whole"
        assert rows[2] == read[2], "untouched"
        stored = select(StoragePool.map_epoch).where(StoragePool.id == pool.id)
        assert (await s.execute(stored)).scalar_one() == 2
        # decided again on the rows as they are now, it is written
        again = await pgtable.load(s, pool_id=pool.id)
        redo = [PgChange(again[n], replace(again[n], state=PgState.INACTIVE)) for n in (0, 1)]
        assert await pgtable.write(s, pool, redo) == 3
        rows = {row.pg: row for row in await pgtable.load(s, pool_id=pool.id)}
        assert rows[1] == replace(read[1], state=PgState.INACTIVE, epoch=3), "written"

    in_session(db_url, go)


def test_updated_rows_go_to_the_driver_as_tuples_and_read_back_as_written(db_url: str) -> None:
    """The update of many rows (a pool laid out afresh rewrites most of its 4,096 at
    every SDS registration) is one executemany of the driver's own SQL, without
    SQLAlchemy's per-row parameter processing; every field, each state among them,
    reads back as it was written."""

    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "driver")
        await pgtable.write(
            s, pool, [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
        )
        read = await pgtable.load(s, pool_id=pool.id)
        states = list(PgState)
        changed = [
            replace(read[0], primary=b, secondary=a, state=states[0]),
            replace(read[1], secondary=None, state=states[1 % len(states)]),
            replace(read[2], target=b, moving="primary", state=states[2 % len(states)]),
            replace(read[3], primary=None, secondary=None, state=states[-1]),
        ]
        updates: list[tuple[bool, bool]] = []

        def seen(
            _conn: Any, _cursor: Any, statement: str, _p: Any, context: Any, many: bool
        ) -> None:
            if statement.startswith("UPDATE placement_groups"):
                updates.append((many, context.compiled is None))

        sync = (await s.connection()).sync_connection
        assert sync is not None
        event.listen(sync, "before_cursor_execute", seen)
        try:
            epoch = await pgtable.write(
                s, pool, [PgChange(old, new) for old, new in zip(read, changed, strict=True)]
            )
        finally:
            event.remove(sync, "before_cursor_execute", seen)
        assert updates == [(True, True)], "not one executemany of the driver's SQL"
        after = await pgtable.load(s, pool_id=pool.id)
        assert after == [replace(row, epoch=epoch) for row in changed]
        assert all(type(row.state) is PgState for row in after)

    in_session(db_url, go)


def test_load_by_device_finds_primaries_secondaries_and_targets(db_url: str) -> None:
    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "bydev")
        other, (c, d) = await new_pool(s, "bydev-other")
        await pgtable.write_pools(
            s,
            [
                PgChange(None, PgRow(pool.id, 0, a, b, PgState.CLEAN)),
                PgChange(None, PgRow(pool.id, 1, b, None, PgState.DEGRADED)),
                PgChange(None, PgRow(other.id, 0, c, d, PgState.CLEAN, target=a, moving="x")),
                PgChange(None, PgRow(other.id, 1, d, c, PgState.CLEAN)),
            ],
        )
        assert (pool.map_epoch, other.map_epoch) == (1, 1), "one new map per pool"
        found = [(row.pool_id, row.pg) for row in await pgtable.load(s, devices=[a])]
        assert found == [(pool.id, 0), (other.id, 0)]
        every = {(row.pool_id, row.pg) for row in await pgtable.load(s)}
        assert every >= {(pool.id, 0), (pool.id, 1), (other.id, 0), (other.id, 1)}

    in_session(db_url, go)


def test_a_change_of_another_pool_is_refused(db_url: str) -> None:
    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "wrong")
        with pytest.raises(ValueError, match="written to pool"):
            await pgtable.write(
                s, pool, [PgChange(None, PgRow(pool.id + 1, 0, a, b, PgState.CLEAN))]
            )

    in_session(db_url, go)


def test_row_keys_change_with_every_write_of_a_row_and_only_then(db_url: str) -> None:
    async def go(s: AsyncSession) -> None:
        pool, (a, b) = await new_pool(s, "keys")
        assert await pgtable.row_keys(s, [pool.id]) == {}
        await pgtable.write(
            s, pool, [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
        )
        first = await pgtable.row_keys(s, [pool.id])
        assert first == {pool.id: (4, pool.map_epoch)}
        read = await pgtable.load(s, pool_id=pool.id)
        await pgtable.write(s, pool, [])  # a new map epoch, no row written
        assert await pgtable.row_keys(s, [pool.id]) == first
        await pgtable.write(s, pool, [PgChange(read[2], replace(read[2], state=PgState.DEGRADED))])
        assert await pgtable.row_keys(s, [pool.id]) == {pool.id: (4, pool.map_epoch)}
        assert pool.map_epoch > first[pool.id][1]

    in_session(db_url, go)


def test_a_deposed_or_expired_leaders_write_is_refused(db_url: str) -> None:
    """Two MDMs' gateways on one database (docs/mdm.md, "High availability"): the
    writes of the one whose term was taken over, or whose lease expired on the
    database's clock, fail the fence in their transaction and write nothing."""

    async def main() -> None:
        engine = create_engine(db_url)
        try:
            await migrate(engine)
            plain = session_factory(engine)
            first = Lease(plain, "fence-first", 30.0)
            assert await first.try_acquire(force=True)
            second = Lease(plain, "fence-second", 30.0)
            assert not await second.try_acquire(), "held by the first, not expired"
            assert second.seen is not None and second.seen[1] == "fence-first"
            mine = session_factory(engine, {FENCE: first.fence})
            async with mine() as s, s.begin():
                pool, (a, b) = await new_pool(s, "fence")
                new = [PgChange(None, PgRow(pool.id, n, a, b, PgState.CLEAN)) for n in range(4)]
                await pgtable.write(s, pool, new)
            pool_id = pool.id

            async def degrade(sessions: async_sessionmaker[AsyncSession], pg: int) -> None:
                async with sessions() as s, s.begin():
                    now = await s.get(StoragePool, pool_id)
                    assert now is not None
                    (row,) = await pgtable.load(s, pool_id=pool_id, pgs=[pg])
                    await pgtable.write(
                        s, now, [PgChange(row, replace(row, state=PgState.DEGRADED))]
                    )

            await degrade(mine, 0)
            assert await second.try_acquire(force=True)
            assert second.term == first.term + 1
            with pytest.raises(NotLeader, match="fence-first"):
                await degrade(mine, 1)
            theirs = session_factory(engine, {FENCE: second.fence})
            await degrade(theirs, 2)
            # the second's lease expires on the database's clock: its writes stop too
            async with plain() as s, s.begin():
                await s.execute(update(MdmLeader).values(expires_at=MdmLeader.renewed_at - 1))
            with pytest.raises(NotLeader):
                await degrade(theirs, 3)
            assert not await first.renew(), "deposed: the row names another term"
            async with plain() as s:
                rows = await pgtable.load(s, pool_id=pool_id)
                stored = await s.get(StoragePool, pool_id)
                assert stored is not None and stored.map_epoch == 3
            assert [row.state for row in rows] == [
                PgState.DEGRADED,
                PgState.CLEAN,
                PgState.DEGRADED,
                PgState.CLEAN,
            ]
        finally:
            await engine.dispose()

    asyncio.run(main())
