"""A hold-down is written in the transaction of the map change it causes (the failure
check's), not only with the next heartbeat batch: an MDM that crashes between the two
must not forget the hold, or the SDS's next heartbeat would bring it straight back.
In-process, on a SQLite store (the pool of ``test_rebalance_step``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from meshblock.mdm.holddown import from_stored
from meshblock.mdm.models import Device, PlacementGroup, Sds
from meshblock.mdm.rebalance import Rebalancer
from test_rebalance_step import Sessions, run

pytestmark = pytest.mark.unit


async def hold_of(sessions: Sessions, sds_id: int) -> str | None:
    async with sessions() as s:
        return (await s.execute(select(Sds.hold_state).where(Sds.id == sds_id))).scalar()


def test_the_hold_is_committed_with_the_map_that_takes_the_sds_down(tmp_path: Path) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        detector = r.detector
        live = detector.liveness
        async with sessions() as s:
            victim = (await s.execute(select(Device.sds_id).limit(1))).scalar_one()
        live.mark_down(victim, isolated=True)
        # no heartbeat batch (live.flush) runs: the check alone writes the hold
        assert await detector.check() > 0
        text = await hold_of(sessions, victim)
        rec = from_stored(text, 0.0, 0.0)
        assert rec.held and rec.isolated, text
        async with sessions() as s:
            states = set((await s.execute(select(PlacementGroup.state))).scalars())
        assert "clean" not in states, states
        assert live.take_holds() == {}  # nothing left for the batch

    run(tmp_path, go)


def test_a_hold_not_written_is_written_later(tmp_path: Path) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        detector = r.detector
        live = detector.liveness
        async with sessions() as s:
            victim = (await s.execute(select(Device.sds_id).limit(1))).scalar_one()
        live.mark_down(victim)

        def broken() -> None:
            raise RuntimeError("store unavailable")

        real = detector.sessions
        detector.sessions = broken  # type: ignore[assignment]
        with pytest.raises(RuntimeError):
            await detector.check()
        detector.sessions = real
        assert await hold_of(sessions, victim) is None
        assert set(live.take_holds()) == {victim}  # kept for the next write

    run(tmp_path, go)
