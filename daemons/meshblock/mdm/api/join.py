"""Who may add an SDS to the cluster: join tokens, and SDSs held pending approval.

A registration (``POST /api/v1/sds/register``) of a name the MDM does not know is
admitted (:func:`admit`) when the caller is

- an **admin** (the admin token or an ``admin:`` certificate);
- the **SDS itself, by its certificate** (``sds:NAME``, which only the holder of the
  cluster CA's key can issue: making it is an admin's decision about that one name);
- a holder of a valid **join token** (``join_token`` in the body): an admin made it
  with ``meshctl sds join-token create``, for ``max_uses`` SDSs until it expires; a
  use is taken in the transaction that creates the SDS;
- or an SDS whose **request to join** an admin approved (``meshctl sds approve``),
  registering again from the address and data port it asked from.

Anyone else (the cluster secret alone) is held as a request to join, ``pending``:
the MDM answers 202 and places nothing on it (it has no id, no devices, no PGs) until
an admin approves it. A token that is malformed, unknown, expired or used up, and a
request an admin rejected, are refused (403) and change nothing, with a warning in
the log naming the caller, its address and the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import string
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from meshblock import audit, pki
from meshblock.auth import Role, bearer_token
from meshblock.mdm import authz, schemas
from meshblock.mdm.api.common import change, get_or_404, json, reading, ts
from meshblock.mdm.context import ctx
from meshblock.mdm.errors import Conflict, Forbidden
from meshblock.mdm.leader import writing
from meshblock.mdm.liveness import utcnow
from meshblock.mdm.models import JoinState, JoinToken, SdsJoinRequest
from meshblock.mdm.routing import ApiRoutes, path_id
from meshblock.sizes import SizeError, parse_size

log = logging.getLogger(__name__)
routes = ApiRoutes()
TAG = "SDS"

_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_ID_LEN = 6
SECRET_LEN = 32  # 36 symbols each: 165 bits
TOKEN_RE = re.compile(rf"^([a-z0-9]{{{TOKEN_ID_LEN}}})\.([a-z0-9]{{{SECRET_LEN}}})$")
DEFAULT_TTL_S = 24 * 3600
MAX_TTL_S = 365 * 24 * 3600
MAX_USES = 1_000_000


class Pending(Exception):
    """Raised inside the registration's transaction (which it rolls back): the SDS is
    to be held as a request to join."""


def new_token() -> tuple[str, str]:
    """A new token: (its public id, the whole ``ID.SECRET``)."""
    token_id = "".join(secrets.choice(_ALPHABET) for _ in range(TOKEN_ID_LEN))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LEN))
    return token_id, f"{token_id}.{secret}"


def secret_digest(token: str) -> str:
    """The SHA-256 (hex) of a token's secret part, as stored."""
    return hashlib.sha256(token.partition(".")[2].encode()).hexdigest()


