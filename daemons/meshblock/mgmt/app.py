"""MGMT's aiohttp application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from meshblock import audit, metrics_access, pki
from meshblock.auth import Role, TokenTable
from meshblock.config import ConfigError, read_secret_file
from meshblock.mgmt import api, db, inventory, pages, rules
from meshblock.mgmt.config import MgmtConfig
from meshblock.mgmt.context import CTX, MgmtContext
from meshblock.mgmt.errors import error_middleware
from meshblock.mgmt.metrics import MgmtMetrics
from meshblock.mgmt.throttle import Limit, LoginThrottle, PasswordChecks
from meshblock.tls import MdmTls, crl_reload, mdm_tls

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
CONFIG = web.AppKey("meshblock_mgmt_config", MgmtConfig)
USER_AGENT = "meshblock-mgmt"


def mdm_tls_of(config: MgmtConfig) -> MdmTls:
    """How MGMT reaches the MDM; a certificate must name MGMT (``mgmt:<name>``).
    :class:`meshblock.config.ConfigError` otherwise."""
    return mdm_tls(config.tls, [config.mdm.url], pki.Kind.MGMT, key="mdm.url")


def mdm_headers(config: MgmtConfig, link: MdmTls) -> dict[str, str]:
    """The headers of MGMT's calls to the MDM: its read-only token (``[mdm]
    token_file``) when it has no certificate to go by. A :class:`ConfigError` if the
    file cannot be read."""
    headers = {"User-Agent": USER_AGENT}
    if config.mdm.token_file and link.identity is None:
        token = read_secret_file(config.mdm.token_file, "mdm.token_file")
        headers["Authorization"] = f"Bearer {token}"
    return headers


def server_tls(config: MgmtConfig) -> ssl.SSLContext | None:
    """The TLS context MGMT serves with: its ``[tls]`` certificate (``None``: plain HTTP
    by ``[http] plain_http``). Browsers send no client certificate and are asked for
    none. :class:`meshblock.config.ConfigError` if the section cannot serve."""
    if config.http.plain_http:
        return None
    tls = config.tls
    if not tls.cert:
        raise ConfigError(
            "MGMT serves HTTPS: set [tls] cert, key and ca (meshctl ca issue mgmt:NAME, "
            "with the names users reach it by as --san), or [http] plain_http = true "
            "behind a reverse proxy on this host that serves HTTPS"
        )
    try:
        context = pki.server_context(
            Path(tls.cert), Path(tls.key), Path(tls.ca), client_certs=pki.ClientCerts.OPTIONAL
        )
    except pki.PkiError as exc:
        raise ConfigError(f"[tls] {exc}") from None
    context.verify_mode = ssl.CERT_NONE  # users log in; no certificate is asked for
    return context


def login_throttle(config: MgmtConfig) -> LoginThrottle:
    a = config.auth
    return LoginThrottle(
        Limit(a.login_max_failures, a.login_window_s, a.login_backoff_s, a.login_max_backoff_s)
    )


async def _context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    engine = db.create_engine(config.database.url, config.database.echo)
    link = mdm_tls_of(config)
    try:
        await db.migrate(engine)
        async with (
            aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}, trust_env=False) as http,
            aiohttp.ClientSession(
                headers=mdm_headers(config, link),
                trust_env=False,
                connector=link.connector(),
            ) as mdm_http,
        ):
            app[CTX] = MgmtContext(
                config=config,
                engine=engine,
                sessions=db.session_factory(engine),
                http=http,
                mdm_http=mdm_http,
                templates=pages.templates(),
                metrics=MgmtMetrics(),
                webhook_tokens=TokenTable({Role.ADMIN: config.auth.webhook_token}),
                logins=login_throttle(config),
                password_checks=PasswordChecks(config.auth.max_password_checks),
            )
            log.info("alert history ready: %s", db.redact_url(config.database.url))
            yield
    finally:
        await engine.dispose()


async def _rule_sync(app: web.Application) -> AsyncIterator[None]:
    c = app[CTX]
    task = None
    if c.config.prometheus.url:
        task = asyncio.create_task(rules.run_periodic(c), name="rule-sync")
    else:
        log.info("no [prometheus] url: alert rules are not synced")
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _who(_request: web.Request) -> dict[str, str]:
    """Who called, before a handler found the user (sessions.identify tells the log)."""
    return {}


def _quiet(_request: web.Request, _status: int) -> bool:
    return False


def _share_ctx(app: web.Application, side: web.Application) -> None:
    side[CTX] = app[CTX]


def create_app(config: MgmtConfig) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware(pages.error_page), audit.middleware(_who, _quiet)],
        client_max_size=1 << 20,
    )
    app[CONFIG] = config
    audit.install(app, "mgmt", config.audit)
    app.cleanup_ctx.append(_context)
    app.cleanup_ctx.append(_rule_sync)
    app.cleanup_ctx.append(inventory.mdm_actions(USER_AGENT))  # after _context
    app.cleanup_ctx.append(crl_reload(config.tls, "mgmt", lambda a: a[CTX].metrics.registry))
    app[metrics_access.ACCESS] = metrics_access.ReadAccess.of(config.metrics)
    if config.metrics.port:
        routes = (("/metrics", api.metrics),)
        app.cleanup_ctx.append(metrics_access.open_listener(config.metrics, routes, _share_ctx))
    app.add_routes(api.routes)
    app.add_routes(pages.routes)
    app.add_routes(inventory.routes)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
