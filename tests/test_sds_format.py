"""The SDS's on-disk format version 2: new devices, the region table, refusal of newer
versions, and the in-place upgrade of version 1 devices, with a power cut at every
step of it (docs/sds.md, "On-disk layout", "Upgrade from version 1")."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

import meshblock.sds.device_io as dio
from _sds_v1 import (
    CHUNK_DATA_OFFSET,
    read_v1_device,
    v1_chunk_bytes,
    v1_layout,
    write_v1_device,
)
from meshblock.sds.store import (
    REGION,
    REGION_CHECKSUMS,
    REGION_DATA,
    REGION_INDEX,
    REGION_SLOT_EXT,
    REGION_TOMBSTONES,
    REGION_WRITE_INTENT,
    SUPER_V2,
    SUPERBLOCK,
    ChunkStore,
    DeviceSpec,
    StoreError,
    layout,
)

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
#: Large enough that the metadata area does not fit before the first slot: the
#: upgrade gives up the last slots and moves their chunks.
BIG = 800 * MiB


def open_store(path: Path, capacity: int) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(path), capacity, "pool")])
    store.open()
    return store


def super_version(path: Path) -> int:
    with open(path, "rb") as f:
        return int(SUPERBLOCK.unpack(f.read(SUPERBLOCK.size))[1])


def assert_chunks_intact(store: ChunkStore, chunks: dict[tuple[int, int], int]) -> None:
    assert sorted(store.chunk_ids()) == sorted(chunks)
    for volume, chunk in chunks:
        want = v1_chunk_bytes(volume, chunk)
        got = store.read(volume, chunk, CHUNK_DATA_OFFSET - 512, len(want) + 1024)
        assert got is not None
        assert bytes(got) == bytes(512) + want + bytes(512), (volume, chunk)
    assert store.devices[0].used == len(chunks)


def slot_of(store: ChunkStore, key: tuple[int, int]) -> int:
    loc = store.location(*key)
    assert loc is not None, key
    return loc[1]


def assert_v1_chunks_intact(path: Path, chunks: dict[tuple[int, int], int]) -> None:
    """The device is a valid version 1 device whose index names every chunk, each
    in a slot holding its bytes."""
    found = read_v1_device(path)
    assert sorted(found) == sorted(chunks)
    _, data_offset = v1_layout(path.stat().st_size)
    with open(path, "rb") as f:
        for (volume, chunk), slot in found.items():
            want = v1_chunk_bytes(volume, chunk)
            f.seek(data_offset + slot * MiB + CHUNK_DATA_OFFSET)
            assert f.read(len(want)) == want, (volume, chunk)


def test_new_device_is_version_2_with_every_region(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path, 64 * MiB)
    try:
        dev = store.devices[0]
        assert dev.version == 2 and (dev.slot_count, dev.data_offset) == layout(64 * MiB)
        assert set(dev.regions) == {
            REGION_INDEX,
            REGION_DATA,
            REGION_TOMBSTONES,
            REGION_SLOT_EXT,
            REGION_WRITE_INTENT,
            REGION_CHECKSUMS,
        }
        spans = sorted(dev.regions.values())
        assert all(a[0] + a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert dev.regions[REGION_CHECKSUMS][1] >= dev.slot_count * 1024
        assert dev.regions[REGION_SLOT_EXT][1] >= dev.slot_count * 128
        assert spans[-1] == (dev.data_offset, dev.slot_count * MiB)
    finally:
        store.close()
    assert super_version(path) == 2
    with pytest.raises(ValueError, match="format version 2 is not supported"):
        read_v1_device(path)  # what the previous release answers


def test_two_mib_device_still_holds_a_chunk() -> None:
    assert layout(2 * MiB) == (1, MiB)


def _rewrite_super(path: Path, **fields: int) -> None:
    """Change header fields (version) or v2 fields (incompat) with valid CRCs."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(512))
        hdr = list(SUPERBLOCK.unpack_from(head))
        if "version" in fields:
            hdr[1] = fields["version"]
        SUPERBLOCK.pack_into(head, 0, *hdr)
        struct.pack_into(">I", head, SUPERBLOCK.size - 4, zlib.crc32(head[: SUPERBLOCK.size - 4]))
        incompat, compat, count, res = SUPER_V2.unpack_from(head, SUPERBLOCK.size)
        incompat = fields.get("incompat", incompat)
        SUPER_V2.pack_into(head, SUPERBLOCK.size, incompat, compat, count, res)
        end = SUPERBLOCK.size + SUPER_V2.size + count * REGION.size
        struct.pack_into(">I", head, end, zlib.crc32(head[:end]))
        f.seek(0)
        f.write(head)


