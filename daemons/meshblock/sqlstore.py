"""The SQL store shared by the MDM and MGMT: engines, sessions, schema migrations.

SQLite (``sqlite+aiosqlite``) runs in WAL mode with foreign keys enforced and
``synchronous=FULL``: every commit is fsynced to the WAL before it is acknowledged, so a
power cut never takes back a committed change (with ``NORMAL`` the last commits before
the cut may vanish: a PG-map epoch that SDSs already saw could go backwards).
PostgreSQL (``postgresql+asyncpg``) is the production engine.

Each daemon has its own Alembic migrations (:class:`Migrations`) and version table, so
that both may share one PostgreSQL database. On start a daemon brings an older schema
up to date and refuses a schema newer than it knows (a downgrade of the software) with
a message that says so. The upgrade is one transaction, DDL included, on both engines:
a crash in the middle leaves the schema as it was before, and the next start runs the
whole upgrade again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

log = logging.getLogger(__name__)

#: Test-only fault injection: with this set to N, the migration runner SIGKILLs its
#: own process right after the N-th DDL statement of an upgrade, to show that the
#: upgrade is all-or-nothing. Nobody sets a variable of this name by accident.
KILL_AFTER_DDL_ENV = "MESHBLOCK_TEST_ONLY_SIGKILL_AFTER_DDL"
_DDL_VERBS = frozenset({"CREATE", "ALTER", "DROP"})


class SchemaError(Exception):
    """The database schema cannot be used by this release."""


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, echo: bool = False, pool_size: int = 10) -> AsyncEngine:
    u = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite:
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = 2 * pool_size
        kwargs["pool_pre_ping"] = True
    engine = _create_async_engine(u, **kwargs)
    if sqlite:
        event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
    return engine


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON",
                   "busy_timeout=30000"):  # fmt: skip
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def session_factory(
    engine: AsyncEngine, info: dict[str, Any] | None = None
) -> async_sessionmaker[AsyncSession]:
    """Sessions of ``engine``; each starts with a copy of ``info`` as its ``info``."""
    return async_sessionmaker(engine, expire_on_commit=False, info=info)


class Migrations:
    """One daemon's Alembic migrations: ``directory`` and its version table."""

    def __init__(self, directory: Path, version_table: str, owner: str) -> None:
        self.directory = directory
        self.version_table = version_table
        self.owner = owner  # "the MDM", "MGMT": for messages

    def config(self) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(self.directory))
        cfg.attributes["version_table"] = self.version_table
        return cfg

    def _upgrade(self, conn: Connection) -> tuple[str | None, str]:
        cfg = self.config()
        scripts = ScriptDirectory.from_config(cfg)
        head = scripts.get_current_head()
        if head is None:
            raise SchemaError(f"{self.owner} ships no schema migrations (broken installation)")
        current = MigrationContext.configure(
            conn, opts={"version_table": self.version_table}
        ).get_current_revision()
        if current is not None:
            try:
                scripts.get_revision(current)
            except Exception:
                raise SchemaError(
                    f"the database schema of {self.owner} is at revision {current}, which "
                    f"this release of meshblock does not know (newest known: {head}); it was "
                    "written by a newer release. Run that release, or restore a backup made "
                    "before the upgrade."
                ) from None
        if current != head:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        return current, head

    def _upgrade_in_one_transaction(self, conn: Connection) -> tuple[str | None, str]:
        with _transactional_ddl(conn), _kill_after_ddl(conn), conn.begin():
            revisions = self._upgrade(conn)
            if conn.dialect.name == "sqlite":
                bad = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if bad:
                    raise SchemaError(
                        f"the migration of {self.owner}'s schema left rows whose "
                        f"foreign keys point nowhere: {bad[:5]}; nothing was changed"
                    )
            return revisions

    async def migrate(self, engine: AsyncEngine) -> None:
        """Bring the schema to this release's head revision, or raise SchemaError.

        On SQLite foreign keys are off while migrations run (a migration that recreates
        a parent table must not cascade to, or be refused by, its children: Alembic's
        batch mode) and checked before the transaction commits.
        """
        sqlite = engine.dialect.name == "sqlite"
        async with engine.connect() as conn:
            if sqlite:
                # Outside any transaction: SQLite ignores this pragma inside one.
                await conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
                await conn.commit()
            try:
                before, head = await conn.run_sync(self._upgrade_in_one_transaction)
            finally:
                if sqlite:
                    await conn.exec_driver_sql("PRAGMA foreign_keys = ON")
                    await conn.commit()
        if before != head:
            log.info("database schema upgraded from %s to %s", before or "empty", head)
        else:
            log.info("database schema is current (%s)", head)


