"""The cluster CA and the component identities (meshblock/pki.py, ``meshctl ca``).

Every handshake here is a real TLS 1.3 handshake by OpenSSL between a server and a
client context that :mod:`meshblock.pki` built, run in-process through memory BIOs
(the unit tier opens no socket; tests/test_pki_interop.py does the same over loopback
TCP and with GnuTLS clients). Each refusal is asserted with OpenSSL's own reason, so
that a test refused for the wrong reason does not pass.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from meshblock import pki
from meshblock.cli.__main__ import main
from meshblock.cli.errors import ExitCode

pytestmark = pytest.mark.unit

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Files:
    """An identity's files as a component would hold them."""

    identity: pki.Identity
    cert: Path
    key: Path
    ca: Path
    serial: int


@dataclass
class Cluster:
    ca: pki.Ca
    issue: Callable[..., Files]


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    ca = pki.Ca.init(tmp_path / "ca")

    def issue(identity: str, *, ca_: pki.Ca = ca, **kw: Any) -> Files:
        ident = pki.Identity.parse(identity)
        cert, key = ca_.issue(ident, **kw)
        out = tmp_path / "hosts" / f"{ident.kind}-{ident.name}-{cert.serial_number:x}"
        paths = pki.write_identity(out, ident, cert, key, ca_.load()[0])
        return Files(ident, paths["cert"], paths["key"], paths["ca"], cert.serial_number)

    return Cluster(ca, issue)


def server_ctx(
    files: Files,
    ca: pki.Ca,
    client_certs: pki.ClientCerts = pki.ClientCerts.REQUIRED,
) -> ssl.SSLContext:
    return pki.server_context(
        files.cert, files.key, ca.cert_path, crl=ca.crl_path, client_certs=client_certs
    )


def client_ctx(files: Files | None, ca: pki.Ca) -> ssl.SSLContext:
    if files is None:
        return pki.client_context(ca.cert_path, crl=ca.crl_path)
    return pki.client_context(ca.cert_path, cert=files.cert, key=files.key, crl=ca.crl_path)


@dataclass
class Outcome:
    """What each side of one connection ended with: the peer's identity or an error."""

    server: pki.Identity | Exception | None
    client: pki.Identity | Exception | None
    version: str | None = None
    client_tls: ssl.SSLObject | None = None

    def server_refused(self) -> str:
        assert isinstance(self.server, ssl.SSLError), f"server accepted: {self.server}"
        assert isinstance(self.client, Exception), f"client went on: {self.client}"
        return str(self.server)

    def client_refused(self) -> str:
        assert isinstance(self.client, ssl.SSLError), f"client accepted: {self.client}"
        return str(self.client)


def connect(
    server: ssl.SSLContext,
    client: ssl.SSLContext,
    hostname: str = "127.0.0.1",
    session: ssl.SSLSession | None = None,
) -> Outcome:
    """One TLS connection between two contexts, in memory: handshake, then one message.

    In TLS 1.3 the client's handshake ends before the server has checked the client's
    certificate, so the server, once satisfied, sends ``ok`` and the client's outcome
    is whether it reads it.
    """
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname, session=session)
    result = Outcome(None, None)
    s_done = c_done = False
    for _ in range(20):
        if not c_done and not isinstance(result.client, Exception):
            try:
                cli.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                result.client = exc
        s_in.write(c_out.read())
        if not s_done and not isinstance(result.server, Exception):
            try:
                srv.do_handshake()
                s_done = True
                try:
                    result.server = pki.peer_identity(srv)
                except pki.PkiError as exc:
                    result.server = exc
                srv.write(b"ok")
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                result.server = exc
        c_in.write(s_out.read())
        if c_done and not isinstance(result.client, Exception):
            try:
                if cli.read(2) == b"ok":
                    result.client = pki.peer_identity(cli)
                    result.version = cli.version()
                    result.client_tls = cli
                    break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                result.client = exc
        if isinstance(result.client, Exception) and (s_done or result.server is not None):
            break
    return result


