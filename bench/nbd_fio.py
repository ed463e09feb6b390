#!/usr/bin/env python3
"""Benchmark of the data path: fio against a meshblock export, nbdkit and Ceph RBD.

Brings up a whole cluster on loopback (an MDM on SQLite, three SDSs in three fault
sets with file devices, one SDC, a thin volume mapped to it), or uses an export that
is already served (``--uri``), and in the same run its peers: ``nbdkit file`` on a file
of the same size (``--peer nbdkit``, the default: one copy, one hop) and, with ``--peer
ceph``, a Ceph cluster from the distribution's packages on loopback (1 mon, 1 mgr, 3
BlueStore OSDs on files, a pool of two copies, librbd cache off; ``ceph_peer.py``),
removed at the end. Each target is prefilled by one sequential 1 MiB write pass (so
that reads hit written data), then every job runs against each in turn with the same
fio options (fio's nbd engine, its rbd engine for Ceph; ``--invalidate=0``):

    buffered: 4k randread QD1, 4k randwrite QD1, 4k randread QD32, 4k randwrite QD32,
              1M read QD8, 1M write QD8
    sync:     4k randwrite QD1 fsync=1, 4k randwrite QD32 fsync=32, 1M write QD8 fsync=8

(``--matrix buffered|sync|both``). It prints issue 15's table: per job and target IOPS
(MiB/s for 1 MiB jobs) with the mean latency and the CPU per IO of the target's own
processes in brackets, the ratios meshblock / peer, then the details (p99, CPU per IO
of each process) and a line per target of issue 15, met or missed by how much.
``--repeat N`` takes the median of N runs; ``--json`` prints the figures as JSON;
``--profile DIR`` records py-spy profiles of the SDC and SDS processes during every
meshblock job and summarises where their time goes.

    .venv/bin/python bench/nbd_fio.py                              # ~3 minutes
    .venv/bin/python bench/nbd_fio.py --repeat 2 --runtime 5 --peer nbdkit ceph
    .venv/bin/python bench/nbd_fio.py --uri 'nbd+unix:///vol1?socket=run/lab/nbd.sock' --size 1GiB
    .venv/bin/python bench/nbd_fio.py --profile /tmp/prof --jobs randwrite-qd32

Every process (fio, nbdkit, Ceph's daemons, the MDM, the SDSs, the SDC) runs on this
machine and they share its CPUs, which the report says. Linux only (reads /proc for
CPU times).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MiB = 1024 * 1024
GiB = 1024 * MiB
START_TIMEOUT_S = 60.0
POOL = "bench-pool"
PD = "bench-pd"
VOLUME = "vol1"


@dataclass(frozen=True)
class Job:
    name: str
    rw: str
    bs: str
    iodepth: int
    label: str
    fsync: int = 0  # fio --fsync: a FLUSH (fsync) every N writes; 0: none

    @property
    def mib(self) -> bool:
        """Whether the report gives MiB/s rather than IOPS (the 1 MiB jobs)."""
        return self.bs == "1M"


#: The buffered matrix (issue 15's first six rows).
JOBS = (
    Job("randread-qd1", "randread", "4k", 1, "4k randread QD1"),
    Job("randwrite-qd1", "randwrite", "4k", 1, "4k randwrite QD1"),
    Job("randread-qd32", "randread", "4k", 32, "4k randread QD32"),
    Job("randwrite-qd32", "randwrite", "4k", 32, "4k randwrite QD32"),
    Job("seqread-qd8", "read", "1M", 8, "1M read QD8"),
    Job("seqwrite-qd8", "write", "1M", 8, "1M write QD8"),
)
#: The sync matrix: writes with a FLUSH every N, as a journaling filesystem or a database.
SYNC_JOBS = (
    Job("randwrite-qd1-fsync1", "randwrite", "4k", 1, "4k randwrite QD1, fsync=1", 1),
    Job("randwrite-qd32-fsync32", "randwrite", "4k", 32, "4k randwrite QD32, fsync=32", 32),
    Job("seqwrite-qd8-fsync8", "write", "1M", 8, "1M write QD8, fsync=8", 8),
)
ALL_JOBS = JOBS + SYNC_JOBS
MATRICES = {"buffered": JOBS, "sync": SYNC_JOBS, "both": ALL_JOBS}
PEERS = ("nbdkit", "ceph")
PEER_TITLES = {"meshblock": "meshblock", "nbdkit": "nbdkit", "ceph": "Ceph RBD size 2"}


@dataclass(frozen=True)
class Goal:
    """One of issue 15's targets for one job. ``kind``: ``iops`` (meshblock / ``peer``
    of IOPS at least ``limit``), ``lat`` (of mean latency at most ``limit``) or ``cpu``
    (CPU µs per IO of all meshblock processes at most ``limit``)."""

    number: int
    job: str
    kind: str
    limit: float
    peer: str = ""


def issue15_goals() -> list[Goal]:
    """Issue 15's targets 1-4 (5, rebuild, is bench/rebuild.py's; 6, cores, a design)."""
    goals = [Goal(1, j.name, "iops", 2.0, "ceph") for j in ALL_JOBS]
    goals += [Goal(2, j.name, "iops", 0.5, "nbdkit") for j in ALL_JOBS if j.iodepth == 32 or j.mib]
    goals += [Goal(3, name, "lat", 3.0, "nbdkit") for name in ("randread-qd1", "randwrite-qd1")]
    goals += [
        Goal(4, "randread-qd32", "cpu", 20.0),
        Goal(4, "randwrite-qd32", "cpu", 60.0),
        Goal(4, "seqwrite-qd8", "cpu", 800.0),
    ]
    return goals


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or "B").upper()[:1]
    return int(m.group(1)) * {"B": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}[unit]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def toml_text(tables: dict[str, dict[str, Any]], top: dict[str, Any] | None = None) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in (top or {}).items()]
    for table, keys in tables.items():
        if table.startswith("[["):
            lines.append(table)
        else:
            lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def stat_cpu_seconds(stat: str, tick: int) -> float:
    """User + system CPU seconds from the text of ``/proc/PID/stat`` (``utime`` and
    ``stime``, fields 14 and 15, in ``tick``s; the name in brackets may hold spaces
    and brackets itself, so fields are counted after its last ``)``)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    return stat_cpu_seconds(stat, os.sysconf("SC_CLK_TCK"))


