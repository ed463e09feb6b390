"""An SDS that flaps is kept out until an operator clears it (docs/mdm.md, "Hold-down
and flapping"). Real MDM (heartbeat timeout 60 s: only failure reports and the
hold-down's probes act), three real SDSs, the real SDC; IO through NBD with qemu-io.

The SDS is declared down on a report (SIGKILL under writes), restarted, then frozen
and thawed every 3 s (SIGSTOP / SIGCONT: its data port stops answering the probes'
PING and answers again, its heartbeats come and go, never long enough for the
heartbeat timeout). It never answers for ``hold_down_s`` in a row, so it never
returns; each thaw-freeze is a flap, and it ends flapping: kept out however well it
answers afterwards, the metric the alert reads at 1, the pool's map changed once for
the whole episode. ``meshctl sds clear-flapping`` lets it prove itself up; its PGs
resync and both copies of every chunk are identical.

The second test is the gray flap of issue 21: the SDS's data and control ports
dropped and restored every 3 s with nftables inside its own network namespace
(``tests/_nft.py``; never in the root namespace), its heartbeats flowing, under fio
write and verify, until two cycles after it is flapping (a minute at most)."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, meshctl_command, small_cluster
from _fio import Fio
from _netns import NetNs, netns_unavailable
from _nft import Nft, nft_unavailable
from _sds import SdsDaemon
from _wait import wait_until
from test_faults import replicas_identical
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "flap1"
MiB = 1024 * 1024
HOLD_DOWN_S = 5.0
FLAP_COUNT = 3
CYCLE_S = 3.0
FIO_SIZE = "8M"  # the gray flap's fio region
KEEP_FLAPPING = 2  # drop-restore cycles of the gray flap once the SDS is flapping


@pytest.fixture(scope="module")
def fc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {
        "cluster": {
            "heartbeat_timeout_s": 60.0,
            "hold_down_s": HOLD_DOWN_S,
            "flap_count": FLAP_COUNT,
            "flap_window_s": 600.0,
            "rebuild_delay_s": 600.0,  # the return resyncs; nothing is rebuilt meanwhile
        }
    }
    with small_cluster(tmp_path_factory.mktemp("flap"), VOLUME, "64MiB", settings) as c:
        yield c


def sds_doc(c: SmallCluster, name: str) -> dict[str, Any]:
    status, doc = c.mdm.api().get("/api/v1/sds")
    assert status == 200, doc
    return next(s for s in doc["sds"] if s["name"] == name)


def flapping_gauge(c: SmallCluster, name: str) -> float:
    """``meshblock_sds_flapping{sds=name}`` on the MDM's /metrics."""
    status, body = c.mdm.api()("GET", "/metrics")
    assert status == 200, status
    m = re.search(rf'^meshblock_sds_flapping\{{[^}}]*sds="{name}"[^}}]*\}} (\S+)$', str(body), re.M)
    assert m, "no meshblock_sds_flapping for the SDS"
    return float(m.group(1))


def meshctl(c: SmallCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*meshctl_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=c.mdm.env(),
        stdin=subprocess.DEVNULL,
    )


def test_a_flapping_sds_stays_out_until_cleared(fc: SmallCluster) -> None:
    victim = fc.sds[1]
    uri = fc.sdc.uri(VOLUME)
    qemu_io(uri, *[f"write -P 0x11 {n * MiB} 64k" for n in range(32)], "flush")
    epoch0 = fc.pgmap()["epoch"]
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    # Writes to every chunk: some reach it, fail, are reported: down, held.
    qemu_io(uri, *[f"write -P 0x22 {n * MiB} 64k" for n in range(32)], "flush")
    wait_until(lambda: sds_doc(fc, victim.name)["held_down"], 30, "the victim held down")
    epoch_down = fc.pgmap()["epoch"]
    victim.start()
    victim.wait_serving()

    # Frozen and thawed every 3 s: never 5 s of answers in a row.
    proc = victim.proc
    assert proc is not None
    cycles = 0
    try:
        while cycles < 20 and not sds_doc(fc, victim.name)["flapping"]:
            time.sleep(CYCLE_S)
            proc.send_signal(signal.SIGSTOP)
            time.sleep(CYCLE_S)
            proc.send_signal(signal.SIGCONT)
            cycles += 1
    finally:
        proc.send_signal(signal.SIGCONT)
    doc = sds_doc(fc, victim.name)
    assert doc["flapping"] and doc["held_down"] and doc["state"] == "disconnected", doc
    print(f"flapping after {cycles} freeze-thaw cycles")
    assert flapping_gauge(fc, victim.name) == 1.0  # MeshblockSdsFlapping's expression
    listed = meshctl(fc, "sds", "list")
    assert listed.returncode == 0, listed
    assert re.search(rf"{victim.name} .*disconnected \(flapping\)", listed.stdout), listed.stdout

    # Answering well now changes nothing: flapping is kept out, not probed.
    victim.wait_serving()
    time.sleep(HOLD_DOWN_S + 3.0)  # longer than a hold-down with peers' reports
    doc = sds_doc(fc, victim.name)
    assert doc["flapping"] and doc["state"] == "disconnected", doc
    # At most 2 map epochs for the failure: here one (degraded), none per flap.
    epoch_flapping = fc.pgmap()["epoch"]
    assert epoch_down - epoch0 <= 2 and epoch_flapping == epoch_down, (
        epoch0,
        epoch_down,
        epoch_flapping,
    )
    assert "flapping, kept out" in fc.mdm.log_text(), fc.logs()

    # An MDM restart keeps it out: the hold is in the store (sdss.hold_state).
    fc.mdm.restart()
    wait_until(
        lambda: sds_doc(fc, fc.sds[0].name)["state"] == "connected",
        60,
        "the SDSs heartbeating the restarted MDM",
        detail=fc.logs,
    )
    victim.wait_serving()
    time.sleep(HOLD_DOWN_S + 3.0)
    doc = sds_doc(fc, victim.name)
    assert doc["flapping"] and doc["held_down"] and doc["state"] == "disconnected", doc
    assert fc.pgmap()["epoch"] == epoch_flapping

    out = meshctl(fc, "--json", "sds", "clear-flapping", victim.name)
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["flapping"] is False, out.stdout
    again = meshctl(fc, "sds", "clear-flapping", victim.name)
    assert again.returncode == 5, again  # not flapping any more: 409
    wait_until(
        lambda: sds_doc(fc, victim.name)["state"] == "connected",
        60,
        f"{victim.name} proven up after clear-flapping",
        detail=fc.logs,
    )
    assert flapping_gauge(fc, victim.name) == 0.0
    wait_until(
        lambda: all(pg["state"] == "clean" for pg in fc.pgmap()["pgs"]),
        90,
        "every PG clean after the resync",
        detail=fc.logs,
    )
    qemu_io(uri, *[f"read -P 0x22 {n * MiB} 64k" for n in range(32)], read_only=True)
    replicas_identical(fc)


