"""The MDM's API over HTTPS with client certificates (``[tls]`` in mdm.toml, opt-in).

A real MDM process serves HTTPS with a certificate from ``meshctl ca``. With
``client_certs = "required"`` a client without a certificate the cluster CA signed (none,
one of another CA, a revoked one) is refused in the handshake, before any request; a
CA-signed client is then authorised on its certificate's identity (an admin's needs no
token: tests/test_mdm_identity.py has the rest). With ``"optional"``, ``meshctl`` works
over HTTPS with a token alone, trusting the cluster CA.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _mdm import MdmDaemon
from _process import started
from meshblock import pki

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]


class TlsMdm(MdmDaemon):
    """The MDM with ``[tls]``; ready when ``GET /health`` over HTTPS answers 200."""

    def __init__(self, workdir: Path, tls: dict[str, Any], probe: ssl.SSLContext) -> None:
        super().__init__(workdir, f"sqlite+aiosqlite:///{workdir}/mdm.db", {"tls": tls})
        self.probe = probe

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait(lambda: get(self, "/health", self.probe)[0] == 200, timeout, "HTTPS /health")


def get(
    mdm: MdmDaemon, path: str, ctx: ssl.SSLContext, token: str | None = None
) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection(mdm.host, mdm.port, context=ctx, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def raw_health(mdm: MdmDaemon, ctx: ssl.SSLContext) -> bytes | Exception:
    """What one connection gets for ``GET /health``: the answer's bytes, or the error.

    The request goes out right after the client's side of the handshake; in TLS 1.3
    the server checks the client's certificate last, so a refusal shows here as the
    connection closed without an answer (or an alert).
    """
    try:
        with (
            socket.create_connection((mdm.host, mdm.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=mdm.host) as tls,
        ):
            tls.sendall(b"GET /health HTTP/1.1\r\nHost: mdm\r\nConnection: close\r\n\r\n")
            return tls.recv(64)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc


def assert_refused(mdm: MdmDaemon, ctx: ssl.SSLContext) -> None:
    got = raw_health(mdm, ctx)
    assert isinstance(got, Exception) or got == b"", f"the MDM answered: {got!r}"


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cluster CA with the MDM's and an admin's identities, a revoked admin, and
    an admin of another CA."""
    root = tmp_path_factory.mktemp("pki")
    ca = pki.Ca.init(root / "ca")
    other = pki.Ca.init(root / "other", common_name="another cluster's CA")
    ca_cert = ca.load()[0]

    def files(the_ca: pki.Ca, identity: str, **kw: Any) -> dict[str, Path]:
        ident = pki.Identity.parse(identity)
        cert, key = the_ca.issue(ident, **kw)
        return pki.write_identity(root / identity.replace(":", "-"), ident, cert, key, ca_cert)

    out: dict[str, Any] = {
        "ca": ca,
        "mdm": files(ca, "mdm:mdm1", sans=["127.0.0.1"]),
        "alice": files(ca, "admin:alice"),
        "bob": files(ca, "admin:bob"),
        "mallory": files(other, "admin:mallory"),
    }
    ca.revoke(pki.load_cert(out["bob"]["cert"]).serial_number)
    return out


def client(pkis: dict[str, Any], who: str | None) -> ssl.SSLContext:
    ca: pki.Ca = pkis["ca"]
    if who is None:
        return pki.client_context(ca.cert_path)
    return pki.client_context(ca.cert_path, cert=pkis[who]["cert"], key=pkis[who]["key"])


def tls_settings(pkis: dict[str, Any], client_certs: str) -> dict[str, Any]:
    ca: pki.Ca = pkis["ca"]
    return {
        "cert": str(pkis["mdm"]["cert"]),
        "key": str(pkis["mdm"]["key"]),
        "ca": str(ca.cert_path),
        "crl": str(ca.crl_path),
        "client_certs": client_certs,
    }


@pytest.fixture(scope="module")
def required_mdm(
    pkis: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsMdm]:
    mdm = TlsMdm(
        tmp_path_factory.mktemp("mdm-required"),
        tls_settings(pkis, "required"),
        client(pkis, "alice"),
    )
    with started(mdm):
        yield mdm


def test_a_ca_signed_admin_is_served_on_its_certificate(
    required_mdm: TlsMdm, pkis: dict[str, Any]
) -> None:
    """The certificate's identity decides (meshblock.mdm.authz): an admin's certificate
    is served with its token or without one."""
    alice = client(pkis, "alice")
    status, body = get(required_mdm, "/api/v1/protection-domains", alice, required_mdm.admin_token)
    assert (status, body) == (200, {"protection_domains": []})
    status, body = get(required_mdm, "/api/v1/protection-domains", alice)
    assert (status, body) == (200, {"protection_domains": []})


