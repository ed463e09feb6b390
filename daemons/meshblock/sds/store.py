"""The SDS chunk store: 1 MiB chunks in slots on local devices, with a crash-safe index.

A device is a regular file (created sparse when absent) or a raw block device.
Layout (see ``docs/sds.md`` for the reasoning)::

    0        4 KiB                              data_offset (1 MiB aligned)
    +--------+--------------------------------+----------+----------+-----
    | super  | index: one 32-byte entry/slot  | slot 0   | slot 1   | ...
    | block  | (volume, chunk, generation)    | (1 MiB)  | (1 MiB)  |
    +--------+--------------------------------+----------+----------+-----

Crash safety rests on one rule: **a slot is handed to a chunk only when it is
durably zero and durably unreferenced.** Freed slots are zeroed (hole punched) at
once but wait in ``pending`` until an fdatasync that began after the zeroing has
completed; only then do they return to ``free``. So after a crash an index entry may
point at a slot holding its own chunk's (old or new) bytes or zeroes, but never
another chunk's. Entries carry a CRC (a torn entry reads as empty) and a store-wide
generation (when a crash leaves two slots claiming one chunk, the newer wins). After
an unclean stop every unreferenced slot is zeroed before use; a clean stop records
that they already are.

All IO here is synchronous ``pread``/``pwrite`` on the page cache (through
:mod:`meshblock.sds.device_io`, where tests can inject faults), called from
the event loop (measured faster than a thread hand-off for 4 KiB and 1 MiB, see
``docs/sds.md``); only fdatasync goes to a thread (:meth:`ChunkStore.sync`).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import secrets
import stat
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.sds import device_io as dio

log = logging.getLogger(__name__)

SUPER_MAGIC: Final = b"MBSDSDV1"
FORMAT_VERSION: Final = 1
SUPER_SIZE: Final = 4096
INDEX_OFFSET: Final = SUPER_SIZE

SUPERBLOCK = struct.Struct(">8sIIQQQQ16sI")
"""Superblock at offset 0 (the rest of the first 4 KiB is zero)::

    magic "MBSDSDV1" (8) | version u32 | flags u32 (CLEAN=1) | capacity u64 |
    slot_count u64 | index_offset u64 | data_offset u64 | device uuid (16) |
    crc32 u32 of everything before it
"""

ENTRY = struct.Struct(">QQQII")
"""Index entry of one slot, 32 bytes, at ``index_offset + slot * 32``::

    volume id u64 | chunk index u64 | generation u64 | flags u32 (USED=1) |
    crc32 u32 of the 28 bytes before it

All-zero (or a bad CRC) means: the slot is unreferenced.
"""

FLAG_CLEAN: Final = 1
ENTRY_USED: Final = 1
_EMPTY_ENTRY: Final = bytes(ENTRY.size)
_ZEROES: Final = bytes(CHUNK_SIZE)
_ZERO_VIEW: Final = memoryview(_ZEROES)
#: Freed slots waiting for a sync before they are handed out again; more triggers one.
RECLAIM_BATCH: Final = 64
#: Larger writes go to the page cache in pieces of this size. One ``pwrite`` of 1 MiB
#: makes the kernel cache that range in 1 MiB folios, and every later 4 KiB overwrite
#: in it then walks the whole folio: measured here 15-26 us per 4 KiB overwrite after
#: 1 MiB writes, 5 us after 64 KiB ones, for 16 system calls per MiB (docs/performance.md).
WRITE_PIECE: Final = 64 * 1024

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


class StoreError(Exception):
    """A device cannot be opened or used (wrong size, not formatted by us, ...)."""


class NoSpace(Exception):
    """The device has no free slot for a new chunk."""


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


def layout(capacity: int) -> tuple[int, int]:
    """``(slot_count, data_offset)`` for a device of ``capacity`` bytes."""
    n = max(0, (capacity - INDEX_OFFSET) // (CHUNK_SIZE + ENTRY.size))
    while n > 0:
        index_end = INDEX_OFFSET + n * ENTRY.size
        data_offset = (index_end + CHUNK_SIZE - 1) // CHUNK_SIZE * CHUNK_SIZE
        if data_offset + n * CHUNK_SIZE <= capacity:
            return n, data_offset
        n -= 1
    raise StoreError(f"a device of {capacity} bytes is too small for one chunk")


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` in pieces of at most :data:`WRITE_PIECE` bytes."""
    n = len(data)
    if n <= WRITE_PIECE:
        dio.pwrite(fd, data, offset)
        return
    view = memoryview(data)
    for pos in range(0, n, WRITE_PIECE):
        dio.pwrite(fd, view[pos : pos + WRITE_PIECE], offset + pos)


