"""The cluster's state as the MDM publishes it on its open health endpoints."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from meshblock.mgmt.config import MdmConfig
from meshblock.mgmt.errors import Upstream
from meshblock.mgmt.upstream import call_json


@dataclass
class ClusterView:
    health: dict[str, Any] = field(default_factory=dict)  # MDM /health
    metrics: dict[str, Any] = field(default_factory=dict)  # MDM /health/metrics
    components: list[dict[str, Any]] = field(default_factory=list)  # /health/components
    error: str | None = None  # why the MDM could not be read

    @property
    def reachable(self) -> bool:
        return self.error is None


async def _get(http: aiohttp.ClientSession, cfg: MdmConfig, path: str) -> Any:
    return await call_json(
        http, "GET", cfg.url.rstrip("/") + path, what="the MDM", timeout_s=cfg.timeout_s
    )


async def components(http: aiohttp.ClientSession, cfg: MdmConfig) -> list[dict[str, Any]]:
    if not cfg.url:
        raise Upstream("no MDM is configured ([mdm] url)")
    body = await _get(http, cfg, "/health/components")
    if not isinstance(body, dict) or not isinstance(body.get("components"), list):
        raise Upstream("the MDM's /health/components answer has no components list")
    return [c for c in body["components"] if isinstance(c, dict)]


async def read(http: aiohttp.ClientSession, cfg: MdmConfig) -> ClusterView:
    """Everything the dashboard shows about the cluster; the error says what failed."""
    if not cfg.url:
        return ClusterView(error="no MDM is configured ([mdm] url)")
    try:
        health, metrics, comps = await asyncio.gather(
            _get(http, cfg, "/health"),
            _get(http, cfg, "/health/metrics"),
            components(http, cfg),
        )
    except Upstream as exc:
        return ClusterView(error=exc.message)
    return ClusterView(
        health=health if isinstance(health, dict) else {},
        metrics=metrics if isinstance(metrics, dict) else {},
        components=comps,
    )