# --- identities ------------------------------------------------------------------


def test_components_of_one_ca_read_each_others_identity(cluster: Cluster) -> None:
    """Mutual TLS 1.3: the server learns the client's identity, the client the server's."""
    sds = cluster.issue("sds:sds1", sans=["127.0.0.1", "sds1.example.net"])
    sdc = cluster.issue("sdc:3f0c9a2e-5d1b-4c7e-9a41-2b7d8e6f1a30")
    out = connect(server_ctx(sds, cluster.ca), client_ctx(sdc, cluster.ca))
    assert out.server == pki.Identity(pki.Kind.SDC, "3f0c9a2e-5d1b-4c7e-9a41-2b7d8e6f1a30")
    assert out.client == pki.Identity(pki.Kind.SDS, "sds1")
    assert out.version == "TLSv1.3"
    # The DNS SAN serves a client's host-name check just as the IP SAN did.
    named = connect(server_ctx(sds, cluster.ca), client_ctx(sdc, cluster.ca), "sds1.example.net")
    assert named.client == pki.Identity(pki.Kind.SDS, "sds1")


def test_the_identity_reads_the_same_from_the_der_and_from_getpeercert(
    cluster: Cluster,
) -> None:
    mdm = cluster.issue("mdm:mdm1", sans=["::1"])
    cert = pki.load_cert(mdm.cert)
    assert pki.identity_of(cert) == pki.Identity(pki.Kind.MDM, "mdm1")
    der = cert.public_bytes(pki.serialization.Encoding.DER)  # type: ignore[attr-defined]
    assert pki.identity_from_der(der) == (pki.Identity(pki.Kind.MDM, "mdm1"))
    peercert = {"subjectAltName": (("URI", "meshblock:mdm:mdm1"), ("IP Address", "::1"))}
    assert pki.identity_from_peercert(peercert) == pki.Identity(pki.Kind.MDM, "mdm1")
    with pytest.raises(pki.PkiError, match="no verified certificate"):
        pki.identity_from_peercert({})


def _cert_with_uris(uris: list[str]) -> x509.Certificate:
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("uris", "error"),
    [
        ([], "no subject alternative names"),
        (["https://example.net/"], "names 0 meshblock identities"),
        (["meshblock:sds:a", "meshblock:sds:b"], "names 2 meshblock identities"),
        (["meshblock:root:x"], "kind must be one of"),
    ],
)
def test_a_certificate_must_name_exactly_one_valid_identity(uris: list[str], error: str) -> None:
    with pytest.raises(pki.PkiError, match=error):
        pki.identity_of(_cert_with_uris(uris))


@pytest.mark.parametrize(
    "text", ["sds", "sds:", "SDS:sds1", "sds:-x", "sds:a/b", "sds:a b", "sdc:" + "x" * 129]
)
def test_malformed_identities_are_refused(text: str) -> None:
    with pytest.raises(pki.InvalidInput):
        pki.Identity.parse(text)


def test_expect_peer_accepts_the_named_identity_or_kind_only(cluster: Cluster) -> None:
    sds2 = cluster.issue("sds:sds2", sans=["127.0.0.1"])
    sds1 = cluster.issue("sds:sds1")
    out = connect(server_ctx(sds2, cluster.ca), client_ctx(sds1, cluster.ca))
    assert out.client_tls is not None
    assert pki.expect_peer(out.client_tls, pki.Identity(pki.Kind.SDS, "sds2")) == sds2.identity
    assert pki.expect_peer(out.client_tls, pki.Kind.SDS) == sds2.identity
    with pytest.raises(pki.PkiError, match="peer is sds:sds2, expected sds:sds1, mdm"):
        pki.expect_peer(out.client_tls, pki.Identity(pki.Kind.SDS, "sds1"), pki.Kind.MDM)


# --- refusals in the handshake ---------------------------------------------------


