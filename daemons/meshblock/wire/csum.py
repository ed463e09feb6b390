"""Per-unit CRC32C checksums of payloads on the wire (feature ``CSUM_CRC32C``,
``docs/protocol.md`` §8.6).

A payload's checksums are one big-endian u32 CRC32C per *unit*, packed after the
payload. Units are 4 KiB (``csum_shift`` 12) and lie on a grid:

- a request's (WRITE, REPL_WRITE) units are the chunk's 4 KiB blocks that its range
  touches, each the part of the payload inside that block: an unaligned write's first
  and last units are shorter, every block it covers whole is one unit of 4 KiB. There
  are ``(offset + length + 4095) // 4096 - offset // 4096`` of them (the header has
  the offset). The SDS can thus keep the CRC of every whole block as it came.
- a reply's (READ) units start at its payload's first byte: ``ceil(length / 4096)``
  of them (a reply carries no offset; for a read at a 4 KiB boundary, the only kind
  the kernel sends through NBD in practice, they are the chunk's blocks).

CRC32C is the ``crc32c`` package's C extension (the SSE 4.2 instruction where the CPU
has it), called on ``memoryview`` slices: no byte is copied to be checksummed.

A reply of several units (a READ's payload, whose checksums the SDS read from its own
store) is checked in one ``crc32c`` pass over all its bytes (:func:`one_pass`), not one
call per unit: 256 calls per MiB cost more than twice the pass, in call overhead. Only
when that check fails are the units' checksums computed one by one, to name the bad
ones. A check whose checksums are then stored (the SDS's of a WRITE or REPL_WRITE:
``exact``) goes unit by unit: there one sender chooses both the bytes and the
checksums, and could build differences that cancel in the pass.
"""

from __future__ import annotations

import functools
import struct
from typing import Final

import crc32c as _crc32c

crc: Final = _crc32c.crc32c

#: ``csum_type`` of CRC32C, and the ``csum_shift`` of 4 KiB units: the only ones sent.
CSUM_CRC32C: Final = 1
CSUM_SHIFT: Final = 12
UNIT: Final = 1 << CSUM_SHIFT
_MASK: Final = UNIT - 1
#: ``PACK[n]`` packs ``n`` checksums (a request of 1 MiB at an unaligned offset: 257).
PACK: Final = tuple(struct.Struct(f">{n}I") for n in range(258))

Buffer = bytes | bytearray | memoryview


def request_units(offset: int, length: int) -> int:
    """How many checksums follow a request's payload of ``length`` bytes at ``offset``."""
    return ((offset + length + _MASK) >> CSUM_SHIFT) - (offset >> CSUM_SHIFT) if length else 0


def reply_units(length: int) -> int:
    """How many checksums follow a reply's payload of ``length`` bytes."""
    return (length + _MASK) >> CSUM_SHIFT


