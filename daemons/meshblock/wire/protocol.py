"""The meshblock data protocol: headers, operations, statuses and limits.

See ``docs/protocol.md`` for the whole specification. Every header is one
:class:`struct.Struct`, compiled once here; field diagrams are in the docstrings
below. All integers are big-endian.

Two versions of the headers exist (``docs/protocol.md`` §3, §4 and §8): the
handshake (:mod:`meshblock.wire.handshake`) negotiates one per connection, and the
connection then frames every request and reply with that version's
:class:`WireFormat` (:data:`WIRE_FORMATS`), chosen once.
"""

from __future__ import annotations

import abc
import enum
import functools
import operator
import struct
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from meshblock.chunks import CHUNK_SIZE
from meshblock.wire.csum import CSUM_CRC32C, CSUM_SHIFT, reply_units, request_units

#: The highest protocol version this release speaks (it speaks every one from 1 on).
PROTOCOL_VERSION: Final = 2
#: The lowest one.
MIN_PROTOCOL_VERSION: Final = 1


def check_wire_min_version(value: int, name: str) -> None:
    """A ``wire_min_version`` setting must name a version this release speaks."""
    if not MIN_PROTOCOL_VERSION <= value <= PROTOCOL_VERSION:
        raise ValueError(
            f"{name} must be between {MIN_PROTOCOL_VERSION} and {PROTOCOL_VERSION}, got {value}"
        )


REQUEST_MAGIC: Final = 0x4D425251  # "MBRQ", version 1
REPLY_MAGIC: Final = 0x4D425250  # "MBRP", version 1
REQUEST_MAGIC_V2: Final = 0x4D425232  # "MBR2"
REPLY_MAGIC_V2: Final = 0x4D425032  # "MBP2"

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


REQUEST_V2 = struct.Struct(">IBBHQIIQQQIIBBHI")
"""Request header of version 2, 64 bytes: version 1's fields at the same offsets
(its reserved u16 is ``ext_len``), then room for checksums. All of the new fields
are 0 until a feature negotiated in the handshake defines them (non-zero: a
protocol error).

::

     0               4       5       6               8
     +---------------+-------+-------+---------------+
     |     magic     |opcode | flags |    ext_len    |
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
     +-------+-------+-------+-------+---------------+
     |csum_ty|csum_sh|   reserved    | hdr_crc (u32) |
     +-------+-------+---------------+---------------+   64 bytes

``ext_len``: bytes of extension records between the header and the payload;
``csum_type`` (0 none, 1 CRC32C) and ``csum_shift`` (log2 of the checksummed block
size): per-block checksums after the payload; ``hdr_crc``: a CRC32C of the header.
"""

REPLY_V2 = struct.Struct(">IHHQQIHBBII")
"""Reply header of version 2, 40 bytes: version 1's fields at the same offsets, then
the same room as the request's (all 0 until a feature defines them).

::

     0               4       6       8
     +---------------+-------+-------+
     |     magic     |status | flags |
     +---------------+-------+-------+---------------+
     |                 request id (u64)              |
     +-----------------------------------------------+
     |     server's map epoch of the request's pool  |
     +---------------+-------+-------+-------+-------+
     | length (u32)  |ext_len|csum_ty|csum_sh|
     +---------------+-------+-------+-------+
     | reserved (u32)| hdr_crc (u32) |                  40 bytes
     +---------------+---------------+
"""


