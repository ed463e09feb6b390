#!/usr/bin/env python3
"""Benchmark of the MDM REST API at cluster scale.

Starts a real MDM process (``python -m meshblock.mdm``) on loopback with a generated
configuration, builds a topology through the REST API (a protection domain, fault sets,
a pool, ``--sds`` simulated SDSs with one device each registered with the cluster
secret, ``--volumes`` thin and thick volumes, a few SDCs with mapped volumes), then for
``--duration`` seconds:

- a heartbeat process makes every simulated SDS send ``POST /api/v1/sds/{id}/heartbeat``
  once a second (device usage and a few volume chunk counts: all of them first, then
  those that changed), like the SDS daemon;
- this process issues a mix of API requests at a fixed rate (open loop: a slow answer
  does not slow the offered load down): volume reads, creates and deletes, pool and
  SDS reads, PG maps and SDC maps.

Afterwards, with the heartbeats still running, it fetches the whole topology a few
times on its own (a big document at this scale) and reports its latency, its size and
what it does to heartbeat latency meanwhile.

Everything runs on one machine: the MDM process and the two load-generating processes
share its CPUs, which the report says together with the CPU each of them used.

    .venv/bin/python bench/mdm_api.py                      # 1000 SDSs, 10000 volumes, 30 s
    .venv/bin/python bench/mdm_api.py --sds 100 --volumes 1000 --duration 10
    .venv/bin/python bench/mdm_api.py --db postgresql+asyncpg://user:pw@host/emptydb
    .venv/bin/python bench/mdm_api.py --json > result.json

Linux only (reads /proc for the MDM's memory and CPU time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import json
import math
import multiprocessing as mp
import os
import platform
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
TiB = 1 << 40
MiB = 1 << 20

TARGET_P99_MS = 50.0
PD_NAME = "bench-pd"
POOL_NAME = "bench-pool"
HEARTBEAT_INTERVAL_S = 1.0
START_TIMEOUT_S = 60.0

# The API mix: request kind -> weight (share of the requests sent).
MIX: dict[str, int] = {
    "get_volume": 35,
    "create_volume": 10,
    "delete_volume": 10,
    "get_pool": 10,
    "get_sds": 15,
    "get_pgmap": 10,
    "get_sdc_maps": 10,
}


def fault_set_name(n: int) -> str:
    return f"fs{n:02d}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- statistics ----------------------------------------------------------------------


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_stats(seconds: Iterable[float]) -> dict[str, float | int]:
    v = sorted(seconds)
    return {
        "n": len(v),
        "mean_ms": round(1000 * sum(v) / len(v), 2) if v else 0.0,
        "p50_ms": round(1000 * percentile(v, 50), 2),
        "p99_ms": round(1000 * percentile(v, 99), 2),
        "max_ms": round(1000 * v[-1], 2) if v else 0.0,
    }


# ---- the MDM process -----------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for table, keys in tables.items():
        lines.append(f"[{table}]")
        for k, v in keys.items():
            # a JSON string or number is valid TOML; bools are the same words
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    return "\n".join(lines)


def proc_status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``-style line of /proc/<pid>/status, in KiB (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU time all CPUs spent busy since boot (not idle, not iowait), from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    ticks = [int(x) for x in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    # guest time is already counted in user and nice
    total = sum(ticks[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class Mdm:
    """One MDM daemon process with a generated ``mdm.toml`` in ``workdir``."""

    def __init__(self, workdir: Path, db_url: str, log_level: str) -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.admin_token = "adm-" + secrets.token_urlsafe(24)
        self.readonly_token = "ro-" + secrets.token_urlsafe(24)
        self.cluster_secret = "cs-" + secrets.token_urlsafe(24)
        self.db_url = db_url
        self.config_path = workdir / "mdm.toml"
        self.log_path = workdir / "mdm.log"
        self.config_path.write_text(
            toml_text(
                {
                    "api": {"host": self.host, "port": self.port},
                    "auth": {
                        "admin_token": self.admin_token,
                        "readonly_token": self.readonly_token,
                        "cluster_secret": self.cluster_secret,
                    },
                    "database": {"url": db_url},
                    # long enough that SDSs registered early stay connected through the setup
                    "cluster": {
                        "name": "bench",
                        "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,  # the simulator's
                        "heartbeat_timeout_s": 600.0,
                    },
                    "logging": {"level": log_level},
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        src = str(ROOT / "daemons")
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else src
        with open(self.log_path, "ab") as out:
            self.log_offset = out.tell()  # problems are looked for in this run's part
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshblock.mdm", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(
                    f"the MDM exited with code {self.proc.returncode} while "
                    f"starting; see {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.url + "/health") as r:
                    await r.read()
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
        raise BenchError(
            f"the MDM did not answer /health within {START_TIMEOUT_S:.0f} s; "
            f"see {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        return [
            ln
            for ln in text.splitlines()
            if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback")
        ]


class BenchError(Exception):
    pass


# ---- HTTP ----------------------------------------------------------------------------


class Api:
    """Thin JSON client over one aiohttp session (one connection pool)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, token: str, body: Any = None
    ) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        async with self.session.request(
            method, self.base + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            data = await r.read()
            status = r.status
        return status, data, time.perf_counter() - t0

    async def ok(self, method: str, path: str, token: str, body: Any = None) -> Any:
        status, data, _ = await self.call(method, path, token, body)
        if status >= 300:
            raise BenchError(f"{method} {path} -> {status}: {data[:500]!r}")
        return json.loads(data) if data else None


# ---- heartbeat generator (its own process) -------------------------------------------


@dataclass
class SimSds:
    id: int
    device_id: int
    used_bytes: int
    volumes: list[list[int]]  # [volume_id, chunks]


def heartbeat_process(
    url: str,
    secret: str,
    sds: list[SimSds],
    connections: int,
    seed: int,
    stop: Any,
    conn: Connection,
) -> None:
    """Entry point of the heartbeat process: beats until ``stop`` is set, then sends
    ``{"samples": [(t_send_monotonic, latency_s, status)], ...}`` through ``conn``."""
    result = asyncio.run(_heartbeats(url, secret, sds, connections, seed, stop, conn))
    conn.send(result)
    conn.close()


async def _heartbeats(
    url: str,
    secret: str,
    sds: list[SimSds],
    connections: int,
    seed: int,
    stop: Any,
    conn: Connection,
) -> dict[str, Any]:
    rng = random.Random(seed)
    samples: list[tuple[float, float, int]] = []
    missed = 0
    errors: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()
    headers = {"Authorization": f"Bearer {secret}"}
    n = len(sds)
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_sds(i: int, s: SimSds, start: float) -> None:
            nonlocal missed
            path = f"{url}/api/v1/sds/{s.id}/heartbeat"
            due = start + HEARTBEAT_INTERVAL_S * i / n
            # Like the SDS daemon (meshblock.sds.heartbeat): the whole state first and
            # whenever the MDM asks for it, else what changed since the state of the
            # last heartbeat the MDM acknowledged.
            seq = time.time_ns() // 1000
            acked: tuple[int, int, dict[int, int]] | None = None  # seq, used, volumes
            while not done.is_set():
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), delay)
                    if done.is_set():
                        return
                s.used_bytes += MiB * rng.randint(0, 2)
                for v in s.volumes:
                    v[1] += rng.randint(0, 1)
                seq += 1
                chunks = {v: c for v, c in s.volumes}
                device = [{"id": s.device_id, "used_bytes": s.used_bytes}]
                body: dict[str, Any]
                if acked is None:
                    body = {
                        "seq": seq,
                        "full": True,
                        "devices": device,
                        "volumes": [{"id": v, "chunks": c} for v, c in chunks.items()],
                    }
                else:
                    body = {"seq": seq, "base": acked[0]}
                    if s.used_bytes != acked[1]:
                        body["devices"] = device
                    moved = [
                        {"id": v, "chunks": c} for v, c in chunks.items() if acked[2].get(v) != c
                    ]
                    if moved:
                        body["volumes"] = moved
                t0 = time.monotonic()
                try:
                    async with session.post(path, json=body, headers=headers) as r:
                        doc = await r.json(content_type=None)
                        status = r.status
                    if status == 200:
                        acked = None if doc.get("send_full") else (seq, s.used_bytes, chunks)
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    status = 0
                    errors[type(exc).__name__] += 1
                samples.append((t0, time.monotonic() - t0, status))
                due += HEARTBEAT_INTERVAL_S
                late = time.monotonic() - due
                if late > 0:  # a slot that passed while we waited is lost, as in a daemon
                    skipped = int(late // HEARTBEAT_INTERVAL_S) + 1
                    missed += skipped
                    due += skipped * HEARTBEAT_INTERVAL_S

        async def watch_stop() -> None:
            await asyncio.to_thread(stop.wait)
            done.set()

        start = time.monotonic() + 0.2
        conn.send({"ready": start})
        cpu0 = time.process_time()
        tasks = [asyncio.create_task(one_sds(i, s, start)) for i, s in enumerate(sds)]
        await watch_stop()
        await asyncio.gather(*tasks)
        cpu = time.process_time() - cpu0
    return {
        "samples": samples,
        "missed": missed,
        "errors": dict(errors),
        "cpu_s": cpu,
        "wall_s": time.monotonic() - start,
    }


# ---- setup ---------------------------------------------------------------------------


@dataclass
class Cluster:
    pd_id: int = 0
    pool_id: int = 0
    fault_set_ids: list[int] = field(default_factory=list)
    sds: list[SimSds] = field(default_factory=list)
    thin_ids: list[int] = field(default_factory=list)
    thick_ids: list[int] = field(default_factory=list)
    sdc_ids: list[int] = field(default_factory=list)
    mapped_ids: set[int] = field(default_factory=set)


async def bounded(n: int, jobs: Iterable[Callable[[], Any]], concurrency: int) -> None:
    """Run the coroutine factories of ``jobs`` with at most ``concurrency`` at once."""
    it = iter(jobs)

    async def worker() -> None:
        for job in it:
            await job()

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))


