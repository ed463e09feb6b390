"""Each pool's scrub schedule, kept across MDM restarts

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scrub_state",
        sa.Column("pool_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("pass_number", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("completed_at", sa.Float(), nullable=True),
        sa.Column("completed_pass", sa.BigInteger(), nullable=False),
        sa.Column("passes_completed", sa.BigInteger(), nullable=False),
        sa.Column("pgs_done", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_id"],
            ["storage_pools.id"],
            name=op.f("fk_scrub_state_pool_id_storage_pools"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("pool_id", name=op.f("pk_scrub_state")),
    )


def downgrade() -> None:
    op.drop_table("scrub_state")
