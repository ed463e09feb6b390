"""The monitoring configuration under ``monitoring/``, checked with the real tools.

- ``promtool check config`` / ``check rules`` / ``test rules`` on the shipped files,
  and ``amtool check-config`` on the Alertmanager configuration (also with its
  commented example receivers switched on);
- the conventions of docs/monitoring.md ("Alert rules"): names, ``for:``, severity,
  the three annotations, a runbook section per alert, a ``...Down`` alert and a
  target-missing alert per scrape job, and a promtool test per alert that shows it
  pending (not firing) inside its ``for:`` window and firing after it with its full
  labels and annotations;
- the inhibition (MeshblockSdsDown mutes MeshblockPgsDegraded in its protection
  domain) and the webhook contract (bearer token, resolved notifications) on a real
  Alertmanager posting to a webhook receiver in this test;
- the metrics the rules read are exposed by a real MDM (or documented by the SDS and
  SDC, whose metrics the rules read through their own scrape jobs).

promtool and amtool come from Debian's ``prometheus`` and ``prometheus-alertmanager``
packages; the tests fail (never skip) without them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import _http
from _mdm import MdmDaemon
from _monitoring import AlertmanagerServer
from _wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTMANAGER_CONFIG = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/meshblock/meshblock/blob/main/docs/runbook.md"

APT_HINT = "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager"

#: The scrape jobs and the port of their targets in the lab files.
JOBS = {
    "meshblock_mdm": 6611,
    "meshblock_sds": 7073,
    "meshblock_sdc": 7074,
    "meshblock_mgmt": 8080,
    "prometheus": 9090,
    "alertmanager": 9093,
}

#: MGMT's webhook receiver: the contract in docs/monitoring.md.
WEBHOOK_URL = "http://127.0.0.1:8080/api/alerts/webhook"

#: Metrics the rules read that no daemon exports yet, and what will add them.
PENDING_METRICS: dict[str, str] = {}

SEVERITIES = {"warning", "critical"}
ANNOTATIONS = {"summary", "description", "runbook_url"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install it with: {APT_HINT}", pytrace=False)
    return path


def run(argv: list[str], timeout: float = 120, stdout_only: bool = False) -> str:
    """Run a checker; fail with its output unless it exits 0; return its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{out}"
    return proc.stdout if stdout_only else out


def receivers(config: Path, labels: dict[str, str]) -> list[str]:
    """The receivers Alertmanager's routing tree picks for an alert with these labels."""
    argv = [tool("amtool"), "config", "routes", "test", f"--config.file={config}"]
    out = run(argv + [f"{k}={v}" for k, v in labels.items()], stdout_only=True)
    return out.strip().split(",")


