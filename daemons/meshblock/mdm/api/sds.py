"""SDSs: registration, devices, heartbeats."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from meshblock.auth import Role
from meshblock.mdm import failures, pgmaps, schemas
from meshblock.mdm.api import routes
from meshblock.mdm.api.common import (
    change,
    get_or_404,
    json,
    must_exist,
    name_free,
    reading,
    size_field,
    ts,
)
from meshblock.mdm.context import ctx
from meshblock.mdm.errors import Conflict, Invalid, NotFound
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import (
    Device,
    FaultSet,
    PlacementGroup,
    ProtectionDomain,
    Sds,
    StoragePool,
    VolumeUsage,
)
from meshblock.mdm.routing import path_id
from meshblock.mdm.schemas import MAX_DEVICE_BYTES
from meshblock.sizes import MiB

log = logging.getLogger(__name__)
TAG = "SDS"
MIN_DEVICE_BYTES = 64 * MiB


def device_doc(d: Device) -> dict[str, Any]:
    return {
        "id": d.id,
        "sds_id": d.sds_id,
        "pool_id": d.pool_id,
        "path": d.path,
        "name": d.name,
        "capacity_bytes": d.capacity_bytes,
        "used_bytes": d.used_bytes,
    }


def sds_doc(s: Sds, live: Liveness) -> dict[str, Any]:
    seen = live.seen("sds", s.id) or s.last_seen
    return {
        "id": s.id,
        "name": s.name,
        "protection_domain_id": s.protection_domain_id,
        "fault_set_id": s.fault_set_id,
        "address": s.address,
        "data_port": s.data_port,
        "control_port": s.control_port,
        "state": live.state("sds", s.id),
        "last_seen": ts(seen),
        "devices": [device_doc(d) for d in s.devices],
        "created_at": ts(s.created_at),
    }


WITH_DEVICES = (selectinload(Sds.devices),)


async def _load(session: AsyncSession, sds_id: int) -> Sds:
    return await get_or_404(session, Sds, sds_id, "SDS", WITH_DEVICES)


async def _check_placement(session: AsyncSession, pd_id: int, fault_set_id: int | None) -> None:
    await must_exist(session, ProtectionDomain, pd_id, "protection domain", "protection_domain_id")
    if fault_set_id is not None:
        fs = await session.get(FaultSet, fault_set_id)
        if fs is None:
            raise NotFound(f"no fault set with id {fault_set_id}", {"field": "fault_set_id"})
        if fs.protection_domain_id != pd_id:
            raise Invalid(
                f"fault set {fs.name!r} belongs to another protection domain",
                {"field": "fault_set_id"},
            )


async def _add_devices(
    session: AsyncSession, sds: Sds, specs: list[dict[str, Any]], existing_paths: set[str]
) -> list[Device]:
    """Validate and add devices; return them. Recomputes the maps of the pools touched."""
    added: list[Device] = []
    paths = set(existing_paths)
    pools: dict[int, StoragePool] = {}
    for i, spec in enumerate(specs):
        field = f"devices.{i}"
        if spec["path"] in paths:
            raise Conflict(
                f"SDS {sds.name!r} already has a device {spec['path']!r}",
                {"field": f"{field}.path"},
            )
        paths.add(spec["path"])
        capacity = size_field(spec["capacity"], f"{field}.capacity", MAX_DEVICE_BYTES)
        if capacity < MIN_DEVICE_BYTES:
            raise Invalid(
                f"{field}.capacity: a device needs at least {MIN_DEVICE_BYTES} bytes",
                {"field": f"{field}.capacity"},
            )
        pool = pools.get(spec["pool_id"]) or await session.get(StoragePool, spec["pool_id"])
        if pool is None:
            raise NotFound(
                f"no storage pool with id {spec['pool_id']}", {"field": f"{field}.pool_id"}
            )
        if pool.protection_domain_id != sds.protection_domain_id:
            raise Invalid(
                f"storage pool {pool.name!r} is in another protection domain than SDS {sds.name!r}",
                {"field": f"{field}.pool_id"},
            )
        pools[pool.id] = pool
        dev = Device(
            sds_id=sds.id,
            pool_id=pool.id,
            path=spec["path"],
            name=spec.get("name"),
            capacity_bytes=capacity,
            used_bytes=0,
        )
        session.add(dev)
        added.append(dev)
    await session.flush()
    for pool in pools.values():
        await pgmaps.recompute(session, pool)
    return added


@routes.route(
    "GET", "/api/v1/sds", role=Role.READONLY, tag=TAG, summary="List SDSs", response="SdsList"
)
async def list_sds(request: web.Request) -> web.Response:
    live = ctx(request).liveness
    async with reading(request) as s:
        rows = (await s.execute(select(Sds).options(*WITH_DEVICES).order_by(Sds.id))).scalars()
        return json({"sds": [sds_doc(x, live) for x in rows]})


async def _endpoint_free(s: AsyncSession, address: str, port: int, exclude_id: int | None) -> None:
    q = select(Sds.name).where(Sds.address == address, Sds.data_port == port)
    if exclude_id is not None:
        q = q.where(Sds.id != exclude_id)
    other = (await s.execute(q)).scalar()
    if other is not None:
        raise Conflict(f"SDS {other!r} already serves {address}:{port}", {"field": "data_port"})


async def _create(s: AsyncSession, body: dict[str, Any]) -> Sds:
    await name_free(s, Sds, body["name"], "SDS")
    await _endpoint_free(s, body["address"], body.get("data_port", 7072), None)
    await _check_placement(s, body["protection_domain_id"], body.get("fault_set_id"))
    sds = Sds(
        name=body["name"],
        protection_domain_id=body["protection_domain_id"],
        fault_set_id=body.get("fault_set_id"),
        address=body["address"],
        data_port=body.get("data_port", 7072),
        control_port=body.get("control_port", 7073),
    )
    s.add(sds)
    await s.flush()
    await _add_devices(s, sds, body.get("devices", []), set())
    return sds


@routes.route(
    "POST",
    "/api/v1/sds",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Add an SDS with its devices",
    body=schemas.SDS_CREATE,
    response="Sds",
    errors=(404, 409),
)
async def create_sds(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        sds = await _create(s, body)
        log.info("SDS %s added at %s:%d", sds.name, sds.address, sds.data_port)
    async with reading(request) as s:
        return json(sds_doc(await _load(s, sds.id), ctx(request).liveness), 201)


async def _id_of(
    s: AsyncSession, model: Any, name: str, what: str, field: str, **scope: Any
) -> int:
    q = select(model.id).where(model.name == name)
    for k, v in scope.items():
        q = q.where(getattr(model, k) == v)
    found = (await s.execute(q)).scalar()
    if found is None:
        raise NotFound(f"no {what} named {name!r}", {"field": field})
    return int(found)


async def _resolve_names(s: AsyncSession, named: dict[str, Any]) -> dict[str, Any]:
    """The registration body with protection domain, fault set and pool names as ids."""
    body = {k: v for k, v in named.items() if k not in ("protection_domain", "fault_set")}
    pd_id = await _id_of(
        s, ProtectionDomain, named["protection_domain"], "protection domain", "protection_domain"
    )
    body["protection_domain_id"] = pd_id
    if named.get("fault_set") is not None:
        body["fault_set_id"] = await _id_of(
            s,
            FaultSet,
            named["fault_set"],
            "fault set in this protection domain",
            "fault_set",
            protection_domain_id=pd_id,
        )
    elif "fault_set" in named:
        body["fault_set_id"] = None
    devices = []
    for i, d in enumerate(named.get("devices", [])):
        pool_id = await _id_of(s, StoragePool, d["pool"], "storage pool", f"devices.{i}.pool")
        devices.append({k: v for k, v in d.items() if k != "pool"} | {"pool_id": pool_id})
    body["devices"] = devices
    return body


@routes.route(
    "POST",
    "/api/v1/sds/register",
    role=Role.COMPONENT,
    tag=TAG,
    summary="An SDS daemon registers itself by names from its config (creates or updates)",
    body=schemas.SDS_REGISTER,
    response="Sds",
    errors=(404, 409),
    also=(201,),
)
async def register_sds(request: web.Request, named: dict[str, Any]) -> web.Response:
    live = ctx(request).liveness
    async with change(request) as s:
        body = await _resolve_names(s, named)
        sds = (
            await s.execute(select(Sds).where(Sds.name == body["name"]).options(*WITH_DEVICES))
        ).scalar_one_or_none()
        created = sds is None
        if sds is None:
            sds = await _create(s, body)
        else:
            if sds.protection_domain_id != body["protection_domain_id"]:
                raise Conflict(
                    f"SDS {sds.name!r} is registered in another protection domain",
                    {"field": "protection_domain_id"},
                )
            if "fault_set_id" in body and body["fault_set_id"] != sds.fault_set_id:
                raise Conflict(
                    f"SDS {sds.name!r} is registered in another fault set",
                    {"field": "fault_set_id"},
                )
            await _endpoint_free(s, body["address"], body.get("data_port", sds.data_port), sds.id)
            sds.address = body["address"]
            sds.data_port = body.get("data_port", sds.data_port)
            sds.control_port = body.get("control_port", sds.control_port)
            known = {d.path for d in sds.devices}
            new = [d for d in body.get("devices", []) if d["path"] not in known]
            await _add_devices(s, sds, new, known)
        sds_id = sds.id
    live.beat("sds", sds_id)
    log.info("SDS %s %s", named["name"], "registered" if created else "re-registered")
    async with reading(request) as s:
        return json(sds_doc(await _load(s, sds_id), live), 201 if created else 200)


@routes.route(
    "GET",
    r"/api/v1/sds/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show an SDS",
    response="Sds",
    errors=(404,),
)
async def get_sds(request: web.Request) -> web.Response:
    async with reading(request) as s:
        return json(sds_doc(await _load(s, path_id(request)), ctx(request).liveness))


async def _holds_data(s: AsyncSession, sds_id: int, device_id: int | None = None) -> int:
    q = select(func.coalesce(func.sum(Device.used_bytes), 0)).where(Device.sds_id == sds_id)
    if device_id is not None:
        q = q.where(Device.id == device_id)
    used = int((await s.execute(q)).scalar_one())
    if device_id is None:
        chunks = int(
            (
                await s.execute(
                    select(func.coalesce(func.sum(VolumeUsage.chunks), 0)).where(
                        VolumeUsage.sds_id == sds_id
                    )
                )
            ).scalar_one()
        )
        used = max(used, chunks * MiB)
    return used


async def _release_devices(s: AsyncSession, device_ids: list[int]) -> None:
    """Take devices out of every PG (before deleting them), then refill the maps."""
    pool_ids = set(
        (await s.execute(select(Device.pool_id).where(Device.id.in_(device_ids)))).scalars()
    )
    await s.execute(
        update(PlacementGroup)
        .where(PlacementGroup.primary_device_id.in_(device_ids))
        .values(primary_device_id=None)
    )
    await s.execute(
        update(PlacementGroup)
        .where(PlacementGroup.secondary_device_id.in_(device_ids))
        .values(secondary_device_id=None)
    )
    for dev_id in device_ids:
        dev = await s.get(Device, dev_id)
        if dev is not None:
            await s.delete(dev)
    await s.flush()
    for pool_id in pool_ids:
        pool = await s.get(StoragePool, pool_id)
        if pool is not None:
            await pgmaps.recompute(s, pool)


@routes.route(
    "DELETE",
    r"/api/v1/sds/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Remove an SDS that holds no data",
    errors=(404, 409),
)
async def delete_sds(request: web.Request) -> web.Response:
    async with change(request) as s:
        sds = await _load(s, path_id(request))
        used = await _holds_data(s, sds.id)
        if used:
            raise Conflict(
                f"SDS {sds.name!r} still holds {used} bytes of data; drain it first",
                {"used_bytes": used},
            )
        await _release_devices(s, [d.id for d in sds.devices])
        await s.delete(sds)
        ctx(request).liveness.forget("sds", sds.id)
        log.info("SDS %s removed", sds.name)
    return web.Response(status=204)


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/devices",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Add a device to an SDS",
    body=schemas.DEVICE_SPEC,
    response="Device",
    errors=(404, 409),
)
async def add_device(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        sds = await _load(s, path_id(request))
        (dev,) = await _add_devices(s, sds, [body], {d.path for d in sds.devices})
        await s.refresh(dev)
    return json(device_doc(dev), 201)


@routes.route(
    "DELETE",
    r"/api/v1/sds/{id:\d+}/devices/{device_id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Remove a device that holds no data",
    errors=(404, 409),
)
async def remove_device(request: web.Request) -> web.Response:
    sds_id, dev_id = path_id(request), path_id(request, "device_id")
    async with change(request) as s:
        sds = await _load(s, sds_id)
        if dev_id not in {d.id for d in sds.devices}:
            raise NotFound(f"SDS {sds.name!r} has no device with id {dev_id}")
        used = await _holds_data(s, sds.id, dev_id)
        if used:
            raise Conflict(
                f"device {dev_id} still holds {used} bytes of data", {"used_bytes": used}
            )
        await _release_devices(s, [dev_id])
    return web.Response(status=204)


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/heartbeat",
    role=Role.COMPONENT,
    tag=TAG,
    summary="SDS heartbeat with device and volume usage",
    body=schemas.SDS_HEARTBEAT,
    response="Heartbeat",
    errors=(404,),
)
async def sds_heartbeat(request: web.Request, body: dict[str, Any]) -> web.Response:
    c = ctx(request)
    sds_id = path_id(request)
    if c.liveness.seen("sds", sds_id) is None:
        # Unknown to memory: either never seen since start or not registered at all.
        async with reading(request) as s:
            await get_or_404(s, Sds, sds_id, "SDS")
    c.liveness.beat("sds", sds_id, body.get("devices"), body.get("volumes"))
    return json({"state": "connected", "epoch": c.notifier.epoch})


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/pg-synced",
    role=Role.COMPONENT,
    tag=TAG,
    summary="A primary SDS reports a PG's secondary resynchronised: the PG becomes clean",
    body=schemas.PG_SYNCED,
    response="PgSynced",
    errors=(404, 409),
)
async def pg_synced(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        epoch = await failures.mark_synced(
            s, path_id(request), int(body["pool_id"]), int(body["pg"]), int(body["epoch"])
        )
    return json({"pool_id": body["pool_id"], "pg": body["pg"], "state": "clean", "epoch": epoch})
