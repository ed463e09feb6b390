"""Each pool's map epoch in a restored backup, before the restore raised it

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "restore_pool_epochs",
        sa.Column("pool_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("map_epoch", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_id"],
            ["storage_pools.id"],
            name=op.f("fk_restore_pool_epochs_pool_id_storage_pools"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pool_id", name=op.f("pk_restore_pool_epochs")),
    )


def downgrade() -> None:
    op.drop_table("restore_pool_epochs")
