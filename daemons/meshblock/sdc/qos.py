"""Per-mapping QoS: token buckets for IOPS and bandwidth.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second. A
request takes its tokens at once, which may leave the bucket in debt; the request
then waits until the debt is paid back. Waiters are served in arrival order (one
lock), so a large request cannot be starved by a stream of small ones, and a request
larger than the burst (a 32 MiB write against a small bandwidth limit) still passes,
after the time its size is worth.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: Burst: how many seconds' worth of tokens a bucket may save up.
BURST_SECONDS = 0.1


class TokenBucket:
    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self.rate = 0.0
        self.burst = 0.0
        self.set_rate(rate)
        self._tokens = self.burst
        self._stamp = clock()

    def set_rate(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = max(1.0, self.rate * BURST_SECONDS)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, n: float) -> None:
        """Take ``n`` tokens, waiting while the bucket is in debt."""
        async with self._lock:
            self._refill()
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class Qos:
    """The limits of one mapping; ``None`` means unlimited. Limits change in place."""

    def __init__(self, iops_limit: int | None, bandwidth_limit_bps: int | None) -> None:
        self.iops: TokenBucket | None = None
        self.bandwidth: TokenBucket | None = None
        self.update(iops_limit, bandwidth_limit_bps)

    def update(self, iops_limit: int | None, bandwidth_limit_bps: int | None) -> None:
        if iops_limit:
            if self.iops is None:
                self.iops = TokenBucket(iops_limit)
            else:
                self.iops.set_rate(iops_limit)
        else:
            self.iops = None
        if bandwidth_limit_bps:
            if self.bandwidth is None:
                self.bandwidth = TokenBucket(bandwidth_limit_bps)
            else:
                self.bandwidth.set_rate(bandwidth_limit_bps)
        else:
            self.bandwidth = None

    @property
    def limited(self) -> bool:
        return self.iops is not None or self.bandwidth is not None

    async def admit(self, nbytes: int) -> None:
        """Wait until one operation moving ``nbytes`` of data may start."""
        if self.iops is not None:
            await self.iops.take(1)
        if self.bandwidth is not None and nbytes:
            await self.bandwidth.take(nbytes)
