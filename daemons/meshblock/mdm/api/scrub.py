"""Background scrub per storage pool: progress, findings, start and pause
(``GET /api/v1/scrub``, ``GET /api/v1/pools/{id}/scrub``, ``POST .../scrub/start``,
``POST .../scrub/pause``; docs/mdm.md, "Scrub"). The schedule itself is
:class:`meshblock.mdm.scrub.ScrubSchedule`; :func:`run` ticks it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from sqlalchemy import select

from meshblock.auth import Role
from meshblock.mdm.api.common import get_or_404, json, reading
from meshblock.mdm.api.rebuild import rebuild_status
from meshblock.mdm.context import MdmContext, ctx
from meshblock.mdm.models import StoragePool
from meshblock.mdm.routing import ApiRoutes, path_id
from meshblock.mdm.scrub import ScrubSchedule

log = logging.getLogger(__name__)
routes = ApiRoutes()
TAG = "scrub"
TICK_S = 1.0  # how often passes are started and completed


def _schedule(c: MdmContext) -> ScrubSchedule:
    if c.scrub is None:
        s = c.config.scrub
        c.scrub = ScrubSchedule(s.period_s, s.bandwidth_mibps, s.start_delay_s, time.monotonic())
    return c.scrub


async def tick(c: MdmContext) -> None:
    """Start and complete passes from the pools' PG states now."""
    pools = {
        int(p["pool_id"]): (
            sum(p["pgs"].values()),
            bool(p["pgs"]["rebuilding"] or p["pgs"]["resyncing"] or p["pgs_moving"]),
        )
        for p in await rebuild_status(c)
    }
    _schedule(c).tick(time.monotonic(), pools)


async def run(c: MdmContext) -> None:
    """The scheduler: a tick every second, until cancelled."""
    _schedule(c)
    while True:
        try:
            await tick(c)
        except Exception:  # the database unavailable a moment: the next tick
            log.exception("scrub schedule tick failed")
        await asyncio.sleep(TICK_S)


def heartbeat(c: MdmContext, sds_id: int, doc: dict[str, Any] | None) -> dict[str, Any]:
    """An SDS heartbeat's ``scrub`` in; the reply's ``scrub`` (orders) out."""
    s = _schedule(c)
    acked = s.report(sds_id, doc)
    return {"orders": s.orders(), "findings_acked": acked}


async def statuses(c: MdmContext) -> list[dict[str, Any]]:
    """Every pool's scrub status (with its name), by pool id."""
    s = _schedule(c)
    async with c.sessions() as session, session.begin():
        pools = (await session.execute(select(StoragePool).order_by(StoragePool.id))).scalars()
        names = {p.id: p.name for p in pools}
    now, wall = time.monotonic(), time.time()
    return [{**s.status(pid, wall, now), "name": name} for pid, name in names.items()]


async def _pool_status(request: web.Request, pool_id: int) -> dict[str, Any]:
    c = ctx(request)
    async with reading(request) as session:
        pool = await get_or_404(session, StoragePool, pool_id, "storage pool")
        name = pool.name
    return {**_schedule(c).status(pool_id, time.time(), time.monotonic()), "name": name}


@routes.route(
    "GET",
    "/api/v1/scrub",
    role=Role.READONLY,
    tag=TAG,
    summary="Background scrub progress and findings of every storage pool",
    response="ScrubList",
)
async def get_scrubs(request: web.Request) -> web.Response:
    return json({"pools": await statuses(ctx(request))})


@routes.route(
    "GET",
    r"/api/v1/pools/{id:\d+}/scrub",
    role=Role.READONLY,
    tag=TAG,
    summary="A storage pool's background scrub: progress and findings",
    response="Scrub",
    errors=(404,),
)
async def get_scrub(request: web.Request) -> web.Response:
    return json(await _pool_status(request, path_id(request)))


@routes.route(
    "POST",
    r"/api/v1/pools/{id:\d+}/scrub/start",
    role=Role.ADMIN,
    tag=TAG,
    summary="Start a scrub pass of the pool now, or resume a paused one",
    response="Scrub",
    errors=(404,),
)
async def start_scrub(request: web.Request) -> web.Response:
    pool_id = path_id(request)
    await _pool_status(request, pool_id)  # 404 for an unknown pool
    c = ctx(request)
    await tick(c)  # the pool is known to the schedule with its PG count
    _schedule(c).start(pool_id, time.monotonic())
    log.info("scrub of pool %d started by the operator", pool_id)
    return json(await _pool_status(request, pool_id))


@routes.route(
    "POST",
    r"/api/v1/pools/{id:\d+}/scrub/pause",
    role=Role.ADMIN,
    tag=TAG,
    summary="Pause the pool's scrub (no pass runs until it is started again)",
    response="Scrub",
    errors=(404,),
)
async def pause_scrub(request: web.Request) -> web.Response:
    pool_id = path_id(request)
    await _pool_status(request, pool_id)
    _schedule(ctx(request)).pause(pool_id)
    log.info("scrub of pool %d paused by the operator", pool_id)
    return json(await _pool_status(request, pool_id))
