"""NBD clients this project did not write against one lab (``meshctl lab up``).

qemu-io (patterns at unaligned offsets, verified), nbdcopy (1 GiB of random data in
and back out, equal sha256), ``nbdinfo --list``, fio's nbd engine with
``verify=crc32c``; then the replica checker (``meshctl volume verify``) after
concurrent overlapping writes from several connections proves both copies of every
chunk identical, and a negative control proves it can fail: one copy of one chunk is
changed behind the primary's back and the checker must report exactly that chunk.

Each test uses its own region of ``vol1`` (3 GiB):

    [0, 1 GiB)             nbdcopy
    [1 GiB, +64 MiB)       qemu-io patterns
    [1.25 GiB, +128 MiB)   fio verify
    [2 GiB, +32 MiB)       concurrent overlapping writes

The negative control corrupts a volume of its own, ``vol2`` (thin, mapped to the
lab's SDC, 3 MiB written): the checker reads every stored chunk of the volume it
checks, and it checks that volume four times (vol1 holds 1.2 GiB by then).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _cluster import LabCluster
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.wire import PeerRole, WireClient
from test_nbd_server import qemu_io, run, tool
from test_nbd_tls import qemu_io_tls

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1024 * 1024
GiB = 1024 * MiB
VOLUME_SIZE = 3 * GiB
QEMU_BASE = GiB
FIO_BASE = GiB + 256 * MiB
OVERLAP_BASE = 2 * GiB
OVERLAP_SIZE = 32 * MiB


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabCluster]:
    cluster = LabCluster(tmp_path_factory.mktemp("nbd-clients") / "lab", volume_size="3GiB")
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.cleanup()
    for log in sorted((cluster.root / "logs").glob("*")):
        text = log.read_text(errors="replace")
        at = text.find("Traceback")
        assert at < 0, f"{log.name} has a traceback:\n{text[max(0, at - 2000) : at + 6000]}"


def verify(lab: LabCluster, volume: str = "vol1") -> tuple[int, dict[str, Any]]:
    """``meshctl volume verify VOLUME --json``: (exit code, report)."""
    proc = lab.meshctl("volume", "verify", volume, "--json", check=False, timeout=300)
    assert proc.returncode in (0, 1), proc
    report: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, report


def sha256_of(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left and (block := f.read(min(8 * MiB, left))):
            h.update(block)
            left -= len(block)
    assert left == 0, f"{path} is shorter than {length}"
    return h.hexdigest()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_qemu_io_patterns_at_unaligned_offsets(lab: LabCluster, transport: str) -> None:
    base = QEMU_BASE + (32 * MiB if transport == "unix" else 0)

    def io(*commands: str, read_only: bool = False) -> str:
        if transport == "unix":
            return qemu_io(lab.uri("unix"), *commands, read_only=read_only)
        return qemu_io_tls(lab.nbd_port, "vol1", lab.nbd_tls, *commands, read_only=read_only)

    io(
        f"write -P 0xa1 {base} 64k",
        f"write -P 0xb2 {base + 4097} 12345",  # unaligned, inside the first write
        f"write -P 0xc3 {base + MiB - 999} 3001",  # across a chunk boundary (two PGs)
        f"write -P 0xd4 {base + 3 * MiB - 511} {2 * MiB + 1023}",  # over three chunks
        f"write -f -P 0xe5 {base + 10 * MiB + 7} 1",  # FUA, one byte
        f"write -z {base + 20 * MiB} {3 * MiB}",
        f"discard {base + 24 * MiB + 512} {MiB}",
        "flush",
    )
    io(
        f"read -P 0xa1 {base} 4097",
        f"read -P 0xb2 {base + 4097} 12345",
        f"read -P 0xa1 {base + 4097 + 12345} {65536 - 4097 - 12345}",
        f"read -P 0 {base + 65536} {MiB - 999 - 65536}",
        f"read -P 0xc3 {base + MiB - 999} 3001",
        f"read -P 0xd4 {base + 3 * MiB - 511} {2 * MiB + 1023}",
        f"read -P 0xe5 {base + 10 * MiB + 7} 1",
        f"read -P 0 {base + 10 * MiB + 8} 4096",
        f"read -P 0 {base + 20 * MiB} {3 * MiB}",
        f"read -P 0 {base + 24 * MiB} {2 * MiB}",
        read_only=True,
    )


def test_nbdcopy_1gib_random_in_and_out(lab: LabCluster, tmp_path: Path) -> None:
    src = tmp_path / "random.img"
    with open(src, "wb") as f:
        subprocess.run(["head", "-c", str(GiB), "/dev/urandom"], stdout=f, check=True, timeout=120)
    want = sha256_of(src, GiB)
    run(tool("nbdcopy"), str(src), lab.uri("tcp"), timeout=600)
    src.unlink()  # keep /tmp small: out.img is the volume's whole 3 GiB (sparse)
    out = tmp_path / "out.img"
    run(tool("nbdcopy"), lab.uri("unix"), str(out), timeout=600)
    assert out.stat().st_size == VOLUME_SIZE
    assert sha256_of(out, GiB) == want


def test_nbdinfo_list(lab: LabCluster) -> None:
    doc = json.loads(run(tool("nbdinfo"), "--list", "--json", lab.uri("tcp")).stdout)
    (export,) = doc["exports"]
    assert export["export-name"] == "vol1"
    assert export["export-size"] == VOLUME_SIZE
    assert export["is_read_only"] is False and export["can_flush"] is True
    text = run(tool("nbdinfo"), "--list", lab.uri("unix", volume="")).stdout
    assert 'export="vol1"' in text


def fio(lab: LabCluster, *args: str, timeout: float = 300) -> dict[str, Any]:
    proc = run(
        tool("fio"),
        "--ioengine=nbd",
        f"--uri={lab.uri('unix')}",  # fio's libnbd may not read tls-certificates
        "--output-format=json",
        "--verify_state_save=0",  # no state file in the working directory
        *args,
        timeout=timeout,
    )
    doc: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return doc


def test_fio_random_writes_verified_with_crc32c(lab: LabCluster) -> None:
    doc = fio(
        lab,
        "--name=verify",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        f"--offset={FIO_BASE}",
        "--size=128M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randseed=42",
    )
    (job,) = doc["jobs"]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] >= 128 * MiB
    # The verify phase read back what was written and checked every block's crc32c.
    assert job["read"]["io_bytes"] >= 128 * MiB, job["read"]


def test_replicas_identical_after_concurrent_overlapping_writes(lab: LabCluster) -> None:
    # Four connections at once, each with 16 requests in flight, writing fresh random
    # data of odd sizes at odd offsets over the same 32 MiB: many writes overlap,
    # within and across chunks.
    doc = fio(
        lab,
        "--name=overlap",
        "--rw=randwrite",
        "--bsrange=1k-300k",
        "--bs_unaligned=1",
        "--refill_buffers=1",
        "--randrepeat=0",
        f"--offset={OVERLAP_BASE}",
        f"--size={OVERLAP_SIZE}",
        "--iodepth=16",
        "--numjobs=4",
        "--time_based=1",
        "--runtime=8",
    )
    assert all(job["error"] == 0 for job in doc["jobs"]), doc["jobs"]
    assert sum(job["write"]["io_bytes"] for job in doc["jobs"]) > 4 * OVERLAP_SIZE
    rc, report = verify(lab)
    assert rc == 0, report
    assert report["ok"] is True
    assert report["differences"] == [] and report["unchecked"] == []
    assert report["chunks"] == VOLUME_SIZE // CHUNK_SIZE
    # Every chunk of the workload (and of the earlier tests) is stored on both copies.
    assert report["stored_on_both"] >= OVERLAP_SIZE // CHUNK_SIZE


async def _corrupt_secondary(
    lab: LabCluster, volume: str, chunk: int, offset: int, data: bytes
) -> str:
    """Write ``data`` into the secondary copy only, as its primary would replicate it
    (an injected fault: REPL_WRITE with the SDS_PEER role); returns the SDS's name."""
    api = lab.api()
    status, vols = api.get("/api/v1/volumes")
    assert status == 200
    (vol,) = [v for v in vols["volumes"] if v["name"] == volume]
    status, pgmap = api.get(f"/api/v1/pools/{vol['pool_id']}/pgmap")
    assert status == 200
    pg = pg_of(vol["id"], chunk, pgmap["pg_count"])
    secondary = pgmap["pgs"][pg]["secondary"]["sds_id"]
    where = pgmap["sds"][str(secondary)]
    # as the PG's primary (its certificate from the lab's): the only SDS whose replica
    # writes the secondary takes
    primary = pgmap["sds"][str(pgmap["pgs"][pg]["primary"]["sds_id"])]["name"]
    tls = lab.data_tls(f"sds-{primary}")
    client = await WireClient.connect(
        where["address"], where["data_port"], lab.secret, PeerRole.SDS_PEER, tls=tls
    )
    try:
        await client.repl_write(
            ChunkRef(vol["pool_id"], pg, pgmap["epoch"], vol["id"], chunk), offset, data
        )
    finally:
        await client.close()
    status, sds = api.get(f"/api/v1/sds/{secondary}")
    assert status == 200
    return str(sds["name"])


