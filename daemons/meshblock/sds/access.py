"""Which SDC may do client IO to which volume: the mappings the MDM publishes.

With TLS identities on the data path, the SDS serves a client's READ, WRITE,
WRITE_ZEROES and TRIM only when the volume is mapped to the SDC its certificate
names (``sdc:GUID``), and the writes only when that mapping is not read-only
(docs/security.md, "The data protocol"). The mappings come per pool from the MDM
(``GET /api/v1/pools/{id}/mappings``, :mod:`meshblock.mdm.mappings`), long-polled by
the MDM link like the PG maps, and are kept in the state file with them, so that a
restarted SDS serves its clients while the MDM is away.

A volume the newest document does not map to the SDC (not mapped to it, or no such
volume) is not refused at once: the mapping may have been made after that document
left the MDM (``meshctl volume map`` returned, the SDC's first IO arrived here before
the long-poll's answer). The SDS fetches the pool's document once more, a fetch that
starts after the request arrived, and refuses only if that one does not map it
either (or the MDM does not answer). Fetches are shared by the requests waiting, at
most one per pool at a time and one per :data:`REFRESH_EVERY_S`, and one for any
pool per :data:`REFRESH_ANY_EVERY_S`; only for a pool this SDS has a map of (the I/O
path refuses the others at once, and nothing is kept for them); and they name the
epoch of the document we have (``?since=E``), which the MDM answers "unchanged" in a
few bytes unless a mapping changed. So a client that sends IO to volumes not mapped
to it costs the MDM little.

An unmap takes effect when the long-poll brings the new document: at once (the MDM
answers the waiting long-poll on the commit), or, with the MDM unreachable, once the
SDS reaches it again; until then the SDS serves by the document it has. Each request
for the document names the epoch held (``since=E``), sent again as soon as a new one is
taken: by it the MDM tells an unmap which SDSs hold it (mdm/mappings.py,
Confirmations; docs/security.md, "Revoking a mapping"). Each answer of that long-poll
(a newer document, or "unchanged" at its timeout) confirms the document held as the
MDM's current one; how long ago the last one did is exported per pool
(:meth:`SdcAccess.unconfirmed`, ``meshblock_sds_mappings_unconfirmed_seconds``): an SDS
cut off from the MDM shows it, and an unmap made meanwhile may not hold there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

log = logging.getLogger(__name__)

#: Fetches of one pool's document that a refused request starts are this far apart.
REFRESH_EVERY_S: Final = 0.2
#: Fetches of any pools' documents that refused requests start are this far apart
#: (the SDS's pools together: at most 20 such requests a second reach the MDM).
REFRESH_ANY_EVERY_S: Final = 0.05
#: A fetch that takes longer than this is given up: the request is refused.
REFRESH_TIMEOUT_S: Final = 5.0

Fetch = Callable[[int], Awaitable[dict[str, Any] | None]]


class MappingsError(ValueError):
    """A malformed mappings document."""


def parse(doc: Any) -> tuple[int, int, dict[tuple[int, str], bool]]:
    """``(pool_id, epoch, {(volume id, SDC GUID): read-only})`` of a document."""
    try:
        pool_id = int(doc["pool_id"])
        epoch = int(doc["epoch"])
        table = {
            (int(v["id"]), str(s["guid"])): bool(s["read_only"])
            for v in doc["volumes"]
            for s in v["sdcs"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise MappingsError(f"malformed mappings document: {exc!r}") from None
    return pool_id, epoch, table


class _Pool:
    """One pool's newest document and its shared fetch."""

    __slots__ = ("confirmed", "doc", "epoch", "fetch", "started", "table")

    def __init__(self) -> None:
        self.epoch = -1  # none received yet
        self.table: dict[tuple[int, str], bool] = {}
        self.doc: dict[str, Any] | None = None
        self.fetch: asyncio.Task[None] | None = None
        self.started = 0.0  # when the newest fetch started (time.monotonic)
        # When the MDM last said that the document held is its current one
        # (time.monotonic); until it does, when the first document was taken (one from
        # the state file: at the start)
        self.confirmed = 0.0


