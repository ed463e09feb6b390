"""alert_history.rule_id refers to alert_rules.id; the alert's name moves to alert_name

Each alert's rule is the rule of its name in alert_rules (the oldest row if several
groups have one); a name no rule has gets a row of its own, made from the newest alert
of that name (group "", last_synced NULL: the next sync that lists the rule takes it
over, meshblock.mgmt.rules). alert_rules.last_synced may be NULL from now on.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 07:00:00
"""

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _annotations(details: Any) -> dict[str, Any]:
    if isinstance(details, str):
        try:
            details = json.loads(details)
        except ValueError:
            return {}
    if not isinstance(details, dict):
        return {}
    annotations = details.get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _text(value: Any, limit: int | None = None) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()[:limit] if limit else value.strip()


def upgrade() -> None:
    with op.batch_alter_table("alert_rules") as batch_op:
        batch_op.alter_column(
            "last_synced", existing_type=sa.DateTime(timezone=True), nullable=True
        )
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.add_column(sa.Column("alert_name", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("rule_ref", sa.Integer(), nullable=True))

    conn = op.get_bind()
    conn.execute(sa.text("UPDATE alert_history SET alert_name = rule_id"))
    missing = conn.execute(
        sa.text(
            "SELECT DISTINCT rule_id FROM alert_history "
            "WHERE rule_id NOT IN (SELECT name FROM alert_rules) ORDER BY rule_id"
        )
    ).scalars()
    for name in list(missing):
        newest = conn.execute(
            sa.text(
                "SELECT severity, details_json FROM alert_history WHERE rule_id = :name "
                "ORDER BY fired_at DESC, id DESC LIMIT 1"
            ),
            {"name": name},
        ).one()
        annotations = _annotations(newest.details_json)
        conn.execute(
            sa.text(
                "INSERT INTO alert_rules (name, group_name, expression, for_seconds, "
                "severity, summary, runbook_url, last_synced) "
                "VALUES (:name, '', '', 0, :severity, :summary, :runbook_url, NULL)"
            ),
            {
                "name": name,
                "severity": newest.severity,
                "summary": _text(annotations.get("summary")),
                "runbook_url": _text(annotations.get("runbook_url"), 1024),
            },
        )
    conn.execute(
        sa.text(
            "UPDATE alert_history SET rule_ref = "
            "(SELECT min(r.id) FROM alert_rules r WHERE r.name = alert_history.rule_id)"
        )
    )

    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.drop_index("ix_alert_history_rule_id")
        batch_op.drop_column("rule_id")
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.alter_column(
            "rule_ref", new_column_name="rule_id", existing_type=sa.Integer(), nullable=False
        )
        batch_op.alter_column("alert_name", existing_type=sa.String(length=255), nullable=False)
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.create_foreign_key(
            "fk_alert_history_rule_id_alert_rules", "alert_rules", ["rule_id"], ["id"]
        )
        batch_op.create_index("ix_alert_history_rule_id", ["rule_id"])
        batch_op.create_index("ix_alert_history_alert_name", ["alert_name"])


def downgrade() -> None:
    """Back to names in rule_id. Rules that Prometheus did not list at the last sync
    (last_synced NULL: made from alerts, or removed since) are deleted, as 0001's sync
    would have."""
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.add_column(sa.Column("rule_name", sa.String(length=255), nullable=True))
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE alert_history SET rule_name = alert_name"))
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.drop_index("ix_alert_history_alert_name")
        batch_op.drop_index("ix_alert_history_rule_id")
        batch_op.drop_constraint("fk_alert_history_rule_id_alert_rules", type_="foreignkey")
        batch_op.drop_column("rule_id")
        batch_op.drop_column("alert_name")
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.alter_column(
            "rule_name",
            new_column_name="rule_id",
            existing_type=sa.String(length=255),
            nullable=False,
        )
    with op.batch_alter_table("alert_history") as batch_op:
        batch_op.create_index("ix_alert_history_rule_id", ["rule_id"])
    conn.execute(sa.text("DELETE FROM alert_rules WHERE last_synced IS NULL"))
    with op.batch_alter_table("alert_rules") as batch_op:
        batch_op.alter_column(
            "last_synced", existing_type=sa.DateTime(timezone=True), nullable=False
        )
