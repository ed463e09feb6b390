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
import ssl

from meshblock.nbd.protocol import Errno
from meshblock.sdc.datapath import DataPathError, Op, Piece, Reply, ReplyWaiter
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

log = logging.getLogger(__name__)

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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = secret
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._min_version = min_version  # [io] wire_min_version
        self._tls = tls  # [io] tls with a certificate: meshblock.wire.tls
        self._clients: dict[tuple[str, int], WireClient] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[WireClient]] = {}
        self._connects: dict[tuple[str, int], int] = {}  # connections opened, per SDS

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
                tls=self._tls,
            )
        except HandshakeError as exc:
            raise DataPathError(
                "handshake",
                f"SDS {sds.sds_id} at {key[0]}:{key[1]}: {exc}",
                retriable=exc.retriable,
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
        self._connects[key] = self._connects.get(key, 0) + 1
        return client

    # The IO path's two ways to send (meshblock.sdc.datapath.DataPath). Both look the
    # open connection up without a coroutine.

    def submit(self, sds: SdsEndpoint, piece: Piece, waiter: ReplyWaiter) -> bool:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or not client.ready:
            return False
        op, flags, ref, offset, length, payload = piece  # faster than submit(*piece)
        client.submit(op, flags, ref, offset, length, payload, waiter)
        return True

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        client = self._clients.get((sds.address, sds.data_port))
        if client is None or client.closed:
            client = await self._client(sds)
        op, flags, ref, offset, length, payload = piece
        try:
            return await client.call(op, flags, ref, offset, length, payload)
        except WireError as exc:
            raise classify(exc) from exc

    def progress(self, sds: SdsEndpoint) -> float:
        client = self._clients.get((sds.address, sds.data_port))
        return 0.0 if client is None else client.last_rx

    def connects(self, sds: SdsEndpoint) -> int:
        return self._connects.get((sds.address, sds.data_port), 0)

    def error(self, op: Op, outcome: Reply | BaseException) -> DataPathError:
        if isinstance(outcome, WireError):
            return classify(outcome)
        if isinstance(outcome, BaseException):
            return DataPathError("wire", repr(outcome), retriable=False)
        return classify(RequestError(op, outcome.status, outcome.epoch))

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