@contextmanager
def _transactional_ddl(conn: Connection) -> Iterator[None]:
    """Make the transactions of ``conn`` cover DDL on SQLite.

    Python's sqlite3 driver (under aiosqlite too) opens a transaction only before
    INSERT, UPDATE, DELETE and REPLACE: a CREATE TABLE runs in autocommit, so a crash
    in the middle of a migration left some tables created and the revision not
    recorded, and every later start failed on "table ... already exists". As
    SQLAlchemy documents for pysqlite, the driver's own handling is switched off
    (``isolation_level = None``) and SQLAlchemy's begin emits the BEGIN itself;
    IMMEDIATE takes the write lock at once, so two daemons starting on one file
    upgrade one after the other. The connection is set back afterwards.
    """
    if conn.dialect.name != "sqlite":
        yield  # PostgreSQL: DDL is transactional, asyncpg begins before the first one
        return
    dbapi_conn: Any = conn.connection.dbapi_connection
    previous = dbapi_conn.isolation_level

    def begin(c: Connection) -> None:
        c.exec_driver_sql("BEGIN IMMEDIATE")

    dbapi_conn.isolation_level = None
    event.listen(conn, "begin", begin)
    try:
        yield
    finally:
        event.remove(conn, "begin", begin)
        dbapi_conn.isolation_level = previous


@contextmanager
def _kill_after_ddl(conn: Connection) -> Iterator[None]:
    """The test-only hook of :data:`KILL_AFTER_DDL_ENV`; nothing when it is unset."""
    raw = os.environ.get(KILL_AFTER_DDL_ENV)
    if not raw:
        yield
        return
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        log.warning("ignoring %s=%r: not a positive number", KILL_AFTER_DDL_ENV, raw)
        yield
        return
    log.warning("%s=%d: this process kills itself during the migration", KILL_AFTER_DDL_ENV, limit)
    count = 0

    def after(c: Connection, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal count
        words = statement.split(None, 1)
        if words and words[0].upper() in _DDL_VERBS:
            count += 1
            if count == limit:
                os.kill(os.getpid(), signal.SIGKILL)

    event.listen(conn, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(conn, "after_cursor_execute", after)


class WriteGate:
    """Lets the MDM's write transactions through one at a time, on every engine.

    - **SQLite** has a single writer. Without the gate, a transaction that holds the
      write lock while its coroutine waits for the event loop makes every other writer
      spin in SQLite's busy handler, and under load they give up ("database is
      locked"). Queued on an asyncio lock instead, writers wait their turn without a
      timeout.
    - **PostgreSQL** would run them concurrently, at READ COMMITTED. A change of the
      object model (an API change, the failure detector, the rebalancer) reads rows
      (PG maps, capacities, modes) and writes what it computed from them: two at once
      could commit a PG map computed from rows the other changed meanwhile (a lost
      update), and the heartbeat recorder, which updates SDS rows then device rows,
      would take row locks in the opposite order to an SDS removal (a deadlock).

    The gate orders the writers of one MDM process; several MDMs on one PostgreSQL
    share the leader lease of the MDM (mdm/leader.py, docs/mdm.md), under which only
    one writes.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        async with self._lock:
            yield
