"""``MdmClient``: the MDM's REST API over ``urllib.request``, with typed errors.

The client takes one or more MDM base URLs. A request goes to the first address
that accepts a connection (clients fail over between the addresses they are given:
docs/design.md, "Control flow") and follows a standby MDM's ``307``/``308`` redirect
to the leader with the same method and body. Every error becomes a
:class:`~meshblock.cli.errors.CliError` whose exit code tells scripts what happened;
the token never appears in a message.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from meshblock import __version__ as _version
from meshblock.cli.errors import ApiError, CliError, ExitCode, Unreachable
from meshblock.sizes import format_size

JsonObject = dict[str, Any]
QueryValue = str | int | float | None

_MAX_REDIRECTS = 5
_SAME_METHOD_REDIRECTS = frozenset({307, 308})  # repeat the method and the body
_GET_REDIRECTS = frozenset({301, 302, 303})  # followed for GET only


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand redirects back to :class:`MdmClient`: urllib refuses to repeat a POST."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> None:
        return None


class MdmClient:
    """Calls the MDM at ``urls`` (tried in order) with bearer ``token``."""

    def __init__(
        self,
        urls: Sequence[str],
        token: str | None,
        timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one MDM URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self._token = token
        self.timeout = timeout
        # Proxies from the environment (http_proxy, no_proxy) apply, except to an MDM
        # on loopback, which no proxy could reach.
        # ``tls``: the context for https (the cluster CA, an admin certificate);
        # without it, urllib's default (the system's CAs).
        https = [urllib.request.HTTPSHandler(context=tls)] if tls is not None else []
        self._opener = urllib.request.build_opener(_NoRedirect(), *https)
        self._direct = urllib.request.build_opener(
            _NoRedirect(), urllib.request.ProxyHandler({}), *https
        )

    def __repr__(self) -> str:  # the token stays out of tracebacks and logs
        return f"MdmClient(urls={self.urls!r}, token={'***' if self._token else None})"

    # -- verbs -------------------------------------------------------------------

    def get(
        self, path: str, query: Mapping[str, QueryValue] | None = None, timeout: float | None = None
    ) -> Any:
        return self.request("GET", path, query=query, timeout=timeout)

    def post(self, path: str, body: JsonObject) -> Any:
        return self.request("POST", path, body=body)

    def patch(self, path: str, body: JsonObject) -> Any:
        return self.request("PATCH", path, body=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # -- machinery ---------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, QueryValue] | None = None,
        body: JsonObject | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON answer (``None`` for 204)."""
        target = path
        if query:
            items = {k: str(v) for k, v in query.items() if v is not None}
            if items:
                target = f"{path}?{urllib.parse.urlencode(items)}"
        data = json.dumps(body).encode() if body is not None else None
        failures: list[str] = []
        for base in self.urls:
            try:
                return self._send(method, base + target, data, timeout or self.timeout)
            except _Unanswered as exc:
                failures.append(f"{base} ({exc.reason})")
                if not exc.safe_to_retry and method != "GET":
                    # Sent, maybe applied: repeating it elsewhere could apply it twice.
                    raise Unreachable(
                        f"no answer from the MDM at {failures[-1]}; the change may or may "
                        "not have been made: check before retrying"
                    ) from None
        raise Unreachable("cannot reach the MDM at " + ", ".join(failures))

    def _send(self, method: str, url: str, data: bytes | None, timeout: float) -> Any:
        for _ in range(_MAX_REDIRECTS + 1):
            req = urllib.request.Request(url, data=data, method=method)
            req.add_header("Accept", "application/json")
            req.add_header("User-Agent", f"meshctl/{_version}")
            if data is not None:
                req.add_header("Content-Type", "application/json")
            if self._token:
                req.add_header("Authorization", f"Bearer {self._token}")
            try:
                opener = self._direct if _is_loopback(url) else self._opener
                with opener.open(req, timeout=timeout) as resp:
                    return _decode_success(resp.status, resp.read())
            except urllib.error.HTTPError as exc:
                with exc:
                    target = _redirect_target(method, url, exc)
                    if target is not None:
                        url = target
                        continue
                    raise error_from_response(exc.code, exc.read(), exc.reason) from None
            except urllib.error.URLError as exc:
                # urllib wraps what fails before an answer: connecting, sending.
                raise _Unanswered(_reason(exc.reason), safe_to_retry=True) from None
            except TimeoutError:
                raise _Unanswered(f"no answer within {timeout:g}s", safe_to_retry=False) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Unanswered(_reason(exc), safe_to_retry=False) from None
        raise CliError(f"too many redirects (more than {_MAX_REDIRECTS}) from {url}")


