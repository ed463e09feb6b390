"""Who is calling: a login session (web pages) or an API token (scripts).

A login creates a ``sessions`` row whose id is the SHA-256 of a random secret; the
secret goes to the browser in an HttpOnly, SameSite=Lax cookie (``Secure`` when MGMT
serves HTTPS, or with ``auth.secure_cookies`` behind a proxy). Each session holds a
CSRF synchronizer token: every unsafe request authenticated by the cookie must
present it, as the form field
``csrf_token`` or the header ``X-CSRF-Token``. The login form itself, made before
any session exists, is protected by a double-submit cookie.

Requests with ``Authorization: Bearer <API token>`` act as the token's user and
need no CSRF token (a browser never adds that header by itself).
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass

from aiohttp import web
from sqlalchemy import delete, select

from meshblock import audit
from meshblock.auth import bearer_token
from meshblock.mgmt.accounts import token_hash, user_of_token
from meshblock.mgmt.context import ctx
from meshblock.mgmt.errors import CsrfError, Forbidden, LoginRequired, Unauthorized
from meshblock.mgmt.models import User, UserRole, WebSession, utcnow

SESSION_COOKIE = "meshblock_mgmt_session"
LOGIN_COOKIE = "meshblock_mgmt_login"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Identity:
    user_id: int
    name: str
    role: UserRole
    session_id: str | None = None  # None when authenticated by an API token
    csrf_token: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


async def identify(request: web.Request) -> Identity | None:
    """The caller, or None without credentials; a bad API token is a 401."""
    c = ctx(request)
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        async with c.sessions() as s, s.begin():
            found = await user_of_token(s, token)
        if found is None:
            raise Unauthorized("the API token is not valid")
        user, token_name = found
        audit.identify(request, user=user.name, token=token_name)
        return Identity(user.id, user.name, user.role)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    sid = token_hash(cookie)
    async with c.sessions() as s:
        row = (
            await s.execute(
                select(WebSession, User)
                .join(User, User.id == WebSession.user_id)
                .where(WebSession.id == sid, WebSession.expires_at > utcnow())
            )
        ).first()
    if row is None:
        return None
    session, user = row
    audit.identify(request, user=user.name)
    return Identity(user.id, user.name, user.role, session.id, session.csrf_token)


async def require(
    request: web.Request,
    role: UserRole = UserRole.VIEWER,
    form: dict[str, str] | None = None,
) -> Identity:
    """The caller, who must be logged in (or hold an API token) and have ``role``.

    For an unsafe method on a session, the CSRF token must come with the request: in
    ``form`` (the parsed form body) or in the ``X-CSRF-Token`` header.
    """
    ident = await identify(request)
    if ident is None:
        raise LoginRequired("log in first, or send 'Authorization: Bearer <API token>'")
    if request.method not in SAFE_METHODS and ident.csrf_token is not None:
        presented = request.headers.get(CSRF_HEADER) or (form or {}).get(CSRF_FIELD, "")
        if not presented or not hmac.compare_digest(presented, ident.csrf_token):
            raise CsrfError(
                "the CSRF token is missing or does not match this session; reload the page "
                "and try again"
            )
    if role == UserRole.ADMIN and not ident.is_admin:
        raise Forbidden(f"user {ident.name!r} is a viewer; this needs the admin role")
    return ident


async def start_session(request: web.Request, response: web.StreamResponse, user: User) -> None:
    """Create a session for ``user`` and set its cookie on ``response``."""
    c = ctx(request)
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    async with c.sessions() as s, s.begin():
        await s.execute(delete(WebSession).where(WebSession.expires_at <= now))
        s.add(
            WebSession(
                id=token_hash(secret),
                user_id=user.id,
                csrf_token=secrets.token_urlsafe(32),
                expires_at=now + dt.timedelta(seconds=c.config.auth.session_ttl_s),
            )
        )
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=int(c.config.auth.session_ttl_s),
        path="/",
        httponly=True,
        samesite="Lax",
        secure=c.config.secure_cookies,
    )


async def end_session(request: web.Request, response: web.StreamResponse, ident: Identity) -> None:
    if ident.session_id is not None:
        async with ctx(request).sessions() as s, s.begin():
            await s.execute(delete(WebSession).where(WebSession.id == ident.session_id))
    response.del_cookie(SESSION_COOKIE, path="/")


def login_csrf(request: web.Request, response: web.StreamResponse) -> str:
    """The double-submit token for the login form, set as a cookie if new."""
    token = request.cookies.get(LOGIN_COOKIE)
    if not token or len(token) > 100:
        token = secrets.token_urlsafe(32)
        response.set_cookie(
            LOGIN_COOKIE,
            token,
            path="/login",
            httponly=True,
            samesite="Strict",
            secure=ctx(request).config.secure_cookies,
        )
    return token


def check_login_csrf(request: web.Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    presented = form.get(CSRF_FIELD, "")
    if not cookie or not presented or not hmac.compare_digest(cookie, presented):
        raise CsrfError("the login form has expired or was not sent by this site; reload it")
