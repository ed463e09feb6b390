"""SDSs: registration, devices, heartbeats."""

from __future__ import annotations

import logging
import ssl
from typing import Any, cast

from aiohttp import web
from sqlalchemy import delete, func, select
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from meshblock import audit
from meshblock.auth import Role
from meshblock.mdm import (
    authz,
    failures,
    heartbeats,
    holddown,
    pgmaps,
    pgtable,
    schemas,
    stopcheck,
    stopping,
    unclean,
)
from meshblock.mdm.api import join, scrub
from meshblock.mdm.api.common import (
    DRY_RUN,
    DryRunDone,
    change,
    dry_run,
    get_or_404,
    json,
    must_exist,
    name_free,
    reading,
    size_field,
    ts,
)
from meshblock.mdm.context import MdmContext, ctx
from meshblock.mdm.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    error_body,
)
from meshblock.mdm.liveness import Liveness, utcnow
from meshblock.mdm.models import (
    Device,
    DeviceState,
    FaultSet,
    PgState,
    PlacementGroup,
    ProtectionDomain,
    Sds,
    SdsMode,
    StoragePool,
    VolumeUsage,
)
from meshblock.mdm.routing import ApiRoutes, QueryParam, path_id
from meshblock.mdm.schemas import MAX_DEVICE_BYTES
from meshblock.sizes import MiB
from meshblock.wire import tls as wire_tls

log = logging.getLogger(__name__)
routes = ApiRoutes()
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
        "state": d.state.value,
        "failed_at": ts(d.failed_at),
        "error": d.error,
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
        "held_down": live.holds.held(s.id),
        "flapping": live.holds.flapping(s.id),
        "mode": s.mode.value,
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


async def _publish_endpoint(s: AsyncSession, sds: Sds) -> None:
    """An SDS's address or data port changes: a new map epoch of each pool it has a
    device in, whose document names it, so that its peers and the SDCs, which follow
    those maps, learn where it is now (and no document cached for the old epoch is
    served with the old endpoint)."""
    pool_ids = sorted({d.pool_id for d in sds.devices})
    if pool_ids:
        pools = await s.execute(select(StoragePool).where(StoragePool.id.in_(pool_ids)))
        for pool in pools.scalars():
            await pgtable.write(s, pool, [])


async def _endpoint_free(s: AsyncSession, address: str, port: int, exclude_id: int | None) -> None:
    q = select(Sds.name).where(Sds.address == address, Sds.data_port == port)
    if exclude_id is not None:
        q = q.where(Sds.id != exclude_id)
    other = (await s.execute(q)).scalar()
    if other is not None:
        raise Conflict(f"SDS {other!r} already serves {address}:{port}", {"field": "data_port"})


async def _check_new(s: AsyncSession, body: dict[str, Any]) -> None:
    await name_free(s, Sds, body["name"], "SDS")
    await _endpoint_free(s, body["address"], body.get("data_port", 7072), None)
    await _check_placement(s, body["protection_domain_id"], body.get("fault_set_id"))


async def _create(s: AsyncSession, body: dict[str, Any]) -> Sds:
    await _check_new(s, body)
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
    also=(201, 202),
)
async def register_sds(request: web.Request, named: dict[str, Any]) -> web.Response:
    """A name the MDM does not know is a new SDS: created when admitted (a join token,
    its own certificate, an admin, or an admin's approval: :mod:`.join`), else held
    as a request to join, pending (202, nothing placed on it). A known SDS changes its
    address or data port only with its own certificate (or an admin's credential)."""
    authz.require_self(request, authz.Kind.SDS, named["name"])
    live = ctx(request).liveness
    try:
        async with change(request) as s:
            sds_id, created, dirty, how = await _register(request, s, named)
    except join.Pending:
        return json(await join.hold(request, named), 202)
    live.beat("sds", sds_id)
    audit.note(
        request,
        "sds_register" if created else "sds_reregister",
        sds=named["name"],
        sds_id=sds_id,
        address=named["address"],
        data_port=named.get("data_port"),
        **({"admitted": how} if how else {}),
    )
    log.info(
        "SDS %s %s%s%s",
        named["name"],
        "registered" if created else "re-registered",
        f" ({how})" if how else "",
        f" after an unclean stop of {len(dirty)} device(s)" if dirty else "",
    )
    async with reading(request) as s:
        return json(sds_doc(await _load(s, sds_id), live), 201 if created else 200)


