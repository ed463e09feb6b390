"""MGMT's database: engine, sessions and schema migrations.

SQLite (``sqlite+aiosqlite``, WAL mode, foreign keys on) is the default; PostgreSQL
(``postgresql+asyncpg``) is supported. At start the service brings the schema to its
head revision with Alembic and refuses a schema newer than it knows. Alembic's
bookkeeping lives in ``mgmt_alembic_version``, so MGMT may share a PostgreSQL
database with the MDM without the two tracking each other's revisions.
"""

from __future__ import annotations

import logging
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

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "mgmt_alembic_version"


class SchemaError(Exception):
    """The database schema cannot be used by this release."""


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and errors."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str, echo: bool = False) -> AsyncEngine:
    u = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo}
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite:
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = 5
        kwargs["max_overflow"] = 10
        kwargs["pool_pre_ping"] = True
    engine = _create_async_engine(u, **kwargs)
    if sqlite:
        event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
    return engine


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=NORMAL",
        "foreign_keys=ON",
        "busy_timeout=30000",
    ):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["version_table"] = VERSION_TABLE
    return cfg


def _upgrade_sync(conn: Connection) -> tuple[str | None, str]:
    cfg = alembic_config()
    scripts = ScriptDirectory.from_config(cfg)
    head = scripts.get_current_head()
    if head is None:
        raise SchemaError("MGMT ships no schema migrations (broken installation)")
    current = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE}
    ).get_current_revision()
    if current is not None:
        try:
            scripts.get_revision(current)
        except Exception:
            raise SchemaError(
                f"the MGMT database schema is at revision {current}, unknown to this "
                f"release (newest known: {head}): a newer release wrote it. Run that "
                "release, or restore a backup made before the upgrade."
            ) from None
    if current != head:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return current, head


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to this release's head revision, or raise SchemaError."""
    async with engine.begin() as conn:
        before, head = await conn.run_sync(_upgrade_sync)
    if before == head:
        log.info("database schema is current (%s)", head)
    else:
        log.info("database schema upgraded from %s to %s", before or "empty", head)
