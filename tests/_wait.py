"""One way for tests to wait: :func:`wait_until` polls a predicate until it holds.

When it gives up it says what it waited for, how long, and the last value or error
the predicate produced, so a failure reads as a sentence, not as a bare timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold within the time given."""


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value,
    and return that value.

    Exceptions raised by the predicate count as "not yet" (a server still starting
    refuses connections); the last one is named if time runs out. ``detail`` is called
    once on timeout for extra context (logs, the state seen).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # any failure means "not yet"
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:g} s waiting for {what} (last: {last!r})"
            if detail is not None:
                msg += "\n" + detail()
            raise WaitTimeout(msg)
        time.sleep(interval)
