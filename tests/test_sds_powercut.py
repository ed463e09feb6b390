"""Power cuts of SDSs in a running cluster (docs/sds.md, "Power cuts"): an SDS loses
the pages it wrote since its last sync (the store's test-only fault hook,
``tests/_faults.py``) and dies; it returns. Then every PG is clean again only with two
identical copies (the replica checker compares every chunk), and every write
acknowledged with FUA, or before a FLUSH that completed, reads back.

Real MDM, three real SDSs, the real SDC; IO through NBD with qemu-io: per chunk of the
volume, a region written and then flushed, one written with FUA, and one written
without either (acknowledged, still in the SDSs' page caches: what the power cut
loses on one copy and not on the other)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, small_cluster
from _faults import FaultySds, make_faulty
from _fio import fio_binary
from _wait import wait_until
from test_faults import assert_no_tracebacks, replicas_identical, wait_settled
from test_nbd_server import qemu_io, run

pytestmark = pytest.mark.cluster

MiB = 1024 * 1024
VOLUME = "pc1"
CHUNKS = 32  # chunks written: every PG (32) gets about one
# Heartbeats alone never declare an SDS down here: only a failed IO reported by a
# peer or the SDC does (confirmed by the MDM), or nothing when no IO comes meanwhile.
SETTINGS = {"cluster": {"heartbeat_timeout_s": 60.0, "rebuild_delay_s": 3600.0}}
SETTLE_TIMEOUT_S = 90.0

FLUSHED, FUA, UNFLUSHED, DURING = 0, 256 * 1024, 512 * 1024, 768 * 1024  # in each chunk


@pytest.fixture
def pc(tmp_path: Path) -> Iterator[SmallCluster]:
    every = make_faulty({"sds1", "sds2", "sds3"})
    with small_cluster(tmp_path, VOLUME, "1GiB", SETTINGS, make_sds=every) as c:
        yield c


def faulty(c: SmallCluster, i: int) -> FaultySds:
    sds = c.sds[i]
    assert isinstance(sds, FaultySds)
    return sds


def write_round(c: SmallCluster, seq: int) -> None:
    """Per chunk: 64 KiB then FLUSH; 64 KiB with FUA; 64 KiB acknowledged only."""
    uri = c.sdc.uri(VOLUME)
    qemu_io(uri, *[f"write -P {seq} {n * MiB + FLUSHED} 64k" for n in range(CHUNKS)], "flush")
    qemu_io(uri, *[f"write -f -P {seq + 1} {n * MiB + FUA} 64k" for n in range(CHUNKS)])
    # qemu-io flushes when it closes the image; fio's nbd engine does not
    done = run(
        fio_binary(),
        "--name=unflushed",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=write:960k",  # 64 KiB, then skip to the same offset of the next chunk
        "--bs=64k",
        f"--offset={UNFLUSHED}",
        f"--io_size={CHUNKS * 64}k",
        f"--buffer_pattern={seq + 2:#x}",
    )
    assert "error" not in done.stderr.lower(), done.stderr


def unsynced(sds: FaultySds) -> int:
    return int(sum(sds.fault_state()["unsynced_pages"].values()))


def power_cut(sds: FaultySds, lose: str = "all", seed: int = 0) -> int:
    """Cut its power; how many pages it had not synced (lost now: all of them, or
    each with probability 1/2, as pages reach a disk in any order)."""
    lost = unsynced(sds)
    sds.power_cut(lose, seed)
    return lost


def check_durable(c: SmallCluster, seq: int) -> None:
    """Both copies identical; the flushed and the FUA regions of round ``seq`` read
    back (the unflushed one may hold either its new or its old bytes); no SDS found a
    block that does not match its checksum (docs/sds.md, "Checksums")."""
    wait_settled(c, "every PG clean after the power cut", SETTLE_TIMEOUT_S)
    replicas_identical(c)  # every chunk compared: identical
    qemu_io(
        c.sdc.uri(VOLUME),
        *[f"read -P {seq} {n * MiB + FLUSHED} 64k" for n in range(CHUNKS)],
        *[f"read -P {seq + 1} {n * MiB + FUA} 64k" for n in range(CHUNKS)],
        read_only=True,
    )
    assert_no_tracebacks(c)
    for sds in c.sds:
        r = sds.control_get("/metrics")
        assert r.status == 200, r.body
        lines = str(r.body).splitlines()
        counts = [x for x in lines if x.startswith("meshblock_sds_checksum_errors_total{")]
        assert counts and all(x.endswith(" 0.0") for x in counts), (sds.name, counts)


def test_a_short_power_cut_the_mdm_never_saw(pc: SmallCluster) -> None:
    """No IO while the SDS is away: nothing declares it down; it registers again
    with its unclean start, and its copies must not stay clean on its word."""
    victim = faulty(pc, 0)
    write_round(pc, 0x10)
    assert power_cut(victim) > 0, "no unflushed write on the victim: the test proves nothing"
    victim.start()
    victim.wait_serving()
    check_durable(pc, 0x10)
    assert "after an unclean stop" in pc.mdm.log_text()


def test_a_power_cut_declared_down_then_back(pc: SmallCluster) -> None:
    """IO while the SDS is away: the SDC's failed writes get it declared down, its
    PGs degraded; every other chunk is written meanwhile (the primaries' delta
    records list those, not the writes the victim lost)."""
    victim = faulty(pc, 1)
    vid = pc.sds_id(victim)
    write_round(pc, 0x20)
    assert power_cut(victim) > 0, "no unflushed write on the victim: the test proves nothing"
    uri = pc.sdc.uri(VOLUME)
    qemu_io(uri, *[f"write -P 0x2f {n * MiB + DURING} 64k" for n in range(0, CHUNKS, 2)], "flush")
    wait_until(
        lambda: any(
            pg["state"] != "clean" and vid in (pg["primary"]["sds_id"], pg["secondary"]["sds_id"])
            for pg in pc.pgmap()["pgs"]
        ),
        30.0,
        "the victim's PGs degraded",
    )
    victim.start()
    victim.wait_serving()
    check_durable(pc, 0x20)
    qemu_io(
        uri,
        *[f"read -P 0x2f {n * MiB + DURING} 64k" for n in range(0, CHUNKS, 2)],
        read_only=True,
    )


def test_both_copies_lose_power(pc: SmallCluster) -> None:
    """Two SDSs lose power together: PGs with both copies on them had two unclean
    starts; one copy is picked and the other made identical to it. The second loses
    a random half of its unsynced pages (torn chunks)."""
    first, second = faulty(pc, 0), faulty(pc, 2)
    write_round(pc, 0x30)
    assert power_cut(first) > 0 and power_cut(second, "random", seed=30) > 0
    first.start()
    second.start()
    first.wait_serving()
    second.wait_serving()
    check_durable(pc, 0x30)


def wait_up_not_serving(sds: FaultySds) -> None:
    """Until its control port answers; it must not serve on its cached maps."""

    def up() -> dict[str, Any] | None:
        return sds.health() if sds.reachable() else None

    health = sds.wait(up, 30.0, f"{sds.name} up")
    assert health is not None
    assert health["state"] == "starting", f"serves on cached maps: {health}"


def test_restarts_before_the_mdm_heard_of_the_power_cut(pc: SmallCluster) -> None:
    """The MDM is down when the SDS loses power, and the SDS restarts twice before it
    returns: once killed (the same boot as its unclean start), once stopped cleanly
    (which marks its devices CLEAN). Its copies still need a full copy: the fact is
    kept until the MDM has accepted a registration that carries it."""
    victim = faulty(pc, 0)
    write_round(pc, 0x40)
    assert pc.mdm.stop() == 0
    assert power_cut(victim) > 0, "no unflushed write on the victim: the test proves nothing"
    victim.start()  # unclean start; the MDM cannot hear of it
    wait_up_not_serving(victim)
    assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
    victim.start()  # the same boot as the unclean start
    wait_up_not_serving(victim)
    assert victim.stop() == 0  # a clean stop: CLEAN on its device
    victim.start()
    wait_up_not_serving(victim)
    pc.mdm.start()
    victim.wait_serving()
    check_durable(pc, 0x40)
    assert "after an unclean stop" in victim.log_text()


def test_a_power_cut_in_maintenance(pc: SmallCluster) -> None:
    """The SDS is in maintenance (its PGs degraded, their primaries recording only
    the writes made meanwhile) when it loses power: the delta resync on exit would
    miss what it lost, so its copies are dropped at its registration and copied whole
    elsewhere (docs/mdm.md, "Unclean starts")."""
    victim = faulty(pc, 2)
    vid = pc.sds_id(victim)
    write_round(pc, 0x50)
    api = pc.mdm.api()
    status, doc = api.post(f"/api/v1/sds/{vid}/maintenance", {"mode": "enter"})
    assert status == 200, doc
    assert power_cut(victim) > 0, "no unflushed write on the victim: the test proves nothing"
    uri = pc.sdc.uri(VOLUME)
    qemu_io(uri, *[f"write -P 0x5f {n * MiB + DURING} 64k" for n in range(0, CHUNKS, 2)], "flush")
    victim.start()
    victim.wait_serving()
    status, doc = api.post(f"/api/v1/sds/{vid}/maintenance", {"mode": "exit"})
    assert status == 200, doc
    check_durable(pc, 0x50)
    qemu_io(
        uri,
        *[f"read -P 0x5f {n * MiB + DURING} 64k" for n in range(0, CHUNKS, 2)],
        read_only=True,
    )