def _may_move(request: web.Request, sds: Sds, endpoint: tuple[str, int]) -> None:
    """An SDS's new address or data port is taken only from its own certificate or an
    admin: the cluster secret alone could otherwise send its peers' and the SDCs' IO
    to another host (403, logged)."""
    ident = request.get(authz.CALLER)
    if join.is_admin(request) or (ident is not None and ident.kind == authz.Kind.SDS):
        return  # authz.require_self checked that a certificate names this SDS
    why = (
        f"SDS {sds.name!r} serves at {sds.address}:{sds.data_port}; only its own "
        f"certificate (sds:{sds.name}) or an admin may move it to {endpoint[0]}:{endpoint[1]}"
    )
    log.warning(
        "refused the re-registration of SDS %s from %s (%s): %s",
        sds.name,
        join.caller_of(request),
        request.remote or "?",
        why,
    )
    raise Forbidden(why)


async def _register(
    request: web.Request, s: AsyncSession, named: dict[str, Any]
) -> tuple[int, bool, list[str], str]:
    """Create or update the SDS; (its id, whether created, its unclean devices, how
    a new one was admitted)."""
    how = ""
    body = await _resolve_names(s, named)
    sds = (
        await s.execute(select(Sds).where(Sds.name == body["name"]).options(*WITH_DEVICES))
    ).scalar_one_or_none()
    created = sds is None
    if sds is None:
        await _check_new(s, body)
        how = await join.admit(request, s, named)
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
        endpoint = (body["address"], body.get("data_port", sds.data_port))
        await _endpoint_free(s, *endpoint, sds.id)
        if endpoint != (sds.address, sds.data_port):
            audit.note(request, previous_endpoint=f"{sds.address}:{sds.data_port}")
            _may_move(request, sds, endpoint)
            await _publish_endpoint(s, sds)
        sds.address, sds.data_port = endpoint
        sds.control_port = body.get("control_port", sds.control_port)
        known = {d.path for d in sds.devices}
        new = [d for d in body.get("devices", []) if d["path"] not in known]
        await _add_devices(s, sds, new, known)
    sds_id = sds.id
    dirty = body.get("unclean_devices", [])
    if dirty:
        ids = await unclean.device_ids_of(s, sds_id, dirty)
        if len(ids) != len(set(dirty)):
            missing = sorted(set(dirty) - ids.keys())
            raise Invalid(
                f"unclean_devices: SDS {sds.name!r} has no device {missing[0]!r}",
                {"field": "unclean_devices"},
            )
        await unclean.after_unclean_start(s, sds, set(ids.values()))
    return sds_id, created, dirty, how


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


async def _copies_on(s: AsyncSession, device_ids: list[int]) -> int:
    """How many PG copies (and move targets) are on these devices."""
    if not device_ids:
        return 0
    n = 0
    for col in (
        PlacementGroup.primary_device_id,
        PlacementGroup.secondary_device_id,
        PlacementGroup.target_device_id,
    ):
        n += int((await s.execute(select(func.count()).where(col.in_(device_ids)))).scalar_one())
    return n


async def _release_devices(s: AsyncSession, device_ids: list[int]) -> int:
    """Take devices out of every PG and refill the maps (one new map epoch per pool),
    then delete them; return how many were deleted (fewer than asked when a concurrent
    request deleted some)."""
    pool_ids = set(
        (await s.execute(select(Device.pool_id).where(Device.id.in_(device_ids)))).scalars()
    )
    for pool_id in sorted(pool_ids):
        pool = await s.get(StoragePool, pool_id)
        if pool is not None:
            await pgmaps.recompute(s, pool, without=device_ids)
    # One statement, whose row count tells a device deleted meanwhile (its SDS removed
    # by another request) from one deleted here.
    result = await s.execute(delete(Device).where(Device.id.in_(device_ids)))
    deleted = cast("CursorResult[Any]", result).rowcount
    await s.flush()
    return int(deleted or 0)


