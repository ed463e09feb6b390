"""The cluster CA, the certificates that name each component, and the TLS contexts.

Every component of a cluster proves who it is with an X.509 certificate that the
cluster's own CA signed (docs/security.md has the whole model). This module is the one
place that makes, reads and checks them; the daemons and ``meshctl ca`` only call it.

Identities
    An identity is ``<kind>:<name>``: ``mdm:mdm1``, ``sds:sds1``,
    ``sdc:4f1c...`` (the SDC's GUID), ``mgmt:mgmt1``, ``admin:alice``. It travels in
    the certificate as exactly one URI subject alternative name
    ``meshblock:<kind>:<name>`` (and, for people reading the certificate, as the
    subject's common name). Servers also carry DNS and IP SANs so that a client's
    ordinary host-name check (``check_hostname``) works; the identity is what the
    application authorises on, the host name only what TLS verifies on the way.

Keys
    ECDSA on P-256 with SHA-256 signatures, for the CA and for every component. Every
    TLS stack the cluster meets takes it: OpenSSL 3 (Python's ``ssl``), GnuTLS
    (qemu's and libnbd's ``nbds://``, nbd-client) and the browsers that open MGMT.
    Ed25519 would be smaller and faster to sign with, but browsers do not accept
    Ed25519 server certificates and GnuTLS-based clients negotiate it only in part,
    so one key type everywhere is P-256.

Usages
    Each certificate says what it may be used for: the extended key usage
    ``serverAuth`` and/or ``clientAuth``. OpenSSL checks it during the handshake: a
    server refuses a client certificate without ``clientAuth`` and a client refuses a
    server certificate without ``serverAuth``. :data:`DEFAULT_USAGES` gives each kind
    what it needs (an admin only ever connects; every daemon also serves).

Revocation
    A certificate revoked before it expires goes into a CRL that the CA signs
    (:class:`Ca.revoke`). The TLS contexts load the CRL and OpenSSL refuses a revoked
    leaf during the handshake (``VERIFY_CRL_CHECK_LEAF``); :func:`check_not_revoked`
    does the same check outside a handshake. A CRL has a ``next_update``: past it,
    OpenSSL treats the CRL as expired and refuses *every* peer (fail closed), so the
    CA must re-sign it in time (``meshctl ca crl``; a CRL's life is
    :data:`CRL_DAYS` days by default).

The CA directory (``meshctl ca init DIR``) holds ``ca.crt``, ``ca.key`` (mode 0600),
``crl.pem`` and ``issued/<serial>.crt``, a copy of each certificate it signed, from
which ``meshctl ca list`` and ``meshctl ca revoke SERIAL`` work. Every file is
written with :func:`meshblock.files.write_atomic`.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshblock.files import write_atomic

URI_SCHEME = "meshblock"
CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 30
MAX_DAYS = 3650
# Certificates start a little in the past, so that a peer whose clock is slightly
# behind the CA's does not see a certificate that is "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
CRL = "crl.pem"
ISSUED = "issued"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PkiError(Exception):
    """A certificate, key, CRL or CA directory is missing, malformed or refused."""


class InvalidInput(PkiError):
    """An identity, SAN, usage or validity that cannot be put in a certificate."""


class AlreadyExists(PkiError):
    """Making it would replace a CA, a key or a certificate, or revoke twice."""


class NotFound(PkiError):
    """No such CA, file or issued certificate."""


class Kind(enum.StrEnum):
    MDM = "mdm"
    SDS = "sds"
    SDC = "sdc"
    MGMT = "mgmt"
    ADMIN = "admin"


class Usage(enum.Flag):
    SERVER = enum.auto()
    CLIENT = enum.auto()


DEFAULT_USAGES: Mapping[Kind, Usage] = {
    Kind.MDM: Usage.SERVER | Usage.CLIENT,  # serves the API; talks to its peer MDMs
    Kind.SDS: Usage.SERVER | Usage.CLIENT,  # serves data; replicates to other SDSs
    Kind.SDC: Usage.SERVER | Usage.CLIENT,  # talks to SDSs and the MDM; serves NBD over TLS
    Kind.MGMT: Usage.SERVER | Usage.CLIENT,  # serves the dashboard; reads the MDM
    Kind.ADMIN: Usage.CLIENT,  # an operator only ever connects
}


@dataclass(frozen=True, order=True)
class Identity:
    """Who a certificate names: ``kind:name``."""

    kind: Kind
    name: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise InvalidInput(
                f"invalid {self.kind} name {self.name!r}: 1-128 characters of letters, "
                "digits, '.', '_' and '-', starting with a letter or digit"
            )

    @classmethod
    def parse(cls, text: str) -> Identity:
        """``"sds:sds1"`` -> ``Identity(Kind.SDS, "sds1")``; :class:`PkiError` if not one."""
        kind, sep, name = text.partition(":")
        if not sep:
            raise InvalidInput(f"invalid identity {text!r}: expected KIND:NAME, e.g. sds:sds1")
        try:
            return cls(Kind(kind), name)
        except ValueError:
            kinds = ", ".join(k.value for k in Kind)
            raise InvalidInput(f"invalid identity {text!r}: kind must be one of {kinds}") from None

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}:{self.kind.value}:{self.name}"

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.name}"


# --- keys and certificates -------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _check_days(days: int) -> None:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"validity must be 1..{MAX_DAYS} days, not {days}")


def make_ca(
    common_name: str = "meshblock cluster CA",
    *,
    days: int = CA_DAYS,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign leaf certificates and CRLs, nothing more."""
    _check_days(days)
    key = new_key()
    start = _now(now)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + dt.timedelta(days=days))
        # path_length=0: it signs components, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san_entries(identity: Identity, sans: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for san in sans:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", san):
            raise InvalidInput(f"invalid SAN {san!r}: expected a DNS name or an IP address")
        entries.append(x509.DNSName(san))
    return entries


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    identity: Identity,
    *,
    sans: Sequence[str] = (),
    days: int = LEAF_DAYS,
    usage: Usage | None = None,
    now: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new key and a certificate for ``identity`` signed by the CA.

    ``sans`` are DNS names and IP addresses a client may dial the component at;
    ``usage`` defaults to :data:`DEFAULT_USAGES` for the kind. The certificate never
    outlives the CA.
    """
    _check_days(days)
    usage = DEFAULT_USAGES[identity.kind] if usage is None else usage
    if not usage:
        raise InvalidInput("a certificate needs a usage: server, client or both")
    start = _now(now)
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise PkiError("the CA has expired: it can issue nothing")
    key = new_key()
    ekus = []
    if Usage.SERVER in usage:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if Usage.CLIENT in usage:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDHE does the key exchange; the certificate's key only signs.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(identity, sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate names; :class:`PkiError` unless it names exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate has no subject alternative names") from None
    return _one_identity(san.get_values_for_type(x509.UniformResourceIdentifier))


def identity_from_der(der: bytes) -> Identity:
    """The identity in a DER certificate (``SSLObject.getpeercert(binary_form=True)``)."""
    return identity_of(x509.load_der_x509_certificate(der))


def identity_from_peercert(peercert: Mapping[str, Any] | None) -> Identity:
    """The identity in the dict ``ssl.SSLObject.getpeercert()`` returns.

    That dict is filled only for a certificate the context verified, so an identity
    read from it is one the CA vouched for. ``None`` or ``{}`` (no certificate, or
    one not verified) is a :class:`PkiError`.
    """
    if not peercert:
        raise PkiError("the peer presented no verified certificate")
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    return _one_identity(uris)


def _one_identity(uris: Iterable[str]) -> Identity:
    prefix = URI_SCHEME + ":"
    ours = [u for u in uris if u.startswith(prefix)]
    if len(ours) != 1:
        raise PkiError(f"the certificate names {len(ours)} meshblock identities, not one")
    return Identity.parse(ours[0][len(prefix) :])


def peer_identity(tls: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The verified identity of the peer of an established TLS connection."""
    return identity_from_peercert(tls.getpeercert())