def cpu_figures(
    before: dict[str, float], after: dict[str, float], seconds: float, iops: float
) -> dict[str, float]:
    """What each process used over ``seconds`` of a job at ``iops``, from its CPU
    seconds ``before`` and ``after``: ``cpu_NAME_pct`` (share of one core),
    ``cpu_NAME_us_io`` (CPU µs per IO) and ``cpu_us_io``, all of them together."""
    out: dict[str, float] = {}
    total = 0.0
    for name, t0 in before.items():
        used = max(0.0, after.get(name, t0) - t0)
        total += used
        out[f"cpu_{name}_pct"] = 100 * used / seconds if seconds > 0 else 0.0
        out[f"cpu_{name}_us_io"] = 1e6 * used / (iops * seconds) if iops and seconds else 0.0
    if before:
        out["cpu_us_io"] = 1e6 * total / (iops * seconds) if iops and seconds else 0.0
    return out


def process_cpu(fig: dict[str, float]) -> dict[str, float]:
    """``{process: CPU µs per IO}`` from the figures of :func:`cpu_figures`."""
    out = {}
    for key, value in fig.items():
        m = re.fullmatch(r"cpu_(.+)_us_io", key)
        if m:
            out[m.group(1)] = value
    return out


# -- HTTP -------------------------------------------------------------------------------

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def trust(ca: Path) -> None:
    """Call HTTPS URLs trusting the CA certificate ``ca`` (a cluster with --tls on)."""
    global _opener
    ctx = ssl.create_default_context(cafile=str(ca))
    _opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
    )


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener.open(req, timeout=10) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        status = exc.code
    return status, json.loads(raw) if raw else None


def api_ok(status: int, body: Any, what: str) -> Any:
    if status not in (200, 201):
        raise BenchError(f"{what}: HTTP {status}: {body}")
    return body


class BenchError(Exception):
    """The cluster or a tool did not do what the benchmark needs."""


# -- the cluster --------------------------------------------------------------------------


