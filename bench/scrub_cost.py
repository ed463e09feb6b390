#!/usr/bin/env python3
"""What the background scrub costs client IO: fio through NBD with no scrub running,
then with a scrub pass running at its default throttle (issue 14: at most 10% fewer
IOPS).

Starts the same cluster as ``bench/nbd_fio.py`` (an MDM on SQLite, three SDSs in three
fault sets with file devices, one SDC, a thin volume; ``nbd_fio.Cluster``) with the
MDM's ``[scrub]`` as deployed except ``start_delay_s`` (no pass of its own), prefills
the volume with one sequential 1 MiB write pass (the scrub reads every chunk written,
so that is what it has to do), then runs each job twice per repeat, in alternating
order: with the pool's scrub paused (``meshctl scrub pause``: the SDSs stop at the
next chunk, the benchmark waits until the MDM's ``bytes_scrubbed`` stops moving) and
with a pass running (``meshctl scrub start``; the benchmark waits until the SDSs are
scrubbing, and starts a new pass at once if one completes during a job). Jobs:

    4k randwrite QD32, 1M seq read QD8   (nbd_fio.py's, same fio options)

It prints per job IOPS, MiB/s, mean and p99 latency with the scrub off and on, the
ratio on / off against the 0.90 target, the rate the scrub ran at during the "on"
runs (from the MDM's ``bytes_scrubbed``, updated by the SDSs' heartbeats every 2 s,
so read it over runs of 10 s or more) against its throttle (``bandwidth_mibps`` per
source device: one device per SDS here), and the CPU share of one core each daemon
used. ``--repeat N``: medians of N runs.

    .venv/bin/python bench/scrub_cost.py                         # about 3 minutes
    .venv/bin/python bench/scrub_cost.py --repeat 3 --runtime 20 --size 4GiB

``--size`` should be large enough that a pass outlasts a job: a pass reads every chunk
once per copy pair at ``bandwidth_mibps`` per primary device, about ``size / (3 *
bandwidth)`` seconds here (1 GiB at 20 MiB/s: 17 s). Every process shares this
machine's CPUs: compare the ratio of one run, measured on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nbd_fio import (
    JOBS,
    BenchError,
    Cluster,
    MiB,
    check_fio_options,
    cpu_seconds,
    figures,
    fio_args,
    fio_options,
    fio_options_doc,
    log,
    machine_info,
    median_figures,
    run_fio,
    run_main,
)

JOB_NAMES = ("randwrite-qd32", "seqread-qd8")
TARGET_RATIO = 0.90  # issue 14: the scrub at its default throttle costs at most 10%
SETTLE_TIMEOUT_S = 60.0
HEARTBEAT_S = 2.0  # the SDSs' heartbeat period: how often bytes_scrubbed moves
MODES = ("off", "on")


class ScrubCluster(Cluster):
    """nbd_fio's cluster with the scrub driven by hand: no pass of the MDM's own."""

    def __init__(self, workdir: Path, size: int, pg_count: int, bandwidth: int | None) -> None:
        scrub: dict[str, Any] = {"start_delay_s": 365 * 86400.0}
        if bandwidth is not None:
            scrub["bandwidth_mibps"] = bandwidth
        super().__init__(workdir, size, pg_count, mdm={"scrub": scrub})

    def scrub(self, action: str = "") -> dict[str, Any]:
        path = f"/api/v1/pools/{self.pool_id}/scrub"
        if action:
            return dict(self.api("POST", f"{path}/{action}", {}))
        return dict(self.api("GET", path))

    def scrubbed(self) -> int:
        return int(self.scrub()["bytes_scrubbed"])

    def scrub_running(self) -> None:
        """Start (or resume) a pass; return once the SDSs' reports show it working."""
        before = self.scrubbed()
        self.scrub("start")
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self.scrubbed() <= before:
            if time.monotonic() > deadline:
                raise BenchError("the scrub did not start scrubbing")
            time.sleep(0.2)
            if self.scrub()["state"] == "idle":  # the resumed pass had nothing left
                self.scrub("start")

    def scrub_stopped(self) -> None:
        """Pause the pass; return once ``bytes_scrubbed`` stays put over a heartbeat."""
        self.scrub("pause")
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last = self.scrubbed()
        while True:
            time.sleep(HEARTBEAT_S + 0.5)
            now = self.scrubbed()
            if now == last:
                return
            if time.monotonic() > deadline:
                raise BenchError("the scrub did not stop")
            last = now


