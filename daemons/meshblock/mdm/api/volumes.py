"""Volumes (thin and thick) and their mappings to SDCs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from meshblock import pki
from meshblock.auth import Role
from meshblock.mdm import mappings, schemas
from meshblock.mdm.api.common import (
    WAIT_PARAMS,
    change,
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
from meshblock.mdm.authz import CALLER
from meshblock.mdm.capacity import CHUNK_BYTES, COPIES, pool_capacity, volume_allocated
from meshblock.mdm.context import ctx
from meshblock.mdm.errors import Conflict, InsufficientCapacity, Invalid, NotFound
from meshblock.mdm.models import (
    AccessMode,
    Mapping,
    Sdc,
    StoragePool,
    Volume,
    VolumeState,
    VolumeType,
    VolumeUsage,
)
from meshblock.mdm.routing import ApiRoutes, QueryParam, path_id, query_float, query_int
from meshblock.mdm.schemas import MAX_VOLUME_BYTES
from meshblock.sizes import format_size

log = logging.getLogger(__name__)
routes = ApiRoutes()
TAG = "volumes"
WITH_MAPPINGS = (selectinload(Volume.mappings),)


def volume_doc(v: Volume, allocated: int, stored_chunks: int) -> dict[str, Any]:
    """``chunks_left``/``bytes_left``: of a deleting volume, the copies of its chunks
    that the SDSs still hold (every copy counted); 0 for an active one."""
    deleting = v.state == VolumeState.DELETING
    return {
        "id": v.id,
        "name": v.name,
        "pool_id": v.pool_id,
        "type": v.type.value,
        "size_bytes": v.size_bytes,
        "allocated_bytes": allocated,
        "mapped_sdc_ids": sorted(m.sdc_id for m in v.mappings),
        "state": v.state.value,
        "chunks_left": stored_chunks if deleting else 0,
        "bytes_left": stored_chunks * CHUNK_BYTES if deleting else 0,
        "created_at": ts(v.created_at),
    }


def mapping_doc(m: Mapping) -> dict[str, Any]:
    return {
        "id": m.id,
        "volume_id": m.volume_id,
        "sdc_id": m.sdc_id,
        "access_mode": m.access_mode.value,
        "iops_limit": m.iops_limit,
        "bandwidth_limit_bps": m.bandwidth_limit_bps,
        "created_at": ts(m.created_at),
    }


async def volume_docs(s: AsyncSession, volumes: list[Volume]) -> list[dict[str, Any]]:
    alloc = await volume_allocated(s, volumes)
    deleting = [v.id for v in volumes if v.state == VolumeState.DELETING]
    stored: dict[int, int] = {}
    if deleting:
        rows = await s.execute(
            select(VolumeUsage.volume_id, func.sum(VolumeUsage.chunks))
            .where(VolumeUsage.volume_id.in_(deleting))
            .group_by(VolumeUsage.volume_id)
        )
        stored = {vid: int(n or 0) for vid, n in rows}
    return [volume_doc(v, alloc[v.id], stored.get(v.id, 0)) for v in volumes]


async def _active_or_409(s: AsyncSession, vid: int, options: tuple[Any, ...] = ()) -> Volume:
    v = await get_or_404(s, Volume, vid, "volume", options)
    if v.state != VolumeState.ACTIVE:
        raise Conflict(f"volume {v.name!r} (id {v.id}) is being deleted", {"state": v.state.value})
    return v


def _rounded(size: int, granularity: int) -> int:
    return -(-size // granularity) * granularity


async def _ensure_fits(s: AsyncSession, pool: StoragePool, extra_thick_bytes: int) -> None:
    if extra_thick_bytes <= 0:
        return
    cap = await pool_capacity(s, pool.id)
    needed = COPIES * extra_thick_bytes
    if needed > cap.free_bytes:
        raise InsufficientCapacity(
            f"storage pool {pool.name!r} cannot hold {format_size(needed)} more "
            f"({COPIES} copies of {format_size(extra_thick_bytes)}): "
            f"{format_size(cap.free_bytes)} free of {format_size(cap.usable_bytes)} usable "
            f"({format_size(cap.spare_bytes)} held as spare)",
            {"requested_bytes": needed, **cap.as_dict()},
        )


@routes.route(
    "GET",
    "/api/v1/volumes",
    role=Role.READONLY,
    tag=TAG,
    summary="List volumes",
    response="VolumeList",
    query=(QueryParam("pool_id", "only this storage pool's", minimum=1),),
)
async def list_volumes(request: web.Request) -> web.Response:
    pool_id = query_int(request, "pool_id", minimum=1)
    q = select(Volume).options(*WITH_MAPPINGS).order_by(Volume.id)
    if pool_id is not None:
        q = q.where(Volume.pool_id == pool_id)
    async with reading(request) as s:
        return json({"volumes": await volume_docs(s, list((await s.execute(q)).scalars()))})


@routes.route(
    "POST",
    "/api/v1/volumes",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Create a thin or thick volume; the size is rounded up to the pool's "
    "allocation granularity",
    body=schemas.VOLUME_CREATE,
    response="Volume",
    errors=(404, 409),
)
async def create_volume(request: web.Request, body: dict[str, Any]) -> web.Response:
    size = size_field(body["size"], "size", MAX_VOLUME_BYTES)
    vtype = VolumeType(body.get("type", "thin"))
    async with change(request) as s:
        pool = await s.get(StoragePool, body["pool_id"])
        if pool is None:
            raise NotFound(f"no storage pool with id {body['pool_id']}", {"field": "pool_id"})
        size = _rounded(size, pool.allocation_granularity_bytes)
        if size > MAX_VOLUME_BYTES:
            raise Invalid(
                f"size: {size} bytes is more than the maximum of {MAX_VOLUME_BYTES}",
                {"field": "size"},
            )
        await name_free(s, Volume, body["name"], "volume", state=VolumeState.ACTIVE)
        if vtype == VolumeType.THICK:
            await _ensure_fits(s, pool, size)
        # Its mappings are none and its chunks none: its document needs no read, and
        # the write gate is held for as few statements as the checks and the INSERT
        # (whose RETURNING brings the id and created_at back).
        v = Volume(name=body["name"], pool_id=pool.id, type=vtype, size_bytes=size, mappings=[])
        s.add(v)
        await s.flush()
        doc = volume_doc(v, COPIES * size if vtype == VolumeType.THICK else 0, 0)
    log.info("volume %s created: %s, %d bytes in pool %s", v.name, vtype.value, size, pool.name)
    return json(doc, 201)


@routes.route(
    "GET",
    r"/api/v1/volumes/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show a volume",
    response="Volume",
    errors=(404,),
)
async def get_volume(request: web.Request) -> web.Response:
    async with reading(request) as s:
        v = await get_or_404(s, Volume, path_id(request), "volume", WITH_MAPPINGS)
        (doc,) = await volume_docs(s, [v])
        return json(doc)


@routes.route(
    "PATCH",
    r"/api/v1/volumes/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    summary="Rename or extend a volume (a volume never shrinks)",
    body=schemas.VOLUME_UPDATE,
    response="Volume",
    errors=(404, 409),
)
async def update_volume(request: web.Request, body: dict[str, Any]) -> web.Response:
    new_size = size_field(body["size"], "size", MAX_VOLUME_BYTES) if "size" in body else None
    async with change(request) as s:
        v = await _active_or_409(s, path_id(request), WITH_MAPPINGS)
        pool = await s.get(StoragePool, v.pool_id)
        assert pool is not None
        if new_size is not None:
            new_size = _rounded(new_size, pool.allocation_granularity_bytes)
            if new_size < v.size_bytes:
                raise Conflict(
                    f"volume {v.name!r} is {format_size(v.size_bytes)}; a volume cannot "
                    f"shrink to {format_size(new_size)}",
                    {"size_bytes": v.size_bytes, "requested_bytes": new_size},
                )
            if new_size > MAX_VOLUME_BYTES:
                raise Invalid("size: more than the maximum volume size", {"field": "size"})
            if v.type == VolumeType.THICK:
                await _ensure_fits(s, pool, new_size - v.size_bytes)
        if "name" in body:
            await name_free(s, Volume, body["name"], "volume", v.id, state=VolumeState.ACTIVE)
            v.name = body["name"]
        if new_size is not None:
            v.size_bytes = new_size
        await s.flush()
        (doc,) = await volume_docs(s, [v])
    return json(doc)


@routes.route(
    "DELETE",
    r"/api/v1/volumes/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete an unmapped volume: at once it is unreadable, its name free and its "
    "state deleting; the SDSs free its chunks in the background, then it is gone",
    errors=(404, 409),
)
async def delete_volume(request: web.Request) -> web.Response:
    """The volume's id is tombstoned in its pool's PG maps (a new map epoch): each SDS
    makes the tombstone durable before it serves anything more of the volume, refuses
    its IO and frees its chunks; an SDS down meanwhile does so when it returns. The
    volume stays listed (state ``deleting``, ``chunks_left``) and its space counted as
    used until every SDS of the pool has reported none left; its id is never reused.
    Deleting a volume that is already deleting changes nothing."""
    async with change(request) as s:
        v = await get_or_404(s, Volume, path_id(request), "volume", WITH_MAPPINGS)
        if v.state == VolumeState.DELETING:
            return web.Response(status=204)
        if v.mappings:
            raise Conflict(
                f"volume {v.name!r} is mapped to {len(v.mappings)} SDC(s); unmap it first",
                {"mapped_sdc_ids": [m.sdc_id for m in v.mappings]},
            )
        pool = await s.get(StoragePool, v.pool_id)
        assert pool is not None
        pool.map_epoch += 1
        v.state = VolumeState.DELETING
        v.deleted_epoch = pool.map_epoch
    log.info(
        "volume %s (id %d) deleting: tombstoned in pool %d's map epoch %d",
        v.name,
        v.id,
        v.pool_id,
        v.deleted_epoch,
    )
    return web.Response(status=204)


# ---- mappings ----------------------------------------------------------------------


def _limits(body: dict[str, Any], m: Mapping) -> None:
    if "access_mode" in body:
        m.access_mode = AccessMode(body["access_mode"])
    if "iops_limit" in body:
        m.iops_limit = body["iops_limit"]
    if "bandwidth_limit" in body:
        bw = body["bandwidth_limit"]
        m.bandwidth_limit_bps = None if bw is None else size_field(bw, "bandwidth_limit", 2**53)


@routes.route(
    "GET",
    "/api/v1/mappings",
    role=Role.READONLY,
    tag=TAG,
    summary="List volume-to-SDC mappings",
    response="MappingList",
    query=(
        QueryParam("volume_id", "only this volume's", minimum=1),
        QueryParam("sdc_id", "only this SDC's", minimum=1),
    ),
)
async def list_mappings(request: web.Request) -> web.Response:
    q = select(Mapping).order_by(Mapping.id)
    vid = query_int(request, "volume_id", minimum=1)
    sid = query_int(request, "sdc_id", minimum=1)
    if vid is not None:
        q = q.where(Mapping.volume_id == vid)
    if sid is not None:
        q = q.where(Mapping.sdc_id == sid)
    async with reading(request) as s:
        return json({"mappings": [mapping_doc(m) for m in (await s.execute(q)).scalars()]})


@routes.route(
    "POST",
    "/api/v1/mappings",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Map a volume to an SDC, with an access mode and QoS limits",
    body=schemas.MAPPING_CREATE,
    response="Mapping",
    errors=(404, 409),
)
async def create_mapping(request: web.Request, body: dict[str, Any]) -> web.Response:
    m = Mapping(
        volume_id=body["volume_id"], sdc_id=body["sdc_id"], access_mode=AccessMode.READ_WRITE
    )
    _limits(body, m)
    async with change(request) as s:
        await must_exist(s, Volume, m.volume_id, "volume", "volume_id")
        await _active_or_409(s, m.volume_id)
        await must_exist(s, Sdc, m.sdc_id, "SDC", "sdc_id")
        dup = (
            await s.execute(
                select(Mapping.id).where(
                    Mapping.volume_id == m.volume_id, Mapping.sdc_id == m.sdc_id
                )
            )
        ).scalar()
        if dup is not None:
            raise Conflict("the volume is already mapped to this SDC", {"mapping_id": dup})
        s.add(m)
        await mappings.touch(s, m.volume_id)
        await s.flush()
        await s.refresh(m)
    return json(mapping_doc(m), 201)


@routes.route(
    "GET",
    r"/api/v1/mappings/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show a mapping",
    response="Mapping",
    errors=(404,),
)
async def get_mapping(request: web.Request) -> web.Response:
    async with reading(request) as s:
        return json(mapping_doc(await get_or_404(s, Mapping, path_id(request), "mapping")))


CONFIRM_TIMEOUT = QueryParam(
    "confirm_timeout",
    "seconds to wait for every SDS of the volume's pool to hold the new mappings "
    "(0 to 30), and name those that have not (they may still serve the SDC as before): "
    "a DELETE answers 200 and a MappingRevocation (without it, 204), a PATCH that makes "
    "the mapping read-only the Mapping with it in revocation",
    type="number",
    minimum=0,
    maximum=int(mappings.MAX_CONFIRM_S),
)


def confirm_timeout(request: web.Request) -> float | None:
    """The ``confirm_timeout`` query parameter (None: not given)."""
    if "confirm_timeout" not in request.query:
        return None
    return query_float(request, "confirm_timeout", 0.0, 0.0, mappings.MAX_CONFIRM_S)


@routes.route(
    "PATCH",
    r"/api/v1/mappings/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    summary="Change a mapping's access mode or QoS limits (null clears a limit); with "
    "confirm_timeout, a change to read-only waits for the SDSs to take it",
    body=schemas.MAPPING_UPDATE,
    response="MappingUpdated",
    query=(CONFIRM_TIMEOUT,),
    errors=(400, 404),
)
async def update_mapping(request: web.Request, body: dict[str, Any]) -> web.Response:
    wait = confirm_timeout(request)
    async with change(request) as s:
        m = await get_or_404(s, Mapping, path_id(request), "mapping")
        was_writable = m.access_mode == AccessMode.READ_WRITE
        _limits(body, m)
        await mappings.touch(s, m.volume_id)
        # writes revoked: what the SDSs must take before the SDC's writes are refused
        revoked = was_writable and m.access_mode == AccessMode.READ_ONLY
        if wait is not None and revoked:  # what the wait needs, read under the change
            pool_id, epoch = await _mappings_epoch_of(s, m.volume_id)
            sdss = await mappings.pool_sdss(s, pool_id)
    doc = mapping_doc(m)
    if wait is None:
        return json(doc)
    doc["revocation"] = None
    if revoked:
        doc["revocation"] = await _revocation(request, m, sdss, pool_id, epoch, wait)
    return json(doc)


@routes.route(
    "DELETE",
    r"/api/v1/mappings/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Unmap a volume from an SDC; with confirm_timeout, wait for the SDSs to "
    "take it and say which have not",
    response="MappingRevocation",
    query=(CONFIRM_TIMEOUT,),
    also=(200,),
    errors=(400, 404),
)
async def delete_mapping(request: web.Request) -> web.Response:
    wait = confirm_timeout(request)
    async with change(request) as s:
        m = await get_or_404(s, Mapping, path_id(request), "mapping")
        await s.delete(m)
        await mappings.touch(s, m.volume_id)
        if wait is not None:  # what the wait needs, read under the change
            pool_id, epoch = await _mappings_epoch_of(s, m.volume_id)
            sdss = await mappings.pool_sdss(s, pool_id)
    if wait is None:
        return web.Response(status=204)
    return json(await _revocation(request, m, sdss, pool_id, epoch, wait))


async def _revocation(
    request: web.Request,
    m: Mapping,
    sdss: list[tuple[int, str]],
    pool_id: int,
    epoch: int,
    wait_s: float,
) -> dict[str, Any]:
    """Wait up to ``wait_s`` for the SDSs of the pool to hold the mappings ``epoch``
    that revoked (some of) ``m``; the MappingRevocation, logged when not confirmed."""
    c = ctx(request)
    report = await mappings.revocation(
        c.mapping_docs,
        sdss,
        pool_id,
        epoch,
        wait_s,
        c.config.tls.enabled,
        lambda sds_id: c.liveness.state("sds", sds_id),
        lambda: c.notifier.closing,
    )
    report |= {"mapping_id": m.id, "volume_id": m.volume_id, "sdc_id": m.sdc_id}
    if report["unconfirmed"]:
        log.warning(
            "mapping %d (volume %d to SDC %d) %s; not confirmed within %g s by %s: "
            "they may still serve that SDC as before until they reach the MDM",
            m.id,
            m.volume_id,
            m.sdc_id,
            "made read-only" if request.method == "PATCH" else "deleted",
            wait_s,
            ", ".join(f"sds:{n}" for n in report["unconfirmed"]),
        )
    return report


async def _mappings_epoch_of(s: AsyncSession, volume_id: int) -> tuple[int, int]:
    """``(pool id, mappings epoch)`` of the volume's pool, as this transaction has it."""
    row = (
        await s.execute(
            select(StoragePool.id, StoragePool.mappings_epoch)
            .join(Volume, Volume.pool_id == StoragePool.id)
            .where(Volume.id == volume_id)
        )
    ).one()
    return int(row[0]), int(row[1])


