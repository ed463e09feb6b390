"""Versions of a chunk in the SDS store (docs/snapshots.md, Decision 3; docs/sds.md,
"Versions of a chunk"): extension entries, incompat feature bit 4, the holds-bit sync
rule, with a power cut at every sync of a workload of version writes."""

from __future__ import annotations

import asyncio
import functools
import random
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import meshblock.sds.device_io as dio
import meshblock.sds.store as store_mod
from meshblock.chunks import CHUNK_SIZE
from meshblock.sds.store import (
    ENTRY,
    INDEX_OFFSET,
    SUPER_V2,
    SUPERBLOCK,
    ChunkStore,
    DeviceSpec,
    NoSpace,
    StoreError,
    VolumeDeleted,
)
from meshblock.sds.versions import (
    ALL_BLOCKS,
    ENTRY_EXT,
    EXT_ENTRY,
    INCOMPAT_SLOT_EXT,
    VersionTree,
    block_masks,
    pack_ext,
    unpack_ext,
)
from test_sds_format import PowerCut, SparsePowerLoss
from test_sds_format import _sparse_copy as sparse_copy

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
BLOCK = 4096
CAPACITY = 16 * MiB
TREE = 5


def open_store(path: Path, *, checksums: bool = True) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(path), CAPACITY, "pool")], checksums=checksums)
    store.open()
    return store


def incompat(path: Path) -> int:
    with open(path, "rb") as f:
        return int(SUPER_V2.unpack_from(f.read(512), SUPERBLOCK.size)[0])


def on_disk(store: ChunkStore, slot: int) -> tuple[bytes, bytes]:
    """The index entry and the extension entry of ``slot`` as the device file has them."""
    dev = store.devices[0]
    with open(dev.path, "rb") as f:
        f.seek(INDEX_OFFSET + slot * ENTRY.size)
        entry = f.read(ENTRY.size)
        f.seek(dev.ext_offset(slot))
        return entry, f.read(EXT_ENTRY.size)


def tagged(chunk: int, version: int, block: int, seq: int, length: int = BLOCK) -> bytes:
    """A block's bytes: its identity and sequence, then filler of its identity."""
    head = struct.pack(">QQQQQ", TREE, chunk, version, block, seq)
    return (head + bytes([(chunk * 7 + version * 3 + block) % 251 + 1]) * BLOCK)[:length]


def test_block_masks_and_entry_round_trip() -> None:
    assert block_masks(0, CHUNK_SIZE) == (ALL_BLOCKS, ALL_BLOCKS)
    assert block_masks(BLOCK, 2 * BLOCK) == (0b110, 0b110)
    assert block_masks(100, BLOCK) == (0b11, 0)
    assert block_masks(BLOCK + 1, 3 * BLOCK) == (0b11110, 0b1100)
    raw = pack_ext(3, 99, 1 << 255 | 5)
    assert len(raw) == EXT_ENTRY.size == 128
    assert unpack_ext(raw) == (3, 99, 1 << 255 | 5)
    torn = bytearray(raw)
    torn[20] ^= 1
    assert unpack_ext(bytes(torn)) is None
    assert unpack_ext(bytes(128)) is None


@pytest.mark.parametrize("checksums", [True, False])
def test_versions_are_written_read_and_kept_across_a_restart(
    tmp_path: Path, checksums: bool
) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path, checksums=checksums)
    dev = store.devices[0]
    store.write(dev, TREE, 2, 0, tagged(2, 0, 0, 1) * 3)
    store.write_version(dev, TREE, 2, 1, 1 * BLOCK, tagged(2, 1, 1, 2) + tagged(2, 1, 2, 2))
    store.write_version(dev, TREE, 2, 3, 200 * BLOCK, tagged(2, 3, 200, 3))
    store.write_version(dev, TREE, 2, 1, 2 * BLOCK + 512, b"x" * 512)  # a held block
    assert store.versions(TREE, 2) == {0: ALL_BLOCKS, 1: 0b110, 3: 1 << 200}
    assert store.versions(TREE, 9) == {}
    assert store.chunk_ids() == [(TREE, 2)]  # versions are not plain chunks
    assert store.volume_chunks() == {TREE: 3}
    assert dev.used == 3
    with pytest.raises(ValueError, match="part of a block the version does not hold"):
        store.write_version(dev, TREE, 2, 1, 3 * BLOCK, b"y" * 512)
    assert store.versions(TREE, 2)[1] == 0b110

    def check(s: ChunkStore) -> None:
        got = s.read_version(TREE, 2, 1, BLOCK, 2 * BLOCK)
        want = tagged(2, 1, 1, 2) + tagged(2, 1, 2, 2)[:512] + b"x" * 512
        assert got is not None and bytes(got) == want + tagged(2, 1, 2, 2)[1024:]
        got = s.read_version(TREE, 2, 3, 200 * BLOCK + 8, 16)
        assert got is not None and bytes(got) == tagged(2, 3, 200, 3)[8:24]
        got = s.read_version(TREE, 2, 0, 0, BLOCK)  # version 0 is the plain chunk
        assert got is not None and bytes(got) == tagged(2, 0, 0, 1)
        assert s.read_version(TREE, 2, 2, 0, BLOCK) is None
        assert s.versions(TREE, 2) == {0: ALL_BLOCKS, 1: 0b110, 3: 1 << 200}

    check(store)
    store.close()
    assert incompat(path) & INCOMPAT_SLOT_EXT
    store = open_store(path, checksums=checksums)
    try:
        check(store)
        assert store.devices[0].used == 3
        assert store.free_version(TREE, 2, 3) and not store.free_version(TREE, 2, 3)
        assert store.versions(TREE, 2) == {0: ALL_BLOCKS, 1: 0b110}
    finally:
        store.close()
    store = open_store(path, checksums=checksums)
    try:
        assert store.versions(TREE, 2) == {0: ALL_BLOCKS, 1: 0b110}
        assert store.devices[0].used == 2
    finally:
        store.close()


