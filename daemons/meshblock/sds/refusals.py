"""Data-path refusals in the SDS's audit log (``[audit] file``, meshblock/audit.py).

Every request the data port refuses ``NOT_PERMITTED`` is counted
(``meshblock_sds_refused_requests``) and the first of each connection logged; the
audit log gets them all, summarised: at most one entry per caller (identity and
address) every :data:`SUMMARY_EVERY_S`, event ``data_refused``, with how many were
refused since the previous entry, the distinct volume ids they named (the lowest
:data:`MAX_VOLUMES` of them, and their count up to :data:`MAX_DISTINCT`), the
operations and the first reason.
A scan of ten thousand volume ids thus costs the log a few lines and still shows
its extent; reconnecting does not reset anything.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from meshblock.audit import AuditLog

#: A caller's refusals are written at most this often, summarised.
SUMMARY_EVERY_S: Final = 1.0
#: The volume ids an entry lists (it always says how many distinct ones there were).
MAX_VOLUMES: Final = 100
#: Distinct volume ids counted per caller and entry (a count at this cap means "at least").
MAX_DISTINCT: Final = 65536


@dataclass
class _Window:
    count: int = 0
    volumes: set[int] = field(default_factory=set)
    ops: Counter[str] = field(default_factory=Counter)
    reason: str = ""


class RefusalAudit:
    """Summarises refusals per caller into the audit log."""

    def __init__(self, log: AuditLog | None, every_s: float = SUMMARY_EVERY_S) -> None:
        self._log = log
        self._every_s = every_s
        self._pending: dict[tuple[str, str], _Window] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.written = 0

    def note(self, identity: str, peer: str, op: str, volume_id: int | None, why: str) -> None:
        """One refused request of ``identity`` at ``peer`` (``volume_id`` None: not known)."""
        if self._log is None:
            return
        w = self._pending.get((identity, peer))
        if w is None:
            w = self._pending[(identity, peer)] = _Window(reason=why)
        w.count += 1
        w.ops[op] += 1
        if volume_id is not None and len(w.volumes) < MAX_DISTINCT:
            w.volumes.add(volume_id)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._every_s, self.flush)

    def flush(self) -> None:
        """Write one entry per caller for what was refused since the previous ones."""
        self._timer = None
        pending, self._pending = self._pending, {}
        if self._log is None:
            return
        for (identity, peer), w in pending.items():
            self._log.write(
                "data_refused",
                who=identity,
                address=peer,
                refused=w.count,
                volumes=sorted(w.volumes)[:MAX_VOLUMES],
                distinct_volumes=len(w.volumes),  # at most MAX_DISTINCT
                ops=dict(w.ops),
                reason=w.reason,
            )
            self.written += 1

    def close(self) -> None:
        """Write what is pending (the SDS stops)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
