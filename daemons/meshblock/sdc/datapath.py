"""What the SDC needs from the data protocol: chunk IO addressed to one SDS.

:class:`DataPath` is the narrow interface :mod:`meshblock.sdc.volume_io` is written
against; :mod:`meshblock.sdc.wire_path` implements it with the data protocol's
client. A request to one chunk is a :class:`Piece`: an operation of the data
protocol, its flags, the chunk's :class:`~meshblock.chunks.ChunkRef`, a range of the
chunk and a WRITE's payload; its answer is the data protocol's typed :class:`Reply`
(status, flags, epoch, payload), handed on as it is. There are two ways to send one:

- :meth:`DataPath.submit` sends it now or not at all, and hands its reply (or the
  connection's loss) to a :class:`ReplyWaiter`, an object with a future's
  ``done`` / ``set_result`` / ``set_exception``, called later from the receive path:
  the IO path's first attempt, which needs no task;
- :meth:`DataPath.call` connects and waits for a free slot as needed, then awaits
  the reply: the attempts that have a task.

Failures are :class:`DataPathError`, classified once here so that the retry logic
never parses messages: ``retriable`` says whether refreshing the map and trying again
may succeed, ``reason`` is a short label for logs and metrics, and ``errno`` is what
the NBD client gets when the IO finally fails. :meth:`DataPath.call` raises them;
:meth:`DataPath.error` makes one of what a submitted piece's waiter got instead of a
reply with status OK.
"""

from __future__ import annotations

from typing import Final, NamedTuple, Protocol

from meshblock.chunks import ChunkRef
from meshblock.nbd.protocol import Errno
from meshblock.sdc.maps import SdsEndpoint
from meshblock.wire.client import Reply, ReplyWaiter
from meshblock.wire.framing import Buffer
from meshblock.wire.protocol import Op, ReplyFlag, ReqFlag

__all__ = [
    "CLIENT_CHECKS",
    "FUA",
    "HOLE",
    "REPLICA",
    "Buffer",
    "DataPath",
    "DataPathError",
    "Op",
    "Piece",
    "Reply",
    "ReplyWaiter",
]

#: Request flag: the write is durable on both copies before the reply.
FUA: Final = int(ReqFlag.FUA)
#: Request flag of a READ: the PG's secondary may serve it when the PG is clean.
REPLICA: Final = int(ReqFlag.REPLICA)
#: Request flag of a READ: we check the reply's bytes against its checksums (the wire
#: client does, when the connection has them), so the SDS may send its stored ones
#: unchecked; a READ answered CHECKSUM_MISMATCH is sent again without it, and the
#: SDS then checks its copy and heals it (docs/sdc.md, "Checksums").
CLIENT_CHECKS: Final = int(ReqFlag.CLIENT_CHECKS)
#: Reply flag: the range is not allocated and reads as zeroes (no payload came).
HOLE: Final = int(ReplyFlag.HOLE)


class DataPathError(Exception):
    def __init__(
        self, reason: str, message: str, *, retriable: bool, errno: Errno = Errno.EIO
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retriable = retriable
        self.errno = errno


class Piece(NamedTuple):
    """One request to one chunk."""

    op: Op
    flags: int  # the data protocol's request flags (FUA)
    ref: ChunkRef
    offset: int  # in the chunk
    length: int
    payload: Buffer | None = None  # a WRITE's data


class DataPath(Protocol):
    def submit(self, sds: SdsEndpoint, piece: Piece, waiter: ReplyWaiter) -> bool:
        """Send ``piece`` to ``sds`` now if its connection is open and has a free
        in-flight slot: its outcome goes to ``waiter`` later (never from within this
        call). False: nothing was sent."""

    async def call(self, sds: SdsEndpoint, piece: Piece) -> Reply:
        """Send ``piece`` (connecting and waiting for a slot as needed) and return its
        reply, whose status is OK; anything else raises :class:`DataPathError`."""

    def progress(self, sds: SdsEndpoint) -> float:
        """When (``time.monotonic()``) the connection to ``sds`` last received
        anything, or last started waiting for a reply with nothing outstanding; 0.0
        without a connection. An attempt is given up only when this is older than
        its budget (docs/sdc.md)."""

    def connects(self, sds: SdsEndpoint) -> int:
        """How many connections to ``sds`` were opened so far: a FLUSH goes to every
        holder when it changed since the SDS acknowledged a write (docs/sdc.md)."""

    def error(self, op: Op, outcome: Reply | BaseException) -> DataPathError:
        """What a submitted piece's failure means: the reply with a status other than
        OK, or the exception its waiter got."""

    async def close(self) -> None: ...
