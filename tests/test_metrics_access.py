"""Who may read the SDS's, SDC's and MGMT's /metrics and health details.

Real daemons on loopback (meshblock.metrics_access): on their own port /metrics needs
the read token of ``[metrics] token_file`` (none and a wrong one: 401, written to the
audit log) or, over HTTPS, a certificate that may read (``admin:``, ``mgmt:``; an
``sds:`` or ``sdc:`` one is a 403). ``/health`` stays open but tells only the state
without a credential. ``[metrics] port`` serves the routes openly, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import _control
import _tls
from _http import Response, request
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from _ports import free_port
from _process import started
from _sdc import SdcDaemon
from _sds import SdsDaemon
from _wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

WRONG = "mtk-not-the-token"


@dataclass
class Daemons:
    sds: SdsDaemon
    sdc: SdcDaemon
    mgmt: MgmtDaemon
    open_ports: dict[str, int]


def _open(port: int) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": port}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    root = tmp_path_factory.mktemp("metrics-access")
    ports = {name: free_port() for name in ("sds", "sdc", "mgmt")}
    with ExitStack() as stack:
        mdm = stack.enter_context(
            started(MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root}/m.db"))
        )
        sds = SdsDaemon(root / "sds", "sds1", mdm, None, metrics=_open(ports["sds"]))
        stack.enter_context(started(sds))
        sdc = SdcDaemon(root / "sdc", mdm, {"metrics": _open(ports["sdc"])})
        stack.enter_context(started(sdc))
        mgmt = MgmtDaemon(
            root / "mgmt",
            f"sqlite+aiosqlite:///{root}/g.db",
            {"metrics": _open(ports["mgmt"])},
            tls=False,
        )
        mgmt.create_users(viewer=False)
        stack.enter_context(started(mgmt))
        wait_until(sds.reachable, 30, "the SDS's control port")
        yield Daemons(sds, sdc, mgmt, ports)


def _get(url: str, token: str | None = None) -> Response:
    return request("GET", url, token=token, timeout=10)


def _refusals(log: str, path: str) -> list[dict[str, Any]]:
    """The audit log's refusals of ``path`` in a daemon's log."""
    found = []
    for line in log.splitlines():
        start = line.find('{"ts"')
        if start < 0 or "meshblock.audit" not in line[:start]:
            continue
        entry = json.loads(line[start:])
        if entry["event"] == "refused" and entry["path"] == path:
            found.append(entry)
    return found


def test_metrics_need_the_read_token(plain: Daemons) -> None:
    bases = {"sds": plain.sds.control_url, "sdc": plain.sdc.url, "mgmt": plain.mgmt.url}
    for name, base in bases.items():
        url = base + "/metrics"
        none, wrong = _get(url), _get(url, WRONG)
        assert none.status == 401 and wrong.status == 401, (name, none, wrong)
        assert "token" in none.body["error"]["message"], (name, none.body)
        right = _get(url, _control.METRICS_TOKEN)
        assert right.status == 200 and f"meshblock_{name}_" in right.body, (name, right.status)
    # MGMT's users read it too, with their API token.
    assert _get(plain.mgmt.url + "/metrics", plain.mgmt.admin_token).status == 200
    # Refusals are in the access and audit log, with no token in it.
    for daemon in (plain.sds, plain.sdc, plain.mgmt):
        log = daemon.log_text()
        refused = _refusals(log, "/metrics")
        assert {e["status"] for e in refused} == {401}, (daemon.name, refused)
        assert len(refused) >= 2 and WRONG not in log and _control.METRICS_TOKEN not in log


def test_health_is_open_but_tells_only_the_state(plain: Daemons) -> None:
    sds = _get(plain.sds.control_url + "/health")
    assert sds.status == 200 and set(sds.body) == {"status", "state"}, sds.body
    assert set(_get(plain.sds.control_url + "/health", WRONG).body) == {"status", "state"}
    assert "devices" in plain.sds.health()  # with the token: every detail
    sdc = _get(plain.sdc.url + "/health")
    assert sdc.status == 200 and set(sdc.body) == {"state"}, sdc.body
    assert "exports" in plain.sdc.health()


def test_the_open_listener_serves_the_routes_alone(plain: Daemons) -> None:
    for name, port in plain.open_ports.items():
        base = f"http://127.0.0.1:{port}"
        got = _get(base + "/metrics")
        assert got.status == 200 and f"meshblock_{name}_" in got.body, (name, got.status)
    sds_open = f"http://127.0.0.1:{plain.open_ports['sds']}"
    assert "devices" in _get(sds_open + "/health").body
    assert "exports" in _get(f"http://127.0.0.1:{plain.open_ports['sdc']}/health").body
    assert _get(f"http://127.0.0.1:{plain.open_ports['mgmt']}/login").status == 404
    mgmt_api = f"http://127.0.0.1:{plain.open_ports['mgmt']}/api/alerts"
    assert _get(mgmt_api, plain.mgmt.admin_token).status == 404


def test_certificates_that_may_read_do_and_components_do_not(tmp_path: Path) -> None:
    with ExitStack() as stack:
        mdm = MdmDaemon(tmp_path / "mdm", f"sqlite+aiosqlite:///{tmp_path}/m.db", tls=True)
        stack.enter_context(started(mdm))
        sds = stack.enter_context(started(SdsDaemon(tmp_path / "sds", "sds1", mdm, None)))
        sdc = stack.enter_context(started(SdcDaemon(tmp_path / "sdc", mdm)))
        wait_until(sds.reachable, 30, "the SDS's control port")
        for base, own in ((sds.control_url, "sds:sds1"), (sdc.url, f"sdc:{sdc.cert_guid}")):
            url = base + "/metrics"
            for reader in ("admin:tests", "mgmt:mgmt"):
                got = request("GET", url, context=_tls.context(reader))
                assert got.status == 200, (url, reader, got.status)
            for component in (own, "sds:sds2", f"sdc:{sdc.cert_guid}"):
                got = request("GET", url, context=_tls.context(component))
                assert got.status == 403, (url, component, got.status)
                # a token sent along does not widen what the certificate may do
                with_token = request(
                    "GET", url, context=_tls.context(component), token=_control.METRICS_TOKEN
                )
                assert with_token.status == 403
            scraper = _tls.context(None)  # the CA alone, as Prometheus may scrape
            assert request("GET", url, context=scraper).status == 401
            assert request("GET", url, context=scraper, token=_control.METRICS_TOKEN).status == 200
            health = request("GET", base + "/health", context=_tls.context("sds:sds2"))
            assert (
                health.status == 200
                and "devices" not in health.body
                and "exports" not in health.body
            )
        refused = _refusals(sds.log_text(), "/metrics")
        assert {e["status"] for e in refused} == {401, 403}
        assert any(e["who"].get("certificate") == "sds:sds2" for e in refused), refused
