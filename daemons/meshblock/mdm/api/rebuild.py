"""Rebuild and rebalance progress per storage pool (``GET /api/v1/rebuild``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from meshblock.auth import Role
from meshblock.mdm.api.common import json
from meshblock.mdm.context import MdmContext, ctx
from meshblock.mdm.models import PgState, PlacementGroup, ProtectionDomain, StoragePool
from meshblock.mdm.progress import KINDS
from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
TAG = "rebuild"


async def rebuild_status(c: MdmContext) -> list[dict[str, Any]]:
    """Per pool: PGs by state, moves in progress, and per kind of copy the bytes
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
