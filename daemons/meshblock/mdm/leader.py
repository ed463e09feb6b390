"""The leader lease of the MDMs sharing one database, and the fence on their writes.

One row of ``mdm_leader`` (:class:`~meshblock.mdm.models.MdmLeader`) names the MDM
that leads (``holder``: its ``[ha] name``), its ``term`` and when its lease expires.
Every time is read from the database's clock (:func:`db_now`), never from an MDM's, so
MDMs whose clocks disagree still agree on who leads.

- **Taking the lease** (:meth:`Lease.try_acquire`): an MDM takes the row when there is
  none, when it has expired, or when it names this MDM's own name (its previous
  process, which is gone: one process per name); each taking is a new term, one above
  the last. On PostgreSQL a second MDM waits at start until the lease expires
  (docs/mdm.md, "High availability (in progress)").
- **Renewing** (:meth:`Lease.run`): the leader renews the lease every ``[ha]
  renew_interval_s``. It counts its lease from the moment it *sent* the renewal, on its
  own monotonic clock: the database counts from a later moment, so the leader's own
  deadline always comes first. When that deadline passes without a renewal (the
  database unreachable, the MDM paused), or the row names another term (it was
  deposed), it gives up leadership on its own (self-fencing): the caller stops acting.
- **Fencing** (:func:`check_fence`): every write transaction of the MDM (API changes,
  the heartbeat writer, the failure detector, the rebalancer, the purger, the scrub
  schedule) is opened by :func:`writing`, which takes the write gate's turn and first
  updates the lease row where it still names this leader's term and holder and has not
  expired on the database's clock. A deposed or expired leader's write matches no row
  and fails with :class:`NotLeader` before it writes anything; on PostgreSQL the update
  locks the row to the commit, so a new leader's taking waits for a write in flight and
  the write is ordered before the new term. The PG-table gateway
  (:mod:`meshblock.mdm.pgtable`) checks too (once per transaction).
- **SQLite** serves one MDM: :func:`sqlite_lock` holds an exclusive lock on a file next
  to the database for the MDM's lifetime (released by the kernel when the process
  dies) and a second MDM is refused at start. The lease is taken at once (a new term
  at each start) and does not expire (``expires_at`` NULL): nobody else can take it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Float, Table, cast, func, insert, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.http_errors import ApiError
from meshblock.mdm import stopping
from meshblock.mdm.models import MdmLeader
from meshblock.sqlstore import WriteGate

__all__ = [
    "FENCE",
    "Fence",
    "LeaderError",
    "Lease",
    "NotLeader",
    "check_fence",
    "db_now",
    "sqlite_lock",
    "writing",
]

log = logging.getLogger(__name__)

LEASE_ROW = 1
FENCE = "meshblock.mdm.fence"  # the key of a session's Fence in ``session.info``
_CHECKED = "meshblock.mdm.fenced"  # the transaction whose fence was checked
_UNIX_JULIAN_DAY = 2440587.5  # julianday('1970-01-01')


class LeaderError(Exception):
    """This MDM may not start as leader (another MDM holds the SQLite database)."""


class NotLeader(ApiError):
    """A write of an MDM that no longer holds the lease: refused, nothing written."""

    status = 503
    code = "not_leader"


@dataclass(frozen=True)
class Fence:
    """What a leader's write transactions check: the lease's term and holder."""

    term: int
    holder: str


def _table() -> Table:
    return MdmLeader.metadata.tables[MdmLeader.__tablename__]


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's clock, in seconds since the epoch (the statement's time: on
    PostgreSQL ``clock_timestamp()``, not the transaction's start)."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    return (func.julianday("now") - _UNIX_JULIAN_DAY) * 86400.0


async def _dialect(s: AsyncSession) -> str:
    return (await s.connection()).dialect.name


async def check_fence(s: AsyncSession) -> None:
    """In ``s``'s transaction: raise :class:`NotLeader` unless the lease still names the
    session's :class:`Fence` (``s.info[FENCE]``) and has not expired. A session without
    a fence (tools, tests) is not checked. Checked once per transaction: the row stays
    locked to its end on PostgreSQL."""
    fence = s.info.get(FENCE)
    if fence is None:
        return
    transaction = s.get_transaction()
    if transaction is not None and s.info.get(_CHECKED) is transaction:
        return
    table = _table()
    result = await s.execute(
        update(table)
        .where(
            table.c.id == LEASE_ROW,
            table.c.term == fence.term,
            table.c.holder == fence.holder,
            or_(table.c.expires_at.is_(None), table.c.expires_at > db_now(await _dialect(s))),
        )
        .values(term=table.c.term)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise NotLeader(
            f"this MDM ({fence.holder}) no longer leads (its term {fence.term} was taken "
            "over or its lease expired): nothing was written"
        )
    s.info[_CHECKED] = transaction


@contextlib.asynccontextmanager
async def writing(
    gate: WriteGate, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncSession]:
    """The one way into an MDM's write transaction: its turn at ``gate``, then a
    transaction of ``sessions`` that passes the fence (:func:`check_fence`) before
    anything else; committed when the block ends, rolled back on an exception."""
    async with gate(), sessions() as s, s.begin():
        await check_fence(s)
        yield s


class Lease:
    """This MDM's hold of the lease row; see the module docstring.

    ``lease_s`` None: the lease does not expire (SQLite, under :func:`sqlite_lock`).
    ``clock``: the MDM's monotonic clock (its own deadline only)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        holder: str,
        lease_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.holder = holder
        self.lease_s = lease_s
        self.clock = clock
        self.term = 0  # 0: not held
        self.deadline = float("inf")  # on ``clock``: the lease is ours until then
        self.seen: tuple[int, str, float | None] | None = None  # the row another holds

    @property
    def fence(self) -> Fence:
        if not self.term:
            raise RuntimeError("the lease is not held")
        return Fence(self.term, self.holder)

    def _expiry(self, now: ColumnElement[float]) -> ColumnElement[float] | None:
        return None if self.lease_s is None else now + self.lease_s

    async def try_acquire(self, *, force: bool = False) -> bool:
        """Take the lease in a new term if it is free, expired or this MDM's own name's
        (or whatever it is, with ``force``: SQLite, whose file this MDM holds); False,
        with the row seen in :attr:`seen`, when another MDM holds it."""
        started = self.clock()
        try:
            term = await self._take(force)
        except IntegrityError:  # two MDMs added the first row at once: the other did
            return False
        if term is None:
            return False
        self.term = term
        self.seen = None
        self._counted_from(started)
        return True

    async def _take(self, force: bool) -> int | None:
        table = _table()
        async with self.sessions() as s, s.begin():
            now = db_now(await _dialect(s))
            row = (
                await s.execute(
                    select(table.c.term, table.c.holder, table.c.expires_at, now.label("now"))
                    .where(table.c.id == LEASE_ROW)
                    .with_for_update()
                )
            ).first()
            values = {
                "holder": self.holder,
                "acquired_at": now,
                "renewed_at": now,
                "expires_at": self._expiry(now),
            }
            if row is None:
                term = 1
                await s.execute(insert(table).values(id=LEASE_ROW, term=term, **values))
            else:
                free = row.expires_at is not None and row.expires_at <= row.now
                if not (force or free or row.holder == self.holder):
                    self.seen = (row.term, row.holder, row.expires_at)
                    return None
                term = row.term + 1
                taken = await s.execute(
                    update(table)
                    .where(table.c.id == LEASE_ROW, table.c.term == row.term)
                    .values(term=term, **values)
                )
                if taken.rowcount != 1:  # type: ignore[attr-defined]
                    return None  # another MDM took it meanwhile (SQLite: no row lock)
        return term

    def _counted_from(self, started: float) -> None:
        if self.lease_s is not None:
            self.deadline = started + self.lease_s

    async def acquire(self, retry_s: float) -> Fence:
        """Take the lease, waiting (a try every ``retry_s``) while another MDM holds
        it."""
        said = None
        while not await self.try_acquire():
            if self.seen is not None and self.seen[:2] != said:
                said = self.seen[:2]
                log.warning(
                    "the leader lease is held by MDM %r (term %d): waiting for it to expire "
                    "before leading",
                    self.seen[1],
                    self.seen[0],
                )
            await asyncio.sleep(retry_s)
        log.info("leading as %r in term %d", self.holder, self.term)
        return self.fence

    async def renew(self) -> bool:
        """Extend the lease from now; False when the row no longer names this MDM's
        term (deposed). Database errors are raised."""
        started = self.clock()
        table = _table()
        async with self.sessions() as s, s.begin():
            now = db_now(await _dialect(s))
            result = await s.execute(
                update(table)
                .where(
                    table.c.id == LEASE_ROW,
                    table.c.term == self.term,
                    table.c.holder == self.holder,
                )
                .values(renewed_at=now, expires_at=self._expiry(now))
            )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return False
        self._counted_from(started)
        return True

    def held(self) -> bool:
        """Whether the lease is still this MDM's by its own clock."""
        return bool(self.term) and self.clock() < self.deadline

    async def run(self, renew_s: float, on_lost: Callable[[str], None]) -> None:
        """Renew every ``renew_s`` until the lease is lost; then call ``on_lost`` with
        why, once, and return (self-fencing: the caller stops acting)."""
        while True:
            await stopping.pause(max(0.0, min(renew_s, self.deadline - self.clock())))
            if not self.held():
                on_lost(f"the lease of term {self.term} was not renewed before it expired")
                return
            try:
                async with asyncio.timeout(self.deadline - self.clock()):
                    renewed = await self.renew()
            except (TimeoutError, SQLAlchemyError, OSError) as exc:
                left = self.deadline - self.clock()
                log.warning(
                    "could not renew the leader lease (%s); %.1f s before it expires",
                    str(exc) or type(exc).__name__,
                    max(left, 0.0),
                )
                continue
            if not renewed:
                on_lost(f"term {self.term} was taken over by another MDM")
                return


@contextlib.contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """Hold the SQLite database ``url`` for this MDM, or raise :class:`LeaderError`
    when another MDM holds it; nothing for another engine or an in-memory database."""
    u = make_url(url)
    path = u.database
    if u.get_backend_name() != "sqlite" or not path or path == ":memory:":
        yield
        return
    lock_path = f"{path}.mdm-lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LeaderError(
                f"another MDM is running on the SQLite database {path} (it holds "
                f"{lock_path}): SQLite serves one MDM; to run several, share a PostgreSQL "
                "database (docs/mdm.md, 'High availability')"
            ) from None
        yield
    finally:
        os.close(fd)
