"""Health endpoints and the Prometheus ``/metrics`` page.

``/health`` (liveness: up, and one word of status) is open to every client. What
tells more, ``/health/components`` (every component's address and state),
``/health/metrics`` (totals) and ``/metrics``, needs a read credential on the API: the
read-only or admin token, or a certificate of an identity that may read (``mgmt:``,
``admin:``). ``[api] metrics_host`` and ``metrics_port`` serve all four, and only
them, openly on a listener of their own (plain HTTP; bind it to an address only the
monitoring reaches): :func:`open_listener`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

import meshblock
from meshblock.auth import Role
from meshblock.chunks import pgs_of_volume
from meshblock.daemon_metrics import daemon_registry
from meshblock.mdm import scrub
from meshblock.mdm.api.common import json, reading, ts
from meshblock.mdm.capacity import PoolCapacity, pool_capacities
from meshblock.mdm.context import CTX, MdmContext, ctx
from meshblock.mdm.epochs import current
from meshblock.mdm.liveness import utcnow
from meshblock.mdm.models import (
    FaultSet,
    Mapping,
    PgState,
    PlacementGroup,
    ProtectionDomain,
    Sdc,
    Sds,
    SdsJoinRequest,
    StoragePool,
    Volume,
    VolumeState,
)
from meshblock.mdm.progress import KINDS
from meshblock.mdm.routing import ApiRoutes

routes = ApiRoutes()
TAG = "health"


async def _counts(request: web.Request) -> dict[str, Any]:
    c = ctx(request)
    live = c.liveness
    async with reading(request) as s:
        sds_rows = (
            await s.execute(
                select(Sds.id, Sds.name, ProtectionDomain.name, FaultSet.name)
                .join(ProtectionDomain, ProtectionDomain.id == Sds.protection_domain_id)
                .outerjoin(FaultSet, FaultSet.id == Sds.fault_set_id)
                .order_by(Sds.id)
            )
        ).all()
        sdc_rows = (await s.execute(select(Sdc.id, Sdc.name).order_by(Sdc.id))).all()
        n = {}
        for model, key in (
            (ProtectionDomain, "protection_domains"),
            (StoragePool, "pools"),
            (Volume, "volumes"),
            (Mapping, "mappings"),
        ):
            q = select(func.count()).select_from(model)
            if model is Volume:  # deleting ones are on their way out
                q = q.where(Volume.state == VolumeState.ACTIVE)
            n[key] = (await s.execute(q)).scalar_one()
        caps = await pool_capacities(s)
        pools = (
            await s.execute(
                select(StoragePool, ProtectionDomain.name).join(
                    ProtectionDomain, ProtectionDomain.id == StoragePool.protection_domain_id
                )
            )
        ).all()
        pg_rows = (
            await s.execute(
                select(PlacementGroup.pool_id, PlacementGroup.state, func.count()).group_by(
                    PlacementGroup.pool_id, PlacementGroup.state
                )
            )
        ).all()
        bad_pgs = (
            await s.execute(
                select(PlacementGroup.pool_id, PlacementGroup.pg).where(
                    PlacementGroup.state != PgState.CLEAN
                )
            )
        ).all()
        degraded_volumes: dict[int, int] = {}
        if bad_pgs:
            vols = (await s.execute(ACTIVE_VOLUME_PLACEMENT)).all()
            degraded_volumes = degraded_volumes_of(
                bad_pgs, vols, {p.id: p.pg_count for p, _ in pools}
            )
        epoch = await current(s)
    connected = {i for i, *_ in sds_rows if live.state("sds", i) == "connected"}
    pg_states: dict[int, dict[str, int]] = {p.id: dict.fromkeys(PG_STATES, 0) for p, _ in pools}
    for pool_id, state, count in pg_rows:
        pg_states[pool_id][state.value] += count
    sdc_connected = {i for i, _ in sdc_rows if live.state("sdc", i) == "connected"}
    return {
        **n,
        "sds_total": len(sds_rows),
        "sds_connected": len(connected),
        "sdc_total": len(sdc_rows),
        "sdc_connected": len(sdc_connected),
        "capacity_total_bytes": sum(p.total_bytes for p in caps.values()),
        "capacity_allocated_bytes": sum(p.allocated_bytes for p in caps.values()),
        "capacity_free_bytes": sum(p.free_bytes for p in caps.values()),
        "pgs_degraded": sum(st["degraded"] for st in pg_states.values()),
        "pgs_inactive": sum(st["inactive"] for st in pg_states.values()),
        "pgs_resyncing": sum(st["resyncing"] for st in pg_states.values()),
        "volumes_degraded": sum(degraded_volumes.values()),
        "epoch": epoch,
        "_caps": caps,
        "_sds": [(i, name, pd, fs, i in connected) for i, name, pd, fs in sds_rows],
        "_sdc": [(i, name, i in sdc_connected) for i, name in sdc_rows],
        "_pools": [(p, pd, pg_states[p.id], degraded_volumes.get(p.id, 0)) for p, pd in pools],
    }


# What places each active volume's chunks (chunks.pgs_of_volume): its tree, pool, size.
ACTIVE_VOLUME_PLACEMENT = select(Volume.vtree_id, Volume.pool_id, Volume.size_bytes).where(
    Volume.state == VolumeState.ACTIVE
)


def degraded_volumes_of(
    bad_pgs: Sequence[Any], volumes: Sequence[Any], pg_counts: dict[int, int]
) -> dict[int, int]:
    """Per pool, the volumes with a chunk in a PG that is not clean. ``volumes`` are
    ``(vtree_id, pool_id, size_bytes)``: a volume's chunks are placed by its tree."""
    bad: dict[int, set[int]] = {}
    for pool_id, pg in bad_pgs:
        bad.setdefault(pool_id, set()).add(pg)
    out: dict[int, int] = {}
    for vtree_id, pool_id, size in volumes:
        pgs = bad.get(pool_id)
        if not pgs:
            continue
        count = pg_counts[pool_id]
        first, n = pgs_of_volume(vtree_id, size, count)
        if n == count or any((pg - first) % count < n for pg in pgs):
            out[pool_id] = out.get(pool_id, 0) + 1
    return out


