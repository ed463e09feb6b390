"""The MDM's aiohttp application factory."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from meshblock import audit, pki
from meshblock.auth import Role, TokenTable, bearer_token
from meshblock.mdm import db, health, leader, openapi, stopping
from meshblock.mdm.api import (
    join,
    pools,
    protection_domains,
    rebuild,
    scrub,
    sdc,
    sds,
    snapshot_gc,
    topology,
    volumes,
)
from meshblock.mdm.authz import CALLER, auth_middleware
from meshblock.mdm.config import MdmConfig
from meshblock.mdm.context import CTX, ON_DEPOSED, MdmContext
from meshblock.mdm.deletion import Purger
from meshblock.mdm.epochs import CLUSTER_ROW_ID, EpochNotifier
from meshblock.mdm.errors import Handler, error_middleware
from meshblock.mdm.failures import FailureDetector
from meshblock.mdm.holddown import Prober, probe
from meshblock.mdm.leader import Lease
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.mappings import MappingDocs
from meshblock.mdm.models import Cluster, Sds
from meshblock.mdm.pgmaps import MapCache
from meshblock.mdm.rebalance import Rebalancer
from meshblock.mdm.routing import ApiRoutes
from meshblock.wire import tls as wire_tls

log = logging.getLogger(__name__)


COMPRESS_ABOVE = 16 * 1024


@web.middleware
async def compression_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """gzip large documents (PG maps, topology) for clients that accept it."""
    resp = await handler(request)
    if (
        isinstance(resp, web.Response)
        and resp.body is not None
        and len(resp.body) > COMPRESS_ABOVE  # type: ignore[arg-type]
        and "Content-Encoding" not in resp.headers
        and "gzip" in request.headers.get("Accept-Encoding", "")
    ):
        resp.enable_compression()
    return resp


TOKEN_NAMES = {Role.ADMIN: "admin", Role.READONLY: "readonly", Role.COMPONENT: "cluster_secret"}


def _who(request: web.Request) -> dict[str, str]:
    """Who called, for the audit log: the client certificate's identity (also of a
    refused request, whose identity authz did not keep), or without one the bearer
    token's name."""
    who: dict[str, str] = {}
    ident = request.get(CALLER)
    if ident is None:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if peercert:
            try:
                ident = pki.identity_from_peercert(peercert)
            except pki.PkiError:
                who["identity"] = "(none named)"
    if ident is not None:
        who["identity"] = str(ident)  # a token sent along is not looked at (authz)
        return who
    header = request.headers.get("Authorization")
    if header and CTX in request.app:
        role = request.app[CTX].tokens.role_of(bearer_token(header))
        who["token"] = TOKEN_NAMES.get(role, "invalid")
    return who


def _quiet(request: web.Request, status: int) -> bool:
    """A successful heartbeat changes nothing worth an audit entry."""
    return status < 400 and request.method == "POST" and request.path.endswith("/heartbeat")


async def _lead(config: MdmConfig, engine: AsyncEngine) -> Lease:
    """Take the leader lease (leader.py): at once on SQLite, whose file this MDM holds
    (:func:`leader.sqlite_lock`); on PostgreSQL once no other MDM holds it."""
    holder = config.ha.name or socket.gethostname()
    if engine.dialect.name == "sqlite":
        lease = Lease(db.session_factory(engine), holder, None)
        if not await lease.try_acquire(force=True):
            raise leader.LeaderError("could not take the leader lease on the SQLite database")
        log.info("leading as %r in term %d (SQLite: the only MDM)", holder, lease.term)
    else:
        lease = Lease(db.session_factory(engine), holder, config.ha.lease_s)
        await lease.acquire(config.ha.renew_interval_s)
    return lease