class Feature(enum.IntFlag):
    """Feature bits negotiated in the handshake (version 2: a u64 from each side,
    the connection uses what both have). Bit 0 is also version 1's ``features``
    byte. This release advertises :attr:`CHUNK_LIST` and :attr:`CSUM_CRC32C`, and
    :attr:`MARK_BAD` and :attr:`CHUNK_CSUMS` between SDSs (:data:`PEER_FEATURES`; a
    tool announces :attr:`CHUNK_CSUMS` too); the others are reserved for the work that
    will define them."""

    CHUNK_LIST = 1  # the server answers CHUNK_LIST
    CSUM_CRC32C = 2  # per-block CRC32C checksums of payloads (csum_type, csum_shift)
    HDR_CRC32C = 4  # a CRC32C of every header (hdr_crc)
    SESSION_BOUND = 8  # requests bound to an authenticated identity's session
    MARK_BAD = 16  # the server answers REPL_MARK_BAD (a copy's unrepairable blocks)
    CHUNK_CSUMS = 32  # the server answers CHUNK_CSUMS (scrub, verify)


#: The features this release supports (and advertises).
SUPPORTED_FEATURES: Final = int(Feature.CHUNK_LIST | Feature.CSUM_CRC32C)
#: Features of SDS-to-SDS operations: announced by servers and by SDS peers (an SDC or
#: a tool never sends those operations, so it does not announce them).
PEER_FEATURES: Final = int(Feature.MARK_BAD | Feature.CHUNK_CSUMS)
#: Features a tool announces (``meshctl volume verify`` sends CHUNK_CSUMS).
TOOL_FEATURES: Final = int(Feature.CHUNK_CSUMS)


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
    REPL_MARK_BAD = 20
    CHUNK_READ_RAW = 32
    CHUNK_LIST = 33
    CHUNK_CSUMS = 34  # a chunk's stored checksums and those of its bytes (scrub)


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
    # READ: the PG's secondary may serve it too, when its map (at the request's epoch)
    # says the PG is clean; an SDS of an older release answers NOT_PRIMARY
    REPLICA = 2
    HEAL = 4  # CHUNK_CSUMS: repair this copy's bad blocks from another copy first
    # READ with csum_type: the client checks the reply's bytes against its checksums
    # and reads again without this flag on a mismatch, so the server may send the
    # stored checksums as they are, unchecked (docs/protocol.md §8.6)
    CLIENT_CHECKS = 8
    # CHUNK_CSUMS: give the blocks of the range (offset, length) that have no checksum
    # recorded the CRC32C of their bytes first (docs/sds.md, "Scrub")
    ADOPT = 16


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
    CHECKSUM_MISMATCH = 14

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
        Status.CHECKSUM_MISMATCH,
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
            Op.REPL_MARK_BAD,
            Op.CHUNK_READ_RAW,
            Op.CHUNK_LIST,
            Op.CHUNK_CSUMS,
            Op.PING,
        }
    ),
    PeerRole.TOOL: frozenset({Op.READ, Op.CHUNK_READ_RAW, Op.CHUNK_LIST, Op.CHUNK_CSUMS, Op.PING}),
}


class Request(NamedTuple):
    """A decoded request header (the payload travels separately). A version 1
    header leaves the fields of version 2 at 0; ``reserved`` is version 1's reserved
    u16 (at ``ext_len``'s offset in version 2) or version 2's reserved u16."""

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
    ext_len: int = 0
    csum_type: int = 0
    csum_shift: int = 0
    hdr_crc: int = 0


class Reply(NamedTuple):
    """A decoded reply header (version 1 leaves the fields of version 2 at 0)."""

    magic: int
    status: int
    flags: int
    request_id: int
    epoch: int
    length: int
    reserved: int
    ext_len: int = 0
    csum_type: int = 0
    csum_shift: int = 0
    hdr_crc: int = 0


