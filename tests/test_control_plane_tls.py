"""The control plane over HTTPS: SDSs, an SDC and MGMT reach an MDM that requires
client certificates, each with its own certificate from the cluster CA (``[tls]``,
meshblock.tls), and nothing reaches it without one."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _control
import _tls
from _cluster import SmallCluster, small_cluster
from _mgmt import MgmtDaemon
from _process import started
from meshblock import pki

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


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
            tls="cert" in tls,  # MGMT serves HTTPS with its certificate, else plain HTTP
        )
        daemon.create_users(viewer=False)
        return daemon

    mgmt1 = _tls.component_identity("mgmt:mgmt1")  # it serves HTTPS with it too
    with started(mgmt(tmp_path / "a", mgmt1.settings())) as daemon:
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


def control_get(
    port: int, ctx: ssl.SSLContext, path: str = "/metrics", token: str | None = None
) -> tuple[int, str, Any]:
    """``GET path`` on a control port over TLS with ``ctx`` (and the bearer ``token``):
    status, body, the server's certificate (as ``getpeercert()``)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        assert conn.sock is not None
        peer = conn.sock.getpeercert()
        return resp.status, resp.read().decode(), peer
    finally:
        conn.close()


def plain_http_answers(port: int) -> bool:
    """Whether the port answers a plain-HTTP request with an HTTP response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            return s.recv(16).startswith(b"HTTP/1.1 200")
        except ConnectionError:
            return False


def test_the_sds_and_sdc_control_ports_are_https_with_their_own_certificates(
    cluster: SmallCluster, tmp_path: Path
) -> None:
    """With [tls] cert, /health and /metrics are served over TLS with the component's
    certificate; a scraper with the CA alone (no client certificate) reads them with
    the read token, a client certificate of another CA is refused, plain HTTP gets no
    answer."""
    ca = _tls.ca()
    scraper = pki.client_context(ca.cert_path)  # Prometheus: the CA, no certificate
    ports = {f"sds:{d.name}": d.control_port for d in cluster.sds}
    ports[f"sdc:{cluster.sdc.health()['guid']}"] = cluster.sdc.control_port
    other = pki.Ca.init(tmp_path / "other")
    ident = pki.Identity.parse("admin:mallory")
    cert, key = other.issue(ident)
    paths = pki.write_identity(tmp_path / "id", ident, cert, key, other.load()[0])
    foreign = pki.client_context(ca.cert_path, cert=paths["cert"], key=paths["key"])
    for who, port in ports.items():
        status, body, peer = control_get(port, scraper, token=_control.METRICS_TOKEN)
        assert status == 200 and "# TYPE" in body, (who, status)
        assert str(pki.identity_from_peercert(peer)) == who
        assert control_get(port, scraper, "/health")[0] == 200
        assert control_get(port, _tls.context("sds:sds1"), "/health")[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            control_get(port, foreign, "/health")
        assert not plain_http_answers(port), who