def aware(t: dt.datetime) -> dt.datetime:
    """SQLite gives back the timestamps it stored without their zone (UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def token_doc(t: JoinToken, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    expired = aware(t.expires_at) <= now
    return {
        "id": t.id,
        "token_id": t.token_id,
        "description": t.description,
        "uses": t.uses,
        "max_uses": t.max_uses,
        "expires_at": ts(t.expires_at),
        "state": "expired" if expired else "used up" if t.uses >= t.max_uses else "valid",
        "created_by": t.created_by,
        "last_used_at": ts(t.last_used_at),
        "last_used_by": t.last_used_by,
        "created_at": ts(t.created_at),
    }


def request_doc(r: SdsJoinRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "state": r.state.value,
        "protection_domain": r.protection_domain,
        "fault_set": r.fault_set,
        "address": r.address,
        "data_port": r.data_port,
        "control_port": r.control_port,
        "devices": r.devices,
        "capacity_bytes": r.capacity_bytes,
        "caller": r.caller,
        "remote": r.remote,
        "decided_by": r.decided_by,
        "last_seen": ts(r.last_seen),
        "created_at": ts(r.created_at),
    }


def caller_of(request: web.Request) -> str:
    """Who makes this request, for the records and the log: a certificate's identity,
    else which bearer token."""
    ident = request.get(authz.CALLER)
    if ident is not None:
        return str(ident)
    role = ctx(request).tokens.role_of(bearer_token(request.headers.get("Authorization")))
    return {
        Role.ADMIN: "admin token",
        Role.READONLY: "read-only token",
        Role.COMPONENT: "cluster secret",
    }.get(role, "no credential")


def is_admin(request: web.Request) -> bool:
    ident = request.get(authz.CALLER)
    if ident is not None:
        return bool(ident.kind == pki.Kind.ADMIN)
    return caller_of(request) == "admin token"


def _refuse(request: web.Request, name: str, why: str) -> Forbidden:
    audit.note(request, "sds_join_refused", sds=name)
    log.warning(
        "refused the join of SDS %s from %s (%s): %s",
        name,
        caller_of(request),
        request.remote or "?",
        why,
    )
    return Forbidden(why)


async def _take_token(request: web.Request, s: AsyncSession, token: str, name: str) -> str:
    """Take one use of ``token`` for SDS ``name`` (in the caller's transaction); its
    id. 403 when it is malformed, unknown, expired or used up."""
    m = TOKEN_RE.match(token)
    if m is None:
        raise _refuse(request, name, "the join token is malformed (expected ID.SECRET)")
    row = (
        await s.execute(select(JoinToken).where(JoinToken.token_id == m.group(1)))
    ).scalar_one_or_none()
    # The digest is compared even for an unknown id: no answer comes faster for one.
    digest = row.secret_sha256 if row is not None else "0" * 64
    if not hmac.compare_digest(digest, secret_digest(token)) or row is None:
        raise _refuse(request, name, f"join token {m.group(1)} is not valid")
    now = utcnow()
    if aware(row.expires_at) <= now:
        raise _refuse(request, name, f"join token {row.token_id} expired at {ts(row.expires_at)}")
    if row.uses >= row.max_uses:
        raise _refuse(
            request, name, f"join token {row.token_id} is used up ({row.uses} of {row.max_uses})"
        )
    row.uses += 1
    row.last_used_at = now
    row.last_used_by = name
    return str(row.token_id)


async def admit(request: web.Request, s: AsyncSession, named: dict[str, Any]) -> str:
    """Whether a new SDS may be created by this registration (see the module's
    docstring): how it was admitted, for the log; raises :class:`Pending` or 403."""
    name = named["name"]
    ident = request.get(authz.CALLER)
    if is_admin(request):
        return f"by {caller_of(request)}"
    if ident is not None and ident.kind == pki.Kind.SDS:
        return f"by its certificate {ident}"  # authz.require_self checked the name
    req = (
        await s.execute(select(SdsJoinRequest).where(SdsJoinRequest.name == name))
    ).scalar_one_or_none()
    if req is not None and req.state == JoinState.REJECTED:
        raise _refuse(request, name, f"an admin rejected SDS {name!r} ({req.decided_by})")
    token = named.get("join_token")
    if token is not None:
        token_id = await _take_token(request, s, token, name)
        if req is not None:
            await s.delete(req)
        return f"with join token {token_id}"
    if req is not None and req.state == JoinState.APPROVED:
        endpoint = (named["address"], named.get("data_port", 7072))
        if endpoint != (req.address, req.data_port):
            raise _refuse(
                request,
                name,
                f"SDS {name!r} was approved at {req.address}:{req.data_port}, "
                f"not {endpoint[0]}:{endpoint[1]}",
            )
        await s.delete(req)
        return f"approved by {req.decided_by}"
    raise Pending()


async def hold(request: web.Request, named: dict[str, Any]) -> dict[str, Any]:
    """Record (or refresh) the request to join of an SDS that was not admitted. A
    pending request keeps the address and data port it was made from: another is 409
    (delete the request first). Does not move the cluster epoch."""
    c = ctx(request)
    name = named["name"]
    endpoint = (named["address"], named.get("data_port", 7072))
    devices = named.get("devices", [])
    async with writing(c.write_gate, c.sessions) as s:
        req = (
            await s.execute(select(SdsJoinRequest).where(SdsJoinRequest.name == name))
        ).scalar_one_or_none()
        if req is None:
            req = SdsJoinRequest(
                name=name,
                protection_domain=named["protection_domain"],
                fault_set=named.get("fault_set"),
                address=endpoint[0],
                data_port=endpoint[1],
                control_port=named.get("control_port", 7073),
                caller=caller_of(request),
                remote=request.remote,
            )
            s.add(req)
            log.warning(
                "SDS %s asks to join from %s:%d (%s, %s) without a join token: pending "
                "until an admin approves it (meshctl sds approve %s)",
                name,
                endpoint[0],
                endpoint[1],
                req.caller,
                request.remote or "?",
                name,
            )
        elif (req.address, req.data_port) != endpoint:
            raise _refuse(
                request,
                name,
                f"SDS {name!r} asked to join from {req.address}:{req.data_port}; delete "
                f"that request first (meshctl sds remove {name})",
            )
        audit.note(
            request, "sds_join_pending", sds=name, address=endpoint[0], data_port=endpoint[1]
        )
        req.devices = len(devices)
        req.capacity_bytes = sum(_capacity(d["capacity"]) for d in devices)
        req.last_seen = utcnow()
        await s.flush()
        await s.refresh(req)
        return request_doc(req)


def _capacity(value: Any) -> int:
    try:
        return parse_size(value)
    except SizeError:
        return 0


# -- join tokens ----------------------------------------------------------------------


@routes.route(
    "POST",
    "/api/v1/sds/join-tokens",
    role=Role.ADMIN,
    tag=TAG,
    status=201,
    summary="Make a join token: lets new SDSs register (a number of uses, until it expires)",
    body=schemas.JOIN_TOKEN_CREATE,
    response="JoinTokenCreated",
)
async def create_join_token(request: web.Request, body: dict[str, Any]) -> web.Response:
    """The whole token is in this answer only: the MDM keeps a hash of its secret."""
    ttl = int(body.get("ttl_s", DEFAULT_TTL_S))
    async with change(request) as s:
        while True:
            token_id, token = new_token()
            taken = await s.execute(select(JoinToken.id).where(JoinToken.token_id == token_id))
            if taken.first() is None:
                break
        row = JoinToken(
            token_id=token_id,
            secret_sha256=secret_digest(token),
            description=body.get("description"),
            max_uses=int(body.get("uses", 1)),
            uses=0,
            expires_at=utcnow() + dt.timedelta(seconds=ttl),
            created_by=caller_of(request),
        )
        s.add(row)
        await s.flush()
        await s.refresh(row)
        doc = token_doc(row)
    audit.note(request, "join_token_create", token_id=token_id, uses=row.max_uses)
    log.info(
        "join token %s made by %s: %d use(s), expires %s",
        token_id,
        doc["created_by"],
        row.max_uses,
        doc["expires_at"],
    )
    return json(doc | {"token": token}, 201)


@routes.route(
    "GET",
    "/api/v1/sds/join-tokens",
    role=Role.ADMIN,
    tag=TAG,
    summary="List join tokens (their ids, uses and expiry; never their secrets)",
    response="JoinTokenList",
)
async def list_join_tokens(request: web.Request) -> web.Response:
    now = utcnow()
    async with reading(request) as s:
        rows = (await s.execute(select(JoinToken).order_by(JoinToken.id))).scalars()
        return json({"join_tokens": [token_doc(t, now) for t in rows]})


@routes.route(
    "DELETE",
    r"/api/v1/sds/join-tokens/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete a join token: no SDS joins with it any more",
    errors=(404,),
)
async def delete_join_token(request: web.Request) -> web.Response:
    async with change(request) as s:
        row = await get_or_404(s, JoinToken, path_id(request), "join token")
        await s.delete(row)
        audit.note(request, "join_token_delete", token_id=row.token_id)
        log.info("join token %s deleted by %s", row.token_id, caller_of(request))
    return web.Response(status=204)


# -- requests to join -----------------------------------------------------------------


@routes.route(
    "GET",
    "/api/v1/sds/join-requests",
    role=Role.READONLY,
    tag=TAG,
    summary="List SDSs that asked to join without a token (pending, approved, rejected)",
    response="SdsJoinRequestList",
)
async def list_join_requests(request: web.Request) -> web.Response:
    async with reading(request) as s:
        rows = (await s.execute(select(SdsJoinRequest).order_by(SdsJoinRequest.id))).scalars()
        return json({"join_requests": [request_doc(r) for r in rows]})


async def _decide(request: web.Request, state: JoinState) -> web.Response:
    async with change(request) as s:
        req = await get_or_404(s, SdsJoinRequest, path_id(request), "request to join")
        if req.state == state:
            raise Conflict(f"SDS {req.name!r} is {state.value} already")
        if state == JoinState.APPROVED and req.state == JoinState.REJECTED:
            raise Conflict(
                f"SDS {req.name!r} was rejected; delete the request and let it ask again"
            )
        req.state = state
        req.decided_by = caller_of(request)
        audit.note(request, f"sds_join_{state.value}", sds=req.name)
        await s.flush()
        doc = request_doc(req)
    log.warning(
        "SDS %s (%s:%d) %s by %s",
        doc["name"],
        doc["address"],
        doc["data_port"],
        state.value,
        doc["decided_by"],
    )
    return json(doc)


@routes.route(
    "POST",
    r"/api/v1/sds/join-requests/{id:\d+}/approve",
    role=Role.ADMIN,
    tag=TAG,
    summary="Approve a pending SDS: its next registration from the same address creates it",
    response="SdsJoinRequest",
    errors=(404, 409),
)
async def approve_join_request(request: web.Request) -> web.Response:
    return await _decide(request, JoinState.APPROVED)


@routes.route(
    "POST",
    r"/api/v1/sds/join-requests/{id:\d+}/reject",
    role=Role.ADMIN,
    tag=TAG,
    summary="Reject a pending SDS: its registrations are refused until the request is deleted",
    response="SdsJoinRequest",
    errors=(404, 409),
)
async def reject_join_request(request: web.Request) -> web.Response:
    return await _decide(request, JoinState.REJECTED)


@routes.route(
    "DELETE",
    r"/api/v1/sds/join-requests/{id:\d+}",
    role=Role.ADMIN,
    tag=TAG,
    status=204,
    summary="Delete a request to join (the SDS may ask again)",
    errors=(404,),
)
async def delete_join_request(request: web.Request) -> web.Response:
    async with change(request) as s:
        req = await get_or_404(s, SdsJoinRequest, path_id(request), "request to join")
        await s.delete(req)
        audit.note(request, "sds_join_request_delete", sds=req.name)
        log.info("request to join of SDS %s deleted by %s", req.name, caller_of(request))
    return web.Response(status=204)
