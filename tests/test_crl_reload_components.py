"""The SDS, the SDC and MGMT read their CRL again without a restart, as the MDM does
(meshblock.tls.CrlReloader; the MDM's own is tests/test_mdm_crl_reload.py).

Real daemons over real TLS on loopback, each with a CRL file of the test's own:

- the SDS's control port (client certificates optional, checked if sent): a client
  certificate revoked after the SDS started is refused in the handshake once the new
  ``crl.pem`` is in place and the SDS got SIGHUP;
- the SDC's control port: the same, picked up by the polling of ``crl_reload_s``;
- MGMT, whose CRL checks the MDM's certificate: once the MDM's certificate is revoked
  and the new list in place, MGMT's next connection to the MDM is refused (its
  dashboard API answers 502) without MGMT being restarted.

In-process (unit): a list that does not verify is not taken and the one in force stays.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _http import Response, request
from _mdm import MdmDaemon
from _mgmt import MgmtDaemon
from _ports import free_port
from _process import DaemonProcess, started
from _sdc import SdcDaemon
from _sds import POOL, SdsDaemon
from _wait import wait_until
from meshblock import pki
from meshblock.tls import CrlReloader, TlsConfig, crl_reloader, follow_crl

RELOAD_S = 0.2


def install(crl: Path) -> None:
    """The test CA's CRL copied over ``crl`` atomically, as an operator would."""
    tmp = crl.with_suffix(".new")
    shutil.copyfile(_tls.ca().crl_path, tmp)
    os.replace(tmp, crl)


def revoke(files: _tls.Files) -> None:
    # Issued in a later second than the list in force (OpenSSL checks a handshake
    # against the later of two lists of one CA; two of the same second, either) and
    # not in the future: a list issued ahead of the clock is not yet valid, and one
    # test's future list, copied as the next test's list in force, kept that test's
    # revocation out for seconds. A list says it was issued CLOCK_SKEW before it was.
    ca = _tls.ca()
    after = ca.crl().last_update_utc + pki.CLOCK_SKEW + dt.timedelta(seconds=1)
    wait_until(lambda: dt.datetime.now(dt.UTC) >= after, 5, "a new second", interval=0.05)
    ca.revoke(files.serial())


