"""The SDS chunk store: 1 MiB chunks in slots on local devices, with a crash-safe index.

A device is a regular file (created sparse when absent) or a raw block device.
Layout of format version 2 (see ``docs/sds.md``, "On-disk layout", for the reasoning
and for what the reserved regions are for)::

    0       4 KiB                     (4 KiB aligned)                 data_offset (1 MiB)
    +-------+-------------------------+-----------------------------+---------+---------+--
    | super | index: one 32-byte      | metadata area: tombstones,  | slot 0  | slot 1  |
    | block | entry per slot          | slot extensions, write-     | (1 MiB) | (1 MiB) |
    |       | (volume, chunk, gen)    | intent, checksums           |         |         |
    +-------+-------------------------+-----------------------------+---------+---------+--

The superblock holds a table of regions; a device upgraded from version 1 whose
index leaves no room before its first slot has the metadata area after its last
slot instead (:meth:`ChunkStore._upgrade`).

Crash safety rests on one rule: **a slot is handed to a chunk only when it is
durably zero and durably unreferenced.** Freed slots are zeroed (hole punched) at
once but wait in ``pending`` until an fdatasync that began after the zeroing has
completed; only then do they return to ``free``. So after a crash an index entry may
point at a slot holding its own chunk's (old or new) bytes or zeroes, but never
another chunk's. Entries carry a CRC (a torn entry reads as empty) and a store-wide
generation (when a crash leaves two slots claiming one chunk, the newer wins). After
an unclean stop every unreferenced slot is zeroed before use; a clean stop records
that they already are. Tombstones (deleted volumes) are kept in two alternating
copies with a sequence number and a CRC, on every device.

Fail-stop: the first IO error of a device (``pwrite``, ``pread``, ``fdatasync``, a
hole punch) fails it for good (:meth:`ChunkStore.fail`). After an fdatasync error the
kernel has dropped the dirty pages it could not write and a later fdatasync of the
same file may well succeed without them, so nothing about the device may be trusted
again: no IO goes to it, every request that touches it raises :class:`DeviceFailed`,
and :meth:`ChunkStore.sync` never succeeds for it. A read error fails the device too
(what else it lost is unknown; its PGs are rebuilt from the other copy). See
``docs/sds.md``, "Device errors".

Checksums (``docs/sds.md``, "Checksums"; :mod:`meshblock.sds.checksums`): unless the
store is opened with ``checksums=False``, every 4 KiB block has a CRC32C in the
device's checksum region, written with its data and checked on every read
(:class:`ChecksumError`); a slot's bit in the write-intent region is durable before
its data or checksums change, and the checksums of the slots whose bit is set are
recomputed after the next start (each before it is first read or written, the rest
by :meth:`ChunkStore.verify_marked` in the background), so a power cut never leaves
them disagreeing.

All IO here is synchronous ``pread``/``pwrite`` on the page cache (through
:mod:`meshblock.sds.device_io`, where tests can inject faults), called from
the event loop (measured faster than a thread hand-off for 4 KiB and 1 MiB, see
``docs/sds.md``); only fdatasync goes to a thread (:meth:`ChunkStore.sync`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import secrets
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds import device_io as dio
from meshblock.sds.checksums import (
    BAD_BLOCK_CRC,
    BLOCK,
    BLOCK_SHIFT,
    BLOCKS,
    MARK_AHEAD,
    ROW_SIZE,
    ROWS,
    WI_BITMAP,
    ZERO_BLOCK_CRC,
    ZERO_ROW,
    ChecksumError,
    WriteIntent,
    bad_blocks,
    bad_in_rows,
    block_crcs,
    keep_marked_bad,
    marked_slots,
    slot_crcs,
    wi_header,
    wi_header_valid,
)
from meshblock.sds.checksums import crc as crc32c
from meshblock.sds.versions import (
    ALL_BLOCKS,
    ENTRY_EXT,
    EXT_ENTRY,
    INCOMPAT_SLOT_EXT,
    Run,
    VersionTree,
    block_map,
    block_masks,
    pack_ext,
    unpack_ext,
)
from meshblock.wire.csum import ONE_PASS_OVER, one_pass, trailer

log = logging.getLogger(__name__)

#: Unchanged since version 1, so that a release that knows only version 1 refuses a
#: newer device with "format version 2 is not supported" (its first check is the
#: magic, and a wrong one would tell the operator to zero the device).
SUPER_MAGIC: Final = b"MBSDSDV1"
FORMAT_VERSION: Final = 2
SUPER_SIZE: Final = 4096
INDEX_OFFSET: Final = SUPER_SIZE
PAGE: Final = 4096

SUPERBLOCK = struct.Struct(">8sIIQQQQ16sI")
"""Superblock header at offset 0, the same 72 bytes in versions 1 and 2::

    magic "MBSDSDV1" (8) | version u32 | flags u32 (CLEAN=1) | capacity u64 |
    slot_count u64 | index_offset u64 | data_offset u64 | device uuid (16) |
    crc32 u32 of everything before it
"""

SUPER_V2 = struct.Struct(">QQII")
"""Version 2 continues at byte 72::

    incompat features u64 | compat features u64 | region count u32 | reserved u32 |
    region count x REGION | crc32 u32 of bytes 0 .. the end of the table

The whole superblock fits in the first 512-byte sector (written atomically). A reader
refuses a device with an incompat feature bit it does not know and ignores unknown
compat bits and regions of kinds it does not know.
"""

REGION = struct.Struct(">IIQQ")
"""One row of the region table: kind u32 | reserved u32 | offset u64 | length u64."""

MAX_REGIONS: Final = 8
REGION_INDEX: Final = 1
REGION_DATA: Final = 2
REGION_TOMBSTONES: Final = 3
REGION_SLOT_EXT: Final = 4  # versions of snapshot trees (meshblock.sds.versions)
REGION_WRITE_INTENT: Final = 5  # write-intent record (docs/sds.md, "Checksums")
REGION_CHECKSUMS: Final = 6  # per-4 KiB CRC32C of every slot (docs/sds.md, "Checksums")
#: Incompat feature bit: the checksum region is kept (every non-zero value is right).
INCOMPAT_CHECKSUMS: Final = 1
#: Incompat feature bit: the write-intent record is kept (set with INCOMPAT_CHECKSUMS).
INCOMPAT_WRITE_INTENT: Final = 2
#: Incompat feature bits this release knows; 4 = slot extensions (snapshot trees) in
#: use (:data:`meshblock.sds.versions.INCOMPAT_SLOT_EXT`).
KNOWN_INCOMPAT: Final = INCOMPAT_CHECKSUMS | INCOMPAT_WRITE_INTENT | INCOMPAT_SLOT_EXT
_CHECKSUM_FEATURES: Final = INCOMPAT_CHECKSUMS | INCOMPAT_WRITE_INTENT

#: Bytes reserved per slot in the slot-extension region (snapshot trees).
SLOT_EXT_SIZE: Final = 128
#: Bytes per slot in the checksum region: one CRC32C u32 per 4 KiB block.
CHECKSUMS_PER_SLOT: Final = ROW_SIZE
#: Header of the write-intent region; two bitmaps of one bit per slot follow.
WRITE_INTENT_HEADER: Final = PAGE

ENTRY = struct.Struct(">QQQII")
"""Index entry of one slot, 32 bytes, at ``index_offset + slot * 32``::

    volume id u64 | chunk index u64 | generation u64 | flags u32 (USED=1, EXT=2) |
    crc32 u32 of the 28 bytes before it

EXT (:data:`meshblock.sds.versions.ENTRY_EXT`): the slot holds the version (and the
blocks) that its extension entry names; without it, version 0 of the chunk, whole.

All-zero (or a bad CRC) means: the slot is unreferenced.
"""

TOMB_HEADER = struct.Struct(">8sQII")
"""Head of one copy of the tombstone table::

    magic "MBTOMBS1" (8) | sequence u64 | count u32 |
    crc32 u32 of the 20 bytes before it and the ``count`` entries after it

