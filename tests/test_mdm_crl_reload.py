"""The MDM reads its CRL again without a restart (meshblock.tls.ServerTls).

A real MDM serves HTTPS with client certificates required and a CRL of the test CA
(tests/_tls.py) in a file of the test's own. Over real TLS on loopback: a certificate
revoked after the MDM started is refused in the handshake once the file changed (or
on SIGHUP), and a connection it opened before is refused at its next request and
closed; a CRL that cannot be parsed, is not the CA's, or is older than the one in
force is not taken (an error in the log, a failure counted in /metrics), and the one
in force keeps working.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import ssl
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

import _tls
from _mdm import MdmDaemon
from _process import started
from _wait import wait_until
from meshblock import pki
from test_mdm_identity import handshake_refused

pytestmark = pytest.mark.cluster

RELOAD_S = 0.2


def install(crl: Path, pem: bytes) -> None:
    """Replace the MDM's CRL file atomically, as an operator copying it out would."""
    tmp = crl.with_suffix(".new")
    tmp.write_bytes(pem)
    os.replace(tmp, crl)


def revoke(ident: str) -> _tls.Files:
    """A new certificate for ``ident``, revoked in the test CA (the MDM's file is not
    changed: :func:`install` the CA's CRL for that)."""
    files = _tls.fresh(ident)
    _tls.ca().revoke(files.serial())
    return files


def ctx(files: _tls.Files) -> ssl.SSLContext:
    return pki.client_context(files.ca, cert=files.cert, key=files.key)


def metric(mdm: MdmDaemon, name: str) -> float | None:
    status, body = mdm.api()("GET", "/metrics")
    assert status == 200
    for line in str(body).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def failures_are(mdm: MdmDaemon, n: int) -> bool:
    return metric(mdm, "meshblock_mdm_tls_crl_reload_failures_total") == n


def mdm_with_crl(workdir: Path, reload_s: float) -> MdmDaemon:
    crl = workdir / "crl.pem"
    shutil.copyfile(_tls.ca().crl_path, crl)
    mdm = MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", tls=True)
    mdm.crl = crl
    mdm.settings["tls"]["crl_reload_s"] = reload_s
    mdm.write_config()
    return mdm


@pytest.fixture
def mdm(tmp_path: Path) -> Iterator[MdmDaemon]:
    with started(mdm_with_crl(tmp_path, RELOAD_S)) as d:
        yield d


def keep_alive(mdm: MdmDaemon, files: _tls.Files) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(mdm.host, mdm.port, context=ctx(files), timeout=10)


def heartbeat(conn: http.client.HTTPSConnection) -> int:
    """A component call (for an SDS that does not exist: 404 when let through)."""
    conn.request("POST", "/api/v1/sds/999999/heartbeat", body=b"{}")
    resp = conn.getresponse()
    resp.read()
    return resp.status


def one_heartbeat(mdm: MdmDaemon, files: _tls.Files) -> int:
    """:func:`heartbeat` on a new connection, closed after it."""
    with contextlib.closing(keep_alive(mdm, files)) as conn:
        return heartbeat(conn)


def test_a_revoked_certificate_is_refused_after_the_crl_file_changes(
    mdm: MdmDaemon, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    crl = tmp_path / "crl.pem"
    victim = _tls.fresh("sds:victim")
    other = _tls.identity("sds:bystander")
    conn = keep_alive(mdm, victim)
    request.addfinalizer(conn.close)
    assert heartbeat(conn) == 404  # in, on a connection kept open
    assert not handshake_refused(mdm, ctx(victim))
    before = metric(mdm, "meshblock_mdm_tls_crl_next_update_timestamp_seconds")
    assert before is not None

    _tls.ca().revoke(victim.serial())
    install(crl, _tls.ca().crl_path.read_bytes())
    wait_until(lambda: handshake_refused(mdm, ctx(victim)), 10, "the revoked SDS refused")
    assert "CRL" in mdm.log_text() and "reloaded (the file changed)" in mdm.log_text()
    assert metric(mdm, "meshblock_mdm_tls_crl_reloads_total") == 1
    after = metric(mdm, "meshblock_mdm_tls_crl_next_update_timestamp_seconds")
    assert after is not None and after >= before
    # The connection it opened before: refused at its next request, then closed.
    assert heartbeat(conn) == 403
    assert "certificate" in mdm.log_text() and "is revoked" in mdm.log_text()
    # (a reset, or a TLS EOF when the close_notify races the request: both OSErrors)
    with pytest.raises((http.client.HTTPException, OSError)):
        heartbeat(conn)
    # Others are not affected.
    assert one_heartbeat(mdm, other) == 404


def test_a_bad_crl_keeps_the_one_in_force(mdm: MdmDaemon, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    old = crl.read_bytes()
    gone = revoke("sds:gone")
    install(crl, _tls.ca().crl_path.read_bytes())
    wait_until(lambda: handshake_refused(mdm, ctx(gone)), 10, "the revoked SDS refused")
    ok_files = _tls.identity("sds:fine")
    failures = 0
    other_ca = pki.Ca.init(tmp_path / "other-ca")
    for bad, why in (
        (b"not a CRL\n", "holds no PEM CRL"),
        (old, "older than"),  # going back would let sds:gone in again
        (other_ca.crl_path.read_bytes(), "not signed by the CA"),
    ):
        install(crl, bad)
        failures += 1
        wait_until(partial(failures_are, mdm, failures), 10, f"reload refused: {why}")
        assert why in mdm.log_text()
        assert metric(mdm, "meshblock_mdm_tls_crl_last_reload_ok") == 0
        assert handshake_refused(mdm, ctx(gone))
        assert one_heartbeat(mdm, ok_files) == 404
    assert "keeping the one in force" in mdm.log_text()
    # A good one again.
    install(crl, _tls.ca().crl_path.read_bytes())
    wait_until(lambda: metric(mdm, "meshblock_mdm_tls_crl_last_reload_ok") == 1, 10, "reloaded")


def test_sighup_reloads_the_crl_at_once(tmp_path: Path) -> None:
    with started(mdm_with_crl(tmp_path, 3600.0)) as mdm:
        victim = revoke("sds:hup")
        install(tmp_path / "crl.pem", _tls.ca().crl_path.read_bytes())
        assert one_heartbeat(mdm, victim) == 404  # not looked at for an hour
        assert mdm.proc is not None
        mdm.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: handshake_refused(mdm, ctx(victim)), 10, "refused after SIGHUP")
        assert "reloaded (SIGHUP)" in mdm.log_text()
        assert mdm.running()


def test_the_metrics_say_when_the_crl_expires(mdm: MdmDaemon) -> None:
    status, body = mdm.api()("GET", "/metrics")
    assert status == 200
    text = str(body)
    for name in (
        "meshblock_mdm_tls_crl_next_update_timestamp_seconds",
        "meshblock_mdm_tls_crl_reloads_total",
        "meshblock_mdm_tls_crl_reload_failures_total",
        "meshblock_mdm_tls_crl_last_reload_ok",
    ):
        assert f"\n{name} " in text, name
    expiry = pki.load_crl(_tls.ca().crl_path).next_update_utc
    assert expiry is not None
    got = metric(mdm, "meshblock_mdm_tls_crl_next_update_timestamp_seconds")
    assert got is not None and abs(got - expiry.timestamp()) < 3600 * 24 * 31
