"""Hold-downs kept across restarts: an SDS held down or flapping (sdss.hold_state)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sdss", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hold_state", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sdss", schema=None) as batch_op:
        batch_op.drop_column("hold_state")
