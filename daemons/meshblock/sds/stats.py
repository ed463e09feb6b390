"""The counters the SDS's request path bumps, read by the metrics on scrape.

:class:`SdsStats` is a few lists of integers indexed by opcode (a few list stores per
request, no locks); :class:`meshblock.sds.metrics.SdsCollector` turns them into
metric families when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from typing import Final

#: Upper bounds (seconds) of the latency histogram's buckets (+Inf is implied).
BOUNDS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_N_OPS: Final = 64


class SdsStats:
    """Counters the IO path bumps; indexed by opcode."""

    def __init__(self) -> None:
        self.ops = [0] * _N_OPS
        self.bytes = [0] * _N_OPS
        self.errors = [0] * _N_OPS
        self.seconds = [0.0] * _N_OPS
        self.buckets = [[0] * (len(BOUNDS) + 1) for _ in range(_N_OPS)]
        self.peer_errors: dict[int, int] = {}
        self.protocol_errors = 0
        self.handshake_failures = 0
        self.refused_requests = 0  # NOT_PERMITTED: not the identity's or role's to send
        self.connections = 0
        # Authenticated data connections open now, and handshakes that succeeded, by
        # (negotiated protocol version, role name): bumped once per connection.
        self.data_connections: dict[tuple[int, str], int] = {}
        self.handshakes: dict[tuple[int, str], int] = {}
        # Write payloads refused for not matching the checksums they came with
        # (CSUM_CRC32C), by the sender's role: an SDC's WRITE, a primary's REPL_WRITE.
        self.wire_checksum_mismatches: dict[str, int] = {"client": 0, "sds_peer": 0}

    def record(self, op: int, nbytes: int, seconds: float, ok: bool) -> None:
        self.ops[op] += 1
        self.bytes[op] += nbytes
        self.seconds[op] += seconds
        self.buckets[op][bisect.bisect_left(BOUNDS, seconds)] += 1
        if not ok:
            self.errors[op] += 1

    def authenticated(self, version: int, role: str) -> None:
        """A connection's handshake succeeded with ``version`` for ``role``."""
        key = (version, role)
        self.handshakes[key] = self.handshakes.get(key, 0) + 1
        self.data_connections[key] = self.data_connections.get(key, 0) + 1

    def authenticated_closed(self, version: int, role: str) -> None:
        """A connection counted by :meth:`authenticated` closed."""
        self.data_connections[(version, role)] -= 1

    def wire_checksum_mismatch(self, role: str) -> None:
        counts = self.wire_checksum_mismatches
        counts[role] = counts.get(role, 0) + 1

    def peer_error(self, sds_id: int) -> None:
        self.peer_errors[sds_id] = self.peer_errors.get(sds_id, 0) + 1
