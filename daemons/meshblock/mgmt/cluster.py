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
    rebuild: list[dict[str, Any]] = field(default_factory=list)  # /api/v1/rebuild's pools
    rebuild_error: str | None = None  # why /api/v1/rebuild could not be read
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
        health, metrics, comps, rebuild = await asyncio.gather(
            _get(http, cfg, "/health"),
            _get(http, cfg, "/health/metrics"),
            components(http, cfg),
            _rebuild(http, cfg),
        )
    except Upstream as exc:
        return ClusterView(error=exc.message)
    pools, rebuild_error = rebuild
    return ClusterView(
        health=health if isinstance(health, dict) else {},
        metrics=metrics if isinstance(metrics, dict) else {},
        components=comps,
        rebuild=pools,
        rebuild_error=rebuild_error,
    )


async def _rebuild(
    http: aiohttp.ClientSession, cfg: MdmConfig
) -> tuple[list[dict[str, Any]], str | None]:
    """The pools of ``GET /api/v1/rebuild``, or why they could not be read (the rest
    of the dashboard is shown either way)."""
    try:
        body = await _get(http, cfg, "/api/v1/rebuild")
    except Upstream as exc:
        return [], exc.message
    pools = body.get("pools") if isinstance(body, dict) else None
    if not isinstance(pools, list):
        return [], "the MDM's /api/v1/rebuild answer has no pools list"
    return [p for p in pools if isinstance(p, dict) and "pool_id" in p], None
