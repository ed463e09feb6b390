"""The MDM's leader lease (``meshblock.mdm.leader``) on an SQLite file, in one process:
taking it in a new term, an MDM's own name taking it back, self-fencing when it cannot
be renewed, and a second MDM on one SQLite database refused at start. The fence on the
PG table's writes is tested on both engines in tests/test_pgtable.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import backup, leader
from meshblock.mdm.app import create_app
from meshblock.mdm.config import AuthConfig, DatabaseConfig, HaConfig, MdmConfig, ScrubConfig
from meshblock.mdm.db import create_engine, migrate, session_factory
from meshblock.mdm.leader import LeaderError, Lease
from meshblock.mdm.models import MdmLeader

pytestmark = pytest.mark.unit

AUTH = AuthConfig(admin_token="admin-token")


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@asynccontextmanager
async def database(path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(url_of(path))
    try:
        await migrate(engine)
        yield session_factory(engine)
    finally:
        await engine.dispose()


async def lease_row(sessions: async_sessionmaker[AsyncSession]) -> tuple[int, str]:
    async with sessions() as s:
        row = (await s.execute(select(MdmLeader.term, MdmLeader.holder))).one()
        return int(row.term), str(row.holder)


def test_the_lease_is_taken_in_a_new_term_when_free_expired_or_our_own(tmp_path: Path) -> None:
    async def main() -> None:
        async with database(tmp_path / "mdm.db") as sessions:
            one = Lease(sessions, "mdm1", 30.0)
            assert await one.try_acquire()
            assert (one.term, await lease_row(sessions)) == (1, (1, "mdm1"))
            assert one.held()
            two = Lease(sessions, "mdm2", 30.0)
            assert not await two.try_acquire()
            assert two.seen is not None and two.seen[:2] == (1, "mdm1")
            again = Lease(sessions, "mdm1", 30.0)  # mdm1's next process
            assert await again.try_acquire()
            assert await lease_row(sessions) == (2, "mdm1")
            assert not await one.renew(), "the old process's term is over"
            assert await again.renew()
            async with sessions() as s, s.begin():  # mdm1 stopped: its lease runs out
                await s.execute(update(MdmLeader).values(expires_at=MdmLeader.renewed_at - 1))
            assert await two.try_acquire()
            assert (two.term, await lease_row(sessions)) == (3, (3, "mdm2"))

    asyncio.run(main())


def test_a_leader_that_cannot_renew_gives_up_before_its_lease_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Self-fencing: renewals that fail (the database unreachable) leave the lease to
    run out on the leader's own clock; then it says it lost leadership, once."""

    async def main() -> None:
        async with database(tmp_path / "mdm.db") as sessions:
            lease = Lease(sessions, "mdm1", 1.0)
            assert await lease.try_acquire()
            tries = 0

            async def unreachable() -> bool:
                nonlocal tries
                tries += 1
                raise OperationalError("renew", {}, OSError("connection refused"))

            monkeypatch.setattr(lease, "renew", unreachable)
            lost: list[str] = []
            await asyncio.wait_for(lease.run(0.1, lost.append), 30)
            assert lost == ["the lease of term 1 was not renewed before it expired"]
            assert tries >= 2, "it kept trying until the deadline"
            assert not lease.held()

    asyncio.run(main())


def test_a_deposed_leader_says_so_at_its_next_renewal(tmp_path: Path) -> None:
    async def main() -> None:
        async with database(tmp_path / "mdm.db") as sessions:
            old = Lease(sessions, "mdm1", 30.0)
            assert await old.try_acquire()
            assert await Lease(sessions, "mdm2", 30.0).try_acquire(force=True)
            lost: list[str] = []
            await asyncio.wait_for(old.run(0.1, lost.append), 30)
            assert lost == ["term 1 was taken over by another MDM"]

    asyncio.run(main())


def test_a_second_mdm_on_one_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mdm.db"
    config = MdmConfig(
        auth=AUTH,
        database=DatabaseConfig(url=url_of(path)),
        scrub=ScrubConfig(start_delay_s=3600.0),
        ha=HaConfig(name="mdm1"),
    )

    def app() -> web.Application:
        made = create_app(config)
        made.pre_freeze()  # as AppRunner: signals frozen, the state not yet
        return made

    async def main() -> None:
        first = app()
        await first.startup()
        try:
            second = app()
            with pytest.raises(LeaderError, match=f"another MDM is running on .*{path}"):
                await second.startup()
            await second.cleanup()
        finally:
            await first.shutdown()
            await first.cleanup()
        third = app()  # once the first has stopped, one may start again
        await third.startup()
        await third.shutdown()
        await third.cleanup()

    asyncio.run(main())
    with leader.sqlite_lock(url_of(path)), pytest.raises(LeaderError, match="SQLite serves one"):
        with leader.sqlite_lock(url_of(path)):
            pass


@pytest.mark.parametrize(
    "ha",
    [
        HaConfig(lease_s=0.5),
        HaConfig(lease_s=10.0, renew_interval_s=6.0),
        HaConfig(renew_interval_s=0.01),
        HaConfig(name="x" * 256),
    ],
)
def test_bad_ha_settings_are_refused(ha: HaConfig) -> None:
    with pytest.raises(ValueError, match=r"ha\."):
        MdmConfig(auth=AUTH, ha=ha)


def test_a_restore_raises_the_term_above_every_term_seen(tmp_path: Path) -> None:
    """As it raises the epochs (docs/mdm.md, "Backup and restore"): SDSs and SDCs refuse
    maps of a term older than one they saw, so the restored MDM leads in a term above
    any they can have seen; a copy without the lease row gets one."""

    async def main() -> None:
        async with database(tmp_path / "mdm.db") as sessions:
            assert await Lease(sessions, "mdm1", None).try_acquire(force=True)
        await backup.make_safe(url_of(tmp_path / "mdm.db"))
        async with database(tmp_path / "mdm.db") as sessions:
            assert await lease_row(sessions) == (1 + backup.EPOCH_MARGIN, "mdm1")
            again = Lease(sessions, "mdm1", None)
            assert await again.try_acquire(force=True)
            assert again.term == 2 + backup.EPOCH_MARGIN
        await backup.make_safe(url_of(tmp_path / "empty.db"))
        async with database(tmp_path / "empty.db") as sessions:
            assert await lease_row(sessions) == (backup.EPOCH_MARGIN, "")
            first = Lease(sessions, "mdm2", 30.0)
            assert await first.try_acquire(), "the row a restore adds is expired"
            assert first.term == 1 + backup.EPOCH_MARGIN

    asyncio.run(main())
