"""MGMT with the real servers it reads from and writes to: a real Alertmanager
(silences), a real Prometheus (rule sync, dashboard charts) and a real MDM (cluster
health on the dashboard).

Alertmanager and Prometheus come from the Debian packages ``prometheus-alertmanager``
and ``prometheus``; a missing one fails the tests (``make deps`` installs them).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _mdm import MdmDaemon
from _mgmt import MgmtDaemon, WebClient
from _monitoring import AlertmanagerServer, PrometheusServer, ToolMissing
from _process import started
from _wait import wait_until
from test_mgmt import alert, by_component, details, err, notification, ok

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

RULES_V1 = """\
groups:
  - name: meshblock-sds
    rules:
      - alert: MeshblockSdsDown
        expr: meshblock_sds_connected == 0
        for: 1m
        labels:
          severity: critical
        annotations:
          summary: An SDS is down
          runbook_url: https://example.invalid/runbook.md#meshblocksdsdown
      - alert: MeshblockTestAlwaysQuiet
        expr: vector(1) == 0
        labels:
          severity: warning
        annotations:
          summary: Never fires
  - name: meshblock-pools
    rules:
      - record: meshblock:pool_used:ratio
        expr: sum(meshblock_pool_used_ratio)
      - alert: MeshblockPoolNearFull
        expr: meshblock_pool_used_ratio > 0.8
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: A pool is nearly full
"""

RULES_V2 = """\
groups:
  - name: meshblock-sds
    rules:
      - alert: MeshblockSdsDown
        expr: meshblock_sds_connected < 1
        for: 2m
        labels:
          severity: critical
        annotations:
          summary: An SDS is down (v2)
  - name: meshblock-mdm
    rules:
      - alert: MeshblockMdmDown
        expr: up{job="mdm"} == 0
        for: 1m
        labels:
          severity: critical
        annotations:
          summary: The MDM is down
