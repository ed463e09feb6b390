"""Background scrub per storage pool: progress, findings, start and pause
(``GET /api/v1/scrub``, ``GET /api/v1/pools/{id}/scrub``, ``POST .../scrub/start``,
``POST .../scrub/pause``; docs/mdm.md, "Scrub"). The schedule itself is
:class:`meshblock.mdm.scrub.ScrubSchedule`; :func:`run` ticks it."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from aiohttp import web
from sqlalchemy import select

from meshblock.auth import Role
from meshblock.mdm import stopping
from meshblock.mdm.api.common import get_or_404, json, reading
from meshblock.mdm.api.rebuild import rebuild_status
from meshblock.mdm.context import MdmContext, ctx
from meshblock.mdm.leader import writing
from meshblock.mdm.models import ScrubState, StoragePool
from meshblock.mdm.routing import ApiRoutes, path_id
from meshblock.mdm.scrub import ScrubSchedule

log = logging.getLogger(__name__)
routes = ApiRoutes()
TAG = "scrub"
TICK_S = 1.0  # how often passes are started and completed (and the schedule saved)
_COLUMNS = tuple(ScrubState.__table__.columns.keys())
# One save at a time per schedule: the tick's and an operator's start/pause may both
# insert a pool's first row (session.merge reads, then inserts: two at once, a UNIQUE
# violation answered 409).
_SAVING: weakref.WeakKeyDictionary[ScrubSchedule, asyncio.Lock] = weakref.WeakKeyDictionary()


def _schedule(c: MdmContext) -> ScrubSchedule:
    if c.scrub is None:
        s = c.config.scrub
        c.scrub = ScrubSchedule(s.period_s, s.bandwidth_mibps, s.start_delay_s, time.monotonic())
    return c.scrub


async def _load(c: MdmContext, s: ScrubSchedule) -> None:
    """Take back the schedules kept in the database (once, before the first tick)."""
    async with c.sessions() as session, session.begin():
        rows = (await session.execute(select(ScrubState))).scalars().all()
        kept = [{col: getattr(r, col) for col in _COLUMNS} for r in rows]
    if not s.loaded:
        s.restore(kept, time.time(), time.monotonic())
        s.loaded = True
        if kept:
            log.info("scrub schedule of %d pool(s) resumed from the database", len(kept))


async def save(c: MdmContext) -> None:
    """Keep the schedules of the pools changed since the last save in the database."""
    s = _schedule(c)
    async with _SAVING.setdefault(s, asyncio.Lock()):
        ids = sorted(p for p in s.dirty if p in s.pools)
        s.dirty.clear()
        if not ids:
            return
        wall, now = time.time(), time.monotonic()
        rows = [s.saved(pool_id, wall, now) for pool_id in ids]
        try:
            async with writing(c.write_gate, c.sessions) as session:
                for row in rows:
                    await session.merge(ScrubState(**row))
        except BaseException:
            s.dirty.update(ids)  # the next tick tries again (a pool deleted meanwhile: dropped)
            raise


async def tick(c: MdmContext) -> None:
    """Start and complete passes from the pools' PG states now."""
    s = _schedule(c)
    if not s.loaded:
        await _load(c, s)
    pools = {
        int(p["pool_id"]): (
            sum(p["pgs"].values()),
            bool(p["pgs"]["rebuilding"] or p["pgs"]["resyncing"] or p["pgs_moving"]),
        )
        for p in await rebuild_status(c)
    }
    s.tick(time.monotonic(), pools)
    await save(c)


async def run(c: MdmContext) -> None:
    """The scheduler: a tick every second, until cancelled."""
    _schedule(c)
    while True:
        try:
            await tick(c)
        except Exception:  # the database unavailable a moment: the next tick
            log.exception("scrub schedule tick failed")
        await stopping.pause(TICK_S)


def unready_for(c: MdmContext, doc: dict[str, Any] | None) -> bool:
    """Whether an SDS heartbeat's ``scrub`` comes too early to be taken
    (:meth:`ScrubSchedule.unready_for`): its answer says ``send_full``."""
    return _schedule(c).unready_for(doc)


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
    await save(c)
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
    c = ctx(request)
    if not _schedule(c).loaded:
        await _load(c, _schedule(c))
    _schedule(c).pause(pool_id)
    await save(c)
    log.info("scrub of pool %d paused by the operator", pool_id)
    return json(await _pool_status(request, pool_id))