followed by ``count`` :data:`TOMB_ENTRY` rows, ascending by volume id. The region
holds two copies of :data:`TOMB_COPY_SIZE` bytes; the valid copy with the higher
sequence is the table (an update writes the other copy, then syncs).
"""
TOMB_ENTRY = struct.Struct(">QQ")
"""One tombstone: volume id u64 | MDM epoch of the delete u64."""
TOMB_MAGIC: Final = b"MBTOMBS1"
TOMB_COPY_SIZE: Final = 64 * 1024
#: How many tombstones a device holds (:meth:`ChunkStore.add_tombstones`).
TOMBSTONE_CAPACITY: Final = (TOMB_COPY_SIZE - TOMB_HEADER.size) // TOMB_ENTRY.size

FLAG_CLEAN: Final = 1
ENTRY_USED: Final = 1
_EMPTY_ENTRY: Final = bytes(ENTRY.size)
_ZEROES: Final = bytes(CHUNK_SIZE)
_ZERO_VIEW: Final = memoryview(_ZEROES)
#: Whole-chunk read buffers a store keeps for reuse (:meth:`ChunkStore._chunk_buffer`).
READ_BUFFERS: Final = 16
#: The size of a kept read buffer: a chunk, and the checksums of a READ's reply to it.
_KEPT_SIZE: Final = CHUNK_SIZE + ROW_SIZE
#: Four zero bytes: where a row has none, every block in it has a checksum recorded.
_NO_CRC: Final = bytes(4)
#: A block marked bad in a row (:data:`BAD_BLOCK_CRC`, packed).
_BAD_PACKED: Final = BAD_BLOCK_CRC.to_bytes(4, "big")


def _intact(buf: bytearray | memoryview, row: bytes) -> bool:
    """Whether the whole blocks in ``buf`` all match their checksums in ``row`` (one
    u32 each), checked in one ``crc32c`` pass over them (``wire.csum.one_pass``): for
    more than 5 blocks that all have a checksum recorded and none marked bad
    (:data:`BAD_BLOCK_CRC`: marked blocks' differences could cancel). False says only
    that the blocks must be checked one by one (which finds the bad ones, or none: a
    row with a block without a recorded checksum or marked bad, a read-only or short
    buffer). For reads only, where the row comes from this store and the bytes from
    the device. ``buf`` is altered while the pass runs: the caller must own it alone
    (a fresh or unshared kept buffer, in the event loop's thread; no send of it
    pending)."""
    return (
        len(buf) > ONE_PASS_OVER
        and _NO_CRC not in row
        and _BAD_PACKED not in row
        and one_pass(buf, row)
    )


#: References to a kept read buffer that nobody else holds: the list, the loop
#: variable and ``sys.getrefcount``'s argument.
_UNSHARED_REFS: Final = 3
#: Chunks whose block maps (:meth:`ChunkStore.view_map`) a store keeps, at most.
MAP_CACHE: Final = 4096
#: A slot as a block map names it: ``(device, slot)``.
Where = tuple["Device", int]
#: Freed slots waiting for a sync before they are handed out again; more triggers one.
RECLAIM_BATCH: Final = 64
#: Slots whose checksums :meth:`ChunkStore.verify_marked` recomputes per thread call
#: (64 MiB read; a stop waits for at most one slot).
VERIFY_BATCH: Final = 64
#: Larger writes go to the page cache in pieces of this size. One ``pwrite`` of 1 MiB
#: makes the kernel cache that range in 1 MiB folios, and every later 4 KiB overwrite
#: in it then walks the whole folio: measured here 15-26 us per 4 KiB overwrite after
#: 1 MiB writes, 5 us after 64 KiB ones, for 16 system calls per MiB (docs/performance.md).
WRITE_PIECE: Final = 64 * 1024

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


class StoreError(Exception):
    """A device cannot be opened or used (wrong size, not formatted by us, ...)."""


class VolumeDeleted(StoreError):
    """The volume is tombstoned: nothing of it is written any more."""


class DeviceFailed(OSError):
    """The device failed an IO earlier (or just now): it takes no IO any more."""

    def __init__(self, dev: Device) -> None:
        super().__init__(errno.EIO, f"device failed: {dev.failed}", dev.path)
        self.device = dev


class NoSpace(Exception):
    """The device has no free slot for a new chunk."""


#: While loading, the key of a version slot is its chunk's key with the version above.
_VERSION_SHIFT: Final = 96
_BASE_MASK: Final = (1 << _VERSION_SHIFT) - 1


def chunk_key(volume_id: int, chunk_index: int) -> int:
    """The index key of a chunk (``chunk_index`` < 2^32)."""
    return (volume_id << 32) | chunk_index


def split_key(key: int) -> tuple[int, int]:
    """``(volume, chunk)`` of an index key (the inverse of :func:`chunk_key`)."""
    return key >> 32, key & 0xFFFFFFFF


@dataclass(frozen=True)
class DeviceSpec:
    path: str
    capacity: int
    pool: str


def _align(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def layout_v1(capacity: int) -> tuple[int, int]:
    """``(slot_count, data_offset)`` of a device formatted with version 1."""
    n = max(0, (capacity - INDEX_OFFSET) // (CHUNK_SIZE + ENTRY.size))
    while n > 0:
        data_offset = _align(INDEX_OFFSET + n * ENTRY.size, CHUNK_SIZE)
        if data_offset + n * CHUNK_SIZE <= capacity:
            return n, data_offset
        n -= 1
    raise StoreError(f"a device of {capacity} bytes is too small for one chunk")


def metadata_regions(slot_count: int, offset: int) -> dict[int, tuple[int, int]]:
    """The regions of the metadata area of a device of ``slot_count`` slots, laid out
    from ``offset`` (4 KiB aligned): kind → ``(offset, length)``."""
    sizes = (
        (REGION_TOMBSTONES, 2 * TOMB_COPY_SIZE),
        (REGION_SLOT_EXT, _align(slot_count * SLOT_EXT_SIZE, PAGE)),
        (REGION_WRITE_INTENT, WRITE_INTENT_HEADER + 2 * _align((slot_count + 7) // 8, PAGE)),
        (REGION_CHECKSUMS, _align(slot_count * CHECKSUMS_PER_SLOT, PAGE)),
    )
    regions = {}
    for kind, size in sizes:
        regions[kind] = (offset, size)
        offset += size
    return regions


def metadata_size(slot_count: int) -> int:
    return sum(length for _, length in metadata_regions(slot_count, 0).values())


def layout(capacity: int) -> tuple[int, int]:
    """``(slot_count, data_offset)`` of a device formatted with version 2 (the
    metadata area between the index and the first slot)."""
    per_slot = CHUNK_SIZE + ENTRY.size + SLOT_EXT_SIZE + CHECKSUMS_PER_SLOT
    n = max(0, (capacity - INDEX_OFFSET) // per_slot)
    while n > 0:
        meta = _align(INDEX_OFFSET + n * ENTRY.size, PAGE)
        data_offset = _align(meta + metadata_size(n), CHUNK_SIZE)
        if data_offset + n * CHUNK_SIZE <= capacity:
            return n, data_offset
        n -= 1
    raise StoreError(f"a device of {capacity} bytes is too small for one chunk")


def regions_of(slot_count: int, data_offset: int, meta_offset: int) -> dict[int, tuple[int, int]]:
    """Every region of a version 2 device."""
    regions = {
        REGION_INDEX: (INDEX_OFFSET, slot_count * ENTRY.size),
        REGION_DATA: (data_offset, slot_count * CHUNK_SIZE),
    }
    regions.update(metadata_regions(slot_count, meta_offset))
    return regions


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` in pieces of at most :data:`WRITE_PIECE` bytes."""
    n = len(data)
    if n <= WRITE_PIECE:
        dio.pwrite(fd, data, offset)
        return
    view = memoryview(data)
    for pos in range(0, n, WRITE_PIECE):
        dio.pwrite(fd, view[pos : pos + WRITE_PIECE], offset + pos)


def _entry(volume: int, chunk: int, generation: int, flags: int = ENTRY_USED) -> bytes:
    body = struct.pack(">QQQI", volume, chunk, generation, flags)
    return body + struct.pack(">I", zlib.crc32(body))


class Device:
    """One device of the store: its fd, geometry and slot allocation."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self.path = spec.path
        self.capacity = spec.capacity
        self.fd = -1
        self.is_file = True
        self.slot_count = 0
        self.data_offset = 0
        self.uuid = b""
        self.version = FORMAT_VERSION
        self.incompat = 0  # the superblock's incompat feature bits
        self.regions: dict[int, tuple[int, int]] = {}  # kind -> (offset, length)
        self.free: list[int] = []  # durably zero and unreferenced; pop() from the end
        self.pending: list[int] = []  # zeroed and unreferenced, not yet synced
        # Pending slots zeroed only after the next sync (their entries' clearing durable
        # first), when checksums are kept: see ChunkStore._free.
        self.unpunched: set[int] = set()
        # Checksums kept (docs/sds.md, "Checksums"): where, and the write-intent record.
        self.checksums = False
        self.csum_offset = 0
        self.intent: WriteIntent | None = None
        # Slots (-> their chunk key) marked at start whose checksums are not recomputed
        # yet: recomputed before they are first read or written, or by verify_marked.
        self.unverified: dict[int, int] = {}
        self.checksum_errors = 0  # blocks found not matching their checksums
        self.checksum_repaired = 0  # bad blocks rewritten from another copy (heal.py)
        self.checksum_unrepairable = 0  # bad blocks no other copy could repair
        self.used = 0
        self.mdm_id: int | None = None  # the MDM's device id, once registered
        self.pool_id: int | None = None
        self.reclaiming: asyncio.Future[None] | None = None
        # Why the device failed (fail-stop: no IO since), None while it works.
        self.failed: str | None = None
        self.loaded = False  # its index is in memory (False when it failed before)
        # Written since the start of its last sync (ChunkStore.sync): a FLUSH syncs it
        # (ChunkStore.sync_dirty). True at first: the first FLUSH after a start also
        # covers whatever an earlier process left in the page cache.
        self.dirty = True
        self.syncing: asyncio.Future[None] | None = None  # the fdatasync started last
        self.syncs = 0  # fdatasyncs completed by ChunkStore.sync
        # Version slots whose extension (and index) entries are to be written after
        # the next data sync (the holds-bit sync rule: meshblock.sds.versions).
        self.ext_pending: dict[int, VersionSlot] = {}
        # Incompat feature bit 4 is durable in the superblock.
        self.ext_feature = False

    @property
    def used_bytes(self) -> int:
        return self.used * CHUNK_SIZE

    def slot_offset(self, slot: int) -> int:
        return self.data_offset + slot * CHUNK_SIZE

    def ext_offset(self, slot: int) -> int:
        """Where the extension entry of ``slot`` is."""
        return self.regions[REGION_SLOT_EXT][0] + slot * EXT_ENTRY.size

    def row_offset(self, slot: int) -> int:
        """Where the checksums of ``slot`` are (while :attr:`checksums`)."""
        return self.csum_offset + slot * ROW_SIZE

    # -- open / format ----------------------------------------------------------------

    def open(self) -> bool:
        """Open (formatting when new); return whether it was stopped cleanly."""
        path = self.path
        created = False
        try:
            self.fd = dio.open_device(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            self.fd = dio.open_device(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            created = True
        st = os.fstat(self.fd)
        self.is_file = stat.S_ISREG(st.st_mode)
        if not self.is_file and not stat.S_ISBLK(st.st_mode):
            raise StoreError(f"{path}: neither a regular file nor a block device")
        size = st.st_size if self.is_file else os.lseek(self.fd, 0, os.SEEK_END)
        # No readahead: chunks are read in pieces at random; large sequential reads
        # would fill the cache with large folios that slow small writes down.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        head = dio.pread(self.fd, SUPER_SIZE, 0)
        if created or not any(head):
            if self.is_file and size < self.capacity:
                os.ftruncate(self.fd, self.capacity)  # sparse
            elif size < self.capacity:
                raise StoreError(f"{path}: {size} bytes, less than the configured capacity")
            self._format()
            return True
        return self._load_super(head, size)

    def _format(self) -> None:
        self.slot_count, self.data_offset = layout(self.capacity)
        self.version = FORMAT_VERSION
        meta = _align(INDEX_OFFSET + self.slot_count * ENTRY.size, PAGE)
        self.regions = regions_of(self.slot_count, self.data_offset, meta)
        self.uuid = secrets.token_bytes(16)
        # The index and the metadata area must read as zeroes (a reused block device
        # may hold junk): zero tombstone copies are an empty table.
        self._zero(INDEX_OFFSET, self.data_offset - INDEX_OFFSET)
        self.write_super(clean=True)
        dio.fsync(self.fd)
        log.info(
            "formatted %s (format version %d): %d slots of 1 MiB, data at %d",
            self.path,
            FORMAT_VERSION,
            self.slot_count,
            self.data_offset,
        )

    def _load_super(self, head: bytes, size: int) -> bool:
        magic, version, flags, capacity, slots, index_off, data_off, uuid, crc = (
            SUPERBLOCK.unpack_from(head)
        )
        if magic != SUPER_MAGIC:
            raise StoreError(
                f"{self.path}: not a meshblock device (zero its first 4 KiB to let "
                "meshblock-sds format it)"
            )
        if zlib.crc32(head[: SUPERBLOCK.size - 4]) != crc:
            raise StoreError(f"{self.path}: superblock checksum mismatch")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: format version {version} is newer than this release "
                f"supports ({FORMAT_VERSION}); run the release that wrote it or a newer one"
            )
        if version not in (1, 2):
            raise StoreError(f"{self.path}: format version {version} is not supported")
        if capacity != self.capacity:
            raise StoreError(
                f"{self.path}: formatted for {capacity} bytes, configured for {self.capacity}"
            )
        if size < capacity or index_off != INDEX_OFFSET:
            raise StoreError(f"{self.path}: inconsistent geometry in the superblock")
        if version == 1:
            if (slots, data_off) != layout_v1(capacity):
                raise StoreError(f"{self.path}: inconsistent geometry in the superblock")
            regions = {
                REGION_INDEX: (INDEX_OFFSET, slots * ENTRY.size),
                REGION_DATA: (data_off, slots * CHUNK_SIZE),
            }
        else:
            regions = self._load_regions(head, slots, data_off)
        self.version = version
        self.regions = regions
        self.slot_count, self.data_offset, self.uuid = slots, data_off, uuid
        return bool(flags & FLAG_CLEAN)

    def _load_regions(self, head: bytes, slots: int, data_off: int) -> dict[int, tuple[int, int]]:
        incompat, _compat, count, _ = SUPER_V2.unpack_from(head, SUPERBLOCK.size)
        end = SUPERBLOCK.size + SUPER_V2.size + min(count, MAX_REGIONS) * REGION.size
        (crc,) = struct.unpack_from(">I", head, end)
        if count > MAX_REGIONS or zlib.crc32(head[:end]) != crc:
            raise StoreError(f"{self.path}: superblock checksum mismatch (region table)")
        if incompat & ~KNOWN_INCOMPAT:
            raise StoreError(
                f"{self.path}: uses on-disk features {incompat & ~KNOWN_INCOMPAT:#x} that "
                "this release does not know; run the release that wrote it or a newer one"
            )
        self.incompat = incompat
        self.ext_feature = bool(incompat & INCOMPAT_SLOT_EXT)
        regions: dict[int, tuple[int, int]] = {}
        table = SUPERBLOCK.size + SUPER_V2.size
        for i in range(count):
            kind, _, off, length = REGION.unpack_from(head, table + i * REGION.size)
            regions[kind] = (off, length)
        needed = regions_of(slots, data_off, 0)
        spans = []
        for kind, (_, length) in needed.items():
            if kind not in regions or regions[kind][1] < length:
                raise StoreError(f"{self.path}: region {kind} missing or too small")
            off, length = regions[kind]
            if off % PAGE or off + length > self.capacity:
                raise StoreError(f"{self.path}: region {kind} out of place")
            spans.append((off, off + length))
        spans.sort()
        if spans[0][0] < SUPER_SIZE or any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
            raise StoreError(f"{self.path}: overlapping regions in the superblock")
        if regions[REGION_INDEX][0] != INDEX_OFFSET or regions[REGION_DATA] != needed[REGION_DATA]:
            raise StoreError(f"{self.path}: inconsistent geometry in the superblock")
        if data_off % CHUNK_SIZE:
            raise StoreError(f"{self.path}: inconsistent geometry in the superblock")
        return regions

    def write_super(self, *, clean: bool) -> None:
        body = SUPERBLOCK.pack(
            SUPER_MAGIC,
            self.version,
            FLAG_CLEAN if clean else 0,
            self.capacity,
            self.slot_count,
            INDEX_OFFSET,
            self.data_offset,
            self.uuid,
            0,
        )[:-4]
        body += struct.pack(">I", zlib.crc32(body))
        if self.version >= 2:
            rows = sorted(self.regions.items())
            body += SUPER_V2.pack(self.incompat, 0, len(rows), 0)
            body += b"".join(REGION.pack(kind, 0, off, length) for kind, (off, length) in rows)
            body += struct.pack(">I", zlib.crc32(body))
        dio.pwrite(self.fd, body, 0)

    # -- tombstones -------------------------------------------------------------------

    def read_tombstones(self) -> tuple[int, dict[int, int]]:
        """``(sequence, {volume: epoch})`` of the newer valid copy; ``(0, {})`` if none."""
        if self.version < 2:
            return 0, {}
        offset, _ = self.regions[REGION_TOMBSTONES]
        best: tuple[int, dict[int, int]] = (0, {})
        for copy in range(2):
            raw = dio.pread(self.fd, TOMB_COPY_SIZE, offset + copy * TOMB_COPY_SIZE)
            raw = raw.ljust(TOMB_COPY_SIZE, b"\0")
            magic, seq, count, crc = TOMB_HEADER.unpack_from(raw)
            if magic != TOMB_MAGIC or count > TOMBSTONE_CAPACITY:
                continue
            end = TOMB_HEADER.size + count * TOMB_ENTRY.size
            if zlib.crc32(raw[: TOMB_HEADER.size - 4] + raw[TOMB_HEADER.size : end]) != crc:
                log.warning("%s: tombstone copy %d is torn, ignored", self.path, copy)
                continue
            if seq > best[0]:
                rows = TOMB_ENTRY.iter_unpack(raw[TOMB_HEADER.size : end])
                best = (seq, dict(rows))
        return best

    def write_tombstones(self, seq: int, table: Mapping[int, int]) -> None:
        """Write ``table`` as sequence ``seq`` into copy ``seq % 2`` (not synced)."""
        offset, _ = self.regions[REGION_TOMBSTONES]
        head = TOMB_HEADER.pack(TOMB_MAGIC, seq, len(table), 0)[:-4]
        rows = b"".join(TOMB_ENTRY.pack(v, table[v]) for v in sorted(table))
        data = head + struct.pack(">I", zlib.crc32(head + rows)) + rows
        self.dirty = True
        dio.pwrite(self.fd, data, offset + (seq % 2) * TOMB_COPY_SIZE)

    def read_index(self) -> Iterable[tuple[int, int, int, int]]:
        """Yield ``(slot, volume, chunk, generation)`` of every valid entry of a plain
        chunk (version 0, no extension entry)."""
        for slot, vol, chunk, gen, flags in self.read_entries():
            if not flags & ENTRY_EXT:
                yield slot, vol, chunk, gen

    def read_entries(self) -> Iterable[tuple[int, int, int, int, int]]:
        """Yield ``(slot, volume, chunk, generation, flags)`` of every valid entry."""
        per_read = 32768  # entries per read (1 MiB)
        slot = 0
        while slot < self.slot_count:
            n = min(per_read, self.slot_count - slot)
            raw = dio.pread(self.fd, n * ENTRY.size, INDEX_OFFSET + slot * ENTRY.size)
            raw = raw.ljust(n * ENTRY.size, b"\0")
            for i, (vol, chunk, gen, flags, crc) in enumerate(ENTRY.iter_unpack(raw)):
                if not flags & ENTRY_USED:
                    continue
                off = i * ENTRY.size
                if zlib.crc32(raw[off : off + ENTRY.size - 4]) != crc:
                    log.warning("%s: slot %d has a torn index entry, ignored", self.path, slot + i)
                    continue
                yield slot + i, vol, chunk, gen, flags
            slot += n
        # Drop the index region from the page cache: small entry writes into large
        # cached folios are slow (docs/sds.md).
        os.posix_fadvise(
            self.fd, INDEX_OFFSET, self.slot_count * ENTRY.size, os.POSIX_FADV_DONTNEED
        )

    # -- IO ---------------------------------------------------------------------------

    def write_entry(self, slot: int, entry: bytes) -> None:
        self.dirty = True
        dio.pwrite(self.fd, entry, INDEX_OFFSET + slot * ENTRY.size)

    def _zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes (punch a hole if we can)."""
        if length <= 0:
            return
        self.dirty = True
        if (offset | length) & 4095 == 0:
            rc = dio.fallocate(
                self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            )
            if rc == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err), self.path)
        while length > 0:
            n = min(length, CHUNK_SIZE)
            dio.pwrite(self.fd, _ZERO_VIEW[:n], offset)
            offset += n
            length -= n

    def zero_slot_range(self, slot: int, offset: int, length: int) -> None:
        self._zero(self.slot_offset(slot) + offset, length)

    def zero_slots(self, first: int, count: int) -> None:
        """Zero ``count`` slots from ``first`` on, and their checksums (none recorded)."""
        self._zero(self.slot_offset(first), count * CHUNK_SIZE)
        if REGION_CHECKSUMS in self.regions:
            self._zero(self.regions[REGION_CHECKSUMS][0] + first * ROW_SIZE, count * ROW_SIZE)

    def identify(self) -> bytes | None:
        """The uuid in the device's superblock (``b""`` when it holds none of ours);
        None when it cannot be read. Read-only: for a device that failed before."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            head = os.pread(fd, SUPER_SIZE, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
        if len(head) < SUPERBLOCK.size or head[:8] != SUPER_MAGIC:
            return b""
        if zlib.crc32(head[: SUPERBLOCK.size - 4]) != SUPERBLOCK.unpack_from(head)[-1]:
            return b""
        return bytes(SUPERBLOCK.unpack_from(head)[7])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False, slots=True)
class VersionSlot:
    """The slot of one version (>= 1) of a tree's chunk, in memory
    (:mod:`meshblock.sds.versions`)."""

    dev: Device
    slot: int
    tree: int
    chunk: int
    version: int
    generation: int
    #: Blocks held, as reads see them (set by a write at once).
    holds: int = 0
    #: Blocks in the extension entry last written to the device (durable after the
    #: sync that follows it); only grows.
    written: int = 0
    #: Its index entry (with :data:`ENTRY_EXT`) is written.
    entered: bool = False
    #: A plain slot made this version's by a collapse: the plain index entry stays on
    #: the device until the extension entry is durable (then the EXT one replaces it).
    relabelled: bool = False
    freed: bool = False


class ChunkStore:
    """Every device of one SDS, and the in-memory index chunk → (device, slot)."""

    def __init__(
        self,
        specs: Iterable[DeviceSpec],
        failed: Mapping[str, str] | None = None,
        *,
        checksums: bool = True,
    ) -> None:
        """``failed``: path -> hex uuid of devices that failed in an earlier run; they
        stay failed (not opened) unless the device there now has another uuid (the
        operator replaced it, or zeroed its first 4 KiB). ``checksums``: keep and check
        a CRC32C of every 4 KiB block (``[store] checksums``; docs/sds.md, "Checksums")."""
        self.devices = [Device(s) for s in specs]
        self.checksums = checksums
        #: Write-intent marks written durably in the event loop (a write that did not
        #: wait in :meth:`reclaim` for its mark).
        self.marks_in_loop = 0
        self._failed_before = dict(failed or {})
        #: Called once per device that fails (after it is marked), from the event loop
        #: or the thread that runs :meth:`open`.
        self.on_failure: Callable[[Device], None] | None = None
        self._index: dict[int, tuple[Device, int]] = {}
        self._volume_chunks: dict[int, int] = {}
        self._generation = 0
        self._gens: dict[int, int] = {}  # generation of each chunk's entry, while loading
        # Version slots (>= 1; docs/snapshots.md): chunk key -> version -> its slot.
        self._versions: dict[int, dict[int, VersionSlot]] = {}
        self._load_holds: dict[tuple[Device, int], int] = {}  # while loading
        # Block maps: chunk key -> view -> (the tree's serial, the plain slot's location
        # then, the runs); dropped when a version slot of the chunk gains a block or
        # goes, and not used once the tree or the plain slot changed.
        self._maps: dict[int, dict[int, tuple[int, object, list[Run[Where]]]]] = {}
        # Per pool whose PG count we were told (index_pgs): the chunk keys of each PG,
        # kept as chunks are allocated and freed, so listing a PG does not scan the pool.
        self._pg_counts: dict[int, int] = {}
        self._by_pg: dict[tuple[int, int], set[int]] = {}
        # Deleted volumes: volume id -> MDM epoch of the delete (docs/sds.md, "Tombstones").
        self._tombstones: dict[int, int] = {}
        self._tomb_seq = 0  # sequence of the newest table written (or being written)
        self._tomb_changes = 0  # changes made in memory ...
        self._tomb_durable = 0  # ... and how many of them are durable on every device
        self._tomb_lock = asyncio.Lock()
        self._tomb_keys: dict[int, list[int]] = {}  # chunk keys left to free, per volume
        self._read_buffers: list[bytearray] = []  # kept for reads of a whole chunk
        # Paths of the devices opened after an unclean stop (their superblock lacked
        # CLEAN): told to the MDM at registration, which has their copies recopied.
        self.unclean: list[str] = []

    # -- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        """Open every device, load the index and recover from an unclean stop."""
        try:
            for dev in self.devices:
                known = self._failed_before.get(dev.path)
                if known is not None:
                    found = dev.identify()
                    if found is None or found.hex() == known:
                        dev.failed = "failed in an earlier run" + (
                            "" if found is not None else "; its superblock cannot be read"
                        )
                        log.error(
                            "%s: failed in an earlier run, not opened (replace the device "
                            "and remove it from the MDM: docs/runbook.md)",
                            dev.path,
                        )
                        continue
                    log.warning("%s: failed in an earlier run, replaced since: opened", dev.path)
                clean = dev.open()
                self._load(dev, clean)
                if not clean:
                    self.unclean.append(dev.path)
                dev.loaded = True
            # Every upgrade is planned before any starts: a device that cannot be
            # upgraded leaves all of them to the previous release.
            plans = [
                (dev, self._plan_upgrade(dev))
                for dev in self.devices
                if dev.version < FORMAT_VERSION and not dev.failed
            ]
            for dev, plan in plans:
                self._upgrade(dev, *plan)
            for dev in self.devices:
                if dev.loaded:
                    self._open_checksums(dev)
            self._take_versions()
            self._load_tombstones()
        except BaseException:
            self._gens.clear()
            for dev in self.devices:
                dev.close()
            raise
        self._gens.clear()

    def _load(self, dev: Device, clean: bool) -> None:
        owners: set[int] = set()  # slots of this device that hold a chunk
        dropped: list[int] = []  # slots whose entry lost to a newer one
        for slot, vol, chunk, gen, flags in dev.read_entries():
            self._generation = max(self._generation, gen)
            key = chunk_key(vol, chunk)
            if flags & ENTRY_EXT:
                version = self._load_ext(dev, slot, gen)
                if version is None:
                    dev.write_entry(slot, _EMPTY_ENTRY)
                    dropped.append(slot)
                    continue
                # Loaded with the version chunks (one resolution of two claims), then
                # moved to the version table (_take_versions).
                key |= version << _VERSION_SHIFT
            old = self._index.get(key)
            if old is not None:
                # Only a crash between freeing a chunk and rewriting it elsewhere leaves
                # two claims; the newer generation is the live copy.
                odev, oslot = old
                if self._gens[key] >= gen:
                    dev.write_entry(slot, _EMPTY_ENTRY)
                    dropped.append(slot)
                    log.warning("%s: stale claim of chunk %d/%d dropped", dev.path, vol, chunk)
                    continue
                odev.write_entry(oslot, _EMPTY_ENTRY)
                odev.used -= 1
                self._volume_chunks[vol] -= 1
                if odev is dev:
                    owners.discard(oslot)
                    dropped.append(oslot)
                else:
                    odev.zero_slots(oslot, 1)
                    odev.pending.append(oslot)
                log.warning("%s: stale claim of chunk %d/%d dropped", odev.path, vol, chunk)
            self._index[key] = (dev, slot)
            self._gens[key] = gen
            owners.add(slot)
            dev.used += 1
            self._volume_chunks[vol] = self._volume_chunks.get(vol, 0) + 1
        free = [s for s in range(dev.slot_count) if s not in owners]
        # After an unclean stop an unreferenced slot may hold bytes of an unflushed
        # write or of a freed chunk whose zeroing did not reach the disk: zero them.
        runs = self._punch(dev, free if not clean else sorted(dropped))
        dev.free = free[::-1]  # pop() hands out low slots first
        dev.write_super(clean=False)
        dio.fsync(dev.fd)  # the zeroing is durable before any slot is handed out
        log.info(
            "opened %s: %d of %d slots used (%s stop%s)",
            dev.path,
            dev.used,
            dev.slot_count,
            "clean" if clean else "unclean",
            f", {runs} runs of free slots zeroed" if runs else "",
        )

    def _load_ext(self, dev: Device, slot: int, generation: int) -> int | None:
        """The version of ``slot``, whose index entry says it has an extension entry
        (its blocks kept in :attr:`_load_holds`); None when that entry is not the
        index entry's (a power cut before both were synced: the slot is dropped, as
        the unsynced write it is)."""
        if not dev.ext_feature:
            raise StoreError(
                f"{dev.path}: slot {slot} has an extension entry but the superblock "
                f"lacks feature {INCOMPAT_SLOT_EXT}"
            )
        ext = unpack_ext(dio.pread(dev.fd, EXT_ENTRY.size, dev.ext_offset(slot)))
        if ext is None or ext[1] != generation or not ext[0]:
            log.warning("%s: slot %d: torn extension entry, slot dropped", dev.path, slot)
            return None
        self._load_holds[(dev, slot)] = ext[2]
        return ext[0]

    def _take_versions(self) -> None:
        """Move the version slots (>= 1) loaded with the chunks to their own table."""
        for key in [k for k in self._index if k >> _VERSION_SHIFT]:
            dev, slot = self._index.pop(key)
            base = key & _BASE_MASK
            holds = self._load_holds.pop((dev, slot))
            vs = VersionSlot(
                dev,
                slot,
                *split_key(base),
                key >> _VERSION_SHIFT,
                self._gens[key],
                holds,
                holds,
                True,
            )
            self._versions.setdefault(base, {})[vs.version] = vs
        self._load_holds.clear()

    @staticmethod
    def _punch(dev: Device, slots: list[int]) -> int:
        """Zero ``slots`` (ascending) and their checksums, in runs; return how many runs."""
        runs = 0
        for first, count in _runs(slots):
            dev.zero_slots(first, count)
            runs += 1
        return runs

    def _open_checksums(self, dev: Device) -> None:
        """Keep checksums on ``dev`` from now on (or stop keeping them, when told not
        to). A device that did not keep them (new, upgraded, or run with checksums
        off) starts with none: whatever its checksum region holds may be stale. One
        that did gets the checksums of the slots in its write-intent record
        recomputed: they were being changed when it stopped (docs/sds.md, "Checksums")."""
        kept = dev.incompat & _CHECKSUM_FEATURES == _CHECKSUM_FEATURES
        if not self.checksums:
            if dev.incompat & _CHECKSUM_FEATURES:
                dev.incompat &= ~_CHECKSUM_FEATURES
                dev.write_super(clean=False)
                dio.fsync(dev.fd)
                log.warning("%s: checksums off: the ones it kept are dropped", dev.path)
            return
        csum_offset, csum_length = dev.regions[REGION_CHECKSUMS]
        intent = WriteIntent(dev.regions[REGION_WRITE_INTENT][0], dev.slot_count)
        dev.csum_offset = csum_offset
        if kept:
            self._recover_marks(dev, intent)
        else:
            # Zero first, then the feature bits: a crash in between starts over.
            dev._zero(csum_offset, csum_length)
            dev._zero(intent.offset, WI_BITMAP + _align(len(intent.bits), PAGE))
            dio.pwrite(dev.fd, wi_header(), intent.offset)
            dio.fdatasync(dev.fd)
            dev.incompat |= _CHECKSUM_FEATURES
            dev.write_super(clean=False)
            dio.fsync(dev.fd)
            log.info(
                "%s: block checksums kept from now on (chunks written before get them "
                "when they are next written)",
                dev.path,
            )
        dev.intent = intent
        dev.checksums = True

    def _recover_marks(self, dev: Device, intent: WriteIntent) -> None:
        """Take the slots marked in the write-intent record: their data and checksums
        may disagree (a power cut, a kill between the two writes). Those that hold a
        chunk stay marked and become :attr:`Device.unverified` (their checksums are
        recomputed later, not here: a start after a crash under heavy writes would
        recompute tens of thousands); the checksums of free ones are zeroed and their
        marks cleared. A record that cannot be read marks every slot."""
        raw = dio.pread(dev.fd, WI_BITMAP + len(intent.bits), intent.offset)
        if wi_header_valid(raw):
            slots = marked_slots(raw[WI_BITMAP:], dev.slot_count)
        else:
            log.warning("%s: write-intent record unreadable: every checksum recomputed", dev.path)
            dio.pwrite(dev.fd, wi_header(), intent.offset)
            slots = list(range(dev.slot_count))
        if not slots:
            return
        owned = {slot: key for key, (d, slot) in self._index.items() if d is dev}
        unverified = {s: owned[s] for s in slots if s in owned}
        free = [s for s in slots if s not in owned]
        for first, count in _runs(free):
            dev._zero(dev.row_offset(first), count * ROW_SIZE)
        offset, bits = intent.clear_all(unverified)
        dio.pwrite(dev.fd, bits, offset)
        dio.fsync(dev.fd)
        dev.unverified = unverified
        if unverified:
            log.warning(
                "%s: %d slot(s) were being written at the last stop: their checksums are "
                "recomputed from their data in the background (each before it is used)",
                dev.path,
                len(unverified),
            )

    def _verify(self, dev: Device, slot: int) -> None:
        """Recompute the checksums of unverified ``slot`` from its data, in the event
        loop: it is about to be read or written."""
        data = bytearray(CHUNK_SIZE)
        try:
            dio.preadv(dev.fd, [data], dev.slot_offset(slot))
            old = dio.pread(dev.fd, ROW_SIZE, dev.row_offset(slot))
            dev.dirty = True
            dio.pwrite(dev.fd, keep_marked_bad(slot_crcs(data), old), dev.row_offset(slot))
        except OSError as exc:
            raise self._io_error(dev, "recomputing checksums", exc) from exc
        self._verified(dev, slot)

    @staticmethod
    def _verified(dev: Device, slot: int) -> None:
        del dev.unverified[slot]
        assert dev.intent is not None
        # An ordinary mark from now on: its row just changed, cleared after a sync.
        dev.intent.touched[slot] = time.monotonic()

    async def verify_marked(self, batch: int = VERIFY_BATCH) -> None:
        """Recompute the checksums of every unverified slot (``batch`` slots at a time
        read and checksummed in a thread, the rows written in the event loop: a slot
        read or written meanwhile was recomputed there first, and its result is
        dropped), then sync and clear their marks. Cancelled: returns once the thread
        has stopped (at the next slot), so the store may be closed."""
        for dev in self.devices:
            if dev.unverified:
                try:
                    await self._verify_device(dev, batch)
                except DeviceFailed:
                    continue  # failed and logged: its slots are never read again

    async def _verify_device(self, dev: Device, batch: int) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        while dev.unverified and not dev.failed:
            slots = list(itertools.islice(dev.unverified, batch))
            work = loop.run_in_executor(None, _slot_rows, dev, slots, stop)
            try:
                rows = await asyncio.shield(work)
            except asyncio.CancelledError:
                stop.set()
                with contextlib.suppress(BaseException):
                    await work
                raise
            except OSError as exc:
                raise self._io_error(dev, "recomputing checksums", exc) from exc
            for slot, row in rows:
                if slot not in dev.unverified or dev.failed:
                    continue  # recomputed in the event loop meanwhile (or freed)
                dev.dirty = True
                try:
                    dio.pwrite(dev.fd, row, dev.row_offset(slot))
                except OSError as exc:
                    raise self._io_error(dev, "recomputing checksums", exc) from exc
                self._verified(dev, slot)
        if dev.intent is None or dev.failed:
            return
        started = time.monotonic()
        await self.sync([dev])
        cleared = dev.intent.idle(started, dev.unverified, at_once=True)
        if cleared is not None:
            dio.pwrite(dev.fd, cleared[1], cleared[0])
        log.info("%s: checksums of the slots marked at start all recomputed", dev.path)

    def _load_tombstones(self) -> None:
        """The newest tombstone table of any device is the store's; devices that lag
        (a crash in the middle of an update, a device just upgraded) get it."""
        tables = [(dev, *dev.read_tombstones()) for dev in self.devices if not dev.failed]
        seq, table = 0, {}
        for _, dseq, dtable in tables:
            if dseq > seq:
                seq, table = dseq, dtable
        self._tombstones = dict(table)
        self._tomb_seq = seq
        if not seq:
            return
        for dev, dseq, _ in tables:
            if dseq != seq:
                dev.write_tombstones(seq, table)
                dio.fdatasync(dev.fd)
                log.info("%s: tombstone table brought to sequence %d", dev.path, seq)

    def _plan_upgrade(self, dev: Device) -> tuple[int, int, list[tuple[int, int, int]]]:
        """How a loaded version 1 device becomes version 2: ``(slot count, offset of
        the metadata area, moves (key, from slot, to slot))``. The metadata area goes
        between the index and the first slot when it fits there, else after the last
        slot that remains, whose chunks must move to free slots lower down;
        StoreError when there are not enough of them."""
        n0 = dev.slot_count
        meta = _align(INDEX_OFFSET + n0 * ENTRY.size, PAGE)
        n = n0
        if meta + metadata_size(n0) > dev.data_offset:
            while n > 0 and dev.data_offset + n * CHUNK_SIZE + metadata_size(n) > dev.capacity:
                n -= 1
            meta = dev.data_offset + n * CHUNK_SIZE
        movers = sorted(
            (slot, key) for key, (d, slot) in self._index.items() if d is dev and slot >= n
        )
        targets = sorted(slot for slot in dev.free if slot < n)
        if n == 0 or len(movers) > len(targets):
            raise StoreError(
                f"{dev.path}: upgrading to format version {FORMAT_VERSION} needs its last "
                f"{n0 - n} slots for metadata and it has {n0 - dev.used} free; free "
                f"{len(movers) - len(targets)} more chunks with the previous release "
                "first (the device is still a valid version 1 device)"
            )
        moves = [(key, src, dst) for (src, key), dst in zip(movers, targets, strict=False)]
        return n, meta, moves

    def _upgrade(self, dev: Device, n: int, meta: int, moves: list[tuple[int, int, int]]) -> None:
        """Upgrade a loaded version 1 device to version 2 in place, as planned by
        :meth:`_plan_upgrade`. Every step leaves a valid version 1 device until the
        single-sector superblock write that makes it version 2 (docs/sds.md, "Upgrade
        from version 1")."""
        n0 = dev.slot_count
        # 1. Copy each chunk to a free (durably zero) slot, and make the copies durable
        # before any entry names them: a crash after a new entry must find whole data.
        for _, src, dst in moves:
            for pos in range(0, CHUNK_SIZE, WRITE_PIECE):
                piece = dio.pread(dev.fd, WRITE_PIECE, dev.slot_offset(src) + pos)
                if any(piece):
                    dio.pwrite(dev.fd, piece, dev.slot_offset(dst) + pos)
        if moves:
            dio.fdatasync(dev.fd)
        # 2. The new entries, with newer generations: after a crash here the two claims
        # of a chunk are resolved at open, the newer (the copy) wins.
        for key, _, dst in moves:
            self._generation += 1
            dev.write_entry(dst, _entry(*split_key(key), self._generation))
        if moves:
            dio.fdatasync(dev.fd)
        # 3. The old entries go; then the metadata area, the slots it covers and the
        # index entries past the new slot count are zeroed, and all of it synced.
        for key, src, dst in moves:
            dev.write_entry(src, _EMPTY_ENTRY)
            self._index[key] = (dev, dst)
        taken = {dst for _, _, dst in moves}
        dev.free = [slot for slot in dev.free if slot < n and slot not in taken]
        # A stale claim dropped at open (another device held a newer copy of its chunk)
        # waits in pending: past the new slot count its slot is metadata now.
        dev.pending = [slot for slot in dev.pending if slot < n]
        if n < n0:  # every region ends on a 4 KiB boundary, the rest is never read
            dev._zero(meta, dev.capacity // PAGE * PAGE - meta)
            tail = INDEX_OFFSET + n * ENTRY.size
            dev._zero(tail, INDEX_OFFSET + n0 * ENTRY.size - tail)
        else:
            dev._zero(meta, metadata_size(n0))
        dio.fdatasync(dev.fd)
        # 4. The switch: one sector.
        dev.version = FORMAT_VERSION
        dev.slot_count = n
        dev.regions = regions_of(n, dev.data_offset, meta)
        dev.write_super(clean=False)
        dio.fsync(dev.fd)
        log.info(
            "upgraded %s to format version %d: %d slots (%d before), %d chunks moved",
            dev.path,
            FORMAT_VERSION,
            n,
            n0,
            len(moves),
        )

    def close(self) -> None:
        """Sync everything and mark the devices cleanly stopped."""
        for dev in self.devices:
            if dev.fd < 0:
                continue
            if dev.failed:
                dev.close()  # never marked clean: its contents are not trusted
                continue
            try:
                dio.fdatasync(dev.fd)
                batch = self._take_ext_pending(dev)
                if batch:  # the holds-bit sync rule, as in _sync_with_entries
                    if not dev.ext_feature:
                        dev.incompat |= INCOMPAT_SLOT_EXT
                        dev.write_super(clean=False)
                        dio.fsync(dev.fd)
                        dev.ext_feature = True
                    new = self._write_ext_entries(dev, batch)
                    if any(vs.relabelled for vs in new):
                        dio.fdatasync(dev.fd)
                    self._write_index_entries(dev, new)
                    dio.fdatasync(dev.fd)
                if dev.unpunched or dev.intent is not None:
                    # Every write and free is durable: zero what the frees left, forget
                    # the marks; durable before CLEAN says so.
                    self._punch(dev, sorted(dev.unpunched))
                    if dev.intent is not None:
                        # Those not recomputed yet stay marked for the next start.
                        offset, bits = dev.intent.clear_all(dev.unverified)
                        dio.pwrite(dev.fd, bits, offset)
                    dio.fdatasync(dev.fd)
                dev.free.extend(dev.pending)
                dev.pending.clear()
                dev.write_super(clean=True)
                dio.fsync(dev.fd)
            finally:
                dev.close()

    # -- failures ---------------------------------------------------------------------

    def fail(self, dev: Device, reason: str) -> None:
        """Fail ``dev`` for good (fail-stop); no IO goes to it from now on."""
        if dev.failed:
            return
        dev.failed = reason
        log.error(
            "%s: IO error, device FAILED (no more IO; its PGs are rebuilt elsewhere): %s",
            dev.path,
            reason,
        )
        if self.on_failure is not None:
            self.on_failure(dev)

    def _io_error(self, dev: Device, what: str, exc: OSError) -> DeviceFailed:
        """Fail ``dev`` after ``exc``; the exception to raise instead (from ``exc``)."""
        if isinstance(exc, DeviceFailed):
            return exc
        self.fail(dev, f"{what}: {exc.strerror or exc}")
        return DeviceFailed(dev)

    def failed_devices(self) -> list[Device]:
        return [d for d in self.devices if d.failed]

    def working(self) -> list[Device]:
        """The devices that are not failed."""
        return [d for d in self.devices if not d.failed]

    # -- lookups ----------------------------------------------------------------------

    def device_by_mdm_id(self, device_id: int) -> Device | None:
        for dev in self.devices:
            if dev.mdm_id == device_id:
                return dev
        return None

    def location(self, volume: int, chunk: int) -> tuple[Device, int] | None:
        return self._index.get(chunk_key(volume, chunk))

    def chunk_ids(self) -> list[tuple[int, int]]:
        """``(volume, chunk)`` of every chunk stored here."""
        return [split_key(key) for key in self._index]

    def chunk_ids_of_pool(self, pool_id: int) -> list[tuple[int, int]]:
        """``(volume, chunk)`` of every chunk stored on the devices of ``pool_id``."""
        return [split_key(key) for key, (dev, _) in self._index.items() if dev.pool_id == pool_id]

    def index_pgs(self, pool_id: int, pg_count: int) -> None:
        """Keep the chunks of each PG of ``pool_id`` (its PG count is fixed at the
        pool's creation) from now on; built from the index the first time."""
        if self._pg_counts.get(pool_id) == pg_count:
            return
        for pool_pg in [k for k in self._by_pg if k[0] == pool_id]:
            del self._by_pg[pool_pg]
        self._pg_counts[pool_id] = pg_count
        for key, (dev, _) in self._index.items():
            if dev.pool_id == pool_id:
                pg = pg_of(*split_key(key), pg_count)
                self._by_pg.setdefault((pool_id, pg), set()).add(key)

    def forget_pgs(self) -> None:
        """Drop the PG indexes (the devices' pools may have changed)."""
        self._pg_counts.clear()
        self._by_pg.clear()

    def chunks_of_pg(self, pool_id: int, pg: int) -> list[tuple[int, int]] | None:
        """``(volume, chunk)`` of every chunk of PG ``pg`` stored here, ascending;
        None when the pool's PGs are not indexed (:meth:`index_pgs`)."""
        if pool_id not in self._pg_counts:
            return None
        keys = sorted(self._by_pg.get((pool_id, pg), ()))
        return [split_key(key) for key in keys]

    def _indexed(self, dev: Device, key: int) -> set[int] | None:
        """The PG index set ``key`` belongs in, when its pool's PGs are indexed."""
        pool = dev.pool_id
        count = None if pool is None else self._pg_counts.get(pool)
        if pool is None or count is None:
            return None
        pg = pg_of(*split_key(key), count)
        return self._by_pg.setdefault((pool, pg), set())

    def volume_chunks(self) -> dict[int, int]:
        """Chunks stored here per volume (for the MDM heartbeat)."""
        return {v: n for v, n in self._volume_chunks.items() if n}

    @property
    def generation(self) -> int:
        return self._generation

    # -- IO ---------------------------------------------------------------------------

    def read(self, volume: int, chunk: int, offset: int, length: int) -> memoryview | None:
        """``length`` bytes at ``offset`` of the chunk, or None if it has no slot.

        With checksums kept, the whole 4 KiB blocks the range touches are read and
        checked: :class:`ChecksumError` (an ``OSError``, EIO) when one does not match."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or volume in self._tombstones:
            return None
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if not dev.checksums or not length:
            buf = self._read_buffer(length)
            self._pread(dev, buf, dev.slot_offset(slot) + offset)
            return buf
        first = offset >> BLOCK_SHIFT
        count = ((offset + length + BLOCK - 1) >> BLOCK_SHIFT) - first
        start = first << BLOCK_SHIFT
        buf = self._read_buffer(count << BLOCK_SHIFT)
        self._read_checked(dev, slot, volume, chunk, first, buf)
        return buf[offset - start : offset - start + length]

    def read_reply(
        self, volume: int, chunk: int, offset: int, length: int, *, check: bool = True
    ) -> memoryview | None:
        """A READ reply's payload and its checksums (docs/protocol.md §8.6): ``length``
        bytes at ``offset`` of the chunk followed, in the same buffer, by one packed
        CRC32C per 4 KiB of them from their first byte, so that the reply leaves in
        one write; None if the chunk has no slot.

        ``check``: the blocks are checked as :meth:`read` checks them, and the reply's
        checksums are the stored ones they matched. Not ``check`` (a READ whose client
        checks the bytes against the checksums itself: ``CLIENT_CHECKS``, docs/sds.md
        "Checksums"), for a read at a block boundary of whole blocks: the stored
        checksums are sent as they are and nothing is checked here; only the
        checksums of blocks that have none recorded are computed. A read whose last
        unit is short is checked here all the same: its last checksum is made from
        the bytes read, so the client's check of them would prove nothing. A read not at a
        block boundary, or of a device that keeps no checksums, computes them all."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or volume in self._tombstones:
            return None
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if not check and length & (BLOCK - 1):
            # A short last unit's checksum is made here from the bytes read, so the
            # client's check of it proves nothing about them: the SDS checks.
            check = True
        if not dev.checksums or offset & (BLOCK - 1) or not length:
            data = self.read(volume, chunk, offset, length)
            assert data is not None
            packed = trailer(data)
            out = self._read_buffer(length + len(packed))
            out[:length] = data
            out[length:] = packed
            return out
        first = offset >> BLOCK_SHIFT
        count = (length + BLOCK - 1) >> BLOCK_SHIFT
        size = count << BLOCK_SHIFT
        buf = self._read_buffer(size + 4 * count)
        data = buf[:size]
        got: list[int] | None = None
        if check:
            got, row = self._read_checked(dev, slot, volume, chunk, first, data)
        else:
            if dev.unverified and slot in dev.unverified:
                self._verify(dev, slot)
            self._pread(dev, data, dev.slot_offset(slot) + offset)
            row = self._row(dev, slot, first, count)
        short = length & (BLOCK - 1)
        if short or _NO_CRC in row:
            # Blocks without a recorded checksum, and a last unit shorter than its
            # block: their checksums from the bytes.
            sums = list(ROWS[count].unpack(row))
            for i, want in enumerate(sums):
                if not want:
                    at = i << BLOCK_SHIFT
                    sums[i] = got[i] if got else crc32c(data[at : at + BLOCK])
            if short:
                sums[-1] = crc32c(data[length - short : length])
            row = ROWS[count].pack(*sums)
        buf[length : length + 4 * count] = row
        return buf[: length + 4 * count]

    def _pread(self, dev: Device, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` of ``dev`` (zeroes past the end of a sparse file)."""
        try:
            n = dio.preadv(dev.fd, [buf], offset)
        except OSError as exc:
            raise self._io_error(dev, "pread", exc) from exc
        if n < len(buf):
            buf[n:] = _ZERO_VIEW[: len(buf) - n]

    def _row(self, dev: Device, slot: int, first: int, count: int) -> bytes:
        """The stored checksums of ``count`` blocks of ``slot`` from block ``first`` on."""
        try:
            row = dio.pread(dev.fd, 4 * count, dev.row_offset(slot) + 4 * first)
        except OSError as exc:
            raise self._io_error(dev, "pread", exc) from exc
        return row if len(row) == 4 * count else row.ljust(4 * count, b"\0")

    def _read_checked(
        self, dev: Device, slot: int, volume: int, chunk: int, first: int, buf: memoryview
    ) -> tuple[list[int] | None, bytes]:
        """Fill ``buf`` with whole blocks of ``slot`` from block ``first`` on, checked
        against their stored checksums (:class:`ChecksumError`); their CRC32Cs (None
        when checked in one pass: :func:`_intact`) and the stored ones (packed)."""
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        self._pread(dev, buf, dev.slot_offset(slot) + (first << BLOCK_SHIFT))
        row = self._row(dev, slot, first, len(buf) >> BLOCK_SHIFT)
        if _intact(buf, row):
            return None, row
        got = block_crcs(buf)
        bad = bad_blocks(got, row, first)
        if bad:
            raise self._checksum_error(dev, slot, volume, chunk, bad)
        return got, row

    def checksum_rows(
        self, volume: int, chunk: int, *, count: bool = True
    ) -> tuple[bytes, bytes] | None:
        """The chunk's copy here checked against its checksums, for a scrub
        (``docs/sds.md``, "Scrub"): ``(stored, computed)``, the checksum row kept for
        its slot and the row of the bytes it holds (a stored 0: none recorded; all
        zeroes without checksums kept); None when it has no slot. Blocks that do not
        match are counted and logged as any read's (:attr:`Device.checksum_errors`;
        not with ``count`` False), not raised."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or volume in self._tombstones:
            return None
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if dev.checksums and dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        buf = bytearray(CHUNK_SIZE)
        try:
            dio.preadv(dev.fd, [buf], dev.slot_offset(slot))
            stored = (
                dio.pread(dev.fd, ROW_SIZE, dev.row_offset(slot)).ljust(ROW_SIZE, b"\0")
                if dev.checksums
                else bytes(ROW_SIZE)
            )
        except OSError as exc:
            raise self._io_error(dev, "pread", exc) from exc
        # block by block, never the one pass: the scrub is there to find rows that
        # disagree with the bytes, so its computed row must be the bytes' own
        computed = slot_crcs(buf)
        if count and stored != computed:
            bad = bad_in_rows(stored, computed)
            if bad:
                self._checksum_error(dev, slot, volume, chunk, bad)
        return stored, computed

    def _read_buffer(self, size: int) -> memoryview:
        """A buffer for a read of ``size`` bytes, which the read overwrites whole. One
        of a whole chunk (with its reply's checksums: :meth:`read_reply`) is a view
        of one of the store's kept buffers that no view (a reply being sent, a copy in
        flight) refers to any more, so that a 1 MiB read neither zeroes fresh memory
        nor faults its pages in (docs/performance.md); smaller reads, and whole-chunk
        reads while every kept buffer is in use, get a new one."""
        if size < CHUNK_SIZE:
            return memoryview(bytearray(size))
        kept = self._read_buffers
        for i in range(len(kept)):  # not enumerate(): its result tuple holds a reference
            buf = kept[i]
            if sys.getrefcount(buf) <= _UNSHARED_REFS:
                return memoryview(buf)[:size]
        buf = bytearray(_KEPT_SIZE)
        if len(kept) < READ_BUFFERS:
            kept.append(buf)
        return memoryview(buf)[:size]

    def needs_reclaim(self, dev: Device, volume: int, chunk: int) -> bool:
        """True when a write, WRITE_ZEROES or TRIM of this chunk must wait for
        :meth:`reclaim` first: it needs a slot that only a sync can free, or (checksums
        kept) the write-intent mark of its slot is not durable yet (asked for here;
        :meth:`reclaim` writes the marks asked for since the last one, at once)."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None:
            return self._needs_free_slot(dev)
        ldev, slot = loc
        intent = ldev.intent
        if intent is None or ldev.failed or slot in intent.marks:
            return False
        intent.wanted.add(slot)
        return True

    def write(
        self,
        dev: Device,
        volume: int,
        chunk: int,
        offset: int,
        data: bytes | memoryview,
        sums: bytes | memoryview | None = None,
    ) -> None:
        """Write ``data`` at ``offset`` of the chunk; allocate a slot on ``dev`` if new.

        ``sums``: the checksums ``data`` came with, checked (docs/protocol.md §8.6: one
        packed u32 per 4 KiB block of the chunk that the range touches): the blocks it
        covers whole keep them as they are, instead of computing their own.

        Raises :class:`NoSpace` when ``dev`` has no free slot (check
        :meth:`needs_reclaim` first), :class:`VolumeDeleted` when the volume is
        tombstoned, :class:`DeviceFailed` on IO errors (the device where the bytes
        go is failed, now or before) and :class:`ChecksumError` (nothing written)
        when a block the write covers in part does not match its checksum.
        """
        if volume in self._tombstones:
            raise self._deleted(volume)
        key = chunk_key(volume, chunk)
        loc = self._index.get(key)
        if loc is not None:
            ldev, slot = loc
            if ldev.failed:
                raise DeviceFailed(ldev)
            ldev.dirty = True
            try:
                if ldev.checksums:
                    self._write_checked(ldev, slot, offset, data, key, sums)
                else:
                    _pwrite(ldev.fd, data, ldev.slot_offset(slot) + offset)
            except ChecksumError:
                raise
            except OSError as exc:
                raise self._io_error(ldev, "pwrite", exc) from exc
            return
        if dev.failed:
            raise DeviceFailed(dev)
        if not dev.free:
            raise NoSpace(dev.path)
        slot = dev.free.pop()
        assert slot < dev.slot_count, (dev.path, slot, dev.slot_count)
        dev.dirty = True
        try:
            # Data first, then the entry: the slot is durably zero, so a crash in
            # between leaves either nothing or this chunk's own bytes.
            if dev.checksums:
                self._write_checked(dev, slot, offset, data, None, sums)
            else:
                _pwrite(dev.fd, data, dev.slot_offset(slot) + offset)
            self._generation += 1
            dev.write_entry(slot, _entry(volume, chunk, self._generation))
        except OSError as exc:
            dev.free.append(slot)
            raise self._io_error(dev, "pwrite", exc) from exc
        except BaseException:
            dev.free.append(slot)
            raise
        self._index[key] = (dev, slot)
        dev.used += 1
        self._volume_chunks[volume] = self._volume_chunks.get(volume, 0) + 1
        in_pg = self._indexed(dev, key)
        if in_pg is not None:
            in_pg.add(key)

    def zero(self, volume: int, chunk: int, offset: int, length: int) -> None:
        """WRITE_ZEROES / TRIM: the range reads as zeroes; a whole chunk frees its slot.
        :class:`VolumeDeleted` when the volume is tombstoned, :class:`ChecksumError`
        (nothing zeroed) when a block the range covers in part does not match its
        checksum."""
        if volume in self._tombstones:
            raise self._deleted(volume)
        key = chunk_key(volume, chunk)
        loc = self._index.get(key)
        if loc is None:
            return  # already reads as zeroes
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        try:
            self._zero_at(dev, slot, key, offset, length)
        except ChecksumError:
            raise
        except OSError as exc:
            raise self._io_error(dev, "zeroing", exc) from exc

    def _zero_at(self, dev: Device, slot: int, key: int, offset: int, length: int) -> None:
        if offset == 0 and length == CHUNK_SIZE:
            self._free(key, dev, slot)
        elif dev.checksums:
            if dev.unverified and slot in dev.unverified:
                self._verify(dev, slot)
            self._changing(dev, slot, False)
            first, crcs = self._crcs(dev, slot, offset, length, None, key)
            dev.zero_slot_range(slot, offset, length)
            self._write_row(dev, slot, first, crcs, False)
        else:
            dev.zero_slot_range(slot, offset, length)

    def _needs_free_slot(self, dev: Device) -> bool:
        """:meth:`needs_reclaim` of a write that takes a new slot of ``dev``."""
        if not dev.free:
            return bool(dev.pending)
        intent = dev.intent
        if intent is None or dev.failed or dev.free[-1] in intent.marks:
            return False
        # The next slots to be handed out, marked together.
        intent.wanted.update(s for s in dev.free[-MARK_AHEAD:] if s not in intent.marks)
        return True

    # -- versions of snapshot trees (docs/snapshots.md, meshblock.sds.versions) -------

    def version_slot(self, tree: int, chunk: int, version: int) -> VersionSlot | None:
        """The slot of ``version`` (>= 1) of the tree's chunk, if it has one."""
        of_chunk = self._versions.get(chunk_key(tree, chunk))
        return None if of_chunk is None else of_chunk.get(version)

    def versions(self, tree: int, chunk: int) -> dict[int, int]:
        """The versions of the tree's chunk that have a slot here: version -> the
        bitmap of the 4 KiB blocks it holds (bit b: block b), as reads see it.
        Version 0 (every block) when the chunk has its plain slot."""
        key = chunk_key(tree, chunk)
        held = {v: vs.holds for v, vs in self._versions.get(key, {}).items()}
        if key in self._index:
            held[0] = ALL_BLOCKS
        return dict(sorted(held.items()))

    def needs_reclaim_version(self, dev: Device, tree: int, chunk: int, version: int) -> bool:
        """:meth:`needs_reclaim` for :meth:`write_version`."""
        if not version:
            return self.needs_reclaim(dev, tree, chunk)
        vs = self.version_slot(tree, chunk, version)
        if vs is None:
            return self._needs_free_slot(dev)
        intent = vs.dev.intent
        if intent is None or vs.dev.failed or vs.slot in intent.marks:
            return False
        intent.wanted.add(vs.slot)
        return True

    def write_version(
        self,
        dev: Device,
        tree: int,
        chunk: int,
        version: int,
        offset: int,
        data: bytes | memoryview,
        sums: bytes | memoryview | None = None,
    ) -> None:
        """Write ``data`` at ``offset`` of the slot of ``version`` of the tree's chunk
        (allocated on ``dev`` if it has none); the blocks it touches are held by the
        version from now on. Version 0 is :meth:`write`. A block the version does not
        hold yet must be written whole (ValueError, nothing written): its other bytes
        are those the view reads from an ancestor, merged by the caller.

        Reads see the holds bits at once; they reach the disk (the extension entry,
        and the index entry of a new slot) only after a data sync that covered the
        write (:meth:`sync`). Raises as :meth:`write` does."""
        if not version:
            self.write(dev, tree, chunk, offset, data, sums)
            return
        if tree in self._tombstones:
            raise self._deleted(tree)
        touched, whole = block_masks(offset, len(data))
        vs = self.version_slot(tree, chunk, version)
        held = 0 if vs is None else vs.holds
        if touched & ~whole & ~held:
            raise ValueError(
                f"chunk {tree}/{chunk} version {version}: a write of {len(data)} bytes at "
                f"{offset} covers part of a block the version does not hold"
            )
        if vs is None:
            vs = self._new_version_slot(dev, tree, chunk, version)
            new = True
        else:
            new = False
        vdev, slot = vs.dev, vs.slot
        if vdev.failed:
            raise DeviceFailed(vdev)
        vdev.dirty = True
        try:
            if vdev.checksums:
                self._write_checked(
                    vdev, slot, offset, data, None if new else chunk_key(tree, chunk), sums
                )
            else:
                _pwrite(vdev.fd, data, vdev.slot_offset(slot) + offset)
        except OSError as exc:
            if new:
                self._drop_new_version_slot(vs)
            if isinstance(exc, ChecksumError):
                raise
            raise self._io_error(vdev, "pwrite", exc) from exc
        except BaseException:
            if new:
                self._drop_new_version_slot(vs)
            raise
        if new or touched & ~held:
            self._maps.pop(chunk_key(tree, chunk), None)
        vs.holds |= touched
        if new or vs.holds & ~vs.written:
            vdev.ext_pending[slot] = vs

    def _new_version_slot(self, dev: Device, tree: int, chunk: int, version: int) -> VersionSlot:
        if dev.failed:
            raise DeviceFailed(dev)
        if not dev.free:
            raise NoSpace(dev.path)
        slot = dev.free.pop()
        self._generation += 1
        vs = VersionSlot(dev, slot, tree, chunk, version, self._generation)
        self._versions.setdefault(chunk_key(tree, chunk), {})[version] = vs
        dev.used += 1
        self._volume_chunks[tree] = self._volume_chunks.get(tree, 0) + 1
        return vs

    def _drop_new_version_slot(self, vs: VersionSlot) -> None:
        """Undo :meth:`_new_version_slot` (its first write failed: nothing of it is
        on the disk but that write's bytes, in a slot that goes back to free)."""
        self._unlist_version(vs)
        vs.freed = True
        if vs.dev.failed:
            return
        vs.dev.free.append(vs.slot)

    def _unlist_version(self, vs: VersionSlot) -> None:
        key = chunk_key(vs.tree, vs.chunk)
        of_chunk = self._versions[key]
        del of_chunk[vs.version]
        if not of_chunk:
            del self._versions[key]
        self._maps.pop(key, None)
        vs.dev.used -= 1
        self._volume_chunks[vs.tree] -= 1
        vs.dev.ext_pending.pop(vs.slot, None)

    def read_version(
        self, tree: int, chunk: int, version: int, offset: int, length: int
    ) -> memoryview | None:
        """``length`` bytes at ``offset`` of the slot of ``version`` of the tree's
        chunk, checked as :meth:`read` checks them; None if it has no slot. Blocks
        the version does not hold (:meth:`versions`) read as zeroes or as bytes of a
        write whose holds bit did not survive a power cut: a view reads them from an
        ancestor. Version 0 is :meth:`read`."""
        if not version:
            return self.read(tree, chunk, offset, length)
        vs = self.version_slot(tree, chunk, version)
        if vs is None or tree in self._tombstones:
            return None
        dev = vs.dev
        if dev.failed:
            raise DeviceFailed(dev)
        first = offset >> BLOCK_SHIFT
        start = first << BLOCK_SHIFT
        buf = self._read_buffer(_align(offset + length, BLOCK) - start)
        if dev.checksums:
            self._read_checked(dev, vs.slot, tree, chunk, first, buf)
        else:
            self._pread(dev, buf, dev.slot_offset(vs.slot) + start)
        return buf[offset - start : offset - start + length]

    def view_map(self, vtree: VersionTree, tree: int, chunk: int, view: int) -> list[Run[Where]]:
        """The block map of ``view`` (a version of ``vtree``) over the tree's chunk:
        runs of blocks and the slot each is read from (None: zeroes). Computed from
        the chunk's slots on first use and kept (:data:`MAP_CACHE` chunks), so a read
        costs one lookup whatever the depth of the view (docs/snapshots.md, Decision 3)."""
        key = chunk_key(tree, chunk)
        plain = self._index.get(key)
        maps = self._maps.get(key)
        got = None if maps is None else maps.get(view)
        if got is not None and got[0] == vtree.serial and got[1] is plain:
            return got[2]
        held: dict[int, tuple[Where, int]] = {
            v: ((vs.dev, vs.slot), vs.holds) for v, vs in self._versions.get(key, {}).items()
        }
        if plain is not None:
            held[0] = (plain, ALL_BLOCKS)
        runs = block_map(vtree, view, held)
        if maps is None:
            if len(self._maps) >= MAP_CACHE:
                del self._maps[next(iter(self._maps))]
            maps = self._maps[key] = {}
        maps[view] = (vtree.serial, plain, runs)
        return runs

    def read_view(
        self, vtree: VersionTree, tree: int, chunk: int, view: int, offset: int, length: int
    ) -> memoryview | None:
        """``length`` bytes at ``offset`` of the tree's chunk as ``view`` reads it:
        each block from the slot its block map names, one read (checked as
        :meth:`read` checks) per run of blocks of one slot in the range; None when
        no slot holds a block of it for the view (it reads as zeroes)."""
        runs = self.view_map(vtree, tree, chunk, view)
        if (len(runs) == 1 and runs[0][2] is None) or tree in self._tombstones:
            return None
        first, last = offset >> BLOCK_SHIFT, (offset + length + BLOCK - 1) >> BLOCK_SHIFT
        buf = self._read_buffer((last - first) << BLOCK_SHIFT)
        for b0, n, where in runs:
            lo, hi = max(b0, first), min(b0 + n, last)
            if lo >= hi:
                continue
            piece = buf[(lo - first) << BLOCK_SHIFT : (hi - first) << BLOCK_SHIFT]
            if where is None:
                piece[:] = _ZERO_VIEW[: len(piece)]
                continue
            dev, slot = where
            if dev.failed:
                raise DeviceFailed(dev)
            if dev.checksums:
                self._read_checked(dev, slot, tree, chunk, lo, piece)
            else:
                self._pread(dev, piece, dev.slot_offset(slot) + (lo << BLOCK_SHIFT))
        at = offset - (first << BLOCK_SHIFT)
        return buf[at : at + length]

    def write_view(
        self,
        dev: Device,
        vtree: VersionTree,
        tree: int,
        chunk: int,
        head: int,
        offset: int,
        data: bytes | memoryview,
        sums: bytes | memoryview | None = None,
    ) -> None:
        """Write ``data`` at ``offset`` of the tree's chunk for the volume whose head
        is ``head``: into the head's slot (:meth:`write_version`; version 0 is
        :meth:`write`). A block the write covers in part and the head does not hold
        is read through the head's block map and written whole with the new bytes
        in (a 4 KiB read-modify-write, once per block: docs/snapshots.md, Decision 1)."""
        if not head:
            self.write(dev, tree, chunk, offset, data, sums)
            return
        touched, whole = block_masks(offset, len(data))
        vs = self.version_slot(tree, chunk, head)
        fresh = vs is None and touched == whole and dev.ext_feature
        if fresh and self._nobody_holds(vtree, tree, chunk, head, touched):
            # The first write of a version's slot to blocks no ancestor holds: they read
            # zeroes without the bits as with them, and the new slot was durably zero,
            # so the entries need not wait for a sync of the data (one sync, not two).
            self.write_version(dev, tree, chunk, head, offset, data, sums)
            vs = self.version_slot(tree, chunk, head)
            assert vs is not None
            if vs.dev.ext_pending.pop(vs.slot, None) is not None:
                # a new slot, never a plain one: both entries at once (a power cut
                # that keeps only the index entry drops the slot, an unsynced write)
                new = self._write_ext_entries(vs.dev, [(vs, vs.holds)])
                self._write_index_entries(vs.dev, new)
            return
        if not touched & ~whole & ~(0 if vs is None else vs.holds):
            self.write_version(dev, tree, chunk, head, offset, data, sums)
            return
        start = offset & ~(BLOCK - 1)
        size = _align(offset + len(data), BLOCK) - start
        old = self.read_view(vtree, tree, chunk, head, start, size)
        merged = bytearray(size) if old is None else bytearray(old)
        merged[offset - start : offset - start + len(data)] = data
        self.write_version(dev, tree, chunk, head, start, memoryview(merged))

    def _nobody_holds(
        self, vtree: VersionTree, tree: int, chunk: int, view: int, blocks: int
    ) -> bool:
        """Whether no slot holds any of ``blocks`` for ``view`` (they read zeroes)."""
        for first, n, where in self.view_map(vtree, tree, chunk, view):
            if where is not None and blocks >> first & ((1 << n) - 1):
                return False
        return True

    def zero_view(
        self,
        vtree: VersionTree,
        dev: Device,
        tree: int,
        chunk: int,
        head: int,
        offset: int,
        length: int,
    ) -> None:
        """WRITE_ZEROES / TRIM of ``length`` bytes at ``offset`` of the tree's chunk
        for the volume whose head is ``head`` (version 0 is :meth:`zero`; ``dev``: where
        a new slot of the head goes). A block the range covers whole that an ancestor
        holds for the head's view is held by the head as zeroes (zeroed in its slot,
        its bit set under the sync rule of writes); one the head holds is zeroed in
        place; one nobody holds is left (it reads zeroes). Blocks covered in part get
        zeroes through :meth:`write_view`. A whole chunk that no ancestor holds for
        the view frees the head's slot (docs/snapshots.md, Decision 1, "Zeroes")."""
        if not head:
            self.zero(tree, chunk, offset, length)
            return
        if tree in self._tombstones:
            raise self._deleted(tree)
        touched, whole = block_masks(offset, length)
        vs = self.version_slot(tree, chunk, head)
        mine = None if vs is None else (vs.dev, vs.slot)
        ancestors = 0
        for first, n, where in self.view_map(vtree, tree, chunk, head):
            if where is not None and where != mine:
                ancestors |= ((1 << n) - 1) << first
        if vs is not None and not ancestors and whole == ALL_BLOCKS:
            self.free_version(tree, chunk, head)
            return
        ancestors &= whole
        if vs is None and ancestors:
            vs = self._new_version_slot(dev, tree, chunk, head)
        if vs is not None and whole & (vs.holds | ancestors):
            if vs.dev.failed:
                raise DeviceFailed(vs.dev)
            try:
                self._zero_blocks(vs.dev, vs.slot, whole & (vs.holds | ancestors))
            except OSError as exc:
                raise self._io_error(vs.dev, "zeroing", exc) from exc
            if ancestors & ~vs.holds:
                self._maps.pop(chunk_key(tree, chunk), None)
                vs.holds |= ancestors
                vs.dev.ext_pending[vs.slot] = vs
        end = offset + length
        parts = {
            (offset, min(end, _align(offset + 1, BLOCK))),
            (max(offset, (end - 1) & ~(BLOCK - 1)), end),
        }
        for lo, hi in sorted(parts):
            if (touched & ~whole) >> (lo >> BLOCK_SHIFT) & 1:
                self.write_view(dev, vtree, tree, chunk, head, lo, bytes(hi - lo))

    def tree_chunks(self, tree: int) -> list[int]:
        """The chunks of ``tree`` with a slot here (of any version), ascending. A scan
        of the whole store, on the caller's thread: the garbage worker uses
        :meth:`trees_chunks`."""
        return _chunks_by_tree([*self._index, *self._versions], frozenset((tree,))).get(tree, [])

    async def trees_chunks(self, trees: Iterable[int]) -> dict[int, list[int]]:
        """:meth:`tree_chunks` of each of ``trees`` (a tree with no chunk here is
        left out) in one scan of the store, run in a thread: only the copy of the
        keys (C speed, atomic under the GIL, so nothing changes them meanwhile)
        runs on the event loop, not the Python loop over them."""
        keys = [*self._index, *self._versions]
        return await asyncio.to_thread(_chunks_by_tree, keys, frozenset(trees))

    def collect_garbage(
        self,
        vtree: VersionTree,
        live_views: Iterable[int],
        tree: int,
        chunk: int,
        *,
        keep_plain: bool = False,
    ) -> dict[int, int]:
        """The garbage pass of one chunk (docs/snapshots.md, Decision 5): a block of a
        slot that no live view reads through its block map is freed (zeroed, its
        checksum the zero block's, its holds bit cleared); a slot left with no block
        used is freed whole through the crash-safe free path. ``vtree`` has every
        version that still has slots (dead ones included), ``live_views`` the views
        of the tree's volumes. Returns version -> the blocks freed.

        A tree that lags the chunk (a map older than a snapshot or clone a client
        has already written through) frees nothing it does not know: a version with
        a slot here but not in ``vtree`` keeps its slot whole, and a live view not
        in ``vtree`` is refused (ValueError) before anything is freed.

        ``keep_plain``: the chunk's plain slot (version 0 without an extension entry,
        what the IO path reads and writes as the tree's root volume until it goes
        through views) is left whole, whatever the views read of it.

        No live view reads a block freed here, so the order in which the zeroes, the
        cleared bits and the freed entries reach the disk does not matter: after a
        power cut the pass finds what is left and frees it again."""
        key = chunk_key(tree, chunk)
        slots = dict(self._versions.get(key, {}))
        held = {v: (v, vs.holds) for v, vs in slots.items()}
        plain = self._index.get(key)
        if plain is not None:
            held[0] = (0, ALL_BLOCKS)
        views = set(live_views)
        unknown = sorted(v for v in views if v not in vtree)
        if unknown:
            raise ValueError(f"live views {unknown} of tree {tree} are not in its version tree")
        used = {v: 0 if v in vtree else ALL_BLOCKS for v in held}  # unknown: kept
        for view in views:
            for first, n, version in block_map(vtree, view, held):
                if version is not None:
                    used[version] |= ((1 << n) - 1) << first
        freed = {}
        for version, (_, holds) in held.items():
            garbage = holds & ~used[version]
            if not garbage or (keep_plain and not version and version not in slots):
                continue
            freed[version] = garbage
            if version:
                dev, slot = slots[version].dev, slots[version].slot
            else:
                assert plain is not None
                dev, slot = plain
            if dev.failed:
                raise DeviceFailed(dev)
            try:
                if garbage == holds and not version:
                    self._free(key, dev, slot)
                elif garbage == holds:
                    self._free_version(slots[version])
                else:
                    self._zero_blocks(dev, slot, garbage)
                    if version:
                        self._clear_bits(slots[version], garbage)
            except OSError as exc:
                raise self._io_error(dev, "freeing", exc) from exc
        if freed:
            self._maps.pop(key, None)
        return freed

    async def collapse(self, vtree: VersionTree, dead: int, tree: int, chunk: int) -> str:
        """Collapse (docs/snapshots.md, Decision 5): merge the chunk's slot of the dead
        version ``dead``, which has exactly one child in ``vtree``, into the child's.
        Without a slot of the child, ``dead``'s slot becomes the child's (its entries
        rewritten, no data moved: ``"relabelled"``); with one, the blocks the child does
        not hold are copied into the child's slot, and once its entries are durable
        the dead slot is freed (``"merged"``); ``"none"`` when ``dead`` has no slot.
        Durable when it returns (it syncs the devices it changed): the MDM may then
        drop ``dead`` from the tree once every chunk is done. A power cut before
        leaves the chunk readable through ``dead`` as before."""
        kids = vtree.children.get(dead, [])
        if dead not in vtree or len(kids) != 1:
            raise ValueError(f"version {dead} of tree {tree} has {len(kids)} children, not 1")
        child = kids[0]
        key = chunk_key(tree, chunk)
        src = self.version_slot(tree, chunk, dead) if dead else None
        plain = None if dead else self._index.get(key)
        if src is None and plain is None:
            return "none"
        dst = self.version_slot(tree, chunk, child)
        if dst is None:
            vs = src if src is not None else self._plain_to_version(key, tree, chunk)
            self._versions[key].pop(vs.version, None)
            vs.version = child
            self._versions[key][child] = vs
            vs.dev.ext_pending[vs.slot] = vs  # the entry under its new version
            vs.dev.dirty = True
            self._maps.pop(key, None)
            await self.sync([vs.dev])
            return "relabelled"
        holds = ALL_BLOCKS if src is None else src.holds
        for first, n in _runs([b for b in range(BLOCKS) if (holds & ~dst.holds) >> b & 1]):
            data = self.read_version(tree, chunk, dead, first << BLOCK_SHIFT, n << BLOCK_SHIFT)
            assert data is not None
            self.write_version(dst.dev, tree, chunk, child, first << BLOCK_SHIFT, bytes(data))
        await self.sync([dst.dev])  # the child holds them durably: the dead slot may go
        if src is not None:
            self.free_version(tree, chunk, dead)
        elif plain is not None and self._index.get(key) is plain:
            self._free(key, *plain)
        self._maps.pop(key, None)
        return "merged"

    def _plain_to_version(self, key: int, tree: int, chunk: int) -> VersionSlot:
        """Make the chunk's plain slot (version 0) a version slot holding every block,
        its entries (the extension entry, synced, then the index entry with EXT
        under a new generation) written by the next sync; until then the disk still
        has the plain chunk."""
        dev, slot = self._index.pop(key)
        in_pg = self._indexed(dev, key)
        if in_pg is not None:
            in_pg.discard(key)
        self._generation += 1
        vs = VersionSlot(dev, slot, tree, chunk, 0, self._generation, ALL_BLOCKS)
        vs.relabelled = True
        self._versions.setdefault(key, {})[0] = vs
        return vs

    def _zero_blocks(self, dev: Device, slot: int, blocks: int) -> None:
        """Zero ``blocks`` (a bitmap) of ``slot``, with the zero block's checksums."""
        if dev.checksums:
            if dev.unverified and slot in dev.unverified:
                self._verify(dev, slot)
            self._changing(dev, slot, False)
        runs = [b for b in range(BLOCKS) if blocks >> b & 1]
        for first, n in _runs(runs):
            dev.zero_slot_range(slot, first << BLOCK_SHIFT, n << BLOCK_SHIFT)
            if dev.checksums:
                self._write_row(dev, slot, first, [ZERO_BLOCK_CRC] * n, False)

    @staticmethod
    def _clear_bits(vs: VersionSlot, blocks: int) -> None:
        """Clear holds bits of blocks no live view reads: in memory and in the entry
        on the device at once (the extension entry is written whole; with nothing to
        order it after, an entry not written yet is left to the next sync)."""
        vs.holds &= ~blocks
        vs.written &= ~blocks
        if vs.entered:
            dev = vs.dev
            dev.dirty = True
            entry = pack_ext(vs.version, vs.generation, vs.written)
            dio.pwrite(dev.fd, entry, dev.ext_offset(vs.slot))

    def free_version(self, tree: int, chunk: int, version: int) -> bool:
        """Free the slot of ``version`` (>= 1) of the tree's chunk through the
        crash-safe free path (its index entry cleared first); whether it had one."""
        vs = self.version_slot(tree, chunk, version)
        if vs is None:
            return False
        try:
            self._free_version(vs)
        except OSError as exc:
            raise self._io_error(vs.dev, "freeing", exc) from exc
        return True

    def _free_version(self, vs: VersionSlot) -> None:
        dev = vs.dev
        if vs.entered and not dev.failed:
            dev.write_entry(vs.slot, _EMPTY_ENTRY)
        self._unlist_version(vs)
        vs.freed = True
        self._release(dev, vs.slot)

    def _write_ext_entries(
        self, dev: Device, batch: list[tuple[VersionSlot, int]]
    ) -> list[VersionSlot]:
        """Write the extension entries of ``batch`` (each slot with the blocks whose
        data a completed sync covered); not synced. Returns the new slots, whose index
        entries :meth:`_write_index_entries` writes next: after a sync when one is
        ``relabelled`` (its plain index entry must not give way to an EXT one whose
        extension entry a power cut could lose: the chunk would be dropped). The
        device has feature bit 4 durably."""
        new = []
        for vs, holds in batch:
            if vs.freed:
                continue
            bits = (vs.written | holds) & vs.holds  # less the bits cleared since
            dio.pwrite(dev.fd, pack_ext(vs.version, vs.generation, bits), dev.ext_offset(vs.slot))
            vs.written = bits
            if not vs.entered:
                new.append(vs)
        return new

    @staticmethod
    def _write_index_entries(dev: Device, slots: list[VersionSlot]) -> None:
        """Write the index entries (EXT) of new version slots; not synced."""
        for vs in slots:
            if vs.freed:
                continue
            entry = _entry(vs.tree, vs.chunk, vs.generation, ENTRY_USED | ENTRY_EXT)
            dio.pwrite(dev.fd, entry, INDEX_OFFSET + vs.slot * ENTRY.size)
            vs.entered = True

    @staticmethod
    def _take_ext_pending(dev: Device) -> list[tuple[VersionSlot, int]]:
        """The version slots of ``dev`` with entries to write, each with the blocks
        it holds now (covered by a sync that starts after this call)."""
        batch = [(vs, vs.holds) for vs in dev.ext_pending.values()]
        dev.ext_pending = {}
        return batch

    async def _sync_with_entries(self, dev: Device, batch: list[tuple[VersionSlot, int]]) -> None:
        """fdatasync ``dev``; then the entries of ``batch`` (feature bit 4 first, made
        durable, on the first), and fdatasync again: the holds-bit sync rule."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, dio.fdatasync, dev.fd)
            if any(not vs.freed for vs, _ in batch):
                await self._ext_feature(dev)
                new = self._write_ext_entries(dev, batch)
                if any(vs.relabelled for vs in new):  # its extension entry durable first
                    await loop.run_in_executor(None, dio.fdatasync, dev.fd)
                self._write_index_entries(dev, new)
                await loop.run_in_executor(None, dio.fdatasync, dev.fd)
        except BaseException:
            for vs, _ in batch:
                if not vs.freed:
                    dev.ext_pending.setdefault(vs.slot, vs)
            raise

    async def _ext_feature(self, dev: Device) -> None:
        if dev.ext_feature:
            return
        dev.incompat |= INCOMPAT_SLOT_EXT
        dev.write_super(clean=False)
        await asyncio.get_running_loop().run_in_executor(None, dio.fsync, dev.fd)
        dev.ext_feature = True
        log.info("%s: feature %d (snapshot versions) in use", dev.path, INCOMPAT_SLOT_EXT)

    # -- checksums (docs/sds.md, "Checksums") -----------------------------------------

    def _write_checked(
        self,
        dev: Device,
        slot: int,
        offset: int,
        data: bytes | memoryview,
        key: int | None,
        sums: bytes | memoryview | None = None,
    ) -> None:
        """Write ``data`` into ``slot`` and the checksums of the blocks it touches;
        ``key`` None: the slot is new (durably zero); ``sums``: see :meth:`write`."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        new = key is None
        dev.dirty = True
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        self._changing(dev, slot, new)
        n = len(view)
        if sums is not None and n and not (offset | n) & (BLOCK - 1):
            # Whole blocks only: the client's checksums are the blocks', one u32 per
            # block packed as the row keeps them, so they go to the row as they came.
            _pwrite(dev.fd, view, dev.slot_offset(slot) + offset)
            self._write_row_packed(dev, slot, offset >> BLOCK_SHIFT, sums, new)
            return
        first, crcs = self._crcs(dev, slot, offset, n, view, key, sums)
        _pwrite(dev.fd, view, dev.slot_offset(slot) + offset)
        self._write_row(dev, slot, first, crcs, new)

    def _changing(self, dev: Device, slot: int, new: bool) -> None:
        """``slot``'s data and checksums are about to change: its write-intent mark must
        be durable first. Written here (and waited for, in the event loop) when the
        write did not wait for it in :meth:`reclaim`; for a new chunk the next free
        slots are marked with it."""
        intent = dev.intent
        assert intent is not None
        if slot in intent.marks:
            intent.touched[slot] = time.monotonic()
            return
        slots = [slot]
        if new:
            slots += [s for s in dev.free[-MARK_AHEAD:] if s not in intent.marks]
        offset, bits = intent.set(slots)
        dio.pwrite_durable(dev.fd, bits, offset)
        intent.marked(slots)
        self.marks_in_loop += 1

    def _crcs(
        self,
        dev: Device,
        slot: int,
        offset: int,
        length: int,
        view: memoryview | None,
        key: int | None,
        sums: bytes | memoryview | None = None,
    ) -> tuple[int, list[int]]:
        """``(first block, checksums)`` of the blocks that ``length`` bytes of ``view``
        (None: zeroes) written at ``offset`` of ``slot`` touch. A block covered in part
        is its old bytes (read back and checked; zeroes when ``key`` is None: a new
        slot) with the new ones in. A block covered whole has its checksum from
        ``sums`` (one per block touched, checked against ``view`` by the caller) when
        given, else computed."""
        if not length:
            return 0, []
        end = offset + length
        first, last = offset >> BLOCK_SHIFT, (end - 1) >> BLOCK_SHIFT
        head = bool(offset & (BLOCK - 1)) or end < (first + 1) << BLOCK_SHIFT
        tail = last != first and bool(end & (BLOCK - 1))
        lo, hi = first + head, last + 1 - tail  # the blocks covered whole
        if view is None:
            whole = [ZERO_BLOCK_CRC] * (hi - lo)
        elif sums is not None:
            whole = list(ROWS[last + 1 - first].unpack(sums)[lo - first : hi - first])
        else:
            whole = block_crcs(view[(lo << BLOCK_SHIFT) - offset : (hi << BLOCK_SHIFT) - offset])
        if not head and not tail:
            return first, whole
        parts = [b for b, part in ((first, head), (last, tail)) if part]
        old = self._old_blocks(dev, slot, parts, key)
        crcs = []
        for b in parts:
            bstart = b << BLOCK_SHIFT
            a, z = max(offset, bstart), min(end, bstart + BLOCK)
            block = bytearray(old[b])
            block[a - bstart : z - bstart] = (
                bytes(z - a) if view is None else view[a - offset : z - offset]
            )
            crcs.append(crc32c(block))
        return first, (crcs[:1] if head else []) + whole + (crcs[-1:] if tail else [])

    def _old_blocks(
        self, dev: Device, slot: int, blocks: list[int], key: int | None
    ) -> dict[int, bytes]:
        """The bytes of ``blocks`` of ``slot``, checked against their checksums
        (:class:`ChecksumError` if one does not match); ``key`` None: a new slot."""
        if key is None:
            return {b: _ZEROES[:BLOCK] for b in blocks}
        lo, n = blocks[0], blocks[-1] - blocks[0] + 1
        row = dio.pread(dev.fd, 4 * n, dev.row_offset(slot) + 4 * lo).ljust(4 * n, b"\0")
        stored = ROWS[n].unpack(row)
        old, bad = {}, []
        for b in blocks:
            raw = dio.pread(dev.fd, BLOCK, dev.slot_offset(slot) + (b << BLOCK_SHIFT))
            old[b] = raw = raw.ljust(BLOCK, b"\0")
            if stored[b - lo] and crc32c(raw) != stored[b - lo]:
                bad.append(b)
        if bad:
            raise self._checksum_error(dev, slot, *split_key(key), bad)
        return old

    def stored_crcs(self, volume: int, chunk: int, first: int, count: int) -> tuple[int, ...]:
        """The checksums recorded for ``count`` blocks of the chunk from block ``first``
        on (0: none recorded); all 0 when the chunk has no slot or checksums are off."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or not loc[0].checksums or loc[0].failed:
            return (0,) * count
        dev, slot = loc
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        try:
            row = dio.pread(dev.fd, 4 * count, dev.row_offset(slot) + 4 * first)
        except OSError as exc:
            raise self._io_error(dev, "pread", exc) from exc
        return tuple(ROWS[count].unpack(row.ljust(4 * count, b"\0")))

    def rewrite_bad(
        self,
        volume: int,
        chunk: int,
        blocks: Mapping[int, bytes | memoryview],
        unchecked: Container[int] = (),
    ) -> list[int]:
        """Repair: write each of ``blocks`` (block number -> its 4 KiB from another
        copy) over the chunk's block if that block still does not match its checksum,
        with its new checksum (the write-intent mark first, as any write). A block
        that matches now was rewritten meanwhile by a write, whose bytes are newer:
        it is left alone. A block with no checksum recorded is rewritten only when in
        ``unchecked`` (the scrub found it differing from a copy that matches its
        checksum; docs/sds.md, "Scrub"). Returns the blocks rewritten (not synced)."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or not blocks:
            return []
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if not dev.checksums:
            return []
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        key = chunk_key(volume, chunk)
        done = []
        try:
            for b in sorted(blocks):
                (want,) = self.stored_crcs(volume, chunk, b, 1)
                raw = dio.pread(dev.fd, BLOCK, dev.slot_offset(slot) + (b << BLOCK_SHIFT))
                if (not want and b not in unchecked) or crc32c(raw.ljust(BLOCK, b"\0")) == want:
                    continue
                self._write_checked(dev, slot, b << BLOCK_SHIFT, blocks[b], key)
                done.append(b)
        except ChecksumError:
            raise
        except OSError as exc:
            raise self._io_error(dev, "pwrite", exc) from exc
        return done

    def adopt_checksums(self, volume: int, chunk: int, crcs: Mapping[int, int]) -> list[int]:
        """Upgrade (docs/sds.md, "Checksums"): store ``crcs`` (block -> the CRC32C of
        its bytes, as :meth:`checksum_rows` just computed them) for those blocks that
        still have no checksum recorded; returns them. The data does not change, so no
        write-intent mark is needed: a row write lost to a power cut leaves 0."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or not loc[0].checksums or not crcs:
            return []
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        try:
            stored = ROWS[BLOCKS].unpack(
                dio.pread(dev.fd, ROW_SIZE, dev.row_offset(slot)).ljust(ROW_SIZE, b"\0")
            )
            done = [b for b, c in sorted(crcs.items()) if c and not stored[b]]
            dev.dirty = True
            for first, n in _runs(done):
                row = ROWS[n].pack(*(crcs[b] for b in range(first, first + n)))
                dio.pwrite(dev.fd, row, dev.row_offset(slot) + 4 * first)
        except OSError as exc:
            raise self._io_error(dev, "pwrite", exc) from exc
        return done

    def read_salvage(self, volume: int, chunk: int) -> tuple[memoryview | None, list[int]]:
        """The whole chunk for a copy job: its bytes with zeroes in place of the blocks
        that do not match their checksums, and those blocks (None: no slot here).
        Nothing is counted: the checked read that found them did."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or volume in self._tombstones:
            return None, []
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        data = bytearray(CHUNK_SIZE)
        try:
            dio.preadv(dev.fd, [data], dev.slot_offset(slot))
            row = dio.pread(dev.fd, ROW_SIZE, dev.row_offset(slot)) if dev.checksums else b""
        except OSError as exc:
            raise self._io_error(dev, "pread", exc) from exc
        row = row.ljust(ROW_SIZE, b"\0") if row else b""
        bad = (
            []
            if not row or _intact(data, row)
            else bad_blocks(block_crcs(memoryview(data)), row, 0)
        )
        for b in bad:
            data[b << BLOCK_SHIFT : (b + 1) << BLOCK_SHIFT] = _ZEROES[:BLOCK]
        return memoryview(data), bad

    def mark_bad(self, volume: int, chunk: int, offset: int, length: int) -> None:
        """Mark the 4 KiB blocks of ``[offset, offset + length)`` (whole blocks) of
        the chunk bad: zeroes with :data:`BAD_BLOCK_CRC`, so that reading them is a
        checksum error (EIO) until a write replaces them whole; for a copy job whose
        source could not give good bytes for them (REPL_MARK_BAD). The chunk must have
        a slot here and checksums be kept: else ``OSError`` (EIO), nothing changed."""
        if offset & (BLOCK - 1) or length & (BLOCK - 1) or not length:
            raise ValueError(f"not whole 4 KiB blocks: {offset}+{length}")
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None or not loc[0].checksums:
            why = "no slot" if loc is None else "checksums off"
            raise OSError(errno.EIO, f"cannot mark blocks of chunk {volume}/{chunk} bad: {why}")
        dev, slot = loc
        if dev.failed:
            raise DeviceFailed(dev)
        if dev.unverified and slot in dev.unverified:
            self._verify(dev, slot)
        first, n = offset >> BLOCK_SHIFT, length >> BLOCK_SHIFT
        try:
            self._changing(dev, slot, False)
            dev.zero_slot_range(slot, offset, length)
            self._write_row(dev, slot, first, [BAD_BLOCK_CRC] * n, False)
        except OSError as exc:
            raise self._io_error(dev, "pwrite", exc) from exc
        log.warning(
            "%s: chunk %d/%d: 4 KiB block(s) %d..%d marked bad (no good copy to take them from)",
            dev.path,
            volume,
            chunk,
            first,
            first + n - 1,
        )

    @staticmethod
    def _write_row(dev: Device, slot: int, first: int, crcs: list[int], new: bool) -> None:
        dev.dirty = True
        if new:  # the whole row: every other block of a new slot is zeroes
            row = bytearray(ZERO_ROW)
            ROWS[len(crcs)].pack_into(row, 4 * first, *crcs)
            dio.pwrite(dev.fd, memoryview(row), dev.row_offset(slot))
        elif crcs:
            dio.pwrite(dev.fd, ROWS[len(crcs)].pack(*crcs), dev.row_offset(slot) + 4 * first)

    @staticmethod
    def _write_row_packed(
        dev: Device, slot: int, first: int, packed: bytes | memoryview, new: bool
    ) -> None:
        """:meth:`_write_row` of checksums already packed (a write's, from the wire)."""
        at = 4 * first
        dev.dirty = True
        if new:
            row = bytearray(ZERO_ROW)
            row[at : at + len(packed)] = packed
            dio.pwrite(dev.fd, memoryview(row), dev.row_offset(slot))
        else:
            dio.pwrite(dev.fd, packed, dev.row_offset(slot) + at)

    def _checksum_error(
        self, dev: Device, slot: int, volume: int, chunk: int, bad: list[int]
    ) -> ChecksumError:
        """Count and log blocks found not matching their checksums; the error to raise."""
        dev.checksum_errors += len(bad)
        error = ChecksumError(dev.path, volume, chunk, slot, bad)
        log.error("%s: %s", dev.path, error.strerror)
        return error

    async def _marks_durable(self) -> None:
        """Return once the write-intent marks asked for so far are durable (one write
        of the bitmap per device for all of them, in a thread)."""
        for dev in self.devices:
            intent = dev.intent
            if intent is None:
                continue
            need = intent.wanted | intent.inflight
            while need - intent.marks:
                if dev.failed:
                    raise DeviceFailed(dev)
                if intent.marking is None:
                    if not intent.wanted:
                        break  # cleared meanwhile: the write marks it itself
                    self._start_marking(dev, intent)
                assert intent.marking is not None
                await asyncio.shield(intent.marking)

    def _start_marking(self, dev: Device, intent: WriteIntent) -> None:
        slots = frozenset(intent.wanted)
        intent.wanted = set()
        offset, bits = intent.set(slots)
        intent.inflight = slots
        loop = asyncio.get_running_loop()

        async def run() -> None:
            try:
                await loop.run_in_executor(None, dio.pwrite_durable, dev.fd, bits, offset)
            except OSError as exc:
                raise self._io_error(dev, "pwrite", exc) from exc
            else:
                intent.marked(slots)
            finally:
                intent.inflight = frozenset()
                intent.marking = None

        task = loop.create_task(run(), name=f"mark-{dev.path}")
        intent.marking = task
        task.add_done_callback(_log_failure)

    def _free(self, key: int, dev: Device, slot: int) -> None:
        """Free a chunk: entry first, then the zeroing; the slot is reused only after
        a sync. On a failed device: forgotten, no IO (it is never read again).

        With checksums kept the slot is zeroed only after the next sync (:meth:`sync`):
        until the cleared entry is durable the chunk may come back after a power cut,
        and then its data and checksums must still agree (no write-intent mark needed).
        It is handed out again after the sync that follows."""
        if not dev.failed:
            dev.write_entry(slot, _EMPTY_ENTRY)
        self._forget(key, dev)
        self._release(dev, slot)

    def _release(self, dev: Device, slot: int) -> None:
        """The rest of :meth:`_free`, once ``slot``'s entry is cleared."""
        if dev.unverified and slot in dev.unverified:
            # Its data and checksums are zeroed after the sync; until then its mark
            # stays (the entry may come back after a power cut, and be recomputed).
            self._verified(dev, slot)
        if dev.failed:
            return
        if dev.checksums:
            dev.unpunched.add(slot)
        else:
            dev.zero_slot_range(slot, 0, CHUNK_SIZE)
        dev.pending.append(slot)
        if len(dev.pending) >= RECLAIM_BATCH and dev.reclaiming is None:
            self._schedule_reclaim(dev)

    def _forget(self, key: int, dev: Device) -> None:
        del self._index[key]
        in_pg = self._indexed(dev, key)
        if in_pg is not None:
            in_pg.discard(key)
        dev.used -= 1
        self._volume_chunks[key >> 32] -= 1

    def _deleted(self, volume: int) -> VolumeDeleted:
        return VolumeDeleted(
            f"volume {volume} is deleted (tombstone of epoch {self._tombstones[volume]})"
        )

    # -- tombstones (docs/sds.md, "Tombstones") --------------------------------------

    def tombstones(self) -> dict[int, int]:
        """Tombstoned volumes: volume id → MDM epoch of the delete."""
        return dict(self._tombstones)

    def is_tombstoned(self, volume_id: int) -> bool:
        return volume_id in self._tombstones

    def tombstone_chunks_left(self, volume_id: int) -> int:
        """Chunks of ``volume_id`` still stored here."""
        return self._volume_chunks.get(volume_id, 0)

    async def add_tombstones(self, tombstones: Mapping[int, int]) -> None:
        """Tombstone volumes (volume id → MDM epoch of the delete): from this call on
        their chunks read as unwritten and writes to them fail; durable on every
        device when it returns. An existing tombstone keeps its epoch. StoreError
        (and nothing changed) when the table would exceed :data:`TOMBSTONE_CAPACITY`
        or an id or epoch is not a u64."""
        new: dict[int, int] = {}
        for volume, epoch in tombstones.items():
            if not (0 <= volume < 1 << 64 and 0 <= epoch < 1 << 64):
                raise StoreError(f"tombstone {volume}: {epoch}: not a u64 id and epoch")
            if volume not in self._tombstones:
                new[volume] = epoch
        if len(self._tombstones) + len(new) > TOMBSTONE_CAPACITY:
            raise StoreError(
                f"tombstone table full: {len(self._tombstones)} of {TOMBSTONE_CAPACITY} "
                f"used, {len(new)} more asked; free and drop some first"
            )
        if new:
            self._tombstones.update(new)
            self._tomb_changes += 1
        await self._persist_tombstones(self._tomb_changes)

    async def free_tombstoned(self, volume_id: int, max_chunks: int) -> int:
        """Free up to ``max_chunks`` chunks of a tombstoned volume through the
        crash-safe free path; return how many (0: none left)."""
        if volume_id not in self._tombstones:
            raise StoreError(f"volume {volume_id} is not tombstoned")
        keys = self._tomb_keys.get(volume_id)
        if keys is None:
            # Once, for the volume: no chunk can be added to it any more.
            keys = [key for key in self._index if key >> 32 == volume_id]
            keys += [key for key in self._versions if key >> 32 == volume_id]
            self._tomb_keys[volume_id] = keys
        freed = 0
        while keys and freed < max_chunks:
            key = keys.pop()
            for vs in list(self._versions.get(key, {}).values()):
                try:
                    self._free_version(vs)
                except OSError as exc:
                    self._io_error(vs.dev, "freeing", exc)  # failed now: forgotten
                freed += 1
            loc = self._index.get(key)
            if loc is not None:
                try:
                    self._free(key, *loc)
                except OSError as exc:
                    self._io_error(loc[0], "freeing", exc)  # failed now: forget it
                    if key in self._index:
                        self._forget(key, loc[0])
                freed += 1
        return freed

    async def drop_tombstones(self, volume_ids: Iterable[int]) -> None:
        """Forget the tombstones of ``volume_ids`` (unknown ids are ignored); durable
        when it returns. StoreError (and nothing changed) if one of the volumes still
        has a chunk here. The frees of their chunks are made durable first: a
        power cut must not bring a freed chunk back under a live id."""
        ids = [v for v in set(volume_ids) if v in self._tombstones]
        for volume in ids:
            left = self._volume_chunks.get(volume, 0)
            if left:
                raise StoreError(f"volume {volume} still has {left} chunks here: free them first")
        if not ids:
            await self._persist_tombstones(self._tomb_changes)
            return
        async with self._tomb_lock:
            await self.sync(self.working())
            for volume in ids:
                self._tombstones.pop(volume, None)
                self._tomb_keys.pop(volume, None)
            self._tomb_changes += 1
        await self._persist_tombstones(self._tomb_changes)

    async def _persist_tombstones(self, change: int) -> None:
        """Return once the in-memory table as of ``change`` is durable everywhere."""
        async with self._tomb_lock:
            if self._tomb_durable >= change:
                return
            upto = self._tomb_changes
            table = dict(self._tombstones)
            self._tomb_seq += 1  # a failed attempt's sequence is never reused
            seq = self._tomb_seq
            # On the working devices: a failed one is never read again.
            devs = self.working()
            for dev in devs:
                try:
                    dev.write_tombstones(seq, table)
                except OSError as exc:
                    self._io_error(dev, "pwrite", exc)
            loop = asyncio.get_running_loop()
            devs = self.working()
            results = await asyncio.gather(
                *(loop.run_in_executor(None, dio.fdatasync, dev.fd) for dev in devs),
                return_exceptions=True,
            )
            for dev, result in zip(devs, results, strict=True):
                if isinstance(result, OSError):
                    self._io_error(dev, "fdatasync", result)
                elif isinstance(result, BaseException):
                    raise result
            if not self.working():
                raise DeviceFailed(self.devices[0])
            self._tomb_durable = upto
            log.info("tombstone table %d written: %d volumes", seq, len(table))

    # -- durability -------------------------------------------------------------------

    async def sync(self, devices: Iterable[Device] | None = None) -> None:
        """fdatasync ``devices`` (default: all) in threads; then return the slots that
        were pending before the sync to the free lists (those freed with checksums
        kept are zeroed now and wait for the next sync), and clear the write-intent
        marks of slots idle since before it.

        Raises :class:`DeviceFailed` when one of them is failed, now (its fdatasync
        failed: the others are still synced) or before (nothing is synced then): a
        failed device is never reported synced again."""
        loop = asyncio.get_running_loop()
        devs = list(self.devices if devices is None else devices)
        for dev in devs:
            if dev.failed:
                raise DeviceFailed(dev)
        batches = [(dev, dev.pending) for dev in devs]
        started = time.monotonic()
        syncs = []
        for dev in devs:
            dev.pending = []
            # Clean from here on: a write from now on marks it again (the fdatasync
            # below starts after every write before this point).
            dev.dirty = False
            fut: asyncio.Future[None]
            if dev.ext_pending:  # and then the entries of version slots, synced too
                fut = loop.create_task(self._sync_with_entries(dev, self._take_ext_pending(dev)))
            else:
                fut = loop.run_in_executor(None, dio.fdatasync, dev.fd)
            dev.syncing = fut
            syncs.append(fut)
        try:
            results = await asyncio.gather(*syncs, return_exceptions=True)
        except BaseException:
            for dev, batch in batches:
                dev.pending.extend(batch)
                dev.dirty = True
            raise
        finally:
            for dev, fut in zip(devs, syncs, strict=True):
                if dev.syncing is fut:
                    dev.syncing = None
        error: BaseException | None = None
        for (dev, batch), result in zip(batches, results, strict=True):
            if result is None:
                dev.syncs += 1
                try:
                    self._synced(dev, batch, started)
                    continue
                except OSError as exc:
                    result = exc
            dev.pending.extend(batch)
            dev.dirty = True
            if isinstance(result, OSError):
                result = self._io_error(dev, "fdatasync", result)
            error = error or result
        if error is not None:
            raise error

    async def sync_dirty(self, devices: Iterable[Device]) -> None:
        """What a FLUSH needs of ``devices``: every write made to them so far durable.
        Syncs (:meth:`sync`) only those written since the start of their last sync,
        or with freed slots waiting for one; of the others, waits for the sync in
        progress, if any (it started after their last write); the rest, clean, are
        left alone. Raises :class:`DeviceFailed` as :meth:`sync` does."""
        devs = list(devices)
        for dev in devs:
            if dev.failed:
                raise DeviceFailed(dev)
        dirty = [dev for dev in devs if dev.dirty or dev.pending]
        waits = [
            self._sync_of(dev, dev.syncing)
            for dev in devs
            if dev.syncing is not None and not (dev.dirty or dev.pending)
        ]
        if not waits:
            if dirty:
                await self.sync(dirty)
            return
        results = await asyncio.gather(
            *([self.sync(dirty)] if dirty else []), *waits, return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _sync_of(self, dev: Device, fut: asyncio.Future[None]) -> None:
        """Wait for the fdatasync of ``dev`` started by another :meth:`sync`; that
        caller fails the device if it failed. When that caller was cancelled (its
        wait for the fdatasync with it; the device is dirty again), ``dev`` is synced
        afresh."""
        try:
            await asyncio.shield(fut)
        except OSError:
            raise DeviceFailed(dev) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not fut.cancelled() or (task is not None and task.cancelling()):
                raise  # we are cancelled ourselves
            await self.sync([dev])
        if dev.failed:
            raise DeviceFailed(dev)

    def _synced(self, dev: Device, batch: list[int], started: float) -> None:
        """After a sync of ``dev`` that started at ``started``: ``batch`` (pending then)
        is durably unreferenced."""
        unpunched = [slot for slot in batch if slot in dev.unpunched]
        if unpunched:
            dev.unpunched.difference_update(unpunched)
            self._punch(dev, sorted(unpunched))
            dev.pending.extend(unpunched)  # durably zero after the next sync
            zeroed = set(unpunched)
            batch = [slot for slot in batch if slot not in zeroed]
        dev.free.extend(batch)
        cleared = None if dev.intent is None else dev.intent.idle(started, dev.unverified)
        if cleared is not None:
            dio.pwrite(dev.fd, cleared[1], cleared[0])

    async def reclaim(self, dev: Device) -> None:
        """Wait until a write that :meth:`needs_reclaim` held back can go: the pending
        slots of ``dev`` free again (one sync at a time; two for slots freed with
        checksums kept), and the write-intent marks asked for durable."""
        while dev.reclaiming is not None or (not dev.free and dev.pending):
            if dev.reclaiming is None:
                self._schedule_reclaim(dev)
            assert dev.reclaiming is not None
            await asyncio.shield(dev.reclaiming)
            if dev.free:
                break
        await self._marks_durable()

    def _schedule_reclaim(self, dev: Device) -> None:
        loop = asyncio.get_running_loop()

        async def run() -> None:
            try:
                await self.sync([dev])
                if any(slot not in dev.unpunched for slot in dev.pending):
                    await self.sync([dev])  # the slots it zeroed: durable, free
            finally:
                dev.reclaiming = None

        task = loop.create_task(run(), name=f"reclaim-{dev.path}")
        dev.reclaiming = task
        task.add_done_callback(_log_failure)


def _chunks_by_tree(keys: Iterable[int], trees: frozenset[int]) -> dict[int, list[int]]:
    """The chunks of each of ``trees`` that ``keys`` (chunk keys) name, ascending."""
    found: dict[int, set[int]] = {}
    for key in keys:
        tree = key >> 32
        if tree in trees:
            found.setdefault(tree, set()).add(key & 0xFFFFFFFF)
    return {t: sorted(c) for t, c in found.items()}


def _runs(slots: list[int]) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive slots in ``slots`` (ascending)."""
    i = 0
    while i < len(slots):
        j = i
        while j + 1 < len(slots) and slots[j + 1] == slots[j] + 1:
            j += 1
        yield slots[i], j - i + 1
        i = j + 1


def _slot_rows(dev: Device, slots: list[int], stop: threading.Event) -> list[tuple[int, bytes]]:
    """The checksum rows of ``slots`` computed from their data (in a thread); stops
    early when ``stop`` is set."""
    data = bytearray(CHUNK_SIZE)
    rows = []
    for slot in slots:
        if stop.is_set():
            break
        data[:] = _ZEROES
        dio.preadv(dev.fd, [data], dev.slot_offset(slot))
        old = dio.pread(dev.fd, ROW_SIZE, dev.row_offset(slot))
        rows.append((slot, keep_marked_bad(slot_crcs(data), old)))
    return rows


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sync of freed slots or write of write-intent marks failed: %s", task.exception())
