"""One cluster CA per test process, and the identities that test daemons present.

The CA is made on first use in a temporary directory (removed when the process
exits): issuing a certificate takes about a millisecond, so every daemon of a test
gets its own identity (``sds:sds1``, ``sdc:<guid>``, ...) from the same CA, and the
harness (``tests/_http.py``) calls an HTTPS MDM as ``admin:tests`` by default.

>>> files = identity("sds:sds1")
>>> files.settings()   # the [tls] table of a daemon's config
>>> ctx = context("sdc:4f1c...")   # a client presenting that identity
"""

from __future__ import annotations

import atexit
import shutil
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshblock import pki
from meshblock.wire import tls as wire_tls
from meshblock.wire.protocol import PeerRole

ADMIN = "admin:tests"
LOOPBACK_SANS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Files:
    """An identity's certificate and key, with the CA's certificate and CRL."""

    identity: pki.Identity
    cert: Path
    key: Path
    ca: Path
    crl: Path

    def settings(self) -> dict[str, str]:
        """The ``[tls]`` table of a daemon's config (the shape of meshblock.tls)."""
        return {
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
            "crl": str(self.crl),
        }

    def serial(self) -> int:
        return pki.load_cert(self.cert).serial_number


_root: Path | None = None
_issued: dict[tuple[str, tuple[str, ...]], Files] = {}
_contexts: dict[str | None, ssl.SSLContext] = {}


def ca() -> pki.Ca:
    """The process's cluster CA (made on first use)."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="meshblock-tls-"))
        atexit.register(shutil.rmtree, _root, True)
        pki.Ca.init(_root / "ca", common_name="meshblock test CA")
    return pki.Ca(_root / "ca")


def identity(text: str, sans: Sequence[str] = ()) -> Files:
    """Certificate and key of ``text`` (``kind:name``) with ``sans``, issued once."""
    key = (text, tuple(sans))
    if key not in _issued:
        the_ca = ca()
        ident = pki.Identity.parse(text)
        cert, private = the_ca.issue(ident, sans=sans)
        assert _root is not None
        out = _root / "ids" / f"{len(_issued)}"
        paths = pki.write_identity(out, ident, cert, private, the_ca.load()[0])
        _issued[key] = Files(ident, paths["cert"], paths["key"], the_ca.cert_path, the_ca.crl_path)
    return _issued[key]


def fresh(text: str, sans: Sequence[str] = ()) -> Files:
    """A new certificate for ``text`` (for a test that revokes it)."""
    _issued.pop((text, tuple(sans)), None)
    return identity(text, sans)


def component_identity(text: str, host: str = "127.0.0.1") -> Files:
    """An SDS's or SDC's identity, valid for loopback and ``host`` (its control port
    serves HTTPS with it)."""
    return identity(text, tuple(dict.fromkeys((*LOOPBACK_SANS, host))))


def mdm_identity(host: str) -> Files:
    """The MDM's identity, valid for loopback and ``host``."""
    return identity("mdm:mdm1", tuple(dict.fromkeys((*LOOPBACK_SANS, host))))


def context(text: str | None) -> ssl.SSLContext:
    """A client context that trusts the CA (with its CRL) and presents ``text``'s
    certificate (``None``: no certificate). Made anew for each call."""
    the_ca = ca()
    if text is None:
        return pki.client_context(the_ca.cert_path, crl=the_ca.crl_path)
    files = identity(text)
    return pki.client_context(the_ca.cert_path, cert=files.cert, key=files.key, crl=files.crl)


def admin_context() -> ssl.SSLContext:
    """The context the harness uses for HTTPS by default: ``admin:tests`` (cached)."""
    if ADMIN not in _contexts:
        _contexts[ADMIN] = context(ADMIN)
    return _contexts[ADMIN]


#: The identity the tests present on a data port for each role of the data protocol
#: (an SDS takes client IO only from an SDC, replica writes only from an SDS, raw
#: reads from an admin or an SDS): wire.tls.KIND_OPS.
ROLE_IDENTITY = {
    PeerRole.CLIENT: "sdc:tests-client",
    PeerRole.SDS_PEER: "sds:tests-peer",
    PeerRole.TOOL: ADMIN,
}


def data_context(enabled: bool = True, text: str = ADMIN) -> ssl.SSLContext | None:
    """A context for dialling the data ports of test SDSs as ``text`` (``admin:tests``
    by default), for TLS data ports (the harness's SDSs with ``enabled``: their MDM
    serves TLS, so they have certificates); ``None`` (plain TCP) otherwise."""
    if not enabled:
        return None
    key = f"data {text}"
    if key not in _contexts:
        files = identity(text)
        _contexts[key] = wire_tls.dial_context(files.ca, files.cert, files.key, files.crl)
    return _contexts[key]


def meshctl_env() -> dict[str, str]:
    """``MESHCTL_TLS_*`` for meshctl as ``admin:tests``."""
    files = identity(ADMIN)
    return {
        "MESHCTL_TLS_CA": str(files.ca),
        "MESHCTL_TLS_CERT": str(files.cert),
        "MESHCTL_TLS_KEY": str(files.key),
    }
