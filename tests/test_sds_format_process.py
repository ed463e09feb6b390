"""The SDS store's format version 2 with real processes: SIGKILL in the middle of
the upgrade from version 1 and of tombstone updates, and the exit code of an SDS
whose device is of a newer format (docs/sds.md, "Upgrade from version 1",
"Tombstones")."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _sds_v1 import v1_layout, write_v1_device
from test_sds_format import (
    BIG,
    _rewrite_super,
    assert_chunks_intact,
    assert_v1_chunks_intact,
    open_store,
    super_version,
)

# Processes of the store alone (no daemon, no network): a crash needs a process.
pytestmark = pytest.mark.cluster

MiB = 1024 * 1024

_TOMBSTONE_WORKLOAD = textwrap.dedent(
    """
    import asyncio, os, sys
    from meshblock.sds.store import ChunkStore, DeviceSpec

    path, capacity, LAG = sys.argv[1], int(sys.argv[2]), 3
    store = ChunkStore([DeviceSpec(path, capacity, "pool")])
    store.open()
    dev = store.devices[0]

    def report(word, vol):
        # One write(2) per line: print() may write a line in pieces, and a SIGKILL
        # between them leaves a torn line ("added 1" of "added 12").
        os.write(1, b"%s %d\\n" % (word, vol))

    async def main():
        vol = 1
        while True:
            for chunk in range(3):
                if store.needs_reclaim(dev, vol, chunk):
                    await store.reclaim(dev)
                store.write(dev, vol, chunk, 0, bytes([vol % 251 + 1]) * 4096)
            await store.add_tombstones({vol: vol})
            report(b"added", vol)
            if vol > LAG:
                while await store.free_tombstoned(vol - LAG, 1):
                    await asyncio.sleep(0)
                await store.drop_tombstones([vol - LAG])
                report(b"dropped", vol - LAG)
            vol += 1

    asyncio.run(main())
    """
)


def test_sigkill_keeps_acknowledged_tombstones_and_drops(tmp_path: Path) -> None:
    """SIGKILL of a process that writes, tombstones, frees and drops volumes in a
    loop (three tombstones live at a time): every tombstone it reported added and not
    dropped is there after a restart (but the one whose drop was under way), and no
    volume it reported dropped has a chunk or a tombstone."""
    path = tmp_path / "dev.img"
    capacity = 16 * MiB  # 15 slots for at most 4 volumes of 3 chunks
    rng = random.Random(3)
    for _ in range(6):
        # Unbuffered: communicate() reads the pipe itself, so lines that a buffered
        # readline() had already taken in beyond the first would be lost (a volume
        # reported added whose "dropped" line vanished fails the check below).
        proc = subprocess.Popen(
            [sys.executable, "-c", _TOMBSTONE_WORKLOAD, str(path), str(capacity)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        # The kill comes a random time after the first report, not after the start:
        # on a loaded machine the interpreter's start alone can take a second.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        time.sleep(rng.uniform(0.3, 0.8))
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate()
        out = first + rest
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines = [line.split() for line in out.splitlines(keepends=True) if line.endswith(b"\n")]
        added = {int(vol) for word, vol in lines if word == b"added"}
        dropped = {int(vol) for word, vol in lines if word == b"dropped"}
        assert added, err.decode()
        store = open_store(path, capacity=capacity)
        in_flight = {max(added) - 3, max(added) + 1}  # a drop, an add under way
        try:
            assert len(added - dropped) >= 3
            for vol in added - dropped - in_flight:
                assert store.is_tombstoned(vol) and store.read(vol, 0, 0, 1) is None
            for vol in dropped:
                assert not store.is_tombstoned(vol)
                assert store.tombstone_chunks_left(vol) == 0
            assert set(store.tombstones()) <= (added - dropped) | in_flight
        finally:
            store.close()
        path.unlink()


_UPGRADE = textwrap.dedent(
    """
    import sys, time
    from meshblock.sds import device_io as dio
    from meshblock.sds.store import ChunkStore, DeviceSpec

    stop_at, syncs = int(sys.argv[3]), 0

    def hold(real):
        def sync(fd):
            global syncs
            syncs += 1
            if syncs == stop_at:
                print("at sync", syncs, flush=True)
                time.sleep(600)  # until SIGKILL
            real(fd)
        return sync

    dio.fdatasync, dio.fsync = hold(dio.fdatasync), hold(dio.fsync)
    store = ChunkStore([DeviceSpec(sys.argv[1], int(sys.argv[2]), "pool")])
    store.open()
    print("upgraded", flush=True)
    time.sleep(600)
    """
)


def test_sigkill_at_every_sync_of_the_upgrade(tmp_path: Path) -> None:
    """SIGKILL of a process upgrading a version 1 device that must move chunks, at
    each of its syncs in turn (the writes before it are in the page cache, none after
    it): the device is a valid version 1 or version 2 device with every chunk intact,
    and the next open completes the upgrade."""
    path = tmp_path / "dev.img"
    slots, _ = v1_layout(BIG)
    chunks = {(7, i): slots - 1 - 3 * i for i in range(8)} | {(8, 0): 2}
    seen = []
    stop_at = 1
    while True:
        write_v1_device(path, BIG, chunks, clean=stop_at % 2 == 0)
        proc = subprocess.Popen(
            [sys.executable, "-c", _UPGRADE, str(path), str(BIG), str(stop_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert line in (f"at sync {stop_at}\n".encode(), b"upgraded\n"), err.decode()
        version = super_version(path)
        seen.append(version)
        if version == 1:
            assert_v1_chunks_intact(path, chunks)
        store = open_store(path, BIG)
        try:
            assert store.devices[0].version == 2
            assert_chunks_intact(store, chunks)
        finally:
            store.close()
        if line == b"upgraded\n":
            break
        stop_at += 1
    # killed at the sync of the load, the copies, the entries, the zeroing (version 1
    # on the disk), the switch and after (version 2: the superblock is written)
    assert seen[:4] == [1] * 4 and set(seen[4:]) == {2}, seen


def test_sds_exits_3_on_a_device_of_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    open_store(path, 16 * MiB).close()
    _rewrite_super(path, version=3)
    config = tmp_path / "sds.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            name = "sds-newer"
            protection_domain = "pd1"
            address = "127.0.0.1"
            mdm_urls = ["http://127.0.0.1:9"]
            cluster_secret = "s3cret-for-this-test-only"
            state_dir = "{tmp_path / "state"}"
            [data]
            host = "127.0.0.1"
            port = 0
            [control]
            host = "127.0.0.1"
            port = 0
            [[devices]]
            path = "{path}"
            capacity = "16MiB"
            pool = "p1"
            """
        )
    )
    before = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "meshblock.sds", "--config", str(config)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"format version 3 is newer than this release supports (2)" in proc.stderr
    assert path.read_bytes() == before
