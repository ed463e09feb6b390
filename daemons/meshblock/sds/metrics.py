"""The SDS's Prometheus metrics, kept as plain counters and read on scrape.

The IO path only bumps integers in :class:`SdsStats` (a few list stores per request,
no locks); :class:`SdsCollector` turns them, the store's usage and the map epochs
into metric families when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshblock.wire.protocol import Op

if TYPE_CHECKING:
    from meshblock.sds.io_path import DataService

#: Upper bounds (seconds) of the latency histogram's buckets (+Inf is implied).
BOUNDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_N_OPS: Final = 64


class SdsStats:
    """Counters the IO path bumps; indexed by opcode."""

    def __init__(self) -> None:
        self.ops = [0] * _N_OPS
        self.bytes = [0] * _N_OPS
        self.errors = [0] * _N_OPS
        self.seconds = [0.0] * _N_OPS
        self.buckets = [[0] * (len(BOUNDS) + 1) for _ in range(_N_OPS)]
        self.peer_errors: dict[int, int] = {}
        self.protocol_errors = 0
        self.handshake_failures = 0
        self.connections = 0

    def record(self, op: int, nbytes: int, seconds: float, ok: bool) -> None:
        self.ops[op] += 1
        self.bytes[op] += nbytes
        self.seconds[op] += seconds
        self.buckets[op][bisect.bisect_left(BOUNDS, seconds)] += 1
        if not ok:
            self.errors[op] += 1

    def peer_error(self, sds_id: int) -> None:
        self.peer_errors[sds_id] = self.peer_errors.get(sds_id, 0) + 1


class SdsCollector(Collector):
    def __init__(self, service: DataService) -> None:
        self._svc = service

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        st = svc.stats
        ops = CounterMetricFamily(
            "meshblock_sds_ops", "Requests served, by operation", labels=["op"]
        )
        nbytes = CounterMetricFamily(
            "meshblock_sds_bytes", "Payload bytes read or written, by operation", labels=["op"]
        )
        errors = CounterMetricFamily(
            "meshblock_sds_op_errors", "Requests answered with an error status", labels=["op"]
        )
        hist = HistogramMetricFamily(
            "meshblock_sds_op_duration_seconds",
            "Time from a request's arrival to its reply",
            labels=["op"],
        )
        for op in Op:
            if not st.ops[op]:
                continue
            name = op.name.lower()
            ops.add_metric([name], st.ops[op])
            nbytes.add_metric([name], st.bytes[op])
            errors.add_metric([name], st.errors[op])
            cumulative = 0
            buckets = []
            for bound, count in zip((*BOUNDS, float("inf")), st.buckets[op], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric([name], buckets, st.seconds[op])
        yield from (ops, nbytes, errors, hist)

        cap = GaugeMetricFamily(
            "meshblock_sds_device_capacity_bytes", "Configured capacity", labels=["device"]
        )
        used = GaugeMetricFamily(
            "meshblock_sds_device_used_bytes", "Bytes in allocated chunk slots", labels=["device"]
        )
        failed = GaugeMetricFamily(
            "meshblock_sds_device_failed",
            "1 when the device failed an IO and takes no more (fail-stop; docs/sds.md)",
            labels=["device"],
        )
        for dev in svc.store.devices:
            cap.add_metric([dev.path], dev.capacity)
            used.add_metric([dev.path], dev.used_bytes)
            failed.add_metric([dev.path], 1 if dev.failed else 0)
        yield from (cap, used, failed)

        epochs = GaugeMetricFamily(
            "meshblock_sds_map_epoch", "Epoch of the PG map in use", labels=["pool_id"]
        )
        for pool_id, m in sorted(svc.maps.maps.items()):
            epochs.add_metric([str(pool_id)], m.epoch)
        yield epochs

        peers = CounterMetricFamily(
            "meshblock_sds_peer_errors", "Failed replication requests, by peer", labels=["peer"]
        )
        for sds_id, n in sorted(st.peer_errors.items()):
            peers.add_metric([str(sds_id)], n)
        yield peers
        yield CounterMetricFamily(
            "meshblock_sds_protocol_errors",
            "Connections dropped because the peer broke the protocol",
            value=st.protocol_errors,
        )
        yield CounterMetricFamily(
            "meshblock_sds_handshake_failures",
            "Connections refused in the handshake (wrong secret, version, role)",
            value=st.handshake_failures,
        )
        yield GaugeMetricFamily(
            "meshblock_sds_connections", "Open data-protocol connections", value=st.connections
        )
        rs = svc.resync
        yield CounterMetricFamily(
            "meshblock_sds_resync_chunks",
            "Chunks copied to resynchronising secondaries (written or trimmed)",
            value=rs.chunks_total,
        )
        yield CounterMetricFamily(
            "meshblock_sds_resync_bytes", "Bytes copied by resyncs", value=rs.bytes_total
        )
        yield CounterMetricFamily(
            "meshblock_sds_resync_pgs",
            "PGs resynchronised (accepted by the MDM)",
            value=rs.pgs_total,
        )
        yield GaugeMetricFamily(
            "meshblock_sds_resyncs_active", "PG resyncs in progress", value=len(rs.jobs)
        )
