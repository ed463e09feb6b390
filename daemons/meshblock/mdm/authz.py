"""Who may call what: bearer tokens, and the identity of a client certificate.

The MDM serves its API over HTTPS with ``[tls]`` (docs/security.md). A request then
comes with a client certificate the cluster CA signed (TLS already refused any other
in the handshake: another CA's, a revoked or an expired one), or, with
``client_certs = "optional"``, perhaps with none.

- **Without a certificate** (plain HTTP, or none sent) the bearer token decides, as
  it always has: the admin token anything, the read-only token the reads, the cluster
  secret the component routes, for any SDS or SDC, but those of
  :data:`NOT_FOR_SECRET` (the mappings: only an SDS's certificate uses them).
- **With a certificate**, its identity (``meshblock:KIND:NAME``, meshblock.pki)
  decides and a bearer token sent along is not looked at: it can neither widen nor
  narrow what the identity may do. ``admin:`` may do what the admin token may;
  ``mgmt:`` what the read-only token may; ``sds:NAME`` and ``sdc:GUID`` only the
  component routes of :data:`BINDINGS`, and only as themselves: an SDS's heartbeat,
  reports and registration for the SDS of that name, an SDC's for the SDC of that
  GUID. ``mdm:`` (peer MDMs, not built yet) may call nothing but the open routes.

A refusal is a 403 before the handler runs (nothing changes) and a warning in the log
naming the identity. Routes with :attr:`Role.NONE` (``/health``, liveness) stay
open to every client the handshake let in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import select

from meshblock import pki
from meshblock.auth import Role, bearer_token
from meshblock.mdm.context import CTX, SERVER_TLS
from meshblock.mdm.errors import Forbidden, Handler, Revoked, Unauthorized
from meshblock.mdm.models import Device, Sdc, Sds
from meshblock.mdm.routing import MAX_ID, RouteSpec, spec_of

log = logging.getLogger(__name__)

Kind = pki.Kind

#: What each kind of certificate may do, in the roles of the bearer tokens.
CERT_ROLES: dict[Kind, Role] = {
    Kind.ADMIN: Role.ADMIN,
    Kind.MGMT: Role.READONLY,
    Kind.SDS: Role.COMPONENT,
    Kind.SDC: Role.COMPONENT,
    Kind.MDM: Role.NONE,
}


@dataclass(frozen=True)
class Binding:
    """Which component kinds may call a component route, and as whom.

    ``path``: the path parameter holding the id of the SDS or SDC the call acts for,
    which must be the caller's own (checked here, before the handler). ``body``: the
    body field naming it, checked by the handler with :func:`require_self` (the body
    is read and validated there). ``pool``: the path parameter holding a pool id; an
    SDS may call it only for a pool it has a device in (checked here). None of them:
    any component of those kinds (a report about another SDS, whose reporter the
    handler checks with :func:`require_reporter`).
    """

    kinds: frozenset[Kind]
    path: str | None = None
    body: str | None = None
    pool: str | None = None


def _bind(
    *kinds: Kind, path: str | None = None, body: str | None = None, pool: str | None = None
) -> Binding:
    return Binding(frozenset(kinds), path, body, pool)


#: Every route of role COMPONENT, by (method, OpenAPI path). A component route missing
#: here is refused to every SDS and SDC certificate (tests/test_mdm_identity.py checks
#: that none is missing).
BINDINGS: dict[tuple[str, str], Binding] = {
    ("POST", "/api/v1/sds/register"): _bind(Kind.SDS, body="name"),
    ("POST", "/api/v1/sds/{id}/heartbeat"): _bind(Kind.SDS, path="id"),
    ("POST", "/api/v1/sds/{id}/devices/{device_id}/failed"): _bind(Kind.SDS, path="id"),
    ("POST", "/api/v1/sds/{id}/pg-synced"): _bind(Kind.SDS, path="id"),
    ("POST", "/api/v1/sds/{id}/pgs-synced"): _bind(Kind.SDS, path="id"),
    # A peer reports another SDS (its ``reporter`` must be itself: require_reporter);
    # the MDM checks for itself before it acts.
    ("POST", "/api/v1/sds/{id}/unreachable"): _bind(Kind.SDS, Kind.SDC),
    # An SDS follows the maps of the pools it has devices in, and only those (its
    # copies and replicas are all in PGs of those pools); an SDC reads its pools'
    # maps through its own /maps.
    ("GET", "/api/v1/pools/{id}/pgmap"): _bind(Kind.SDS, pool="id"),
    # and the mappings of those pools' volumes, to check its clients' IO by
    ("GET", "/api/v1/pools/{id}/mappings"): _bind(Kind.SDS, pool="id"),
    ("POST", "/api/v1/sdc/register"): _bind(Kind.SDC, body="guid"),
    ("POST", "/api/v1/sdc/{id}/heartbeat"): _bind(Kind.SDC, path="id"),
    ("GET", "/api/v1/sdc/{id}/maps"): _bind(Kind.SDC, path="id"),
}

#: Component routes the cluster secret may not call: only a certificate's identity
#: needs them. The mappings (every volume id of a pool and the GUIDs of the SDCs it is
#: mapped to) are what an SDS checks its clients' IO by, which it does only with TLS
#: identities, reading them with its certificate; an SDS without a certificate does
#: not follow them (sds/mdm_client.py), and the secret is on every SDC host.
NOT_FOR_SECRET: frozenset[tuple[str, str]] = frozenset({("GET", "/api/v1/pools/{id}/mappings")})

CALLER = web.RequestKey("meshblock_mdm_caller", pki.Identity)


def certificate_identity(request: web.Request) -> pki.Identity | None:
    """The identity of the client certificate of this request's connection; None when
    none was presented (or the API is plain HTTP). A certificate the CA signed that
    names no identity is refused (403)."""
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    if not peercert:
        return None
    server_tls = request.app.get(SERVER_TLS)
    if server_tls is not None and server_tls.revoked_peer(peercert):
        # A connection opened before the CRL that revokes it was reloaded (keep-alive):
        # refused, and closed after this answer.
        serial = peercert.get("serialNumber")
        log.warning(
            "refused %s %s: certificate %s is revoked", request.method, request.path, serial
        )
        raise Revoked("the client certificate has been revoked")
    try:
        return pki.identity_from_peercert(peercert)
    except pki.PkiError as exc:
        raise Forbidden(f"the client certificate names no identity: {exc}") from None


def _allowed(role: Role, method: str, spec: RouteSpec) -> bool:
    return (
        role == Role.ADMIN
        or (role == Role.READONLY and method == "GET" and spec.role <= Role.READONLY)
        or (role == Role.COMPONENT and spec.role == Role.COMPONENT)
    )


def _refuse(request: web.Request, ident: pki.Identity, why: str) -> Forbidden:
    log.warning("refused %s %s from %s: %s", request.method, request.path, ident, why)
    return Forbidden(why)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    spec = spec_of(request)
    if spec is None or spec.role == Role.NONE:
        return await handler(request)
    ident = certificate_identity(request)
    if ident is None:
        role = request.app[CTX].tokens.role_of(bearer_token(request.headers.get("Authorization")))
        if role == Role.NONE:
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
        if role == Role.COMPONENT and (spec.method, spec.openapi_path) in NOT_FOR_SECRET:
            log.warning("refused %s %s to the cluster secret", request.method, request.path)
            raise Forbidden(
                f"the cluster secret may not {request.method} {spec.openapi_path}: "
                "an SDS's certificate or an admin credential may"
            )
        if not _allowed(role, request.method, spec):
            raise Forbidden(
                f"this token ({role.name.lower()}) may not {request.method} {spec.openapi_path}"
            )
        return await handler(request)
    if not _allowed(CERT_ROLES[ident.kind], request.method, spec):
        raise _refuse(request, ident, f"{ident} may not {request.method} {spec.openapi_path}")
    if CERT_ROLES[ident.kind] == Role.COMPONENT:
        await _check_binding(request, spec, ident)
    request[CALLER] = ident
    return await handler(request)


async def _check_binding(request: web.Request, spec: RouteSpec, ident: pki.Identity) -> None:
    binding = BINDINGS.get((spec.method, spec.openapi_path))
    if binding is None or ident.kind not in binding.kinds:
        raise _refuse(request, ident, f"{ident} may not {request.method} {spec.openapi_path}")
    if binding.pool is not None:
        pool_id = int(request.match_info[binding.pool])
        if not await _has_device_in(request, ident.name, pool_id):
            raise _refuse(request, ident, f"{ident} has no device in pool {pool_id}")
    if binding.path is None:
        return
    owner = await _owner(request, ident.kind, int(request.match_info[binding.path]))
    # An id that names nothing is the handler's 404 (an SDS whose record was removed
    # registers again on a 404); it reveals nothing an id would not.
    if owner is not None and owner != ident.name:
        raise _refuse(
            request, ident, f"{ident} may act only as itself, not as {ident.kind.value}:{owner}"
        )


async def _owner(request: web.Request, kind: Kind, id_: int) -> str | None:
    """The name of SDS ``id_`` or the GUID of SDC ``id_`` (None: no such). Neither ever
    changes for an id, and ids are never reused: found ones are kept in memory."""
    if not 1 <= id_ <= MAX_ID:
        return None
    c = request.app[CTX]
    key = (kind.value, id_)
    if key in c.owners:
        return c.owners[key]
    column = Sds.name if kind == Kind.SDS else Sdc.guid
    model = Sds if kind == Kind.SDS else Sdc
    async with c.sessions() as s:
        found = (await s.execute(select(column).where(model.id == id_))).scalar_one_or_none()
    if found is not None:
        c.owners[key] = str(found)
    return None if found is None else str(found)


async def _has_device_in(request: web.Request, sds_name: str, pool_id: int) -> bool:
    """Whether the SDS named ``sds_name`` has a device in pool ``pool_id`` now (not
    cached: devices come and go)."""
    if not 1 <= pool_id <= MAX_ID:
        return False
    async with request.app[CTX].sessions() as s:
        found = await s.execute(
            select(Device.id)
            .join(Sds, Sds.id == Device.sds_id)
            .where(Sds.name == sds_name, Device.pool_id == pool_id)
            .limit(1)
        )
        return found.first() is not None


async def require_reporter(request: web.Request, reporter: str | None) -> None:
    """For a report a component makes about another (an SDS unreachable): a
    certificate caller of kind SDS or SDC may name as its ``reporter`` only itself:
    its identity (``sds:NAME``), its bare name, or its id (``sds:ID``, which is what an
    SDS sends). Callers with a token, or with an admin certificate, pass."""
    ident = request.get(CALLER)
    if ident is None or reporter is None or CERT_ROLES[ident.kind] != Role.COMPONENT:
        return
    if reporter in (str(ident), ident.name):
        return
    kind, _, id_ = reporter.partition(":")
    if kind == ident.kind.value and id_.isdigit():
        if await _owner(request, ident.kind, int(id_)) == ident.name:
            return
    raise _refuse(request, ident, f"{ident} may report only as itself, not as {reporter!r}")


def require_self(request: web.Request, kind: Kind, name: str) -> None:
    """For a handler whose body names the component it acts for (its registration):
    403 unless a certificate caller of ``kind`` is that component. Callers with a
    token, or with an admin certificate, pass."""
    ident = request.get(CALLER)
    if ident is not None and ident.kind == kind and ident.name != name:
        raise _refuse(request, ident, f"{ident} may act only as itself, not as {kind.value}:{name}")