PG_STATES = tuple(state.value for state in PgState)


@routes.route(
    "GET",
    "/health",
    role=Role.NONE,
    tag=TAG,
    response="Health",
    summary="Liveness and a one-word status: ok, or degraded when an SDS is down or a PG "
    "is not clean",
)
async def health(request: web.Request) -> web.Response:
    n = await _counts(request)
    healthy = n["sds_connected"] == n["sds_total"] and not (
        n["pgs_degraded"] or n["pgs_inactive"] or n["pgs_resyncing"]
    )
    status = "ok" if healthy else "degraded"
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
    role=Role.READONLY,
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
        # SDSs waiting to join (docs/security.md): state pending, approved or rejected,
        # so that MGMT's components view shows them; they have no SDS id yet.
        waiting = await s.execute(select(SdsJoinRequest).order_by(SdsJoinRequest.id))
        for r in waiting.scalars():
            out.append(
                {
                    "component_id": f"sds-request-{r.id}",
                    "component_type": "sds",
                    "name": r.name,
                    "address": r.address,
                    "control_port": r.control_port,
                    "data_port": r.data_port,
                    "state": r.state.value,
                    "last_seen": ts(r.last_seen),
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
    role=Role.READONLY,
    tag=TAG,
    response="HealthMetrics",
    summary="Cluster totals: components, capacity, volumes",
)
async def health_metrics(request: web.Request) -> web.Response:
    n = await _counts(request)
    doc = {k: v for k, v in n.items() if not k.startswith("_")}
    # each pool's scrub in short, for MGMT's dashboard (the whole: GET /api/v1/scrub)
    doc["scrub"] = scrub.summaries(
        ctx(request).scrub, [(pool.id, pool.name) for pool, _, _, _ in n["_pools"]]
    )
    return json(doc)


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
        g = GaugeMetricFamily(
            "meshblock_sds_connected",
            "1 while the SDS sends heartbeats in time, 0 when it is disconnected",
            labels=["sds", "protection_domain", "fault_set"],
        )
        for _, name, pd, fs, up in n["_sds"]:
            g.add_metric([name, pd, fs or ""], 1 if up else 0)
        yield g
        # The SDS and SDC label what they know by id (pool_id, sds_id, peer); these
        # give each id its name, to join on (docs/monitoring.md, Labels).
        g = GaugeMetricFamily(
            "meshblock_sds_info",
            "Always 1: an SDS's id and its names (sds, protection_domain, fault_set)",
            labels=["sds_id", "sds", "protection_domain", "fault_set"],
        )
        for sds_id, name, pd, fs, _ in n["_sds"]:
            g.add_metric([str(sds_id), name, pd, fs or ""], 1)
        yield g
        g = GaugeMetricFamily(
            "meshblock_pool_info",
            "Always 1: a storage pool's id and its names (pool, protection_domain)",
            labels=["pool_id", "pool", "protection_domain"],
        )
        for pool, pd, _, _ in n["_pools"]:
            g.add_metric([str(pool.id), pool.name, pd], 1)
        yield g
        holds = self.ctx.liveness.holds
        for metric, text, of in (
            (
                "meshblock_sds_held_down",
                "1 while the SDS, declared down on a failure report, has not been proven up "
                "(probes over the data protocol for [cluster] hold_down_s)",
                holds.held,
            ),
            (
                "meshblock_sds_flapping",
                "1 while the SDS is kept out for flapping (more than [cluster] flap_count "
                "downs within flap_window_s), until meshctl sds clear-flapping",
                holds.flapping,
            ),
        ):
            g = GaugeMetricFamily(metric, text, labels=["sds", "protection_domain", "fault_set"])
            for sds_id, name, pd, fs, _ in n["_sds"]:
                g.add_metric([name, pd, fs or ""], 1 if of(sds_id) else 0)
            yield g
        g = GaugeMetricFamily(
            "meshblock_sdc_connected",
            "1 while the SDC sends heartbeats in time, 0 when it is disconnected",
            labels=["sdc"],
        )
        for _, name, up in n["_sdc"]:
            g.add_metric([name], 1 if up else 0)
        yield g
        yield GaugeMetricFamily("meshblock_volumes", "Volumes", value=n["volumes"])
        yield GaugeMetricFamily("meshblock_cluster_epoch", "Cluster change epoch", value=n["epoch"])
        caps: dict[int, PoolCapacity] = n["_caps"]
        labels = ["pool", "protection_domain"]
        pgs = GaugeMetricFamily(
            "meshblock_pgs", "Placement groups by state", labels=[*labels, "state"]
        )
        epochs = GaugeMetricFamily("meshblock_pool_map_epoch", "PG map epoch", labels=labels)
        used = GaugeMetricFamily(
            "meshblock_pool_used_ratio", "Allocated capacity / usable capacity", labels=labels
        )
        high = GaugeMetricFamily(
            "meshblock_pool_alert_high_ratio",
            "The pool's capacity_alert_high_percent / 100",
            labels=labels,
        )
        critical = GaugeMetricFamily(
            "meshblock_pool_alert_critical_ratio",
            "The pool's capacity_alert_critical_percent / 100",
            labels=labels,
        )
        fields = ("total", "spare", "usable", "thick_reserved", "thin_used", "allocated", "free")
        sizes = {
            f: GaugeMetricFamily(
                f"meshblock_pool_{f}_bytes",
                f"Storage pool capacity: {f.replace('_', ' ')}",
                labels=labels,
            )
            for f in fields
        }
        degraded = GaugeMetricFamily(
            "meshblock_volumes_degraded",
            "Volumes with data in a PG that is not clean (one copy or none)",
            labels=labels,
        )
        progress = self.ctx.progress
        copy_metrics: dict[tuple[str, str], GaugeMetricFamily | CounterMetricFamily] = {}
        for kind in KINDS:
            what = "rebuilds and resyncs" if kind == "rebuild" else "rebalance moves"
            copy_metrics[(kind, "remaining")] = GaugeMetricFamily(
                f"meshblock_{kind}_remaining_bytes",
                f"Bytes the PG primaries still have to copy for {what}",
                labels=labels,
            )
            copy_metrics[(kind, "rate")] = GaugeMetricFamily(
                f"meshblock_{kind}_rate_bytes_per_second",
                f"Copy rate of {what} over the last 30 s",
                labels=labels,
            )
            copy_metrics[(kind, "copied")] = CounterMetricFamily(
                f"meshblock_{kind}_copied_bytes",
                f"Bytes copied by {what} since the MDM started",
                labels=labels,
            )
        for pool, pd, states, n_degraded in n["_pools"]:
            for kind in KINDS:
                lv0 = [pool.name, pd]
                copy_metrics[(kind, "remaining")].add_metric(lv0, progress.remaining(pool.id, kind))
                copy_metrics[(kind, "rate")].add_metric(lv0, progress.rate(pool.id, kind))
                copy_metrics[(kind, "copied")].add_metric(lv0, progress.copied(pool.id, kind))
            degraded.add_metric([pool.name, pd], n_degraded)
            lv = [pool.name, pd]
            cap = caps[pool.id]
            for f in fields:
                sizes[f].add_metric(lv, getattr(cap, f"{f}_bytes"))
            for state, count in states.items():
                pgs.add_metric([*lv, state], count)
            epochs.add_metric(lv, pool.map_epoch)
            used.add_metric(lv, cap.allocated_bytes / cap.usable_bytes if cap.usable_bytes else 0)
            high.add_metric(lv, pool.capacity_alert_high_percent / 100)
            critical.add_metric(lv, pool.capacity_alert_critical_percent / 100)
        yield from sizes.values()
        yield from (pgs, epochs, used, high, critical, degraded)
        yield from copy_metrics.values()
        yield from scrub.metric_families(
            self.ctx.scrub,
            [(pool.id, [pool.name, pd]) for pool, pd, _, _ in n["_pools"]],
            time.time(),
            time.monotonic(),
        )
        yield CounterMetricFamily(
            "meshblock_mdm_heartbeats",
            "Heartbeats received",
            value=self.ctx.liveness.heartbeats_total,
        )


METRICS = web.AppKey("meshblock_mdm_metrics", ClusterCollector)
REGISTRY = web.AppKey("meshblock_mdm_registry", CollectorRegistry)


def open_app(api: web.Application) -> web.Application:
    """The application of the open listener: the health routes of ``api``, sharing
    its state, with no authorisation (``[api] metrics_port``)."""
    from meshblock.mdm.errors import error_middleware

    side = web.Application(middlewares=[error_middleware])
    side[CTX] = api[CTX]
    side[REGISTRY] = api[REGISTRY]
    side[METRICS] = api[METRICS]
    side.add_routes(routes)
    return side


def open_listener(host: str, port: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """The API app's cleanup context that serves :func:`open_app` on ``host:port``."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(open_app(app), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            yield
        finally:
            await runner.cleanup()

    return run


def setup_metrics(app: web.Application) -> None:
    registry = daemon_registry()
    collector = ClusterCollector(app[CTX])
    registry.register(collector)
    app[REGISTRY] = registry
    app[METRICS] = collector


@routes.route(
    "GET",
    "/metrics",
    role=Role.READONLY,
    tag=TAG,
    summary="Prometheus metrics (text exposition format)",
)
async def metrics(request: web.Request) -> web.Response:
    collector = request.app[METRICS]
    collector.snapshot = await _counts(request)
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
