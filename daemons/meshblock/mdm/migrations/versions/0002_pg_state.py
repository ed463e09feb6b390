"""PG state: clean, degraded or inactive

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 13:41:27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "state",
                sa.Enum(
                    "clean", "degraded", "inactive", name="pg_state", native_enum=False, length=16
                ),
                server_default="clean",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.drop_column("state")
