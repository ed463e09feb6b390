"""Block checksums of the SDS's chunk store (docs/sds.md, "Checksums"): a CRC32C per
4 KiB block, kept on every write, WRITE_ZEROES and TRIM and checked on every read; a
corrupted block is an error (ChecksumError, IO_ERROR on the wire, counted per device);
blocks written before checksums were kept are unknown, not errors; and a power cut
never makes data and checksums disagree (the write-intent record)."""

from __future__ import annotations

import asyncio
import errno
import random
import struct
import zlib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import meshblock.sds.checksums as checksums
import meshblock.sds.store as store_mod
from _sds_v1 import CHUNK_DATA_OFFSET, v1_chunk_bytes, write_v1_device
from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds.checksums import (
    BLOCK,
    ROW_SIZE,
    WI_BITMAP,
    ChecksumError,
    bad_in_rows,
    crc,
    slot_crcs,
)
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache, PgMap
from meshblock.sds.metrics import SdsCollector
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import (
    ENTRY,
    INCOMPAT_CHECKSUMS,
    INCOMPAT_WRITE_INTENT,
    INDEX_OFFSET,
    REGION_CHECKSUMS,
    REGION_WRITE_INTENT,
    SUPER_V2,
    SUPERBLOCK,
    ChunkStore,
    DeviceSpec,
    NoSpace,
)
from meshblock.wire import csum
from meshblock.wire.protocol import REQUEST_MAGIC, ROLE_OPS, Op, PeerRole, ReqFlag, Request, Status
from test_device_failstop_units import DEV_IDS, ME, PG_COUNT, POOL, Conn, _pg_map
from test_sds_store import PowerLoss
from test_wire_csum import CANCELLING_MARKS, cancelling_write

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
VOL = 5


def open_store(path: Path, capacity: int = 16 * MiB, checksums: bool = True) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(path), capacity, "pool")], checksums=checksums)
    store.open()
    return store


def flip(path: Path, offset: int) -> None:
    """Flip the bits of one byte of the device file (behind the store's back)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def data_offset(store: ChunkStore, volume: int, chunk: int, offset: int) -> int:
    """Where byte ``offset`` of the chunk is on its device, from the store's index."""
    loc = store.location(volume, chunk)
    assert loc is not None, (volume, chunk)
    dev, slot = loc
    return dev.slot_offset(slot) + offset


def stored_row(store: ChunkStore, path: Path, volume: int, chunk: int) -> bytes:
    loc = store.location(volume, chunk)
    assert loc is not None
    dev, slot = loc
    with open(path, "rb") as f:
        f.seek(dev.regions[REGION_CHECKSUMS][0] + slot * ROW_SIZE)
        return f.read(ROW_SIZE)


def incompat(path: Path) -> int:
    with open(path, "rb") as f:
        return int(SUPER_V2.unpack_from(f.read(512), SUPERBLOCK.size)[0])


def test_a_flipped_byte_is_found_on_read_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    rng = random.Random(1)
    data = rng.randbytes(4 * BLOCK)
    try:
        store.write(dev, VOL, 1, 0, data)
        got = store.read(VOL, 1, 0, 4 * BLOCK)
        assert got is not None and bytes(got) == data
        flip(path, data_offset(store, VOL, 1, 2 * BLOCK + 7))  # block 2
        with pytest.raises(ChecksumError) as caught:
            store.read(VOL, 1, 0, CHUNK_SIZE)
        err = caught.value
        assert (err.errno, err.device, err.volume, err.chunk, err.blocks) == (
            errno.EIO,
            dev.path,
            VOL,
            1,
            [2],
        )
        assert dev.checksum_errors == 1
        with pytest.raises(ChecksumError):  # unaligned, touching block 2 only in part
            store.read(VOL, 1, 2 * BLOCK + 4000, 200)
        assert dev.checksum_errors == 2
        got = store.read(VOL, 1, 100, 2 * BLOCK - 100)  # blocks 0 and 1 are fine
        assert got is not None and bytes(got) == data[100 : 2 * BLOCK]
        # A write into part of the bad block would bless it: refused, nothing written.
        before = path.read_bytes()
        with pytest.raises(ChecksumError):
            store.write(dev, VOL, 1, 2 * BLOCK + 10, b"z" * 10)
        with pytest.raises(ChecksumError):
            store.zero(VOL, 1, 2 * BLOCK + 10, 10)
        assert path.read_bytes() == before
        assert dev.checksum_errors == 4 and not dev.failed
        store.write(dev, VOL, 1, 2 * BLOCK, b"n" * BLOCK)  # the whole block: rewritten
        got = store.read(VOL, 1, 0, 4 * BLOCK)
        want = data[: 2 * BLOCK] + b"n" * BLOCK + data[3 * BLOCK :]
        assert got is not None and bytes(got) == want
    finally:
        store.close()


