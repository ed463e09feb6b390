"""The SDS's data-protocol listener and its connections (``docs/protocol.md``).

A :class:`DataConnection` runs the server side of the handshake, which negotiates
the protocol version, then decodes requests in that version's format and hands them
to :class:`~meshblock.sds.io_path.DataService`. A peer that
breaks the protocol (bad magic, unknown opcode, oversized payload, a failed or slow
handshake) gets its connection dropped with one log line saying why; nothing it sent
in an incomplete frame is applied, and other connections carry on.

With a TLS context the port serves only TLS with client
certificates of the cluster CA (:mod:`meshblock.wire.tls`): :class:`DataServer`
accepts each connection itself, looks at its first bytes (a plain client gets the
``TLS_REQUIRED`` refusal), runs the TLS handshake and logs a refused one with the
client's address and reason; each :class:`DataConnection` knows the
:class:`~meshblock.pki.Identity` its client's certificate names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from meshblock import pki
from meshblock.sds.io_path import DataService
from meshblock.wire.csum import CSUM_CRC32C, CSUM_SHIFT
from meshblock.wire.framing import FramedConnection
from meshblock.wire.handshake import SERVER_FEATURES, ServerHandshake, tls_required
from meshblock.wire.protocol import (
    HANDSHAKE_TIMEOUT_S,
    MAX_IN_FLIGHT,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    WIRE_V1,
    Feature,
    Op,
    Request,
    Status,
    WireFormat,
    wire_format,
)
from meshblock.wire.tls import allowed_ops, is_tls_record, is_wire_hello

log = logging.getLogger(__name__)

#: The refused requests of a connection logged one by one (then every thousandth).
LOGGED_REFUSALS = 10
_NOT_PERMITTED = int(Status.NOT_PERMITTED)


class DataConnection(FramedConnection):
    """One client, peer or tool connected to the data port."""

    def __init__(
        self,
        service: DataService,
        secret: bytes,
        connections: set[DataConnection],
        *,
        features: int = SERVER_FEATURES,
        max_version: int = PROTOCOL_VERSION,
        min_version: int = MIN_PROTOCOL_VERSION,
    ) -> None:
        super().__init__()
        self._svc = service
        self._connections = connections
        self._hs: ServerHandshake | None = ServerHandshake(
            secret, features, max_version=max_version, min_version=min_version
        )
        self._fixed_need = self._hs.need
        self._use(WIRE_V1)  # until the handshake has chosen
        self.allowed: frozenset[int] = frozenset()
        self.role = "unauthenticated"
        #: The identity of the client's certificate (None: a plain-TCP data port).
        self.identity: pki.Identity | None = None
        self.refusals = 0  # requests answered NOT_PERMITTED
        self._refusing = False
        #: The name of the SDS the client's certificate names (None: not an SDS, or no
        #: TLS): a replica write is taken only from the PG's primary (io_path).
        self.peer_sds: str | None = None
        #: The GUID of the SDC the client's certificate names (None: not an SDC, or no
        #: TLS): its client IO is checked against the mappings (io_path, sds/access.py).
        self.sdc_guid: str | None = None
        self.in_flight = 0
        self._reading_paused = False
        self._writing_paused = False
        self._timer: asyncio.TimerHandle | None = None

    # -- life cycle -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timeout)
        self._svc.stats.connections += 1
        self._connections.add(self)
        if transport.get_extra_info("ssl_object") is not None:
            try:
                self.identity = pki.identity_from_peercert(transport.get_extra_info("peercert"))
            except pki.PkiError as exc:
                self._refuse(f"its certificate names no identity: {exc}")
            else:
                if self.identity.kind == pki.Kind.SDS:
                    self.peer_sds = self.identity.name
                elif self.identity.kind == pki.Kind.SDC:
                    self.sdc_guid = self.identity.name

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hs is not None and not self._closing and not self.bytes_received:
            # A port probe (the MDM confirming a failure report, a load balancer's
            # health check): it connected and left without a word.
            log.debug("connection from %s closed before the handshake (a probe)", self.peer)
            self._closing = True
        elif self._hs is not None and not self._closing:
            self._refuse("the client left during the handshake (does it hold another secret?)")
        elif not self._closing and self._end > self._start:
            log.warning(
                "data connection from %s (%s) closed in the middle of a frame; "
                "%d bytes discarded, nothing applied",
                self.peer,
                self.role,
                self._end - self._start,
            )
            self._svc.stats.protocol_errors += 1
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self._svc.stats.connections -= 1
        if self._hs is None:  # authenticated: counted by version
            self._svc.stats.authenticated_closed(self.version, self.role)
        self._connections.discard(self)
        if exc is not None:
            log.debug("connection from %s lost: %s", self.peer, exc)

    def _handshake_timeout(self) -> None:
        if self._hs is not None:
            self._refuse(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s")

    def _refuse(self, reason: str) -> None:
        log.warning("refusing data connection from %s: %s", self.peer, reason)
        self._svc.stats.handshake_failures += 1
        self.close()

    def _on_broken(self, exc: Exception) -> None:
        if self._hs is not None:
            self._refuse(f"bad handshake: {exc}")
            return
        log.warning("dropping data connection from %s (%s): %s", self.peer, self.role, exc)
        self._svc.stats.protocol_errors += 1

    # -- handshake --------------------------------------------------------------------

    def _on_message(self, msg: memoryview) -> None:
        hs = self._hs
        assert hs is not None
        if hs.role is None and is_tls_record(msg):
            self._fixed_need = 0
            self._refuse(
                "the client speaks TLS, but this data port is plain TCP (no certificate "
                "in [tls], or [data] tls = false)"
            )
            return
        out, reason = hs.feed(msg)
        if out:
            self.send_now(out)
        self._fixed_need = hs.need
        if reason is not None:
            self._fixed_need = 0
            self._refuse(reason)
            return
        if hs.need:
            return
        assert hs.role is not None
        self.allowed = allowed_ops(self.identity, hs.role)
        self.role = hs.role.name.lower()
        self._hs = None
        self._use(wire_format(hs.version, hs.features))
        self._svc.stats.authenticated(self.version, self.role)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        log.debug(
            "data connection from %s (%s) authenticated as %s, protocol version %d",
            self.peer,
            self.identity or "no certificate",
            self.role,
            hs.version,
        )

    def _use(self, fmt: WireFormat) -> None:
        """Frame with ``fmt`` from now on (chosen once per connection): requests are
        unpacked and checked (``_payload_length``) and replies packed with it."""
        self.version = fmt.version
        self.header = fmt.request
        self._payload_length = fmt.request_length
        self._typed = fmt.typed_request
        self._pack_reply = fmt.pack_reply
        if fmt.csum:
            self._pack_reply_csum = fmt.pack_reply_csum

    # -- requests ---------------------------------------------------------------------

    def _on_frame(self, hdr: tuple[Any, ...], payload: memoryview) -> None:
        self.in_flight += 1
        if self.in_flight >= MAX_IN_FLIGHT:
            self._update_reading()
        req = self._typed(hdr)
        if req.opcode not in self.allowed:
            self.refuse(req, f"not an operation of {self.identity or 'its'} role {self.role}")
            return
        self._svc.handle(self, req, payload)

    def refuse(self, req: Request, why: str) -> None:
        """Answer ``req`` NOT_PERMITTED (nothing done), logged with the identity."""
        try:
            op = Op(req.opcode).name
        except ValueError:
            op = f"opcode {req.opcode}"
        self._log_refusal(f"{op} (volume {req.volume_id} chunk {req.chunk_index})", why, op, req)
        self._refusing = True
        self.reply(req.request_id, _NOT_PERMITTED, 0)
        self._refusing = False

    def _log_refusal(self, what: str, why: str, op: str, req: Request | None) -> None:
        """Count a refused request, and log it with the identity: the first
        :data:`LOGGED_REFUSALS` of the connection, then every thousandth; every one
        goes to the audit log, summarised (sds/refusals.py)."""
        audit = self._svc.refusal_audit
        if audit is not None:
            who = str(self.identity or f"a plain-TCP {self.role}")
            audit.note(who, str(self.peer), op, None if req is None else req.volume_id, why)
        self.refusals += 1
        self._svc.stats.refused_requests += 1
        n = self.refusals
        if n <= LOGGED_REFUSALS or n % 1000 == 0:
            log.warning(
                "refused %s from %s at %s (refusal %d of this connection): %s",
                what,
                self.identity or f"a plain-TCP {self.role}",
                self.peer,
                n,
                why,
            )

    def reply(
        self,
        request_id: int,
        status: int,
        epoch: int,
        flags: int = 0,
        payload: memoryview | None = None,
        length: int = -1,
    ) -> None:
        """Queue the reply to ``request_id`` (dropped if the connection is gone).
        ``length`` (a READ that asked for its checksums, on a connection with
        ``CSUM_CRC32C``): ``payload`` is that many bytes followed by their packed
        checksums, in one buffer, so that they leave in one write."""
        self.in_flight -= 1
        if status == _NOT_PERMITTED and not self._refusing:
            self._log_refusal(
                f"request {request_id}",
                "a replica write or copy from an SDS "
                "that is not the PG's primary in this SDS's map",
                "replica write, copy or mark",
                None,
            )
        if self._closing:
            return
        if length > 0 and payload is not None:
            pack = self._pack_reply_csum
            self.send(pack(status, flags, request_id, epoch, length, CSUM_CRC32C, CSUM_SHIFT))
            self.send(payload)
        else:
            n = len(payload) if payload is not None else 0
            self.send(self._pack_reply(status, flags, request_id, epoch, n))
            if payload is not None and n:
                self.send(payload)
        if self._reading_paused:
            self._update_reading()

    # -- back-pressure: stop reading while the peer does not read our replies ---------

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self._closing:
            return
        # Pause at MAX_IN_FLIGHT requests, resume below half of it.
        limit = MAX_IN_FLIGHT // 2 if self._reading_paused else MAX_IN_FLIGHT
        want_pause = self._writing_paused or self.in_flight >= limit
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()


class DataServer:
    """The listener on the data port and its open connections."""

    def __init__(
        self,
        service: DataService,
        secret: str,
        *,
        min_version: int = MIN_PROTOCOL_VERSION,
        max_version: int = PROTOCOL_VERSION,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: serve TLS only, with client certificates required (None: plain
        TCP); ``min_version``: the ``wire_min_version`` setting, clients offering an
        older protocol version are refused; ``max_version``: the newest version
        spoken (1: as a server of the release before version 2, for tests).

        The features announced are this release's, less ``CSUM_CRC32C`` when the
        store keeps no checksums (``[store] checksums = false``): with nothing on disk
        to check a payload against, the wire's checksums would only cost CPU on both
        sides, and that setting exists to measure what checksums cost."""
        self._svc = service
        self._features = SERVER_FEATURES
        if not service.store_checksums:
            self._features &= ~int(Feature.CSUM_CRC32C)
        self._secret = secret.encode()
        self._min_version = min_version
        self._max_version = max_version
        self._server: asyncio.Server | None = None
        self.tls = tls
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()
        self.connections: set[DataConnection] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        if self.tls is None:
            self._server = await loop.create_server(self._make, host, port, reuse_address=True)
            log.info("data protocol listening on %s:%d (plain TCP)", host, port)
            return
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._accepting = loop.create_task(self._accept(sock), name="data-accept")
        log.info("data protocol listening on %s:%d (TLS, client certificates required)", host, port)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and the like: do not spin
                log.error("data port: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._admit(conn, address))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _admit(self, conn: socket.socket, address: Any) -> None:
        """Look at the first bytes of a new connection, then run the TLS handshake."""
        assert self.tls is not None
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        conn.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                head = await _peek(conn, 4)
                if not head:  # a port probe: connected and left
                    conn.close()
                    return
                if is_wire_hello(head):
                    with contextlib.suppress(OSError):
                        conn.send(tls_required(self._max_version))
                    conn.close()
                    self._refused(peer, "a plain-TCP client: this data port serves only TLS")
                    return
                await loop.connect_accepted_socket(
                    self._make,
                    conn,
                    ssl=self.tls,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                )
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            self._refused(peer, f"its certificate was refused: {exc.verify_message}")
        except ssl.SSLError as exc:
            conn.close()
            if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
                self._refused(peer, "it presented no certificate (one of the cluster CA's needed)")
            else:
                self._refused(peer, f"TLS handshake failed: {exc.reason or exc}")
        except TimeoutError:
            conn.close()
            self._refused(peer, f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:.0f} s")
        except OSError as exc:
            conn.close()
            log.debug("data connection from %s lost during the TLS handshake: %s", peer, exc)
        except asyncio.CancelledError:  # the server stops
            conn.close()
            raise

    def _refused(self, peer: str, reason: str) -> None:
        log.warning("refusing data connection from %s: %s", peer, reason)
        self._svc.stats.handshake_failures += 1

    def _make(self) -> DataConnection:
        return DataConnection(
            self._svc,
            self._secret,
            self.connections,
            features=self._features,
            max_version=self._max_version,
            min_version=self._min_version,
        )

    @property
    def port(self) -> int:
        if self._listener is not None:
            bound: int = self._listener.getsockname()[1]
            return bound
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish, close every connection."""
        if self._server is not None:
            self._server.close()
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._admitting):
            task.cancel()
        if self._admitting:
            await asyncio.gather(*self._admitting, return_exceptions=True)
        await self._svc.drain()
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


async def _peek(conn: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes of what ``conn`` received, left in its queue (b"": closed)."""
    loop = asyncio.get_running_loop()
    fd = conn.fileno()
    while True:
        try:
            return conn.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
