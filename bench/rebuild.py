#!/usr/bin/env python3
"""Benchmark of rebuild: how fast a lost SDS's data is copied again, and what a
rebuild costs the clients.

Brings up a cluster on loopback (an MDM on SQLite, four SDSs in four fault sets with
sparse file devices, one SDC, one thin volume with two copies mapped to it; the MDM
with ``rebuild_delay_s = 0``), fills the volume through NBD (fio, 1 MiB sequential
writes), then:

1. **unthrottled rebuild**: the pool's ``rebuild_bandwidth_mibps`` set to 0 and
   ``rebuild_concurrency`` to ``--concurrency``; one SDS is SIGKILLed and the time
   until every PG of the pool is clean again is measured, from the kill and from the
   first PG in ``rebuilding``. The bytes rebuilt are the surviving SDSs'
   ``resync.bytes_total`` deltas (their health documents); the rate per surviving SDS
   (total / 3) is compared with the target of 100 MiB/s per surviving SDS, and the
   total with a peer measured in the same run: the same bytes written once to a file
   on the devices' filesystem (fio, 1 MiB sequential writes, fsync at the end).
2. **client IOPS during a rebuild**: the pool's throttles set back to their defaults;
   the same fio job (4k randrw 50/50, ``--iodepth``, ``--runtime`` s, fio's nbd
   engine) on the clean cluster (three SDSs), then during the rebuild that follows the
   SIGKILL of a second SDS (started when the first PG enters ``rebuilding``), then on
   the clean cluster again (two SDSs). The ratio during / before is reported, with the
   share of the fio run the rebuild actually overlapped.

    .venv/bin/python bench/rebuild.py              # 1 GiB volume
    .venv/bin/python bench/rebuild.py --quick      # 256 MiB, shorter fio runs
    .venv/bin/python bench/rebuild.py --profile /tmp/rbprof   # py-spy during phase 1

Every process (fio, the MDM, the SDSs, the SDC) runs on this machine and they share
its CPUs, which the report says. Linux only (reads /proc for CPU times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_fio import (
    START_TIMEOUT_S,
    BenchError,
    Daemon,
    GiB,
    MiB,
    Profiler,
    cpu_seconds,
    log,
    parse_size,
    run_fio,
)
from nbd_fio import (
    Cluster as BaseCluster,
)

POOL = "rb-pool"
PD = "rb-pd"
VOLUME = "rbvol"
SDS_COUNT = 4
TARGET_MIBPS_PER_SDS = 100.0
REBUILD_TIMEOUT_S = 1800.0
# The MDM's default. Shorter timeouts make a CPU-starved machine (every daemon on 2
# cores, plus whatever else runs) declare live SDSs down in the middle of a rebuild.
HEARTBEAT_TIMEOUT_S = 10.0
LOG_LEVEL = ["WARNING"]  # the daemons' (--log-level)


class Cluster(BaseCluster):
    """MDM (rebuild at once) + SDS_COUNT SDSs (one fault set each) + SDC, one thin
    volume mapped, with what the rebuild measurements need on top."""

    def __init__(self, workdir: Path, size: int, pg_count: int) -> None:
        super().__init__(
            workdir,
            size,
            pg_count,
            sds_count=SDS_COUNT,
            # Sparse files: room for the whole volume on each of the last two SDSs.
            capacity=2 * size + 2 * GiB,
            cluster={"name": "rb-bench", "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                     "rebuild_delay_s": 0.0},
            names=(POOL, PD, VOLUME),
            log_level=LOG_LEVEL[0],
        )  # fmt: skip
        self.pool_defaults: dict[str, int] = {}

    def start(self) -> None:
        super().start()
        self.pool_defaults = {
            k: int(self.pool[k]) for k in ("rebuild_bandwidth_mibps", "rebuild_concurrency")
        }
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all_clean(doc := self.pgmap()) or not doc["pgs"]:
            if time.monotonic() > deadline:
                raise BenchError("the pool's PGs did not all become clean")
            time.sleep(0.2)

    def alive(self) -> list[Daemon]:
        return [d for d in self.sds if d.proc is not None and d.proc.poll() is None]

    def set_throttles(self, bandwidth: int, concurrency: int) -> None:
        """PATCH the pool's rebuild throttles; wait until every live SDS has the map."""
        doc = self.api(
            "PATCH",
            f"/api/v1/pools/{self.pool_id}",
            {"rebuild_bandwidth_mibps": bandwidth, "rebuild_concurrency": concurrency},
        )
        epoch = int(doc["map_epoch"])
        deadline = time.monotonic() + 30
        while True:
            hs = [d.health() or {} for d in self.alive()]
            if all(int(h.get("maps", {}).get(str(self.pool_id), 0)) >= epoch for h in hs):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the SDSs did not reach map epoch {epoch}")
            time.sleep(0.1)

    def resync_bytes(self) -> dict[str, int]:
        out = {}
        for i, d in enumerate(self.sds):
            h = d.health() if d in self.alive() else None
            if h is not None:
                out[f"sds{i}"] = int(h["resync"]["bytes_total"])
        return out

    def resync_done(self) -> dict[str, dict[str, Any]]:
        """Per surviving SDS, its last completed resync of each PG (health ``done``)."""
        out = {}
        for i, d in enumerate(self.sds):
            h = d.health() if d in self.alive() else None
            if h is not None:
                out[f"sds{i}"] = dict(h["resync"]["done"])
        return out

    def mdm_copied(self) -> int:
        doc = self.api("GET", "/api/v1/rebuild")
        pool = next(p for p in doc["pools"] if p["pool_id"] == self.pool_id)
        return int(pool["rebuild"]["copied_bytes"])

    def sds_id(self, d: Daemon) -> int:
        h = d.health()
        if h is None or h.get("sds_id") is None:
            raise BenchError("an SDS has no id")
        return int(h["sds_id"])

    def kill(self, d: Daemon) -> None:
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()


