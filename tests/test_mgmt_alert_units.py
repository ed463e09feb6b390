"""MGMT's alert history in-process: an alert's display form and its defaults, the
rule an arriving alert refers to, the rule sync that takes such rules over, and the
alert filters (on a SQLite file, without a server)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest
from multidict import MultiDict
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mgmt import alerts, prometheus, rules
from meshblock.mgmt.context import MgmtContext
from meshblock.mgmt.db import create_engine, migrate, session_factory
from meshblock.mgmt.errors import Upstream
from meshblock.mgmt.metrics import MgmtMetrics
from meshblock.mgmt.models import AlertHistory, AlertRule, AlertStatus, Severity

pytestmark = pytest.mark.unit

T = TypeVar("T")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

DISPLAY_FIELDS = [
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
]


# -- the display form ------------------------------------------------------------------


def test_the_display_form_has_exactly_its_eleven_fields() -> None:
    row = AlertHistory(
        id=7,
        rule_id=3,
        alert_name="MeshblockSdsDown",
        component_id="sds2",
        status=AlertStatus.ACKNOWLEDGED,
        severity=Severity.CRITICAL,
        message="An SDS is down",
        metric_value=0.0,
        threshold_value=1.0,
        fired_at=T0,
        acknowledged_at=T0 + dt.timedelta(minutes=1),
        acknowledged_by_user_id=1,
        resolved_at=None,
        details_json={"labels": {"alertname": "MeshblockSdsDown"}},
        fingerprint="abc",
    )
    shown = alerts.display(row, now=T0 + dt.timedelta(minutes=2, seconds=5.9))
    assert list(shown) == DISPLAY_FIELDS == list(alerts.DISPLAY_FIELDS)
    assert shown == {
        "id": 7,
        "severity": "critical",
        "status": "acknowledged",
        "message": "An SDS is down",
        "component_id": "sds2",
        "fired_at": "2026-01-01T00:00:00Z",
        "age_seconds": 125,
        "acknowledged_at": "2026-01-01T00:01:00Z",
        "resolved_at": None,
        "metric_value": 0.0,
        "threshold_value": 1.0,
    }


def test_the_display_form_of_an_empty_row_has_its_defaults() -> None:
    shown = alerts.display(AlertHistory(), now=T0)
    assert shown == {
        "id": None,
        "severity": "info",
        "status": "active",
        "message": "",
        "component_id": "",
        "fired_at": None,
        "age_seconds": 0,
        "acknowledged_at": None,
        "resolved_at": None,
        "metric_value": None,
        "threshold_value": None,
    }


def test_age_is_whole_seconds_never_negative_and_naive_times_are_utc() -> None:
    row = AlertHistory(fired_at=dt.datetime(2026, 1, 1, 0, 0, 0))  # as SQLite returns it
    assert alerts.display(row, now=T0 + dt.timedelta(hours=1))["age_seconds"] == 3600
    assert alerts.display(row, now=T0 - dt.timedelta(seconds=30))["age_seconds"] == 0
    assert alerts.display(row, now=T0)["fired_at"] == "2026-01-01T00:00:00Z"


def test_only_http_links_are_runbook_links() -> None:
    assert alerts.safe_link("https://x.example/runbook.md#a") == "https://x.example/runbook.md#a"
    assert alerts.safe_link("HTTP://x.example/r") == "HTTP://x.example/r"
    for bad in (None, "", "javascript:alert(1)", "data:text/html,x", "/docs/runbook.md"):
        assert alerts.safe_link(bad) is None


# -- filters ---------------------------------------------------------------------------


def test_rule_id_takes_ids_and_names_alertname_takes_names() -> None:
    f = alerts.parse_filter(
        MultiDict(
            [
                ("rule_id", "4,MeshblockSdsDown"),
                ("rule_id", "99999999999"),
                ("alertname", "MeshblockPoolNearFull"),
            ]
        )
    )
    assert f.rule_ids == (4, -1)
    assert f.alert_names == ("MeshblockPoolNearFull", "MeshblockSdsDown")


# -- the rule of an arriving alert, and the sync ------------------------------------------


def run(db: Path, fn: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = create_engine(f"sqlite+aiosqlite:///{db}")
        try:
            await migrate(engine)
            return await fn(session_factory(engine))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def notification(name: str, fingerprint: str, **annotations: str) -> dict[str, Any]:
    return {
        "version": "4",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": name, "severity": "critical", "sds": "sds1"},
                "annotations": annotations,
                "startsAt": "2026-01-01T00:00:00Z",
                "fingerprint": fingerprint,
            }
        ],
    }


async def receive(sessions: async_sessionmaker[AsyncSession], body: dict[str, Any]) -> None:
    async with sessions() as s, s.begin():
        await alerts.store(s, alerts.parse_notification(body))


async def rule_rows(sessions: async_sessionmaker[AsyncSession]) -> list[AlertRule]:
    async with sessions() as s:
        return list((await s.execute(select(AlertRule).order_by(AlertRule.id))).scalars())


async def history(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, str, int]]:
    async with sessions() as s:
        rows = await s.execute(
            select(
                AlertHistory.fingerprint, AlertHistory.alert_name, AlertHistory.rule_id
            ).order_by(AlertHistory.id)
        )
        return [(fp, name, rule) for fp, name, rule in rows]


def fake_context(
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
    fetched: list[prometheus.RuleInfo],
) -> MgmtContext:
    async def alerting_rules(_http: Any, _cfg: Any) -> list[prometheus.RuleInfo]:
        return fetched

    monkeypatch.setattr(prometheus, "alerting_rules", alerting_rules)
    c = SimpleNamespace(
        config=SimpleNamespace(prometheus=None),
        http=None,
        sessions=sessions,
        metrics=MgmtMetrics(),
    )
    return cast(MgmtContext, c)


def rule(name: str, group: str, runbook: str | None = None) -> prometheus.RuleInfo:
    return prometheus.RuleInfo(name, group, "vector(1)", 60.0, "critical", "synced", runbook)


def test_an_alert_before_its_rule_gets_a_rule_row_that_the_sync_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go(sessions: async_sessionmaker[AsyncSession]) -> None:
        await receive(
            sessions,
            notification(
                "MeshblockSdsDown", "f1", summary="down", runbook_url="https://r.example/#sds"
            ),
        )
        await receive(sessions, notification("MeshblockSdsDown", "f2"))
        (made,) = await rule_rows(sessions)
        assert (made.name, made.group_name, made.last_synced) == ("MeshblockSdsDown", "", None)
        assert (made.summary, made.runbook_url, made.severity) == (
            "down",
            "https://r.example/#sds",
            "critical",
        )
        assert await history(sessions) == [
            ("f1", "MeshblockSdsDown", made.id),
            ("f2", "MeshblockSdsDown", made.id),
        ]

        c = fake_context(
            sessions,
            monkeypatch,
            [
                rule("MeshblockSdsDown", "meshblock-sds", "https://docs.example/#sds"),
                rule("MeshblockPoolNearFull", "meshblock-pools"),
            ],
        )
        result = await rules.sync(c)
        assert result.as_json() == {"total": 2, "added": 2, "updated": 0, "removed": 0}
        taken, pool = await rule_rows(sessions)
        assert taken.id == made.id, "the alert's rule row became the synced rule"
        assert (taken.group_name, taken.runbook_url) == (
            "meshblock-sds",
            "https://docs.example/#sds",
        )
        assert taken.last_synced is not None
        # A later alert of a synced name refers to the synced rule.
        await receive(sessions, notification("MeshblockPoolNearFull", "f3"))
        assert (await history(sessions))[2] == ("f3", "MeshblockPoolNearFull", pool.id)
        assert len(await rule_rows(sessions)) == 2

        # Prometheus drops both rules: the one alerts refer to stays, unsynced.
        c = fake_context(sessions, monkeypatch, [rule("MeshblockMdmDown", "meshblock-mdm")])
        result = await rules.sync(c)
        assert result.as_json() == {"total": 1, "added": 1, "updated": 0, "removed": 0}
        rows = {r.name: r for r in await rule_rows(sessions)}
        assert set(rows) == {"MeshblockSdsDown", "MeshblockPoolNearFull", "MeshblockMdmDown"}
        assert rows["MeshblockSdsDown"].last_synced is None
        assert rows["MeshblockMdmDown"].last_synced is not None

        # Once no alert refers to it, the next sync deletes it.
        async with sessions() as s, s.begin():
            await s.execute(
                delete(AlertHistory).where(AlertHistory.alert_name != "MeshblockSdsDown")
            )
        result = await rules.sync(c)
        assert result.as_json() == {"total": 1, "added": 0, "updated": 1, "removed": 1}
        assert {r.name for r in await rule_rows(sessions)} == {
            "MeshblockSdsDown",
            "MeshblockMdmDown",
        }

    run(tmp_path / "mgmt.db", go)


def test_a_rule_row_made_during_a_sync_is_merged_into_the_synced_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An alert that arrives while a sync reads Prometheus makes a rule row beside the
    one the sync adds; the next sync moves its alerts to the synced rule and drops it."""

    async def go(sessions: async_sessionmaker[AsyncSession]) -> None:
        c = fake_context(sessions, monkeypatch, [rule("MeshblockSdsDown", "meshblock-sds")])
        await rules.sync(c)
        (synced,) = await rule_rows(sessions)
        async with sessions() as s, s.begin():  # what the racing webhook left
            s.add(AlertRule(name="MeshblockSdsDown", group_name="", expression="", for_seconds=0.0))
        _, made = await rule_rows(sessions)
        async with sessions() as s, s.begin():
            for a in alerts.parse_notification(notification("MeshblockSdsDown", "f1")):
                await alerts.store(s, [a])
            await s.execute(update(AlertHistory).values(rule_id=made.id))
        result = await rules.sync(c)
        assert result.as_json() == {"total": 1, "added": 0, "updated": 1, "removed": 1}
        assert [r.id for r in await rule_rows(sessions)] == [synced.id]
        assert await history(sessions) == [("f1", "MeshblockSdsDown", synced.id)]

    run(tmp_path / "mgmt.db", go)


