"""MGMT's schema migrations with rows in them, on SQLite and on PostgreSQL.

0002 (alert_history.rule_id refers to alert_rules.id, the name moves to alert_name):
a database of 0001 with alerts of a synced rule, of a rule in two groups and of a
name no rule has is upgraded; every alert keeps its name and refers to the right
rule, the name without a rule gets a rule row made from its newest alert; the
downgrade gives 0001's rows back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import DateTime, bindparam, text
from sqlalchemy.engine import Connection

from conftest import BACKENDS, new_database_url
from meshblock.mgmt.db import VERSION_TABLE, alembic_config, create_engine, migrate

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

T = TypeVar("T")

SYNCED = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def run_sync(url: str, fn: Callable[[Connection], T]) -> T:
    """``fn(connection)`` in a transaction on ``url``, SQLite's foreign keys off (as
    during MGMT's own migrations: meshblock.sqlstore)."""

    async def main() -> T:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                if engine.dialect.name == "sqlite":
                    await conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
                    await conn.commit()
                async with conn.begin():
                    return await conn.run_sync(fn)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def migrate_to_head(url: str) -> None:
    async def main() -> None:
        engine = create_engine(url)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())


def alembic(conn: Connection, action: str, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    getattr(command, action)(cfg, revision)


def revision(conn: Connection) -> str | None:
    opts = {"version_table": VERSION_TABLE}
    return MigrationContext.configure(conn, opts=opts).get_current_revision()


def details(name: str, **annotations: str) -> str:
    return json.dumps({"labels": {"alertname": name}, "annotations": annotations})


def minute(n: int) -> dt.datetime:
    return SYNCED + dt.timedelta(minutes=n)


# (id, rule_id as 0001 stored it: the name, fired_at, severity, details_json)
ALERTS = [
    (1, "MeshblockSdsDown", minute(0), "critical", details("MeshblockSdsDown")),
    (2, "MeshblockUnsynced", minute(1), "warning",
     details("MeshblockUnsynced", summary="old", runbook_url="https://old.example/#u")),
    (3, "MeshblockUnsynced", minute(2), "error",
     details("MeshblockUnsynced", summary="newest", runbook_url="https://r.example/#u")),
    (4, "MeshblockTwoGroups", minute(3), "info", "{}"),
    (5, "MeshblockSdsDown", minute(4), "critical", "{}"),
]  # fmt: skip

# (id, name, group_name): inserted in this order, their ids given by the database
RULES = [
    (1, "MeshblockSdsDown", "meshblock-sds"),
    (2, "MeshblockTwoGroups", "b"),
    (3, "MeshblockTwoGroups", "a"),
    (4, "MeshblockQuiet", "meshblock-sds"),
]
TIMES = (bindparam("synced", type_=DateTime(timezone=True)),)
ALERT_TIMES = (
    bindparam("fired", type_=DateTime(timezone=True)),
    bindparam("acked", type_=DateTime(timezone=True)),
)


def at_0001_with_rows(conn: Connection) -> None:
    alembic(conn, "upgrade", "0001")
    conn.execute(
        text("INSERT INTO users (id, name, password_hash, role) VALUES (1, 'admin', 'x', 'admin')")
    )
    for _, name, group in RULES:
        conn.execute(
            text(
                "INSERT INTO alert_rules (name, group_name, expression, for_seconds, "
                "severity, summary, runbook_url, last_synced) VALUES "
                "(:name, :group, 'vector(1)', 60, 'critical', 's', NULL, :synced)"
            ).bindparams(*TIMES),
            {"name": name, "group": group, "synced": SYNCED},
        )
    for alert_id, name, fired, severity, raw in ALERTS:
        conn.execute(
            text(
                "INSERT INTO alert_history (id, rule_id, component_id, status, severity, "
                "message, fired_at, acknowledged_at, acknowledged_by_user_id, details_json, "
                "fingerprint) VALUES (:id, :name, 'sds1', :status, :severity, :message, "
                ":fired, :acked, :by, :raw, :fp)"
            ).bindparams(*ALERT_TIMES),
            {
                "id": alert_id,
                "name": name,
                "status": "acknowledged" if alert_id == 1 else "active",
                "severity": severity,
                "message": f"alert {alert_id}",
                "fired": fired,
                "acked": fired if alert_id == 1 else None,
                "by": 1 if alert_id == 1 else None,
                "raw": raw,
                "fp": f"fp{alert_id}",
            },
        )


def history(conn: Connection, *columns: str) -> list[tuple[Any, ...]]:
    rows = conn.execute(text(f"SELECT id, {', '.join(columns)} FROM alert_history ORDER BY id"))
    return [tuple(r) for r in rows]


def rules(conn: Connection) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        text(
            "SELECT id, name, group_name, severity, summary, runbook_url, last_synced IS NULL "
            "FROM alert_rules ORDER BY id"
        )
    )
    return [tuple(r) for r in rows]


def fk_problems(conn: Connection) -> list[Any]:
    if conn.dialect.name == "sqlite":
        return list(conn.exec_driver_sql("PRAGMA foreign_key_check").all())
    return list(
        conn.execute(
            text(
                "SELECT h.id FROM alert_history h LEFT JOIN alert_rules r ON r.id = h.rule_id "
                "WHERE r.id IS NULL"
            )
        ).all()
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_0002_converts_rule_names_to_rule_ids_and_back(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = new_database_url(backend, request, tmp_path)
    run_sync(url, at_0001_with_rows)
    assert run_sync(url, revision) == "0001"
    before = run_sync(
        url, lambda c: history(c, "rule_id", "status", "message", "acknowledged_by_user_id")
    )

    migrate_to_head(url)

    assert run_sync(url, revision) == "0002"
    converted = run_sync(url, lambda c: history(c, "alert_name", "rule_id"))
    made = 5  # the next id of alert_rules: the rule made for MeshblockUnsynced
    assert converted == [
        (1, "MeshblockSdsDown", 1),
        (2, "MeshblockUnsynced", made),
        (3, "MeshblockUnsynced", made),
        (4, "MeshblockTwoGroups", 2),  # the oldest row of the name
        (5, "MeshblockSdsDown", 1),
    ]
    assert run_sync(url, rules)[-1] == (
        made,
        "MeshblockUnsynced",
        "",
        "error",  # from the newest alert of the name
        "newest",
        "https://r.example/#u",
        True,
    )
    assert [r[0] for r in run_sync(url, rules)] == [1, 2, 3, 4, made]
    assert run_sync(url, fk_problems) == []
    # The other columns are as they were.
    kept = run_sync(
        url,
        lambda c: history(c, "alert_name", "status", "message", "acknowledged_by_user_id"),
    )
    assert kept == before

    run_sync(url, lambda c: alembic(c, "downgrade", "0001"))

    assert run_sync(url, revision) == "0001"
    assert (
        run_sync(
            url, lambda c: history(c, "rule_id", "status", "message", "acknowledged_by_user_id")
        )
        == before
    )
    assert [r[:3] for r in run_sync(url, rules)] == [(i, n, g) for i, n, g in RULES]

    # And up again: the same result (the made rule may get another id).
    migrate_to_head(url)
    again = run_sync(url, lambda c: history(c, "alert_name", "rule_id"))
    remade = run_sync(url, rules)[-1]
    assert remade[1:3] == ("MeshblockUnsynced", "")
    assert again == [(i, n, remade[0] if r == made else r) for i, n, r in converted]
