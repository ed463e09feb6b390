"""The SDC's aiohttp application: control port (/health, /metrics) and, in its
cleanup context, everything the SDC runs: the NBD server, the data path, the exports
and the MDM follower.

``/health`` tells anyone the state; its details and ``/metrics`` need a read
credential or the open listener of ``[metrics] port`` (meshblock.metrics_access)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from meshblock import metrics_access
from meshblock.nbd.server import NbdServer
from meshblock.sdc.attach import NbdAttacher
from meshblock.sdc.config import (
    SdcConfig,
    cluster_secret,
    nbd_socket_gid,
    nbd_tcp_policy,
    sdc_guid,
    sdc_name,
)
from meshblock.sdc.exports import ExportTable
from meshblock.sdc.map_follower import MapFollower
from meshblock.sdc.mdm_client import MdmClient, mdm_tls_of
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sdc.wire_path import WireDataPath
from meshblock.timeouts import LatencyBudgets
from meshblock.tls import crl_reload
from meshblock.wire import tls as wire_tls

log = logging.getLogger(__name__)


@dataclass
class SdcState:
    """What the running SDC is made of (set up by the cleanup context)."""

    config: SdcConfig
    metrics: SdcMetrics = field(default_factory=SdcMetrics)
    started: float = field(default_factory=time.time)
    nbd: NbdServer | None = None
    follower: MapFollower | None = None
    exports: ExportTable | None = None
    budgets: LatencyBudgets | None = None  # per SDS, the budget of one IO attempt
    nbd_addresses: list[str] = field(default_factory=list)


STATE = web.AppKey("meshblock_sdc_state", SdcState)


class _ScrapeCollector(Collector):
    """Connections per export, map epochs and MDM reachability, read on scrape."""

    def __init__(self, state: SdcState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state
        conns = GaugeMetricFamily(
            "meshblock_sdc_nbd_connections", "Open NBD connections per export", labels=["volume"]
        )
        if s.nbd is not None:
            for name, export in sorted(s.nbd.exports.items()):
                conns.add_metric([name], len(export.connections))
        yield conns
        # The pool of each exported volume, by id: the per-pool recording rules join the
        # per-volume series on it (docs/monitoring.md, Recording rules).
        volumes = GaugeMetricFamily(
            "meshblock_sdc_volume_info",
            "Always 1: an exported volume's name and the id of its pool",
            labels=["volume", "pool_id"],
        )
        if s.exports is not None:
            for io, export in sorted(s.exports.volumes.values(), key=lambda v: v[1].name):
                volumes.add_metric([export.name, str(io.volume.pool_id)], 1)
        yield volumes
        f = s.follower
        yield GaugeMetricFamily(
            "meshblock_sdc_exports", "Volumes exported", value=len(s.nbd.exports) if s.nbd else 0
        )
        yield GaugeMetricFamily(
            "meshblock_sdc_mdm_reachable",
            "1 when the last call to the MDM succeeded",
            value=1 if f is not None and f.mdm_reachable else 0,
        )
        yield GaugeMetricFamily(
            "meshblock_sdc_maps_epoch",
            "Cluster epoch of the maps in use",
            value=f.epoch if f else 0,
        )
        yield GaugeMetricFamily(
            "meshblock_sdc_mdm_term",
            "The highest MDM leader term seen",
            value=f.terms.highest if f else 0,
        )
        yield CounterMetricFamily(
            "meshblock_sdc_mdm_term_refused",
            "Maps and heartbeat answers of an older MDM leader term refused",
            value=f.terms.refused if f else 0,
        )
        pools = GaugeMetricFamily(
            "meshblock_sdc_pool_map_epoch", "PG map epoch in use per pool", labels=["pool_id"]
        )
        if f is not None and f.maps is not None:
            for pool_id, pm in sorted(f.maps.pools.items()):
                pools.add_metric([str(pool_id)], pm.epoch)
        yield pools
        budgets = GaugeMetricFamily(
            "meshblock_sdc_attempt_timeout_seconds",
            "The budget of one IO attempt per SDS, adapted to its latency",
            labels=["sds_id"],
        )
        for sds_id, budget in (s.budgets.budgets() if s.budgets else {}).items():
            budgets.add_metric([str(sds_id)], budget)
        yield budgets
        # Running counts: counters, exposed as ..._total.
        yield CounterMetricFamily(
            "meshblock_sdc_nbd_protocol_errors",
            "NBD connections dropped for a protocol error since start",
            value=s.nbd.protocol_errors if s.nbd else 0,
        )
        yield CounterMetricFamily(
            "meshblock_sdc_nbd_refused_connections",
            "NBD TCP connections refused since start: no rule of [nbd] tcp_allow covers them",
            value=s.nbd.refused_connections if s.nbd else 0,
        )


async def _run(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    config = state.config
    secret = cluster_secret(config)
    link = mdm_tls_of(config)
    guid = sdc_guid(config, link.identity.name if link.identity else None)
    name = sdc_name(config)
    state.metrics.add_collector(_ScrapeCollector(state))

    nbd = NbdServer()
    state.nbd = nbd
    state.budgets = LatencyBudgets(
        floor=config.io.attempt_timeout_min_s,
        factor=config.io.attempt_timeout_factor,
        ceiling=config.io.attempt_timeout_s,
    )
    path = WireDataPath(
        secret,
        request_timeout=config.io.attempt_timeout_s * 3,
        min_version=config.io.wire_min_version,
        tls=wire_tls.client_context(config.tls, config.io.tls),
    )
    session = aiohttp.ClientSession(connector=link.connector())
    follower = MapFollower(
        MdmClient(
            session,
            config.mdm.urls,
            None if link.identity else secret,  # with a certificate, no token
            request_timeout=config.mdm.request_timeout_s,
        ),
        guid=guid,
        name=name,
        address=config.sdc.address or config.nbd.host,
        control_port=config.control.port,
        nbd_port=config.nbd.port,
        state_dir=Path(config.sdc.state_dir),
        heartbeat_interval_s=config.mdm.heartbeat_interval_s,
        longpoll_s=config.mdm.longpoll_timeout_s,
    )
    state.follower = follower
    attacher = None
    if config.nbd.attach_nbd:
        attacher = NbdAttacher(
            nbd_client=config.nbd.nbd_client,
            unix_socket=config.nbd.unix_socket,
            helper_socket=config.nbd.attach_helper,
            connections=config.nbd.attach_connections,
        )
        if not attacher.kernel_supported():
            log.error(
                "attach_nbd = true, but this kernel has no nbd module (/sys/module/nbd is "
                "absent): volumes will be served as NBD exports only"
            )
    exports = ExportTable(
        nbd,
        follower,
        path,
        state.metrics,
        timeout_s=config.io.timeout_s,
        attempt_timeout_s=config.io.attempt_timeout_s,
        budgets=state.budgets,
        multi_conn=config.nbd.multi_conn,
        attacher=attacher,
    )
    state.exports = exports
    follower.listeners.append(exports.apply)
    try:
        if config.nbd.tcp:
            policy = nbd_tcp_policy(config)
            for host, port in await nbd.listen_tcp(config.nbd.host, config.nbd.port, policy):
                state.nbd_addresses.append(f"{host}:{port}")
        if config.nbd.unix_socket:
            Path(config.nbd.unix_socket).parent.mkdir(parents=True, exist_ok=True)
            await nbd.listen_unix(config.nbd.unix_socket, gid=nbd_socket_gid(config))
            state.nbd_addresses.append(f"unix:{config.nbd.unix_socket}")
        follower.load_cached()
        follower.start()
        log.info("SDC %r (guid %s) running", name, guid)
        yield
    finally:
        await follower.stop()
        await exports.close()
        await nbd.close()
        await path.close()
        await session.close()


def _state(s: SdcState) -> str:
    f = s.follower
    if f is None or f.sdc_id is None:
        return "starting"
    return "ok" if f.mdm_reachable else "degraded"


async def health(request: web.Request) -> web.Response:
    """Liveness (the state) for anyone; the details for a caller that may read."""
    s = request.app[STATE]
    if not request.app[metrics_access.ACCESS].reads(request):
        return web.json_response({"state": _state(s)})
    f = s.follower
    reachable = f is not None and f.mdm_reachable
    exports = []
    if s.exports is not None:
        for io, export in s.exports.volumes.values():
            exports.append(
                {
                    "name": export.name,
                    "volume_id": io.volume.id,
                    "pool_id": io.volume.pool_id,
                    "size_bytes": export.size,
                    "read_only": export.read_only,
                    "connections": len(export.connections),
                    "iops_limit": io.volume.iops_limit,
                    "bandwidth_limit_bps": io.volume.bandwidth_limit_bps,
                }
            )
    maps = f.maps if f is not None else None
    return web.json_response(
        {
            "state": _state(s),
            "sdc_id": f.sdc_id if f is not None else None,
            "guid": f.guid if f is not None else None,
            "name": f.name if f is not None else None,
            "mdm_reachable": reachable,
            "mdm_last_contact": f.last_contact if f is not None else None,
            "epoch": maps.epoch if maps is not None else None,
            "pool_map_epochs": (
                {str(k): v.epoch for k, v in sorted(maps.pools.items())} if maps else {}
            ),
            "nbd": s.nbd_addresses,
            "exports": sorted(exports, key=lambda e: str(e["name"])),
            "attempt_timeouts": (
                {str(k): round(v, 3) for k, v in s.budgets.budgets().items()} if s.budgets else {}
            ),
        }
    )


@metrics_access.guarded
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _share_state(app: web.Application, side: web.Application) -> None:
    side[STATE] = app[STATE]


def create_app(config: SdcConfig) -> web.Application:
    app = web.Application()
    app[STATE] = SdcState(config)
    app.cleanup_ctx.append(_run)
    app.cleanup_ctx.append(crl_reload(config.tls, "sdc", lambda a: a[STATE].metrics.registry))
    metrics_access.install(app, "sdc", config.metrics, config.audit)
    if config.metrics.port:
        routes = (("/health", health), ("/metrics", metrics))
        app.cleanup_ctx.append(metrics_access.open_listener(config.metrics, routes, _share_state))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app