def test_a_client_certificate_of_another_ca_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    other = pki.Ca.init(tmp_path / "other-ca")
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    intruder = cluster.issue("sdc:evil", ca_=other)
    out = connect(
        server_ctx(server, cluster.ca),
        pki.client_context(cluster.ca.cert_path, cert=intruder.cert, key=intruder.key),
    )
    assert "unable to get local issuer certificate" in out.server_refused()


def test_a_server_certificate_of_another_ca_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    other = pki.Ca.init(tmp_path / "other-ca")
    impostor = cluster.issue("sds:sds1", ca_=other, sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:guid-1")
    out = connect(
        pki.server_context(impostor.cert, impostor.key, other.cert_path),
        client_ctx(sdc, cluster.ca),
    )
    # The impostor sends its CA along (OpenSSL completes the chain from its store).
    assert "self-signed certificate in certificate chain" in out.client_refused()


def test_an_expired_certificate_is_refused(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    expired = cluster.issue("sdc:old", days=1, now=NOW - dt.timedelta(days=2))
    out = connect(server_ctx(server, cluster.ca), client_ctx(expired, cluster.ca))
    assert "certificate has expired" in out.server_refused()


def test_a_revoked_client_certificate_is_refused(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:stolen")
    assert isinstance(
        connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca)).server, pki.Identity
    )
    cluster.ca.revoke(sdc.serial)
    out = connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca))
    assert "certificate revoked" in out.server_refused()


def test_no_session_is_resumed_past_the_certificate_check(cluster: Cluster) -> None:
    """A server issues no session ticket, so a client offering the session of an
    earlier connection gets a full handshake (its certificate checked against the
    CRL again) and one revoked since is refused."""
    server = server_ctx(cluster.issue("sds:sds1", sans=["127.0.0.1"]), cluster.ca)
    sdc = cluster.issue("sdc:stolen")
    client = client_ctx(sdc, cluster.ca)
    first = connect(server, client)
    assert first.client_tls is not None and isinstance(first.server, pki.Identity)
    session = first.client_tls.session
    assert session is not None and not session.has_ticket
    again = connect(server, client, session=session)
    assert again.client_tls is not None and not again.client_tls.session_reused
    cluster.ca.revoke(sdc.serial)
    server.load_verify_locations(cafile=str(cluster.ca.crl_path))  # as CrlReloader does
    refused = connect(server, client, session=session)
    assert "certificate revoked" in refused.server_refused()


def test_each_crl_is_dated_after_the_one_it_replaces(tmp_path: Path) -> None:
    """A context holding two CRLs checks against the one with the later lastUpdate and,
    between two of the same second, may keep either: a revocation signed within the
    second of the list before it must still be dated later, or a server that loads
    it in place (as CrlReloader does) may go on accepting the revoked client."""
    accepted = []
    for i in range(12):
        ca = pki.Ca.init(tmp_path / f"ca{i}")
        ca_cert = ca.load()[0]
        out = tmp_path / f"hosts{i}"
        cert, key = ca.issue(pki.Identity.parse("sds:sds1"), sans=["127.0.0.1"])
        srv = pki.write_identity(out, pki.Identity.parse("sds:sds1"), cert, key, ca_cert)
        cert, key = ca.issue(pki.Identity.parse("sdc:stolen"))
        cli = pki.write_identity(out, pki.Identity.parse("sdc:stolen"), cert, key, ca_cert)
        server = pki.server_context(srv["cert"], srv["key"], ca.cert_path, crl=ca.crl_path)
        client = pki.client_context(ca.cert_path, cert=cli["cert"], key=cli["key"], crl=ca.crl_path)
        before = ca.crl()
        ca.revoke(cert.serial_number, now=before.last_update_utc + pki.CLOCK_SKEW)
        assert ca.crl().last_update_utc > before.last_update_utc
        server.load_verify_locations(cafile=str(ca.crl_path))
        if isinstance(connect(server, client).server, pki.Identity):
            accepted.append(i)
    assert accepted == [], f"revoked client accepted by servers {accepted}"


