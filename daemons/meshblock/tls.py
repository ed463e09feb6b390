"""``[tls]`` of the SDS, SDC and MGMT: their own certificate, and HTTPS to the MDM.

The section has the shape of the MDM's own ``[tls]`` (``cert``, ``key``, ``ca``,
``crl``; docs/security.md): ``cert`` and ``key`` are the component's identity
(``meshctl ca issue sds:NAME``, ``sdc:GUID``, ``mgmt:NAME``), ``ca`` the cluster CA's
certificate that the MDM's certificate is checked against, ``crl`` the CA's revocation
list. Today a component uses it for one thing: its calls to the MDM.

Which MDM URLs are HTTPS is written in the URLs themselves, and must agree with the
section: an ``https://`` URL needs ``ca``, and with ``ca`` set every URL must be
``https://``. Plain HTTP is what a component does only when its URLs say ``http://``
and it has no ``[tls]``: nothing falls back to it.

With a certificate, a component sends no bearer token to the MDM: the MDM authorises
it on the certificate's identity (``meshblock.mdm.authz``). Without one (``ca`` alone)
it checks the MDM's certificate and still sends the cluster secret.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from meshblock import pki
from meshblock.config import ConfigError


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: this component's certificate and the cluster CA (empty: no TLS)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    crl: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls.cert and tls.key go together: set both or neither")
        if (self.cert or self.crl) and not self.ca:
            raise ValueError("tls.cert and tls.crl need tls.ca, the cluster CA's certificate")


@dataclass(frozen=True)
class MdmTls:
    """How a component reaches the MDM: the TLS context (``None``: plain HTTP) and the
    identity its certificate names (``None``: no certificate, the bearer token)."""

    context: ssl.SSLContext | None = None
    identity: pki.Identity | None = None

    def aiohttp_ssl(self) -> ssl.SSLContext | bool:
        """What aiohttp's ``ssl=`` takes: the context, or ``True`` (its default)."""
        return self.context if self.context is not None else True

    def connector(self) -> aiohttp.TCPConnector:
        """A connector for an aiohttp session to the MDM.

        Before CPython 3.12.8 (gh-118950), a TLS connection whose peer does not finish
        the TLS shutdown (an MDM killed or restarted, a long-poll cancelled at stop)
        never closes its socket; aiohttp's ``enable_cleanup_closed`` aborts such
        sockets, at the latest when the session closes, so none outlives the daemon's
        event loop (a ResourceWarning: unclosed transport).
        """
        return aiohttp.TCPConnector(
            ssl=self.aiohttp_ssl(),
            enable_cleanup_closed=self.context is not None and _SSL_SHUTDOWN_LEAKS,
        )


_SSL_SHUTDOWN_LEAKS = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)


def mdm_tls(
    tls: TlsConfig, urls: Sequence[str], kind: pki.Kind, *, key: str = "mdm URLs"
) -> MdmTls:
    """Check ``urls`` (``key`` names them in errors) against ``[tls]`` and build the
    client context; a certificate must name an identity of ``kind``. Every problem
    is a :class:`ConfigError`: a daemon checks this at start and with --check-config."""
    https: list[str] = []
    for url in urls:
        if not url:
            continue
        scheme = urlsplit(url).scheme
        if scheme == "https":
            https.append(url)
        elif scheme == "http":
            if tls.ca:
                raise ConfigError(
                    f"{key}: {url} is plain HTTP, but [tls] is set: write https:// "
                    "(plain HTTP only without [tls])"
                )
        else:
            raise ConfigError(f"{key}: {url!r} is not an http:// or https:// URL")
    if not tls.ca:
        if https:
            raise ConfigError(
                f"{key}: {https[0]} needs [tls] ca, the cluster CA's certificate, to check "
                "the MDM's certificate (write http:// for plain HTTP)"
            )
        return MdmTls()
    try:
        context = pki.client_context(
            Path(tls.ca),
            cert=Path(tls.cert) if tls.cert else None,
            key=Path(tls.key) if tls.key else None,
            crl=Path(tls.crl) if tls.crl else None,
        )
        identity = pki.identity_of(pki.load_cert(Path(tls.cert))) if tls.cert else None
    except pki.PkiError as exc:
        raise ConfigError(f"[tls] {exc}") from None
    if identity is not None and identity.kind != kind:
        raise ConfigError(
            f"[tls] cert {tls.cert} names {identity}, not an identity of kind {kind.value}"
        )
    return MdmTls(context, identity)
