"""A stand-in for the NBD connection that owns a request (the tests of the SDC's
``VolumeIO``): it keeps the request's answer, or the exception that ended it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from meshblock.nbd.server import Chunk, IoRequest


class Owner:
    """Stands for the NBD connection (meshblock.nbd.server.RequestOwner): the answer
    to one request, as its result or the exception of the task that finished it."""

    def __init__(self) -> None:
        self.answered: asyncio.Future[Sequence[Chunk]] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def answer(self, req: IoRequest, chunks: Sequence[Chunk]) -> None:
        self.answered.set_result(chunks)

    def run(self, req: IoRequest, work: Coroutine[Any, Any, Sequence[Chunk] | None]) -> None:
        async def finish() -> None:
            try:
                self.answered.set_result((await work) or ())
            except Exception as exc:
                self.answered.set_exception(exc)

        self.task = asyncio.get_running_loop().create_task(finish())
