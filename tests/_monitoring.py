"""Prometheus and Alertmanager as subprocesses, for tests.

- They are :class:`_process.ServerProcess`es (the base class of every process the
  tests start; ``ServerProcess`` and ``ServerError`` are re-exported from here).
- :class:`PrometheusServer` and :class:`AlertmanagerServer` run the Debian packages'
  binaries on free loopback ports, with a configuration written into a working
  directory: a minimal one by default, or any other (the end-to-end test builds its
  own from ``monitoring/``, see :func:`repo_prometheus_config` and
  :func:`repo_alertmanager_config`).
- They raise :class:`ToolMissing` when the binaries are not installed; tests fail on
  it (``pytest.fail``), they never skip.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

import _http
from _ports import free_port
from _process import START_TIMEOUT_S as START_TIMEOUT_S  # re-exported
from _process import STOP_TIMEOUT_S as STOP_TIMEOUT_S
from _process import ProcessError
from _process import ServerProcess as ServerProcess

INSTALL_HINT = "install it with `make deps` (as root: `apt-get install -y {pkg}`)"

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"


class ToolMissing(RuntimeError):
    """A server binary the test needs is not installed."""


ServerError = ProcessError  # the name this module gave it first


def find_binary(names: tuple[str, ...], package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise ToolMissing(
        f"{' or '.join(names)} not found: the tests need a real {package}; "
        + INSTALL_HINT.format(pkg=package)
    )


def _write_files(workdir: Path, files: Mapping[str, str]) -> list[Path]:
    paths = []
    for name, text in files.items():
        path = workdir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        paths.append(path)
    return paths


class _MonitoringServer(ServerProcess):
    """A Prometheus-family server: ``binary`` on a free loopback port, its YAML
    configuration ``doc`` written as ``<name>.yml`` in the working directory."""

    def __init__(self, workdir: Path, binary: str, doc: Mapping[str, Any]) -> None:
        super().__init__(workdir)
        self.binary = binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.config_path = workdir / f"{self.name}.yml"
        self.config_path.write_text(yaml.safe_dump(dict(doc), sort_keys=False))

    def start_with(self, *flags: str) -> None:
        """Start with the config, the listen address and ``flags``; wait until ready."""
        config = f"--config.file={self.config_path}"
        self.spawn_argv([self.binary, config, f"--web.listen-address={self.address}", *flags])
        self.wait_http(self.url + "/-/ready")


# -- Alertmanager ----------------------------------------------------------------------


class AlertmanagerServer(_MonitoringServer):
    """Alertmanager (Debian ``prometheus-alertmanager``).

    Without ``config`` it has a do-nothing receiver; otherwise ``config`` is the
    document written as ``alertmanager.yml``, and ``files`` are written next to it
    (paths relative to the working directory, e.g. a webhook token file).
    """

    name = "alertmanager"

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
    ) -> None:
        binary = find_binary(("prometheus-alertmanager", "alertmanager"), "prometheus-alertmanager")
        _write_files(workdir, files or {})
        doc = config or {"route": {"receiver": "nobody"}, "receivers": [{"name": "nobody"}]}
        super().__init__(workdir, binary, doc)

    def start(self) -> None:
        self.start_with(
            f"--storage.path={self.workdir / 'data'}",
            "--cluster.listen-address=",  # no gossip: a single test instance
            "--log.level=info",
        )

    def silences(self) -> list[dict[str, Any]]:
        status, body = _http.request("GET", self.url + "/api/v2/silences")
        assert status == 200, body
        assert isinstance(body, list)
        return body

    def post(self, alerts: list[dict[str, Any]]) -> None:
        """Post alerts as Prometheus does (``POST /api/v2/alerts``)."""
        r = _http.request("POST", self.url + "/api/v2/alerts", alerts)
        assert r.status == 200, (r.status, r.body)

    def alerts(self) -> list[dict[str, Any]]:
        status, body = _http.request("GET", self.url + "/api/v2/alerts", timeout=5)
        assert status == 200, body
        assert isinstance(body, list)
        return body


# -- Prometheus ------------------------------------------------------------------------


class PrometheusServer(_MonitoringServer):
    """Prometheus (Debian ``prometheus``).

    ``files`` (name → text, relative to the working directory) are written first.
    Without ``config``, the configuration evaluates every second the rule files among
    them and scrapes nothing; otherwise ``config`` is written as ``prometheus.yml`` in
    the working directory, against which its relative paths resolve.
    """

    name = "prometheus"

    def __init__(
        self, workdir: Path, files: Mapping[str, str], config: Mapping[str, Any] | None = None
    ) -> None:
        binary = find_binary(("prometheus",), "prometheus")
        paths = _write_files(workdir, files)
        doc = config or {
            "global": {"evaluation_interval": "1s"},
            "rule_files": [str(p) for p in paths],
        }
        super().__init__(workdir, binary, doc)

    def start(self) -> None:
        self.start_with(f"--storage.tsdb.path={self.workdir / 'data'}", "--web.enable-lifecycle")

    def reload(self) -> None:
        status, body = _http.request("POST", self.url + "/-/reload")
        assert status == 200, body

    def get(self, path: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``."""
        status, body = _http.request("GET", f"{self.url}/api/v1/{path}", timeout=5)
        assert status == 200 and body["status"] == "success", body
        return body["data"]

    def targets_health(self) -> dict[str, list[str]]:
        """Each scrape job's targets' health (``up``, ``down``, ``unknown``)."""
        out: dict[str, list[str]] = {}
        for t in self.get("targets?state=active")["activeTargets"]:
            out.setdefault(t["labels"]["job"], []).append(t["health"])
        return out


