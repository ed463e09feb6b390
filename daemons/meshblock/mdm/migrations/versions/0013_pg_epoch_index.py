"""An index on placement_groups (pool_id, epoch): a pool's PG rows written after a map
epoch (the rows a new map document patches in) and each pool's highest row epoch are
read through it instead of every row of the pool

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 20:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_placement_groups_pool_epoch", "placement_groups", ["pool_id", "epoch"])


def downgrade() -> None:
    op.drop_index("ix_placement_groups_pool_epoch", table_name="placement_groups")
