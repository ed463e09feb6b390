"""Parsing what operators type: sizes, rates, limits, device specs.

These functions are argparse ``type=`` callables. A malformed value that is a
matter of the command line's shape raises ``argparse.ArgumentTypeError`` (exit 2);
a size or rate that cannot be understood raises :class:`InvalidInput`, which
argparse lets through, so that ``meshctl`` exits 7 as it does when the MDM refuses
a value.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meshblock.cli.errors import InvalidInput
from meshblock.sizes import MiB, SizeError, parse_size

UNLIMITED = ("none", "unlimited", "off")


def size(text: str) -> int:
    """``16GiB`` → 17179869184; bytes are written ``4096B``.

    A number without a unit is refused (exit 7) rather than read as bytes, as it
    once was: ``--size 10`` made a 10-byte request that the MDM silently rounded up
    to 1 GiB. Nor is it read as GiB, as PowerFlex's ``scli --size_gb`` would: the
    option is ``--size``, with no unit in its name, and a script that passed bytes
    would then ask for 2**30 times what it meant.
    """
    try:
        return parse_size(text, unit_required=True)
    except SizeError as exc:
        raise InvalidInput(str(exc)) from None


@dataclass(frozen=True)
class SizeChange:
    """A new size for ``volume extend``: absolute (``32GiB``) or added (``+8GiB``)."""

    bytes: int
    relative: bool

    def apply(self, current: int) -> int:
        return current + self.bytes if self.relative else self.bytes


def size_change(text: str) -> SizeChange:
    if text.startswith("+"):
        return SizeChange(size(text[1:]), relative=True)
    return SizeChange(size(text), relative=False)


def bandwidth_mibps(text: str) -> int:
    """A pool throttle in MiB/s: ``200`` (MiB/s), ``200MiB/s``, ``1GiB/s``; ``0`` or
    ``unlimited`` (``none``, ``off``) is no throttle, which the MDM stores as 0."""
    if text.strip().lower() in UNLIMITED:
        return 0
    value = text.strip().removesuffix("/s").removesuffix("ps")
    if value.isdigit():
        return int(value)
    nbytes = size(value)
    if nbytes % MiB:
        raise InvalidInput(f"bandwidth {text!r} is not a whole number of MiB/s")
    return nbytes // MiB


def bandwidth_limit(text: str) -> int | None:
    """A mapping's bandwidth limit in bytes/s: ``100MiB``, ``100MiB/s``; ``none`` clears."""
    if text.strip().lower() in UNLIMITED:
        return None
    return size(text.strip().removesuffix("/s"))


def iops_limit(text: str) -> int | None:
    """A mapping's IOPS limit: a positive integer; ``none`` clears."""
    if text.strip().lower() in UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"not an IOPS limit: {text!r} (a whole number, or 'none')") from None
    if value <= 0:
        raise InvalidInput(f"an IOPS limit must be positive, not {value} (use 'none' to clear)")
    return value


def number(text: str) -> int | float:
    """An int when it is whole (``10``), else a float (``12.5``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() else value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def positive_float(text: str) -> float:
    """Seconds and the like: a number above zero (``0.5``, ``30``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text}")
    return value


def confirm_seconds(text: str) -> float:
    """How long to wait for confirmations: 0 to 30 seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 30:
        raise argparse.ArgumentTypeError(f"must be between 0 and 30 seconds: {text}")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


@dataclass(frozen=True)
class DeviceSpec:
    """``--device PATH:CAPACITY:POOL``, e.g. ``/dev/sdb:1TiB:sp1``."""

    path: str
    capacity: int
    pool: str


def device_spec(text: str) -> DeviceSpec:
    parts = text.rsplit(":", 2)  # a path may itself contain ':'
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"expected PATH:CAPACITY:POOL (example: /dev/sdb:1TiB:sp1), got {text!r}"
        )
    path, capacity, pool = parts
    return DeviceSpec(path=path, capacity=size(capacity), pool=pool)
