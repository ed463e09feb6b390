"""A PG's copy job that does not finish (meshblock.sds.resync), in process: its
restarts back off, and a job that stops leaves none of its chunk copies running.
The job's work is faked; the copy itself is exercised by tests/test_sds_resync_units.py
and tests/test_sds_heal_units.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from _wait import wait_until_async
from meshblock.chunks import pg_of
from meshblock.sds import resync
from meshblock.sds.maps import PgMap
from meshblock.sds.resync import CopyPlan, Resync, ResyncAborted
from meshblock.sds.state import SdsState
from test_device_failstop_units import DEV_IDS, PG_COUNT, POOL
from test_sds_checksums import VOL
from test_sds_heal_units import PeerCopy, pattern, state_with_peer

pytestmark = pytest.mark.unit


def copying_map(sds: SdsState, epoch: int, *, rebuilding: bool = False) -> PgMap:
    """Our clean map with every PG resyncing (or rebuilding) to its secondary."""
    m = sds.maps.maps[POOL]
    flags = (True,) * PG_COUNT
    none = (False,) * PG_COUNT
    return PgMap(
        POOL, epoch, PG_COUNT, m.primary, m.secondary, m.sds, {}, none,
        none if rebuilding else flags, flags if rebuilding else none,
    )  # fmt: skip


def test_restarts_of_a_job_that_keeps_failing_back_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PG 0's job fails every time (a copy that keeps refusing us) while new maps
    naming the same copy come every 10 ms: it restarts after RESTART_S, then twice
    that, ... up to RESTART_MAX_S (0.05, 0.1, 0.2, 0.2 s here), not at each new map.
    A map that names another copy (the PG now rebuilding) starts it at once though
    its pause (60 s by then) has not ended. Before, every new map restarted the
    failed job at once (starts 10 ms apart), and without maps every RESTART_S."""
    monkeypatch.setattr(resync, "RESTART_S", 0.05)
    monkeypatch.setattr(resync, "RESTART_MAX_S", 0.2)
    sds = state_with_peer(tmp_path, PeerCopy(pattern()), monkeypatch, primary=True)
    rs = Resync(sds)
    starts: list[tuple[float, int]] = []

    async def failing_job(pool: int, pg: int, epoch: int) -> bool:
        if pg == 0:
            starts.append((time.monotonic(), epoch))
            if len(starts) == 5:  # the pause after this one: long
                monkeypatch.setattr(resync, "RESTART_S", 60.0)
                monkeypatch.setattr(resync, "RESTART_MAX_S", 60.0)
        raise ResyncAborted("refused")

    monkeypatch.setattr(rs, "_job", failing_job)
    epochs = itertools.count(2)

    async def maps() -> None:
        while True:
            sds.maps.update(copying_map(sds, next(epochs)))
            await asyncio.sleep(0.01)

    async def main() -> None:
        feed = asyncio.create_task(maps())
        try:
            await wait_until_async(lambda: len(starts) == 5, 10, "five starts", interval=0.01)
        finally:
            feed.cancel()
        times = [t for t, _ in starts]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, pause in zip(gaps, (0.05, 0.1, 0.2, 0.2), strict=True):
            assert gap >= pause * 0.99, gaps
        await wait_until_async(lambda: (POOL, 0) in rs._held, 10, "a pause of 60 s")
        held = len(starts)
        sds.maps.update(copying_map(sds, next(epochs), rebuilding=True))
        await wait_until_async(lambda: len(starts) > held, 10, "a start for the new copy")
        await rs.close()

    asyncio.run(main())


def test_a_job_that_stops_cancels_its_other_chunk_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk's copy stops the job (ResyncAborted) while another is still under
    way: that one is cancelled before the job ends (its slot of the source device
    free again), and the job's error is the ResyncAborted itself. Before
    (asyncio.gather), it ran on beside the job that started over."""
    sds = state_with_peer(tmp_path, PeerCopy(pattern()), monkeypatch, primary=True)
    rs = Resync(sds)
    pg = pg_of(VOL, 0, PG_COUNT)
    plan = CopyPlan(POOL, pg, 1, 2, "resync", False, DEV_IDS[0], ((VOL, 0), (VOL, 1)))
    ended: list[int] = []

    async def copy(pool: int, pg: int, volume: int, chunk: int) -> None:
        try:
            await asyncio.sleep(0.01 if chunk == 0 else 60)
            raise ResyncAborted(f"SDS 2 refused chunk {volume}/{chunk}")
        finally:
            ended.append(chunk)

    monkeypatch.setattr(rs, "_copy", copy)

    async def main() -> None:
        with pytest.raises(ResyncAborted, match="refused chunk"):
            await rs._copy_all(plan, [2, 0, "rebuild"], time.monotonic())
        assert sorted(ended) == [0, 1]
        assert rs._slots == {(DEV_IDS[0], "rebuild"): 0}

    asyncio.run(main())
