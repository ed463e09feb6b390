"""Versions of a chunk on disk: the slot-extension entries of snapshot trees.

A slot of the store holds version 0 of its chunk, every block of it (what every
chunk written before snapshots is), unless its index entry carries
:data:`ENTRY_EXT`: then its entry in the slot-extension region (region 4) says which
version of the tree's chunk the slot belongs to and which 4 KiB blocks it holds
(docs/snapshots.md, Decision 3; docs/sds.md, "On-disk layout").

Extension entry, 128 bytes at ``region offset + 128 * slot``::

    version u64 | generation u64 (equal to the index entry's) |
    holds bitmap (32 bytes: bit b & 7 of byte b >> 3 = block b held) |
    flags u32 (VALID=1) | 72 bytes reserved, zero |
    crc32 u32 of the 124 bytes before it

A device gets incompat feature bit 4 (:data:`INCOMPAT_SLOT_EXT`, superblock written
and synced) before its first extension entry. The **holds-bit sync rule**: a holds
bit never reaches the disk before the data it covers; the store writes the entries
of a version slot only after a data sync that began after the writes they cover
(:meth:`meshblock.sds.store.ChunkStore.sync`), then syncs them. A version slot in
memory is :class:`meshblock.sds.store.VersionSlot`.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Mapping
from typing import Final, TypeVar

from meshblock.sds.checksums import BLOCK_SHIFT, BLOCKS

#: Incompat feature bit of the superblock: extension entries are in use.
INCOMPAT_SLOT_EXT: Final = 4
#: Index entry flag: the slot's extension entry says its version and blocks.
ENTRY_EXT: Final = 2
EXT_ENTRY = struct.Struct(">QQ32sI72sI")
"""One extension entry (128 bytes, see the module's docstring)."""
EXT_VALID: Final = 1
#: Every block of a chunk.
ALL_BLOCKS: Final = (1 << BLOCKS) - 1
_RESERVED: Final = bytes(72)
_T = TypeVar("_T")


def pack_ext(version: int, generation: int, holds: int) -> bytes:
    """The extension entry of a slot of ``version`` holding the blocks of ``holds``."""
    body = EXT_ENTRY.pack(
        version, generation, holds.to_bytes(32, "little"), EXT_VALID, _RESERVED, 0
    )[:-4]
    return body + struct.pack(">I", zlib.crc32(body))


def unpack_ext(raw: bytes) -> tuple[int, int, int] | None:
    """``(version, generation, holds)`` of a valid entry; None when torn or not valid."""
    if len(raw) < EXT_ENTRY.size:
        return None
    version, generation, holds, flags, _, crc = EXT_ENTRY.unpack_from(raw)
    if not flags & EXT_VALID or zlib.crc32(raw[: EXT_ENTRY.size - 4]) != crc:
        return None
    return version, generation, int.from_bytes(holds, "little")


def block_masks(offset: int, length: int) -> tuple[int, int]:
    """``(touched, whole)``: bitmaps of the blocks that ``length`` bytes at ``offset``
    of a chunk touch, and of those they cover whole."""
    if length <= 0:
        return 0, 0
    first, last = offset >> BLOCK_SHIFT, (offset + length - 1) >> BLOCK_SHIFT
    touched = ((1 << (last - first + 1)) - 1) << first
    lo, hi = (offset + (1 << BLOCK_SHIFT) - 1) >> BLOCK_SHIFT, (offset + length) >> BLOCK_SHIFT
    whole = ((1 << (hi - lo)) - 1) << lo if hi > lo else 0
    return touched, whole


class VersionTree:
    """The versions of one tree with their parents (the MDM's, carried by the maps
    from Step 3 on), numbered by a depth-first walk: *u* is an ancestor of *v* (or
    *v* itself) when *u*'s interval contains *v*'s, an O(1) test whatever the depth
    (docs/snapshots.md, Decision 3). Immutable; a tree that gains or loses a version
    is a new object (another :attr:`serial`), which drops the block maps computed
    with the old one."""

    _serials = itertools.count(1)

    def __init__(self, parents: Mapping[int, int | None]) -> None:
        """``parents``: every version -> its parent (None for a root, version 0)."""
        children: dict[int | None, list[int]] = {}
        for version, parent in parents.items():
            if parent is not None and parent not in parents:
                raise ValueError(f"version {version}: parent {parent} is not a version")
            children.setdefault(parent, []).append(version)
        self.enter: dict[int, int] = {}
        self.exit: dict[int, int] = {}
        count = 0
        stack: list[tuple[int, bool]] = [(v, False) for v in sorted(children.get(None, ()))]
        while stack:
            version, done = stack.pop()
            count += 1
            if done:
                self.exit[version] = count
                continue
            self.enter[version] = count
            stack.append((version, True))
            stack.extend((c, False) for c in sorted(children.get(version, ()), reverse=True))
        if len(self.enter) != len(parents):
            raise ValueError("the versions' parents form a cycle")
        self.serial = next(self._serials)
        self.parents = dict(parents)
        self.children: dict[int, list[int]] = {
            v: sorted(c) for v, c in children.items() if v is not None
        }

    def __contains__(self, version: object) -> bool:
        return version in self.enter

    def is_ancestor(self, u: int, v: int) -> bool:
        """Whether ``u`` is ``v`` or an ancestor of it."""
        enter = self.enter
        return enter[u] <= enter[v] and self.exit[v] <= self.exit[u]


#: One run of a block map: ``(first block, count, slot holding them or None: zeroes)``.
Run = tuple[int, int, _T | None]


def block_map(tree: VersionTree, view: int, held: Mapping[int, tuple[_T, int]]) -> list[Run[_T]]:
    """The block map of ``view`` over one chunk, as runs of consecutive blocks held by
    the same slot: ``held`` is every version of the chunk with a slot -> (the slot,
    its holds bitmap). Each block comes from the nearest slot whose version is the
    view or an ancestor of it (nearest first: the larger depth-first entry number);
    a block none holds reads zeroes."""
    mine = sorted(
        (v for v in held if v in tree and tree.is_ancestor(v, view)),
        key=tree.enter.__getitem__,
        reverse=True,
    )
    owner: list[_T | None] = [None] * BLOCKS
    left = ALL_BLOCKS
    for version in mine:
        where, holds = held[version]
        take = holds & left
        left &= ~take
        while take:
            low = take & -take
            owner[low.bit_length() - 1] = where
            take ^= low
        if not left:
            break
    runs: list[Run[_T]] = []
    first = 0
    for block in range(1, BLOCKS + 1):
        if block == BLOCKS or owner[block] is not owner[first]:
            runs.append((first, block - first, owner[first]))
            first = block
    return runs
