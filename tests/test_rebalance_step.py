"""The rebalancer's step (``meshblock.mdm.rebalance.Rebalancer.step``), in process on
SQLite: it plans outside the write gate and writes under it only what deciding under
the gate would have written, and it does not compute a pool's balanced map again while
its rows and usable devices are those of a plan that moved nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import pgtable, rebalance
from meshblock.mdm.db import WriteGate, create_engine, migrate, session_factory
from meshblock.mdm.epochs import CLUSTER_ROW_ID, EpochNotifier
from meshblock.mdm.failures import FailureDetector
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import (
    Cluster,
    Device,
    PgState,
    ProtectionDomain,
    Sds,
    StoragePool,
    Volume,
    VolumeType,
)
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.rebalance import Rebalancer

pytestmark = pytest.mark.unit

Sessions = async_sessionmaker[AsyncSession]


def run(tmp: Path, fn: Callable[[Sessions, Rebalancer, int], Awaitable[None]]) -> None:
    """A pool of 8 PGs whose copies all sit on two of its three SDSs' devices (so the
    rebalancer wants to move some to the third), a volume in it, every SDS heartbeating;
    ``fn(sessions, rebalancer, pool_id)``."""

    async def main() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp / 'mdm.db'}")
        try:
            await migrate(engine)
            sessions = session_factory(engine)
            liveness = Liveness(600.0)
            async with sessions() as s, s.begin():
                s.add(Cluster(id=CLUSTER_ROW_ID, name="c", epoch=1))
                pd = ProtectionDomain(name="pd")
                s.add(pd)
                await s.flush()
                pool = StoragePool(
                    name="p",
                    protection_domain_id=pd.id,
                    pg_count=8,
                    allocation_granularity_bytes=1 << 30,
                )
                s.add(pool)
                await s.flush()
                devices = []
                for n in range(3):
                    sds = Sds(
                        name=f"sds{n}",
                        protection_domain_id=pd.id,
                        address="127.0.0.1",
                        data_port=7000 + n,
                    )
                    s.add(sds)
                    await s.flush()
                    liveness.beat("sds", sds.id)
                    dev = Device(sds_id=sds.id, pool_id=pool.id, path="/d", capacity_bytes=1 << 40)
                    s.add(dev)
                    await s.flush()
                    devices.append(dev.id)
                a, b, _ = devices
                rows = [PgRow(pool.id, n, a, b, PgState.CLEAN) for n in range(8)]
                await pgtable.write(s, pool, [PgChange(None, r) for r in rows])
                s.add(Volume(name="v", pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 30))
                pool_id = pool.id
            detector = FailureDetector(sessions, liveness, EpochNotifier(1), 600.0, WriteGate())
            await fn(sessions, Rebalancer(detector), pool_id)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def targets(sessions: Sessions, pool_id: int) -> int:
    async with sessions() as s:
        return sum(1 for r in await pgtable.load(s, pool_id=pool_id) if r.target is not None)


def counting_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    plan = rebalance.plan_moves

    def counted(*args: Any) -> list[PgChange]:
        calls.append(1)
        return plan(*args)

    monkeypatch.setattr(rebalance, "plan_moves", counted)
    return calls


def test_moves_are_planned_and_written(tmp_path: Path) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        started = await r.step()
        assert started > 0 and r.moves_started == started
        assert await targets(sessions, pool_id) == started

    run(tmp_path, go)


def test_moves_planned_on_a_map_that_changed_meanwhile_are_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        plan = Rebalancer._plan

        async def plan_then_change(self: Rebalancer, *args: Any) -> list[PgChange]:
            moves = await plan(self, *args)
            # another writer publishes a new map of the pool before the moves are written
            async with sessions() as s, s.begin():
                await s.execute(
                    update(StoragePool)
                    .where(StoragePool.id == pool_id)
                    .values(map_epoch=StoragePool.map_epoch + 1)
                )
            return moves

        monkeypatch.setattr(Rebalancer, "_plan", plan_then_change)
        assert await r.step() == 0
        assert await targets(sessions, pool_id) == 0
        monkeypatch.setattr(Rebalancer, "_plan", plan)
        assert await r.step() > 0  # planned again on the new map

    run(tmp_path, go)


def test_a_settled_pool_is_not_planned_again_until_its_rows_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        # the budget allows 3 moves at a time: the first step starts them all, and
        # while they are in flight (each PG has its target) nothing more is planned
        assert await r.step() > 0
        calls = counting_plans(monkeypatch)
        assert await r.step() == 0 and len(calls) == 1
        loads: list[int] = []
        load = pgtable.load

        async def counted_load(*args: Any, **kw: Any) -> list[PgRow]:
            loads.append(1)
            return await load(*args, **kw)

        monkeypatch.setattr(pgtable, "load", counted_load)
        assert await r.step() == 0 and len(calls) == 1  # same rows: not computed again
        assert loads == []  # nor even loaded
        monkeypatch.setattr(pgtable, "load", load)
        # a move ends (its row changes): the pool is planned again
        async with sessions() as s, s.begin():
            rows = await pgtable.load(s, pool_id=pool_id)
            moving = next(row for row in rows if row.target is not None)
            done = PgRow(pool_id, moving.pg, moving.primary, moving.target, PgState.CLEAN)
            pool = await s.get(StoragePool, pool_id)
            assert pool is not None
            await pgtable.write(s, pool, [PgChange(moving, done)])
        await r.step()
        assert len(calls) == 2

    run(tmp_path, go)
