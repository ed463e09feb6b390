"""The TLS of an NBD TCP listener: TLS 1.3, or also TLS 1.2 for clients that need it.

Every other TLS server of meshblock is TLS 1.3 only (:func:`meshblock.pki.server_context`).
An NBD listener may admit TLS 1.2 as well (``[nbd] tls_min_version = "1.2"``), for
clients that cannot offer 1.3: Debian 12's nbd-client 3.24 fixes its GnuTLS priority
to ``NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2``. TLS 1.2 is then limited to
:data:`TLS12_CIPHERS`: an ephemeral ECDH key exchange (forward secrecy) and an AEAD
cipher, AES-GCM or ChaCha20-Poly1305; no CBC, no RSA key exchange, no SHA-1 MAC.
Client certificates and the CRL are checked as for TLS 1.3, and renegotiation is off.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from meshblock import pki

#: The values of ``[nbd] tls_min_version``, the default first.
TLS_MIN_VERSIONS = ("1.3", "1.2")

#: The TLS 1.2 suites admitted (OpenSSL's names): ECDHE, then AES-GCM or ChaCha20-Poly1305.
#: The SDC's certificate is ECDSA, so the ECDSA ones are those negotiated; the RSA ones
#: serve a listener given an RSA certificate.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-RSA-AES128-GCM-SHA256",
)


def server_context(
    cert: Path,
    key: Path,
    ca: Path,
    *,
    crl: Path | None,
    client_certs: pki.ClientCerts,
    min_version: str = "1.3",
) -> ssl.SSLContext:
    """The listener's context: :func:`meshblock.pki.server_context` (TLS 1.3), which
    with ``min_version`` ``"1.2"`` admits TLS 1.2 with :data:`TLS12_CIPHERS` only.
    A :class:`pki.PkiError` if the files cannot be used, a ``ValueError`` for another
    ``min_version``."""
    if min_version not in TLS_MIN_VERSIONS:
        raise ValueError(f"TLS minimum version {min_version!r}: not one of {TLS_MIN_VERSIONS}")
    context = pki.server_context(cert, key, ca, crl=crl, client_certs=client_certs)
    if min_version == "1.2":
        admit_tls12(context)
    return context


def admit_tls12(context: ssl.SSLContext) -> None:
    """Let ``context`` also speak TLS 1.2, with :data:`TLS12_CIPHERS` only (its TLS 1.3
    suites stay as they are)."""
    context.set_ciphers(":".join(TLS12_CIPHERS) + ":@SECLEVEL=2")
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.minimum_version = ssl.TLSVersion.TLSv1_2
