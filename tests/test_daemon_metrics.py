"""The series every daemon's /metrics carries besides its own (meshblock.daemon_metrics):
``process_*``, ``python_info`` and ``meshblock_build_info{version}``, in the registry
each of MDM, SDS, SDC and MGMT builds for its /metrics handler, rendered as the handler
renders it (``generate_latest``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import meshblock
from meshblock.mdm.context import CTX, MdmContext
from meshblock.mdm.health import REGISTRY, setup_metrics
from meshblock.mgmt.metrics import MgmtMetrics
from meshblock.nbd.server import NbdServer
from meshblock.sdc.app import SdcState, _ScrapeCollector
from meshblock.sdc.config import MdmLink, SdcConfig
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sds.maps import MapCache
from meshblock.sds.metrics import sds_registry
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec

pytestmark = pytest.mark.unit


def mdm_registry() -> CollectorRegistry:
    app = web.Application()
    app[CTX] = cast(MdmContext, SimpleNamespace())  # read on scrape only
    setup_metrics(app)
    return app[REGISTRY]


@pytest.fixture
def sds_store(tmp_path: Path) -> Iterator[ChunkStore]:
    store = ChunkStore([DeviceSpec(str(tmp_path / "dev0.img"), 64 << 20, "p")])
    store.open()
    yield store
    store.close()


Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def check_common_series(registry: CollectorRegistry) -> Samples:
    found = samples(registry)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
    ):
        assert name in found, f"{name} missing from {sorted(found)}"
    assert found["process_cpu_seconds_total"][0][1] > 0
    assert found["meshblock_build_info"] == [({"version": meshblock.__version__}, 1.0)]
    return found


def test_mdm_metrics_have_process_and_build_info() -> None:
    check_common_series(mdm_registry())


def test_sds_metrics_have_process_and_build_info(sds_store: ChunkStore) -> None:
    state = SdsState(sds_store, MapCache(), Peers("secret", 5.0), SdsStats())
    found = check_common_series(sds_registry(state, Resync(state)))
    assert "meshblock_sds_device_capacity_bytes" in found  # its own series still there


def test_sdc_metrics_have_process_and_build_info() -> None:
    metrics = SdcMetrics()
    metrics.volume("vol1").done("read", 4096, 0.0, True)
    found = check_common_series(metrics.registry)
    assert ({"volume": "vol1", "op": "read"}, 1.0) in found["meshblock_sdc_ops_total"]


def test_mgmt_metrics_have_process_and_build_info() -> None:
    found = check_common_series(MgmtMetrics().registry)
    assert "meshblock_mgmt_logins_total" in found


def test_sdc_running_counts_are_counters() -> None:
    """NBD protocol errors and refused connections count since start: counters,
    ``..._total`` (they were gauges without the suffix)."""
    state = SdcState(SdcConfig(mdm=MdmLink(cluster_secret="s")))
    state.nbd = NbdServer()
    state.nbd.protocol_errors = 3
    state.nbd.refused_connections = 2
    state.metrics.add_collector(_ScrapeCollector(state))
    text = generate_latest(state.metrics.registry).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    found = samples(state.metrics.registry)
    for name, value in (
        ("meshblock_sdc_nbd_protocol_errors", 3.0),
        ("meshblock_sdc_nbd_refused_connections", 2.0),
    ):
        assert types.get(name) == "counter", (name, types.get(name))
        assert found[name + "_total"] == [({}, value)]
        assert name not in found