# -- the repository's monitoring configuration, made fast for a test -------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1m30s``."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def scaled_rules(text: str, factor: float, minimum_s: int = 1) -> str:
    """Rule file ``text`` with every ``for:`` multiplied by ``factor`` (whole seconds,
    at least ``minimum_s``), so that the rules' relative order is kept."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{max(minimum_s, round(duration_s(rule['for']) * factor))}s"
    return str(yaml.safe_dump(doc, sort_keys=False))


def repo_rule_files(factor: float) -> dict[str, str]:
    """``rules/NAME.yml`` → text for every file of ``monitoring/prometheus/rules``,
    with ``for:`` durations scaled by ``factor``."""
    return {
        f"rules/{p.name}": scaled_rules(p.read_text(), factor)
        for p in sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
    }


def repo_prometheus_config(interval: str) -> dict[str, Any]:
    """``monitoring/prometheus/prometheus.yml`` with its scrape and evaluation intervals
    set to ``interval``; its file_sd (``targets/JOB.yml``) and rule paths are kept."""
    doc: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    doc["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    return doc


def target_files(targets: Mapping[str, list[dict[str, Any]]]) -> dict[str, str]:
    """``targets/JOB.yml`` file_sd documents: ``{job: [{"targets": [...], "labels"...}]}``."""
    return {f"targets/{job}.yml": json.dumps(groups) for job, groups in targets.items()}


def repo_alertmanager_config(
    webhook_url: str, token_file: str, group_wait: str, group_interval: str
) -> dict[str, Any]:
    """``monitoring/alertmanager/alertmanager.yml`` whose ``meshblock-mgmt`` receiver
    posts to ``webhook_url`` with the bearer token in ``token_file``, and whose route
    waits ``group_wait`` / ``group_interval`` (everything else as shipped)."""
    doc: dict[str, Any] = yaml.safe_load(
        (MONITORING / "alertmanager" / "alertmanager.yml").read_text()
    )
    doc["route"].update(group_wait=group_wait, group_interval=group_interval)
    (receiver,) = [r for r in doc["receivers"] if r["name"] == "meshblock-mgmt"]
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = webhook_url
    webhook["http_config"]["authorization"]["credentials_file"] = token_file
    return doc