def load(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> float:
    """A Prometheus duration (``1h30m``, ``90s``) in seconds."""
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def rule_files() -> list[Path]:
    files = sorted(RULES_DIR.glob("*.yml"))
    assert files, f"no rule files in {RULES_DIR}"
    return files


def rule_test_files() -> list[Path]:
    files = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert files, f"no promtool test files in {RULE_TESTS_DIR}"
    return files


def load_alerts() -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every alerting rule by name, with the file that defines it (names are unique)."""
    alerts: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in rule_files():
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                name = rule["alert"]
                assert name not in alerts, f"{name} is defined twice ({alerts[name][0]}, {path})"
                alerts[name] = (path, rule)
    return alerts


ALERTS = load_alerts()


def load_records() -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every recording rule by the name it records, with its file (names are unique)."""
    records: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in rule_files():
        for group in load(path)["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    name = rule["record"]
                    assert name not in records, f"{name} is recorded twice"
                    records[name] = (path, rule)
    return records


RECORDS = load_records()

#: The operations a recorded name may end in: rates, means and 99th percentiles of
#: the histograms, each over a window (docs/monitoring.md, "Recording rules").
RECORD_OPERATION = re.compile(r"(rate|mean|p99_)(1m|5m)")


def scrape_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in load(PROMETHEUS_CONFIG)["scrape_configs"]}


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings (lowercase, punctuation dropped)."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# -- the real checkers ------------------------------------------------------------------


def test_promtool_check_config() -> None:
    """The scrape configuration, its rule files and its file_sd target files are valid
    (promtool resolves the relative paths against the configuration's directory)."""
    out = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert f"SUCCESS: {len(rule_files())} rule files found" in out, out
    assert "is valid prometheus config file syntax" in out, out


def test_promtool_check_rules() -> None:
    out = run([tool("promtool"), "check", "rules", *map(str, rule_files())])
    assert out.count("SUCCESS") == len(rule_files()), out


def test_promtool_test_rules() -> None:
    files = rule_test_files()
    out = run([tool("promtool"), "test", "rules", *map(str, files)])
    assert out.count("SUCCESS") == len(files), out
    assert "FAILED" not in out


def test_promtool_test_rules_catches_a_wrong_annotation(tmp_path: Path) -> None:
    """The rule tests compare annotations exactly: a changed description fails them."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    text = (RULES_DIR / "sds.yml").read_text()
    broken = text.replace("Every PG with a", "Every PG with one")
    assert broken != text
    (tmp_path / "rules" / "sds.yml").write_text(broken)
    shutil.copy(RULE_TESTS_DIR / "sds_test.yml", tmp_path / "tests" / "sds_test.yml")
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", str(tmp_path / "tests" / "sds_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "MeshblockSdsDown" in proc.stdout + proc.stderr


def uncomment_examples(text: str) -> str:
    """The Alertmanager configuration with its commented examples switched on: a block
    starts at ``# routes:`` or ``# - name: ...`` and goes on while lines are comments
    indented one level deeper than its ``#``."""
    out: list[str] = []
    block: str | None = None
    for line in text.splitlines():
        m = re.match(r"( *)# (- name: |routes:)", line)
        if m:
            block = m.group(1)
        elif block is None or not line.startswith(block + "#  "):
            block = None
            out.append(line)
            continue
        out.append(block + line[len(block) + 2 :])
    return "\n".join(out) + "\n"


def test_amtool_check_config(tmp_path: Path) -> None:
    out = run([tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG)])
    assert "SUCCESS" in out and "1 receivers" in out, out
    # The commented e-mail and chat examples are valid configuration once uncommented.
    examples = tmp_path / "alertmanager.yml"
    examples.write_text(uncomment_examples(ALERTMANAGER_CONFIG.read_text()))
    out = run([tool("amtool"), "check-config", str(examples)])
    assert "SUCCESS" in out and "3 receivers" in out, out
    # ... and MGMT still gets every alert, whatever else gets some.
    assert receivers(examples, {"alertname": "MeshblockMgmtDown", "severity": "critical"}) == [
        "meshblock-mgmt",
        "meshblock-oncall-email",
        "meshblock-oncall-chat",
    ]
    assert receivers(examples, {"alertname": "MeshblockPgsDegraded", "severity": "warning"}) == [
        "meshblock-mgmt"
    ]


@pytest.mark.parametrize("alertname", sorted(ALERTS))
def test_amtool_routes_every_alert_to_mgmt(alertname: str) -> None:
    labels = {"alertname": alertname, **ALERTS[alertname][1]["labels"]}
    assert receivers(ALERTMANAGER_CONFIG, labels) == ["meshblock-mgmt"]


