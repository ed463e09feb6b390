"""What the SDC needs from the data protocol: chunk IO addressed to one SDS.

:class:`DataPath` is the narrow interface :mod:`meshblock.sdc.volume_io` is written
against; :mod:`meshblock.sdc.wire_path` implements it with the data protocol's
client. Failures are :class:`DataPathError`, classified once here so that the
retry logic never parses messages: ``retriable`` says whether refreshing the map and
trying again may succeed, ``reason`` is a short label for logs and metrics, and
``errno`` is what the NBD client gets when the IO finally fails.
"""

from __future__ import annotations

from typing import Protocol

from meshblock.chunks import ChunkRef
from meshblock.nbd.protocol import Errno
from meshblock.nbd.server import Chunk
from meshblock.sdc.maps import SdsEndpoint


class DataPathError(Exception):
    def __init__(
        self, reason: str, message: str, *, retriable: bool, errno: Errno = Errno.EIO
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retriable = retriable
        self.errno = errno


class DataPath(Protocol):
    async def read(self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int) -> Chunk: ...

    async def write(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, data: memoryview, *, fua: bool
    ) -> None: ...

    async def write_zeroes(
        self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int, *, fua: bool
    ) -> None: ...

    async def trim(self, sds: SdsEndpoint, ref: ChunkRef, offset: int, length: int) -> None: ...

    async def flush(self, sds: SdsEndpoint, pool_id: int, volume_id: int) -> None: ...

    async def close(self) -> None: ...
