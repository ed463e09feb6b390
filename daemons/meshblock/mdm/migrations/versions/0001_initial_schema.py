"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 12:29:03.559054
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "cluster",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster")),
    )
    op.create_table(
        "protection_domains",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_protection_domains")),
        sa.UniqueConstraint("name", name=op.f("uq_protection_domains_name")),
    )
    op.create_table(
        "sdcs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("guid", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=True),
        sa.Column("control_port", sa.Integer(), nullable=True),
        sa.Column("nbd_port", sa.Integer(), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sdcs")),
        sa.UniqueConstraint("guid", name=op.f("uq_sdcs_guid")),
        sa.UniqueConstraint("name", name=op.f("uq_sdcs_name")),
    )
    op.create_table(
        "fault_sets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protection_domain_id", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["protection_domain_id"],
            ["protection_domains.id"],
            name=op.f("fk_fault_sets_protection_domain_id_protection_domains"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fault_sets")),
        sa.UniqueConstraint(
            "protection_domain_id", "name", name=op.f("uq_fault_sets_protection_domain_id")
        ),
    )
    op.create_table(
        "storage_pools",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protection_domain_id", sa.Integer(), nullable=False),
        sa.Column("pg_count", sa.Integer(), nullable=False),
        sa.Column("allocation_granularity_bytes", sa.BigInteger(), nullable=False),
        sa.Column("spare_percent", sa.Integer(), nullable=False),
        sa.Column("rebuild_bandwidth_mibps", sa.Integer(), nullable=False),
        sa.Column("rebuild_concurrency", sa.Integer(), nullable=False),
        sa.Column("rebalance_bandwidth_mibps", sa.Integer(), nullable=False),
        sa.Column("rebalance_concurrency", sa.Integer(), nullable=False),
        sa.Column("capacity_alert_high_percent", sa.Integer(), nullable=False),
        sa.Column("capacity_alert_critical_percent", sa.Integer(), nullable=False),
        sa.Column("map_epoch", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("pg_count > 0", name=op.f("ck_storage_pools_pg_count_positive")),
        sa.CheckConstraint(
            "spare_percent >= 0 AND spare_percent < 100", name=op.f("ck_storage_pools_spare_range")
        ),
        sa.ForeignKeyConstraint(
            ["protection_domain_id"],
            ["protection_domains.id"],
            name=op.f("fk_storage_pools_protection_domain_id_protection_domains"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_pools")),
        sa.UniqueConstraint("name", name=op.f("uq_storage_pools_name")),
    )
    op.create_table(
        "sdss",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("protection_domain_id", sa.Integer(), nullable=False),
        sa.Column("fault_set_id", sa.Integer(), nullable=True),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("data_port", sa.Integer(), nullable=False),
        sa.Column("control_port", sa.Integer(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["fault_set_id"], ["fault_sets.id"], name=op.f("fk_sdss_fault_set_id_fault_sets")
        ),
        sa.ForeignKeyConstraint(
            ["protection_domain_id"],
            ["protection_domains.id"],
            name=op.f("fk_sdss_protection_domain_id_protection_domains"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sdss")),
        sa.UniqueConstraint("name", name=op.f("uq_sdss_name")),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column(
            "type",
            sa.Enum("thin", "thick", name="volume_type", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("size_bytes > 0", name=op.f("ck_volumes_size_positive")),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["storage_pools.id"], name=op.f("fk_volumes_pool_id_storage_pools")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_volumes")),
        sa.UniqueConstraint("name", name=op.f("uq_volumes_name")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sds_id", sa.Integer(), nullable=False),
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=True),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=False),
        sa.Column("used_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("capacity_bytes > 0", name=op.f("ck_devices_capacity_positive")),
        sa.ForeignKeyConstraint(
            ["pool_id"], ["storage_pools.id"], name=op.f("fk_devices_pool_id_storage_pools")
        ),
        sa.ForeignKeyConstraint(["sds_id"], ["sdss.id"], name=op.f("fk_devices_sds_id_sdss")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("sds_id", "path", name=op.f("uq_devices_sds_id")),
    )
    op.create_table(
        "mappings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("volume_id", sa.Integer(), nullable=False),
        sa.Column("sdc_id", sa.Integer(), nullable=False),
        sa.Column(
            "access_mode",
            sa.Enum("read_write", "read_only", name="access_mode", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("iops_limit", sa.Integer(), nullable=True),
        sa.Column("bandwidth_limit_bps", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(["sdc_id"], ["sdcs.id"], name=op.f("fk_mappings_sdc_id_sdcs")),
        sa.ForeignKeyConstraint(
            ["volume_id"], ["volumes.id"], name=op.f("fk_mappings_volume_id_volumes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mappings")),
        sa.UniqueConstraint("volume_id", "sdc_id", name=op.f("uq_mappings_volume_id")),
    )
    op.create_table(
        "volume_usage",
        sa.Column("sds_id", sa.Integer(), nullable=False),
        sa.Column("volume_id", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sds_id"], ["sdss.id"], name=op.f("fk_volume_usage_sds_id_sdss"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["volume_id"],
            ["volumes.id"],
            name=op.f("fk_volume_usage_volume_id_volumes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sds_id", "volume_id", name=op.f("pk_volume_usage")),
    )
    op.create_table(
        "placement_groups",
        sa.Column("pool_id", sa.Integer(), nullable=False),
        sa.Column("pg", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("primary_device_id", sa.Integer(), nullable=True),
        sa.Column("secondary_device_id", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["pool_id"],
            ["storage_pools.id"],
            name=op.f("fk_placement_groups_pool_id_storage_pools"),
        ),
        sa.ForeignKeyConstraint(
            ["primary_device_id"],
            ["devices.id"],
            name=op.f("fk_placement_groups_primary_device_id_devices"),
        ),
        sa.ForeignKeyConstraint(
            ["secondary_device_id"],
            ["devices.id"],
            name=op.f("fk_placement_groups_secondary_device_id_devices"),
        ),
        sa.PrimaryKeyConstraint("pool_id", "pg", name=op.f("pk_placement_groups")),
    )


def downgrade() -> None:

    op.drop_table("placement_groups")
    op.drop_table("volume_usage")
    op.drop_table("mappings")
    op.drop_table("devices")
    op.drop_table("volumes")
    op.drop_table("sdss")
    op.drop_table("storage_pools")
    op.drop_table("fault_sets")
    op.drop_table("sdcs")
    op.drop_table("protection_domains")
    op.drop_table("cluster")
