"""The SDS chunk store on real files: IO semantics, thin allocation, persistence,
and crash safety (a process killed with SIGKILL mid-workload, many times)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from meshblock.chunks import CHUNK_SIZE
from meshblock.sds.store import (
    ENTRY,
    INDEX_OFFSET,
    ChunkStore,
    DeviceSpec,
    NoSpace,
    StoreError,
    layout,
)

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1024 * 1024


def make_store(path: Path, capacity: int = 16 * MiB) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(path), capacity, "pool")])
    store.open()
    return store


def test_layout_fits_the_device() -> None:
    for capacity in (2 * MiB, 16 * MiB, 1 << 30, (1 << 40) + 12345):
        slots, data_offset = layout(capacity)
        assert slots >= 1
        assert data_offset % CHUNK_SIZE == 0
        assert data_offset >= INDEX_OFFSET + slots * ENTRY.size
        assert data_offset + slots * CHUNK_SIZE <= capacity
    with pytest.raises(StoreError):
        layout(MiB)


def test_new_file_is_sparse_and_reads_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = make_store(path, 64 * MiB)
    try:
        assert path.stat().st_size == 64 * MiB
        assert path.stat().st_blocks * 512 < 2 * MiB  # sparse
        assert store.read(1, 0, 0, 4096) is None  # a hole: reads as zeroes
        assert store.devices[0].used == 0
    finally:
        store.close()


def test_write_read_zero_trim_and_usage(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.img")
    dev = store.devices[0]
    try:
        store.write(dev, 7, 3, 4096, b"a" * 8192)
        assert dev.used == 1 and store.volume_chunks() == {7: 1}
        got = store.read(7, 3, 0, 3 * 4096)
        assert got is not None
        assert bytes(got) == bytes(4096) + b"a" * 8192
        store.write(dev, 7, 3, 6000, b"b" * 100)  # unaligned overwrite in place
        got = store.read(7, 3, 4096, 8192)
        assert got is not None
        assert bytes(got) == b"a" * 1904 + b"b" * 100 + b"a" * 6188
        assert dev.used == 1
        store.zero(7, 3, 4096, 512)  # partial: zeroes the range, keeps the slot
        got = store.read(7, 3, 4096, 1024)
        assert got is not None and bytes(got) == bytes(512) + b"a" * 512
        assert dev.used == 1
        store.write(dev, 8, 0, 0, b"c")
        assert store.volume_chunks() == {7: 1, 8: 1}
        store.zero(7, 3, 0, CHUNK_SIZE)  # whole chunk: frees the slot
        assert store.read(7, 3, 0, 10) is None
        assert dev.used == 1 and store.volume_chunks() == {8: 1}
        store.zero(9, 9, 0, CHUNK_SIZE)  # never written: nothing to do
    finally:
        store.close()


def test_freed_slot_is_reused_only_after_a_sync(tmp_path: Path) -> None:
    store = make_store(tmp_path / "dev.img", 5 * MiB)
    dev = store.devices[0]
    n = dev.slot_count
    assert n >= 2

    async def main() -> None:
        for chunk in range(n):
            store.write(dev, 1, chunk, 0, b"x" * 4096)
        with pytest.raises(NoSpace):
            store.write(dev, 2, 0, 0, b"y")
        store.zero(1, 0, 0, CHUNK_SIZE)
        assert store.needs_reclaim(dev, 2, 0)  # the slot is not durably free yet
        with pytest.raises(NoSpace):
            store.write(dev, 2, 0, 0, b"y")
        await store.reclaim(dev)
        assert not store.needs_reclaim(dev, 2, 0)
        store.write(dev, 2, 0, 0, b"y")
        got = store.read(2, 0, 0, 4096)
        assert got is not None and bytes(got) == b"y" + bytes(4095)  # not chunk 1/0's x

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_reopen_keeps_data_and_index(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = make_store(path)
    dev = store.devices[0]
    payloads = {}
    for chunk in range(5):
        payloads[chunk] = os.urandom(5000)
        store.write(dev, 42, chunk, 100, payloads[chunk])
    store.zero(42, 2, 0, CHUNK_SIZE)
    store.close()

    store = make_store(path)
    try:
        assert store.devices[0].used == 4
        assert store.volume_chunks() == {42: 4}
        for chunk, data in payloads.items():
            got = store.read(42, chunk, 100, len(data))
            if chunk == 2:
                assert got is None
            else:
                assert got is not None and bytes(got) == data
    finally:
        store.close()


def test_refuses_foreign_or_resized_devices(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not ours" * 1024 + bytes(16 * MiB))
    with pytest.raises(StoreError, match="not a meshblock device"):
        make_store(junk)
    path = tmp_path / "dev.img"
    make_store(path).close()
    with pytest.raises(StoreError, match="formatted for"):
        make_store(path, 32 * MiB)


def test_torn_index_entry_reads_as_unreferenced(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = make_store(path)
    dev = store.devices[0]
    store.write(dev, 1, 0, 0, b"keep")
    store.write(dev, 1, 1, 0, b"torn")
    loc = store.location(1, 1)
    assert loc is not None
    slot = loc[1]
    store.close()
    with open(path, "r+b") as f:  # flip a bit in the entry of chunk 1/1
        f.seek(INDEX_OFFSET + slot * ENTRY.size + 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    store = make_store(path)
    try:
        assert store.read(1, 1, 0, 4) is None
        got = store.read(1, 0, 0, 4)
        assert got is not None and bytes(got) == b"keep"
    finally:
        store.close()


# -- crash safety ----------------------------------------------------------------------

SECTOR = 512
_WORKLOAD = textwrap.dedent(
    """
    import asyncio, os, random, struct, sys
    from meshblock.chunks import CHUNK_SIZE
    from meshblock.sds.store import ChunkStore, DeviceSpec

    path, capacity, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = ChunkStore([DeviceSpec(path, capacity, "pool")])
    store.open()
    dev = store.devices[0]
    rng = random.Random(seed)

    def tagged(vol, chunk, nsect, seq):
        sector = struct.pack(">QQQ", vol, chunk, seq).ljust(512, bytes([seq % 251 + 1]))
        return sector * nsect

    async def main():
        seq = 0
        print("ready", flush=True)
        while True:
            seq += 1
            vol = rng.randrange(1, 4)
            chunk = rng.randrange(0, 12)
            r = rng.random()
            if r < 0.55:
                off = rng.randrange(0, 2048) * 512
                n = rng.choice([1, 8, 64, 256])
                n = min(n, (CHUNK_SIZE - off) // 512)
                if store.needs_reclaim(dev, vol, chunk):
                    await store.reclaim(dev)
                try:
                    store.write(dev, vol, chunk, off, tagged(vol, chunk, n, seq))
                except Exception:
                    pass  # NoSpace: the device is full
            elif r < 0.85:
                store.zero(vol, chunk, 0, CHUNK_SIZE)
            elif r < 0.95:
                off = rng.randrange(0, 2048) * 512
                store.zero(vol, chunk, off, min(4096, CHUNK_SIZE - off))
            else:
                await store.sync()
            if seq % 50 == 0:
                await asyncio.sleep(0)

    asyncio.run(main())
    """
)


def check_consistent(path: Path, capacity: int) -> int:
    """Open the store; every chunk's sectors are zero or tagged with that very chunk;
    no slot is claimed twice. Returns the number of chunks found."""
    store = make_store(path, capacity)
    try:
        dev = store.devices[0]
        seen_slots: set[int] = set()
        found = 0
        for vol in range(1, 4):
            for chunk in range(12):
                loc = store.location(vol, chunk)
                if loc is None:
                    continue
                found += 1
                assert loc[1] not in seen_slots, "two chunks in one slot"
                seen_slots.add(loc[1])
                data = store.read(vol, chunk, 0, CHUNK_SIZE)
                assert data is not None
                for off in range(0, CHUNK_SIZE, SECTOR):
                    sector = data[off : off + SECTOR]
                    if not any(sector):
                        continue
                    v, c, _ = struct.unpack_from(">QQQ", sector)
                    assert (v, c) == (vol, chunk), (
                        f"chunk {vol}/{chunk} shows data of chunk {v}/{c} at {off}"
                    )
        assert dev.used == found
        assert len(dev.free) + len(dev.pending) + dev.used == dev.slot_count
        assert not set(dev.free) & seen_slots
        return found
    finally:
        store.close()


def test_sigkill_mid_workload_never_exposes_another_chunks_data(tmp_path: Path) -> None:
    """Kill -9 a process running writes, trims and syncs at random moments, many
    times over the same device (few slots, so slots are reused constantly); after each
    crash the index is consistent and no chunk shows another chunk's bytes."""
    path = tmp_path / "dev.img"
    capacity = 12 * MiB  # ~11 slots for up to 36 chunks: constant reuse
    rng = random.Random(5)
    total = 0
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKLOAD, str(path), str(capacity), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n", proc.stderr
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        total += check_consistent(path, capacity)
        # after a check the store was closed cleanly; crash it again from there
    assert total > 0


class PowerLoss:
    """An injected fault: a power cut that loses page-cache writes.

    Every write and hole punch of the store goes to the real file (the page cache)
    and marks its 4 KiB pages dirty; fdatasync/fsync copy the dirty pages into a
    *durable* image, and so does a durable write (``pwrite_durable``) for its pages.
    :meth:`crash_image` builds what a disk could hold after a power cut: the durable
    image, with each page dirtied since the last sync taken from the
    page cache or not, at random (pages reach the disk in any order).
    """

    PAGE = 4096

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import meshblock.sds.device_io as dio

        self.path = path
        self.durable = bytearray(path.read_bytes())
        self.dirty: set[int] = set()
        real_pwrite, real_fallocate = dio.pwrite, dio.fallocate
        real_fdatasync, real_fsync = dio.fdatasync, dio.fsync
        real_pwrite_durable = dio.pwrite_durable

        def pages(offset: int, length: int) -> range:
            return range(offset // self.PAGE, (offset + max(length, 1) - 1) // self.PAGE + 1)

        def mark(offset: int, length: int) -> None:
            self.dirty.update(pages(offset, length))

        def pwrite_durable(fd: int, data: bytes | memoryview, offset: int) -> int:
            n = real_pwrite_durable(fd, data, offset)
            with open(self.path, "rb") as f:
                for page in pages(offset, len(data)):
                    f.seek(page * self.PAGE)
                    self.durable[page * self.PAGE : (page + 1) * self.PAGE] = f.read(self.PAGE)
                    self.dirty.discard(page)
            return n

        def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
            mark(offset, len(data))
            return real_pwrite(fd, data, offset)

        def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
            mark(offset, length)
            return int(real_fallocate(fd, mode, offset, length))

        def sync(real: object) -> object:
            def run(fd: int) -> None:
                real(fd)  # type: ignore[operator]
                with open(self.path, "rb") as f:
                    for page in sorted(self.dirty):
                        f.seek(page * self.PAGE)
                        self.durable[page * self.PAGE : (page + 1) * self.PAGE] = f.read(self.PAGE)
                self.dirty.clear()

            return run

        monkeypatch.setattr(dio, "pwrite", pwrite)
        monkeypatch.setattr(dio, "pwrite_durable", pwrite_durable)
        monkeypatch.setattr(dio, "fallocate", fallocate)
        monkeypatch.setattr(dio, "fdatasync", sync(real_fdatasync))
        monkeypatch.setattr(dio, "fsync", sync(real_fsync))

    def crash_image(self, dest: Path, rng: random.Random) -> None:
        image = bytearray(self.durable)
        with open(self.path, "rb") as f:
            for page in self.dirty:
                if rng.random() < 0.5:
                    f.seek(page * self.PAGE)
                    image[page * self.PAGE : (page + 1) * self.PAGE] = f.read(self.PAGE)
        dest.write_bytes(image)


def _tagged(vol: int, chunk: int, nsect: int, seq: int) -> bytes:
    sector = struct.pack(">QQQ", vol, chunk, seq).ljust(SECTOR, bytes([seq % 251 + 1]))
    return sector * nsect


async def _workload(store: ChunkStore, rng: random.Random, ops: int) -> None:
    dev = store.devices[0]
    for seq in range(1, ops + 1):
        vol, chunk = rng.randrange(1, 4), rng.randrange(0, 12)
        r = rng.random()
        if r < 0.55:
            off = rng.randrange(0, 2048) * SECTOR
            n = min(rng.choice([1, 8, 64, 256]), (CHUNK_SIZE - off) // SECTOR)
            if store.needs_reclaim(dev, vol, chunk):
                await store.reclaim(dev)
            try:
                store.write(dev, vol, chunk, off, _tagged(vol, chunk, n, seq))
            except NoSpace:
                pass
        elif r < 0.85:
            store.zero(vol, chunk, 0, CHUNK_SIZE)
        elif r < 0.95:
            off = rng.randrange(0, 2048) * SECTOR
            store.zero(vol, chunk, off, min(4096, CHUNK_SIZE - off))
        else:
            await store.sync()


def test_power_loss_never_exposes_another_chunks_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power cuts at random points of a write/trim/sync workload, losing a random
    subset of the unsynced pages: after each, the index is consistent and no chunk
    shows another chunk's bytes (docs/design.md, invariant 6; docs/sds.md, "Crash
    safety")."""
    capacity = 12 * MiB
    path = tmp_path / "dev.img"
    make_store(path, capacity).close()
    rng = random.Random(11)
    for round_ in range(12):
        with monkeypatch.context() as mp:
            power = PowerLoss(path, mp)
            store = make_store(path, capacity)
            asyncio.run(_workload(store, rng, rng.randrange(50, 400)))
            crashed = tmp_path / f"crash{round_}.img"
            power.crash_image(crashed, rng)
            for dev in store.devices:  # the process "dies": no clean close
                dev.close()
        check_consistent(crashed, capacity)
        path.write_bytes(crashed.read_bytes())  # go on from the crashed state
