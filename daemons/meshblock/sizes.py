"""Sizes in bytes, parsed from and formatted to operator units (``16GiB``, ``1.5TB``)."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
    "p": PiB, "pb": 1000**5, "pib": PiB,
}  # fmt: skip

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


# Every unit parse_size accepts, for the messages that tell an operator what to type.
UNITS_HELP = (
    "KiB MiB GiB TiB PiB (or K M G T P), KB MB GB TB PB (powers of 1000), "
    "or B for bytes (e.g. 16GiB, 500GB, 4096B)"
)


class SizeError(ValueError):
    """A size could not be understood."""


def parse_size(value: str | int, *, unit_required: bool = False) -> int:
    """Return the number of bytes in ``value``: an int, or a string like ``16GiB``.

    Binary units (KiB, MiB, GiB, TiB, PiB and the bare letters K, M, G, T, P) are
    powers of 1024; decimal units (KB, MB, GB, TB, PB) are powers of 1000.

    A string without a unit is bytes (config files, the REST API), unless
    ``unit_required``: then it is refused, as meshctl's size options do, because an
    operator who types ``--size 10`` may mean GiB as much as bytes.
    """
    if isinstance(value, bool):
        raise SizeError("a size must be a number of bytes or a string such as '16GiB'")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"a size cannot be negative: {value}")
        return value
    if not isinstance(value, str):
        raise SizeError("a size must be a number of bytes or a string such as '16GiB'")
    m = _SIZE_RE.match(value)
    if not m:
        raise SizeError(f"not a size: {value!r} (examples: 1073741824, 16GiB, 500GB)")
    number, unit = m.groups()
    if unit_required and not unit:
        raise SizeError(f"a size needs a unit: {value.strip()!r}; use {UNITS_HELP}")
    factor: int | None = _UNITS.get(unit.lower())
    if factor is None:
        raise SizeError(f"unknown size unit {unit!r} in {value!r} (use {UNITS_HELP})")
    whole, _, frac = number.partition(".")
    scaled = int(whole) * factor
    if frac:
        if factor == 1:
            raise SizeError(f"{value!r} is not a whole number of bytes")
        # A fraction of a unit is rounded to the nearest byte: 1.1KiB is 1126 bytes.
        scaled += (int(frac) * factor * 2 + 10 ** len(frac)) // (2 * 10 ** len(frac))
    return scaled


def format_size(n: int | float) -> str:
    """Format ``n`` bytes with the largest binary unit that keeps it at 1 or more."""
    value = float(n)
    unit = "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            break
        value /= 1024
        unit = next_unit
    if unit == "B":
        return f"{int(value)} B"
    text = f"{value:.1f}"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    if text == "1024.0" and unit != units[-1]:  # rounding reached the next unit
        return f"1 {units[units.index(unit) + 1]}"
    return f"{text.removesuffix('.0')} {unit}"
