"""An asyncio NBD server: fixed newstyle negotiation, simple replies, many exports.

Each accepted connection is an :class:`NbdConnection`, an :class:`asyncio.BufferedProtocol`
that parses straight out of a preallocated receive buffer: headers are decoded in
place with the compiled structs of :mod:`meshblock.nbd.protocol`, and large write
payloads are received directly into their own buffer (no intermediate copy). Every
length is checked against the export size and :data:`~protocol.MAX_REQUEST_SIZE`
before any payload is read.

Every command in transmission takes one path: the parser makes it an
:class:`IoRequest` and hands it to the export's :class:`Backend` (``submit``), which
answers it exactly once, either at once or later from a callback
(:meth:`IoRequest.reply`: no task, no future), or by finishing it in a task
(:meth:`IoRequest.run`), which the connection runs and answers. Requests are served
concurrently and answered out of order, as the protocol allows. All replies that
become ready in one event-loop pass leave in one socket write. Reading pauses while
too many requests or bytes are in flight, or while the socket's send buffer is full.

Two kinds of failure:

- a :class:`~protocol.ProtocolError` (bad magic, unknown client flags, an oversized
  write, an unknown export named by ``NBD_OPT_EXPORT_NAME``, ...) drops the connection
  and logs why; a write whose payload did not arrive completely is never applied;
- a :class:`~protocol.RequestError` (out of range, read-only, backend failure) is
  answered with its errno and the connection lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
import struct
import sys
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Final, NamedTuple, Protocol

from meshblock import pki
from meshblock.nbd.access import AccessRule, ListenPolicy, peer_address
from meshblock.nbd.protocol import (
    ALLOWED_FLAGS,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    MAX_OPTION_DATA,
    MAX_OPTIONS,
    MAX_REQUEST_SIZE,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    PREFERRED_BLOCK_SIZE,
    REQUEST,
    SIMPLE_REPLY,
    U16,
    U32,
    ClientFlag,
    Cmd,
    Errno,
    HandshakeFlag,
    Info,
    Magic,
    Opt,
    ProtocolError,
    Rep,
    RequestError,
    TransmissionFlag,
)

log = logging.getLogger(__name__)

#: Bytes a backend may return for a read: one or more buffers that together hold the
#: requested range. They are handed to the socket as they are and must not change
#: afterwards.
Chunk = bytes | bytearray | memoryview

#: Receive buffer of a connection; headers and small payloads are parsed out of it.
RECV_BUFFER_SIZE = 256 * 1024
#: Write payloads at least this large are received straight into their own buffer.
DIRECT_RECV_THRESHOLD = 64 * 1024
#: Write payload buffers from DIRECT_RECV_THRESHOLD up to this size are kept for reuse
#: once answered (at most SPARE_PAYLOADS per connection): a fresh zeroed 1 MiB
#: ``bytearray`` per write cost a memset and page faults (docs/performance.md).
SPARE_PAYLOAD_MAX = 1024 * 1024
SPARE_PAYLOADS = 8
#: References to a spare payload buffer that nobody else holds: the spare list, the
#: loop variable and ``sys.getrefcount``'s argument.
_UNSHARED_REFS = 3
_EMPTY_VIEW = memoryview(b"")
#: Reading from a connection pauses while more requests or bytes than this are in flight.
MAX_INFLIGHT_REQUESTS = 256
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: A connection that has not entered transmission by then is dropped.
HANDSHAKE_TIMEOUT_S = 30.0
#: Send buffer marks of each connection's transport. Kept small: the transport's
#: buffer is a bytearray trimmed from the front after each send, so its cost grows
#: with its size.
WRITE_HIGH_WATER = 2 * 1024 * 1024
WRITE_LOW_WATER = 512 * 1024
#: Reply buffers at least this large are written on their own, not joined.
DIRECT_SEND_THRESHOLD = 16 * 1024
#: The mode of a unix socket listener: its owner and group may connect.
SOCKET_MODE = 0o660
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

DEFAULT_EXPORT_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
)

_WRITES = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
#: Options answered before NBD_OPT_STARTTLS on a listener that requires TLS.
_BEFORE_TLS = (Opt.STARTTLS, Opt.ABORT)
#: Builds an IoRequest faster than its class, whose ``__new__`` is a Python function.
_new_tuple: Final = tuple.__new__


class IoRequest(NamedTuple):
    """One NBD command in transmission, from the parser to its reply: what a
    :class:`Backend` serves.

    ``cmd`` is a :class:`Cmd` (READ, WRITE, WRITE_ZEROES, TRIM or FLUSH), ``flags`` its
    :class:`CmdFlag` bits, ``offset`` and ``length`` are checked against the export
    already, and ``data`` is a WRITE's payload (None for the others): it is not
    looked at again once the request is answered, and must not be kept past that.
    The request is answered exactly once, by :meth:`reply` or through :meth:`run`.
    """

    owner: RequestOwner  # where the answer goes
    cmd: int
    flags: int
    handle: int  # the client's, echoed in the reply
    offset: int
    length: int
    data: bytearray | None

    def reply(self, chunks: Sequence[Chunk] = ()) -> None:
        """Answer success now (from any callback): a READ with buffers that together
        hold exactly ``length`` bytes, handed to the socket as they are."""
        self.owner.answer(self, chunks)

    def run(self, work: Coroutine[Any, Any, Sequence[Chunk] | None]) -> None:
        """Finish the request in a task: what ``work`` returns answers it (a READ's
        buffers, as for :meth:`reply`); a :class:`RequestError` it raises is answered
        with its errno, any other exception is logged and answered with EIO."""
        self.owner.run(self, work)


class RequestOwner(Protocol):
    """Where a request's answer goes (an :class:`NbdConnection`)."""

    def answer(self, req: IoRequest, chunks: Sequence[Chunk]) -> None: ...

    def run(self, req: IoRequest, work: Coroutine[Any, Any, Sequence[Chunk] | None]) -> None: ...


