"""PG maps of storage pools: recomputed from the pool's devices, stored, served.

:func:`recompute` runs inside the transaction of a change of the pool's membership
(an SDS or a device joining or leaving, the pool created). It hands the pool's devices
and its current map to :func:`meshblock.mdm.placement.compute_map` (through the pure
:func:`plan_map`) and writes the PGs that changed through the PG table's gateway
(:mod:`meshblock.mdm.pgtable`) in a new ``map_epoch`` of the pool, changed or not: the
membership is part of the map.

Data safety: once a pool has volumes, a copy that is in place is never moved by a
recompute, because moving it means moving its data, which is the job of rebalance
(:mod:`meshblock.mdm.rebalance`, with the data). Only missing copies are filled. A
pool without volumes holds no data: its map is laid out afresh each time.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from meshblock.mdm import pgtable
from meshblock.mdm.deletion import pool_tombstones
from meshblock.mdm.epochs import current
from meshblock.mdm.models import (
    Device,
    DeviceState,
    PgState,
    PlacementGroup,
    Sds,
    StoragePool,
    Volume,
)
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, PgAssignment, compute_map


async def pool_devices(
    session: AsyncSession, pool_id: int, *, failed: bool = False, without: Collection[int] = ()
) -> list[DeviceInfo]:
    """The pool's devices that may take copies; with ``failed``, failed ones too;
    never those of ``without`` (being removed)."""
    q = (
        select(Device.id, Device.sds_id, Sds.fault_set_id, Device.capacity_bytes)
        .join(Sds, Sds.id == Device.sds_id)
        .where(Device.pool_id == pool_id)
        .order_by(Device.id)
    )
    if not failed:
        q = q.where(Device.state != DeviceState.FAILED)
    if without:
        q = q.where(Device.id.not_in(list(without)))
    return [DeviceInfo(d, s, f, c) for d, s, f, c in await session.execute(q)]


async def recompute(
    session: AsyncSession, pool: StoragePool, *, without: Collection[int] = ()
) -> bool:
    """Recompute and store ``pool``'s map, in a new map epoch; True when a PG changed.
    ``without``: devices being removed, taken out of every PG first. Load, decide
    (:func:`plan_map`), write."""
    devices = await pool_devices(session, pool.id, without=without)
    rows = await pgtable.load(session, pool_id=pool.id)
    has_data = await _holds_volumes(session, pool.id)
    # Every device that may keep its copies, failed ones too: the failure detector
    # fails a failed one over (it alone knows which copy is in sync).
    keeping = await pool_devices(session, pool.id, failed=True, without=without)
    changes = plan_map(pool.id, pool.pg_count, rows, devices, keeping, has_data=has_data)
    await pgtable.write(session, pool, changes)
    return bool(changes)


def plan_map(
    pool_id: int,
    pg_count: int,
    rows: Sequence[PgRow],
    devices: Sequence[DeviceInfo],
    keeping: Sequence[DeviceInfo],
    *,
    has_data: bool,
) -> list[PgChange]:
    """The changes that give a pool the map placement computes over ``devices`` (those
    that may take copies), pure. Copies on devices not in ``keeping`` (removed) are
    dropped first, with a move towards one. A pool that holds data keeps every other
    copy and only fills the missing ones (the filled PGs become ``rebuilding``); one
    without data is laid out afresh, so that it is as balanced and its copies'
    partners as spread as placement makes them, whatever the order in which the SDSs
    joined. A PG whose copies change loses its move (a move needs a clean PG with the
    copies it was planned on). A PG missing from ``rows`` is added."""
    present = {d.device_id for d in keeping}
    by_pg = {row.pg: _without_removed(row, present) for row in rows}
    previous: dict[int, PgAssignment] = {n: (r.primary, r.secondary) for n, r in by_pg.items()}
    if has_data:
        new = _fill_only(previous, compute_map(pg_count, devices, previous), keeping)
    else:
        new = compute_map(pg_count, devices)
    # A copy placed anew next to one holding data is empty: the primary rebuilds it.
    filled_state = PgState.REBUILDING if has_data else PgState.CLEAN
    changes = []
    for row in rows:
        if row.pg >= pg_count:
            continue
        after = by_pg[row.pg]
        primary, secondary = new.get(row.pg, (None, None))
        if (primary, secondary) != previous[row.pg]:
            # A move needs a clean PG with the copies it was planned on: it goes.
            after = replace(
                after,
                primary=primary,
                secondary=secondary,
                state=filled_state,
                target=None,
                moving=None,
            )
        if after != row:
            changes.append(PgChange(row, after))
    for n in range(pg_count):
        if n not in by_pg:
            primary, secondary = new.get(n, (None, None))
            changes.append(PgChange(None, PgRow(pool_id, n, primary, secondary, PgState.CLEAN)))
    return changes


def _without_removed(row: PgRow, present: Collection[int]) -> PgRow:
    """``row`` without the copies (and the move) on devices not ``present``."""

    def kept(device: int | None) -> int | None:
        return device if device in present else None

    target, moving = (row.target, row.moving) if row.target in present else (None, None)
    return replace(
        row,
        primary=kept(row.primary),
        secondary=kept(row.secondary),
        target=target,
        moving=moving,
    )


async def _holds_volumes(session: AsyncSession, pool_id: int) -> bool:
    found = await session.execute(select(Volume.id).where(Volume.pool_id == pool_id).limit(1))
    return found.scalar() is not None


def _fill_only(
    previous: dict[int, PgAssignment],
    proposed: dict[int, PgAssignment],
    devices: Sequence[DeviceInfo],
) -> dict[int, PgAssignment]:
    """Keep every copy in place; fill a missing copy from ``proposed`` where legal."""
    info = {d.device_id: d for d in devices}

    def domain(dev: int) -> tuple[str, int]:
        d = info[dev]
        return ("fs", d.fault_set_id) if d.fault_set_id is not None else ("sds", d.sds_id)

    def compatible(a: int, b: int) -> bool:
        return info[a].sds_id != info[b].sds_id and domain(a) != domain(b)

    out: dict[int, PgAssignment] = {}
    for pg, (p, s) in proposed.items():
        old_p, old_s = previous.get(pg, (None, None))
        kept = [c for c in (old_p, old_s) if c is not None and c in info]
        if len(kept) == 2:
            out[pg] = (kept[0], kept[1])
        elif len(kept) == 1:
            partner = next(
                (c for c in (p, s) if c is not None and c != kept[0] and compatible(kept[0], c)),
                None,
            )
            out[pg] = (kept[0], partner)
        else:
            out[pg] = (p, s)
    return out


MapCache = dict[int, tuple[tuple[int, int], dict[str, Any]]]


async def map_documents(
    session: AsyncSession, pools: list[StoragePool], cache: MapCache | None = None
) -> dict[int, Any]:
    """The PG map documents of ``pools`` (see docs/api.md, PgMap).

    With ``cache``, a document is built once per (map epoch, cluster epoch): a thousand
    SDSs fetching a changed map cost one build, not a thousand. The cluster epoch is
    part of the key because an SDS's address may change without a new map epoch.
    """
    if not pools:
        return {}
    out: dict[int, Any] = {}
    missing = pools
    if cache is not None:
        cluster_epoch = await current(session)
        missing = []
        for p in pools:
            hit = cache.get(p.id)
            if hit is not None and hit[0] == (p.map_epoch, cluster_epoch):
                out[p.id] = hit[1]
            else:
                missing.append(p)
    if missing:
        built = await _build(session, missing)
        out.update(built)
        if cache is not None:
            for p in missing:
                cache[p.id] = ((p.map_epoch, cluster_epoch), built[p.id])
    return out


async def _build(session: AsyncSession, pools: list[StoragePool]) -> dict[int, Any]:
    ids = [p.id for p in pools]
    # PGs first, with the SDS of each copy from the same statement; members and
    # addresses after. On SQLite two SELECTs of one transaction may see different
    # snapshots: read in this order, every device and SDS a PG names is there.
    pdev, sdev, tdev = aliased(Device), aliased(Device), aliased(Device)
    rows = (
        await session.execute(
            select(
                PlacementGroup.pool_id,
                PlacementGroup.pg,
                PlacementGroup.primary_device_id,
                PlacementGroup.secondary_device_id,
                PlacementGroup.state,
                PlacementGroup.target_device_id,
                PlacementGroup.moving,
                pdev.sds_id,
                sdev.sds_id,
                tdev.sds_id,
            )
            .outerjoin(pdev, pdev.id == PlacementGroup.primary_device_id)
            .outerjoin(sdev, sdev.id == PlacementGroup.secondary_device_id)
            .outerjoin(tdev, tdev.id == PlacementGroup.target_device_id)
            .where(PlacementGroup.pool_id.in_(ids))
            .order_by(PlacementGroup.pool_id, PlacementGroup.pg)
        )
    ).all()
    dev_rows = (
        await session.execute(
            select(Device.id, Device.sds_id, Device.pool_id)
            .where(Device.pool_id.in_(ids))
            .order_by(Device.id)
        )
    ).all()
    dev_sds = {d: sds for d, sds, _ in dev_rows}
    for _, _, primary, secondary, _, target, _, p_sds, s_sds, t_sds in rows:
        for dev, sds in ((primary, p_sds), (secondary, s_sds), (target, t_sds)):
            if dev is not None and sds is not None:
                dev_sds.setdefault(dev, sds)
    sds_rows = (
        await session.execute(
            select(Sds.id, Sds.address, Sds.data_port).where(Sds.id.in_(set(dev_sds.values())))
        )
    ).all()
    sds_doc = {str(i): {"address": a, "data_port": p} for i, a, p in sds_rows}
    pgs: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for pool_id, pg, primary, secondary, state, target, moving, *_ in rows:
        entry: dict[str, Any] = {
            "pg": pg,
            "primary": _copy(primary, dev_sds),
            "secondary": _copy(secondary, dev_sds),
            "state": state.value,
        }
        if target is not None:
            entry["target"] = _copy(target, dev_sds)
            entry["moving"] = moving
        pgs[pool_id].append(entry)
    tombstones = await pool_tombstones(session, ids)
    out: dict[int, Any] = {}
    for p in pools:
        members = [(d, sds) for d, sds, pool_id in dev_rows if pool_id == p.id]
        member_sds = {str(sds) for _, sds in members} | {
            str(c["sds_id"])
            for entry in pgs[p.id]
            for c in (entry["primary"], entry["secondary"], entry.get("target"))
            if c
        }
        out[p.id] = {
            "pool_id": p.id,
            "epoch": p.map_epoch,
            "pg_count": p.pg_count,
            "rebuild_concurrency": p.rebuild_concurrency,
            "rebuild_bandwidth_mibps": p.rebuild_bandwidth_mibps,
            "rebalance_concurrency": p.rebalance_concurrency,
            "rebalance_bandwidth_mibps": p.rebalance_bandwidth_mibps,
            "pgs": pgs[p.id],
            "devices": [{"device_id": d, "sds_id": sds} for d, sds in members],
            "sds": {k: v for k, v in sds_doc.items() if k in member_sds},
            # Deleted volumes whose chunks the SDSs free: volume id -> map epoch of
            # the delete (meshblock.mdm.deletion).
            "tombstones": tombstones[p.id],
        }
    return out


def _copy(device_id: int | None, dev_sds: dict[int, int]) -> dict[str, int] | None:
    if device_id is None:
        return None
    return {"sds_id": dev_sds[device_id], "device_id": device_id}
