"""Who may read an SDS's, SDC's or MGMT's metrics and health details.

``/metrics`` (and the details of an SDS's or SDC's ``/health``: devices, exports,
names, peers) tell an attacker much about a cluster, so on the daemon's own port they
are read only with a credential:

- a client certificate of an identity that may read (``admin:``, ``mgmt:``; the SDS's
  and SDC's control ports are HTTPS with ``[tls]`` and ask for one without requiring
  it). A certificate of another kind (``sds:``, ``sdc:``, ``mdm:``) is a 403; a bearer
  token sent along with a certificate is not looked at, as on the MDM;
- or, without a certificate, ``Authorization: Bearer <token>`` with the read token of
  ``[metrics] token_file`` (read at start; Prometheus sends it from a
  ``credentials_file``). None is a 401, and so is a wrong one.

``[metrics] host`` and ``port`` (0: none, the default) serve the same routes with no
credential on a plain-HTTP listener of their own, for a monitoring network or
loopback (:func:`open_listener`). ``/health`` itself stays open everywhere: without a
credential it says only whether the daemon is up and one word of its state.

Refusals are written to the access and audit log (meshblock.audit) with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from meshblock import audit, pki
from meshblock.auth import Role, TokenTable, bearer_token
from meshblock.config import read_secret_file

log = logging.getLogger(__name__)

#: The kinds of certificate that may read metrics and health details.
READERS = frozenset({pki.Kind.ADMIN, pki.Kind.MGMT})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the read token, and an open listener (port 0: none)."""

    # A file holding the token that reads /metrics and the health details
    # (Authorization: Bearer); empty: only a certificate that may read does.
    token_file: str = ""
    # A plain-HTTP listener serving those routes without a credential; 0: none.
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("metrics.port must be between 0 (none) and 65535")


class Refused(Exception):
    """A request that may not read: ``status`` 401 or 403, and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ReadAccess:
    """The check of one daemon's read credential (``open``: everyone reads)."""

    def __init__(self, token: str = "", *, open: bool = False) -> None:
        self._tokens = TokenTable({Role.READONLY: token})
        self.open = open

    @classmethod
    def of(cls, config: MetricsConfig) -> ReadAccess:
        """The check of ``config``'s token file; a :class:`ConfigError` if it cannot
        be read."""
        if not config.token_file:
            return cls()
        return cls(read_secret_file(config.token_file, "metrics.token_file"))

    def check(self, request: web.Request) -> None:
        """Nothing if the caller may read; :class:`Refused` otherwise."""
        if self.open:
            return
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if peercert:
            try:
                ident = pki.identity_from_peercert(peercert)
            except pki.PkiError as exc:
                raise Refused(403, f"the client certificate names no identity: {exc}") from None
            audit.identify(request, certificate=str(ident))
            if ident.kind not in READERS:
                raise Refused(403, f"{ident} may not read {request.path}")
            return
        token = bearer_token(request.headers.get("Authorization"))
        if self._tokens.role_of(token) != Role.READONLY:
            raise Refused(
                401,
                f"{request.path} needs the read token ('Authorization: Bearer <token>' of "
                "[metrics] token_file) or a certificate that may read",
            )
        audit.identify(request, token="metrics")

    def reads(self, request: web.Request) -> bool:
        """Whether the caller may read (no refusal: for ``/health``'s details)."""
        try:
            self.check(request)
        except Refused:
            return False
        return True


ACCESS = web.AppKey("meshblock_metrics_access", ReadAccess)


def refusal(request: web.Request, exc: Refused) -> web.Response:
    """The answer to a refused read, noted for the audit log and the daemon's log."""
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, exc)
    audit.note(request, reason=exc.reason)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    code = "unauthorized" if exc.status == 401 else "forbidden"
    return web.json_response(
        {"error": {"code": code, "message": exc.reason}}, status=exc.status, headers=headers
    )


def guarded(handler: Handler) -> Handler:
    """``handler`` behind the read check of the app's :data:`ACCESS`."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            request.app[ACCESS].check(request)
        except Refused as exc:
            return refusal(request, exc)
        return await handler(request)

    return run


def _no_change(_request: web.Request, _status: int) -> bool:
    return False


def _who(_request: web.Request) -> dict[str, str]:
    return {}


def install(
    app: web.Application, daemon: str, config: MetricsConfig, log_to: audit.AuditConfig
) -> None:
    """Give ``app`` (an SDS's or SDC's control port) its read check and the access and
    audit log (middleware first: refusals are written)."""
    app[ACCESS] = ReadAccess.of(config)
    audit.install(app, daemon, log_to)
    app.middlewares.append(audit.middleware(_who, _no_change))


Share = Callable[[web.Application, web.Application], None]


def open_listener(
    config: MetricsConfig, routes: Sequence[tuple[str, Handler]], share: Share
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context serving ``routes`` (GET) openly on ``config``'s host and
    port: an app of its own, given what the handlers need by ``share(main, side)``
    when the main app has started the contexts before this one."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        side = web.Application()
        side[ACCESS] = ReadAccess(open=True)
        share(app, side)
        for path, handler in routes:
            side.router.add_get(path, handler)
        runner = web.AppRunner(side, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, config.host, config.port).start()
            log.info("metrics open on http://%s:%d (no credential)", config.host, config.port)
            yield
        finally:
            await runner.cleanup()

    return run
