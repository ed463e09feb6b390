"""Reads that heal (docs/sds.md, "Healing"): a real MDM, three real SDSs and the real
SDC. One byte of one copy of a chunk is flipped on the SDS's device file (the block
found through the store's own index): the NBD read still returns the right bytes,
the bad copy is rewritten from the other one, and the SDS counts the error and the
repair. The primary's copy is found bad by the client's read; the secondary's, which
the SDC never reads, by ``meshctl volume verify`` (the replica checker reads both
copies with CHUNK_READ_RAW, and the secondary heals itself from the primary). With
both copies bad the read fails with EIO and the other blocks of the chunk still read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

import _http
from _cluster import SmallCluster, small_cluster
from _sds import DEVICE_BYTES, POOL, SdsDaemon
from meshblock import pgmap_doc
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.checksums import BLOCK
from meshblock.sds.store import SUPER_SIZE, Device, DeviceSpec
from meshblock.tools.replica_check import check_volume
from test_nbd_server import qemu_io, run, tool

pytestmark = pytest.mark.cluster

VOLUME = "heal1"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def hc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    with small_cluster(tmp_path_factory.mktemp("heal"), VOLUME, "64MiB", {}) as c:
        yield c


def copies(c: SmallCluster, chunk: int) -> tuple[SdsDaemon, SdsDaemon]:
    """The primary and the secondary SDS of the volume's chunk."""
    doc = pgmap_doc.parse(c.pgmap())
    entry = doc.pgs[pg_of(c.volume_id, chunk, doc.pg_count)]
    assert entry.primary is not None and entry.secondary is not None, entry
    by_id = {c.sds_id(d): d for d in c.sds}
    return by_id[entry.primary.sds_id], by_id[entry.secondary.sds_id]


def block_offset(sds: SdsDaemon, volume: int, chunk: int, block: int) -> int:
    """Where 4 KiB block ``block`` of the chunk is in the SDS's device file, from the
    store's own index (read from the file the running SDS writes)."""
    dev = Device(DeviceSpec(str(sds.device), DEVICE_BYTES, POOL))
    dev.fd = os.open(sds.device, os.O_RDONLY)
    try:
        dev._load_super(os.pread(dev.fd, SUPER_SIZE, 0), os.fstat(dev.fd).st_size)
        for slot, vol, index, _ in dev.read_index():
            if (vol, index) == (volume, chunk):
                return dev.slot_offset(slot) + block * BLOCK
    finally:
        dev.close()
    raise AssertionError(f"{sds.name} holds no slot for chunk {volume}/{chunk}")


def flip(sds: SdsDaemon, offset: int) -> None:
    with open(sds.device, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def block_bytes(sds: SdsDaemon, offset: int) -> bytes:
    with open(sds.device, "rb") as f:
        f.seek(offset)
        return f.read(BLOCK)


def counters(sds: SdsDaemon) -> dict[str, int]:
    dev = sds.health()["devices"][0]
    return {k: int(dev[f"checksum_{k}"]) for k in ("errors", "repaired", "unrepairable")}


def metric(sds: SdsDaemon, name: str) -> float:
    """One device's value of a per-device counter in the SDS's /metrics."""
    text = str(_http.request("GET", sds.control_url + "/metrics", timeout=5).body)
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {sds.name}'s /metrics")


def write_chunk(c: SmallCluster, chunk: int, pattern: int) -> None:
    qemu_io(c.sdc.uri(VOLUME), f"write -P {pattern:#x} {chunk * MiB} 1M", "flush")


def test_a_bad_block_on_the_primary_is_healed_by_the_read(hc: SmallCluster) -> None:
    chunk = 1
    write_chunk(hc, chunk, 0x5A)
    primary, secondary = copies(hc, chunk)
    where = block_offset(primary, hc.volume_id, chunk, 3)
    before = counters(primary)
    flip(primary, where + 100)
    assert block_bytes(primary, where) != b"\x5a" * BLOCK
    qemu_io(hc.sdc.uri(VOLUME), f"read -P 0x5a {chunk * MiB} 1M", read_only=True)
    assert block_bytes(primary, where) == b"\x5a" * BLOCK  # rewritten on the device
    after = counters(primary)
    assert after["errors"] == before["errors"] + 1, (before, after)
    assert after["repaired"] == before["repaired"] + 1, (before, after)
    assert after["unrepairable"] == before["unrepairable"], (before, after)
    assert metric(primary, "meshblock_sds_checksum_repaired_total") == after["repaired"]
    assert counters(secondary)["errors"] == 0


def test_a_bad_block_on_the_secondary_is_healed_by_volume_verify(hc: SmallCluster) -> None:
    chunk = 2
    write_chunk(hc, chunk, 0x6B)
    secondary = copies(hc, chunk)[1]
    where = block_offset(secondary, hc.volume_id, chunk, 200)
    before = counters(secondary)
    flip(secondary, where + 4095)
    vol = {"id": hc.volume_id, "name": VOLUME, "size_bytes": 4 * CHUNK_SIZE}
    report = asyncio.run(check_volume(vol, hc.pgmap(), hc.mdm.cluster_secret)).to_json()
    assert report["ok"] and report["identical"] == 4, report
    assert block_bytes(secondary, where) == b"\x6b" * BLOCK
    after = counters(secondary)
    assert after["repaired"] == before["repaired"] + 1, (before, after)
    assert after["errors"] == before["errors"] + 1, (before, after)
    qemu_io(hc.sdc.uri(VOLUME), f"read -P 0x6b {chunk * MiB} 1M", read_only=True)


def test_a_block_bad_on_both_copies_reads_as_eio_and_nothing_else_fails(
    hc: SmallCluster,
) -> None:
    chunk = 3
    write_chunk(hc, chunk, 0x7C)
    primary, secondary = copies(hc, chunk)
    for sds in (primary, secondary):
        flip(sds, block_offset(sds, hc.volume_id, chunk, 5) + 7)
    before = counters(primary)
    uri = hc.sdc.uri(VOLUME)
    proc = run(
        tool("qemu-io"),
        "-f",
        "raw",
        "-r",
        "-c",
        f"read {chunk * MiB + 5 * BLOCK} 4k",
        uri,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert "Input/output error" in out, out
    # The rest of the chunk and the other chunks still read.
    qemu_io(
        uri,
        f"read -P 0x7c {chunk * MiB} {5 * BLOCK}",
        f"read -P 0x7c {chunk * MiB + 6 * BLOCK} {CHUNK_SIZE - 6 * BLOCK}",
        f"read -P 0x5a {1 * MiB} 1M",
        read_only=True,
    )
    after = counters(primary)
    assert after["unrepairable"] >= before["unrepairable"] + 1, (before, after)
    assert after["repaired"] == before["repaired"], (before, after)
    assert metric(primary, "meshblock_sds_checksum_unrepairable_total") == after["unrepairable"]