def status_with(host: str, port: int, ctx: ssl.SSLContext) -> int | None:
    """The status of ``GET /health`` made with ``ctx``; None if the handshake refused it."""
    try:
        with (
            socket.create_connection((host, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = tls.recv(64)
    except (ssl.SSLError, ConnectionError):
        return None
    return int(head.split()[1]) if head else None


def client(files: _tls.Files) -> ssl.SSLContext:
    return pki.client_context(files.ca, cert=files.cert, key=files.key)


def own_crl(workdir: Path) -> Path:
    crl = workdir / "crl.pem"
    shutil.copyfile(_tls.ca().crl_path, crl)
    return crl


@pytest.fixture(scope="module")
def mdm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MdmDaemon]:
    workdir = tmp_path_factory.mktemp("crl-mdm")
    with started(MdmDaemon(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", tls=True)) as d:
        d.create_pool("pd1", POOL, 8)
        yield d


def revoked_on_control_port(
    daemon: DaemonProcess, host: str, port: int, crl: Path, nudge: bool
) -> None:
    """A client certificate works on the control port, is revoked, the new list is put
    in place (and SIGHUP sent with ``nudge``): it is refused, others are not."""
    thief = _tls.fresh("admin:crl-thief")
    assert status_with(host, port, client(thief)) == 200
    revoke(thief)
    install(crl)
    if nudge:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: status_with(host, port, client(thief)) is None, 15, "refused")
    assert status_with(host, port, _tls.context(None)) == 200  # no certificate: as before
    assert status_with(host, port, client(_tls.fresh("admin:crl-other"))) == 200
    assert f"reloaded ({'SIGHUP' if nudge else 'the file changed'})" in daemon.log_text()
    daemon.check_alive()


@pytest.mark.cluster
def test_the_sds_reloads_its_crl_on_sighup(mdm: MdmDaemon, tmp_path: Path) -> None:
    crl = own_crl(tmp_path)
    sds = SdsDaemon(tmp_path, "sds-crl", mdm, None)
    text = sds.config_path.read_text().replace(str(_tls.ca().crl_path), str(crl))
    text = text.replace("[tls]\n", "[tls]\ncrl_reload_s = 3600.0\n")  # SIGHUP alone
    sds.config_path.write_text(text)
    with started(sds):
        sds.wait_serving()
        revoked_on_control_port(sds, sds.address, sds.control_port, crl, nudge=True)


class CrlSdc(SdcDaemon):
    """An SDC whose ``[tls] crl`` is its own file, looked at every RELOAD_S."""

    def __init__(self, workdir: Path, mdm: MdmDaemon) -> None:
        self.crl = own_crl(workdir)
        super().__init__(workdir, mdm)

    def write_config(self) -> None:
        super().write_config()
        self.settings["tls"].update({"crl": str(self.crl), "crl_reload_s": RELOAD_S})
        DaemonProcess.write_config(self)


@pytest.mark.cluster
def test_the_sdc_reloads_its_crl_when_the_file_changes(mdm: MdmDaemon, tmp_path: Path) -> None:
    sdc = CrlSdc(tmp_path, mdm)
    with started(sdc):
        revoked_on_control_port(sdc, "127.0.0.1", sdc.control_port, sdc.crl, nudge=False)
        assert "meshblock_sdc_tls_crl_reloads_total 1.0" in sdc.metrics()


@pytest.mark.cluster
def test_mgmt_refuses_a_revoked_mdm_certificate_after_reloading_its_crl(tmp_path: Path) -> None:
    # An MDM of its own address, so that its certificate is this test's alone.
    mdm = MdmDaemon(tmp_path / "mdm", f"sqlite+aiosqlite:///{tmp_path}/mdm.db", tls=True)
    mdm.host = "127.0.0.2"
    mdm.port = free_port(mdm.host)
    mdm.settings["api"] = {"host": mdm.host, "port": mdm.port}
    mdm.write_config()
    crl = own_crl(tmp_path)
    overrides: dict[str, dict[str, Any]] = {
        "mdm": {"url": mdm.url},
        "tls": {"crl": str(crl), "crl_reload_s": RELOAD_S},
    }
    mgmt = MgmtDaemon(tmp_path / "mgmt", f"sqlite+aiosqlite:///{tmp_path}/mgmt.db", overrides)
    mgmt.create_users(viewer=False)
    with started(mgmt):

        def components() -> Response:
            return request(
                "GET", mgmt.url + "/health/api/components", token=mgmt.admin_token, timeout=10
            )

        with started(mdm):
            assert components().status == 200
        revoke(_tls.mdm_identity(mdm.host))
        install(crl)
        wait_until(lambda: "reloaded (the file changed)" in mgmt.log_text(), 15, "reloaded")
        with started(mdm):  # restarted: MGMT's kept-alive connections are gone
            refused = components()
        assert refused.status == 502, refused
        assert "certificate revoked" in refused.body["error"]["message"], refused.body
        mgmt.check_alive()


@pytest.mark.unit
def test_a_list_that_does_not_verify_is_not_taken(tmp_path: Path) -> None:
    """A foreign CA's list: not reloaded, counted, the one in force stays in every
    context that follows the file."""
    crl = own_crl(tmp_path)
    files = _tls.identity("sds:crl-unit")
    tls = TlsConfig(cert=str(files.cert), key=str(files.key), ca=str(files.ca), crl=str(crl))
    reloader = crl_reloader(tls)
    assert isinstance(reloader, CrlReloader) and crl_reloader(tls) is reloader
    ctx = follow_crl(pki.client_context(files.ca, crl=crl), tls)
    other = pki.Ca.init(tmp_path / "other-ca")
    shutil.copyfile(other.crl_path, crl)
    assert not reloader.check()
    assert (reloader.reloads, reloader.reload_failures, reloader.last_reload_ok) == (0, 1, False)
    install(crl)  # the right CA's again
    assert reloader.check() and reloader.last_reload_ok and reloader.reloads == 1
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