def test_entries_wait_for_a_data_sync_and_bit_4_comes_first(tmp_path: Path) -> None:
    """The holds-bit sync rule: nothing of a version slot's entries is written before
    a sync covered its data; then feature bit 4 (durable), the entries, a sync."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    syncs: list[str] = []
    real = dio.fdatasync, dio.fsync

    async def run() -> None:
        store.write(dev, TREE, 0, 0, b"plain")
        await store.sync()
        assert not incompat(path) & INCOMPAT_SLOT_EXT  # version 0 needs no feature
        store.write_version(dev, TREE, 0, 1, 0, tagged(0, 1, 0, 1))
        vs = store.version_slot(TREE, 0, 1)
        assert vs is not None
        assert on_disk(store, vs.slot) == (bytes(ENTRY.size), bytes(EXT_ENTRY.size))
        with pytest.MonkeyPatch.context() as mp:

            def fdatasync(fd: int) -> None:
                entry, _ = on_disk(store, vs.slot)
                syncs.append("data" if not any(entry) else "entries")
                real[0](fd)

            def fsync(fd: int) -> None:
                syncs.append(f"super {bool(incompat(path) & INCOMPAT_SLOT_EXT)}")
                real[1](fd)

            mp.setattr(dio, "fdatasync", fdatasync)
            mp.setattr(dio, "fsync", fsync)
            await store.sync()
            entry, ext = on_disk(store, vs.slot)
            flags = struct.unpack_from(">I", entry, 24)[0]
            assert flags & ENTRY_EXT and unpack_ext(ext) == (1, vs.generation, 1)
            # A held bit more: only the extension entry is rewritten, after a sync.
            store.write_version(dev, TREE, 0, 1, BLOCK, tagged(0, 1, 1, 2))
            assert unpack_ext(on_disk(store, vs.slot)[1]) == (1, vs.generation, 1)
            await store.sync()
            assert unpack_ext(on_disk(store, vs.slot)[1]) == (1, vs.generation, 0b11)
            await store.sync()  # nothing pending: one sync

    asyncio.run(run())
    assert syncs == ["data", "super True", "entries", "entries", "entries", "entries"]
    store.close()


def test_a_release_without_bit_4_refuses_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    store.write_version(store.devices[0], TREE, 0, 1, 0, tagged(0, 1, 0, 1))
    store.close()
    before = path.read_bytes()
    monkeypatch.setattr(store_mod, "KNOWN_INCOMPAT", 3)  # the previous release's
    with pytest.raises(StoreError, match="features 0x4 that this release does not know"):
        open_store(path)
    assert path.read_bytes() == before


def test_a_torn_extension_entry_drops_its_slot(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    store.write_version(dev, TREE, 0, 1, 0, tagged(0, 1, 0, 1))
    store.write_version(dev, TREE, 0, 2, 0, tagged(0, 2, 0, 1))
    vs = store.version_slot(TREE, 0, 2)
    assert vs is not None
    slot, gen = vs.slot, vs.generation
    store.close()
    with open(path, "r+b") as f:  # the entry of an older use of the slot
        f.seek(dev.ext_offset(slot))
        f.write(pack_ext(2, gen + 7, 1))
    store = open_store(path)
    try:
        assert store.versions(TREE, 0) == {1: 1}
        assert store.devices[0].used == 1 and slot in store.devices[0].free
    finally:
        store.close()


def test_a_tombstone_frees_the_versions_of_its_tree(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]

    async def run() -> None:
        store.write(dev, TREE, 0, 0, b"v0")
        store.write_version(dev, TREE, 0, 1, 0, tagged(0, 1, 0, 1))
        store.write_version(dev, TREE, 1, 2, 0, tagged(1, 2, 0, 1))
        await store.add_tombstones({TREE: 9})
        with pytest.raises(VolumeDeleted):
            store.write_version(dev, TREE, 0, 1, 0, tagged(0, 1, 0, 2))
        assert store.read_version(TREE, 0, 1, 0, 8) is None
        assert store.tombstone_chunks_left(TREE) == 3
        while await store.free_tombstoned(TREE, 1):
            pass
        assert store.tombstone_chunks_left(TREE) == 0 and dev.used == 0
        await store.drop_tombstones([TREE])

    asyncio.run(run())
    store.close()
    store = open_store(path)
    try:
        assert store.versions(TREE, 0) == {} and store.versions(TREE, 1) == {}
    finally:
        store.close()


def test_no_space_for_a_version_slot(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    try:
        for v in range(1, dev.slot_count + 1):
            store.write_version(dev, TREE, 0, v, 0, tagged(0, v, 0, 1))
        with pytest.raises(NoSpace):
            store.write_version(dev, TREE, 0, 99, 0, tagged(0, 99, 0, 1))
        assert 99 not in store.versions(TREE, 0) and dev.used == dev.slot_count
    finally:
        store.close()


# -- a power cut at every sync ----------------------------------------------------------

Key = tuple[int, int, int]  # chunk, version, block


#: Versions 1..3 are heads over version 0.
FLAT = VersionTree({0: None, 1: 0, 2: 0, 3: 0})


class Model:
    """What was written and what a completed sync made durable."""

    def __init__(self) -> None:
        self.written: dict[Key, set[int]] = {}  # every sequence ever written
        self.now: dict[Key, int] = {}  # the newest
        self.durable: dict[Key, int] = {}  # the newest as of the last completed sync
        self.shortcut: set[Key] = set()  # written first with their bits (write_view)

    def wrote(self, key: Key, seq: int) -> None:
        self.written.setdefault(key, set()).add(seq)
        self.now[key] = seq

    def freed(self, chunk: int, version: int) -> None:
        self.shortcut = {k for k in self.shortcut if k[:2] != (chunk, version)}
        for key in [k for k in self.now if k[:2] == (chunk, version)]:
            del self.now[key]
            self.durable.pop(key, None)  # a free promises nothing until synced

    def synced(self) -> None:
        self.durable = dict(self.now)


async def version_workload(store: ChunkStore, model: Model, rng: random.Random) -> None:
    """Whole-block writes of versions 0..3 of three chunks, sector writes into held
    blocks, frees of versions, and syncs (FLUSH): the same for every seed."""
    dev = store.devices[0]
    for seq in range(1, 70):
        chunk, version = rng.randrange(3), rng.randrange(4)
        r = rng.random()
        if r < 0.15:
            await store.sync()
            model.synced()
            continue
        if r < 0.2 and version:
            store.free_version(TREE, chunk, version)
            model.freed(chunk, version)
            continue
        if r < 0.25 and version:  # WRITE_ZEROES of whole blocks through the head
            first = rng.choice([0, 1, 5, 100, 254])
            blocks = list(range(first, first + rng.randrange(1, 3)))
            plain = any(k[:2] == (chunk, 0) for k in model.now)
            if store.needs_reclaim_version(dev, TREE, chunk, version):
                await store.reclaim(dev)
            store.zero_view(FLAT, dev, TREE, chunk, version, first * BLOCK, len(blocks) * BLOCK)
            for b in blocks:
                if plain or (chunk, version, b) in model.now:
                    model.wrote((chunk, version, b), -seq)  # held as zeroes
            continue
        held = [b for (c, v, b), x in model.now.items() if (c, v) == (chunk, version) and x > 0]
        if r < 0.35 and held:  # one sector of a held block
            block = rng.choice(held)
            blocks, data, at = [block], tagged(chunk, version, block, seq, 512), block * BLOCK
        else:
            first = rng.choice([0, 1, 5, 100, 254])
            blocks = list(range(first, first + rng.randrange(1, 3)))
            data = b"".join(tagged(chunk, version, b, seq) for b in blocks)
            at = first * BLOCK
        if store.needs_reclaim_version(dev, TREE, chunk, version):
            await store.reclaim(dev)
        if version and len(data) % BLOCK == 0 and rng.random() < 0.5:
            # through the head: the first write of its slot where nothing is held
            # writes the bits with the data (they may outlive it: zeroes either way)
            if not any(k[:2] in ((chunk, 0), (chunk, version)) for k in model.now):
                model.shortcut.update((chunk, version, b) for b in blocks)
            store.write_view(dev, FLAT, TREE, chunk, version, at, data)
        else:
            store.write_version(dev, TREE, chunk, version, at, data)
        for b in blocks:
            model.wrote((chunk, version, b), seq)


def check_after_cut(store: ChunkStore, model: Model) -> None:
    """Every block a version holds reads a write made to that very block, or zeroes
    it was given (never zeroes otherwise: no holds bit without its data; never another
    block's bytes); every block synced before the cut is held, with its synced write
    or a newer one."""
    for chunk in range(3):
        held = store.versions(TREE, chunk)
        for version, holds in held.items():
            data = store.read_version(TREE, chunk, version, 0, CHUNK_SIZE)
            assert data is not None
            for block in range(256):
                if not holds >> block & 1:
                    continue
                got = data[block * BLOCK : (block + 1) * BLOCK]
                ident = struct.unpack_from(">QQQQQ", got)
                key = (chunk, version, block)
                if version == 0 and ident == (0, 0, 0, 0, 0):
                    assert key not in model.durable, f"{key}: synced, reads zeroes"
                    continue
                floor = abs(model.durable.get(key, 0))
                if version and not any(got) and key in model.shortcut:
                    assert key not in model.durable, f"{key}: synced, reads zeroes"
                    continue
                if version and not any(got):  # held as zeroes
                    zeroed = [-x for x in model.written.get(key, ()) if x < 0]
                    assert zeroed and max(zeroed) >= floor, f"{key}: zeroes, never zeroed"
                    continue
                assert ident[:4] == (TREE, *key), f"{key} reads {ident}"
                assert bytes(got) == tagged(*key, ident[4]), f"{key}: torn"
                assert ident[4] in model.written.get(key, ()), f"{key}: seq {ident[4]}"
                assert ident[4] >= floor, f"{key}: older than synced"
        for (c, v, b), seq in model.durable.items():
            if c == chunk:
                assert v in held and held[v] >> b & 1, f"{(c, v, b)} synced ({seq}), lost"


class KeepOne:
    """Stands for the ``random.Random`` of :meth:`SparsePowerLoss.crash_image`: keeps
    only the ``keep``-th unsynced page it is asked about (none when past the last)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return 0.0 if self.calls - 1 == self.keep else 1.0


def run_until_cut(
    path: Path,
    crashed: Path,
    mp: pytest.MonkeyPatch,
    cut_at: int,
    workload: Callable[[ChunkStore], Awaitable[None]],
    rng: random.Random,
) -> bool:
    """Open the store and run ``workload`` with the power cut at sync ``cut_at``;
    whether it was cut (``crashed`` then holds what the disk kept)."""
    power = SparsePowerLoss(path, mp, cut_at)
    cut_sync = dio.fdatasync

    def after_cut(fd: int) -> None:
        if power.syncs >= cut_at:  # the power stays off
            raise PowerCut
        cut_sync(fd)

    mp.setattr(dio, "fdatasync", after_cut)
    mp.setattr(dio, "fsync", after_cut)

    async def run() -> bool:
        store = ChunkStore([DeviceSpec(str(path), CAPACITY, "pool")])
        try:
            store.open()
            await workload(store)
        except PowerCut:
            power.crash_image(crashed, rng)  # at once: nothing more reaches it
            return True
        finally:
            for dev in store.devices:
                dev.close()
        return False

    return asyncio.run(run())


def test_a_power_cut_at_every_sync_never_leaves_a_holds_bit_without_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut at each sync in turn (the store's open included), losing a random
    half of the pages written since the last completed sync: every block synced is
    there, and no block a version holds reads anything but a write to it."""
    path = tmp_path / "dev.img"
    crashed = tmp_path / "crashed.img"
    fresh = tmp_path / "fresh.img"
    open_store(fresh).close()
    rng = random.Random(17)
    cut_at = 1
    while True:
        sparse_copy(fresh, path)
        model = Model()
        with monkeypatch.context() as mp:
            workload = functools.partial(version_workload, model=model, rng=random.Random(3))
            if not run_until_cut(path, crashed, mp, cut_at, workload, rng):
                break
        store = open_store(crashed)
        try:
            check_after_cut(store, model)
        finally:
            store.close()
        cut_at += 1
    assert cut_at > 15  # the workload synced data and entries that many times


# -- block maps: reading a view through its ancestors ----------------------------------

#: The tree of docs/snapshots.md ("A tree"): db wrote v0, v1, now v2; test (a clone of
#: db-mon, view v0) wrote v3, now v4.
DOC_TREE = {0: None, 1: 0, 2: 1, 3: 0, 4: 3}


def test_version_tree_numbers_ancestors_whatever_the_depth() -> None:
    vt = VersionTree(DOC_TREE)
    assert vt.is_ancestor(0, 4) and vt.is_ancestor(1, 2) and vt.is_ancestor(2, 2)
    assert not vt.is_ancestor(1, 4) and not vt.is_ancestor(3, 2) and not vt.is_ancestor(2, 1)
    chain = VersionTree({v: (v - 1 if v else None) for v in range(1001)})
    assert chain.is_ancestor(0, 1000) and chain.is_ancestor(999, 1000)
    assert not chain.is_ancestor(1000, 999)
    assert VersionTree(DOC_TREE).serial != vt.serial
    with pytest.raises(ValueError, match="not a version"):
        VersionTree({0: None, 2: 1})
    with pytest.raises(ValueError, match="cycle"):
        VersionTree({0: None, 1: 2, 2: 1})


def test_block_maps_of_the_documented_tree(tmp_path: Path) -> None:
    """Chunk 12 of tree 7 in docs/snapshots.md: each view reads each block from the
    nearest of its versions that holds it."""
    store = open_store(tmp_path / "dev.img")
    dev = store.devices[0]
    vt = VersionTree(DOC_TREE)
    try:
        store.write(dev, TREE, 12, 0, b"".join(tagged(12, 0, b, 1) for b in range(256)))
        for version, blocks in ((1, (3, 4)), (2, (4,)), (3, (200,))):
            for b in blocks:
                store.write_version(dev, TREE, 12, version, b * BLOCK, tagged(12, version, b, 2))
        want = {
            2: {4: 2, 3: 1},  # db: 4 -> v2, 3 -> v1, every other block -> v0
            1: {3: 1, 4: 1},  # db-tue
            4: {200: 3},  # test (v4 wrote nothing here)
            3: {200: 3},  # test-a
            0: {},  # db-mon
        }
        for view, special in want.items():
            got = store.read_view(vt, TREE, 12, view, 0, CHUNK_SIZE)
            assert got is not None
            for b in range(256):
                v = special.get(b, 0)
                assert bytes(got[b * BLOCK : (b + 1) * BLOCK]) == tagged(12, v, b, 1 + bool(v))
            runs = store.view_map(vt, TREE, 12, view)
            assert sum(n for _, n, _ in runs) == 256
            assert len(runs) == {2: 4, 1: 3, 4: 3, 3: 3, 0: 1}[view]  # one read per run
        # a range inside one block, and one across slots
        got = store.read_view(vt, TREE, 12, 2, 3 * BLOCK + 8, BLOCK)
        assert got is not None
        assert bytes(got) == tagged(12, 1, 3, 2)[8:] + tagged(12, 2, 4, 2)[:8]
        assert store.read_view(vt, TREE, 13, 2, 0, BLOCK) is None  # nothing anywhere
    finally:
        store.close()


def test_a_read_through_a_deep_chain_costs_what_a_volume_read_costs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A view 100 versions below the only one that wrote the chunk reads it with the
    reads a plain read makes; a version in between that wrote one block adds a run."""
    store = open_store(tmp_path / "dev.img")
    dev = store.devices[0]
    chain = VersionTree({v: (v - 1 if v else None) for v in range(101)})
    calls: list[str] = []
    for name in ("pread", "preadv"):
        real = getattr(dio, name)

        def counted(*a: object, _real: object = real, _name: str = name) -> object:
            calls.append(_name)
            return _real(*a)  # type: ignore[operator]

        monkeypatch.setattr(dio, name, counted)
    try:
        data = b"".join(tagged(0, 0, b, 1) for b in range(256))
        store.write(dev, TREE, 0, 0, data)
        store.read(TREE, 0, 0, CHUNK_SIZE)
        plain = list(calls)
        calls.clear()
        got = store.read_view(chain, TREE, 0, 100, 0, CHUNK_SIZE)
        assert got is not None and bytes(got) == data
        calls.clear()
        got = store.read_view(chain, TREE, 0, 100, 0, CHUNK_SIZE)  # its map is kept
        assert calls == plain
        store.write_version(dev, TREE, 0, 50, 7 * BLOCK, tagged(0, 50, 7, 2))
        calls.clear()
        got = store.read_view(chain, TREE, 0, 100, 0, CHUNK_SIZE)
        assert got is not None and bytes(got[7 * BLOCK : 8 * BLOCK]) == tagged(0, 50, 7, 2)
        assert len(calls) == 3 * len(plain)  # runs 0-6 and 8-255 of v0, block 7 of v50
        got = store.read_view(chain, TREE, 0, 49, 7 * BLOCK, BLOCK)  # above v50: v0's
        assert got is not None and bytes(got) == tagged(0, 0, 7, 1)
    finally:
        store.close()


def test_a_partial_write_of_a_block_the_head_does_not_hold_merges_the_view(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "dev.img")
    dev = store.devices[0]
    vt = VersionTree(DOC_TREE)
    try:
        store.write(dev, TREE, 1, 0, tagged(1, 0, 0, 1) * 2)
        store.write_version(dev, TREE, 1, 1, BLOCK, tagged(1, 1, 1, 2))
        # head v2: 100 bytes across blocks 0 (v0's) and 1 (v1's)
        store.write_view(dev, vt, TREE, 1, 2, BLOCK - 50, b"n" * 100)
        assert store.versions(TREE, 1)[2] == 0b11
        got = store.read_view(vt, TREE, 1, 2, 0, 2 * BLOCK)
        want = tagged(1, 0, 0, 1)[:-50] + b"n" * 100 + tagged(1, 1, 1, 2)[50:]
        assert got is not None and bytes(got) == want
        for view, first in ((1, tagged(1, 0, 0, 1)), (0, tagged(1, 0, 0, 1))):
            got = store.read_view(vt, TREE, 1, view, 0, BLOCK)  # the ancestors unchanged
            assert got is not None and bytes(got) == first
        store.write_view(dev, vt, TREE, 1, 2, 10, b"m")  # a held block: in place
        got = store.read_view(vt, TREE, 1, 2, 0, 12)
        assert got is not None and bytes(got) == tagged(1, 0, 0, 1)[:10] + b"m" + b"\0"
        store.write_view(dev, vt, TREE, 1, 4, 0, b"z" * 10)  # v4: nothing below but v0
        got = store.read_view(vt, TREE, 1, 4, 0, BLOCK)
        assert got is not None and bytes(got) == b"z" * 10 + tagged(1, 0, 0, 1)[10:]
        assert store.free_version(TREE, 1, 2)  # its map drops the freed slot
        got = store.read_view(vt, TREE, 1, 2, BLOCK, BLOCK)
        assert got is not None and bytes(got) == tagged(1, 1, 1, 2)
    finally:
        store.close()


# -- the garbage pass ------------------------------------------------------------------

#: A tree with two heads (5 and 4) and the blocks each version wrote, per chunk; chunk 0
#: of version 0 is written whole.
GC_TREE = {0: None, 1: 0, 2: 1, 3: 0, 4: 3, 5: 2}
GC_WRITES = {
    0: {1: {3, 4, 10}, 2: {4, 11}, 3: {200, 3}, 4: {3}, 5: {10, 11, 12}},
    1: {1: {0}, 2: {0, 1}, 5: {1}},
}


def write_gc_tree(store: ChunkStore) -> None:
    dev = store.devices[0]
    store.write(dev, TREE, 0, 0, b"".join(tagged(0, 0, b, 1) for b in range(256)))
    for chunk, by_version in GC_WRITES.items():
        for version, blocks in by_version.items():
            for b in sorted(blocks):
                store.write_version(
                    dev, TREE, chunk, version, b * BLOCK, tagged(chunk, version, b, 1)
                )


def expected_view(vt: VersionTree, view: int, chunk: int) -> bytes:
    """What ``view`` reads of the chunk: each block from the nearest version that wrote it."""
    out = []
    for b in range(256):
        writers = [v for v, blocks in GC_WRITES[chunk].items() if b in blocks]
        if chunk == 0:
            writers.append(0)
        mine = [v for v in writers if vt.is_ancestor(v, view)]
        if mine:
            v = max(mine, key=vt.enter.__getitem__)
            out.append(tagged(chunk, v, b, 1))
        else:
            out.append(bytes(BLOCK))
    return b"".join(out)


def assert_views(store: ChunkStore, vt: VersionTree, live: set[int]) -> None:
    for view in live:
        for chunk in GC_WRITES:
            got = store.read_view(vt, TREE, chunk, view, 0, CHUNK_SIZE)
            want = expected_view(vt, view, chunk)
            assert (bytes(got) if got is not None else bytes(CHUNK_SIZE)) == want, (view, chunk)


def test_the_garbage_pass_frees_exactly_what_no_live_view_reads(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    vt = VersionTree(GC_TREE)
    live = set(GC_TREE)
    try:
        write_gc_tree(store)
        assert store.tree_chunks(TREE) == [0, 1]
        steps: list[tuple[set[int], dict[int, int], dict[int, int]]] = [
            (set(), {}, {}),
            # view 1 goes: what views 2 and 5 read of it through 2 stays
            ({1}, {1: 1 << 4}, {1: 0b1}),
            ({5}, {5: 0b111 << 10}, {5: 0b10}),  # head 5: its own slots only
            ({2}, {2: 1 << 4 | 1 << 11, 1: 1 << 3 | 1 << 10}, {2: 0b11}),
            ({0, 3}, {0: 1 << 3 | 1 << 200, 3: 1 << 3}, {}),  # only head 4 left
        ]
        for gone, chunk0, chunk1 in steps:
            live -= gone
            got = {c: store.collect_garbage(vt, live, TREE, c) for c in (0, 1)}
            assert got == {0: chunk0, 1: chunk1}, gone
            assert_views(store, vt, live)
        assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 4: 1 << 3, 3: 1 << 200}
        assert store.versions(TREE, 1) == {}
        raw = store.read(TREE, 0, 3 * BLOCK, BLOCK)  # punched in version 0's slot
        assert raw is not None and not any(raw)
        assert_views(store, vt, live)
        store.close()
        store = open_store(path)
        assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 4: 1 << 3, 3: 1 << 200}
        assert_views(store, vt, live)
        assert store.collect_garbage(vt, set(), TREE, 0) == {
            0: ALL_BLOCKS,
            3: 1 << 200,
            4: 1 << 3,
        }
        assert store.tree_chunks(TREE) == [] and store.devices[0].used == 0
    finally:
        store.close()
    del dev


def test_the_garbage_pass_frees_nothing_of_versions_its_tree_lacks(tmp_path: Path) -> None:
    """A tree that lags the chunk (version 2, a newer head, already written): version
    2's slot is kept whole, and a live view the tree lacks is refused, nothing freed."""
    store = open_store(tmp_path / "dev.img")
    dev = store.devices[0]
    lagging = VersionTree({0: None, 1: 0})
    try:
        store.write(dev, TREE, 0, 0, tagged(0, 0, 0, 1))
        store.write_version(dev, TREE, 0, 2, BLOCK, tagged(0, 2, 1, 2))
        asyncio.run(store.sync())
        held = {0: ALL_BLOCKS, 2: 1 << 1}
        with pytest.raises(ValueError, match=r"live views \[2\]"):
            store.collect_garbage(lagging, [1, 2], TREE, 0)
        assert store.versions(TREE, 0) == held
        assert store.collect_garbage(lagging, [1], TREE, 0) == {}
        assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 2: 1 << 1}
        got = store.read_version(TREE, 0, 2, BLOCK, BLOCK)
        assert got is not None and bytes(got) == tagged(0, 2, 1, 2)
    finally:
        store.close()


