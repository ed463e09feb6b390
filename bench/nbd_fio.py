#!/usr/bin/env python3
"""Benchmark of the data path: fio's nbd engine against a meshblock export and nbdkit.

Brings up a whole cluster on loopback (an MDM on SQLite, three SDSs in three fault
sets with file devices, one SDC, a thin volume mapped to it), or uses an export that
is already served (``--uri``), and in the same run starts ``nbdkit file`` on a file of
the same size. Both are prefilled by one sequential 1 MiB write pass (so that reads
hit written chunks), then every job runs against each of them in turn with the same
fio options (``--invalidate=0``: the page cache of file-backed targets stays warm):

    4k randread QD1, 4k randread QD32, 4k randwrite QD1, 4k randwrite QD32,
    1M seq read QD8, 1M seq write QD8

It prints IOPS, MiB/s, mean and p99 latency of each, the ratio meshblock / nbdkit, and
the targets of issue 3 marked met or missed. ``--repeat N`` takes the median of N runs;
``--json`` prints the figures as JSON; ``--profile DIR`` records py-spy profiles of the
SDC and SDS processes during every meshblock job and summarises where their time goes.

    .venv/bin/python bench/nbd_fio.py                              # ~2 minutes
    .venv/bin/python bench/nbd_fio.py --repeat 3 --runtime 5
    .venv/bin/python bench/nbd_fio.py --uri 'nbd+unix:///vol1?socket=run/lab/nbd.sock' --size 1GiB
    .venv/bin/python bench/nbd_fio.py --profile /tmp/prof --jobs randwrite-qd32

Every process (fio, nbdkit, the MDM, the SDSs, the SDC) runs on this machine and they
share its CPUs, which the report says. Linux only (reads /proc for CPU times).
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


JOBS = (
    Job("randread-qd1", "randread", "4k", 1, "4k randread QD1"),
    Job("randread-qd32", "randread", "4k", 32, "4k randread QD32"),
    Job("randwrite-qd1", "randwrite", "4k", 1, "4k randwrite QD1"),
    Job("randwrite-qd32", "randwrite", "4k", 32, "4k randwrite QD32"),
    Job("seqread-qd8", "read", "1M", 8, "1M seq read QD8"),
    Job("seqwrite-qd8", "write", "1M", 8, "1M seq write QD8"),
)


@dataclass(frozen=True)
class Target:
    metric: str  # "iops" (higher is better) or "lat_mean" (lower is better)
    ratio: float
    text: str


#: Issue 3's targets, against nbdkit's single copy on the same machine.
TARGETS = {
    "randread-qd1": Target("lat_mean", 1.5, "mean latency <= 1.5x"),
    "randread-qd32": Target("iops", 1.0, ">= 1.0x"),
    "randwrite-qd32": Target("iops", 0.5, ">= 0.5x (two copies)"),
    "seqread-qd8": Target("iops", 1.0, ">= 1.0x"),
    "seqwrite-qd8": Target("iops", 0.4, ">= 0.4x"),
}


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def fio_args(uri: str, name: str, rw: str, bs: str, iodepth: int, size: int) -> list[str]:
    """The fio options shared by both targets."""
    return [
        "fio",
        f"--name={name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--invalidate=0",
        "--lat_percentiles=1",
        "--output-format=json",
    ]


def run_fio(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"fio failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr}")
    # fio may print notes before the JSON document.
    doc: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return doc


def figures(doc: dict[str, Any], rw: str) -> dict[str, float]:
    job = doc["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    lat = side["lat_ns"]
    pct = lat.get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mib_s": side["bw_bytes"] / MiB,
        "lat_mean_us": lat["mean"] / 1000,
        "lat_p99_us": float(pct.get("99.000000", 0)) / 1000,
        "fio_cpu_pct": float(job["usr_cpu"]) + float(job["sys_cpu"]),
    }


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


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster: Cluster | None = None
    nbdkit = Nbdkit(workdir, args.size)
    profiles: dict[str, Any] = {}
    try:
        if args.uri:
            mesh_uri = args.uri
            pids: dict[str, int] = {}
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
            mesh_uri = cluster.uri
            pids = cluster.pids()
            log(f"cluster up: {mesh_uri}")
        nbdkit.start()
        pids_nbdkit = {"nbdkit": nbdkit.proc.pid} if nbdkit.proc else {}
        targets = {"meshblock": (mesh_uri, pids), "nbdkit": (nbdkit.uri, pids_nbdkit)}

        for name, (uri, _) in targets.items():
            if args.no_prefill:
                break
            log(f"prefilling {name} ({args.size // MiB} MiB, 1M sequential writes)")
            run_fio(fio_args(uri, "prefill", "write", "1M", 8, args.size))

        jobs = [j for j in JOBS if not args.jobs or j.name in args.jobs]
        samples: dict[str, dict[str, list[dict[str, float]]]] = {
            j.name: {t: [] for t in targets} for j in jobs
        }
        for rep in range(args.repeat):
            for job in jobs:
                order = list(targets) if rep % 2 == 0 else list(targets)[::-1]
                for tname in order:
                    uri, tpids = targets[tname]
                    cmd = fio_args(uri, job.name, job.rw, job.bs, job.iodepth, args.size)
                    cmd += [f"--runtime={args.runtime}", "--time_based", f"--ramp_time={args.ramp}"]
                    prof = None
                    if args.profile and tname == "meshblock" and rep == 0 and tpids:
                        prof = Profiler(Path(args.profile), tpids, args.runtime)
                    cpu0 = {p: cpu_seconds(pid) for p, pid in tpids.items()}
                    t0 = time.monotonic()
                    if prof is not None:
                        # Start sampling after the ramp, so that it covers the measured part.
                        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                        time.sleep(args.ramp)
                        prof.start(job.name)
                        out, _ = proc.communicate()
                        if proc.returncode != 0:
                            raise BenchError(f"fio failed: {' '.join(cmd)}")
                        doc = json.loads(out[out.index("{") :])
                        profiles[job.name] = prof.finish()
                    else:
                        doc = run_fio(cmd)
                    wall = time.monotonic() - t0
                    fig = figures(doc, job.rw)
                    for p, pid in tpids.items():
                        fig[f"cpu_{p}_pct"] = 100 * (cpu_seconds(pid) - cpu0[p]) / wall
                    samples[job.name][tname].append(fig)
                    log(
                        f"run {rep + 1}/{args.repeat} {job.label:<18} {tname:<9} "
                        f"{fig['iops']:>9.0f} IOPS {fig['mib_s']:>8.1f} MiB/s "
                        f"mean {fig['lat_mean_us']:>8.1f} us p99 {fig['lat_p99_us']:>8.1f} us"
                    )
    finally:
        nbdkit.stop()
        if cluster is not None:
            cluster.stop()

    results: dict[str, Any] = {}
    for job in jobs:
        med = {t: median_figures(samples[job.name][t]) for t in targets}
        m, k = med["meshblock"], med["nbdkit"]
        entry: dict[str, Any] = {
            "label": job.label,
            "meshblock": m,
            "nbdkit": k,
            "ratio_iops": m["iops"] / k["iops"] if k["iops"] else None,
            "ratio_lat_mean": m["lat_mean_us"] / k["lat_mean_us"] if k["lat_mean_us"] else None,
            "runs": {t: samples[job.name][t] for t in targets},
        }
        target = TARGETS.get(job.name)
        if target is not None:
            ratio = entry["ratio_iops"] if target.metric == "iops" else entry["ratio_lat_mean"]
            met = ratio is not None and (
                ratio >= target.ratio if target.metric == "iops" else ratio <= target.ratio
            )
            entry["target"] = {"text": target.text, "metric": target.metric, "met": met}
        if job.name in profiles:
            entry["profile"] = profiles[job.name]
        results[job.name] = entry
    return {
        "machine": machine_info(),
        "options": {
            **fio_options_doc(args),
            "uri": args.uri or "(own cluster)",
            "checksums": args.checksums if not args.uri else "(as the export's SDSs run)",
            "tls": args.tls if not args.uri else "(as the export's cluster runs)",
        },
        "fio_common": " ".join(fio_args("<uri>", "<job>", "<rw>", "<bs>", 0, args.size)[1:])
        + f" --runtime={args.runtime} --time_based --ramp_time={args.ramp}",
        "jobs": results,
    }


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


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    o = r["options"]
    out = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, {m['fio']}, {m['nbdkit']}; every process on this machine",
        f"volume and nbdkit file: {o['size_bytes'] // MiB} MiB; {o['runtime_s']} s per job "
        f"after {o['ramp_s']} s ramp; median of {o['repeat']} run(s); meshblock: {o['uri']}, "
        f"block checksums {o.get('checksums', 'on')}, data protocol TLS {o.get('tls', 'off')}",
        "",
        "| job | meshblock IOPS | MiB/s | mean µs | p99 µs | nbdkit IOPS | MiB/s | mean µs "
        "| p99 µs | ratio | target | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for entry in r["jobs"].values():
        mb, k = entry["meshblock"], entry["nbdkit"]
        target = entry.get("target")
        if target is not None and target["metric"] == "lat_mean":
            ratio = f"{entry['ratio_lat_mean']:.2f}x lat"
        else:
            ratio = f"{entry['ratio_iops']:.2f}x" if entry["ratio_iops"] is not None else "-"
        verdict = ("met" if target["met"] else "MISSED") if target else ""
        out.append(
            f"| {entry['label']} | {mb['iops']:.0f} | {mb['mib_s']:.1f} | {mb['lat_mean_us']:.0f} "
            f"| {mb['lat_p99_us']:.0f} | {k['iops']:.0f} | {k['mib_s']:.1f} "
            f"| {k['lat_mean_us']:.0f} | {k['lat_p99_us']:.0f} | {ratio} "
            f"| {target['text'] if target else ''} | {verdict} |"
        )
    cpu_lines = []
    for entry in r["jobs"].values():
        cpus = {k[4:-4]: v for k, v in entry["meshblock"].items() if k.startswith("cpu_")}
        if cpus:
            parts = ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpus.items()))
            cpu_lines.append(
                f"  {entry['label']:<18} {parts}, fio {entry['meshblock']['fio_cpu_pct']:.0f}%"
            )
    if cpu_lines:
        out += ["", "CPU of one core used during the meshblock runs:", *cpu_lines]
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
    ap.add_argument("--jobs", nargs="+", choices=[j.name for j in JOBS], help="run only these jobs")
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
        default="off",
        help="give every component a certificate of a CA of the benchmark's own, so the "
        "data protocol runs on TLS 1.3 (and the MDM on HTTPS); default off, plain TCP as "
        "the Ansible roles deploy: run once with each to see TLS's cost",
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
