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
"""

from __future__ import annotations

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


def bad_units(data: Buffer, sums: Buffer, offset: int = 0) -> list[int]:
    """The units of ``data`` at ``offset`` whose checksum is not the one in ``sums``
    (packed, one u32 per unit; its length is checked by the framing)."""
    if len(data) <= UNIT - (offset & _MASK):  # one unit (a 4 KiB write): one call
        return [] if crc(data) == int.from_bytes(sums, "big") else [0]
    got = unit_crcs(data, offset)
    want = PACK[len(got)].unpack(sums)
    if tuple(got) == want:
        return []
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
