"""MGMT's own Prometheus metrics, in a registry of its own (with the process and
build-info series of every daemon, meshblock.daemon_metrics).

Alert counts come from the database at scrape time (the ``/metrics`` handler takes a
snapshot, then the collector renders it); the webhook and rule-sync figures are
counters kept in memory.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshblock.daemon_metrics import daemon_registry
from meshblock.mgmt.models import AlertStatus, Severity


class AlertCountCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: dict[tuple[str, str], int] = {}

    def collect(self) -> Any:
        g = GaugeMetricFamily(
            "meshblock_mgmt_alerts",
            "Alerts in MGMT's history by status and severity",
            labels=["status", "severity"],
        )
        for status in AlertStatus:
            for severity in Severity:
                g.add_metric(
                    [status.value, severity.value],
                    self.snapshot.get((status.value, severity.value), 0),
                )
        yield g


class MgmtMetrics:
    def __init__(self) -> None:
        r = self.registry = daemon_registry()
        self.alerts = AlertCountCollector()
        r.register(self.alerts)
        self.webhook_requests = Counter(
            "meshblock_mgmt_webhook_requests",
            "Alertmanager webhook calls, by outcome (ok, unauthorized, invalid, error)",
            ["outcome"],
            registry=r,
        )
        self.webhook_alerts = Counter(
            "meshblock_mgmt_webhook_alerts",
            "Alerts received through the webhook, by Alertmanager status and what was done "
            "(inserted, updated)",
            ["status", "action"],
            registry=r,
        )
        self.rule_syncs = Counter(
            "meshblock_mgmt_rule_syncs",
            "Rule syncs from Prometheus, by outcome (ok, error)",
            ["outcome"],
            registry=r,
        )
        self.rules = Gauge(
            "meshblock_mgmt_alert_rules", "Alerting rules known from the last sync", registry=r
        )
        self.rule_sync_last_success = Gauge(
            "meshblock_mgmt_rule_sync_last_success_timestamp_seconds",
            "When the rules were last synced from Prometheus (0: never)",
            registry=r,
        )
        self.logins = Counter(
            "meshblock_mgmt_logins",
            "Login attempts, by outcome (ok, failed, throttled)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("ok", "unauthorized", "invalid", "error"):
            self.webhook_requests.labels(outcome)
        for outcome in ("ok", "error"):
            self.rule_syncs.labels(outcome)
        for outcome in ("ok", "failed", "throttled"):
            self.logins.labels(outcome)
