"""Tombstones of the SDS chunk store (on-disk format version 2): deleted volumes whose
chunks read as unwritten, refuse writes, are freed through the crash-safe free path,
and whose tombstones survive power cuts (docs/sds.md, "Tombstones"; SIGKILL in
tests/test_sds_format_process.py)."""

from __future__ import annotations

import asyncio
import os
import random
import struct
from pathlib import Path

import pytest

from meshblock.chunks import CHUNK_SIZE
from meshblock.sds.store import (
    REGION_TOMBSTONES,
    TOMB_COPY_SIZE,
    TOMBSTONE_CAPACITY,
    ChunkStore,
    DeviceSpec,
    StoreError,
)
from test_sds_store import PowerLoss, _tagged

pytestmark = pytest.mark.unit

MiB = 1024 * 1024


def open_store(*paths: Path, capacity: int = 16 * MiB) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(p), capacity, "pool") for p in paths])
    store.open()
    return store


def test_tombstoned_volume_reads_unwritten_refuses_writes_and_is_freed(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    dev.pool_id = 1
    store.index_pgs(1, 8)
    for chunk in range(5):
        store.write(dev, 5, chunk, 0, b"five" * 1024)
    store.write(dev, 6, 0, 0, b"six")

    async def main() -> None:
        await store.add_tombstones({5: 10})
        assert store.is_tombstoned(5) and not store.is_tombstoned(6)
        assert store.read(5, 0, 0, 4) is None
        with pytest.raises(StoreError, match="deleted"):
            store.write(dev, 5, 0, 0, b"x")
        with pytest.raises(StoreError, match="deleted"):
            store.write(dev, 5, 99, 0, b"x")  # a new chunk neither
        with pytest.raises(StoreError, match="deleted"):
            store.zero(5, 1, 0, 4096)
        assert dev.used == 6 and store.tombstone_chunks_left(5) == 5
        await store.add_tombstones({5: 99, 7: 12})  # an existing tombstone keeps its epoch
        assert store.tombstones() == {5: 10, 7: 12}
        with pytest.raises(StoreError, match="still has 5 chunks"):
            await store.drop_tombstones([5, 7])
        assert store.tombstones() == {5: 10, 7: 12}  # nothing changed, not even 7

        freed = [await store.free_tombstoned(5, 2) for _ in range(4)]
        assert freed == [2, 2, 1, 0]
        assert store.tombstone_chunks_left(5) == 0 and store.volume_chunks() == {6: 1}
        assert dev.used == 1
        assert sorted(k for pg in range(8) for k in store.chunks_of_pg(1, pg) or []) == [(6, 0)]
        await store.drop_tombstones([5, 7, 8])
        assert store.tombstones() == {} and not store.is_tombstoned(5)
        assert len(dev.free) + len(dev.pending) == dev.slot_count - 1  # capacity back

    try:
        asyncio.run(main())
    finally:
        store.close()
    store = open_store(path)
    try:
        assert store.tombstones() == {}
        assert store.volume_chunks() == {6: 1}
        assert store.read(5, 0, 0, 4) is None
        got = store.read(6, 0, 0, 3)
        assert got is not None and bytes(got) == b"six"
    finally:
        store.close()


def test_tombstones_are_loaded_at_open_and_kept_on_every_device(tmp_path: Path) -> None:
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    store = open_store(*paths)
    store.write(store.devices[0], 3, 0, 0, b"a")
    store.write(store.devices[1], 3, 1, 0, b"b")
    asyncio.run(store.add_tombstones({3: 4, 9: 5}))
    store.close()
    for path in paths:  # each device holds the whole table
        single = open_store(path)
        try:
            assert single.tombstones() == {3: 4, 9: 5}
        finally:
            single.close()
    store = open_store(*paths)
    try:
        assert store.tombstones() == {3: 4, 9: 5}
        assert store.read(3, 0, 0, 1) is None and store.read(3, 1, 0, 1) is None
        assert store.tombstone_chunks_left(3) == 2

        async def free_all() -> None:
            assert await store.free_tombstoned(3, 256) == 2
            await store.drop_tombstones([3])

        asyncio.run(free_all())
        assert [d.used for d in store.devices] == [0, 0]
    finally:
        store.close()


def test_newest_table_of_any_device_wins_and_lagging_devices_catch_up(tmp_path: Path) -> None:
    """A crash between the devices of an update: the device that got the newer table
    wins at open, the other is brought to it."""
    paths = [tmp_path / "a.img", tmp_path / "b.img"]
    store = open_store(*paths)
    asyncio.run(store.add_tombstones({1: 1}))
    store.devices[1].write_tombstones(100, {1: 1, 2: 2})  # only b got the next update
    store.close()
    store = open_store(*paths)
    try:
        assert store.tombstones() == {1: 1, 2: 2}
        assert [d.read_tombstones()[0] for d in store.devices] == [100, 100]
    finally:
        store.close()


def test_capacity_limit_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    full = {v: v + 1 for v in range(1, TOMBSTONE_CAPACITY + 1)}

    async def main() -> None:
        await store.add_tombstones(full)
        await store.add_tombstones({1: 50})  # already there: nothing to add, no error
        with pytest.raises(StoreError, match=f"tombstone table full: {TOMBSTONE_CAPACITY}"):
            await store.add_tombstones({TOMBSTONE_CAPACITY + 1: 1, 1: 1})
        with pytest.raises(StoreError, match="u64"):
            await store.add_tombstones({-1: 1})
        assert store.tombstones() == full
        await store.drop_tombstones([1])
        await store.add_tombstones({TOMBSTONE_CAPACITY + 1: 7})  # room again

    try:
        asyncio.run(main())
    finally:
        store.close()
    store = open_store(path)
    try:
        want = dict(full)
        del want[1]
        want[TOMBSTONE_CAPACITY + 1] = 7
        assert store.tombstones() == want
    finally:
        store.close()


# -- crash safety ----------------------------------------------------------------------


def check_slots(path: Path, capacity: int) -> None:
    """Every slot the index names holds only zeroes or sectors tagged with its own
    chunk (tombstoned or not: read straight from the device), and no slot twice."""
    store = open_store(path, capacity=capacity)
    try:
        dev = store.devices[0]
        slots = set()
        for vol, chunk in store.chunk_ids():
            loc = store.location(vol, chunk)
            assert loc is not None and loc[1] not in slots
            slots.add(loc[1])
            data = os.pread(dev.fd, CHUNK_SIZE, dev.slot_offset(loc[1])).ljust(CHUNK_SIZE, b"\0")
            for off in range(0, CHUNK_SIZE, 512):
                if any(data[off : off + 512]):
                    got = struct.unpack_from(">QQ", data, off)
                    assert got == (vol, chunk), f"{vol}/{chunk} holds {got} at {off}"
        assert dev.used == len(slots)
        assert len(dev.free) + len(dev.pending) + dev.used == dev.slot_count
    finally:
        store.close()


def _live_image(tmp_path: Path, power: PowerLoss, rng: random.Random) -> Path:
    crashed = tmp_path / f"crash{rng.randrange(1 << 30)}.img"
    power.crash_image(crashed, rng)
    return crashed


def test_power_cut_keeps_acknowledged_tombstones_and_never_revives_freed_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power cuts that lose a random subset of the unsynced pages: (a) in the middle of
    a table update, every tombstone acknowledged before it is still there; (b) after
    add_tombstones returned, the tombstone is there and the volume's chunks never read
    back; (c) in the middle of a background free, no chunk shows another chunk's bytes;
    (d) after drop_tombstones returned, or with the power cut while it syncs the
    table, a dropped tombstone's chunks are never back."""
    capacity = 12 * MiB
    path = tmp_path / "dev.img"
    base = {v: v for v in range(100, 1100)}  # ~16 KiB of table: an update spans pages
    rng = random.Random(17)
    for round_ in range(10):
        open_store(path, capacity=capacity).close()
        with monkeypatch.context() as mp:
            power = PowerLoss(path, mp)
            store = open_store(path, capacity=capacity)
            dev = store.devices[0]
            for vol in (1, 2, 3):
                for chunk in range(3):
                    store.write(dev, vol, chunk, 4096 * chunk, _tagged(vol, chunk, 8, 1))
            asyncio.run(store.add_tombstones({**base, 2: 7}))
            # (a) an update in flight: written, never synced
            dev.write_tombstones(store._tomb_seq + 1, {**base, 2: 7, 3: 8})
            crashed = _live_image(tmp_path, power, rng)
            for d in store.devices:
                d.close()
        after = open_store(crashed, capacity=capacity)
        try:
            table = after.tombstones()
            assert table in ({**base, 2: 7}, {**base, 2: 7, 3: 8}), f"round {round_}"
            assert after.read(2, 0, 0, 4096) is None
        finally:
            after.close()
        path.write_bytes(crashed.read_bytes())  # go on from the crashed state

        with monkeypatch.context() as mp:
            power = PowerLoss(path, mp)
            store = open_store(path, capacity=capacity)

            async def free_some(store: ChunkStore) -> None:
                await store.free_tombstoned(2, rng.randrange(0, 4))

            asyncio.run(free_some(store))  # (b), (c): whatever of the free reached the disk
            crashed = _live_image(tmp_path, power, rng)
            for d in store.devices:
                d.close()
        check_slots(crashed, capacity)
        after = open_store(crashed, capacity=capacity)
        try:
            assert after.tombstones() == table
            assert all(after.read(2, c, 0, 4096) is None for c in range(3))
        finally:
            after.close()
        path.write_bytes(crashed.read_bytes())

        pre_drop = path.read_bytes()
        for cut_in_drop in (True, False):
            path.write_bytes(pre_drop)
            with monkeypatch.context() as mp:
                power = PowerLoss(path, mp)
                if cut_in_drop:
                    _cut_power_at_table_sync(mp)
                store = open_store(path, capacity=capacity)
                try:
                    asyncio.run(_free_and_drop(store, 2))
                except PowerCut:
                    assert cut_in_drop
                crashed = _live_image(tmp_path, power, rng)
                for d in store.devices:
                    d.close()
            check_slots(crashed, capacity)
            after = open_store(crashed, capacity=capacity)
            try:
                left = after.tombstones()
                if not cut_in_drop:  # (d)
                    assert 2 not in left
                if 2 not in left:  # the drop reached the disk: so did every free
                    assert left == {k: v for k, v in table.items() if k != 2}
                    assert all(after.location(2, c) is None for c in range(3)), round_
                assert after.tombstone_chunks_left(3) == 3
            finally:
                after.close()
        path.unlink()


class PowerCut(Exception):
    """The power went out in the middle of an fdatasync."""


def _cut_power_at_table_sync(mp: pytest.MonkeyPatch) -> None:
    """Cut the power at the first fdatasync after a tombstone table was written (the
    pages written since the last completed sync may or may not be on the disk)."""
    import meshblock.sds.device_io as dio
    from meshblock.sds.store import Device

    written = []
    real_write, real_sync = Device.write_tombstones, dio.fdatasync

    def write_tombstones(self: Device, seq: int, table: dict[int, int]) -> None:
        written.append(seq)
        real_write(self, seq, table)

    def fdatasync(fd: int) -> None:
        if written:
            raise PowerCut
        real_sync(fd)

    mp.setattr(Device, "write_tombstones", write_tombstones)
    mp.setattr(dio, "fdatasync", fdatasync)


async def _free_and_drop(store: ChunkStore, volume: int) -> None:
    while await store.free_tombstoned(volume, 1):
        pass
    await store.drop_tombstones([volume])


def test_tombstone_region_is_in_the_superblock_table(tmp_path: Path) -> None:
    store = open_store(tmp_path / "dev.img")
    try:
        dev = store.devices[0]
        offset, length = dev.regions[REGION_TOMBSTONES]
        assert length == 2 * TOMB_COPY_SIZE and offset % 4096 == 0
        assert offset + length <= dev.data_offset
    finally:
        store.close()