def test_cleared_holds_bits_persist_and_views_read_through(tmp_path: Path) -> None:
    """A block of a dead version that a nearer version shadows for every live view
    is garbage: zeroed and its bit cleared, on the disk too."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    vt = VersionTree({0: None, 1: 0, 2: 1})
    try:
        for version, blocks in ((1, (3, 4)), (2, (4,))):
            for b in blocks:
                store.write_version(dev, TREE, 0, version, b * BLOCK, tagged(0, version, b, 1))
        asyncio.run(store.sync())
        assert store.collect_garbage(vt, {2}, TREE, 0) == {1: 1 << 4}
        assert store.versions(TREE, 0) == {1: 1 << 3, 2: 1 << 4}
        got = store.read_version(TREE, 0, 1, 4 * BLOCK, BLOCK)
        assert got is not None and not any(got)
    finally:
        store.close()
    store = open_store(path)
    try:
        assert store.versions(TREE, 0) == {1: 1 << 3, 2: 1 << 4}
        got = store.read_view(vt, TREE, 0, 2, 3 * BLOCK, 2 * BLOCK)
        assert got is not None and bytes(got) == tagged(0, 1, 3, 1) + tagged(0, 2, 4, 1)
    finally:
        store.close()


GC_ORDER = [1, 0, 5, 2, 3, 4]


def test_a_power_cut_at_every_sync_of_the_garbage_pass_keeps_every_live_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views go one by one, each followed by the garbage pass over the tree's chunks
    and a sync; a power cut at each sync in turn: every view still live reads what it
    read before, and the pass run again after the restart finishes the job."""
    fresh = tmp_path / "fresh.img"
    store = open_store(fresh)
    write_gc_tree(store)
    store.close()
    path, crashed = tmp_path / "dev.img", tmp_path / "crashed.img"
    vt = VersionTree(GC_TREE)
    rng = random.Random(5)
    cut_at = 1
    while True:
        sparse_copy(fresh, path)
        live = set(GC_TREE)

        async def passes(store: ChunkStore, live: set[int] = live) -> None:
            for view in GC_ORDER:
                live.discard(view)
                for chunk in store.tree_chunks(TREE):
                    store.collect_garbage(vt, live, TREE, chunk)
                await store.sync()

        with monkeypatch.context() as mp:
            if not run_until_cut(path, crashed, mp, cut_at, passes, rng):
                break
        store = open_store(crashed)
        try:
            assert_views(store, vt, live)
            for chunk in store.tree_chunks(TREE):
                store.collect_garbage(vt, live, TREE, chunk)
            assert_views(store, vt, live)
        finally:
            store.close()
        cut_at += 1
    assert cut_at > 6


