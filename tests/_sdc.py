"""The real SDC daemon as a subprocess, for tests.

:class:`SdcDaemon` writes an ``sdc.toml`` (NBD on a free loopback port and on a unix
socket in its working directory), starts ``python -m meshblock.sdc`` with its output
appended to ``sdc.log``, and waits for ``GET /health`` to answer. With an HTTPS MDM
it presents ``sdc:<guid>`` of the test CA, and takes its GUID from it unless the
config sets one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _control
import _http
import _tls
from _mdm import MdmDaemon
from _ports import free_port
from _process import START_TIMEOUT_S, DaemonProcess


class SdcDaemon(DaemonProcess):
    """One ``python -m meshblock.sdc`` process with its config, state dir and log."""

    name = "the SDC"
    module = "meshblock.sdc"
    ready_path = "/health"
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        mdm: MdmDaemon,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        secret_file: bool = False,
    ) -> None:
        super().__init__(workdir, log_name="sdc")
        self.mdm = mdm
        self.cert_guid = str(uuid.uuid4())  # the GUID of its certificate, unless set
        self.nbd_port = free_port()
        self.control_port = free_port()
        self.unix_socket = str(workdir / "nbd.sock")
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
        settings: dict[str, dict[str, Any]] = {
            "sdc": {"name": f"sdc-{workdir.name}", "state_dir": str(workdir / "state")},
            "mdm": mdm_table,
            "nbd": {
                "tcp": True,  # the tests use both listeners
                "host": "127.0.0.1",
                "port": self.nbd_port,
                "unix_socket": self.unix_socket,
            },
            "control": {"host": "127.0.0.1", "port": self.control_port},
            "metrics": {"token_file": _control.token_file(workdir)},
            "io": {"timeout_s": 20.0, "attempt_timeout_s": 5.0},
            "logging": {"level": "INFO"},
        }
        self.configure(settings, overrides)

    @property
    def url(self) -> str:
        # With [tls] the control port is HTTPS with the SDC's certificate.
        return f"{'https' if self.mdm.tls else 'http'}://127.0.0.1:{self.control_port}"

    def uri(self, export: str, transport: str = "tcp") -> str:
        if transport == "unix":
            return f"nbd+unix:///{export}?socket={self.unix_socket}"
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def write_config(self) -> None:
        if self.mdm.tls:  # the SDC takes its GUID from the certificate, unless set
            guid = self.settings["sdc"].get("guid") or self.cert_guid
            self.settings["tls"] = _tls.component_identity(f"sdc:{guid}").settings()
        super().write_config()

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Write the config (a test may have changed ``settings``), start, and wait
        until ``GET /health`` answers 200."""
        self.write_config()
        super().start(timeout)

    def control_get(self, path: str, timeout: float = 5.0) -> _http.Response:
        """``GET`` on the control port with a read credential (``tests/_control.py``)."""
        return _control.get(self.url, path, timeout)

    def health(self) -> dict[str, Any]:
        resp = self.control_get("/health")
        assert resp.status == 200
        body: dict[str, Any] = resp.body
        return body

    def metrics(self) -> str:
        resp = self.control_get("/metrics")
        assert resp.status == 200
        return str(resp.body)

    def wait_for(
        self, what: str, cond: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """Until ``cond(health)`` holds; return that health document."""
        seen: list[dict[str, Any]] = [{}]

        def holds() -> dict[str, Any] | None:
            seen[0] = self.health()
            return seen[0] if cond(seen[0]) else None

        return self.wait(
            holds,
            timeout,
            what,
            interval=0.05,
            detail=lambda: f"health: {seen[0]}\n{self.log_tail()}",
        )

    def export_names(self) -> set[str]:
        return {e["name"] for e in self.health()["exports"]}

    def assert_clean_log(self) -> None:
        text = self.log_text()
        assert self.mdm.cluster_secret not in text, "the SDC log contains the cluster secret"
        assert "Traceback" not in text, text
