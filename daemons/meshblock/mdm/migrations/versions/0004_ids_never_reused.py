"""Ids never reused: SQLite AUTOINCREMENT on every table whose id names data

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 04:05:00

Without ``AUTOINCREMENT`` SQLite hands out ``max(id) + 1``: deleting the newest volume
gives its id to the next one, and the chunks an SDS still holds under that id would be
served to it. With it, SQLite keeps the highest id ever used in ``sqlite_sequence``. The
tables are those whose ids name something on an SDS or an SDC: volumes (chunk keys),
devices and SDSs (PG maps, the SDS's registration), storage pools (map epochs) and SDCs
(their registration). PostgreSQL's sequences never go back: nothing to do there.

SQLite cannot add ``AUTOINCREMENT`` to a table: each is recreated (Alembic's batch
mode) inside the migration's transaction, with foreign keys off (see
:meth:`meshblock.sqlstore.Migrations.migrate`), so that dropping a parent neither
cascades to its children nor is refused; the keys are checked before the commit.
A later migration that alters one of these tables in batch mode must pass
``table_kwargs={"sqlite_autoincrement": True}``: SQLite's reflection does not carry it
(tests/test_migrations.py catches a migration that loses it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("storage_pools", "sdss", "devices", "sdcs", "volumes")


def _recreate(autoincrement: bool) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    if bind.execute(sa.text("PRAGMA foreign_keys")).scalar():
        raise RuntimeError("migration 0004 needs SQLite's foreign keys off (sqlstore.migrate)")
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)
