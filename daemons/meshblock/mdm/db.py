"""The MDM's metadata store: engine, sessions and schema migrations.

SQLite (``sqlite+aiosqlite``) runs in WAL mode with foreign keys enforced;
PostgreSQL (``postgresql+asyncpg``) is the production engine. On start the daemon
brings an older schema up to date with Alembic and refuses a schema newer than
this release knows (a downgrade of the software), with a message that says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


class SchemaError(Exception):
    """The database schema cannot be used by this release."""


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, echo: bool = False) -> AsyncEngine:
    u = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 20
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(u, **kwargs)
    if u.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(conn: Connection) -> tuple[str | None, str]:
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    assert head is not None
    current = MigrationContext.configure(conn).get_current_revision()
    if current is not None:
        try:
            script.get_revision(current)
        except Exception:
            raise SchemaError(
                f"the database schema is at revision {current}, which this release of "
                f"meshblock does not know (newest known: {head}); it was written by a newer "
                "release. Run that release, or restore a backup made before the upgrade."
            ) from None
    if current != head:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current, head


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to this release's head revision, or raise SchemaError."""
    async with engine.begin() as conn:
        before, head = await conn.run_sync(_upgrade)
    if before != head:
        log.info("database schema upgraded from %s to %s", before or "empty", head)
    else:
        log.info("database schema is current (%s)", head)


class WriteGate:
    """Lets one write transaction at a time through, on SQLite.

    SQLite has a single writer. Without the gate, a transaction that holds the write
    lock while its coroutine waits for the event loop makes every other writer spin in
    SQLite's busy handler, and under load they give up ("database is locked"). Queued
    on an asyncio lock instead, writers wait their turn without a timeout. PostgreSQL
    needs no gate: its writers run concurrently.
    """

    def __init__(self, url: str) -> None:
        serial = make_url(url).get_backend_name() == "sqlite"
        self._lock = asyncio.Lock() if serial else None

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        if self._lock is None:
            yield
            return
        async with self._lock:
            yield
