"""SDCs: registration, heartbeats, and the maps each SDC follows."""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock.auth import Role
from meshblock.mdm import authz, heartbeats, pgmaps, schemas
from meshblock.mdm.api.common import (
    WAIT_PARAMS,
    change,
    encoded_json,
    get_or_404,
    json,
    long_poll,
    name_free,
    reading,
    ts,
)
from meshblock.mdm.context import ctx
from meshblock.mdm.epochs import current
from meshblock.mdm.errors import BadRequest, Conflict, NotFound
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import Mapping, Sdc, StoragePool, Volume
from meshblock.mdm.routing import ApiRoutes, QueryParam, path_id

log = logging.getLogger(__name__)
routes = ApiRoutes()
TAG = "SDC"


def sdc_doc(c: Sdc, live: Liveness) -> dict[str, Any]:
    return {
        "id": c.id,
        "guid": c.guid,
        "name": c.name,
        "address": c.address,
        "control_port": c.control_port,
        "nbd_port": c.nbd_port,
        "state": live.state("sdc", c.id),
        "last_seen": ts(live.seen("sdc", c.id) or c.last_seen),
        "created_at": ts(c.created_at),
    }


@routes.route(
    "GET", "/api/v1/sdc", role=Role.READONLY, tag=TAG, summary="List SDCs", response="SdcList"
)
async def list_sdc(request: web.Request) -> web.Response:
    live = ctx(request).liveness
    async with reading(request) as s:
        rows = (await s.execute(select(Sdc).order_by(Sdc.id))).scalars()
        return json({"sdc": [sdc_doc(c, live) for c in rows]})


async def _guid_free(s: AsyncSession, guid: str) -> None:
    if (await s.execute(select(Sdc.id).where(Sdc.guid == guid))).scalar() is not None:
        raise Conflict(f"an SDC with GUID {guid!r} already exists", {"field": "guid"})


def _apply(c: Sdc, body: dict[str, Any]) -> None:
    for k in ("address", "control_port", "nbd_port"):
        if k in body:
            setattr(c, k, body[k])