def test_a_burst_of_crls_is_never_dated_in_the_future(tmp_path: Path) -> None:
    """Each CRL is dated a second after the one before, but never after its signing
    time: past the 5-minute backdate (over 300 signings in a burst) lists share a
    second rather than come from the future, which every handshake would refuse as
    not yet valid."""
    ca = pki.Ca.init(tmp_path / "ca")
    now = ca.crl().last_update_utc + pki.CLOCK_SKEW
    for _ in range(int(pki.CLOCK_SKEW.total_seconds()) + 20):
        ca.resign_crl(now=now)
    crl = ca.crl()
    assert crl.last_update_utc <= now, crl.last_update_utc - now
    assert crl.last_update_utc == now


def test_a_revoked_server_certificate_is_refused(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:guid-1")
    cluster.ca.revoke(server.serial)
    out = connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca))
    assert "certificate revoked" in out.client_refused()


def test_a_server_only_certificate_is_refused_as_a_client(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    server_only = cluster.issue("mgmt:mgmt1", usage=pki.Usage.SERVER)
    out = connect(server_ctx(server, cluster.ca), client_ctx(server_only, cluster.ca))
    assert "unsuitable certificate purpose" in out.server_refused()


def test_an_admin_certificate_is_refused_as_a_server(cluster: Cluster) -> None:
    admin = cluster.issue("admin:alice", sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:guid-1")
    assert pki.usages_of(pki.load_cert(admin.cert)) == pki.Usage.CLIENT
    out = connect(server_ctx(admin, cluster.ca), client_ctx(sdc, cluster.ca))
    assert "unsuitable certificate purpose" in out.client_refused()


def test_a_client_without_a_certificate_is_refused_unless_certificates_are_optional(
    cluster: Cluster,
) -> None:
    server = cluster.issue("mdm:mdm1", sans=["127.0.0.1"])
    out = connect(server_ctx(server, cluster.ca), client_ctx(None, cluster.ca))
    assert "peer did not return a certificate" in out.server_refused()
    # The MDM's API: operators come with a token instead, and have no identity.
    optional = connect(
        server_ctx(server, cluster.ca, pki.ClientCerts.OPTIONAL), client_ctx(None, cluster.ca)
    )
    assert isinstance(optional.server, pki.PkiError)
    assert optional.client == pki.Identity(pki.Kind.MDM, "mdm1")


def test_the_client_checks_the_host_name_it_dialled(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["10.0.0.11", "sds1.example.net"])
    sdc = cluster.issue("sdc:guid-1")
    out = connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca), "sds2.example.net")
    assert "Hostname mismatch" in out.client_refused()
    out = connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca), "10.0.0.12")
    assert "IP address mismatch" in out.client_refused()


def test_tls_1_2_is_refused(cluster: Cluster) -> None:
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:guid-1")
    old = client_ctx(sdc, cluster.ca)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_2
    out = connect(server_ctx(server, cluster.ca), old)
    assert "unsupported protocol" in out.server_refused()


# --- revocation outside a handshake ----------------------------------------------


def test_check_not_revoked_trusts_only_a_current_crl_of_its_ca(
    cluster: Cluster, tmp_path: Path
) -> None:
    sdc = cluster.issue("sdc:guid-1")
    cert = pki.load_cert(sdc.cert)
    ca_cert, ca_key = cluster.ca.load()
    pki.check_not_revoked(cert, ca_cert, cluster.ca.crl())
    cluster.ca.revoke(sdc.serial)
    with pytest.raises(pki.PkiError, match=f"certificate {sdc.serial:x} .sdc:guid-1. is revoked"):
        pki.check_not_revoked(cert, ca_cert, cluster.ca.crl())
    # An empty list from someone else, or an old one from the CA, says nothing.
    other_cert, other_key = pki.Ca.init(tmp_path / "other", common_name="other CA").load()
    forged = pki.make_crl(ca_cert, other_key)
    with pytest.raises(pki.PkiError, match="signature is not the CA's"):
        pki.check_not_revoked(cert, ca_cert, forged)
    with pytest.raises(pki.PkiError, match="not issued by this CA"):
        pki.check_not_revoked(cert, ca_cert, pki.make_crl(other_cert, other_key))
    stale = pki.make_crl(ca_cert, ca_key, days=1, now=NOW - dt.timedelta(days=2))
    with pytest.raises(pki.PkiError, match="CRL has expired"):
        pki.check_not_revoked(cert, ca_cert, stale)


