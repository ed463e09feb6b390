"""Background scrub in a whole cluster (docs/sds.md and docs/mdm.md, "Scrub"): an
MDM, three SDSs, the SDC and fio through NBD. Bytes are flipped behind the SDSs'
backs in their device files (each chunk found through the store's own index), on
primaries' and secondaries' copies, on several SDSs; one block is changed on one copy
with its checksum rewritten to match (a divergence, not corruption). ``meshctl scrub
start`` runs a pass while fio writes and verifies another region: the pass finds
every planted bad block and repairs it from the other copy (each SDS that held bad
blocks counts them in meshblock_sds_checksum_errors_total), reports the divergence
without touching it, ends while fio still runs, and fio sees no error; the region
read back afterwards (fio's verify) is right everywhere. ``meshctl scrub pause`` and
``start`` drive the pool's state.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import SmallCluster, meshctl_command, small_cluster
from _fio import Fio
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.checksums import ROW_SIZE, crc
from meshblock.sds.store import REGION_CHECKSUMS, SUPER_SIZE, SUPERBLOCK, Device, DeviceSpec

pytestmark = pytest.mark.cluster

VOLUME = "sc1"
REGION = 16 * 1024 * 1024  # fio's region: chunks 0..15 (corrupted), then 32 MiB.. (load)
LOAD_OFFSET = 32 * 1024 * 1024
WAIT_S = 120.0
SETTINGS = {
    "cluster": {"heartbeat_timeout_s": 5.0, "rebuild_delay_s": 600.0},
    # no pass of its own during the test; paced, as deployed, but faster
    "scrub": {"start_delay_s": 3600.0, "bandwidth_mibps": 64},
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SmallCluster]:
    with small_cluster(tmp_path / "c", VOLUME, "64MiB", SETTINGS) as c:
        yield c


def meshctl(c: SmallCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*meshctl_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**c.mdm.env(), "MESHBLOCK_CLUSTER_SECRET": c.mdm.cluster_secret},
        stdin=subprocess.DEVNULL,
    )


def located(path: Path, volume: int, chunk: int) -> tuple[int, int]:
    """(offset of the chunk's slot, offset of its checksum row) in a live SDS's
    device file, from the store's own index (read only: the SDS keeps running)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, SUPER_SIZE, 0)
        capacity = SUPERBLOCK.unpack_from(head)[3]
        dev = Device(DeviceSpec(str(path), capacity, "pool1"))
        dev.fd = fd
        dev._load_super(head, os.fstat(fd).st_size)
        for slot, v, ch, _ in dev.read_index():
            if (v, ch) == (volume, chunk):
                return dev.slot_offset(slot), dev.regions[REGION_CHECKSUMS][0] + slot * ROW_SIZE
    finally:
        os.close(fd)
    raise AssertionError(f"chunk {volume}/{chunk} not in {path}'s index")


def flip(path: Path, offset: int, fix_row_at: int | None = None) -> None:
    """Flip one byte; with ``fix_row_at`` (the block's checksum's offset) also store
    the checksum of the changed block: the copy then matches its own checksums."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        if fix_row_at is not None:
            start = offset - offset % 4096
            f.seek(start)
            block = f.read(4096)
            f.seek(fix_row_at)
            f.write(crc(block).to_bytes(4, "big"))
        f.flush()
        os.fsync(f.fileno())


def forget(path: Path, row_at: int) -> None:
    """Zero one block's stored checksum (at ``row_at``): none recorded, as a store
    written before checksums (or with them off) leaves it."""
    with open(path, "r+b") as f:
        f.seek(row_at)
        f.write(bytes(4))
        f.flush()
        os.fsync(f.fileno())


def checksum_errors(sds: Any) -> float:
    """An SDS's meshblock_sds_checksum_errors_total, all devices."""
    r = sds.control_get("/metrics")
    assert r.status == 200, r.body
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in str(r.body).splitlines()
        if line.startswith("meshblock_sds_checksum_errors_total{")
    )


