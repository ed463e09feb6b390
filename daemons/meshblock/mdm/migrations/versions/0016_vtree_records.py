"""The MDM's records of volume trees (docs/snapshots.md, "The MDM's records"): the
trees with more than one volume or version (vtrees) and their versions
(vtree_versions), and per volume its view, whether it writes it and its source. Every
volume that exists is a tree of one: view 0, writable, no source, and no tree rows

Revision ID: 0016
Revises: 0014
Create Date: 2026-12-07 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meshblock.mdm.idcounters import counter_kept

revision: str = "0016"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEEP_AUTOINCREMENT = {"sqlite_autoincrement": True}


def upgrade() -> None:
    op.create_table(
        "vtrees",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("next_version", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["pool_id"],
            ["storage_pools.id"],
            name=op.f("fk_vtrees_pool_id_storage_pools"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vtrees")),
    )
    with op.batch_alter_table("vtrees", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_vtrees_pool_id"), ["pool_id"], unique=False)
    op.create_table(
        "vtree_versions",
        sa.Column("vtree_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("parent", sa.BigInteger(), nullable=True),
        sa.Column(
            "state",
            sa.Enum("live", "dead", name="vtree_version_state", native_enum=False, length=16),
            server_default="live",
            nullable=False,
        ),
        sa.Column("created_epoch", sa.BigInteger(), nullable=False),
        sa.Column("dead_epoch", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["vtree_id"],
            ["vtrees.id"],
            name=op.f("fk_vtree_versions_vtree_id_vtrees"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("vtree_id", "version", name=op.f("pk_vtree_versions")),
    )
    # Constant defaults only: SQLite then adds the columns in place (ALTER TABLE ADD
    # COLUMN). A recreated volumes table would start its AUTOINCREMENT sequence at the
    # highest id left, not the highest ever used, and hand out a deleted volume's id.
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("view_version", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("writable", sa.Boolean(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("source_volume_id", sa.BigInteger(), nullable=True))
    # The map build finds the volumes reading a version of a tree (mdm/vtrees.py) by
    # both columns; the index replaces 0015's on vtree_id alone (its leading column).
    op.create_index("ix_volumes_vtree_view", "volumes", ["vtree_id", "view_version"])
    op.drop_index("ix_volumes_vtree_id", table_name="volumes")


def downgrade() -> None:
    op.create_index("ix_volumes_vtree_id", "volumes", ["vtree_id"])
    op.drop_index("ix_volumes_vtree_view", table_name="volumes")
    # (SQLite: a recreated volumes table keeps AUTOINCREMENT only if told, see 0004,
    # and its counter only if set back: counter_kept)
    with (
        counter_kept(op.get_bind(), "volumes"),
        op.batch_alter_table("volumes", schema=None, table_kwargs=KEEP_AUTOINCREMENT) as batch_op,
    ):
        batch_op.drop_column("source_volume_id")
        batch_op.drop_column("writable")
        batch_op.drop_column("view_version")
    op.drop_table("vtree_versions")
    with op.batch_alter_table("vtrees", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vtrees_pool_id"))
    op.drop_table("vtrees")