async def setup(
    api: Api, mdm: Mdm, args: argparse.Namespace, results: dict[str, Any], rng: random.Random
) -> Cluster:
    adm, cs = mdm.admin_token, mdm.cluster_secret
    c = Cluster()
    metrics = await api.ok("GET", "/health/metrics", adm)
    if metrics.get("sds_total") or metrics.get("volumes"):
        raise BenchError(
            f"the database is not empty ({metrics['sds_total']} SDSs, "
            f"{metrics['volumes']} volumes): give the benchmark an empty one"
        )
    c.pd_id = (await api.ok("POST", "/api/v1/protection-domains", adm, {"name": PD_NAME}))["id"]
    for f in range(args.fault_sets):
        fs = await api.ok(
            "POST",
            "/api/v1/fault-sets",
            adm,
            {"name": fault_set_name(f), "protection_domain_id": c.pd_id},
        )
        c.fault_set_ids.append(fs["id"])
    c.pool_id = (
        await api.ok(
            "POST",
            "/api/v1/pools",
            adm,
            {"name": POOL_NAME, "protection_domain_id": c.pd_id, "pg_count": args.pg_count},
        )
    )["id"]

    # -- SDS registration: every one recomputes the pool's PG map ---------------------
    # A new SDS joins with a join token an admin made (as site.yml's sds role does);
    # with the cluster secret alone it would be held as pending (202).
    join_token = (
        await api.ok(
            "POST",
            "/api/v1/sds/join-tokens",
            adm,
            {"uses": args.sds, "ttl_s": 3600, "description": "bench/mdm_api.py"},
        )
    )["token"]
    log(f"registering {args.sds} SDSs (concurrency {args.register_concurrency}) ...")
    reg_lat: list[float] = [0.0] * args.sds
    sims: list[SimSds | None] = [None] * args.sds
    cpu0 = proc_cpu_seconds(mdm.pid)
    t_start = time.perf_counter()
    progress = {"done": 0, "last": t_start}

    def register_job(i: int) -> Callable[[], Any]:
        async def job() -> None:
            # what an SDS daemon sends from its config: names, not ids
            body: dict[str, Any] = {
                "name": f"sds{i:04d}",
                "protection_domain": PD_NAME,
                "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                "devices": [
                    {
                        "path": "/dev/nvme0n1",
                        "pool": POOL_NAME,
                        "capacity": (2 + 2 * (i % 2)) * TiB,
                    }
                ],
            }
            if args.fault_sets:
                body["fault_set"] = fault_set_name(i % args.fault_sets)
            body["join_token"] = join_token
            status, data, lat = await api.call("POST", "/api/v1/sds/register", cs, body)
            if status not in (200, 201):
                raise BenchError(f"registering sds{i:04d} -> {status}: {data[:500]!r}")
            doc = json.loads(data)
            reg_lat[i] = lat
            sims[i] = SimSds(doc["id"], doc["devices"][0]["id"], 0, [])
            progress["done"] += 1
            now = time.perf_counter()
            if now - progress["last"] >= 10:
                progress["last"] = now
                log(
                    f"  {progress['done']}/{args.sds} SDSs registered, last took "
                    f"{1000 * lat:.0f} ms"
                )

        return job

    await bounded(args.sds, (register_job(i) for i in range(args.sds)), args.register_concurrency)
    reg_wall = time.perf_counter() - t_start
    reg_cpu = proc_cpu_seconds(mdm.pid) - cpu0
    c.sds = [s for s in sims if s is not None]
    tenth = max(1, args.sds // 10)
    results["register_sds"] = {
        "count": args.sds,
        "concurrency": args.register_concurrency,
        "total_s": round(reg_wall, 2),
        "per_s": round(args.sds / reg_wall, 1),
        "latency": latency_stats(reg_lat),
        "first_10pct_mean_ms": round(1000 * sum(reg_lat[:tenth]) / tenth, 1),
        "last_10pct_mean_ms": round(1000 * sum(reg_lat[-tenth:]) / tenth, 1),
        "mdm_cpu_s": round(reg_cpu, 2),
    }
    log(f"registered {args.sds} SDSs in {reg_wall:.1f} s")

    # -- volumes ----------------------------------------------------------------------
    log(f"creating {args.volumes} volumes (concurrency {args.volume_concurrency}) ...")
    vol_lat: list[float] = []
    n_thick = round(args.volumes * args.thick_percent / 100)
    thick_at = set(rng.sample(range(args.volumes), n_thick))
    t_start = time.perf_counter()

    def volume_job(i: int) -> Callable[[], Any]:
        async def job() -> None:
            thick = i in thick_at
            size = f"{rng.choice((8, 16, 32, 64) if thick else (8, 16, 32, 64, 128, 256))}GiB"
            status, data, lat = await api.call(
                "POST",
                "/api/v1/volumes",
                adm,
                {
                    "name": f"vol{i:06d}",
                    "pool_id": c.pool_id,
                    "size": size,
                    "type": "thick" if thick else "thin",
                },
            )
            if status != 201:
                raise BenchError(f"creating vol{i:06d} -> {status}: {data[:500]!r}")
            vol_lat.append(lat)
            (c.thick_ids if thick else c.thin_ids).append(json.loads(data)["id"])

        return job

    await bounded(
        args.volumes, (volume_job(i) for i in range(args.volumes)), args.volume_concurrency
    )
    vol_wall = time.perf_counter() - t_start
    c.thin_ids.sort()
    c.thick_ids.sort()
    results["create_volumes"] = {
        "count": args.volumes,
        "thin": len(c.thin_ids),
        "thick": len(c.thick_ids),
        "concurrency": args.volume_concurrency,
        "total_s": round(vol_wall, 2),
        "per_s": round(args.volumes / vol_wall, 1),
        "latency": latency_stats(vol_lat),
    }
    log(f"created {args.volumes} volumes in {vol_wall:.1f} s")

    # -- SDCs with mapped volumes -----------------------------------------------------
    all_ids = sorted(c.thin_ids + c.thick_ids)
    for k in range(args.sdcs):
        doc = await api.ok(
            "POST",
            "/api/v1/sdc/register",
            cs,
            {"guid": f"bench-sdc-{k:04d}", "name": f"sdc{k:04d}", "address": f"192.0.2.{k + 1}"},
        )
        c.sdc_ids.append(doc["id"])
        for vid in all_ids[k * args.mapped_per_sdc : (k + 1) * args.mapped_per_sdc]:
            await api.ok("POST", "/api/v1/mappings", adm, {"volume_id": vid, "sdc_id": doc["id"]})
            c.mapped_ids.add(vid)

    assign_reported_volumes(c, args.volumes_per_heartbeat, rng)
    return c


def assign_reported_volumes(c: Cluster, per_sds: int, rng: random.Random) -> None:
    """Choose the volumes whose chunk counts each SDS reports in its heartbeats."""
    reported = c.thin_ids or sorted(c.thick_ids)
    for i, s in enumerate(c.sds):
        s.volumes = (
            [
                [reported[(i * per_sds + j) % len(reported)], rng.randint(0, 1000)]
                for j in range(per_sds)
            ]
            if reported
            else []
        )


async def load_cluster(api: Api, mdm: Mdm, args: argparse.Namespace, rng: random.Random) -> Cluster:
    """--reuse: read back the cluster that an earlier run of this benchmark built."""
    adm = mdm.admin_token
    pools = (await api.ok("GET", "/api/v1/pools", adm))["pools"]
    pool = next((p for p in pools if p["name"] == POOL_NAME), None)
    if pool is None:
        raise BenchError(
            f"--reuse: this database has no pool named {POOL_NAME}; run the "
            "benchmark once without --reuse first"
        )
    c = Cluster(pd_id=pool["protection_domain_id"], pool_id=pool["id"])
    for x in (await api.ok("GET", "/api/v1/sds", adm))["sds"]:
        devs = [d for d in x["devices"] if d["pool_id"] == c.pool_id]
        if devs:
            c.sds.append(SimSds(x["id"], devs[0]["id"], devs[0]["used_bytes"], []))
    for v in (await api.ok("GET", f"/api/v1/volumes?pool_id={c.pool_id}", adm))["volumes"]:
        (c.thick_ids if v["type"] == "thick" else c.thin_ids).append(v["id"])
        if v["mapped_sdc_ids"]:
            c.mapped_ids.add(v["id"])
    c.sdc_ids = [x["id"] for x in (await api.ok("GET", "/api/v1/sdc", adm))["sdc"]]
    if len(c.sds) < 2 or not c.sdc_ids or not (c.thin_ids or c.thick_ids):
        raise BenchError(
            "--reuse: the cluster in this database is incomplete (SDSs, SDCs "
            "or volumes missing); run the benchmark without --reuse"
        )
    assign_reported_volumes(c, args.volumes_per_heartbeat, rng)
    log(
        f"reusing {len(c.sds)} SDSs, {len(c.thin_ids) + len(c.thick_ids)} volumes, "
        f"{len(c.sdc_ids)} SDCs"
    )
    return c


async def document_sizes(api: Api, mdm: Mdm, c: Cluster, results: dict[str, Any]) -> None:
    docs: dict[str, Any] = {}
    for name, path in (
        ("pgmap", f"/api/v1/pools/{c.pool_id}/pgmap"),
        ("sdc_maps", f"/api/v1/sdc/{c.sdc_ids[0]}/maps" if c.sdc_ids else ""),
    ):
        if not path:
            continue
        status, data, lat = await api.call("GET", path, mdm.cluster_secret)
        if status != 200:
            raise BenchError(f"GET {path} -> {status}: {data[:300]!r}")
        doc = json.loads(data)
        docs[name] = {
            "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 6)),
            "latency_ms_idle": round(1000 * lat, 1),
        }
        if name == "pgmap":
            docs[name]["pg_count"] = doc["pg_count"]
            docs[name]["sds_in_map"] = len(doc["sds"])
        else:
            docs[name]["volumes"] = len(doc["volumes"])
            docs[name]["pools"] = len(doc["pools"])
    results["documents"] = docs


# ---- the steady-state run ------------------------------------------------------------


@dataclass
class Mix:
    api: Api
    mdm: Mdm
    c: Cluster
    rng: random.Random
    stable_ids: list[int]
    deletable: collections.deque[int]
    lat: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    error_samples: list[str] = field(default_factory=list)
    created: int = 0
    dropped: int = 0
    tag: str = field(default_factory=lambda: secrets.token_hex(3))

    async def one(self, kind: str) -> None:
        m, c, rng = self.mdm, self.c, self.rng
        ro, adm, cs = m.readonly_token, m.admin_token, m.cluster_secret
        ok = (200,)
        vid = None
        if kind == "get_volume":
            req = ("GET", f"/api/v1/volumes/{rng.choice(self.stable_ids)}", ro, None)
        elif kind == "create_volume":
            self.created += 1
            req = (
                "POST",
                "/api/v1/volumes",
                adm,
                {
                    "name": f"mix-{self.tag}-{self.created:07d}",
                    "pool_id": c.pool_id,
                    "size": f"{rng.choice((8, 16, 32))}GiB",
                    "type": "thick" if rng.random() < 0.1 else "thin",
                },
            )
            ok = (201,)
        elif kind == "delete_volume":
            if not self.deletable:
                self.dropped += 1
                return
            vid = self.deletable.popleft()
            req = ("DELETE", f"/api/v1/volumes/{vid}", adm, None)
            ok = (204,)
        elif kind == "get_pool":
            req = ("GET", f"/api/v1/pools/{c.pool_id}", ro, None)
        elif kind == "get_sds":
            req = ("GET", f"/api/v1/sds/{rng.choice(c.sds).id}", ro, None)
        elif kind == "get_pgmap":
            req = ("GET", f"/api/v1/pools/{c.pool_id}/pgmap", cs, None)
        elif kind == "get_sdc_maps":
            req = ("GET", f"/api/v1/sdc/{rng.choice(c.sdc_ids)}/maps", cs, None)
        else:
            raise AssertionError(kind)
        try:
            status, data, lat = await self.api.call(*req)
        except (aiohttp.ClientError, OSError) as exc:
            self.errors[kind] += 1
            self.error_samples.append(f"{kind}: {exc!r}")
            return
        if status not in ok:
            self.errors[kind] += 1
            if len(self.error_samples) < 10:
                self.error_samples.append(f"{kind}: {status} {data[:200]!r}")
            return
        self.lat[kind].append(lat)
        if kind == "create_volume":
            self.deletable.append(json.loads(data)["id"])

    async def run(
        self, rate: float, duration: float, max_inflight: int, mix: dict[str, int]
    ) -> None:
        kinds = [k for k, w in mix.items() if w > 0]
        weights = [mix[k] for k in kinds]
        inflight: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate
        t = time.monotonic()
        end = t + duration
        while t < end:
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= max_inflight:
                self.dropped += 1
            else:
                task = asyncio.create_task(self.one(self.rng.choices(kinds, weights)[0]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            t += interval
        if inflight:
            await asyncio.gather(*inflight)


def hb_window(samples: list[tuple[float, float, int]], t0: float, t1: float) -> dict[str, Any]:
    inside = [(lat, st) for ts, lat, st in samples if t0 <= ts < t1]
    good = [lat for lat, st in inside if st == 200]
    span = max(t1 - t0, 1e-9)
    return {
        "window_s": round(span, 2),
        "sent": len(inside),
        "ok": len(good),
        "errors": len(inside) - len(good),
        "per_s": round(len(good) / span, 1),
        "latency": latency_stats(good),
    }


async def steady_state(
    api: Api,
    mdm: Mdm,
    c: Cluster,
    args: argparse.Namespace,
    results: dict[str, Any],
    rng: random.Random,
) -> None:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=heartbeat_process,
        name="bench-heartbeats",
        daemon=True,
        args=(
            mdm.url,
            mdm.cluster_secret,
            c.sds,
            args.heartbeat_connections,
            args.seed + 1,
            stop,
            child,
        ),
    )
    proc.start()
    child.close()
    try:
        ready = await asyncio.to_thread(parent.recv)
        hb_start = ready["ready"]
        log(f"heartbeats running ({len(c.sds)}/s offered); warming up {args.warmup:g} s")
        await asyncio.sleep(max(0.0, hb_start - time.monotonic()) + args.warmup)

        unmapped_thin = [v for v in c.thin_ids if v not in c.mapped_ids]
        reported = {v for s in c.sds for v, _ in s.volumes}
        spare = [v for v in reversed(unmapped_thin) if v not in reported][: args.volumes // 10]
        stable = sorted(set(c.thin_ids + c.thick_ids) - set(spare))
        mix = Mix(api, mdm, c, rng, stable, collections.deque(spare))
        log(f"API mix at {args.api_rate:g} req/s for {args.duration:g} s")
        cpu0 = proc_cpu_seconds(mdm.pid)
        me0 = time.process_time()
        busy0 = system_busy_seconds()
        t0 = time.monotonic()
        await mix.run(args.api_rate, args.duration, args.max_inflight, args.mix)
        t1 = time.monotonic()
        mdm_cpu = proc_cpu_seconds(mdm.pid) - cpu0
        me_cpu = time.process_time() - me0
        busy = system_busy_seconds() - busy0
        rss_steady = proc_status_kib(mdm.pid, "VmRSS")

        # -- the topology, fetched on its own while the heartbeats go on --------------
        log(f"fetching the topology {args.topology_samples} times")
        topo_lat: list[float] = []
        topo_bytes = topo_gzip = 0
        t2 = time.monotonic()
        for _ in range(args.topology_samples):
            status, data, lat = await api.call("GET", "/api/v1/topology", mdm.readonly_token)
            if status != 200:
                raise BenchError(f"GET /api/v1/topology -> {status}: {data[:300]!r}")
            topo_lat.append(lat)
            topo_bytes = len(data)
        topo_gzip = len(gzip.compress(data, 6))
        t3 = time.monotonic()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
    hb = await asyncio.to_thread(parent.recv)
    await asyncio.to_thread(proc.join, 30)

    all_lat = [x for v in mix.lat.values() for x in v]
    results["steady_state"] = {
        "duration_s": round(t1 - t0, 2),
        "heartbeats_offered_per_s": len(c.sds) / HEARTBEAT_INTERVAL_S,
        "heartbeats": hb_window(hb["samples"], t0, t1),
        "heartbeat_slots_missed_total": hb["missed"],
        "heartbeat_client_errors": hb["errors"],
        "api_rate_offered_per_s": args.api_rate,
        "api_sent": sum(len(v) for v in mix.lat.values()) + sum(mix.errors.values()),
        "api_not_sent": mix.dropped,
        "api": {
            k: latency_stats(mix.lat.get(k, [])) | {"errors": mix.errors.get(k, 0)}
            for k in MIX
            if args.mix[k] > 0
        },
        "api_all": latency_stats(all_lat) | {"errors": sum(mix.errors.values())},
        "api_error_samples": mix.error_samples,
        "cpu": {
            "mdm_s": round(mdm_cpu, 2),
            "mdm_core_pct": round(100 * mdm_cpu / (t1 - t0), 1),
            "api_client_core_pct": round(100 * me_cpu / (t1 - t0), 1),
            "heartbeat_client_core_pct": round(100 * hb["cpu_s"] / hb["wall_s"], 1),
            # everything else on the machine (other benchmarks, test runs...): should be ~0
            "others_core_pct": round(
                100
                * (busy - mdm_cpu - me_cpu - hb["cpu_s"] * (t1 - t0) / hb["wall_s"])
                / (t1 - t0),
                1,
            ),
        },
    }
    results["topology"] = {
        "samples": len(topo_lat),
        "bytes": topo_bytes,
        "gzip_bytes": topo_gzip,
        "latency": latency_stats(topo_lat),
        "heartbeats_meanwhile": hb_window(hb["samples"], t2, t3),
    }
    results["mdm_memory"] = {"rss_steady_kib": rss_steady}


# ---- report --------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def ms(d: dict[str, Any], k: str) -> str:
    return f"{d[k]:.1f}"


def render_setup(r: dict[str, Any], out: list[str]) -> None:
    reg = r["register_sds"]
    lat = reg["latency"]
    out.append(
        f"  register {reg['count']} SDSs (1 device each, pool of "
        f"{r['params']['pg_count']} PGs, concurrency {reg['concurrency']}): "
        f"{reg['total_s']:.1f} s ({reg['per_s']:.1f}/s), MDM CPU {reg['mdm_cpu_s']:.1f} s"
    )
    out.append(
        f"    per registration: p50 {ms(lat, 'p50_ms')} ms, p99 {ms(lat, 'p99_ms')} ms, "
        f"max {ms(lat, 'max_ms')} ms; mean of the first 10% {reg['first_10pct_mean_ms']} "
        f"ms, of the last 10% {reg['last_10pct_mean_ms']} ms"
    )
    vol = r["create_volumes"]
    lat = vol["latency"]
    out.append(
        f"  create {vol['count']} volumes ({vol['thin']} thin, {vol['thick']} thick, "
        f"concurrency {vol['concurrency']}): {vol['total_s']:.1f} s "
        f"({vol['per_s']:.0f}/s), p50 {ms(lat, 'p50_ms')} ms, p99 {ms(lat, 'p99_ms')} ms"
    )


def render(r: dict[str, Any]) -> str:
    out: list[str] = []
    m = r["machine"]
    out.append("meshblock MDM API benchmark")
    out.append(f"  command : {r['command']}")
    out.append(
        f"  machine : {m['nproc']} CPUs, {m['cpu_model']}, {m['mem_gib']} GiB, Python {m['python']}"
    )
    out.append(f"  database: {r['database']}")
    out.append(
        f"  note    : the MDM (1 process), the heartbeat generator (1 process) and the "
        f"API client (this process) share these {m['nproc']} CPUs: the load "
        "generators compete with the MDM for CPU"
    )
    out.append("")
    out.append("setup")
    if "register_sds" not in r:
        out.append("  (reused the cluster of an earlier run: --reuse)")
    else:
        render_setup(r, out)
    ss = r["steady_state"]
    hb = ss["heartbeats"]
    out.append("")
    out.append(
        f"steady state: {ss['duration_s']:.0f} s, {ss['heartbeats_offered_per_s']:.0f} "
        f"heartbeats/s offered + API mix at {ss['api_rate_offered_per_s']:g} req/s"
    )
    out.append(
        f"  heartbeats/s achieved {hb['per_s']:.1f} of {ss['heartbeats_offered_per_s']:.0f}"
        f" offered ({hb['errors']} errors, {ss['heartbeat_slots_missed_total']} slots "
        "missed over the whole run)"
    )
    out.append(
        f"  heartbeat latency p50 {ms(hb['latency'], 'p50_ms')} ms, p99 "
        f"{ms(hb['latency'], 'p99_ms')} ms, max {ms(hb['latency'], 'max_ms')} ms"
    )
    out.append("")
    out.append(f"  {'request':<16}{'n':>7}{'err':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for kind, st in [*ss["api"].items(), ("all API", ss["api_all"])]:
        out.append(
            f"  {kind:<16}{st['n']:>7}{st['errors']:>5}{st['p50_ms']:>9.1f}"
            f"{st['p99_ms']:>9.1f}{st['max_ms']:>9.1f}"
        )
    if ss["api_not_sent"]:
        out.append(
            f"  ({ss['api_not_sent']} requests not sent: in-flight cap reached or "
            "nothing left to delete)"
        )
    for e in ss["api_error_samples"][:5]:
        out.append(f"  error: {e}")
    cpu = ss["cpu"]
    out.append(
        f"  CPU used (share of one core): MDM {cpu['mdm_core_pct']:.0f}%, heartbeat "
        f"generator {cpu['heartbeat_client_core_pct']:.0f}%, API client "
        f"{cpu['api_client_core_pct']:.0f}%"
        + (
            f", everything else on the machine {cpu['others_core_pct']:.0f}% (a database "
            "server on this machine counts here)"
            if "others_core_pct" in cpu
            else ""
        )
    )
    out.append("")
    out.append("documents")
    docs = r["documents"]
    pg = docs["pgmap"]
    out.append(
        f"  PG map ({pg['pg_count']} PGs, {pg['sds_in_map']} SDSs): {pg['bytes']:,} "
        f"bytes, gzip {pg['gzip_bytes']:,} bytes"
    )
    if "sdc_maps" in docs:
        sm = docs["sdc_maps"]
        out.append(
            f"  SDC maps ({sm['volumes']} volumes, {sm['pools']} pool): "
            f"{sm['bytes']:,} bytes, gzip {sm['gzip_bytes']:,} bytes"
        )
    tp = r["topology"]
    out.append(
        f"  topology ({r['params']['sds']} SDSs, ~{r['params']['volumes']} volumes): "
        f"{tp['bytes']:,} bytes, gzip {tp['gzip_bytes']:,} bytes; "
        f"latency p50 {ms(tp['latency'], 'p50_ms')} ms, max "
        f"{ms(tp['latency'], 'max_ms')} ms ({tp['samples']} fetches, one at a time)"
    )
    hm = tp["heartbeats_meanwhile"]
    out.append(
        f"    heartbeats while the topology is served: p99 "
        f"{ms(hm['latency'], 'p99_ms')} ms, max {ms(hm['latency'], 'max_ms')} ms, "
        f"{hm['per_s']:.0f}/s"
    )
    mem = r["mdm_memory"]
    out.append("")
    out.append(
        f"MDM RSS: {mem['rss_after_setup_kib'] / 1024:.0f} MiB after setup, "
        f"{mem['rss_steady_kib'] / 1024:.0f} MiB after the steady state, peak "
        f"{mem['rss_peak_kib'] / 1024:.0f} MiB"
    )
    if r["mdm_log_problems"]:
        out.append(
            f"MDM log: {len(r['mdm_log_problems'])} ERROR/Traceback lines, e.g. "
            f"{r['mdm_log_problems'][0][:160]}"
        )
    v = r["verdict"]
    out.append("")
    out.append(
        f"target: p99 API latency < {TARGET_P99_MS:.0f} ms -> "
        f"{'MET' if v['met'] else 'NOT MET'} (all API p99 {v['p99_all_ms']:.1f} ms; "
        f"worst kind {v['worst_kind']} p99 {v['worst_p99_ms']:.1f} ms)"
    )
    return "\n".join(out)


# ---- main ----------------------------------------------------------------------------


def database_url(arg: str, workdir: Path) -> tuple[str, str]:
    """The MDM's database URL and a description without a password."""
    if arg == "sqlite":
        url = f"sqlite+aiosqlite:///{workdir / 'mdm.db'}"
        return url, "SQLite (file in the work directory, WAL)"
    if arg.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
        from sqlalchemy.engine import make_url

        shown = make_url(arg).render_as_string(hide_password=True)
        return arg, ("PostgreSQL " if arg.startswith("postgresql") else "SQLite ") + shown
    raise BenchError(
        "--db: 'sqlite', or an SQLAlchemy async URL (postgresql+asyncpg://user:password@host/db)"
    )


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    db_url, db_desc = database_url(args.db, workdir)
    rng = random.Random(args.seed)
    results: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "database": db_desc,
        "params": {k: v for k, v in vars(args).items() if k not in ("json", "db")},
    }
    mdm = Mdm(workdir, db_url, args.log_level)
    mdm.start()
    log(f"MDM pid {mdm.pid} on {mdm.url}, {db_desc}; work directory {workdir}")
    try:
        connector = aiohttp.TCPConnector(limit=args.max_inflight + 8)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await mdm.wait_ready(session)
            api = Api(session, mdm.url)
            if args.reuse:
                c = await load_cluster(api, mdm, args, rng)
            else:
                c = await setup(api, mdm, args, results, rng)
            results["params"]["sds"] = len(c.sds)
            results["params"]["volumes"] = len(c.thin_ids) + len(c.thick_ids)
            await document_sizes(api, mdm, c, results)
            results["params"]["pg_count"] = results["documents"]["pgmap"]["pg_count"]
            results["mdm_memory_setup"] = proc_status_kib(mdm.pid, "VmRSS")
            await steady_state(api, mdm, c, args, results, rng)
        results["mdm_memory"]["rss_after_setup_kib"] = results.pop("mdm_memory_setup")
        results["mdm_memory"]["rss_peak_kib"] = proc_status_kib(mdm.pid, "VmHWM")
    finally:
        rc = mdm.stop()
        if rc not in (0, None, -signal.SIGTERM):
            log(f"the MDM exited with code {rc}; log tail:\n{mdm.log_tail()}")
    results["mdm_log_problems"] = mdm.log_problems()[:20]
    ss = results["steady_state"]
    worst = max(ss["api"].items(), key=lambda kv: kv[1]["p99_ms"])
    results["verdict"] = {
        "target_p99_ms": TARGET_P99_MS,
        "p99_all_ms": ss["api_all"]["p99_ms"],
        "worst_kind": worst[0],
        "worst_p99_ms": worst[1]["p99_ms"],
        "met": worst[1]["p99_ms"] < TARGET_P99_MS and ss["api_all"]["errors"] == 0,
    }
    return results


def parse_mix(text: str) -> dict[str, int]:
    mix = dict.fromkeys(MIX, 0)
    for item in text.split(","):
        kind, sep, weight = item.partition("=")
        if not sep or kind.strip() not in MIX or not weight.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected kind=weight with kind one of {', '.join(MIX)}"
            )
        mix[kind.strip()] = int(weight)
    if not any(mix.values()):
        raise argparse.ArgumentTypeError("at least one kind needs a positive weight")
    return mix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the MDM REST API: a real MDM process, simulated SDS "
        "heartbeats and an API request mix. See bench/README.md."
    )
    p.add_argument("--sds", type=int, default=1000, help="simulated SDSs (default 1000)")
    p.add_argument("--volumes", type=int, default=10000, help="volumes (default 10000)")
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds of steady state: heartbeats + API mix (default 30)",
    )
    p.add_argument(
        "--db",
        default="sqlite",
        help="'sqlite' (default: a new file in the work directory) or an "
        "SQLAlchemy async URL such as postgresql+asyncpg://user:pw@host/db of an "
        "EMPTY database",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--pg-count", type=int, default=4096, help="PGs of the pool (default 4096)")
    p.add_argument(
        "--fault-sets",
        type=int,
        default=10,
        help="fault sets the SDSs are spread over (default 10; 0: none)",
    )
    p.add_argument(
        "--thick-percent", type=float, default=10.0, help="share of thick volumes (default 10)"
    )
    p.add_argument("--sdcs", type=int, default=4, help="SDCs registered (default 4)")
    p.add_argument(
        "--mapped-per-sdc", type=int, default=16, help="volumes mapped to each SDC (default 16)"
    )
    p.add_argument(
        "--volumes-per-heartbeat",
        type=int,
        default=4,
        help="volume chunk counts in each SDS heartbeat (default 4)",
    )
    p.add_argument(
        "--api-rate",
        type=float,
        default=50.0,
        help="API mix requests per second, open loop (default 50)",
    )
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=dict(MIX),
        help="the API mix as kind=weight,... (kinds left out get no requests); default "
        + ",".join(f"{k}={w}" for k, w in MIX.items()),
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=64,
        help="API mix requests in flight at most (default 64)",
    )
    p.add_argument(
        "--heartbeat-connections",
        type=int,
        default=100,
        help="connection pool size of the heartbeat generator (default 100)",
    )
    p.add_argument(
        "--register-concurrency",
        type=int,
        default=1,
        help="SDS registrations in flight (default 1: one after the other)",
    )
    p.add_argument(
        "--volume-concurrency",
        type=int,
        default=8,
        help="volume creations in flight during setup (default 8)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="seconds of heartbeats before the API mix starts (default 3)",
    )
    p.add_argument(
        "--topology-samples",
        type=int,
        default=3,
        help="GET /api/v1/topology fetches after the mix (default 3)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="skip the setup: run the steady state on the cluster that an earlier run "
        "left in --workdir (SQLite) or in the --db database",
    )
    p.add_argument("--log-level", default="INFO", help="the MDM's log level (default INFO)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep the MDM's config, log and SQLite database here "
        "(default: a temporary directory, removed afterwards)",
    )
    args = p.parse_args(argv)
    if args.reuse and args.workdir is None and args.db == "sqlite":
        p.error("--reuse needs --workdir (the directory of an earlier run) or --db")
    for name in (
        "sds",
        "volumes",
        "sdcs",
        "max_inflight",
        "register_concurrency",
        "volume_concurrency",
        "heartbeat_connections",
        "topology_samples",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sds < 2:
        p.error("--sds must be at least 2 (a PG needs two SDSs)")
    if args.duration <= 0 or args.api_rate <= 0:
        p.error("--duration and --api-rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep = args.workdir is not None
    if keep:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = args.workdir.resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="meshblock-bench-mdm-"))
    try:
        results = asyncio.run(run(args, workdir))
    except BenchError as exc:
        print(f"mdm_api: {exc}", file=sys.stderr)
        keep = True
        return 1
    finally:
        if keep:
            log(f"MDM config, log and database kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["params"]["workdir"] = str(args.workdir) if args.workdir else None
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
