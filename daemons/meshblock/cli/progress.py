"""A one-line progress bar for long operations (drains, rebuilds), on standard error.

Drawn in place (carriage return) on a terminal; elsewhere (a pipe, a log file, CI) one
plain line every ``PLAIN_EVERY_S`` seconds, so that logs stay readable. Never on
standard output: ``--json`` documents stay clean.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

WIDTH = 30
PLAIN_EVERY_S = 10.0


def eta_text(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "ETA --"
    s = round(seconds)
    if s >= 3600:
        return f"ETA {s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s}s"


def seconds_text(seconds: float) -> str:
    """A wait for a person: ``12 s``, ``4 min 05 s``, ``1 h 02 min`` (rounded up, so
    that a wait about to end says ``1 s``, not ``0 s``)."""
    s = max(0, math.ceil(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class ProgressBar:
    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._last_plain = 0.0
        self._drawn = False

    def update(self, fraction: float, detail: str = "") -> None:
        fraction = min(1.0, max(0.0, fraction))
        filled = round(fraction * WIDTH)
        bar = "#" * filled + "." * (WIDTH - filled)
        line = f"{self.label} [{bar}] {fraction * 100:5.1f}% {detail}".rstrip()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            self._drawn = True
        else:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_EVERY_S or fraction >= 1.0:
                self._last_plain = now
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