def test_checked_reads_of_many_blocks_take_one_pass_and_still_name_a_bad_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checked read and a copy's read of more than 5 blocks that all have a checksum
    recorded are checked in one crc32c pass (wire.csum.one_pass): no CRC per block is
    computed unless that pass fails, and then the blocks are checked one by one and
    the bad one named as before; a read of 5 blocks or fewer goes block by block, and
    so does the scrub's (its computed row must be the bytes' own)."""
    per_block: list[int] = []
    real = checksums.block_crcs

    def counting(view: memoryview) -> list[int]:
        per_block.append(len(view) // BLOCK)
        return real(view)

    monkeypatch.setattr(store_mod, "block_crcs", counting)
    monkeypatch.setattr(
        store_mod, "slot_crcs", lambda d: struct.pack(">256I", *counting(memoryview(d)))
    )
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    data = random.Random(4).randbytes(CHUNK_SIZE)
    try:
        store.write(dev, VOL, 1, 0, data)  # computes its checksums block by block
        per_block.clear()
        got = store.read(VOL, 1, 0, CHUNK_SIZE)
        assert got is not None and bytes(got) == data
        reply = store.read_reply(VOL, 1, 0, CHUNK_SIZE)
        assert reply is not None and bytes(reply) == data + csum.trailer(data)
        rows = store.checksum_rows(VOL, 1)
        assert rows is not None and rows[0] == rows[1] == csum.trailer(data)
        salvaged, bad = store.read_salvage(VOL, 1)
        assert salvaged is not None and bytes(salvaged) == data and bad == []
        assert per_block == [256]  # the scrub's; the others in one pass each
        per_block.clear()
        got = store.read(VOL, 1, 8 * BLOCK, 5 * BLOCK)
        assert got is not None and bytes(got) == data[8 * BLOCK : 13 * BLOCK]
        assert per_block == [5]
        flip(path, data_offset(store, VOL, 1, 37 * BLOCK + 1234))
        per_block.clear()
        with pytest.raises(ChecksumError) as caught:
            store.read(VOL, 1, 0, CHUNK_SIZE)
        assert caught.value.blocks == [37]
        with pytest.raises(ChecksumError) as caught:
            store.read_reply(VOL, 1, 32 * BLOCK, 16 * BLOCK)
        assert caught.value.blocks == [37]
        salvaged, bad = store.read_salvage(VOL, 1)
        assert bad == [37] and salvaged is not None
        assert bytes(salvaged[37 * BLOCK : 38 * BLOCK]) == bytes(BLOCK)
        rows = store.checksum_rows(VOL, 1, count=False)
        assert rows is not None and rows[0] == csum.trailer(data) != rows[1]
        assert per_block == [256, 16, 256, 256]  # the pass failed: block by block
        assert dev.checksum_errors == 2
    finally:
        store.close()


def test_blocks_marked_bad_whose_differences_cancel_in_one_pass_still_read_as_errors(
    tmp_path: Path,
) -> None:
    """Blocks marked bad all differ from their zeroes by the same value, and some sets
    of them cancel in one pass: a row holding the mark is checked block by block, so
    the chunk still reads as a checksum error (not zeroes), a copy's salvage read and
    the scrub name every marked block."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    data = random.Random(9).randbytes(CHUNK_SIZE)
    marks = list(CANCELLING_MARKS)
    try:
        store.write(dev, VOL, 1, 0, data)
        for b in marks:
            store.mark_bad(VOL, 1, b * BLOCK, BLOCK)
        with pytest.raises(ChecksumError) as caught:
            store.read(VOL, 1, 0, CHUNK_SIZE)
        assert caught.value.blocks == marks
        with pytest.raises(ChecksumError) as caught:
            store.read_reply(VOL, 1, 0, CHUNK_SIZE)
        assert caught.value.blocks == marks
        salvaged, bad = store.read_salvage(VOL, 1)
        assert bad == marks and salvaged is not None
        rows = store.checksum_rows(VOL, 1, count=False)
        assert rows is not None and bad_in_rows(*rows) == marks
    finally:
        store.close()


