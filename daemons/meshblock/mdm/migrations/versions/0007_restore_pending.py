"""The durable marker of a restore: SDSs not yet reported since (restore_pending)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 05:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "restore_pending",
        sa.Column("sds_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.ForeignKeyConstraint(
            ["sds_id"],
            ["sdss.id"],
            name=op.f("fk_restore_pending_sds_id_sdss"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sds_id", name=op.f("pk_restore_pending")),
    )


def downgrade() -> None:
    op.drop_table("restore_pending")