class Daemon:
    """One ``python -m meshblock.<kind>`` process with its config and log."""

    def __init__(
        self, workdir: Path, kind: str, config: str, health_url: str, token: str | None = None
    ) -> None:
        self.workdir = workdir
        self.kind = kind
        self.health_url = health_url
        self.token = token  # the read token of its [metrics] token_file
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{kind}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"meshblock.{self.kind}", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def health(self) -> dict[str, Any] | None:
        try:
            status, body = http("GET", self.health_url, token=self.token)
        except (OSError, ValueError):
            return None
        return body if status == 200 and isinstance(body, dict) else None

    def wait_for(self, what: str, ready: Any, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.kind} exited with {self.proc.returncode}; see {self.log_path}"
                )
            h = self.health()
            if h is not None and ready(h):
                return h
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.kind}: no {what} within {timeout:g} s; see {self.log_path}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class Cluster:
    """MDM + ``sds_count`` SDSs (one fault set each; 3: the lab's shape) + SDC, one thin
    volume mapped. ``capacity``: each SDS's device (default: its share of two copies
    with room to spare); ``cluster``: MDM ``[cluster]`` settings; ``mdm``: more tables
    of mdm.toml (e.g. ``[scrub]``); names of the pool,
    protection domain and volume and the daemons' log level can be changed too."""

    def __init__(
        self,
        workdir: Path,
        size: int,
        pg_count: int,
        *,
        sds_count: int = 3,
        capacity: int | None = None,
        cluster: dict[str, Any] | None = None,
        names: tuple[str, str, str] = (POOL, PD, VOLUME),
        log_level: str = "WARNING",
        checksums: bool | None = True,
        mdm: dict[str, dict[str, Any]] | None = None,
        tls: bool = False,
    ) -> None:
        self.workdir = workdir
        self.size = size
        self.pg_count = pg_count
        self.sds_count = sds_count
        # Each SDS holds about 2/sds_count of the volume (two copies).
        self.capacity = capacity or max(2 * GiB, (self.size * 2 // sds_count // GiB + 2) * GiB)
        self.cluster_settings = {"name": "bench", "heartbeat_timeout_s": 10.0, **(cluster or {})}
        self.pool_name, self.pd_name, self.volume = names
        self.log_level = log_level
        # The SDSs' [store] checksums; None: no [store] table (a release before them).
        self.checksums = checksums
        self.mdm_tables = mdm or {}  # more tables of mdm.toml (e.g. [scrub])
        # Every component with a certificate of a CA of the benchmark's own: the MDM on
        # HTTPS, the data protocol (SDC-SDS, SDS-SDS) on TLS 1.3 (docs/protocol.md 1.1).
        self.tls = tls
        self.pool_id = 0
        self.pool: dict[str, Any] = {}
        self.admin = "adm-" + secrets.token_urlsafe(16)
        self.secret = "cs-" + secrets.token_urlsafe(16)
        # the SDSs' and SDC's [metrics] token_file: their /health details need it
        self.read_token = "rd-" + secrets.token_urlsafe(16)
        self.read_token_file = workdir / "metrics_token"
        workdir.mkdir(parents=True, exist_ok=True)
        self.read_token_file.write_text(self.read_token + "\n")
        self.read_token_file.chmod(0o600)
        self.mdm_port = free_port()
        self.mdm_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.mdm_port}"
        self.daemons: list[Daemon] = []
        self.sds: list[Daemon] = []
        self.sdc: Daemon | None = None
        self.nbd_port = 0
        self.sdc_guid = ""

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{self.volume}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return api_ok(*http(method, self.mdm_url + path, body, self.admin), f"{method} {path}")

    def pgmap(self) -> dict[str, Any]:
        return dict(self.api("GET", f"/api/v1/pools/{self.pool_id}/pgmap"))

    def _make_pki(self) -> None:
        """A CA in WORKDIR/ca and a certificate per component in WORKDIR/tls, made with
        this tree's ``meshctl ca`` (valid for 127.0.0.1)."""
        ca, out = self.workdir / "ca", self.workdir / "tls"
        meshctl = [sys.executable, "-m", "meshblock.cli"]
        subprocess.run([*meshctl, "ca", "init", str(ca)], check=True, stdout=subprocess.DEVNULL)
        self.sdc_guid = str(uuid.uuid4())
        names = ["mdm:mdm1", *(f"sds:sds{i}" for i in range(self.sds_count))]
        for ident in [*names, f"sdc:{self.sdc_guid}"]:
            issue = ["ca", "issue", ident, "--ca", str(ca), "--out", str(out)]
            subprocess.run(
                [*meshctl, *issue, "--san", "127.0.0.1"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        trust(ca / "ca.crt")

    def tls_table(self, identity: str) -> dict[str, dict[str, Any]]:
        """The ``[tls]`` table of ``identity`` (``kind:name``), none without --tls on."""
        if not self.tls:
            return {}
        kind, name = identity.split(":", 1)
        base = self.workdir / "tls" / f"{kind}-{name}"
        return {
            "tls": {
                "cert": f"{base}.crt",
                "key": f"{base}.key",
                "ca": str(self.workdir / "ca" / "ca.crt"),
                "crl": str(self.workdir / "ca" / "crl.pem"),
            }
        }

    def start(self) -> None:
        scheme = "http"
        if self.tls:
            self._make_pki()
            scheme = "https"
        mdm_tls = self.tls_table("mdm:mdm1")
        if mdm_tls:  # operators keep their bearer token: the admin calls below
            mdm_tls["tls"]["client_certs"] = "optional"
        mdm_dir = self.workdir / "mdm"
        mdm = Daemon(
            mdm_dir,
            "mdm",
            toml_text(
                {
                    "api": {"host": "127.0.0.1", "port": self.mdm_port},
                    "auth": {
                        "admin_token": self.admin,
                        "readonly_token": "ro-" + secrets.token_urlsafe(16),
                        "cluster_secret": self.secret,
                    },
                    "database": {"url": f"sqlite+aiosqlite:///{mdm_dir / 'mdm.db'}"},
                    "cluster": self.cluster_settings,
                    "logging": {"level": self.log_level},
                    **self.mdm_tables,
                    **mdm_tls,
                }
            ),
            self.mdm_url + "/health",
        )
        self.daemons.append(mdm)
        mdm.start()
        mdm.wait_for("health", lambda h: True)
        pd = self.api("POST", "/api/v1/protection-domains", {"name": self.pd_name})
        for i in range(self.sds_count):
            self.api(
                "POST", "/api/v1/fault-sets", {"name": f"fs{i}", "protection_domain_id": pd["id"]}
            )
        pool = self.api(
            "POST",
            "/api/v1/pools",
            {"name": self.pool_name, "protection_domain_id": pd["id"], "pg_count": self.pg_count},
        )
        self.pool, self.pool_id = pool, int(pool["id"])
        # Without certificates a new SDS joins with a join token (docs/security.md,
        # "Joining the cluster"); with them, by its sds: certificate.
        join: dict[str, str] = {}
        if not self.tls:
            token = self.api(
                "POST",
                "/api/v1/sds/join-tokens",
                {"uses": self.sds_count, "ttl_s": 3600, "description": "benchmark"},
            )
            join["join_token"] = str(token["token"])
        for i in range(self.sds_count):
            d = self.workdir / f"sds{i}"
            data_port, control_port = free_port(), free_port()
            config = toml_text(
                {
                    "data": {"host": "127.0.0.1", "port": data_port},
                    "control": {"host": "127.0.0.1", "port": control_port},
                    "metrics": {"token_file": str(self.read_token_file)},
                    "logging": {"level": self.log_level},
                    **({} if self.checksums is None else {"store": {"checksums": self.checksums}}),
                    **self.tls_table(f"sds:sds{i}"),
                    "[[devices]]": {
                        "path": str(d / "dev0.img"),
                        "capacity": self.capacity,
                        "pool": self.pool_name,
                    },
                },
                top={
                    "name": f"sds{i}",
                    "protection_domain": self.pd_name,
                    "fault_set": f"fs{i}",
                    "address": "127.0.0.1",
                    "mdm_urls": [self.mdm_url],
                    "cluster_secret": self.secret,
                    "state_dir": str(d / "state"),
                    **join,
                },
            )
            health = f"{scheme}://127.0.0.1:{control_port}/health"
            sds = Daemon(d, "sds", config, health, self.read_token)
            self.daemons.append(sds)
            self.sds.append(sds)
            sds.start()
        for sds in self.sds:
            sds.wait_for("serving state", lambda h: h.get("state") == "serving")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            doc = self.api("GET", f"/api/v1/pools/{pool['id']}/pgmap")
            if doc["pgs"] and all(pg["primary"] and pg["secondary"] for pg in doc["pgs"]):
                break
            if time.monotonic() > deadline:
                raise BenchError("the PG map did not get a primary and secondary for every PG")
            time.sleep(0.2)
        self.nbd_port = free_port()
        control_port = free_port()
        sdc_dir = self.workdir / "sdc"
        self.sdc = Daemon(
            sdc_dir,
            "sdc",
            toml_text(
                {
                    "sdc": {"name": "bench-sdc", "state_dir": str(sdc_dir / "state")},
                    "mdm": {"urls": [self.mdm_url], "cluster_secret": self.secret},
                    "nbd": {
                        "tcp": True,
                        "host": "127.0.0.1",
                        "port": self.nbd_port,
                        "unix_socket": str(sdc_dir / "nbd.sock"),
                    },
                    "control": {"host": "127.0.0.1", "port": control_port},
                    "metrics": {"token_file": str(self.read_token_file)},
                    "logging": {"level": self.log_level},
                    **self.tls_table(f"sdc:{self.sdc_guid}"),
                }
            ),
            f"{scheme}://127.0.0.1:{control_port}/health",
            self.read_token,
        )
        self.daemons.append(self.sdc)
        self.sdc.start()
        h = self.sdc.wait_for("registration", lambda h: h.get("sdc_id") is not None)
        vol = self.api(
            "POST",
            "/api/v1/volumes",
            {"name": self.volume, "pool_id": pool["id"], "size": self.size, "type": "thin"},
        )
        self.api("POST", "/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": h["sdc_id"]})
        self.sdc.wait_for("export", lambda h: self.volume in {e["name"] for e in h["exports"]})

    def pids(self) -> dict[str, int]:
        """The data-path processes whose CPU time the report shows."""
        out = {f"sds{i}": d.pid for i, d in enumerate(self.sds)}
        if self.sdc is not None:
            out["sdc"] = self.sdc.pid
        return out

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()


class Nbdkit:
    """``nbdkit file`` on a file of the volume's size, on loopback TCP."""

    def __init__(self, workdir: Path, size: int) -> None:
        self.path = workdir / "nbdkit.img"
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> None:
        exe = shutil.which("nbdkit")
        if exe is None:
            raise BenchError("nbdkit is not installed (apt-get install nbdkit)")
        self.proc = subprocess.Popen(
            [
                exe,
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(self.port),
                "file",
                str(self.path),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("nbdkit did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# -- fio ------------------------------------------------------------------------------------


def engine_args(uri: str) -> list[str]:
    """fio's engine options for a target: ``rbd:POOL/IMAGE`` is an RBD image through
    fio's rbd engine (librbd, as ``client.admin``; it reads $CEPH_CONF), anything else
    an NBD URI through its nbd engine."""
    if uri.startswith("rbd:"):
        pool, _, image = uri[4:].partition("/")
        return ["--ioengine=rbd", "--clientname=admin", f"--pool={pool}", f"--rbdname={image}"]
    return ["--ioengine=nbd", f"--uri={uri}"]


def fio_args(
    uri: str, name: str, rw: str, bs: str, iodepth: int, size: int, *, fsync: int = 0
) -> list[str]:
    """The fio options shared by every target (``fsync``: ``--fsync=N``, a FLUSH every
    N writes)."""
    return [
        "fio",
        f"--name={name}",
        *engine_args(uri),
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        *([f"--fsync={fsync}"] if fsync else []),
        "--invalidate=0",
        "--lat_percentiles=1",
        "--output-format=json",
    ]


def fio_json(stdout: str) -> dict[str, Any]:
    """fio's JSON document (fio may print notes before it)."""
    doc: dict[str, Any] = json.loads(stdout[stdout.index("{") :])
    return doc


def run_fio(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise BenchError(f"fio failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    return fio_json(proc.stdout)


def figures(doc: dict[str, Any], rw: str) -> dict[str, float]:
    job = doc["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    lat = side["lat_ns"]
    pct = lat.get("percentile", {})
    iops = float(side["iops"])
    fio_cpu = float(job["usr_cpu"]) + float(job["sys_cpu"])
    out = {
        "iops": iops,
        "mib_s": side["bw_bytes"] / MiB,
        "lat_mean_us": lat["mean"] / 1000,
        "lat_p99_us": float(pct.get("99.000000", 0)) / 1000,
        "fio_cpu_pct": fio_cpu,
        # fio's own CPU (for Ceph, librbd runs in it: the client side of an RBD IO)
        "fio_cpu_us_io": 1e6 * fio_cpu / 100 / iops if iops else 0.0,
    }
    sync = job.get("sync", {}).get("lat_ns", {})
    if sync.get("N"):  # --fsync: the FLUSHes' own latency, apart from the writes'
        out["sync_lat_mean_us"] = sync["mean"] / 1000
    return out


class Profiler:
    """py-spy record on the meshblock processes while one job runs."""

    def __init__(self, outdir: Path, pids: dict[str, int], seconds: int) -> None:
        self.outdir = outdir
        self.pids = pids
        self.seconds = seconds
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def start(self, job: str) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.outdir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            out = self.outdir / f"{job}.{name}.txt"
            p = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(self.seconds),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append((name, out, p))

    def finish(self) -> dict[str, Any]:
        """Per process: samples and the functions with the largest self time."""
        summary: dict[str, Any] = {}
        for name, out, p in self.procs:
            try:
                p.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            summary[name] = summarize_profile(out, self.seconds * 200)
        self.procs = []
        return summary


def summarize_profile(path: Path, expected: int) -> dict[str, Any]:
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"samples": 0, "busy_pct": 0.0, "top": []}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        self_time[re.sub(r":\d+\)$", ")", leaf)] += n
    top = [
        {"function": f, "share_pct": round(100 * n / total, 1)}
        for f, n in self_time.most_common(12)
    ]
    return {"samples": total, "busy_pct": round(100 * total / max(expected, 1), 1), "top": top}


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    """One target of the fio jobs: its URI (``rbd:POOL/IMAGE`` for Ceph), the processes
    whose CPU the report charges to it, and fio's environment (None: the benchmark's)."""

    name: str
    uri: str
    pids: dict[str, int]
    env: dict[str, str] | None = None


def one_job(
    ep: Endpoint, job: Job, args: argparse.Namespace, prof: Profiler | None
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Run ``job`` once against ``ep``: its figures, with the CPU each of the target's
    processes used from the end of the ramp to fio's exit (per IO: over fio's IO rate),
    and py-spy's summary when ``prof`` is given."""
    cmd = fio_args(ep.uri, job.name, job.rw, job.bs, job.iodepth, args.size, fsync=job.fsync)
    cmd += [f"--runtime={args.runtime}", "--time_based", f"--ramp_time={args.ramp}"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ep.env
    )
    time.sleep(args.ramp)  # the measured part starts after the ramp
    cpu0 = {p: cpu_seconds(pid) for p, pid in ep.pids.items()}
    t0 = time.monotonic()
    if prof is not None:
        prof.start(job.name)
    out, err = proc.communicate()
    seconds = time.monotonic() - t0
    cpu1 = {p: cpu_seconds(pid) for p, pid in ep.pids.items()}
    if proc.returncode != 0:
        raise BenchError(f"fio failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    fig = figures(fio_json(out), job.rw)
    fig.update(cpu_figures(cpu0, cpu1, seconds, fig["iops"]))
    return fig, prof.finish() if prof is not None else None


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster: Cluster | None = None
    nbdkit: Nbdkit | None = None
    ceph: Any = None  # ceph_peer.CephCluster, imported only with --peer ceph
    profiles: dict[str, Any] = {}
    eps: list[Endpoint] = []
    try:
        if args.uri:
            eps.append(Endpoint("meshblock", args.uri, {}))
        else:
            log("starting the cluster (MDM, 3 SDSs, SDC) ...")
            cluster = Cluster(
                workdir / "cluster",
                args.size,
                args.pg_count,
                checksums=args.checksums == "on",
                tls=args.tls == "on",
            )
            cluster.start()
            eps.append(Endpoint("meshblock", cluster.uri, cluster.pids()))
            log(f"cluster up: {cluster.uri}")
        if "nbdkit" in args.peer:
            nbdkit = Nbdkit(workdir, args.size)
            nbdkit.start()
            assert nbdkit.proc is not None
            eps.append(Endpoint("nbdkit", nbdkit.uri, {"nbdkit": nbdkit.proc.pid}))
        if "ceph" in args.peer:
            import ceph_peer

            try:
                ceph_peer.ensure_installed()
                ceph = ceph_peer.CephCluster(workdir / "ceph", args.size, args.pg_count)
                log("starting Ceph (1 mon, 1 mgr, 3 BlueStore OSDs on files, pool size 2) ...")
                ceph.start()
            except ceph_peer.CephError as exc:
                raise BenchError(f"Ceph: {exc}") from exc
            eps.append(Endpoint("ceph", ceph.uri, ceph.pids(), ceph.env))
            log(f"Ceph up: {ceph.uri} ({', '.join(ceph.pids())})")

        for ep in eps:
            if args.no_prefill:
                break
            log(f"prefilling {ep.name} ({args.size // MiB} MiB, 1M sequential writes)")
            run_fio(fio_args(ep.uri, "prefill", "write", "1M", 8, args.size), ep.env)

        jobs = selected_jobs(args)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            j.name: {ep.name: [] for ep in eps} for j in jobs
        }
        for rep in range(args.repeat):
            for job in jobs:
                for ep in eps if rep % 2 == 0 else eps[::-1]:
                    prof = None
                    if args.profile and ep.name == "meshblock" and rep == 0 and ep.pids:
                        prof = Profiler(Path(args.profile), ep.pids, args.runtime)
                    fig, summary = one_job(ep, job, args, prof)
                    if summary is not None:
                        profiles[job.name] = summary
                    samples[job.name][ep.name].append(fig)
                    cpu = f" CPU {fig['cpu_us_io']:>7.0f} us/IO" if "cpu_us_io" in fig else ""
                    log(
                        f"run {rep + 1}/{args.repeat} {job.label:<27} {ep.name:<9} "
                        f"{fig['iops']:>9.0f} IOPS {fig['mib_s']:>8.1f} MiB/s "
                        f"mean {fig['lat_mean_us']:>8.1f} us p99 {fig['lat_p99_us']:>8.1f} us" + cpu
                    )
    finally:
        if ceph is not None:
            ceph.stop(keep_logs=bool(args.workdir))
        if nbdkit is not None:
            nbdkit.stop()
        if cluster is not None:
            cluster.stop()

    results: dict[str, Any] = {}
    for job in jobs:
        entry: dict[str, Any] = {
            "label": job.label,
            "fio": {"rw": job.rw, "bs": job.bs, "iodepth": job.iodepth, "fsync": job.fsync},
        }
        for ep in eps:
            entry[ep.name] = median_figures(samples[job.name][ep.name])
        entry["ratios"] = job_ratios(entry, [ep.name for ep in eps[1:]])
        entry["runs"] = {ep.name: samples[job.name][ep.name] for ep in eps}
        if job.name in profiles:
            entry["profile"] = profiles[job.name]
        results[job.name] = entry
    machine = machine_info()
    if ceph is not None:
        import ceph_peer

        machine["ceph"] = ceph_peer.version()
    return {
        "machine": machine,
        "options": {
            **fio_options_doc(args),
            "uri": args.uri or "(own cluster)",
            "checksums": args.checksums if not args.uri else "(as the export's SDSs run)",
            "tls": args.tls if not args.uri else "(as the export's cluster runs)",
            "peers": [ep.name for ep in eps[1:]],
        },
        "fio_common": " ".join(fio_args("<uri>", "<job>", "<rw>", "<bs>", 0, args.size)[1:])
        + f" --runtime={args.runtime} --time_based --ramp_time={args.ramp}",
        "jobs": results,
        "goals": evaluate_goals(results),
    }


def selected_jobs(args: argparse.Namespace) -> list[Job]:
    """``--jobs`` in the table's order, or else the jobs of ``--matrix``."""
    if args.jobs:
        return [j for j in ALL_JOBS if j.name in args.jobs]
    return list(MATRICES[args.matrix])


def job_ratios(entry: dict[str, Any], peers: list[str]) -> dict[str, dict[str, float | None]]:
    """meshblock / each peer, of IOPS and of mean latency (None where the peer has 0)."""
    m = entry["meshblock"]
    out: dict[str, dict[str, float | None]] = {}
    for peer in peers:
        k = entry[peer]
        out[peer] = {
            "iops": m["iops"] / k["iops"] if k["iops"] else None,
            "lat_mean": m["lat_mean_us"] / k["lat_mean_us"] if k["lat_mean_us"] else None,
        }
    return out


def goal_verdict(goal: Goal, entry: dict[str, Any]) -> tuple[bool, str] | None:
    """Whether ``goal`` is met by the figures of its job, and the report's line (None
    when they are missing: the peer was not run, or no CPU figures with ``--uri``)."""
    label = entry["label"]
    if goal.kind == "cpu":
        value = entry["meshblock"].get("cpu_us_io")
        if value is None:
            return None
        met = value <= goal.limit
        head = f"{goal.number}. {label}: CPU {value:,.0f} µs per IO, at most {goal.limit:,.0f}"
        miss = f"{value - goal.limit:,.0f} µs: {100 * (1 - goal.limit / value):.0f}% less CPU"
    else:
        ratio = entry.get("ratios", {}).get(goal.peer, {}).get(goal.kind.replace("lat", "lat_mean"))
        if ratio is None:
            return None
        title = PEER_TITLES[goal.peer]
        if goal.kind == "iops":
            met = ratio >= goal.limit
            head = f"{goal.number}. {label}: {ratio:.2f}x {title}, at least {goal.limit:g}x"
            need = f"{goal.limit / ratio:.2f}x the IOPS" if ratio else "any IO at all"
            miss = f"{goal.limit - ratio:.2f}x: {need}"
        else:
            met = ratio <= goal.limit
            head = (
                f"{goal.number}. {label}: mean latency {ratio:.2f}x {title}'s, "
                f"at most {goal.limit:g}x"
            )
            miss = f"{ratio - goal.limit:.2f}x: {100 * (1 - goal.limit / ratio):.0f}% less latency"
    return met, f"{head}: " + ("met" if met else f"MISSED by {miss} needed")


def evaluate_goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets for the jobs that ran, with their verdicts."""
    out = []
    for goal in issue15_goals():
        entry = results.get(goal.job)
        verdict = goal_verdict(goal, entry) if entry is not None else None
        if verdict is not None:
            out.append(
                {"number": goal.number, "job": goal.job, "met": verdict[0], "line": verdict[1]}
            )
    return out


def fio_options_doc(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`fio_options`, for a report."""
    return {
        "size_bytes": args.size,
        "runtime_s": args.runtime,
        "ramp_s": args.ramp,
        "repeat": args.repeat,
        "pg_count": args.pg_count,
    }


def median_figures(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True, check=False)
    kit = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": fio.stdout.strip(),
        "nbdkit": kit.stdout.strip(),
    }


def fmt_num(value: float) -> str:
    """A figure of the table: ``4,322``."""
    return f"{value:,.0f}"


def table_cell(fig: dict[str, float], mib: bool) -> str:
    """Issue 15's cell: IOPS (MiB/s for a 1 MiB job), then in brackets the mean latency
    µs and the CPU µs per IO of the target's own processes: ``4,322 (233, 209)``."""
    main = fmt_num(fig["mib_s"] if mib else fig["iops"])
    cpu = fmt_num(fig["cpu_us_io"]) if "cpu_us_io" in fig else "-"
    return f"{main} ({fmt_num(fig['lat_mean_us'])}, {cpu})"


def ratio_cell(ratio: float | None, bold: bool = False) -> str:
    if ratio is None:
        return "-"
    text = f"{ratio:.2f}x"
    return f"**{text}**" if bold else text


def render_table(r: dict[str, Any]) -> list[str]:
    """Issue 15's table: a column per target, the ratios meshblock / peer (in bold
    below 1: meshblock behind)."""
    peers: list[str] = r["options"].get("peers", ["nbdkit"])
    names = ["meshblock", *peers]
    head = "| job | " + " | ".join(PEER_TITLES[n] for n in names)
    head += "".join(f" | meshblock / {PEER_TITLES[p].split()[0]}" for p in peers) + " |"
    out = [head, "|---|" + "---:|" * (len(names) + len(peers))]
    for entry in r["jobs"].values():
        mib = entry["fio"]["bs"] == "1M"
        cells = [table_cell(entry[n], mib) for n in names]
        for p in peers:
            ratio = entry["ratios"][p]["iops"]
            cells.append(ratio_cell(ratio, bold=ratio is not None and ratio < 1))
        label = entry["label"] + (" (MiB/s)" if mib else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    o = r["options"]
    peers = o.get("peers", ["nbdkit"])
    tools = f"{m['fio']}, {m['nbdkit']}" + (f", {m['ceph']}" if m.get("ceph") else "")
    out = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, {tools}; every process on this machine",
        f"each target's volume: {o['size_bytes'] // MiB} MiB; {o['runtime_s']} s "
        f"per job after {o['ramp_s']} s ramp; median of {o['repeat']} run(s); meshblock: "
        f"{o['uri']}, block checksums {o.get('checksums', 'on')}, data protocol TLS "
        f"{o.get('tls', 'off')}; peers: {', '.join(peers) or 'none'}",
        "IOPS (MiB/s for 1 MiB jobs), in brackets mean latency µs and CPU µs per IO of the "
        "target's own processes (Ceph's client, librbd, runs in fio: not counted)",
        "",
        *render_table(r),
        "",
        "| job | target | IOPS | MiB/s | mean µs | p99 µs | FLUSH mean µs | CPU µs/IO "
        "| per process (µs/IO) | fio µs/IO |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for entry in r["jobs"].values():
        for name in ["meshblock", *peers]:
            f = entry[name]
            per = ", ".join(f"{k} {v:,.0f}" for k, v in process_cpu(f).items())
            flush = f"{f['sync_lat_mean_us']:,.0f}" if "sync_lat_mean_us" in f else ""
            cpu = fmt_num(f["cpu_us_io"]) if "cpu_us_io" in f else "-"
            out.append(
                f"| {entry['label']} | {name} | {f['iops']:,.0f} | {f['mib_s']:,.1f} "
                f"| {f['lat_mean_us']:,.0f} | {f['lat_p99_us']:,.0f} | {flush} | {cpu} "
                f"| {per} | {f.get('fio_cpu_us_io', 0.0):,.0f} |"
            )
    goals = r.get("goals", [])
    if goals:
        met = sum(1 for g in goals if g["met"])
        out += ["", f"Issue 15's targets: {met} of {len(goals)} met"]
        out += [f"  {g['line']}" for g in goals]
    for entry in r["jobs"].values():
        prof = entry.get("profile")
        if not prof:
            continue
        out += ["", f"py-spy, {entry['label']} (self time of the busiest functions):"]
        for proc, p in prof.items():
            if not p["samples"]:
                continue
            top = "; ".join(f"{t['function']} {t['share_pct']}%" for t in p["top"][:6])
            out.append(f"  {proc} ({p['busy_pct']:.0f}% busy): {top}")
    return "\n".join(out)


def fio_options(ap: argparse.ArgumentParser, runtime: int, ramp: int) -> None:
    """The options of the fio-job benchmarks: ``--size``, ``--runtime``, ``--ramp``,
    ``--repeat``, ``--pg-count`` (checked by :func:`check_fio_options`)."""
    ap.add_argument("--size", type=parse_size, default=GiB, help="volume size (default 1GiB)")
    ap.add_argument(
        "--runtime", type=int, default=runtime, help=f"seconds per job (default {runtime})"
    )
    ap.add_argument(
        "--ramp", type=int, default=ramp, help=f"fio ramp_time seconds (default {ramp})"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs of each job; medians reported")
    ap.add_argument("--pg-count", type=int, default=32, help="PGs of the benchmark's pool")


def check_fio_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeat < 1 or args.runtime < 1:
        ap.error("--repeat and --runtime must be at least 1")
    if shutil.which("fio") is None:
        ap.error("fio is not installed (apt-get install fio)")


def run_main(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Path], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    prefix: str,
) -> int:
    """Run a benchmark in ``--workdir`` (kept) or a new temporary directory (removed,
    unless the run fails) and print its report, or its figures as JSON (``--json``)."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, workdir)
    except BenchError as exc:
        log(f"error: {exc}; work directory kept: {workdir}")
        return 1
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--uri",
        help="use this NBD export instead of starting a cluster (its first --size bytes "
        "are overwritten by the prefill and the write jobs)",
    )
    fio_options(ap, runtime=5, ramp=1)
    ap.add_argument(
        "--matrix",
        choices=list(MATRICES),
        default="both",
        help="buffered: the six jobs without fsync; sync: the three with --fsync=N; "
        "both (default): the whole table",
    )
    ap.add_argument(
        "--jobs",
        nargs="+",
        choices=[j.name for j in ALL_JOBS],
        help="run only these jobs (of either matrix; instead of --matrix)",
    )
    ap.add_argument(
        "--peer",
        nargs="*",
        choices=PEERS,
        default=["nbdkit"],
        help="the peers to run the same jobs against: nbdkit (nbdkit file, the default) "
        "and/or ceph (a Ceph cluster from the distribution's packages on loopback, "
        "installed with apt-get if missing, removed at the end); none: --peer alone",
    )
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill pass")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the cluster's processes per job")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--workdir", help="keep configs, logs and data here (default: a temp dir)")
    ap.add_argument(
        "--checksums",
        choices=["on", "off"],
        default="on",
        help="the SDSs' block checksums ([store] checksums in sds.toml; default on, as "
        "deployed): run once with each to see their cost",
    )
    ap.add_argument(
        "--tls",
        choices=["on", "off"],
        default="on",
        help="give every component a certificate of a CA of the benchmark's own, so the "
        "data protocol runs on TLS 1.3 (and the MDM on HTTPS); default on, as site.yml "
        "and make run deploy; off: plain TCP. Run once with each to see TLS's cost",
    )
    args = ap.parse_args(argv)
    check_fio_options(ap, args)
    if args.profile and args.uri:
        ap.error("--profile needs the benchmark's own cluster (no --uri)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        workdir = Path(tempfile.mkdtemp(prefix="nbd-fio-"))
        keep = False
    ok = False
    try:
        result = run(args, workdir)
        ok = True
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        if keep or not ok:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
