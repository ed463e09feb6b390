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

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import ssl
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from meshblock import pki
from meshblock.config import ConfigError


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: this component's certificate and the cluster CA (empty: no TLS)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    crl: str = ""
    # How often the CRL file is looked at; read again when it changed (and on SIGHUP).
    crl_reload_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.crl_reload_s > 0:
            raise ValueError("tls.crl_reload_s must be > 0")
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
    return MdmTls(follow_crl(context, tls), identity)


def control_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The TLS context of an SDS's or SDC's control port (``/health``, ``/metrics``):
    with a certificate in ``[tls]``, HTTPS with it (TLS 1.3); ``None`` (plain HTTP)
    without one. Client certificates are optional there (checked against the CA if
    sent), so that Prometheus can scrape with the CA's certificate alone; nothing on
    the port changes anything. A :class:`ConfigError` if the files cannot be used."""
    if not tls.cert:
        return None
    try:
        context = pki.server_context(
            Path(tls.cert),
            Path(tls.key),
            Path(tls.ca),
            crl=Path(tls.crl) if tls.crl else None,
            client_certs=pki.ClientCerts.OPTIONAL,
        )
    except pki.PkiError as exc:
        raise ConfigError(f"[tls] {exc}") from None
    return follow_crl(context, tls)


# --- a server's CRL, reloaded without a restart ------------------------------------


def _crls_in(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (during a CA rotation it holds both CAs' lists)."""
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + part for part in pem.split(marker)[1:]]
    if not blocks:
        raise pki.PkiError("it holds no PEM CRL")
    try:
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError as exc:
        raise pki.PkiError(f"it holds a CRL that cannot be parsed: {exc}") from None


def _issuer_of(
    crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]
) -> x509.Certificate:
    for ca in cas:
        public = ca.public_key()
        if (
            crl.issuer == ca.subject
            and isinstance(public, ec.EllipticCurvePublicKey)
            and crl.is_signature_valid(public)
        ):
            return ca
    raise pki.PkiError(f"its CRL of {crl.issuer.rfc4514_string()} is not signed by the CA")


@dataclass(frozen=True)
class CrlState:
    """What the CRL in force says: its numbers (by issuer), when the first of its lists
    expires, and the serials it revokes."""

    numbers: dict[str, int]
    next_update: dt.datetime | None
    revoked: frozenset[int]

    @classmethod
    def check(
        cls,
        pem: bytes,
        cas: Sequence[x509.Certificate],
        previous: CrlState | None,
        now: dt.datetime,
    ) -> CrlState:
        """The state of the CRLs in ``pem`` if each is signed by one of ``cas``, not
        expired, and not older (a lower CRL number) than the one in force for its CA;
        otherwise :class:`pki.PkiError`."""
        numbers: dict[str, int] = {}
        revoked: set[int] = set()
        ends: list[dt.datetime] = []
        for crl in _crls_in(pem):
            issuer = _issuer_of(crl, cas).subject.rfc4514_string()
            end = crl.next_update_utc
            if end is None or end <= now:
                raise pki.PkiError(f"its CRL of {issuer} has expired (next update {end})")
            number = pki.crl_number(crl)
            before = previous.numbers.get(issuer) if previous is not None else None
            if before is not None and number < before:
                raise pki.PkiError(
                    f"its CRL of {issuer} is number {number}, older than the {before} in force"
                )
            numbers[issuer] = number
            ends.append(end)
            revoked.update(r.serial_number for r in crl)
        return cls(numbers, min(ends), frozenset(revoked))


