#!/usr/bin/env python3
"""CPU seconds per GiB of each data-path process: what a job costs, not how fast it runs.

Starts the same cluster as ``bench/nbd_fio.py`` (an MDM, three SDSs, one SDC, a thin
volume; ``nbd_fio.Cluster``), prefills the volume with one sequential 1 MiB write
pass, then runs one fio job through NBD ``--runs`` times, each over ``--loops``
passes of the volume, and reports for each process (each SDS, the SDC, the MDM, fio)
the user + system CPU it used during the job per GiB moved, less what it uses when
idle in as much time (measured for ``--idle`` seconds first), from ``/proc/PID/stat``;
``NAME/sys`` is the system part, ``NAME/cs`` context switches per MiB; the median of
the runs, and the sum of the three SDSs.

CPU per byte moves less with the machine's load than throughput does, so this
compares two trees on a busy machine where ``nbd_fio.py``'s MiB/s would be noise; it
still moves by 10-20% between a busy and a very busy machine (caches, fewer requests
per wake-up): alternate the trees, run by run, and compare medians. To compare with an
older commit, run this file with that tree's interpreter (the daemons run as
``sys.executable -m meshblock.<kind>``), e.g. from a second worktree::

    .venv/bin/python bench/cpu_per_io.py --checksums off              # this tree
    ../old/.venv/bin/python bench/cpu_per_io.py --checksums absent    # a release without
                                                                      # [store] checksums

``--profile DIR`` records a py-spy profile (``--format raw``: collapsed stacks, one
file per process) of one more run, after the measured ones, and prints the functions
with the most self time (needs ``py-spy`` beside the interpreter or on the PATH).
Linux only. It does not measure throughput: that is ``nbd_fio.py``'s on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from nbd_fio import (
    JOBS,
    BenchError,
    Cluster,
    Profiler,
    fio_args,
    log,
    parse_size,
    run_fio,
    run_main,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


TICK = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> tuple[float, float, int]:
    """User and system CPU seconds of a process so far, and its context switches
    (voluntary and not); zeroes when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0, 0
    cs = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return int(stat[11]) / TICK, int(stat[12]) / TICK, cs


def sample_all(pids: dict[str, int]) -> dict[str, tuple[float, float, int]]:
    return {name: sample(pid) for name, pid in pids.items()}