class Backend(Protocol):
    """The storage behind one export."""

    def submit(self, req: IoRequest) -> None:
        """Serve ``req`` (every command but DISC): answer it exactly once, now or
        later (:meth:`IoRequest.reply`, :meth:`IoRequest.run`). It must not raise."""


class Export:
    """One named export: its backend, size and what clients may do with it.

    ``size`` may grow while the export is served; a connection keeps the size it was
    told at negotiation (the protocol has no way to tell it otherwise).
    """

    def __init__(
        self,
        name: str,
        backend: Backend,
        size: int,
        *,
        read_only: bool = False,
        multi_conn: bool = False,
        description: str = "",
    ) -> None:
        if not name or len(name.encode()) > MAX_STRING:
            raise ValueError(f"invalid export name {name!r}")
        self.name = name
        self.backend = backend
        self.size = size
        self.read_only = read_only
        self.multi_conn = multi_conn
        self.description = description
        self.connections: set[NbdConnection] = set()

    @property
    def flags(self) -> int:
        flags = DEFAULT_EXPORT_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)

    def close_connections(self, reason: str) -> None:
        for conn in list(self.connections):
            conn.close(reason)


def _tls_required(context: ssl.SSLContext | None) -> str:
    """How a listener's log line names its TLS."""
    if context is None:
        return "no TLS"
    if context.minimum_version == ssl.TLSVersion.TLSv1_2:
        return "TLS 1.2 or 1.3 required"
    return "TLS 1.3 required"


