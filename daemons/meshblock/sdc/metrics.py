"""The SDC's Prometheus metrics, in a registry of its own.

Counters and the latency histogram are updated on the IO path through label children
bound once per volume (:class:`VolumeStats`), so that an IO costs no label lookup.
State that is read on scrape (connections per export, map epochs, MDM reachability)
comes from a custom collector given by the application.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

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
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        return VolumeStats(self, name)

    def forget_volume(self, name: str) -> None:
        for op in OPS:
            for counter in (self.ops, self.bytes):
                try:
                    counter.remove(name, op)
                except KeyError:
                    pass


class _OpStats:
    __slots__ = ("bytes", "duration", "errors", "ops")

    def __init__(self, m: SdcMetrics, volume: str, op: str) -> None:
        self.ops = m.ops.labels(volume, op)
        self.bytes = m.bytes.labels(volume, op)
        self.duration = m.duration.labels(op)
        self.errors = m.errors.labels(op)


class VolumeStats:
    """Label children of one volume, bound once."""

    def __init__(self, m: SdcMetrics, volume: str) -> None:
        self._retries = m.retries
        self.by_op = {op: _OpStats(m, volume, op) for op in OPS}

    def done(self, op: str, nbytes: int, started: float, ok: bool) -> None:
        s = self.by_op[op]
        s.ops.inc()
        if nbytes:
            s.bytes.inc(nbytes)
        s.duration.observe(time.monotonic() - started)
        if not ok:
            s.errors.inc()

    def retry(self, reason: str) -> None:
        self._retries.labels(reason).inc()
