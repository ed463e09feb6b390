"""Down means down until proven up; an SDS that flaps stays out.

An SDS declared down on a failure report (a peer could not reach it and neither
could the MDM: ``POST /api/v1/sds/{id}/unreachable``) is **held down**: its
heartbeats alone do not bring it back, since a gray failure (its data port
unreachable, its heartbeats still flowing) would otherwise bring it back within a
second, to be reported again: down, up, down, a new map epoch each time. It returns
when, for ``[cluster] hold_down_s`` without a break,

- the MDM reaches its data port with a probe over the data protocol (a connection
  authenticated with the cluster secret and a PING answered), once a second, and
- at least one other connected SDS does the same: the MDM names the held SDSs in its
  heartbeat replies (``probe``), every SDS pings them once a second and reports in
  its heartbeats how long each has answered without a break (``probes``). When no
  other SDS is connected the MDM's view suffices.

An SDS **goes down** each time a report about it is confirmed, and each time a probe
of it fails after one that succeeded while it is held (a return attempt that
failed: a flap). One that goes down more than ``flap_count`` times within
``flap_window_s`` is **flapping**: it stays held, whatever the probes say, until an
operator clears it (``meshctl sds clear-flapping NAME``); then it must prove itself
up like any held SDS.

An SDS **cut off from its peers** while the MDM and the SDCs still reach it (a
one-sided partition) reports its peers unreachable, and the MDM reaches every one of
them: those reports are not confirmed, and no healthy peer goes down on its word.
The MDM keeps the unconfirmed reports of each SDS for :data:`ISOLATION_WINDOW_S` and
decides on them in rounds: the first report of a round waits :data:`ISOLATION_SETTLE_S`
(:meth:`HoldDowns.not_confirmed`), then every report kept is weighed at once
(:meth:`HoldDowns.settle`). An SDS whose reports name more than half of the connected
peers it forwards writes to (the secondaries and move targets of the PGs it is primary
of; all of them when none), and at least :data:`ISOLATION_MIN_PEERS` distinct ones
unless it forwards to one only, with at least :data:`ISOLATION_MIN_PEERS` others
connected, is the
faulty one (:func:`isolated_sds`; when several qualify, the one most peers reported
too, and none on a tie) and, unless that would leave a PG with no serving copy
(:func:`meshblock.mdm.failures.inactive_without`), goes down, held, as
**isolated**: besides the MDM's and a peer's probes of it, it returns only once its
own probes reach a peer for ``hold_down_s`` (the MDM names its connected peers in
its heartbeat replies' ``probe``, and its ``probes`` say how long each answered).

The decisions are pure functions of a :class:`Record` (load, decide, write, as in
:mod:`meshblock.mdm.failures`); :class:`HoldDowns` keeps one record per SDS in
memory and marks the ones that changed, which :mod:`meshblock.mdm.liveness` writes
to the store with the heartbeats (``sdss.hold_state``: :func:`to_stored`), so that a
held or flapping SDS stays out across an MDM restart; :class:`Prober` runs the
MDM's probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshblock.mdm import stopping
from meshblock.wire.client import answers_ping
from meshblock.wire.protocol import PeerRole

log = logging.getLogger(__name__)

#: A peer's report (a heartbeat's ``probes``) counts for this long after it arrived.
PEER_REPORT_FRESH_S = 6.0
#: The MDM's probe of a held SDS: connect, authenticate and PING within this.
PROBE_TIMEOUT_S = 1.0
#: An SDS's report that a peer is unreachable, not confirmed (the MDM reached the
#: peer), counts towards finding the SDS isolated for this long.
ISOLATION_WINDOW_S = 10.0
#: The first unconfirmed report of a round starts this wait; the MDM then decides once,
#: on every report gathered (:meth:`HoldDowns.settle`), so that a second SDS's reports
#: are weighed too and the first report to arrive does not decide alone.
ISOLATION_SETTLE_S = 1.0
#: An SDS is found isolated only when at least this many other SDSs are connected (the
#: other half of a two-SDS cluster is no isolation), and its reports name at least this
#: many distinct peers, unless it forwards writes to one connected peer only.
ISOLATION_MIN_PEERS = 2


@dataclass(frozen=True)
class Knobs:
    """``[cluster] hold_down_s``, ``flap_count`` and ``flap_window_s``."""

    hold_down_s: float = 5.0
    flap_count: int = 3
    flap_window_s: float = 600.0


@dataclass(frozen=True)
class Record:
    """What the MDM knows of one SDS's downs and return (times: monotonic seconds)."""

    downs: tuple[float, ...] = ()
    """When it went down, within the last ``flap_window_s``."""
    held: bool = False
    """Declared down on a report and not proven up since."""
    flapping: bool = False
    """Went down more than ``flap_count`` times in ``flap_window_s``: held until cleared."""
    reachable_since: float | None = None
    """The MDM's probes have succeeded since then without a break (None: the last failed)."""
    isolated: bool = False
    """Its last down was for reporting its peers unreachable while the MDM reached them:
    it returns only once its own probes reach a peer too."""