def test_an_expired_crl_refuses_every_peer_in_the_handshake(cluster: Cluster) -> None:
    """Fail closed: past its next update a CRL cannot vouch for anyone."""
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    sdc = cluster.issue("sdc:guid-1")
    ca_cert, ca_key = cluster.ca.load()
    stale = pki.make_crl(ca_cert, ca_key, number=9, days=1, now=NOW - dt.timedelta(days=2))
    pki.save_crl(cluster.ca.crl_path, stale)
    out = connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca))
    assert "CRL has expired" in out.client_refused()
    cluster.ca.resign_crl()
    assert pki.crl_number(cluster.ca.crl()) == 10
    assert connect(server_ctx(server, cluster.ca), client_ctx(sdc, cluster.ca)).server == (
        sdc.identity
    )


def test_revoking_twice_or_an_unknown_serial_is_refused(cluster: Cluster) -> None:
    sdc = cluster.issue("sdc:guid-1")
    cluster.ca.revoke(sdc.serial)
    before = cluster.ca.crl_path.read_bytes()
    with pytest.raises(pki.AlreadyExists):
        cluster.ca.revoke(sdc.serial)
    with pytest.raises(pki.NotFound):
        cluster.ca.revoke(sdc.serial + 1)
    assert cluster.ca.crl_path.read_bytes() == before


# --- files -----------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_written_0600_and_the_ca_directory_0700(cluster: Cluster) -> None:
    sds = cluster.issue("sds:sds1")
    assert _mode(cluster.ca.root) == 0o700
    assert _mode(cluster.ca.key_path) == 0o600
    assert _mode(cluster.ca.cert_path) == 0o644
    assert _mode(sds.key) == 0o600
    assert _mode(sds.key.parent) == 0o700
    assert _mode(sds.cert) == 0o644
    # The writes are atomic: no temporary file is left beside them.
    assert sorted(p.name for p in sds.key.parent.iterdir()) == sorted(
        [sds.cert.name, sds.key.name, "ca.crt"]
    )


def test_a_key_others_may_read_is_refused(cluster: Cluster) -> None:
    sds = cluster.issue("sds:sds1")
    sds.key.chmod(0o644)
    with pytest.raises(pki.PkiError, match="mode 0644: every user may read it"):
        pki.server_context(sds.cert, sds.key, cluster.ca.cert_path)
    # The deployment's convention for what the daemons' group reads: root:meshblock 0640.
    sds.key.chmod(0o640)
    pki.server_context(sds.cert, sds.key, cluster.ca.cert_path)


def test_an_existing_ca_is_not_replaced_without_force(cluster: Cluster) -> None:
    before = cluster.ca.cert_path.read_bytes(), cluster.ca.key_path.read_bytes()
    with pytest.raises(pki.AlreadyExists, match="already holds a CA"):
        pki.Ca.init(cluster.ca.root)
    assert (cluster.ca.cert_path.read_bytes(), cluster.ca.key_path.read_bytes()) == before
    pki.Ca.init(cluster.ca.root, force=True)
    assert cluster.ca.key_path.read_bytes() != before[1]


def test_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    ca = pki.Ca.init(tmp_path / "ca", days=10)
    cert, _ = ca.issue(pki.Identity(pki.Kind.SDS, "sds1"), days=365)
    assert cert.not_valid_after_utc == ca.load()[0].not_valid_after_utc


