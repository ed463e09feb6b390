"""The access and audit log of the MDM and MGMT: one JSON object per line.

An entry is written for every request that may change something (any method but
GET, HEAD and OPTIONS), with its status; for every request refused with 401 or 403,
whatever its method, with the reason it was given; and for what a handler notes
itself (an SDS's registration, a login). Each entry says who called: the identity of
the client certificate, the bearer token's role (the MDM) or the user and API token
(MGMT), and the client's address. Entries hold no secret: no token, password or
cookie, and no request body.

``[audit] file`` names the file the entries are appended to (opened again when it
is moved away, so logrotate's ``create`` works without ``copytruncate``); empty, they
go to the daemon's own log (stderr, journald) as ``meshblock.audit`` lines, at INFO
whatever ``[logging] level`` says. Rotation is left to logrotate or journald.

A successful heartbeat is not written: a thousand SDSs send one every few seconds
and it changes nothing but the time last seen (a refused one is written).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import logging.handlers
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from sqlalchemy.exc import IntegrityError

LOGGER = "meshblock.audit"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED = frozenset({401, 403})
CLIENT_GONE = 499  # the client went away before the answer (nginx's number for it)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Who = Callable[[web.Request], dict[str, str]]


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: where the access and audit log goes (empty: the daemon's log)."""

    file: str = ""


class AuditLog:
    """Writes entries as JSON lines, to ``file`` or to the ``meshblock.audit`` logger."""

    def __init__(self, daemon: str, file: str = "") -> None:
        self.daemon = daemon
        self._handler: logging.Handler | None = None
        self._log = logging.getLogger(LOGGER)
        if file:
            self._handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
            self._handler.setFormatter(logging.Formatter("%(message)s"))
        elif self._log.level == logging.NOTSET or self._log.level > logging.INFO:
            self._log.setLevel(logging.INFO)  # whatever [logging] level says

    def write(self, event: str, **fields: Any) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry = {"ts": now, "daemon": self.daemon, "event": event} | fields
        line = json.dumps(entry, separators=(",", ":"), default=str)
        if self._handler is None:
            self._log.info("%s", line)
            return
        self._handler.handle(
            logging.makeLogRecord({"name": LOGGER, "levelno": logging.INFO, "msg": line})
        )

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()


AUDIT = web.AppKey("meshblock_audit_log", AuditLog)
_NOTE = web.RequestKey("meshblock_audit_note", dict)
_WHO = web.RequestKey("meshblock_audit_who", dict)


def note(request: web.Request, event: str | None = None, **fields: Any) -> None:
    """Add ``fields`` to this request's entry (and name its ``event``); the entry is
    then written whatever the method. The middleware writes it once the answer is known."""
    noted: dict[str, Any] = request.setdefault(_NOTE, {})
    noted.update(fields)
    if event is not None:
        noted["event"] = event


def identify(request: web.Request, **who: str) -> None:
    """Say who is calling, as the handler found out (an MGMT user of a session)."""
    known: dict[str, str] = request.setdefault(_WHO, {})
    known.update(who)


def _outcome(exc: BaseException) -> tuple[int, str]:
    """The status the error middleware will answer an exception with, and its text."""
    if isinstance(exc, IntegrityError):
        return 409, "a concurrent change conflicts with this request"
    if isinstance(exc, web.HTTPException):
        return exc.status, exc.reason
    status = getattr(exc, "status", 500)
    return (status if isinstance(status, int) else 500), str(getattr(exc, "message", ""))


def middleware(who: Who, quiet: Callable[[web.Request, int], bool]) -> Middleware:
    """The middleware that writes the entries; it goes inside the error middleware, so
    that it sees the errors handlers raise. ``who(request)`` names the caller;
    ``quiet(request, status)`` says a change not to write (a heartbeat)."""

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            _write(request, who, quiet, CLIENT_GONE, "the client went away")
            raise
        except Exception as exc:
            _write(request, who, quiet, *_outcome(exc))
            raise
        _write(request, who, quiet, resp.status, None)
        return resp

    return audit


def _write(
    request: web.Request,
    who: Who,
    quiet: Callable[[web.Request, int], bool],
    status: int,
    reason: str | None,
) -> None:
    log = request.app.get(AUDIT)
    if log is None:
        return
    noted = request.get(_NOTE)
    refused = status in REFUSED
    if noted is None and not refused and (request.method in SAFE_METHODS or quiet(request, status)):
        return
    fields: dict[str, Any] = dict(noted or {})
    event = fields.pop("event", None) or ("refused" if refused else "request")
    entry: dict[str, Any] = {
        "method": request.method,
        "path": request.path,
        "status": status,
        "who": who(request) | request.get(_WHO, {}) | {"address": request.remote or ""},
    }
    if reason and status >= 400:
        entry["reason"] = reason
    log.write(event, **(entry | fields))


def cleanup(log: AuditLog) -> Callable[[web.Application], Awaitable[None]]:
    """An ``on_cleanup`` callback closing ``log``."""

    async def close(_app: web.Application) -> None:
        log.close()

    return close


def install(app: web.Application, daemon: str, config: AuditConfig) -> AuditLog:
    """Open the log of ``config`` for ``app`` (closed at its cleanup)."""
    log = AuditLog(daemon, config.file)
    app[AUDIT] = log
    app.on_cleanup.append(cleanup(log))
    return log
