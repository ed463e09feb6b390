"""The schedule of each pool's background scrub, and its progress and findings
(``docs/mdm.md``, "Scrub"; the SDS's side is :mod:`meshblock.sds.scrub`).

The MDM decides when a pool's pass starts, and the PGs' primaries do the work: each
SDS heartbeat carries, per pool, the pass it works on, the PGs it has scrubbed in it,
its counters and its new findings; each heartbeat reply carries every pool's order
(pass number, ``running`` / ``paused`` / ``held`` / ``idle``, bandwidth per device).

A pool's pass starts ``period_s`` after the previous one started (the first one
``start_delay_s`` after the MDM started), or at once when ``meshctl scrub start``
asks; it is complete once every PG of the pool was reported scrubbed in it. While
the pool rebuilds, resyncs or moves a PG the pass is ``held`` (the SDSs stop at the
next chunk); ``meshctl scrub pause`` pauses it, and keeps further passes from
starting, until ``start``. :class:`ScrubSchedule` is this logic without IO (the
clock is passed in). What a restart must not lose (each pool's pass, state, start,
PGs done, last complete pass, next due time) is kept in the MDM's database
(``scrub_state``, :meth:`ScrubSchedule.saved` / :meth:`ScrubSchedule.restore`; the
pools changed since the last save are :attr:`ScrubSchedule.dirty`), so a restarted
MDM resumes each pool's period and pass; the counters and findings count from the
MDM's start (see docs/mdm.md).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

IDLE: Final = "idle"
RUNNING: Final = "running"
PAUSED: Final = "paused"
HELD: Final = "held"  # running, but the pool is rebuilding or rebalancing
KINDS: Final = ("primary", "secondary", "unrecoverable", "divergent")
FINDINGS_KEPT: Final = 100  # per pool, the newest


@dataclass
class PoolScrub:
    """One pool's scrub as the MDM knows it."""

    pass_: int = 0
    state: str = IDLE
    pg_count: int = 0
    busy: bool = False  # rebuilding, resyncing or moving a PG
    due: float = 0.0  # when the next pass starts (while idle)
    started_at: float | None = None  # of the current or last pass
    completed_at: float | None = None  # of the last complete pass
    done: set[int] = field(default_factory=set)  # PGs scrubbed in the current pass
    chunks: int = 0  # since the MDM started, from the SDSs' counters
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    repaired: int = 0
    checksummed: int = 0  # blocks without a checksum given one (upgrade; not errors)
    passes_completed: int = 0
    completed_pass: int = 0  # the number of the last complete pass
    findings: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=FINDINGS_KEPT))

    @property
    def shown_state(self) -> str:
        return HELD if self.state == RUNNING and self.busy else self.state


