"""The real SDS daemon as a subprocess, for tests.

:class:`SdsDaemon` writes an ``sds.toml`` (one file device of ``DEVICE_BYTES`` in pool
``POOL`` of protection domain ``pd1``) into a working directory, starts
``python -m meshblock.sds`` with its output appended to ``sds.log``, and waits until
``GET /health`` says ``serving``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import _http
from _mdm import MdmDaemon, dump_toml
from _ports import free_port

POOL = "pool1"
PG_COUNT = 32
DEVICE_BYTES = 128 * 1024 * 1024
START_TIMEOUT_S = 30.0


class SdsDaemon:
    """One ``python -m meshblock.sds`` process with its config, device file and log."""

    def __init__(self, workdir: Path, name: str, mdm: MdmDaemon, fault_set: str | None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.mdm = mdm
        self.data_port = free_port()
        self.control_port = free_port()
        self.device = workdir / "dev0.img"
        self.config_path = workdir / "sds.toml"
        self.log_path = workdir / "sds.log"
        top: dict[str, Any] = {
            "name": name,
            "protection_domain": "pd1",
            "address": "127.0.0.1",
            "mdm_urls": [mdm.url],
            "cluster_secret": mdm.cluster_secret,
            "state_dir": str(workdir / "state"),
            "heartbeat_interval_s": 1.0,
            "map_poll_timeout_s": 5.0,
            "peer_timeout_s": 5.0,
        }
        if fault_set:
            top["fault_set"] = fault_set
        text = dump_toml({"__top__": top}).replace("[__top__]\n", "")
        text += dump_toml(
            {
                "data": {"host": "127.0.0.1", "port": self.data_port},
                "control": {"host": "127.0.0.1", "port": self.control_port},
                "logging": {"level": "INFO"},
            }
        )
        text += dump_toml(
            {"[devices]": {"path": str(self.device), "capacity": DEVICE_BYTES, "pool": POOL}}
        )
        self.config_path.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self._close_log()
        self._log = open(self.log_path, "ab")  # closed in _close_log()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "error",
                "-m",
                "meshblock.sds",
                "--config",
                str(self.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.proc.returncode}:\n{self.log_text()}"
                )
            try:
                r = _http.request("GET", self.control_url + "/health", timeout=2)
                last = r.body
                if r.status == 200 and r.body["state"] == "serving":
                    return dict(r.body)
            except OSError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not serving ({last}):\n{self.log_text()}")

    def health(self) -> dict[str, Any]:
        r = _http.request("GET", self.control_url + "/health", timeout=5)
        assert r.status == 200
        return dict(r.body)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} ignored signal {sig}:\n{self.log_text()}") from None
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_copy_jobs_ended(daemons: list[SdsDaemon], timeout: float = 10.0) -> None:
    """Until no SDS has a resync, rebuild or move job running.

    The MDM makes a PG clean when it accepts the primary's report, before its answer
    reaches that SDS: a map that says every PG is clean may be read while the job that
    reported is still finishing (its counters and ``done`` record come with the answer).
    A job still running after ``timeout`` fails the test.
    """
    deadline = time.monotonic() + timeout
    while True:
        running = {d.name: d.health()["resync"]["active"] for d in daemons}
        if not any(running.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"copy jobs still running {timeout} s after clean: {running}")
        time.sleep(0.1)
