"""The SDS's Prometheus metrics, read on scrape.

The IO path only bumps integers in :class:`~meshblock.sds.stats.SdsStats`;
:class:`SdsCollector` turns them, the store's usage, the map epochs and the copy
jobs' counters into metric families when ``/metrics`` is scraped. It reads the SDS's
state (:class:`~meshblock.sds.state.SdsState`) and the copy jobs
(:class:`~meshblock.sds.resync.Resync`), never the request handler.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshblock.sds.stats import BOUNDS, SdsStats
from meshblock.wire.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Op, PeerRole

if TYPE_CHECKING:
    from meshblock.sds.resync import Resync
    from meshblock.sds.state import SdsState


class SdsCollector(Collector):
    def __init__(self, state: SdsState, resync: Resync) -> None:
        self._state = state
        self._resync = resync

    def collect(self) -> Iterator[Metric]:
        state = self._state
        st = state.stats
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
        csum = CounterMetricFamily(
            "meshblock_sds_checksum_errors",
            "4 KiB blocks read that did not match their checksums (docs/sds.md)",
            labels=["device"],
        )
        for dev in state.store.devices:
            cap.add_metric([dev.path], dev.capacity)
            used.add_metric([dev.path], dev.used_bytes)
            failed.add_metric([dev.path], 1 if dev.failed else 0)
            csum.add_metric([dev.path], dev.checksum_errors)
        yield from (cap, used, failed, csum)

        epochs = GaugeMetricFamily(
            "meshblock_sds_map_epoch", "Epoch of the PG map in use", labels=["pool_id"]
        )
        for pool_id, m in sorted(state.maps.maps.items()):
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
        yield from _by_version(st)
        rs = self._resync
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


def _by_version(st: SdsStats) -> Iterator[Metric]:
    """Authenticated connections open and handshakes done, by negotiated protocol
    version and role: every series, 0 included, so that "no version 1 peer left"
    (before ``wire_min_version = 2``, docs/protocol.md §8) is a value, not an absence."""
    labels = ["version", "role"]
    conns = GaugeMetricFamily(
        "meshblock_sds_data_connections",
        "Authenticated data-protocol connections open, by negotiated protocol version and role",
        labels=labels,
    )
    shakes = CounterMetricFamily(
        "meshblock_sds_handshakes",
        "Data-protocol handshakes that succeeded, by negotiated protocol version and role",
        labels=labels,
    )
    for version in range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1):
        for role in PeerRole:
            key = (version, role.name.lower())
            conns.add_metric([str(version), key[1]], st.data_connections.get(key, 0))
            shakes.add_metric([str(version), key[1]], st.handshakes.get(key, 0))
    yield from (conns, shakes)
