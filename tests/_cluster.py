"""A running cluster for tests: an MDM and SDS daemons, and where chunks live.

- :class:`Cluster`: an MDM and its SDSs (see ``tests/_sds.py``), the pool's PG map;
- :func:`route`: the primary and secondary SDS of a chunk by a map document;
- :class:`LabCluster`: a whole cluster started with the real ``meshctl lab up``
  (MDM, three SDSs, an SDC, volume ``vol1`` mapped), driven through meshctl.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _http
from _mdm import MdmDaemon
from _ports import worker_slice
from _sdc import SdcDaemon
from _sds import PG_COUNT, POOL, SdsDaemon
from _wait import wait_until
from meshblock import pgmap_doc, pki
from meshblock.chunks import ChunkRef, pg_of
from meshblock.wire import tls as wire_tls

LAB_PORTS = 10  # a lab uses ports BASE..BASE+8, its mgmt.toml BASE+9
LAB_UP_TIMEOUT_S = 120.0


@dataclass
class Cluster:
    mdm: MdmDaemon
    sds: list[SdsDaemon]
    pool_id: int
    workdir: Path

    @property
    def secret(self) -> str:
        return self.mdm.cluster_secret

    def pgmap(self) -> dict[str, Any]:
        status, doc = self.mdm.api().get(f"/api/v1/pools/{self.pool_id}/pgmap")
        assert status == 200, doc
        return dict(doc)

    def by_id(self, doc: dict[str, Any]) -> dict[int, SdsDaemon]:
        ports = {i: e.data_port for i, e in pgmap_doc.parse(doc).sds.items()}
        return {i: s for i, port in ports.items() for s in self.sds if s.data_port == port}

    def wait_epoch_everywhere(self, epoch: int, timeout: float = 15.0) -> None:
        wait_until(
            lambda: all(
                s.running() and s.health()["maps"].get(str(self.pool_id), 0) >= epoch
                for s in self.sds
            ),
            timeout,
            f"every SDS to reach map epoch {epoch}",
            interval=0.05,
        )


@dataclass
class Route:
    """Where chunk ``chunk`` of ``volume`` lives according to a map document."""

    pg: int
    epoch: int
    primary: SdsDaemon
    secondary: SdsDaemon
    others: list[SdsDaemon]
    ref: ChunkRef  # the chunk's address on the wire, at the document's epoch


def route(c: Cluster, doc: dict[str, Any], volume: int, chunk: int) -> Route:
    parsed = pgmap_doc.parse(doc)
    pg = pg_of(volume, chunk, parsed.pg_count)
    entry = parsed.pgs[pg]
    assert entry.primary is not None and entry.secondary is not None, entry
    ids = c.by_id(doc)
    p, s = ids[entry.primary.sds_id], ids[entry.secondary.sds_id]
    ref = ChunkRef(parsed.pool_id, pg, parsed.epoch, volume, chunk)
    return Route(pg, parsed.epoch, p, s, [d for d in c.sds if d not in (p, s)], ref)


# -- the lab (``meshctl lab``) ---------------------------------------------------------


def meshctl_command() -> list[str]:
    """The installed ``meshctl`` next to this Python, else ``python -m meshblock.cli``."""
    script = Path(sys.executable).parent / "meshctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshblock.cli"]


def free_port_block(count: int = LAB_PORTS) -> int:
    """A base port B such that B..B+count-1 are free on loopback right now.

    Chosen at random below the ephemeral range (32768+), so that concurrent test runs
    and outgoing connections rarely collide; the lab refuses busy ports clearly.
    """
    low, high = worker_slice(20000, 31999)  # each pytest-xdist worker its own slice
    for _ in range(200):
        base = random.randrange(low, high + 1 - count, 10)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no block of free ports found")


class LabCluster:
    """A lab started with the real ``meshctl lab up`` in ``root``, driven by meshctl.

    ``meshctl(...)`` runs any command against the lab's MDM with its admin token and
    cluster secret (what ``. DIR/env`` sets); ``lab(...)`` runs ``meshctl lab VERB
    --dir root``. :meth:`cleanup` stops every process even when ``down`` fails.
    """

    def __init__(self, root: Path, volume_size: str = "4GiB", device_size: str = "16GiB") -> None:
        self.root = root
        self.volume_size = volume_size
        self.device_size = device_size
        self.base_port = free_port_block()
        self.info: dict[str, Any] = {}

    # -- running meshctl -----------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCTL_")}
        env.pop("MESHBLOCK_LAB_DIR", None)
        state = self.state()
        if state is not None:
            env["MESHCTL_MDM"] = state["mdm_url"]
            env["MESHCTL_TOKEN"] = state["admin_token"]
            env["MESHBLOCK_CLUSTER_SECRET_FILE"] = str(self.root / "cluster.secret")
            if state.get("tls"):  # the lab's admin certificate, as its env file says
                env["MESHCTL_TLS_CA"] = state["tls"]["ca"]
                env["MESHCTL_TLS_CERT"] = state["tls"]["cert"]
                env["MESHCTL_TLS_KEY"] = state["tls"]["key"]
        return env

    def meshctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*meshctl_command(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"meshctl {' '.join(args)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n{self.logs_tail()}"
            )
        return proc

    def lab(self, verb: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.meshctl(
            "lab", verb, "--dir", str(self.root), *args, check=check, timeout=LAB_UP_TIMEOUT_S
        )

    # -- life cycle ----------------------------------------------------------------

    def up(self, *extra: str) -> dict[str, Any]:
        proc = self.lab(
            "up",
            "--json",
            "--base-port",
            str(self.base_port),
            "--volume-size",
            self.volume_size,
            "--device-size",
            self.device_size,
            *extra,
        )
        self.info = json.loads(proc.stdout)
        return self.info

    def status(self) -> tuple[int, dict[str, Any]]:
        proc = self.lab("status", "--json", check=False)
        return proc.returncode, json.loads(proc.stdout)

    def down(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.lab("down", *extra)

    def state(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.root / "lab.json").read_text())
        except FileNotFoundError:
            return None
        return doc

    def pids(self) -> dict[str, int]:
        state = self.state()
        return dict(state["pids"]) if state else {}

    def cleanup(self) -> None:
        """``lab down``; if that fails, SIGKILL whatever pids the state file names."""
        pids = self.pids()
        try:
            if self.state() is not None:
                self.down()
        finally:
            for pid in pids.values():
                if process_running(pid):
                    os.kill(pid, signal.SIGKILL)

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "logs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log} ---\n" + "\n".join(text))
        return "\n".join(out)

    # -- what it runs --------------------------------------------------------------

    def uri(self, transport: str = "tcp", volume: str = "vol1") -> str:
        if transport == "unix":
            return f"nbd+unix:///{volume}?socket={self.root / 'nbd.sock'}"
        # TCP: TLS with the lab's client certificate (libnbd's URI)
        return f"nbds://127.0.0.1:{self.nbd_port}/{volume}?tls-certificates={self.nbd_tls}"

    @property
    def nbd_port(self) -> int:
        assert self.info
        return int(self.info["processes"][-1]["ports"]["nbd"])

    @property
    def nbd_tls(self) -> Path:
        """The GnuTLS client directory of NBD over TLS (ca-cert.pem, client-*.pem)."""
        return self.root / "nbd-tls"

    @property
    def secret(self) -> str:
        return (self.root / "cluster.secret").read_text().strip()

    def api(self) -> _http.Api:
        """The lab's MDM as its admin (over HTTPS with the lab's admin certificate)."""
        state = self.state()
        assert state is not None
        return _http.Api(state["mdm_url"], state["admin_token"], self._context(state))

    @staticmethod
    def _context(state: dict[str, Any]) -> ssl.SSLContext | None:
        """The lab's admin certificate (None: the lab runs without TLS)."""
        tls = state.get("tls")
        if not tls:
            return None
        return pki.client_context(
            Path(tls["ca"]), cert=Path(tls["cert"]), key=Path(tls["key"]), crl=Path(tls["crl"])
        )

    def data_tls(self, cert: str = "") -> ssl.SSLContext | None:
        """A context for dialling the lab's data ports with the admin certificate, or
        with the lab's certificate ``cert`` (``sds-sds1``: DIR/tls/sds-sds1.crt);
        None: the lab runs without TLS."""
        state = self.state()
        assert state is not None
        tls = state.get("tls")
        if not tls:
            return None
        if not cert:
            return wire_tls.dial_context(tls["ca"], tls["cert"], tls["key"], tls["crl"])
        base = self.root / "tls" / cert
        return wire_tls.dial_context(tls["ca"], f"{base}.crt", f"{base}.key", tls["crl"])

    def sdc_health(self) -> dict[str, Any]:
        port = self.info["processes"][-1]["ports"]["control"]
        state = self.state()
        assert state is not None
        scheme = "https" if state.get("tls") else "http"  # the SDC's [tls], as the lab's
        r = _http.request(
            "GET", f"{scheme}://127.0.0.1:{port}/health", timeout=5, context=self._context(state)
        )
        assert r.status == 200, r
        return dict(r.body)

    def wait_sdc(self, what: str, cond: Any, timeout: float = 15.0) -> dict[str, Any]:
        seen: list[dict[str, Any]] = [{}]

        def holds() -> dict[str, Any] | None:
            seen[0] = self.sdc_health()
            return seen[0] if cond(seen[0]) else None

        detail = lambda: f"health: {seen[0]}\n{self.logs_tail()}"  # noqa: E731
        return wait_until(holds, timeout, what, interval=0.05, detail=detail)


