"""What an SDS's heartbeats carry: its whole state when the MDM needs it, else only
what changed (docs/mdm.md, "Heartbeats").

Each heartbeat is numbered (``seq``, from the wall clock at start, so that a new
process numbers above an older one). The first one after the SDS starts, and the next
one after the MDM answered ``send_full`` (it restarted, or lost the state a delta
would change), is ``full``: every device's usage, every volume's chunk count, every
tombstone, map epoch, copy, the scrub report and the garbage passes of snapshot
trees. Later ones carry what differs from the state of the last heartbeat the MDM
acknowledged (``base``), volumes and tombstones gone included; a heartbeat whose
answer was lost is therefore covered by the next one. An MDM of an earlier release
refuses the new fields (422): then every heartbeat carries everything, as before.

The garbage passes of snapshot trees (``tree_gc``, one entry per tree) are bounded,
whatever the number of trees: a heartbeat carries at most :data:`TREE_GC_MAX` entries
holding at most :data:`TREE_GC_MAX_ROWS` ``unread_slots`` rows in all (an entry has at
most that many: :meth:`meshblock.sds.tree_gc.TreeGc.heartbeat` keeps the lowest
versions), failed passes first, then running ones, then done ones (by tree id within
each). A full heartbeat carries the first of all entries; a delta the first of those
that differ from what the MDM has, and ``tree_gc_gone``, the trees it has that are no
longer reported. ``tree_gc_left`` says how many entries wait for a later heartbeat
(absent: none): the MDM has the whole report after a few heartbeats, each of which
stays well under its 1 MiB request limit (256 entries of about 200 bytes and 4096 rows
of about 30: some 180 KiB), where 5000 trees unbounded went past it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

#: Entries of ``tree_gc`` one heartbeat carries at most.
TREE_GC_MAX = 256
#: ``unread_slots`` rows the ``tree_gc`` entries of one heartbeat carry at most.
TREE_GC_MAX_ROWS = 4096
_TREE_GC_ORDER = {"failed": 0, "running": 1, "done": 2}


@dataclass
class Snapshot:
    """The state one heartbeat reports."""

    devices: dict[int, int] = field(default_factory=dict)  # device id -> used bytes
    volumes: dict[int, int] = field(default_factory=dict)  # volume id -> chunks
    tombstones: dict[int, tuple[int, int]] = field(default_factory=dict)  # (left, epoch)
    map_epochs: dict[int, int] = field(default_factory=dict)
    epoch: int = 0
    copies: list[dict[str, Any]] = field(default_factory=list)
    scrub: dict[str, Any] | None = None
    # the garbage passes of snapshot trees (sds/tree_gc.py); sent only once there is
    # one, so that an MDM of an earlier release never sees the field
    tree_gc: list[dict[str, Any]] = field(default_factory=list)


def _tombstones(t: dict[int, tuple[int, int]]) -> list[dict[str, int]]:
    return [{"id": v, "chunks_left": n, "epoch": e} for v, (n, e) in t.items()]


def _changed(now: dict[int, Any], before: dict[int, Any]) -> dict[int, Any]:
    return {k: v for k, v in now.items() if before.get(k) != v}


def _by_tree(entries: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["tree_id"]: e for e in entries}


def tree_gc_bounded(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of ``entries`` one heartbeat carries: failed, then running, then
    done (by tree id within each), at most :data:`TREE_GC_MAX` of them and
    :data:`TREE_GC_MAX_ROWS` ``unread_slots`` rows in all (the first always)."""
    ordered = sorted(entries, key=lambda e: (_TREE_GC_ORDER.get(e["state"], 3), e["tree_id"]))
    out: list[dict[str, Any]] = []
    rows = 0
    for e in ordered:
        n = len(e.get("unread_slots", ()))
        if len(out) == TREE_GC_MAX or (out and rows + n > TREE_GC_MAX_ROWS):
            break
        out.append(e)
        rows += n
    return out


