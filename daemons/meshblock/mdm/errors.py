"""Domain errors of the MDM and the middleware that turns them into JSON responses.

Handlers raise :class:`ApiError` subclasses; :func:`error_middleware` answers with
``{"error": {"code", "message", "details"?}}`` and the error's status. Anything
unexpected becomes a 500 with a generic message (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
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
    "Forbidden",
    "Handler",
    "InsufficientCapacity",
    "Invalid",
    "NotFound",
    "Revoked",
    "Unauthorized",
    "error_body",
    "error_middleware",
]

log = logging.getLogger(__name__)


class InsufficientCapacity(Conflict):
    code = "insufficient_capacity"


class Revoked(Forbidden):
    """The connection's client certificate was revoked after its handshake: refused,
    and the connection closed after the answer."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        resp = web.json_response(
            error_body(exc.code, exc.message, exc.details), status=exc.status, headers=headers
        )
        if isinstance(exc, Revoked):
            resp.force_close()
        return resp
    except IntegrityError:
        # A concurrent request won a race that the handler's own checks could not
        # see (two creates of one name at once): the transaction rolled back.
        log.info("conflicting concurrent change refused: %s %s", request.method, request.path)
        return web.json_response(
            error_body(
                "conflict",
                "a concurrent change conflicts with this request; read the current state and retry",
            ),
            status=409,
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(error_body(code, exc.reason), status=exc.status, headers=allow)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(
            error_body("internal", "internal error; see the MDM log"), status=500
        )
