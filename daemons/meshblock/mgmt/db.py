"""MGMT's database: the shared SQL store (:mod:`meshblock.sqlstore`) with MGMT's own
migrations. Alembic's bookkeeping lives in ``mgmt_alembic_version``, so MGMT may share
a PostgreSQL database with the MDM without the two tracking each other's revisions."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config as AlembicConfig
from sqlalchemy.ext.asyncio import AsyncEngine

from meshblock.sqlstore import (
    Migrations,
    SchemaError,
    create_engine,
    redact_url,
    session_factory,
)

__all__ = [
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "SchemaError",
    "alembic_config",
    "create_engine",
    "migrate",
    "redact_url",
    "session_factory",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "mgmt_alembic_version"
MIGRATIONS = Migrations(MIGRATIONS_DIR, VERSION_TABLE, "MGMT")


def alembic_config() -> AlembicConfig:
    return MIGRATIONS.config()


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to this release's head revision, or raise SchemaError."""
    await MIGRATIONS.migrate(engine)
