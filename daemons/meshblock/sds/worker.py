"""The loop of an SDS background worker that runs a step when woken (a map, a
delete) and at least every ``recheck_s`` seconds: the tombstone worker
(:mod:`meshblock.sds.deletion`) and the snapshot garbage worker
(:mod:`meshblock.sds.tree_gc`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


async def run_steps(
    work: asyncio.Event,
    step: Callable[[], Awaitable[None]],
    recheck_s: float,
    errors: tuple[type[Exception], ...],
    failed: Callable[[Exception], None],
) -> None:
    """Forever: wait for ``work`` (or ``recheck_s``), clear it, run ``step``; one of
    ``errors`` is given to ``failed`` and the next wake-up tries again."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(recheck_s):
                await work.wait()
        work.clear()
        try:
            await step()
        except errors as exc:
            failed(exc)


async def cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel a worker's task and wait for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
