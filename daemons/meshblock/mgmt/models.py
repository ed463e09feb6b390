"""MGMT's tables, in SQLAlchemy 2.0's typed declarative ORM.

- ``alert_history``: one row per alert occurrence that Alertmanager notified us of
  (the fields of docs/design.md, "Object model", plus ``fingerprint``: see
  :class:`AlertHistory`);
- ``alert_rules``: the alerting rules Prometheus has loaded, synced from its rules API,
  and the rules of alerts that arrived before their rule was synced (each alert refers
  to its rule's row: ``alert_history.rule_id``);
- ``users``, ``api_tokens``, ``sessions``: who may read and act.

Timestamps are stored in UTC. SQLite hands them back naive: read them through
:func:`aware`.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from meshblock.orm import NAMING_CONVENTION, created_at, intpk
from meshblock.orm import str_enum as _enum

timestamp = Annotated[dt.datetime, mapped_column(DateTime(timezone=True))]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(t: dt.datetime | None) -> dt.datetime | None:
    """``t`` as an aware UTC datetime (SQLite returns naive UTC values)."""
    if t is None:
        return None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AlertStatus(enum.StrEnum):
    ACTIVE = "active"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    SUPPRESSED = "suppressed"


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class UserRole(enum.StrEnum):
    ADMIN = "admin"
    VIEWER = "viewer"


class User(Base):
    __tablename__ = "users"

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    created_at: Mapped[created_at]


class ApiToken(Base):
    """A bearer token for scripts; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[intpk]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[created_at]
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("user_id", "name"),)


class WebSession(Base):
    """A login session; the cookie holds a secret whose SHA-256 is ``id``."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[created_at]
    expires_at: Mapped[timestamp] = mapped_column(index=True)


class AlertHistory(Base):
    """One occurrence of an alert: a label set (``fingerprint``) that started firing at
    ``fired_at`` (Alertmanager's ``startsAt``).

    ``fingerprint`` is not among docs/design.md's fields: it is Alertmanager's hash of the
    alert's label set, and (fingerprint, fired_at) is the identity that makes the
    webhook idempotent. Finding a row by it must be an indexed column lookup on both
    SQLite and PostgreSQL, which a search inside ``details_json`` cannot be.
    """

    __tablename__ = "alert_history"

    id: Mapped[intpk]
    #: The alert's rule (``alert_rules.id``): the synced rule of that name, or a row
    #: made when the alert arrived before any rule of its name was synced.
    rule_id: Mapped[int] = mapped_column(ForeignKey("alert_rules.id"), index=True)
    #: The ``alertname`` label, kept as received (rules may be renamed or removed).
    alert_name: Mapped[str] = mapped_column(String(255), index=True)
    component_id: Mapped[str | None] = mapped_column(String(255), index=True)
    status: Mapped[AlertStatus] = mapped_column(_enum(AlertStatus, "alert_status"), index=True)
    severity: Mapped[Severity] = mapped_column(_enum(Severity, "alert_severity"), index=True)
    message: Mapped[str] = mapped_column(Text)
    metric_value: Mapped[float | None] = mapped_column(Float)
    threshold_value: Mapped[float | None] = mapped_column(Float)
    fired_at: Mapped[timestamp] = mapped_column(index=True)
    acknowledged_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    acknowledged_by_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    details_json: Mapped[dict[str, Any]] = mapped_column(JSON)
    fingerprint: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint("fingerprint", "fired_at", name="uq_alert_history_occurrence"),
        Index("ix_alert_history_status_fired_at", "status", "fired_at"),
    )


class AlertRule(Base):
    """An alerting rule as Prometheus has loaded it (``GET /api/v1/rules``).

    ``last_synced`` is None for a rule that Prometheus did not list at the last sync
    but that alerts refer to: a rule made when an alert of that name arrived before
    any rule of that name was synced (``group_name`` ``""``), or one removed from
    Prometheus since. The next sync that lists it fills it in.
    """

    __tablename__ = "alert_rules"

    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(255))
    group_name: Mapped[str] = mapped_column(String(255))
    expression: Mapped[str] = mapped_column(Text)
    for_seconds: Mapped[float] = mapped_column(Float)
    severity: Mapped[str | None] = mapped_column(String(32))
    summary: Mapped[str | None] = mapped_column(Text)
    runbook_url: Mapped[str | None] = mapped_column(String(1024))
    last_synced: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("group_name", "name"),)