class CrlFile:
    """A CRL file read again without a restart: what the list in force says
    (:attr:`state`), and the counts of its reloads.

    :meth:`watch` re-reads the file when its modification time, size or inode
    changes; :meth:`reload` does it at once (SIGHUP). A new list is taken only if
    :meth:`CrlState.check` passes (signed by the CA, not expired, not older) and
    :meth:`apply` can put it in force; otherwise the one in force stays (an error in
    the log, and :attr:`reload_failures`). Subclasses say how a list is put in force.
    """

    def __init__(self, crl: Path | None, ca: Path, log: logging.Logger) -> None:
        self.crl = crl
        self.ca = ca
        self._log = log
        self.state: CrlState | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_ok = True
        self._stamp = self._stat()
        if crl is None:  # nothing to reload
            return
        try:
            self.state = CrlState.check(crl.read_bytes(), self._cas(), None, _utcnow())
        except (OSError, pki.PkiError) as exc:  # OpenSSL loaded it: it decides
            log.warning("the CRL %s in force: %s", crl, exc)

    def apply(self) -> None:
        """Put the list now in the file in force (raises what it cannot use)."""
        raise NotImplementedError

    def _cas(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.ca.read_bytes())

    def _stat(self) -> tuple[int, int, int] | None:
        if self.crl is None:
            return None
        try:
            st = self.crl.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, why: str) -> bool:
        """Read the CRL again; True if the new one is in force."""
        if self.crl is None:
            return False
        self._stamp = self._stat()
        try:
            state = CrlState.check(self.crl.read_bytes(), self._cas(), self.state, _utcnow())
            self.apply()
        except (OSError, ValueError, pki.PkiError) as exc:
            self.reload_failures += 1
            self.last_reload_ok = False
            self._log.error(
                "CRL %s not reloaded (%s), keeping the one in force: %s", self.crl, why, exc
            )
            return False
        self.state = state
        self.reloads += 1
        self.last_reload_ok = True
        self._log.info(
            "CRL %s reloaded (%s): number %s, %d revoked, next update %s",
            self.crl,
            why,
            ",".join(str(n) for n in state.numbers.values()),
            len(state.revoked),
            state.next_update.isoformat() if state.next_update else "none",
        )
        return True

    def check(self) -> bool:
        """Reload if the file changed since it was last read; True if reloaded."""
        if self.crl is None or self._stat() == self._stamp:
            return False
        return self.reload("the file changed")

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.check()

    def revoked_peer(self, peercert: Mapping[str, Any] | None) -> bool:
        """Whether a connection's certificate (``getpeercert()``) is revoked by the CRL
        in force (a connection opened before the reload)."""
        if not peercert or self.state is None:
            return False
        serial = peercert.get("serialNumber")
        return isinstance(serial, str) and int(serial, 16) in self.state.revoked

    def collector(self, prefix: str) -> Collector:
        """Prometheus metrics of the CRL, named ``<prefix>_crl_...``."""
        return _CrlCollector(self, prefix)


