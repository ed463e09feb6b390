"""Prometheus's HTTP API: the alerting rules it has loaded, and range queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from meshblock.mgmt.config import PrometheusConfig
from meshblock.mgmt.errors import Upstream
from meshblock.mgmt.upstream import call_json


@dataclass(frozen=True)
class RuleInfo:
    name: str
    group: str
    expression: str
    for_seconds: float
    severity: str | None
    summary: str | None
    runbook_url: str | None


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix seconds, value)


async def _api(
    http: aiohttp.ClientSession, cfg: PrometheusConfig, path: str, params: dict[str, str]
) -> Any:
    if not cfg.url:
        raise Upstream("no Prometheus is configured ([prometheus] url)")
    body = await call_json(
        http,
        "GET",
        cfg.url.rstrip("/") + path,
        what="Prometheus",
        timeout_s=cfg.timeout_s,
        params=params,
    )
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise Upstream(f"Prometheus refused {path}: {error or 'no success status'}")
    return body.get("data")


async def alerting_rules(http: aiohttp.ClientSession, cfg: PrometheusConfig) -> list[RuleInfo]:
    """Every alerting rule of every group (``GET /api/v1/rules?type=alert``)."""
    data = await _api(http, cfg, "/api/v1/rules", {"type": "alert"})
    out = []
    for group in (data or {}).get("groups", []):
        for r in group.get("rules", []):
            if r.get("type") != "alerting":
                continue
            labels = r.get("labels") or {}
            annotations = r.get("annotations") or {}
            out.append(
                RuleInfo(
                    name=str(r["name"]),
                    group=str(group.get("name", "")),
                    expression=str(r.get("query", "")),
                    for_seconds=float(r.get("duration") or 0),
                    severity=labels.get("severity"),
                    summary=annotations.get("summary"),
                    runbook_url=annotations.get("runbook_url"),
                )
            )
    return out


async def query_range(
    http: aiohttp.ClientSession,
    cfg: PrometheusConfig,
    query: str,
    start: float,
    end: float,
    step: float,
) -> list[Series]:
    data = await _api(
        http,
        cfg,
        "/api/v1/query_range",
        {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
    )
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        raise Upstream("Prometheus answered a range query without a matrix")
    out = []
    for s in data.get("result", []):
        points = []
        for t, v in s.get("values", []):
            try:
                points.append((float(t), float(v)))
            except (TypeError, ValueError):
                continue
        out.append(Series(dict(s.get("metric") or {}), points))
    return out