def settle(c: Cluster) -> None:
    """Wait for rebalance moves to end, then write the page cache's dirty data back
    (the fill's or the last rebuild's), so that it does not compete with what follows."""
    deadline = time.monotonic() + REBUILD_TIMEOUT_S
    while not all_clean(c.pgmap()):
        if time.monotonic() > deadline:
            raise BenchError("rebalance moves did not end")
        time.sleep(0.2)
    t0 = time.monotonic()
    os.sync()
    log(f"clean, no moves; sync took {time.monotonic() - t0:.1f} s")


def all_clean(doc: dict[str, Any]) -> bool:
    return all(pg["state"] == "clean" and "target" not in pg for pg in doc["pgs"])


def holds(pg: dict[str, Any], sid: int) -> bool:
    return sid in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])


class RebuildWatch:
    """Polls the PG map after a kill: first ``rebuilding`` PG, then all clean."""

    def __init__(self, cluster: Cluster, dead: int, t_kill: float) -> None:
        self.c = cluster
        self.dead = dead
        self.t_kill = t_kill
        self.t_first: float | None = None
        self.t_clean: float | None = None
        self.max_rebuilding = 0
        self.states: Counter[str] = Counter()
        self.timeline: list[tuple[float, int]] = []  # (s since the kill, PGs rebuilding)
        self.other_states: Counter[str] = Counter()  # after the first rebuilding: most seen

    def poll(self) -> bool:
        """One look; True once every PG is clean and off the dead SDS."""
        doc = self.c.pgmap()
        now = time.monotonic()
        self.states = Counter(pg["state"] for pg in doc["pgs"])
        n = self.states.get("rebuilding", 0)
        self.max_rebuilding = max(self.max_rebuilding, n)
        self.timeline.append((now - self.t_kill, n))
        if self.t_first is not None:
            for st, k in self.states.items():
                if st not in ("clean", "rebuilding"):
                    self.other_states[st] = max(self.other_states[st], k)
        if n and self.t_first is None:
            self.t_first = now
        # clean and off the dead SDS; a rebalance move (``target``) may follow: not waited for
        if self.t_first is not None and all(pg["state"] == "clean" for pg in doc["pgs"]):
            if not any(holds(pg, self.dead) for pg in doc["pgs"]):
                self.t_clean = now
                return True
        if now - self.t_kill > REBUILD_TIMEOUT_S:
            raise BenchError(f"rebuild not done after {REBUILD_TIMEOUT_S:g} s: {dict(self.states)}")
        return False

    def pgs_left(self, every: float = 1.0) -> list[tuple[float, int]]:
        """The timeline thinned to one sample per ``every`` seconds."""
        out: list[tuple[float, int]] = []
        for t, n in self.timeline:
            if not out or t - out[-1][0] >= every or (n == 0 and out[-1][1]):
                out.append((round(t, 1), n))
        return out

    def wait_first(self) -> float:
        while self.t_first is None:
            if self.poll():
                break
            time.sleep(0.05)
        assert self.t_first is not None
        return self.t_first

    def wait_clean(self) -> float:
        while not self.poll():
            time.sleep(0.1)
        assert self.t_clean is not None
        return self.t_clean