# -- collapse --------------------------------------------------------------------------

#: 0 <- 1 <- 2 <- 3: versions 1 and 2 are dead (no volume reads them), view 3 is live.
CHAIN = {0: None, 1: 0, 2: 1, 3: 2}


def write_chain(store: ChunkStore) -> None:
    dev = store.devices[0]
    store.write(dev, TREE, 0, 0, b"".join(tagged(0, 0, b, 1) for b in range(4)))
    for version, blocks in ((1, (1, 2)), (2, (2, 3)), (3, (3,))):
        for b in blocks:
            store.write_version(dev, TREE, 0, version, b * BLOCK, tagged(0, version, b, 1))


def chain_view(store: ChunkStore, vt: VersionTree) -> bytes:
    got = store.read_view(vt, TREE, 0, 3, 0, 4 * BLOCK)
    assert got is not None
    return bytes(got)


CHAIN_VIEW = tagged(0, 0, 0, 1) + tagged(0, 1, 1, 1) + tagged(0, 2, 2, 1) + tagged(0, 3, 3, 1)


def test_collapse_relabels_or_merges_and_views_read_the_same(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    vt = VersionTree(CHAIN)
    try:
        write_chain(store)
        assert chain_view(store, vt) == CHAIN_VIEW
        with pytest.raises(ValueError, match="children, not 1"):
            asyncio.run(store.collapse(VersionTree({0: None, 1: 0, 2: 0}), 0, TREE, 0))
        assert asyncio.run(store.collapse(vt, 1, TREE, 0)) == "merged"  # into 2's slot
        assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 2: 0b1110, 3: 0b1000}
        assert chain_view(store, vt) == CHAIN_VIEW
        assert asyncio.run(store.collapse(vt, 1, TREE, 0)) == "none"
        vt = VersionTree({0: None, 2: 0, 3: 2})  # the MDM dropped version 1
        assert chain_view(store, vt) == CHAIN_VIEW
        store.free_version(TREE, 0, 3)  # 3 rewrites its block 3 in a new slot later
        store.write_version(store.devices[0], TREE, 0, 3, 3 * BLOCK, tagged(0, 3, 3, 1))
        assert asyncio.run(store.collapse(vt, 2, TREE, 0)) == "merged"
        vt = VersionTree({0: None, 3: 0})
        assert store.versions(TREE, 0) == {0: ALL_BLOCKS, 3: 0b1110}
        assert chain_view(store, vt) == CHAIN_VIEW
        assert asyncio.run(store.collapse(vt, 0, TREE, 0)) == "merged"  # 0 into 3
        vt = VersionTree({3: None})
        assert store.versions(TREE, 0) == {3: ALL_BLOCKS}
        assert chain_view(store, vt) == CHAIN_VIEW
    finally:
        store.close()
    store = open_store(path)
    try:
        assert store.versions(TREE, 0) == {3: ALL_BLOCKS}
        assert chain_view(store, vt) == CHAIN_VIEW
    finally:
        store.close()