@routes.route(
    "DELETE",
    r"/api/v1/sds/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Remove an SDS that holds no data (or a drained one)",
    response="DryRun",
    query=(DRY_RUN,),
    also=(200,),
    errors=(404, 409),
)
async def delete_sds(request: web.Request) -> web.Response:
    """With ``dry_run=true``: the same checks, then 200 with what the removal would
    do (a DryRun document; nothing to copy) instead of removing it."""
    try:
        return await _delete_sds(request, dry_run(request))
    except DryRunDone as done:
        return json(done.doc)


async def _delete_sds(request: web.Request, dry: bool) -> web.Response:
    async with change(request) as s:
        sds = await _load(s, path_id(request))
        copies = await _copies_on(s, [d.id for d in sds.devices])
        if sds.mode == SdsMode.DRAINING:
            # Drained: its chunks are copies the map no longer names, garbage.
            if copies:
                raise Conflict(
                    f"SDS {sds.name!r} is draining: {copies} PG cop(ies) still to move",
                    {"pg_copies": copies},
                )
        else:
            used = await _holds_data(s, sds.id)
            if used or copies:
                raise Conflict(
                    f"SDS {sds.name!r} still holds {used} bytes of data "
                    f"({copies} PG copies); drain it first (meshctl sds remove drains)",
                    {"used_bytes": used, "pg_copies": copies},
                )
        if dry:
            raise DryRunDone(await stopcheck.drain_plan(s, sds, "remove"))
        await _release_devices(s, [d.id for d in sds.devices])
        await s.delete(sds)
        ctx(request).liveness.forget("sds", sds.id)
        ctx(request).tree_gc.forget(sds.id)
        ctx(request).mapping_docs.confirmations.forget(sds.name)
        ctx(request).reported.views.pop(sds.id, None)
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
    summary="Remove a device that holds no data, or a failed one that no PG names",
    errors=(404, 409),
)
async def remove_device(request: web.Request) -> web.Response:
    """A failed device's data no longer counts (its copies were rebuilt elsewhere):
    it is removed once no PG names it, whatever it still holds."""
    sds_id, dev_id = path_id(request), path_id(request, "device_id")
    async with change(request) as s:
        sds = await _load(s, sds_id)
        dev = next((d for d in sds.devices if d.id == dev_id), None)
        if dev is None:
            raise NotFound(f"SDS {sds.name!r} has no device with id {dev_id}")
        if dev.state == DeviceState.FAILED:
            copies = await _copies_on(s, [dev_id])
            if copies:
                raise Conflict(
                    f"failed device {dev_id} is still named by {copies} PG cop(ies): wait "
                    "until they are rebuilt elsewhere (meshctl rebuild status)",
                    {"pg_copies": copies},
                )
            used = 0
        else:
            used = await _holds_data(s, sds.id, dev_id)
        if used:
            raise Conflict(
                f"device {dev_id} still holds {used} bytes of data", {"used_bytes": used}
            )
        if not await _release_devices(s, [dev_id]):
            raise NotFound(f"device {dev_id} was removed meanwhile")
    return web.Response(status=204)


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/heartbeat",
    role=Role.COMPONENT,
    tag=TAG,
    summary="SDS heartbeat with device and volume usage (what changed, or everything)",
    body=schemas.SDS_HEARTBEAT,
    decode=heartbeats.decode_sds,
    response="SdsHeartbeat",
    errors=(404,),
)
async def sds_heartbeat(request: web.Request, beat: heartbeats.SdsBeat) -> web.Response:
    """No ORM object on the way (docs/mdm.md, "Heartbeats"): the body is decoded by
    type, the state the SDS reports kept in memory (:mod:`meshblock.mdm.heartbeats`),
    what changed written with the next batch (:mod:`meshblock.mdm.liveness`)."""
    c = ctx(request)
    sds_id = path_id(request)
    live = c.liveness
    if live.seen("sds", sds_id) is None:
        # Unknown to memory: either never seen since start or not registered at all.
        await _must_be_registered(request, sds_id)
    # only once known to be registered: an id no SDS has leaves no trace in memory
    c.tree_gc.heard(sds_id)
    applied = heartbeats.apply(c.reported.views, sds_id, beat)
    if applied is None:  # a delta onto a state this MDM does not have
        live.beat("sds", sds_id)
    else:
        live.beat("sds", sds_id, applied.devices, applied.volumes, whole=applied.whole)
        if beat.legacy or beat.copies is not None:
            c.progress.report(sds_id, beat.copies)
        if applied.tombstones is not None:
            c.tombstones.report_view(sds_id, applied.tombstones)
        if beat.full or beat.legacy:  # everything: none listed, none now
            c.tree_gc.report(sds_id, beat.tree_gc or [], beat.tree_gc_left)
        elif beat.tree_gc is not None or beat.tree_gc_gone:
            c.tree_gc.update(sds_id, beat.tree_gc or [], beat.tree_gc_gone, beat.tree_gc_left)
        c.reported.sds(sds_id, beat.epoch, beat.map_epochs)
        if beat.probes:
            live.holds.report(sds_id, beat.probes)
    taken = beat.scrub if applied is not None else None
    reply = {
        "state": live.state("sds", sds_id),
        "epoch": c.notifier.epoch,
        "term": c.term,
        "heartbeat_interval_s": c.config.cluster.interval_s,
        # also while the scrub schedules are not loaded (after a start): the SDS sends
        # its scrub report again only when it changes, and this one is dropped
        # also when the report of its garbage passes expired here (snapshot_gc.py)
        "send_full": (
            applied is None or scrub.unready_for(c, taken) or c.tree_gc.needs_full(sds_id)
        ),
        "probe": live.holds.probe_list(sds_id),
        "scrub": scrub.heartbeat(c, sds_id, taken),
    }
    return json(reply)


