"""The scrub schedule is kept in ``scrub_state`` by whoever saves it first: the
once-a-second tick and an operator's ``scrub start``/``pause`` may save the same
pool's row at once. In-process, on a SQLite store (the pool of ``test_rebalance_step``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from sqlalchemy import delete, func, select

from meshblock.mdm.api.scrub import save
from meshblock.mdm.context import MdmContext
from meshblock.mdm.db import WriteGate
from meshblock.mdm.models import ScrubState
from meshblock.mdm.rebalance import Rebalancer
from meshblock.mdm.scrub import ScrubSchedule
from test_rebalance_step import Sessions, run

pytestmark = pytest.mark.unit


def test_two_saves_of_a_new_pool_at_once_keep_one_row(tmp_path: Path) -> None:
    async def go(sessions: Sessions, r: Rebalancer, pool_id: int) -> None:
        schedule = ScrubSchedule(3600.0, 10, 0.0, time.monotonic())
        schedule.tick(time.monotonic(), {pool_id: (16, False)})  # a pool not kept yet
        c = cast(
            MdmContext, SimpleNamespace(sessions=sessions, scrub=schedule, write_gate=WriteGate())
        )
        for _ in range(5):
            first = asyncio.ensure_future(save(c))
            await asyncio.sleep(0)
            schedule.dirty.add(pool_id)  # the operator's start, while the tick saves
            await asyncio.gather(first, save(c))
            async with sessions() as s:
                n = (await s.execute(select(func.count()).select_from(ScrubState))).scalar()
            assert n == 1
            async with sessions() as s, s.begin():
                await s.execute(delete(ScrubState))
            schedule.dirty.add(pool_id)

    run(tmp_path, go)
