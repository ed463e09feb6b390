"""The control plane over HTTPS: SDSs, an SDC and MGMT reach an MDM that requires
client certificates, each with its own certificate from the cluster CA (``[tls]``,
meshblock.tls), and nothing reaches it without one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _cluster import SmallCluster, small_cluster
from _mgmt import MgmtDaemon
from _process import started

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    with small_cluster(tmp_path_factory.mktemp("tls"), "vol1", "64MiB", {}, tls=True) as c:
        yield c


def test_sdss_and_the_sdc_register_heartbeat_and_follow_maps_over_https(
    cluster: SmallCluster,
) -> None:
    """small_cluster waited for every SDS to serve (registered, maps followed) and for
    the SDC to export the volume (registered, its maps read): all of it over HTTPS."""
    assert cluster.mdm.url.startswith("https://")
    status, doc = cluster.mdm.api().get("/health/components")
    assert status == 200, doc
    states = {c["name"]: c["state"] for c in doc["components"] if c["component_type"] != "mdm"}
    assert states == {
        "sds1": "connected",
        "sds2": "connected",
        "sds3": "connected",
        cluster.sdc.health()["name"]: "connected",
    }
    assert "MDM starting on https://" in cluster.mdm.log_text()
    assert "client certificates required" in cluster.mdm.log_text()


def mgmt_components(mgmt: MgmtDaemon) -> Any:
    status, doc = mgmt.api().get("/health/api/summary")
    assert status == 200, doc
    return doc["health_summary"]


def test_mgmt_reads_the_mdm_over_https_with_its_certificate(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    def mgmt(workdir: Path, tls: dict[str, str]) -> MgmtDaemon:
        daemon = MgmtDaemon(
            workdir,
            f"sqlite+aiosqlite:///{workdir / 'mgmt.db'}",
            {"mdm": {"url": cluster.mdm.url}, "tls": tls},
        )
        daemon.create_users(viewer=False)
        return daemon

    with started(mgmt(tmp_path / "a", _tls.identity("mgmt:mgmt1").settings())) as daemon:
        summary = mgmt_components(daemon)
        assert summary["mdm_reachable"] is True, summary
        assert summary["status"] in ("ok", "degraded")
        status, comps = daemon.api().get("/health/api/components")
        assert status == 200, comps
        assert {c["name"] for c in comps if c["component_type"] == "sds"} == {
            "sds1",
            "sds2",
            "sds3",
        }
    # The cluster CA alone (no certificate of its own): the MDM refuses it.
    ca_only = {"ca": str(_tls.ca().cert_path)}
    with started(mgmt(tmp_path / "b", ca_only)) as daemon:
        summary = mgmt_components(daemon)
        assert summary["mdm_reachable"] is False and summary["status"] == "unknown", summary