class NbdServer:
    """Serves a set of exports on TCP and/or unix-socket listeners."""

    def __init__(self, *, handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.exports: dict[str, Export] = {}
        self.connections: set[NbdConnection] = set()
        self.handshake_timeout = handshake_timeout
        self.protocol_errors = 0
        #: TCP connections refused because no allow-list rule covers their address.
        self.refused_connections = 0
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[str] = []
        self._closing = False

    # -- exports -----------------------------------------------------------------------

    def add_export(self, export: Export) -> None:
        if export.name in self.exports:
            raise ValueError(f"export {export.name!r} exists")
        self.exports[export.name] = export
        log.info(
            "export %r added (%d bytes%s)",
            export.name,
            export.size,
            ", read-only" if export.read_only else "",
        )

    def remove_export(self, name: str, reason: str = "export removed") -> Export | None:
        """Stop offering ``name`` and close the connections that use it."""
        export = self.exports.pop(name, None)
        if export is not None:
            log.info("export %r removed: %s", name, reason)
            export.close_connections(reason)
        return export

    def lookup(self, name: str) -> Export | None:
        """The export called ``name``; the empty (default) name means the only export."""
        if not name and len(self.exports) == 1:
            return next(iter(self.exports.values()))
        return self.exports.get(name)

    # -- listeners ---------------------------------------------------------------------

    async def listen_tcp(
        self, host: str, port: int, policy: ListenPolicy | None = None
    ) -> list[tuple[str, int]]:
        """Listen on ``host:port``; return the bound addresses (port 0 picks one).
        ``policy``: the TLS required and the allow list (default: neither)."""
        policy = policy or ListenPolicy()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            partial(NbdConnection, self, policy), host, port, reuse_address=True
        )
        self._servers.append(server)
        addrs = [s.getsockname()[:2] for s in server.sockets]
        log.info(
            "NBD listening on %s (%s; %s)",
            ", ".join(f"{h}:{p}" for h, p in addrs),
            _tls_required(policy.tls),
            "allowed: " + ", ".join(map(str, policy.allow))
            if policy.allow is not None
            else "no allow list",
        )
        return addrs

    async def listen_unix(
        self,
        path: str,
        policy: ListenPolicy | None = None,
        *,
        mode: int = SOCKET_MODE,
        gid: int | None = None,
    ) -> None:
        """Listen on a unix socket at ``path`` (a stale socket there is replaced) of
        file mode ``mode`` and group ``gid`` (None: the process's), both set before
        it listens: no client connects before they are in force."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            umask = os.umask(0o777 & ~mode)  # the socket file is made with this mode
            try:
                sock.bind(path)
            finally:
                os.umask(umask)
            os.chmod(path, mode)
            if gid is not None:
                os.chown(path, -1, gid)
            loop = asyncio.get_running_loop()
            server = await loop.create_unix_server(
                partial(NbdConnection, self, policy or ListenPolicy()), sock=sock
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self._unix_paths.append(path)
        st = os.stat(path)
        log.info(
            "NBD listening on unix:%s (mode %04o, gid %d)", path, st.st_mode & 0o777, st.st_gid
        )

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop listening, let in-flight requests finish (up to ``grace_s``), disconnect."""
        self._closing = True
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unix_paths.clear()
        conns = list(self.connections)
        for conn in conns:
            conn.stop_reading()
        busy = [conn.idle() for conn in conns if conn.inflight]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace_s)
            tasks = [task for conn in conns for task in conn.tasks] if late else []
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        for conn in conns:
            conn.close("server shutting down")


# Connection states.
_CLIENT_FLAGS = 0
_OPT_HEADER = 1
_OPT_DATA = 2
_TX_HEADER = 3
_TX_PAYLOAD = 4
_CLOSED = 5


