"""The meshblock data protocol (see ``docs/protocol.md``): what SDCs, SDSs and tools
speak to an SDS's data port.

The client API for other daemons is :class:`WireClient` and its errors::

    from meshblock.wire import WireClient, PeerRole, RequestError, ConnectionLost, Status
"""

from meshblock.wire.client import (
    ZEROES,
    ConnectionLost,
    RawChunk,
    RequestError,
    WireClient,
    WireError,
)
from meshblock.wire.handshake import HandshakeError
from meshblock.wire.protocol import (
    MAX_IN_FLIGHT,
    MAX_PAYLOAD,
    Op,
    PeerRole,
    ProtocolError,
    Status,
)

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_PAYLOAD",
    "ZEROES",
    "ConnectionLost",
    "HandshakeError",
    "Op",
    "PeerRole",
    "ProtocolError",
    "RawChunk",
    "RequestError",
    "Status",
    "WireClient",
    "WireError",
]
