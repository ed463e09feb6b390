"""A small synchronous HTTP client for tests, over :mod:`urllib.request`.

>>> api = Api("http://127.0.0.1:6611", token="admin-token")
>>> status, body = api("POST", "/api/v1/protection-domains", {"name": "pd1"})
>>> status, body = api.get("/api/v1/protection-domains", token=None)  # no token

Error statuses (4xx/5xx) are returned, not raised; JSON bodies are decoded, other
bodies are returned as text and an empty body as ``None``. Proxies from the
environment are ignored: the servers under test are on loopback.

``https://`` URLs are called with ``context`` (an :class:`ssl.SSLContext`), by default
as ``admin:tests`` of the test CA (``tests/_tls.py``); ``Api(url, token, context)``.
"""

from __future__ import annotations

import json as jsonlib
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Final

import _tls

_DEFAULT: Final = object()

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_tls_openers: dict[int, tuple[ssl.SSLContext, urllib.request.OpenerDirector]] = {}


def _opener_for(url: str, context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    if not url.startswith("https:"):
        return _opener
    ctx = context if context is not None else _tls.admin_context()
    if id(ctx) not in _tls_openers:  # the context is kept: its id is not reused
        handlers = (urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        _tls_openers[id(ctx)] = (ctx, urllib.request.build_opener(*handlers))
    return _tls_openers[id(ctx)][1]


@dataclass(frozen=True)
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Any:  # so that ``status, body = api(...)`` works
        return iter((self.status, self.body))


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if "json" in content_type:
        return jsonlib.loads(raw)
    return raw.decode("utf-8", errors="replace")


def request(
    method: str,
    url: str,
    json: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 30.0,
    context: ssl.SSLContext | None = None,
) -> Response:
    """Send one request and return its :class:`Response`, whatever the status."""
    hdrs = {"Accept": "application/json"}
    if json is not None:
        data = jsonlib.dumps(json).encode()
        hdrs["Content-Type"] = "application/json"
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method.upper())
    try:
        with _opener_for(url, context).open(req, timeout=timeout) as resp:
            raw = resp.read()
            return Response(
                resp.status, _decode(raw, resp.headers.get("Content-Type", "")), dict(resp.headers)
            )
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
            return Response(
                exc.code, _decode(raw, exc.headers.get("Content-Type", "")), dict(exc.headers)
            )


class Api:
    """Calls to one server, with a default bearer token.

    ``api(method, path, json=None, token=...)`` returns a :class:`Response`, which
    unpacks as ``(status, body)``. Pass ``token=None`` to send no token at all.
    """

    def __init__(
        self, base_url: str, token: str | None = None, context: ssl.SSLContext | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.context = context

    def __call__(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        token: Any = _DEFAULT,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        timeout: float = 30.0,
    ) -> Response:
        tok: str | None = self.token if token is _DEFAULT else token
        return request(
            method,
            self.base_url + path,
            json,
            token=tok,
            headers=headers,
            data=data,
            timeout=timeout,
            context=self.context,
        )

    def get(self, path: str, **kw: Any) -> Response:
        return self("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Response:
        return self("POST", path, json, **kw)

    def patch(self, path: str, json: Any = None, **kw: Any) -> Response:
        return self("PATCH", path, json, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self("DELETE", path, **kw)

    def with_token(self, token: str | None) -> Api:
        """The same server with another default token."""
        return Api(self.base_url, token, self.context)
