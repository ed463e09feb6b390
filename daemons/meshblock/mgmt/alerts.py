"""The alert history: what the Alertmanager webhook stores, and what operators do to it.

An Alertmanager alert is one occurrence of a label set: its ``fingerprint`` (a hash
of the labels) and ``startsAt`` stay the same in every notification about it, from
the first ``firing`` to the ``resolved``. So (fingerprint, startsAt) finds the row to
update, and repeated or retried notifications never add a row.

How an alert maps onto a row:

- ``alert_name`` = the ``alertname`` label; ``rule_id`` = the id of the rule of that
  name in ``alert_rules`` (one synced from Prometheus if there is one; else a row made
  now from the alert: group ``""``, its ``severity`` label, its ``summary`` and
  ``runbook_url`` annotations, ``last_synced`` None, which the next sync that lists
  the rule takes over);
- ``component_id`` = the first of the labels ``component_id``, ``sds``, ``sdc``,
  ``pool``, ``device``, ``instance`` that is set (None without any);
- ``severity`` = the ``severity`` label if it is info, warning, error or critical,
  else ``warning``;
- ``message`` = the ``summary`` annotation, then `` — `` and the ``description``
  (either alone if only one is set; the alert name if neither is);
- ``metric_value`` / ``threshold_value`` = the annotations ``value`` and
  ``threshold`` when they hold numbers (rules may add them with ``{{ $value }}``);
- ``fired_at`` = ``startsAt``; ``resolved_at`` = ``endsAt`` of the ``resolved``
  notification; ``details_json`` = the whole alert as received, plus a ``silence``
  entry once an operator silenced it here.

Status: a new alert is ``active`` (or ``resolved`` when the first notification is
already the resolution). An operator may acknowledge an active alert, silence an
active or acknowledged one (``suppressed``), or resolve any open one. A ``resolved``
notification closes the row whatever its status; later ``firing`` notifications of
the same occurrence update the labels and the message but not a status set by hand.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mgmt.errors import BadRequest, Conflict, Invalid, NotFound
from meshblock.mgmt.models import (
    AlertHistory,
    AlertRule,
    AlertStatus,
    Severity,
    User,
    aware,
    utcnow,
)

MAX_ALERTS_PER_NOTIFICATION = 10_000
MAX_LABEL_CHARS = 4096
COMPONENT_LABELS = ("component_id", "sds", "sdc", "pool", "device", "instance")
OPEN_STATUSES = (AlertStatus.ACTIVE, AlertStatus.ACKNOWLEDGED, AlertStatus.SUPPRESSED)

_STRING_MAP = {
    "type": "object",
    "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_CHARS},
}

WEBHOOK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["version", "alerts"],
    "properties": {
        "version": {"const": "4"},
        "status": {"enum": ["firing", "resolved"]},
        "alerts": {
            "type": "array",
            "maxItems": MAX_ALERTS_PER_NOTIFICATION,
            "items": {
                "type": "object",
                "required": ["status", "labels", "startsAt"],
                "properties": {
                    "status": {"enum": ["firing", "resolved"]},
                    "labels": {
                        **_STRING_MAP,
                        "required": ["alertname"],
                        "properties": {"alertname": {"type": "string", "minLength": 1}},
                    },
                    "annotations": _STRING_MAP,
                    "startsAt": {"type": "string", "maxLength": 64},
                    "endsAt": {"type": "string", "maxLength": 64},
                    "fingerprint": {"type": "string", "minLength": 1, "maxLength": 64},
                    "generatorURL": {"type": "string"},
                },
            },
        },
    },
}

_webhook_validator = jsonschema_rs.validator_for(WEBHOOK_SCHEMA)

_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\d)[Tt ](\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)$")


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 time (Go's, with up to nanoseconds) as an aware UTC datetime."""
    m = _RFC3339.match(text.strip())
    if m is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    date, clock, frac, zone = m.groups()
    micro = (frac or "")[:6].ljust(6, "0")
    zone = "+00:00" if zone in ("Z", "z") else zone
    return dt.datetime.fromisoformat(f"{date}T{clock}.{micro}{zone}").astimezone(dt.UTC)


