"""The MDM's metadata store: the shared SQL store (:mod:`meshblock.sqlstore`) with the
MDM's own migrations, whose bookkeeping is Alembic's default ``alembic_version``."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config as AlembicConfig
from sqlalchemy.ext.asyncio import AsyncEngine

from meshblock.sqlstore import (
    Migrations,
    SchemaError,
    WriteGate,
    create_engine,
    redact_url,
    session_factory,
)

__all__ = [
    "MIGRATIONS_DIR",
    "SchemaError",
    "WriteGate",
    "alembic_config",
    "create_engine",
    "migrate",
    "redact_url",
    "session_factory",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATIONS = Migrations(MIGRATIONS_DIR, "alembic_version", "the MDM")


def alembic_config() -> AlembicConfig:
    return MIGRATIONS.config()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to this release's head revision, or raise SchemaError."""
    await MIGRATIONS.migrate(engine)
