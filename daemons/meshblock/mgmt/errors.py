"""MGMT's errors and the middleware that answers them.

Handlers raise :class:`ApiError` subclasses. Under ``/api/``, ``/health/api/``,
``/metrics`` and ``/healthz`` the answer is JSON,
``{"error": {"code", "message", "details"?}}``; for web pages it is an HTML error
page with the same status, rendered by the function given to
:func:`error_middleware`. :class:`LoginRequired` on a page redirects to the login
form. Anything unexpected is a 500 with a generic message; the
traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Middleware
from sqlalchemy.exc import IntegrityError

from meshblock.http_errors import (
    HTTP_CODES,
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
    error_body,
)

__all__ = [
    "HTTP_CODES",
    "ApiError",
    "BadRequest",
    "Conflict",
    "CsrfError",
    "ErrorPage",
    "Forbidden",
    "Handler",
    "Invalid",
    "LoginRequired",
    "NotFound",
    "Unauthorized",
    "Upstream",
    "error_body",
    "error_middleware",
    "wants_json",
]

log = logging.getLogger(__name__)


class LoginRequired(Unauthorized):
    """No valid session: pages redirect to ``/login``, the API answers 401."""


class CsrfError(Forbidden):
    code = "csrf"


class Upstream(ApiError):
    """A server MGMT depends on (MDM, Prometheus, Alertmanager) failed or is unreachable."""

    status = 502
    code = "upstream"


REFRESH_HEADER = "X-Meshblock-Refresh"


def wants_json(request: web.Request) -> bool:
    p = request.path
    return p.startswith(("/api/", "/health/api/")) or p in ("/metrics", "/healthz")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorPage = Callable[[web.Request, int, str, str], web.Response]


def error_middleware(error_page: ErrorPage) -> Middleware:
    """The middleware; ``error_page(request, status, code, message)`` renders pages."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _handle(request, handler, error_page)

    return middleware


def _answer(
    error_page: ErrorPage,
    request: web.Request,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    if wants_json(request):
        return web.json_response(error_body(code, message, details), status=status, headers=headers)
    resp = error_page(request, status, code, message)
    if headers:
        resp.headers.update(headers)
    return resp


async def _handle(
    request: web.Request, handler: Handler, error_page: ErrorPage
) -> web.StreamResponse:
    try:
        return await handler(request)
    except LoginRequired as exc:
        # A page's own refresh (static/refresh.js) is told 401: it sends the browser
        # to the login page itself, with the page to come back to.
        if wants_json(request) or request.headers.get(REFRESH_HEADER):
            return _answer(error_page, request, exc.status, exc.code, exc.message, None, _BEARER)
        target = request.path_qs if request.method == "GET" else "/"
        raise web.HTTPSeeOther("/login?" + urlencode({"next": target})) from None
    except ApiError as exc:
        headers = _BEARER if exc.status == 401 else None
        return _answer(error_page, request, exc.status, exc.code, exc.message, exc.details, headers)
    except IntegrityError:
        log.info("conflicting concurrent change refused: %s %s", request.method, request.path)
        return _answer(
            error_page,
            request,
            409,
            "conflict",
            "a concurrent change conflicts with this request; read the current state and retry",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _answer(error_page, request, exc.status, code, exc.reason, None, allow)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _answer(error_page, request, 500, "internal", "internal error; see the MGMT log")


_BEARER = {"WWW-Authenticate": "Bearer"}