class SdcAccess:
    """The mappings of each pool, as the MDM's newest documents say."""

    def __init__(self) -> None:
        self._pools: dict[int, _Pool] = {}
        #: Fetches a pool's document now, without waiting (set by the MDM link).
        self.fetcher: Fetch | None = None
        self.refreshes = 0
        self._last_start = -REFRESH_ANY_EVERY_S  # the newest fetch's start, of any pool
        #: The pools whose mappings the MDM link long-polls (only with TLS identities on
        #: the data port, in the pools this SDS has devices in): only their documents
        #: are exported as metrics (meshblock.sds.metrics).
        self.followed: set[int] = set()

    def _pool(self, pool_id: int) -> _Pool:
        p = self._pools.get(pool_id)
        if p is None:
            p = self._pools[pool_id] = _Pool()
        return p

    def epoch(self, pool_id: int) -> int:
        """The epoch of the pool's newest document (-1: none yet)."""
        p = self._pools.get(pool_id)
        return -1 if p is None else p.epoch

    def update(self, doc: dict[str, Any]) -> bool:
        """Keep ``doc`` if it is newer than the pool's; whether it was
        (:class:`MappingsError` if it is malformed)."""
        pool_id, epoch, table = parse(doc)
        p = self._pool(pool_id)
        if epoch <= p.epoch:
            return False
        if p.doc is None:
            p.confirmed = time.monotonic()
        p.epoch, p.table, p.doc = epoch, table, doc
        return True

    def confirm(self, pool_id: int, epoch: int) -> None:
        """The MDM has just answered that the pool's mappings are at ``epoch``: the
        document held is current if it is of that epoch (not if the answer is of another,
        or there is none)."""
        p = self._pools.get(pool_id)
        if p is not None and p.doc is not None and p.epoch == epoch:
            p.confirmed = time.monotonic()

    def unconfirmed(self) -> dict[int, tuple[int, float]]:
        """Per pool with a document: its epoch and the seconds since the MDM last
        confirmed it (:meth:`confirm`; never: since it was first held)."""
        now = time.monotonic()
        return {
            pool_id: (p.epoch, max(0.0, now - p.confirmed))
            for pool_id, p in sorted(self._pools.items())
            if p.doc is not None
        }

    def docs(self) -> dict[str, dict[str, Any]]:
        """Every pool's newest document, for the state file."""
        return {str(i): p.doc for i, p in self._pools.items() if p.doc is not None}

    def refusal(self, pool_id: int, volume_id: int, guid: str, write: bool) -> str | None:
        """Why the newest document refuses SDC ``guid`` this IO to ``volume_id`` (None:
        it does not)."""
        p = self._pools.get(pool_id)
        read_only = None if p is None else p.table.get((volume_id, guid))
        if read_only is None:
            return f"volume {volume_id} of pool {pool_id} is not mapped to it (or no such volume)"
        if write and read_only:
            return f"volume {volume_id} is mapped to it read-only"
        return None

    async def refreshed(self, pool_id: int, since: float) -> None:
        """Return once a fetch of the pool's document that started at or after ``since``
        (``time.monotonic()``) has ended, started now if there is none; fetches are
        shared and at least :data:`REFRESH_EVERY_S` apart."""
        p = self._pool(pool_id)
        while True:
            task = p.fetch
            if task is not None:
                # The start of the fetch awaited: another waiter may start a newer
                # one (p.started) before this one runs again, not ended yet.
                started = p.started
                await asyncio.wait({task})
                if started >= since:
                    return
                continue
            if self.fetcher is None:
                return
            now = time.monotonic()
            wait = max(p.started + REFRESH_EVERY_S, self._last_start + REFRESH_ANY_EVERY_S) - now
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            p.started = self._last_start = now
            p.fetch = asyncio.get_running_loop().create_task(self._fetch(p, pool_id, self.fetcher))

    async def _fetch(self, p: _Pool, pool_id: int, fetcher: Fetch) -> None:
        self.refreshes += 1
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_S):
                doc = await fetcher(pool_id)
            if doc is not None:
                self.update(doc)
        except Exception as exc:  # the MDM away, a malformed answer: refused then
            log.warning("fetching the mappings of pool %d failed: %r", pool_id, exc)
        finally:
            p.fetch = None

    def stop(self) -> None:
        """Cancel the fetches in progress."""
        for p in self._pools.values():
            if p.fetch is not None:
                p.fetch.cancel()
