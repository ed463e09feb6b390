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
the grace period is cancelled anyway (logged), so a stop stays bounded; :func:`stop`
says which (:class:`Stopped`), so that the caller does not write to a database that
such a pass may still hold (app.py skips the last heartbeat write then).

Tasks the MDM starts on the way (an isolation report's settling) go through
:class:`Background`, so that they are stopped with the loops. A task that ends with
an exception other than its cancellation is logged at ERROR with its traceback,
once, whether it failed before or during the stop.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""How long :func:`stop` waits for passes in progress. It comes after aiohttp's 5 s
``shutdown_timeout`` drain of requests on a SIGTERM (the cleanup contexts run after
it): the two add up."""

CANCELLED_WAIT_S = 1.0
"""How long :func:`stop` then waits for the passes it cancelled to end (a cancelled
pass may still await its connection's rollback): past it, it returns without them."""

_pausing: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
_stopping: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
_reported: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


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


@dataclass
class Stopped:
    """What :func:`stop` found: the tasks it had to cancel in the middle of a pass
    (after the grace), and those that ended with an exception (logged), by name."""

    cancelled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def report_failure(task: asyncio.Task[Any]) -> bool:
    """Log (ERROR, with its traceback) how ``task`` failed, once; whether it did (an
    exception other than its cancellation). For a task that is done."""
    if task.cancelled() or task.exception() is None:
        return False
    if task not in _reported:
        _reported.add(task)
        exc = task.exception()
        log.error("%s failed: %r", task.get_name(), exc, exc_info=exc)
    return True


async def stop(tasks: Iterable[asyncio.Task[Any]], grace_s: float | None = None) -> Stopped:
    """End ``tasks`` at their next :func:`pause` (at once if pausing), cancelling
    those still working after ``grace_s`` (:data:`STOP_GRACE_S`); return when all have
    ended, or :data:`CANCELLED_WAIT_S` after cancelling some. Cancelled itself (the
    stop cut short), it cancels the tasks still running and re-raises."""
    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    tasks = list(tasks)
    running = [t for t in tasks if not t.done()]
    for task in running:
        _stopping.add(task)
        if task in _pausing:
            task.cancel()
    late: set[asyncio.Task[Any]] = set()
    try:
        if running:
            _, late = await asyncio.wait(running, timeout=grace_s)
        for task in late:
            log.warning("%s did not stop within %g s; cancelling it", task.get_name(), grace_s)
            task.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=CANCELLED_WAIT_S)
            for task in stuck:
                log.warning(
                    "%s did not end within %g s of its cancellation; not waiting for it",
                    task.get_name(),
                    CANCELLED_WAIT_S,
                )
    except asyncio.CancelledError:
        for task in running:
            task.cancel()
        raise
    return Stopped(
        cancelled=sorted(t.get_name() for t in late),
        failed=[t.get_name() for t in tasks if t.done() and report_failure(t)],
    )


class Background:
    """Tasks the MDM starts on the way, stopped with its loops: :meth:`close` says
    which are running and refuses new ones from then on (:meth:`start` returns None).
    A task's failure is logged when it ends (:func:`report_failure`)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closed = False

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any] | None:
        if self.closed:
            coro.close()
            log.info("%s not started: the MDM is stopping (or no longer leads)", name)
            return None
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        report_failure(task)

    def close(self) -> list[asyncio.Task[Any]]:
        self.closed = True
        return list(self._tasks)
