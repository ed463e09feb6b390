"""The whole cluster in one document, and capacity per pool."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from meshblock.auth import Role
from meshblock.mdm.api.common import json, reading
from meshblock.mdm.api.pools import pool_doc
from meshblock.mdm.api.protection_domains import fs_doc, pd_doc
from meshblock.mdm.api.sdc import sdc_doc
from meshblock.mdm.api.sds import sds_doc
from meshblock.mdm.api.volumes import mapping_doc, volume_docs
from meshblock.mdm.capacity import pool_capacities
from meshblock.mdm.context import ctx
from meshblock.mdm.epochs import CLUSTER_ROW_ID
from meshblock.mdm.models import (
    Cluster,
    FaultSet,
    ProtectionDomain,
    Sdc,
    Sds,
    StoragePool,
    Volume,
)
from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
TAG = "topology"


@routes.route(
    "GET",
    "/api/v1/topology",
    role=Role.READONLY,
    tag=TAG,
    summary="The whole tree: protection domains, fault sets, SDSs, devices, pools, "
    "volumes, mappings, SDCs",
    response="Topology",
)
async def topology(request: web.Request) -> web.Response:
    live = ctx(request).liveness
    async with reading(request) as s:
        cluster = await s.get(Cluster, CLUSTER_ROW_ID)
        assert cluster is not None
        pds = list(
            (await s.execute(select(ProtectionDomain).order_by(ProtectionDomain.id))).scalars()
        )
        fss = list((await s.execute(select(FaultSet).order_by(FaultSet.id))).scalars())
        sdss = list(
            (
                await s.execute(select(Sds).options(selectinload(Sds.devices)).order_by(Sds.id))
            ).scalars()
        )
        pools = list((await s.execute(select(StoragePool).order_by(StoragePool.id))).scalars())
        vols = list(
            (
                await s.execute(
                    select(Volume).options(selectinload(Volume.mappings)).order_by(Volume.id)
                )
            ).scalars()
        )
        sdcs = list((await s.execute(select(Sdc).order_by(Sdc.id))).scalars())
        caps = await pool_capacities(s, [p.id for p in pools])
        vdocs = {d["id"]: d for d in await volume_docs(s, vols)}
    sdc_names = {c.id: c.name for c in sdcs}

    def volume_tree(v: Volume) -> dict[str, Any]:
        doc = dict(vdocs[v.id])
        doc["mappings"] = [
            mapping_doc(m) | {"sdc_name": sdc_names.get(m.sdc_id)}
            for m in sorted(v.mappings, key=lambda m: m.id)
        ]
        return doc

    out = []
    for pd in pds:
        pd_sds = [x for x in sdss if x.protection_domain_id == pd.id]
        out.append(
            pd_doc(pd)
            | {
                "fault_sets": [
                    fs_doc(f)
                    | {"sds": [sds_doc(x, live) for x in pd_sds if x.fault_set_id == f.id]}
                    for f in fss
                    if f.protection_domain_id == pd.id
                ],
                "sds_without_fault_set": [
                    sds_doc(x, live) for x in pd_sds if x.fault_set_id is None
                ],
                "pools": [
                    pool_doc(p, caps[p.id])
                    | {"volumes": [volume_tree(v) for v in vols if v.pool_id == p.id]}
                    for p in pools
                    if p.protection_domain_id == pd.id
                ],
            }
        )
    return json(
        {
            "cluster": {"name": cluster.name, "epoch": cluster.epoch},
            "protection_domains": out,
            "sdc": [sdc_doc(c, live) for c in sdcs],
        }
    )


@routes.route(
    "GET",
    "/api/v1/capacity",
    role=Role.READONLY,
    tag=TAG,
    summary="Capacity of every storage pool",
    response="Capacity",
)
async def capacity(request: web.Request) -> web.Response:
    async with reading(request) as s:
        caps = await pool_capacities(s)
    return json({"pools": [c.as_dict() for _, c in sorted(caps.items())]})