async def _store(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    with leader.sqlite_lock(config.database.url):
        async for _ in _open_store(app, config):
            yield


async def _open_store(app: web.Application, config: MdmConfig) -> AsyncIterator[None]:
    engine = db.create_engine(config.database.url, config.database.echo)
    try:
        await db.migrate(engine)
        lease = await _lead(config, engine)
        # every session carries the fence its PG-table writes check (pgtable.py)
        sessions = db.session_factory(engine, {leader.FENCE: lease.fence})
        async with sessions() as s, s.begin():
            await leader.check_fence(s)
            cluster = await s.get(Cluster, CLUSTER_ROW_ID)
            if cluster is None:
                cluster = Cluster(id=CLUSTER_ROW_ID, name=config.cluster.name, epoch=1)
                s.add(cluster)
                await s.flush()
            epoch = cluster.epoch
            liveness = Liveness(config.cluster.timeout_s, config.cluster.knobs())
            await liveness.load(s)
        a = config.auth
        app[CTX] = MdmContext(
            config=config,
            engine=engine,
            sessions=sessions,
            tokens=TokenTable(
                {
                    Role.ADMIN: a.admin_token,
                    Role.READONLY: a.readonly_token,
                    Role.COMPONENT: a.cluster_secret,
                }
            ),
            notifier=EpochNotifier(epoch),
            liveness=liveness,
            write_gate=db.WriteGate(),
            lease=lease,
            # every map, mappings document and heartbeat answer carries the term
            map_cache=MapCache(lease.term),
            mapping_docs=MappingDocs(lease.term),
        )
        health.setup_metrics(app)
        log.info("metadata store ready: %s (epoch %d)", db.redact_url(config.database.url), epoch)
        yield
    finally:
        await engine.dispose()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The heartbeat writer, the failure detector and the other loops, stopped (at a
    pause between two passes, :mod:`meshblock.mdm.stopping`) and awaited on exit."""
    c = app[CTX]
    detector = FailureDetector(
        c.sessions,
        c.liveness,
        c.notifier,
        c.config.cluster.timeout_s,
        c.write_gate,
        c.config.cluster.resync_delay_s,
        c.config.cluster.rebuild_delay_s,
    )
    c.detector = detector
    rebalancer = Rebalancer(detector)
    secret = c.config.auth.cluster_secret
    probe_tls = wire_tls.cached_client_context(c.config.tls)  # the MDM's certificate

    async def addresses(ids: list[int]) -> dict[int, tuple[str, int]]:
        async with c.sessions() as s:
            rows = await s.execute(
                select(Sds.id, Sds.address, Sds.data_port).where(Sds.id.in_(ids))
            )
            return {i: (a, p) for i, a, p in rows}

    async def probe_sds(address: str, port: int) -> bool:
        return await probe(address, port, secret, tls=probe_tls)

    prober = Prober(
        c.liveness.holds,
        addresses,
        c.liveness.connected_sds,
        c.liveness.release,
        detector.check,
        probe_sds,
    )
    loops = [
        asyncio.create_task(c.liveness.run(c.sessions, c.write_gate), name="heartbeat-writer"),
        asyncio.create_task(detector.run(), name="failure-detector"),
        asyncio.create_task(prober.run(), name="hold-down-prober"),
        asyncio.create_task(
            rebalancer.run(c.config.cluster.rebalance_interval_s), name="rebalancer"
        ),
        asyncio.create_task(
            Purger(c.sessions, c.write_gate, c.notifier, c.tombstones, c.reported, c.tree_gc).run(),
            name="purger",
        ),
        asyncio.create_task(scrub.run(c), name="scrub-schedule"),
    ]
    for task in loops:
        task.add_done_callback(stopping.report_failure)  # when it dies, not at the stop
    lease_task: asyncio.Task[None] | None = None
    stepping: list[asyncio.Task[stopping.Stopped]] = []
    if c.lease is not None and c.lease.lease_s is not None:

        def step_down(reason: str) -> None:
            # self-fencing: no failure detection, planning or write from here on; the
            # loops end at their pause (a pass in progress finishes: its writes are
            # fenced), as on a stop (stopping.py)
            log.critical("this MDM lost its leadership (%s): it stops acting and exits", reason)
            c.deposed = reason
            acting = [*loops, *c.background.close()]  # and no new settling
            stepping.append(asyncio.create_task(stopping.stop(acting), name="step-down"))
            # a stop under way (SIGTERM) ends the process already: a second SIGTERM
            # would cut it short (aiohttp's GracefulExit out of run_app: exit code 1)
            if ON_DEPOSED in app and not c.stopping:
                app[ON_DEPOSED]()

        lease_task = asyncio.create_task(
            c.lease.run(c.config.ha.renew_interval_s, step_down), name="leader-lease"
        )
        lease_task.add_done_callback(stopping.report_failure)
    yield
    c.stopping = True
    cut_short = False
    try:
        # each loop ends at its next pause, not inside a database session (stopping.py):
        # every connection is back in the pool before _open_store disposes of it
        stopped = await stopping.stop([*loops, *c.background.close(), *stepping])
        if c.deposed:
            log.warning("the last heartbeat times are not written: this MDM no longer leads")
        elif stopped.cancelled:
            # a pass cancelled in a write transaction may still hold the database (on
            # SQLite its write lock): the write would wait for it, up to the 30 s busy
            # timeout
            log.warning(
                "the last heartbeat times are not written: %s had to be cancelled in a "
                "pass that may still hold the database",
                ", ".join(stopped.cancelled),
            )
        else:
            await c.liveness.flush(c.sessions, c.write_gate)
    except asyncio.CancelledError:
        cut_short = True
        log.warning("the stop was cut short: the last heartbeat times are not written")
        raise
    finally:
        # the lease last: held while a loop or the last write may still write (and a
        # step-down that a lease lost meanwhile started)
        if lease_task is not None:
            if cut_short:
                lease_task.cancel()
            else:
                await stopping.stop([lease_task, *stepping])


async def _stop_begins(app: web.Application) -> None:
    """From the first step of a stop on: a lost lease does not signal a second one."""
    if CTX in app:
        app[CTX].stopping = True


async def _end_long_polls(app: web.Application) -> None:
    """Answer waiting long-polls now, so that a SIGTERM does not wait for them."""
    app[CTX].notifier.close()


CONFIG = web.AppKey("meshblock_mdm_config", MdmConfig)

ROUTE_TABLES: tuple[ApiRoutes, ...] = (
    pools.routes,
    protection_domains.routes,
    rebuild.routes,
    scrub.routes,
    sdc.routes,
    sds.routes,
    join.routes,
    volumes.routes,
    snapshot_gc.routes,
    topology.routes,
    health.routes,
)
"""Every route of the API, in the order the router tries them and the OpenAPI
document lists them."""


def create_app(config: MdmConfig) -> web.Application:
    app = web.Application(
        middlewares=[
            compression_middleware,
            error_middleware,
            audit.middleware(_who, _quiet),
            auth_middleware,
        ],
        client_max_size=1 << 20,
    )
    app[CONFIG] = config
    audit.install(app, "mdm", config.audit)
    app.cleanup_ctx.append(_store)
    if config.api.metrics_port:
        app.cleanup_ctx.append(
            health.open_listener(config.api.metrics_host, config.api.metrics_port)
        )
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_stop_begins)
    app.on_shutdown.append(_end_long_polls)
    for table in ROUTE_TABLES:
        app.add_routes(table)
    app[openapi.OPENAPI] = openapi.build([spec for table in ROUTE_TABLES for spec in table.specs])
    app.router.add_get("/api/v1/openapi.json", openapi.openapi_handler)
    return app


async def current_epoch(app: web.Application) -> int:
    async with app[CTX].sessions() as s:
        return int((await s.execute(select(Cluster.epoch))).scalar_one())