def test_the_scrub_reports_the_crcs_of_the_bytes_not_the_row_kept(tmp_path: Path) -> None:
    """Rows a sender's built checksums planted (stored as they came, differences that
    cancel in one pass): the scrub's computed row is the bytes' own, so the mismatch
    of both blocks is seen."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    data, sums = cancelling_write(6)
    try:
        store.write(store.devices[0], VOL, 1, 0, data, sums)
        rows = store.checksum_rows(VOL, 1, count=False)
        assert rows is not None and rows == (sums, csum.trailer(data))
        assert bad_in_rows(*rows) == [10, 11]
    finally:
        store.close()


def test_a_corrupted_read_is_an_io_error_on_the_wire_and_in_the_metrics(tmp_path: Path) -> None:
    """Through the request handler: READ of a corrupted block answers IO_ERROR (no
    bytes), the device keeps serving, and meshblock_sds_checksum_errors_total moves."""
    store = ChunkStore([DeviceSpec(str(tmp_path / f"dev{i}.img"), 16 * MiB, "p") for i in (0, 1)])
    store.open()
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    sds.set_identity(ME, {d.path: (DEV_IDS[i], POOL) for i, d in enumerate(store.devices)})
    resync = Resync(sds)
    svc = DataService(sds, resync)
    conn = Conn()
    chunk = next(c for c in range(64) if pg_of(VOL, c, PG_COUNT) == 0)
    registry = CollectorRegistry()
    registry.register(SdsCollector(sds, resync))

    def request(req: int, op: Op, data: bytes = b"") -> None:
        length = len(data) or BLOCK
        hdr = Request(REQUEST_MAGIC, op, 0, 0, req, POOL, 0, 1, VOL, chunk, 0, length)
        svc.handle(conn, hdr, memoryview(data))

    async def answer(req: int) -> tuple[int, memoryview | None]:
        for _ in range(500):
            if req in conn.replies:
                return conn.replies[req]
            await asyncio.sleep(0.01)
        raise AssertionError(f"request {req} got no reply")

    async def main() -> None:
        sds.maps.update(_pg_map(1, {0, 1}))
        request(1, Op.WRITE, b"q" * BLOCK)
        assert (await answer(1))[0] == Status.OK
        dev = store.devices[0]
        flip(Path(dev.path), data_offset(store, VOL, chunk, 5))
        request(2, Op.READ)
        assert await answer(2) == (Status.IO_ERROR, None)
        request(3, Op.WRITE, b"r" * BLOCK)  # the whole block again: repaired
        assert (await answer(3))[0] == Status.OK
        request(4, Op.READ)
        status, payload = await answer(4)
        assert status == Status.OK and payload is not None and bytes(payload) == b"r" * BLOCK

    try:
        asyncio.run(main())
        counts = [
            registry.get_sample_value("meshblock_sds_checksum_errors_total", {"device": d.path})
            for d in store.devices
        ]
        assert counts == [1.0, 0.0]
        assert not store.failed_devices()
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(3))
def test_writes_zeroes_and_trims_keep_every_checksum_right(tmp_path: Path, seed: int) -> None:
    """Random writes (aligned, unaligned, partial blocks, whole chunks), partial
    WRITE_ZEROES, whole-chunk TRIMs, syncs and restarts against a model of the chunks:
    every read matches the model and every chunk's stored checksums are those of its
    bytes."""
    path = tmp_path / "dev.img"
    rng = random.Random(seed)
    model: dict[int, bytearray] = {}
    sizes = [1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5, 65536, 300_000, CHUNK_SIZE]

    async def run(store: ChunkStore, steps: int) -> None:
        dev = store.devices[0]
        for step in range(steps):
            chunk = rng.randrange(5)
            offset = rng.choice([rng.randrange(CHUNK_SIZE), rng.randrange(256) * BLOCK, 0])
            length = min(rng.choice(sizes), CHUNK_SIZE - offset)
            r = rng.random()
            if store.needs_reclaim(dev, VOL, chunk):
                await store.reclaim(dev)
            if r < 0.55:
                data = rng.randbytes(length)
                store.write(dev, VOL, chunk, offset, data)
                model.setdefault(chunk, bytearray(CHUNK_SIZE))[offset : offset + length] = data
            elif r < 0.8:
                store.zero(VOL, chunk, offset, length)
                if chunk in model:
                    model[chunk][offset : offset + length] = bytes(length)
                if length == CHUNK_SIZE:
                    model.pop(chunk, None)
            elif r < 0.9:
                store.zero(VOL, chunk, 0, CHUNK_SIZE)
                model.pop(chunk, None)
            else:
                await store.sync()
            got = store.read(VOL, chunk, offset, length)
            want = model.get(chunk)
            assert (None if got is None else bytes(got)) == (
                None if want is None else bytes(want[offset : offset + length])
            ), (step, chunk, offset, length)
            if step % 20 == 0:
                check_rows(store)

    def check_rows(store: ChunkStore) -> None:
        assert sorted(c for _, c in store.chunk_ids()) == sorted(model)
        for chunk, want in model.items():
            assert stored_row(store, path, VOL, chunk) == slot_crcs(want), chunk
            got = store.read(VOL, chunk, 0, CHUNK_SIZE)
            assert got is not None and bytes(got) == want

    for _restart in range(3):
        store = open_store(path)
        try:
            asyncio.run(run(store, 120))
            check_rows(store)
        finally:
            store.close()
    assert store.devices[0].checksum_errors == 0


def test_chunks_written_without_checksums_are_unknown_until_rewritten(tmp_path: Path) -> None:
    """A device of the release before (checksum region zero, no feature bit), and one
    run with checksums off meanwhile: its chunks read without a check, a corruption in
    them is not an error, their blocks get checksums as they are written."""
    path = tmp_path / "dev.img"
    rng = random.Random(2)
    old = rng.randbytes(CHUNK_SIZE)
    store = open_store(path, checksums=False)
    store.write(store.devices[0], VOL, 0, 0, old)
    store.close()
    assert incompat(path) == 0
    store = open_store(path)
    dev = store.devices[0]
    try:
        assert incompat(path) == INCOMPAT_CHECKSUMS | INCOMPAT_WRITE_INTENT
        assert stored_row(store, path, VOL, 0) == bytes(ROW_SIZE)  # unknown
        flip(path, data_offset(store, VOL, 0, 7 * BLOCK + 1))
        got = store.read(VOL, 0, 0, CHUNK_SIZE)  # not checked: returned as it is
        assert got is not None and bytes(got[: 7 * BLOCK]) == old[: 7 * BLOCK]
        # Writes of part of a block give it the checksum of its whole bytes, its old
        # ones with the new in: block 3, blocks 9 and 10 (one write across both),
        # block 20 (a WRITE_ZEROES of 100 bytes); the others stay unknown.
        store.write(dev, VOL, 0, 3 * BLOCK + 100, b"p" * 50)
        store.write(dev, VOL, 0, 10 * BLOCK - 10, b"q" * 20)
        store.zero(VOL, 0, 20 * BLOCK + 5, 100)
        want = bytearray(old)
        want[3 * BLOCK + 100 : 3 * BLOCK + 150] = b"p" * 50
        want[10 * BLOCK - 10 : 10 * BLOCK + 10] = b"q" * 20
        want[20 * BLOCK + 5 : 20 * BLOCK + 105] = bytes(100)
        row = struct.unpack(">256I", stored_row(store, path, VOL, 0))
        assert [i for i, v in enumerate(row) if v] == [3, 9, 10, 20]
        for b in (3, 9, 10, 20):
            assert row[b] == crc(bytes(want[b * BLOCK : (b + 1) * BLOCK])), b
        flip(path, data_offset(store, VOL, 0, 3 * BLOCK + 2000))
        with pytest.raises(ChecksumError):
            store.read(VOL, 0, 3 * BLOCK, BLOCK)
        assert dev.checksum_errors == 1
    finally:
        store.close()

    # Checksums off for a while: what is written then has stale checksums, which
    # turning them on again must not trust.
    store = open_store(path, checksums=False)
    store.write(store.devices[0], VOL, 0, 3 * BLOCK, b"s" * BLOCK)
    store.close()
    assert incompat(path) == 0
    store = open_store(path)
    try:
        got = store.read(VOL, 0, 3 * BLOCK, BLOCK)
        assert got is not None and bytes(got) == b"s" * BLOCK
        assert store.devices[0].checksum_errors == 0
    finally:
        store.close()


def test_a_version_1_device_is_upgraded_with_its_chunks_unknown(tmp_path: Path) -> None:
    path = tmp_path / "v1.img"
    chunks = {(1, 0): 0, (1, 1): 5}
    write_v1_device(path, 16 * MiB, chunks)
    store = open_store(path)
    try:
        assert incompat(path) == INCOMPAT_CHECKSUMS | INCOMPAT_WRITE_INTENT
        for volume, chunk in chunks:
            want = v1_chunk_bytes(volume, chunk)
            got = store.read(volume, chunk, CHUNK_DATA_OFFSET, len(want))
            assert got is not None and bytes(got) == want
        assert store.devices[0].checksum_errors == 0
    finally:
        store.close()


def test_writes_that_waited_in_reclaim_find_their_marks_durable(tmp_path: Path) -> None:
    """The request path asks needs_reclaim before every write: the marks it asks for
    are written in one durable write off the event loop, and the writes then mark
    nothing in the loop; new chunks find the next free slots marked ahead."""
    store = open_store(path := tmp_path / "dev.img")
    dev = store.devices[0]

    async def main() -> None:
        for chunk in range(4):
            if store.needs_reclaim(dev, VOL, chunk):
                await store.reclaim(dev)
            store.write(dev, VOL, chunk, 0, b"a" * BLOCK)
        assert store.marks_in_loop == 0
        assert dev.intent is not None and len(dev.intent.marks) >= 4

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert path.exists()


# -- power cuts ------------------------------------------------------------------------

COLD = 9  # a volume written and synced before the workload, never touched by it


def assert_marked_before_changed(store: ChunkStore, power: PowerLoss) -> None:
    """Every slot with a data page not yet synced is marked in the write-intent
    record as the disk holds it, unless no index entry can name it after a power cut
    (neither the one on the disk nor the one in memory)."""
    dev = store.devices[0]
    bitmap = dev.regions[REGION_WRITE_INTENT][0] + WI_BITMAP
    owned = {loc[1] for v, c in store.chunk_ids() if (loc := store.location(v, c))}
    for page in power.dirty:
        if page * PowerLoss.PAGE < dev.data_offset:
            continue
        slot = (page * PowerLoss.PAGE - dev.data_offset) // CHUNK_SIZE
        at = INDEX_OFFSET + slot * ENTRY.size
        raw = bytes(power.durable[at : at + ENTRY.size])
        *_, flags, crc = ENTRY.unpack(raw)
        on_disk = flags & 1 and zlib.crc32(raw[:-4]) == crc
        if on_disk or slot in owned:
            assert power.durable[bitmap + (slot >> 3)] >> (slot & 7) & 1, (
                f"slot {slot} changed before its write-intent mark was durable"
            )


async def _workload(
    store: ChunkStore, rng: random.Random, ops: int, power: PowerLoss | None = None
) -> None:
    dev = store.devices[0]
    for _ in range(ops):
        vol, chunk = rng.randrange(1, 3), rng.randrange(0, 6)
        r = rng.random()
        offset = rng.choice([rng.randrange(CHUNK_SIZE - 9000), rng.randrange(250) * BLOCK])
        length = rng.choice([1, 700, BLOCK, 2 * BLOCK + 3, 9000])
        if store.needs_reclaim(dev, vol, chunk):
            await store.reclaim(dev)
        if r < 0.6:
            try:
                store.write(dev, vol, chunk, offset, rng.randbytes(length))
            except NoSpace:
                pass
        elif r < 0.75:
            store.zero(vol, chunk, offset, length)
        elif r < 0.85:
            store.zero(vol, chunk, 0, CHUNK_SIZE)
        else:
            await store.sync()
        if power is not None:
            assert_marked_before_changed(store, power)


def test_power_cuts_never_show_a_checksum_error_and_keep_checking_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Power cuts at random points of a write/zero/trim/sync workload, losing a random
    subset of the pages written since the last sync (data and checksums each reach
    the disk or not): after each, every chunk reads without a checksum error, its
    stored checksums are those of its bytes, and a corruption of a chunk synced
    before (not being written: not in the write-intent record) is still found; in
    every other round the chunks are read before the background pass recomputed
    their checksums (each recomputed as it is read), in the others after it."""
    monkeypatch.setattr(checksums, "MARK_LINGER_S", 0.0)  # clear marks at every sync
    monkeypatch.setattr(checksums, "CLEAR_EVERY_S", 0.0)
    capacity = 14 * MiB
    path = tmp_path / "dev.img"
    store = open_store(path, capacity)
    cold = {c: random.Random(c).randbytes(CHUNK_SIZE) for c in range(3)}
    for chunk, data in cold.items():
        store.write(store.devices[0], COLD, chunk, 0, data)
    store.close()
    rng = random.Random(17)
    marked = unverified = 0
    for round_ in range(10):
        with monkeypatch.context() as mp:
            power = PowerLoss(path, mp)
            store = open_store(path, capacity)
            asyncio.run(store.sync())  # the marks of the cold chunks' writes cleared
            asyncio.run(_workload(store, rng, rng.randrange(40, 200), power))
            crashed = tmp_path / f"crash{round_}.img"
            power.crash_image(crashed, rng)
            victim = round_ % 3
            bad = data_offset(store, COLD, victim, rng.randrange(CHUNK_SIZE))
            intent = store.devices[0].intent
            assert intent is not None
            marked += len(intent.marks)
            for dev in store.devices:  # the process "dies": no clean close
                dev.close()
        flip(crashed, bad)
        store = open_store(crashed, capacity)
        try:
            dev = store.devices[0]
            unverified += len(dev.unverified)
            if round_ % 2:  # the background pass first; else each recomputed as read
                asyncio.run(store.verify_marked(batch=3))
                assert not dev.unverified
            for volume, chunk in store.chunk_ids():
                if volume == COLD:
                    continue
                got = store.read(volume, chunk, 0, CHUNK_SIZE)  # no ChecksumError
                assert got is not None
                assert stored_row(store, crashed, volume, chunk) == slot_crcs(got)
            for chunk, data in cold.items():
                if chunk == victim:
                    with pytest.raises(ChecksumError):
                        store.read(COLD, chunk, 0, CHUNK_SIZE)
                else:
                    got = store.read(COLD, chunk, 0, CHUNK_SIZE)
                    assert got is not None and bytes(got) == data
            assert dev.checksum_errors == 1
        finally:
            store.close()
        flip(crashed, bad)  # undo the corruption and go on from the crashed state
        path.write_bytes(crashed.read_bytes())
    assert marked > 0, "nothing was being written at the cuts: the test proves nothing"
    assert unverified > 0, "no slot was left to recompute at a start: the test proves nothing"