# --- meshctl ca ------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv), env={})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_meshctl_ca_init_issue_list_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "etc"
    assert run(capsys, "ca", "init", str(ca_dir))[0] == 0
    code, stdout, _ = run(
        capsys, "--json", "ca", "issue", "sds:sds1", "--ca", str(ca_dir), "--out", str(out),
        "--san", "127.0.0.1", "--san", "sds1.example.net", "--days", "30",
    )  # fmt: skip
    assert code == 0
    issued = json.loads(stdout)
    assert issued["identity"] == "sds:sds1"
    cert = pki.load_cert(out / "sds-sds1.crt")
    assert pki.identity_of(cert) == pki.Identity(pki.Kind.SDS, "sds1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sds1.example.net"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30
    assert _mode(out / "sds-sds1.key") == 0o600
    assert (out / "ca.crt").read_bytes() == (ca_dir / "ca.crt").read_bytes()

    code, stdout, _ = run(capsys, "ca", "list", "--ca", str(ca_dir), "--json")
    [row] = json.loads(stdout)["certificates"]
    assert (row["serial"], row["identity"], row["status"]) == (
        issued["serial"],
        "sds:sds1",
        "valid",
    )
    assert row["usage"] == ["server", "client"]

    code, stdout, _ = run(capsys, "ca", "revoke", str(out / "sds-sds1.crt"), "--ca", str(ca_dir))
    assert code == 0 and "revoked sds:sds1" in stdout
    code, stdout, _ = run(capsys, "ca", "list", "--ca", str(ca_dir))
    assert code == 0 and f"{issued['serial']}  sds:sds1" in stdout and "revoked" in stdout
    assert pki.load_crl(ca_dir / "crl.pem").get_revoked_certificate_by_serial_number(
        cert.serial_number
    )


def test_meshctl_ca_refuses_bad_input_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "etc"
    assert run(capsys, "ca", "init", str(ca_dir))[0] == 0
    files_before = {p: p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()}

    code, _, err = run(capsys, "ca", "init", str(ca_dir))
    assert code == ExitCode.CONFLICT and "already holds a CA; --force" in err
    code, _, err = run(capsys, "ca", "issue", "root:x", "--ca", str(ca_dir), "--out", str(out))
    assert code == ExitCode.INVALID and "kind must be one of" in err
    code, _, err = run(
        capsys, "ca", "issue", "sds:sds1", "--ca", str(ca_dir), "--out", str(out), "--days", "0"
    )
    assert code == ExitCode.INVALID and "validity must be" in err
    code, _, err = run(
        capsys, "ca", "issue", "sds:sds1", "--ca", str(ca_dir), "--out", str(out), "--san", "a b"
    )
    assert code == ExitCode.INVALID and "invalid SAN 'a b'" in err
    code, _, err = run(capsys, "ca", "revoke", "abc123", "--ca", str(ca_dir))
    assert code == ExitCode.NOT_FOUND and "no certificate with serial abc123" in err
    code, _, err = run(capsys, "ca", "revoke", "not-hex", "--ca", str(ca_dir))
    assert code == ExitCode.INVALID
    code, _, err = run(capsys, "ca", "list", "--ca", str(tmp_path / "nowhere"))
    assert code == ExitCode.NOT_FOUND and "no CA in" in err
    assert {p: p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()} == files_before
    assert not out.exists()

    # An identity already written is not replaced, and the refused issue leaves no record.
    assert run(capsys, "ca", "issue", "sds:sds1", "--ca", str(ca_dir), "--out", str(out))[0] == 0
    key_before = (out / "sds-sds1.key").read_bytes()
    code, _, err = run(capsys, "ca", "issue", "sds:sds1", "--ca", str(ca_dir), "--out", str(out))
    assert code == ExitCode.CONFLICT and "sds-sds1.crt exists; --force" in err
    assert (out / "sds-sds1.key").read_bytes() == key_before
    assert len(list((ca_dir / "issued").iterdir())) == 1

    # A certificate of another CA cannot be revoked here.
    other = tmp_path / "other"
    assert run(capsys, "ca", "init", str(other))[0] == 0
    assert run(capsys, "ca", "issue", "sdc:x", "--ca", str(other), "--out", str(other))[0] == 0
    code, _, err = run(capsys, "ca", "revoke", str(other / "sdc-x.crt"), "--ca", str(ca_dir))
    assert code == ExitCode.INVALID and "was not issued by the CA" in err


@pytest.mark.parametrize("verb", ["init", "issue", "revoke", "crl", "list"])
def test_meshctl_ca_commands_explain_themselves(
    verb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "ca", verb, "--help")
    assert code == 0
    assert "examples:\n  meshctl ca " + verb in out


# --- rotation (docs/security.md, "Rotation") --------------------------------------


def test_a_rotated_certificate_replaces_the_old_one_once_that_is_revoked(
    cluster: Cluster,
) -> None:
    """Issue anew for the same identity, then revoke the old serial: the new one works
    all along, the old one until it is revoked."""
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"])
    old, new = cluster.issue("sdc:guid-1"), cluster.issue("sdc:guid-1")
    assert old.serial != new.serial
    for files in (old, new):
        assert connect(server_ctx(server, cluster.ca), client_ctx(files, cluster.ca)).server == (
            pki.Identity(pki.Kind.SDC, "guid-1")
        )
    cluster.ca.revoke(old.serial)
    out = connect(server_ctx(server, cluster.ca), client_ctx(old, cluster.ca))
    assert "certificate revoked" in out.server_refused()
    assert connect(server_ctx(server, cluster.ca), client_ctx(new, cluster.ca)).server == (
        pki.Identity(pki.Kind.SDC, "guid-1")
    )


def test_during_a_ca_rotation_components_trust_both_cas_and_both_crls(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A ``ca.crt`` holding the old and the new CA and a ``crl.pem`` holding both lists:
    certificates of either CA are accepted, a revoked one of either is refused."""
    new_ca = pki.Ca.init(tmp_path / "new-ca", common_name="meshblock cluster CA 2027")
    bundle, crls = tmp_path / "both-ca.crt", tmp_path / "both-crl.pem"

    def write_bundles() -> None:
        bundle.write_bytes(cluster.ca.cert_path.read_bytes() + new_ca.cert_path.read_bytes())
        crls.write_bytes(cluster.ca.crl_path.read_bytes() + new_ca.crl_path.read_bytes())

    write_bundles()
    server = cluster.issue("sds:sds1", sans=["127.0.0.1"], ca_=new_ca)
    old_sdc, new_sdc = cluster.issue("sdc:a"), cluster.issue("sdc:b", ca_=new_ca)
    old_sds = cluster.issue("sds:sds2", sans=["127.0.0.1"])

    def dial(srv: Files, cli: Files) -> Outcome:
        return connect(
            pki.server_context(srv.cert, srv.key, bundle, crl=crls),
            pki.client_context(bundle, cert=cli.cert, key=cli.key, crl=crls),
        )

    assert dial(server, old_sdc).server == old_sdc.identity
    assert dial(server, new_sdc).server == new_sdc.identity
    assert dial(old_sds, new_sdc).client == old_sds.identity
    cluster.ca.revoke(old_sdc.serial)
    new_ca.revoke(new_sdc.serial)
    write_bundles()
    assert "certificate revoked" in dial(server, old_sdc).server_refused()
    assert "certificate revoked" in dial(server, new_sdc).server_refused()
    assert dial(old_sds, cluster.issue("sdc:c", ca_=new_ca)).client == old_sds.identity


def test_meshctl_refuses_half_a_client_certificate_or_a_missing_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MESHCTL_TLS_* (docs/meshctl.md): checked before any request is made."""
    env = {"MESHCTL_TLS_CERT": str(tmp_path / "a.crt"), "HOME": str(tmp_path)}
    assert main(["pd", "list"], env=env) == ExitCode.ERROR
    assert "a client certificate needs its key" in capsys.readouterr().err
    env = {"MESHCTL_TLS_CA": str(tmp_path / "none.crt"), "HOME": str(tmp_path)}
    assert main(["pd", "list"], env=env) == ExitCode.ERROR
    assert "none.crt does not exist" in capsys.readouterr().err
