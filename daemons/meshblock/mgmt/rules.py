"""``alert_rules``: a copy of the alerting rules Prometheus has loaded.

:func:`sync` makes the table what Prometheus's rules API answers: rows keyed by group
and name are updated in place; a rule made when an alert of its name arrived before
it was synced (group ``""``, meshblock.mgmt.alerts.rule_for) becomes the first synced
rule of that name, so its alerts refer to it; rules that disappeared are deleted,
unless alerts refer to them: those stay, with ``last_synced`` None. :func:`run_periodic`
does it every ``prometheus.rules_sync_interval_s``, and ``POST /api/rules/sync`` on
demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update

from meshblock.mgmt import prometheus
from meshblock.mgmt.alerts import ts
from meshblock.mgmt.context import MgmtContext
from meshblock.mgmt.errors import Upstream
from meshblock.mgmt.models import AlertHistory, AlertRule, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    total: int
    added: int
    updated: int
    removed: int

    def as_json(self) -> dict[str, int]:
        return {
            "total": self.total,
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
        }


async def sync(c: MgmtContext) -> SyncResult:
    """Fetch the rules and store them; Upstream if Prometheus cannot be read."""
    try:
        fetched = await prometheus.alerting_rules(c.http, c.config.prometheus)
    except Upstream:
        c.metrics.rule_syncs.labels("error").inc()
        raise
    now = utcnow()
    added = updated = 0
    async with c.sessions() as s, s.begin():
        existing = {
            (r.group_name, r.name): r for r in (await s.execute(select(AlertRule))).scalars()
        }
        seen = set()
        first: dict[str, AlertRule] = {}  # the first synced row of each name
        for info in fetched:
            key = (info.group, info.name)
            if key in seen:  # one rule name may repeat in a group; keep the first
                continue
            seen.add(key)
            row = existing.get(key)
            if row is None:
                row = existing.get(("", info.name))  # made from an alert: take it over
                if row is not None and ("", info.name) not in seen:
                    del existing[("", info.name)]
                    row.group_name = info.group
                    existing[key] = row
                    await s.flush()
                else:
                    row = AlertRule(group_name=info.group, name=info.name)
                    s.add(row)
                added += 1
            else:
                updated += 1
            row.expression = info.expression
            row.for_seconds = info.for_seconds
            row.severity = info.severity
            row.summary = info.summary
            row.runbook_url = info.runbook_url
            row.last_synced = now
            first.setdefault(info.name, row)
        # A row made from an alert that came while this sync read Prometheus, beside
        # the synced rule of its name: its alerts move to the synced rule, and it goes.
        await s.flush()
        for (group, name), row in existing.items():
            if group == "" and (group, name) not in seen and name in first:
                await s.execute(
                    update(AlertHistory)
                    .where(AlertHistory.rule_id == row.id)
                    .values(rule_id=first[name].id)
                    .execution_options(synchronize_session=False)
                )
        gone = [r.id for k, r in existing.items() if k not in seen]
        removed = 0
        if gone:
            referred = (
                select(AlertHistory.id)
                .where(AlertHistory.rule_id == AlertRule.id)
                .correlate(AlertRule)
                .exists()
            )
            deleted = await s.execute(
                delete(AlertRule)
                .where(AlertRule.id.in_(gone), ~referred)
                .execution_options(synchronize_session=False)
            )
            removed = cast("CursorResult[Any]", deleted).rowcount
            await s.execute(
                update(AlertRule)
                .where(AlertRule.id.in_(gone))
                .values(last_synced=None)
                .execution_options(synchronize_session=False)
            )
    c.metrics.rule_syncs.labels("ok").inc()
    c.metrics.rules.set(len(seen))
    c.metrics.rule_sync_last_success.set(time.time())
    result = SyncResult(len(seen), added, updated, removed)
    log.info(
        "alert rules synced from Prometheus: %d rules (%d added, %d removed)",
        result.total,
        result.added,
        result.removed,
    )
    return result


# After a failed sync (Prometheus not up yet when MGMT starts, or restarting) the next
# try comes sooner than the interval: 2 s, doubled after each failure, at most the
# interval.
RETRY_FIRST_S = 2.0


async def run_periodic(c: MgmtContext) -> None:
    interval = c.config.prometheus.rules_sync_interval_s
    retry = RETRY_FIRST_S
    while True:
        try:
            await sync(c)
        except Upstream as exc:
            log.warning(
                "alert rule sync failed (next try in %g s): %s", min(retry, interval), exc.message
            )
        except Exception:
            log.exception("alert rule sync failed (next try in %g s)", min(retry, interval))
        else:
            retry = RETRY_FIRST_S
            await asyncio.sleep(interval)
            continue
        await asyncio.sleep(min(retry, interval))
        retry *= 2


def to_json(r: AlertRule) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "group": r.group_name,
        "expression": r.expression,
        "for_seconds": r.for_seconds,
        "severity": r.severity,
        "summary": r.summary,
        "runbook_url": r.runbook_url,
        "last_synced": ts(r.last_synced),
    }
