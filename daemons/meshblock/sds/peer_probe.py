"""Probes of held SDSs, for the MDM's hold-down (docs/mdm.md, "Hold-down and flapping").

An SDS the MDM declared down on a failure report returns only once the MDM and a
peer have reached its data port for ``[cluster] hold_down_s``. The MDM names those
SDSs in its heartbeat replies (``probe``); this SDS then pings each once a second
over the data protocol (a new connection as an ``SDS_PEER``, authenticated, and a
PING answered within :data:`PROBE_TIMEOUT_S`) and reports in its next heartbeats
how long each has answered without a break (``probes``; 0 after a failure). A name
the MDM stops sending is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from meshblock.wire.client import answers_ping
from meshblock.wire.protocol import PeerRole

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
PROBE_INTERVAL_S = 1.0

Pinger = Callable[[str, int], Awaitable[bool]]


class PeerProbes:
    def __init__(self, ping: Pinger, interval_s: float = PROBE_INTERVAL_S) -> None:
        self._ping = ping
        self._interval = interval_s
        self._targets: dict[int, tuple[str, int]] = {}
        self._ok_since: dict[int, float | None] = {}
        self._task: asyncio.Task[None] | None = None

    def set_targets(self, probe: Iterable[Mapping[str, Any]]) -> None:
        """The ``probe`` list of the MDM's last heartbeat reply."""
        targets = {int(p["sds_id"]): (str(p["address"]), int(p["data_port"])) for p in probe}
        for gone in self._ok_since.keys() - targets.keys():
            del self._ok_since[gone]
        for new in targets.keys() - self._targets.keys():
            log.info("the MDM asks us to probe SDS %d at %s:%d", new, *targets[new])
        self._targets = targets
        if targets and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="peer-probes")

    def report(self) -> list[dict[str, Any]]:
        """For the heartbeat: per SDS probed, how long it has answered without a break."""
        now = time.monotonic()
        out = []
        for i in sorted(self._targets):
            since = self._ok_since.get(i)
            out.append(
                {"sds_id": i, "reachable_s": 0.0 if since is None else round(now - since, 3)}
            )
        return out

    async def probe_once(self) -> None:
        targets = sorted(self._targets.items())
        results = await asyncio.gather(*(self._ping(a, p) for _, (a, p) in targets))
        now = time.monotonic()
        for (sds_id, _), ok in zip(targets, results, strict=True):
            if sds_id not in self._targets:
                continue  # dropped while we probed
            if not ok:
                self._ok_since[sds_id] = None
            elif self._ok_since.get(sds_id) is None:
                self._ok_since[sds_id] = now

    async def _run(self) -> None:
        while self._targets:
            try:
                await self.probe_once()
            except Exception:
                log.exception("peer probes failed")
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def wire_pinger(secret: str, min_version: int, tls: ssl.SSLContext | None = None) -> Pinger:
    """A connection as an ``SDS_PEER`` and a PING, within :data:`PROBE_TIMEOUT_S`."""

    async def ping(address: str, port: int) -> bool:
        return await answers_ping(
            address, port, secret, PeerRole.SDS_PEER, PROBE_TIMEOUT_S, min_version, tls
        )

    return ping


Needed = Callable[[], Mapping[int, tuple[str, int]]]
"""The peers this SDS must reach to serve its writes: the secondaries and move
targets of the PGs it is primary of (id -> data address)."""


