"""How a volume is cut into chunks and chunks into placement groups.

Shared by everything on the data path (SDS, SDC) and the MDM: a volume is a run of
1 MiB chunks; chunk ``i`` of a volume of tree ``t`` belongs to PG
``(h(t) + i) mod pg_count`` of the volume's pool, where ``h`` mixes the tree id
into a 64-bit value. Consecutive chunks of a volume therefore always land on
different PGs (when ``pg_count > 1``), and different trees start at different
PGs, so that their first chunks do not all crowd onto PG 0.

The tree (``vtree_id``, docs/snapshots.md) is what a volume shares with its
snapshots and clones, so that their shared chunks are on the same PGs. It is the id
of the tree's first volume: a volume that is not a snapshot or a clone is its own
tree, and its chunks are where they were when placement hashed the volume id (the
SDS and the SDC, which know only volume ids so far, pass the volume id: the same
number for every volume that exists).
"""

from __future__ import annotations

from typing import NamedTuple

CHUNK_SHIFT = 20
CHUNK_SIZE = 1 << CHUNK_SHIFT  # 1 MiB
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers with good avalanche."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def pg_of(vtree_id: int, chunk_index: int, pg_count: int) -> int:
    """The PG that holds chunk ``chunk_index`` of the volumes of tree ``vtree_id``."""
    return (_mix64(vtree_id) + chunk_index) % pg_count


def pgs_of_volume(vtree_id: int, size_bytes: int, pg_count: int) -> tuple[int, int]:
    """The PGs the chunks of a volume of tree ``vtree_id`` and size ``size_bytes``
    land on, as ``(first, count)``: PGs ``first, first + 1, ... first + count - 1``
    modulo ``pg_count``."""
    chunks = -(-size_bytes // CHUNK_SIZE)
    return _mix64(vtree_id) % pg_count, min(chunks, pg_count)


def chunk_span(offset: int, length: int) -> list[tuple[int, int, int]]:
    """Split a byte range of a volume into ``(chunk_index, offset_in_chunk, length)``."""
    out = []
    end = offset + length
    while offset < end:
        index = offset >> CHUNK_SHIFT
        start = offset & (CHUNK_SIZE - 1)
        n = min(CHUNK_SIZE - start, end - offset)
        out.append((index, start, n))
        offset += n
    return out


class ChunkRef(NamedTuple):
    """One chunk's address on the data path, from the SDC's router to the SDS's store:
    the chunk (``volume_id``, ``chunk_index``), its pool and PG, and the epoch of the
    pool's map it was routed by (an SDS refuses a request routed by a map older than
    its own: ``docs/protocol.md``)."""

    pool_id: int
    pg: int
    epoch: int
    volume_id: int
    chunk_index: int