# -- the slots marked at start: recomputed lazily --------------------------------------


def crash_with_marks(
    path: Path, capacity: int, chunks: int, length: int = 2 * BLOCK
) -> list[bytes]:
    """Write ``length`` bytes at the start of chunks 0..chunks-1 of VOL, then "die"
    (no clean close): every written slot is still marked in the write-intent record.
    The bytes written, per chunk."""
    store = open_store(path, capacity)
    rng = random.Random(chunks)
    written = [rng.randbytes(length) for _ in range(chunks)]
    for chunk, data in enumerate(written):
        store.write(store.devices[0], VOL, chunk, 0, data)
    for dev in store.devices:
        dev.close()
    return written


def row_at(path: Path, store: ChunkStore, slot: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(store.devices[0].row_offset(slot))
        return f.read(ROW_SIZE)


def test_a_read_the_client_checks_recomputes_a_stale_row_first(tmp_path: Path) -> None:
    """A READ whose checksums the SDS sends unchecked (CLIENT_CHECKS) of a slot marked
    at an unclean stop: its row is recomputed from its data first, as for any read,
    so the client gets the checksums of the bytes, never the stale row."""
    path = tmp_path / "dev.img"
    written = crash_with_marks(path, 64 * MiB, 40)
    probe = ChunkStore([DeviceSpec(str(path), 64 * MiB, "pool")])
    probe.devices[0].open()
    rows = probe.devices[0].regions[REGION_CHECKSUMS][0]
    probe.devices[0].close()
    with open(path, "r+b") as f:  # chunk 0 (slot 0): its row stale
        f.seek(rows)
        f.write(b"\x5a" * ROW_SIZE)
    store = open_store(path, 64 * MiB)
    try:
        assert 0 in store.devices[0].unverified
        got = store.read_reply(VOL, 0, 0, 2 * BLOCK, check=False)
        assert got is not None
        assert bytes(got[: 2 * BLOCK]) == written[0][: 2 * BLOCK]
        assert bytes(got[2 * BLOCK :]) == csum.trailer(written[0][: 2 * BLOCK])
        assert 0 not in store.devices[0].unverified
    finally:
        store.close()


def marked_on_disk(path: Path, store: ChunkStore) -> set[int]:
    dev = store.devices[0]
    with open(path, "rb") as f:
        f.seek(dev.regions[REGION_WRITE_INTENT][0] + WI_BITMAP)
        return set(checksums.marked_slots(f.read((dev.slot_count + 7) >> 3), dev.slot_count))


def test_a_start_after_a_crash_recomputes_no_checksum_until_a_slot_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an unclean stop under writes the store opens without recomputing the
    checksums of its marked slots (a start after a crash under heavy writes took tens
    of seconds): a read or write of one recomputes its row first (a stale row is never
    trusted: no checksum error), the background pass the rest, and only then are the
    marks cleared on the disk."""
    path = tmp_path / "dev.img"
    written = crash_with_marks(path, 64 * MiB, 40)
    recomputed: list[int] = []

    def counting(data: bytes | bytearray | memoryview) -> bytes:
        recomputed.append(len(data))
        return slot_crcs(data)

    monkeypatch.setattr("meshblock.sds.store.slot_crcs", counting)
    # The new data of chunks 0 and 1 (slots 0 and 1) reached the disk, not their rows.
    probe = ChunkStore([DeviceSpec(str(path), 64 * MiB, "pool")])
    probe.devices[0].open()
    rows = probe.devices[0].regions[REGION_CHECKSUMS][0]
    probe.devices[0].close()
    with open(path, "r+b") as f:
        f.seek(rows)
        f.write(b"\x5a" * 2 * ROW_SIZE)
    store = open_store(path, 64 * MiB)
    try:
        dev = store.devices[0]
        assert recomputed == [], "checksums recomputed at open"
        assert sorted(dev.unverified) == list(range(40))
        got = store.read(VOL, 0, 0, 2 * BLOCK)  # its row stale: recomputed first, no error
        assert got is not None and bytes(got) == written[0]
        assert len(recomputed) == 1 and len(dev.unverified) == 39
        store.write(dev, VOL, 1, 100, b"x" * 10)  # a block covered in part: checked first
        assert len(recomputed) == 2
        assert dev.checksum_errors == 0
        asyncio.run(store.verify_marked(batch=7))
        assert not dev.unverified
        for chunk, data in enumerate(written):
            loc = store.location(VOL, chunk)
            assert loc is not None
            if chunk == 1:
                data = data[:100] + b"x" * 10 + data[110:]
            assert row_at(path, store, loc[1]) == slot_crcs(data.ljust(CHUNK_SIZE, b"\0"))
        # Synced, then cleared: every change made before that sync is durable.
        assert marked_on_disk(path, store) == set()
    finally:
        store.close()


def test_slots_not_recomputed_stay_marked_across_a_crash_and_a_clean_stop(
    tmp_path: Path,
) -> None:
    """The marks of slots whose checksums are not recomputed yet are kept on the disk,
    through another crash and through a clean stop, so the next start does the same;
    those of free slots are cleared at open."""
    path = tmp_path / "dev.img"
    crash_with_marks(path, 64 * MiB, 10)
    store = open_store(path, 64 * MiB)
    dev = store.devices[0]
    owned = set(dev.unverified)
    assert len(owned) == 10
    assert marked_on_disk(path, store) == owned  # the 54 free ones marked ahead: cleared
    for d in store.devices:  # dies again before the background pass
        d.close()
    store = open_store(path, 64 * MiB)
    assert set(store.devices[0].unverified) == owned
    store.close()  # a clean stop keeps them
    store = open_store(path, 64 * MiB)
    try:
        assert set(store.devices[0].unverified) == owned
        assert marked_on_disk(path, store) == owned
        asyncio.run(store.verify_marked())
        assert marked_on_disk(path, store) == set()
    finally:
        store.close()
    store = open_store(path, 64 * MiB)
    try:
        assert not store.devices[0].unverified
    finally:
        store.close()


def test_blocks_marked_bad_read_as_errors_until_rewritten_even_after_a_crash(
    tmp_path: Path,
) -> None:
    """REPL_MARK_BAD's store side (docs/sds.md, "Healing"): the marked blocks read as
    a checksum error (not the zeroes stored there), the others as written; the copy
    job's salvage read gives zeroes in their place and names them; an unclean stop
    right after (the slot marked in the write-intent record, its checksums recomputed
    from its data at the next start) keeps them bad; a whole-block write replaces one."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    data = random.Random(7).randbytes(CHUNK_SIZE)
    store.write(store.devices[0], VOL, 3, 0, data)
    store.mark_bad(VOL, 3, 4 * BLOCK, 2 * BLOCK)
    with pytest.raises(ChecksumError) as caught:
        store.read(VOL, 3, 0, CHUNK_SIZE)
    assert caught.value.blocks == [4, 5]
    got, bad = store.read_salvage(VOL, 3)
    assert bad == [4, 5] and got is not None
    assert bytes(got) == data[: 4 * BLOCK] + bytes(2 * BLOCK) + data[6 * BLOCK :]
    for dev in store.devices:  # a crash: the slot stays marked
        dev.close()
    store = open_store(path)
    try:
        assert store.devices[0].unverified, "the slot is not marked: the test proves nothing"
        with pytest.raises(ChecksumError):
            store.read(VOL, 3, 5 * BLOCK, 10)  # recomputed first: still bad
        asyncio.run(store.verify_marked())
        with pytest.raises(ChecksumError):
            store.read(VOL, 3, 4 * BLOCK, 10)
        got = store.read(VOL, 3, 6 * BLOCK, BLOCK)
        assert got is not None and bytes(got) == data[6 * BLOCK : 7 * BLOCK]
        store.write(store.devices[0], VOL, 3, 4 * BLOCK, b"w" * BLOCK)
        got = store.read(VOL, 3, 4 * BLOCK, BLOCK)
        assert got is not None and bytes(got) == b"w" * BLOCK
        with pytest.raises(ChecksumError):
            store.read(VOL, 3, 5 * BLOCK, BLOCK)
    finally:
        store.close()


def test_a_bad_block_no_copy_repairs_is_eio_or_back_to_the_primary(tmp_path: Path) -> None:
    """Reads that heal (docs/sds.md, "Healing"), with no other copy to heal from (the
    primary has no address in our map): a tool's CHUNK_READ_RAW is IO_ERROR and
    counted unrepairable; a client's READ sent to us, the secondary of a clean PG,
    with the REPLICA flag (its primary did not answer the SDC) is NOT_PRIMARY, which
    sends the SDC back to the primary that may hold the good bytes, not EIO."""
    store = open_store(tmp_path / "dev.img")
    sds = SdsState(store, MapCache(), Peers("secret", 5.0), SdsStats())
    sds.set_identity(ME, {store.devices[0].path: (DEV_IDS[0], POOL)})
    svc = DataService(sds, Resync(sds))
    chunk = 1
    pg = pg_of(VOL, chunk, PG_COUNT)
    theirs, mine = (ME + 1, 20), (ME, DEV_IDS[0])
    m = PgMap(
        POOL, 1, PG_COUNT, (theirs,) * PG_COUNT, (mine,) * PG_COUNT, {ME: ("127.0.0.1", 1)}, {}
    )
    conns = {role: Conn() for role in (PeerRole.CLIENT, PeerRole.TOOL)}
    for role, conn in conns.items():
        conn.allowed = frozenset(Op(op) for op in ROLE_OPS[role])

    def request(role: PeerRole, req: int, op: Op, flags: int) -> None:
        hdr = Request(REQUEST_MAGIC, op, flags, 0, req, POOL, pg, 1, VOL, chunk, 0, BLOCK)
        svc.handle(conns[role], hdr, memoryview(b""))

    async def answer(role: PeerRole, req: int) -> int:
        for _ in range(500):
            if req in conns[role].replies:
                return conns[role].replies[req][0]
            await asyncio.sleep(0.01)
        raise AssertionError(f"request {req} got no reply")

    async def main() -> None:
        sds.maps.update(m)
        store.write(store.devices[0], VOL, chunk, 0, b"a" * BLOCK)
        flip(tmp_path / "dev.img", data_offset(store, VOL, chunk, 9))
        request(PeerRole.TOOL, 1, Op.CHUNK_READ_RAW, 0)
        assert await answer(PeerRole.TOOL, 1) == Status.IO_ERROR
        request(PeerRole.CLIENT, 2, Op.READ, ReqFlag.REPLICA)
        assert await answer(PeerRole.CLIENT, 2) == Status.NOT_PRIMARY

    try:
        asyncio.run(main())
        dev = store.devices[0]
        assert (dev.checksum_errors, dev.checksum_repaired, dev.checksum_unrepairable) == (2, 0, 2)
    finally:
        store.close()


def test_a_client_checked_read_with_a_short_last_unit_is_checked_by_the_sds(
    tmp_path: Path,
) -> None:
    """A READ with CLIENT_CHECKS sends the stored checksums unchecked, for the SDC
    checks the bytes against them; but the checksum of a short last unit is made
    from the bytes read, so a damaged last block would pass the SDC's check: such a
    read is checked by the SDS (ChecksumError, counted), never sent."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    data = random.Random(9).randbytes(4 * BLOCK)
    try:
        store.write(dev, VOL, 1, 0, data)
        flip(path, data_offset(store, VOL, 1, BLOCK + 7))  # block 1
        # Whole blocks: the stored checksum goes out as it is and exposes the damage.
        reply = store.read_reply(VOL, 1, 0, 2 * BLOCK, check=False)
        assert reply is not None
        assert struct.unpack(">2I", reply[2 * BLOCK :])[1] == crc(data[BLOCK : 2 * BLOCK])
        assert crc(bytes(reply[BLOCK : 2 * BLOCK])) != crc(data[BLOCK : 2 * BLOCK])
        assert dev.checksum_errors == 0
        # The damaged block is the short last unit: the SDS checks it.
        with pytest.raises(ChecksumError):
            store.read_reply(VOL, 1, 0, BLOCK + 512, check=False)
        assert dev.checksum_errors == 1
    finally:
        store.close()