async def _must_be_registered(request: web.Request, sds_id: int) -> None:
    async with reading(request) as s:
        found = (await s.execute(select(Sds.id).where(Sds.id == sds_id))).scalar()
    if found is None:
        raise NotFound(f"no SDS with id {sds_id}")


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/devices/{device_id:\d+}/failed",
    role=Role.COMPONENT,
    tag=TAG,
    summary="An SDS reports that a device of its own failed an IO (fail-stop)",
    body=schemas.DEVICE_FAILED,
    response="Device",
    errors=(404,),
)
async def device_failed(request: web.Request, body: dict[str, Any]) -> web.Response:
    """The device becomes ``failed`` for good (until the operator removes it): the
    copies on it are failed over to their other copy and rebuilt on other devices at
    once. Repeating the report changes nothing."""
    sds_id, dev_id = path_id(request), path_id(request, "device_id")
    async with change(request) as s:
        sds = await _load(s, sds_id)
        dev = next((d for d in sds.devices if d.id == dev_id), None)
        if dev is None:
            raise NotFound(f"SDS {sds.name!r} has no device with id {dev_id}")
        if dev.state != DeviceState.FAILED:
            dev.state = DeviceState.FAILED
            dev.failed_at = utcnow()
            dev.error = body["error"]
            log.error(
                "device %d (%s) of SDS %s FAILED: %s; its copies are rebuilt elsewhere",
                dev.id,
                dev.path,
                sds.name,
                body["error"],
            )
        doc = device_doc(dev)
    detector = ctx(request).detector
    if detector is not None:
        await detector.check()  # fail its copies over now, not at the next check
    return json(doc)


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


class _NothingChanged(Exception):
    """Rolls back a change that changed nothing (every report refused)."""

    def __init__(self, results: list[int | ApiError]) -> None:
        super().__init__("nothing changed")
        self.results = results


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/pgs-synced",
    role=Role.COMPONENT,
    tag=TAG,
    summary="A primary SDS reports several copies done at once: one map epoch per pool",
    body=schemas.PGS_SYNCED,
    response="PgsSynced",
    errors=(404,),
)
async def pgs_synced(request: web.Request, body: dict[str, Any]) -> web.Response:
    """Per report, as ``pg-synced`` answers it; the accepted ones commit together."""
    reports = [(int(r["pool_id"]), int(r["pg"]), int(r["epoch"])) for r in body["reports"]]
    try:
        async with change(request) as s:
            await get_or_404(s, Sds, path_id(request), "SDS")
            results = await failures.mark_many_synced(s, path_id(request), reports)
            if all(isinstance(r, ApiError) for r in results):
                raise _NothingChanged(results)  # no epoch moves for nothing
    except _NothingChanged as nothing:
        results = nothing.results
    out: list[dict[str, Any]] = []
    for (pool_id, pg, _), result in zip(reports, results, strict=True):
        if isinstance(result, ApiError):
            err = error_body(result.code, result.message, result.details)["error"]
            out.append({"pool_id": pool_id, "pg": pg, "accepted": False, "error": err})
        else:
            out.append({"pool_id": pool_id, "pg": pg, "accepted": True, "epoch": result})
    return json({"results": out})