class NbdConnection(asyncio.BufferedProtocol):
    """One client connection, from the greeting to the disconnect."""

    def __init__(self, server: NbdServer, policy: ListenPolicy) -> None:
        self.server = server
        self.policy = policy
        self.export: Export | None = None
        self.peer = "?"
        #: The allow-list rules that cover this client (None: no allow list).
        self.rules: tuple[AccessRule, ...] | None = None
        #: Whether the connection is TLS (after NBD_OPT_STARTTLS), and the identity its
        #: client certificate names (None: none sent).
        self.tls = False
        self.identity: pki.Identity | None = None
        self._tls_pending = False
        #: Requests handed to the backend and not answered yet, with or without a task.
        self.inflight = 0
        #: The tasks of the requests the backend finishes in one (IoRequest.run).
        self.tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Future[None] | None = None
        self._submit: Callable[[IoRequest], None] = _not_in_transmission
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._rbuf = bytearray(RECV_BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._state = _CLIENT_FLAGS
        self._need = CLIENT_FLAGS.size
        self._no_zeroes = False
        self._options = 0
        self._opt = 0
        # The request whose write payload is being received.
        self._req: tuple[int, int, int] = (0, 0, 0)  # flags, handle, offset
        self._payload: bytearray | None = None  # None: discard the payload
        self._payload_view = _EMPTY_VIEW
        self._spare_payloads: list[bytearray] = []
        self._filled = 0
        self._direct = False
        # Transmission parameters fixed at negotiation.
        self._size = 0
        self._read_only = False
        # Output batching and flow control.
        self._out: list[Chunk] = []
        self._flush_scheduled = False
        self._inflight_bytes = 0
        self._paused_by_load = False
        self._paused_by_writer = False
        self._disconnecting = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self.server._closing:
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(creds)
            self.peer = f"unix(pid={pid},uid={uid},gid={gid})"
            log.info("NBD connection from %s", self.peer)
        if isinstance(peer, tuple):
            self.rules = self.policy.rules_for(peer_address(str(peer[0])))
            if self.rules is not None and not self.rules:
                self.server.refused_connections += 1
                log.warning("refusing NBD connection from %s: not in the allow list", self.peer)
                self._state = _CLOSED
                transport.abort()
                return
        self.server.connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handshake_timer = self._loop.call_later(
            self.server.handshake_timeout, self._handshake_expired
        )
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._send(GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, flags))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state != _CLOSED and (self._rend > self._rpos or self._state == _TX_PAYLOAD):
            log.warning(
                "NBD connection from %s lost in the middle of a request%s",
                self.peer,
                "; its partial write is discarded" if self._state == _TX_PAYLOAD else "",
            )
        self._state = _CLOSED
        self._out.clear()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.server.connections.discard(self)
        if self.export is not None:
            self.export.connections.discard(self)
            log.info("NBD connection from %s to export %r closed", self.peer, self.export.name)

    def pause_writing(self) -> None:
        self._paused_by_writer = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_by_writer = False
        self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def get_buffer(self, sizehint: int) -> memoryview:
        if (
            self._state == _TX_PAYLOAD
            and self._payload is not None
            and self._rpos == self._rend
            and len(self._payload) - self._filled >= DIRECT_RECV_THRESHOLD
        ):
            self._direct = True
            return self._payload_view[self._filled :]
        self._direct = False
        if self._rend == len(self._rbuf) or (self._rpos == self._rend):
            # Compact: unconsumed data is always shorter than one header or option.
            n = self._rend - self._rpos
            self._rbuf[:n] = self._rview[self._rpos : self._rend]
            self._rpos, self._rend = 0, n
        return self._rview[self._rend :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._state == _CLOSED:
            return
        try:
            if self._direct:
                self._filled += nbytes
                if self._filled == len(self._payload_view):
                    self._payload_done()
            else:
                self._rend += nbytes
            self._parse()
        except ProtocolError as exc:
            self._protocol_error(str(exc))

    # -- parsing ---------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._rbuf
        while self._state != _CLOSED and not self._disconnecting and not self._tls_pending:
            avail = self._rend - self._rpos
            if self._state == _TX_PAYLOAD:
                if avail == 0:
                    break
                take = min(avail, self._need - self._filled)
                if self._payload is not None:
                    end = self._filled + take
                    self._payload_view[self._filled : end] = self._rview[
                        self._rpos : self._rpos + take
                    ]
                self._filled += take
                self._rpos += take
                if self._filled == self._need:
                    self._payload_done()
                continue
            if avail < self._need:
                break
            pos = self._rpos
            self._rpos += self._need
            state = self._state
            if state == _TX_HEADER:
                self._request(*REQUEST.unpack_from(buf, pos))
            elif state == _OPT_HEADER:
                self._option_header(*OPTION_HEADER.unpack_from(buf, pos))
            elif state == _OPT_DATA:
                self._option(self._opt, bytes(self._rview[pos : self._rpos]))
            else:
                self._client_flags(CLIENT_FLAGS.unpack_from(buf, pos)[0])
        if self._rpos == self._rend:
            self._rpos = self._rend = 0

    # -- negotiation -----------------------------------------------------------------

    def _client_flags(self, flags: int) -> None:
        # A plain int: ``~`` of an IntFlag would keep only the defined bits.
        known = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
        if flags & ~known:
            raise ProtocolError(f"unknown client flags 0x{flags:08x}")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._expect(_OPT_HEADER, OPTION_HEADER.size)

    def _option_header(self, magic: int, opt: int, length: int) -> None:
        if magic != Magic.IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:016x}")
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise ProtocolError(f"more than {MAX_OPTIONS} options without entering transmission")
        if length > MAX_OPTION_DATA:
            raise ProtocolError(
                f"option {opt} carries {length} bytes of data, more than {MAX_OPTION_DATA}"
            )
        if length == 0:
            self._expect(_OPT_HEADER, OPTION_HEADER.size)
            self._option(opt, b"")
        else:
            self._opt = opt
            self._expect(_OPT_DATA, length)

    def _option(self, opt: int, data: bytes) -> None:
        self._expect(_OPT_HEADER, OPTION_HEADER.size)
        if self.policy.tls is not None and not self.tls and opt not in _BEFORE_TLS:
            if opt == Opt.EXPORT_NAME:  # it has no error reply
                raise ProtocolError("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (TLS required)")
            self._opt_reply(opt, Rep.ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS")
            return
        if opt == Opt.GO or opt == Opt.INFO:
            self._opt_info(opt, data)
        elif opt == Opt.EXPORT_NAME:
            self._opt_export_name(data)
        elif opt == Opt.LIST:
            self._opt_list(data)
        elif opt == Opt.STARTTLS:
            self._opt_starttls(data)
        elif opt == Opt.ABORT:
            self._opt_reply(opt, Rep.ACK)
            self._finish()
        elif opt == Opt.STRUCTURED_REPLY:
            self._opt_reply(opt, Rep.ERR_UNSUP, b"this server sends simple replies only")
        else:
            self._opt_reply(opt, Rep.ERR_UNSUP, b"option not supported")

    def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._send(OPTION_REPLY_HEADER.pack(Magic.OPTION_REPLY, opt, rep, len(data)), data)

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._opt_reply(Opt.LIST, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for export in list(self.server.exports.values()):
            if not self.may_open(export):
                continue
            name = export.name.encode()
            self._opt_reply(
                Opt.LIST, Rep.SERVER, U32.pack(len(name)) + name + export.description.encode()
            )
        self._opt_reply(Opt.LIST, Rep.ACK)

    def _opt_info(self, opt: int, data: bytes) -> None:
        if len(data) < 6:
            self._opt_reply(opt, Rep.ERR_INVALID, b"option data too short")
            return
        (name_len,) = U32.unpack_from(data, 0)
        if 4 + name_len + 2 > len(data) or name_len > MAX_STRING:
            self._opt_reply(opt, Rep.ERR_INVALID, b"export name length out of range")
            return
        (n_infos,) = U16.unpack_from(data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * n_infos:
            self._opt_reply(opt, Rep.ERR_INVALID, b"option length does not match its content")
            return
        try:
            name = data[4 : 4 + name_len].decode()
        except UnicodeDecodeError:
            self._opt_reply(opt, Rep.ERR_INVALID, b"export name is not UTF-8")
            return
        infos = {U16.unpack_from(data, 4 + name_len + 2 + 2 * i)[0] for i in range(n_infos)}
        export = self.server.lookup(name)
        if export is not None and not self.may_open(export):
            log.warning("NBD %s may not open export %r (allow list)", self.peer, export.name)
            export = None  # answered as an unknown name: it does not tell what exists
        if export is None:
            self._opt_reply(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}".encode()[:MAX_STRING])
            return
        self._opt_reply(opt, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags))
        if Info.NAME in infos:
            self._opt_reply(opt, Rep.INFO, INFO_TYPE.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in infos and export.description:
            desc = export.description.encode()[:MAX_STRING]
            self._opt_reply(opt, Rep.INFO, INFO_TYPE.pack(Info.DESCRIPTION) + desc)
        self._opt_reply(
            opt,
            Rep.INFO,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_REQUEST_SIZE
            ),
        )
        self._opt_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._enter_transmission(export)

    def _opt_export_name(self, data: bytes) -> None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise ProtocolError("NBD_OPT_EXPORT_NAME with a name that is not UTF-8") from None
        export = self.server.lookup(name)
        if export is None or not self.may_open(export):
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
        self._send(EXPORT_NAME_REPLY.pack(export.size, export.flags))
        if not self._no_zeroes:
            self._send(EXPORT_NAME_ZEROES)
        self._enter_transmission(export)

    def may_open(self, export: Export) -> bool:
        """Whether this client may open ``export`` (and see it in NBD_OPT_LIST)."""
        if self.policy.tls is not None and not self.tls:
            return False
        return self.rules is None or any(r.allows(export.name) for r in self.rules)

    def _opt_starttls(self, data: bytes) -> None:
        if self.policy.tls is None:
            self._opt_reply(Opt.STARTTLS, Rep.ERR_UNSUP, b"no TLS on this listener")
        elif self.tls:
            self._opt_reply(Opt.STARTTLS, Rep.ERR_INVALID, b"TLS is on already")
        elif data:
            self._opt_reply(Opt.STARTTLS, Rep.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        else:
            self._opt_reply(Opt.STARTTLS, Rep.ACK)
            self._flush_out()
            self._tls_pending = True  # parse nothing more until the handshake is done
            task = self._loop.create_task(self._start_tls(self.policy.tls))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        if self._rend > self._rpos:
            self._protocol_error("data after NBD_OPT_STARTTLS before the TLS handshake")
            return
        assert self._transport is not None
        try:
            transport = await self._loop.start_tls(
                self._transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except OSError as exc:  # ssl.SSLError, ConnectionError and TimeoutError too
            if self._state != _CLOSED:
                self._protocol_error(f"TLS handshake failed: {exc}")
            self.connection_lost(None)  # asyncio does not tell a handshake's failure
            return
        if self._state == _CLOSED or transport is None:
            return
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self.tls = True
        obj = transport.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if der:
            try:
                self.identity = pki.identity_from_der(der)
            except pki.PkiError as exc:
                self._protocol_error(f"its certificate names no identity: {exc}")
                return
        log.info(
            "NBD connection from %s: TLS %s, client %s",
            self.peer,
            obj.version() if obj is not None else "?",
            self.identity or "without a certificate",
        )
        self._tls_pending = False
        try:
            self._parse()
        except ProtocolError as exc:
            self._protocol_error(str(exc))

    def _enter_transmission(self, export: Export) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.export = export
        self._size = export.size
        self._read_only = export.read_only
        self._submit = export.backend.submit
        export.connections.add(self)
        self._expect(_TX_HEADER, REQUEST.size)
        log.info("NBD connection from %s uses export %r", self.peer, export.name)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.export is None and self._state != _CLOSED:
            self._protocol_error(f"no export chosen within {self.server.handshake_timeout:g} s")

    # -- transmission ----------------------------------------------------------------

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> Errno | None:
        allowed = ALLOWED_FLAGS.get(cmd)
        if allowed is None or flags & ~allowed:
            return Errno.EINVAL
        if self._read_only and cmd in _WRITES:
            return Errno.EPERM
        if cmd == Cmd.READ and length > MAX_REQUEST_SIZE:
            return Errno.EINVAL
        if cmd != Cmd.FLUSH and offset + length > self._size:
            return Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
        return None

    def _request(
        self, magic: int, flags: int, cmd: int, handle: int, offset: int, length: int
    ) -> None:
        if magic != Magic.REQUEST:
            raise ProtocolError(f"bad request magic 0x{magic:08x}")
        if cmd == Cmd.WRITE:
            if length > MAX_REQUEST_SIZE:
                raise ProtocolError(
                    f"write of {length} bytes exceeds the maximum request size {MAX_REQUEST_SIZE}"
                )
            err = self._check(cmd, flags, offset, length)
            if err is not None:
                self._request_error(handle, err, cmd, offset, length)
                self._payload = None  # read and drop the payload
            else:
                self._payload = self._payload_buffer(length)
                self._payload_view = memoryview(self._payload)
            self._req = (flags, handle, offset)
            self._filled = 0
            self._expect(_TX_PAYLOAD, length)
            if length == 0:
                self._payload_done()
            return
        if cmd == Cmd.DISC:
            self._disconnect()
            return
        err = self._check(cmd, flags, offset, length)
        if err is not None:
            self._request_error(handle, err, cmd, offset, length)
            return
        self._start(cmd, flags, handle, offset, length, None)

    def _payload_done(self) -> None:
        flags, handle, offset = self._req
        payload = self._payload
        self._payload = None
        self._payload_view = _EMPTY_VIEW
        self._direct = False
        self._expect(_TX_HEADER, REQUEST.size)
        if payload is not None:
            self._start(Cmd.WRITE, flags, handle, offset, len(payload), payload)

    def _payload_buffer(self, length: int) -> bytearray:
        """A buffer for a write payload: a spare one nobody refers to any more, or new."""
        if DIRECT_RECV_THRESHOLD <= length <= SPARE_PAYLOAD_MAX:
            spares = self._spare_payloads
            for i in range(len(spares)):  # not enumerate(): its tuple holds a reference
                buf = spares[i]
                if len(buf) == length and sys.getrefcount(buf) <= _UNSHARED_REFS:
                    del spares[i]
                    return buf
        return bytearray(length)

    def _retire_payload(self, data: bytearray | None) -> None:
        """A write was answered: keep its payload buffer for a later write."""
        if (
            data is not None
            and DIRECT_RECV_THRESHOLD <= len(data) <= SPARE_PAYLOAD_MAX
            and len(self._spare_payloads) < SPARE_PAYLOADS
        ):
            self._spare_payloads.append(data)

    def _request_error(self, handle: int, err: Errno, cmd: int, offset: int, length: int) -> None:
        log.debug(
            "NBD %s: refused command %d at %d+%d: %s", self.peer, cmd, offset, length, err.name
        )
        self._send(SIMPLE_REPLY.pack(Magic.SIMPLE_REPLY, err, handle))

    def _start(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, data: bytearray | None
    ) -> None:
        if cmd == Cmd.READ or cmd == Cmd.WRITE:
            self._inflight_bytes += length
        self.inflight += 1
        req = _new_tuple(IoRequest, (self, cmd, flags, handle, offset, length, data))
        try:
            self._submit(req)
        except Exception as exc:  # a backend bug: answer this request, keep the connection
            self.answer(req, (), self._failed(req, exc))
        self._update_reading()

    def answer(self, req: IoRequest, chunks: Sequence[Chunk], err: Errno = Errno.OK) -> None:
        """The reply to ``req`` (:class:`RequestOwner`)."""
        if req.cmd == Cmd.READ:
            self._inflight_bytes -= req.length
            if (
                not err
                and (len(chunks[0]) if len(chunks) == 1 else sum(map(len, chunks))) != req.length
            ):
                exc = RuntimeError(f"backend returned a short read at {req.offset}+{req.length}")
                err, chunks = self._failed(req, exc), ()
        elif req.cmd == Cmd.WRITE:
            self._inflight_bytes -= req.length
        self._send(SIMPLE_REPLY.pack(Magic.SIMPLE_REPLY, err, req.handle), *chunks)
        self._retire_payload(req.data)
        self._settled()

    def run(self, req: IoRequest, work: Coroutine[Any, Any, Sequence[Chunk] | None]) -> None:
        """Finish ``req`` in a task (:class:`RequestOwner`)."""
        if self._state == _CLOSED:
            work.close()  # nobody to answer: do not retry for it
            self._forget(req)
            return
        task = self._loop.create_task(self._serve(req, work))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(
        self, req: IoRequest, work: Coroutine[Any, Any, Sequence[Chunk] | None]
    ) -> None:
        chunks: Sequence[Chunk] = ()
        err = Errno.OK
        try:
            result = await work
            if req.cmd == Cmd.READ:
                chunks = () if result is None else result
        except Exception as exc:
            err = self._failed(req, exc)
        except BaseException:  # cancelled: the server stops
            self._forget(req)
            raise
        self.answer(req, chunks, err)

    def _failed(self, req: IoRequest, exc: Exception) -> Errno:
        """Log why ``req`` failed; the errno it is answered with."""
        export = self.export.name if self.export is not None else "?"
        what = (self.peer, export, Cmd(req.cmd).name, req.offset, req.length)
        if isinstance(exc, RequestError):
            log.warning("NBD %s export %r: command %s at %d+%d failed: %s", *what, exc)
            return exc.errno
        log.error("NBD %s export %r: command %s at %d+%d failed", *what, exc_info=exc)
        return Errno.EIO

    def _forget(self, req: IoRequest) -> None:
        """``req`` will not be answered (the connection is closed or closing)."""
        if req.cmd == Cmd.READ or req.cmd == Cmd.WRITE:
            self._inflight_bytes -= req.length
        self._settled()

    def _settled(self) -> None:
        """One request fewer in flight."""
        self.inflight -= 1
        if not self.inflight and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None
        if self._disconnecting and not self.inflight:
            self._finish()
        else:
            self._update_reading()

    def idle(self) -> asyncio.Future[None]:
        """A future done once no request is in flight."""
        if not self.inflight:
            idle: asyncio.Future[None] = self._loop.create_future()
            idle.set_result(None)
            return idle
        if self._idle is None:
            self._idle = self._loop.create_future()
        return self._idle

    # -- output, flow control, closing ----------------------------------------------

    def _expect(self, state: int, need: int) -> None:
        self._state = state
        self._need = need

    def _send(self, *bufs: Chunk) -> None:
        if self._state == _CLOSED:
            return
        self._out.extend(bufs)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Write what is pending: small buffers joined into one write, large payloads
        on their own (``writelines`` would copy them into one joined buffer first)."""
        self._flush_scheduled = False
        out, self._out = self._out, []
        t = self._transport
        if not out or t is None or t.is_closing():
            return
        small: list[Chunk] = []
        for buf in out:
            if len(buf) < DIRECT_SEND_THRESHOLD:
                small.append(buf)
                continue
            if small:
                t.write(b"".join(small) if len(small) > 1 else small[0])
                small = []
            t.write(buf)
        if small:
            t.write(b"".join(small) if len(small) > 1 else small[0])

    def _update_reading(self) -> None:
        t = self._transport
        if t is None or t.is_closing():
            return
        busy = (
            self.inflight >= MAX_INFLIGHT_REQUESTS
            or self._inflight_bytes >= MAX_INFLIGHT_BYTES
            or self._paused_by_writer
            or self._disconnecting
        )
        if busy and not self._paused_by_load:
            self._paused_by_load = True
            t.pause_reading()
        elif not busy and self._paused_by_load:
            self._paused_by_load = False
            t.resume_reading()

    def stop_reading(self) -> None:
        """Accept no more requests; in-flight ones still get their replies."""
        self._disconnecting = True
        self._update_reading()

    def _disconnect(self) -> None:
        """NBD_CMD_DISC: finish what is in flight, then close."""
        log.debug("NBD %s: disconnect requested", self.peer)
        self.stop_reading()
        if not self.inflight:
            self._finish()

    def _finish(self) -> None:
        """Send what is pending and close the connection."""
        self._flush_out()
        self._state = _CLOSED
        if self._transport is not None:
            self._transport.close()

    def close(self, reason: str) -> None:
        """Close the connection now (an export went away, or the server stops)."""
        if self._state == _CLOSED:
            return
        log.info("closing NBD connection from %s: %s", self.peer, reason)
        self._finish()

    def _protocol_error(self, reason: str) -> None:
        self.server.protocol_errors += 1
        log.warning("dropping NBD connection from %s: %s", self.peer, reason)
        self._state = _CLOSED
        self._out.clear()
        if self._transport is not None:
            self._transport.abort()


def _not_in_transmission(req: IoRequest) -> None:
    raise AssertionError("a request before transmission")