class WireError(Exception):
    """Base of the data protocol client's errors (:mod:`meshblock.wire.client`) and of
    :class:`~meshblock.wire.handshake.HandshakeError`; ``retriable`` says whether a
    retry may succeed."""

    retriable = False


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
    reserved field (in version 2 also ``ext_len``, ``csum_type``, ``csum_shift`` and
    ``hdr_crc``: no feature that defines them is negotiated yet) or a payload longer
    than :data:`MAX_PAYLOAD`. Ranges that do not fit the chunk are request errors
    (``INVALID``), checked later. Tools and tests; connections check the unpacked
    header with their :class:`WireFormat`.
    """
    fmt = WIRE_V2 if hdr.magic == REQUEST_MAGIC_V2 else WIRE_V1
    return fmt.request_length(fmt.request_fields(hdr))


def reply_payload_length(hdr: Reply) -> int:
    """Check a reply header's framing; return how many payload bytes follow it."""
    fmt = WIRE_V2 if hdr.magic == REPLY_MAGIC_V2 else WIRE_V1
    return fmt.reply_length(fmt.reply_fields(hdr))


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
    version: int = 1,
) -> bytes:
    """A request header of ``version`` as bytes (tests and tools; connections pack
    with their :class:`WireFormat`)."""
    return WIRE_FORMATS[version].pack_request(
        opcode, flags, request_id, pool_id, pg, epoch, volume_id, chunk_index, offset, length
    )


# -- framing per version ----------------------------------------------------------------

Header = tuple[Any, ...]
"""A header as its version's Struct unpacks it. Positions 0 to 11 of a request and 0
to 5 of a reply mean the same in every version: magic, opcode, flags, (version 1:
reserved, version 2: ext_len; 0 in a checked header), request id, pool id, pg,
epoch, volume id, chunk index, offset, length; magic, status, flags, request id,
epoch, length."""


#: Builds a Request from a tuple of its 16 fields without the class's ``__new__`` (a
#: Python function) and its length check.
_new_request: Final = tuple.__new__
#: Version 1's header lacks the fields of version 2 (ext_len, csum_type, csum_shift,
#: hdr_crc): 0.
_V1_REQUEST_TAIL: Final = (0, 0, 0, 0)
#: A version 2 header (REQUEST_V2's order) in Request's field order: its reserved u16
#: is field 14, ext_len field 3.
_V2_REQUEST_ORDER: Final = operator.itemgetter(0, 1, 2, 14, *range(4, 12), 3, 12, 13, 15)


class WireFormat(abc.ABC):
    """How one protocol version frames requests and replies. A connection takes the
    negotiated version's (:data:`WIRE_FORMATS`) once, after the handshake, and binds
    its attributes: nothing on the path of a request asks which version it speaks.

    - ``request`` / ``reply``: the header Structs (every field);
    - ``request_length(hdr)`` / ``reply_length(hdr)``: check a header as ``request``
      / ``reply`` unpacks it (:data:`Header`), return the length of the payload that
      follows; a header that breaks the framing raises :class:`ProtocolError`;
    - ``pack_request(op, flags, request_id, pool, pg, epoch, volume, chunk, offset,
      length)`` / ``pack_reply(status, flags, request_id, epoch, length)``: a header
      as this release sends it, every field that no feature uses 0 (one Struct pack,
      no Python frame: the partial of a Struct whose unused fields are padding);
    - ``decode_request`` / ``decode_reply``: a :class:`Request` / :class:`Reply`;
    - ``typed_request(hdr)``: the :class:`Request` of a header as ``request`` unpacks
      it (the SDS types each request it receives so, once).
    """

    version: int
    request: struct.Struct
    reply: struct.Struct
    request_magic: int
    reply_magic: int
    #: The headers as sent: the fields of ``pack_request`` / ``pack_reply`` after the
    #: magic, pad bytes (0) for the rest.
    _request_out: struct.Struct
    _reply_out: struct.Struct

    #: Whether requests and replies may carry per-unit checksums (``CSUM_CRC32C``
    #: negotiated): then ``pack_request_csum`` / ``pack_reply_csum`` take
    #: ``csum_type`` and ``csum_shift`` after the arguments of ``pack_request`` /
    #: ``pack_reply``.
    csum = False
    pack_request_csum: Callable[..., bytes]
    pack_reply_csum: Callable[..., bytes]

    def __init__(self) -> None:
        assert self._request_out.size == self.request.size
        assert self._reply_out.size == self.reply.size
        self.pack_request: Callable[..., bytes] = functools.partial(
            self._request_out.pack, self.request_magic
        )
        self.pack_reply: Callable[..., bytes] = functools.partial(
            self._reply_out.pack, self.reply_magic
        )

    @abc.abstractmethod
    def request_length(self, hdr: Header) -> int: ...

    @abc.abstractmethod
    def reply_length(self, hdr: Header) -> int: ...

    @abc.abstractmethod
    def request_fields(self, hdr: Request) -> Header:
        """``hdr`` in this version's field order (what ``request`` packs)."""

    @abc.abstractmethod
    def reply_fields(self, hdr: Reply) -> Header: ...

    @abc.abstractmethod
    def decode_request(self, buf: bytes | bytearray | memoryview) -> Request: ...

    @abc.abstractmethod
    def decode_reply(self, buf: bytes | bytearray | memoryview) -> Reply: ...

    @abc.abstractmethod
    def typed_request(self, hdr: Header) -> Request: ...

    def _bad_request(self, hdr: Header) -> ProtocolError:
        """Why a header that failed the quick check of ``request_length`` is refused."""
        if hdr[0] != self.request_magic:
            return ProtocolError(f"bad request magic 0x{hdr[0]:08x}")
        if hdr[1] not in KNOWN_OPS:
            return ProtocolError(f"unknown opcode {hdr[1]}")
        return self._bad_fields(hdr)

    @abc.abstractmethod
    def _bad_fields(self, hdr: Header) -> ProtocolError:
        """The error for a request header with a non-zero field that must be 0."""

    def __repr__(self) -> str:
        return f"<wire format version {self.version}>"