def idle_rates(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second of each process with no IO going on."""
    s0 = sample_all(pids)
    time.sleep(seconds)
    s1 = sample_all(pids)
    return {name: (sum(s1[name][:2]) - sum(s0[name][:2])) / seconds for name in pids}


def one_run(
    cluster: Cluster,
    job: Any,
    args: argparse.Namespace,
    pids: dict[str, int],
    idle: dict[str, float],
) -> tuple[dict[str, float], float, float]:
    """Run the job once: per process, CPU seconds per GiB less what it uses when idle
    in as much time (``name``), and context switches per MiB (``name/cs``); the wall
    time and MiB/s."""
    cmd = fio_args(cluster.uri, job.name, job.rw, job.bs, job.iodepth, args.size)
    cmd += [f"--loops={args.loops}"]
    s0 = sample_all(pids)
    t0 = time.monotonic()
    doc = run_fio(cmd)
    wall = time.monotonic() - t0
    s1 = sample_all(pids)
    fio_job = doc["jobs"][0]
    side = fio_job["write" if "write" in job.rw else "read"]
    gib = side["io_bytes"] / GiB
    if gib <= 0:
        raise BenchError(f"fio moved no bytes: {fio_job}")
    per: dict[str, float] = {}
    for name in pids:
        user, system = s1[name][0] - s0[name][0], s1[name][1] - s0[name][1]
        per[name] = (user + system - idle[name] * wall) / gib
        per[f"{name}/sys"] = system / gib
        per[f"{name}/cs"] = (s1[name][2] - s0[name][2]) / (gib * 1024)
    sds = [name for name in pids if name.startswith("sds")]
    per["sds_total"] = sum(per[name] for name in sds)
    per["sds_total/sys"] = sum(per[f"{name}/sys"] for name in sds)
    per["fio"] = (float(fio_job["usr_cpu"]) + float(fio_job["sys_cpu"])) / 100 * wall / gib
    return per, wall, side["bw_bytes"] / MiB


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    job = next(j for j in JOBS if j.name == args.job)
    checksums = {"on": True, "off": False, "absent": None}[args.checksums]
    cluster = Cluster(
        workdir / "cluster", args.size, args.pg_count, checksums=checksums, tls=args.tls == "on"
    )
    runs: list[dict[str, float]] = []
    profile: dict[str, Any] = {}
    try:
        log("starting the cluster (MDM, 3 SDSs, SDC) ...")
        cluster.start()
        pids = {**cluster.pids(), "mdm": cluster.daemons[0].pid}
        log(f"prefilling {args.size // MiB} MiB (1M sequential writes)")
        run_fio(fio_args(cluster.uri, "prefill", "write", "1M", 8, args.size))
        idle = idle_rates(pids, args.idle)
        log("idle CPU (s/s): " + ", ".join(f"{k} {v:.4f}" for k, v in idle.items()))
        for i in range(args.runs):
            per, wall, mib_s = one_run(cluster, job, args, pids, idle)
            runs.append(per)
            log(
                f"run {i + 1}/{args.runs} {job.label}: {wall:.1f} s ({mib_s:.0f} MiB/s, noise); "
                + ", ".join(f"{k} {v:.3f}" for k, v in per.items())
                + " CPU s/GiB"
            )
        if args.profile:
            seconds = max(1, int(wall))
            prof = Profiler(Path(args.profile), cluster.pids(), seconds)
            prof.start(job.name)
            one_run(cluster, job, args, pids, idle)
            profile = prof.finish()
    finally:
        cluster.stop()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {
        "job": job.label,
        "python": sys.executable,
        "checksums": args.checksums,
        "tls": args.tls,
        "gib_per_run": args.loops * args.size / GiB,
        "idle_cpu_s_per_s": idle,
        "cpu_s_per_gib_median": median,
        "runs": runs,
        "profile": profile,
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        f"{r['job']}, checksums {r['checksums']}, TLS {r.get('tls', 'off')}, "
        f"{len(r['runs'])} runs of "
        f"{r['gib_per_run']:g} GiB ({r['python']})",
        f"{'process':<10} {'CPU s/GiB (median)':>18}   runs",
    ]
    for name, v in r["cpu_s_per_gib_median"].items():
        each = " ".join(f"{run[name]:.3f}" for run in r["runs"])
        lines.append(f"{name:<10} {v:>18.3f}   {each}")
    for name, prof in r["profile"].items():
        lines.append(f"\n{name}: {prof['samples']} samples, self time:")
        lines += [f"  {t['share_pct']:5.1f}%  {t['function']}" for t in prof["top"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--job",
        choices=[j.name for j in JOBS],
        default="seqread-qd8",
        help="the fio job (nbd_fio.py's; default seqread-qd8: 1M sequential read QD8)",
    )
    ap.add_argument("--size", type=parse_size, default=GiB, help="volume size (default 1GiB)")
    ap.add_argument("--loops", type=int, default=4, help="passes over the volume per run")
    ap.add_argument("--runs", type=int, default=5, help="measured runs; medians reported")
    ap.add_argument(
        "--idle",
        type=float,
        default=10.0,
        help="seconds to measure each process's CPU with no IO first (default 10)",
    )
    ap.add_argument("--pg-count", type=int, default=32, help="PGs of the pool")
    ap.add_argument(
        "--checksums",
        choices=["on", "off", "absent"],
        default="on",
        help="the SDSs' [store] checksums; absent: no [store] table, for a tree before them",
    )
    ap.add_argument(
        "--tls",
        choices=["on", "off"],
        default="off",
        help="the data protocol on TLS 1.3 (every component with a certificate; nbd_fio.py's "
        "--tls); default off",
    )
    ap.add_argument("--profile", metavar="DIR", help="py-spy one more run into DIR")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--workdir", help="keep configs, logs and data here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.loops < 1:
        ap.error("--runs and --loops must be at least 1")
    if shutil.which("fio") is None:
        ap.error("fio is not installed (apt-get install fio)")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args(argv), run, render, "cpu-per-io-")


if __name__ == "__main__":
    sys.exit(main())
