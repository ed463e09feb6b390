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


def wire_pinger(secret: str, min_version: int) -> Pinger:
    """A connection as an ``SDS_PEER`` and a PING, within :data:`PROBE_TIMEOUT_S`."""

    async def ping(address: str, port: int) -> bool:
        return await answers_ping(
            address, port, secret, PeerRole.SDS_PEER, PROBE_TIMEOUT_S, min_version
        )

    return ping