def test_alertmanager_webhook_contract() -> None:
    """The shipped receiver is MGMT's webhook, with a bearer token from a file and
    resolved notifications; grouping and the inhibition use labels the rules have."""
    cfg = load(ALERTMANAGER_CONFIG)
    route = cfg["route"]
    assert route["receiver"] == "meshblock-mgmt"
    assert route["group_by"] == ["alertname", "protection_domain", "pool"]
    assert seconds(route["group_wait"]) <= seconds(route["group_interval"])
    assert seconds(route["group_interval"]) < seconds(route["repeat_interval"])
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "meshblock-mgmt"]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"] == WEBHOOK_URL
    assert hook["send_resolved"] is True
    auth = hook["http_config"]["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials_file"].startswith("/")
    assert "credentials" not in auth  # the secret lives in a file, not in the config
    inhibit = [
        r
        for r in cfg["inhibit_rules"]
        if r["source_matchers"] == ['alertname="MeshblockSdsDown"']
        and r["target_matchers"] == ['alertname="MeshblockPgsDegraded"']
    ]
    assert len(inhibit) == 1 and inhibit[0]["equal"] == ["protection_domain"]
    # Every inhibition's target and source exist, and both show the `equal` labels in
    # their descriptions (so the label is there, not silently equal by absence).
    for rule in cfg["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            name = re.fullmatch(r'alertname="(\w+)"', matcher)
            assert name and name.group(1) in ALERTS, matcher
            description = ALERTS[name.group(1)][1]["annotations"]["description"]
            for label in rule["equal"]:
                assert f"$labels.{label}" in description, (name.group(1), label)


# -- conventions ------------------------------------------------------------------------


@pytest.mark.parametrize("alertname", sorted(ALERTS))
def test_alert_conventions(alertname: str) -> None:
    path, rule = ALERTS[alertname]
    assert re.fullmatch(r"Meshblock(?:[A-Z][a-z0-9]+)+", alertname), "CamelCase, product first"
    assert seconds(rule.get("for", "0s")) > 0, f"{alertname} ({path.name}) has no for:"
    assert set(rule["labels"]) == {"severity"}, rule["labels"]
    assert rule["labels"]["severity"] in SEVERITIES
    ann = rule["annotations"]
    assert set(ann) == ANNOTATIONS, sorted(ann)
    assert "{{" not in ann["summary"], "the summary is fixed text"
    assert "$labels." in ann["description"], "the description names what it is about"
    assert ann["runbook_url"] == f"{RUNBOOK_URL}#{alertname.lower()}"
    assert alertname.lower() in runbook_anchors(), f"no section {alertname} in {RUNBOOK}"


def test_runbook_has_no_section_for_a_missing_alert() -> None:
    sections = {a for a in runbook_anchors() if a.startswith("meshblock")}
    assert sections == {a.lower() for a in ALERTS}


def test_every_scrape_job_has_alerts_for_down_and_missing_targets() -> None:
    jobs = scrape_jobs()
    assert set(jobs) == set(JOBS)
    exprs = {name: " ".join(rule["expr"].split()) for name, (_, rule) in ALERTS.items()}
    missing_expr = exprs["MeshblockTargetMissing"]
    for job in jobs:
        down = [n for n, e in exprs.items() if re.fullmatch(rf'up\{{job="{job}"\}} == 0', e)]
        assert len(down) == 1, f"scrape job {job}: no `up == 0` alert"
        assert f'absent(up{{job="{job}"}})' in missing_expr, f"{job} not in TargetMissing"


def test_scrape_targets_come_from_file_sd() -> None:
    """Each job reads targets/<job>.yml (which Ansible writes); the lab files point at
    the daemons' default ports on loopback."""
    cfg = load(PROMETHEUS_CONFIG)
    assert cfg["rule_files"] == ["rules/*.yml"]
    (am,) = cfg["alerting"]["alertmanagers"]
    assert am["file_sd_configs"] == [{"files": ["targets/alertmanager.yml"]}]
    for name, job in scrape_jobs().items():
        # The daemons' /metrics need a read token (the files the role writes).
        extra = {"authorization"} if name.startswith("meshblock_") else set()
        assert set(job) == {"job_name", "file_sd_configs"} | extra, f"{name}: {sorted(job)}"
        assert job["file_sd_configs"] == [{"files": [f"targets/{name}.yml"]}]
        groups = load(PROMETHEUS_DIR / "targets" / f"{name}.yml")
        targets = [t for g in groups for t in g["targets"]]
        assert targets == [f"127.0.0.1:{JOBS[name]}"], (name, targets)
    assert scrape_jobs()["meshblock_mdm"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": "mdm_read_token",
    }
    assert (PROMETHEUS_DIR / "mdm_read_token").is_file()
    for component_job in ("meshblock_sds", "meshblock_sdc", "meshblock_mgmt"):
        assert scrape_jobs()[component_job]["authorization"] == {
            "type": "Bearer",
            "credentials_file": "metrics_read_token",
        }, component_job
    assert (PROMETHEUS_DIR / "metrics_read_token").is_file()
    (sds,) = load(PROMETHEUS_DIR / "targets" / "meshblock_sds.yml")
    assert set(sds["labels"]) == {"sds", "protection_domain", "fault_set"}
    (sdc,) = load(PROMETHEUS_DIR / "targets" / "meshblock_sdc.yml")
    assert set(sdc["labels"]) == {"sdc"}


def rule_tests_by_file() -> dict[Path, list[dict[str, Any]]]:
    """promtool test cases, keyed by the rule files their test file loads."""
    cases: dict[Path, list[dict[str, Any]]] = {}
    for path in rule_test_files():
        doc = load(path)
        for rf in doc["rule_files"]:
            rule_path = (path.parent / rf).resolve()
            assert rule_path.is_file(), f"{path.name}: no rule file {rf}"
            cases.setdefault(rule_path, []).extend(doc["tests"])
    return cases


def test_every_rule_file_is_tested() -> None:
    tested = set(rule_tests_by_file())
    assert {p.resolve() for p in rule_files()} <= tested


def _proves_pending_then_firing(case: dict[str, Any], alertname: str, rule: dict[str, Any]) -> bool:
    """True when this test case shows the alert pending, not firing, inside its ``for:``
    window, and firing once the window has passed, with its full labels and
    annotations."""
    for_s = seconds(rule["for"])
    tests = [t for t in case.get("alert_rule_test", []) if t["alertname"] == alertname]
    firing = [t for t in tests if t.get("exp_alerts")]
    silent = {seconds(t["eval_time"]) for t in tests if not t.get("exp_alerts")}
    pending = set()
    for t in case.get("promql_expr_test", []):
        if t["expr"].replace(" ", "") != f'ALERTS{{alertname="{alertname}"}}':
            continue
        samples = t.get("exp_samples") or []
        if samples and all('alertstate="pending"' in s["labels"] for s in samples):
            pending.add(seconds(t["eval_time"]))
    for f in firing:
        t_fire = seconds(f["eval_time"])
        for a in f["exp_alerts"]:
            assert a["exp_labels"]["severity"] == rule["labels"]["severity"], alertname
            assert set(a["exp_annotations"]) == ANNOTATIONS, alertname
        if any(t_fire - for_s <= t < t_fire for t in silent & pending):
            return True
    return False


@pytest.mark.parametrize("alertname", sorted(ALERTS))
def test_every_alert_has_a_for_window_test(alertname: str) -> None:
    path, rule = ALERTS[alertname]
    cases = rule_tests_by_file().get(path.resolve(), [])
    assert any(_proves_pending_then_firing(c, alertname, rule) for c in cases), (
        f"{alertname}: no promtool test case in {RULE_TESTS_DIR} checks it pending and "
        f"silent inside its for: ({rule['for']}) and firing after it"
    )


def test_recording_rules_exist() -> None:
    """The per-SDC, per-volume, per-pool and per-SDS IO rates MGMT and users chart."""
    levels = {name.split(":")[0] for name in RECORDS}
    assert {"sdc", "volume", "pool", "sds"} <= levels, sorted(RECORDS)
    for level in ("sdc", "volume", "pool"):
        for metric in ("meshblock_sdc_ops", "meshblock_sdc_bytes"):
            assert f"{level}:{metric}:rate1m" in RECORDS, (level, metric)
    for level, component in (("sdc", "sdc"), ("sds", "sds")):
        for metric in (f"meshblock_{component}_ops", f"meshblock_{component}_bytes"):
            assert f"{level}:{metric}:rate1m" in RECORDS, (level, metric)
        for op in ("mean1m", "p99_1m"):
            assert f"{level}:meshblock_{component}_op_duration_seconds:{op}" in RECORDS


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_recording_rule_conventions(record: str) -> None:
    """``level:metric:operations`` (docs/monitoring.md): the level is what the rule
    sums by, the metric the series it reads without ``_total``/``_bucket``/..., and
    the operation one of rate/mean/p99 over a window. It adds no labels, and the
    per-pool rates carry the pool's name, not its id."""
    path, rule = RECORDS[record]
    m = re.fullmatch(r"([a-z_]+):(meshblock_[a-z0-9_]+):([a-z0-9_]+)", record)
    assert m, f"{record} ({path.name}) is not level:metric:operations"
    level, metric, operation = m.groups()
    op_match = RECORD_OPERATION.fullmatch(operation)
    assert op_match, operation
    assert "labels" not in rule, rule
    expr = " ".join(rule["expr"].split())
    assert re.search(rf"\b{metric}(_total|_sum|_count|_bucket)?\b", expr) or (
        f":{metric}:" in expr
    ), f"{record} does not read {metric}"
    # The window of the name is the window of every range selector.
    assert set(re.findall(r"\[(\w+)\]", expr)) <= {op_match.group(2)}, expr
    assert re.search(rf"\bby \({level}\b", expr), f"{record} is not summed by {level}"
    if level == "pool":
        assert expr.startswith("sum by (pool, protection_domain, op) ("), expr
        assert "meshblock_pool_info" in expr


def recorded_in_tests() -> dict[Path, set[str]]:
    """Rule file → the recorded names its promtool tests expect samples of."""
    out: dict[Path, set[str]] = {}
    for path in rule_test_files():
        doc = load(path)
        names = {
            m
            for case in doc["tests"]
            for t in case.get("promql_expr_test", [])
            if t.get("exp_samples")
            for m in re.findall(r"\w+:\w+:\w+", t["expr"])
        }
        for rf in doc["rule_files"]:
            out.setdefault((path.parent / rf).resolve(), set()).update(names)
    return out


@pytest.mark.parametrize("record", sorted(RECORDS))
def test_every_recording_rule_has_a_test(record: str) -> None:
    path, _ = RECORDS[record]
    assert record in recorded_in_tests().get(path.resolve(), set()), (
        f"{record}: no promtool test in {RULE_TESTS_DIR} expects samples of it"
    )


# -- a real Alertmanager: inhibition and the webhook ------------------------------------


class WebhookSink:
    """An HTTP server that records what Alertmanager posts to it (stands in for MGMT)."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.received: list[dict[str, Any]] = []
        self.refused = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = (
                    self.path == "/api/alerts/webhook"
                    and self.headers.get("Authorization") == f"Bearer {sink.token}"
                )
                with sink.lock:
                    if ok:
                        sink.received.append(json.loads(body))
                    else:
                        sink.refused += 1
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/alerts/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def alerts(self) -> list[tuple[str, str, str | None]]:
        """(status, alertname, protection_domain) of every alert delivered so far."""
        with self.lock:
            return [
                (a["status"], a["labels"]["alertname"], a["labels"].get("protection_domain"))
                for msg in self.received
                for a in msg["alerts"]
            ]


@pytest.fixture
def webhook_sink() -> Iterator[WebhookSink]:
    sink = WebhookSink("mgmt-" + str(time.time_ns()))
    sink.thread.start()
    try:
        yield sink
    finally:
        sink.server.shutdown()
        sink.server.server_close()
        sink.thread.join()


def am_alert(
    rule_name: str, labels: dict[str, str], starts: dt.datetime, ends: dt.datetime | None = None
) -> Any:
    """An alert of the rule ``rule_name`` as Prometheus posts it to Alertmanager."""
    rule = ALERTS[rule_name][1]
    alert: dict[str, Any] = {
        "labels": {"alertname": rule_name, **rule["labels"], **labels},
        "annotations": {"summary": rule["annotations"]["summary"]},
        "startsAt": starts.isoformat(),
    }
    if ends is not None:
        alert["endsAt"] = ends.isoformat()
    return alert


def test_alertmanager_inhibits_and_delivers_to_the_webhook(
    tmp_path: Path, webhook_sink: WebhookSink
) -> None:
    """The shipped configuration, with the webhook pointed at this test and short
    timers: MeshblockSdsDown in pd1 mutes MeshblockPgsDegraded in pd1 but not in pd2;
    MGMT receives the rest with its bearer token; when the SDS is back, the resolved
    MeshblockSdsDown and the no longer inhibited MeshblockPgsDegraded arrive."""
    token_file = tmp_path / "mgmt-webhook.token"
    token_file.write_text(webhook_sink.token + "\n")
    cfg = load(ALERTMANAGER_CONFIG)
    cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "meshblock-mgmt"]
    hook = receiver["webhook_configs"][0]
    hook["url"] = webhook_sink.url
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    am = AlertmanagerServer(tmp_path, cfg)
    try:
        am.start()
        sds_down = {"sds": "sds1", "protection_domain": "pd1", "fault_set": "fs1"}
        # Started now, not earlier: Alertmanager flushes a new group at once (without
        # group_wait) when its alert started long ago, which could beat the inhibitor.
        t0 = dt.datetime.now(dt.UTC)
        am.post(
            [
                am_alert("MeshblockSdsDown", sds_down, t0),
                am_alert("MeshblockPgsDegraded", {"pool": "sp1", "protection_domain": "pd1"}, t0),
                am_alert("MeshblockPgsDegraded", {"pool": "sp9", "protection_domain": "pd2"}, t0),
            ]
        )

        def states() -> dict[tuple[str, str], str]:
            return {
                (a["labels"]["alertname"], a["labels"]["protection_domain"]): a["status"]["state"]
                for a in am.alerts()
            }

        expected = {
            ("MeshblockSdsDown", "pd1"): "active",
            ("MeshblockPgsDegraded", "pd1"): "suppressed",
            ("MeshblockPgsDegraded", "pd2"): "active",
        }
        wait_until(lambda: states() == expected, 30, "the inhibition")
        wanted = {
            ("firing", "MeshblockSdsDown", "pd1"),
            ("firing", "MeshblockPgsDegraded", "pd2"),
        }
        wait_until(lambda: wanted <= set(webhook_sink.alerts()), 30, "the notifications")
        time.sleep(3)  # a few group intervals: the muted alert must still not be sent
        assert set(webhook_sink.alerts()) == wanted
        assert webhook_sink.refused == 0
        (msg,) = [
            m for m in webhook_sink.received if m["commonLabels"]["alertname"] == "MeshblockSdsDown"
        ]
        assert msg["version"] == "4" and msg["status"] == "firing"
        assert msg["groupLabels"] == {"alertname": "MeshblockSdsDown", "protection_domain": "pd1"}
        assert msg["alerts"][0]["labels"]["severity"] == "critical"
        assert msg["alerts"][0]["fingerprint"]

        # The SDS comes back: the resolved notification reaches MGMT, and the degraded
        # PGs (still there while the rebuild runs) are no longer muted.
        am.post([am_alert("MeshblockSdsDown", sds_down, t0, ends=dt.datetime.now(dt.UTC))])
        wait_until(
            lambda: (
                {
                    ("resolved", "MeshblockSdsDown", "pd1"),
                    ("firing", "MeshblockPgsDegraded", "pd1"),
                }
                <= set(webhook_sink.alerts())
            ),
            30,
            "the resolved notification and the unmuted alert",
        )
    finally:
        am.stop()


# -- the metrics the rules read exist ---------------------------------------------------


def referenced_metrics() -> dict[str, set[str]]:
    """``meshblock_*`` metric names in rule expressions → the alerts and recording
    rules that use them (recorded names, ``level:metric:op``, are not exported)."""
    used: dict[str, set[str]] = {}
    for name, (_, rule) in {**ALERTS, **RECORDS}.items():
        expr = re.sub(r'"[^"]*"', '""', rule["expr"])  # not job="meshblock_mdm"
        expr = re.sub(r"\w*:\w+:\w+", "", expr)
        for metric in re.findall(r"\bmeshblock_[a-z0-9_]+", expr):
            used.setdefault(metric, set()).add(name)
    return used


def documented_metrics(doc: str) -> set[str]:
    return set(re.findall(r"\bmeshblock_[a-z0-9_]+", (REPO / "docs" / doc).read_text()))


def scrape(url: str, token: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Sample names of a /metrics page → the label sets of their samples."""
    r = _http.request("GET", url, token=token)
    assert r.status == 200, r.status
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(r.body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample.labels)
    return out


def test_mdm_exposes_the_metrics_the_rules_read(mdm: MdmDaemon) -> None:
    """A real MDM with a small topology (a fault set, an SDS in it, one outside any, an
    SDC) exports every metric the rules read from the MDM, with the labels the alerts
    and the Alertmanager inhibition use. The other metrics must be documented by the
    SDS or SDC (scraped by their own jobs), or be on the list of pending ones."""
    api = mdm.api()
    status, pd = api("POST", "/api/v1/protection-domains", {"name": "pd-mon"})
    assert status == 201, pd
    body: dict[str, Any] = {"name": "fs-mon", "protection_domain_id": pd["id"]}
    status, fs = api("POST", "/api/v1/fault-sets", body)
    assert status == 201, fs
    body = {"name": "sp-mon", "protection_domain_id": pd["id"], "pg_count": 8}
    status, pool = api("POST", "/api/v1/pools", body)
    assert status == 201, pool
    sds_ids: dict[str, int] = {}
    for i, fault_set in ((1, "fs-mon"), (2, None)):
        body = {
            "name": f"sds-mon{i}",
            "protection_domain": "pd-mon",
            "address": f"127.0.1.{i}",
            "devices": [{"path": f"/srv/sds-mon{i}.img", "capacity": "16GiB", "pool": "sp-mon"}],
        }
        if fault_set:
            body["fault_set"] = fault_set
        body["join_token"] = mdm.join_token()
        status, sds = api("POST", "/api/v1/sds/register", body, token=mdm.cluster_secret)
        assert status in (200, 201), sds
        sds_ids[body["name"]] = sds["id"]
    body = {"guid": "guid-mon", "name": "host-mon", "address": "127.0.0.1", "nbd_port": 10809}
    status, sdc = api("POST", "/api/v1/sdc/register", body, token=mdm.cluster_secret)
    assert status in (200, 201), sdc

    exposed = scrape(mdm.url + "/metrics", mdm.readonly_token)
    sds_names = documented_metrics("sds.md")
    sdc_names = documented_metrics("sdc.md")
    for metric, alerts in sorted(referenced_metrics().items()):
        base = re.sub(r"_(bucket|count|sum)$", "", metric)
        if metric in exposed:
            continue
        assert metric in PENDING_METRICS or {metric, base} & (sds_names | sdc_names), (
            f"{metric} (read by {sorted(alerts)}) is exported by no daemon"
        )
    for metric in PENDING_METRICS:
        assert metric in referenced_metrics()

    # The labels the alerts name and group by are on the MDM's samples.
    sds_samples = {s["sds"]: s for s in exposed["meshblock_sds_connected"]}
    assert sds_samples["sds-mon1"] == {
        "sds": "sds-mon1",
        "protection_domain": "pd-mon",
        "fault_set": "fs-mon",
    }
    assert sds_samples["sds-mon2"]["fault_set"] == ""  # dropped (absent) once scraped
    pgs = [s for s in exposed["meshblock_pgs"] if s["pool"] == "sp-mon"]
    assert {s["state"] for s in pgs} == {"clean", "degraded", "rebuilding", "resyncing", "inactive"}
    assert all(s["protection_domain"] == "pd-mon" for s in pgs)
    assert {"sdc": "host-mon"} in exposed["meshblock_sdc_connected"]
    for metric in (
        "meshblock_pool_used_ratio",
        "meshblock_pool_alert_high_ratio",
        "meshblock_pool_alert_critical_ratio",
        "meshblock_pool_spare_bytes",
        "meshblock_pool_total_bytes",
    ):
        assert {"pool": "sp-mon", "protection_domain": "pd-mon"} in exposed[metric], metric
    # What the SDS and SDC label by id (pool_id, sds_id, peer) joins to these names.
    assert {
        "sds_id": str(sds_ids["sds-mon1"]),
        "sds": "sds-mon1",
        "protection_domain": "pd-mon",
        "fault_set": "fs-mon",
    } in exposed["meshblock_sds_info"]
    assert {"pool_id": str(pool["id"]), "pool": "sp-mon", "protection_domain": "pd-mon"} in (
        exposed["meshblock_pool_info"]
    )