# -- a gray flap: the data and control ports dropped and restored, heartbeats flowing --


@pytest.fixture
def ns() -> Iterator[NetNs]:
    """A network namespace of this test for the victim SDS, removed even on failure."""
    why = netns_unavailable() or nft_unavailable()
    assert why is None, why
    netns = NetNs()
    try:
        netns.create()
        yield netns
    finally:
        netns.destroy()


def test_ports_dropped_and_restored_every_3_s_end_flapping(
    ns: NetNs, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """sds2 runs in a namespace of its own; an nftables table there drops every packet
    to and from its data and control ports for 3 s, then none for 3 s, until two
    cycles after it is flapping (a minute at most), while its heartbeats (its own
    connections out to the MDM) flow, under fio write and verify. A failure report
    takes it down once; its flaps take it out (flapping) with the pool's map changed at
    most twice; ``clear-flapping`` brings it back once the ports stay open; resync, fio
    clean, replicas identical."""

    def make(workdir: Path, name: str, mdm: Any, fs: str | None) -> SdsDaemon:
        inside = name == "sds2"
        return SdsDaemon(
            workdir, name, mdm, fs, ns.ns_ip if inside else ns.host_ip, ns if inside else None
        )

    settings = {
        "cluster": {
            "heartbeat_timeout_s": 60.0,
            "hold_down_s": HOLD_DOWN_S,
            "flap_count": FLAP_COUNT,
            "flap_window_s": 600.0,
            "rebuild_delay_s": 600.0,
        }
    }
    root = tmp_path_factory.mktemp("grayflap")
    with small_cluster(root, VOLUME, "64MiB", settings, make_sds=make, mdm_host=ns.host_ip) as c:
        victim = c.sds[1]
        assert victim.netns is ns
        nft = Nft(ns)
        # 2048 writes, then as many reads, at 150/s: IO for the ~30 s of the cycles below
        job = Fio(c.sdc.uri(VOLUME), "gray", root / "fio", size=FIO_SIZE, iodepth=16, rate_iops=150)
        epoch0 = c.pgmap()["epoch"]
        job.start()
        epochs = {epoch0}
        cycles = 0
        flapping_at: int | None = None
        try:
            # Until it is flapping, then KEEP_FLAPPING more (it stays out while
            # its ports go on flapping); a minute at most.
            while cycles < 10 and (flapping_at is None or cycles < flapping_at + KEEP_FLAPPING):
                nft.drop_ports([victim.data_port, victim.control_port])
                time.sleep(CYCLE_S)
                nft.restore()
                time.sleep(CYCLE_S)
                epochs.add(c.pgmap()["epoch"])
                cycles += 1
                if flapping_at is None and sds_doc(c, victim.name)["flapping"]:
                    flapping_at = cycles
        finally:
            nft.restore()
        print(f"flapping after {flapping_at} drop-restore cycles of {cycles}")
        doc = sds_doc(c, victim.name)
        assert doc["flapping"] and doc["state"] == "disconnected", (doc, c.logs())
        assert flapping_gauge(c, victim.name) == 1.0  # MeshblockSdsFlapping's expression
        # Its heartbeats flowed throughout: it is kept out on its data path alone.
        seen = dt.datetime.fromisoformat(doc["last_seen"])
        assert (dt.datetime.now(dt.UTC) - seen).total_seconds() < 10, doc
        epochs.add(c.pgmap()["epoch"])
        assert max(epochs) - epoch0 <= 2, sorted(epochs)  # at most 2 map epochs
        result = job.result(timeout=180)
        result.assert_clean("through the flaps")
        worst = max(j["write"]["lat_ns"]["max"] for j in result.jobs) / 1e9
        print(
            f"fio: {result.summary()}; largest write latency {worst:.1f} s; epochs {sorted(epochs)}"
        )

        out = meshctl(c, "sds", "clear-flapping", victim.name)
        assert out.returncode == 0, out
        wait_until(
            lambda: sds_doc(c, victim.name)["state"] == "connected",
            60,
            f"{victim.name} proven up after clear-flapping",
            detail=c.logs,
        )
        wait_until(
            lambda: all(pg["state"] == "clean" for pg in c.pgmap()["pgs"]),
            90,
            "every PG clean after the resync",
            detail=c.logs,
        )
        Fio(c.sdc.uri(VOLUME), "gray", root / "fio", size=FIO_SIZE, verify_only=True).run(
            timeout=120
        ).assert_clean("verified after the return")
        replicas_identical(c)