@pytest.mark.parametrize("who", [None, "mallory", "bob"], ids=["none", "another-ca", "revoked"])
def test_a_client_without_a_valid_ca_signed_certificate_is_refused(
    required_mdm: TlsMdm, pkis: dict[str, Any], who: str | None
) -> None:
    """Refused in the handshake, before any request: not even the open /health answers.
    (Which check refuses each is tests/test_pki.py's business: the same context.)"""
    served = raw_health(required_mdm, client(pkis, "alice"))
    assert isinstance(served, bytes) and served.startswith(b"HTTP/1.1 200"), served
    assert_refused(required_mdm, client(pkis, who))
    with pytest.raises((ssl.SSLError, http.client.HTTPException, ConnectionError)):
        get(required_mdm, "/health", client(pkis, who), required_mdm.admin_token)


def test_plain_http_gets_no_answer(required_mdm: TlsMdm) -> None:
    conn = http.client.HTTPConnection(required_mdm.host, required_mdm.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/health")
            conn.getresponse()
    finally:
        conn.close()


def meshctl(
    mdm: TlsMdm, *argv: str, ca: Path | None, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHCTL_MDM": mdm.url, "MESHCTL_TOKEN": mdm.admin_token, **extra}
    env.pop("SSL_CERT_FILE", None)
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    return subprocess.run(
        [sys.executable, "-m", "meshblock.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_meshctl_presents_an_admin_certificate_and_trusts_the_cluster_ca(
    required_mdm: TlsMdm, pkis: dict[str, Any]
) -> None:
    """MESHCTL_TLS_CA / MESHCTL_TLS_CERT / MESHCTL_TLS_KEY (docs/meshctl.md)."""
    ca: pki.Ca = pkis["ca"]

    def as_(who: str | None) -> subprocess.CompletedProcess[str]:
        certs = {"MESHCTL_TLS_CA": str(ca.cert_path)}
        if who is not None:
            certs |= {
                "MESHCTL_TLS_CERT": str(pkis[who]["cert"]),
                "MESHCTL_TLS_KEY": str(pkis[who]["key"]),
            }
        return meshctl(required_mdm, "--json", "pd", "list", ca=None, **certs)

    alice = as_("alice")
    assert alice.returncode == 0, alice.stderr
    assert json.loads(alice.stdout) == {"protection_domains": []}
    for who in (None, "bob"):  # no certificate; a revoked one
        refused = as_(who)
        assert refused.returncode == 3, refused.stderr
        assert "cannot reach the MDM" in refused.stderr


def test_with_optional_client_certificates_meshctl_works_over_https_with_a_token(
    pkis: dict[str, Any], tmp_path: Path
) -> None:
    ca: pki.Ca = pkis["ca"]
    mdm = TlsMdm(tmp_path, tls_settings(pkis, "optional"), client(pkis, None))
    with started(mdm):
        created = meshctl(mdm, "pd", "create", "pd1", ca=ca.cert_path)
        assert created.returncode == 0, created.stderr
        listed = meshctl(mdm, "--json", "pd", "list", ca=ca.cert_path)
        docs = json.loads(listed.stdout)["protection_domains"]
        assert [pd["name"] for pd in docs] == ["pd1"]
        # Without the cluster CA, meshctl does not trust the MDM's certificate.
        untrusted = meshctl(mdm, "pd", "list", ca=None)
        assert untrusted.returncode == 3
        assert "certificate verify failed" in untrusted.stderr
        # A presented certificate is still checked: another CA's is refused.
        assert_refused(mdm, client(pkis, "mallory"))
        assert get(mdm, "/health", client(pkis, None))[0] == 200


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"cert": "X", "key": "X"}, "tls.cert needs tls.key and tls.ca"),
        ({"key": "X"}, "tls.key, tls.ca and tls.crl need tls.cert"),
        ({"client_certs": "sometimes"}, "tls.client_certs must be required or optional"),
        ({"cert": "/nonexistent.crt", "key": "{key}", "ca": "{ca}"}, "does not exist"),
        ({"mode": 0o644}, "every user may read it"),
    ],
)
def test_a_bad_tls_section_is_a_configuration_error(
    pkis: dict[str, Any], tmp_path: Path, tls: dict[str, Any], error: str
) -> None:
    settings = tls_settings(pkis, "required")
    if "mode" in tls:
        key = tmp_path / "mdm.key"
        key.write_bytes(Path(settings["key"]).read_bytes())
        key.chmod(tls.pop("mode"))
        settings["key"] = str(key)
    else:
        settings = {k: v.format(**settings) for k, v in tls.items()}
    mdm = MdmDaemon(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/mdm.db", {"tls": settings})
    result = subprocess.run(
        [sys.executable, "-m", "meshblock.mdm", "--config", str(mdm.config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert error in result.stderr