async def _check_now(request: web.Request) -> None:
    """Apply a mode change to the PGs now rather than at the next check."""
    detector = ctx(request).detector
    if detector is not None:
        await detector.check()


MAX_OK_TO_STOP = 256


@routes.route(
    "GET",
    "/api/v1/sds/ok-to-stop",
    role=Role.READONLY,
    tag=TAG,
    summary="Whether stopping these SDSs together leaves every PG with an up-to-date copy",
    response="OkToStop",
    query=(
        QueryParam(
            "names",
            "the SDSs to stop together, by name, comma-separated (required)",
            type="string",
            minimum=None,
            maximum=None,
        ),
    ),
    errors=(404,),
)
async def sds_ok_to_stop(request: web.Request) -> web.Response:
    """Read-only (:mod:`meshblock.mdm.stopcheck`): ``safe`` is false when a PG with a
    copy on them would be left with no up-to-date copy (``unavailable``, with the
    volumes it holds data of); PGs left with one copy are listed as ``single_copy``.
    SDSs already down or in maintenance, failed devices and PGs already degraded
    count as they are. An unknown name is a 404 naming every unknown one."""
    names = [n.strip() for n in request.query.get("names", "").split(",") if n.strip()]
    if not names:
        raise BadRequest("query parameter names: give one SDS name or more, comma-separated")
    if len(names) > MAX_OK_TO_STOP:
        raise BadRequest(f"query parameter names: at most {MAX_OK_TO_STOP} SDSs")
    async with reading(request) as s:
        found = {
            x.name: x
            for x in (
                await s.execute(select(Sds).where(Sds.name.in_(names)).options(*WITH_DEVICES))
            ).scalars()
        }
        unknown = [n for n in dict.fromkeys(names) if n not in found]
        if unknown:
            raise NotFound(
                f"no SDS named {', '.join(repr(n) for n in unknown)}", {"unknown": unknown}
            )
        sds = [found[n] for n in dict.fromkeys(names)]
        return json(await stopcheck.stop_report(s, ctx(request).liveness, sds))


@routes.route(
    "GET",
    r"/api/v1/sds/{id:\d+}/pg-copies",
    role=Role.READONLY,
    tag=TAG,
    summary="How many PG copies (and rebalance targets) the map places on an SDS",
    response="PgCopies",
    errors=(404,),
)
async def sds_pg_copies(request: web.Request) -> web.Response:
    async with reading(request) as s:
        sds = await _load(s, path_id(request))
        n = await _copies_on(s, [d.id for d in sds.devices])
        return json({"sds_id": sds.id, "mode": sds.mode.value, "pg_copies": n})


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/maintenance",
    role=Role.ADMIN,
    tag=TAG,
    summary="Enter or exit maintenance mode (a planned outage with a delta resync on exit)",
    body=schemas.SDS_MAINTENANCE,
    response="SdsOrDryRun",
    query=(DRY_RUN,),
    errors=(404, 409),
)
async def sds_maintenance(request: web.Request, body: dict[str, Any]) -> web.Response:
    """``enter``: the SDS's copies become stale (their PGs degraded, served by the
    other copy, which records what changes) and nothing is rebuilt away from it.
    Refused when a PG with a copy on it is not clean, or its other copy is not on a
    connected SDS in mode normal: that PG would be left without a copy. ``exit``: its
    copies are resynchronised (only what changed meanwhile) and the PGs become clean.
    With ``dry_run=true``: the same checks (and refusals), then what it would do (a
    DryRun document: the PGs left with one copy) instead of doing it."""
    try:
        return await _maintenance(request, body, dry_run(request))
    except DryRunDone as done:
        return json(done.doc)