class ServerTls(CrlFile):
    """A TLS server context whose CRL is read again without a restart.

    The server is given :attr:`context` once. Its SNI callback (which OpenSSL calls in
    every handshake, also when the client sends no server name) hands each new
    connection the context built from the newest CRL that passed the checks of
    :class:`CrlFile`: so after a reload, a new connection with a revoked certificate
    is refused in the handshake. Connections already open keep their handshake; a
    server refuses their requests with :meth:`revoked_peer`.
    """

    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        crl: Path | None,
        client_certs: pki.ClientCerts,
        *,
        log: logging.Logger,
    ) -> None:
        self._build = partial(pki.server_context, cert, key, ca, client_certs=client_certs)
        self.context = self._build(crl=crl)
        self._current = self.context
        super().__init__(crl, ca, log)
        if crl is not None:
            self.context.sni_callback = self._choose

    def _choose(self, conn: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        if ctx is not self._current:
            conn.context = self._current

    def apply(self) -> None:
        self._current = self._build(crl=self.crl)


class CrlReloader(CrlFile):
    """The CRL of every TLS context of a process that loaded one file: the SDS's, the
    SDC's and MGMT's contexts to the MDM, their control ports', and any other a
    component builds (:func:`crl_reloader`, then :meth:`add`).

    A reload loads the new list into each context in place (``load_verify_locations``):
    OpenSSL then holds both and checks each handshake against the one with the latest
    ``last_update`` (the CA dates each list at least a second after the one before,
    :func:`meshblock.pki.make_crl`), so a new connection to or from a revoked
    certificate is refused without the context being replaced (an aiohttp connector,
    a server, keep theirs). Connections already open keep their handshake.
    """

    def __init__(self, crl: Path, ca: Path, log: logging.Logger) -> None:
        super().__init__(crl, ca, log)
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()

    def add(self, context: ssl.SSLContext) -> ssl.SSLContext:
        """Reload ``context`` (built with this CRL) too, as long as it is in use."""
        self._contexts.add(context)
        return context

    def apply(self) -> None:
        contexts = list(self._contexts)
        try:
            for context in contexts:
                context.load_verify_locations(cafile=str(self.crl))
        except ssl.SSLError as exc:
            raise pki.PkiError(f"OpenSSL cannot load it: {exc.reason}") from None


_RELOADERS: dict[Path, CrlReloader] = {}
_log = logging.getLogger("meshblock.tls")


def crl_reloader(tls: TlsConfig) -> CrlReloader | None:
    """The reloader of ``[tls] crl`` (one per file and process); None without one."""
    if not tls.crl:
        return None
    key = Path(tls.crl).absolute()
    reloader = _RELOADERS.get(key)
    if reloader is None:
        reloader = _RELOADERS[key] = CrlReloader(Path(tls.crl), Path(tls.ca), _log)
    return reloader


def follow_crl(context: ssl.SSLContext, tls: TlsConfig) -> ssl.SSLContext:
    """``context``, built with ``[tls] crl``, kept up to date with it from now on (by
    :func:`crl_reload`'s task): every TLS context a component builds with its CRL goes
    through here (the MDM link, the control port, the data path)."""
    reloader = crl_reloader(tls)
    return reloader.add(context) if reloader is not None else context


def crl_reload(
    tls: TlsConfig,
    daemon: str,
    registry: Callable[[web.Application], CollectorRegistry] | None = None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An app's cleanup context that keeps ``[tls] crl`` in force in every context of
    the process built from it: read again every ``crl_reload_s`` when the file
    changed, and at once on SIGHUP (in the main thread only; elsewhere, the polling
    alone), with ``meshblock_<daemon>_tls_crl_*`` metrics in ``registry(app)``.
    Nothing without a CRL."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        reloader = crl_reloader(tls)
        if reloader is None:
            yield
            return
        metrics = reloader.collector(f"meshblock_{daemon}_tls")
        if registry is not None:
            registry(app).register(metrics)
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
            hup = True
        except (RuntimeError, ValueError):  # not the main thread's loop
            hup = False
        task = asyncio.create_task(reloader.watch(tls.crl_reload_s), name="crl-reload")
        try:
            yield
        finally:
            if registry is not None:
                registry(app).unregister(metrics)
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _CrlCollector(Collector):
    def __init__(self, tls: CrlFile, prefix: str) -> None:
        self._tls = tls
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p, t = self._prefix, self._tls
        if t.state is not None and t.state.next_update is not None:
            yield GaugeMetricFamily(
                f"{p}_crl_next_update_timestamp_seconds",
                "When the CRL in force expires (every client is refused after it)",
                value=t.state.next_update.timestamp(),
            )
        yield CounterMetricFamily(
            f"{p}_crl_reloads", "CRL reloads that took effect", value=t.reloads
        )
        yield CounterMetricFamily(
            f"{p}_crl_reload_failures",
            "CRL reloads refused (unreadable, unparsable, unverified, expired or older)",
            value=t.reload_failures,
        )
        yield GaugeMetricFamily(
            f"{p}_crl_last_reload_ok",
            "1 if the last CRL reload (or the start) took effect, 0 if it was refused",
            value=1 if t.last_reload_ok else 0,
        )