def _is_unset(t: dt.datetime) -> bool:
    return t.year <= 1  # Go's zero time, 0001-01-01T00:00:00Z


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def fingerprint_of(labels: Mapping[str, str]) -> str:
    """Alertmanager sends ``fingerprint``; this stands in for senders that do not."""
    canonical = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IncomingAlert:
    fingerprint: str
    starts_at: dt.datetime
    resolved: bool
    ends_at: dt.datetime | None
    alert_name: str
    component_id: str | None
    severity: Severity
    message: str
    metric_value: float | None
    threshold_value: float | None
    summary: str | None
    runbook_url: str | None
    raw: dict[str, Any] = field(repr=False)


def parse_notification(data: Any) -> list[IncomingAlert]:
    """The alerts of a webhook body; Invalid (and nothing stored) if any is malformed."""
    if not isinstance(data, dict):
        raise BadRequest("the webhook body must be a JSON object")
    errors = list(_webhook_validator.iter_errors(data))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.instance_path)
        raise Invalid(f"{where}: {e.message}" if where else str(e.message))
    out = []
    for i, a in enumerate(data["alerts"]):
        labels: dict[str, str] = a["labels"]
        annotations: dict[str, str] = a.get("annotations") or {}
        try:
            starts = parse_time(a["startsAt"])
            ends = parse_time(a["endsAt"]) if a.get("endsAt") else None
        except ValueError as exc:
            raise Invalid(f"alerts.{i}: {exc}") from None
        if _is_unset(starts):
            raise Invalid(f"alerts.{i}.startsAt: the alert has no start time")
        if ends is not None and _is_unset(ends):
            ends = None
        severity = labels.get("severity", "").lower()
        summary = annotations.get("summary", "").strip()
        description = annotations.get("description", "").strip()
        if summary and description and description != summary:
            message = f"{summary} — {description}"
        else:
            message = summary or description or labels["alertname"]
        out.append(
            IncomingAlert(
                fingerprint=a.get("fingerprint") or fingerprint_of(labels),
                starts_at=starts,
                resolved=a["status"] == "resolved",
                ends_at=ends,
                alert_name=labels["alertname"],
                component_id=next((labels[k] for k in COMPONENT_LABELS if labels.get(k)), None),
                severity=Severity(severity) if severity in set(Severity) else Severity.WARNING,
                message=message,
                metric_value=_number(annotations.get("value")),
                threshold_value=_number(annotations.get("threshold")),
                summary=summary or None,
                runbook_url=annotations.get("runbook_url") or None,
                raw=a,
            )
        )
    return out


async def rule_for(session: AsyncSession, a: IncomingAlert) -> int:
    """The id of the rule of ``a``'s name: a rule Prometheus lists (the oldest row if
    several groups have one of that name), else any row of that name, else a new row
    made from the alert (group ``""``, ``last_synced`` None)."""
    found = (
        await session.execute(
            select(AlertRule.id)
            .where(AlertRule.name == a.alert_name)
            .order_by(AlertRule.last_synced.is_(None), AlertRule.id)
            .limit(1)
        )
    ).scalar_one_or_none()
    if found is not None:
        return int(found)
    severity = a.raw["labels"].get("severity")
    rule = AlertRule(
        name=a.alert_name,
        group_name="",
        expression="",
        for_seconds=0.0,
        severity=severity[:32] if severity else None,
        summary=a.summary,
        runbook_url=a.runbook_url[:1024] if a.runbook_url else None,
        last_synced=None,
    )
    session.add(rule)
    await session.flush()
    return rule.id


