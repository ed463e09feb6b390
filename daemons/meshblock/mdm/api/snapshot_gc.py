"""Progress of the garbage passes of snapshot trees (``GET /api/v1/snapshot-gc``)."""

from __future__ import annotations

from aiohttp import web

from meshblock.auth import Role
from meshblock.mdm.api.common import json
from meshblock.mdm.context import ctx
from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
TAG = "snapshots"


@routes.route(
    "GET",
    "/api/v1/snapshot-gc",
    role=Role.READONLY,
    tag=TAG,
    summary="Garbage passes of snapshot trees on the SDSs: progress and what is left",
    response="SnapshotGc",
)
async def get_snapshot_gc(request: web.Request) -> web.Response:
    reports = ctx(request).tree_gc
    return json({"trees": reports.status(), "unreported": reports.unreported()})