CHECKED = "vol2"


def test_checker_reports_a_corrupted_replica(lab: LabCluster) -> None:
    """Negative control: the checker does fail when one copy differs."""
    lab.meshctl("volume", "create", CHECKED, "--pool", "sp1", "--size", "1GiB")
    lab.meshctl("volume", "map", CHECKED, "--sdc", "sdc1")
    lab.wait_sdc(
        f"the SDC to export {CHECKED}", lambda h: CHECKED in {e["name"] for e in h["exports"]}
    )
    uri = lab.uri("unix", volume=CHECKED)
    base = 4 * MiB
    chunk, offset = base // CHUNK_SIZE + 1, 12345
    qemu_io(uri, f"write -P 0x77 {base} {3 * MiB}", "flush")
    rc, report = verify(lab, CHECKED)
    assert rc == 0, report
    assert report["stored_on_both"] == 3, report  # the chunks written just now

    name = asyncio.run(_corrupt_secondary(lab, CHECKED, chunk, offset, b"\x88" * 100))
    rc, report = verify(lab, CHECKED)
    assert rc == 1
    assert report["ok"] is False
    (diff,) = report["differences"]
    assert diff["chunk"] == chunk and diff["secondary"] == name
    assert diff["offset_in_chunk"] == offset and diff["differing_bytes"] == 100
    assert diff["volume_offset"] == chunk * CHUNK_SIZE + offset
    human = lab.meshctl("volume", "verify", CHECKED, check=False)
    assert human.returncode == 1 and "DIFFERENT: 1 chunk" in human.stdout, human.stdout
    # Reads come from the primary: the client still sees its data.
    qemu_io(uri, f"read -P 0x77 {base} {3 * MiB}", read_only=True)

    # Rewriting the range through the SDC writes both copies: identical again.
    qemu_io(uri, f"write -P 0x78 {chunk * CHUNK_SIZE} {CHUNK_SIZE}", "flush")
    rc, report = verify(lab, CHECKED)
    assert rc == 0, report