def expect_peer(tls: ssl.SSLObject | ssl.SSLSocket, *allowed: Identity | Kind) -> Identity:
    """The peer's identity if it is one of ``allowed`` (an identity, or any of a kind).

    For a client that dials a known component (an SDS replicating to ``sds:sds2``) or a
    server that serves only some kinds; :class:`PkiError` otherwise.
    """
    ident = peer_identity(tls)
    for a in allowed:
        if ident == a or ident.kind == a:
            return ident
    wanted = ", ".join(str(a) for a in allowed)
    raise PkiError(f"peer is {ident}, expected {wanted}")


def usages_of(cert: x509.Certificate) -> Usage:
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return Usage(0)
    usage = Usage(0)
    if ExtendedKeyUsageOID.SERVER_AUTH in ekus:
        usage |= Usage.SERVER
    if ExtendedKeyUsageOID.CLIENT_AUTH in ekus:
        usage |= Usage.CLIENT
    return usage


# --- revocation ------------------------------------------------------------------


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Iterable[tuple[int, dt.datetime]] = (),
    *,
    number: int = 1,
    days: int = CRL_DAYS,
    now: dt.datetime | None = None,
    after: x509.CertificateRevocationList | None = None,
) -> x509.CertificateRevocationList:
    """CRL number ``number`` listing ``(serial, revoked_at)`` pairs, valid for ``days``.

    Each CRL the CA signs has a higher number than the one before (RFC 5280, 5.2.3),
    so a component can refuse to go back to an older list. Given the list it replaces
    (``after``), its ``last_update`` is also at least a second later than that one's:
    a TLS context that loaded both checks each handshake against the CRL with the
    latest ``last_update``, and between two with the same second picks either, so a
    revocation signed within the second of the list before it could go unseen. It is
    never later than the signing time (a list from the future is not yet valid).
    """
    _check_days(days)
    start = _now(now)
    last_update = start - CLOCK_SKEW
    if after is not None:
        # never after the signing time: a list dated in the future is "not yet valid"
        # to every handshake (a burst of over 300 signings in 5 minutes, or a list
        # signed while the clock ran ahead, falls back to the same second)
        last_update = min(max(last_update, after.last_update_utc + dt.timedelta(seconds=1)), start)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update)
        .next_update(start + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def check_not_revoked(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList,
    *,
    now: dt.datetime | None = None,
) -> None:
    """Raise :class:`PkiError` if ``cert`` is revoked, or the CRL cannot be trusted.

    A CRL not signed by ``ca_cert``, or past its ``next_update``, cannot say that a
    certificate is *not* revoked: both are refusals, as in OpenSSL's own check.
    """
    ca_public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(ca_public, ec.EllipticCurvePublicKey):
        raise PkiError("the CRL was not issued by this CA")
    if not crl.is_signature_valid(ca_public):
        raise PkiError("the CRL's signature is not the CA's")
    next_update = crl.next_update_utc
    if next_update is None or next_update <= _now(now):
        raise PkiError("the CRL has expired: re-sign it with 'meshctl ca crl'")
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        who = identity_or_subject(cert)
        raise PkiError(f"certificate {cert.serial_number:x} ({who}) is revoked")


def identity_or_subject(cert: x509.Certificate) -> str:
    try:
        return str(identity_of(cert))
    except PkiError:
        return cert.subject.rfc4514_string()


# --- files -----------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: a daemon reads it unattended. The file's mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def save_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert_pem(cert), mode=0o644)


def save_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, key_pem(key), mode=0o600)