class Heartbeats:
    def __init__(self) -> None:
        self.seq = time.time_ns() // 1000
        self.legacy = False  # the MDM is of an earlier release: everything, every time
        self._acked: tuple[int, Snapshot] | None = None  # the MDM has this state
        self._sent: tuple[int, Snapshot] | None = None
        # The tree_gc_left the MDM holds (of the acknowledged heartbeat), and the one
        # the last body sets: once nothing is left to send, a non-zero count there is
        # cleared even if the entries it counted vanished before they were sent.
        self._acked_left = 0
        self._sent_left = 0

    def body(self, snap: Snapshot) -> dict[str, Any]:
        """The body of the next heartbeat reporting ``snap``."""
        self.seq += 1
        self._sent = (self.seq, snap)
        acked = self._acked
        if self.legacy or acked is None:
            body: dict[str, Any] = {
                "devices": [{"id": d, "used_bytes": n} for d, n in snap.devices.items()],
                "volumes": [{"id": v, "chunks": n} for v, n in snap.volumes.items()],
                "tombstones": _tombstones(snap.tombstones),
                "epoch": snap.epoch,
                "map_epochs": [{"pool_id": p, "epoch": e} for p, e in snap.map_epochs.items()],
                "copies": snap.copies,
            }
            if snap.scrub is not None:
                body["scrub"] = snap.scrub
            sent = tree_gc_bounded(snap.tree_gc)
            if sent:
                body["tree_gc"] = sent
            self._sent_left = 0
            if not self.legacy:
                body |= {"seq": self.seq, "full": True}
                if len(sent) < len(snap.tree_gc):
                    body["tree_gc_left"] = self._sent_left = len(snap.tree_gc) - len(sent)
            # What the MDM holds once it takes this one: the next delta sends the rest.
            self._sent = (self.seq, replace(snap, tree_gc=sent))
            return body
        base, old = acked
        body = {"seq": self.seq, "base": base}
        devices = _changed(snap.devices, old.devices)
        if devices:
            body["devices"] = [{"id": d, "used_bytes": n} for d, n in devices.items()]
        volumes = _changed(snap.volumes, old.volumes)
        if volumes:
            body["volumes"] = [{"id": v, "chunks": n} for v, n in volumes.items()]
        gone = [v for v in old.volumes if v not in snap.volumes]
        if gone:
            body["volumes_gone"] = gone
        tombstones = _changed(snap.tombstones, old.tombstones)
        if tombstones:
            body["tombstones"] = _tombstones(tombstones)
        gone = [v for v in old.tombstones if v not in snap.tombstones]
        if gone:
            body["tombstones_gone"] = gone
        if snap.epoch != old.epoch:
            body["epoch"] = snap.epoch
        map_epochs = _changed(snap.map_epochs, old.map_epochs)
        if map_epochs:
            body["map_epochs"] = [{"pool_id": p, "epoch": e} for p, e in map_epochs.items()]
        if snap.copies != old.copies:
            body["copies"] = snap.copies
        now, had = _by_tree(snap.tree_gc), _by_tree(old.tree_gc)
        changed = [e for t, e in now.items() if had.get(t) != e]
        sent = tree_gc_bounded(changed)
        if sent:
            body["tree_gc"] = sent
        gone = [t for t in had if t not in now]
        if gone:
            body["tree_gc_gone"] = gone
        self._sent_left = self._acked_left
        if sent or gone:
            body["tree_gc_left"] = self._sent_left = len(changed) - len(sent)
        elif self._acked_left:
            # The MDM still counts entries to come, and none are (they vanished
            # unsent): an empty update sets its count to 0.
            body["tree_gc"] = []
            body["tree_gc_left"] = self._sent_left = 0
        if changed or gone:
            held = {t: e for t, e in had.items() if t in now} | _by_tree(sent)
            self._sent = (self.seq, replace(snap, tree_gc=[held[t] for t in sorted(held)]))
        # Findings go again until the MDM has taken them (its answer says how far).
        if snap.scrub is not None and (snap.scrub != old.scrub or snap.scrub.get("findings")):
            body["scrub"] = snap.scrub
        return body

    def answered(self, status: int, doc: Any) -> None:
        """The MDM's answer to the last :meth:`body` (none: not answered)."""
        sent, self._sent = self._sent, None
        if status == 200 and sent is not None:
            if isinstance(doc, dict) and doc.get("send_full"):
                log.info("the MDM asks for our whole state: it goes with the next heartbeat")
                self._acked = None
            else:
                self._acked = sent
                self._acked_left = self._sent_left
        elif status == 422 and not self.legacy:
            log.warning(
                "the MDM refused a heartbeat that carries what changed (%s): an MDM of an "
                "earlier release? Every heartbeat carries everything from now on",
                doc.get("error", {}).get("message") if isinstance(doc, dict) else doc,
            )
            self.legacy = True
        elif status == 404:
            self._acked = None  # registering again: the next one carries everything