def process_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


MakeSds = Callable[[Path, str, MdmDaemon, str | None], SdsDaemon]


@dataclass
class SmallCluster:
    """An MDM, three SDSs in three fault sets and an SDC with one volume mapped: the
    shape the failure tests need, with the MDM's settings of the test's choosing."""

    mdm: MdmDaemon
    sds: list[SdsDaemon]
    sdc: SdcDaemon
    pool_id: int
    volume_id: int

    def pgmap(self) -> dict[str, Any]:
        status, doc = self.mdm.api().get(f"/api/v1/pools/{self.pool_id}/pgmap")
        assert status == 200, doc
        return dict(doc)

    def sds_id(self, d: SdsDaemon) -> int:
        return int(d.health()["sds_id"])

    def logs(self) -> str:
        parts = [f"--- {d.name} ---\n{d.log_text()[-3000:]}" for d in self.sds]
        parts.append(f"--- sdc ---\n{self.sdc.log_text()[-3000:]}")
        parts.append(f"--- mdm ---\n{self.mdm.log_text()[-3000:]}")
        return "\n".join(parts)


@contextmanager
def small_cluster(
    root: Path,
    volume: str,
    size: str,
    mdm_settings: dict[str, dict[str, Any]],
    *,
    fault_sets: Sequence[str] = ("fs1", "fs2", "fs3"),
    make_sds: MakeSds | None = None,
    sdc_settings: dict[str, dict[str, Any]] | None = None,
    mdm_host: str | None = None,
    tls: bool = True,
) -> Iterator[SmallCluster]:
    """Start a :class:`SmallCluster` under ``root``; stop every process on the way out.

    By default three SDSs ``sds1``..``sds3`` in fault sets ``fs1``..``fs3``; with
    ``fault_sets``, SDS ``sds<i>`` goes into ``fault_sets[i-1]`` (each distinct fault
    set is created). ``make_sds(workdir, name, mdm, fault_set)`` builds each SDS daemon
    (default :class:`SdsDaemon`), ``sdc_settings`` overrides the SDC's config and
    ``mdm_host`` is the address the MDM's API listens on (default 127.0.0.1). The
    control plane is HTTPS with client certificates required (``tests/_tls.py``)
    unless ``tls=False``.
    """
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm.db'}", mdm_settings, tls=tls)
    if mdm_host is not None:
        mdm.host = mdm_host
        mdm.settings["api"]["host"] = mdm_host
        mdm.write_config()
    mdm.start()
    daemons: list[SdsDaemon] = []
    sdc: SdcDaemon | None = None
    try:
        api = mdm.api()
        status, pd = api.post("/api/v1/protection-domains", {"name": "pd1"})
        assert status == 201, pd
        for fs in sorted(set(fault_sets)):
            status, body = api.post(
                "/api/v1/fault-sets", {"name": fs, "protection_domain_id": pd["id"]}
            )
            assert status == 201, body
        status, pool = api.post(
            "/api/v1/pools",
            {"name": POOL, "protection_domain_id": pd["id"], "pg_count": PG_COUNT},
        )
        assert status == 201, pool
        build = make_sds or SdsDaemon
        daemons += [
            build(root / f"sds{i}", f"sds{i}", mdm, fs) for i, fs in enumerate(fault_sets, 1)
        ]
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_serving()
        sdc = SdcDaemon(root / "sdc", mdm, sdc_settings)
        sdc.start()
        sdc_id = sdc.wait_for("registration", lambda h: h["sdc_id"] is not None)["sdc_id"]
        status, vol = api.post(
            "/api/v1/volumes", {"name": volume, "pool_id": pool["id"], "size": size, "type": "thin"}
        )
        assert status == 201, vol
        status, m = api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})
        assert status == 201, m
        sdc.wait_for("the export", lambda h: volume in {e["name"] for e in h["exports"]})
        yield SmallCluster(mdm, daemons, sdc, int(pool["id"]), int(vol["id"]))
    finally:
        if sdc is not None:
            sdc.stop()
        for d in daemons:
            d.stop()
        mdm.stop()
        mdm.kill()
