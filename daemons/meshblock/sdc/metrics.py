"""The SDC's Prometheus metrics, in a registry of its own.

The IO path counts in plain ints and floats (:class:`VolumeStats`, one per volume):
an IO costs no lock, no label lookup and no loop over histogram buckets. The counts
are added to the Prometheus counters and histogram when the registry is collected
(a scrape, ``get_sample_value``), by a collector registered before them, so the
exposition is the same as if every IO had updated them itself. State that is read on
scrape (connections per export, map epochs, MDM reachability) comes from a custom
collector given by the application.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from meshblock.daemon_metrics import daemon_registry

OPS = ("read", "write", "write_zeroes", "trim", "flush")
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class SdcMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """``registry``: the daemon's own by default (process and build-info series
        included, meshblock.daemon_metrics); a test may give a bare one."""
        self.registry = registry if registry is not None else daemon_registry()
        r = self.registry
        # Live volumes' stats, and those of forgotten volumes whose late IO still
        # counts in the per-op series (duration, errors).
        self._live: list[VolumeStats] = []
        self._forgotten: weakref.WeakSet[VolumeStats] = weakref.WeakSet()
        # Registered first: the registry collects in registration order.
        r.register(_Sync(self))
        self.ops = Counter(
            "meshblock_sdc_ops", "NBD operations served", ["volume", "op"], registry=r
        )
        self.bytes = Counter(
            "meshblock_sdc_bytes", "Bytes read, written or zeroed", ["volume", "op"], registry=r
        )
        self.duration = Histogram(
            "meshblock_sdc_op_duration_seconds",
            "Time from an NBD request to its reply, by operation",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "meshblock_sdc_retries",
            "IO attempts retried after a map refresh, by reason",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "meshblock_sdc_io_errors", "NBD operations answered with an error", ["op"], registry=r
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def volume(self, name: str) -> VolumeStats:
        stats = VolumeStats(self, name)
        self._live.append(stats)
        return stats

    def sync(self) -> None:
        """Add what the IO path counted since the last call to the Prometheus series."""
        for stats in self._live:
            stats.sync(True)
        for stats in list(self._forgotten):
            stats.sync(False)

    def forget_volume(self, name: str) -> None:
        for stats in [s for s in self._live if s.name == name]:
            stats.sync(True)
            self._live.remove(stats)
            self._forgotten.add(stats)
        for op in OPS:
            for counter in (self.ops, self.bytes):
                try:
                    counter.remove(name, op)
                except KeyError:
                    pass


class _Sync(Collector):
    """Brings the Prometheus series up to date when the registry is collected."""

    def __init__(self, metrics: SdcMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.sync()
        return ()


#: Upper bounds of the histogram's buckets, as the Histogram keeps them (+Inf last).
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


class _OpStats:
    """Counts of one operation on one volume since the last sync, and its series."""

    __slots__ = (
        "bytes",
        "bytes_series",
        "duration",
        "errors",
        "errors_series",
        "hist",
        "ops",
        "ops_series",
        "seconds",
    )

    def __init__(self, m: SdcMetrics, volume: str, op: str) -> None:
        self.ops = 0
        self.bytes = 0
        self.errors = 0
        self.seconds = 0.0
        self.hist = [0] * len(_BOUNDS)
        self.ops_series = m.ops.labels(volume, op)
        self.bytes_series = m.bytes.labels(volume, op)
        self.duration = m.duration.labels(op)
        self.errors_series = m.errors.labels(op)

    def sync(self, live: bool) -> None:
        if self.ops:
            if live:
                self.ops_series.inc(self.ops)
                if self.bytes:
                    self.bytes_series.inc(self.bytes)
            self.ops = self.bytes = 0
        if self.errors:
            self.errors_series.inc(self.errors)
            self.errors = 0
        hist = self.hist
        if any(hist):
            # The Histogram's own bucket counters (observe() adds 1 to one of them).
            buckets = self.duration._buckets
            for i, n in enumerate(hist):
                if n:
                    buckets[i].inc(n)
                    hist[i] = 0
            self.duration._sum.inc(self.seconds)
            self.seconds = 0.0


class VolumeStats:
    """Counts of one volume's IO, added to the metrics on collection."""

    def __init__(self, m: SdcMetrics, volume: str) -> None:
        self.name = volume
        self._retries = m.retries
        self.by_op = {op: _OpStats(m, volume, op) for op in OPS}

    def done(self, op: str, nbytes: int, started: float, ok: bool) -> None:
        s = self.by_op[op]
        s.ops += 1
        s.bytes += nbytes
        took = time.monotonic() - started
        s.seconds += took
        s.hist[bisect.bisect_left(_BOUNDS, took)] += 1
        if not ok:
            s.errors += 1

    def sync(self, live: bool) -> None:
        for s in self.by_op.values():
            s.sync(live)

    def retry(self, reason: str) -> None:
        self._retries.labels(reason).inc()
