"""The garbage passes of snapshot trees, as the SDSs report them.

Each SDS runs a garbage pass over a snapshot tree's chunks when its map changes the
tree's versions or the views its volumes read (``meshblock.sds.tree_gc``), and its
heartbeats carry, per tree, its newest pass (``tree_gc``: state, chunks visited and
left, blocks and slots freed, chunks collapsed, and after the pass the slots it still
stores of each version no volume reads). :class:`TreeGcReports` keeps each SDS's
newest report in memory (after an MDM restart the SDSs report again with their next
full heartbeat; an SDS removed is forgotten, one not heard from for :data:`STALE_S`
dropped and asked for its whole state) and sums them per tree for ``GET
/api/v1/snapshot-gc`` and ``meshctl snapshot-gc status``. A version whose
``unread_slots`` is 0 on every SDS reporting the tree is held by none of them: once
every SDS of the pool reports it so from a finished pass, the MDM drops the version's
record (:func:`meshblock.mdm.vtrees.drop_collected`, docs/snapshots.md, Decision 5).
A tree is ``failed`` while an SDS's pass over it failed (the SDS tries it again
later), else ``running`` while one runs, else ``done``.
"""

from __future__ import annotations

import time
from typing import Any

COUNTS = ("chunks", "chunks_done", "blocks_freed", "slots_freed", "collapsed")
#: An SDS not heard from for this long has its report dropped (its passes may have
#: ended meanwhile); it is asked for its whole state with its next heartbeat.
STALE_S = 300.0
#: The look for stale reports runs at most this often (each heartbeat asks for it).
EXPIRE_EVERY_S = 5.0


