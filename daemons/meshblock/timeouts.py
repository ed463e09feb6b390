"""Short timeouts adapted to each peer's observed latency.

An SDS that stops answering (hung, SIGSTOPped, its packets dropped while it still
heartbeats) must be given up in seconds, not after a fixed ten; an SDS whose disk is
merely slow must not be. So the budget of one request to a peer is

    budget = min(ceiling, max(floor, factor x p99 of its last WINDOW answered requests))

with no sample yet: ``floor``. The SDC gives up an attempt on an SDS after its
budget (and reads the other copy, or reports the SDS and retries), the SDS drops a
peer connection that answers nothing for its budget (docs/sdc.md, docs/sds.md).

:func:`adaptive_timeout` is the computation (pure); :class:`LatencyBudgets` keeps
the samples per key (an SDS id) and the budget of each, recomputed every
``RECOMPUTE_EVERY`` samples so that recording one costs a few list operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

#: Answered requests kept per peer.
WINDOW: Final = 512
#: The percentile of those that the budget is a multiple of.
PERCENTILE: Final = 0.99
#: A peer's budget is recomputed after this many new samples.
RECOMPUTE_EVERY: Final = 32


def adaptive_timeout(
    samples: Sequence[float],
    *,
    floor: float,
    factor: float,
    ceiling: float,
    percentile: float = PERCENTILE,
) -> float:
    """``min(ceiling, max(floor, factor x the percentile of samples))``; ``floor``
    (at most ``ceiling``) without samples. The percentile is the nearest-rank one:
    the smallest sample with at least ``percentile`` of them at or below it."""
    if not samples:
        return min(floor, ceiling)
    ordered = sorted(samples)
    rank = max(1, math.ceil(percentile * len(ordered)))
    return min(ceiling, max(floor, factor * ordered[rank - 1]))


class _Peer:
    __slots__ = ("budget", "count", "samples")

    def __init__(self, budget: float) -> None:
        self.samples: list[float] = []
        self.count = 0  # samples recorded since the budget was computed
        self.budget = budget


class LatencyBudgets:
    """Per key, the last ``window`` latencies recorded and the budget they give."""

    def __init__(
        self, *, floor: float, factor: float, ceiling: float, window: int = WINDOW
    ) -> None:
        if floor <= 0 or factor <= 0 or ceiling <= 0:
            raise ValueError("floor, factor and ceiling must be positive")
        self.floor = floor
        self.factor = factor
        self.ceiling = ceiling
        self.window = window
        self._peers: dict[int, _Peer] = {}
        #: Per key found silent (no answer within its budget, a lost connection): until
        #: when (``time.monotonic()``) it is not sent new requests.
        self.silent_until: dict[int, float] = {}

    def budget(self, key: int) -> float:
        """How long one request to ``key`` may take before it is given up."""
        peer = self._peers.get(key)
        return min(self.floor, self.ceiling) if peer is None else peer.budget

    def record(self, key: int, seconds: float) -> None:
        """A request to ``key`` was answered after ``seconds``."""
        peer = self._peers.get(key)
        if peer is None:
            peer = self._peers[key] = _Peer(min(self.floor, self.ceiling))
        samples = peer.samples
        if len(samples) >= self.window:
            del samples[0]
        samples.append(seconds)
        peer.count += 1
        if peer.count >= RECOMPUTE_EVERY or len(samples) < RECOMPUTE_EVERY:
            peer.count = 0
            peer.budget = adaptive_timeout(
                samples, floor=self.floor, factor=self.factor, ceiling=self.ceiling
            )

    def silence(self, key: int, now: float) -> None:
        """``key`` did not answer: leave it alone for its budget from ``now``."""
        self.silent_until[key] = now + self.budget(key)

    def silent(self, key: int, now: float) -> bool:
        """Whether ``key`` is still being left alone (:meth:`silence`)."""
        until = self.silent_until.get(key)
        if until is None:
            return False
        if until > now:
            return True
        del self.silent_until[key]
        return False

    def budgets(self) -> dict[int, float]:
        """Every key's budget now (for /health)."""
        return {key: peer.budget for key, peer in sorted(self._peers.items())}


#: The heartbeat intervals an MDM may set for the SDSs and SDCs; others are ignored.
MIN_HEARTBEAT_INTERVAL_S: Final = 0.05
MAX_HEARTBEAT_INTERVAL_S: Final = 300.0


def heartbeat_interval(said: object, current: float) -> float:
    """The interval an MDM's heartbeat answer sets (``heartbeat_interval_s``, its
    ``[cluster]`` setting), or ``current`` when it says none or one out of range."""
    if (
        isinstance(said, int | float)
        and not isinstance(said, bool)
        and MIN_HEARTBEAT_INTERVAL_S <= said <= MAX_HEARTBEAT_INTERVAL_S
    ):
        return float(said)
    return current
