"""The background work of a storage pool as the pool pages show it: rebuild (with
resyncs), rebalance and scrub, each with its state, what is left, the rate and an ETA.

The figures are the MDM's: ``GET /api/v1/rebuild`` (per pool and kind of copy the
bytes left, the rate over the last 30 s, an ETA, and ``rebuild_delay_left_s`` while a
lost SDS is waited for) and ``GET /api/v1/scrub`` (per pool the pass's PGs done of
its total). The MDM gives the scrub no ETA: it is estimated here from the time the
pass has taken per PG so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from meshblock.mgmt import charts

IDLE = "idle"
DASH = "\u2013"


@dataclass(frozen=True)
class Work:
    """One kind of background work of one pool, ready to show."""

    kind: str  # rebuild, rebalance, scrub
    state: str  # idle, running, waiting, degraded, held, paused
    text: str  # the state for a person
    left: str  # what is left: bytes, or PGs for the scrub
    left_bytes: int | None
    rate: str
    eta: str

    @property
    def busy(self) -> bool:
        return self.state != IDLE


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; an en dash when unknown."""
    if seconds is None or seconds < 0:
        return DASH
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _rate(bytes_per_s: Any) -> str:
    try:
        value = float(bytes_per_s)
    except (TypeError, ValueError):
        return DASH
    return charts.human(value, "bytes/s") if value > 0 else DASH


def _copy(kind: str, pool: dict[str, Any]) -> Work:
    """Rebuild or rebalance of one pool of ``GET /api/v1/rebuild``."""
    doc = pool.get(kind) or {}
    remaining = int(doc.get("remaining_bytes") or 0)
    if doc.get("active"):
        eta = doc.get("eta_s")
        return Work(
            kind,
            "running",
            f"{kind} running",
            charts.human(float(remaining), "bytes"),
            remaining,
            _rate(doc.get("rate_bytes_per_s")),
            duration(eta) if eta is not None else "unknown (no copy measured yet)",
        )
    if kind == "rebuild":
        pgs = pool.get("pgs") or {}
        wait = pool.get("rebuild_delay_left_s")
        if wait is not None:
            return Work(
                kind,
                "waiting",
                f"waiting out rebuild_delay_s: the rebuild starts in {duration(float(wait))}"
                " unless the lost SDS comes back",
                DASH,
                None,
                DASH,
                DASH,
            )
        stuck = int(pgs.get("degraded") or 0) + int(pgs.get("inactive") or 0)
        if stuck:
            return Work(
                kind,
                "degraded",
                f"{stuck} PG(s) degraded or inactive, no rebuild running",
                DASH,
                None,
                DASH,
                DASH,
            )
    return Work(kind, IDLE, IDLE, DASH, None, DASH, DASH)


def _scrub(doc: dict[str, Any] | None, now: float) -> Work:
    """One pool of ``GET /api/v1/scrub`` (``now``: the epoch time)."""
    if not doc:
        return Work("scrub", IDLE, "no scrub status", DASH, None, DASH, DASH)
    state = str(doc.get("state") or IDLE)
    total = int(doc.get("pgs_total") or 0)
    done = int(doc.get("pgs_done") or 0)
    if state == IDLE:
        due = doc.get("next_pass_at")
        when = f", next pass in {duration(float(due) - now)}" if due is not None else ""
        return Work("scrub", IDLE, f"idle{when}", DASH, None, DASH, DASH)
    left = f"{total - done} of {total} PGs"
    texts = {
        "running": f"scrub pass {doc.get('pass', '')} running",
        "held": "scrub held while the pool rebuilds or rebalances",
        "paused": "scrub paused (POST .../scrub/start resumes it)",
    }
    eta = DASH
    started = doc.get("pass_started_at")
    if state == "running" and started is not None and 0 < done < total:
        eta = duration((now - float(started)) * (total - done) / done)
    bandwidth = int(doc.get("bandwidth_mibps") or 0)
    rate = f"at most {bandwidth} MiB/s per device" if bandwidth else "unlimited"
    return Work("scrub", state, texts.get(state, state), left, None, rate, eta)


def of_pool(
    rebuild: dict[str, Any] | None, scrub: dict[str, Any] | None, now: float | None = None
) -> list[Work]:
    """Rebuild, rebalance and scrub of one pool, from its entries of the MDM's
    ``/api/v1/rebuild`` and ``/api/v1/scrub`` (``None``: the MDM had none)."""
    now = time.time() if now is None else now
    return [_copy("rebuild", rebuild or {}), _copy("rebalance", rebuild or {}), _scrub(scrub, now)]


def by_pool(
    rebuild: dict[str, Any], scrub: dict[str, Any], now: float | None = None
) -> dict[int, list[Work]]:
    """:func:`of_pool` for every pool of the two answers, by pool id."""
    copies = {int(p["pool_id"]): p for p in rebuild.get("pools", []) if "pool_id" in p}
    scrubs = {int(p["pool_id"]): p for p in scrub.get("pools", []) if "pool_id" in p}
    return {
        pid: of_pool(copies.get(pid), scrubs.get(pid), now)
        for pid in sorted(set(copies) | set(scrubs))
    }