# -- fio ------------------------------------------------------------------------------------


def mixed_fio(uri: str, size: int, iodepth: int, runtime: int) -> list[str]:
    return [
        "fio",
        "--name=randrw",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randrw",
        "--rwmixread=50",
        "--bs=4k",
        f"--iodepth={iodepth}",
        f"--size={size}",
        "--invalidate=0",
        "--lat_percentiles=1",
        "--output-format=json",
        f"--runtime={runtime}",
        "--time_based",
        "--ramp_time=1",
    ]


def mixed_figures(doc: dict[str, Any]) -> dict[str, float]:
    job = doc["jobs"][0]
    r, w = job["read"], job["write"]
    return {
        "iops": float(r["iops"]) + float(w["iops"]),
        "read_iops": float(r["iops"]),
        "write_iops": float(w["iops"]),
        "read_lat_mean_us": r["lat_ns"]["mean"] / 1000,
        "write_lat_mean_us": w["lat_ns"]["mean"] / 1000,
        "read_lat_p99_us": float(r["lat_ns"].get("percentile", {}).get("99.000000", 0)) / 1000,
        "write_lat_p99_us": float(w["lat_ns"].get("percentile", {}).get("99.000000", 0)) / 1000,
        "errors": float(job.get("error", 0)),
        "fio_cpu_pct": float(job["usr_cpu"]) + float(job["sys_cpu"]),
    }


def cpu_snapshot(c: Cluster) -> dict[str, float]:
    out = {}
    for d in c.daemons:
        if d.proc is not None and d.proc.poll() is None:
            name = d.workdir.name
            out[name] = cpu_seconds(d.pid)
    return out


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {k: round(100 * (after[k] - before[k]) / wall, 1) for k in before if k in after}


# -- the run --------------------------------------------------------------------------------


