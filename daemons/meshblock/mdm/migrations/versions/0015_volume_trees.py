"""Each volume's tree (volumes.vtree_id, docs/snapshots.md): placement hashes it; every
volume that exists is its own tree, so it takes its own id and nothing moves

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-06 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from meshblock.mdm.idcounters import counter_kept

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("volumes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vtree_id", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_volumes_vtree_id", ["vtree_id"], unique=False)
    op.execute("UPDATE volumes SET vtree_id = id")


def downgrade() -> None:
    # SQLite recreates the table to drop the column: it keeps AUTOINCREMENT only if
    # told (see 0004) and its id counter only if set back (counter_kept)
    with (
        counter_kept(op.get_bind(), "volumes"),
        op.batch_alter_table(
            "volumes", schema=None, table_kwargs={"sqlite_autoincrement": True}
        ) as batch_op,
    ):
        batch_op.drop_index("ix_volumes_vtree_id")
        batch_op.drop_column("vtree_id")
