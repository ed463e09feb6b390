"""JSON over HTTP to the servers MGMT reads from: one helper, one error type."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from meshblock.mgmt.errors import Upstream

MAX_RESPONSE_BYTES = 32 << 20


async def call_json(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    what: str,
    timeout_s: float,
    params: dict[str, str] | None = None,
    body: Any = None,
) -> Any:
    """The decoded JSON answer of ``method url``; :class:`Upstream` on any failure.

    ``what`` names the server in the error message ("the MDM", "Prometheus").
    """
    try:
        async with http.request(
            method,
            url,
            params=params,
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            raw = await resp.content.read(MAX_RESPONSE_BYTES + 1)
            if len(raw) > MAX_RESPONSE_BYTES:
                raise Upstream(f"{what} answered more than {MAX_RESPONSE_BYTES} bytes")
            if resp.status >= 300:
                detail = raw[:300].decode(errors="replace").strip()
                raise Upstream(
                    f"{what} answered {method} {resp.url.path} with HTTP {resp.status}: {detail}",
                    {"upstream_status": resp.status},
                )
            try:
                return json.loads(raw) if raw.strip() else None
            except ValueError:
                raise Upstream(f"{what} answered {method} {resp.url.path} with non-JSON") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise Upstream(f"{what} is unreachable at {url}: {exc or type(exc).__name__}") from None
    except TimeoutError:
        raise Upstream(f"{what} did not answer within {timeout_s:g} s ({url})") from None
    except asyncio.CancelledError:
        raise