def test_collapse_without_a_child_slot_moves_no_data(tmp_path: Path) -> None:
    """A dead version whose child has no slot of the chunk: its slot is the child's
    (version 0's plain slot too: it becomes a version slot holding every block)."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    try:
        store.write(dev, TREE, 0, 0, tagged(0, 0, 0, 1))
        store.write_version(dev, TREE, 0, 1, BLOCK, tagged(0, 1, 1, 1))
        slots = {v: vs.slot for v in (1,) if (vs := store.version_slot(TREE, 0, v))}
        vt = VersionTree({0: None, 1: 0, 2: 1})
        assert asyncio.run(store.collapse(vt, 1, TREE, 0)) == "relabelled"
        vs2 = store.version_slot(TREE, 0, 2)
        assert vs2 is not None and vs2.slot == slots[1]
        vt = VersionTree({0: None, 2: 0})
        assert asyncio.run(store.collapse(vt, 0, TREE, 0)) == "merged"
        assert store.versions(TREE, 0) == {2: ALL_BLOCKS}
        store.write(dev, TREE, 5, 0, tagged(5, 0, 0, 1))  # a plain chunk, no child slot
        assert asyncio.run(store.collapse(vt, 0, TREE, 5)) == "relabelled"
        assert store.versions(TREE, 5) == {2: ALL_BLOCKS} and store.read(TREE, 5, 0, 8) is None
        assert dev.used == 2
    finally:
        store.close()
    store = open_store(path)
    try:
        vt = VersionTree({2: None})
        assert store.versions(TREE, 5) == {2: ALL_BLOCKS}
        got = store.read_view(vt, TREE, 5, 2, 0, BLOCK)
        assert got is not None and bytes(got) == tagged(5, 0, 0, 1)
        got = store.read_view(vt, TREE, 0, 2, 0, 2 * BLOCK)
        assert got is not None and bytes(got) == tagged(0, 0, 0, 1) + tagged(0, 1, 1, 1)
        assert store.chunk_ids() == []
    finally:
        store.close()


def test_a_power_cut_at_every_sync_of_collapses_keeps_the_live_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions 1, 2, then 0 collapsed into their children, a chunk with a child slot
    and one without; a power cut at each sync in turn: the live view reads the same
    through the tree as the MDM still has it (the collapses not reported), and the
    collapses run again complete."""
    fresh = tmp_path / "fresh.img"
    store = open_store(fresh)
    write_chain(store)
    store.write(store.devices[0], TREE, 1, 0, tagged(1, 0, 0, 1))
    store.close()
    path, crashed = tmp_path / "dev.img", tmp_path / "crashed.img"
    trees = [
        (VersionTree(CHAIN), 1),
        (VersionTree({0: None, 2: 0, 3: 2}), 2),
        (VersionTree({0: None, 3: 0}), 0),
    ]
    cut_at, keep = 1, 0
    while True:
        sparse_copy(fresh, path)
        done: list[int] = []

        async def collapses(store: ChunkStore, done: list[int] = done) -> None:
            for vt, dead in trees:
                for chunk in (0, 1):
                    await store.collapse(vt, dead, TREE, chunk)
                done.append(dead)

        # Every crash image that keeps exactly one of the unsynced pages (the index
        # page without the extension-region page, say), then the one keeping none.
        pick = KeepOne(keep)
        with monkeypatch.context() as mp:
            if not run_until_cut(path, crashed, mp, cut_at, collapses, pick):  # type: ignore[arg-type]
                break
        store = open_store(crashed)
        try:
            vt = trees[len(done)][0]
            assert chain_view(store, vt) == CHAIN_VIEW
            got = store.read_view(vt, TREE, 1, 3, 0, BLOCK)
            assert got is not None and bytes(got) == tagged(1, 0, 0, 1)
            asyncio.run(collapses(store, []))
            vt = VersionTree({3: None})
            assert chain_view(store, vt) == CHAIN_VIEW
            assert store.versions(TREE, 0) == store.versions(TREE, 1) == {3: ALL_BLOCKS}
        finally:
            store.close()
        keep += 1
        if keep > pick.calls:
            cut_at, keep = cut_at + 1, 0
    assert cut_at > 6