class KeepScrubbing(threading.Thread):
    """During an "on" run: starts a new pass as soon as one completes, so that the
    scrub runs for the whole job; counts the passes it had to start."""

    def __init__(self, cluster: ScrubCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.done = threading.Event()
        self.restarts = 0
        self.error: Exception | None = None

    def run(self) -> None:
        while not self.done.wait(0.5):
            try:
                if self.cluster.scrub()["state"] == "idle":
                    self.cluster.scrub("start")
                    self.restarts += 1
            except (BenchError, OSError) as exc:
                self.error = exc
                return


def one_run(
    cluster: ScrubCluster, job: Any, mode: str, args: argparse.Namespace
) -> dict[str, float]:
    """Run one job with the scrub off or on; fio's figures, the CPU of each daemon
    and, with the scrub on, its rate during the job and the passes restarted."""
    if mode == "on":
        cluster.scrub_running()
    else:
        cluster.scrub_stopped()
    cmd = fio_args(cluster.uri, job.name, job.rw, job.bs, job.iodepth, args.size)
    cmd += [f"--runtime={args.runtime}", "--time_based", f"--ramp_time={args.ramp}"]
    pids = cluster.pids()
    keep = KeepScrubbing(cluster) if mode == "on" else None
    cpu0 = {p: cpu_seconds(pid) for p, pid in pids.items()}
    bytes0 = cluster.scrubbed()
    t0 = time.monotonic()
    if keep is not None:
        keep.start()
    try:
        doc = run_fio(cmd)
    finally:
        if keep is not None:
            keep.done.set()
            keep.join()
    wall = time.monotonic() - t0
    fig = figures(doc, job.rw)
    for p, pid in pids.items():
        fig[f"cpu_{p}_pct"] = 100 * (cpu_seconds(pid) - cpu0[p]) / wall
    fig["scrub_mib_s"] = (cluster.scrubbed() - bytes0) / MiB / wall
    if keep is not None:
        if keep.error is not None:
            raise BenchError(f"keeping the scrub running failed: {keep.error}")
        fig["passes_restarted"] = float(keep.restarts)
    return fig


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cluster = ScrubCluster(workdir / "cluster", args.size, args.pg_count, args.bandwidth)
    jobs = [j for j in JOBS if j.name in (args.jobs or JOB_NAMES)]
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        j.name: {m: [] for m in MODES} for j in jobs
    }
    try:
        log("starting the cluster (MDM, 3 SDSs, SDC) ...")
        cluster.start()
        log(f"prefilling {args.size // MiB} MiB (1M sequential writes)")
        run_fio(fio_args(cluster.uri, "prefill", "write", "1M", 8, args.size))
        bandwidth = int(cluster.scrub()["bandwidth_mibps"])
        for rep in range(args.repeat):
            for job in jobs:
                for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                    fig = one_run(cluster, job, mode, args)
                    samples[job.name][mode].append(fig)
                    log(
                        f"run {rep + 1}/{args.repeat} {job.label:<18} scrub {mode:<3} "
                        f"{fig['iops']:>9.0f} IOPS {fig['mib_s']:>8.1f} MiB/s "
                        f"mean {fig['lat_mean_us']:>8.1f} us p99 {fig['lat_p99_us']:>8.1f} us, "
                        f"scrub {fig['scrub_mib_s']:.1f} MiB/s"
                    )
    finally:
        cluster.stop()
    results: dict[str, Any] = {}
    for job in jobs:
        off = median_figures(samples[job.name]["off"])
        on = median_figures(samples[job.name]["on"])
        ratio = on["iops"] / off["iops"] if off["iops"] else None
        results[job.name] = {
            "label": job.label,
            "off": off,
            "on": on,
            "ratio_iops": ratio,
            "met": ratio is not None and ratio >= TARGET_RATIO,
            "runs": samples[job.name],
        }
    return {
        "machine": machine_info(),
        "options": {
            **fio_options_doc(args),
            "scrub_bandwidth_mibps": bandwidth,
            "sds_devices": cluster.sds_count,
        },
        "jobs": results,
    }


def render(r: dict[str, Any]) -> str:
    m, o = r["machine"], r["options"]
    expected = o["scrub_bandwidth_mibps"] * o["sds_devices"]
    out = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {m['python']}, {m['fio']}; every process on this machine",
        f"volume: {o['size_bytes'] // MiB} MiB; {o['runtime_s']} s per job after "
        f"{o['ramp_s']} s ramp; median of {o['repeat']} run(s); scrub throttle "
        f"{o['scrub_bandwidth_mibps']} MiB/s per source device x {o['sds_devices']} "
        f"devices = {expected} MiB/s at most",
        "",
        "| job | scrub off IOPS | MiB/s | mean µs | p99 µs | scrub on IOPS | MiB/s | mean µs "
        "| p99 µs | on/off | scrub MiB/s | target | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for e in r["jobs"].values():
        off, on = e["off"], e["on"]
        ratio = f"{e['ratio_iops']:.2f}" if e["ratio_iops"] is not None else "-"
        out.append(
            f"| {e['label']} | {off['iops']:.0f} | {off['mib_s']:.1f} | {off['lat_mean_us']:.0f} "
            f"| {off['lat_p99_us']:.0f} | {on['iops']:.0f} | {on['mib_s']:.1f} "
            f"| {on['lat_mean_us']:.0f} | {on['lat_p99_us']:.0f} | {ratio} "
            f"| {on['scrub_mib_s']:.1f} | >= {TARGET_RATIO:.2f} | "
            f"{'met' if e['met'] else 'MISSED'} |"
        )
    out += ["", "CPU of one core used (scrub off -> on):"]
    for e in r["jobs"].values():
        procs = sorted(k for k in e["on"] if k.startswith("cpu_"))
        parts = ", ".join(f"{k[4:-4]} {e['off'][k]:.0f}->{e['on'][k]:.0f}%" for k in procs)
        out.append(f"  {e['label']:<18} {parts}")
    restarted = sum(int(e["on"].get("passes_restarted", 0)) for e in r["jobs"].values())
    if restarted:
        out.append(
            f"\n{restarted} pass(es) completed during a job and were restarted (a gap of up "
            "to a heartbeat each): a larger --size keeps one pass running throughout"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fio_options(ap, runtime=15, ramp=2)
    ap.add_argument(
        "--jobs", nargs="+", choices=list(JOB_NAMES), help="run only these jobs (default both)"
    )
    ap.add_argument(
        "--bandwidth",
        type=int,
        help="the scrub's bandwidth_mibps per source device (default: the MDM's default)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--workdir", help="keep configs, logs and data here (default: a temp dir)")
    args = ap.parse_args(argv)
    check_fio_options(ap, args)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args(argv), run, render, "scrub-cost-")


if __name__ == "__main__":
    sys.exit(main())
