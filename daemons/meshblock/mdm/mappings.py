"""The mappings documents: which SDC may do client IO to which volume of a pool.

Each SDS follows, for every pool it has a device in, the pool's mappings document
(``GET /api/v1/pools/{id}/mappings``, docs/api.md): the pool's active volumes that
are mapped, and per volume the GUIDs of the SDCs they are mapped to and whether
read-only. With TLS identities on the data path the SDS serves client IO only to a
certificate ``sdc:GUID`` the document names for the volume (docs/security.md).

The document is apart from the PG map on purpose: a mapping changes only when an
operator maps, unmaps or changes an access mode, a PG map with every failure,
rebuild and move; keeping them apart, neither change makes a thousand SDSs fetch
the other, and the PG map's own form (incremental or whole) is its own affair.

Its epoch, ``storage_pools.mappings_epoch``, moves with every change of a mapping
of the pool's volumes (:func:`touch`, in the change's transaction); a long-poll
waits for it as the PG map's waits for the map epoch. A document is built once per
mappings epoch (:class:`MappingDocs`) and every pool's mappings epoch is read once
per cluster epoch for all the long-polls woken at it. 10,000 volumes mapped to one SDC
each make a document of 870 KB, 260 KB gzipped (each compressed once per epoch).

Which epoch each SDS has (:class:`Confirmations`): every request an SDS makes for the
document names the epoch it holds (``since=E``; it asks again as soon as it has taken
a new one), so the MDM learns, without a call of its own, which SDSs have taken a
revocation. An unmap (``DELETE /api/v1/mappings/{id}?confirm_timeout=S``) waits up to
S seconds for every SDS with a device in the pool to name the new epoch, and says which
have not: those may still serve the SDC by the document they have (docs/security.md,
"Revoking a mapping"). Kept in memory: a restarted MDM knows none until the SDSs ask
again, which their long-polls do at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm.models import (
    AccessMode,
    Device,
    Mapping,
    Sdc,
    Sds,
    StoragePool,
    Volume,
    VolumeState,
)
from meshblock.mdm.pgmaps import MapDocument


async def touch(session: AsyncSession, volume_id: int) -> None:
    """Move the mappings epoch of the pool of ``volume_id``: a mapping of it changed
    (in the caller's transaction, which bumps the cluster epoch too)."""
    pool_of = select(Volume.pool_id).where(Volume.id == volume_id).scalar_subquery()
    await session.execute(
        update(StoragePool)
        .where(StoragePool.id == pool_of)
        .values(mappings_epoch=StoragePool.mappings_epoch + 1)
    )


async def build(session: AsyncSession, pool_id: int, epoch: int) -> dict[str, Any]:
    """The mappings document of pool ``pool_id`` at mappings epoch ``epoch``."""
    rows = await session.execute(
        select(Volume.id, Sdc.guid, Mapping.access_mode)
        .join(Mapping, Mapping.volume_id == Volume.id)
        .join(Sdc, Sdc.id == Mapping.sdc_id)
        .where(Volume.pool_id == pool_id, Volume.state == VolumeState.ACTIVE)
        .order_by(Volume.id, Sdc.guid)
    )
    volumes: dict[int, list[dict[str, Any]]] = {}
    for volume_id, guid, mode in rows:
        volumes.setdefault(int(volume_id), []).append(
            {"guid": guid, "read_only": mode == AccessMode.READ_ONLY}
        )
    return {
        "pool_id": pool_id,
        "epoch": epoch,
        "volumes": [{"id": v, "sdcs": sdcs} for v, sdcs in volumes.items()],
    }


class MappingDocs:
    """The encoded mappings document of each pool, built once per mappings epoch; and
    every pool's mappings epoch as of a cluster epoch, read in one query for all the
    long-polls that a change wakes (a thousand SDSs follow their pools' documents)."""

    def __init__(self, term: int = 0) -> None:
        self.term = term  # this MDM's leader term, in every document (0: none)
        self._docs: dict[int, MapDocument] = {}  # pool -> its document at its epoch
        self._read_at = -1  # the cluster epoch the epochs were read at (or after)
        self._epochs: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self.builds = 0
        self.confirmations = Confirmations()

    async def epoch(
        self, sessions: async_sessionmaker[AsyncSession], cluster_epoch: int, pool_id: int
    ) -> int | None:
        """Pool ``pool_id``'s mappings epoch at or after ``cluster_epoch`` (the epoch the
        caller has seen published); None: no such pool."""
        if self._read_at < cluster_epoch:
            async with self._lock:
                if self._read_at < cluster_epoch:
                    async with sessions() as s:
                        found = await s.execute(select(StoragePool.id, StoragePool.mappings_epoch))
                        self._epochs = {int(i): int(e) for i, e in found}
                    self._read_at = cluster_epoch
        return self._epochs.get(pool_id)

    async def document(self, session: AsyncSession, pool: StoragePool) -> MapDocument:
        """The document of ``pool`` at the mappings epoch its row carries, encoded (and
        gzipped, on the first request that accepts gzip) once for every SDS that asks.
        Cached only when the epoch read again after the build is still that one (on
        SQLite each statement of a read sees the store as of itself)."""
        epoch = int(pool.mappings_epoch)
        cached = self._docs.get(pool.id)
        if cached is not None and cached.epoch == epoch:
            return cached
        doc = await build(session, pool.id, epoch)
        if self.term:
            doc["term"] = self.term
        made = MapDocument(epoch, doc, json.dumps(doc, separators=(",", ":")).encode())
        self.builds += 1
        again = await session.execute(
            select(StoragePool.mappings_epoch).where(StoragePool.id == pool.id)
        )
        if again.scalar_one_or_none() == epoch:
            self._docs[pool.id] = made
        return made


#: The longest an unmap may wait for the SDSs to confirm (``confirm_timeout``).
MAX_CONFIRM_S = 30.0
#: An SDS that asked for a pool's document this recently, or is asking now (its
#: long-poll waits at the MDM), is reachable: an unmap waits for it; one not heard
#: from for longer is reported at once, not waited for.
HEARD_RECENTLY_S = 2.0
#: A waiting unmap looks again this often even when no SDS asked meanwhile.
RECHECK_S = 0.25
#: What an SDS named is forgotten once it has not asked for this long (an SDS
#: removed, a pool it left, a name that changed); it counts then as never heard of:
#: unconfirmed, not waited for, as it already was once not heard from recently.
FORGET_S = 3600.0
#: At most this many (pool, SDS) entries are kept; past it, those heard from longest
#: ago (not asking now) go first.
MAX_HEARD = 65536
#: The forgetting runs with a request at most this often.
TRIM_EVERY_S = 60.0


@dataclass
class _Heard:
    epoch: int  # the mappings epoch its newest request named (since=E; -1: none)
    at: float  # when it last asked (time.monotonic)
    asking: int = 0  # its requests in progress (a long-poll waiting here)


class Confirmations:
    """The mappings epoch each SDS holds of each pool, as its requests name it."""

    def __init__(self) -> None:
        self._heard: dict[tuple[int, str], _Heard] = {}
        self._changed = asyncio.Event()
        self._trimmed = time.monotonic()

    def __len__(self) -> int:
        return len(self._heard)

    def trim(self, keep: int = MAX_HEARD) -> None:
        """Forget the entries not heard from for :data:`FORGET_S` (none asking now),
        then, past ``keep`` entries, those heard from longest ago."""
        now = time.monotonic()
        self._trimmed = now
        heard = self._heard
        for key in [k for k, h in heard.items() if not h.asking and now - h.at > FORGET_S]:
            del heard[key]
        excess = len(heard) - keep
        if excess > 0:
            idle = sorted((h.at, k) for k, h in heard.items() if not h.asking)
            for _, key in idle[:excess]:
                del heard[key]

    def forget(self, sds: str) -> None:
        """SDS ``sds`` is removed: forget what it named, of every pool."""
        for key in [k for k in self._heard if k[1] == sds]:
            del self._heard[key]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def begin(self, pool_id: int, sds: str, since: int | None) -> None:
        """SDS ``sds`` asks for the pool's document, holding epoch ``since`` (None:
        none yet)."""
        key = (pool_id, sds)
        heard = self._heard.get(key)
        if heard is None:
            if time.monotonic() - self._trimmed > TRIM_EVERY_S or len(self._heard) >= MAX_HEARD:
                self.trim(MAX_HEARD - 1)  # room for this one
            heard = self._heard[key] = _Heard(-1, 0.0)
        # The newest request says what the SDS holds now (a restarted SDS may hold an
        # older document than it named before): taken as named, not the highest.
        heard.epoch = -1 if since is None else since
        heard.at = time.monotonic()
        heard.asking += 1
        self._notify()

    def end(self, pool_id: int, sds: str) -> None:
        heard = self._heard.get((pool_id, sds))
        if heard is not None:
            heard.asking = max(0, heard.asking - 1)
            heard.at = time.monotonic()

    def state(self, pool_id: int, sds: str, epoch: int) -> dict[str, Any]:
        """What is known of ``sds``'s holding of mappings epoch ``epoch``."""
        heard = self._heard.get((pool_id, sds))
        if heard is None:
            return {"confirmed": False, "epoch": None, "last_heard_s": None, "asking": False}
        return {
            "confirmed": heard.epoch >= epoch,
            "epoch": heard.epoch if heard.epoch >= 0 else None,
            "last_heard_s": round(time.monotonic() - heard.at, 3),
            "asking": heard.asking > 0,
        }

    def _waiting_for(self, pool_id: int, names: list[str], epoch: int) -> list[str]:
        """The SDSs worth waiting for: not confirmed yet, heard from recently."""
        now = time.monotonic()
        out = []
        for name in names:
            heard = self._heard.get((pool_id, name))
            if heard is None or heard.epoch >= epoch:
                continue
            if heard.asking or now - heard.at <= HEARD_RECENTLY_S:
                out.append(name)
        return out

    async def wait(
        self,
        pool_id: int,
        names: list[str],
        epoch: int,
        wait_s: float,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """Return once every SDS of ``names`` reachable has named ``epoch`` or a later
        one, after ``wait_s`` seconds, or soon after ``stopping()`` (the MDM stops)."""
        deadline = time.monotonic() + wait_s
        while self._waiting_for(pool_id, names, epoch) and not stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            changed = self._changed
            # looked at again at least every RECHECK_S: an SDS heard from no longer, a stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, RECHECK_S))


async def pool_sdss(session: AsyncSession, pool_id: int) -> list[tuple[int, str]]:
    """``(id, name)`` of every SDS with a device in the pool (those that follow its
    mappings, as the MDM lets them: mdm/authz.py), by name."""
    rows = await session.execute(
        select(Sds.id, Sds.name)
        .join(Device, Device.sds_id == Sds.id)
        .where(Device.pool_id == pool_id)
        .distinct()
        .order_by(Sds.name)
    )
    return [(int(i), str(n)) for i, n in rows]


async def revocation(
    docs: MappingDocs,
    sdss: list[tuple[int, str]],
    pool_id: int,
    epoch: int,
    wait_s: float,
    enforced: bool,
    state_of: Callable[[int], str],
    stopping: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Wait up to ``wait_s`` s for the pool's SDSs to hold mappings epoch ``epoch``;
    the report of which do (a MappingRevocation of docs/api.md). ``enforced``: the
    SDSs check client IO by the mappings (the MDM's API has TLS, so an SDS can read
    them with its certificate); without, nothing is waited for. ``state_of``: an SDS's
    state by its heartbeats (``connected``, ``disconnected``), shown with it;
    ``stopping``: the MDM stops, the wait ends (what is known is reported)."""
    confirmations = docs.confirmations
    names = [n for _, n in sdss]
    if enforced and wait_s > 0:
        await confirmations.wait(pool_id, names, epoch, wait_s, stopping)
    rows = []
    for sds_id, name in sdss:
        state = confirmations.state(pool_id, name, epoch)
        rows.append({"id": sds_id, "name": name, "state": state_of(sds_id), **state})
    unconfirmed = [r["name"] for r in rows if not r["confirmed"]] if enforced else []
    return {
        "pool_id": pool_id,
        "mappings_epoch": epoch,
        "enforced": enforced,
        "confirmed": not unconfirmed,
        "unconfirmed": unconfirmed,
        "sds": rows,
    }
