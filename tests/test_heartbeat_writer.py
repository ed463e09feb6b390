"""The heartbeat writer's batch (mdm/liveness.py): last-seen times, device usage and
volume chunk counts written with core UPDATEs and one upsert, an SDS or volume deleted
meanwhile skipped, a report about another SDS's device dropped, a volume gone written
as 0 chunks. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import delete, select

from meshblock.mdm.db import WriteGate, create_engine, migrate
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import (
    Device,
    ProtectionDomain,
    Sds,
    StoragePool,
    Volume,
    VolumeType,
    VolumeUsage,
)
from meshblock.sqlstore import session_factory

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1 << 20


def test_the_batch_writes_what_changed_and_skips_what_is_gone(db_url: str) -> None:
    async def main() -> None:
        engine = create_engine(db_url)
        try:
            await migrate(engine)
            sessions, gate = session_factory(engine), WriteGate()
            async with sessions() as s, s.begin():
                pd = ProtectionDomain(name="pd-writer")
                s.add(pd)
                await s.flush()
                pool = StoragePool(
                    name="pool-writer", protection_domain_id=pd.id, allocation_granularity_bytes=MiB
                )
                sdss = [Sds(name=n, protection_domain_id=pd.id, address="h") for n in "abc"]
                s.add_all([pool, *sdss])
                await s.flush()
                devs = [
                    Device(sds_id=x.id, pool_id=pool.id, path="/d", capacity_bytes=1 << 30)
                    for x in sdss
                ]
                vols = [
                    Volume(name=n, pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 30)
                    for n in ("v1", "v2", "v3")
                ]
                s.add_all([*devs, *vols])
                await s.flush()
                a, b, c = (x.id for x in sdss)
                da, db, dc = (d.id for d in devs)
                v1, v2, v3 = (v.id for v in vols)
            live = Liveness(10.0)
            live.beat("sds", a, [(da, 5 * MiB), (db, 9 * MiB)], [(v1, 3), (v2, 4), (v3, 1)])
            live.beat("sds", b, [(db, 7 * MiB)], [(v1, 2)])
            live.beat("sds", c, [(dc, 1 * MiB)], [(v1, 6)])
            async with sessions() as s, s.begin():  # gone before the batch is written
                await s.execute(delete(Device).where(Device.id == dc))
                await s.execute(delete(Sds).where(Sds.id == c))
                await s.execute(delete(Volume).where(Volume.id == v3))
            await live.flush(sessions, gate)
            live.beat("sds", a, (), [(v2, 0)])  # a volume gone from SDS a
            await live.flush(sessions, gate)
            async with sessions() as s:
                used = dict((await s.execute(select(Device.id, Device.used_bytes))).all())
                seen = dict((await s.execute(select(Sds.id, Sds.last_seen))).all())
                usage = {
                    (r.sds_id, r.volume_id): r.chunks
                    for r in (await s.execute(select(VolumeUsage))).scalars()
                }
            # SDS a's report about b's device is dropped; b's own is written
            assert used == {da: 5 * MiB, db: 7 * MiB}
            assert seen[a] is not None and seen[b] is not None and c not in seen
            assert usage == {(a, v1): 3, (a, v2): 0, (b, v1): 2}
        finally:
            await engine.dispose()

    asyncio.run(main())