async def store(session: AsyncSession, alerts: Sequence[IncomingAlert]) -> list[str]:
    """Insert or update a row per alert; return what was done to each (for metrics)."""
    actions = []
    rules: dict[str, int] = {}
    for a in alerts:
        if a.alert_name not in rules:
            rules[a.alert_name] = await rule_for(session, a)
        row = (
            await session.execute(
                select(AlertHistory).where(
                    AlertHistory.fingerprint == a.fingerprint,
                    AlertHistory.fired_at == a.starts_at,
                )
            )
        ).scalar_one_or_none()
        if row is None:
            row = AlertHistory(
                fingerprint=a.fingerprint,
                fired_at=a.starts_at,
                status=AlertStatus.ACTIVE,
                details_json={},
            )
            session.add(row)
            actions.append("inserted")
        else:
            actions.append("updated")
        row.rule_id = rules[a.alert_name]
        row.alert_name = a.alert_name
        row.component_id = a.component_id
        row.severity = a.severity
        row.message = a.message
        row.metric_value = a.metric_value if a.metric_value is not None else row.metric_value
        row.threshold_value = (
            a.threshold_value if a.threshold_value is not None else row.threshold_value
        )
        details = dict(a.raw)
        if "silence" in (row.details_json or {}):
            details["silence"] = row.details_json["silence"]
        row.details_json = details
        if a.resolved and row.status != AlertStatus.RESOLVED:
            row.status = AlertStatus.RESOLVED
            row.resolved_at = a.ends_at or utcnow()
        await session.flush()
    return actions


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertFilter:
    statuses: tuple[AlertStatus, ...] = ()
    severities: tuple[Severity, ...] = ()
    rule_ids: tuple[int, ...] = ()
    alert_names: tuple[str, ...] = ()
    component_ids: tuple[str, ...] = ()
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses of this filter (none: every alert)."""
        out: list[ColumnElement[bool]] = []
        if self.statuses:
            out.append(AlertHistory.status.in_(self.statuses))
        if self.severities:
            out.append(AlertHistory.severity.in_(self.severities))
        if self.rule_ids:
            out.append(AlertHistory.rule_id.in_(self.rule_ids))
        if self.alert_names:
            out.append(AlertHistory.alert_name.in_(self.alert_names))
        if self.component_ids:
            out.append(AlertHistory.component_id.in_(self.component_ids))
        if self.since is not None:
            out.append(AlertHistory.fired_at >= self.since)
        if self.until is not None:
            out.append(AlertHistory.fired_at < self.until)
        return out


def _values(query: Mapping[str, str], getall: Any, name: str) -> list[str]:
    out: list[str] = []
    for raw in getall(name, []):
        out += [v.strip() for v in raw.split(",") if v.strip()]
    return out


def _time_param(name: str, raw: str | None) -> dt.datetime | None:
    if raw is None or raw == "":
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or not 0 <= seconds < 253402300800:
            raise BadRequest(f"query parameter {name} is out of range")
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    try:
        return parse_time(raw)
    except ValueError:
        raise BadRequest(
            f"query parameter {name} must be an RFC 3339 time (2026-01-31T12:00:00Z) or "
            f"Unix seconds, got {raw!r}"
        ) from None


def parse_filter(query: Any) -> AlertFilter:
    """An :class:`AlertFilter` from query parameters (a MultiDict); 400 when malformed.

    ``status``, ``severity``, ``rule_id``, ``alertname`` and ``component_id`` may
    repeat or hold comma-separated values; ``since``/``until`` bound ``fired_at`` (since
    inclusive). ``alertname`` is the alert's name; ``rule_id`` the id of its rule, and a
    ``rule_id`` value that is not a number is taken as an alert name (what the
    parameter meant before rules had ids).
    """
    getall = query.getall
    statuses, severities = [], []
    for v in _values(query, getall, "status"):
        if v not in set(AlertStatus):
            raise BadRequest(
                f"query parameter status must be one of {', '.join(AlertStatus)}, got {v!r}"
            )
        statuses.append(AlertStatus(v))
    for v in _values(query, getall, "severity"):
        if v not in set(Severity):
            raise BadRequest(
                f"query parameter severity must be one of {', '.join(Severity)}, got {v!r}"
            )
        severities.append(Severity(v))
    rule_ids: list[int] = []
    names = _values(query, getall, "alertname")
    for v in _values(query, getall, "rule_id"):
        if v.isascii() and v.isdigit():
            # An id beyond the column's range matches nothing, as -1 does.
            rule_ids.append(int(v) if len(v) <= 10 and int(v) < 2**31 else -1)
        else:
            names.append(v)
    since = _time_param("since", query.get("since"))
    until = _time_param("until", query.get("until"))
    if since is not None and until is not None and until < since:
        raise BadRequest("query parameter until is before since")
    return AlertFilter(
        tuple(statuses),
        tuple(severities),
        tuple(rule_ids),
        tuple(names),
        tuple(_values(query, getall, "component_id")),
        since,
        until,
    )


def ts(t: dt.datetime | None) -> str | None:
    t = aware(t)
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


#: The display form's fields, in order (docs/mgmt.md, "API").
DISPLAY_FIELDS = (
    "id",
    "severity",
    "status",
    "message",
    "component_id",
    "fired_at",
    "age_seconds",
    "acknowledged_at",
    "resolved_at",
    "metric_value",
    "threshold_value",
)


def _value(v: Any) -> Any:
    return v.value if isinstance(v, enum.Enum) else v


def display(row: AlertHistory, now: dt.datetime | None = None) -> dict[str, Any]:
    """An alert's display form: exactly :data:`DISPLAY_FIELDS`, what the API answers.

    Missing values read as: ``severity`` ``"info"``, ``status`` ``"active"``,
    ``message`` and ``component_id`` ``""``, ``age_seconds`` 0 (without ``fired_at``;
    else whole seconds from ``fired_at`` to ``now``, never negative). Times are RFC 3339
    in UTC, or None.
    """
    fired = aware(row.fired_at)
    if fired is None:
        age = 0
    else:
        age = max(0, int(((now or utcnow()) - fired).total_seconds()))
    return {
        "id": row.id,
        "severity": _value(row.severity) or Severity.INFO.value,
        "status": _value(row.status) or AlertStatus.ACTIVE.value,
        "message": row.message or "",
        "component_id": row.component_id or "",
        "fired_at": ts(fired),
        "age_seconds": age,
        "acknowledged_at": ts(row.acknowledged_at),
        "resolved_at": ts(row.resolved_at),
        "metric_value": row.metric_value,
        "threshold_value": row.threshold_value,
    }


def safe_link(url: str | None) -> str | None:
    """``url`` if it is an http(s) URL a page may link to, else None."""
    if not url:
        return None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return url if scheme in ("http", "https") else None


@dataclass(frozen=True)
class Listed:
    """An alert as the pages show it: its display form (``alert``), and beside it what
    the row and its rule add for the page."""

    alert: dict[str, Any]
    alert_name: str
    rule_id: int
    acknowledged_by: str | None
    silence: dict[str, Any] | None
    runbook_url: str | None

    @classmethod
    def of(
        cls,
        row: AlertHistory,
        acknowledged_by: str | None,
        rule_runbook_url: str | None,
        now: dt.datetime,
    ) -> Listed:
        details = row.details_json or {}
        annotations = details.get("annotations") or {}
        return cls(
            alert=display(row, now),
            alert_name=row.alert_name,
            rule_id=row.rule_id,
            acknowledged_by=acknowledged_by,
            silence=details.get("silence"),
            runbook_url=safe_link(rule_runbook_url) or safe_link(annotations.get("runbook_url")),
        )


_LISTED = (
    select(AlertHistory, User.name, AlertRule.runbook_url)
    .outerjoin(User, User.id == AlertHistory.acknowledged_by_user_id)
    .outerjoin(AlertRule, AlertRule.id == AlertHistory.rule_id)
)


async def list_alerts(
    session: AsyncSession, f: AlertFilter, limit: int, offset: int
) -> tuple[list[Listed], int]:
    """A page of the alerts that match ``f``, newest first, and how many match."""
    total = (
        await session.execute(select(func.count()).select_from(AlertHistory).where(*f.conditions()))
    ).scalar_one()
    rows = await session.execute(
        _LISTED.where(*f.conditions())
        .order_by(AlertHistory.fired_at.desc(), AlertHistory.id.desc())
        .limit(limit)
        .offset(offset)
    )
    now = utcnow()
    return [Listed.of(a, user, url, now) for a, user, url in rows], int(total)


async def get_alert(session: AsyncSession, alert_id: int) -> dict[str, Any]:
    """One alert's display form; NotFound without it."""
    return display(await alert_row(session, alert_id))


