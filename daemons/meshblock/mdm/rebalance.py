"""Rebalance: moves PG copies of pools that hold data until device usage is balanced.

A change of a pool's membership (an SDS or a device added, an SDS draining) only fills
missing copies (:mod:`meshblock.mdm.pgmaps`): moving a copy that holds data is this
module's job. Every ``cluster.rebalance_interval_s`` the MDM compares each pool's map
with the balanced map :func:`meshblock.mdm.placement.compute_map` computes from it over
the pool's *eligible* devices (on SDSs that heartbeat and are in mode ``normal``), and
starts moves for the PGs whose copies differ:

- one copy of a PG moves at a time, and only in a ``clean`` PG. The PG keeps its
  primary and secondary; the new device becomes its ``target``. The primary forwards
  new writes to the target as well and copies the PG's chunks to it
  (:mod:`meshblock.sds.resync`); when done it reports to the MDM, and the target
  replaces the copy that moves (:func:`meshblock.mdm.failures.mark_synced`). The PG
  has two in-sync copies throughout: a move never lowers redundancy.
- a pool with PGs that are not clean waits: rebuild first. So does a pool with copies
  on an SDS (in mode ``normal``) that heartbeated and stopped, until the failure
  detector has made those PGs degraded: moves planned without it would be moves off
  a dead SDS, undone by the rebuild that follows.
- at most ``max(2, eligible devices)`` moves run per pool at a time; the SDSs pace the
  copies with the pool's rebuild throttles.
- copies on devices of a ``draining`` SDS (``meshctl sds remove``) are moved first
  (they are missing from the balanced map); once none is left the SDS can be removed.

Balance: the moves converge on a map where every device holds its ideal number of
copies ``+-  max(2, 5% of ideal)`` (:func:`meshblock.mdm.placement.copy_tolerance`);
chunks spread evenly over PGs, so device usage follows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.mdm import pgtable, stopping
from meshblock.mdm.epochs import bump
from meshblock.mdm.failures import FailureDetector
from meshblock.mdm.leader import writing
from meshblock.mdm.models import PgState, Sds, SdsMode, StoragePool, Volume
from meshblock.mdm.pgmaps import pool_devices
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, PgAssignment, compute_map, failure_domain

log = logging.getLogger(__name__)


class Rebalancer:
    """Starts rebalance moves; runs beside the failure detector, under its lock."""

    def __init__(self, detector: FailureDetector) -> None:
        self.detector = detector
        self.moves_started = 0
        self._waiting: set[int] = set()  # pools waiting for the failure detector (logged)
        # pool -> the inputs of its last plan, when that plan moved nothing
        self._settled: dict[int, tuple[object, ...]] = {}

    def eligible_sds(self, modes: dict[int, SdsMode]) -> frozenset[int]:
        live = self.detector.liveness
        return frozenset(
            i
            for i, mode in modes.items()
            if mode == SdsMode.NORMAL and live.state("sds", i) == "connected"
        )

    async def step(self) -> int:
        """Start the moves that are due; return how many were started.

        Decided outside the write gate, written under it: the pools' rows are read
        and the moves planned (placement's CPU-heavy balanced map) while API changes
        and heartbeats are written; then, under the gate, a pool's moves are written
        only if its map epoch and the SDSs' modes are still those the plan was made
        on (else it is planned again at the next step), so that what is written is
        what deciding under the gate would have written. A pool whose rows (their
        number and highest epoch: :func:`pgtable.row_keys`) and usable devices are
        those of a plan that found nothing to move is settled: not planned again."""
        d = self.detector
        async with d._lock:
            async with d.sessions() as s, s.begin():
                modes = dict((await s.execute(select(Sds.id, Sds.mode))).all())
                eligible = self.eligible_sds(modes)
                pools = (
                    await s.execute(
                        select(StoragePool).where(
                            select(Volume.id).where(Volume.pool_id == StoragePool.id).exists()
                        )
                    )
                ).scalars()
                plans = []
                for pool in list(pools):
                    moves = await self._plan(s, pool, eligible, modes)
                    if moves:
                        plans.append((pool.id, pool.map_epoch, moves))
            if not plans:
                return 0
            started = 0
            async with writing(d.gate, d.sessions) as s:
                if dict((await s.execute(select(Sds.id, Sds.mode))).all()) != modes:
                    return 0  # a drain or maintenance meanwhile: plan again
                for pool_id, map_epoch, moves in plans:
                    now = await s.get(StoragePool, pool_id)
                    if now is None or now.map_epoch != map_epoch:
                        continue  # its map changed meanwhile: plan again
                    await pgtable.write(s, now, moves)
                    started += len(moves)
                    log.info(
                        "pool %s: rebalance moves %d PG cop%s (map epoch %d)",
                        now.name,
                        len(moves),
                        "y" if len(moves) == 1 else "ies",
                        now.map_epoch,
                    )
                if started:
                    epoch = await bump(s)
        if started:
            d.notifier.publish(epoch)
            self.moves_started += started
        return started

    async def _plan(
        self,
        s: AsyncSession,
        pool: StoragePool,
        eligible: frozenset[int],
        modes: dict[int, SdsMode],
    ) -> list[PgChange]:
        """Load and decide (:func:`plan_moves`): the moves to start in ``pool``. A
        settled pool (:meth:`step`) costs two small reads: its rows are not loaded."""
        members = await pool_devices(s, pool.id)
        usable = [d for d in members if d.sds_id in eligible]
        rows_key = (await pgtable.row_keys(s, [pool.id])).get(pool.id, (0, 0))
        key = (pool.pg_count, rows_key, tuple(usable))
        if self._settled.get(pool.id) == key:
            return []
        rows = await pgtable.load(s, pool_id=pool.id)
        if not all_clean(rows):
            return []
        normal = [i for i in copy_holders(rows, members) if modes.get(i) == SdsMode.NORMAL]
        if self._waits(pool, self.detector.down_sds(normal)):
            return []
        moves = plan_moves(pool.pg_count, rows, usable)
        if moves:
            self._settled.pop(pool.id, None)
        else:
            self._settled[pool.id] = key
        return moves

    def _waits(self, pool: StoragePool, silent: frozenset[int]) -> bool:
        """Whether ``pool`` waits for the failure detector: SDSs with copies there
        stopped heartbeating and the detector has not acted yet, so their PGs are about
        to be rebuilt and moves now would be undone. (One never seen is not waited
        for: the detector never acts on it, and its copies are moved away as from any
        ineligible SDS.)"""
        if not silent:
            self._waiting.discard(pool.id)
            return False
        if pool.id not in self._waiting:
            log.info(
                "pool %s: rebalance waits for the failure detector (SDSs %s silent)",
                pool.name,
                sorted(silent),
            )
        self._waiting.add(pool.id)
        return True

    async def run(self, interval_s: float) -> None:
        while True:
            await stopping.pause(interval_s)
            try:
                await self.step()
            except Exception:
                log.exception("rebalance step failed; trying again in %.0f s", interval_s)


def all_clean(rows: Sequence[PgRow]) -> bool:
    """Whether the pool has PGs and all are clean: moves start only then (rebuild
    first)."""
    return bool(rows) and all(r.state == PgState.CLEAN for r in rows)


def copy_holders(rows: Sequence[PgRow], members: Sequence[DeviceInfo]) -> set[int]:
    """The SDSs holding a copy (primary or secondary) of the pool's PGs, among the
    SDSs of ``members``."""
    sds_of = {x.device_id: x.sds_id for x in members}
    return {sds_of[dev] for r in rows for dev in (r.primary, r.secondary) if dev in sds_of}


def plan_moves(
    pg_count: int, rows: Sequence[PgRow], usable: Sequence[DeviceInfo]
) -> list[PgChange]:
    """The moves to start in a pool, pure: a target for the PGs whose copies differ
    from the balanced map :func:`~meshblock.mdm.placement.compute_map` computes over
    the ``usable`` devices (those of eligible SDSs) from the map as it will be once
    the moves in flight are done, without the copies on devices that are not usable.

    Nothing moves unless every PG is clean, the usable devices span two failure
    domains, and fewer than ``max(2, usable devices)`` moves are in flight (the rest
    of that budget is started). Copies on devices that are not usable (a drain) go
    first, then the rest by PG; one copy per PG (:func:`_one_move`), none in a PG
    whose move is in flight."""
    if not all_clean(rows):
        return []
    in_flight = sum(1 for r in rows if r.target is not None)
    budget = max(2, len(usable)) - in_flight
    if budget <= 0 or len({failure_domain(x) for x in usable}) < 2:
        return []
    info = {x.device_id: x for x in usable}
    want = compute_map(pg_count, usable, _after_moves(rows, info))
    order = sorted(
        (r for r in rows if r.target is None),
        key=lambda r: (r.primary in info and r.secondary in info, r.pg),
    )
    moves: list[PgChange] = []
    for row in order:
        if len(moves) >= budget:
            break
        move = _one_move(row.primary, row.secondary, want.get(row.pg, (None, None)), info)
        if move is not None:
            target, moving = move
            moves.append(PgChange(row, replace(row, target=target, moving=moving)))
    return moves


def _after_moves(rows: Sequence[PgRow], info: Mapping[int, DeviceInfo]) -> dict[int, PgAssignment]:
    """The map as it will be once the moves in flight are done, without the copies on
    devices not in ``info`` (those are refilled: moved away)."""
    after: dict[int, PgAssignment] = {}
    for r in rows:
        p, sec = r.primary, r.secondary
        if r.target is not None:
            p, sec = (sec, r.target) if r.moving == "primary" else (p, r.target)
        after[r.pg] = (p if p in info else None, sec if sec in info else None)
    return after


def _one_move(
    primary: int | None,
    secondary: int | None,
    want: tuple[int | None, int | None],
    info: dict[int, DeviceInfo],
) -> tuple[int, str] | None:
    """(target device, ``"primary"`` or ``"secondary"``): the next copy of a PG to move
    towards ``want``, or None when it is there already (or no legal move exists now)."""
    if primary is None or secondary is None:
        return None  # a missing copy is the rebuild's job, not ours
    wanted = {w for w in want if w is not None}
    if len(wanted) < 2 or wanted == {primary, secondary}:
        return None
    arriving = sorted(wanted - {primary, secondary})
    for moving, old, stays in (("secondary", secondary, primary), ("primary", primary, secondary)):
        if old in wanted:
            continue
        for new in arriving:
            stay = info.get(stays)
            dest = info[new]
            if stay is not None and (
                dest.sds_id == stay.sds_id or failure_domain(dest) == failure_domain(stay)
            ):
                continue
            if stay is None:
                continue  # the copy that stays is not eligible either: move it first
            return new, moving
    return None