def _too_large(length: int) -> ProtocolError:
    return ProtocolError(f"write payload of {length} bytes exceeds {MAX_PAYLOAD}")


def _reply_too_large(length: int) -> ProtocolError:
    return ProtocolError(f"reply payload of {length} bytes exceeds {MAX_PAYLOAD}")


def _unnegotiated(
    ext_len: int, csum_type: int, csum_shift: int, reserved: int, hdr_crc: int
) -> ProtocolError:
    if ext_len:
        return ProtocolError(f"extension records ({ext_len} bytes) without a feature for them")
    if csum_type or csum_shift:
        return ProtocolError(
            f"checksums (type {csum_type}, shift {csum_shift}) without the feature negotiated"
        )
    if hdr_crc:
        return ProtocolError("a header checksum without the feature negotiated")
    return ProtocolError(f"non-zero reserved field (0x{reserved:x}) in a header")


class _WireV1(WireFormat):
    version = 1
    request = REQUEST
    reply = REPLY
    request_magic = REQUEST_MAGIC
    reply_magic = REPLY_MAGIC
    _request_out = struct.Struct(">IBB2xQIIQQQII")  # reserved: 0
    _reply_out = struct.Struct(">IHHQQI4x")

    def request_length(self, hdr: Header) -> int:
        op = hdr[1]
        if hdr[0] != REQUEST_MAGIC or op not in KNOWN_OPS or hdr[3]:
            raise self._bad_request(hdr)
        if op not in OPS_WITH_PAYLOAD:
            return 0
        if hdr[11] > MAX_PAYLOAD:
            raise _too_large(hdr[11])
        return int(hdr[11])

    def reply_length(self, hdr: Header) -> int:
        # Version 1 never checked the reply's reserved field: it stays so.
        if hdr[0] != REPLY_MAGIC:
            raise ProtocolError(f"bad reply magic 0x{hdr[0]:08x}")
        if hdr[5] > MAX_PAYLOAD:
            raise _reply_too_large(hdr[5])
        return int(hdr[5])

    def request_fields(self, hdr: Request) -> Header:
        return tuple(hdr[:12])

    def reply_fields(self, hdr: Reply) -> Header:
        return tuple(hdr[:7])

    def _bad_fields(self, hdr: Header) -> ProtocolError:
        return ProtocolError("non-zero reserved field in a request header")

    def decode_request(self, buf: bytes | bytearray | memoryview) -> Request:
        return Request(*REQUEST.unpack(buf))

    def typed_request(self, hdr: Header) -> Request:
        return _new_request(Request, hdr + _V1_REQUEST_TAIL)

    def decode_reply(self, buf: bytes | bytearray | memoryview) -> Reply:
        return Reply(*REPLY.unpack(buf))