async def get_details(session: AsyncSession, alert_id: int) -> dict[str, Any]:
    """What MGMT knows of one alert beyond its display form (``GET
    /api/alerts/{id}/details``): its name, its rule, who acknowledged it, its labels and
    annotations, its silence, its fingerprint."""
    found = (await session.execute(_LISTED.where(AlertHistory.id == alert_id))).first()
    if found is None:
        raise NotFound(f"no alert with id {alert_id}")
    row, user, _ = found
    rule = await session.get(AlertRule, row.rule_id)
    details = row.details_json or {}
    return {
        "alert": display(row),
        "alert_name": row.alert_name,
        "rule": None
        if rule is None
        else {
            "id": rule.id,
            "name": rule.name,
            "group": rule.group_name,
            "runbook_url": rule.runbook_url,
            "last_synced": ts(rule.last_synced),
        },
        "acknowledged_by_user_id": row.acknowledged_by_user_id,
        "acknowledged_by": user,
        "fingerprint": row.fingerprint,
        "labels": details.get("labels", {}),
        "annotations": details.get("annotations", {}),
        "silence": details.get("silence"),
        "received": {k: v for k, v in details.items() if k != "silence"},
    }


async def counts(session: AsyncSession) -> dict[str, Any]:
    """Alert counts by status and severity, and open alerts by severity."""
    rows = (
        await session.execute(
            select(AlertHistory.status, AlertHistory.severity, func.count()).group_by(
                AlertHistory.status, AlertHistory.severity
            )
        )
    ).all()
    by_status = dict.fromkeys((s.value for s in AlertStatus), 0)
    by_severity = dict.fromkeys((s.value for s in Severity), 0)
    open_by_severity = dict.fromkeys((s.value for s in Severity), 0)
    matrix: dict[tuple[str, str], int] = {}
    total = 0
    for status, severity, n in rows:
        by_status[status.value] += n
        by_severity[severity.value] += n
        if status in OPEN_STATUSES:
            open_by_severity[severity.value] += n
        matrix[(status.value, severity.value)] = n
        total += n
    return {
        "total": total,
        "open": sum(by_status[s.value] for s in OPEN_STATUSES),
        "by_status": by_status,
        "by_severity": by_severity,
        "open_by_severity": open_by_severity,
        "_matrix": matrix,
    }


