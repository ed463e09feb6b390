"""The real SDS daemon as a subprocess, for tests.

:class:`SdsDaemon` writes an ``sds.toml`` (one file device of ``DEVICE_BYTES`` in pool
``POOL`` of protection domain ``pd1``) into a working directory, starts
``python -m meshblock.sds`` with its output appended to ``sds.log``, and waits until
``GET /health`` says ``serving``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _control
import _http
import _tls
from _mdm import MdmDaemon
from _ports import free_port
from _process import START_TIMEOUT_S, DaemonProcess, dump_toml
from _wait import wait_until
from meshblock.wire.protocol import PeerRole

if TYPE_CHECKING:
    from _netns import NetNs

POOL = "pool1"
PG_COUNT = 32
DEVICE_BYTES = 128 * 1024 * 1024


class SdsDaemon(DaemonProcess):
    """One ``python -m meshblock.sds`` process with its config, device file and log.

    Its data and control ports listen on ``address`` (which it advertises); with
    ``netns`` it runs inside that network namespace (``tests/_netns.py``).
    ``settings`` changes the config's top-level keys (a value of None removes one);
    ``pool``, ``protection_domain`` and ``capacity`` describe its one device;
    ``metrics`` adds to its ``[metrics]`` (the read token of ``tests/_control.py``).
    With an HTTPS MDM it presents ``sds:<name>`` of the test CA.
    """

    module = "meshblock.sds"
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        name: str,
        mdm: MdmDaemon,
        fault_set: str | None,
        address: str = "127.0.0.1",
        netns: NetNs | None = None,
        *,
        pool: str = POOL,
        protection_domain: str = "pd1",
        capacity: int | str = DEVICE_BYTES,
        settings: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, log_name="sds")
        self.name = name
        self.mdm = mdm
        self.address = address
        self.netns = netns
        self.data_port = free_port()
        self.control_port = free_port()
        self.device = workdir / "dev0.img"
        top: dict[str, Any] = {
            "name": name,
            "protection_domain": protection_domain,
            "address": address,
            "mdm_urls": [mdm.url],
            "cluster_secret": mdm.cluster_secret,
            "state_dir": str(workdir / "state"),
            "heartbeat_interval_s": 1.0,
            "map_poll_timeout_s": 5.0,
            "peer_timeout_s": 5.0,
        }
        if fault_set:
            top["fault_set"] = fault_set
        if not mdm.tls and "join_token" not in (settings or {}):
            # With TLS it joins by its certificate; a test that gives its own join_token
            # (None: none, for an SDS whose MDM is never started) asks the MDM for none.
            top["join_token"] = mdm.join_token()
        top.update(settings or {})
        top = {k: v for k, v in top.items() if v is not None}
        text = dump_toml({"__top__": top}).replace("[__top__]\n", "")
        text += dump_toml(
            {
                "data": {"host": address, "port": self.data_port},
                "control": {"host": address, "port": self.control_port},
                "metrics": {"token_file": _control.token_file(workdir), **(metrics or {})},
                "logging": {"level": "INFO"},
                **(
                    {"tls": _tls.component_identity(f"sds:{name}", address).settings()}
                    if mdm.tls
                    else {}
                ),
            }
        )
        text += dump_toml(
            {"[devices]": {"path": str(self.device), "capacity": capacity, "pool": pool}}
        )
        self.config_path.write_text(text)

    @property
    def control_url(self) -> str:
        # With [tls] the control port is HTTPS with the SDS's certificate (for loopback
        # and its address); the harness checks it against the test CA.
        scheme = "https" if self.mdm.tls else "http"
        return f"{scheme}://{self.address}:{self.control_port}"

    def data_tls(self, who: str | PeerRole = _tls.ADMIN) -> ssl.SSLContext | None:
        """A context for dialling this SDS's data port as ``who`` (an identity, or the
        tests' identity of a role: ``_tls.ROLE_IDENTITY``); None: the port is plain
        TCP, the SDS having no certificate as its MDM serves plain HTTP."""
        text = _tls.ROLE_IDENTITY[who] if isinstance(who, PeerRole) else who
        return _tls.data_context(self.mdm.tls, text)

    def exec_prefix(self) -> list[str]:
        # `ip netns exec` execs the program: the pid is the SDS's own (SIGKILL hits it)
        return self.netns.exec_prefix() if self.netns is not None else []

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Until ``GET /health`` says ``serving``; return that health document."""

        def serving() -> dict[str, Any] | None:
            r = self.control_get("/health", timeout=2)
            return dict(r.body) if r.status == 200 and r.body["state"] == "serving" else None

        return self.wait(serving, timeout, f"{self.name} to serve", interval=0.05)

    def control_get(self, path: str, timeout: float = 5.0) -> _http.Response:
        """``GET`` on the control port with a read credential (``tests/_control.py``)."""
        return _control.get(self.control_url, path, timeout)

    def health(self) -> dict[str, Any]:
        r = self.control_get("/health")
        assert r.status == 200
        return dict(r.body)

    def metrics(self) -> str:
        r = self.control_get("/metrics")
        assert r.status == 200, r
        return str(r.body)

    def reachable(self, timeout: float = 1.0) -> bool:
        try:
            return _http.request("GET", self.control_url + "/health", timeout=timeout).status == 200
        except OSError:
            return False


def wait_copy_jobs_ended(daemons: list[SdsDaemon], timeout: float = 10.0) -> None:
    """Until no SDS has a resync, rebuild or move job running.

    The MDM makes a PG clean when it accepts the primary's report, before its answer
    reaches that SDS: a map that says every PG is clean may be read while the job that
    reported is still finishing (its counters and ``done`` record come with the answer).
    A job still running after ``timeout`` fails the test.
    """
    running: dict[str, Any] = {}

    def ended() -> bool:
        running.update({d.name: d.health()["resync"]["active"] for d in daemons})
        return not any(running.values())

    wait_until(ended, timeout, "the copy jobs to end", detail=lambda: f"still running: {running}")
