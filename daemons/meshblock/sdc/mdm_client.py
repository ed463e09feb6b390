"""The SDC's client of the MDM's REST API: HTTPS with its certificate (``[tls]``,
meshblock.tls), or the cluster secret as bearer token.

Several MDM URLs may be given: a call goes to the one that answered last and moves on
to the next when it cannot be reached or answers 5xx.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from meshblock import pki
from meshblock.sdc.config import SdcConfig
from meshblock.tls import MdmTls, mdm_tls

log = logging.getLogger(__name__)

#: The longest ``map_epochs`` query value sent: the pools beyond come whole (the MDM's
#: HTTP server refuses a request line longer than about 8 KB with a 400).
MAX_MAP_EPOCHS_QUERY = 4096


def map_epochs_query(map_epochs: dict[int, int]) -> str:
    """``POOL:E,...`` for as many pools (in pool order) as fit in
    :data:`MAX_MAP_EPOCHS_QUERY` characters."""
    parts: list[str] = []
    length = 0
    for pool, epoch in sorted(map_epochs.items()):
        part = f"{pool}:{epoch}"
        length += len(part) + (1 if parts else 0)
        if length > MAX_MAP_EPOCHS_QUERY:
            break
        parts.append(part)
    return ",".join(parts)


def mdm_tls_of(config: SdcConfig) -> MdmTls:
    """How this SDC reaches the MDM; a certificate must name an SDC (``sdc:<guid>``).
    :class:`meshblock.config.ConfigError` otherwise."""
    return mdm_tls(config.tls, config.mdm.urls, pki.Kind.SDC, key="mdm.urls")


class MdmUnavailable(Exception):
    """No MDM answered."""


class MdmRefused(Exception):
    """An MDM answered with a 4xx error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class MdmClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        urls: list[str],
        secret: str | None,
        *,
        request_timeout: float = 5.0,
    ) -> None:
        self._session = session
        self._urls = [u.rstrip("/") for u in urls]
        # None: the certificate speaks for the SDC, no bearer token is sent.
        self._headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        self._current = 0
        self.request_timeout = request_timeout

    async def _call(
        self, method: str, path: str, body: Any = None, *, limit_s: float | None = None
    ) -> Any:
        last = "no MDM URL"
        n = len(self._urls)
        for i in range(n):
            index = (self._current + i) % n
            url = self._urls[index] + path
            try:
                async with self._session.request(
                    method,
                    url,
                    json=body,
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=limit_s or self.request_timeout),
                ) as resp:
                    if resp.status >= 500:
                        last = f"{self._urls[index]}: HTTP {resp.status}"
                        continue
                    doc = await resp.json(content_type=None)
                    self._current = index
                    if resp.status >= 400:
                        err = doc.get("error", {}) if isinstance(doc, dict) else {}
                        raise MdmRefused(resp.status, str(err.get("message", "")))
                    return doc
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = f"{self._urls[index]}: {exc!r}"
        raise MdmUnavailable(last)

    async def register(
        self, guid: str, name: str, address: str, control_port: int, nbd_port: int
    ) -> int:
        doc = await self._call(
            "POST",
            "/api/v1/sdc/register",
            {
                "guid": guid,
                "name": name,
                "address": address,
                "control_port": control_port,
                "nbd_port": nbd_port,
            },
        )
        sdc_id = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(sdc_id, int):
            raise MdmUnavailable("the MDM's registration answer has no id")
        return sdc_id

    async def heartbeat(self, sdc_id: int, epoch: int = 0) -> Any:
        """``epoch``: the cluster epoch of our maps (the MDM raises its own above it
        after a database restore)."""
        return await self._call("POST", f"/api/v1/sdc/{sdc_id}/heartbeat", {"epoch": epoch})

    async def report_unreachable(self, sds_id: int, reporter: str) -> Any:
        """Tell the MDM this SDC cannot reach SDS ``sds_id`` (it confirms first)."""
        return await self._call("POST", f"/api/v1/sds/{sds_id}/unreachable", {"reporter": reporter})

    async def maps(
        self,
        sdc_id: int,
        wait_epoch: int | None = None,
        wait_s: float = 0,
        map_epochs: dict[int, int] | None = None,
    ) -> Any:
        """The SDC's maps; with ``wait_epoch``, long-poll until the epoch passes it; with
        ``map_epochs`` (pool -> the map epoch we have), a pool's map may come as a delta
        from it (:mod:`meshblock.pgmap_delta`; only the pools whose epochs fit in
        :data:`MAX_MAP_EPOCHS_QUERY` characters, the others come whole)."""
        query = []
        if wait_epoch is not None:
            query.append(f"wait_epoch={wait_epoch}&timeout={wait_s:g}")
        if map_epochs:
            query.append("map_epochs=" + map_epochs_query(map_epochs))
        path = f"/api/v1/sdc/{sdc_id}/maps" + ("?" + "&".join(query) if query else "")
        if wait_epoch is not None:
            return await self._call("GET", path, limit_s=wait_s + self.request_timeout)
        return await self._call("GET", path)


async def sleep_backoff(attempt: int, first: float = 0.2, cap: float = 2.0) -> None:
    await asyncio.sleep(min(first * 2**attempt, cap))