async def top_rules(session: AsyncSession, since: dt.datetime, n: int = 10) -> list[Any]:
    """The alerts that fired most since ``since``, by name: (alert name, count, last
    fired_at)."""
    rows = await session.execute(
        select(AlertHistory.alert_name, func.count(), func.max(AlertHistory.fired_at))
        .where(AlertHistory.fired_at >= since)
        .group_by(AlertHistory.alert_name)
        .order_by(func.count().desc(), AlertHistory.alert_name)
        .limit(n)
    )
    return [(rule, count, aware(last)) for rule, count, last in rows]


# -- operator actions ------------------------------------------------------------------


async def _locked(session: AsyncSession, alert_id: int) -> AlertHistory:
    row = (
        await session.execute(
            select(AlertHistory).where(AlertHistory.id == alert_id).with_for_update()
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no alert with id {alert_id}")
    return row


async def acknowledge(session: AsyncSession, alert_id: int, user_id: int) -> AlertHistory:
    row = await _locked(session, alert_id)
    if row.status != AlertStatus.ACTIVE:
        raise Conflict(
            f"alert {alert_id} is {row.status.value}; only an active alert can be acknowledged",
            {"status": row.status.value},
        )
    row.status = AlertStatus.ACKNOWLEDGED
    row.acknowledged_at = utcnow()
    row.acknowledged_by_user_id = user_id
    return row


async def resolve(session: AsyncSession, alert_id: int) -> AlertHistory:
    row = await _locked(session, alert_id)
    if row.status == AlertStatus.RESOLVED:
        raise Conflict(f"alert {alert_id} is already resolved", {"status": row.status.value})
    row.status = AlertStatus.RESOLVED
    row.resolved_at = utcnow()
    return row


def check_silenceable(row: AlertHistory) -> None:
    if row.status not in (AlertStatus.ACTIVE, AlertStatus.ACKNOWLEDGED):
        raise Conflict(
            f"alert {row.id} is {row.status.value}; only an active or acknowledged alert "
            "can be silenced",
            {"status": row.status.value},
        )


async def suppress(session: AsyncSession, alert_id: int, silence: dict[str, Any]) -> AlertHistory:
    row = await _locked(session, alert_id)
    check_silenceable(row)
    row.status = AlertStatus.SUPPRESSED
    row.details_json = {**(row.details_json or {}), "silence": silence}
    return row


async def alert_row(session: AsyncSession, alert_id: int) -> AlertHistory:
    row = await session.get(AlertHistory, alert_id)
    if row is None:
        raise NotFound(f"no alert with id {alert_id}")
    return row
