"""Checksums of payloads on the wire (feature CSUM_CRC32C, docs/protocol.md §8.6), in
memory: the units on the chunk's 4 KiB grid, the framing of requests and replies
that carry them, which connections use it (version 2 with the bit on both sides
only), and the store keeping a client's checksums of the blocks a write covers
whole and giving a read's checksums back."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _wire import exchange
from meshblock.chunks import CHUNK_SIZE
from meshblock.sds.checksums import BAD_BLOCK_CRC, BLOCK, ROW_SIZE
from meshblock.sds.store import REGION_CHECKSUMS, ChunkStore, DeviceSpec
from meshblock.wire import csum
from meshblock.wire.handshake import ClientHandshake, ServerHandshake
from meshblock.wire.protocol import (
    MAX_PAYLOAD,
    REPLY_MAGIC_V2,
    REPLY_V2,
    REQUEST_MAGIC_V2,
    REQUEST_V2,
    WIRE_V1,
    WIRE_V2,
    WIRE_V2_CSUM,
    Feature,
    Op,
    PeerRole,
    ProtocolError,
    Status,
    wire_format,
)

pytestmark = pytest.mark.unit

SECRET = b"wire-csum-secret"
VOL = 9


def request(
    op: int, offset: int, length: int, csum_type: int = 0, shift: int = 0
) -> tuple[Any, ...]:
    return REQUEST_V2.unpack(
        REQUEST_V2.pack(
            REQUEST_MAGIC_V2, op, 0, 0, 1, 2, 3, 4, VOL, 1, offset, length, csum_type, shift, 0, 0
        )
    )


def reply(length: int, csum_type: int = 0, shift: int = 0) -> tuple[Any, ...]:
    return REPLY_V2.unpack(
        REPLY_V2.pack(REPLY_MAGIC_V2, 0, 0, 1, 2, length, 0, csum_type, shift, 0, 0)
    )


# -- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length", "units"),
    [
        (0, 4096, 1),
        (0, MAX_PAYLOAD, 256),
        (4096, 8192, 2),
        (100, 4096, 2),  # 3996 bytes of block 0, 100 of block 1
        (100, 3996, 1),  # up to the end of block 0
        (4095, 2, 2),
        (512, MAX_PAYLOAD - 512, 256),
        (0, 1, 1),
        (0, 0, 0),
    ],
)
def test_request_units_are_the_chunks_blocks_the_range_touches(
    offset: int, length: int, units: int
) -> None:
    assert csum.request_units(offset, length) == units
    data = random.Random(offset + length).randbytes(length)
    crcs = csum.unit_crcs(data, offset)
    assert len(crcs) == units
    # each unit is the part of the payload inside one 4 KiB block of the chunk
    pos, want = 0, []
    for block in range(offset // BLOCK, (offset + length + BLOCK - 1) // BLOCK):
        end = min(offset + length, (block + 1) * BLOCK) - offset
        want.append(csum.crc(data[pos:end]))
        pos = end
    assert crcs == want


def test_reply_units_start_at_the_payload() -> None:
    data = random.Random(3).randbytes(3 * BLOCK + 5)
    assert csum.reply_units(len(data)) == 4
    crcs = csum.unit_crcs(data)
    assert crcs == [csum.crc(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK)]
    assert csum.bad_units(data, csum.pack(crcs)) == []
    bad = bytearray(data)
    bad[2 * BLOCK + 1] ^= 1
    assert csum.bad_units(bad, csum.pack(crcs)) == [2]


@pytest.mark.parametrize(
    ("offset", "length"), [(0, 4096), (100, 3996), (4095, 1), (0, 7), (100, 4096)]
)
def test_trailer_and_check_of_one_unit_or_more_agree_with_the_units(
    offset: int, length: int
) -> None:
    """A payload within one block (a 4 KiB write) takes one call each way; the
    trailer is the packed units all the same, and a flipped byte is found."""
    data = bytearray(random.Random(length).randbytes(length))
    sums = csum.trailer(data, offset)
    assert sums == csum.pack(csum.unit_crcs(data, offset))
    assert csum.bad_units(data, sums, offset) == []
    data[-1] ^= 0x10
    last = csum.request_units(offset, length) - 1
    assert csum.bad_units(data, sums, offset) == [last]


# -- the check of several units in one pass -----------------------------------------------

# A payload of 1 .. 256 units, its last unit 1 .. 4096 bytes long, bytes from a seed.
PAYLOADS = st.tuples(st.integers(1, 256), st.integers(1, BLOCK), st.integers(0, 2**32))
ONE_PASS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def payload(units: int, last: int, seed: int) -> tuple[bytearray, bytes]:
    """A payload of ``units`` units (the last ``last`` bytes long) and its checksums."""
    data = bytearray(random.Random(seed).randbytes((units - 1) * BLOCK + last))
    return data, csum.trailer(data)


@ONE_PASS
@given(PAYLOADS)
def test_one_pass_accepts_a_payload_with_its_units_checksums(
    case: tuple[int, int, int],
) -> None:
    """The one-pass check (the stored checksums folded into one crc32c call over the
    payload) says yes to every block count and last unit length, and leaves the payload
    as it found it."""
    data, sums = payload(*case)
    before = bytes(data)
    units, last, _ = case
    assert csum.one_pass(data, sums) is (units > 1 and last >= 4)
    assert csum.bad_units(data, sums) == []
    assert csum.bad_units(memoryview(data), memoryview(sums)) == []
    assert data == before


@ONE_PASS
@given(PAYLOADS, st.data())
def test_a_flipped_bit_anywhere_is_found_and_its_unit_named(
    case: tuple[int, int, int], draw: st.DataObject
) -> None:
    """One flipped bit of the payload fails the one-pass check, and the unit by unit
    check that follows names the unit it is in; the payload keeps the flipped bit and
    nothing else changes."""
    data, sums = payload(*case)
    bit = draw.draw(st.integers(0, 8 * len(data) - 1))
    data[bit >> 3] ^= 1 << (bit & 7)
    before = bytes(data)
    units, last, _ = case
    if units > 1 and last >= 4:
        assert csum.one_pass(data, sums) is False
    assert csum.bad_units(data, sums) == [(bit >> 3) // BLOCK]
    assert data == before


@ONE_PASS
@given(PAYLOADS, st.data())
def test_a_flipped_bit_in_the_checksums_is_found_and_its_unit_named(
    case: tuple[int, int, int], draw: st.DataObject
) -> None:
    data, sums = payload(*case)
    bit = draw.draw(st.integers(0, 8 * len(sums) - 1))
    bad = bytearray(sums)
    bad[bit >> 3] ^= 1 << (bit & 7)
    units, last, _ = case
    if units > 1 and last >= 4:
        assert csum.one_pass(data, bad) is False
    assert csum.bad_units(data, bad) == [(bit >> 3) // 4]


def test_several_bad_units_are_all_named_and_read_only_payloads_checked_unit_by_unit() -> None:
    data, sums = payload(256, BLOCK, 7)
    for unit in (0, 17, 255):
        data[unit * BLOCK + 100] ^= 0x80
    assert csum.bad_units(data, sums) == [0, 17, 255]
    # a payload it may not alter in place (bytes) is checked the old way, same answers
    assert csum.one_pass(bytes(data), sums) is False
    assert csum.bad_units(bytes(data), sums) == [0, 17, 255]
    data, sums = payload(256, BLOCK, 8)
    assert csum.bad_units(bytes(data), sums) == []
    # a write at a 4 KiB offset has its units on the same grid: one pass too
    assert csum.bad_units(data, sums, 8 * BLOCK) == []
    data[5 * BLOCK] ^= 1
    assert csum.bad_units(data, sums, 8 * BLOCK) == [5]


def test_the_one_pass_reads_the_checksums_before_it_alters_the_payload() -> None:
    """A reply's checksums follow its payload in the same buffer (as the framing hands
    them over): the check alters only payload bytes and reads the checksums first."""
    data, sums = payload(9, 1000, 9)
    buf = bytearray(data + sums)
    view = memoryview(buf)
    n = len(data)
    assert csum.one_pass(view[:n], view[n:]) is True
    assert buf == data + sums


def cancelling_write(seed: int, unit: int = 10, delta: int = 0x12345678) -> tuple[bytes, bytes]:
    """1 MiB and checksums a sender built so that two units disagree with them yet
    their differences cancel in one pass: ``delta`` XORed into the checksum of
    ``unit`` and, little-endian, into the first 4 bytes of the unit after it."""
    data, sums = payload(256, BLOCK, seed)
    packed = bytearray(sums)
    at = 4 * unit
    packed[at : at + 4] = (int.from_bytes(packed[at : at + 4], "big") ^ delta).to_bytes(4, "big")
    word = (unit + 1) * BLOCK
    data[word : word + 4] = bytes(
        a ^ b for a, b in zip(data[word : word + 4], delta.to_bytes(4, "little"), strict=True)
    )
    return bytes(data), bytes(packed)


#: Blocks of a chunk whose differences cancel in one pass when all are marked bad
#: (each marked block differs from its zeroes by 0xFFFFFFFF, shifted by its place).
CANCELLING_MARKS: Final = (12, 37, 156, 181, 210, 222)


def test_a_check_whose_checksums_are_stored_is_exact_where_one_pass_is_fooled() -> None:
    """Checksums chosen with the bytes can cancel in one pass (the fold's limit): a
    check whose checksums are then stored (``exact``, the SDS's of a WRITE) goes unit
    by unit and names both units."""
    data, sums = cancelling_write(3)
    assert csum.one_pass(bytearray(data), sums) is True  # what the fold cannot see
    assert csum.bad_units(bytearray(data), sums, 0, exact=True) == [10, 11]
    assert csum.bad_units(bytearray(data), sums, 0) == []  # a reply's check: one pass
    good, good_sums = payload(256, BLOCK, 3)
    assert csum.bad_units(good, good_sums, 0, exact=True) == []


def test_checksums_with_a_sentinel_are_never_checked_in_one_pass() -> None:
    """Zeroes with the marked-bad CRC in a set of blocks whose differences cancel
    (and a 0, "none recorded"): one_pass cannot tell, every unit is checked."""
    marked = (csum.crc(bytes(BLOCK)) ^ 0xFFFFFFFF).to_bytes(4, "big")
    assert csum.SENTINELS == (bytes(4), marked) and marked == BAD_BLOCK_CRC.to_bytes(4, "big")
    zero = csum.crc(bytes(BLOCK)).to_bytes(4, "big")
    row = [marked if b in CANCELLING_MARKS else zero for b in range(256)]
    data = bytearray(CHUNK_SIZE)
    assert csum.one_pass(data, b"".join(row)) is False
    assert csum.bad_units(data, b"".join(row)) == list(CANCELLING_MARKS)
    good, sums = payload(8, BLOCK, 4)
    unchecked = bytearray(sums)
    unchecked[8:12] = bytes(4)
    assert csum.one_pass(good, bytes(unchecked)) is False
    assert csum.bad_units(good, bytes(unchecked)) == [2]


def test_an_empty_payload_is_not_one_pass_and_not_an_error() -> None:
    assert csum.one_pass(bytearray(), b"") is False
    assert csum.one_pass(memoryview(bytearray()), memoryview(b"")) is False


# -- framing ------------------------------------------------------------------------------


def test_a_write_with_checksums_is_followed_by_one_u32_per_unit() -> None:
    fmt = WIRE_V2_CSUM
    assert fmt.request_length(request(Op.WRITE, 0, 8192, 1, 12)) == 8192 + 8
    assert fmt.request_length(request(Op.REPL_WRITE, 100, 4096, 1, 12)) == 4096 + 8
    assert fmt.request_length(request(Op.WRITE, 0, MAX_PAYLOAD, 1, 12)) == MAX_PAYLOAD + 1024
    # without them (a sender may leave them out): the payload alone, as in version 2
    assert fmt.request_length(request(Op.WRITE, 0, 8192)) == 8192
    # a READ asks for its reply's checksums: no payload
    assert fmt.request_length(request(Op.READ, 0, 8192, 1, 12)) == 0
    assert fmt.reply_length(reply(8192, 1, 12)) == 8192 + 8
    assert fmt.reply_length(reply(5000, 1, 12)) == 5000 + 8
    assert fmt.reply_length(reply(8192)) == 8192


def test_the_packed_headers_carry_the_checksum_fields() -> None:
    hdr = REQUEST_V2.unpack(
        WIRE_V2_CSUM.pack_request_csum(Op.WRITE, 1, 7, 1, 2, 3, VOL, 4, 100, 4096, 1, 12)
    )
    assert hdr[0] == REQUEST_MAGIC_V2 and hdr[10:16] == (100, 4096, 1, 12, 0, 0)
    assert WIRE_V2_CSUM.request_length(hdr) == 4096 + 8
    rep = REPLY_V2.unpack(WIRE_V2_CSUM.pack_reply_csum(0, 0, 7, 3, 4096, 1, 12))
    assert rep == (REPLY_MAGIC_V2, 0, 0, 7, 3, 4096, 0, 1, 12, 0, 0)


@pytest.mark.parametrize(
    ("op", "csum_type", "shift"),
    [
        (Op.WRITE, 2, 12),  # another checksum type
        (Op.WRITE, 1, 16),  # another unit
        (Op.WRITE, 0, 12),
        (Op.TRIM, 1, 12),  # no payload, not a READ
        (Op.WRITE_ZEROES, 1, 12),
        (Op.CHUNK_READ_RAW, 1, 12),
    ],
)
def test_other_checksum_fields_are_protocol_errors(op: int, csum_type: int, shift: int) -> None:
    with pytest.raises(ProtocolError, match="checksums"):
        WIRE_V2_CSUM.request_length(request(op, 0, 4096, csum_type, shift))


def test_a_reply_with_other_checksum_fields_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="checksums"):
        WIRE_V2_CSUM.reply_length(reply(4096, 1, 9))


def test_without_the_feature_checksum_fields_stay_protocol_errors() -> None:
    """Version 2 without CSUM_CRC32C (a peer of the release before it, or one that
    does not announce it) frames as before: the fields are not negotiated."""
    with pytest.raises(ProtocolError, match="without the feature negotiated"):
        WIRE_V2.request_length(request(Op.WRITE, 0, 4096, 1, 12))
    with pytest.raises(ProtocolError, match="without the feature negotiated"):
        WIRE_V2.reply_length(reply(4096, 1, 12))


@pytest.mark.parametrize(
    ("client", "server", "expect"),
    [
        (Feature.CHUNK_LIST | Feature.CSUM_CRC32C, Feature.CHUNK_LIST | Feature.CSUM_CRC32C, True),
        (Feature.CHUNK_LIST, Feature.CHUNK_LIST | Feature.CSUM_CRC32C, False),
        (Feature.CHUNK_LIST | Feature.CSUM_CRC32C, Feature.CHUNK_LIST, False),
    ],
)
def test_checksums_are_used_only_when_both_sides_announce_them(
    client: int, server: int, expect: bool
) -> None:
    c = ClientHandshake(SECRET, PeerRole.CLIENT, features=client)
    s = ServerHandshake(SECRET, server)
    reason, _ = exchange(c, s)
    assert reason is None and c.features == s.features
    fmt = wire_format(c.version, c.features)
    assert fmt.csum is expect
    assert fmt is (WIRE_V2_CSUM if expect else WIRE_V2)


def test_version_1_never_carries_checksums() -> None:
    c = ClientHandshake(SECRET, PeerRole.CLIENT, version=1)
    s = ServerHandshake(SECRET)
    reason, _ = exchange(c, s)
    assert reason is None and c.version == 1 and c.features == Feature.CHUNK_LIST
    assert wire_format(1, Feature.CHUNK_LIST | Feature.CSUM_CRC32C) is WIRE_V1


def test_checksum_mismatch_is_a_retriable_status() -> None:
    assert int(Status.CHECKSUM_MISMATCH) == 14 and Status.CHECKSUM_MISMATCH.retriable


# -- the store ----------------------------------------------------------------------------


def open_store(path: Path, checksums: bool = True) -> ChunkStore:
    store = ChunkStore([DeviceSpec(str(path), 16 << 20, "pool")], checksums=checksums)
    store.open()
    return store


def row(store: ChunkStore, path: Path, chunk: int) -> tuple[int, ...]:
    loc = store.location(VOL, chunk)
    assert loc is not None
    dev, slot = loc
    with open(path, "rb") as f:
        f.seek(dev.regions[REGION_CHECKSUMS][0] + slot * ROW_SIZE)
        return struct.unpack(">256I", f.read(ROW_SIZE))


def test_the_store_keeps_the_clients_checksums_of_whole_blocks(tmp_path: Path) -> None:
    """The checksums a write came with are kept as they are for the blocks it covers
    whole (marked here by one the store could not have computed: a value of the
    caller's); a block it covers in part gets its own, from its old and new bytes."""
    path = tmp_path / "dev.img"
    store = open_store(path)
    dev = store.devices[0]
    rng = random.Random(5)
    try:
        old = rng.randbytes(4 * BLOCK)
        store.write(dev, VOL, 1, 0, old)
        data = rng.randbytes(2 * BLOCK)
        offset = BLOCK + 100  # 3996 bytes of block 1, block 2 whole, 100 bytes of block 3
        sums = csum.unit_crcs(data, offset)
        assert len(sums) == 3
        sums[1] = 0x12345678  # what the store keeps for block 2: this, unchanged
        store.write(dev, VOL, 1, offset, data, csum.pack(sums))
        new = bytearray(old)
        new[offset : offset + len(data)] = data
        stored = row(store, path, 1)
        assert stored[2] == 0x12345678
        assert stored[1] == csum.crc(new[BLOCK : 2 * BLOCK])
        assert stored[3] == csum.crc(new[3 * BLOCK : 4 * BLOCK])
        assert stored[0] == csum.crc(new[:BLOCK])
        # a new chunk, aligned: every block's checksum is the client's, the others
        # the zero block's
        data = rng.randbytes(3 * BLOCK)
        sums = csum.unit_crcs(data, 0)
        store.write(dev, VOL, 2, 0, data, csum.pack(sums))
        assert list(row(store, path, 2)[:3]) == sums
        assert set(row(store, path, 2)[3:]) == {csum.crc(bytes(BLOCK))}
        # aligned whole blocks of a chunk that exists: the client's, as they came
        sums = [0x0BAD0BAD, 0x600D600D]
        store.write(dev, VOL, 2, 4 * BLOCK, rng.randbytes(2 * BLOCK), csum.pack(sums))
        assert list(row(store, path, 2)[4:6]) == sums
        assert list(row(store, path, 2)[:3]) == csum.unit_crcs(data, 0)
    finally:
        store.close()


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize(("offset", "length"), [(0, 3 * BLOCK), (0, 5000), (100, 9000), (0, 0)])
def test_a_read_gives_the_checksums_of_its_bytes(
    tmp_path: Path, checksums: bool, offset: int, length: int, check: bool
) -> None:
    path = tmp_path / "dev.img"
    store = open_store(path, checksums)
    try:
        store.write(store.devices[0], VOL, 1, 0, random.Random(2).randbytes(4 * BLOCK))
        reply = store.read_reply(VOL, 1, offset, length, check=check)
        assert reply is not None and len(reply) == length + 4 * csum.reply_units(length)
        got = reply[:length]
        assert bytes(reply[length:]) == csum.trailer(got)
    finally:
        store.close()


@pytest.mark.parametrize("check", [True, False])
def test_blocks_without_a_stored_checksum_get_one_computed_in_a_reply(
    tmp_path: Path, check: bool
) -> None:
    """Blocks written while the store kept no checksums have none recorded (0): a
    READ reply's checksums of them are computed from their bytes, checked read or
    not; the blocks written since have the stored ones."""
    path = tmp_path / "dev.img"
    store = open_store(path, False)
    rng = random.Random(4)
    old = rng.randbytes(4 * BLOCK)
    try:
        store.write(store.devices[0], VOL, 1, 0, old)
    finally:
        store.close()
    store = open_store(path, True)
    try:
        new = rng.randbytes(BLOCK)
        store.write(store.devices[0], VOL, 1, BLOCK, new)
        stored = row(store, path, 1)
        assert (stored[0], stored[1], stored[2]) == (0, csum.crc(new), 0)
        reply = store.read_reply(VOL, 1, 0, 3 * BLOCK + 10, check=check)
        assert reply is not None
        want = old[:BLOCK] + new + old[2 * BLOCK : 3 * BLOCK + 10]
        assert bytes(reply[: len(want)]) == want
        sums = struct.unpack(">4I", reply[len(want) :])
        assert sums[0] == csum.crc(want[:BLOCK])
        assert sums[1] == csum.crc(new)
        assert sums[2] == csum.crc(want[2 * BLOCK : 3 * BLOCK])
        assert sums[3] == csum.crc(want[3 * BLOCK :])  # a short last unit: its own
    finally:
        store.close()
