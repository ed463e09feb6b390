"""The fence on every write of an MDM (docs/mdm.md, "High availability"): an MDM
running in-process on PostgreSQL is deposed by a second MDM's lease while it still
believes it leads (its renewal is minutes away); its API changes are refused with 503
``not_leader`` and its heartbeat writer writes nothing, while it still answers reads.
The lease itself is tested in tests/test_leader.py, the PG table's fence in
tests/test_pgtable.py."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from _pg import PgServer
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, DatabaseConfig, HaConfig, MdmConfig, ScrubConfig
from meshblock.mdm.context import CTX
from meshblock.mdm.db import create_engine, session_factory
from meshblock.mdm.leader import Lease
from meshblock.mdm.models import Cluster, ProtectionDomain, Sdc

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

ADMIN = {"Authorization": "Bearer admin-token"}


def test_a_deposed_leader_writes_nothing_anywhere(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg_server.create_database()
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token"),
        database=DatabaseConfig(url=url),
        scrub=ScrubConfig(start_delay_s=3600.0),
        ha=HaConfig(name="fence-old", lease_s=600.0, renew_interval_s=300.0),
    )

    async def main() -> None:
        app = create_app(config)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            c = app[CTX]
            made = await client.post(
                "/api/v1/sdc", json={"guid": "g-1", "name": "h1"}, headers=ADMIN
            )
            assert made.status == 201, await made.text()
            sdc_id = (await made.json())["id"]
            pd = await client.post(
                "/api/v1/protection-domains", json={"name": "pd1"}, headers=ADMIN
            )
            assert pd.status == 201, await pd.text()
            await c.liveness.flush(c.sessions, c.write_gate)  # nothing pending from here

            engine = create_engine(url)
            try:
                plain = session_factory(engine)
                assert await Lease(plain, "fence-new", 600.0).try_acquire(force=True)
                async with plain() as s:
                    epoch = (await s.execute(select(Cluster.epoch))).scalar_one()

                refused = await client.post(
                    "/api/v1/protection-domains", json={"name": "pd2"}, headers=ADMIN
                )
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "not_leader"
                listed = await client.get("/api/v1/protection-domains", headers=ADMIN)
                assert listed.status == 200, "a deposed MDM still answers reads"

                c.liveness.beat("sdc", sdc_id)
                with caplog.at_level(logging.WARNING, "meshblock.mdm.liveness"):
                    await c.liveness.flush(c.sessions, c.write_gate)
                assert "no longer leads" in caplog.text

                async with plain() as s:
                    names = (await s.execute(select(ProtectionDomain.name))).scalars().all()
                    seen = (
                        await s.execute(select(Sdc.last_seen).where(Sdc.id == sdc_id))
                    ).scalar_one()
                    assert (await s.execute(select(Cluster.epoch))).scalar_one() == epoch
                assert list(names) == ["pd1"]
                assert seen is None, "the deposed MDM's heartbeat writer wrote"
            finally:
                await engine.dispose()

    asyncio.run(main())