def _entry(volume: int, chunk: int, generation: int) -> bytes:
    body = struct.pack(">QQQI", volume, chunk, generation, ENTRY_USED)
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
        self.free: list[int] = []  # durably zero and unreferenced; pop() from the end
        self.pending: list[int] = []  # zeroed and unreferenced, not yet synced
        self.used = 0
        self.mdm_id: int | None = None  # the MDM's device id, once registered
        self.pool_id: int | None = None
        self.reclaiming: asyncio.Future[None] | None = None

    @property
    def used_bytes(self) -> int:
        return self.used * CHUNK_SIZE

    def slot_offset(self, slot: int) -> int:
        return self.data_offset + slot * CHUNK_SIZE

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
        self.uuid = secrets.token_bytes(16)
        # The index region must read as zeroes (a reused block device may hold junk).
        index_end = INDEX_OFFSET + self.slot_count * ENTRY.size
        self._zero(INDEX_OFFSET, index_end - INDEX_OFFSET)
        self.write_super(clean=True)
        dio.fsync(self.fd)
        log.info(
            "formatted %s: %d slots of 1 MiB, data at %d",
            self.path,
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
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: format version {version} is not supported")
        if capacity != self.capacity:
            raise StoreError(
                f"{self.path}: formatted for {capacity} bytes, configured for {self.capacity}"
            )
        if (slots, data_off) != layout(capacity) or index_off != INDEX_OFFSET or size < capacity:
            raise StoreError(f"{self.path}: inconsistent geometry in the superblock")
        self.slot_count, self.data_offset, self.uuid = slots, data_off, uuid
        return bool(flags & FLAG_CLEAN)

    def write_super(self, *, clean: bool) -> None:
        body = SUPERBLOCK.pack(
            SUPER_MAGIC,
            FORMAT_VERSION,
            FLAG_CLEAN if clean else 0,
            self.capacity,
            self.slot_count,
            INDEX_OFFSET,
            self.data_offset,
            self.uuid,
            0,
        )[:-4]
        dio.pwrite(self.fd, body + struct.pack(">I", zlib.crc32(body)), 0)

    def read_index(self) -> Iterable[tuple[int, int, int, int]]:
        """Yield ``(slot, volume, chunk, generation)`` of every valid entry."""
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
                yield slot + i, vol, chunk, gen
            slot += n
        # Drop the index region from the page cache: small entry writes into large
        # cached folios are slow (docs/sds.md).
        os.posix_fadvise(
            self.fd, INDEX_OFFSET, self.slot_count * ENTRY.size, os.POSIX_FADV_DONTNEED
        )

    # -- IO ---------------------------------------------------------------------------

    def write_entry(self, slot: int, entry: bytes) -> None:
        dio.pwrite(self.fd, entry, INDEX_OFFSET + slot * ENTRY.size)

    def _zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes (punch a hole if we can)."""
        if length <= 0:
            return
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ChunkStore:
    """Every device of one SDS, and the in-memory index chunk → (device, slot)."""

    def __init__(self, specs: Iterable[DeviceSpec]) -> None:
        self.devices = [Device(s) for s in specs]
        self._index: dict[int, tuple[Device, int]] = {}
        self._volume_chunks: dict[int, int] = {}
        self._generation = 0
        self._gens: dict[int, int] = {}  # generation of each chunk's entry, while loading
        # Per pool whose PG count we were told (index_pgs): the chunk keys of each PG,
        # kept as chunks are allocated and freed, so listing a PG does not scan the pool.
        self._pg_counts: dict[int, int] = {}
        self._by_pg: dict[tuple[int, int], set[int]] = {}

    # -- life cycle -------------------------------------------------------------------

    def open(self) -> None:
        """Open every device, load the index and recover from an unclean stop."""
        try:
            for dev in self.devices:
                clean = dev.open()
                self._load(dev, clean)
        except BaseException:
            self._gens.clear()
            for dev in self.devices:
                dev.close()
            raise
        self._gens.clear()

    def _load(self, dev: Device, clean: bool) -> None:
        owners: set[int] = set()  # slots of this device that hold a chunk
        dropped: list[int] = []  # slots whose entry lost to a newer one
        for slot, vol, chunk, gen in dev.read_index():
            key = chunk_key(vol, chunk)
            self._generation = max(self._generation, gen)
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
                    odev.zero_slot_range(oslot, 0, CHUNK_SIZE)
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
        dirty = free if not clean else sorted(dropped)
        runs = 0
        i = 0
        while i < len(dirty):
            j = i
            while j + 1 < len(dirty) and dirty[j + 1] == dirty[j] + 1:
                j += 1
            dev.zero_slot_range(dirty[i], 0, (j - i + 1) * CHUNK_SIZE)
            runs += 1
            i = j + 1
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

    def close(self) -> None:
        """Sync everything and mark the devices cleanly stopped."""
        for dev in self.devices:
            if dev.fd < 0:
                continue
            try:
                dio.fdatasync(dev.fd)
                dev.free.extend(dev.pending)
                dev.pending.clear()
                dev.write_super(clean=True)
                dio.fsync(dev.fd)
            finally:
                dev.close()

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
        """``length`` bytes at ``offset`` of the chunk, or None if it has no slot."""
        loc = self._index.get(chunk_key(volume, chunk))
        if loc is None:
            return None
        dev, slot = loc
        buf = bytearray(length)
        n = dio.preadv(dev.fd, [buf], dev.slot_offset(slot) + offset)
        del n  # a short read is past the end of a sparse file: already zeroes
        return memoryview(buf)

    def needs_reclaim(self, dev: Device, volume: int, chunk: int) -> bool:
        """True when writing this chunk needs a slot that only a sync can free."""
        return not dev.free and bool(dev.pending) and chunk_key(volume, chunk) not in self._index

    def write(
        self, dev: Device, volume: int, chunk: int, offset: int, data: bytes | memoryview
    ) -> None:
        """Write ``data`` at ``offset`` of the chunk; allocate a slot on ``dev`` if new.

        Raises :class:`NoSpace` when ``dev`` has no free slot (check
        :meth:`needs_reclaim` first) and ``OSError`` on IO errors.
        """
        key = chunk_key(volume, chunk)
        loc = self._index.get(key)
        if loc is not None:
            ldev, slot = loc
            _pwrite(ldev.fd, data, ldev.slot_offset(slot) + offset)
            return
        if not dev.free:
            raise NoSpace(dev.path)
        slot = dev.free.pop()
        try:
            # Data first, then the entry: the slot is durably zero, so a crash in
            # between leaves either nothing or this chunk's own bytes.
            _pwrite(dev.fd, data, dev.slot_offset(slot) + offset)
            self._generation += 1
            dev.write_entry(slot, _entry(volume, chunk, self._generation))
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
        """WRITE_ZEROES / TRIM: the range reads as zeroes; a whole chunk frees its slot."""
        key = chunk_key(volume, chunk)
        loc = self._index.get(key)
        if loc is None:
            return  # already reads as zeroes
        dev, slot = loc
        if offset == 0 and length == CHUNK_SIZE:
            # Entry first, then the zeroing; the slot is reused only after a sync.
            dev.write_entry(slot, _EMPTY_ENTRY)
            del self._index[key]
            in_pg = self._indexed(dev, key)
            if in_pg is not None:
                in_pg.discard(key)
            dev.used -= 1
            self._volume_chunks[volume] -= 1
            dev.zero_slot_range(slot, 0, CHUNK_SIZE)
            dev.pending.append(slot)
            if len(dev.pending) >= RECLAIM_BATCH and dev.reclaiming is None:
                self._schedule_reclaim(dev)
            return
        dev.zero_slot_range(slot, offset, length)

    # -- durability -------------------------------------------------------------------

    async def sync(self, devices: Iterable[Device] | None = None) -> None:
        """fdatasync ``devices`` (default: all) in threads; then return the slots that
        were pending before the sync to the free lists."""
        loop = asyncio.get_running_loop()
        devs = list(self.devices if devices is None else devices)
        batches = [(dev, dev.pending) for dev in devs]
        for dev in devs:
            dev.pending = []
        try:
            await asyncio.gather(
                *(loop.run_in_executor(None, dio.fdatasync, dev.fd) for dev in devs)
            )
        except BaseException:
            for dev, batch in batches:
                dev.pending.extend(batch)
            raise
        for dev, batch in batches:
            dev.free.extend(batch)

    async def reclaim(self, dev: Device) -> None:
        """Wait until the pending slots of ``dev`` are free again (one sync at a time)."""
        if dev.reclaiming is None:
            self._schedule_reclaim(dev)
        assert dev.reclaiming is not None
        await asyncio.shield(dev.reclaiming)

    def _schedule_reclaim(self, dev: Device) -> None:
        loop = asyncio.get_running_loop()

        async def run() -> None:
            try:
                await self.sync([dev])
            finally:
                dev.reclaiming = None

        task = loop.create_task(run(), name=f"reclaim-{dev.path}")
        dev.reclaiming = task
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("sync of freed slots failed: %s", task.exception())
