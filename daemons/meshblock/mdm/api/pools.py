"""Storage pools: settings, capacity and PG maps."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.auth import Role
from meshblock.mdm import pgmaps, pgtable, schemas, stopcheck
from meshblock.mdm.api.common import (
    DRY_RUN,
    WAIT_PARAMS,
    DryRunDone,
    change,
    dry_run,
    encoded_json,
    get_or_404,
    json,
    long_poll,
    must_exist,
    name_free,
    reading,
    size_field,
    ts,
)
from meshblock.mdm.capacity import PoolCapacity, pool_capacities
from meshblock.mdm.context import ctx
from meshblock.mdm.errors import Conflict, Invalid
from meshblock.mdm.models import Device, ProtectionDomain, StoragePool, Volume
from meshblock.mdm.routing import ApiRoutes, QueryParam, path_id, query_int
from meshblock.sizes import GiB, MiB, TiB

routes = ApiRoutes()
TAG = "storage pools"
DEFAULT_PG_COUNT = 256
DEFAULT_GRANULARITY = GiB

SETTINGS = (
    "spare_percent",
    "rebuild_bandwidth_mibps",
    "rebuild_concurrency",
    "rebalance_bandwidth_mibps",
    "rebalance_concurrency",
    "capacity_alert_high_percent",
    "capacity_alert_critical_percent",
)


def pool_doc(p: StoragePool, cap: PoolCapacity) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": p.id,
        "name": p.name,
        "protection_domain_id": p.protection_domain_id,
        "pg_count": p.pg_count,
        "allocation_granularity_bytes": p.allocation_granularity_bytes,
    }
    doc.update({k: getattr(p, k) for k in SETTINGS})
    doc.update(
        {"map_epoch": p.map_epoch, "capacity": cap.as_dict(), "created_at": ts(p.created_at)}
    )
    return doc


def _check_thresholds(high: int, critical: int) -> None:
    if high > critical:
        raise Invalid(
            "capacity_alert_high_percent must not exceed capacity_alert_critical_percent",
            {"field": "capacity_alert_high_percent"},
        )


@routes.route(
    "GET",
    "/api/v1/pools",
    role=Role.READONLY,
    tag=TAG,
    summary="List storage pools",
    response="PoolList",
    query=(QueryParam("protection_domain_id", "only this protection domain's", minimum=1),),
)
async def list_pools(request: web.Request) -> web.Response:
    pd_id = query_int(request, "protection_domain_id", minimum=1)
    q = select(StoragePool).order_by(StoragePool.id)
    if pd_id is not None:
        q = q.where(StoragePool.protection_domain_id == pd_id)
    async with reading(request) as s:
        pools = list((await s.execute(q)).scalars())
        caps = await pool_capacities(s, [p.id for p in pools])
        return json({"pools": [pool_doc(p, caps[p.id]) for p in pools]})


@routes.route(
    "POST",
    "/api/v1/pools",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Create a storage pool",
    body=schemas.POOL_CREATE,
    response="Pool",
    errors=(404, 409),
)
async def create_pool(request: web.Request, body: dict[str, Any]) -> web.Response:
    granularity = DEFAULT_GRANULARITY
    if "allocation_granularity" in body:
        granularity = size_field(body["allocation_granularity"], "allocation_granularity", TiB)
        if granularity % MiB:
            raise Invalid(
                "allocation_granularity must be a multiple of 1 MiB (the chunk size)",
                {"field": "allocation_granularity"},
            )
    settings = {k: body[k] for k in SETTINGS if k in body}
    pool = StoragePool(
        name=body["name"],
        protection_domain_id=body["protection_domain_id"],
        pg_count=body.get("pg_count", DEFAULT_PG_COUNT),
        allocation_granularity_bytes=granularity,
        **settings,
    )
    _check_thresholds(
        settings.get("capacity_alert_high_percent", 80),
        settings.get("capacity_alert_critical_percent", 90),
    )
    async with change(request) as s:
        await must_exist(
            s,
            ProtectionDomain,
            pool.protection_domain_id,
            "protection domain",
            "protection_domain_id",
        )
        await name_free(s, StoragePool, pool.name, "storage pool")
        s.add(pool)
        await s.flush()
        await s.refresh(pool)
        await pgmaps.recompute(s, pool)
        cap = (await pool_capacities(s, [pool.id]))[pool.id]
    return json(pool_doc(pool, cap), 201)


@routes.route(
    "GET",
    r"/api/v1/pools/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show a storage pool with its capacity",
    response="Pool",
    errors=(404,),
)
async def get_pool(request: web.Request) -> web.Response:
    async with reading(request) as s:
        pool = await get_or_404(s, StoragePool, path_id(request), "storage pool")
        cap = (await pool_capacities(s, [pool.id]))[pool.id]
        return json(pool_doc(pool, cap))


# Pool settings the SDSs need: in the PG map, whose epoch a change bumps.
REBUILD_THROTTLES = (
    "rebuild_concurrency",
    "rebuild_bandwidth_mibps",
    "rebalance_concurrency",
    "rebalance_bandwidth_mibps",
)


@routes.route(
    "PATCH",
    r"/api/v1/pools/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    summary="Rename a storage pool or change its settings (throttles, spare, alerts)",
    body=schemas.POOL_UPDATE,
    response="PoolOrDryRun",
    query=(DRY_RUN,),
    errors=(404, 409),
)
async def update_pool(request: web.Request, body: dict[str, Any]) -> web.Response:
    """With ``dry_run=true`` the change is made and checked in a transaction that is
    rolled back; the answer (a DryRun document) is the settings it would change and
    how long the copies in progress would take at the old and new throttles."""
    try:
        return await _update_pool(request, body, dry_run(request))
    except DryRunDone as done:
        return json(done.doc)


async def _update_pool(request: web.Request, body: dict[str, Any], dry: bool) -> web.Response:
    async with change(request) as s:
        pool = await get_or_404(s, StoragePool, path_id(request), "storage pool")
        before = {k: getattr(pool, k) for k in ("name", *SETTINGS)}
        throttles = {k: getattr(pool, k) for k in REBUILD_THROTTLES}
        if "name" in body:
            await name_free(s, StoragePool, body["name"], "storage pool", pool.id)
            pool.name = body["name"]
        for k in SETTINGS:
            if k in body:
                setattr(pool, k, body[k])
        if any(k in body and body[k] != old for k, old in throttles.items()):
            pool.map_epoch += 1  # the map document carries them to the SDSs
        _check_thresholds(pool.capacity_alert_high_percent, pool.capacity_alert_critical_percent)
        await s.flush()
        if dry:
            after = {k: getattr(pool, k) for k in before}
            raise DryRunDone(
                await stopcheck.pool_update_plan(s, pool, before, after, ctx(request).progress)
            )
        cap = (await pool_capacities(s, [pool.id]))[pool.id]
    return json(pool_doc(pool, cap))


@routes.route(
    "DELETE",
    r"/api/v1/pools/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete a storage pool with no volumes and no devices",
    errors=(404, 409),
)
async def delete_pool(request: web.Request) -> web.Response:
    async with change(request) as s:
        pool = await get_or_404(s, StoragePool, path_id(request), "storage pool")
        for model, what in ((Volume, "volume"), (Device, "device")):
            n = (
                await s.execute(
                    select(func.count()).select_from(model).where(model.pool_id == pool.id)
                )
            ).scalar_one()
            if n:
                raise Conflict(
                    f"storage pool {pool.name!r} still has {n} {what}(s)",
                    {"dependents": what, "count": n},
                )
        await pgtable.drop(s, pool.id)
        await s.delete(pool)
    ctx(request).map_cache.forget(pool.id)  # ids are never reused
    return web.Response(status=204)


@routes.route(
    "GET",
    r"/api/v1/pools/{id:\d+}/pgmap",
    role=Role.COMPONENT,
    tag=TAG,
    summary="The pool's PG map; with wait_epoch, waits for a newer one; with since, "
    "the changes since that map epoch when the MDM has them",
    response="PgMap",
    query=(
        *WAIT_PARAMS,
        QueryParam(
            "since",
            "the map epoch the caller has: answer a delta from it (PgMapDelta) when the "
            "MDM has one, else the whole map",
            minimum=0,
            maximum=2**62,
        ),
    ),
    errors=(404,),
)
async def get_pgmap(request: web.Request) -> web.Response:
    pool_id = path_id(request)
    since = query_int(request, "since", minimum=0, maximum=2**62)
    c = ctx(request)

    async def map_epoch(s: AsyncSession) -> int:
        # shared by every long-poll woken at this cluster epoch: one read for all
        known = (await c.map_epochs.get(c.sessions, c.notifier.epoch)).get(pool_id)
        if known is not None:
            return known
        return (await get_or_404(s, StoragePool, pool_id, "storage pool")).map_epoch

    await long_poll(request, map_epoch)
    async with reading(request) as s:
        pool = await get_or_404(s, StoragePool, pool_id, "storage pool")
        doc = (await pgmaps.map_documents(s, [pool], c.map_cache))[pool.id]
    delta = None if since is None else c.map_cache.delta(pool.id, since, doc)
    if delta is not None:
        return await encoded_json(request, delta.body, pgmaps.gzip_if_large(delta))
    return await encoded_json(request, doc.body, doc.gzipped)