def went_down(rec: Record, now: float, knobs: Knobs, isolated: bool = False) -> Record:
    """``rec`` after the SDS goes down at ``now``: held, this down counted, flapping
    once the window holds more than ``flap_count`` downs. ``isolated``: it went down
    for being cut off from its peers (:func:`isolated_sds`); a flap of an SDS held as
    isolated keeps it so."""
    downs = (*(t for t in rec.downs if now - t < knobs.flap_window_s), now)
    return Record(
        downs=downs,
        held=True,
        flapping=rec.flapping or len(downs) > knobs.flap_count,
        reachable_since=None,
        isolated=isolated or (rec.held and rec.isolated),
    )


def probed(rec: Record, now: float, ok: bool, knobs: Knobs) -> Record:
    """``rec`` after a probe by the MDM at ``now``. A failure of a held SDS after a
    success is a flap: it counts as going down."""
    if not rec.held:
        return rec
    if ok:
        return rec if rec.reachable_since is not None else replace(rec, reachable_since=now)
    if rec.reachable_since is not None:
        return went_down(rec, now, knobs, rec.isolated)
    return rec


def proven_up(
    rec: Record,
    now: float,
    peer_reachable_s: Iterable[float],
    peers: bool,
    knobs: Knobs,
    own_reachable_s: Iterable[float] = (),
) -> bool:
    """Whether a held SDS returns now: not flapping, the MDM's probes have succeeded for
    ``hold_down_s``, and so have one peer's (``peer_reachable_s``: what the other
    connected SDSs reported in fresh heartbeats) unless ``peers`` is False (no other
    SDS is connected to ask). One held as isolated must also have reached one of
    those peers itself for ``hold_down_s`` (``own_reachable_s``: its own fresh
    reports)."""
    if not rec.held or rec.flapping or rec.reachable_since is None:
        return False
    if now - rec.reachable_since < knobs.hold_down_s:
        return False
    if not peers:
        return True
    if rec.isolated and not any(s >= knobs.hold_down_s for s in own_reachable_s):
        return False
    return any(s >= knobs.hold_down_s for s in peer_reachable_s)


def isolated_sds(
    unconfirmed: Mapping[int, Mapping[int, float]],
    needs: Mapping[int, Collection[int]],
    connected: Collection[int],
    now: float,
    window_s: float = ISOLATION_WINDOW_S,
) -> int | None:
    """The SDS cut off from its peers, if the reports say so, pure. ``unconfirmed``:
    per reporting SDS, the peers it reported unreachable (and when) that the MDM
    reached; ``needs``: per SDS, the peers it forwards writes to (all the others when
    unknown or none); ``connected``: the SDSs heartbeating and not held. An SDS whose
    reports of the last ``window_s`` name more than half of the connected peers it
    forwards to, and at least :data:`ISOLATION_MIN_PEERS` distinct ones (or the one it
    forwards to, when it forwards to one only), while at least
    :data:`ISOLATION_MIN_PEERS` other SDSs are connected, is suspect; of several
    suspects, the one the most others reported; none on a tie (two SDSs that each
    report only the other: which one is cut off cannot be told)."""
    live = set(connected)
    named: dict[int, set[int]] = {
        r: {t for t, at in got.items() if t in live - {r} and now - at <= window_s}
        for r, got in unconfirmed.items()
        if r in live
    }
    suspects = []
    for r, targets in sorted(named.items()):
        others = live - {r}
        if len(others) < ISOLATION_MIN_PEERS:
            continue
        forwards = set(needs.get(r, ())) & others or others
        if len(targets) < min(ISOLATION_MIN_PEERS, len(forwards)):
            continue
        if 2 * len(targets) > len(forwards | targets):
            suspects.append(r)
    if len(suspects) <= 1:
        return suspects[0] if suspects else None
    votes = {s: sum(1 for r, t in named.items() if s in t and r != s) for s in suspects}
    best = max(votes.values())
    top = [s for s, v in votes.items() if v == best]
    return top[0] if len(top) == 1 else None


