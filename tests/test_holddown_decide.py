"""Hold-down and flapping (``meshblock.mdm.holddown``), pure: a record and what the
probes saw in, the record and whether the SDS returns out; no sockets, no clock. Then
the MDM's prober with probes and peers faked, and the liveness it drives: a held SDS
stays disconnected however often it heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import SimpleNamespace
from typing import cast

import pytest

from meshblock.mdm import holddown
from meshblock.mdm.api import sds as sds_api
from meshblock.mdm.context import MdmContext
from meshblock.mdm.holddown import (
    ISOLATION_SETTLE_S,
    Knobs,
    Prober,
    Record,
    cleared,
    from_stored,
    isolated_sds,
    probed,
    proven_up,
    to_stored,
    went_down,
)
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.models import PgState
from meshblock.mdm.pgtable import PgRow
from meshblock.sds.peer_probe import PeerProbes

pytestmark = pytest.mark.unit

K = Knobs(hold_down_s=5.0, flap_count=3, flap_window_s=600.0)


def test_a_down_holds_the_sds_and_is_counted() -> None:
    rec = went_down(Record(), 100.0, K)
    assert rec == Record(downs=(100.0,), held=True, flapping=False, reachable_since=None)


def test_more_than_flap_count_downs_in_the_window_is_flapping() -> None:
    rec = Record()
    for t in (0.0, 10.0, 20.0):
        rec = went_down(rec, t, K)
    assert not rec.flapping and len(rec.downs) == 3
    rec = went_down(rec, 30.0, K)
    assert rec.flapping and rec.held


def test_downs_older_than_the_window_do_not_count() -> None:
    rec = Record()
    for t in (0.0, 10.0, 20.0):
        rec = went_down(rec, t, K)
    rec = went_down(rec, 615.0, K)  # the first two are out of the 600 s window
    assert not rec.flapping and rec.downs == (20.0, 615.0)


def test_a_heartbeat_alone_never_proves_it_up() -> None:
    rec = went_down(Record(), 0.0, K)
    # no probe has reached it: however long since, and whatever the peers say
    assert not proven_up(rec, 1000.0, [1000.0], True, K)


def test_probes_must_succeed_for_the_hold_down_period_without_a_break() -> None:
    rec = went_down(Record(), 0.0, K)
    rec = probed(rec, 1.0, True, K)
    assert rec.reachable_since == 1.0
    rec = probed(rec, 2.0, True, K)
    assert rec.reachable_since == 1.0  # continuous: the start stays
    assert not proven_up(rec, 5.9, [10.0], True, K)
    assert proven_up(rec, 6.0, [10.0], True, K)


def test_a_peer_must_have_reached_it_too_when_there_are_peers() -> None:
    rec = probed(went_down(Record(), 0.0, K), 1.0, True, K)
    assert not proven_up(rec, 10.0, [], True, K)  # peers but no report
    assert not proven_up(rec, 10.0, [4.9, 0.0], True, K)  # not long enough
    assert proven_up(rec, 10.0, [0.0, 5.0], True, K)  # one suffices
    assert proven_up(rec, 10.0, [], False, K)  # no peer to ask: the MDM's view


def test_a_failed_probe_after_a_success_is_a_flap() -> None:
    rec = went_down(Record(), 0.0, K)
    rec = probed(rec, 1.0, False, K)
    assert rec.downs == (0.0,)  # still unreachable: not a new down
    rec = probed(rec, 2.0, True, K)
    rec = probed(rec, 3.0, False, K)
    assert rec.downs == (0.0, 3.0) and rec.reachable_since is None and rec.held


def test_ports_dropped_and_restored_every_3_s_end_flapping() -> None:
    """The cluster test's pattern: down on a report, then reachable 3 s, unreachable 3 s:
    never 5 s in a row, so never back, and the fourth down makes it flapping."""
    rec = went_down(Record(), 0.0, K)
    t = 0.0
    while t < 60.0 and not rec.flapping:
        t += 1.0
        reachable = int(t // 3) % 2 == 1
        rec = probed(rec, t, reachable, K)
        assert not proven_up(rec, t, [t], True, K)
    assert rec.flapping and rec.held and t < 30.0, (t, rec)
    # flapping: even a long run of good probes does not bring it back
    for t2 in range(int(t) + 1, int(t) + 20):
        rec = probed(rec, float(t2), True, K)
    assert not proven_up(rec, t + 20.0, [100.0], True, K)


def test_clear_flapping_forgets_the_downs_and_keeps_it_held() -> None:
    rec = Record()
    for t in (0.0, 1.0, 2.0, 3.0):
        rec = went_down(rec, t, K)
    assert rec.flapping
    rec = cleared(rec)
    assert rec == Record(held=True)
    rec = probed(rec, 10.0, True, K)
    assert proven_up(rec, 15.0, [5.0], True, K)


def test_probes_of_an_sds_not_held_change_nothing() -> None:
    assert probed(Record(downs=(1.0,)), 5.0, False, K) == Record(downs=(1.0,))


# -- the prober and liveness ---------------------------------------------------------


class Fake:
    """Probe results and the SDSs' data addresses, set by the test."""

    def __init__(self) -> None:
        self.reachable: dict[int, bool] = {}
        self.returned = 0

    async def addresses(self, ids: list[int]) -> dict[int, tuple[str, int]]:
        return {i: ("127.0.0.1", 7000 + i) for i in ids}

    async def probe(self, address: str, port: int) -> bool:
        return self.reachable.get(port - 7000, False)

    async def on_return(self) -> int:
        self.returned += 1
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def prober(live: Liveness, fake: Fake, clock: Clock | None = None) -> Prober:
    return Prober(
        live.holds,
        fake.addresses,
        live.connected_sds,
        live.release,
        fake.on_return,
        fake.probe,
        clock or Clock(),
    )