class ScrubSchedule:
    """Every pool's scrub schedule and progress (no IO: the clock is an argument)."""

    def __init__(
        self, period_s: float, bandwidth_mibps: int, start_delay_s: float, now: float
    ) -> None:
        self.period_s = period_s
        self.bandwidth_mibps = bandwidth_mibps
        self.first_due = now + start_delay_s
        self.pools: dict[int, PoolScrub] = {}
        # (sds, pool) -> the SDS's last counters (chunks, bytes, errors..., repaired)
        self._last: dict[tuple[int, int], tuple[int, ...]] = {}
        self._seen: dict[int, tuple[str, int]] = {}  # sds -> (instance, newest finding taken)
        self.dirty: set[int] = set()  # pools whose kept schedule changed since saved
        self.loaded = False  # the kept schedules were restored (api/scrub.py)
        # tick() had every pool (api/scrub.py ticks only once loaded): until then a
        # finding of a pool not in self.pools is kept waiting, not taken nor acknowledged
        self.pools_known = False

    def tick(self, now: float, pools: dict[int, tuple[int, bool]]) -> None:
        """Start and complete passes; ``pools``: every pool's (PG count, busy)."""
        self.pools_known = True
        for pool_id in [p for p in self.pools if p not in pools]:
            del self.pools[pool_id]
        for pool_id, (pg_count, busy) in pools.items():
            ps = self.pools.get(pool_id)
            if ps is None:
                ps = self.pools[pool_id] = PoolScrub(due=self.first_due)
                self.dirty.add(pool_id)  # its first due time is kept too
            ps.pg_count, ps.busy = pg_count, busy
            if ps.state == RUNNING and ps.done >= set(range(pg_count)):
                ps.state = IDLE
                ps.completed_at = now
                ps.completed_pass = ps.pass_
                ps.passes_completed += 1
                ps.due = (ps.started_at or now) + self.period_s
                self.dirty.add(pool_id)
            if ps.state == IDLE and now >= ps.due:
                self._begin(ps, now)
                self.dirty.add(pool_id)

    @staticmethod
    def _begin(ps: PoolScrub, now: float) -> None:
        ps.pass_ += 1
        ps.state = RUNNING
        ps.started_at = now
        ps.done = set()

    def start(self, pool_id: int, now: float) -> PoolScrub:
        """``meshctl scrub start``: a paused pass goes on; with none, one starts now."""
        ps = self.pools.setdefault(pool_id, PoolScrub(due=self.first_due))
        if ps.state == PAUSED and ps.pass_ and ps.completed_pass != ps.pass_:
            ps.state = RUNNING
        elif ps.state != RUNNING:
            self._begin(ps, now)
        self.dirty.add(pool_id)
        return ps

    def pause(self, pool_id: int) -> PoolScrub:
        """``meshctl scrub pause``: the pass stops at the next chunk; none starts."""
        ps = self.pools.setdefault(pool_id, PoolScrub(due=self.first_due))
        ps.state = PAUSED
        self.dirty.add(pool_id)
        return ps

    # -- kept across restarts (the ``scrub_state`` table) --------------------------------

    def saved(self, pool_id: int, now_wall: float, now: float) -> dict[str, Any]:
        """What is kept of a pool's schedule: a ``scrub_state`` row's values (times as
        seconds since the epoch: ``now_wall`` is the one that corresponds to ``now``)."""
        ps = self.pools[pool_id]

        def wall(t: float | None) -> float | None:
            return None if t is None else now_wall - (now - t)

        bits = bytearray((max(ps.done, default=-1) >> 3) + 1)
        for pg in ps.done:
            bits[pg >> 3] |= 1 << (pg & 7)
        return {
            "pool_id": pool_id,
            "pass_number": ps.pass_,
            "state": ps.state,
            "due_at": wall(ps.due),
            "started_at": wall(ps.started_at),
            "completed_at": wall(ps.completed_at),
            "completed_pass": ps.completed_pass,
            "passes_completed": ps.passes_completed,
            "pgs_done": bytes(bits),
        }

    def restore(self, rows: list[dict[str, Any]], now_wall: float, now: float) -> None:
        """Take the kept schedules (:meth:`saved`'s) back, at a start."""

        def mono(t: float | None) -> float | None:
            return None if t is None else now - (now_wall - t)

        for row in rows:
            bits = bytes(row["pgs_done"])
            done = {i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1}
            self.pools[int(row["pool_id"])] = PoolScrub(
                pass_=int(row["pass_number"]),
                state=str(row["state"]),
                due=mono(float(row["due_at"])) or 0.0,
                started_at=mono(row["started_at"]),
                completed_at=mono(row["completed_at"]),
                done=done,
                passes_completed=int(row["passes_completed"]),
                completed_pass=int(row["completed_pass"]),
            )

    def orders(self) -> list[dict[str, Any]]:
        """What every SDS is told (a heartbeat reply's ``scrub.orders``)."""
        return [
            {
                "pool_id": pool_id,
                "pass": ps.pass_,
                "state": ps.shown_state,
                "bandwidth_mibps": self.bandwidth_mibps,
            }
            for pool_id, ps in sorted(self.pools.items())
        ]

    def unready_for(self, doc: dict[str, Any] | None) -> bool:
        """Whether :meth:`report` would drop this report's pools (``pgs_done``) for want
        of the kept schedules: before they are loaded and the first tick had every pool,
        after an MDM start. An SDS sends its report again only when it changes, so the
        heartbeat's answer asks it for its whole state again (``send_full``)."""
        return bool(doc and doc.get("pools")) and not (self.loaded and self.pools_known)

    def report(self, sds_id: int, doc: dict[str, Any] | None) -> int:
        """Take an SDS's heartbeat ``scrub``; return the newest finding taken from it
        (sent back as ``findings_acked``)."""
        if not doc:
            return self._seen.get(sds_id, ("", 0))[1]
        for p in doc.get("pools", ()):
            ps = self.pools.get(int(p["pool_id"]))
            if ps is None:
                continue
            if int(p["pass"]) == ps.pass_ and ps.state in (RUNNING, PAUSED):
                before_done = len(ps.done)
                ps.done.update(int(pg) for pg in p["pgs_done"] if 0 <= int(pg) < ps.pg_count)
                if len(ps.done) != before_done:
                    self.dirty.add(int(p["pool_id"]))
            errors = p.get("errors", {})
            now = (
                int(p["chunks"]),
                int(p["bytes"]),
                *(int(errors.get(k, 0)) for k in KINDS),
                int(p["repaired"]),
                int(p.get("checksummed", 0)),  # an SDS of an older release: none
            )
            key = (sds_id, int(p["pool_id"]))
            before = self._last.get(key)
            # a restarted SDS counts from zero again: only increases count
            delta = [
                n if before is None or n < b else n - b
                for n, b in zip(now, before or (0,) * len(now), strict=True)
            ]
            self._last[key] = now
            ps.chunks += delta[0]
            ps.bytes += delta[1]
            for i, k in enumerate(KINDS):
                ps.errors[k] += delta[2 + i]
            ps.repaired += delta[-2]
            ps.checksummed += delta[-1]
        instance = str(doc.get("instance", ""))
        last, seen = self._seen.get(sds_id, (instance, 0))
        if last != instance:
            seen = 0  # the SDS restarted: its findings are numbered from 1 again
        # In order, up to the first of a pool not known yet (a restarted MDM before its
        # first tick): that one and the later ones come again, the acknowledgement
        # stopping before them. Once every pool is known, a pool not known was deleted.
        for f in sorted(doc.get("findings", ()), key=lambda f: int(f["seq"])):
            if int(f["seq"]) <= seen:
                continue
            ps = self.pools.get(int(f["pool_id"]))
            if ps is not None:
                ps.findings.append({**f, "reported_by": sds_id})
            elif not self.pools_known:
                break
            seen = int(f["seq"])
        self._seen[sds_id] = (instance, seen)
        return seen

    def status(self, pool_id: int, now_wall: float, now: float) -> dict[str, Any]:
        """The API's document of one pool's scrub (``now_wall``: the epoch time that
        corresponds to ``now``, so that the monotonic times can be shown as dates)."""
        ps = self.pools.get(pool_id) or PoolScrub(due=self.first_due)

        def wall(t: float | None) -> float | None:
            return None if t is None else round(now_wall - (now - t), 3)

        total = ps.pg_count
        done = len(ps.done) if ps.state != IDLE else (total if ps.pass_ else 0)
        return {
            "pool_id": pool_id,
            "state": ps.shown_state,
            "pass": ps.pass_,
            "pgs_total": total,
            "pgs_done": done,
            "progress_percent": round(100.0 * done / total, 1) if total else 100.0,
            "pass_started_at": wall(ps.started_at),
            "last_complete_at": wall(ps.completed_at),
            "next_pass_at": wall(ps.due) if ps.state == IDLE else None,
            "passes_completed": ps.passes_completed,
            "period_s": self.period_s,
            "bandwidth_mibps": self.bandwidth_mibps,
            "chunks_scrubbed": ps.chunks,
            "bytes_scrubbed": ps.bytes,
            "errors": dict(ps.errors),
            "repaired_blocks": ps.repaired,
            "checksummed_blocks": ps.checksummed,
            "findings": list(ps.findings),
        }