def phase1(c: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    c.set_throttles(0, args.concurrency)
    victim = c.sds[-1]
    dead = c.sds_id(victim)
    doc = c.pgmap()
    pgs_hit = sum(1 for pg in doc["pgs"] if holds(pg, dead))
    names = {c.sds_id(d): f"sds{i}" for i, d in enumerate(c.sds) if d in c.alive()}
    # the surviving copy of each of the victim's PGs: the SDS that copies it
    partners = Counter(
        names.get(pg["secondary" if pg["primary"]["sds_id"] == dead else "primary"]["sds_id"], "?")
        for pg in doc["pgs"]
        if holds(pg, dead)
    )
    used = sum(int(dev["used_bytes"]) for dev in (victim.health() or {}).get("devices", []))
    r0 = c.resync_bytes()
    d0 = c.resync_done()
    m0 = c.mdm_copied()
    settle(c)
    cpu0 = cpu_snapshot(c)
    cpu0.pop(victim.workdir.name, None)
    busy0 = busy_seconds()
    log(f"phase 1: SIGKILL {victim.workdir.name} (holds {used / MiB:.0f} MiB in {pgs_hit} PGs)")
    t_kill = time.monotonic()
    c.kill(victim)
    w = RebuildWatch(c, dead, t_kill)
    t_first = w.wait_first()
    log(f"first PG rebuilding {t_first - t_kill:.1f} s after the kill")
    prof = None
    if args.profile:
        pids = {f"sds{i}": d.pid for i, d in enumerate(c.sds) if d in c.alive()}
        pids["mdm"] = c.daemons[0].pid
        prof = Profiler(Path(args.profile), pids, args.profile_seconds)
        prof.start("rebuild")
    t_clean = w.wait_clean()
    cpu1 = cpu_snapshot(c)
    busy1 = busy_seconds()
    ours = sum(cpu1[k] - cpu0[k] for k in cpu0 if k in cpu1)
    profile = prof.finish() if prof is not None else None
    time.sleep(2 * 1.0 + 0.5)  # heartbeats carry the SDSs' counters to the MDM
    r1 = c.resync_bytes()
    d1 = c.resync_done()
    m1 = c.mdm_copied()
    jobs = [
        v
        for k, done in d1.items()
        for pg, v in done.items()
        if v.get("kind") == "rebuild" and d0.get(k, {}).get(pg) != v
    ]
    secs = sorted(float(v["seconds"]) for v in jobs)
    per_sds = {k: r1[k] - r0.get(k, 0) for k in r1}
    total = sum(per_sds.values())
    survivors = len(c.alive())
    from_kill = t_clean - t_kill
    from_first = t_clean - t_first
    res = {
        "victim": victim.workdir.name,
        "victim_used_bytes": used,
        "pgs_hit": pgs_hit,
        "surviving_copy_on": dict(sorted(partners.items())),
        "pg_count": len(doc["pgs"]),
        "concurrency": args.concurrency,
        "detect_s": round(t_first - t_kill, 2),
        "from_kill_s": round(from_kill, 2),
        "from_first_rebuilding_s": round(from_first, 2),
        "bytes_rebuilt": total,
        "bytes_per_sds": per_sds,
        "mdm_copied_bytes": m1 - m0,
        "survivors": survivors,
        "mibps_total_from_kill": round(total / MiB / from_kill, 1),
        "mibps_total_from_first": round(total / MiB / from_first, 1),
        "mibps_per_survivor_from_kill": round(total / MiB / from_kill / survivors, 1),
        "mibps_per_survivor_from_first": round(total / MiB / from_first / survivors, 1),
        "target_mibps_per_survivor": TARGET_MIBPS_PER_SDS,
        "cpu_pct": cpu_share(cpu0, cpu1, t_clean - t_kill),
        # other processes on the machine (not this cluster): near 0 or the figures are disturbed
        "other_cpu_pct": round(100 * (busy1 - busy0 - ours) / (t_clean - t_kill), 1),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "pg_states_seen_while_rebuilding": dict(w.other_states),
        "pg_jobs": len(jobs),
        "pg_job_seconds": {
            "min": secs[0] if secs else None,
            "median": secs[len(secs) // 2] if secs else None,
            "max": secs[-1] if secs else None,
            "sum": round(sum(secs), 1),
        },
        "pg_job_chunks_median": sorted(int(v["chunks"]) for v in jobs)[len(jobs) // 2]
        if jobs
        else None,
        "pgs_rebuilding_timeline": w.pgs_left(),
    }
    res["target_met"] = res["mibps_per_survivor_from_first"] >= TARGET_MIBPS_PER_SDS
    if profile is not None:
        res["profile"] = profile
    log(
        f"phase 1: {total / MiB:.0f} MiB rebuilt in {from_kill:.1f} s from the kill "
        f"({from_first:.1f} s from the first rebuilding PG): "
        f"{res['mibps_per_survivor_from_first']} MiB/s per surviving SDS"
    )
    return res


def other_cpu(
    cpu0: dict[str, float], cpu1: dict[str, float], busy: float, fio_pct: float, wall: float
) -> float:
    ours = sum(cpu1[k] - cpu0[k] for k in cpu0 if k in cpu1) + fio_pct / 100 * wall
    return round(100 * (busy - ours) / wall, 1)


def run_mixed(c: Cluster, args: argparse.Namespace, label: str) -> dict[str, Any]:
    cpu0 = cpu_snapshot(c)
    busy0 = busy_seconds()
    t0 = time.monotonic()
    doc = run_fio(mixed_fio(c.uri, c.size, args.iodepth, args.runtime))
    wall = time.monotonic() - t0
    fig: dict[str, Any] = mixed_figures(doc)
    cpu1 = cpu_snapshot(c)
    fig["cpu_pct"] = cpu_share(cpu0, cpu1, wall)
    fig["other_cpu_pct"] = other_cpu(cpu0, cpu1, busy_seconds() - busy0, fig["fio_cpu_pct"], wall)
    r, w = fig["read_iops"], fig["write_iops"]
    log(f"fio {label}: {fig['iops']:.0f} IOPS ({r:.0f} read, {w:.0f} write)")
    return fig


def phase2(c: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    bw, conc = c.pool_defaults["rebuild_bandwidth_mibps"], c.pool_defaults["rebuild_concurrency"]
    c.set_throttles(bw, conc)
    settle(c)
    before = run_mixed(c, args, f"before, {len(c.alive())} SDSs clean")
    victim = c.alive()[-1]
    dead = c.sds_id(victim)
    r0 = c.resync_bytes()
    log(f"phase 2: SIGKILL {victim.workdir.name}, default throttles ({bw} MiB/s, {conc})")
    t_kill = time.monotonic()
    c.kill(victim)
    w = RebuildWatch(c, dead, t_kill)
    t_first = w.wait_first()
    cpu0 = cpu_snapshot(c)
    busy0 = busy_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        mixed_fio(c.uri, c.size, args.iodepth, args.runtime),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t_clean = None
    while proc.poll() is None:
        if t_clean is None and w.poll():
            t_clean = w.t_clean
        time.sleep(0.1)
    t1 = time.monotonic()
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"fio during the rebuild failed ({proc.returncode}): {err}")
    during: dict[str, Any] = mixed_figures(json.loads(out[out.index("{") :]))
    cpu1 = cpu_snapshot(c)
    during["cpu_pct"] = cpu_share(cpu0, cpu1, t1 - t0)
    during["other_cpu_pct"] = other_cpu(
        cpu0, cpu1, busy_seconds() - busy0, during["fio_cpu_pct"], t1 - t0
    )
    if t_clean is None:
        t_clean = w.wait_clean()
    # fio measures after its 1 s ramp
    measured0 = t0 + 1.0
    overlap = max(0.0, min(t_clean, t1) - measured0) / max(t1 - measured0, 1e-9)
    log(f"fio during the rebuild: {during['iops']:.0f} IOPS; rebuild overlapped {overlap:.0%}")
    r1 = c.resync_bytes()
    rebuilt = sum(r1[k] - r0.get(k, 0) for k in r1)
    settle(c)
    after = run_mixed(c, args, f"after, {len(c.alive())} SDSs clean")
    return {
        "throttles": {"rebuild_bandwidth_mibps": bw, "rebuild_concurrency": conc},
        "fio": " ".join(mixed_fio("<uri>", c.size, args.iodepth, args.runtime)[1:]),
        "before": before,
        "during": during,
        "after": after,
        "victim": victim.workdir.name,
        "detect_s": round(t_first - t_kill, 2),
        "rebuild_s_from_first": round(t_clean - t_first, 2),
        "bytes_rebuilt": rebuilt,
        "rebuild_mibps_from_first": round(rebuilt / MiB / max(t_clean - t_first, 1e-9), 1),
        "overlap": round(overlap, 3),
        "ratio_during_before": ratio(during["iops"], before["iops"]),
        "ratio_during_after": ratio(during["iops"], after["iops"]),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True, check=False)
    import platform

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": fio.stdout.strip(),
    }


def disk_peer(workdir: Path, size: int) -> dict[str, Any]:
    """The peer of the rebuild: the same bytes written once, sequentially in 1 MiB
    writes, to a file on the filesystem that holds the SDSs' devices, then fsync'd:
    what the disk gives a single writer. Timed from fio's start to its end (fsync
    included). The rebuild writes each byte once too (on the new copy) and fsyncs per
    PG, from several SDSs at once."""
    path = workdir / "disk-peer.img"
    size = max(size, 64 * MiB)
    try:
        t0 = time.monotonic()
        run_fio(
            [
                "fio",
                "--name=disk-peer",
                f"--filename={path}",
                "--rw=write",
                "--bs=1M",
                "--ioengine=psync",
                f"--size={size}",
                "--end_fsync=1",
                "--output-format=json",
            ]
        )
        seconds = time.monotonic() - t0
    finally:
        path.unlink(missing_ok=True)
    return {"bytes": size, "seconds": round(seconds, 2), "mibps": round(size / MiB / seconds, 1)}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    c = Cluster(workdir / "cluster", args.size, args.pg_count)
    try:
        log(f"starting the cluster (MDM, {SDS_COUNT} SDSs in {SDS_COUNT} fault sets, SDC) ...")
        c.start()
        log(f"cluster up: {c.uri}; filling {args.size // MiB} MiB (fio, 1M writes QD8)")
        t0 = time.monotonic()
        run_fio(
            [
                "fio",
                "--name=fill",
                "--ioengine=nbd",
                f"--uri={c.uri}",
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
                f"--size={args.size}",
                "--output-format=json",
            ]
        )
        fill_s = time.monotonic() - t0
        log(f"filled in {fill_s:.1f} s")
        p1 = phase1(c, args)
        p1["disk_peer"] = disk_peer(workdir, p1["bytes_rebuilt"])
        p1["ratio_to_disk"] = round(p1["mibps_total_from_first"] / p1["disk_peer"]["mibps"], 2)
        log(
            f"peer: the disk writes {p1['disk_peer']['mibps']} MiB/s with fsync; the rebuild "
            f"ran at {p1['ratio_to_disk']}x of that"
        )
        p2 = None if args.skip_client else phase2(c, args)
    finally:
        c.stop()
    return {
        "machine": machine(),
        "options": {
            "size_bytes": args.size,
            "pg_count": args.pg_count,
            "quick": args.quick,
            "concurrency": args.concurrency,
            "iodepth": args.iodepth,
            "runtime_s": args.runtime,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        },
        "fill_s": round(fill_s, 1),
        "fill_mibps": round(args.size / MiB / fill_s, 1),
        "rebuild": p1,
        "client": p2,
    }


def render(r: dict[str, Any]) -> str:
    m, o, p1, p2 = r["machine"], r["options"], r["rebuild"], r["client"]
    out = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, {m['fio']}; every process on this machine",
        f"volume: {o['size_bytes'] // MiB} MiB thin, two copies, {o['pg_count']} PGs, "
        f"{SDS_COUNT} SDSs in {SDS_COUNT} fault sets; filled in {r['fill_s']} s "
        f"({r['fill_mibps']} MiB/s)",
        "",
        f"1. unthrottled rebuild (bandwidth 0, concurrency {p1['concurrency']}), "
        f"SIGKILL {p1['victim']} ({p1['victim_used_bytes'] / MiB:.0f} MiB used, "
        f"{p1['pgs_hit']}/{p1['pg_count']} PGs)",
        "surviving copies of its PGs (the SDSs that copy them): "
        + ", ".join(f"{k} {v}" for k, v in p1["surviving_copy_on"].items()),
        "",
        "| measure | value |",
        "|---|---:|",
        f"| kill -> first PG rebuilding | {p1['detect_s']} s |",
        f"| kill -> all clean | {p1['from_kill_s']} s |",
        f"| first rebuilding -> all clean | {p1['from_first_rebuilding_s']} s |",
        f"| bytes rebuilt (SDS resync counters) | {p1['bytes_rebuilt'] / MiB:.1f} MiB |",
        f"| bytes rebuilt (MDM /api/v1/rebuild) | {p1['mdm_copied_bytes'] / MiB:.1f} MiB |",
        f"| total rate, from first rebuilding | {p1['mibps_total_from_first']} MiB/s |",
        f"| per surviving SDS (/{p1['survivors']}), from first rebuilding "
        f"| {p1['mibps_per_survivor_from_first']} MiB/s |",
        f"| per surviving SDS, from the kill | {p1['mibps_per_survivor_from_kill']} MiB/s |",
        f"| target per surviving SDS | {p1['target_mibps_per_survivor']:.0f} MiB/s: "
        f"{'met' if p1['target_met'] else 'MISSED'} |",
        f"| peer: the same bytes written once with fsync, one writer (fio) "
        f"| {p1['disk_peer']['mibps']} MiB/s |",
        f"| rebuild total rate / peer | {p1['ratio_to_disk']}x |",
        "",
        "bytes per surviving SDS: "
        + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in sorted(p1["bytes_per_sds"].items())),
        "CPU of one core during the rebuild: "
        + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(p1["cpu_pct"].items()))
        + f"; other processes on the machine {p1['other_cpu_pct']:.0f}% "
        f"(load average {' '.join(p1['loadavg'])})",
    ]
    if p1["pg_states_seen_while_rebuilding"]:
        out.append(
            "WARNING: PGs left rebuilding for other states meanwhile (SDSs seen down?): "
            + str(p1["pg_states_seen_while_rebuilding"])
            + "; the figures are disturbed"
        )
    js = p1["pg_job_seconds"]
    out.append(
        f"PG rebuild jobs: {p1['pg_jobs']}, median {p1['pg_job_chunks_median']} chunks; "
        f"seconds per job min {js['min']} / median {js['median']} / max {js['max']}"
    )
    out.append(
        "PGs rebuilding (s after the kill: count): "
        + ", ".join(f"{t}: {n}" for t, n in p1["pgs_rebuilding_timeline"])
    )
    for proc, p in (p1.get("profile") or {}).items():
        if p["samples"]:
            top = "; ".join(f"{t['function']} {t['share_pct']}%" for t in p["top"][:6])
            out.append(f"  py-spy {proc} ({p['busy_pct']:.0f}% busy): {top}")
    if p2 is not None:
        b, d, a = p2["before"], p2["during"], p2["after"]
        t = p2["throttles"]
        out += [
            "",
            f"2. client IOPS, 4k randrw 50/50 QD{o['iodepth']}, {o['runtime_s']} s; rebuild at "
            f"the default throttles (bandwidth {t['rebuild_bandwidth_mibps']} MiB/s, "
            f"concurrency {t['rebuild_concurrency']}) after SIGKILL of {p2['victim']}",
            "",
            "| run | IOPS | read IOPS | write IOPS | read mean/p99 µs | write mean/p99 µs "
            "| other CPU |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in (("before (3 SDSs)", b), ("during rebuild", d), ("after (2 SDSs)", a)):
            out.append(
                f"| {name} | {f['iops']:.0f} | {f['read_iops']:.0f} | {f['write_iops']:.0f} "
                f"| {f['read_lat_mean_us']:.0f} / {f['read_lat_p99_us']:.0f} "
                f"| {f['write_lat_mean_us']:.0f} / {f['write_lat_p99_us']:.0f} "
                f"| {f['other_cpu_pct']:.0f}% |"
            )
        out += [
            "",
            f"during / before: {p2['ratio_during_before']:.2f}x; during / after: "
            f"{p2['ratio_during_after']:.2f}x; the rebuild ({p2['bytes_rebuilt'] / MiB:.0f} MiB "
            f"in {p2['rebuild_s_from_first']} s, {p2['rebuild_mibps_from_first']} MiB/s) "
            f"overlapped {p2['overlap']:.0%} of the measured fio run",
        ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, 10 s fio runs")
    ap.add_argument("--size", type=parse_size, help="volume size and fill (default 1GiB)")
    ap.add_argument("--pg-count", type=int, default=64, help="PGs of the pool (default 64)")
    ap.add_argument(
        "--concurrency", type=int, default=32, help="rebuild_concurrency in phase 1 (default 32)"
    )
    ap.add_argument("--iodepth", type=int, default=16, help="fio iodepth in phase 2 (default 16)")
    ap.add_argument("--runtime", type=int, help="fio seconds in phase 2 (default 15, quick 10)")
    ap.add_argument("--skip-client", action="store_true", help="phase 1 only")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the survivors during phase 1")
    ap.add_argument("--profile-seconds", type=int, default=8, help="py-spy duration (default 8)")
    ap.add_argument("--log-level", default="WARNING", help="the daemons' (default WARNING)")
    ap.add_argument("--json", action="store_true", help="print only the JSON document")
    ap.add_argument("--workdir", help="keep configs, logs and data here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = 256 * MiB if args.quick else GiB
    LOG_LEVEL[0] = args.log_level.upper()
    if args.runtime is None:
        args.runtime = 10 if args.quick else 15
    if shutil.which("fio") is None:
        ap.error("fio is not installed (apt-get install fio)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep = bool(args.workdir)
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="rebuild-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ok = False
    # SIGTERM (e.g. a timeout) unwinds through the finally blocks that stop the daemons.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
    if not args.json:
        print(render(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
