"""The data connection's watchdog (wire/client.py): a connection with ordinary
requests outstanding that receives nothing for ``request_timeout`` is dropped, but
requests that wait for a whole-device sync on the other side (FLUSH, REPL_FLUSH, FUA)
only count against ``sync_timeout``: a healthy SDS busy in a seconds-long fdatasync
is not given up. In-process: the client runs on a stand-in for its transport."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from _wait import wait_until_async
from meshblock.chunks import ChunkRef
from meshblock.wire.client import ConnectionLost, Reply, WireClient
from meshblock.wire.protocol import Op, ReqFlag

pytestmark = pytest.mark.unit

REF = ChunkRef(1, 1, 1, 1, 0)
BUDGET = 0.2  # request_timeout: a peer's short budget
CEILING = 3.0  # sync_timeout: peer_timeout_s


class _Wire:
    """What the client needs of its protocol: requests go nowhere, nothing arrives."""

    def __init__(self) -> None:
        self.pending: dict[int, Any] = {}
        self.lost: ConnectionLost | None = None
        self.last_rx = time.monotonic()
        self.csum = False
        self.format = SimpleNamespace(version=2)
        self._loop = asyncio.get_running_loop()
        self.waiters: list[Any] = []
        self._closing = False
        self.transport = None

    def pack_request(self, *fields: int) -> bytes:
        return b""

    def send_request(self, header: bytes, payload: Any, sums: Any = None) -> None:
        pass

    def _fail_all(self, cause: BaseException) -> None:
        self.lost = ConnectionLost(f"lost: {cause}")
        for waiter in self.pending.values():
            if not waiter.done():
                waiter.set_exception(self.lost)
        self.pending.clear()

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self._closing = True


def _client() -> tuple[WireClient, _Wire]:
    wire = _Wire()
    client = WireClient(cast(Any, wire), "peer", BUDGET)
    client.sync_timeout = CEILING
    return client, wire


def _send(client: WireClient, op: Op, flags: int = 0) -> asyncio.Future[Reply]:
    length = 0 if op in (Op.REPL_FLUSH, Op.CHUNK_CSUMS) else 4096
    payload = None if not length else bytes(length)
    return client.submit(op, flags, REF, 0, length, payload, client.future())


def test_a_flush_outstanding_longer_than_the_budget_is_not_dropped() -> None:
    """A REPL_FLUSH (and a FUA forward, and a scrub's CHUNK_CSUMS with HEAL, which
    the peer answers after repairing and syncing) the peer answers nothing to for 5
    budgets: the connection stays (before: dropped after 0.2 s, the forwards failed
    as lost and the healthy peer was reported)."""

    async def main() -> None:
        for op, flags in (
            (Op.REPL_FLUSH, 0),
            (Op.REPL_WRITE, int(ReqFlag.FUA)),
            (Op.CHUNK_CSUMS, int(ReqFlag.HEAL)),
        ):
            client, wire = _client()
            fut = _send(client, op, flags)
            await asyncio.sleep(5 * BUDGET)
            assert wire.lost is None, f"{op.name} flags {flags}: {wire.lost}"
            assert not fut.done()
            await client.close()

    asyncio.run(main())


def test_a_hung_peer_is_still_dropped_within_its_budget_of_an_ordinary_write() -> None:
    """With a flush outstanding (quiet for 0.5 s), an ordinary forward that gets
    nothing is given up about its budget after it left, not at once and not after
    the ceiling; and syncs alone are given up after the ceiling."""

    async def main() -> None:
        client, wire = _client()
        flush = _send(client, Op.REPL_FLUSH)
        await asyncio.sleep(0.5)
        assert wire.lost is None
        t0 = time.monotonic()
        write = _send(client, Op.REPL_WRITE)
        await asyncio.sleep(BUDGET / 2)
        assert wire.lost is None, "dropped before the write's budget"
        await wait_until_async(lambda: wire.lost is not None, 2.0, "the write given up")
        took = time.monotonic() - t0
        assert took < CEILING / 2, f"given up after {took:.2f} s"
        for fut in (flush, write):
            with pytest.raises(ConnectionLost):
                fut.result()
        await client.close()

        client, wire = _client()
        t0 = time.monotonic()
        flush = _send(client, Op.REPL_FLUSH)
        await wait_until_async(lambda: wire.lost is not None, CEILING + 3, "the flush given up")
        took = time.monotonic() - t0
        assert CEILING <= took < CEILING + 2, f"given up after {took:.2f} s"
        await client.close()

    asyncio.run(main())


def test_an_answered_write_does_not_leave_the_clock_running_for_the_next() -> None:
    """Writes answered while a flush is outstanding: a write sent afterwards gets its
    whole budget from when it left."""

    async def main() -> None:
        client, wire = _client()
        _send(client, Op.REPL_FLUSH)
        await asyncio.sleep(0.3)
        (rid,) = wire.pending
        first = _send(client, Op.REPL_WRITE)
        # its reply arrives: what the receive path does
        wire.last_rx = time.monotonic()
        (other,) = [r for r in wire.pending if r != rid]
        wire.pending.pop(other)
        first.cancel()
        await asyncio.sleep(0.5)  # only the flush outstanding, quiet for 0.5 s
        assert wire.lost is None
        _send(client, Op.REPL_WRITE)
        await asyncio.sleep(BUDGET / 2)
        assert wire.lost is None, "dropped before the write's budget"
        await client.close()

    asyncio.run(main())
