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

import _tls
from _cluster import SmallCluster, small_cluster
from _sds import DEVICE_BYTES, POOL, SdsDaemon, wait_copy_jobs_ended
from meshblock import pgmap_doc
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.checksums import BLOCK
from meshblock.sds.store import SUPER_SIZE, Device, DeviceSpec
from meshblock.tools.replica_check import check_volume
from meshblock.wire import PeerRole, RequestError, Status, WireClient
from test_failover import HEARTBEAT_TIMEOUT_S, wait_degraded
from test_nbd_server import qemu_io, run, tool
from test_resync import wait_clean

pytestmark = pytest.mark.cluster

VOLUME = "heal1"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def hc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    settings = {"cluster": {"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}}
    with small_cluster(tmp_path_factory.mktemp("heal"), VOLUME, "64MiB", settings) as c:
        yield c


_IDS: dict[str, int] = {}


def sds_id(c: SmallCluster, d: SdsDaemon) -> int:
    """The SDS's id (asked once: it is also needed while the SDS is stopped)."""
    if d.name not in _IDS:
        _IDS[d.name] = c.sds_id(d)
    return _IDS[d.name]


def copies(c: SmallCluster, chunk: int) -> tuple[SdsDaemon, SdsDaemon]:
    """The primary and the secondary SDS of the volume's chunk."""
    doc = pgmap_doc.parse(c.pgmap())
    entry = doc.pgs[pg_of(c.volume_id, chunk, doc.pg_count)]
    assert entry.primary is not None and entry.secondary is not None, entry
    by_id = {sds_id(c, d): d for d in c.sds}
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
    text = sds.metrics()
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
    # verify names the bad copy and, asked to repair (--repair), has it healed
    report = asyncio.run(
        check_volume(
            vol, hc.pgmap(), hc.mdm.cluster_secret, repair=True, tls=_tls.data_context(hc.mdm.tls)
        )
    ).to_json()
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


def read_eio(c: SmallCluster, offset: int, length: int) -> str:
    """qemu-io's output of a read through NBD that must fail with EIO."""
    uri = c.sdc.uri(VOLUME)
    proc = run(
        tool("qemu-io"), "-f", "raw", "-r", "-c", f"read {offset} {length}", uri, check=False
    )
    out = proc.stdout + proc.stderr
    assert "Input/output error" in out, out
    return out


async def raw_blocks(c: SmallCluster, sds: SdsDaemon, chunk: int) -> list[bytes | int]:
    """Each 4 KiB block of the SDS's own copy of the chunk (CHUNK_READ_RAW, as a tool),
    or the status it was refused with."""
    out: list[bytes | int] = []
    async with await WireClient.connect(
        "127.0.0.1", sds.data_port, c.mdm.cluster_secret, PeerRole.TOOL, tls=sds.data_tls()
    ) as cl:
        for b in range(CHUNK_SIZE // BLOCK):
            try:
                out.append(
                    bytes((await cl.read_raw_chunk(c.volume_id, chunk, b * BLOCK, BLOCK)).data)
                )
            except RequestError as exc:
                out.append(int(exc.status))
    return out


def test_a_resync_heals_its_source_and_marks_bad_what_no_copy_has(hc: SmallCluster) -> None:
    """A stale secondary comes back; its primaries copy what they wrote alone. Chunk
    ``healed`` has a bad block that was not written since: the primary repairs it from
    the stale copy (its bytes are the ones recorded) and copies it. Chunk ``lost`` has
    a bad block written while the secondary was away: no copy has its bytes, so the
    copy gets it marked bad (EIO there, not zeroes or the stale bytes); the rest of
    the chunk is copied and the resync completes."""
    victim = copies(hc, 4)[1]
    dead = sds_id(hc, victim)
    healed, lost = [c for c in range(4, 64) if copies(hc, c)[1] is victim][:2]
    for chunk in (healed, lost):
        write_chunk(hc, chunk, 0x21)
    assert victim.stop() == 0
    wait_degraded(hc, dead)
    qemu_io(
        hc.sdc.uri(VOLUME),
        f"write -P 0x42 {healed * MiB} 4k",
        f"write -P 0x42 {lost * MiB} 4k",
        "flush",
    )
    p_healed, p_lost = copies(hc, healed)[0], copies(hc, lost)[0]
    where_healed = block_offset(p_healed, hc.volume_id, healed, 10)
    flip(p_healed, where_healed + 1)
    flip(p_lost, block_offset(p_lost, hc.volume_id, lost, 0) + 1)
    before = {d.name: counters(d) for d in (p_healed, p_lost)}

    victim.start()
    victim.wait_serving()
    wait_clean(hc)
    wait_copy_jobs_ended(hc.sds)

    assert block_bytes(p_healed, where_healed) == b"\x21" * BLOCK
    after = counters(p_healed)
    assert after["repaired"] >= before[p_healed.name]["repaired"] + 1, (before, after)
    want = [b"\x42" * BLOCK] + [b"\x21" * BLOCK] * (CHUNK_SIZE // BLOCK - 1)
    assert asyncio.run(raw_blocks(hc, victim, healed)) == want
    got = asyncio.run(raw_blocks(hc, victim, lost))
    assert got[0] == Status.IO_ERROR, got[0]
    assert got[1:] == want[1:]
    assert counters(p_lost)["unrepairable"] > before[p_lost.name]["unrepairable"]
    assert p_lost.health()["resync"]["marked_bad_blocks_total"] >= 1
    qemu_io(
        hc.sdc.uri(VOLUME),
        f"read -P 0x42 {healed * MiB} 4k",
        f"read -P 0x21 {healed * MiB + BLOCK} 1020k",
        f"read -P 0x21 {lost * MiB + BLOCK} 1020k",
        read_only=True,
    )
    read_eio(hc, lost * MiB, BLOCK)