def save_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError:
        raise PkiError(f"{path} is not a PEM certificate") from None


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a private key, refusing one that every user of the host may read.

    Group access is allowed: the deployment's convention is ``root:meshblock 0640``
    for what the daemons' user must read and not write.
    """
    data = _read(path, "key")
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        raise PkiError(
            f"key {path} has mode {mode:04o}: every user may read it; chmod 600 (or 640) it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC key")
    return key


def load_crl(path: Path) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(_read(path, "CRL"))
    except ValueError:
        raise PkiError(f"{path} is not a PEM CRL") from None


# --- the CA directory ------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCert:
    """One certificate the CA signed, as ``meshctl ca list`` shows it."""

    serial: int
    identity: str
    not_before: dt.datetime
    not_after: dt.datetime
    usage: Usage
    revoked_at: dt.datetime | None

    def status(self, now: dt.datetime | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.not_after <= _now(now) else "valid"

    def to_json(self, now: dt.datetime | None = None) -> dict[str, Any]:
        return {
            "serial": f"{self.serial:x}",
            "identity": self.identity,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "usage": [u.name.lower() for u in Usage if u in self.usage and u.name],
            "status": self.status(now),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class Ca:
    """A CA directory on disk (see the module docstring for its files)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def cert_path(self) -> Path:
        return self.root / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.root / CA_KEY

    @property
    def crl_path(self) -> Path:
        return self.root / CRL

    @classmethod
    def init(
        cls,
        root: Path,
        *,
        common_name: str = "meshblock cluster CA",
        days: int = CA_DAYS,
        force: bool = False,
        now: dt.datetime | None = None,
    ) -> Ca:
        """Make a new CA in ``root``; refuses to replace one unless ``force``.

        Replacing a CA invalidates every certificate it signed: with ``force`` the old
        files are replaced, and the old ``issued/`` copies removed.
        """
        ca = cls(root)
        if not force and (ca.cert_path.exists() or ca.key_path.exists()):
            raise AlreadyExists(
                f"{root} already holds a CA; --force replaces it (and all it signed)"
            )
        cert, key = make_ca(common_name, days=days, now=now)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        issued = root / ISSUED
        issued.mkdir(mode=0o700, exist_ok=True)
        for old in issued.glob("*.crt"):
            old.unlink()
        # The key first: a crash in between leaves no certificate without its key.
        save_key(ca.key_path, key)
        save_cert(ca.cert_path, cert)
        save_crl(ca.crl_path, make_crl(cert, key, now=now))
        return ca

    def _require(self) -> None:
        if not self.cert_path.exists():
            raise NotFound(f"no CA in {self.root} (make one with 'meshctl ca init {self.root}')")

    def load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self._require()
        cert, key = load_cert(self.cert_path), load_key(self.key_path)
        if cert.public_key() != key.public_key():
            raise PkiError(f"{self.key_path} is not the key of {self.cert_path}")
        return cert, key

    def issue(
        self,
        identity: Identity,
        *,
        sans: Sequence[str] = (),
        days: int = LEAF_DAYS,
        usage: Usage | None = None,
        now: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Issue a certificate and record a copy of it under ``issued/``."""
        ca_cert, ca_key = self.load()
        cert, key = issue(ca_cert, ca_key, identity, sans=sans, days=days, usage=usage, now=now)
        (self.root / ISSUED).mkdir(mode=0o700, exist_ok=True)
        save_cert(self.root / ISSUED / f"{cert.serial_number:x}.crt", cert)
        return cert, key

    def issued(self) -> list[x509.Certificate]:
        certs = [load_cert(p) for p in sorted((self.root / ISSUED).glob("*.crt"))]
        return sorted(certs, key=lambda c: (c.not_valid_before_utc, c.serial_number))

    def find(self, serial: int) -> x509.Certificate:
        path = self.root / ISSUED / f"{serial:x}.crt"
        if not path.exists():
            raise NotFound(f"this CA issued no certificate with serial {serial:x}")
        return load_cert(path)

    def crl(self) -> x509.CertificateRevocationList:
        self._require()
        return load_crl(self.crl_path)

    def revoke(self, serial: int, *, now: dt.datetime | None = None) -> x509.Certificate:
        """Add a certificate the CA issued to the CRL and re-sign it.

        Revoking a certificate already revoked is refused (the CRL keeps its first
        revocation date).
        """
        ca_cert, ca_key = self.load()
        cert = self.find(serial)
        crl = self.crl()
        if crl.get_revoked_certificate_by_serial_number(serial) is not None:
            raise AlreadyExists(f"certificate {serial:x} is already revoked")
        entries = [(r.serial_number, r.revocation_date_utc) for r in crl]
        entries.append((serial, _now(now)))
        crl = make_crl(ca_cert, ca_key, entries, number=crl_number(crl) + 1, now=now, after=crl)
        save_crl(self.crl_path, crl)
        return cert

    def resign_crl(
        self, *, days: int = CRL_DAYS, now: dt.datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Re-sign the CRL with the same entries and a new ``next_update``."""
        ca_cert, ca_key = self.load()
        old = self.crl()
        entries = [(r.serial_number, r.revocation_date_utc) for r in old]
        crl = make_crl(
            ca_cert, ca_key, entries, number=crl_number(old) + 1, days=days, now=now, after=old
        )
        save_crl(self.crl_path, crl)
        return crl

    def listing(self) -> list[IssuedCert]:
        crl = self.crl()
        rows = []
        for cert in self.issued():
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            rows.append(
                IssuedCert(
                    serial=cert.serial_number,
                    identity=identity_or_subject(cert),
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    usage=usages_of(cert),
                    revoked_at=entry.revocation_date_utc if entry is not None else None,
                )
            )
        return rows


def identity_paths(out: Path, identity: Identity) -> dict[str, Path]:
    """Where :func:`write_identity` puts an identity's files in ``out``."""
    stem = f"{identity.kind.value}-{identity.name}"
    return {"cert": out / f"{stem}.crt", "key": out / f"{stem}.key", "ca": out / CA_CERT}


def check_identity_out(
    out: Path, identity: Identity, ca_cert: x509.Certificate, *, force: bool = False
) -> None:
    """Raise :class:`AlreadyExists` if writing the identity to ``out`` would replace files.

    An identity's certificate or key, or a ``ca.crt`` of another CA, is replaced only
    with ``force``.
    """
    if force:
        return
    paths = identity_paths(out, identity)
    for what in ("cert", "key"):
        if paths[what].exists():
            raise AlreadyExists(f"{paths[what]} exists; --force replaces it")
    if paths["ca"].exists() and paths["ca"].read_bytes() != cert_pem(ca_cert):
        raise AlreadyExists(f"{paths['ca']} holds another CA's certificate; --force replaces it")


def write_identity(
    out: Path,
    identity: Identity,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Write ``<kind>-<name>.crt``, ``<kind>-<name>.key`` (0600) and ``ca.crt`` to ``out``.

    Checks with :func:`check_identity_out` before writing anything; ``out`` is made
    with mode 0700 if it does not exist.
    """
    check_identity_out(out, identity, ca_cert, force=force)
    paths = identity_paths(out, identity)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    save_key(paths["key"], key)
    save_cert(paths["cert"], cert)
    save_cert(paths["ca"], ca_cert)
    return paths


# --- TLS contexts ----------------------------------------------------------------


class ClientCerts(enum.StrEnum):
    """What a server asks of its clients."""

    REQUIRED = "required"  # no CA-signed certificate, no connection (SDS data port)
    OPTIONAL = "optional"  # verified if sent (the MDM: daemons send one, operators a token)


def _common(ctx: ssl.SSLContext, ca: Path, crl: Path | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for path in (ca, crl):
        if path is not None and not path.is_file():
            raise NotFound(f"{path} does not exist")
    try:
        ctx.load_verify_locations(cafile=str(ca))
        if crl is not None:
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} does not exist") from None
    except ssl.SSLError as exc:
        raise PkiError(f"cannot load the CA or CRL ({ca}, {crl}): {exc.reason}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    load_key(key)  # the permission check, and a clear error for a wrong file
    if not cert.is_file():
        raise NotFound(f"{cert} does not exist")
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except FileNotFoundError as exc:
        raise PkiError(f"{exc.filename} does not exist") from None
    except ssl.SSLError as exc:
        raise PkiError(f"cannot use {cert} with {key}: {exc.reason}") from None


def server_context(
    cert: Path,
    key: Path,
    ca: Path,
    *,
    crl: Path | None = None,
    client_certs: ClientCerts = ClientCerts.REQUIRED,
) -> ssl.SSLContext:
    """A TLS 1.3 server context that verifies client certificates against ``ca``.

    With ``crl``, a revoked client certificate is refused in the handshake. Which
    identity a client is comes from :func:`peer_identity` after the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, ca, crl)
    _load_chain(ctx, cert, key)
    ctx.verify_mode = (
        ssl.CERT_REQUIRED if client_certs is ClientCerts.REQUIRED else ssl.CERT_OPTIONAL
    )
    # No session tickets (TLS 1.3 PSK resumption, TLS 1.2 tickets): a resumed session
    # takes the client's certificate from the ticket and checks it against no CRL, so
    # a client revoked after its first handshake could go on connecting with one for
    # the ticket's lifetime. Our clients never resume; every handshake is a full one.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def client_context(
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    crl: Path | None = None,
) -> ssl.SSLContext:
    """A TLS 1.3 client context: verifies the server against ``ca`` and its host name.

    Give ``cert`` and ``key`` to prove the client's own identity. Pass the address
    dialled as ``server_hostname``; check the server's identity with
    :func:`expect_peer` where it matters which component answered.
    """
    if (cert is None) != (key is None):
        raise PkiError("a client certificate needs its key, and a key its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    _common(ctx, ca, crl)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx
