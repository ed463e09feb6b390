"""Chunk and PG arithmetic shared by the data path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshblock.chunks import CHUNK_SIZE, chunk_span, pg_of, pgs_of_volume

pytestmark = pytest.mark.unit


@given(st.integers(1, 2**31 - 1), st.integers(0, 2**30), st.integers(2, 16384))
def test_consecutive_chunks_land_on_different_pgs(volume: int, chunk: int, pgs: int) -> None:
    assert pg_of(volume, chunk, pgs) != pg_of(volume, chunk + 1, pgs)
    assert 0 <= pg_of(volume, chunk, pgs) < pgs


def test_volumes_start_on_spread_pgs() -> None:
    firsts = {pg_of(v, 0, 256) for v in range(1, 257)}
    assert len(firsts) > 128  # 256 volumes do not pile their first chunk on a few PGs


@given(st.integers(0, 2**40), st.integers(0, 8 * CHUNK_SIZE))
def test_chunk_span_covers_the_range(offset: int, length: int) -> None:
    parts = chunk_span(offset, length)
    assert sum(n for _, _, n in parts) == length
    pos = offset
    for index, start, n in parts:
        assert index * CHUNK_SIZE + start == pos
        assert 0 < n <= CHUNK_SIZE - start
        pos += n


@given(st.integers(1, 2**31 - 1), st.integers(1, 64 * CHUNK_SIZE), st.integers(1, 512))
def test_pgs_of_volume_are_the_pgs_of_its_chunks(volume: int, size: int, pgs: int) -> None:
    first, count = pgs_of_volume(volume, size, pgs)
    chunks = -(-size // CHUNK_SIZE)
    expected = {pg_of(volume, i, pgs) for i in range(chunks)}
    assert {(first + k) % pgs for k in range(count)} == expected
