"""Certificates from ``meshctl ca`` work over real sockets and with GnuTLS (docs/security.md).

The unit tests (tests/test_pki.py) handshake in memory; here the same contexts meet over
loopback TCP, and the certificates are used by the GnuTLS clients the issue names
(qemu-nbd serving NBD over TLS, nbdinfo ``nbds://``), with both sides authenticated:
P-256 was chosen so that these accept them. The certificates are made by running the
real ``meshctl ca`` as a process.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from _ports import free_port
from _process import ServerProcess
from meshblock import pki

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


def meshctl(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshblock.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def issue(ca: Path, identity: str, out: Path, *extra: str) -> tuple[Path, Path]:
    result = meshctl("ca", "issue", identity, "--ca", ca, "--out", out, *extra)
    assert result.returncode == 0, result.stderr
    stem = identity.replace(":", "-")
    return out / f"{stem}.crt", out / f"{stem}.key"


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    result = meshctl("ca", "init", tmp_path / "ca")
    assert result.returncode == 0, result.stderr
    return tmp_path / "ca"


def serve_once(ctx: ssl.SSLContext, listener: socket.socket, seen: list[object]) -> None:
    """Accept one connection, handshake, record the client's identity (or the error)."""
    conn, _ = listener.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            seen.append(pki.peer_identity(tls))
            tls.sendall(b"ok")
    except (ssl.SSLError, OSError) as exc:
        seen.append(exc)


def test_components_authenticate_each_other_over_loopback_tcp(ca: Path, tmp_path: Path) -> None:
    cert, key = issue(ca, "sds:sds1", tmp_path / "sds1", "--san", "127.0.0.1")
    sdc_cert, sdc_key = issue(ca, "sdc:guid-1", tmp_path / "sdc")
    server = pki.server_context(cert, key, ca / "ca.crt", crl=ca / "crl.pem")

    def dial() -> tuple[object, object]:
        client = pki.client_context(ca / "ca.crt", cert=sdc_cert, key=sdc_key, crl=ca / "crl.pem")
        seen: list[object] = []
        with socket.create_server(("127.0.0.1", 0)) as listener:
            thread = threading.Thread(target=serve_once, args=(server, listener, seen))
            thread.start()
            try:
                with (
                    socket.create_connection(listener.getsockname(), timeout=10) as raw,
                    client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
                ):
                    got: object = pki.peer_identity(tls) if tls.recv(2) == b"ok" else None
            except (ssl.SSLError, OSError) as exc:
                got = exc
            thread.join(10)
        return seen[0], got

    server_saw, client_saw = dial()
    assert server_saw == pki.Identity(pki.Kind.SDC, "guid-1")
    assert client_saw == pki.Identity(pki.Kind.SDS, "sds1")

    # Revoked with meshctl: the next connection is refused by the server, whose
    # context loads the new CRL.
    assert meshctl("ca", "revoke", sdc_cert, "--ca", ca).returncode == 0
    server = pki.server_context(cert, key, ca / "ca.crt", crl=ca / "crl.pem")
    server_saw, client_saw = dial()
    assert isinstance(server_saw, ssl.SSLError) and "certificate revoked" in str(server_saw)
    assert isinstance(client_saw, ssl.SSLError)


class QemuNbdTls(ServerProcess):
    """qemu-nbd (GnuTLS) serving a raw image over NBD with TLS, client certificates
    required (``verify-peer=on``), from a directory in qemu's naming."""

    name = "qemu-nbd"

    def __init__(self, workdir: Path, creds: Path, image: Path) -> None:
        super().__init__(workdir)
        self.creds, self.image, self.port = creds, image, free_port()

    def start(self) -> None:
        self.spawn_argv(
            [
                "qemu-nbd", "--persistent", "--bind", "127.0.0.1", "--port", str(self.port),
                "--format", "raw", "--tls-creds", "tls0", "--object",
                f"tls-creds-x509,id=tls0,dir={self.creds},endpoint=server,verify-peer=on",
                str(self.image),
            ]
        )  # fmt: skip
        self.wait(self._listening, 20, f"qemu-nbd to listen on port {self.port}")

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True


def gnutls_dir(path: Path, side: str, ca: Path, cert: Path, key: Path) -> Path:
    """The file names qemu and libnbd expect: ca-cert.pem, SIDE-cert.pem, SIDE-key.pem."""
    path.mkdir(mode=0o700)
    shutil.copy(ca, path / "ca-cert.pem")
    shutil.copy(cert, path / f"{side}-cert.pem")
    shutil.copy(key, path / f"{side}-key.pem")
    return path


def test_gnutls_nbd_server_and_client_accept_the_certificates(ca: Path, tmp_path: Path) -> None:
    cert, key = issue(ca, "sdc:guid-1", tmp_path / "sdc", "--san", "127.0.0.1")
    admin_cert, admin_key = issue(ca, "admin:alice", tmp_path / "alice")
    other = tmp_path / "other-ca"
    assert meshctl("ca", "init", other, "--name", "other CA").returncode == 0
    evil_cert, evil_key = issue(other, "admin:mallory", tmp_path / "mallory")

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    server_creds = gnutls_dir(tmp_path / "server-creds", "server", ca / "ca.crt", cert, key)
    good = gnutls_dir(tmp_path / "alice-creds", "client", ca / "ca.crt", admin_cert, admin_key)
    evil = gnutls_dir(tmp_path / "evil-creds", "client", ca / "ca.crt", evil_cert, evil_key)

    server = QemuNbdTls(tmp_path / "qemu-nbd", server_creds, image)
    server.start()
    try:

        def nbdinfo(creds: Path) -> subprocess.CompletedProcess[str]:
            uri = f"nbds://127.0.0.1:{server.port}/?tls-certificates={creds}"
            return subprocess.run(
                ["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60, check=False
            )

        ok = nbdinfo(good)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == str(1 << 20)
        refused = nbdinfo(evil)
        assert refused.returncode != 0
        assert ok.stdout.strip() not in refused.stdout
    finally:
        server.stop()
