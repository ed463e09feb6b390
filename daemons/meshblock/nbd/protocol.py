"""NBD protocol constants and wire structures (the server's view).

Everything is big-endian ("network byte order"). Only fixed newstyle negotiation is
spoken; oldstyle is refused by construction (the server always sends ``IHAVEOPT``).
Names follow the NBD protocol document (``NBD_OPT_GO`` is :attr:`Opt.GO`, ...).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

# -- limits --------------------------------------------------------------------------

#: The largest READ or WRITE payload the server accepts (advertised as the maximum
#: block size). A WRITE announcing more is a protocol error: its payload is not read.
MAX_REQUEST_SIZE: Final = 32 * 1024 * 1024
#: Advertised minimum and preferred block sizes (NBD_INFO_BLOCK_SIZE).
MIN_BLOCK_SIZE: Final = 1
PREFERRED_BLOCK_SIZE: Final = 4096
#: The largest option payload read during negotiation. The longest legal one is
#: NBD_OPT_GO: 4 + a name of at most 4096 bytes + 2 + 2 per info request.
MAX_OPTION_DATA: Final = 8192
#: The most options one connection may send before entering transmission; a client
#: that keeps haggling past this is treated as a denial of service and dropped.
MAX_OPTIONS: Final = 64
#: Longest export name or description (the spec's bound for strings).
MAX_STRING: Final = 4096


# -- magics --------------------------------------------------------------------------


class Magic(enum.IntEnum):
    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle; prefixes each option
    OPTION_REPLY = 0x0003E889045565A9
    REQUEST = 0x25609513
    SIMPLE_REPLY = 0x67446698


# -- handshake -----------------------------------------------------------------------


class HandshakeFlag(enum.IntFlag):
    """Sent by the server after ``IHAVEOPT`` (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Sent by the client in reply (32 bits); any other bit drops the connection."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option types of the negotiation phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(enum.IntEnum):
    """Information types requested by and sent in reply to NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """Per-export flags (16 bits), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


# -- transmission --------------------------------------------------------------------


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Errno(enum.IntEnum):
    """Error values of a simple reply (Linux errno numbers, as the spec fixes them)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: Command flags each command accepts; anything else is answered with EINVAL.
#: Plain ints: ``~`` of an IntFlag keeps only the defined bits, hiding unknown ones.
ALLOWED_FLAGS: Final[dict[int, int]] = {
    Cmd.READ: 0,
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
}


# -- structs -------------------------------------------------------------------------

GREETING: Final = struct.Struct(">QQH")
"""Server greeting::

    0        8        16  18
    +--------+--------+---+
    |NBDMAGIC|IHAVEOPT|hsf|   hsf: HandshakeFlag
    +--------+--------+---+
"""

CLIENT_FLAGS: Final = struct.Struct(">I")
"""Client flags (ClientFlag), 4 bytes, the client's answer to the greeting."""

OPTION_HEADER: Final = struct.Struct(">QII")
"""Option request header, followed by ``length`` bytes of data::

    0        8      12     16
    +--------+------+------+
    |IHAVEOPT|option|length|
    +--------+------+------+
"""

OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")
"""Option reply header, followed by ``length`` bytes of data::

    0            8      12     16     20
    +------------+------+------+------+
    |OPTION_REPLY|option| type |length|
    +------------+------+------+------+
"""

EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
"""Reply to NBD_OPT_EXPORT_NAME (then 124 zero bytes unless NO_ZEROES)::

    0    8     10
    +----+-----+
    |size|flags|
    +----+-----+
"""

INFO_EXPORT: Final = struct.Struct(">HQH")
"""NBD_REP_INFO payload for NBD_INFO_EXPORT::

    0      2    10    12
    +------+----+-----+
    |type=0|size|flags|
    +------+----+-----+
"""

INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")
"""NBD_REP_INFO payload for NBD_INFO_BLOCK_SIZE::

    0      2   6         10  14
    +------+---+---------+---+
    |type=3|min|preferred|max|
    +------+---+---------+---+
"""

INFO_TYPE: Final = struct.Struct(">H")
"""Leading info type of NBD_INFO_NAME / NBD_INFO_DESCRIPTION (then the string)."""

U32: Final = struct.Struct(">I")
"""A 32-bit length (export name length in NBD_OPT_GO data, NBD_REP_SERVER)."""

U16: Final = struct.Struct(">H")
"""A 16-bit count or info type (NBD_OPT_GO's info requests)."""

REQUEST: Final = struct.Struct(">IHHQQI")
"""Transmission request, followed by ``length`` bytes of data for NBD_CMD_WRITE::

    0     4     6    8      16     24     28
    +-----+-----+----+------+------+------+
    |magic|flags|type|handle|offset|length|
    +-----+-----+----+------+------+------+
"""

SIMPLE_REPLY: Final = struct.Struct(">IIQ")
"""Simple reply, followed by the data of a successful NBD_CMD_READ::

    0     4     8      16
    +-----+-----+------+
    |magic|error|handle|
    +-----+-----+------+
"""

EXPORT_NAME_ZEROES: Final = bytes(124)


# -- errors --------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is dropped with this reason."""

    retriable = False


class RequestError(Exception):
    """A request failed: it is answered with ``errno`` and the connection lives on.

    Backends raise it; ``retriable`` tells whether the same request may succeed later
    (it is informative: the NBD client decides what to do with the errno).
    """

    def __init__(self, errno: Errno, message: str = "", *, retriable: bool = False) -> None:
        super().__init__(message or errno.name)
        self.errno = errno
        self.retriable = retriable