def test_newer_version_or_unknown_feature_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    open_store(path, 16 * MiB).close()
    _rewrite_super(path, version=3)
    before = path.read_bytes()
    with pytest.raises(
        StoreError, match=r"format version 3 is newer than this release supports \(2\)"
    ):
        open_store(path, 16 * MiB)
    assert path.read_bytes() == before
    _rewrite_super(path, version=2, incompat=1 << 7)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="features 0x80 that this release does not know"):
        open_store(path, 16 * MiB)
    assert path.read_bytes() == before
    _rewrite_super(path, incompat=0)
    open_store(path, 16 * MiB).close()


def test_damaged_region_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    open_store(path, 16 * MiB).close()
    with open(path, "r+b") as f:  # a flipped bit in the region table
        f.seek(SUPERBLOCK.size + SUPER_V2.size + 10)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(StoreError, match="region table"):
        open_store(path, 16 * MiB)


def test_small_v1_device_is_upgraded_in_place_without_moving_a_chunk(tmp_path: Path) -> None:
    capacity = 16 * MiB
    path = tmp_path / "dev.img"
    slots, _ = v1_layout(capacity)
    chunks = {(1, 0): 0, (1, 1): 5, (2, 7): slots - 1}
    write_v1_device(path, capacity, chunks)
    assert_v1_chunks_intact(path, chunks)
    store = open_store(path, capacity)
    try:
        dev = store.devices[0]
        assert dev.version == 2 and dev.slot_count == slots
        assert {k: slot_of(store, k) for k in chunks} == chunks
        assert_chunks_intact(store, chunks)
        asyncio.run(store.add_tombstones({9: 3}))
    finally:
        store.close()
    assert super_version(path) == 2
    store = open_store(path, capacity)
    try:
        assert_chunks_intact(store, chunks)
        assert store.tombstones() == {9: 3}
    finally:
        store.close()


