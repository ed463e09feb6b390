"""The real MDM daemon as a subprocess, for tests.

:class:`MdmDaemon` writes an ``mdm.toml`` into a working directory, starts
``python -m meshblock.mdm --config mdm.toml`` on a free loopback port with its
output appended to ``mdm.log``, and waits for ``GET /health`` to answer 200. It can
be stopped and started again on the same database, and tells how it exited.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import _http
from _ports import free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class MdmError(AssertionError):
    """The daemon did not start or stop as expected (the message has its log)."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML text for ``{"table": {"key": value}}`` (one level of tables)."""
    out: list[str] = []
    for table, keys in tables.items():
        out.append(f"[{table}]")
        out += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        out.append("")
    return "\n".join(out)


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> None:
    for table, keys in extra.items():
        base.setdefault(table, {}).update(keys)


class MdmDaemon:
    """One MDM process (restartable) with its config, log and credentials."""

    def __init__(
        self,
        workdir: Path,
        db_url: str,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.admin_token = "adm-" + secrets.token_urlsafe(24)
        self.readonly_token = "ro-" + secrets.token_urlsafe(24)
        self.cluster_secret = "cs-" + secrets.token_urlsafe(24)
        self.config_path = workdir / "mdm.toml"
        self.log_path = workdir / "mdm.log"
        self.settings: dict[str, dict[str, Any]] = {
            "api": {"host": self.host, "port": self.port},
            "auth": {
                "admin_token": self.admin_token,
                "readonly_token": self.readonly_token,
                "cluster_secret": self.cluster_secret,
            },
            "database": {"url": db_url},
            # No rebuild and no rebalance unless a test asks for them: API tests
            # register SDSs by hand that never heartbeat, and the failover tests
            # check the degraded state that precedes a rebuild.
            "cluster": {
                "name": "test",
                "heartbeat_timeout_s": 5.0,
                "rebuild_delay_s": 3600.0,
                "rebalance_interval_s": 3600.0,
            },
            "logging": {"level": "INFO"},
        }
        merge(self.settings, overrides or {})
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_config(self) -> None:
        self.config_path.write_text(dump_toml(self.settings))

    def env(self) -> dict[str, str]:
        """The environment for ``meshctl`` against this MDM, as admin."""
        env = dict(os.environ)
        env["MESHCTL_MDM"] = self.url
        env["MESHCTL_TOKEN"] = self.admin_token
        return env

    def api(self, token: str | None = None) -> _http.Api:
        return _http.Api(self.url, self.admin_token if token is None else token)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _fail(self, what: str) -> MdmError:
        return MdmError(f"{what}\n--- {self.log_path} ---\n{self.log_text()}")

    # -- life cycle -------------------------------------------------------------------

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be healthy."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._close_log()
        self._log = open(self.log_path, "ab")  # closed in _close_log()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "error",
                "-m",
                "meshblock.mdm",
                "--config",
                str(self.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self.proc

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start and wait until ``GET /health`` answers 200; raise MdmError with the log."""
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                self._close_log()
                raise self._fail(f"the MDM exited with code {rc} while starting")
            try:
                status = _http.request("GET", self.url + "/health", timeout=2).status
                if status == 200:
                    return
                last = f"status {status}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        self.kill()
        raise self._fail(f"the MDM was not healthy after {timeout:.0f} s ({last})")

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail(f"the MDM did not exit within {timeout:.0f} s") from None
        self._close_log()
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout``; return the exit code (MdmError if it hangs)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail(f"the MDM did not exit within {timeout:.0f} s of SIGTERM") from None
        self._close_log()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        rc = self.stop()
        if rc != 0:
            raise self._fail(f"the MDM exited with code {rc} on SIGTERM")
        self.start()

    def assert_no_secrets_in_log(self) -> None:
        log = self.log_text()
        for name in ("admin_token", "readonly_token", "cluster_secret"):
            if getattr(self, name) in log:
                raise MdmError(f"the MDM log at {self.log_path} contains the {name}")
