"""The asyncio client of the data protocol, for the SDC, SDS peers and tools.

>>> client = await WireClient.connect("10.0.0.5", 7072, secret, PeerRole.CLIENT)
>>> ref = ChunkRef(pool, pg, epoch, volume, chunk)  # meshblock.chunks
>>> await client.write(ref, offset, data, fua=False)
>>> data = await client.read(ref, offset, length)
>>> await client.close()

One connection carries many requests at once (up to ``MAX_IN_FLIGHT``; further
callers wait for a free slot): call the methods from as many coroutines as you like.
Replies arrive in any order and are matched by request id.

Every request goes out through :meth:`WireClient.submit`, the one submit path: the
coroutine methods wait for a free in-flight slot, submit, and raise a failed status;
callers that must not wait (an SDS forwarding a write before doing its own part, the
SDC's IO path) submit themselves and get the :class:`Reply`, status included, in an
``asyncio.Future`` or in a waiter of their own (:class:`ReplyWaiter`) that the
receive path completes at once.

Sending is batched. Requests queued in one event-loop pass leave in one socket write;
and a request without a large payload that finds earlier requests of the connection
still unanswered on the wire waits for the next reply (or ``COALESCE_S``) and leaves
together with the requests queued meanwhile. Under load this turns one small write,
and one wake-up of the SDS, per request into one per batch: on a busy host each
socket write that wakes a sleeping peer costs tens of microseconds
(docs/performance.md). A request on an idle connection leaves at once.

Errors (every one has ``retriable``):

- :class:`RequestError`: the SDS refused or failed this request; ``status`` is a
  :class:`~meshblock.wire.protocol.Status` and ``epoch`` the SDS's map epoch of the
  pool (on ``EPOCH_STALE``: refresh the map from the MDM until its epoch is at least
  that, then retry). The connection stays usable.
- :class:`ConnectionLost`: the connection closed (or timed out) before the reply;
  retriable; ``__cause__`` is what closed it. Every later call raises it at once:
  connect again.
- :class:`~meshblock.wire.handshake.HandshakeError` (from :meth:`WireClient.connect`):
  wrong cluster secret, version or role, or a server that broke the handshake's
  protocol (``__cause__``: the :class:`~meshblock.wire.protocol.ProtocolError`); not
  retriable. It is a :class:`WireError` too, as every error above.
- ``OSError`` / ``TimeoutError`` from :meth:`WireClient.connect`: the SDS cannot be
  reached; :class:`ConnectionLost` from it: the SDS accepted the connection, then
  closed it before the handshake completed.

Payloads: ``data`` for writes may be any bytes-like object (it is not copied; keep it
unchanged until the call returns). Reads return a read-only ``memoryview`` into the
connection's receive buffer (or into a shared buffer of zeroes for unallocated ranges);
it stays valid as long as you hold it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import socket
import ssl
import time
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from meshblock import pki
from meshblock.chunks import CHUNK_SIZE, ChunkRef
from meshblock.wire import csum
from meshblock.wire.framing import BIG_PART, EMPTY, Buffer, FramedConnection
from meshblock.wire.handshake import ClientHandshake, HandshakeError, VersionUnsupported
from meshblock.wire.protocol import (
    CHUNK_ENTRY,
    HANDSHAKE_TIMEOUT_S,
    MAX_CHUNK_INDEX,
    MAX_IN_FLIGHT,
    MAX_PAYLOAD,
    MIN_PROTOCOL_VERSION,
    OPS_WITH_PAYLOAD,
    PROTOCOL_VERSION,
    WIRE_V1,
    Op,
    PeerRole,
    ProtocolError,
    ReplyFlag,
    ReqFlag,
    Status,
    WireFormat,
    wire_format,
)
from meshblock.wire.protocol import WireError as WireError  # re-exported (its old home)
from meshblock.wire.tls import check_server

log = logging.getLogger(__name__)

#: Read-only zeroes returned for holes; slices of it are free.
ZEROES: Final = memoryview(bytes(CHUNK_SIZE))
_HOLE: Final = int(ReplyFlag.HOLE)
_FUA: Final = int(ReqFlag.FUA)
#: The opcodes whose reply waits for a whole-device sync (as does any FUA request).
_SYNC_OPS: Final = frozenset({int(Op.FLUSH), int(Op.REPL_FLUSH)})
#: Request flags whose reply waits for a device sync: FUA, and HEAL (defined for
#: CHUNK_CSUMS only: the peer repairs its bad blocks and syncs before it answers).
_SYNC_FLAGS: Final = int(ReqFlag.FUA) | int(ReqFlag.HEAL)
_READ: Final = int(Op.READ)
#: The opcodes whose payload carries checksums (a forwarder hands every op a payload
#: view, empty for WRITE_ZEROES and TRIM).
_WITH_PAYLOAD: Final = frozenset(int(op) for op in OPS_WITH_PAYLOAD)
_MISMATCH: Final = int(Status.CHECKSUM_MISMATCH)
_CSUM: Final = csum.CSUM_CRC32C
_SHIFT: Final = csum.CSUM_SHIFT
#: The longest a small request waits for a reply to leave with (the event loop's
#: timers resolve to about 1 ms, so in practice up to that).
COALESCE_S: Final = 0.0005
#: Entries asked for per CHUNK_LIST request (the largest reply that fits MAX_PAYLOAD).
LIST_PAGE: Final = MAX_PAYLOAD // CHUNK_ENTRY.size


class RequestError(WireError):
    """The SDS answered this request with a non-OK status."""

    def __init__(self, op: Op, status: int, epoch: int) -> None:
        try:
            self.status: Status | int = Status(status)
            name = self.status.name
        except ValueError:
            self.status = status
            name = f"status {status}"
        self.op = op
        self.epoch = epoch
        super().__init__(f"{op.name} failed: {name} (server epoch {epoch})")

    @property
    def retriable(self) -> bool:  # type: ignore[override]
        return isinstance(self.status, Status) and self.status.retriable


class TlsRefused(HandshakeError):
    """The SDS closed a TLS connection before the data protocol's handshake: it
    refused our certificate, or it stopped just then (hence retriable)."""

    retriable = True


class ConnectionLost(WireError):
    """The connection closed before the reply; ``__cause__`` says why."""

    retriable = True


class RawChunk(NamedTuple):
    """One SDS's own copy of (a range of) a chunk."""

    allocated: bool  # False: the SDS holds no slot for it (reads as zeroes)
    data: memoryview