def test_zeroes_through_a_head_are_held_where_an_ancestor_holds_the_block(
    tmp_path: Path,
) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    vt = VersionTree({0: None, 1: 0})
    try:
        store.write(dev, TREE, 0, 0, b"".join(tagged(0, 0, b, 1) for b in range(4)))
        store.write_version(dev, TREE, 0, 1, 3 * BLOCK, tagged(0, 1, 3, 2))
        store.zero_view(vt, dev, TREE, 0, 1, BLOCK, 2 * BLOCK + 100)  # 1, 2 and part of 3
        assert store.versions(TREE, 0)[1] == 0b1110
        got = store.read_view(vt, TREE, 0, 1, 0, 4 * BLOCK)
        want = tagged(0, 0, 0, 1) + bytes(2 * BLOCK + 100) + tagged(0, 1, 3, 2)[100:]
        assert got is not None and bytes(got) == want
        got = store.read_view(vt, TREE, 0, 0, 0, 4 * BLOCK)  # the ancestor unchanged
        assert got is not None and bytes(got) == b"".join(tagged(0, 0, b, 1) for b in range(4))
        store.zero_view(vt, dev, TREE, 7, 1, 0, CHUNK_SIZE)  # nobody holds chunk 7
        assert store.versions(TREE, 7) == {}
        store.write_version(dev, TREE, 7, 1, 0, tagged(7, 1, 0, 1))
        store.zero_view(vt, dev, TREE, 7, 1, 0, CHUNK_SIZE)  # only the head: freed
        assert store.versions(TREE, 7) == {} and dev.used == 2
    finally:
        store.close()
    store = open_store(path)
    try:
        assert store.versions(TREE, 0)[1] == 0b1110
        got = store.read_view(vt, TREE, 0, 1, BLOCK, BLOCK)
        assert got is not None and not any(got)
    finally:
        store.close()


