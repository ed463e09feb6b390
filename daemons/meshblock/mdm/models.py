"""The MDM's object model, in SQLAlchemy 2.0's typed declarative ORM.

System (``cluster`` row) -> protection domains -> {fault sets, SDSs -> devices,
storage pools -> volumes -> mappings}; SDCs; and the PG map of each pool
(``placement_groups``). Relationships load with ``lazy="raise"``: async code names
what it loads with ``selectinload``.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Mapper,
    attributes,
    mapped_column,
    relationship,
)

from meshblock.orm import NAMING_CONVENTION, created_at, intpk
from meshblock.orm import str_enum as _enum

name_str = Annotated[str, mapped_column(String(64))]
bytes_int = Annotated[int, mapped_column(BigInteger)]

# Table options of every table whose id names something on an SDS or an SDC (a
# volume's chunks, a device or an SDS in a PG map, a pool's map epochs, an SDC's
# registration): the id is never handed out again. SQLite otherwise reuses the highest
# id once its row is deleted; PostgreSQL's sequences never go back.
NEVER_REUSED = {"sqlite_autoincrement": True}


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class VolumeType(enum.StrEnum):
    THIN = "thin"
    THICK = "thick"


class PgState(enum.StrEnum):
    """Where a PG stands (see docs/mdm.md, "Failures").

    ``clean``: both copies in sync on connected SDSs. ``degraded``: the primary is the
    one copy that takes IO; the secondary is stale (its SDS is down, or back but not
    yet resynchronised). ``resyncing``: the secondary's SDS is back; the primary
    forwards new writes to it and copies what it missed; it is not read until the
    primary reports the copy done. ``rebuilding``: the secondary is a new, empty copy
    on another SDS; the primary forwards new writes to it and copies every chunk of
    the PG to it. ``inactive``: no copy can serve; IO waits.
    """

    CLEAN = "clean"
    DEGRADED = "degraded"
    REBUILDING = "rebuilding"
    RESYNCING = "resyncing"
    INACTIVE = "inactive"


class SdsMode(enum.StrEnum):
    """What the operator asked of an SDS (its liveness is separate: heartbeats).

    ``normal``: serves its copies. ``maintenance``: a planned outage; its copies are
    stale while it lasts and resynchronised (a delta) on exit; nothing is rebuilt away
    from it. ``draining``: rebalance moves every copy off it, after which it may be
    removed.
    """

    NORMAL = "normal"
    MAINTENANCE = "maintenance"
    DRAINING = "draining"


class VolumeState(enum.StrEnum):
    """``active``: a volume. ``deleting``: deleted by the operator; its id is tombstoned
    in its pool's PG maps and the SDSs free its chunks; its name is free again. The
    row goes (the id stays reserved) once every SDS of the pool reports none left."""

    ACTIVE = "active"
    DELETING = "deleting"


class DeviceState(enum.StrEnum):
    """What the MDM knows of a device (see docs/mdm.md, "Device states").

    ``normal``: takes copies. ``failed``: its SDS reported an IO error on it (the SDS
    fails a device for good at its first error: fail-stop). Its copies are stale at
    once (their PGs degraded, the other copy primary) and rebuilt on other devices;
    nothing is placed on it again and its capacity no longer counts. It stays failed
    until the operator removes it (``meshctl sds device-remove``).
    """

    NORMAL = "normal"
    FAILED = "failed"


class AccessMode(enum.StrEnum):
    READ_WRITE = "read_write"
    READ_ONLY = "read_only"


class Cluster(Base):
    """The single row that holds cluster-wide state, notably the change epoch."""

    __tablename__ = "cluster"

    id: Mapped[intpk]
    name: Mapped[name_str]
    epoch: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[created_at]


class ProtectionDomain(Base):
    __tablename__ = "protection_domains"

    id: Mapped[intpk]
    name: Mapped[name_str] = mapped_column(unique=True)
    created_at: Mapped[created_at]

    fault_sets: Mapped[list[FaultSet]] = relationship(
        back_populates="protection_domain", lazy="raise"
    )
    pools: Mapped[list[StoragePool]] = relationship(
        back_populates="protection_domain", lazy="raise"
    )
    sdss: Mapped[list[Sds]] = relationship(back_populates="protection_domain", lazy="raise")


class FaultSet(Base):
    __tablename__ = "fault_sets"
    __table_args__ = (UniqueConstraint("protection_domain_id", "name"),)

    id: Mapped[intpk]
    name: Mapped[name_str]
    protection_domain_id: Mapped[int] = mapped_column(ForeignKey("protection_domains.id"))
    created_at: Mapped[created_at]

    protection_domain: Mapped[ProtectionDomain] = relationship(
        back_populates="fault_sets", lazy="raise"
    )


class StoragePool(Base):
    __tablename__ = "storage_pools"
    __table_args__ = (
        CheckConstraint("pg_count > 0", name="pg_count_positive"),
        CheckConstraint("spare_percent >= 0 AND spare_percent < 100", name="spare_range"),
        NEVER_REUSED,
    )

    id: Mapped[intpk]
    name: Mapped[name_str] = mapped_column(unique=True)
    protection_domain_id: Mapped[int] = mapped_column(ForeignKey("protection_domains.id"))
    pg_count: Mapped[int] = mapped_column(default=256)
    allocation_granularity_bytes: Mapped[bytes_int]
    spare_percent: Mapped[int] = mapped_column(default=10)
    # Throttles: bandwidth per device (MiB/s, 0 = unlimited) and concurrent chunk copies.
    rebuild_bandwidth_mibps: Mapped[int] = mapped_column(default=0)
    rebuild_concurrency: Mapped[int] = mapped_column(default=4)
    rebalance_bandwidth_mibps: Mapped[int] = mapped_column(default=50)
    rebalance_concurrency: Mapped[int] = mapped_column(default=2)
    # Capacity alert thresholds, percent of usable capacity.
    capacity_alert_high_percent: Mapped[int] = mapped_column(default=80)
    capacity_alert_critical_percent: Mapped[int] = mapped_column(default=90)
    map_epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    # Moved by every change of the mappings of the pool's volumes: what the SDSs follow
    # them by (GET /api/v1/pools/{id}/mappings, meshblock.mdm.mappings).
    mappings_epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[created_at]

    protection_domain: Mapped[ProtectionDomain] = relationship(back_populates="pools", lazy="raise")
    volumes: Mapped[list[Volume]] = relationship(back_populates="pool", lazy="raise")
    devices: Mapped[list[Device]] = relationship(back_populates="pool", lazy="raise")


class Sds(Base):
    __tablename__ = "sdss"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[intpk]
    name: Mapped[name_str] = mapped_column(unique=True)
    protection_domain_id: Mapped[int] = mapped_column(ForeignKey("protection_domains.id"))
    fault_set_id: Mapped[int | None] = mapped_column(ForeignKey("fault_sets.id"))
    address: Mapped[str] = mapped_column(String(255))
    data_port: Mapped[int] = mapped_column(default=7072)
    control_port: Mapped[int] = mapped_column(default=7073)
    mode: Mapped[SdsMode] = mapped_column(
        _enum(SdsMode, "sds_mode"), default=SdsMode.NORMAL, server_default=SdsMode.NORMAL.value
    )
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Held down or flapping (meshblock.mdm.holddown.to_stored); NULL: nothing to keep
    hold_state: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[created_at]

    protection_domain: Mapped[ProtectionDomain] = relationship(back_populates="sdss", lazy="raise")
    fault_set: Mapped[FaultSet | None] = relationship(lazy="raise")
    devices: Mapped[list[Device]] = relationship(
        back_populates="sds", lazy="raise", order_by="Device.id"
    )


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("sds_id", "path"),
        CheckConstraint("capacity_bytes > 0", name="capacity_positive"),
        NEVER_REUSED,
    )

    id: Mapped[intpk]
    sds_id: Mapped[int] = mapped_column(ForeignKey("sdss.id"))
    pool_id: Mapped[int] = mapped_column(ForeignKey("storage_pools.id"))
    path: Mapped[str] = mapped_column(String(1024))
    name: Mapped[str | None] = mapped_column(String(64))
    capacity_bytes: Mapped[bytes_int]
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[DeviceState] = mapped_column(
        _enum(DeviceState, "device_state"),
        default=DeviceState.NORMAL,
        server_default=DeviceState.NORMAL.value,
    )
    failed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[created_at]

    sds: Mapped[Sds] = relationship(back_populates="devices", lazy="raise")
    pool: Mapped[StoragePool] = relationship(back_populates="devices", lazy="raise")


class Sdc(Base):
    __tablename__ = "sdcs"
    __table_args__ = (NEVER_REUSED,)

    id: Mapped[intpk]
    guid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[name_str] = mapped_column(unique=True)
    address: Mapped[str | None] = mapped_column(String(255))
    control_port: Mapped[int | None]
    nbd_port: Mapped[int | None]
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[created_at]

    mappings: Mapped[list[Mapping]] = relationship(back_populates="sdc", lazy="raise")


class Volume(Base):
    __tablename__ = "volumes"
    __table_args__ = (
        CheckConstraint("size_bytes > 0", name="size_positive"),
        # A name is unique among active volumes: a deleting one gives it up at once.
        Index(
            "uq_volumes_name_active",
            "name",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
        # A tree's volumes, and those reading one of its versions (the map build's
        # tree query, mdm/vtrees.py): one index serves both (migration 0016).
        Index("ix_volumes_vtree_view", "vtree_id", "view_version"),
        NEVER_REUSED,
    )

    id: Mapped[intpk]
    name: Mapped[name_str]
    pool_id: Mapped[int] = mapped_column(ForeignKey("storage_pools.id"))
    type: Mapped[VolumeType] = mapped_column(_enum(VolumeType, "volume_type"))
    size_bytes: Mapped[bytes_int]
    state: Mapped[VolumeState] = mapped_column(
        _enum(VolumeState, "volume_state"),
        default=VolumeState.ACTIVE,
        server_default=VolumeState.ACTIVE.value,
    )
    # The pool's map epoch that carries the volume's tombstone (deleting volumes).
    deleted_epoch: Mapped[int | None] = mapped_column(BigInteger)
    # The volume tree it belongs to (docs/snapshots.md): its chunks are placed by it
    # (chunks.pg_of). The id of the tree's first volume, so a volume that is not a
    # snapshot or a clone has its own id: set by the INSERT's own flush (below), never
    # NULL once the transaction that created the volume commits.
    vtree_id: Mapped[int] = mapped_column(BigInteger, nullable=True)
    # The version of its tree it reads (its view), and whether it writes it (its head;
    # false: a read-only snapshot). A volume of a tree of one reads and writes version
    # 0, the defaults, and its tree has no rows in ``vtrees`` (docs/snapshots.md).
    view_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # ("1": true on both engines, and a constant: see migration 0016)
    writable: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    # The volume it was made from (a snapshot's or a clone's source, for ``volume
    # tree``); NULL for the first volume of a tree. No foreign key: the source may be
    # deleted first (its id is never reused).
    source_volume_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[created_at]

    pool: Mapped[StoragePool] = relationship(back_populates="volumes", lazy="raise")
    mappings: Mapped[list[Mapping]] = relationship(back_populates="volume", lazy="raise")


@event.listens_for(Volume, "after_insert")
def _volume_starts_its_tree(_mapper: Mapper[Volume], conn: Connection, volume: Volume) -> None:
    """A volume inserted without a tree starts its own: ``vtree_id`` = its id, which
    the INSERT has just returned (one UPDATE by primary key, in the same flush)."""
    if volume.vtree_id is None:
        conn.execute(update(Volume).where(Volume.id == volume.id).values(vtree_id=volume.id))
        attributes.set_committed_value(volume, "vtree_id", volume.id)


class VtreeVersionState(enum.StrEnum):
    """``live``: the view of a volume, or an ancestor of a live version. ``dead``: read
    by no volume any more; the SDSs free its blocks, and the row goes once every SDS of
    the pool reports no slot of it (docs/snapshots.md, Decision 5)."""

    LIVE = "live"
    DEAD = "dead"


class Vtree(Base):
    """A volume tree with more than one volume or version (docs/snapshots.md, "The
    MDM's records"): its id is its first volume's (``volumes.vtree_id``), and the next
    version number it hands out. A tree of one volume, every volume made before
    snapshots, has no row: tree = volume id, view = head = version 0."""

    __tablename__ = "vtrees"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    pool_id: Mapped[int] = mapped_column(
        ForeignKey("storage_pools.id", ondelete="CASCADE"), index=True
    )
    next_version: Mapped[int] = mapped_column(BigInteger, default=1)
    created_at: Mapped[created_at]


class VtreeVersion(Base):
    """One version of a tree: its parent (NULL: the root), whether it is live, and the
    pool's map epochs of its creation and of its death. Every row is in the pool's
    map until it is dropped (:mod:`meshblock.mdm.vtrees`)."""

    __tablename__ = "vtree_versions"

    vtree_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("vtrees.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[VtreeVersionState] = mapped_column(
        _enum(VtreeVersionState, "vtree_version_state"),
        default=VtreeVersionState.LIVE,
        server_default=VtreeVersionState.LIVE.value,
    )
    created_epoch: Mapped[int] = mapped_column(BigInteger)
    dead_epoch: Mapped[int | None] = mapped_column(BigInteger)


class Mapping(Base):
    __tablename__ = "mappings"
    __table_args__ = (UniqueConstraint("volume_id", "sdc_id"),)

    id: Mapped[intpk]
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id"))
    sdc_id: Mapped[int] = mapped_column(ForeignKey("sdcs.id"))
    access_mode: Mapped[AccessMode] = mapped_column(_enum(AccessMode, "access_mode"))
    iops_limit: Mapped[int | None]
    bandwidth_limit_bps: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[created_at]

    volume: Mapped[Volume] = relationship(back_populates="mappings", lazy="raise")
    sdc: Mapped[Sdc] = relationship(back_populates="mappings", lazy="raise")


class PlacementGroup(Base):
    """One PG of a pool's map: its primary and secondary devices.

    ``target_device_id``: a rebalance move in progress; the primary forwards new
    writes to the target too and copies the PG to it; when done the target replaces
    ``moving`` (``primary`` or ``secondary``) and the PG stays clean throughout.
    """

    __tablename__ = "placement_groups"
    # A pool's rows written after a map epoch (pgmaps._PG_ROWS_SINCE) and its highest
    # row epoch (pgtable.row_keys), read at every new map epoch of the pool.
    __table_args__ = (Index("ix_placement_groups_pool_epoch", "pool_id", "epoch"),)

    pool_id: Mapped[int] = mapped_column(ForeignKey("storage_pools.id"), primary_key=True)
    pg: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    primary_device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    secondary_device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[PgState] = mapped_column(
        _enum(PgState, "pg_state"), default=PgState.CLEAN, server_default=PgState.CLEAN.value
    )
    target_device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"))
    moving: Mapped[str | None] = mapped_column(String(16))


class VolumeUsage(Base):
    """Chunks of a volume that one SDS reports it stores (each copy counts)."""

    __tablename__ = "volume_usage"

    sds_id: Mapped[int] = mapped_column(ForeignKey("sdss.id", ondelete="CASCADE"), primary_key=True)
    volume_id: Mapped[int] = mapped_column(
        ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    chunks: Mapped[int] = mapped_column(BigInteger, default=0)


class RestorePending(Base):
    """The durable marker of a restore (``meshblock-mdm restore``): one row per SDS
    registered in the restored database that has not reported since. While any row is
    left, the reconciliation acts on the volumes and tombstones SDSs report
    (:mod:`meshblock.mdm.reconcile`); an SDS's row goes once its report is reconciled,
    or with the SDS itself."""

    __tablename__ = "restore_pending"

    sds_id: Mapped[int] = mapped_column(
        ForeignKey("sdss.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )


class RestorePoolEpoch(Base):
    """Each pool's map epoch in the backup, before ``meshblock-mdm restore`` raised it:
    a tombstone an SDS reports is newer than the backup only if its epoch is above."""

    __tablename__ = "restore_pool_epochs"

    pool_id: Mapped[int] = mapped_column(
        ForeignKey("storage_pools.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    map_epoch: Mapped[int] = mapped_column(BigInteger)


class ScrubState(Base):
    """A pool's background scrub schedule (:mod:`meshblock.mdm.scrub`), kept so that a
    restarted MDM resumes it: the pass, its state, when it started, the PGs done in it
    (a bitmap: bit ``pg & 7`` of byte ``pg >> 3``), the last complete pass and when
    the next one is due. Times are seconds since the epoch. The counters and findings
    are not kept (since the MDM started)."""

    __tablename__ = "scrub_state"

    pool_id: Mapped[int] = mapped_column(
        ForeignKey("storage_pools.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    pass_number: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    completed_pass: Mapped[int] = mapped_column(BigInteger)
    passes_completed: Mapped[int] = mapped_column(BigInteger)
    pgs_done: Mapped[bytes] = mapped_column(LargeBinary)


class JoinToken(Base):
    """A join token (``meshctl sds join-token create``): lets new SDSs register,
    ``max_uses`` of them, until ``expires_at``. The token is ``TOKEN_ID.SECRET``; only
    the SHA-256 of the secret is stored (the secret is 160 random bits: a slow hash
    would add nothing), so that the store, a backup or a read of this table does not
    hand it out."""

    __tablename__ = "join_tokens"
    __table_args__ = (
        CheckConstraint("max_uses > 0", name="max_uses_positive"),
        CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses_range"),
    )

    id: Mapped[intpk]
    token_id: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(255))
    max_uses: Mapped[int]
    uses: Mapped[int] = mapped_column(default=0)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str | None] = mapped_column(String(128))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[created_at]


class JoinState(enum.StrEnum):
    """Where a request to join stands. ``pending``: an SDS without a join token asked;
    it is placed on nothing until an admin decides. ``approved``: its next registration
    from the same address and data port creates it. ``rejected``: its registrations
    are refused until the request is deleted."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class SdsJoinRequest(Base):
    """A new SDS that registered without a join token or a certificate of its name:
    held here, not in ``sdss`` (it has no id, no devices, no PGs), until an admin
    approves or rejects it (``meshctl sds approve|reject``)."""

    __tablename__ = "sds_join_requests"

    id: Mapped[intpk]
    name: Mapped[name_str] = mapped_column(unique=True)
    protection_domain: Mapped[name_str]
    fault_set: Mapped[str | None] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(255))
    data_port: Mapped[int]
    control_port: Mapped[int]
    devices: Mapped[int] = mapped_column(default=0)
    capacity_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[JoinState] = mapped_column(
        _enum(JoinState, "join_state"),
        default=JoinState.PENDING,
        server_default=JoinState.PENDING.value,
    )
    # who asked (the caller's identity, or "cluster secret") and from where
    caller: Mapped[str] = mapped_column(String(128))
    remote: Mapped[str | None] = mapped_column(String(255))
    decided_by: Mapped[str | None] = mapped_column(String(128))
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[created_at]


class MdmLeader(Base):
    """The leader lease (one row, ``id`` 1; :mod:`meshblock.mdm.leader`): which MDM
    leads (``holder``, its ``[ha] name``) in which ``term``, until ``expires_at``. Times
    are seconds since the epoch on the database's clock, never an MDM's; on SQLite,
    where one MDM holds the file, ``expires_at`` is NULL (no expiry)."""

    __tablename__ = "mdm_leader"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    term: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[float] = mapped_column(Float)
    renewed_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
