"""The SDC's data path over the data protocol: one pipelined connection per SDS.

Connections are opened on first use and replaced after they are lost; concurrent
callers share one connection attempt. Every wire error is turned into a
:class:`~meshblock.sdc.datapath.DataPathError` here, with the retry decision the
protocol's status table makes (docs/protocol.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from meshblock.chunks import ChunkRef
from meshblock.nbd.protocol import Errno
from meshblock.nbd.server import Chunk
from meshblock.sdc.datapath import DataPathError
from meshblock.sdc.maps import SdsEndpoint
from meshblock.wire import (
    ConnectionLost,
    HandshakeError,
    PeerRole,
    RequestError,
    Status,
    WireClient,
    WireError,
)
from meshblock.wire.client import ZEROES, Reply
from meshblock.wire.protocol import Op, ReplyFlag, ReqFlag

log = logging.getLogger(__name__)
T = TypeVar("T")
_HOLE = int(ReplyFlag.HOLE)
ReplyFn = Callable[[Reply | None, BaseException | None], None]


class DirectReply:
    """Waits for a reply in the client's ``pending`` instead of a future: its reply,
    or the connection's loss, is handed to ``fn(reply, None)`` / ``fn(None, exc)`` at
    once, from the receive path (no callback scheduled, no extra event-loop pass).
    ``fn`` may be replaced until then."""

    __slots__ = ("_done", "fn")

    def __init__(self, fn: ReplyFn) -> None:
        self.fn = fn
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: Reply) -> None:
        self._done = True
        self.fn(reply, None)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self.fn(None, exc)


_ERRNO = {
    Status.NO_SPACE: Errno.ENOSPC,
    Status.INVALID: Errno.EINVAL,
    Status.TOO_LARGE: Errno.EINVAL,
    Status.IO_ERROR: Errno.EIO,
    Status.NOT_PERMITTED: Errno.EIO,
    Status.DELETED: Errno.EIO,
}


def classify(exc: WireError) -> DataPathError:
    """The DataPathError for a wire error (``retriable`` decided by the protocol)."""
    if isinstance(exc, RequestError):
        status = exc.status
        name = status.name.lower() if isinstance(status, Status) else f"status_{status}"
        errno = _ERRNO.get(status, Errno.EIO) if isinstance(status, Status) else Errno.EIO
        return DataPathError(name, str(exc), retriable=exc.retriable, errno=errno)
    if isinstance(exc, ConnectionLost):
        return DataPathError("connection", str(exc), retriable=True)
    return DataPathError("wire", str(exc), retriable=exc.retriable)


class WireDataPath:
    def __init__(
        self,
        secret: str,
        *,
        connect_timeout: float = 3.0,
        request_timeout: float = 30.0,
        min_version: int = 1,
    ) -> None:
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._min_version = min_version  # [io] wire_min_version
        self._clients: dict[tuple[str, int], WireClient] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[WireClient]] = {}

    async def _client(self, sds: SdsEndpoint) -> WireClient:
        key = (sds.address, sds.data_port)
        client = self._clients.get(key)
        if client is not None and not client.closed:
            return client
        pending = self._connecting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(sds))
            self._connecting[key] = pending
            pending.add_done_callback(lambda _f: self._connecting.pop(key, None))
        return await asyncio.shield(pending)

    async def _connect(self, sds: SdsEndpoint) -> WireClient:
        key = (sds.address, sds.data_port)
        old = self._clients.pop(key, None)
        if old is not None:
            await old.close()
        try:
            client = await WireClient.connect(
                sds.address,
                sds.data_port,
                self._secret,
                PeerRole.CLIENT,
                connect_timeout=self._connect_timeout,
                request_timeout=self._request_timeout,
                min_version=self._min_version,
            )
        except HandshakeError as exc:
            raise DataPathError(
                "handshake", f"SDS {sds.sds_id} at {key[0]}:{key[1]}: {exc}", retriable=False
            ) from exc
        except (OSError, TimeoutError, ConnectionLost) as exc:
            # ConnectionLost: the SDS accepted, then closed or reset the connection
            # during the handshake (it died just then): as retriable as a refusal.
            raise DataPathError(
                "connect",
                f"cannot connect to SDS {sds.sds_id} at {key[0]}:{key[1]}: {exc!r}",
                retriable=True,
            ) from exc
        log.info("connected to SDS %d at %s:%d", sds.sds_id, *key)
        self._clients[key] = client
        return client

    async def _do(self, sds: SdsEndpoint, op: Callable[[WireClient], Awaitable[T]]) -> T:
        client = await self._client(sds)
        try:
            return await op(client)
        except WireError as exc:
            raise classify(exc) from exc

    # READ and WRITE are the hot path: the open connection is looked up without an
    # extra coroutine, and the call is awaited directly.

    async def read(self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int) -> Chunk:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or client.closed:
            client = await self._client(sds)
        try:
            return await client.read(ref, offset, length)
        except WireError as exc:
            raise classify(exc) from exc

    async def write(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, data: memoryview, *, fua: bool
    ) -> None:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or client.closed:
            client = await self._client(sds)
        try:
            await client.write(ref, offset, data, fua=fua)
        except WireError as exc:
            raise classify(exc) from exc

    # Starting READ and WRITE without awaiting (VolumeIO.start_read / start_write):
    # the reply goes to ``fn`` (meshblock.wire.client.DirectReply); None when the
    # connection is not open or has no free slot.

    def submit_read(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int, fn: ReplyFn
    ) -> DirectReply | None:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or not client.ready:
            return None
        return client.submit(Op.READ, 0, ref, offset, length, None, DirectReply(fn))

    def submit_write(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, data: memoryview, fua: bool, fn: ReplyFn
    ) -> DirectReply | None:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or not client.ready:
            return None
        flags = int(ReqFlag.FUA) if fua else 0
        return client.submit(Op.WRITE, flags, ref, offset, len(data), data, DirectReply(fn))

    async def finish(self, op: Op, fut: asyncio.Future[Reply], length: int) -> Chunk:
        """What ``read`` (``op`` READ) or ``write`` would have returned or raised, given
        the outcome (``fut``) of a request started with ``submit_read`` / ``submit_write``."""
        try:
            reply = await fut
        except WireError as exc:
            raise classify(exc) from exc
        if reply.status:
            raise classify(RequestError(op, reply.status, reply.epoch))
        if op == Op.READ and reply.flags & _HOLE:
            return ZEROES[:length]
        return reply.payload

    async def write_zeroes(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int, *, fua: bool
    ) -> None:
        await self._do(sds, lambda c: c.write_zeroes(ref, offset, length, fua=fua))

    async def trim(self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int) -> None:
        await self._do(sds, lambda c: c.trim(ref, offset, length))

    async def flush(self, sds: SdsEndpoint, pool_id: int, volume_id: int) -> None:
        await self._do(sds, lambda c: c.flush(pool_id, volume_id))

    async def close(self) -> None:
        for fut in list(self._connecting.values()):
            fut.cancel()
        for fut in list(self._connecting.values()):
            with contextlib.suppress(BaseException):
                await fut
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.close()
