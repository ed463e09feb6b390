"""NBD over TLS (NBD_OPT_STARTTLS) and the allow list of a TCP listener; the unix
socket listener's mode, group and peer credentials.

The server runs in a thread of the test process (as in test_nbd_server) with its
TCP listener requiring TLS with an SDC's certificate from the test CA, and client
certificates required, as the SDC builds it from its ``[nbd]`` and ``[tls]``; a second
listener of the same server admits TLS 1.2 too (``[nbd] tls_min_version = "1.2"``).
The clients: nbdinfo (``nbds://``), qemu-io (a ``tls-creds-x509`` object and
``--image-opts``; with ``priority=`` it offers what Debian 12's nbd-client 3.24 does),
both GnuTLS, and a hand-written client for what they would not do (options before
STARTTLS, a second STARTTLS, TLS 1.2 with CBC suites only).
The allow list is checked from other loopback addresses (127.0.0.2, 127.0.0.3).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import shutil
import socket
import ssl
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

import _tls
from _wait import wait_until
from meshblock import pki
from meshblock.config import from_mapping
from meshblock.nbd.access import AccessRule, ListenPolicy
from meshblock.nbd.protocol import Opt, Rep
from meshblock.nbd.server import Export
from meshblock.nbd.tls import TLS12_CIPHERS
from meshblock.sdc.config import SdcConfig, nbd_tcp_policy
from test_nbd_fuzz import Client
from test_nbd_server import MemoryBackend, ServerThread, run, tool

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

MiB = 1024 * 1024
SIZE = 8 * MiB
SERVER_ID = "sdc:nbd-tls-test"
CLIENT_ID = "admin:nbd-tls-client"
LOGGER = "meshblock.nbd.server"
#: 127.0.0.1 may open every export; 127.0.0.3 only "disk"; nobody else may connect.
ALLOW = ("127.0.0.1/32", "127.0.0.3/32 disk")
#: The GnuTLS priority Debian 12's nbd-client 3.24 fixes: TLS 1.2 only.
NBD_CLIENT_PRIORITY = "NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2"
#: TLS 1.2 suites the listener must refuse: CBC (with SHA-2, and SHA-1 MACs).
CBC_SUITES = (
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-ECDSA-AES256-SHA"
)
REVOKED_12 = "admin:nbd-tls12-revoked"


def gnutls_dir(root: Path, client: str | None) -> Path:
    """A directory in the layout of GnuTLS clients (libnbd's ``tls-certificates``,
    qemu's ``tls-creds-x509 dir=``): ``ca-cert.pem`` and, with ``client``, that
    identity's ``client-cert.pem`` and ``client-key.pem``."""
    out = root / (client or "no-cert").replace(":", "-")
    out.mkdir()
    shutil.copy(_tls.ca().cert_path, out / "ca-cert.pem")
    if client is not None:
        files = _tls.identity(client)
        shutil.copy(files.cert, out / "client-cert.pem")
        shutil.copy(files.key, out / "client-key.pem")
    return out


def sdc_policy(**nbd: object) -> ListenPolicy:
    """The TCP listener's policy as the SDC builds it from ``[nbd]`` (TLS on, and the
    settings given) and ``[tls]`` (an SDC's identity of the test CA, the CRL)."""
    config = from_mapping(
        SdcConfig,
        {
            "mdm": {"cluster_secret": "s"},
            "tls": _tls.component_identity(SERVER_ID).settings(),
            "nbd": {"tcp": True, "tls": True, **nbd},
        },
    )
    return nbd_tcp_policy(config)


@pytest.fixture(scope="module")
def nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    policy = sdc_policy(tcp_allow=list(ALLOW))  # tls_min_version: the default
    srv = ServerThread(tmp_path_factory.mktemp("nbdtls"), handshake_timeout=5.0, tcp_policy=policy)
    srv.start()
    srv.add(Export("disk", MemoryBackend(SIZE), SIZE))
    srv.add(Export("secret", MemoryBackend(SIZE, fill=0x5E), SIZE, read_only=True))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gnutls_dir(tmp_path_factory.mktemp("gnutls"), CLIENT_ID)


def qemu_io_tls(
    port: int,
    export: str,
    certs: Path,
    *commands: str,
    read_only: bool = False,
    priority: str = "",
    check: bool = True,
) -> str:
    """qemu-io on ``export`` at 127.0.0.1:``port`` over TLS with the GnuTLS
    directory ``certs``: a tls-creds-x509 object (with the GnuTLS ``priority`` given)
    and --image-opts (qemu-io 7.2 has no ``nbds://`` URI). With ``check``, it must
    succeed; without, it must fail."""
    opts = (
        f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=127.0.0.1,"
        f"file.server.port={port},file.export={export},file.tls-creds=tls0"
    )
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"
    args = [tool("qemu-io"), "--object", creds + (f",priority={priority}" if priority else "")]
    args += ["--image-opts", *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    proc = run(*args, opts, check=check)
    out = proc.stdout + proc.stderr
    if check:
        assert "failed" not in out.lower(), out
    else:
        assert proc.returncode != 0 and "failed" in out.lower(), out
    return out


def nbds(nbd: ServerThread, export: str, certs: Path) -> str:
    return f"nbds://127.0.0.1:{nbd.port}/{export}?tls-certificates={certs}"


def test_nbdinfo_over_tls_lists_and_opens(nbd: ServerThread, certs: Path) -> None:
    out = run(tool("nbdinfo"), "--list", "--json", nbds(nbd, "", certs)).stdout
    assert {e["export-name"] for e in json.loads(out)["exports"]} == {"disk", "secret"}
    info = json.loads(run(tool("nbdinfo"), "--json", nbds(nbd, "secret", certs)).stdout)
    (e,) = info["exports"]
    assert e["export-size"] == SIZE and e["is_read_only"] is True
    assert info["TLS"] is True


def test_qemu_io_over_tls(nbd: ServerThread, certs: Path) -> None:
    qemu_io_tls(nbd.port, "disk", certs, "write -P 0x3c 4097 65536")
    backend = nbd.server.exports["disk"].backend
    assert isinstance(backend, MemoryBackend)
    assert backend.data[4097 : 4097 + 65536] == b"\x3c" * 65536
    qemu_io_tls(nbd.port, "disk", certs, "read -P 0x3c 4097 65536", read_only=True)


def test_plain_nbd_is_refused_with_tls_reqd(
    nbd: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    # A real client without TLS gets nothing.
    plain = run(tool("nbdinfo"), "--list", f"nbd://127.0.0.1:{nbd.port}", check=False)
    assert plain.returncode != 0
    assert "disk" not in plain.stdout and "secret" not in plain.stdout
    # Every option but STARTTLS and ABORT before TLS: NBD_REP_ERR_TLS_REQD.
    c = Client(nbd.port)
    c.greeting()
    c.option(Opt.LIST)
    opt, rep, _ = c.reply()
    assert (opt, rep) == (Opt.LIST, Rep.ERR_TLS_REQD)
    go = struct.pack(">I", 4) + b"disk" + b"\x00\x00"
    for option in (Opt.GO, Opt.INFO):
        c.option(option, go)
        assert c.reply()[:2] == (option, Rep.ERR_TLS_REQD)
    c.option(Opt.STRUCTURED_REPLY)
    assert c.reply()[:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_TLS_REQD)
    # NBD_OPT_EXPORT_NAME has no error reply: the connection is dropped.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c.option(Opt.EXPORT_NAME, b"disk")
        assert c.closed_by_server()
    assert "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS" in caplog.text
    c.close()


def starttls(
    c: Client, client: str | None = CLIENT_ID, context: ssl.SSLContext | None = None
) -> None:
    """NBD_OPT_STARTTLS, then the TLS handshake on the client's socket (with
    ``context``, else TLS 1.3 as ``client``)."""
    c.option(Opt.STARTTLS)
    assert c.reply()[:2] == (Opt.STARTTLS, Rep.ACK)
    context = context or _tls.context(client)
    c.sock = context.wrap_socket(c.sock, server_hostname="127.0.0.1")


def tls12(client: str | None = CLIENT_ID, ciphers: str = "") -> ssl.SSLContext:
    """A client context that offers TLS 1.2 only (with ``ciphers``: those suites)."""
    context = _tls.context(client)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def listed(c: Client) -> set[str]:
    c.option(Opt.LIST)
    names: set[str] = set()
    while True:
        _, rep, data = c.reply()
        if rep == Rep.ACK:
            return names
        assert rep == Rep.SERVER, rep
        (n,) = struct.unpack(">I", data[:4])
        names.add(data[4 : 4 + n].decode())


def test_hand_client_over_tls(nbd: ServerThread) -> None:
    c = Client(nbd.port)
    c.greeting()
    starttls(c)
    c.option(Opt.STARTTLS)
    assert c.reply()[:2] == (Opt.STARTTLS, Rep.ERR_INVALID)
    assert listed(c) == {"disk", "secret"}
    assert c.go("secret") == (SIZE, nbd.server.exports["secret"].flags)
    assert c.read(0, 4096) == b"\x5e" * 4096
    conn = next(x for x in list(nbd.server.connections) if x.tls and x.export is not None)
    assert str(conn.identity) == CLIENT_ID
    c.close()


def test_client_without_certificate_is_refused(
    nbd: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    no_cert = gnutls_dir(tmp_path, None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        proc = run(tool("nbdinfo"), "--list", nbds(nbd, "", no_cert), check=False)
        assert proc.returncode != 0
        assert "disk" not in proc.stdout
        wait_until(lambda: "TLS handshake failed" in caplog.text, 10, "the refusal logged")
    c = Client(nbd.port)
    c.greeting()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        starttls(c, None)
        listed(c)  # TLS 1.3: the server's refusal arrives after the client's handshake
    c.close()


def test_allow_list_refuses_other_addresses(
    nbd: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    before = nbd.server.refused_connections
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c = Client(nbd.port, source="127.0.0.2")
        # Closed before the greeting: not one byte of the protocol.
        with pytest.raises((ConnectionError, OSError)):
            c.recv(1)
        c.close()
    assert "refusing NBD connection from 127.0.0.2" in caplog.text
    assert nbd.server.refused_connections == before + 1


def test_allow_list_rule_limits_exports(nbd: ServerThread) -> None:
    c = Client(nbd.port, source="127.0.0.3")
    c.greeting()
    starttls(c)
    assert listed(c) == {"disk"}  # "secret" is not even listed
    go = struct.pack(">I", 6) + b"secret" + b"\x00\x00"
    c.option(Opt.GO, go)
    opt, rep, msg = c.reply()
    assert (opt, rep) == (Opt.GO, Rep.ERR_UNKNOWN) and b"secret" in msg
    assert c.go("disk")[0] == SIZE
    c.close()


def test_access_rules_parse() -> None:
    rule = AccessRule.parse("10.1.0.0/16 db-* web1")
    assert rule.allows("db-7") and rule.allows("web1") and not rule.allows("web2")
    assert AccessRule.parse("::1/128").allows("anything")
    for bad in ("", "10.1.0.1/16", "nonsense", "10.0.0.0/33 x"):
        with pytest.raises(ValueError):
            AccessRule.parse(bad)


def test_unix_socket_mode_group_and_peer_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The unix listener's file is mode 0660 of the group given, whatever the umask,
    and each connection logs the peer's pid, uid and gid (SO_PEERCRED)."""
    gid = grp.getgrnam("nogroup").gr_gid
    assert gid != os.getgid()
    srv = ServerThread(tmp_path)
    srv.start()
    path = tmp_path / "g.sock"
    try:
        srv.call(srv.server.listen_unix(str(path), gid=gid))
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid)
        srv.add(Export("disk", MemoryBackend(SIZE), SIZE))
        with caplog.at_level(logging.INFO, logger=LOGGER):
            out = run(tool("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={path}")
            assert {e["export-name"] for e in json.loads(out.stdout)["exports"]} == {"disk"}
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(path))
            me = f"unix(pid={os.getpid()},uid={os.getuid()},gid={os.getgid()})"
            wait_until(lambda: f"NBD connection from {me}" in caplog.text, 10, "the peer logged")
            c.close()
        assert "NBD connection from unix(pid=" in caplog.text.replace(me, "")  # nbdinfo's
    finally:
        srv.stop()
    assert not path.exists()


def test_revoked_client_certificate_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``[tls] crl`` applies to NBD clients: a certificate of the CA that the CRL
    revokes fails the handshake, while another one of the same CA gets in."""
    victim = "admin:nbd-tls-revoked"
    _tls.ca().revoke(_tls.fresh(victim).serial())
    files = _tls.component_identity(SERVER_ID)
    context = pki.server_context(files.cert, files.key, files.ca, crl=files.crl)
    srv = ServerThread(tmp_path, tcp_policy=ListenPolicy(tls=context))
    srv.start()
    try:
        srv.add(Export("disk", MemoryBackend(SIZE), SIZE))
        uri = f"nbds://127.0.0.1:{srv.port}/?tls-certificates="
        good = run(tool("nbdinfo"), "--list", uri + str(gnutls_dir(tmp_path, CLIENT_ID)))
        assert 'export="disk"' in good.stdout
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            bad = run(
                tool("nbdinfo"), "--list", uri + str(gnutls_dir(tmp_path, victim)), check=False
            )
            assert bad.returncode != 0 and "disk" not in bad.stdout
            wait_until(lambda: "revoked" in caplog.text, 10, "the revocation logged")
    finally:
        srv.stop()


# -- [nbd] tls_min_version: TLS 1.2 for Debian 12's nbd-client ----------------------------


@pytest.fixture(scope="module")
def tls12_port(nbd: ServerThread) -> int:
    """A second TCP listener of the module's server, with ``tls_min_version = "1.2"``
    (127.0.0.1 may open every export); ``REVOKED_12``'s certificate is revoked first."""
    _tls.ca().revoke(_tls.fresh(REVOKED_12).serial())
    policy = sdc_policy(tls_min_version="1.2", tcp_allow=["127.0.0.1/32"])
    return nbd.call(nbd.server.listen_tcp("127.0.0.1", 0, policy))[0][1]


def test_tls12_is_refused_by_default(
    nbd: ServerThread, certs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The default listener is TLS 1.3 only: a client offering only TLS 1.2 (Python's
    ssl, and GnuTLS with nbd-client's priority) fails the handshake."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c = Client(nbd.port)
        c.greeting()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            starttls(c, context=tls12())
        c.close()
        wait_until(lambda: "unsupported protocol" in caplog.text, 10, "the refusal logged")
    qemu_io_tls(nbd.port, "disk", certs, "read 0 4k", priority=NBD_CLIENT_PRIORITY, check=False)


def test_tls12_admitted_with_the_setting(
    nbd: ServerThread, tls12_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``tls_min_version = "1.2"`` a TLS 1.2 client with its certificate
    negotiates an ECDHE AEAD suite, then NBD as over TLS 1.3; TLS 1.3 still works."""
    with caplog.at_level(logging.INFO, logger=LOGGER):
        c = Client(tls12_port)
        c.greeting()
        starttls(c, context=tls12())
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() == "TLSv1.2"
        cipher = c.sock.cipher()
        assert cipher is not None and cipher[0] in TLS12_CIPHERS, cipher
        assert listed(c) == {"disk", "secret"}
        assert c.go("secret") == (SIZE, nbd.server.exports["secret"].flags)
        assert c.read(0, 4096) == b"\x5e" * 4096
        c.close()
        assert f"TLS TLSv1.2, client {CLIENT_ID}" in caplog.text
    c = Client(tls12_port)
    c.greeting()
    starttls(c)
    assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() == "TLSv1.3"
    assert listed(c) == {"disk", "secret"}
    c.close()


def test_nbd_clients_gnutls_priority_with_the_setting(tls12_port: int, certs: Path) -> None:
    """GnuTLS offering what Debian 12's nbd-client 3.24 offers (qemu-io's
    tls-creds-x509 ``priority``) writes and reads back over the TLS 1.2 listener."""
    args = (tls12_port, "disk", certs)
    qemu_io_tls(*args, "write -P 0x12 8192 65536", priority=NBD_CLIENT_PRIORITY)
    qemu_io_tls(*args, "read -P 0x12 8192 65536", priority=NBD_CLIENT_PRIORITY, read_only=True)


@pytest.mark.parametrize(
    ("client", "ciphers", "logged"),
    [
        (CLIENT_ID, CBC_SUITES, "no shared cipher"),
        (None, "", "peer did not return a certificate"),
        (REVOKED_12, "", "certificate revoked"),
    ],
    ids=["cbc-suites", "no-certificate", "revoked"],
)
def test_tls12_refuses_cbc_and_unchecked_clients(
    tls12_port: int,
    caplog: pytest.LogCaptureFixture,
    client: str | None,
    ciphers: str,
    logged: str,
) -> None:
    """On the TLS 1.2 listener: a client offering only CBC suites, one without a
    certificate and one whose certificate the CRL revokes fail the handshake."""
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        c = Client(tls12_port)
        c.greeting()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            starttls(c, context=tls12(client, ciphers))
        c.close()
        wait_until(lambda: logged in caplog.text, 10, f"{logged!r} logged")


def test_tls12_context_offers_only_ecdhe_aead_suites() -> None:
    """What the TLS 1.2 context would negotiate: ECDHE key exchange and an AEAD
    cipher, nothing else; the default context has no TLS 1.2 at all."""
    policy = sdc_policy(tls_min_version="1.2")
    assert policy.tls is not None and policy.tls.minimum_version == ssl.TLSVersion.TLSv1_2
    suites = [c for c in policy.tls.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert sorted(c["name"] for c in suites) == sorted(TLS12_CIPHERS)
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in suites), suites
    default = sdc_policy().tls
    assert default is not None and default.minimum_version == ssl.TLSVersion.TLSv1_3