class _Unanswered(Exception):
    """No HTTP answer came back; ``safe_to_retry`` when the request was surely not sent."""

    def __init__(self, reason: str, *, safe_to_retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.safe_to_retry = safe_to_retry


def _redirect_target(method: str, url: str, exc: urllib.error.HTTPError) -> str | None:
    """Where to repeat the request after a redirect, or ``None`` to not follow it.

    A redirect from https to http is not followed: the token would travel in clear.
    """
    location = exc.headers.get("Location")
    if not location:
        return None
    if exc.code not in _SAME_METHOD_REDIRECTS and not (
        exc.code in _GET_REDIRECTS and method == "GET"
    ):
        return None
    target = urllib.parse.urljoin(url, location)
    if urllib.parse.urlsplit(url).scheme == "https" and not target.startswith("https://"):
        return None
    return target


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(err: object) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return f"unknown host: {err.strerror}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return str(err) or type(err).__name__


def _decode_success(status: int, raw: bytes) -> Any:
    if status == 204 or not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CliError(f"the MDM answered {status} with a body that is not JSON") from None


def error_from_response(status: int, raw: bytes, reason: str = "") -> ApiError:
    """Turn an error answer into an :class:`ApiError` with a readable message.

    The MDM's body is ``{"error": {"code", "message", "details"?}}``; when something
    else answers (a proxy, a wrong port), the HTTP status and reason are used.
    """
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        # Not the MDM's error document: a wrong port, a proxy. The status alone would
        # send a script down the wrong path (a proxy's 404 is no unknown volume).
        error = ApiError(
            status,
            "http_error",
            f"HTTP {status}{f' {reason}' if reason else ''} without an MDM error document: "
            "is this the MDM's address?",
        )
        error.exit_code = ExitCode.ERROR
        return error
    code = str(err.get("code") or "http_error")
    message = str(err.get("message") or f"the MDM answered HTTP {status} {reason}".rstrip())
    raw_details = err.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    return ApiError(status, code, describe(code, message, details), details)


def describe(code: str, message: str, details: Mapping[str, Any]) -> str:
    """``message`` plus the details an operator needs, sizes in operator units.

    >>> describe("insufficient_capacity", "volume does not fit",
    ...          {"requested_bytes": 17179869184, "free_bytes": 1073741824,
    ...           "spare_bytes": 0})
    'volume does not fit (requested 16 GiB, free 1 GiB)'
    """
    keys = [k for k in details if k.endswith("_bytes")]
    if code == "insufficient_capacity":  # the numbers that answer "how short am I?"
        keys = [k for k in _CAPACITY_KEYS if k in details]
    extras = [
        f"{key.removesuffix('_bytes').replace('_', ' ')} {format_size(details[key])}"
        for key in keys
        if isinstance(details[key], int) and not isinstance(details[key], bool)
    ]
    field = details.get("field")
    if code == "invalid" and isinstance(field, str) and field not in message:
        extras.append(f"field {field!r}")
    return f"{message} ({', '.join(extras)})" if extras else message


_CAPACITY_KEYS = ("requested_bytes", "free_bytes", "usable_bytes")