def test_large_v1_device_gives_up_its_last_slots_and_moves_their_chunks(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    slots, _ = v1_layout(BIG)
    chunks = {(3, i): slots - 1 - i for i in range(6)} | {(4, i): i for i in range(4)}
    write_v1_device(path, BIG, chunks, clean=False)
    store = open_store(path, BIG)
    try:
        dev = store.devices[0]
        assert dev.version == 2 and dev.slot_count < slots
        meta = dev.regions[REGION_TOMBSTONES][0]
        assert meta == dev.data_offset + dev.slot_count * MiB  # after the last slot
        assert all(slot_of(store, k) < dev.slot_count for k in chunks)
        assert_chunks_intact(store, chunks)
        assert len(dev.free) + dev.used == dev.slot_count
    finally:
        store.close()
    assert path.stat().st_blocks * 512 < 8 * MiB  # still sparse
    store = open_store(path, BIG)
    try:
        assert_chunks_intact(store, chunks)
    finally:
        store.close()


def test_v1_device_too_full_to_upgrade_is_refused_and_stays_v1(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    slots, _ = v1_layout(BIG)
    chunks = {(5, i): i for i in range(slots)}  # every slot used (holes as data)
    write_v1_device(path, BIG, chunks, with_data=False)
    with pytest.raises(StoreError, match=r"free \d+ more chunks with the previous release"):
        open_store(path, BIG)
    assert read_v1_device(path) == chunks


def test_every_device_of_a_store_is_upgraded_or_none(tmp_path: Path) -> None:
    """Two v1 devices: both upgraded, the tombstone table on both. And when one of
    them cannot be upgraded, neither is (the previous release must still open all)."""
    small, big = tmp_path / "small.img", tmp_path / "big.img"
    slots, _ = v1_layout(BIG)
    small_chunks = {(1, 0): 3}
    big_chunks = {(2, i): slots - 1 - i for i in range(3)}
    write_v1_device(small, 16 * MiB, small_chunks)
    write_v1_device(big, BIG, big_chunks)
    store = ChunkStore([DeviceSpec(str(small), 16 * MiB, "p"), DeviceSpec(str(big), BIG, "p")])
    store.open()
    try:
        assert [d.version for d in store.devices] == [2, 2]
        assert_chunks_intact_on(store, small_chunks | big_chunks)
        asyncio.run(store.add_tombstones({5: 6}))
        assert [d.read_tombstones() for d in store.devices] == [(1, {5: 6})] * 2
    finally:
        store.close()

    full = {(5, i): i for i in range(slots)}
    write_v1_device(small, 16 * MiB, small_chunks)
    write_v1_device(big, BIG, full, with_data=False)
    store = ChunkStore([DeviceSpec(str(small), 16 * MiB, "p"), DeviceSpec(str(big), BIG, "p")])
    with pytest.raises(StoreError, match=f"{big}: upgrading to format version 2 needs"):
        store.open()
    assert read_v1_device(small) == small_chunks and read_v1_device(big) == full


def test_stale_claim_in_a_slot_given_up_by_the_upgrade_is_never_handed_out(
    tmp_path: Path,
) -> None:
    """A crash of the v1 release between freeing a chunk on one device and rewriting
    it on another leaves two claims; the older one, in a slot the upgrade turns into
    metadata, is dropped at open. That slot must not come back after a sync: a chunk
    written there would land in the metadata area, its entry past the index."""
    big, other = tmp_path / "big.img", tmp_path / "other.img"
    slots, _ = v1_layout(BIG)
    write_v1_device(big, BIG, {(7, 0): slots - 1})  # generation 1, in the last slot
    write_v1_device(other, 16 * MiB, {(1, 0): 0, (7, 0): 1})  # 7/0 has generation 2
    specs = [DeviceSpec(str(big), BIG, "p"), DeviceSpec(str(other), 16 * MiB, "p")]
    store = ChunkStore(specs)
    store.open()
    try:
        dev = store.devices[0]
        assert dev.version == 2 and dev.slot_count < slots
        assert all(s < dev.slot_count for s in dev.free + dev.pending)
        assert_chunks_intact_on(store, {(1, 0): 0, (7, 0): 1})
        asyncio.run(store.sync())  # pending slots return to the free lists
        assert all(s < dev.slot_count for s in dev.free)
        for chunk in range(3):
            store.write(dev, 8, chunk, 0, b"\x8b" * 4096)
            assert slot_of(store, (8, chunk)) < dev.slot_count
        assert len(dev.free) + len(dev.pending) + dev.used == dev.slot_count
    finally:
        store.close()
    store = ChunkStore(specs)
    store.open()
    try:
        assert sorted(store.chunk_ids()) == [(1, 0), (7, 0), (8, 0), (8, 1), (8, 2)]
        for chunk in range(3):
            got = store.read(8, chunk, 0, 4096)
            assert got is not None and bytes(got) == b"\x8b" * 4096
    finally:
        store.close()


def assert_chunks_intact_on(store: ChunkStore, chunks: dict[tuple[int, int], int]) -> None:
    assert sorted(store.chunk_ids()) == sorted(chunks)
    for volume, chunk in chunks:
        got = store.read(volume, chunk, CHUNK_DATA_OFFSET, 8192)
        assert got is not None and bytes(got) == v1_chunk_bytes(volume, chunk)


# -- power cuts during the upgrade -----------------------------------------------------


class PowerCut(Exception):
    """The power went out (raised instead of an fdatasync/fsync)."""


class SparsePowerLoss:
    """:class:`test_sds_store.PowerLoss` for large sparse devices: the durable image
    is kept as the pages that differ from the file at the start, and a power cut can
    come at any sync (``cut_at``: the number of the sync that never completes)."""

    PAGE = 4096

    def __init__(self, path: Path, mp: pytest.MonkeyPatch, cut_at: int) -> None:
        self.path = path
        self.base = tmp_copy = path.with_suffix(".base")
        _sparse_copy(path, tmp_copy)
        self.durable: dict[int, bytes] = {}
        self.dirty: set[int] = set()
        self.syncs = 0
        real_pwrite, real_fallocate = dio.pwrite, dio.fallocate
        real_pwrite_durable = dio.pwrite_durable

        def pages(offset: int, length: int) -> range:
            return range(offset // self.PAGE, (offset + max(length, 1) - 1) // self.PAGE + 1)

        def mark(offset: int, length: int) -> None:
            self.dirty.update(pages(offset, length))

        def pwrite_durable(fd: int, data: bytes | memoryview, offset: int) -> int:
            n = int(real_pwrite_durable(fd, data, offset))
            with open(self.path, "rb") as f:
                for page in pages(offset, len(data)):
                    f.seek(page * self.PAGE)
                    self.durable[page] = f.read(self.PAGE).ljust(self.PAGE, b"\0")
                    self.dirty.discard(page)
            return n

        def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
            mark(offset, len(data))
            return int(real_pwrite(fd, data, offset))

        def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
            mark(offset, length)
            return int(real_fallocate(fd, mode, offset, length))

        def sync(fd: int) -> None:
            self.syncs += 1
            if self.syncs == cut_at:
                raise PowerCut
            with open(self.path, "rb") as f:
                for page in self.dirty:
                    f.seek(page * self.PAGE)
                    self.durable[page] = f.read(self.PAGE).ljust(self.PAGE, b"\0")
            self.dirty.clear()

        mp.setattr(dio, "pwrite", pwrite)
        mp.setattr(dio, "pwrite_durable", pwrite_durable)
        mp.setattr(dio, "fallocate", fallocate)
        mp.setattr(dio, "fdatasync", sync)
        mp.setattr(dio, "fsync", sync)

    def crash_image(self, dest: Path, rng: random.Random) -> None:
        _sparse_copy(self.base, dest)
        with open(self.path, "rb") as live, open(dest, "r+b") as out:
            pages = dict(self.durable)
            for page in self.dirty:
                if rng.random() < 0.5:
                    live.seek(page * self.PAGE)
                    pages[page] = live.read(self.PAGE).ljust(self.PAGE, b"\0")
            for page, data in pages.items():
                out.seek(page * self.PAGE)
                out.write(data)


def _sparse_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` keeping its holes."""
    size = src.stat().st_size
    with open(src, "rb") as s, open(dest, "wb") as d:
        d.truncate(size)
        fd = s.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            s.seek(start)
            d.seek(start)
            d.write(s.read(end - start))
            pos = end


@pytest.mark.parametrize(
    ("capacity", "chunks"),
    [
        (BIG, {(3, i): v1_layout(BIG)[0] - 1 - 2 * i for i in range(5)} | {(4, 0): 1}),
        (16 * MiB, {(3, 0): 0, (3, 1): 14}),
    ],
    ids=["moves", "in-place"],
)
def test_power_cut_at_every_sync_of_the_upgrade_leaves_v1_or_v2_with_every_chunk(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capacity: int,
    chunks: dict[tuple[int, int], int],
) -> None:
    """A power cut at each sync of the upgrade in turn (losing a random subset of the
    pages written since the previous sync): the device is a valid version 1 device
    (as the previous release reads it) or a version 2 one, every chunk intact; and
    the next open completes the upgrade."""
    path = tmp_path / "dev.img"
    rng = random.Random(23)
    cut_at = 1
    while True:
        for _attempt in range(3):
            write_v1_device(path, capacity, chunks)
            with monkeypatch.context() as mp:
                power = SparsePowerLoss(path, mp, cut_at)
                try:
                    open_store(path, capacity).close()
                    cut = False
                except PowerCut:
                    cut = True
                crashed = tmp_path / "crashed.img"
                power.crash_image(crashed, rng)
            if super_version(crashed) == 1:
                assert_v1_chunks_intact(crashed, chunks)
            else:
                assert super_version(crashed) == 2 and cut_at > 2
            store = open_store(crashed, capacity)
            try:
                assert store.devices[0].version == 2
                assert_chunks_intact(store, chunks)
            finally:
                store.close()
            if not cut:
                break
        if not cut:
            break
        cut_at += 1
    assert cut_at >= (
        6 if capacity == BIG else 4
    )  # the upgrade synced at least the load, the zeroing and the switch