class TreeGcReports:
    """Each SDS's passes, as its heartbeats report them. A heartbeat carries a bounded
    part of them (``meshblock.sds.heartbeat``): a full one replaces the SDS's report
    (no ``tree_gc``: it has none), a delta updates the trees it lists and drops those
    of ``tree_gc_gone``; ``tree_gc_left`` says how many entries are still to come."""

    def __init__(self) -> None:
        self._by_sds: dict[int, dict[int, dict[str, Any]]] = {}  # sds -> tree -> report
        self._left: dict[int, int] = {}  # sds -> entries it has still to send
        self._heard: dict[int, float] = {}  # sds -> time.monotonic() of its last heartbeat
        self._expired: set[int] = set()  # dropped as stale: its next answer asks all
        self._looked = float("-inf")  # time.monotonic() of the last look for stale ones
        # moved by every change of the reports: the purger looks for versions to drop
        # only when it moved since its last look (no work per second while nothing changes)
        self.generation = 0

    def heard(self, sds_id: int) -> None:
        """A heartbeat of ``sds_id`` arrived (whatever it carries)."""
        self._heard[sds_id] = time.monotonic()

    def report(self, sds_id: int, trees: list[dict[str, Any]], left: int = 0) -> None:
        """An SDS's whole report (a full heartbeat): these passes, one per tree, and
        ``left`` more to come (none listed and none left: it has none now)."""
        self.generation += 1
        self._expired.discard(sds_id)
        if trees:
            self._by_sds[sds_id] = {t["tree_id"]: t for t in trees}
        else:
            self._by_sds.pop(sds_id, None)
        self._set_left(sds_id, left)

    def update(
        self, sds_id: int, trees: list[dict[str, Any]], gone: list[int], left: int = 0
    ) -> None:
        """What changed in an SDS's report (a delta): ``trees`` changed or new,
        ``gone`` no longer reported, ``left`` entries still to come."""
        if sds_id in self._expired:
            return  # asked for its whole report: a delta alone would leave gaps
        self.generation += 1
        mine = self._by_sds.setdefault(sds_id, {})
        mine.update((t["tree_id"], t) for t in trees)
        for tree_id in gone:
            mine.pop(tree_id, None)
        if not mine:
            del self._by_sds[sds_id]
        self._set_left(sds_id, left)

    def _set_left(self, sds_id: int, left: int) -> None:
        if left:
            self._left[sds_id] = left
        else:
            self._left.pop(sds_id, None)

    def forget(self, sds_id: int) -> None:
        """The SDS is removed."""
        self.generation += 1
        self._by_sds.pop(sds_id, None)
        self._left.pop(sds_id, None)
        self._heard.pop(sds_id, None)
        self._expired.discard(sds_id)

    def expire(self) -> None:
        """Drop the reports of SDSs not heard from for :data:`STALE_S`: their
        ``running`` passes would stay so forever (looked at every
        :data:`EXPIRE_EVERY_S` at most)."""
        now = time.monotonic()
        if now - self._looked < EXPIRE_EVERY_S:
            return
        self._looked = now
        for sds_id in [s for s in self._by_sds.keys() | self._left.keys()]:
            if now - self._heard.get(sds_id, now) > STALE_S:
                self._by_sds.pop(sds_id, None)
                self._left.pop(sds_id, None)
                self._expired.add(sds_id)
                self.generation += 1

    def needs_full(self, sds_id: int) -> bool:
        """Whether the SDS's report was dropped as stale: its heartbeat's answer asks
        for its whole state (``send_full``), its report included."""
        self.expire()
        return sds_id in self._expired

    def unreported(self) -> dict[str, int]:
        """Per SDS (its id as a string) whose report is not whole yet, the entries
        still to come with its next heartbeats."""
        self.expire()
        return {str(s): n for s, n in sorted(self._left.items())}

    def freed_by(self, sds_id: int, tree_id: int, version: int) -> bool:
        """Whether the SDS's newest pass over the tree is done and left no slot of
        ``version`` (a version it read by no volume, so listed in ``unread_slots``)."""
        t = self._by_sds.get(sds_id, {}).get(tree_id)
        return t is not None and t["state"] == "done" and t["unread_slots"].get(version) == 0

    def freed_somewhere(self) -> dict[int, set[int]]:
        """Tree -> the versions at least one SDS's finished pass left no slot of: the
        only versions that may be dropped (each still needs every SDS of its pool)."""
        out: dict[int, set[int]] = {}
        for trees in self._by_sds.values():
            for tree_id, t in trees.items():
                if t["state"] == "done":
                    zero = {v for v, n in t["unread_slots"].items() if n == 0}
                    if zero:
                        out.setdefault(tree_id, set()).update(zero)
        return out

    def status(self) -> list[dict[str, Any]]:
        """Per tree (ascending id): the SDSs' passes summed, and each SDS's."""
        self.expire()
        by_tree: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for sds_id, trees in self._by_sds.items():
            for tree_id, t in trees.items():
                by_tree.setdefault(tree_id, []).append((sds_id, t))
        out = []
        for tree_id in sorted(by_tree):
            rows = sorted(by_tree[tree_id], key=lambda r: r[0])
            running = [t for _, t in rows if t["state"] != "done"]  # or failed
            failed = any(t["state"] == "failed" for _, t in rows)
            unread: dict[int, int] = {}
            for _, t in rows:
                for version, n in t["unread_slots"].items():
                    unread[version] = unread.get(version, 0) + n
            doc: dict[str, Any] = {
                "tree_id": tree_id,
                "pool_id": rows[0][1]["pool_id"],
                "state": "failed" if failed else "running" if running else "done",
                "sds_reporting": len(rows),
            }
            doc |= {k: sum(t[k] for _, t in rows) for k in COUNTS}
            doc["chunks_left"] = sum(t["chunks"] - t["chunks_done"] for t in running)
            doc["unread_slots"] = {str(v): n for v, n in sorted(unread.items())}
            doc["sds"] = [
                {
                    "sds_id": sds_id,
                    "state": t["state"],
                    **{k: t[k] for k in COUNTS},
                    "unread_slots": {str(v): n for v, n in sorted(t["unread_slots"].items())},
                }
                for sds_id, t in rows
            ]
            out.append(doc)
        return out
