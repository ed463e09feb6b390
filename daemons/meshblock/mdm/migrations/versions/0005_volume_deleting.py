"""Volumes: state (active, deleting) and the epoch of their tombstone; a name is
unique among active volumes only

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 04:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state = 'active'")


def upgrade() -> None:
    # Batch mode recreates the table on SQLite from what it reflects, which does not
    # include AUTOINCREMENT (0004): every batch on these tables must say it again.
    with op.batch_alter_table(
        "volumes", schema=None, table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.add_column(
            sa.Column(
                "state",
                sa.Enum("active", "deleting", name="volume_state", native_enum=False, length=16),
                server_default="active",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("deleted_epoch", sa.BigInteger(), nullable=True))
        batch_op.drop_constraint("uq_volumes_name", type_="unique")
    op.create_index(
        "uq_volumes_name_active",
        "volumes",
        ["name"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_volumes_name_active", table_name="volumes")
    op.execute("DELETE FROM volumes WHERE state <> 'active'")
    with op.batch_alter_table(
        "volumes", schema=None, table_kwargs={"sqlite_autoincrement": True}
    ) as batch_op:
        batch_op.create_unique_constraint("uq_volumes_name", ["name"])
        batch_op.drop_column("deleted_epoch")
        batch_op.drop_column("state")