def metric_families(
    schedule: ScrubSchedule | None, pools: list[tuple[int, list[str]]], now_wall: float, now: float
) -> list[Any]:
    """The scrub's Prometheus families for ``pools`` (id, label values: pool, PD)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["pool", "protection_domain"]
    chunks = CounterMetricFamily(
        "meshblock_scrub_chunks",
        "Chunks scrubbed (both copies) since the MDM started",
        labels=labels,
    )
    errors = CounterMetricFamily(
        "meshblock_scrub_errors",
        "4 KiB blocks the scrub found bad, by kind: primary / secondary (one copy bad), "
        "unrecoverable (both), divergent (the copies differ, each matching its checksums)",
        labels=[*labels, "kind"],
    )
    repaired = CounterMetricFamily(
        "meshblock_scrub_repaired_blocks",
        "4 KiB blocks the scrub rewrote from the good copy",
        labels=labels,
    )
    checksummed = CounterMetricFamily(
        "meshblock_scrub_checksummed_blocks",
        "4 KiB blocks without a checksum (written before checksums were kept) that the "
        "scrub gave one, both copies holding the same bytes",
        labels=labels,
    )
    last = GaugeMetricFamily(
        "meshblock_scrub_last_complete_timestamp_seconds",
        "When the pool's last complete scrub pass ended (0: none since the MDM started)",
        labels=labels,
    )
    running = GaugeMetricFamily(
        "meshblock_scrub_running",
        "1 while a scrub pass of the pool runs (not paused, not held by a rebuild)",
        labels=labels,
    )
    progress = GaugeMetricFamily(
        "meshblock_scrub_progress_ratio", "PGs scrubbed in the current pass / PGs", labels=labels
    )
    for pool_id, lv in pools:
        doc: dict[str, Any] = (
            schedule.status(pool_id, now_wall, now)
            if schedule is not None
            else ScrubSchedule(1.0, 0, 0.0, now).status(pool_id, now_wall, now)
        )
        chunks.add_metric(lv, doc["chunks_scrubbed"])
        for kind in KINDS:
            errors.add_metric([*lv, kind], doc["errors"][kind])
        repaired.add_metric(lv, doc["repaired_blocks"])
        checksummed.add_metric(lv, doc["checksummed_blocks"])
        last.add_metric(lv, doc["last_complete_at"] or 0)
        running.add_metric(lv, 1 if doc["state"] == RUNNING else 0)
        progress.add_metric(lv, doc["progress_percent"] / 100)
    return [chunks, errors, repaired, checksummed, last, running, progress]


def summaries(schedule: ScrubSchedule | None, pools: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """Each pool's scrub in short (``/health/metrics``' ``scrub``, MGMT's dashboard)."""
    now, wall = time.monotonic(), time.time()
    s = schedule or ScrubSchedule(1.0, 0, 0.0, now)
    out = []
    for pool_id, name in pools:
        doc = s.status(pool_id, wall, now)
        out.append(
            {
                "pool": name,
                "state": doc["state"],
                "pass": doc["pass"],
                "progress_percent": doc["progress_percent"],
                "last_complete_at": (
                    None
                    if doc["last_complete_at"] is None
                    else dt.datetime.fromtimestamp(doc["last_complete_at"], dt.UTC).isoformat()
                ),
                "bad_blocks": sum(doc["errors"].values()) - doc["errors"]["divergent"],
                "repaired_blocks": doc["repaired_blocks"],
                "unrecoverable": doc["errors"]["unrecoverable"],
                "divergent": doc["errors"]["divergent"],
            }
        )
    return out
