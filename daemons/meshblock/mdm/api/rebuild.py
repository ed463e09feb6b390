"""Rebuild and rebalance progress per storage pool (``GET /api/v1/rebuild``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from meshblock.auth import Role
from meshblock.mdm.api.common import json
from meshblock.mdm.context import MdmContext, ctx
from meshblock.mdm.models import (
    Device,
    PgState,
    PlacementGroup,
    ProtectionDomain,
    Sds,
    SdsMode,
    StoragePool,
)
from meshblock.mdm.progress import KINDS
from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
TAG = "rebuild"


async def rebuild_status(c: MdmContext) -> list[dict[str, Any]]:
    """Per pool: PGs by state, moves in progress, the seconds left of
    ``rebuild_delay_s`` of a lost SDS holding its data, and per kind of copy the bytes
    remaining, copied, the rate and an ETA (see docs/mdm.md, "Rebuild")."""
    async with c.sessions() as s, s.begin():
        pools = (
            await s.execute(
                select(StoragePool, ProtectionDomain.name)
                .join(ProtectionDomain, ProtectionDomain.id == StoragePool.protection_domain_id)
                .order_by(StoragePool.id)
            )
        ).all()
        counts = (
            await s.execute(
                select(PlacementGroup.pool_id, PlacementGroup.state, func.count()).group_by(
                    PlacementGroup.pool_id, PlacementGroup.state
                )
            )
        ).all()
        moving = dict(
            (
                await s.execute(
                    select(PlacementGroup.pool_id, func.count())
                    .where(PlacementGroup.target_device_id.is_not(None))
                    .group_by(PlacementGroup.pool_id)
                )
            ).all()
        )
        # the pools of the lost SDSs waited for: asked only when one is (the scrub's
        # scheduler reads this every second, and almost always none is)
        waits = c.detector.rebuild_waits() if c.detector is not None else {}
        holders = (
            (
                await s.execute(
                    select(Device.pool_id, Device.sds_id)
                    .join(Sds, Sds.id == Device.sds_id)
                    .where(Sds.mode != SdsMode.MAINTENANCE, Device.sds_id.in_(list(waits)))
                    .distinct()
                )
            ).all()
            if waits
            else []
        )
    delay_left: dict[int, float] = {}
    for pool_id, sds_id in holders:
        if sds_id in waits:
            left = delay_left.get(pool_id)
            delay_left[pool_id] = waits[sds_id] if left is None else min(left, waits[sds_id])
    states: dict[int, dict[PgState, int]] = {p.id: dict.fromkeys(PgState, 0) for p, _ in pools}
    for pool_id, state, n in counts:
        states[pool_id][state] = n
    out = []
    for pool, pd_name in pools:
        st = states[pool.id]
        active = {
            "rebuild": bool(st[PgState.REBUILDING] or st[PgState.RESYNCING]),
            "rebalance": bool(moving.get(pool.id)),
        }
        doc: dict[str, Any] = {
            "pool_id": pool.id,
            "name": pool.name,
            "protection_domain": pd_name,
            "pgs": {k.value: v for k, v in st.items()},
            "pgs_moving": int(moving.get(pool.id, 0)),
            "rebuild_concurrency": pool.rebuild_concurrency,
            "rebuild_bandwidth_mibps": pool.rebuild_bandwidth_mibps,
            # seconds until the first lost SDS holding this pool's data is rebuilt
            # away from (its rebuild_delay_s running out); None: none is waited for
            "rebuild_delay_left_s": delay_left.get(pool.id),
        }
        for kind in KINDS:
            remaining = c.progress.remaining(pool.id, kind) if active[kind] else 0
            rate = c.progress.rate(pool.id, kind)
            doc[kind] = {
                "active": active[kind],
                "remaining_bytes": remaining,
                "copied_bytes": c.progress.copied(pool.id, kind),
                "rate_bytes_per_s": round(rate, 1),
                "eta_s": round(remaining / rate, 1) if remaining and rate > 0 else None,
            }
        out.append(doc)
    return out


@routes.route(
    "GET",
    "/api/v1/rebuild",
    role=Role.READONLY,
    tag=TAG,
    summary="Rebuild, resync and rebalance progress per storage pool",
    response="Rebuild",
)
async def get_rebuild(request: web.Request) -> web.Response:
    return json({"pools": await rebuild_status(ctx(request))})
