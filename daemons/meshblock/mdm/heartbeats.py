"""SDS heartbeats: typed decoding, and the state each SDS last reported.

A heartbeat is the MDM's hottest request (every SDS, every ``heartbeat_interval_s``).
Its body is decoded here by hand into a :class:`SdsBeat`, as strictly as the JSON
schema that documents it (``schemas.SDS_HEARTBEAT``: unknown fields, wrong types and
values out of range are a 422 naming the field), without a generic schema pass; only
the scrub report, rare in a heartbeat that carries what changed, goes through its
schema.

An SDS of this release reports what changed (docs/mdm.md, "Heartbeats"): its first
heartbeat after it starts, and any heartbeat after the MDM answered ``send_full``,
carries its whole state (``full``); later ones only the device usage, volume chunk
counts, tombstones and map epochs that changed since the state of heartbeat ``base``,
the last one the MDM acknowledged (and the volumes and tombstones gone since). The
MDM keeps each SDS's state in memory (:class:`SdsView`) and applies a delta only onto
the state of heartbeat ``base``; on any other (an MDM that restarted and knows no
state, a reply that was lost after the MDM applied a delta) it answers ``send_full``.
A heartbeat without ``seq`` (an SDS of an earlier release) carries everything and is
merged in as such.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema_rs

from meshblock.mdm import schemas
from meshblock.mdm.errors import Invalid
from meshblock.mdm.routing import MAX_ID

MAX_COUNT = 2**40
_SCRUB = jsonschema_rs.validator_for(schemas.SCRUB_REPORT)


@dataclass(frozen=True)
class Tombstone:
    chunks_left: int
    epoch: int  # 0: not said (an SDS of an older release)


@dataclass
class SdsBeat:
    """One decoded SDS heartbeat. ``None``: the field was not sent."""

    seq: int | None = None
    full: bool = False
    base: int | None = None
    devices: list[tuple[int, int]] = field(default_factory=list)  # (device, used bytes)
    volumes: list[tuple[int, int]] = field(default_factory=list)  # (volume, chunks)
    volumes_gone: list[int] = field(default_factory=list)
    tombstones: dict[int, Tombstone] | None = None
    tombstones_gone: list[int] = field(default_factory=list)
    epoch: int | None = None
    map_epochs: list[tuple[int, int]] = field(default_factory=list)  # (pool, epoch)
    probes: list[dict[str, Any]] = field(default_factory=list)
    copies: list[dict[str, Any]] | None = None
    scrub: dict[str, Any] | None = None
    tree_gc: list[dict[str, Any]] | None = None  # per tree, the SDS's garbage pass
    tree_gc_gone: list[int] = field(default_factory=list)  # trees no longer reported
    tree_gc_left: int = 0  # entries of tree_gc still to come in later heartbeats

    @property
    def legacy(self) -> bool:
        """Sent by an SDS of an earlier release: everything, every time."""
        return self.seq is None


@dataclass
class SdsView:
    """What the MDM knows an SDS holds: its last full state with the deltas since."""

    seq: int | None
    devices: dict[int, int] = field(default_factory=dict)
    volumes: dict[int, int] = field(default_factory=dict)
    tombstones: dict[int, Tombstone] = field(default_factory=dict)
    map_epochs: dict[int, int] = field(default_factory=dict)


@dataclass
class Applied:
    """What a heartbeat changed, for the writers and the reports that follow it."""

    devices: list[tuple[int, int]]
    volumes: list[tuple[int, int]]  # a volume gone: 0 chunks
    tombstones: dict[int, Tombstone] | None  # the SDS's whole set, when it changed
    # ``volumes`` are every volume the SDS holds (a full heartbeat): any other volume
    # the store counts chunks of on that SDS has none left. An MDM that knows no
    # earlier state (it restarted, or the SDS came from another MDM) cannot name the
    # volumes gone, and the SDS sends no zero counts.
    whole: bool = False


def apply(views: dict[int, SdsView], sds_id: int, beat: SdsBeat) -> Applied | None:
    """Apply ``beat`` to the SDS's view; None when it is a delta onto a state the MDM
    does not have (it answers ``send_full`` and applies nothing)."""
    view = views.get(sds_id)
    if beat.legacy or beat.full:
        gone: list[int] = []
        if beat.legacy:
            if view is None:
                view = views[sds_id] = SdsView(None)
            view.seq = None
        else:
            old = view
            view = views[sds_id] = SdsView(beat.seq)
            if old is not None:  # what the SDS no longer holds
                reported = {v for v, _ in beat.volumes}
                gone = [v for v in old.volumes if v not in reported]
                if beat.tombstones is None:
                    view.tombstones = old.tombstones
        view.devices.update(beat.devices)
        view.volumes.update(beat.volumes)
        if beat.tombstones is not None:
            view.tombstones = dict(beat.tombstones)
        view.map_epochs.update(beat.map_epochs)
        return Applied(
            beat.devices,
            beat.volumes + [(v, 0) for v in gone],
            view.tombstones if beat.tombstones is not None else None,
            whole=not beat.legacy,
        )
    if view is None or view.seq is None or view.seq != beat.base:
        return None
    view.seq = beat.seq
    view.devices.update(beat.devices)
    view.volumes.update(beat.volumes)
    for v in beat.volumes_gone:
        view.volumes.pop(v, None)
    view.map_epochs.update(beat.map_epochs)
    tombstones_changed = beat.tombstones is not None or bool(beat.tombstones_gone)
    if beat.tombstones:
        view.tombstones.update(beat.tombstones)
    for t in beat.tombstones_gone:
        view.tombstones.pop(t, None)
    return Applied(
        beat.devices,
        beat.volumes + [(v, 0) for v in beat.volumes_gone],
        view.tombstones if tombstones_changed else None,
    )


# -- decoding ---------------------------------------------------------------------------


def _bad(where: str, message: str) -> Invalid:
    return Invalid(f"{where}: {message}", {"field": where})


def _int(value: Any, where: str, minimum: int, maximum: int) -> int:
    if type(value) is not int:
        raise _bad(where, f'{json.dumps(value)} is not of type "integer"')
    if value < minimum:
        raise _bad(where, f"{value} is less than the minimum of {minimum}")
    if value > maximum:
        raise _bad(where, f"{value} is greater than the maximum of {maximum}")
    return value


def _number(value: Any, where: str, maximum: float) -> float:
    if type(value) is not int and type(value) is not float:
        raise _bad(where, f'{json.dumps(value)} is not of type "number"')
    if not 0 <= value <= maximum:
        raise _bad(where, f"{value} is not between 0 and {maximum}")
    return float(value)


def _list(value: Any, where: str, max_items: int) -> list[Any]:
    if type(value) is not list:
        raise _bad(where, f'{json.dumps(value)[:100]} is not of type "array"')
    if len(value) > max_items:
        raise _bad(where, f"has more than {max_items} items")
    return value


def _object(value: Any, where: str, keys: tuple[str, ...], required: int) -> dict[str, Any]:
    """``value`` as an object with only ``keys``, the first ``required`` of them
    present."""
    if type(value) is not dict:
        raise _bad(where, f'{json.dumps(value)[:100]} is not of type "object"')
    for k in keys[:required]:
        if k not in value:
            raise _bad(where, f"{k!r} is a required property")
    if len(value) > required:
        for k in value:
            if k not in keys:
                raise _bad(where, f"additional property {k!r} is not allowed")
    return value


def _pairs(
    value: Any, name: str, max_items: int, keys: tuple[str, str], maximum: int
) -> list[tuple[int, int]]:
    """A list of ``{keys[0]: id, keys[1]: count}`` as (id, count) pairs."""
    out = []
    k, n = keys
    for i, item in enumerate(_list(value, name, max_items)):
        if type(item) is dict and len(item) == 2 and k in item and n in item:
            a, b = item[k], item[n]
            if type(a) is int and 1 <= a <= MAX_ID and type(b) is int and 0 <= b <= maximum:
                out.append((a, b))
                continue
        where = f"{name}.{i}"
        o = _object(item, where, keys, 2)
        _int(o[k], f"{where}.{k}", 1, MAX_ID)
        _int(o[n], f"{where}.{n}", 0, maximum)
    return out


def _ids(value: Any, name: str, max_items: int) -> list[int]:
    return [_int(v, f"{name}.{i}", 1, MAX_ID) for i, v in enumerate(_list(value, name, max_items))]


def _tombstones(value: Any) -> dict[int, Tombstone]:
    out = {}
    for i, item in enumerate(_list(value, "tombstones", 100_000)):
        where = f"tombstones.{i}"
        t = _object(item, where, ("id", "chunks_left", "epoch"), 2)
        epoch = 0  # not said (an SDS of an older release)
        if "epoch" in t:
            epoch = _int(t["epoch"], f"{where}.epoch", 0, schemas.MAX_REPORTED_EPOCH)
        out[_int(t["id"], f"{where}.id", 1, MAX_ID)] = Tombstone(
            _int(t["chunks_left"], f"{where}.chunks_left", 0, MAX_COUNT), epoch
        )
    return out


def _probes(value: Any) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(_list(value, "probes", 1024)):
        where = f"probes.{i}"
        p = _object(item, where, ("sds_id", "reachable_s"), 2)
        out.append(
            {
                "sds_id": _int(p["sds_id"], f"{where}.sds_id", 1, MAX_ID),
                "reachable_s": _number(p["reachable_s"], f"{where}.reachable_s", 2**31),
            }
        )
    return out


def _copies(value: Any) -> list[dict[str, Any]]:
    out = []
    keys = ("pool_id", "kind", "remaining_bytes", "copied_bytes")
    for i, item in enumerate(_list(value, "copies", 1024)):
        where = f"copies.{i}"
        c = _object(item, where, keys, 4)
        if c["kind"] not in ("rebuild", "rebalance"):
            raise _bad(f"{where}.kind", f"{json.dumps(c['kind'])} is not one of rebuild, rebalance")
        out.append(
            {
                "pool_id": _int(c["pool_id"], f"{where}.pool_id", 1, MAX_ID),
                "kind": c["kind"],
                "remaining_bytes": _int(c["remaining_bytes"], f"{where}.remaining_bytes", 0, 2**62),
                "copied_bytes": _int(c["copied_bytes"], f"{where}.copied_bytes", 0, 2**62),
            }
        )
    return out


def _tree_gc(value: Any) -> list[dict[str, Any]]:
    out = []
    counts = schemas.TREE_GC_COUNTS
    keys = ("tree_id", "pool_id", "state", *counts, "unread_slots")
    for i, item in enumerate(_list(value, "tree_gc", 100_000)):
        where = f"tree_gc.{i}"
        t = _object(item, where, keys, len(keys))
        if t["state"] not in schemas.TREE_GC_STATES:
            states = ", ".join(schemas.TREE_GC_STATES)
            raise _bad(f"{where}.state", f"{json.dumps(t['state'])} is not one of {states}")
        unread: dict[int, int] = {}
        for j, u in enumerate(_list(t["unread_slots"], f"{where}.unread_slots", 100_000)):
            at = f"{where}.unread_slots.{j}"
            u = _object(u, at, ("version", "slots"), 2)
            unread[_int(u["version"], f"{at}.version", 0, 2**62)] = _int(
                u["slots"], f"{at}.slots", 0, MAX_COUNT
            )
        doc: dict[str, Any] = {
            "tree_id": _int(t["tree_id"], f"{where}.tree_id", 1, MAX_ID),
            "pool_id": _int(t["pool_id"], f"{where}.pool_id", 0, MAX_ID),
            "state": t["state"],
        }
        doc |= {k: _int(t[k], f"{where}.{k}", 0, MAX_COUNT) for k in counts}
        doc["unread_slots"] = unread
        out.append(doc)
    return out


def _scrub(value: Any) -> dict[str, Any]:
    errors = list(_SCRUB.iter_errors(value))
    if errors:
        err = errors[0]
        where = ".".join(["scrub", *(str(p) for p in err.instance_path)])
        raise _bad(where, str(err.message))
    assert isinstance(value, dict)
    return value


_FIELDS = frozenset(schemas.SDS_HEARTBEAT["properties"])


def decode_sds(body: dict[str, Any]) -> SdsBeat:
    """A heartbeat's body (a JSON object) as a :class:`SdsBeat`; :class:`Invalid`
    naming the first field that breaks ``schemas.SDS_HEARTBEAT``."""
    for k in body:
        if k not in _FIELDS:
            raise Invalid(f"additional property {k!r} is not allowed")
    b = SdsBeat()
    if "seq" in body:
        b.seq = _int(body["seq"], "seq", 0, schemas.MAX_REPORTED_EPOCH)
    if "full" in body:
        if type(body["full"]) is not bool:
            raise _bad("full", f'{json.dumps(body["full"])} is not of type "boolean"')
        b.full = body["full"]
    if "base" in body:
        b.base = _int(body["base"], "base", 0, schemas.MAX_REPORTED_EPOCH)
    if b.seq is None and (b.full or b.base is not None):
        raise _bad("seq", "required with full or base")
    if b.seq is not None and not b.full and b.base is None:
        raise _bad("base", "required in a heartbeat that is not full")
    if "devices" in body:
        b.devices = _pairs(body["devices"], "devices", 64, ("id", "used_bytes"), 1 << 50)
    if "volumes" in body:
        b.volumes = _pairs(body["volumes"], "volumes", 100_000, ("id", "chunks"), MAX_COUNT)
    if "volumes_gone" in body:
        b.volumes_gone = _ids(body["volumes_gone"], "volumes_gone", 100_000)
    if "tombstones" in body:
        b.tombstones = _tombstones(body["tombstones"])
    if "tombstones_gone" in body:
        b.tombstones_gone = _ids(body["tombstones_gone"], "tombstones_gone", 100_000)
    if "epoch" in body:
        b.epoch = _int(body["epoch"], "epoch", 0, schemas.MAX_REPORTED_EPOCH)
    if "map_epochs" in body:
        b.map_epochs = _pairs(
            body["map_epochs"], "map_epochs", 1024, ("pool_id", "epoch"), schemas.MAX_REPORTED_EPOCH
        )
    if "probes" in body:
        b.probes = _probes(body["probes"])
    if "copies" in body:
        b.copies = _copies(body["copies"])
    if "scrub" in body:
        b.scrub = _scrub(body["scrub"])
    if "tree_gc" in body:
        b.tree_gc = _tree_gc(body["tree_gc"])
    if "tree_gc_gone" in body:
        b.tree_gc_gone = _ids(body["tree_gc_gone"], "tree_gc_gone", 100_000)
    if "tree_gc_left" in body:
        b.tree_gc_left = _int(body["tree_gc_left"], "tree_gc_left", 0, MAX_COUNT)
    if b.full or b.legacy:
        for name in ("volumes_gone", "tombstones_gone", "tree_gc_gone"):
            if name in body:
                raise _bad(name, "only in a heartbeat that is not full")
    return b


def decode_sdc(body: dict[str, Any]) -> int | None:
    """An SDC heartbeat's body (``schemas.SDC_HEARTBEAT``): the epoch it reports."""
    for k in body:
        if k != "epoch":
            raise Invalid(f"additional property {k!r} is not allowed")
    if "epoch" not in body:
        return None
    return _int(body["epoch"], "epoch", 0, schemas.MAX_REPORTED_EPOCH)
