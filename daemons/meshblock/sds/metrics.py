"""The SDS's Prometheus metrics, read on scrape.

The IO path only bumps integers in :class:`~meshblock.sds.stats.SdsStats`;
:class:`SdsCollector` turns them, the store's usage, the map epochs and the copy
jobs' counters into metric families when ``/metrics`` is scraped. It reads the SDS's
state (:class:`~meshblock.sds.state.SdsState`) and the copy jobs
(:class:`~meshblock.sds.resync.Resync`), never the request handler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from meshblock.daemon_metrics import daemon_registry
from meshblock.sds.stats import BOUNDS, SdsStats
from meshblock.sds.store import Device
from meshblock.wire.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Op, PeerRole

if TYPE_CHECKING:
    from meshblock.sds.resync import Resync
    from meshblock.sds.state import SdsState


# Per opcode: the counter's name, its help, the field of SdsStats it reads.
_OP_COUNTERS: Final = (
    ("meshblock_sds_ops", "Requests served, by operation", "ops"),
    ("meshblock_sds_bytes", "Payload bytes read or written, by operation", "bytes"),
    ("meshblock_sds_op_errors", "Requests answered with an error status", "errors"),
)
# Per device: the family, its name and help, and its value of a device.
_DeviceMetric = tuple[
    type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[Device], int]
]
# One value: the family, its name and help, the value.
_Scalar = tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, int]
_DEVICE_METRICS: Final[tuple[_DeviceMetric, ...]] = (
    (
        GaugeMetricFamily,
        "meshblock_sds_device_capacity_bytes",
        "Configured capacity",
        lambda dev: dev.capacity,
    ),
    (
        GaugeMetricFamily,
        "meshblock_sds_device_used_bytes",
        "Bytes in allocated chunk slots",
        lambda dev: dev.used_bytes,
    ),
    (
        GaugeMetricFamily,
        "meshblock_sds_device_failed",
        "1 when the device failed an IO and takes no more (fail-stop; docs/sds.md)",
        lambda dev: 1 if dev.failed else 0,
    ),
    (
        CounterMetricFamily,
        "meshblock_sds_checksum_errors",
        "4 KiB blocks read that did not match their checksums (docs/sds.md)",
        lambda dev: dev.checksum_errors,
    ),
    (
        CounterMetricFamily,
        "meshblock_sds_checksum_repaired",
        "Bad 4 KiB blocks rewritten from another copy of their PG (docs/sds.md, Healing)",
        lambda dev: dev.checksum_repaired,
    ),
    (
        CounterMetricFamily,
        "meshblock_sds_checksum_unrepairable",
        "Bad 4 KiB blocks that no other copy could repair: their reads fail with EIO",
        lambda dev: dev.checksum_unrepairable,
    ),
    (
        GaugeMetricFamily,
        "meshblock_sds_checksum_unverified_slots",
        "Slots marked at start whose checksums are not recomputed yet (docs/sds.md)",
        lambda dev: len(dev.unverified),
    ),
    (
        CounterMetricFamily,
        "meshblock_sds_device_syncs",
        "fdatasyncs of the device (FLUSH, FUA, slot reclaim); a FLUSH skips a clean one",
        lambda dev: dev.syncs,
    ),
)


def sds_registry(state: SdsState, resync: Resync) -> CollectorRegistry:
    """The registry the SDS's ``/metrics`` renders: the process and build-info series
    (meshblock.daemon_metrics) and :class:`SdsCollector`."""
    registry = daemon_registry(auto_describe=True)
    registry.register(SdsCollector(state, resync))
    return registry


class SdsCollector(Collector):
    def __init__(self, state: SdsState, resync: Resync) -> None:
        self._state = state
        self._resync = resync

    def collect(self) -> Iterator[Metric]:
        state = self._state
        st = state.stats
        by_op = [
            (CounterMetricFamily(name, doc, labels=["op"]), getattr(st, field))
            for name, doc, field in _OP_COUNTERS
        ]
        hist = HistogramMetricFamily(
            "meshblock_sds_op_duration_seconds",
            "Time from a request's arrival to its reply",
            labels=["op"],
        )
        for op in Op:
            if not st.ops[op]:
                continue
            name = op.name.lower()
            for family, counts in by_op:
                family.add_metric([name], counts[op])
            cumulative = 0
            buckets = []
            for bound, count in zip((*BOUNDS, float("inf")), st.buckets[op], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric([name], buckets, st.seconds[op])
        yield from (family for family, _ in by_op)
        yield hist

        for kind, name, doc, value in _DEVICE_METRICS:
            per_device = kind(name, doc, labels=["device"])
            for dev in state.store.devices:
                per_device.add_metric([dev.path], value(dev))
            yield per_device

        epochs = GaugeMetricFamily(
            "meshblock_sds_map_epoch", "Epoch of the PG map in use", labels=["pool_id"]
        )
        for pool_id, m in sorted(state.maps.maps.items()):
            epochs.add_metric([str(pool_id)], m.epoch)
        yield epochs
        yield from _mappings(state)
        yield from _scalars(
            (
                GaugeMetricFamily,
                "meshblock_sds_mdm_term",
                "The highest MDM leader term seen",
                state.maps.terms.highest,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_mdm_term_refused",
                "Maps, mappings and heartbeat answers of an older MDM leader term refused",
                state.maps.terms.refused,
            ),
        )

        peers = CounterMetricFamily(
            "meshblock_sds_peer_errors", "Failed replication requests, by peer", labels=["peer"]
        )
        for sds_id, n in sorted(st.peer_errors.items()):
            peers.add_metric([str(sds_id)], n)
        yield peers
        mismatches = CounterMetricFamily(
            "meshblock_sds_wire_checksum_mismatches",
            "Write payloads refused (CHECKSUM_MISMATCH) for not matching the checksums "
            "they came with, by the sender's role",
            labels=["role"],
        )
        for role, n in sorted(st.wire_checksum_mismatches.items()):
            mismatches.add_metric([role], n)
        yield mismatches
        yield from _scalars(
            (
                CounterMetricFamily,
                "meshblock_sds_protocol_errors",
                "Connections dropped because the peer broke the protocol",
                st.protocol_errors,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_handshake_failures",
                "Connections refused in the handshake (wrong secret, version, role, TLS)",
                st.handshake_failures,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_refused_requests",
                "Requests answered NOT_PERMITTED: not an operation of the client's identity "
                "or role, or a replica write from an SDS that is not the PG's primary",
                st.refused_requests,
            ),
            (
                GaugeMetricFamily,
                "meshblock_sds_connections",
                "Open data-protocol connections",
                st.connections,
            ),
        )
        yield from _by_version(st)
        gc = state.tree_gc
        yield from _scalars(
            (
                CounterMetricFamily,
                "meshblock_sds_tree_gc_passes",
                "Garbage passes over a snapshot tree's chunks completed (docs/sds.md)",
                gc.passes_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_tree_gc_blocks_freed",
                "4 KiB blocks of snapshot trees no live view reads, freed by the garbage pass",
                gc.blocks_freed_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_tree_gc_slots_freed",
                "Version slots freed whole by the garbage pass",
                gc.slots_freed_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_tree_gc_collapsed",
                "Chunks where the garbage pass merged an unread version into its one child",
                gc.collapsed_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_tree_gc_errors",
                "Garbage passes that failed (a device error, a malformed tree, a bug): tried again",
                gc.errors_total,
            ),
            (
                GaugeMetricFamily,
                "meshblock_sds_tree_gc_chunks_left",
                "Chunks the garbage passes in progress have still to visit",
                gc.chunks_left(),
            ),
            (
                GaugeMetricFamily,
                "meshblock_sds_tree_gc_unread_slots",
                "Slots of versions no volume reads, left after the trees' last passes",
                gc.unread_slots(),
            ),
        )
        rs = self._resync
        yield from _scalars(
            (
                CounterMetricFamily,
                "meshblock_sds_resync_chunks",
                "Chunks copied to resynchronising secondaries (written or trimmed)",
                rs.chunks_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_resync_bytes",
                "Bytes copied by resyncs",
                rs.bytes_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_resync_pgs",
                "PGs resynchronised (accepted by the MDM)",
                rs.pgs_total,
            ),
            (
                CounterMetricFamily,
                "meshblock_sds_resync_marked_bad_blocks",
                "4 KiB blocks copied as bad: no copy had good bytes for them (docs/sds.md)",
                rs.marked_bad_total,
            ),
            (
                GaugeMetricFamily,
                "meshblock_sds_resyncs_active",
                "PG resyncs in progress",
                len(rs.jobs),
            ),
        )


def _scalars(*rows: _Scalar) -> Iterator[Metric]:
    """One family of one value per row."""
    for family, name, text, value in rows:
        yield family(name, text, value=value)


def _mappings(state: SdsState) -> Iterator[Metric]:
    """Per pool, the mappings document held and how long since the MDM last confirmed
    it (docs/security.md, "Revoking a mapping"): only of the pools whose mappings the
    SDS follows (TLS identities on its data port, a device in the pool). Another SDS
    checks nothing against them; a document of another pool (in the state file from
    before a device left it) is not kept current, nor needed."""
    epochs = GaugeMetricFamily(
        "meshblock_sds_mappings_epoch",
        "Epoch of the mappings document client IO is checked against",
        labels=["pool_id"],
    )
    ages = GaugeMetricFamily(
        "meshblock_sds_mappings_unconfirmed_seconds",
        "Seconds since the MDM last answered this SDS's long-poll of the mappings "
        "(an unmap made since may not hold here)",
        labels=["pool_id"],
    )
    followed = state.access.followed
    for pool_id, (epoch, age) in state.access.unconfirmed().items():
        if pool_id in followed:
            epochs.add_metric([str(pool_id)], epoch)
            ages.add_metric([str(pool_id)], age)
    yield from (epochs, ages)


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