class SelfFence:
    """Self-fencing after a one-sided partition (docs/sds.md, "Self-fencing").

    An SDS that can reach none of its peers cannot mirror a write it is primary of.
    The MDM normally fences it out first (it reports its peers unreachable while the
    MDM reaches them: :func:`meshblock.mdm.holddown.isolated_sds`), and the new map
    reaches the SDCs and this SDS alike. When that map does not come (the MDM does not
    hear of it, or does not reach it), the SDS fences itself: once a peer it needs
    has failed (a forward lost, a connect that failed) and, for ``after_s``, no peer
    it needs has answered (its forwards, or a PING of each once a second while
    failing) and no data-path probe of the MDM (a PING on a ``TOOL`` connection) has
    reached it, it is **fenced**: it refuses every write it would have to forward
    with ``NOT_PRIMARY`` at once (retryable: the SDC asks the MDM for the newest map
    and tries again, on the PG's new primary once the map names one), instead of
    waiting for a peer that does not answer; it never acknowledges a write it could
    not mirror either way. It unfences as soon as a peer it needs answers again (or
    when it needs none: the map left it no PG to forward for). ``after_s`` 0: never.
    """

    def __init__(
        self,
        after_s: float,
        ping: Pinger | None = None,
        needed: Needed | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.after_s = after_s
        self._ping = ping
        self._needed = needed
        self._clock = clock
        self._interval = interval_s
        self._failing_since: float | None = None
        self._mdm_probe_at: float | None = None
        self._was_fenced = False
        self.fences = 0  # times it fenced itself since start
        self._task: asyncio.Task[None] | None = None

    def peer_ok(self) -> None:
        """A peer answered (a forward, a ping)."""
        if self._failing_since is not None:
            self._failing_since = None
            self.fenced()  # logs the unfencing

    def peer_failed(self) -> None:
        """A peer did not answer: a forward lost, a connect that failed."""
        if self._failing_since is None and self.after_s > 0:
            self._failing_since = self._clock()
            self._start()

    def mdm_probed(self) -> None:
        """A data-path probe (the MDM's PING on a TOOL connection) reached us."""
        self._mdm_probe_at = self._clock()

    def fenced(self) -> bool:
        """Whether writes that need a peer are refused now."""
        now = self._clock()
        since = self._failing_since
        fenced = (
            self.after_s > 0
            and since is not None
            and now - since >= self.after_s
            and (self._mdm_probe_at is None or now - self._mdm_probe_at >= self.after_s)
        )
        if fenced != self._was_fenced:
            self._was_fenced = fenced
            if fenced:
                self.fences += 1
                log.error(
                    "self-fenced: no peer has answered for %.1f s and no probe of the MDM "
                    "reached us: writes we would have to mirror are refused (NOT_PRIMARY) "
                    "until a peer answers again",
                    now - (since or now),
                )
            else:
                log.warning("unfenced: a peer answers again (or none is needed)")
        return fenced

    async def check_once(self) -> None:
        """While failing: ping the peers we need; any answer (or none needed) ends it."""
        if self._failing_since is None or self._ping is None or self._needed is None:
            return
        targets = sorted(self._needed().items())
        if not targets:
            self.peer_ok()
            return
        results = await asyncio.gather(*(self._ping(a, p) for _, (a, p) in targets))
        if any(results):
            self.peer_ok()
        else:
            self.fenced()  # logs the fencing even while no write comes

    def _start(self) -> None:
        if self._ping is None or (self._task is not None and not self._task.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: unit tests
            self._task = asyncio.get_running_loop().create_task(self._run(), name="self-fence")

    async def _run(self) -> None:
        while self._failing_since is not None:
            await asyncio.sleep(self._interval)
            try:
                await self.check_once()
            except Exception:
                log.exception("self-fence peer checks failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def peers_needed(maps: Iterable[Any], me: int) -> dict[int, tuple[str, int]]:
    """The secondaries (of PGs whose primary forwards) and move targets of the PGs
    ``me`` is primary of in ``maps`` (:class:`meshblock.sds.maps.PgMap`), with their
    data addresses."""
    out: dict[int, tuple[str, int]] = {}
    for m in maps:
        for pg in range(m.pg_count):
            if m.primary[pg][0] != me:
                continue
            for peer in (m.secondary[pg][0] if m.forwards(pg) else 0, m.target[pg][0]):
                if peer and peer != me and peer in m.sds:
                    out[peer] = m.sds[peer]
    return out