@routes.route(
    "GET",
    r"/api/v1/pools/{id:\d+}/mappings",
    role=Role.COMPONENT,
    tag=TAG,
    summary="Which SDCs the pool's volumes are mapped to, read-only or not (what the "
    "SDSs check client IO by); with wait_epoch, waits for a change of them; with since, "
    "only whether they changed",
    response="PoolMappings",
    query=(
        *WAIT_PARAMS,
        QueryParam(
            "since",
            "the mappings epoch the caller has: at that epoch still, answer "
            '{"pool_id", "epoch", "unchanged": true} without the volumes',
            minimum=0,
            maximum=2**62,
        ),
    ),
    errors=(404,),
)
async def pool_mappings(request: web.Request) -> web.Response:
    pool_id = path_id(request)
    since = query_int(request, "since", minimum=0, maximum=2**62)
    c = ctx(request)
    docs = c.mapping_docs

    async def mappings_epoch(s: AsyncSession) -> int:
        # read once for every long-poll woken at this cluster epoch
        known = await docs.epoch(c.sessions, c.notifier.epoch, pool_id)
        if known is not None:
            return known
        return (await get_or_404(s, StoragePool, pool_id, "storage pool")).mappings_epoch

    # An SDS names the epoch it holds: what an unmap waits for (mappings.Confirmations)
    caller = request.get(CALLER)
    sds = caller.name if caller is not None and caller.kind == pki.Kind.SDS else None
    if sds is not None:
        docs.confirmations.begin(pool_id, sds, since)
    try:
        return await _pool_mappings(request, pool_id, since, mappings_epoch)
    finally:
        if sds is not None:
            docs.confirmations.end(pool_id, sds)


async def _pool_mappings(
    request: web.Request,
    pool_id: int,
    since: int | None,
    mappings_epoch: Callable[[AsyncSession], Awaitable[int]],
) -> web.Response:
    docs = ctx(request).mapping_docs
    await long_poll(request, mappings_epoch)
    async with reading(request) as s:
        pool = await get_or_404(s, StoragePool, pool_id, "storage pool")
        if since is not None and pool.mappings_epoch == since:
            # what an SDS's refresh after a refused IO, and a long-poll's timeout,
            # mostly get: a few bytes instead of the document (up to ~870 KB)
            return json({"pool_id": pool_id, "epoch": since, "unchanged": True, "term": docs.term})
        doc = await docs.document(s, pool)
    return await encoded_json(request, doc.body, doc.gzipped)
