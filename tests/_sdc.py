"""The real SDC daemon as a subprocess, for tests.

:class:`SdcDaemon` writes an ``sdc.toml`` (NBD on a free loopback port and on a unix
socket in its working directory), starts ``python -m meshblock.sdc`` with its output
appended to ``sdc.log``, and waits for ``GET /health`` to answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _http
from _mdm import MdmDaemon, dump_toml, merge
from _ports import free_port

START_TIMEOUT_S = 30.0


class SdcDaemon:
    """One ``python -m meshblock.sdc`` process with its config, state dir and log."""

    def __init__(
        self,
        workdir: Path,
        mdm: MdmDaemon,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        secret_file: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.mdm = mdm
        self.nbd_port = free_port()
        self.control_port = free_port()
        self.unix_socket = str(workdir / "nbd.sock")
        self.config_path = workdir / "sdc.toml"
        self.log_path = workdir / "sdc.log"
        mdm_table: dict[str, Any] = {
            "urls": [mdm.url],
            "heartbeat_interval_s": 0.5,
            "longpoll_timeout_s": 10.0,
        }
        if secret_file:
            path = workdir / "secret"
            path.write_text(mdm.cluster_secret + "\n")
            mdm_table["cluster_secret_file"] = str(path)
        else:
            mdm_table["cluster_secret"] = mdm.cluster_secret
        self.settings: dict[str, dict[str, Any]] = {
            "sdc": {"name": f"sdc-{workdir.name}", "state_dir": str(workdir / "state")},
            "mdm": mdm_table,
            "nbd": {"host": "127.0.0.1", "port": self.nbd_port, "unix_socket": self.unix_socket},
            "control": {"host": "127.0.0.1", "port": self.control_port},
            "io": {"timeout_s": 20.0, "attempt_timeout_s": 5.0},
            "logging": {"level": "INFO"},
        }
        merge(self.settings, overrides or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def uri(self, export: str, transport: str = "tcp") -> str:
        if transport == "unix":
            return f"nbd+unix:///{export}?socket={self.unix_socket}"
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        self.config_path.write_text(dump_toml(self.settings))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-W",
                    "error",
                    "-m",
                    "meshblock.sdc",
                    "--config",
                    str(self.config_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the SDC exited with {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                if _http.request("GET", self.url + "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the SDC did not answer /health:\n{self.log_text()}")

    def health(self) -> dict[str, Any]:
        resp = _http.request("GET", self.url + "/health", timeout=5)
        assert resp.status == 200
        body: dict[str, Any] = resp.body
        return body

    def metrics(self) -> str:
        resp = _http.request("GET", self.url + "/metrics", timeout=5)
        assert resp.status == 200
        return str(resp.body)

    def wait_for(
        self, what: str, cond: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        h = self.health()
        while not cond(h):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; health: {h}\n{self.log_text()}"
                )
            time.sleep(0.05)
            h = self.health()
        return h

    def export_names(self) -> set[str]:
        return {e["name"] for e in self.health()["exports"]}

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the SDC ignored SIGTERM:\n{self.log_text()}") from None
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def assert_clean_log(self) -> None:
        text = self.log_text()
        assert self.mdm.cluster_secret not in text, "the SDC log contains the cluster secret"
        assert "Traceback" not in text, text