def beat_all(live: Liveness, ids: Iterable[int]) -> None:
    for i in ids:
        live.beat("sds", i)


def test_a_held_sds_returns_only_when_the_mdm_and_a_peer_reach_it() -> None:
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    fake = Fake()
    clock = Clock()
    p = prober(live, fake, clock)
    beat_all(live, (1, 2, 3))
    live.mark_down(2)
    beat_all(live, (1, 2, 3))  # its heartbeats go on
    assert live.state("sds", 2) == "disconnected" and ("sds", 2) in live.reported_down
    assert asyncio.run(p.tick()) == []  # not reached
    # its peers are told to probe it; it is not told to probe itself
    assert live.holds.probe_list(1) == [{"sds_id": 2, "address": "127.0.0.1", "data_port": 7002}]
    assert live.holds.probe_list(2) == []
    fake.reachable[2] = True
    assert asyncio.run(p.tick()) == []  # the MDM reaches it from now on
    clock.now += 2.0
    assert asyncio.run(p.tick()) == []  # for 2 s, but no peer has said so
    live.holds.report(1, [{"sds_id": 2, "reachable_s": 0.0}], clock.now)
    live.holds.report(3, [{"sds_id": 2, "reachable_s": 1.5}], clock.now)
    assert asyncio.run(p.tick()) == []  # one cannot reach it, one not for long enough
    clock.now += 10.0
    live.holds.report(3, [{"sds_id": 2, "reachable_s": 2.5}], clock.now - 7.0)
    assert asyncio.run(p.tick()) == []  # long enough, but that report is stale now
    live.holds.report(3, [{"sds_id": 2, "reachable_s": 2.5}], clock.now)
    beat_all(live, (1, 2, 3))
    assert asyncio.run(p.tick()) == [2]
    assert live.state("sds", 2) == "connected" and fake.returned == 1
    assert live.holds.probe_list(1) == []


def test_a_held_sds_with_no_connected_peer_returns_on_the_mdms_probes() -> None:
    live = Liveness(10.0, Knobs(hold_down_s=0.0, flap_count=3, flap_window_s=600.0))
    fake = Fake()
    p = prober(live, fake)
    beat_all(live, (1,))
    live.mark_down(1)
    beat_all(live, (1,))
    assert asyncio.run(p.tick()) == []
    fake.reachable[1] = True
    assert asyncio.run(p.tick()) == [1]
    assert live.state("sds", 1) == "connected"