def unit_crcs(data: Buffer, offset: int = 0) -> list[int]:
    """The checksum of each unit of ``data`` written at ``offset`` of its chunk (0:
    units from its first byte, as in a reply)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    n = len(view)
    if not n:
        return []
    head = min(n, UNIT - (offset & _MASK))
    out = [crc(view[:head])]
    out += [crc(view[i : i + UNIT]) for i in range(head, n, UNIT)]
    return out


def pack(crcs: list[int]) -> bytes:
    """Checksums as they travel after a payload."""
    return PACK[len(crcs)].pack(*crcs)


def trailer(data: Buffer, offset: int = 0) -> bytes:
    """The packed checksums of ``data`` at ``offset`` (see :func:`unit_crcs`)."""
    if 0 < len(data) <= UNIT - (offset & _MASK):  # one unit (a 4 KiB write): one call
        return crc(data).to_bytes(4, "big")
    crcs = unit_crcs(data, offset)
    return PACK[len(crcs)].pack(*crcs)


def bad_units(data: Buffer, sums: Buffer, offset: int = 0, *, exact: bool = False) -> list[int]:
    """The units of ``data`` at ``offset`` whose checksum is not the one in ``sums``
    (packed, one u32 per unit; its length is checked by the framing). Several units
    on the grid are checked in one pass (:func:`one_pass`) and computed one by one
    only if that finds a difference; ``exact``: always one by one, for a check whose
    ``sums`` are then stored as they came (a sender that chooses both the bytes and
    the checksums can make their differences cancel in one pass)."""
    if len(data) <= UNIT - (offset & _MASK):  # one unit (a 4 KiB write): one call
        return [] if crc(data) == int.from_bytes(sums, "big") else [0]
    if not exact and len(data) > ONE_PASS_OVER and not offset & _MASK and one_pass(data, sums):
        return []
    got = unit_crcs(data, offset)
    want = PACK[len(got)].unpack(sums)
    if tuple(got) == want:
        return []
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]


# -- the check of several units in one pass -------------------------------------------
#
# CRC32C is linear over GF(2). Let raw(M) be the CRC register after M from a register
# of 0 (no initial value, no final xor). Then crc(M) = raw(M) ^ zero(len M), where
# zero(L) is the CRC32C of L zero bytes, and the raw CRC of a concatenation is
# raw(A || B) = shift(raw(A), len B) ^ raw(B), shift(r, L) being the register r after
# L more zero bytes. XORing a 4-byte word w (little-endian: the CRC is reflected) into
# a message at byte p changes its raw CRC by shift(w, len M - p), exactly as a unit
# ending at p contributes shift(raw(unit), len M - p). So if every unit but the last
# has the first word of the unit after it XORed with the raw CRC it should have
# (stored ^ zero(4096)), the raw CRC of the whole payload so altered is the last
# unit's raw CRC when all units match, and differs from it by
# XOR shift(got_i ^ stored_i, len M - end_i) otherwise: nonzero whenever exactly one
# unit differs (shift is invertible), and for several bad units missed only if their
# differences cancel (one chance in 2**32 for unrelated damage, the odds of a unit's
# own CRC32C missing it). Differences with structure do cancel: a delta XORed into
# one unit's checksum and, little-endian, into the first word of the next unit, or
# the same delta in the checksums of a set of blocks (a block marked bad differs
# from the zeroes it holds by 0xFFFFFFFF; some sets of 6 of 256 cancel). So the pass
# is used only where the bytes and the checksums come from different sources (a
# READ's reply: the SDS's stored checksums, the bytes from its disk), never on
# checksums with a sentinel value (0: none recorded; the marked-bad CRC), and never
# where a sender's checksums are checked to be stored (``bad_units(exact=True)``).
# The words are XORed in place, the payload hashed in one call and put back as it
# was before anything else runs.

_RAW: Final = 0xFFFFFFFF  # crc32c's ``value`` that starts its register at 0
#: Payloads longer than this are checked in one pass: its fixed cost (about 1.5 µs)
#: is more than the calls it saves up to 5 units (8 KiB: 1.4 µs unit by unit, 2.0 µs
#: in one pass; 32 KiB: 3.8 and 3.2 µs).
ONE_PASS_OVER: Final = 5 * UNIT
_WORDS_PER_UNIT: Final = UNIT >> 2


@functools.cache
def _zero(length: int) -> int:
    """The CRC32C of ``length`` zero bytes (a unit's raw CRC is its CRC XOR this)."""
    return crc(bytes(length))


@functools.cache
def _fill(words: int) -> int:
    """``zero(4096)`` in each of ``words`` u32: the whole units' CRC-to-raw constant."""
    return int.from_bytes(_zero(UNIT).to_bytes(4, "little") * words, "little")


#: Checksum values that are sentinels, not CRCs, where checksums are kept: 0 (the SDS's
#: "none recorded") and the CRC of a block marked bad (``sds.checksums.BAD_BLOCK_CRC``:
#: the zero block's, inverted). Checksums holding either are checked unit by unit.
SENTINELS: Final = (bytes(4), (_zero(UNIT) ^ 0xFFFFFFFF).to_bytes(4, "big"))


def one_pass(data: Buffer, sums: Buffer) -> bool:
    """Whether each 4 KiB unit of ``data`` (from its first byte) has the checksum in
    ``sums``, in one ``crc32c`` call over ``data`` (see above). False also when it
    cannot tell (``data`` empty, one unit, read-only, not bytes, or its last unit
    under 4 bytes; ``sums`` holding a :data:`SENTINELS` value): the caller then
    checks unit by unit. Not for checksums a sender chose with the bytes to have
    them stored (see above).

    ``data`` is altered while the pass runs (the first 4 bytes of every unit but
    the first) and put back before it returns, on every path. The caller must own
    the buffer exclusively for that time: no other thread may read or write it (the
    ``crc32c`` call releases the GIL from 32 KiB on), and no pending send, kept
    transport buffer or cache may refer to it."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    n = len(view)
    whole = (n - 1) >> CSUM_SHIFT  # units before the last
    last = n - (whole << CSUM_SHIFT)
    if whole <= 0 or last < 4:
        return False
    packed = sums if isinstance(sums, bytes) else bytes(sums)
    if (
        SENTINELS[0] in packed  # substrings: one that straddles two sums only
        or SENTINELS[1] in packed  # costs the per-unit path
        or len(packed) != 4 * (whole + 1)
        or view.readonly
        or view.format != "B"
        or not view.c_contiguous
    ):
        return False
    # the first word of units whole .. 1, in this order: the packed checksums of units
    # 0 .. whole - 1 read big-endian then line up with them read little-endian
    spots = view[: (whole << CSUM_SHIFT) + 4].cast("I")[
        whole * _WORDS_PER_UNIT : 0 : -_WORDS_PER_UNIT
    ]
    saved = spots.tobytes()
    stored = int.from_bytes(packed, "big")
    mixed = int.from_bytes(saved, "little") ^ (stored >> 32) ^ _fill(whole)
    spots[:] = memoryview(mixed.to_bytes(4 * whole, "little")).cast("I")
    try:
        raw = crc(view, _RAW) ^ _RAW
    finally:
        spots[:] = memoryview(saved).cast("I")
    return raw == (stored & 0xFFFFFFFF) ^ _zero(last)
