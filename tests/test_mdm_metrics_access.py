"""Who may read the MDM's /metrics, /health/components and /health/metrics.

Real MDMs on loopback: on the API they need a read credential (the read-only or admin
token, or a certificate of an identity that may read); ``/health`` (liveness) stays
open; ``[api] metrics_port`` serves the four openly on a listener of their own, and
nothing else. MGMT reads them with the read-only token of ``[mdm] token_file``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _http import Api, request
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from _ports import free_port
from _process import started

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

GUARDED = ("/health/components", "/health/metrics", "/metrics")


@pytest.fixture(scope="module")
def mdm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MdmDaemon]:
    workdir = tmp_path_factory.mktemp("metrics-access")
    open_port = free_port()
    overrides = {"api": {"metrics_host": "127.0.0.1", "metrics_port": open_port}}
    with started(MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", overrides)) as d:
        yield d


def test_the_api_needs_a_read_credential_but_for_liveness(mdm: MdmDaemon) -> None:
    anyone = Api(mdm.url, None)
    assert anyone.get("/health").status == 200
    for path in GUARDED:
        refused = anyone.get(path)
        assert refused.status == 401, (path, refused)
        assert "Authorization" in refused.body["error"]["message"]
        assert Api(mdm.url, mdm.cluster_secret).get(path).status == 403, path
        assert Api(mdm.url, "not-a-token").get(path).status == 401, path
        assert Api(mdm.url, mdm.readonly_token).get(path).status == 200, path
        assert mdm.api().get(path).status == 200, path
    text = Api(mdm.url, mdm.readonly_token).get("/metrics").body
    assert "meshblock_cluster_epoch" in text or "meshblock_" in text


def test_the_open_listener_serves_the_health_routes_alone(mdm: MdmDaemon) -> None:
    port = mdm.settings["api"]["metrics_port"]
    base = f"http://127.0.0.1:{port}"
    for path in ("/health", *GUARDED):
        assert request("GET", base + path).status == 200, path
    assert "meshblock_" in request("GET", base + "/metrics").body
    # The API is not there, not even with a token.
    assert request("GET", base + "/api/v1/protection-domains", token=mdm.admin_token).status == 404
    created = request("POST", base + "/api/v1/protection-domains", {"name": "x"})
    assert created.status in (404, 405)
    assert mdm.api().get("/api/v1/protection-domains").body["protection_domains"] == []


def test_certificates_that_may_read_do_and_components_do_not(tmp_path: Path) -> None:
    with started(MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mdm.db", tls=True)) as d:
        for path in GUARDED:
            assert Api(d.url, None, _tls.context("mgmt:mgmt")).get(path).status == 200
            assert Api(d.url, None, _tls.context("admin:tests")).get(path).status == 200
            assert Api(d.url, None, _tls.context("sds:sds1")).get(path).status == 403
            assert Api(d.url, None, _tls.context("sdc:metrics-guid")).get(path).status == 403
        assert Api(d.url, None, _tls.context("sds:sds1")).get("/health").status == 200


def test_mgmt_reads_the_mdm_with_its_token_file(mdm: MdmDaemon, tmp_path: Path) -> None:
    token_file = tmp_path / "mdm-read-token"
    token_file.write_text(mdm.readonly_token + "\n")
    token_file.chmod(0o600)
    overrides: dict[str, dict[str, Any]] = {"mdm": {"url": mdm.url, "token_file": str(token_file)}}
    mgmt = MgmtDaemon(
        tmp_path / "with", f"sqlite+aiosqlite:///{tmp_path}/a.db", overrides, tls=False
    )
    mgmt.create_users(viewer=False)
    with started(mgmt):
        got = mgmt.api().get("/health/api/components")
        assert got.status == 200, got
        assert got.body[0]["component_type"] == "mdm"
    overrides = {"mdm": {"url": mdm.url}}
    bare = MgmtDaemon(
        tmp_path / "without", f"sqlite+aiosqlite:///{tmp_path}/b.db", overrides, tls=False
    )
    bare.create_users(viewer=False)
    with started(bare):
        refused = bare.api().get("/health/api/components")
        assert refused.status == 502 and "401" in refused.body["error"]["message"], refused