def test_a_flapping_sds_is_not_probed_and_clear_lets_it_prove_itself() -> None:
    live = Liveness(10.0, Knobs(hold_down_s=0.0, flap_count=1, flap_window_s=600.0))
    fake = Fake()
    p = prober(live, fake)
    beat_all(live, (1, 2))
    live.mark_down(2)
    fake.reachable[2] = True
    asyncio.run(p.tick())  # hold 0 s but no peer report: still held
    fake.reachable[2] = False
    asyncio.run(p.tick())  # a flap: the second down, more than flap_count=1
    assert live.holds.flapping(2) and live.holds.to_probe() == []
    fake.reachable[2] = True
    live.holds.report(1, [{"sds_id": 2, "reachable_s": 9.0}], 1000.0)
    assert asyncio.run(p.tick()) == [] and live.state("sds", 2) == "disconnected"
    live.holds.clear(2)
    assert not live.holds.flapping(2) and live.holds.held(2)
    beat_all(live, (1, 2))
    assert asyncio.run(p.tick()) == [2]  # probed again, and the peer's report holds
    assert live.state("sds", 2) == "connected"


# -- the SDS's side: probes of the SDSs the MDM names ---------------------------------


def test_an_sds_probes_the_sdss_the_mdm_names_and_reports_how_long_they_answered() -> None:
    answers: dict[int, bool] = {7002: True, 7003: False}
    pinged: list[int] = []

    async def ping(address: str, port: int) -> bool:
        pinged.append(port)
        return answers[port]

    async def scenario() -> None:
        probes = PeerProbes(ping, interval_s=3600.0)  # rounds driven by the test
        assert probes.report() == []
        probes.set_targets(
            [
                {"sds_id": 2, "address": "127.0.0.1", "data_port": 7002},
                {"sds_id": 3, "address": "127.0.0.1", "data_port": 7003},
            ]
        )
        assert probes.report() == [
            {"sds_id": 2, "reachable_s": 0.0},
            {"sds_id": 3, "reachable_s": 0.0},
        ]  # not probed yet
        await probes.probe_once()
        assert set(pinged) == {7002, 7003}
        got = {p["sds_id"]: p["reachable_s"] for p in probes.report()}
        assert got[3] == 0.0 and got[2] >= 0.0
        answers[7002] = False
        await probes.probe_once()
        assert {p["sds_id"]: p["reachable_s"] for p in probes.report()} == {2: 0.0, 3: 0.0}
        # the MDM stops naming SDS 3 (proven up, or flapping): it is dropped
        probes.set_targets([{"sds_id": 2, "address": "127.0.0.1", "data_port": 7002}])
        assert [p["sds_id"] for p in probes.report()] == [2]
        pinged.clear()
        await probes.probe_once()
        assert pinged == [7002]
        await probes.stop()

    asyncio.run(scenario())


# -- one-sided partitions: the SDS cut off from its peers ----------------------------


def test_an_sds_reporting_the_peers_it_forwards_to_is_the_isolated_one() -> None:
    # SDS 2 forwards to 1 and 3 and reported only 3: one peer down is no isolation
    assert isolated_sds({2: {3: 10.0}}, {2: {1, 3}}, [1, 2, 3], 11.0) is None
    assert isolated_sds({2: {1: 10.0, 3: 10.5}}, {2: {1, 3}}, [1, 2, 3], 11.0) == 2
    # needs unknown: weighed against every other connected SDS
    assert isolated_sds({2: {1: 10.0, 3: 10.5}}, {}, [1, 2, 3], 11.0) == 2
    # it forwards to 1 and 3 only, of 4 others: those two are more than half
    assert isolated_sds({2: {1: 10.0, 3: 10.5}}, {2: {1, 3}}, [1, 2, 3, 4, 5], 11.0) == 2
    # reports older than the window, or of SDSs not connected, do not count
    assert isolated_sds({2: {1: 0.0, 3: 10.0}}, {2: {1, 3}}, [1, 2, 3], 11.0) is None
    assert isolated_sds({2: {1: 10.0, 3: 10.0}}, {2: {1, 3}}, [1, 2], 11.0) is None


