"""Open health endpoints (``/health``, ``/health/components``, ``/health/metrics``)
and the Prometheus ``/metrics`` page."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

import meshblock
from meshblock.auth import Role
from meshblock.mdm.api import routes
from meshblock.mdm.api.common import json, reading, ts
from meshblock.mdm.capacity import PoolCapacity, pool_capacities
from meshblock.mdm.context import CTX, MdmContext, ctx
from meshblock.mdm.epochs import current
from meshblock.mdm.liveness import utcnow
from meshblock.mdm.models import Mapping, ProtectionDomain, Sdc, Sds, StoragePool, Volume

TAG = "health"


async def _counts(request: web.Request) -> dict[str, Any]:
    c = ctx(request)
    async with reading(request) as s:
        sds_ids = list((await s.execute(select(Sds.id))).scalars())
        sdc_ids = list((await s.execute(select(Sdc.id))).scalars())
        n = {}
        for model, key in (
            (ProtectionDomain, "protection_domains"),
            (StoragePool, "pools"),
            (Volume, "volumes"),
            (Mapping, "mappings"),
        ):
            n[key] = (await s.execute(select(func.count()).select_from(model))).scalar_one()
        caps = await pool_capacities(s)
        epoch = await current(s)
    return {
        **n,
        "sds_total": len(sds_ids),
        "sds_connected": sum(c.liveness.state("sds", i) == "connected" for i in sds_ids),
        "sdc_total": len(sdc_ids),
        "sdc_connected": sum(c.liveness.state("sdc", i) == "connected" for i in sdc_ids),
        "capacity_total_bytes": sum(p.total_bytes for p in caps.values()),
        "capacity_allocated_bytes": sum(p.allocated_bytes for p in caps.values()),
        "capacity_free_bytes": sum(p.free_bytes for p in caps.values()),
        "epoch": epoch,
        "_caps": caps,
    }


@routes.route(
    "GET",
    "/health",
    role=Role.NONE,
    tag=TAG,
    response="Health",
    summary="Liveness and a one-word status (ok, or degraded when an SDS is down)",
)
async def health(request: web.Request) -> web.Response:
    n = await _counts(request)
    status = "ok" if n["sds_connected"] == n["sds_total"] else "degraded"
    return json(
        {
            "status": status,
            "cluster": ctx(request).config.cluster.name,
            "epoch": n["epoch"],
            "version": meshblock.__version__,
        }
    )


@routes.route(
    "GET",
    "/health/components",
    role=Role.NONE,
    tag=TAG,
    response="Components",
    summary="Every MDM, SDS and SDC with address, ports, state and last-seen time",
)
async def components(request: web.Request) -> web.Response:
    c = ctx(request)
    cfg = c.config
    out: list[dict[str, Any]] = [
        {
            "component_id": "mdm-1",
            "component_type": "mdm",
            "name": cfg.cluster.name,
            "address": cfg.api.host,
            "control_port": cfg.api.port,
            "data_port": None,
            "state": "connected",
            "last_seen": ts(utcnow()),
        }
    ]
    async with reading(request) as s:
        for x in (await s.execute(select(Sds).order_by(Sds.id))).scalars():
            out.append(
                {
                    "component_id": f"sds-{x.id}",
                    "component_type": "sds",
                    "name": x.name,
                    "address": x.address,
                    "control_port": x.control_port,
                    "data_port": x.data_port,
                    "state": c.liveness.state("sds", x.id),
                    "last_seen": ts(c.liveness.seen("sds", x.id) or x.last_seen),
                }
            )
        for y in (await s.execute(select(Sdc).order_by(Sdc.id))).scalars():
            out.append(
                {
                    "component_id": f"sdc-{y.id}",
                    "component_type": "sdc",
                    "name": y.name,
                    "address": y.address,
                    "control_port": y.control_port,
                    "data_port": y.nbd_port,
                    "state": c.liveness.state("sdc", y.id),
                    "last_seen": ts(c.liveness.seen("sdc", y.id) or y.last_seen),
                }
            )
    return json({"components": out})


@routes.route(
    "GET",
    "/health/metrics",
    role=Role.NONE,
    tag=TAG,
    response="HealthMetrics",
    summary="Cluster totals: components, capacity, volumes",
)
async def health_metrics(request: web.Request) -> web.Response:
    n = await _counts(request)
    n.pop("_caps")
    return json(n)


class ClusterCollector(Collector):
    """Cluster state, gathered by the /metrics handler just before it renders."""

    def __init__(self, context: MdmContext) -> None:
        self.ctx = context
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Any:
        n = self.snapshot
        if not n:
            return
        for kind in ("sds", "sdc"):
            g = GaugeMetricFamily(
                f"meshblock_{kind}", f"Registered {kind.upper()}s by state", labels=["state"]
            )
            g.add_metric(["connected"], n[f"{kind}_connected"])
            g.add_metric(["disconnected"], n[f"{kind}_total"] - n[f"{kind}_connected"])
            yield g
        yield GaugeMetricFamily("meshblock_volumes", "Volumes", value=n["volumes"])
        yield GaugeMetricFamily("meshblock_cluster_epoch", "Cluster change epoch", value=n["epoch"])
        caps: dict[int, PoolCapacity] = n["_caps"]
        for field in (
            "total",
            "spare",
            "usable",
            "thick_reserved",
            "thin_used",
            "allocated",
            "free",
        ):
            g = GaugeMetricFamily(
                f"meshblock_pool_{field}_bytes",
                f"Storage pool capacity: {field.replace('_', ' ')}",
                labels=["pool_id"],
            )
            for pid, cap in caps.items():
                g.add_metric([str(pid)], getattr(cap, f"{field}_bytes"))
            yield g
        yield CounterMetricFamily(
            "meshblock_mdm_heartbeats",
            "Heartbeats received",
            value=self.ctx.liveness.heartbeats_total,
        )


METRICS = web.AppKey("meshblock_mdm_metrics", ClusterCollector)
REGISTRY = web.AppKey("meshblock_mdm_registry", CollectorRegistry)


def setup_metrics(app: web.Application) -> None:
    registry = CollectorRegistry()
    collector = ClusterCollector(app[CTX])
    registry.register(collector)
    app[REGISTRY] = registry
    app[METRICS] = collector


@routes.route(
    "GET",
    "/metrics",
    role=Role.NONE,
    tag=TAG,
    summary="Prometheus metrics (text exposition format)",
)
async def metrics(request: web.Request) -> web.Response:
    collector = request.app[METRICS]
    collector.snapshot = await _counts(request)
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