@routes.route(
    "POST",
    "/api/v1/sdc",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Add an SDC by GUID and host name",
    body=schemas.SDC_CREATE,
    response="Sdc",
    errors=(409,),
)
async def create_sdc(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        await _guid_free(s, body["guid"])
        await name_free(s, Sdc, body["name"], "SDC")
        c = Sdc(guid=body["guid"], name=body["name"])
        _apply(c, body)
        s.add(c)
        await s.flush()
        await s.refresh(c)
    return json(sdc_doc(c, ctx(request).liveness), 201)


@routes.route(
    "POST",
    "/api/v1/sdc/register",
    role=Role.COMPONENT,
    tag=TAG,
    summary="An SDC daemon registers itself (creates or updates by GUID)",
    body=schemas.SDC_CREATE,
    response="Sdc",
    errors=(409,),
    also=(201,),
)
async def register_sdc(request: web.Request, body: dict[str, Any]) -> web.Response:
    authz.require_self(request, authz.Kind.SDC, body["guid"])
    live = ctx(request).liveness
    async with change(request) as s:
        c = (await s.execute(select(Sdc).where(Sdc.guid == body["guid"]))).scalar_one_or_none()
        created = c is None
        if c is None:
            await name_free(s, Sdc, body["name"], "SDC")
            c = Sdc(guid=body["guid"], name=body["name"])
            s.add(c)
        _apply(c, body)
        await s.flush()
        await s.refresh(c)
    live.beat("sdc", c.id)
    log.info("SDC %s (%s) %s", c.name, c.guid, "registered" if created else "re-registered")
    return json(sdc_doc(c, live), 201 if created else 200)


@routes.route(
    "GET",
    r"/api/v1/sdc/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show an SDC",
    response="Sdc",
    errors=(404,),
)
async def get_sdc(request: web.Request) -> web.Response:
    async with reading(request) as s:
        return json(
            sdc_doc(await get_or_404(s, Sdc, path_id(request), "SDC"), ctx(request).liveness)
        )


@routes.route(
    "PATCH",
    r"/api/v1/sdc/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    summary="Rename an SDC",
    body=schemas.SDC_UPDATE,
    response="Sdc",
    errors=(404, 409),
)
async def rename_sdc(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        c = await get_or_404(s, Sdc, path_id(request), "SDC")
        await name_free(s, Sdc, body["name"], "SDC", c.id)
        c.name = body["name"]
    return json(sdc_doc(c, ctx(request).liveness))


@routes.route(
    "DELETE",
    r"/api/v1/sdc/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Remove an SDC that has no mapped volume",
    errors=(404, 409),
)
async def delete_sdc(request: web.Request) -> web.Response:
    async with change(request) as s:
        c = await get_or_404(s, Sdc, path_id(request), "SDC")
        n = (
            await s.execute(select(func.count()).select_from(Mapping).where(Mapping.sdc_id == c.id))
        ).scalar_one()
        if n:
            raise Conflict(
                f"SDC {c.name!r} still has {n} mapped volume(s); unmap them first",
                {"dependents": "mapping", "count": n},
            )
        await s.delete(c)
        ctx(request).liveness.forget("sdc", c.id)
    return web.Response(status=204)


@routes.route(
    "POST",
    r"/api/v1/sdc/{id:\d+}/heartbeat",
    role=Role.COMPONENT,
    tag=TAG,
    summary="SDC heartbeat",
    body=schemas.SDC_HEARTBEAT,
    decode=heartbeats.decode_sdc,
    response="Heartbeat",
    errors=(404,),
)
async def sdc_heartbeat(request: web.Request, epoch: int | None) -> web.Response:
    c = ctx(request)
    sdc_id = path_id(request)
    if c.liveness.seen("sdc", sdc_id) is None:
        async with reading(request) as s:
            found = (await s.execute(select(Sdc.id).where(Sdc.id == sdc_id))).scalar()
        if found is None:
            raise NotFound(f"no SDC with id {sdc_id}")
    c.liveness.beat("sdc", sdc_id)
    c.reported.epoch(epoch)
    return json(
        {
            "state": "connected",
            "epoch": c.notifier.epoch,
            "term": c.term,
            "heartbeat_interval_s": c.config.cluster.interval_s,
        }
    )


@routes.route(
    "GET",
    r"/api/v1/sdc/{id:\d+}/maps",
    role=Role.COMPONENT,
    tag=TAG,
    summary="The volumes mapped to an SDC and the PG maps of their pools; "
    "with wait_epoch, waits for a change",
    response="SdcMaps",
    query=(
        *WAIT_PARAMS,
        QueryParam(
            "map_epochs",
            "the map epoch of each pool the caller has, as POOL:EPOCH,...: each such pool's "
            "map is a delta from it (PgMapDelta) when the MDM has one",
            type="string",
            minimum=None,
            maximum=None,
        ),
    ),
    errors=(400, 404),
)
async def sdc_maps(request: web.Request) -> web.Response:
    sdc_id = path_id(request)
    have = _map_epochs(request.query.get("map_epochs"))
    async with reading(request) as s:
        await get_or_404(s, Sdc, sdc_id, "SDC")
    await long_poll(request, current)
    async with reading(request) as s:
        await get_or_404(s, Sdc, sdc_id, "SDC")
        epoch = await current(s)
        rows = (
            await s.execute(
                select(Mapping, Volume)
                .join(Volume, Volume.id == Mapping.volume_id)
                .where(Mapping.sdc_id == sdc_id)
                .order_by(Volume.id)
            )
        ).all()
        pool_ids = sorted({v.pool_id for _, v in rows})
        pools = list(
            (await s.execute(select(StoragePool).where(StoragePool.id.in_(pool_ids)))).scalars()
        )
        maps = await pgmaps.map_documents(s, pools, ctx(request).map_cache)
    head = {
        "epoch": epoch,
        "term": ctx(request).term,
        "sdc_id": sdc_id,
        "volumes": [
            {
                "id": v.id,
                "name": v.name,
                "pool_id": v.pool_id,
                "size_bytes": v.size_bytes,
                "access_mode": m.access_mode.value,
                "iops_limit": m.iops_limit,
                "bandwidth_limit_bps": m.bandwidth_limit_bps,
            }
            for m, v in rows
        ],
    }
    # The pools' documents are spliced in as the cache encoded them (once per map
    # epoch), not encoded again for every SDC.
    # and gzipped the same way: each pool's document deflated once per map epoch,
    # only the bytes around them compressed per request
    pieces: list[bytes | pgmaps.MapDocument] = [pgmaps.encode(head)[:-1] + b', "pools": {']
    cache = ctx(request).map_cache
    for n, (k, d) in enumerate(sorted(maps.items())):
        since = have.get(k)
        delta = None if since is None else cache.delta(k, since, d)
        pieces += [b'%s"%d": ' % (b"," if n else b"", k), d if delta is None else delta]
    pieces.append(b"}}")
    body = b"".join(p.body if isinstance(p, pgmaps.MapDocument) else p for p in pieces)

    async def compressed() -> bytes:
        return pgmaps.gzip_pieces(pieces)[1]

    return await encoded_json(request, body, compressed)


def _map_epochs(raw: str | None) -> dict[int, int]:
    """``POOL:EPOCH,...`` (the ``map_epochs`` query parameter) as pool -> map epoch."""
    out: dict[int, int] = {}
    for part in (raw or "").split(","):
        if not part:
            continue
        if not re.fullmatch(r"[0-9]{1,10}:[0-9]{1,18}", part):
            raise BadRequest(f"map_epochs: {part[:40]!r} is not POOL:EPOCH")
        pool, _, epoch = part.partition(":")
        out[int(pool)] = int(epoch)
    return out
