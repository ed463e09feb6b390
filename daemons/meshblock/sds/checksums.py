"""Block checksums of the chunk store and its write-intent record (``docs/sds.md``,
"Checksums").

Every 4 KiB block of a slot has a CRC32C, kept in the device's checksum region (1 KiB
per slot: 256 big-endian u32, in block order). The value 0 means "no checksum
recorded" (blocks written before checksums were kept): such a block is not checked;
a block whose CRC32C happens to be 0 is stored unchecked too (one in 2^32).

The write-intent record (:class:`WriteIntent`) makes the checksums safe across a power
cut: a slot's bit is durable on the device before its data or checksums change, and
is cleared only once those changes are durable; at start the checksums of the slots
whose bit is set are recomputed from their data: each before it is first read or
written, the rest by a background pass (``ChunkStore.verify_marked``).

This module computes and compares; :mod:`meshblock.sds.store` does the IO. CRC32C is
the ``crc32c`` package's C extension (the SSE 4.2 ``crc32`` instruction where the CPU
has it), called on ``memoryview`` slices: no block is copied to be checksummed.
"""

from __future__ import annotations

import errno
import struct
import time
import zlib
from collections.abc import Collection, Container, Iterable
from typing import TYPE_CHECKING, Final

import crc32c as _crc32c

from meshblock.chunks import CHUNK_SIZE

if TYPE_CHECKING:
    import asyncio

crc: Final = _crc32c.crc32c
#: Whether CRC32C runs on the CPU's instruction (else a table: about 10x slower).
HARDWARE: Final = bool(_crc32c.hardware_based)

BLOCK: Final = 4096
BLOCK_SHIFT: Final = 12
BLOCKS: Final = CHUNK_SIZE // BLOCK
#: Bytes of one slot's checksums in the checksum region.
ROW_SIZE: Final = BLOCKS * 4
ZERO_BLOCK_CRC: Final = crc(bytes(BLOCK))
#: ``ROWS[n]`` packs and unpacks ``n`` checksums.
ROWS: Final = tuple(struct.Struct(f">{n}I") for n in range(BLOCKS + 1))
#: The checksum of a block marked bad (its data zeroes): never the zero block's, never
#: 0 (unchecked), so every read of it is a checksum error until a write replaces it
#: whole (docs/sds.md, "Healing": a copy job's unrepairable blocks).
BAD_BLOCK_CRC: Final = ZERO_BLOCK_CRC ^ 0xFFFFFFFF
#: The row of a slot that reads as zeroes: every block has the zero block's checksum.
ZERO_ROW: Final = ROWS[BLOCKS].pack(*[ZERO_BLOCK_CRC] * BLOCKS)

WI_HEADER = struct.Struct(">8sQII")
"""Head of the write-intent region (its first 4 KiB)::

    magic "MBWINT01" (8) | sequence u64 (0; reserved) | bits per slot u32 (1) |
    crc32 u32 of the 20 bytes before it

followed, at offset 4 KiB, by bitmap 0: bit ``s & 7`` of byte ``s >> 3`` is slot
``s``'s. Bitmap 1, after it, is reserved (unused): bitmap 0 is updated in place.
"""
WI_MAGIC: Final = b"MBWINT01"
WI_BITMAP: Final = 4096  # offset of bitmap 0 in the region
#: A slot's bit is cleared once a sync has made its writes durable and it has not been
#: written for this long (a slot written again soon would need its bit set again,
#: which costs a synchronous write).
MARK_LINGER_S: Final = 10.0
#: Marks are looked at for clearing at most this often (each look is O(marks)).
CLEAR_EVERY_S: Final = 1.0
#: Free slots marked together when a new chunk needs one: one durable write of the
#: bitmap for the next allocations (they are handed out lowest first, so their bits
#: are neighbours).
MARK_AHEAD: Final = 64


class ChecksumError(OSError):
    """Blocks of a chunk do not match their checksums: the device gave back other
    bytes than were written to it (bit rot, a lost or misdirected write). EIO; the
    device is not failed for it (the other blocks are fine)."""

    def __init__(self, path: str, volume: int, chunk: int, slot: int, blocks: list[int]) -> None:
        super().__init__(
            errno.EIO,
            f"checksum mismatch in chunk {volume}/{chunk} (slot {slot}), "
            f"4 KiB block(s) {', '.join(map(str, blocks))}",
            path,
        )
        self.device = path
        self.volume = volume
        self.chunk = chunk
        self.slot = slot
        self.blocks = blocks


def block_crcs(view: memoryview) -> list[int]:
    """The CRC32C of each whole 4 KiB block of ``view`` (its length a multiple of 4 KiB)."""
    return [crc(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK)]


def bad_blocks(got: list[int], row: bytes, first: int) -> list[int]:
    """The blocks (from block ``first`` on) whose checksums ``got`` (:func:`block_crcs`
    of their bytes) do not match those in ``row`` (one u32 per block; 0 is not
    checked)."""
    stored = ROWS[len(row) >> 2].unpack(row)
    if tuple(got) == stored:
        return []
    pairs = enumerate(zip(stored, got, strict=True))
    return [first + i for i, (want, have) in pairs if want and want != have]


def bad_in_rows(stored: bytes, computed: bytes) -> list[int]:
    """The blocks whose checksum in ``stored`` (a row; 0: none recorded) is not the
    one in ``computed`` (the row of the bytes read)."""
    if stored == computed:
        return []
    n = len(stored) >> 2
    pairs = zip(ROWS[n].unpack(stored), ROWS[n].unpack(computed), strict=True)
    return [b for b, (want, have) in enumerate(pairs) if want and want != have]


