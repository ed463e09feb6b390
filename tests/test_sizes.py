"""meshblock.sizes: sizes in bytes from and to operator units."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshblock.sizes import GiB, KiB, MiB, PiB, SizeError, TiB, format_size, parse_size

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("512", 512),
        ("512B", 512),
        ("4KiB", 4 * KiB),
        ("4K", 4 * KiB),
        ("4KB", 4000),
        ("64MiB", 64 * MiB),
        ("64MB", 64_000_000),
        ("16GiB", 16 * GiB),
        ("16G", 16 * GiB),
        ("500GB", 500_000_000_000),
        ("2TiB", 2 * TiB),
        ("2TB", 2_000_000_000_000),
        ("1PiB", PiB),
        ("1PB", 10**15),
        ("1.5GiB", GiB + GiB // 2),
        ("0.5MiB", MiB // 2),
        ("1.25TB", 1_250_000_000_000),
        ("16gib", 16 * GiB),
        ("16 GiB", 16 * GiB),
        ("  16GiB\n", 16 * GiB),
    ],
)
def test_parse_size_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_int_passes_through() -> None:
    assert parse_size(0) == 0
    assert parse_size(16 * GiB) == 16 * GiB


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "GiB",
        "abc",
        "16 G i B",
        "1,5GiB",
        "1.GiB",
        ".5GiB",
        "-1GiB",
        "0x10",
        "1e9",
        "16XiB",
    ],
)
def test_parse_size_rejects_malformed_strings(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_parse_size_names_the_unknown_unit() -> None:
    with pytest.raises(SizeError, match="XiB"):
        parse_size("16XiB")


@pytest.mark.parametrize("value", [-1, -GiB])
def test_parse_size_rejects_negative_ints(value: int) -> None:
    with pytest.raises(SizeError, match="negative"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, False, 1.5, None, b"16GiB", [16]])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(SizeError):
        parse_size(value)  # type: ignore[arg-type]


def test_size_error_is_a_value_error() -> None:
    assert issubclass(SizeError, ValueError)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (64 * MiB, "64 MiB"),
        (16 * GiB, "16 GiB"),
        (GiB + GiB // 2, "1.5 GiB"),
        (3 * TiB, "3 TiB"),
        (2 * PiB, "2 PiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@given(st.integers(min_value=1, max_value=1023), st.sampled_from([1, KiB, MiB, GiB, TiB]))
def test_format_then_parse_is_exact_for_whole_units(k: int, unit: int) -> None:
    assert parse_size(format_size(k * unit)) == k * unit


@given(st.integers(min_value=0, max_value=1024 * PiB))
def test_format_then_parse_is_close(n: int) -> None:
    back = parse_size(format_size(n))
    # One decimal of the largest unit: within 5% (and exact below 1 KiB).
    assert abs(back - n) <= n * 0.05