def test_one_slow_peer_is_no_isolation_of_the_sds_reporting_it() -> None:
    """A's forwards to B time out (B's disk is slow), the MDM's PING to B
    answers, and one report named "more than half" of A's peers: A went down. Two
    other SDSs must be connected, and A must name two distinct peers unless it
    forwards to one only."""
    assert isolated_sds({1: {2: 10.0}}, {1: {2}}, [1, 2], 11.0) is None  # two SDSs
    # a third SDS held: A and B are all that is connected
    assert isolated_sds({1: {2: 10.0, 3: 10.0}}, {1: {2}}, [1, 2], 11.0) is None
    # A forwards to no one (or the MDM does not know): weighed against every other
    assert isolated_sds({1: {2: 10.0}}, {1: set()}, [1, 2, 3], 11.0) is None
    assert isolated_sds({1: {2: 10.0}}, {}, [1, 2, 3], 11.0) is None
    # A forwards to B, C and D: B and C named are more than half, and two
    assert isolated_sds({1: {2: 10.0}}, {1: {2, 3, 4}}, [1, 2, 3, 4], 11.0) is None
    assert isolated_sds({1: {2: 10.0, 3: 10.0}}, {1: {2, 3, 4}}, [1, 2, 3, 4], 11.0) == 1
    # A forwards to B only, in a cluster of three: the one it needs, named (a known
    # limit: a slow B is not told from a cut-off A here; the guard and the hold remain)
    assert isolated_sds({1: {2: 10.0}}, {1: {2}}, [1, 2, 3], 11.0) == 1


def test_of_two_sds_reporting_each_other_the_one_others_report_too_is_isolated() -> None:
    both = {2: {3: 10.0}, 3: {2: 10.0}}
    assert isolated_sds(both, {2: {3}, 3: {2}}, [1, 2, 3], 11.0) is None  # a tie
    assert isolated_sds(both, {2: {3}, 3: {2}}, [2, 3], 11.0) is None  # two SDSs: a tie
    # SDS 2 cut off from the data network: it reports 1 and 3, they both report it
    cut = {2: {1: 10.0, 3: 10.0}, 1: {2: 10.0}, 3: {2: 10.0}}
    assert isolated_sds(cut, {2: {1, 3}, 1: {2}, 3: {2}}, [1, 2, 3], 11.0) == 2
    # two suspects, each named by one other: a tie, no one goes down
    two = {1: {3: 10.0, 4: 10.0}, 2: {3: 10.0, 4: 10.0}, 3: {1: 10.0}, 4: {2: 10.0}}
    assert isolated_sds(two, {1: {3, 4}, 2: {3, 4}}, [1, 2, 3, 4], 11.0) is None


def test_the_reports_of_a_round_are_decided_together_not_the_first_alone() -> None:
    """Not the first report alone decides (its SDS went down before any other report
    was weighed). SDS 1 cut off from the data network: 2 and 3 report
    it (each forwards to 1 only), 1 reports 2 and 3. Decided once at the end of the
    round, 1 goes down, never 2 (whose report arrived first)."""
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    beat_all(live, (1, 2, 3))
    holds = live.holds
    assert holds.not_confirmed(2, 1, {1}, 100.0)  # the first: starts a round
    assert holds.settle_at == 100.0 + ISOLATION_SETTLE_S
    assert not holds.not_confirmed(3, 1, {1}, 100.1)
    assert not holds.not_confirmed(1, 2, {2, 3}, 100.2)
    assert not holds.not_confirmed(1, 3, {2, 3}, 100.3)
    assert holds.settle(live.connected_sds(), 100.0 + ISOLATION_SETTLE_S) == 1
    assert holds.settle_at is None
    # the next report starts the next round
    assert holds.not_confirmed(2, 3, {3}, 102.0)


def test_a_two_sds_partition_takes_neither_down() -> None:
    """Two SDSs cut off from each other: neither goes down (whichever report came first
    used to lose)."""
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    beat_all(live, (1, 2))
    holds = live.holds
    assert holds.not_confirmed(1, 2, {2}, 100.0)
    assert not holds.not_confirmed(2, 1, {1}, 100.1)
    assert holds.settle(live.connected_sds(), 101.0) is None


def test_an_isolated_reporter_goes_down_never_the_peer_it_named() -> None:
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    beat_all(live, (1, 2, 3))
    holds = live.holds
    holds.not_confirmed(2, 1, {1, 3}, 100.0)
    assert holds.settle(live.connected_sds(), 101.0) is None  # one peer: not yet
    holds.not_confirmed(2, 3, {1, 3}, 101.5)
    assert holds.settle(live.connected_sds(), 102.5) == 2
    # a held SDS is left out: its reports name no one else afterwards
    live.mark_down(2, isolated=True)
    assert holds.record(2).isolated and holds.held(2)
    holds.not_confirmed(1, 2, {2}, 103.0)
    assert holds.settle(live.connected_sds(), 104.0) is None