def scrub_doc(c: SmallCluster) -> dict[str, Any]:
    status, doc = c.mdm.api().get(f"/api/v1/pools/{c.pool_id}/scrub")
    assert status == 200, doc
    return dict(doc)


def filled(c: SmallCluster, tmp_path: Path, size: str) -> tuple[dict[str, Any], dict[int, Any]]:
    """Write the volume's first ``size`` bytes with fio; the PG map and the SDSs by id."""
    Fio(c.sdc.uri(VOLUME), "fill", tmp_path / "fio", offset=0, size=size, bs="64k").start().result(
        timeout=WAIT_S
    ).assert_clean(c.logs())
    return c.pgmap(), {c.sds_id(d): d for d in c.sds}


def test_a_scrub_pass_finds_and_repairs_planted_corruption_under_fio_load(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    c = cluster
    uri = c.sdc.uri(VOLUME)
    pgmap, by_id = filled(c, tmp_path, "16M")
    planted: dict[str, int] = {"primary": 0, "secondary": 0}
    victims: dict[str, Any] = {}
    for i, chunk in enumerate(range(0, REGION // CHUNK_SIZE, 2)):
        pg = pgmap["pgs"][pg_of(c.volume_id, chunk, pgmap["pg_count"])]
        role = ("primary", "secondary")[i % 2]
        victim = by_id[pg[role]["sds_id"]]
        slot_at, _ = located(victim.device, c.volume_id, chunk)
        block = (i * 37) % 256
        flip(victim.device, slot_at + block * 4096 + 100)
        planted[role] += 1
        victims[victim.name] = victim
    assert len(victims) >= 2, victims
    # One divergence: a block changed on a secondary with its checksum to match.
    chunk = 1
    pg = pgmap["pgs"][pg_of(c.volume_id, chunk, pgmap["pg_count"])]
    victim = by_id[pg["secondary"]["sds_id"]]
    slot_at, row_at = located(victim.device, c.volume_id, chunk)
    flip(victim.device, slot_at + 9 * 4096 + 5, fix_row_at=row_at + 9 * 4)

    load = Fio(uri, "load", tmp_path / "fio", offset=LOAD_OFFSET, size="16M", rate_iops=400).start()
    out = meshctl(c, "scrub", "start", "pool1")
    assert out.returncode == 0, out.stderr
    wait_until(
        lambda: scrub_doc(c)["passes_completed"] >= 1, WAIT_S, "a complete scrub pass", interval=0.5
    )
    doc = scrub_doc(c)
    under_load = load.running()  # fio still writing or verifying when the pass ended
    load.result(timeout=WAIT_S).assert_clean(c.logs())
    assert under_load, "fio ended before the scrub pass: the pass ran without load"
    # each SDS whose copy had bad blocks counted them (meshblock_sds_checksum_errors_total)
    for name, victim in victims.items():
        assert checksum_errors(victim) > 0, name
    errors = doc["errors"]
    assert errors["primary"] == planted["primary"], (doc, planted)
    assert errors["secondary"] == planted["secondary"], (doc, planted)
    assert errors["unrecoverable"] == 0 and errors["divergent"] == 1, doc
    assert doc["repaired_blocks"] == sum(planted.values()), doc
    assert doc["last_complete_at"] is not None and doc["state"] == "idle"
    divergent = [f for f in doc["findings"] if f["kind"] == "divergent"]
    assert [(f["chunk"], f["blocks"], f["repaired"]) for f in divergent] == [(1, [9], False)]
    # Every block reads back right: the primaries' bad blocks would be EIO otherwise.
    Fio(
        uri, "fill", tmp_path / "fio", offset=0, size="16M", bs="64k", verify_only=True
    ).start().result(timeout=WAIT_S).assert_clean(c.logs())
    # A second pass finds nothing new but the divergence, still there.
    assert meshctl(c, "scrub", "start", "pool1").returncode == 0
    wait_until(lambda: scrub_doc(c)["passes_completed"] >= 2, WAIT_S, "a second pass", interval=0.5)
    again = scrub_doc(c)["errors"]
    assert again == {**errors, "divergent": 2}, again
    text = meshctl(c, "scrub", "status")
    assert text.returncode == 0 and "divergent" in text.stdout, text.stdout


def test_meshctl_scrub_pause_and_start(cluster: SmallCluster) -> None:
    c = cluster
    out = meshctl(c, "--json", "scrub", "pause", "pool1")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "paused"
    status = json.loads(meshctl(c, "--json", "scrub", "status").stdout)
    assert [p["state"] for p in status["pools"]] == ["paused"]
    out = meshctl(c, "--json", "scrub", "start", "pool1")
    assert json.loads(out.stdout)["state"] in ("running", "idle"), out.stdout
    watched = meshctl(c, "--json", "scrub", "status", "--watch", "--interval", "0.5")
    assert watched.returncode == 0, watched.stderr
    (pool,) = json.loads(watched.stdout)["pools"]
    assert pool["state"] == "idle" and pool["passes_completed"] == 1, pool
    assert meshctl(c, "scrub", "pause", "nosuchpool").returncode != 0


def verify(c: SmallCluster, *extra: str) -> tuple[int, dict[str, Any]]:
    out = meshctl(c, "--json", "volume", "verify", VOLUME, *extra)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_volume_verify_says_which_copy_is_right_and_repairs_it(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    c = cluster
    pgmap, by_id = filled(c, tmp_path, "8M")
    names = {c.sds_id(d): d.name for d in c.sds}
    expected = []
    for chunk, role, block in ((2, "primary", 5), (4, "secondary", 250)):
        pg = pgmap["pgs"][pg_of(c.volume_id, chunk, pgmap["pg_count"])]
        victim = by_id[pg[role]["sds_id"]]
        other = pg["secondary" if role == "primary" else "primary"]["sds_id"]
        slot_at, _ = located(victim.device, c.volume_id, chunk)
        flip(victim.device, slot_at + block * 4096 + 1)
        expected.append((chunk, [block], victim.name, names[other]))
    # A block without a checksum whose bytes differ from the other copy's good ones:
    # that copy is the bad one, and --repair must really replace it.
    pg = pgmap["pgs"][pg_of(c.volume_id, 7, pgmap["pg_count"])]
    victim = by_id[pg["secondary"]["sds_id"]]
    slot_at, row_at = located(victim.device, c.volume_id, 7)
    flip(victim.device, slot_at + 77 * 4096 + 9)
    forget(victim.device, row_at + 77 * 4)
    expected.append((7, [77], victim.name, names[pg["primary"]["sds_id"]]))
    pg = pgmap["pgs"][pg_of(c.volume_id, 6, pgmap["pg_count"])]
    victim = by_id[pg["secondary"]["sds_id"]]
    slot_at, row_at = located(victim.device, c.volume_id, 6)
    flip(victim.device, slot_at + 3 * 4096, fix_row_at=row_at + 3 * 4)  # divergent

    def found(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (b["chunk"], b["blocks"], b["bad_copy"], b["right_copy"]) for b in doc["bad_blocks"]
        ]

    # Without --repair: reported with the right copy, nothing changed (twice the same).
    for _ in range(2):
        rc, doc = verify(c)
        assert rc == 1 and found(doc) == [tuple(e) for e in expected], doc
        assert not any(b["repaired"] for b in doc["bad_blocks"]), doc
        assert [(d["chunk"], d["judged"]) for d in doc["differences"]] == [(6, "divergent")]
    rc, doc = verify(c, "--repair")
    assert found(doc) == [tuple(e) for e in expected], doc
    assert all(b["repaired"] for b in doc["bad_blocks"]), doc
    assert rc == 1 and [d["chunk"] for d in doc["differences"]] == [6]  # still divergent
    rc, doc = verify(c)
    assert doc["bad_blocks"] == [] and [d["chunk"] for d in doc["differences"]] == [6], doc
    text = meshctl(c, "volume", "verify", VOLUME).stdout
    assert "divergent" in text, text
