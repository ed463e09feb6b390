"""Heartbeats of SDSs and SDCs, kept in memory and written to the store in batches.

A heartbeat must be cheap: a thousand SDSs send one a second. It only records the
time (and the usage an SDS reports) in memory; a background task writes what changed
to the database once a second in one transaction. A component's state is derived:
``connected`` while its last heartbeat is younger than ``heartbeat_timeout_s``.

The hold-downs (:mod:`meshblock.mdm.holddown`) go the same way: a record that
changed is written with the next batch (``sdss.hold_state``), or sooner, in the
transaction of the failure check that changes the map for it
(:meth:`meshblock.mdm.failures.FailureDetector.check`), and read back at start, so
that an SDS held down or flapping stays out across an MDM restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock.mdm import stopping
from meshblock.mdm.db import WriteGate
from meshblock.mdm.holddown import HoldDowns, Knobs, from_stored, to_stored
from meshblock.mdm.leader import NotLeader, writing
from meshblock.mdm.models import Device, Sdc, Sds, Volume, VolumeUsage

log = logging.getLogger(__name__)

Kind = Literal["sds", "sdc"]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class _Pending:
    seen: dict[tuple[Kind, int], dt.datetime] = field(default_factory=dict)
    device_used: dict[tuple[int, int], int] = field(default_factory=dict)  # (sds, device)
    volume_chunks: dict[tuple[int, int], int] = field(default_factory=dict)
    holds: dict[int, str | None] = field(default_factory=dict)  # sds -> hold_state
    # SDSs whose reported volumes are all they hold (a full heartbeat): their other
    # volume_usage rows are written as 0 chunks
    whole: set[int] = field(default_factory=set)


class Liveness:
    def __init__(self, timeout_s: float, knobs: Knobs | None = None) -> None:
        self.timeout = dt.timedelta(seconds=timeout_s)
        self.last_seen: dict[tuple[Kind, int], dt.datetime] = {}
        self._pending = _Pending()
        self.heartbeats_total = 0
        # SDSs declared down on a confirmed report (mark_down) and not proven up since
        # (docs/mdm.md, "Hold-down and flapping"; meshblock.mdm.holddown).
        self.holds = HoldDowns(knobs or Knobs())

    @property
    def reported_down(self) -> set[tuple[Kind, int]]:
        """SDSs held down: declared down on a report, not proven up since."""
        return {("sds", i) for i in self.holds.held_ids()}

    async def load(self, session: AsyncSession) -> None:
        for kind, model in (("sds", Sds), ("sdc", Sdc)):
            rows = await session.execute(select(model.id, model.last_seen))
            for id_, seen in rows:
                if seen is not None:
                    self.last_seen[(kind, id_)] = _aware(seen)  # type: ignore[index]
        mono, wall = time.monotonic(), time.time()
        stored = await session.execute(
            select(Sds.id, Sds.hold_state).where(Sds.hold_state.is_not(None))
        )
        records = {i: from_stored(text, mono, wall) for i, text in stored}
        self.holds.load(records)
        for i, rec in sorted(records.items()):
            if rec.held:
                log.warning(
                    "SDS %d is held down%s since before the restart: it returns once proven up%s",
                    i,
                    " (flapping)" if rec.flapping else "",
                    " after 'meshctl sds clear-flapping'" if rec.flapping else "",
                )

    def beat(
        self,
        kind: Kind,
        id_: int,
        devices: Iterable[tuple[int, int]] = (),
        volumes: Iterable[tuple[int, int]] = (),
        *,
        whole: bool = False,
    ) -> None:
        """A heartbeat of ``id_``, with the (device, used bytes) and (volume, chunks)
        that changed, written with the next batch; with ``whole``, ``volumes`` are
        every volume the SDS holds: the others it has a count of are written as 0."""
        now = utcnow()
        self.heartbeats_total += 1
        self.last_seen[(kind, id_)] = now
        self._pending.seen[(kind, id_)] = now
        if devices:
            used = self._pending.device_used
            for d, n in devices:
                used[(id_, d)] = n
        if volumes:
            chunks = self._pending.volume_chunks
            for v, n in volumes:
                chunks[(id_, v)] = n
        if whole:
            self._pending.whole.add(id_)

    def forget(self, kind: Kind, id_: int) -> None:
        self.last_seen.pop((kind, id_), None)
        self._pending.seen.pop((kind, id_), None)
        if kind == "sds":
            self.holds.forget(id_)

    def mark_down(self, id_: int, isolated: bool = False) -> None:
        """Declare an SDS down now (a peer's report, confirmed by the MDM; or, with
        ``isolated``, its own reports of peers the MDM reaches): as if its last
        heartbeat were older than the timeout, and held down: its heartbeats do not
        bring it back, only probes that reach it for ``hold_down_s``
        (:meth:`release`)."""
        self.last_seen[("sds", id_)] = utcnow() - self.timeout - dt.timedelta(seconds=1)
        self.holds.down(id_, isolated=isolated)

    def release(self, id_: int) -> None:
        """A held SDS proven up: connected again from its next heartbeat on."""
        self.holds.release(id_)

    def connected_sds(self) -> list[int]:
        return [
            i for (k, i) in self.last_seen if k == "sds" and self.state("sds", i) == "connected"
        ]

    def seen(self, kind: Kind, id_: int) -> dt.datetime | None:
        return self.last_seen.get((kind, id_))

    def state(self, kind: Kind, id_: int) -> str:
        if kind == "sds" and self.holds.held(id_):
            return "disconnected"
        seen = self.last_seen.get((kind, id_))
        if seen is not None and utcnow() - seen <= self.timeout:
            return "connected"
        return "disconnected"

    async def flush(self, sessions: async_sessionmaker[AsyncSession], gate: WriteGate) -> None:
        self._take_holds()
        pending, self._pending = self._pending, _Pending()
        if not (
            pending.seen
            or pending.device_used
            or pending.volume_chunks
            or pending.holds
            or pending.whole
        ):
            return
        try:
            async with writing(gate, sessions) as session:
                await _write(session, pending)
        except Exception as exc:
            if isinstance(exc, NotLeader):  # deposed: kept until this MDM steps down
                log.warning("heartbeats not recorded: %s", exc)
            else:
                log.exception("could not record heartbeats; retrying next second")
            # keep what we could not write, unless newer values arrived meanwhile
            for k, v in pending.seen.items():
                self._pending.seen.setdefault(k, v)
            for dk, dv in pending.device_used.items():
                self._pending.device_used.setdefault(dk, dv)
            for vk, vv in pending.volume_chunks.items():
                self._pending.volume_chunks.setdefault(vk, vv)
            for hk, hv in pending.holds.items():
                self._pending.holds.setdefault(hk, hv)
            self._pending.whole |= pending.whole

    def _take_holds(self) -> None:
        """The hold-down records that changed, for the next batch."""
        self._pending.holds.update(self.take_holds())

    def take_holds(self) -> dict[int, str | None]:
        """The hold-down records changed since last taken, as the store keeps them
        (:func:`write_holds`); :meth:`untake_holds` when they could not be written."""
        changed, self.holds.changed = self.holds.changed, set()
        mono, wall = time.monotonic(), time.time()
        for i in changed:
            self._pending.holds.pop(i, None)  # an older value a failed batch kept
        return {i: to_stored(self.holds.record(i), mono, wall) for i in changed}

    def untake_holds(self, taken: dict[int, str | None]) -> None:
        """Records :meth:`take_holds` gave that were not written: taken again later."""
        self.holds.changed.update(taken)

    async def run(self, sessions: async_sessionmaker[AsyncSession], gate: WriteGate) -> None:
        while True:
            await stopping.pause(1.0)
            await self.flush(sessions, gate)


async def _write(session: AsyncSession, p: _Pending) -> None:
    sds_rows = [{"id": i, "last_seen": t} for (k, i), t in p.seen.items() if k == "sds"]
    sdc_rows = [{"id": i, "last_seen": t} for (k, i), t in p.seen.items() if k == "sdc"]
    conn = await session.connection()
    if sds_rows:
        await _bulk_set(session, Sds, sds_rows)
    await write_holds(session, p.holds)
    if sdc_rows:
        await _bulk_set(session, Sdc, sdc_rows)
    if p.device_used:
        # An SDS reports only its own devices; a report about another's is dropped.
        dev_ids = [d for _, d in p.device_used]
        owner = dict(
            (
                await session.execute(
                    select(Device.id, Device.sds_id).where(Device.id.in_(dev_ids))
                )
            ).all()
        )
        rows = [
            {"id": d, "used_bytes": u}
            for (sds, d), u in p.device_used.items()
            if owner.get(d) == sds
        ]
        if rows:
            await _bulk_set(session, Device, rows)
    if p.whole:
        # the volumes a full heartbeat did not name (nor a later one since): none left
        for (s, v), c in (await _counted(session, p.whole)).items():
            if c and (s, v) not in p.volume_chunks:
                p.volume_chunks[(s, v)] = 0
    if p.volume_chunks:
        existing_sds = await _existing(session, Sds, {s for s, _ in p.volume_chunks})
        existing_vol = await _existing(session, Volume, {v for _, v in p.volume_chunks})
        rows = [
            {"sds_id": s, "volume_id": v, "chunks": c}
            for (s, v), c in p.volume_chunks.items()
            if s in existing_sds and v in existing_vol
        ]
        if rows:
            # One prepared upsert, executed for every row (executemany): the statement
            # stays the same whatever the number of rows, and no parameter limit applies.
            insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            ins = insert(VolumeUsage.metadata.tables[VolumeUsage.__tablename__])
            stmt = ins.on_conflict_do_update(
                index_elements=["sds_id", "volume_id"], set_={"chunks": ins.excluded.chunks}
            )
            await conn.execute(stmt, rows)


async def write_holds(session: AsyncSession, holds: dict[int, str | None]) -> None:
    """``sdss.hold_state`` of the SDSs in ``holds`` (:meth:`Liveness.take_holds`)."""
    if holds:
        await _bulk_set(session, Sds, [{"id": i, "hold_state": h} for i, h in holds.items()])


#: Ids asked for in one ``IN`` list (far below any engine's parameter limit).
IN_BATCH = 500


async def _existing(session: AsyncSession, model: Any, ids: set[int]) -> set[int]:
    """Those of ``ids`` that ``model`` has a row of (a few ``IN`` lists, or one scan of
    the ids when there are many)."""
    if len(ids) > 8 * IN_BATCH:
        return set((await session.execute(select(model.id))).scalars()) & ids
    found: set[int] = set()
    batch = sorted(ids)
    for i in range(0, len(batch), IN_BATCH):
        part = batch[i : i + IN_BATCH]
        found.update((await session.execute(select(model.id).where(model.id.in_(part)))).scalars())
    return found


async def _counted(session: AsyncSession, sds_ids: set[int]) -> dict[tuple[int, int], int]:
    """(sds, volume) -> chunks of every volume_usage row of ``sds_ids``."""
    out: dict[tuple[int, int], int] = {}
    batch = sorted(sds_ids)
    for i in range(0, len(batch), IN_BATCH):
        rows = await session.execute(
            select(VolumeUsage.sds_id, VolumeUsage.volume_id, VolumeUsage.chunks).where(
                VolumeUsage.sds_id.in_(batch[i : i + IN_BATCH])
            )
        )
        out.update(((s, v), int(c)) for s, v, c in rows)
    return out


async def _bulk_set(session: AsyncSession, model: Any, rows: list[dict[str, Any]]) -> None:
    """``UPDATE ... WHERE id = ?`` of ``rows`` (each ``{"id", column: value}``, the same
    columns in each), one executemany through the core (no ORM state per row); a row
    whose id is gone meanwhile updates nothing."""
    table = model.__table__
    columns = [k for k in rows[0] if k != "id"]
    stmt = (
        update(table)
        .where(table.c.id == bindparam("row_id"))
        .values({c: bindparam(c) for c in columns})
    )
    await session.execute(stmt, [{"row_id": r["id"], **{c: r[c] for c in columns}} for r in rows])


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