def slot_crcs(data: bytes | bytearray | memoryview) -> bytes:
    """The row of a whole slot's bytes."""
    return ROWS[BLOCKS].pack(*block_crcs(memoryview(data)))


_BAD_PACKED: Final = struct.pack(">I", BAD_BLOCK_CRC)


def keep_marked_bad(row: bytes, old: bytes) -> bytes:
    """A slot's ``row`` recomputed from its data (after an unclean stop), given the
    ``old`` row on the device: a block marked bad there (:data:`BAD_BLOCK_CRC`) whose
    data is still the zeroes it was marked with stays marked bad."""
    if _BAD_PACKED not in old:
        return row
    was = ROWS[BLOCKS].unpack(old.ljust(ROW_SIZE, b"\0"))
    now = list(ROWS[BLOCKS].unpack(row))
    for i, (w, n) in enumerate(zip(was, now, strict=True)):
        if w == BAD_BLOCK_CRC and n == ZERO_BLOCK_CRC:
            now[i] = BAD_BLOCK_CRC
    return ROWS[BLOCKS].pack(*now)


def wi_header() -> bytes:
    body = WI_HEADER.pack(WI_MAGIC, 0, 1, 0)[:-4]
    return body + struct.pack(">I", zlib.crc32(body))


def wi_header_valid(raw: bytes) -> bool:
    if len(raw) < WI_HEADER.size:
        return False
    magic, _, bits, crc32 = WI_HEADER.unpack_from(raw)
    return bool(magic == WI_MAGIC and bits == 1 and zlib.crc32(raw[: WI_HEADER.size - 4]) == crc32)


def marked_slots(bitmap: bytes, slot_count: int) -> list[int]:
    """The slots whose bit is set in ``bitmap``."""
    out: list[int] = []
    for i, byte in enumerate(bitmap[: (slot_count + 7) >> 3]):
        if byte:
            out.extend(s for s in range(i << 3, (i << 3) + 8) if byte >> (s & 7) & 1)
    return [s for s in out if s < slot_count]


class WriteIntent:
    """One device's write-intent record in memory (``docs/sds.md``, "Checksums").

    ``marks`` are the slots whose bit is durable on the device: their data and
    checksums may change. ``bits`` is the bitmap as written (or being written) to the
    device; ``wanted`` the slots that a write waits for (:meth:`ChunkStore.reclaim`),
    ``marking`` the durable write of the bitmap in progress. ``touched`` holds when
    each marked slot was last changed."""

    def __init__(self, offset: int, slot_count: int) -> None:
        self.offset = offset  # of the region on the device
        self.slot_count = slot_count
        self.bits = bytearray((slot_count + 7) >> 3)
        self.marks: set[int] = set()
        self.wanted: set[int] = set()
        self.marking: asyncio.Future[None] | None = None
        self.inflight: frozenset[int] = frozenset()
        self.touched: dict[int, float] = {}
        self.last_clear = 0.0

    def set(self, slots: Iterable[int]) -> tuple[int, bytes]:
        """Set the bits of ``slots``; ``(device offset, bytes)`` to write durably."""
        lo, hi = len(self.bits), 0
        bits = self.bits
        for s in slots:
            i = s >> 3
            bits[i] |= 1 << (s & 7)
            lo, hi = min(lo, i), max(hi, i + 1)
        return self.offset + WI_BITMAP + lo, bytes(bits[lo:hi])

    def marked(self, slots: Iterable[int]) -> None:
        """``slots`` are durably marked now."""
        now = time.monotonic()
        for s in slots:
            self.marks.add(s)
            self.touched[s] = now

    def idle(
        self, synced_from: float, keep: Container[int], *, at_once: bool = False
    ) -> tuple[int, bytes] | None:
        """Clear the marks of the slots not changed since before ``synced_from`` (the
        start of a sync that completed) nor for :data:`MARK_LINGER_S`, except those in
        ``keep`` (checksums not recomputed yet); the bitmap bytes to write (no sync
        needed: a clear may be lost), or None. ``at_once``: no linger, and not limited
        to one look per :data:`CLEAR_EVERY_S` (the sync is what makes a clear safe;
        the linger only spares slots being written a new durable mark)."""
        now = time.monotonic()
        if now - self.last_clear < CLEAR_EVERY_S and not at_once:
            return None
        self.last_clear = now
        before = synced_from if at_once else min(synced_from, now - MARK_LINGER_S)
        touched = self.touched
        idle = [s for s in self.marks if touched.get(s, 0.0) < before and s not in keep]
        if not idle:
            return None
        lo, hi = len(self.bits), 0
        bits = self.bits
        for s in idle:
            self.marks.discard(s)
            touched.pop(s, None)
            i = s >> 3
            bits[i] &= ~(1 << (s & 7)) & 0xFF
            lo, hi = min(lo, i), max(hi, i + 1)
        return self.offset + WI_BITMAP + lo, bytes(bits[lo:hi])

    def clear_all(self, keep: Collection[int] = ()) -> tuple[int, bytes]:
        """Forget every mark but those of ``keep`` (everything is durable, but the
        checksums of ``keep`` are not recomputed yet): the whole bitmap to write."""
        self.marks.clear()
        self.touched.clear()
        self.bits = bytearray(len(self.bits))
        self.set(keep)
        self.marks.update(keep)
        return self.offset + WI_BITMAP, bytes(self.bits)
