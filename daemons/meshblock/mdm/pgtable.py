"""The one gateway to the PG table (``placement_groups``): typed rows in, one
compare-and-set writer out.

Every write of a PG row goes through this module, and every decision about PGs is
made in three steps:

1. **load**: :func:`load` reads the rows as :class:`PgRow` (named fields, never
   positional indexes);
2. **decide**: a pure function over those rows (no session, no clock, no liveness)
   returns the changes to make (:class:`PgChange`): the failure checks
   (:func:`meshblock.mdm.failures.decide`), copy reports
   (:func:`meshblock.mdm.failures.decide_synced`), rebalance moves
   (:func:`meshblock.mdm.rebalance.plan_moves`), an unclean start
   (:func:`meshblock.mdm.unclean.decide`) and a membership change
   (:func:`meshblock.mdm.pgmaps.plan_map`);
3. **write**: :func:`write` (one pool) or :func:`write_pools` stores them; :func:`drop`
   deletes a pool's rows with the pool.

The writer's contract:

- one call publishes one new map of a pool: the pool's ``map_epoch`` goes up by one
  and every row written carries it as its ``epoch``;
- compare-and-set: a row is updated only where its ``epoch`` is still the one the
  decision read (``PgChange.before.epoch``). A change decided on a row that another
  decision changed meanwhile matches no row: the writer counts the rows it updated
  and raises :class:`StaleRows` when one is missing, so the caller's transaction rolls
  back whole (no part of a decision made on changed rows is committed, docs/design.md,
  invariant 9) and the next decision starts from the new rows. A change without
  ``before`` adds the row (a new pool's map);
- fenced: in an MDM, whose sessions carry the leader's :class:`Fence`
  (``session.info[FENCE]``, :mod:`meshblock.mdm.leader`), every write first checks in
  the same transaction that the lease row still names this leader's term and has not
  expired on the database's clock, and raises :class:`~meshblock.mdm.leader.NotLeader`
  otherwise: a deposed leader changes no PG row, even while it believes it leads;
- it runs in the caller's transaction; the caller bumps the cluster epoch
  (:func:`meshblock.mdm.epochs.bump`) and publishes it after the commit.

Rows are read and written as tuples with one executemany per kind of change: a pool
of 4096 PGs costs no ORM object per PG.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, fields
from itertools import starmap
from operator import itemgetter
from typing import Any

from sqlalchemy import Select, Table, Update, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.http_errors import Conflict
from meshblock.mdm.leader import check_fence
from meshblock.mdm.models import PgState, PlacementGroup, StoragePool

__all__ = [
    "PgChange",
    "PgRow",
    "StaleRows",
    "drop",
    "load",
    "row_keys",
    "write",
    "write_pools",
]


class StaleRows(Conflict):
    """A compare-and-set write matched fewer rows than it was given: a row changed
    since the decision read it. Raised out of the caller's transaction, which rolls
    back; the decision is made again on the new rows."""

    code = "stale_pg_rows"


@dataclass(frozen=True, slots=True)
class PgRow:
    """One PG of a pool's map, as stored.

    ``primary``, ``secondary``, ``target``: device ids (None: no such copy);
    ``target`` and ``moving`` (``"primary"`` or ``"secondary"``): a rebalance move in
    progress; ``epoch``: the pool's map epoch that last changed the row.
    """

    pool_id: int
    pg: int
    primary: int | None
    secondary: int | None
    state: PgState
    target: int | None = None
    moving: str | None = None
    epoch: int = 0

    @property
    def copies(self) -> tuple[int, ...]:
        """The devices holding a copy or receiving one (the move's target)."""
        return tuple(d for d in (self.primary, self.secondary, self.target) if d is not None)


@dataclass(frozen=True, slots=True)
class PgChange:
    """What a decision makes of a row: ``before`` as it was read (None: a new row),
    ``after`` as it is to be (its ``epoch`` is ignored: the writer stamps it)."""

    before: PgRow | None
    after: PgRow

    @property
    def pool_id(self) -> int:
        return self.after.pool_id


_COLUMNS = (
    PlacementGroup.pool_id,
    PlacementGroup.pg,
    PlacementGroup.primary_device_id.label("primary"),
    PlacementGroup.secondary_device_id.label("secondary"),
    PlacementGroup.state,
    PlacementGroup.target_device_id.label("target"),
    PlacementGroup.moving,
    PlacementGroup.epoch,
)
# The columns in the order of PgRow's fields: a row read is a PgRow's arguments as they
# come (a pool's 4096 rows are read at every change of its membership: by name, through
# Row._asdict, they cost twice the CPU).
assert [c.key for c in _COLUMNS] == [f.name for f in fields(PgRow)], "not in PgRow's order"


async def load(
    s: AsyncSession,
    *,
    pool_id: int | None = None,
    pgs: Collection[int] | None = None,
    devices: Collection[int] | None = None,
) -> list[PgRow]:
    """The PG rows, in (pool, pg) order: every pool's, or ``pool_id``'s (only ``pgs``
    of it when given); with ``devices``, only the rows naming one of those devices
    (as primary, secondary or target)."""
    q = select(*_COLUMNS).order_by(PlacementGroup.pool_id, PlacementGroup.pg)
    if pool_id is not None:
        q = q.where(PlacementGroup.pool_id == pool_id)
    if pgs is not None:
        q = q.where(PlacementGroup.pg.in_(list(pgs)))
    if devices is not None:
        ids = list(devices)
        q = q.where(
            or_(
                PlacementGroup.primary_device_id.in_(ids),
                PlacementGroup.secondary_device_id.in_(ids),
                PlacementGroup.target_device_id.in_(ids),
            )
        )
    return list(starmap(PgRow, await s.execute(q)))


async def row_keys(s: AsyncSession, pool_ids: Collection[int]) -> dict[int, tuple[int, int]]:
    """Per pool of ``pool_ids`` that has rows: their number and their highest
    ``epoch``. :func:`write` stamps every row it writes with a new map epoch of its
    pool, above every epoch a row of the pool had, so a pool's rows are the same as
    long as this is: what a cache of something computed from them keys on."""
    rows = await s.execute(row_keys_query(pool_ids))
    return {pool_id: (int(n), int(top or 0)) for pool_id, n, top in rows}


def row_keys_query(pool_ids: Collection[int]) -> Select[Any]:
    """The statement of :func:`row_keys` (through the (pool_id, epoch) index)."""
    table = _table()
    return (
        select(table.c.pool_id, func.count(), func.max(table.c.epoch))
        .where(table.c.pool_id.in_(list(pool_ids)))
        .group_by(table.c.pool_id)
    )


def _table() -> Table:
    return PlacementGroup.metadata.tables[PlacementGroup.__tablename__]


_VALUES: dict[str, Any] = {
    "primary_device_id": bindparam("b_p"),
    "secondary_device_id": bindparam("b_s"),
    "state": bindparam("b_state"),
    "target_device_id": bindparam("b_t"),
    "moving": bindparam("b_m"),
    "epoch": bindparam("b_epoch"),
}


def _update_statement() -> Update:
    """The compare-and-set update of one row, for an executemany of :func:`_params`."""
    table = _table()
    return (
        update(table)
        .where(
            table.c.pool_id == bindparam("b_pool"),
            table.c.pg == bindparam("b_pg"),
            table.c.epoch == bindparam("b_old"),
        )
        .values(**_VALUES)
    )


_DRIVER_UPDATES: dict[tuple[str, str], tuple[str, Callable[[dict[str, Any]], Any]] | None] = {}


def _driver_update(dialect: Dialect) -> tuple[str, Callable[[dict[str, Any]], Any]] | None:
    """The update's SQL for ``dialect`` and what makes the driver's tuple of one row's
    parameters, compiled once per dialect; None for a dialect with named parameters.

    A pool laid out afresh rewrites most of its rows at every change of its membership
    (4,096 at every SDS registration): through SQLAlchemy's executemany each row's
    parameters are built and processed one by one, about 20 ms of the event loop's CPU
    for 4,096 rows on SQLite; handed to the driver as tuples, 3 ms. The only parameter
    a processor would convert is ``state``, given as its value (:func:`_params`)."""
    key = (dialect.name, dialect.paramstyle)
    if key not in _DRIVER_UPDATES:
        compiled = _update_statement().compile(dialect=dialect)
        order = compiled.positiontup
        _DRIVER_UPDATES[key] = (str(compiled), itemgetter(*order)) if order else None
    return _DRIVER_UPDATES[key]


def _params(change: PgChange, epoch: int) -> dict[str, Any]:
    after = change.after
    return {
        "b_pool": after.pool_id,
        "b_pg": after.pg,
        "b_p": after.primary,
        "b_s": after.secondary,
        "b_state": after.state.value,
        "b_t": after.target,
        "b_m": after.moving,
        "b_epoch": epoch,
        "b_old": None if change.before is None else change.before.epoch,
    }


async def write(s: AsyncSession, pool: StoragePool, changes: Iterable[PgChange]) -> int:
    """Publish a new map of ``pool`` with ``changes``: bump its ``map_epoch``, add the
    new rows and update the others where their epoch is still ``before.epoch``
    (compare-and-set: :class:`StaleRows` when a row's epoch changed). Returns the new
    map epoch. Every change must be of ``pool`` and keep its ``(pool_id, pg)``."""
    await check_fence(s)
    pool.map_epoch += 1
    epoch = pool.map_epoch
    added: list[dict[str, Any]] = []
    updated: list[dict[str, Any]] = []
    for change in changes:
        before, after = change.before, change.after
        if after.pool_id != pool.id or (before is not None and before.pg != after.pg):
            raise ValueError(f"change of PG {after.pool_id}/{after.pg} written to pool {pool.id}")
        (added if before is None else updated).append(_params(change, epoch))
    table = _table()
    conn = await s.connection()
    if added:
        for row in added:
            del row["b_old"]
        await conn.execute(
            insert(table).values(pool_id=bindparam("b_pool"), pg=bindparam("b_pg"), **_VALUES),
            added,
        )
    if updated:
        driver = _driver_update(conn.dialect)
        if driver is None:
            result = await conn.execute(_update_statement(), updated)
        else:
            sql, positional = driver
            result = await conn.exec_driver_sql(sql, [positional(row) for row in updated])
        sane = conn.dialect.supports_sane_multi_rowcount
        await _check_matched(s, sane, result.rowcount, pool, epoch, updated)
    await s.flush()
    return epoch


async def _check_matched(
    s: AsyncSession,
    sane_rowcount: bool,
    rowcount: int,
    pool: StoragePool,
    epoch: int,
    updated: list[dict[str, Any]],
) -> None:
    """Raise :class:`StaleRows` unless the update matched every row of ``updated``.

    SQLite's driver counts the rows of an executemany; asyncpg's does not, so there
    the rows now carrying the new map ``epoch`` among those of ``updated`` are counted
    (only this write stamps it: it is above every epoch the pool's rows had)."""
    if not sane_rowcount:
        table = _table()
        rowcount = int(
            (
                await s.execute(
                    select(func.count()).where(
                        table.c.pool_id == pool.id,
                        table.c.epoch == epoch,
                        table.c.pg.in_([row["b_pg"] for row in updated]),
                    )
                )
            ).scalar_one()
        )
    if rowcount != len(updated):
        raise StaleRows(
            f"pool {pool.id}: {len(updated) - rowcount} of {len(updated)} PG row(s) changed "
            "since they were read; nothing was written, the decision is made again",
            {"pool": pool.id, "stale": len(updated) - rowcount},
        )


async def write_pools(
    s: AsyncSession, changes: Iterable[PgChange]
) -> list[tuple[StoragePool, list[PgChange]]]:
    """:func:`write` for changes of several pools: one new map epoch per pool that has
    changes (its ``map_epoch`` afterwards). Returns each pool with its changes, in
    pool id order."""
    per_pool: dict[int, list[PgChange]] = defaultdict(list)
    for change in changes:
        per_pool[change.pool_id].append(change)
    if not per_pool:
        return []
    pools = (
        await s.execute(
            select(StoragePool).where(StoragePool.id.in_(list(per_pool))).order_by(StoragePool.id)
        )
    ).scalars()
    out = []
    for pool in list(pools):
        await write(s, pool, per_pool[pool.id])
        out.append((pool, per_pool[pool.id]))
    return out


async def drop(s: AsyncSession, pool_id: int) -> None:
    """Delete a pool's map, with the pool (which has no device left)."""
    await check_fence(s)
    await s.execute(delete(PlacementGroup).where(PlacementGroup.pool_id == pool_id))
