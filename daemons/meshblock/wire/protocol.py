"""The meshblock data protocol: headers, operations, statuses and limits.

See ``docs/protocol.md`` for the whole specification. Every header is one
:class:`struct.Struct`, compiled once here; field diagrams are in the docstrings
below. All integers are big-endian.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

from meshblock.chunks import CHUNK_SIZE

PROTOCOL_VERSION: Final = 1

REQUEST_MAGIC: Final = 0x4D425251  # "MBRQ"
REPLY_MAGIC: Final = 0x4D425250  # "MBRP"

#: The largest payload of one request or reply: one chunk.
MAX_PAYLOAD: Final = CHUNK_SIZE
#: Requests one connection may have outstanding; the server stops reading beyond it.
MAX_IN_FLIGHT: Final = 256
#: Chunk indexes must be below this (4 PiB volumes).
MAX_CHUNK_INDEX: Final = 1 << 32
#: A connection that has not finished its handshake by then is closed.
HANDSHAKE_TIMEOUT_S: Final = 5.0
#: How long an SDS waits for a map newer than its own before MAP_PENDING.
MAP_WAIT_S: Final = 2.0

REQUEST = struct.Struct(">IBBHQIIQQQII")
"""Request header, 56 bytes; WRITE and REPL_WRITE are followed by ``length`` bytes.

::

     0               4       5       6               8
     +---------------+-------+-------+---------------+
     |     magic     |opcode | flags |   reserved    |
     +---------------+-------+-------+---------------+
     |                 request id (u64)              |
     +---------------+---------------+---------------+
     | pool id (u32) |   pg (u32)    |
     +---------------+---------------+---------------+
     |                 map epoch (u64)               |
     +-----------------------------------------------+
     |                 volume id (u64)               |
     +-----------------------------------------------+
     |                chunk index (u64)              |
     +---------------+---------------+---------------+
     | offset (u32)  | length (u32)  |
     +---------------+---------------+
"""

REPLY = struct.Struct(">IHHQQII")
"""Reply header, 32 bytes; READ and CHUNK_READ_RAW replies (OK, no HOLE) and
CHUNK_LIST replies are followed by ``length`` bytes.

::

     0               4       6       8
     +---------------+-------+-------+
     |     magic     |status | flags |
     +---------------+-------+-------+---------------+
     |                 request id (u64)              |
     +-----------------------------------------------+
     |     server's map epoch of the request's pool  |
     +---------------+---------------+---------------+
     | length (u32)  |reserved (u32) |
     +---------------+---------------+
