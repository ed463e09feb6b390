"""Gray failures and hangs (issue "Trust IV"): an SDS that stops serving without
dying must cost a client seconds, not tens of seconds (docs/sdc.md, "Per-attempt
timeouts and failover reads"; docs/sds.md, "Degraded PGs").

Each test runs the fault tests' cluster (tests/test_faults.py: a real MDM with a 3 s
heartbeat timeout, three SDSs, the SDC) with fio write+verify at QD16 on two volumes
through NBD, breaks one SDS for 30 s, then checks: no fio error, every PG clean
again and both copies of every chunk of both volumes identical, and the longest any
one IO waited (fio's completion latency max, reads and writes) under 5 s. While the
SDS is broken, no PG with a copy on it is made clean again after it was declared
down (a copy job never reports a copy it could not reach, docs/sds.md "Copies").

- ``test_gray_failure_ports_dropped_while_it_heartbeats``: the SDS runs in a network
  namespace of the test (tests/_netns.py); nftables there (tests/_nft.py) drops every
  packet to or from its data and control ports while its heartbeats to the MDM go on.
- ``test_hung_sds_sigstop``: the SDS is SIGSTOPped, then SIGCONTed.

The figures printed are what docs/performance.md ("Faults") reports.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import test_faults
from _cluster import SmallCluster
from _fio import Fio, FioResult
from _netns import NetNs
from _nft import Nft, nft_unavailable
from _sds import SdsDaemon, wait_copy_jobs_ended
from test_faults import (
    NO_REBUILD_S,
    VOLUME,
    all_clean,
    assert_no_tracebacks,
    cluster_settings,
    copies,
    describe,
    netns_cluster,
    replicas_identical,
    wait_map,
)

pytestmark = pytest.mark.cluster

# the fault tests' fixtures: a fresh cluster per test, a network namespace
build = test_faults.build
netns = test_faults.netns

MAX_WAIT_S = 5.0  # the target: no client IO waits longer for one failed SDS
MAX_EPOCHS = 2  # map epochs while one SDS is failing (no flapping in and out of the map)
FAULT_S = 30.0
FAULT_AFTER_S = 3.0
SECOND_VOLUME = "flt2"
FIO_SIZE = "48M"  # 12288 writes of 4 KiB per volume ...
FIO_RATE_IOPS = 600  # ... ~20 s of writes, then the verify pass: IO all through the fault
QD = 16


def down_sds(c: SmallCluster) -> list[int]:
    """The SDSs the MDM says are not connected."""
    status, doc = c.mdm.api().get("/api/v1/sds")
    assert status == 200, doc
    return sorted(int(d["id"]) for d in doc["sds"] if d["state"] != "connected")


def add_volume(c: SmallCluster, name: str) -> int:
    """A second volume in the pool, mapped to the SDC; its id."""
    api = c.mdm.api()
    status, vol = api.post(
        "/api/v1/volumes", {"name": name, "pool_id": c.pool_id, "size": "1GiB", "type": "thin"}
    )
    assert status == 201, vol
    sdc_id = c.sdc.health()["sdc_id"]
    status, m = api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})
    assert status == 201, m
    c.sdc.wait_for("the second export", lambda h: name in {e["name"] for e in h["exports"]})
    return int(vol["id"])


def through_a_fault(
    c: SmallCluster,
    tmp: Path,
    victim: SdsDaemon,
    fault: Callable[[], None],
    repair: Callable[[], None],
) -> dict[str, float]:
    """fio on both volumes, ``fault`` after FAULT_AFTER_S, ``repair`` FAULT_S later;
    the checks of the module doc. Returns the longest read and write waits."""
    second = add_volume(c, SECOND_VOLUME)
    assert all_clean(c.pgmap())
    dead = c.sds_id(victim)
    jobs = [
        Fio(c.sdc.uri(name), name, tmp / "fio", size=FIO_SIZE, iodepth=QD, rate_iops=FIO_RATE_IOPS)
        for name in (VOLUME, SECOND_VOLUME)
    ]
    for job in jobs:
        job.start()
    time.sleep(FAULT_AFTER_S)
    assert all(job.running() for job in jobs), "fio finished before the fault"
    fault()
    declared_at: float | None = None
    cleaned: list[str] = []
    epoch_before = c.pgmap()["epoch"]
    epochs = epoch_before
    downs: list[int] = []
    try:
        t_fault = time.monotonic()
        while time.monotonic() - t_fault < FAULT_S:
            doc = c.pgmap()
            epochs = doc["epoch"]
            downs += [i for i in down_sds(c) if i not in downs]
            on = [pg for pg in doc["pgs"] if dead in copies(pg)]
            if declared_at is None:
                if on and all(pg["state"] != "clean" for pg in on):
                    declared_at = time.monotonic() - t_fault
            else:
                cleaned += [f"{pg['pg']}@{doc['epoch']}" for pg in on if pg["state"] == "clean"]
            time.sleep(0.5)
    finally:
        repair()
    t_back = time.monotonic()
    results: list[FioResult] = [job.result(timeout=150) for job in jobs]
    context = describe(c.pgmap(), dead) + "\n" + c.logs()
    for res in results:
        res.assert_clean(context)
        print(res.summary())
    worst = {op: max(res.max_latency_s(op) for res in results) for op in ("read", "write")}
    print(
        f"SDS {dead} declared down {declared_at} s into the fault; longest waits: "
        f"read {worst['read']:.2f} s, write {worst['write']:.2f} s; "
        f"{epochs - epoch_before} map epoch(s) during the fault; SDSs down: {downs}"
    )
    assert downs == [dead], f"SDSs declared down during the fault: {downs}, not [{dead}]"
    assert epochs - epoch_before <= MAX_EPOCHS, (
        f"{epochs - epoch_before} map epochs during one failure (at most {MAX_EPOCHS})\n{context}"
    )
    assert declared_at is not None, f"SDS {dead}'s PGs were never all degraded\n{context}"
    assert not cleaned, (
        f"PGs with a copy on SDS {dead} made clean while it could not be reached: {cleaned}"
    )
    wait_map(c, "a clean pool after the SDS is back", all_clean, 90, dead)
    print(f"every PG clean {time.monotonic() - t_back:.1f} s after the SDS was back")
    wait_copy_jobs_ended(c.sds)
    for vid in (c.volume_id, second):
        out = replicas_identical(c, vid)
        assert out["chunks"] > 0, out
    assert_no_tracebacks(c)
    assert worst["read"] < MAX_WAIT_S and worst["write"] < MAX_WAIT_S, (
        f"an IO waited longer than {MAX_WAIT_S:g} s: {worst}"
    )
    return worst


@pytest.fixture
def nft_ready() -> None:
    why = nft_unavailable()
    if why:
        pytest.skip(why)


def test_gray_failure_ports_dropped_while_it_heartbeats(
    build: Any, netns: NetNs, nft_ready: None, tmp_path: Path
) -> None:
    c = netns_cluster(build, netns, cluster_settings(NO_REBUILD_S))
    victim = c.sds[1]
    assert victim.netns is netns
    nft = Nft(netns)
    try:
        through_a_fault(
            c,
            tmp_path,
            victim,
            lambda: nft.drop_ports([victim.data_port, victim.control_port]),
            nft.restore,
        )
    finally:
        nft.restore()
    assert victim.proc is not None and victim.proc.poll() is None, "the SDS died"


def test_hung_sds_sigstop(build: Any, tmp_path: Path) -> None:
    c = build(cluster_settings(NO_REBUILD_S))
    victim = c.sds[1]
    proc = victim.proc
    assert proc is not None

    def cont() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    try:
        through_a_fault(c, tmp_path, victim, lambda: proc.send_signal(signal.SIGSTOP), cont)
    finally:
        cont()
    assert proc.poll() is None, "the SDS died"


def test_one_sided_partition_peers_unreachable(
    build: Any, netns: NetNs, nft_ready: None, tmp_path: Path
) -> None:
    """The SDS's own connections to its peers' data ports are dropped (what it sends
    them and what they answer), while the SDC and the MDM reach it and its heartbeats
    go on: it cannot mirror a write it is primary for. The MDM must take it for the
    faulty one (it reports every peer while the MDM reaches them), never a healthy
    peer on its word."""
    c = netns_cluster(build, netns, cluster_settings(NO_REBUILD_S))
    victim = c.sds[1]
    assert victim.netns is netns
    peers = "{ " + ", ".join(str(d.data_port) for d in c.sds if d is not victim) + " }"
    nft = Nft(netns)

    def cut_from_peers() -> None:
        nft.apply(
            outbound=[f"ip daddr {netns.host_ip} tcp dport {peers} drop"],
            inbound=[f"ip saddr {netns.host_ip} tcp sport {peers} drop"],
        )

    try:
        through_a_fault(c, tmp_path, victim, cut_from_peers, nft.restore)
    finally:
        nft.restore()
    assert victim.proc is not None and victim.proc.poll() is None, "the SDS died"
