"""Stopping the MDM's background loops at a safe point.

A loop (heartbeat writer, failure detector, prober, rebalancer, purger, scrub
schedule, leader lease) sleeps between two passes with :func:`pause`. On exit
:func:`stop` cancels a loop that is pausing at once, and lets one that is in the
middle of a pass (inside a database session) finish it: it then ends at its next
:func:`pause`. ``Task.cancel`` inside a session could land while SQLAlchemy returns
the connection to its pool (its rollback or close awaiting aiosqlite's thread), and
the pool logged ``Exception during reset or similar`` / ``Exception closing
connection`` with a ``CancelledError`` traceback; one cancelled in a write
transaction on SQLite left the write lock held, and the last heartbeat write of the
stop waited out the 30 s busy timeout (``database is locked``). A pass that does not end within
the grace period is cancelled anyway (logged), so a stop stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""How long :func:`stop` waits for passes in progress. It comes after aiohttp's 5 s
``shutdown_timeout`` drain of requests on a SIGTERM (the cleanup contexts run after
it): the two add up."""

_pausing: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()
_stopping: weakref.WeakSet[asyncio.Task[object]] = weakref.WeakSet()


async def pause(seconds: float) -> None:
    """Sleep ``seconds`` between two passes of a background loop: where :func:`stop`
    ends it (``CancelledError``)."""
    task = asyncio.current_task()
    if task is None:
        await asyncio.sleep(seconds)
        return
    if task in _stopping:
        raise asyncio.CancelledError
    _pausing.add(task)
    try:
        await asyncio.sleep(seconds)
    finally:
        _pausing.discard(task)


async def stop(tasks: Iterable[asyncio.Task[object]], grace_s: float = STOP_GRACE_S) -> None:
    """End ``tasks`` at their next :func:`pause` (at once if pausing), cancelling
    those still working after ``grace_s``; return when all have ended."""
    tasks = [t for t in tasks if not t.done()]
    for task in tasks:
        _stopping.add(task)
        if task in _pausing:
            task.cancel()
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=grace_s)
    for task in late:
        log.warning("%s did not stop within %.0f s; cancelling it", task.get_name(), grace_s)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