class Reply(NamedTuple):
    """A request's reply as the client hands it out (the payload is a view into the
    connection's receive buffer)."""

    status: int  # a Status; 0 (OK) for success
    flags: int  # ReplyFlag bits
    epoch: int  # the server's map epoch of the request's pool
    payload: memoryview


class ReplyWaiter(Protocol):
    """What waits for a submitted request's reply: an ``asyncio.Future[Reply]``, or any
    object with the same three methods. The receive path calls ``set_result`` (the
    reply) or ``set_exception`` (a :class:`ConnectionLost`) at once, at most once and
    only while ``done()`` is False: a waiter of one's own is completed without a
    callback scheduled or an extra event-loop pass. What they raise is logged."""

    def done(self) -> bool: ...

    def set_result(self, reply: Reply, /) -> None: ...

    def set_exception(self, exc: BaseException, /) -> None: ...


_W = TypeVar("_W", bound=ReplyWaiter)
#: Builds a Reply 90 ns faster than its class, whose ``__new__`` is a Python function.
_new_tuple: Final = tuple.__new__
#: The address of requests about no chunk (REPL_FLUSH).
_NO_CHUNK: Final = ChunkRef(0, 0, 0, 0, 0)


class _Protocol(FramedConnection):
    def __init__(self, handshake: ClientHandshake, ready: asyncio.Future[None]) -> None:
        super().__init__()
        self._handshake: ClientHandshake | None = handshake
        self._ready = ready
        self._fixed_need = handshake.need
        self._use(WIRE_V1)  # until the handshake has chosen
        self.pending: dict[int, ReplyWaiter] = {}
        self.lost: ConnectionLost | None = None
        self.last_rx = time.monotonic()
        # callers waiting for a free in-flight slot
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._unsent = 0  # requests queued in _out, not written yet
        self._coalesce: asyncio.TimerHandle | None = None
        # Replies whose payload did not match its checksums (answered CHECKSUM_MISMATCH)
        self.checksum_mismatches = 0

    def send_request(
        self, header: bytes, payload: Buffer | None, sums: Buffer | None = None
    ) -> None:
        """Queue one request (already in ``pending``); see the module doc on batching.
        ``sums``: the payload's checksums (CSUM_CRC32C), sent after it."""
        out = self._out
        out.append(header)
        if payload is not None:
            out.append(payload)
            if sums is not None:
                out.append(sums)
        self._unsent += 1
        if self._flush_pending:
            return
        if (payload is None or len(payload) < BIG_PART) and len(self.pending) > self._unsent:
            # Replies are due: leave with the next one (buffer_updated) or the timer.
            if self._coalesce is None:
                self._coalesce = self._loop.call_later(COALESCE_S, self._flush)
            return
        self._flush_pending = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._coalesce is not None:
            self._coalesce.cancel()
            self._coalesce = None
        self._unsent = 0
        super()._flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self._handshake is not None
        self.send_now(self._handshake.hello())

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        super().buffer_updated(nbytes)
        if self._unsent and not self._flush_pending:
            # Replies came: the requests that waited for them leave now.
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _on_message(self, msg: memoryview) -> None:
        hs = self._handshake
        assert hs is not None
        out = hs.feed(msg)
        if out:
            self.send_now(out)
        self._fixed_need = hs.need
        if hs.need:
            return
        self._handshake = None
        self._use(wire_format(hs.version, hs.features))
        if not self._ready.done():
            self._ready.set_result(None)

    def _use(self, fmt: WireFormat) -> None:
        """Frame with ``fmt`` from now on (chosen once per connection)."""
        self.format = fmt
        self.header = fmt.reply
        self._payload_length = fmt.reply_length
        self.pack_request = fmt.pack_request
        self.csum = fmt.csum
        if fmt.csum:
            self.pack_request_csum = fmt.pack_request_csum

    def _on_frame(self, hdr: tuple[Any, ...], payload: memoryview) -> None:
        # hdr: magic, status, flags, request id, epoch, length (the same positions in
        # every version), then the fields of the version
        fut = self.pending.pop(hdr[3], None)
        if fut is None:
            raise ProtocolError(f"reply to unknown request id {hdr[3]}")
        if self.waiters:
            self.wake_one()
        status = hdr[1]
        if self.csum and hdr[7]:  # the payload's checksums follow it: check them
            length = hdr[5]
            sums, payload = payload[length:], payload[:length]
            bad = csum.bad_units(payload, sums)
            if bad:
                self.checksum_mismatches += 1
                log.warning(
                    "reply from %s: payload does not match its checksums (4 KiB unit(s) %s of "
                    "%d bytes): answered as %s",
                    self.peer,
                    ", ".join(map(str, bad[:8])),
                    length,
                    Status.CHECKSUM_MISMATCH.name,
                )
                status, payload = _MISMATCH, EMPTY
        if not fut.done():  # a cancelled caller leaves a done future
            try:
                fut.set_result(_new_tuple(Reply, (status, hdr[2], hdr[4], payload)))
            except Exception:
                log.exception("error in a reply waiter")

    def _on_broken(self, exc: Exception) -> None:
        if not isinstance(exc, VersionUnsupported):  # connect() says it, and tries again
            log.warning("dropping data connection to %s: %s", self.peer, exc)
        self._fail_all(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._fail_all(exc or ConnectionResetError("connection closed by the server"))

    def _tls_silent(self) -> bool:
        """A TLS connection on which the server sent nothing of the data protocol."""
        t = self.transport
        return t is not None and bool(t.get_extra_info("ssl_object")) and not self.bytes_received

    def _fail_all(self, cause: BaseException) -> None:
        if self._coalesce is not None:
            self._coalesce.cancel()
            self._coalesce = None
        if self.lost is None:
            lost = ConnectionLost(f"data connection to {self.peer} lost: {cause}")
            lost.__cause__ = cause
            self.lost = lost
        if not self._ready.done():
            if isinstance(cause, HandshakeError):
                self._ready.set_exception(cause)
            elif isinstance(cause, ProtocolError):
                # The peer broke the handshake: for the callers of connect() that is a
                # failed handshake (a WireError), not a ProtocolError none of them catch.
                failed = HandshakeError(f"SDS at {self.peer} broke the handshake: {cause}")
                failed.__cause__ = cause
                self._ready.set_exception(failed)
            elif self._tls_silent():
                # TLS 1.3: the server checks our certificate after our side of the TLS
                # handshake is done; it closes without a word when it refuses it.
                refused = TlsRefused(
                    f"SDS at {self.peer} closed the connection after the TLS handshake, "
                    "before the data protocol's: it refused our certificate (none, another "
                    f"CA's, or revoked: its log says which), or it stopped just then ({cause})"
                )
                refused.__cause__ = cause
                self._ready.set_exception(refused)
            else:
                self._ready.set_exception(self.lost)
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                err = ConnectionLost(str(self.lost))
                err.__cause__ = cause
                try:
                    fut.set_exception(err)
                except Exception:
                    log.exception("error in a reply waiter")
        while self.waiters:
            self.wake_one()

    def wake_one(self) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


async def _open(
    host: str, port: int, handshake: ClientHandshake, tls: ssl.SSLContext | None
) -> tuple[asyncio.BaseTransport, _Protocol]:
    """A connection to ``host:port`` that has run ``handshake`` (inside TLS with
    ``tls``, the server's certificate naming an SDS: :mod:`meshblock.wire.tls`)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    if tls is None:
        transport, protocol = await loop.create_connection(
            lambda: _Protocol(handshake, ready), host, port
        )
    else:
        try:
            transport, protocol = await loop.create_connection(
                lambda: _Protocol(handshake, ready), host, port, ssl=tls, server_hostname=host
            )
        except (ssl.SSLError, ConnectionResetError) as exc:
            raise HandshakeError(
                f"TLS handshake with SDS at {host}:{port} failed: {exc} (does it serve its "
                "data port in plain TCP, without [tls] or with [data] tls = false? is its "
                "certificate from this cluster's CA?)"
            ) from exc
        try:
            check_server(transport.get_extra_info("ssl_object"))
        except pki.PkiError as exc:
            ready.cancel()  # nobody waits for the data protocol's handshake
            transport.abort()
            raise HandshakeError(f"SDS at {host}:{port}: {exc}") from exc
    try:
        await ready
    except BaseException:
        transport.close()
        raise
    return transport, protocol


class WireClient:
    """One authenticated data-protocol connection to one SDS.

    Create it with :meth:`connect`. The IO methods are coroutines safe to call
    concurrently from many tasks. A chunk is addressed by a
    :class:`~meshblock.chunks.ChunkRef`, whose ``pool_id`` and ``epoch`` come from the
    pool's PG map (``GET /api/v1/pools/{id}/pgmap``) and whose ``pg`` is
    ``meshblock.chunks.pg_of(volume, chunk, pg_count)``; ``offset + length`` must stay
    within the chunk (``CHUNK_SIZE``; split IO with ``meshblock.chunks.chunk_span``).
    """

    def __init__(self, protocol: _Protocol, address: str, request_timeout: float | None) -> None:
        self._p = protocol
        self.address = address
        # the protocol version negotiated in the handshake
        self.version = protocol.format.version
        # the feature bits in effect (protocol.Feature): version 1, what the server
        # announced it can do beyond the first release of version 1; version 2, what
        # both sides support
        self.features = 0
        self._ids = itertools.count(1)
        #: The request timeout (see :meth:`connect`); may be changed while it runs (an
        #: SDS adapts its peers' to their latency), read at each check.
        self.request_timeout = request_timeout
        #: How long a connection whose outstanding requests all wait for a device sync
        #: (FLUSH, REPL_FLUSH, FUA: an fdatasync of a whole device may take seconds) may
        #: receive nothing; None: ``request_timeout``. Never shorter than that.
        self.sync_timeout: float | None = None
        # ids of the sync requests sent (those answered are pruned when looked at)
        self._syncs: set[int] = set()
        # when the first ordinary request went out while only syncs were outstanding
        self._ordinary_since = 0.0
        self._watchdog: asyncio.Task[None] | None = None
        if request_timeout is not None:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name=f"wire-watchdog-{address}"
            )

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        secret: str | bytes,
        role: PeerRole = PeerRole.CLIENT,
        *,
        connect_timeout: float = HANDSHAKE_TIMEOUT_S,
        request_timeout: float | None = 30.0,
        min_version: int = MIN_PROTOCOL_VERSION,
        max_version: int = PROTOCOL_VERSION,
        tls: ssl.SSLContext | None = None,
    ) -> WireClient:
        """Connect, authenticate with the cluster ``secret`` and return the client.

        ``tls``: connect over TLS with this context (:func:`meshblock.wire.tls.
        client_context`), plain TCP without it; a TLS handshake that fails, or a
        server whose certificate names no SDS, is a :class:`HandshakeError`.

        ``request_timeout``: when requests are outstanding and nothing has arrived
        for that long, the connection is declared dead (every pending call fails with
        :class:`ConnectionLost`, cause ``TimeoutError``). ``None``: wait forever.

        The client offers protocol version ``max_version``; a server that refuses it
        and speaks an older one no lower than ``min_version`` (the ``wire_min_version``
        setting) is connected to again with that one (a server of version 1: one more
        round trip per connection). Below ``min_version``: :class:`HandshakeError`.
        """
        key = secret.encode() if isinstance(secret, str) else secret
        offer = max_version
        async with asyncio.timeout(connect_timeout):
            while True:
                handshake = ClientHandshake(key, role, version=offer, min_version=min_version)
                try:
                    transport, protocol = await _open(host, port, handshake, tls)
                    break
                except VersionUnsupported as exc:
                    older = exc.server_version
                    if older >= offer:  # it wants a newer version (its wire_min_version)
                        raise HandshakeError(f"SDS at {host}:{port}: {exc}") from exc
                    if older < min_version:
                        raise HandshakeError(
                            f"SDS at {host}:{port} speaks protocol version {older}, below "
                            f"wire_min_version {min_version}"
                        ) from exc
                    log.info(
                        "SDS at %s:%d speaks protocol version %d: connecting with it",
                        host,
                        port,
                        older,
                    )
                    offer = older
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(protocol, f"{host}:{port}", request_timeout)
        client.features = handshake.features
        return client

    # -- state ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed (every call raises ConnectionLost)."""
        return self._p.lost is not None or self._p._closing

    @property
    def in_flight(self) -> int:
        return len(self._p.pending)

    @property
    def ready(self) -> bool:
        """True when a request submitted now leaves without waiting: the connection is
        open, has a free in-flight slot and no caller waits for one."""
        p = self._p
        return (
            p.lost is None and not p._closing and len(p.pending) < MAX_IN_FLIGHT and not p.waiters
        )

    async def close(self) -> None:
        """Close the connection; outstanding calls fail with ConnectionLost."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        p = self._p
        tls = p.transport is not None and p.transport.get_extra_info("ssl_object") is not None
        if tls:
            # Nothing queued matters once closed (every call fails), and a TLS close
            # waits for the server's close_notify, leaking the socket before CPython
            # 3.12.8 (gh-118950) if the loop ends first.
            p.abort()
        elif not p._closing:
            p.close()
        if p.transport is not None and p.transport.get_write_buffer_size():
            p.abort()  # the peer reads nothing: do not wait for it
        if p.lost is None:
            p._fail_all(ConnectionResetError("connection closed by the client"))
        await asyncio.sleep(0)  # let the transport finish closing

    async def __aenter__(self) -> WireClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- client IO (role CLIENT; READ also TOOL) --------------------------------------

    async def read(self, ref: ChunkRef, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` of the chunk, from the PG's primary."""
        reply = await self.call(Op.READ, 0, ref, offset, length, None)
        if reply.flags & _HOLE:
            return ZEROES[:length]
        return reply.payload

    async def write(self, ref: ChunkRef, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; returns once both copies hold it (and are
        durable with ``fua``)."""
        await self.call(Op.WRITE, _FUA if fua else 0, ref, offset, len(data), data)

    async def write_zeroes(
        self, ref: ChunkRef, offset: int, length: int, *, fua: bool = False
    ) -> None:
        """Zero a range on both copies (a whole chunk gives its slots back)."""
        await self.call(Op.WRITE_ZEROES, _FUA if fua else 0, ref, offset, length, None)

    async def trim(self, ref: ChunkRef, offset: int, length: int) -> None:
        """Discard a range on both copies; it reads as zeroes afterwards."""
        await self.call(Op.TRIM, 0, ref, offset, length, None)

    async def flush(self, pool: int = 0, volume: int = 0) -> None:
        """Make every write this SDS acknowledged so far durable, on its devices and on
        the peers it replicated them to. Send it to every SDS you wrote through."""
        await self.call(Op.FLUSH, 0, ChunkRef(pool, 0, 0, volume, 0), 0, 0, None)

    async def ping(self, pool: int = 0) -> int:
        """Round trip; returns the SDS's map epoch of ``pool`` (0 if it has none)."""
        return (await self.call(Op.PING, 0, ChunkRef(pool, 0, 0, 0, 0), 0, 0, None)).epoch

    # -- tools and peers (roles TOOL / SDS_PEER) --------------------------------------

    async def read_raw_chunk(
        self, volume: int, chunk: int, offset: int = 0, length: int = CHUNK_SIZE, epoch: int = 0
    ) -> RawChunk:
        """This SDS's own copy of a chunk, whether it is the primary or secondary.
        ``epoch``: the map epoch of the caller's pool map (an SDS peer's heal), which
        an SDS whose map does not name the caller yet waits for before refusing."""
        ref = ChunkRef(0, 0, epoch, volume, chunk)
        reply = await self.call(Op.CHUNK_READ_RAW, 0, ref, offset, length, None)
        if reply.flags & _HOLE:
            return RawChunk(False, ZEROES[:length])
        return RawChunk(True, reply.payload)

    async def chunk_csums(
        self,
        volume: int,
        chunk: int,
        *,
        heal: bool = False,
        adopt: bool = False,
        blocks: tuple[int, int] = (0, 0),
    ) -> tuple[bytes, bytes] | None:
        """This SDS's own copy of a chunk checked against its checksums (CHUNK_CSUMS):
        ``(stored, computed)``, the checksum row it keeps for the chunk and the one of
        the bytes it holds (1 KiB each: a big-endian u32 per 4 KiB block; a stored 0 is
        "none recorded"); None when it holds no slot for the chunk (zeroes). ``heal``:
        the SDS first repairs the blocks of its copy that do not match their checksums
        from the PG's other copies, and those of ``blocks`` (first, count) that have
        no checksum recorded; ``adopt``: it first gives the blocks of ``blocks`` that
        have none the CRC32C of their bytes. The rows are then those after."""
        ref = ChunkRef(0, 0, 0, volume, chunk)
        flags = (int(ReqFlag.HEAL) if heal else 0) | (int(ReqFlag.ADOPT) if adopt else 0)
        first, count = blocks
        reply = await self.call(Op.CHUNK_CSUMS, flags, ref, first << 12, count << 12, None)
        if reply.flags & _HOLE:
            return None
        payload = bytes(reply.payload)
        half = len(payload) // 2
        if len(payload) != 2 * (CHUNK_SIZE // 4096) * 4:
            raise ProtocolError(f"CHUNK_CSUMS reply of {len(payload)} bytes")
        return payload[:half], payload[half:]

    async def list_chunks(
        self, pool: int, pg: int, *, page: int = LIST_PAGE
    ) -> list[tuple[int, int]]:
        """Every ``(volume, chunk)`` of PG ``pg`` of ``pool`` that this SDS stores,
        whatever its role in the PG, ascending; asked for ``page`` entries at a time."""
        if not 0 < page <= LIST_PAGE:
            raise ValueError(f"page must be 1..{LIST_PAGE} entries")
        size = CHUNK_ENTRY.size
        out: list[tuple[int, int]] = []
        volume = chunk = 0
        while True:
            cursor = ChunkRef(pool, pg, 0, volume, chunk)
            payload = (await self.call(Op.CHUNK_LIST, 0, cursor, 0, page * size, None)).payload
            n, rest = divmod(len(payload), size)
            if rest or n > page:
                raise ProtocolError(f"CHUNK_LIST reply of {len(payload)} bytes")
            entries = [CHUNK_ENTRY.unpack_from(payload, i * size) for i in range(n)]
            # ascending from the cursor on, or the paging would not end
            if (entries and entries[0] < (volume, chunk)) or any(
                a >= b for a, b in itertools.pairwise(entries)
            ):
                raise ProtocolError("CHUNK_LIST reply out of order")
            out.extend(entries)
            if n < page:
                return out
            volume, chunk = entries[-1]
            volume, chunk = (volume, chunk + 1) if chunk + 1 < MAX_CHUNK_INDEX else (volume + 1, 0)

    async def repl_write(
        self, ref: ChunkRef, offset: int, data: Buffer, *, fua: bool = False
    ) -> None:
        """Primary → secondary: apply a write to the secondary copy."""
        await self.call(Op.REPL_WRITE, _FUA if fua else 0, ref, offset, len(data), data)

    async def repl_zero(
        self, op: Op, ref: ChunkRef, offset: int, length: int, *, fua: bool = False
    ) -> None:
        """Primary → secondary: REPL_WRITE_ZEROES or REPL_TRIM."""
        assert op in (Op.REPL_WRITE_ZEROES, Op.REPL_TRIM)
        await self.call(op, _FUA if fua else 0, ref, offset, length, None)

    async def repl_flush(self) -> None:
        """Primary → secondary: fdatasync the secondary's devices."""
        await self.call(Op.REPL_FLUSH, 0, _NO_CHUNK, 0, 0, None)

    # -- the one submit path ----------------------------------------------------------

    def future(self) -> asyncio.Future[Reply]:
        """A new future to wait for a reply with (see :meth:`submit`)."""
        return self._p._loop.create_future()

    def submit(
        self,
        op: Op,
        flags: int,
        ref: ChunkRef,
        offset: int,
        length: int,
        payload: Buffer | None,
        waiter: _W,
        sums: Buffer | None = None,
    ) -> _W:
        """Queue one request now; its :class:`Reply` (statuses are not raised) or the
        connection's loss goes to ``waiter``, which is returned: a future
        (:meth:`future`) to await, or a waiter of one's own (:class:`ReplyWaiter`). It
        does not wait for an in-flight slot (see :attr:`ready`; beyond
        ``MAX_IN_FLIGHT`` the server's back-pressure applies). Raises
        :class:`ConnectionLost` when the connection is closed. ``payload`` (WRITE,
        REPL_WRITE) is sent as it is: keep it unchanged until the reply.

        With ``CSUM_CRC32C`` negotiated (docs/protocol.md §8.6), a payload leaves with
        its checksums: ``sums`` (packed, as received from a client: an SDS forwarding
        a write) or computed here from ``payload``; a READ asks for its reply's
        checksums, and a reply whose payload does not match them is answered
        ``CHECKSUM_MISMATCH`` (retriable) by the receive path."""
        p = self._p
        if p.lost is not None:
            raise ConnectionLost(str(p.lost)) from p.lost.__cause__
        rid = next(self._ids)
        if not p.pending:  # the request timeout counts from now
            p.last_rx = time.monotonic()
        if self._syncs or flags & _SYNC_FLAGS or op in _SYNC_OPS:
            self._note_sync(op, flags, rid)
        p.pending[rid] = waiter
        pool, pg, epoch, volume, chunk = ref  # twice as fast as pack(*ref)
        if p.csum and (op == _READ or (op in _WITH_PAYLOAD and length)):
            if op != _READ:
                assert payload is not None
                if sums is None:
                    sums = csum.trailer(payload, offset)
            pack = p.pack_request_csum
            header = pack(
                op, flags, rid, pool, pg, epoch, volume, chunk, offset, length, _CSUM, _SHIFT
            )
            p.send_request(header, payload if length else None, sums)
            return waiter
        p.send_request(
            p.pack_request(op, flags, rid, pool, pg, epoch, volume, chunk, offset, length),
            payload if length else None,
        )
        return waiter

    async def call(
        self, op: Op, flags: int, ref: ChunkRef, offset: int, length: int, payload: Buffer | None
    ) -> Reply:
        """Wait for a free in-flight slot, submit, and return the reply; a failed
        status is raised (:class:`RequestError`)."""
        p = self._p
        while len(p.pending) >= MAX_IN_FLIGHT and p.lost is None:
            slot: asyncio.Future[None] = p._loop.create_future()
            p.waiters.append(slot)
            try:
                await slot
            finally:
                if not slot.done():
                    slot.cancel()
        # A cancelled caller leaves its future in ``pending`` until the reply comes,
        # so that the reply is recognised and the slot stays counted meanwhile.
        fut: asyncio.Future[Reply] = p._loop.create_future()
        reply = await self.submit(op, flags, ref, offset, length, payload, fut)
        if reply.status:
            raise RequestError(op, reply.status, reply.epoch)
        return reply

    @property
    def last_rx(self) -> float:
        """When (``time.monotonic()``) the connection last received anything, or a
        request left with nothing outstanding before it."""
        return self._p.last_rx

    def _live_syncs(self) -> set[int]:
        """The ids of the sync requests still outstanding."""
        syncs, pending = self._syncs, self._p.pending
        for rid in [rid for rid in syncs if rid not in pending]:
            syncs.discard(rid)
        return syncs

    def _note_sync(self, op: int, flags: int, rid: int) -> None:
        """Before request ``rid`` is added to ``pending``: remember it when it waits
        for a device sync; an ordinary one sent while only syncs are outstanding
        starts the clock of the ordinary requests (:meth:`_watch`)."""
        syncs = self._live_syncs()
        if flags & _SYNC_FLAGS or op in _SYNC_OPS:
            syncs.add(rid)
        elif len(self._p.pending) == len(syncs):
            self._ordinary_since = time.monotonic()

    def _idle_limit(self) -> tuple[float, float]:
        """How long the connection has received nothing that counts, and how long it
        may. An ordinary request outstanding (a write is answered in milliseconds):
        ``request_timeout``, counted from the last byte received or from when the
        first of them left, whichever is later. Only syncs outstanding (a healthy SDS
        may take seconds to sync a device): ``sync_timeout``."""
        p = self._p
        limit = self.request_timeout or 30.0
        syncs = self._live_syncs()
        now = time.monotonic()
        if len(p.pending) > len(syncs):
            return now - max(p.last_rx, self._ordinary_since), limit
        return now - p.last_rx, max(limit, self.sync_timeout or limit)

    async def _watch(self) -> None:
        p = self._p
        while p.lost is None:
            limit = self.request_timeout or 30.0
            await asyncio.sleep(min(1.0, limit / 4))
            if not p.pending:
                continue
            idle, limit = self._idle_limit()
            if idle > limit:
                exc = TimeoutError(f"no reply from {self.address} for {limit:.3g} s")
                p._fail_all(exc)
                p.abort()


async def answers_ping(
    host: str,
    port: int,
    secret: str | bytes,
    role: PeerRole,
    limit_s: float,
    min_version: int = MIN_PROTOCOL_VERSION,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Whether the SDS at ``host:port`` serves the data protocol: a new connection
    authenticated with ``secret`` as ``role``, and a PING answered, all within
    ``limit_s`` (the MDM's and the SDSs' probes of a held SDS: docs/mdm.md)."""
    try:
        async with asyncio.timeout(limit_s):
            client = await WireClient.connect(
                host,
                port,
                secret,
                role,
                connect_timeout=limit_s,
                request_timeout=None,
                min_version=min_version,
                tls=tls,
            )
            try:
                await client.ping()
            finally:
                await client.close()
    except Exception:  # refused, reset, timed out, refused in the handshake: not served
        return False
    return True
