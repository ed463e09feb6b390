"""Receiving and sending frames on an asyncio connection, shared by client and server.

:class:`FramedConnection` is an :class:`asyncio.BufferedProtocol`:

- **Receiving.** The transport reads straight into an *arena* (a ``bytearray``) at
  the position :meth:`get_buffer` hands out. Headers are unpacked in place with
  ``unpack_from``; a payload is delivered as a ``memoryview`` into the arena, never
  copied. An arena from which a payload view was handed out is never written again:
  when it is full, the unparsed tail moves to a fresh arena and the old one lives as
  long as somebody holds a view into it. An arena that exported nothing is reused.
  Every length is checked (by the subclass's ``_payload_length``) before its bytes
  are awaited, so an oversized frame is refused as soon as its header is in.
  Retired arenas are kept (a few) and taken again once nobody holds a view into
  them any more (their reference count says so): a fresh 2 MiB arena costs a memset
  and page faults, which showed in profiles of 1 MiB IO (docs/performance.md).
- **Sending.** Frames queued during one pass of the event loop go out together in
  one ``transport.write`` (small parts are joined; payloads of 64 KiB and more are
  written as they are, not copied).
- **Handshake mode.** While ``_fixed_need`` is non-zero, fixed-size messages of that
  size are delivered to ``_on_message`` instead of frames. The handshake negotiates the
  protocol version; the subclass then sets ``header`` and ``_payload_length`` to that
  version's (:class:`~meshblock.wire.protocol.WireFormat`), once.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections.abc import Callable
from typing import Any

from meshblock.wire.handshake import HandshakeError
from meshblock.wire.protocol import MAX_PAYLOAD, ProtocolError

log = logging.getLogger(__name__)

#: Size of a receive arena; a frame larger than this gets an arena of its own size.
ARENA_SIZE = 2 * MAX_PAYLOAD + 4096
#: Parts of at least this size are written on their own instead of being joined.
BIG_PART = 64 * 1024
EMPTY = memoryview(b"")
#: Retired arenas a connection keeps for reuse.
SPARE_ARENAS = 8
#: References to a spare arena that nobody else holds: the spare list, the loop
#: variable and ``sys.getrefcount``'s argument.
_UNSHARED_REFS = 3

Buffer = bytes | bytearray | memoryview


class FramedConnection(asyncio.BufferedProtocol):
    """Arena receive buffer and batched sends; subclasses handle what arrives."""

    #: The frame header, and the check of an unpacked one that returns the length of
    #: the payload after it (raises ProtocolError): the negotiated version's.
    header: struct.Struct
    _payload_length: Callable[[tuple[Any, ...]], int]

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._arena = bytearray(ARENA_SIZE)
        self._view = memoryview(self._arena)
        self._start = 0
        self._end = 0
        self.bytes_received = 0
        self._exported = False
        self._fixed_need = 0
        self._closing = False
        self._out: list[Buffer] = []
        self._flush_pending = False
        self._spares: list[bytearray] = []

    # -- subclass hooks ---------------------------------------------------------------

    def _on_frame(self, hdr: tuple[Any, ...], payload: memoryview) -> None:
        raise NotImplementedError

    def _on_message(self, msg: memoryview) -> None:
        """A fixed-size handshake message of ``_fixed_need`` bytes arrived."""
        raise NotImplementedError

    def _on_broken(self, exc: Exception) -> None:
        """The peer broke the protocol; called before the connection is closed."""

    # -- asyncio.BufferedProtocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.peer = str(peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._end == len(self._arena):
            self._make_room(self._end - self._start + 1)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self.bytes_received += nbytes
        try:
            self._parse()
        except (ProtocolError, HandshakeError) as exc:
            self._broken(exc)
        except Exception as exc:  # a bug of ours: drop this connection, not the process
            log.exception("error while handling data from %s", self.peer)
            self._broken(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    # -- receiving --------------------------------------------------------------------

    def _parse(self) -> None:
        header = self.header
        hsize = header.size
        while not self._closing:
            avail = self._end - self._start
            need = self._fixed_need
            if need:
                if avail < need:
                    self._make_room(need)
                    break
                msg = self._view[self._start : self._start + need]
                self._start += need
                self._on_message(msg)
                header = self.header  # the handshake may have chosen the version's
                hsize = header.size
                continue
            if avail < hsize:
                self._make_room(hsize)
                break
            hdr = header.unpack_from(self._arena, self._start)
            total = hsize + self._payload_length(hdr)
            if avail < total:
                self._make_room(total)
                break
            if total > hsize:
                payload = self._view[self._start + hsize : self._start + total]
                self._exported = True
            else:
                payload = EMPTY
            self._start += total
            self._on_frame(hdr, payload)
        if self._start == self._end and not self._exported:
            self._start = self._end = 0

    def _make_room(self, total: int) -> None:
        """Make sure the frame that starts at ``_start`` can grow to ``total`` bytes."""
        if self._start + total <= len(self._arena):
            return
        avail = self._end - self._start
        if not self._exported and total <= len(self._arena):
            if avail:  # through a copy: memmove of overlapping ranges is not promised
                self._arena[0:avail] = bytes(self._view[self._start : self._end])
        else:
            arena = self._spare_arena() if total <= ARENA_SIZE else bytearray(total)
            if avail:
                arena[0:avail] = self._view[self._start : self._end]
            self._view.release()
            old = self._arena
            if len(old) == ARENA_SIZE and len(self._spares) < SPARE_ARENAS:
                self._spares.append(old)
            self._arena = arena
            self._view = memoryview(arena)
            self._exported = False
        self._start = 0
        self._end = avail

    def _spare_arena(self) -> bytearray:
        """A retired arena that no payload view refers to any more, or a new one."""
        spares = self._spares
        for i in range(len(spares)):  # not enumerate(): its result tuple holds a reference
            arena = spares[i]
            if sys.getrefcount(arena) <= _UNSHARED_REFS:
                del spares[i]
                return arena
        return bytearray(ARENA_SIZE)

    def _broken(self, exc: Exception) -> None:
        if self._closing:
            return
        self._on_broken(exc)
        self.close()

    # -- sending ----------------------------------------------------------------------

    def send(self, data: Buffer) -> None:
        """Queue bytes; everything queued in this loop pass goes out in one write."""
        self._out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def send_now(self, data: Buffer) -> None:
        """Write at once, after what is queued (handshake messages)."""
        self._out.append(data)
        self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        out = self._out
        if not out:
            return
        self._out = []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if len(out) == 1:
            transport.write(out[0])
            return
        small: list[Buffer] = []
        for part in out:
            if len(part) >= BIG_PART:
                if small:
                    transport.write(b"".join(small))
                    small = []
                transport.write(part)
            else:
                small.append(part)
        if small:
            transport.write(b"".join(small))

    def close(self) -> None:
        """Send what is queued and close the connection."""
        if self._closing:
            return
        self._closing = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping what is queued: for a peer that stopped reading (a cut
        network), whose connection a graceful close would keep open forever."""
        self._closing = True
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()
