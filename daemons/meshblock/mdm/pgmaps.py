"""PG maps of storage pools: recomputed from the pool's devices, stored, served.

:func:`recompute` runs inside the transaction of a change of the pool's membership
(an SDS or a device joining or leaving, the pool created). It hands the pool's devices
and its current map to :func:`meshblock.mdm.placement.compute_map`, writes the PGs
that changed and bumps the pool's ``map_epoch``: the membership is part of the map.

Data safety: once a pool has volumes, a copy that is in place is never moved by a
recompute, because moving it means moving its data, which is the job of rebalance
(:mod:`meshblock.mdm.rebalance`, with the data). Only missing copies are filled. A
pool without volumes holds no data: its map is laid out afresh each time.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

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
from meshblock.mdm.placement import DeviceInfo, PgAssignment, compute_map


async def pool_devices(
    session: AsyncSession, pool_id: int, *, failed: bool = False
) -> list[DeviceInfo]:
    """The pool's devices that may take copies; with ``failed``, failed ones too."""
    q = (
        select(Device.id, Device.sds_id, Sds.fault_set_id, Device.capacity_bytes)
        .join(Sds, Sds.id == Device.sds_id)
        .where(Device.pool_id == pool_id)
        .order_by(Device.id)
    )
    if not failed:
        q = q.where(Device.state != DeviceState.FAILED)
    return [DeviceInfo(d, s, f, c) for d, s, f, c in await session.execute(q)]


async def recompute(session: AsyncSession, pool: StoragePool) -> bool:
    """Recompute and store ``pool``'s map; True when an assignment changed.

    Rows are read as tuples and written with one executemany per kind of change:
    a pool of 4096 PGs is recomputed without building 4096 ORM objects.
    """
    devices = await pool_devices(session, pool.id)
    rows = await session.execute(
        select(
            PlacementGroup.pg, PlacementGroup.primary_device_id, PlacementGroup.secondary_device_id
        ).where(PlacementGroup.pool_id == pool.id)
    )
    previous: dict[int, PgAssignment] = {pg: (p, s) for pg, p, s in rows}
    has_data = await _holds_volumes(session, pool.id)
    if has_data:
        # A copy on a failed device stays where it is here: the failure detector
        # fails it over (it alone knows which copy is in sync); nothing new goes there.
        new = _fill_only(
            previous,
            compute_map(pool.pg_count, devices, previous),
            await pool_devices(session, pool.id, failed=True),
        )
    else:
        # Nothing to move yet: the map is laid out afresh, so that it is as balanced
        # and its copies' partners as spread as placement makes them, whatever the
        # order in which the SDSs joined.
        new = compute_map(pool.pg_count, devices)
    # A copy placed anew next to one holding data is empty: the primary rebuilds it.
    filled_state = PgState.REBUILDING if has_data else PgState.CLEAN
    next_epoch = pool.map_epoch + 1
    added, moved = [], []
    for n in range(pool.pg_count):
        primary, secondary = new.get(n, (None, None))
        row = {
            "b_pool": pool.id,
            "b_pg": n,
            "b_p": primary,
            "b_s": secondary,
            "b_e": next_epoch,
            "b_state": filled_state if n in previous else PgState.CLEAN,
        }
        if n not in previous:
            added.append(row)
        elif previous[n] != (primary, secondary):
            moved.append(row)
    table = PlacementGroup.metadata.tables[PlacementGroup.__tablename__]
    conn = await session.connection()
    values: dict[str, Any] = {
        "primary_device_id": bindparam("b_p"),
        "secondary_device_id": bindparam("b_s"),
        "epoch": bindparam("b_e"),
        "state": bindparam("b_state"),
    }
    if added:
        await conn.execute(
            insert(table).values(pool_id=bindparam("b_pool"), pg=bindparam("b_pg"), **values),
            added,
        )
    if moved:
        await conn.execute(
            update(table)
            .where(table.c.pool_id == bindparam("b_pool"), table.c.pg == bindparam("b_pg"))
            .values(**values),
            moved,
        )
    pool.map_epoch = next_epoch
    await session.flush()
    return bool(added or moved)


async def _holds_volumes(session: AsyncSession, pool_id: int) -> bool:
    found = await session.execute(select(Volume.id).where(Volume.pool_id == pool_id).limit(1))
    return found.scalar() is not None


def _fill_only(
    previous: dict[int, PgAssignment],
    proposed: dict[int, PgAssignment],
    devices: list[DeviceInfo],
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


async def drop(session: AsyncSession, pool_id: int) -> None:
    await session.execute(delete(PlacementGroup).where(PlacementGroup.pool_id == pool_id))


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
