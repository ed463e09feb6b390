"""One way for tests to wait: :func:`wait_until` polls a predicate until it holds.

When it gives up it says what it waited for, how long, and the last value or error
the predicate produced, so a failure reads as a sentence, not as a bare timeout.
:func:`wait_until_async` is the same inside an event loop (the loop's tasks run while
it sleeps). A predicate that knows waiting longer is pointless (the process it waits
for has exited) raises :class:`WaitAborted`, which ends the wait at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar, cast

T = TypeVar("T")

_NOT_YET = object()


class WaitTimeout(AssertionError):
    """The condition did not hold within the time given."""


class WaitAborted(AssertionError):
    """Raised by a predicate: the condition can no longer come true; stop waiting."""


class _Waiting(Generic[T]):
    """One wait: the deadline, the last value or error seen, the failure message."""

    def __init__(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        detail: Callable[[], str] | None,
    ) -> None:
        self.predicate = predicate
        self.timeout = timeout
        self.what = what
        self.detail = detail
        self.deadline = time.monotonic() + timeout
        self.last: object = None

    def attempt(self) -> object:
        """The predicate's true value, else ``_NOT_YET`` (WaitTimeout once time is up)."""
        try:
            value = self.predicate()
        except WaitAborted:
            raise
        except Exception as exc:  # any other failure means "not yet"
            self.last = exc
        else:
            if value:
                return value
            self.last = value
        if time.monotonic() >= self.deadline:
            msg = f"timed out after {self.timeout:g} s waiting for {self.what}"
            msg += f" (last: {self.last!r})"
            if self.detail is not None:
                msg += "\n" + self.detail()
            raise WaitTimeout(msg)
        return _NOT_YET


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value,
    and return that value.

    Exceptions raised by the predicate count as "not yet" (a server still starting
    refuses connections), except :class:`WaitAborted`; the last one is named if time
    runs out. ``detail`` is called once on timeout for extra context (logs, the state
    seen).
    """
    waiting = _Waiting(predicate, timeout, what, detail)
    while (value := waiting.attempt()) is _NOT_YET:
        time.sleep(interval)
    return cast(T, value)


async def wait_until_async(
    predicate: Callable[[], T | None],
    timeout: float,  # noqa: ASYNC109 (the same signature as wait_until)
    what: str,
    *,
    interval: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> T:
    """:func:`wait_until` for a test running in an event loop: between two calls of
    ``predicate`` it sleeps with ``asyncio.sleep``, so the loop's tasks run."""
    waiting = _Waiting(predicate, timeout, what, detail)
    while True:
        value = waiting.attempt()
        if value is not _NOT_YET:
            return cast(T, value)
        await asyncio.sleep(interval)
