"""The pure parts of bench/nbd_fio.py and bench/ceph_peer.py: /proc parsing, the CPU
accounting per IO, fio's options and JSON, issue 15's table and its targets' verdicts.
The benchmarks themselves are run by hand (bench/README.md), not by the test suite."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
nbd_fio = importlib.import_module("nbd_fio")
ceph_peer = importlib.import_module("ceph_peer")


def stat_line(comm: str, utime: int, stime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime ...
    return f"4242 ({comm}) S 1 4242 4242 0 -1 4194560 10 0 0 0 {utime} {stime} 0 0 20 0 1 0\n"


def test_stat_cpu_seconds_counts_fields_after_the_last_bracket() -> None:
    assert nbd_fio.stat_cpu_seconds(stat_line("sds", 250, 50), 100) == 3.0
    # a process name with spaces and brackets does not shift the fields
    assert nbd_fio.stat_cpu_seconds(stat_line("a) (b c", 7, 3), 10) == 1.0


def test_cpu_figures_per_process_and_total() -> None:
    before = {"sds0": 10.0, "sdc": 20.0, "gone": 5.0}
    after = {"sds0": 10.5, "sdc": 20.25}  # "gone" exited: it counts as nothing
    fig = nbd_fio.cpu_figures(before, after, 5.0, 1000.0)
    # 5,000 IOs in 5 s: 0.5 s of CPU is 100 µs per IO
    assert fig["cpu_sds0_us_io"] == pytest.approx(100.0)
    assert fig["cpu_sdc_us_io"] == pytest.approx(50.0)
    assert fig["cpu_gone_us_io"] == 0.0
    assert fig["cpu_us_io"] == pytest.approx(150.0)
    assert fig["cpu_sds0_pct"] == pytest.approx(10.0)
    assert nbd_fio.process_cpu(fig) == pytest.approx({"sds0": 100.0, "sdc": 50.0, "gone": 0.0})
    # no IO, or no processes (an export of --uri): no division by zero, no total
    assert nbd_fio.cpu_figures(before, after, 5.0, 0.0)["cpu_us_io"] == 0.0
    assert nbd_fio.cpu_figures({}, {}, 5.0, 1000.0) == {}


def test_fio_args_sync_jobs_and_engines() -> None:
    sync = {j.name: j for j in nbd_fio.SYNC_JOBS}
    assert {j.fsync for j in sync.values()} == {1, 32, 8}
    assert all(j.fsync == 0 for j in nbd_fio.JOBS)
    assert len(nbd_fio.ALL_JOBS) == 9
    job = sync["randwrite-qd32-fsync32"]
    args = nbd_fio.fio_args("nbd://h/v", job.name, job.rw, job.bs, job.iodepth, 4096, fsync=32)
    assert "--fsync=32" in args and "--ioengine=nbd" in args and "--uri=nbd://h/v" in args
    plain = nbd_fio.fio_args("nbd://h/v", "x", "randwrite", "4k", 32, 4096)
    assert not any(a.startswith("--fsync") for a in plain)
    rbd = nbd_fio.fio_args("rbd:pool1/img", "x", "randread", "4k", 1, 4096)
    assert "--ioengine=rbd" in rbd and "--pool=pool1" in rbd and "--rbdname=img" in rbd
    assert "--clientname=admin" in rbd and not any(a.startswith("--uri") for a in rbd)


def fio_doc(sync_n: int) -> dict[str, Any]:
    side = {"iops": 500.0, "bw_bytes": 2 * 1024 * 1024, "lat_ns": {"mean": 460_000.0}}
    empty = {"iops": 0.0, "bw_bytes": 0, "lat_ns": {"mean": 0.0}}
    job = {
        "write": side,
        "read": empty,
        "usr_cpu": 3.0,
        "sys_cpu": 2.0,
        "sync": {"lat_ns": {"N": sync_n, "mean": 1_400_000.0}},
    }
    return {"jobs": [job]}


def test_figures_of_a_sync_job() -> None:
    text = "note: something\n" + json.dumps(fio_doc(250))
    fig = nbd_fio.figures(nbd_fio.fio_json(text), "randwrite")
    assert fig["iops"] == 500.0 and fig["mib_s"] == 2.0 and fig["lat_mean_us"] == 460.0
    assert fig["sync_lat_mean_us"] == 1400.0
    assert fig["fio_cpu_us_io"] == pytest.approx(100.0)  # 5% of a core at 500 IOPS
    assert "sync_lat_mean_us" not in nbd_fio.figures(fio_doc(0), "randwrite")


def target(iops: float, lat: float, cpu: float | None = None, mib: float = 0.0) -> dict[str, float]:
    fig = {"iops": iops, "mib_s": mib, "lat_mean_us": lat, "lat_p99_us": 2 * lat}
    if cpu is not None:
        fig["cpu_us_io"] = cpu
    return fig


def entry(label: str, bs: str, mesh: dict[str, float], **peers: dict[str, float]) -> Any:
    e: dict[str, Any] = {"label": label, "fio": {"bs": bs}, "meshblock": mesh, **peers}
    e["ratios"] = nbd_fio.job_ratios(e, list(peers))
    return e


def test_table_cells_and_rows() -> None:
    assert nbd_fio.table_cell(target(4322.4, 233.2, 209.0), mib=False) == "4,322 (233, 209)"
    assert nbd_fio.table_cell(target(1335, 5990, None, mib=812.3), mib=True) == "812 (5,990, -)"
    result = {
        "options": {"peers": ["nbdkit", "ceph"]},
        "jobs": {
            "randread-qd1": entry(
                "4k randread QD1",
                "4k",
                target(4322, 233, 209),
                nbdkit=target(27569, 36, 24),
                ceph=target(3177, 315, 206),
            ),
            "seqwrite-qd8-fsync8": entry(
                "1M write QD8, fsync=8",
                "1M",
                target(434, 18000, 700, mib=434),
                nbdkit=target(1439, 5000, 300, mib=1439),
                ceph=target(383, 20000, 900, mib=383),
            ),
        },
    }
    lines = nbd_fio.render_table(result)
    assert lines[0] == (
        "| job | meshblock | nbdkit | Ceph RBD size 2 | meshblock / nbdkit | meshblock / Ceph |"
    )
    assert lines[2] == (
        "| 4k randread QD1 | 4,322 (233, 209) | 27,569 (36, 24) | 3,177 (315, 206) "
        "| **0.16x** | 1.36x |"
    )
    assert lines[3].startswith("| 1M write QD8, fsync=8 (MiB/s) | 434 (18,000, 700) |")
    assert lines[3].endswith("| **0.30x** | 1.13x |")


def test_goal_verdicts_say_by_how_much() -> None:
    e = entry(
        "4k randwrite QD32",
        "4k",
        target(14666, 2182, 121),
        nbdkit=target(23572, 1357),
        ceph=target(2438, 13227),
    )
    goal = nbd_fio.Goal
    met, line = nbd_fio.goal_verdict(goal(1, "randwrite-qd32", "iops", 2.0, "ceph"), e)
    assert met and line.endswith(": met") and "6.02x Ceph RBD size 2, at least 2x" in line
    met, line = nbd_fio.goal_verdict(goal(4, "randwrite-qd32", "cpu", 60.0), e)
    assert not met and line.endswith(
        "CPU 121 µs per IO, at most 60: MISSED by 61 µs: 50% less CPU needed"
    )
    e2 = entry("4k randwrite QD1, fsync=1", "4k", target(530, 460), ceph=target(682, 1417))
    met, line = nbd_fio.goal_verdict(goal(1, "x", "iops", 2.0, "ceph"), e2)
    assert not met and "0.78x" in line and line.endswith("MISSED by 1.22x: 2.57x the IOPS needed")
    e3 = entry("4k randread QD1", "4k", target(4322, 233), nbdkit=target(27569, 36))
    met, line = nbd_fio.goal_verdict(goal(3, "x", "lat", 3.0, "nbdkit"), e3)
    assert not met and "mean latency 6.47x nbdkit's, at most 3x" in line
    assert line.endswith("MISSED by 3.47x: 54% less latency needed")
    # a peer that did not run, a cluster without CPU figures: no verdict
    assert nbd_fio.goal_verdict(goal(1, "x", "iops", 2.0, "ceph"), e3) is None
    assert nbd_fio.goal_verdict(goal(4, "x", "cpu", 20.0), e3) is None


def test_evaluate_goals_covers_the_jobs_and_peers_that_ran() -> None:
    results = {
        "randread-qd32": entry(
            "4k randread QD32", "4k", target(32518, 985, 51), nbdkit=target(166966, 192)
        )
    }
    goals = nbd_fio.evaluate_goals(results)
    # target 2 (>= 0.5x nbdkit) and target 4 (CPU); no Ceph, so no target 1
    assert [(g["number"], g["met"]) for g in goals] == [(2, False), (4, False)]


def test_job_selection_by_matrix_or_name() -> None:
    args = nbd_fio.parse_args(["--matrix", "sync", "--peer"])
    assert args.peer == []
    assert [j.name for j in nbd_fio.selected_jobs(args)] == [
        "randwrite-qd1-fsync1",
        "randwrite-qd32-fsync32",
        "seqwrite-qd8-fsync8",
    ]
    args = nbd_fio.parse_args(["--jobs", "seqwrite-qd8-fsync8", "randread-qd1"])
    assert args.peer == ["nbdkit"] and args.matrix == "both"
    assert [j.name for j in nbd_fio.selected_jobs(args)] == ["randread-qd1", "seqwrite-qd8-fsync8"]
    assert len(nbd_fio.selected_jobs(nbd_fio.parse_args([]))) == 9


def test_ceph_conf_is_loopback_two_copies_no_cache(tmp_path: Path) -> None:
    conf = ceph_peer.ceph_conf(tmp_path, "f5d1", 3300, 6789, 10 * 2**30)
    lines = [line.strip() for line in conf.splitlines()]
    assert "mon_host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]" in lines
    assert "public_addr = 127.0.0.1" in lines and "cluster_addr = 127.0.0.1" in lines
    assert "osd_pool_default_size = 2" in lines and "rbd_cache = false" in lines
    assert "osd_objectstore = bluestore" in lines
    # every path the daemons write is under the cluster's directory
    paths = [v.strip() for _, _, v in (x.partition("=") for x in lines) if v.strip()[:1] == "/"]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)


def test_pgs_clean_needs_three_osds_and_every_pg_clean() -> None:
    def status(up: int, states: dict[str, int]) -> dict[str, Any]:
        return {
            "osdmap": {"num_up_osds": up, "num_in_osds": up},
            "pgmap": {
                "num_pgs": sum(states.values()),
                "pgs_by_state": [{"state_name": k, "count": v} for k, v in states.items()],
            },
        }

    assert ceph_peer.pgs_clean(status(3, {"active+clean": 32}))
    assert not ceph_peer.pgs_clean(status(3, {"active+clean": 30, "peering": 2}))
    assert not ceph_peer.pgs_clean(status(2, {"active+clean": 32}))
    assert not ceph_peer.pgs_clean(status(3, {}))
    nested = {"osdmap": {"osdmap": {"num_up_osds": 3, "num_in_osds": 3}}}
    assert ceph_peer.pgs_clean({**nested, "pgmap": status(3, {"active+clean": 8})["pgmap"]})


def test_render_prints_table_details_and_targets() -> None:
    mesh = {**target(14666, 2182), **nbd_fio.cpu_figures({"sdc": 0.0}, {"sdc": 0.6}, 5.0, 5000)}
    e = entry("4k randwrite QD32", "4k", mesh, nbdkit=target(23572, 1357))
    e["meshblock"]["sync_lat_mean_us"] = 3000.0
    jobs = {"randwrite-qd32": e}
    result = {
        "machine": {
            "cpus": 2,
            "cpu_model": "x",
            "kernel": "6",
            "python": "3.11",
            "fio": "fio-3.33",
            "nbdkit": "nbdkit 1",
        },
        "options": {"size_bytes": 2**30, "runtime_s": 5, "ramp_s": 1, "repeat": 2, "uri": "u"},
        "jobs": jobs,
        "goals": nbd_fio.evaluate_goals(jobs),
    }
    text = nbd_fio.render(result)
    assert "| 4k randwrite QD32 | 14,666 (2,182, 24) | 23,572 (1,357, -) | **0.62x** |" in text
    assert (
        "| 4k randwrite QD32 | meshblock | 14,666 | 0.0 | 2,182 | 4,364 | 3,000 | 24 | sdc 24 |"
        in text
    )
    assert "Issue 15's targets: 2 of 2 met" in text
