"""The chunk store's whole-chunk read buffers (ChunkStore._read_buffer): a 1 MiB read
reuses a buffer of an earlier read once nothing refers to it any more, and never one
that a view still refers to (a reply being sent, a copy in flight): what a caller
holds is never overwritten by a later read. With and without block checksums."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshblock.chunks import CHUNK_SIZE
from meshblock.sds.store import READ_BUFFERS, ChunkStore, DeviceSpec

pytestmark = pytest.mark.unit

MiB = 1024 * 1024
VOL = 9


@pytest.fixture(params=[False, True], ids=["checksums-off", "checksums-on"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ChunkStore:
    s = ChunkStore(
        [DeviceSpec(str(tmp_path / "dev.img"), 64 * MiB, "pool")], checksums=request.param
    )
    s.open()
    request.addfinalizer(s.close)
    return s


def fill(store: ChunkStore, chunks: int) -> list[bytes]:
    dev = store.devices[0]
    data = [os.urandom(CHUNK_SIZE) for _ in range(chunks)]
    for chunk, payload in enumerate(data):
        store.write(dev, VOL, chunk, 0, memoryview(payload))
    return data


def whole(store: ChunkStore, chunk: int) -> memoryview:
    view = store.read(VOL, chunk, 0, CHUNK_SIZE)
    assert view is not None
    return view


def test_a_buffer_nothing_refers_to_is_reused(store: ChunkStore) -> None:
    data = fill(store, 2)
    first = whole(store, 0)
    assert first == data[0]
    del first
    for _ in range(3):
        second = whole(store, 1)
        assert second == data[1]
        del second
    # Every read took the one buffer of the first: no new 1 MiB buffer.
    assert len(store._read_buffers) == 1


def test_a_held_view_is_never_overwritten(store: ChunkStore) -> None:
    data = fill(store, READ_BUFFERS + 4)
    held = [whole(store, c) for c in range(len(data))]
    assert len({id(v.obj) for v in held}) == len(held)  # each its own buffer
    tail = held[0][CHUNK_SIZE - 4096 :]  # a slice keeps the buffer too
    del held[0]
    again = [whole(store, c) for c in range(1, len(data))]
    assert tail == data[0][CHUNK_SIZE - 4096 :]
    for chunk, view in enumerate(held, start=1):
        assert view == data[chunk]
    for chunk, view in enumerate(again, start=1):
        assert view == data[chunk]
    del held, again
    reread = whole(store, 0)  # a kept buffer, but not the one the slice holds
    assert reread.obj is not tail.obj
    assert reread == data[0] and tail == data[0][CHUNK_SIZE - 4096 :]


def test_a_partial_read_gets_a_buffer_of_its_own(store: ChunkStore) -> None:
    data = fill(store, 1)
    part = store.read(VOL, 0, 4096, 8192)
    assert part is not None and part == data[0][4096 : 4096 + 8192]
    assert isinstance(part.obj, bytearray) and len(part.obj) < CHUNK_SIZE
    assert not store._read_buffers
