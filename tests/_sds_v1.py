"""The SDS on-disk format version 1, as meshblock wrote it before version 2: a small
writer (test fixtures of v1 devices, instead of binary blobs) and reader (is a device
still a valid v1 device, and which chunks does its index name).

Kept apart from the store on purpose: this is the old release's layout, frozen."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

MiB = 1024 * 1024
V1_MAGIC = b"MBSDSDV1"
V1_SUPER = struct.Struct(">8sIIQQQQ16sI")
V1_ENTRY = struct.Struct(">QQQII")
V1_INDEX = 4096


def v1_layout(capacity: int) -> tuple[int, int]:
    """``(slot_count, data_offset)`` as version 1 computed them."""
    n = (capacity - V1_INDEX) // (MiB + V1_ENTRY.size)
    while n > 0:
        data_offset = (V1_INDEX + n * V1_ENTRY.size + MiB - 1) // MiB * MiB
        if data_offset + n * MiB <= capacity:
            return n, data_offset
        n -= 1
    raise ValueError("too small")


def v1_chunk_bytes(volume: int, chunk: int) -> bytes:
    """What the fixtures store in a chunk: 8 KiB tagged with its (volume, chunk), at
    offset 64 KiB (the rest of the slot is a hole)."""
    return struct.pack(">QQ", volume, chunk).ljust(512, b"\x5a") * 16


CHUNK_DATA_OFFSET = 64 * 1024


def write_v1_device(
    path: Path,
    capacity: int,
    chunks: dict[tuple[int, int], int],
    *,
    clean: bool = True,
    with_data: bool = True,
) -> None:
    """A v1 device (sparse file) whose index maps each ``(volume, chunk)`` to the
    given slot, with :func:`v1_chunk_bytes` in it (or nothing: a hole)."""
    slots, data_offset = v1_layout(capacity)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, capacity)
        body = V1_SUPER.pack(
            V1_MAGIC, 1, 1 if clean else 0, capacity, slots, V1_INDEX, data_offset, b"u" * 16, 0
        )[:-4]
        os.pwrite(fd, body + struct.pack(">I", zlib.crc32(body)), 0)
        for gen, ((volume, chunk), slot) in enumerate(sorted(chunks.items()), start=1):
            assert slot < slots
            entry = struct.pack(">QQQI", volume, chunk, gen, 1)
            os.pwrite(fd, entry + struct.pack(">I", zlib.crc32(entry)), V1_INDEX + slot * 32)
            if with_data:
                data = v1_chunk_bytes(volume, chunk)
                os.pwrite(fd, data, data_offset + slot * MiB + CHUNK_DATA_OFFSET)
    finally:
        os.close(fd)


def read_v1_device(path: Path) -> dict[tuple[int, int], int]:
    """What the version 1 release would load: ``(volume, chunk)`` → slot (the newer
    generation wins a double claim). Raises ValueError where it would refuse."""
    with open(path, "rb") as f:
        head = f.read(4096)
        magic, version, _, capacity, slots, index, data_offset, _, crc = V1_SUPER.unpack_from(head)
        if magic != V1_MAGIC or zlib.crc32(head[: V1_SUPER.size - 4]) != crc:
            raise ValueError("not a v1 superblock")
        if version != 1:
            raise ValueError(f"format version {version} is not supported")
        if (slots, data_offset) != v1_layout(capacity) or index != V1_INDEX:
            raise ValueError("inconsistent geometry")
        f.seek(V1_INDEX)
        raw = f.read(slots * V1_ENTRY.size)
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for slot, (vol, chunk, gen, flags, crc) in enumerate(V1_ENTRY.iter_unpack(raw)):
        off = slot * V1_ENTRY.size
        if not flags & 1 or zlib.crc32(raw[off : off + 28]) != crc:
            continue
        if (vol, chunk) not in found or found[vol, chunk][0] < gen:
            found[vol, chunk] = (gen, slot)
    return {key: slot for key, (_, slot) in found.items()}
