"""Stopping the MDM while its background loops hold a database session.

A stop used to cancel the heartbeat writer, the failure detector and the other
loops wherever they were, also inside a query: SQLAlchemy then invalidated the
connection and the pool logged ``Exception closing connection`` with a traceback
(seen under CPU load as a flaky ``assert_no_tracebacks``). The loops now stop
between two iterations (``meshblock.mdm.stopping``).

Then (review 13): the last heartbeat write is skipped after a pass had to be
cancelled (it waited for SQLite's lock); the lease is renewed until the loops and
that write are done; a deposed MDM stops its loops the same way; an isolation
report's settling stops with the loops; a task's failure is logged with its
traceback. The lease lost during a stop of the process: tests/test_mdm_shutdown_pg.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from meshblock.mdm import app as app_module
from meshblock.mdm import db, failures, holddown, stopping
from meshblock.mdm.api import sds as sds_api
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, DatabaseConfig, HaConfig, MdmConfig, ScrubConfig
from meshblock.mdm.context import CTX
from meshblock.mdm.deletion import Purger
from meshblock.mdm.leader import Lease
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import Cluster, Sdc

pytestmark = [pytest.mark.unit]

QUICK = text("SELECT 1")
SLOW = text(  # some 0.3 s in the database thread
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000)"
    " SELECT count(*) FROM c"
)


Check = Callable[[failures.FailureDetector], Awaitable[int]]


def _stop_during(
    check: Check,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    times: int,
    ha: HaConfig | None = None,
    after_stop: Callable[[], None] | None = None,
) -> list[float]:
    """Start the in-process MDM ``times`` times with ``check`` as its failure
    detector's pass (and ``ha``), stop it while that pass runs (at various points;
    ``after_stop`` as soon as it has stopped), and return how long each stop took;
    fail on an ERROR or traceback in the log. The database: ``mdm<i>.db``."""
    busy = asyncio.Event()

    async def signalling(self: failures.FailureDetector) -> int:
        busy.set()
        return await check(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(failures.FailureDetector, "check", signalling)
    caplog.set_level(logging.WARNING)

    async def one(i: int) -> float:
        config = MdmConfig(
            auth=AuthConfig(admin_token="admin-token"),
            database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/mdm{i}.db"),
            scrub=ScrubConfig(start_delay_s=3600.0),
            ha=ha or HaConfig(),
        )
        busy.clear()
        server = TestServer(create_app(config), host="127.0.0.1")
        began = 0.0

        async def serve() -> None:
            # as web.run_app does on SIGTERM: the serving task is cancelled and
            # stops the application in its ``finally``
            nonlocal began
            await server.start_server()
            try:
                await asyncio.Event().wait()
            finally:
                began = time.monotonic()
                await server.close()

        serving = asyncio.create_task(serve())
        await asyncio.wait_for(busy.wait(), 10)
        await asyncio.sleep(0.01 * i)  # land the stop at various points
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        took = time.monotonic() - began
        if after_stop is not None:
            after_stop()
        return took

    async def main() -> list[float]:
        return [await one(i) for i in range(times)]

    try:
        took = asyncio.run(main())
    finally:
        mp.undo()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, "\n".join(
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
        for r in errors
    )
    return took


def test_a_stop_while_connections_go_back_to_the_pool_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def short_transactions(self: failures.FailureDetector) -> int:
        # each gives its connection back to the pool with a rollback (the pool's
        # reset), slowed below
        for _ in range(20):
            async with self.sessions() as s, s.begin():
                await s.execute(QUICK)
        return 0

    plain_rollback = aiosqlite.Connection.rollback

    async def slow_rollback(self: aiosqlite.Connection) -> None:
        # the database thread busy a moment (as under CPU load): most stops land
        # while a connection is being reset
        await asyncio.sleep(0.05)
        await plain_rollback(self)

    monkeypatch.setattr(aiosqlite.Connection, "rollback", slow_rollback)
    took = _stop_during(short_transactions, tmp_path, caplog, 8)
    assert max(took) < 5.0, took


def test_a_stop_during_a_write_transaction_is_prompt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def write_transaction(self: failures.FailureDetector) -> int:
        # a heartbeat the stop writes, and a pass that holds SQLite's write lock
        self.liveness.beat("sdc", 1)
        async with self.sessions() as s, s.begin():
            await s.execute(update(Cluster).values(name=Cluster.name))
            await s.execute(SLOW)
        return 0

    took = _stop_during(write_transaction, tmp_path, caplog, 3)
    assert max(took) < 5.0, took


def test_a_pass_that_does_not_end_is_cancelled_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def loop(work_s: float) -> None:
        while True:
            await stopping.pause(0.01)
            await asyncio.sleep(work_s)  # a pass

    async def main() -> tuple[float, list[bool]]:
        tasks = [
            asyncio.create_task(loop(0.0), name="quick"),
            asyncio.create_task(loop(3600.0), name="stuck"),
        ]
        await asyncio.sleep(0.05)
        began = time.monotonic()
        await stopping.stop(tasks, grace_s=0.2)
        return time.monotonic() - began, [t.done() for t in tasks]

    took, done = asyncio.run(main())
    assert done == [True, True]
    assert 0.2 <= took < 2.0, took
    assert "stuck did not stop within" in caplog.text
    assert "quick did not stop" not in caplog.text


def test_the_stop_logs_a_task_that_failed_before_or_during_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_on_its_way_out() -> None:
        try:
            await stopping.pause(3600.0)
        finally:
            raise RuntimeError("on its way out")

    async def failed_early() -> None:
        raise ValueError("early")

    async def main() -> stopping.Stopped:
        tasks = [
            asyncio.create_task(fails_on_its_way_out(), name="leaving"),
            asyncio.create_task(failed_early(), name="early"),
            asyncio.create_task(stopping.pause(3600.0), name="fine"),
        ]
        await asyncio.sleep(0.05)
        return await stopping.stop(tasks, grace_s=1.0)

    stopped = asyncio.run(main())
    assert stopped.failed == ["leaving", "early"]
    assert stopped.cancelled == []
    failed = {r.getMessage(): r for r in caplog.records if r.levelno == logging.ERROR}
    assert set(failed) == {
        "leaving failed: RuntimeError('on its way out')",
        "early failed: ValueError('early')",
    }
    assert all(r.exc_info for r in failed.values()), "with the traceback"


def test_an_isolation_settle_in_progress_is_stopped_with_the_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unconfirmed isolation report starts a settle (api/sds.py); a stop during it
    # ends it at its pause. It used to be left running past the stop, with the
    # database closed under it, to act (mark an SDS down, run the failure check) later.
    monkeypatch.setattr(holddown, "ISOLATION_SETTLE_S", 3600.0)
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token"),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/mdm.db"),
        scrub=ScrubConfig(start_delay_s=3600.0),
    )

    async def main() -> None:
        app = create_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            c = app[CTX]
            monkeypatch.setattr(c.liveness.holds, "not_confirmed", lambda *_: True)
            await sds_api._isolated(c, 2, "sds:1")
            settling = [t for t in asyncio.all_tasks() if t.get_name() == "isolation-settle"]
            assert len(settling) == 1
        finally:
            await server.close()
        assert settling[0].done(), "the settle outlived the stop"
        assert settling[0].cancelled()

    asyncio.run(main())


async def _idle(*_args: object) -> None:
    """A background loop that never starts a pass (only the stop's own writes)."""
    while True:
        await stopping.pause(3600.0)


def test_the_stop_skips_the_last_heartbeat_write_after_cancelling_a_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass that does not end in the grace is cancelled; one cancelled in a write
    # transaction whose rollback did not get through leaves SQLite's write lock held
    # (here: a connection of the pass's own). The last heartbeat write used to wait
    # out the 30 s busy timeout for it ("database is locked"); it is skipped, logged.
    monkeypatch.setattr(stopping, "STOP_GRACE_S", 0.5)
    monkeypatch.setattr(Liveness, "run", _idle)  # the stop's write is the only one
    monkeypatch.setattr(Purger, "run", _idle)
    holders: list[sqlite3.Connection] = []

    async def stuck_holding_the_write_lock(self: failures.FailureDetector) -> int:
        holder = sqlite3.connect(tmp_path / "mdm0.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        holders.append(holder)
        self.liveness.beat("sdc", 1)  # something for the stop to write
        await asyncio.sleep(3600.0)
        return 0

    def release() -> None:
        for holder in holders:
            holder.close()

    took = _stop_during(stuck_holding_the_write_lock, tmp_path, caplog, 1, after_stop=release)
    assert max(took) < 5.0, took
    assert "failure-detector did not stop within" in caplog.text
    assert (
        "the last heartbeat times are not written: failure-detector had to be cancelled"
        in caplog.text
    )


def _expiring_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process MDM on SQLite with a lease that expires (``[ha] lease_s``) and
    a lease task renewing it, as on PostgreSQL (SQLite's own never expires)."""

    async def expiring(config: MdmConfig, engine: AsyncEngine) -> Lease:
        lease = Lease(db.session_factory(engine), "mdm-test", config.ha.lease_s)
        assert await lease.try_acquire(force=True)
        return lease

    monkeypatch.setattr(app_module, "_lead", expiring)


def test_the_lease_is_renewed_until_the_loops_and_the_last_write_are_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pass in progress may outlast the lease (here 2.5 s, lease_s 1.5): the lease task
    # stops last, so the lease is still this MDM's for the pass's writes and for the
    # last heartbeat write. It used to stop with the loops: the lease expired and the
    # write was refused ("heartbeats not recorded: ... no longer leads").
    _expiring_lease(monkeypatch)
    monkeypatch.setattr(stopping, "STOP_GRACE_S", 10.0)
    monkeypatch.setattr(Liveness, "run", _idle)  # the stop's write is the only one

    async def longer_than_the_lease(self: failures.FailureDetector) -> int:
        async with self.sessions() as s, s.begin():
            s.add(Sdc(id=1, guid="g-1", name="h1"))
        self.liveness.beat("sdc", 1)
        await asyncio.sleep(2.5)
        return 0

    ha = HaConfig(name="mdm-test", lease_s=1.5, renew_interval_s=0.2)
    _stop_during(longer_than_the_lease, tmp_path, caplog, 1, ha=ha)
    assert "heartbeats not recorded" not in caplog.text
    with contextlib.closing(sqlite3.connect(tmp_path / "mdm0.db")) as conn:
        (seen,) = conn.execute("SELECT last_seen FROM sdcs WHERE id = 1").fetchone()
    assert seen is not None, "the last heartbeat write was refused"


LOOPS = {
    "heartbeat-writer",
    "failure-detector",
    "hold-down-prober",
    "rebalancer",
    "purger",
    "scrub-schedule",
    "isolation-settle",
}


def test_a_deposed_mdm_stops_its_loops_at_their_pause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deposed (another MDM took the lease), the MDM stops acting as on a stop: a pass
    # in progress finishes (its writes are fenced) and the loop ends at its pause. It
    # used to cancel every loop wherever it was, inside a database session too.
    _expiring_lease(monkeypatch)
    caplog.set_level(logging.WARNING)
    outcome: list[str] = []
    ended = asyncio.Event()

    async def usurped(self: failures.FailureDetector) -> int:
        if outcome:
            return 0
        outcome.append("began")
        assert await Lease(self.sessions, "usurper", 60.0).try_acquire(force=True)
        try:
            await asyncio.sleep(1.0)  # the MDM's renewal (0.2 s) finds itself deposed
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        finally:
            ended.set()
        outcome.append("finished")
        return 0

    monkeypatch.setattr(failures.FailureDetector, "check", usurped)
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token"),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/mdm.db"),
        scrub=ScrubConfig(start_delay_s=3600.0),
        ha=HaConfig(name="mdm-test", lease_s=10.0, renew_interval_s=0.2),
    )

    async def main() -> list[str]:
        app = create_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            await asyncio.wait_for(ended.wait(), 10)
            await asyncio.sleep(0.2)  # the loops' ends
            assert app[CTX].deposed
            return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name() in LOOPS)
        finally:
            await server.close()

    running = asyncio.run(main())
    assert outcome == ["began", "finished"]
    assert running == [], "the loops ended after the step-down"
    assert "was taken over by another MDM): it stops acting" in caplog.text
    assert "the last heartbeat times are not written: this MDM no longer leads" in caplog.text


def test_a_loop_that_dies_is_logged_when_it_dies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loop ends only on a bug (each catches its pass's errors); it was found, if
    # ever, as "Task exception was never retrieved" once collected.
    async def dies(self: failures.FailureDetector, interval_s: float = 1.0) -> None:
        raise RuntimeError("the detector broke")

    monkeypatch.setattr(failures.FailureDetector, "run", dies)
    config = MdmConfig(
        auth=AuthConfig(admin_token="admin-token"),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/mdm.db"),
        scrub=ScrubConfig(start_delay_s=3600.0),
    )

    async def main() -> list[str]:
        server = TestServer(create_app(config), host="127.0.0.1")
        await server.start_server()
        try:
            await asyncio.sleep(0.2)
            return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        finally:
            await server.close()

    assert asyncio.run(main()) == ["failure-detector failed: RuntimeError('the detector broke')"]
