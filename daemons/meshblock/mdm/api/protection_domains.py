"""Protection domains and their fault sets."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from meshblock.auth import Role
from meshblock.mdm import schemas
from meshblock.mdm.api.common import change, get_or_404, json, must_exist, name_free, reading, ts
from meshblock.mdm.errors import Conflict
from meshblock.mdm.models import FaultSet, ProtectionDomain, Sds, StoragePool
from meshblock.mdm.routing import ApiRoutes, QueryParam, path_id, query_int

routes = ApiRoutes()
TAG = "protection domains"


def pd_doc(pd: ProtectionDomain) -> dict[str, Any]:
    return {"id": pd.id, "name": pd.name, "created_at": ts(pd.created_at)}


def fs_doc(fs: FaultSet) -> dict[str, Any]:
    return {
        "id": fs.id,
        "name": fs.name,
        "protection_domain_id": fs.protection_domain_id,
        "created_at": ts(fs.created_at),
    }


@routes.route(
    "GET",
    "/api/v1/protection-domains",
    role=Role.READONLY,
    tag=TAG,
    summary="List protection domains",
    response="ProtectionDomainList",
)
async def list_pds(request: web.Request) -> web.Response:
    async with reading(request) as s:
        pds = (await s.execute(select(ProtectionDomain).order_by(ProtectionDomain.id))).scalars()
        return json({"protection_domains": [pd_doc(p) for p in pds]})


@routes.route(
    "POST",
    "/api/v1/protection-domains",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Create a protection domain",
    body=schemas.PD_CREATE,
    response="ProtectionDomain",
    errors=(409,),
)
async def create_pd(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        await name_free(s, ProtectionDomain, body["name"], "protection domain")
        pd = ProtectionDomain(name=body["name"])
        s.add(pd)
        await s.flush()
        await s.refresh(pd)
    return json(pd_doc(pd), 201)


@routes.route(
    "GET",
    r"/api/v1/protection-domains/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show a protection domain",
    response="ProtectionDomain",
    errors=(404,),
)
async def get_pd(request: web.Request) -> web.Response:
    async with reading(request) as s:
        return json(
            pd_doc(await get_or_404(s, ProtectionDomain, path_id(request), "protection domain"))
        )


@routes.route(
    "PATCH",
    r"/api/v1/protection-domains/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    summary="Rename a protection domain",
    body=schemas.PD_UPDATE,
    response="ProtectionDomain",
    errors=(404, 409),
)
async def rename_pd(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        pd = await get_or_404(s, ProtectionDomain, path_id(request), "protection domain")
        await name_free(s, ProtectionDomain, body["name"], "protection domain", pd.id)
        pd.name = body["name"]
    return json(pd_doc(pd))


@routes.route(
    "DELETE",
    r"/api/v1/protection-domains/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete an empty protection domain",
    errors=(404, 409),
)
async def delete_pd(request: web.Request) -> web.Response:
    async with change(request) as s:
        pd = await get_or_404(s, ProtectionDomain, path_id(request), "protection domain")
        for model, what in ((StoragePool, "storage pool"), (Sds, "SDS"), (FaultSet, "fault set")):
            n = (
                await s.execute(
                    select(func.count())
                    .select_from(model)
                    .where(model.protection_domain_id == pd.id)
                )
            ).scalar_one()
            if n:
                raise Conflict(
                    f"protection domain {pd.name!r} still has {n} {what}(s); remove them first",
                    {"dependents": what, "count": n},
                )
        await s.delete(pd)
    return web.Response(status=204)


@routes.route(
    "GET",
    "/api/v1/fault-sets",
    role=Role.READONLY,
    tag=TAG,
    summary="List fault sets",
    response="FaultSetList",
    query=(QueryParam("protection_domain_id", "only this protection domain's", minimum=1),),
)
async def list_fault_sets(request: web.Request) -> web.Response:
    pd_id = query_int(request, "protection_domain_id", minimum=1)
    q = select(FaultSet).order_by(FaultSet.id)
    if pd_id is not None:
        q = q.where(FaultSet.protection_domain_id == pd_id)
    async with reading(request) as s:
        return json({"fault_sets": [fs_doc(f) for f in (await s.execute(q)).scalars()]})


@routes.route(
    "POST",
    "/api/v1/fault-sets",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Create a fault set in a protection domain",
    body=schemas.FAULT_SET_CREATE,
    response="FaultSet",
    errors=(404, 409),
)
async def create_fault_set(request: web.Request, body: dict[str, Any]) -> web.Response:
    async with change(request) as s:
        pd_id = body["protection_domain_id"]
        await must_exist(s, ProtectionDomain, pd_id, "protection domain", "protection_domain_id")
        await name_free(
            s,
            FaultSet,
            body["name"],
            "fault set in this protection domain",
            protection_domain_id=pd_id,
        )
        fs = FaultSet(name=body["name"], protection_domain_id=pd_id)
        s.add(fs)
        await s.flush()
        await s.refresh(fs)
    return json(fs_doc(fs), 201)


@routes.route(
    "GET",
    r"/api/v1/fault-sets/{id:\d+}",
    role=Role.READONLY,
    tag=TAG,
    summary="Show a fault set",
    response="FaultSet",
    errors=(404,),
)
async def get_fault_set(request: web.Request) -> web.Response:
    async with reading(request) as s:
        return json(fs_doc(await get_or_404(s, FaultSet, path_id(request), "fault set")))


@routes.route(
    "DELETE",
    r"/api/v1/fault-sets/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete a fault set with no SDS",
    errors=(404, 409),
)
async def delete_fault_set(request: web.Request) -> web.Response:
    async with change(request) as s:
        fs = await get_or_404(s, FaultSet, path_id(request), "fault set")
        n = (
            await s.execute(select(func.count()).select_from(Sds).where(Sds.fault_set_id == fs.id))
        ).scalar_one()
        if n:
            raise Conflict(
                f"fault set {fs.name!r} still has {n} SDS(s); remove them first",
                {"dependents": "SDS", "count": n},
            )
        await s.delete(fs)
    return web.Response(status=204)