class _WireV2(WireFormat):
    version = 2
    request = REQUEST_V2
    reply = REPLY_V2
    request_magic = REQUEST_MAGIC_V2
    reply_magic = REPLY_MAGIC_V2
    # ext_len, csum_type, csum_shift, reserved, hdr_crc: 0 (no feature uses them yet)
    _request_out = struct.Struct(">IBB2xQIIQQQII8x")
    _reply_out = struct.Struct(">IHHQQI12x")

    def request_length(self, hdr: Header) -> int:
        op = hdr[1]
        # ext_len (3), csum_type, csum_shift, reserved, hdr_crc (12-15): no feature
        # that defines them is negotiated yet, so they must be 0.
        if (
            hdr[0] != REQUEST_MAGIC_V2
            or op not in KNOWN_OPS
            or hdr[3]
            or hdr[12]
            or hdr[13]
            or hdr[14]
            or hdr[15]
        ):
            raise self._bad_request(hdr)
        if op not in OPS_WITH_PAYLOAD:
            return 0
        if hdr[11] > MAX_PAYLOAD:
            raise _too_large(hdr[11])
        return int(hdr[11])

    def reply_length(self, hdr: Header) -> int:
        if hdr[0] != REPLY_MAGIC_V2:
            raise ProtocolError(f"bad reply magic 0x{hdr[0]:08x}")
        if hdr[6] or hdr[7] or hdr[8] or hdr[9] or hdr[10]:
            raise _unnegotiated(hdr[6], hdr[7], hdr[8], hdr[9], hdr[10])
        if hdr[5] > MAX_PAYLOAD:
            raise _reply_too_large(hdr[5])
        return int(hdr[5])

    def request_fields(self, hdr: Request) -> Header:
        magic, op, flags, reserved, rid, pool, pg, epoch, vol, chunk, off, length = hdr[:12]
        return (magic, op, flags, hdr.ext_len, rid, pool, pg, epoch, vol, chunk, off, length,
                hdr.csum_type, hdr.csum_shift, reserved, hdr.hdr_crc)  # fmt: skip

    def reply_fields(self, hdr: Reply) -> Header:
        magic, status, flags, rid, epoch, length, reserved = hdr[:7]
        return (magic, status, flags, rid, epoch, length,
                hdr.ext_len, hdr.csum_type, hdr.csum_shift, reserved, hdr.hdr_crc)  # fmt: skip

    def _bad_fields(self, hdr: Header) -> ProtocolError:
        return _unnegotiated(hdr[3], hdr[12], hdr[13], hdr[14], hdr[15])

    def decode_request(self, buf: bytes | bytearray | memoryview) -> Request:
        (magic, op, flags, ext_len, rid, pool, pg, epoch, vol, chunk, off, length,
         csum_type, csum_shift, reserved, hdr_crc) = REQUEST_V2.unpack(buf)  # fmt: skip
        return Request(magic, op, flags, reserved, rid, pool, pg, epoch, vol, chunk, off, length,
                       ext_len, csum_type, csum_shift, hdr_crc)  # fmt: skip

    def typed_request(self, hdr: Header) -> Request:
        return _new_request(Request, _V2_REQUEST_ORDER(hdr))

    def decode_reply(self, buf: bytes | bytearray | memoryview) -> Reply:
        (magic, status, flags, rid, epoch, length,
         ext_len, csum_type, csum_shift, reserved, hdr_crc) = REPLY_V2.unpack(buf)  # fmt: skip
        return Reply(magic, status, flags, rid, epoch, length, reserved,
                     ext_len, csum_type, csum_shift, hdr_crc)  # fmt: skip


