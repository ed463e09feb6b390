"""Hold-downs kept across an MDM restart (docs/mdm.md, "Hold-down and flapping"): a
flapping SDS written to the store (``sdss.hold_state``, migration 0009) with the
heartbeats is read back by a new :class:`~meshblock.mdm.liveness.Liveness`, held and
flapping, its heartbeats not bringing it back; one proven up since is stored as not
held. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from meshblock.mdm.db import WriteGate, create_engine, migrate
from meshblock.mdm.holddown import Knobs
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import ProtectionDomain, Sds
from meshblock.sqlstore import session_factory

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

K = Knobs(hold_down_s=5.0, flap_count=3, flap_window_s=600.0)


async def restarted(engine: AsyncEngine) -> Liveness:
    """A new MDM's liveness, loaded from the store."""
    live = Liveness(10.0, K)
    async with session_factory(engine)() as s:
        await live.load(s)
    return live


def test_a_flapping_sds_stays_flapping_across_a_restart(db_url: str) -> None:
    async def main() -> None:
        engine = create_engine(db_url)
        try:
            await migrate(engine)
            sessions, gate = session_factory(engine), WriteGate()
            async with sessions() as s, s.begin():
                pd = ProtectionDomain(name="pd-hold")
                s.add(pd)
                await s.flush()
                rows = [Sds(name=n, protection_domain_id=pd.id, address="h") for n in "abc"]
                s.add_all(rows)
                await s.flush()
                a, b, c = (r.id for r in rows)
            live = Liveness(10.0, K)
            for i in (a, b, c):
                live.beat("sds", i)
            for _ in range(4):
                live.mark_down(b)
            live.mark_down(c, isolated=True)
            assert live.holds.flapping(b)
            await live.flush(sessions, gate)

            again = await restarted(engine)
            for i in (a, b, c):
                again.beat("sds", i)
            assert again.holds.flapping(b) and again.holds.held(b)
            assert again.state("sds", b) == "disconnected"
            assert len(again.holds.record(b).downs) == 4
            assert again.holds.held(c) and again.holds.record(c).isolated
            assert not again.holds.flapping(c)
            assert again.state("sds", a) == "connected" and not again.holds.held(a)

            # c proven up and b cleared: what the next restart finds
            again.release(c)
            again.holds.clear(b)
            await again.flush(sessions, gate)
            third = await restarted(engine)
            assert not third.holds.held(c) and len(third.holds.record(c).downs) == 1
            assert third.holds.held(b) and not third.holds.flapping(b)
        finally:
            await engine.dispose()

    asyncio.run(main())
