"""Rebuild and rebalance: PG state rebuilding, PG move targets, SDS modes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 15:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # pg_state is a plain string column (no native enum, no CHECK): the new value
    # ``rebuilding`` needs no change to it.
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.add_column(sa.Column("target_device_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("moving", sa.String(length=16), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_placement_groups_target_device_id_devices"),
            "devices",
            ["target_device_id"],
            ["id"],
        )
    with op.batch_alter_table("sdss", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "mode",
                sa.Enum(
                    "normal",
                    "maintenance",
                    "draining",
                    name="sds_mode",
                    native_enum=False,
                    length=16,
                ),
                server_default="normal",
                nullable=False,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("sdss", schema=None) as batch_op:
        batch_op.drop_column("mode")
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_placement_groups_target_device_id_devices"), type_="foreignkey"
        )
        batch_op.drop_column("moving")
        batch_op.drop_column("target_device_id")
