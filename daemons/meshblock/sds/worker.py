"""The loop of an SDS background worker that runs a step when woken (a map, a
delete) and at least every ``recheck_s`` seconds: the tombstone worker
(:mod:`meshblock.sds.deletion`) and the snapshot garbage worker
(:mod:`meshblock.sds.tree_gc`).

The loop never ends on an error of a step: an expected one (``errors``: a device
error, a malformed tree) goes to the worker's ``failed`` and the next wake-up tries
again; any other exception (a bug) is logged with its traceback, given to ``failed``
too (the worker counts it), and the loop backs off before its next step
(:data:`BACKOFF_FIRST_S`, doubled after each unexpected error in a row up to
``recheck_s``), so that a step that fails at once is not run in a tight loop. Only a
cancel ends it; :func:`cancel` therefore never raises, but for the cancellation of
the task that calls it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: The first pause after a step that raised an unexpected exception.
BACKOFF_FIRST_S = 1.0


async def run_steps(
    work: asyncio.Event,
    step: Callable[[], Awaitable[None]],
    recheck_s: float,
    errors: tuple[type[Exception], ...],
    failed: Callable[[Exception], None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Forever: wait for ``work`` (or ``recheck_s``), clear it, run ``step``; one of
    ``errors`` is given to ``failed`` and the next wake-up tries again; any other
    exception is logged with its traceback, given to ``failed``, and the next step
    waits a back-off first (see the module's docstring)."""
    backoff = 0.0
    while True:
        if backoff:
            await sleep(backoff)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(recheck_s):
                await work.wait()
        work.clear()
        try:
            await step()
        except errors as exc:
            backoff = 0.0
            failed(exc)
        except Exception as exc:
            backoff = min(recheck_s, backoff * 2 if backoff else BACKOFF_FIRST_S)
            log.exception("%s: unexpected error; next step in %.0f s", _name(), backoff)
            failed(exc)
        else:
            backoff = 0.0


def _name() -> str:
    task = asyncio.current_task()
    return task.get_name() if task is not None else "worker"


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a worker's task and wait for it to end. Never raises of its own: a task
    that ended with an exception (it should not: :func:`run_steps` survives them) is
    logged. Only the caller's own cancellation, arriving while it waits, goes on up
    (the worker's ends here; the caller's must not be swallowed with it)."""
    if task is None:
        return
    me = asyncio.current_task()
    # A caller already being cancelled (a stop: aiohttp's cleanup runs in the
    # cancelled serving task) still waits for its workers: only a cancellation that
    # arrives during the wait is the caller's to raise.
    before = me.cancelling() if me is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if me is not None and me.cancelling() > before:
            raise
    except Exception:
        log.exception("%s had ended with an error", task.get_name())
