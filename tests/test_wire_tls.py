"""The data protocol over mutually authenticated TLS, on loopback: the SDS's data
server (in this process, on a real store file) serving TLS with client certificates
required, and the asyncio client (``meshblock.wire.tls``, docs/protocol.md §2.1).

A client with a certificate of the cluster CA writes and reads, and the server knows
its identity; a client without a certificate, with another CA's, or with a revoked
one is refused in the handshake, the refusal logged with its reason and nothing
written; a plain client at a TLS port and a TLS client at a plain port each fail at
once with an error that says so; a server whose certificate names no SDS is refused
by the client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import _tls
from _wire import EPOCH, PG_COUNT, POOL, SECRET, sds_server
from meshblock import pki
from meshblock.chunks import ChunkRef, pg_of
from meshblock.mdm import holddown
from meshblock.sds.server import DataServer
from meshblock.sds.state import SdsState
from meshblock.wire import tls as wire_tls
from meshblock.wire.client import WireClient
from meshblock.wire.handshake import HandshakeError
from meshblock.wire.protocol import PeerRole

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

VOLUME = 7
REF = ChunkRef(POOL, pg_of(VOLUME, 0, PG_COUNT), EPOCH, VOLUME, 0)


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The test run in its own event loop (the suite has no async plugin)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def server_tls(identity: str = "sds:sds1") -> ssl.SSLContext:
    files = _tls.component_identity(identity)
    return pki.server_context(files.cert, files.key, files.ca, crl=files.crl)


def dial(identity: str) -> ssl.SSLContext:
    files = _tls.identity(identity)
    return wire_tls.dial_context(files.ca, files.cert, files.key, files.crl)


@asynccontextmanager
async def tls_server(
    tmp_path: Path, identity: str = "sds:sds1"
) -> AsyncIterator[tuple[DataServer, SdsState]]:
    async with sds_server(tmp_path, tls=server_tls(identity)) as (server, sds):
        yield server, sds


async def connect(
    server: DataServer, tls: ssl.SSLContext | None, role: PeerRole = PeerRole.CLIENT
) -> WireClient:
    return await WireClient.connect(
        "127.0.0.1", server.port, SECRET, role, connect_timeout=5.0, tls=tls
    )


async def refused(server: DataServer, tls: ssl.SSLContext | None) -> str:
    """The error of a connection and a write that must be refused."""
    with pytest.raises(HandshakeError) as info:
        client = await connect(server, tls)
        try:
            await client.write(REF, 0, b"x" * 4096)
        finally:
            await client.close()
    return str(info.value)


def chunk_written(sds: SdsState) -> bool:
    return sds.store.location(VOLUME, 0) is not None


@synchronous
async def test_client_with_a_cluster_certificate_writes_and_reads(tmp_path: Path) -> None:
    async with tls_server(tmp_path) as (server, sds):
        # the volume mapped to this SDC, as the MDM's mappings document would say
        volumes = [{"id": VOLUME, "sdcs": [{"guid": "tls-good", "read_only": False}]}]
        sds.access.update({"pool_id": POOL, "epoch": 1, "volumes": volumes})
        client = await connect(server, dial("sdc:tls-good"))
        try:
            await client.write(REF, 0, b"a" * 8192)
            assert bytes(await client.read(REF, 0, 8192)) == b"a" * 8192
            assert client._p.transport is not None
            assert client._p.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            (conn,) = server.connections
            assert conn.identity == pki.Identity.parse("sdc:tls-good")
        finally:
            await client.close()


@synchronous
async def test_server_knows_the_identity_of_its_client(tmp_path: Path) -> None:
    async with tls_server(tmp_path) as (server, _sds):
        client = await connect(server, dial("sds:peer9"), PeerRole.SDS_PEER)
        try:
            await client.ping()
            (conn,) = server.connections
            assert conn.identity == pki.Identity.parse("sds:peer9")
        finally:
            await client.close()


@synchronous
async def test_no_certificate_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = _tls.ca()
    no_cert = pki.client_context(ca.cert_path, crl=ca.crl_path)
    no_cert.check_hostname = False
    async with tls_server(tmp_path) as (server, sds):
        with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
            error = await refused(server, no_cert)
            assert "refused our certificate" in error
            assert "refusing data connection from 127.0.0.1" in caplog.text
            assert "it presented no certificate" in caplog.text
        assert sds.stats.handshake_failures == 1
        assert not chunk_written(sds)
        assert not server.connections


@synchronous
async def test_another_cas_certificate_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = pki.Ca.init(tmp_path / "other-ca", common_name="another CA")
    ident = pki.Identity.parse("sdc:intruder")
    cert, key = other.issue(ident)
    paths = pki.write_identity(tmp_path / "intruder", ident, cert, key, other.load()[0])
    ca = _tls.ca()  # it trusts our CA, presents the other's certificate
    ctx = wire_tls.dial_context(ca.cert_path, paths["cert"], paths["key"])
    async with tls_server(tmp_path) as (server, sds):
        with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
            error = await refused(server, ctx)
            assert "refused our certificate" in error
            assert "its certificate was refused: unable to get local issuer" in caplog.text
        assert not chunk_written(sds)


@synchronous
async def test_revoked_certificate_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _tls.fresh("sdc:revoked-in-tls")
    _tls.ca().revoke(files.serial())
    ctx = wire_tls.dial_context(files.ca, files.cert, files.key)
    async with tls_server(tmp_path) as (server, sds):
        with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
            error = await refused(server, ctx)
            assert "refused our certificate" in error
            assert "its certificate was refused: certificate revoked" in caplog.text
        assert not chunk_written(sds)


@synchronous
async def test_plain_client_at_a_tls_port_is_told_tls_is_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with tls_server(tmp_path) as (server, sds):
        with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
            async with asyncio.timeout(5):
                error = await refused(server, None)
        assert "TLS_REQUIRED" in error
        assert "a plain-TCP client: this data port serves only TLS" in caplog.text
        assert not chunk_written(sds)


@synchronous
async def test_tls_client_at_a_plain_port_fails_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sds_server(tmp_path) as (server, sds):
        with caplog.at_level(logging.WARNING, logger="meshblock.sds.server"):
            async with asyncio.timeout(5):
                error = await refused(server, dial("sdc:tls-good"))
        assert "TLS handshake with SDS at 127.0.0.1" in error
        assert "plain TCP" in error
        assert "the client speaks TLS, but this data port is plain TCP" in caplog.text
        assert not chunk_written(sds)


@synchronous
async def test_server_certificate_naming_no_sds_is_refused(tmp_path: Path) -> None:
    async with tls_server(tmp_path, identity="sdc:not-an-sds") as (server, sds):
        error = await refused(server, dial("sdc:tls-good"))
        assert "expected sds" in error
        assert not chunk_written(sds)


@synchronous
async def test_mdm_probe_over_tls_and_its_plain_fallback(tmp_path: Path) -> None:
    """The MDM's hold-down probe dials with its certificate; a plain data port (an SDS
    without a certificate) answers the plain probe that follows; a probe without a
    certificate gets nothing from a TLS port."""
    mdm = dial("mdm:mdm1")
    (tmp_path / "plain").mkdir()
    async with tls_server(tmp_path) as (server, _):
        assert await holddown.probe("127.0.0.1", server.port, SECRET, 5.0, tls=mdm)
        assert not await holddown.probe("127.0.0.1", server.port, SECRET, 5.0)
    async with sds_server(tmp_path / "plain") as (server, _):
        assert await holddown.probe("127.0.0.1", server.port, SECRET, 5.0, tls=mdm)
        assert await holddown.probe("127.0.0.1", server.port, SECRET, 5.0)