"""


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertmanagerServer]:
    try:
        server = AlertmanagerServer(tmp_path_factory.mktemp("alertmanager"))
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with started(server, check_exit=False):
        yield server


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    try:
        server = PrometheusServer(
            tmp_path_factory.mktemp("prometheus"), {"meshblock.rules.yml": RULES_V1}
        )
    except ToolMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with started(server, check_exit=False):
        yield server


@pytest.fixture(scope="module")
def mdm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MdmDaemon]:
    workdir = tmp_path_factory.mktemp("mdm")
    # with TLS, as MGMT's [tls] (its HTTPS) makes it reach the MDM over HTTPS
    daemon = MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir / 'mdm.db'}", tls=True)
    with started(daemon, check_exit=False):
        yield daemon


@pytest.fixture(scope="module")
def mgmt(
    tmp_path_factory: pytest.TempPathFactory,
    alertmanager: AlertmanagerServer,
    prometheus: PrometheusServer,
    mdm: MdmDaemon,
) -> Iterator[MgmtDaemon]:
    workdir = tmp_path_factory.mktemp("mgmt-upstream")
    daemon = MgmtDaemon(
        workdir,
        f"sqlite+aiosqlite:///{workdir / 'mgmt.db'}",
        {
            "mdm": {"url": mdm.url},
            "prometheus": {"url": prometheus.url, "chart_range_s": 600.0, "chart_step_s": 15.0},
            "alertmanager": {"url": alertmanager.url, "silence_duration_s": 1800.0},
        },
    )
    daemon.create_users()
    with started(daemon):
        yield daemon
    daemon.assert_clean_log()


def parse(t: str) -> dt.datetime:
    return dt.datetime.fromisoformat(t.replace("Z", "+00:00"))


# -- Alertmanager ----------------------------------------------------------------------


def test_silence_creates_an_alertmanager_silence(
    mgmt: MgmtDaemon, alertmanager: AlertmanagerServer
) -> None:
    api = mgmt.api()
    a = alert(sds="sds-silenced", protection_domain="pd1", instance="10.0.0.9:7073")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "sds-silenced")
    before = time.time()
    done = ok(
        api.post(f"/api/alerts/{row['id']}/silence", {"duration_s": 900, "comment": "disk swap"})
    )
    assert done["status"] == "suppressed"
    recorded = details(api, row["id"])["silence"]
    assert recorded["created_by"] == "admin"

    (silence,) = [s for s in alertmanager.silences() if s["id"] == recorded["id"]]
    assert silence["status"]["state"] == "active"
    assert silence["createdBy"] == "admin"
    assert silence["comment"] == "disk swap"
    matchers = {
        m["name"]: (m["value"], m["isRegex"], m.get("isEqual", True)) for m in silence["matchers"]
    }
    assert matchers == {k: (v, False, True) for k, v in a["labels"].items()}
    length = (parse(silence["endsAt"]) - parse(silence["startsAt"])).total_seconds()
    assert 890 <= length <= 910
    assert parse(silence["endsAt"]).timestamp() >= before + 890

    # Only active or acknowledged alerts can be silenced; nothing more is created.
    count = len(alertmanager.silences())
    err(api.post(f"/api/alerts/{row['id']}/silence"), 409, "conflict")
    assert len(alertmanager.silences()) == count
    # A resolved notification still closes a silenced alert.
    ok(mgmt.webhook(notification(dict(a, status="resolved", endsAt="2026-01-01T01:00:00Z"))))
    assert ok(api.get(f"/api/alerts/{row['id']}"))["status"] == "resolved"


def test_silence_form_on_the_alerts_page(
    mgmt: MgmtDaemon, alertmanager: AlertmanagerServer
) -> None:
    api = mgmt.api()
    a = alert("MeshblockPoolNearFull", severity="warning", pool="pool-form")
    ok(mgmt.webhook(notification(a)))
    (row,) = by_component(api, "pool-form")
    web = WebClient(mgmt.url)
    web.login("admin", mgmt.admin_password)
    page = web.get("/alerts")
    assert f'id="silence-{row["id"]}"' in page.body
    resp = web.post(
        f"/alerts/{row['id']}/silence",
        {"csrf_token": web.csrf_token(), "duration_s": "3600", "comment": ""},
    )
    assert resp.status == 303, resp.body
    after = ok(api.get(f"/api/alerts/{row['id']}"))
    assert after["status"] == "suppressed"
    recorded = details(api, row["id"])["silence"]
    (silence,) = [s for s in alertmanager.silences() if s["id"] == recorded["id"]]
    assert silence["createdBy"] == "admin"
    assert {m["name"]: m["value"] for m in silence["matchers"]} == a["labels"]


# -- Prometheus ------------------------------------------------------------------------


def rules_by_name(mgmt: MgmtDaemon) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in ok(mgmt.api().get("/api/rules"))["rules"]}


def test_rules_are_synced_at_start_and_on_demand(
    mgmt: MgmtDaemon, prometheus: PrometheusServer
) -> None:
    # the periodic sync runs once at start (the rows of alerts that came before it
    # have no last_synced)
    wait_until(
        lambda: any(r["last_synced"] for r in rules_by_name(mgmt).values()),
        20,
        "the rules synced at start",
        interval=0.2,
    )
    rules = rules_by_name(mgmt)
    assert set(rules) == {"MeshblockSdsDown", "MeshblockTestAlwaysQuiet", "MeshblockPoolNearFull"}
    sds = rules["MeshblockSdsDown"]
    assert sds["group"] == "meshblock-sds"
    assert sds["expression"] == "meshblock_sds_connected == 0"
    assert sds["for_seconds"] == 60
    assert sds["severity"] == "critical"
    assert sds["summary"] == "An SDS is down"
    assert sds["runbook_url"] == "https://example.invalid/runbook.md#meshblocksdsdown"
    assert sds["last_synced"]
    assert rules["MeshblockPoolNearFull"]["group"] == "meshblock-pools"
    assert rules["MeshblockTestAlwaysQuiet"]["runbook_url"] is None

    viewer = mgmt.api(mgmt.viewer_token)
    err(viewer.post("/api/rules/sync"), 403, "forbidden")

    # An alert of a rule Prometheus does not have (yet) gets a rule row of its own,
    # which the sync takes over once Prometheus has the rule.
    early = alert("MeshblockMdmDown", component_id="mdm-early")
    early["annotations"]["runbook_url"] = "https://example.invalid/early#mdm"
    ok(mgmt.webhook(notification(early)))
    (row,) = by_component(mgmt.api(), "mdm-early")
    made = details(mgmt.api(), row["id"])["rule"]
    assert (made["group"], made["last_synced"]) == ("", None)
    assert made["runbook_url"] == "https://example.invalid/early#mdm"
    pool_alert = alert("MeshblockPoolNearFull", severity="warning", pool="pool-kept")
    ok(mgmt.webhook(notification(pool_alert)))

    (prometheus.workdir / "meshblock.rules.yml").write_text(RULES_V2)
    prometheus.reload()
    result = ok(mgmt.api().post("/api/rules/sync"))
    # MeshblockTestAlwaysQuiet is gone; MeshblockPoolNearFull is gone from Prometheus
    # but stays, unsynced, for its alerts. (A rule row made from an alert that came
    # while the sync at start ran is removed too: its alerts move to the synced rule.)
    assert (result["total"], result["added"], result["updated"]) == (2, 1, 1), result
    assert result["removed"] >= 1, result
    listed = ok(mgmt.api().get("/api/rules"))["rules"]
    assert not [r for r in listed if r["group"] == "" and r["name"] != "MeshblockPoolNearFull"]
    rules = rules_by_name(mgmt)
    assert set(rules) == {"MeshblockSdsDown", "MeshblockMdmDown", "MeshblockPoolNearFull"}
    assert rules["MeshblockPoolNearFull"]["last_synced"] is None
    assert rules["MeshblockSdsDown"]["for_seconds"] == 120
    assert rules["MeshblockSdsDown"]["summary"] == "An SDS is down (v2)"
    assert rules["MeshblockMdmDown"]["group"] == "meshblock-mdm"
    assert rules["MeshblockMdmDown"]["id"] == made["id"]
    assert rules["MeshblockMdmDown"]["runbook_url"] is None  # as Prometheus has it
    assert details(mgmt.api(), row["id"])["rule"]["group"] == "meshblock-mdm"


# -- the dashboard with a live MDM and Prometheus --------------------------------------


def test_dashboard_with_a_live_mdm(mgmt: MgmtDaemon, mdm: MdmDaemon) -> None:
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)
    page = web.get("/health")
    assert page.status == 200
    assert 'id="cluster-status" class="status status-ok" data-status="ok"' in page.body
    assert 'id="component-mdm-1"' in page.body
    assert 'id="cluster-unreachable"' not in page.body
    # Prometheus answers (with no data for these series): the charts are drawn.
    assert page.body.count('<svg class="chart"') == 2
    assert 'class="chart-error' not in page.body

    summary = web.get("/health/api/summary").body
    assert summary["health_summary"]["status"] == "ok"
    assert summary["health_summary"]["mdm_reachable"] is True
    assert summary["health_summary"]["cluster"] == "test"
    assert summary["health_metrics"]["sds_total"] == 0
    assert set(summary["alert_counts"]["by_status"]) == {
        "active",
        "acknowledged",
        "resolved",
        "suppressed",
    }
    comps = web.get("/health/api/components").body
    assert isinstance(comps, list)
    (m,) = [c for c in comps if c["component_type"] == "mdm"]
    for key in (
        "address",
        "component_id",
        "component_type",
        "control_port",
        "data_port",
        "state",
        "last_seen",
    ):
        assert key in m
    assert (m["component_id"], m["control_port"], m["state"]) == ("mdm-1", mdm.port, "connected")


def test_charts_draw_prometheus_series(mgmt: MgmtDaemon, prometheus: PrometheusServer) -> None:
    """The IO chart's query reads ``meshblock_sdc_bytes_total``; a recording rule
    produces it here as a counter growing by 1000 per second, without any SDC."""
    rules = RULES_V2 + (
        "  - name: meshblock-chart-fixture\n"
        "    interval: 1s\n"
        "    rules:\n"
        "      - record: meshblock_sdc_bytes_total\n"
        '        expr: label_replace(vector(time() * 1000), "op", "read", "", "")\n'
    )
    path: Path = prometheus.workdir / "meshblock.rules.yml"
    path.write_text(rules)
    prometheus.reload()
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)

    def page() -> str | None:
        body: str = web.get("/health").body
        return body if 'data-series="read"' in body else None

    body = wait_until(page, 30, "a read series on the health page", interval=1)
    assert 'data-series="read"' in body
    # rate() over a window that the young series only partly covers is below 1000 B/s.
    m = re.search(r"read: ([\d,.]+) B/s", body)
    assert m is not None and 0 < float(m.group(1).replace(",", "")) <= 1010, m
    assert re.search(r'<polyline class="series" data-series="read"[^>]* points="[\d., ]+"', body)


def test_the_dashboard_shows_each_pools_scrub(mgmt: MgmtDaemon, mdm: MdmDaemon) -> None:
    """The MDM's /health/metrics carries each pool's scrub in short; the dashboard
    shows it, and a pool paused by the operator as paused."""
    pool = mdm.create_pool("pd-scrub", "sp-scrub", 8)
    status, doc = mdm.api().post(f"/api/v1/pools/{pool['id']}/scrub/pause", {})
    assert status == 200 and doc["state"] == "paused", doc
    web = WebClient(mgmt.url)
    web.login("viewer", mgmt.viewer_password)
    page = web.get("/health")
    assert page.status == 200 and 'id="scrub-table"' in page.body
    row = re.search(
        r'<tr class="scrub state-paused" data-state="paused">\s*<td>sp-scrub</td>', page.body
    )
    assert row is not None, page.body