async def _maintenance(request: web.Request, body: dict[str, Any], dry: bool) -> web.Response:
    live = ctx(request).liveness
    async with change(request) as s:
        sds = await _load(s, path_id(request))
        if body["mode"] == "enter":
            if sds.mode == SdsMode.MAINTENANCE:
                raise Conflict(f"SDS {sds.name!r} is in maintenance already")
            if sds.mode == SdsMode.DRAINING:
                raise Conflict(f"SDS {sds.name!r} is draining; cancel the drain first")
            if live.state("sds", sds.id) != "connected":
                raise Conflict(f"SDS {sds.name!r} is disconnected; it is being handled as failed")
            at_risk = await _pgs_without_other_copy(s, sds, live)
            if at_risk:
                raise Conflict(
                    f"SDS {sds.name!r} cannot enter maintenance: {len(at_risk)} PG(s) "
                    "would have no copy left (not clean, or their other copy is down, "
                    "in maintenance or draining)",
                    {"pgs": [f"{pool}/{pg}" for pool, pg in at_risk[:20]], "count": len(at_risk)},
                )
            if dry:
                raise DryRunDone(await stopcheck.maintenance_plan(s, live, sds, enter=True))
            sds.mode = SdsMode.MAINTENANCE
        else:
            if sds.mode != SdsMode.MAINTENANCE:
                raise Conflict(f"SDS {sds.name!r} is not in maintenance (mode {sds.mode.value})")
            if dry:
                raise DryRunDone(await stopcheck.maintenance_plan(s, live, sds, enter=False))
            sds.mode = SdsMode.NORMAL
        log.info("SDS %s: maintenance %s", sds.name, body["mode"])
    await _check_now(request)
    async with reading(request) as s:
        return json(sds_doc(await _load(s, sds.id), live))


async def _pgs_without_other_copy(
    s: AsyncSession, sds: Sds, live: Liveness
) -> list[tuple[int, int]]:
    dev_ids = [d.id for d in sds.devices]
    if not dev_ids:
        return []
    dev_sds = dict((await s.execute(select(Device.id, Device.sds_id))).all())
    modes = dict((await s.execute(select(Sds.id, Sds.mode))).all())
    out = []
    for row in await pgtable.load(s, devices=dev_ids):
        if row.primary not in dev_ids and row.secondary not in dev_ids:
            continue  # a move towards the SDS only
        other = row.secondary if row.primary in dev_ids else row.primary
        other_sds = dev_sds.get(other) if other is not None else None
        if (
            row.state != PgState.CLEAN
            or other_sds is None
            or modes.get(other_sds) != SdsMode.NORMAL
            or live.state("sds", other_sds) != "connected"
        ):
            out.append((row.pool_id, row.pg))
    return out


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/drain",
    role=Role.ADMIN,
    tag=TAG,
    status=202,
    summary="Drain an SDS (rebalance moves its copies away) or cancel a drain",
    body=schemas.SDS_DRAIN,
    response="SdsOrDryRun",
    query=(DRY_RUN,),
    also=(200,),
    errors=(404, 409),
)
async def sds_drain(request: web.Request, body: dict[str, Any]) -> web.Response:
    """Refused when the other SDSs of a pool cannot hold the data: fewer than two
    fault domains would be left, or their free capacity (less the pool's spare
    percentage) is smaller than what the SDS holds. Progress: ``GET /api/v1/rebuild``
    (``rebalance``), and ``pg_copies`` of the 409 that ``DELETE`` answers meanwhile.
    With ``dry_run=true``: the same checks (and refusals), then 200 with what the
    drain would copy and how long that takes at the pools' rebalance throttles (a
    DryRun document) instead of starting it."""
    try:
        return await _drain(request, body, dry_run(request))
    except DryRunDone as done:
        return json(done.doc)


async def _drain(request: web.Request, body: dict[str, Any], dry: bool) -> web.Response:
    live = ctx(request).liveness
    async with change(request) as s:
        sds = await _load(s, path_id(request))
        if body.get("cancel"):
            if sds.mode != SdsMode.DRAINING:
                raise Conflict(f"SDS {sds.name!r} is not draining")
            if dry:
                raise DryRunDone(await stopcheck.drain_plan(s, sds, "drain_cancel"))
            sds.mode = SdsMode.NORMAL
            await _lay_out_pools_without_data(s, sds)
            log.info("SDS %s: drain cancelled", sds.name)
        elif sds.mode != SdsMode.DRAINING:
            if sds.mode == SdsMode.MAINTENANCE:
                raise Conflict(f"SDS {sds.name!r} is in maintenance; exit maintenance first")
            await _check_room_without(s, sds)
            if dry:
                raise DryRunDone(await stopcheck.drain_plan(s, sds, "drain"))
            sds.mode = SdsMode.DRAINING
            await _lay_out_pools_without_data(s, sds)
            log.info("SDS %s: draining", sds.name)
        elif dry:  # draining already: what is left to move
            raise DryRunDone(await stopcheck.drain_plan(s, sds, "drain"))
    async with reading(request) as s:
        return json(sds_doc(await _load(s, sds.id), live), 202)