def test_an_isolated_sds_returns_only_once_it_reaches_a_peer_itself() -> None:
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    fake = Fake()
    clock = Clock()
    p = prober(live, fake, clock)
    beat_all(live, (1, 2, 3))
    live.mark_down(2, isolated=True)
    fake.reachable[2] = True
    assert asyncio.run(p.tick()) == []
    # it is told to probe its connected peers; they are told to probe it
    assert [e["sds_id"] for e in live.holds.probe_list(2)] == [1, 3]
    assert [e["sds_id"] for e in live.holds.probe_list(1)] == [2]
    clock.now += 3.0
    beat_all(live, (1, 2, 3))
    live.holds.report(1, [{"sds_id": 2, "reachable_s": 3.0}], clock.now)
    live.holds.report(2, [{"sds_id": 1, "reachable_s": 0.0}, {"sds_id": 3, "reachable_s": 0.0}])
    assert asyncio.run(p.tick()) == []  # the MDM and a peer reach it; it reaches no one
    clock.now += 3.0
    live.holds.report(1, [{"sds_id": 2, "reachable_s": 6.0}], clock.now)
    live.holds.report(2, [{"sds_id": 3, "reachable_s": 2.5}], clock.now)
    assert asyncio.run(p.tick()) == [2]
    assert not live.holds.record(2).isolated and live.holds.probe_list(2) == []


def test_a_stored_record_reads_back_with_its_downs_and_flags() -> None:
    rec = Record()
    for t in (100.0, 110.0, 120.0, 130.0):
        rec = went_down(rec, t, K, isolated=True)
    assert rec.flapping and rec.isolated
    text = to_stored(rec, 200.0, 5000.0)
    assert text is not None
    # read back by a new process whose monotonic clock reads 7 when the wall clock reads 5010
    back = from_stored(text, 7.0, 5010.0)
    assert back.flapping and back.held and back.isolated and back.reachable_since is None
    assert [round(t, 3) for t in back.downs] == [-103.0, -93.0, -83.0, -73.0]
    assert to_stored(Record(), 1.0, 1.0) is None
    assert from_stored("not json", 1.0, 1.0) == Record()


class FakeDetector:
    """What taking an SDS down would strand (:meth:`FailureDetector.leaves_inactive`)."""

    def __init__(self, stranded: list[PgRow]) -> None:
        self.stranded = stranded
        self.checks = 0

    async def leaves_inactive(self, sds_id: int) -> list[PgRow]:
        return self.stranded

    async def check(self) -> int:
        self.checks += 1
        return 0


@pytest.mark.parametrize("resyncing_from_it", [False, True])
def test_the_isolated_sds_stays_up_when_its_down_would_leave_a_pg_inactive(
    monkeypatch: pytest.MonkeyPatch, resyncing_from_it: bool
) -> None:
    """SDS 2 reports both its peers (one loaded by a resync from it); the
    reports make it the isolated one, but a PG resyncing off it would have no serving
    copy once it is down: it stays up. Without such a PG it goes down."""
    monkeypatch.setattr(holddown, "ISOLATION_SETTLE_S", 0.0)
    live = Liveness(10.0, Knobs(hold_down_s=2.0, flap_count=3, flap_window_s=600.0))
    beat_all(live, (1, 2, 3))
    stranded = [PgRow(1, 5, 20, 30, PgState.RESYNCING)] if resyncing_from_it else []
    detector = FakeDetector(stranded)
    c = cast(MdmContext, SimpleNamespace(liveness=live, detector=detector))
    live.holds.not_confirmed(2, 1, {1, 3})
    live.holds.not_confirmed(2, 3, {1, 3})
    asyncio.run(sds_api._settle(c))
    assert live.holds.held(2) is not resyncing_from_it
    assert live.state("sds", 2) == ("connected" if resyncing_from_it else "disconnected")
    assert detector.checks == (0 if resyncing_from_it else 1)
    assert not live.holds.held(1) and not live.holds.held(3)
