"""Silences in Alertmanager, through its v2 API (``POST /api/v2/silences``)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import aiohttp

from meshblock.mgmt.config import AlertmanagerConfig
from meshblock.mgmt.errors import Upstream
from meshblock.mgmt.models import utcnow
from meshblock.mgmt.upstream import call_json

log = logging.getLogger(__name__)


def matchers(labels: dict[str, str]) -> list[dict[str, Any]]:
    """Equality matchers on every label: the silence mutes exactly this label set."""
    return [
        {"name": k, "value": v, "isRegex": False, "isEqual": True}
        for k, v in sorted(labels.items())
    ]


async def create_silence(
    http: aiohttp.ClientSession,
    cfg: AlertmanagerConfig,
    labels: dict[str, str],
    duration_s: float,
    created_by: str,
    comment: str,
) -> dict[str, Any]:
    """Create the silence; return what MGMT records of it (id, times, author)."""
    if not cfg.url:
        raise Upstream("no Alertmanager is configured ([alertmanager] url)")
    starts = utcnow()
    ends = starts + dt.timedelta(seconds=duration_s)
    body = {
        "matchers": matchers(labels),
        "startsAt": starts.isoformat().replace("+00:00", "Z"),
        "endsAt": ends.isoformat().replace("+00:00", "Z"),
        "createdBy": created_by,
        "comment": comment,
    }
    answer = await call_json(
        http,
        "POST",
        cfg.url.rstrip("/") + "/api/v2/silences",
        what="Alertmanager",
        timeout_s=cfg.timeout_s,
        body=body,
    )
    silence_id = answer.get("silenceID") if isinstance(answer, dict) else None
    if not isinstance(silence_id, str) or not silence_id:
        raise Upstream("Alertmanager accepted the silence but returned no silenceID")
    log.info("silence %s created by %s until %s", silence_id, created_by, body["endsAt"])
    return {
        "id": silence_id,
        "created_by": created_by,
        "starts_at": body["startsAt"],
        "ends_at": body["endsAt"],
        "comment": comment,
    }