def test_a_first_write_where_no_ancestor_holds_the_blocks_costs_one_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holds bits of blocks that read zeroes without them go with the data: the
    FLUSH after the first write of a head's slot there is one fdatasync; over an
    ancestor's blocks it is two (data, then entries)."""
    store = open_store(tmp_path / "dev.img")
    dev = store.devices[0]
    vt = VersionTree({0: None, 1: 0})
    syncs: list[int] = []
    real = dio.fdatasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    async def flush_after(write: Callable[[], None]) -> int:
        await store.sync()
        syncs.clear()
        write()
        await store.sync()
        return len(syncs)

    try:
        store.write(dev, TREE, 0, 0, tagged(0, 0, 0, 1))
        store.write_version(dev, TREE, 3, 1, 0, tagged(3, 1, 0, 1))  # bit 4 set by its sync
        monkeypatch.setattr(dio, "fdatasync", counted)

        def fresh() -> None:
            store.write_view(dev, vt, TREE, 9, 1, BLOCK, tagged(9, 1, 1, 1))

        def over_v0() -> None:
            store.write_view(dev, vt, TREE, 0, 1, 0, tagged(0, 1, 0, 1))

        assert asyncio.run(flush_after(fresh)) == 1
        assert asyncio.run(flush_after(over_v0)) == 2
    finally:
        store.close()
    store = open_store(tmp_path / "dev.img")
    try:
        assert store.versions(TREE, 9) == {1: 0b10}
        got = store.read_view(vt, TREE, 9, 1, BLOCK, BLOCK)
        assert got is not None and bytes(got) == tagged(9, 1, 1, 1)
    finally:
        store.close()
