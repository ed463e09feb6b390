"""Progress of the copies that heal and balance the cluster, as the SDSs report it.

A PG's copy (a rebuild or resync of its secondary, or a rebalance move to a target) is
run by the PG's primary SDS, which knows how many chunks it has left. Every SDS
heartbeat carries, per pool and kind (``rebuild``: rebuilds and resyncs;
``rebalance``: moves), the bytes it still has to copy and the bytes it copied since it
started. This module keeps the newest report of each SDS in memory and derives per
pool the bytes remaining, a rate (bytes copied over the last ``WINDOW_S`` seconds) and
an ETA. A restarted SDS's counter starts again from zero: only increases count.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

KINDS = ("rebuild", "rebalance")
WINDOW_S = 30.0  # the rate is measured over this many seconds


class CopyProgress:
    def __init__(self) -> None:
        # (sds, pool, kind) -> (remaining bytes, copied bytes counter of the SDS)
        self._last: dict[tuple[int, int, str], tuple[int, int]] = {}
        self._copied: dict[tuple[int, str], int] = defaultdict(int)  # (pool, kind) -> total
        self._samples: dict[tuple[int, str], deque[tuple[float, int]]] = defaultdict(deque)

    def report(self, sds_id: int, copies: list[dict[str, Any]] | None) -> None:
        now = time.monotonic()
        seen = set()
        for c in copies or ():
            key = (sds_id, int(c["pool_id"]), str(c["kind"]))
            seen.add(key)
            remaining, copied = int(c["remaining_bytes"]), int(c["copied_bytes"])
            previous = self._last.get(key)
            delta = copied if previous is None or copied < previous[1] else copied - previous[1]
            self._last[key] = (remaining, copied)
            total_key = (key[1], key[2])
            self._copied[total_key] += delta
            samples = self._samples[total_key]
            samples.append((now, self._copied[total_key]))
            while samples and now - samples[0][0] > WINDOW_S:
                samples.popleft()
        for key in [k for k in self._last if k[0] == sds_id and k not in seen]:
            # a pool the SDS no longer copies anything of: nothing remains there
            self._last[key] = (0, self._last[key][1])

    def forget(self, sds_id: int) -> None:
        for key in [k for k in self._last if k[0] == sds_id]:
            del self._last[key]

    def remaining(self, pool_id: int, kind: str, live: set[int] | None = None) -> int:
        """Bytes the SDSs (those in ``live``, if given) still have to copy."""
        return sum(
            r
            for (sds, pool, k), (r, _) in self._last.items()
            if pool == pool_id and k == kind and (live is None or sds in live)
        )

    def copied(self, pool_id: int, kind: str) -> int:
        return self._copied.get((pool_id, kind), 0)

    def rate(self, pool_id: int, kind: str) -> float:
        """Bytes per second over the last ``WINDOW_S`` seconds (0 without two samples)."""
        samples = self._samples.get((pool_id, kind))
        if not samples:
            return 0.0
        now = time.monotonic()
        while samples and now - samples[0][0] > WINDOW_S:
            samples.popleft()
        if len(samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = samples[0], samples[-1]
        # measured up to now: a copy that stopped shows a falling rate
        span = max(now - t0, t1 - t0, 1e-6)
        return max(0.0, (c1 - c0) / span)