async def _lay_out_pools_without_data(s: AsyncSession, sds: Sds) -> None:
    """Recompute the map of each pool of ``sds`` that holds no volume, after its mode
    changed (one new map epoch per pool): such a pool is laid out afresh, without the
    SDS when it drains (its copies leave at once: nothing to move, and the rebalancer
    plans only pools with volumes), with it again when the drain is cancelled. A pool
    with data keeps its copies: the rebalancer moves them."""
    await s.flush()
    for pool_id in sorted({d.pool_id for d in sds.devices}):
        pool = await s.get(StoragePool, pool_id)
        if pool is not None and not await pgmaps.holds_volumes(s, pool_id):
            await pgmaps.recompute(s, pool)


async def _check_room_without(s: AsyncSession, sds: Sds) -> None:
    for pool_id in sorted({d.pool_id for d in sds.devices}):
        pool = await s.get(StoragePool, pool_id)
        assert pool is not None
        rows = (
            await s.execute(
                select(
                    Device.sds_id,
                    Sds.fault_set_id,
                    Sds.mode,
                    Device.capacity_bytes,
                    Device.used_bytes,
                )
                .join(Sds, Sds.id == Device.sds_id)
                .where(Device.pool_id == pool_id)
            )
        ).all()
        need = sum(used for sid, _, _, _, used in rows if sid == sds.id)
        others = [r for r in rows if r.sds_id != sds.id and r.mode == SdsMode.NORMAL]
        domains = {("fs", fs) if fs is not None else ("sds", sid) for sid, fs, *_ in others}
        if len(domains) < 2:
            raise Conflict(
                f"cannot drain SDS {sds.name!r}: storage pool {pool.name!r} would be left "
                f"with {len(domains)} fault domain(s), and two copies need two",
                {"pool": pool.name, "fault_domains": len(domains)},
            )
        usable = sum(cap for *_, cap, _ in others) * (100 - pool.spare_percent) // 100
        free = usable - sum(used for *_, used in others)
        if need > free:
            raise Conflict(
                f"cannot drain SDS {sds.name!r}: it holds {need} bytes of storage pool "
                f"{pool.name!r} and the other SDSs have {max(free, 0)} bytes free "
                f"(after the pool's {pool.spare_percent}% spare)",
                {"pool": pool.name, "needed_bytes": need, "free_bytes": max(free, 0)},
            )


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/clear-flapping",
    role=Role.ADMIN,
    tag=TAG,
    summary="Let a flapping SDS return (once probes prove it up for the hold-down period)",
    response="Sds",
    errors=(404, 409),
)
async def sds_clear_flapping(request: web.Request) -> web.Response:
    """An SDS that went down more than ``[cluster] flap_count`` times within
    ``flap_window_s`` stays out until this: its downs are forgotten, and it returns
    once the MDM and a peer have reached its data port for ``hold_down_s`` (409 when it
    is not flapping)."""
    live = ctx(request).liveness
    async with reading(request) as s:
        sds = await _load(s, path_id(request))
        if not live.holds.flapping(sds.id):
            raise Conflict(f"SDS {sds.name!r} is not flapping")
        live.holds.clear(sds.id)
        log.warning("SDS %s: flapping cleared by the operator; it returns once proven up", sds.name)
        return json(sds_doc(sds, live))