def cleared(rec: Record) -> Record:
    """``rec`` after ``clear-flapping``: its downs forgotten, still held until proven up."""
    return Record(held=rec.held, reachable_since=rec.reachable_since, isolated=rec.isolated)


def to_stored(rec: Record, mono_now: float, wall_now: float) -> str | None:
    """``rec`` as ``sdss.hold_state`` holds it (JSON, times as UNIX seconds); None for
    an SDS with nothing to remember. Probe results are not kept: after a restart a
    held SDS proves itself up from scratch."""
    if rec == Record():
        return None
    doc = {
        "held": rec.held,
        "flapping": rec.flapping,
        "isolated": rec.isolated,
        "downs": [round(wall_now - (mono_now - t), 3) for t in rec.downs],
    }
    return json.dumps(doc, sort_keys=True)


def from_stored(text: str | None, mono_now: float, wall_now: float) -> Record:
    """The record :func:`to_stored` wrote (``Record()`` for None or a value it cannot
    read: an unreadable hold is logged and forgotten)."""
    if not text:
        return Record()
    try:
        doc: Any = json.loads(text)
        downs = tuple(mono_now - (wall_now - float(t)) for t in doc.get("downs", ()))
        return Record(
            downs=downs,
            held=bool(doc.get("held")),
            flapping=bool(doc.get("flapping")),
            isolated=bool(doc.get("isolated")),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        log.error("cannot read a stored hold-down %r: %s; forgotten", text, exc)
        return Record()


@dataclass
class PeerReport:
    reachable_s: float
    received: float


@dataclass
class HoldDowns:
    """One :class:`Record` per SDS id, and the peers' probe reports."""

    knobs: Knobs = field(default_factory=Knobs)
    records: dict[int, Record] = field(default_factory=dict)
    # held SDS -> reporting SDS -> its last report
    peer_reports: dict[int, dict[int, PeerReport]] = field(default_factory=dict)
    # held SDS -> its data address (host, port), for the heartbeat replies' ``probe``
    addresses: dict[int, tuple[str, int]] = field(default_factory=dict)
    # held as isolated -> peer -> its last report of that peer (its own probes)
    own_reports: dict[int, dict[int, PeerReport]] = field(default_factory=dict)
    # connected SDSs not held -> data address: what an isolated SDS is told to probe
    peer_addresses: dict[int, tuple[str, int]] = field(default_factory=dict)
    # reporter -> peer -> when it reported the peer unreachable and the MDM reached it
    unconfirmed: dict[int, dict[int, float]] = field(default_factory=dict)
    # reporter -> the peers it forwards writes to, as of its last unconfirmed report
    needs: dict[int, frozenset[int]] = field(default_factory=dict)
    # when the round of unconfirmed reports in progress is decided (None: no round)
    settle_at: float | None = None
    # SDSs whose record changed since the store last saw it (meshblock.mdm.liveness)
    changed: set[int] = field(default_factory=set)

    def record(self, sds_id: int) -> Record:
        return self.records.get(sds_id, Record())

    def held(self, sds_id: int) -> bool:
        return self.record(sds_id).held

    def held_ids(self) -> list[int]:
        return sorted(i for i, r in self.records.items() if r.held)

    def flapping(self, sds_id: int) -> bool:
        return self.record(sds_id).flapping

    def down(self, sds_id: int, now: float | None = None, isolated: bool = False) -> Record:
        now = time.monotonic() if now is None else now
        rec = went_down(self.record(sds_id), now, self.knobs, isolated)
        self._set(sds_id, rec)
        self.unconfirmed.pop(sds_id, None)
        return rec

    def not_confirmed(
        self, reporter: int, target: int, needs: Collection[int], now: float | None = None
    ) -> bool:
        """``reporter`` (which forwards writes to ``needs``) reported ``target``
        unreachable and the MDM reached it: kept for :data:`ISOLATION_WINDOW_S`.
        Nothing is decided on one report: True when this report starts a round, to be
        decided by :meth:`settle` :data:`ISOLATION_SETTLE_S` later on every report
        gathered by then; False when a round is already waiting."""
        now = time.monotonic() if now is None else now
        self.unconfirmed.setdefault(reporter, {})[target] = now
        self.needs[reporter] = frozenset(needs)
        if self.settle_at is not None:
            return False
        self.settle_at = now + ISOLATION_SETTLE_S
        return True

    def settle(self, connected: Collection[int], now: float | None = None) -> int | None:
        """Ends the round: the one SDS the reports gathered show cut off from its peers
        (:func:`isolated_sds` over ``connected``, held SDSs left out), if any; at most
        one per round."""
        now = time.monotonic() if now is None else now
        self.settle_at = None
        for got in self.unconfirmed.values():
            for t, at in list(got.items()):
                if now - at > ISOLATION_WINDOW_S:
                    del got[t]
        live = [i for i in connected if not self.held(i)]
        return isolated_sds(self.unconfirmed, self.needs, live, now)

    def load(self, records: Mapping[int, Record]) -> None:
        """Records read back from the store at start."""
        for sds_id, rec in records.items():
            if rec != Record():
                self.records[sds_id] = rec

    def probed(self, sds_id: int, ok: bool, now: float | None = None) -> Record:
        now = time.monotonic() if now is None else now
        before = self.record(sds_id)
        rec = probed(before, now, ok, self.knobs)
        self._set(sds_id, rec)
        if rec.flapping and not before.flapping:
            log.error(
                "SDS %d went down %d times within %.0f s: flapping, kept out until "
                "'meshctl sds clear-flapping'",
                sds_id,
                len(rec.downs),
                self.knobs.flap_window_s,
            )
        return rec

    def clear(self, sds_id: int) -> None:
        self._set(sds_id, cleared(self.record(sds_id)))

    def release(self, sds_id: int) -> None:
        """Proven up: no longer held (its downs still count towards flapping)."""
        rec = self.record(sds_id)
        self._set(sds_id, replace(rec, held=False, reachable_since=None, isolated=False))
        self.peer_reports.pop(sds_id, None)
        self.own_reports.pop(sds_id, None)
        self.addresses.pop(sds_id, None)

    def forget(self, sds_id: int) -> None:
        self.records.pop(sds_id, None)
        self.peer_reports.pop(sds_id, None)
        self.own_reports.pop(sds_id, None)
        self.addresses.pop(sds_id, None)
        self.unconfirmed.pop(sds_id, None)
        self.needs.pop(sds_id, None)
        for reports in (*self.peer_reports.values(), *self.own_reports.values()):
            reports.pop(sds_id, None)
        for got in self.unconfirmed.values():
            got.pop(sds_id, None)

    def report(
        self, reporter: int, probes: Iterable[Mapping[str, float]], now: float | None = None
    ) -> None:
        """A heartbeat's ``probes``: how long ``reporter`` has reached each held SDS."""
        now = time.monotonic() if now is None else now
        own = self.record(reporter)
        for p in probes:
            target = int(p["sds_id"])
            got = PeerReport(float(p["reachable_s"]), now)
            if target == reporter:
                continue
            if self.held(target):
                self.peer_reports.setdefault(target, {})[reporter] = got
            elif own.held and own.isolated:
                self.own_reports.setdefault(reporter, {})[target] = got

    def peer_view(self, sds_id: int, reporters: Iterable[int], now: float) -> list[float]:
        """What the given reporters said of ``sds_id`` in fresh reports."""
        return _fresh(self.peer_reports.get(sds_id, {}), reporters, now)

    def own_view(self, sds_id: int, peers: Iterable[int], now: float) -> list[float]:
        """What ``sds_id``, held as isolated, said of the given peers in fresh reports."""
        return _fresh(self.own_reports.get(sds_id, {}), peers, now)

    def probe_list(self, asker: int) -> list[dict[str, object]]:
        """For a heartbeat reply to SDS ``asker``: the held SDSs it should ping, and,
        when it is held as isolated itself, its connected peers."""
        wanted = {
            i: where
            for i, where in self.addresses.items()
            if i != asker and i in self.records and not self.records[i].flapping
        }
        rec = self.record(asker)
        if rec.held and rec.isolated and not rec.flapping:
            wanted.update((i, w) for i, w in self.peer_addresses.items() if i != asker)
        return [{"sds_id": i, "address": a, "data_port": p} for i, (a, p) in sorted(wanted.items())]

    def to_probe(self) -> list[int]:
        """Held SDSs that are not flapping: the ones worth probing."""
        return sorted(i for i, r in self.records.items() if r.held and not r.flapping)

    def _set(self, sds_id: int, rec: Record) -> None:
        if _durable(rec) != _durable(self.record(sds_id)):
            self.changed.add(sds_id)
        if rec == Record():
            self.records.pop(sds_id, None)
        else:
            self.records[sds_id] = rec


def _durable(rec: Record) -> Record:
    """What of ``rec`` the store keeps."""
    return replace(rec, reachable_since=None)


def _fresh(got: Mapping[int, PeerReport], ids: Iterable[int], now: float) -> list[float]:
    return [
        r.reachable_s
        for i in ids
        if (r := got.get(i)) is not None and now - r.received <= PEER_REPORT_FRESH_S
    ]


async def probe(
    address: str,
    port: int,
    secret: str,
    limit_s: float = PROBE_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Whether the SDS at ``address:port`` answers the data protocol: a connection
    authenticated with ``secret`` and a PING answered, within ``limit_s``. Without a
    secret (an MDM whose components authenticate with certificates only) a TCP
    connection is all it can check. ``tls``: over TLS with the MDM's certificate; a
    data port refusing it at once (plain TCP: an SDS without a certificate) is asked
    again in plain TCP within what is left of ``limit_s``."""
    if not secret:
        return await connects(address, port, limit_s)
    start = time.monotonic()
    if await answers_ping(address, port, secret, PeerRole.TOOL, limit_s, tls=tls):
        return True
    left = limit_s - (time.monotonic() - start)
    if tls is None or left < limit_s / 2:  # a hung SDS: the first one timed out
        return False
    return await answers_ping(address, port, secret, PeerRole.TOOL, left)


async def connects(address: str, port: int, limit_s: float) -> bool:
    """Whether a TCP connection to ``address:port`` opens within ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            _, writer = await asyncio.open_connection(address, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


Probe = Callable[[str, int], Awaitable[bool]]
"""``probe(address, port)``: what the prober calls (:func:`probe` with the secret)."""


class Prober:
    """Once a second, probes every held SDS that is not flapping (:func:`probe`), applies
    the results and releases those proven up (:func:`proven_up`), then calls
    ``returned`` (the failure detector's check) so that their PGs resync."""

    def __init__(
        self,
        holds: HoldDowns,
        addresses: Callable[[list[int]], Awaitable[dict[int, tuple[str, int]]]],
        connected: Callable[[], Iterable[int]],
        release: Callable[[int], None],
        returned: Callable[[], Awaitable[object]],
        probe_fn: Probe,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.holds = holds
        self._addresses = addresses
        self._connected = connected
        self._release = release
        self._returned = returned
        self._probe = probe_fn

    async def tick(self) -> list[int]:
        """Probe once; return the SDSs released."""
        ids = self.holds.to_probe()
        if not ids:
            self.holds.addresses.clear()
            self.holds.peer_addresses.clear()
            return []
        held = set(self.holds.held_ids())
        live = sorted(set(self._connected()) - held)
        isolated = any(self.holds.record(i).isolated for i in ids)
        where = await self._addresses(ids + live if isolated else ids)
        self.holds.addresses = {i: where[i] for i in ids if i in where}
        self.holds.peer_addresses = {i: where[i] for i in live if i in where}
        targets = sorted(self.holds.addresses.items())
        results = await asyncio.gather(*(self._probe(a, p) for _, (a, p) in targets))
        now = self._clock()
        connected = set(self._connected())
        released = []
        for (sds_id, _), ok in zip(targets, results, strict=True):
            rec = self.holds.probed(sds_id, ok, now)
            peers = connected - {sds_id} - held
            view = self.holds.peer_view(sds_id, peers, now)
            own = self.holds.own_view(sds_id, peers, now)
            if proven_up(rec, now, view, bool(peers), self.holds.knobs, own):
                log.warning(
                    "SDS %d proven up: its data port answered the MDM%s for %.1f s: back",
                    sds_id,
                    " and a peer" if peers else "",
                    now - (rec.reachable_since or now),
                )
                self._release(sds_id)
                released.append(sds_id)
        if released:
            await self._returned()
        return released

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await stopping.pause(interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("hold-down probes failed; trying again in %.0f s", interval_s)