"""


CHUNK_ENTRY = struct.Struct(">QI")
"""One entry of a CHUNK_LIST reply, 12 bytes: volume id (u64), chunk index (u32)."""


class Op(enum.IntEnum):
    """Request opcodes."""

    READ = 1
    WRITE = 2
    WRITE_ZEROES = 3
    TRIM = 4
    FLUSH = 5
    PING = 6
    REPL_WRITE = 16
    REPL_WRITE_ZEROES = 17
    REPL_TRIM = 18
    REPL_FLUSH = 19
    CHUNK_READ_RAW = 32
    CHUNK_LIST = 33


#: Opcodes whose request carries ``length`` bytes of payload.
OPS_WITH_PAYLOAD: Final = frozenset({Op.WRITE, Op.REPL_WRITE})
#: Every opcode a peer may send (anything else is a protocol error).
KNOWN_OPS: Final = frozenset(int(op) for op in Op)
#: Client IO served by a PG's primary only.
PRIMARY_OPS: Final = frozenset({Op.READ, Op.WRITE, Op.WRITE_ZEROES, Op.TRIM})
#: Replication served by a PG's secondary only.
REPLICA_OPS: Final = frozenset({Op.REPL_WRITE, Op.REPL_WRITE_ZEROES, Op.REPL_TRIM})


class ReqFlag(enum.IntFlag):
    """Request flags."""

    NONE = 0
    FUA = 1  # the data is durable on every copy before the reply


class ReplyFlag(enum.IntFlag):
    """Reply flags."""

    NONE = 0
    HOLE = 1  # the range is not allocated here and reads as zeroes; no payload


class Status(enum.IntEnum):
    """Reply statuses. See :data:`RETRIABLE` for which ones a client may retry."""

    OK = 0
    EPOCH_STALE = 1
    NOT_PRIMARY = 2
    NOT_REPLICA = 3
    NO_SPACE = 4
    IO_ERROR = 5
    INVALID = 6
    TOO_LARGE = 7
    REPLICA_FAILED = 8
    MAP_PENDING = 9
    NOT_PERMITTED = 10
    SHUTTING_DOWN = 11
    DELETED = 12
    DEVICE_FAILED = 13

    @property
    def retriable(self) -> bool:
        """True when the same request may succeed later (after a map refresh)."""
        return self in RETRIABLE


RETRIABLE: Final = frozenset(
    {
        Status.EPOCH_STALE,
        Status.NOT_PRIMARY,
        Status.NOT_REPLICA,
        Status.REPLICA_FAILED,
        Status.MAP_PENDING,
        Status.SHUTTING_DOWN,
        Status.DEVICE_FAILED,
    }
)


class PeerRole(enum.IntEnum):
    """What the client of a connection is; sent in the handshake."""

    CLIENT = 1  # an SDC
    SDS_PEER = 2  # another SDS (replication, rebuild)
    TOOL = 3  # checkers and operator tools


#: The operations each role may send.
ROLE_OPS: Final[dict[PeerRole, frozenset[int]]] = {
    PeerRole.CLIENT: frozenset({Op.READ, Op.WRITE, Op.WRITE_ZEROES, Op.TRIM, Op.FLUSH, Op.PING}),
    PeerRole.SDS_PEER: frozenset(
        {
            Op.REPL_WRITE,
            Op.REPL_WRITE_ZEROES,
            Op.REPL_TRIM,
            Op.REPL_FLUSH,
            Op.CHUNK_READ_RAW,
            Op.CHUNK_LIST,
            Op.PING,
        }
    ),
    PeerRole.TOOL: frozenset({Op.READ, Op.CHUNK_READ_RAW, Op.CHUNK_LIST, Op.PING}),
}


class Request(NamedTuple):
    """A decoded request header (the payload travels separately)."""

    magic: int
    opcode: int
    flags: int
    reserved: int
    request_id: int
    pool_id: int
    pg: int
    epoch: int
    volume_id: int
    chunk_index: int
    offset: int
    length: int


class Reply(NamedTuple):
    """A decoded reply header."""

    magic: int
    status: int
    flags: int
    request_id: int
    epoch: int
    length: int
    reserved: int


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be dropped.

    ``retriable`` is False: the same bytes would break it again. Operations that
    were pending on the dropped connection fail with a retriable ``ConnectionLost``
    whose ``__cause__`` is this error.
    """

    retriable = False


def request_payload_length(hdr: Request) -> int:
    """Check a request header's framing; return how many payload bytes follow it.

    Raises :class:`ProtocolError` for a bad magic, an unknown opcode, a non-zero
    reserved field or a payload longer than :data:`MAX_PAYLOAD`. Ranges that do not
    fit the chunk are request errors (``INVALID``), checked later.
    """
    if hdr.magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{hdr.magic:08x}")
    if hdr.opcode not in KNOWN_OPS:
        raise ProtocolError(f"unknown opcode {hdr.opcode}")
    if hdr.reserved:
        raise ProtocolError("non-zero reserved field in a request header")
    if hdr.opcode in OPS_WITH_PAYLOAD:
        if hdr.length > MAX_PAYLOAD:
            raise ProtocolError(f"write payload of {hdr.length} bytes exceeds {MAX_PAYLOAD}")
        return hdr.length
    return 0


def reply_payload_length(hdr: Reply) -> int:
    """Check a reply header's framing; return how many payload bytes follow it."""
    if hdr.magic != REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic 0x{hdr.magic:08x}")
    if hdr.length > MAX_PAYLOAD:
        raise ProtocolError(f"reply payload of {hdr.length} bytes exceeds {MAX_PAYLOAD}")
    return hdr.length


def pack_request(
    opcode: int,
    request_id: int,
    *,
    pool_id: int = 0,
    pg: int = 0,
    epoch: int = 0,
    volume_id: int = 0,
    chunk_index: int = 0,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
) -> bytes:
    """A request header as bytes (tests and tools; the client packs in place)."""
    return REQUEST.pack(
        REQUEST_MAGIC,
        opcode,
        flags,
        0,
        request_id,
        pool_id,
        pg,
        epoch,
        volume_id,
        chunk_index,
        offset,
        length,
    )
