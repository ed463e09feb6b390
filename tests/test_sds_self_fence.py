"""Self-fencing after a one-sided partition (docs/sds.md, "Self-fencing"), in process:
:class:`~meshblock.sds.peer_probe.SelfFence` with a fake clock and pings, then a
primary's data service whose only peer does not answer: once fenced, a write it would
have to mirror is refused with ``NOT_PRIMARY`` at once, and our copy is untouched."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshblock import pki
from meshblock.sds.checksums import BLOCK
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import PgMap
from meshblock.sds.peer_probe import SelfFence, peers_needed
from meshblock.sds.resync import Resync
from meshblock.wire.protocol import ROLE_OPS, Op, PeerRole, Request, Status
from meshblock.wire.tls import allowed_ops
from test_device_failstop_units import Conn
from test_sds_checksums import VOL
from test_sds_heal_units import PEER, PeerCopy, answer, partial_write, pattern, state_with_peer

pytestmark = pytest.mark.unit

EMPTY = memoryview(b"")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fenced_after_the_period_with_no_peer_answering() -> None:
    clock = Clock()
    fence = SelfFence(5.0, clock=clock)
    assert not fence.fenced()  # nothing failed yet
    fence.peer_failed()
    clock.now += 4.9
    assert not fence.fenced()
    clock.now += 0.1
    assert fence.fenced() and fence.fences == 1
    fence.peer_failed()  # more failures do not move the start
    assert fence.fenced()
    fence.peer_ok()  # a peer answers: unfenced at once
    assert not fence.fenced()
    fence.peer_failed()
    clock.now += 4.0
    assert not fence.fenced()  # the period starts again


def test_a_probe_of_the_mdm_keeps_it_unfenced_for_the_period() -> None:
    clock = Clock()
    fence = SelfFence(5.0, clock=clock)
    fence.peer_failed()
    clock.now += 3.0
    fence.mdm_probed()  # the MDM reaches us over the data path: it decides
    clock.now += 4.0
    assert not fence.fenced()
    clock.now += 1.0
    assert fence.fenced()


def test_zero_never_fences() -> None:
    clock = Clock()
    fence = SelfFence(0.0, clock=clock)
    fence.peer_failed()
    clock.now += 1e6
    assert not fence.fenced()


def test_pings_of_the_peers_it_needs_end_the_fence() -> None:
    clock = Clock()
    answers = {2: False, 3: False}
    asked: list[int] = []

    async def ping(address: str, port: int) -> bool:
        asked.append(port)
        return answers[port]

    needed = {2: ("127.0.0.1", 2), 3: ("127.0.0.1", 3)}
    fence = SelfFence(5.0, ping, lambda: needed, clock=clock)

    async def main() -> None:
        fence.peer_failed()
        clock.now += 6.0
        await fence.check_once()
        assert fence.fenced() and sorted(asked) == [2, 3]
        answers[3] = True
        await fence.check_once()
        assert not fence.fenced()
        # no peer needed (the map left us no PG to forward for): not failing
        fence.peer_failed()
        needed.clear()
        clock.now += 6.0
        await fence.check_once()
        assert not fence.fenced()
        await fence.stop()

    asyncio.run(main())


def test_peers_needed_are_the_forwarding_secondaries_and_targets_of_our_pgs() -> None:
    addr = {1: ("a", 1), 2: ("b", 2), 3: ("c", 3)}
    m = PgMap(
        1,
        5,
        4,
        ((1, 10), (1, 10), (2, 20), (1, 10)),
        ((2, 20), (3, 30), (1, 10), (3, 30)),
        addr,
        {},
        clean=(True, False, True, False),
        target=((0, 0), (0, 0), (0, 0), (0, 0)),
    )
    # PG 0 forwards to 2; PG 1 and 3 are degraded (no forward); PG 2 is not ours
    assert peers_needed([m], 1) == {2: ("b", 2)}
    assert peers_needed([m], 2) == {1: ("a", 1)}


def test_a_fenced_primary_refuses_a_write_it_must_mirror_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern()
    peer = PeerCopy(data)
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    clock = Clock()
    sds.peers.fence = SelfFence(5.0, clock=clock)
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        sds.peers.lost(PEER)  # a forward lost: the period starts
        clock.now += 6.0
        partial_write(svc, conn, 1, Op.WRITE, 0, b"n" * BLOCK)
        assert await answer(conn, 1) == Status.NOT_PRIMARY

    try:
        asyncio.run(main())
        assert peer.writes == []  # nothing forwarded
        got = store.read(VOL, 1, 0, BLOCK)
        assert got is not None and bytes(got) == data[:BLOCK]  # nothing written
        assert sds.peers.fence.fences == 1
    finally:
        store.close()


def test_a_primary_not_fenced_writes_and_forwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = pattern()
    peer = PeerCopy(data)
    sds = state_with_peer(tmp_path, peer, monkeypatch, primary=True)
    store = sds.store
    clock = Clock()
    sds.peers.fence = SelfFence(5.0, clock=clock)
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.allowed = frozenset(Op(op) for op in ROLE_OPS[PeerRole.CLIENT])

    async def main() -> None:
        store.write(store.devices[0], VOL, 1, 0, data)
        sds.peers.lost(PEER)
        clock.now += 4.0  # within the period
        partial_write(svc, conn, 1, Op.WRITE, 0, b"n" * BLOCK)
        assert await answer(conn, 1) == Status.OK

    try:
        asyncio.run(main())
        assert peer.writes == [(0, BLOCK)]
        assert not sds.peers.fence.fenced()  # the forward answered: unfenced
    finally:
        store.close()


@pytest.mark.parametrize(
    ("identity", "counts"),
    [
        (pki.Identity(pki.Kind.SDC, "0f0e0d0c-0000-4000-8000-000000000001"), False),
        (pki.Identity(pki.Kind.SDS, "sds2"), False),
        (pki.Identity(pki.Kind.MDM, "mdm1"), True),
        (None, True),  # a plain-TCP port: the cluster secret is all there is
    ],
)
def test_only_the_mdm_s_ping_counts_as_its_probe(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    identity: pki.Identity | None,
    counts: bool,
) -> None:
    """A PING on a TOOL connection keeps a cut-off primary unfenced only from an mdm:
    certificate (or on a plain port): a stolen SDC or SDS key pinging it every 4 s
    must not keep it acknowledging writes alone after the MDM failed its PGs over."""
    sds = state_with_peer(tmp_path, PeerCopy(pattern()), monkeypatch, primary=True)
    clock = Clock()
    sds.peers.fence = SelfFence(5.0, clock=clock)
    svc = DataService(sds, Resync(sds))
    conn = Conn()
    conn.role = "tool"
    conn.identity = identity  # type: ignore[attr-defined]
    ops = allowed_ops(identity, PeerRole.TOOL) if identity else frozenset(Op)
    conn.allowed = frozenset(Op(o) for o in ops)

    async def main() -> None:
        sds.peers.lost(PEER)
        for n in range(5):
            clock.now += 4.0
            svc.handle(conn, Request(0, int(Op.PING), 0, 0, n + 1, 0, 0, 0, 0, 0, 0, 0), EMPTY)
            assert await answer(conn, n + 1) == Status.OK
        clock.now += 1.0

    try:
        asyncio.run(main())
        assert sds.peers.fence.fenced() is not counts
    finally:
        sds.store.close()