def _bad_csum(csum_type: int, csum_shift: int, op: int) -> ProtocolError:
    return ProtocolError(
        f"checksums (type {csum_type}, shift {csum_shift}) on opcode {op}: only CRC32C of "
        f"4 KiB units ({CSUM_CRC32C}, {CSUM_SHIFT}) on WRITE, REPL_WRITE and READ"
    )


class _WireV2Csum(_WireV2):
    """Version 2 with ``CSUM_CRC32C`` negotiated (docs/protocol.md §8.6): a WRITE or
    REPL_WRITE whose ``csum_type`` / ``csum_shift`` are 1 / 12 is followed by its
    payload and then by one u32 CRC32C per 4 KiB unit of the chunk's grid that it
    touches; a READ with them asks for the reply's checksums; a reply with them has
    one u32 per 4 KiB of its payload after it. 0 / 0: no checksums (any opcode)."""

    csum = True
    _request_csum_out = struct.Struct(">IBB2xQIIQQQIIBB6x")
    _reply_csum_out = struct.Struct(">IHHQQI2xBB8x")

    def __init__(self) -> None:
        super().__init__()
        self.pack_request_csum = functools.partial(self._request_csum_out.pack, self.request_magic)
        self.pack_reply_csum = functools.partial(self._reply_csum_out.pack, self.reply_magic)

    def request_length(self, hdr: Header) -> int:
        op = hdr[1]
        if hdr[0] != REQUEST_MAGIC_V2 or op not in KNOWN_OPS or hdr[3] or hdr[14] or hdr[15]:
            raise self._bad_request(hdr)
        csum = hdr[12] or hdr[13]
        if csum and (hdr[12] != CSUM_CRC32C or hdr[13] != CSUM_SHIFT):
            raise _bad_csum(hdr[12], hdr[13], op)
        if op not in OPS_WITH_PAYLOAD:
            if csum and op != Op.READ:
                raise _bad_csum(hdr[12], hdr[13], op)
            return 0
        length = hdr[11]
        if length > MAX_PAYLOAD:
            raise _too_large(length)
        return int(length) + 4 * request_units(hdr[10], length) if csum else int(length)

    def reply_length(self, hdr: Header) -> int:
        if hdr[0] != REPLY_MAGIC_V2:
            raise ProtocolError(f"bad reply magic 0x{hdr[0]:08x}")
        if hdr[6] or hdr[9] or hdr[10]:
            raise _unnegotiated(hdr[6], 0, 0, hdr[9], hdr[10])
        length = hdr[5]
        if length > MAX_PAYLOAD:
            raise _reply_too_large(length)
        if hdr[7] or hdr[8]:
            if hdr[7] != CSUM_CRC32C or hdr[8] != CSUM_SHIFT:
                raise _bad_csum(hdr[7], hdr[8], 0)
            return int(length) + 4 * reply_units(length)
        return int(length)

    def _bad_fields(self, hdr: Header) -> ProtocolError:
        return _unnegotiated(hdr[3], 0, 0, hdr[14], hdr[15])

    def __repr__(self) -> str:
        return "<wire format version 2 with CSUM_CRC32C>"


WIRE_V1: Final[WireFormat] = _WireV1()
WIRE_V2: Final[WireFormat] = _WireV2()
WIRE_V2_CSUM: Final[WireFormat] = _WireV2Csum()
#: The wire format of each protocol version (without features that change framing).
WIRE_FORMATS: Final[dict[int, WireFormat]] = {1: WIRE_V1, 2: WIRE_V2}


def wire_format(version: int, features: int) -> WireFormat:
    """The wire format of a connection that negotiated ``version`` and ``features``."""
    if version >= 2 and features & Feature.CSUM_CRC32C:
        return WIRE_V2_CSUM
    return WIRE_FORMATS[version]