@routes.route(
    "POST",
    r"/api/v1/sds/{id:\d+}/unreachable",
    role=Role.COMPONENT,
    tag=TAG,
    summary="A peer (SDS or SDC) reports that it cannot reach this SDS",
    body=schemas.SDS_UNREACHABLE,
    response="Unreachable",
    errors=(404,),
)
async def sds_unreachable(request: web.Request, body: dict[str, Any]) -> web.Response:
    """Fast failure detection. The MDM confirms before it acts: it probes the SDS's
    data port itself over the data protocol (an authenticated connection and a PING
    answered within ``UNREACHABLE_PROBE_S``: :func:`meshblock.mdm.holddown.probe`, the
    hold-down's probe); when that fails too (refused, no route, or a hung SDS whose
    kernel still accepts the connection) the SDS is declared down at once instead of
    after the heartbeat timeout."""
    c = ctx(request)
    sds_id = path_id(request)
    await authz.require_reporter(request, body.get("reporter"))
    async with reading(request) as s:
        sds = await get_or_404(s, Sds, sds_id, "SDS")
        address, port, name = sds.address, sds.data_port, sds.name
    confirmed = False
    secret = c.config.auth.cluster_secret
    tls = wire_tls.cached_client_context(c.config.tls)  # the MDM's certificate, if any
    if c.liveness.state("sds", sds_id) == "connected" and not await _answers(
        address, port, secret, tls
    ):
        confirmed = True
        log.warning(
            "SDS %s reported unreachable by %s and not reachable from the MDM: down now",
            name,
            request.get(authz.CALLER) or body.get("reporter", "a peer"),
        )
        c.liveness.mark_down(sds_id)
        if c.detector is not None:
            await c.detector.check()
    elif c.liveness.state("sds", sds_id) == "connected":
        log.info(
            "SDS %s reported unreachable by %s; the MDM reaches it: not confirmed",
            name,
            body.get("reporter", "a peer"),
        )
        await _isolated(c, sds_id, body.get("reporter"))
    return json(
        {"sds_id": sds_id, "confirmed": confirmed, "state": c.liveness.state("sds", sds_id)}
    )


UNREACHABLE_PROBE_S = holddown.PROBE_TIMEOUT_S


async def _isolated(c: MdmContext, target: int, reporter: object) -> None:
    """An SDS's report the MDM did not confirm (it reached ``target``): kept
    (:meth:`meshblock.mdm.holddown.HoldDowns.not_confirmed`); the first of a round
    starts :func:`_settle`, which decides on every report gathered by then."""
    if not (isinstance(reporter, str) and reporter.startswith("sds:")):
        return
    try:
        who = int(reporter[4:])
    except ValueError:
        return
    async with c.sessions() as s:
        needs = await failures.forward_peers(s, who)
    if c.liveness.holds.not_confirmed(who, target, needs):
        # stopped with the loops, at its pause (not while it acts): stopping.Background
        c.background.start(_settle(c), "isolation-settle")


async def _settle(c: MdmContext) -> None:
    """After :data:`meshblock.mdm.holddown.ISOLATION_SETTLE_S`, the one SDS the
    unconfirmed reports show cut off from its peers, if any, goes down, held as
    isolated, never a peer it named; unless that would leave a PG with no serving copy
    (:meth:`meshblock.mdm.failures.FailureDetector.leaves_inactive`)."""
    await stopping.pause(holddown.ISOLATION_SETTLE_S)
    live = c.liveness
    cut_off = live.holds.settle(live.connected_sds())
    if cut_off is None:
        return
    if c.detector is not None:
        try:
            stranded = await c.detector.leaves_inactive(cut_off)
        except Exception:
            log.exception("cannot tell what taking SDS %d down would do: left up", cut_off)
            return
        if stranded:
            log.warning(
                "SDS %d reports most of its peers unreachable while the MDM reaches them, "
                "but taking it down would leave %d PG(s) with no serving copy (e.g. pool "
                "%d PG %d): left up",
                cut_off,
                len(stranded),
                stranded[0].pool_id,
                stranded[0].pg,
            )
            return
    log.warning(
        "SDS %d reported most of its peers unreachable while the MDM reaches them: it is "
        "the one cut off from them; down now, held until it reaches its peers again",
        cut_off,
    )
    live.mark_down(cut_off, isolated=True)
    if c.detector is not None:
        await c.detector.check()


async def _answers(address: str, port: int, secret: str, tls: ssl.SSLContext | None) -> bool:
    return await holddown.probe(address, port, secret, UNREACHABLE_PROBE_S, tls=tls)