def test_an_alert_of_a_synced_rule_refers_to_it_and_filters_find_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go(sessions: async_sessionmaker[AsyncSession]) -> None:
        c = fake_context(
            sessions,
            monkeypatch,
            [rule("MeshblockSdsDown", "a-group"), rule("MeshblockSdsDown", "b-group")],
        )
        await rules.sync(c)
        first, _second = await rule_rows(sessions)
        await receive(sessions, notification("MeshblockSdsDown", "f1"))
        await receive(sessions, notification("MeshblockOther", "f2"))
        assert len(await rule_rows(sessions)) == 3
        assert (await history(sessions))[0] == ("f1", "MeshblockSdsDown", first.id)

        async def matching(**query: str) -> list[str]:
            f = alerts.parse_filter(MultiDict(query))
            async with sessions() as s:
                listed, total = await alerts.list_alerts(s, f, 10, 0)
            assert total == len(listed)
            return [x.alert_name for x in listed]

        assert await matching(rule_id=str(first.id)) == ["MeshblockSdsDown"]
        assert await matching(rule_id="MeshblockOther") == ["MeshblockOther"]
        assert await matching(alertname="MeshblockSdsDown") == ["MeshblockSdsDown"]
        assert await matching(rule_id="12345") == []
        assert sorted(await matching()) == ["MeshblockOther", "MeshblockSdsDown"]

    run(tmp_path / "mgmt.db", go)


def test_a_failed_rule_sync_is_tried_again_soon_not_an_interval_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prometheus not ready when MGMT starts: the next sync comes in 2 s, doubling after
    each failure up to the interval, and back to the interval once one succeeds."""
    outcomes = [False, False, False, True, True, False]
    slept: list[float] = []

    async def fake_sync(c: Any) -> None:
        if not outcomes:
            raise asyncio.CancelledError
        if not outcomes.pop(0):
            raise Upstream("Prometheus is not ready")

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(rules, "sync", fake_sync)
    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    c = SimpleNamespace(
        config=SimpleNamespace(prometheus=SimpleNamespace(rules_sync_interval_s=5.0))
    )
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(rules.run_periodic(cast(MgmtContext, c)))
    assert slept == [2.0, 4.0, 5.0, 5.0, 5.0, 2.0]
