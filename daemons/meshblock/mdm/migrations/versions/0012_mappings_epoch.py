"""Each pool's mappings epoch (storage_pools.mappings_epoch): the SDSs follow the
volume-to-SDC mappings of their pools by it

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("storage_pools", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("mappings_epoch", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("storage_pools", schema=None) as batch_op:
        batch_op.drop_column("mappings_epoch")
