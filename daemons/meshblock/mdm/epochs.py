"""The cluster epoch: bumped by every change, awaited by long-polling clients.

Every committed change of the object model or of a PG map increments
``cluster.epoch`` in the same transaction (:func:`bump`). After the commit the
handler calls :meth:`EpochNotifier.publish`, which wakes the long-polls waiting in
:meth:`EpochNotifier.wait_beyond`. Waiters also re-read the epoch from the database
once a second, so a change committed by another MDM sharing the database reaches
them within a second too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm.models import Cluster

CLUSTER_ROW_ID = 1


async def bump(session: AsyncSession) -> int:
    """Increment the cluster epoch inside the caller's transaction; return the new one."""
    result = await session.execute(
        update(Cluster)
        .where(Cluster.id == CLUSTER_ROW_ID)
        .values(epoch=Cluster.epoch + 1)
        .returning(Cluster.epoch)
    )
    return int(result.scalar_one())


async def current(session: AsyncSession) -> int:
    return int(
        (
            await session.execute(select(Cluster.epoch).where(Cluster.id == CLUSTER_ROW_ID))
        ).scalar_one()
    )


class EpochNotifier:
    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.closing = False
        self._changed = asyncio.Event()

    def close(self) -> None:
        """Wake every waiter for good: the MDM is shutting down."""
        self.closing = True
        self._changed.set()

    def publish(self, epoch: int) -> None:
        if epoch > self.epoch:
            self.epoch = epoch
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_beyond(
        self, epoch: int, within: float, reload: Callable[[], Awaitable[int]]
    ) -> int:
        """Wait until the epoch exceeds ``epoch`` or ``within`` seconds pass; return it."""
        deadline = time.monotonic() + within
        while self.epoch <= epoch and not self.closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 1.0))
            except TimeoutError:
                self.publish(await reload())
        return self.epoch
