"""The PG-map document, parsed and validated once.

The MDM serves each pool's PG map as one JSON document (``GET
/api/v1/pools/{id}/pgmap``, and per pool in an SDC's ``GET /api/v1/sdc/{id}/maps``)::

    {"pool_id": 1, "epoch": 7, "pg_count": 256,
     "rebuild_concurrency": 4, "rebuild_bandwidth_mibps": 0,      # the pool's throttles
     "rebalance_concurrency": 4, "rebalance_bandwidth_mibps": 0,  # (optional)
     "pgs": [{"pg": 0, "primary": {"sds_id": 2, "device_id": 5},  # a copy, or null
              "secondary": {"sds_id": 3, "device_id": 9},
              "state": "clean",                                  # optional: clean
              "target": {"sds_id": 4, "device_id": 11},          # optional: a move
              "moving": "secondary"}, ...],                      # optional
     "devices": [{"device_id": 5, "sds_id": 2}, ...],            # optional
     "sds": {"2": {"address": "10.0.0.2", "data_port": 7072}, ...},
     "tombstones": {"12": 6},                                    # optional: deleted
                                                                 # volume id -> epoch
     "trees": {"7": {"versions": {"0": null, "1": 0, "2": 1},   # optional: snapshot
                     "volumes": {"7": {"view": 2, "writable": true},   # trees, each
                                 "9": {"view": 1, "writable": false}}}}}  # version's
                                                                 # parent, each volume's
                                                                 # view

A tree appears in ``trees`` only once it has more than one volume or version
(docs/snapshots.md, "The MDM's records"); a volume not listed is its own tree, view =
head = version 0.

:func:`parse` turns it into frozen objects, refusing a malformed document with a
:class:`PgMapError` that says what is wrong and where; :meth:`PgMapDoc.to_doc` gives the
document back. The SDS (``meshblock.sds.maps``), the SDC (``meshblock.sdc.maps``), the
replica checker and the tests each build their own view on top of this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CLEAN = "clean"  # the state of a PG whose entry has none (documents of older versions)
THROTTLES = (
    "rebuild_concurrency",
    "rebuild_bandwidth_mibps",
    "rebalance_concurrency",
    "rebalance_bandwidth_mibps",
)


class PgMapError(ValueError):
    """A PG-map document that cannot be used (the message says what and where)."""


@dataclass(frozen=True)
class PgCopy:
    """Where one copy of a PG lives: an SDS and one of its devices."""

    sds_id: int
    device_id: int

    def to_doc(self) -> dict[str, int]:
        return {"sds_id": self.sds_id, "device_id": self.device_id}


@dataclass(frozen=True)
class PgEntry:
    """One PG of the map; a missing copy is None. ``moving``: which copy the move to
    ``target`` replaces (``primary`` or ``secondary``), None when absent."""

    pg: int
    primary: PgCopy | None = None
    secondary: PgCopy | None = None
    state: str = CLEAN
    target: PgCopy | None = None
    moving: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "pg": self.pg,
            "primary": _copy_doc(self.primary),
            "secondary": _copy_doc(self.secondary),
            "state": self.state,
        }
        if self.target is not None:
            doc["target"] = self.target.to_doc()
        if self.target is not None or self.moving is not None:
            doc["moving"] = self.moving
        return doc


@dataclass(frozen=True)
class SdsEndpoint:
    """Where an SDS takes the data protocol."""

    sds_id: int
    address: str
    data_port: int
    name: str = ""  # its name (sds:NAME in its certificate); "" from an older MDM


@dataclass(frozen=True)
class TreeVolume:
    """A volume of a snapshot tree: the version it reads, and whether it writes it."""

    view: int
    writable: bool


@dataclass(frozen=True)
class TreeDoc:
    """One snapshot tree of the pool: each version's parent (None: the root), and the
    tree's volumes (volume id -> :class:`TreeVolume`)."""

    versions: dict[int, int | None]
    volumes: dict[int, TreeVolume]

    def to_doc(self) -> dict[str, Any]:
        return {
            "versions": {str(v): p for v, p in self.versions.items()},
            "volumes": {
                str(i): {"view": t.view, "writable": t.writable} for i, t in self.volumes.items()
            },
        }


@dataclass(frozen=True)
class PgMapDoc:
    """One pool's map at one epoch. ``pgs[i]`` is PG ``i`` (a PG the document does not
    list has no copies and is clean); a throttle the document lacks is None."""

    pool_id: int
    epoch: int
    pg_count: int
    pgs: tuple[PgEntry, ...]
    sds: dict[int, SdsEndpoint]
    throttles: dict[str, int] = field(default_factory=dict)
    devices: tuple[PgCopy, ...] | None = None
    tombstones: dict[int, int] = field(default_factory=dict)
    has_tombstones: bool = True
    trees: dict[int, TreeDoc] = field(default_factory=dict)

    def throttle(self, name: str) -> int | None:
        """One of :data:`THROTTLES`, or None if the document does not carry it."""
        return self.throttles.get(name)

    def read_only_volumes(self) -> frozenset[int]:
        """The volumes of the pool's snapshot trees that read a frozen version
        (read-only snapshots): never written, whatever their mapping."""
        return frozenset(
            v for tree in self.trees.values() for v, t in tree.volumes.items() if not t.writable
        )

    def to_doc(self) -> dict[str, Any]:
        """The JSON document again (every PG listed, each with its state)."""
        doc: dict[str, Any] = {
            "pool_id": self.pool_id,
            "epoch": self.epoch,
            "pg_count": self.pg_count,
        }
        doc.update(self.throttles)
        doc["pgs"] = [e.to_doc() for e in self.pgs]
        if self.devices is not None:
            doc["devices"] = [{"device_id": d.device_id, "sds_id": d.sds_id} for d in self.devices]
        doc["sds"] = {
            str(i): {"address": e.address, "data_port": e.data_port} for i, e in self.sds.items()
        }
        if self.has_tombstones:
            doc["tombstones"] = {str(v): e for v, e in self.tombstones.items()}
        if self.trees:
            doc["trees"] = {str(t): tree.to_doc() for t, tree in self.trees.items()}
        return doc


def _copy_doc(copy: PgCopy | None) -> dict[str, int] | None:
    return None if copy is None else copy.to_doc()


def _non_negative(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PgMapError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _count(doc: Mapping[str, Any], key: str, where: str) -> int:
    return _non_negative(doc.get(key), f"{where}: {key!r}")


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PgMapError(f"{what} must be an object, got {value!r}")
    return value


def _id_key(key: Any, what: str) -> int:
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise PgMapError(f"{what} {key!r} is not an integer") from None
    if value < 0:
        raise PgMapError(f"{what} {key!r} is negative")
    return value


def _device(value: Any, where: str) -> PgCopy:
    doc = _object(value, where)
    return PgCopy(_count(doc, "sds_id", where), _count(doc, "device_id", where))


def _pg_copy(value: Any, where: str) -> PgCopy | None:
    return None if value is None else _device(value, where)


def _entry(value: Any, pg_count: int, where: str) -> PgEntry:
    doc = _object(value, f"{where}: a PG entry")
    pg = _count(doc, "pg", where)
    if pg >= pg_count:
        raise PgMapError(f"{where}: PG {pg} out of range (pg_count {pg_count})")
    at = f"{where}, PG {pg}"
    state = doc.get("state", CLEAN)
    if not isinstance(state, str) or not state:
        raise PgMapError(f"{at}: 'state' must be a non-empty string, got {state!r}")
    moving = doc.get("moving")
    if moving is not None and not isinstance(moving, str):
        raise PgMapError(f"{at}: 'moving' must be a string or null, got {moving!r}")
    return PgEntry(
        pg=pg,
        primary=_pg_copy(doc.get("primary"), f"{at}: the primary"),
        secondary=_pg_copy(doc.get("secondary"), f"{at}: the secondary"),
        state=state,
        target=_pg_copy(doc.get("target"), f"{at}: the target"),
        moving=moving,
    )


def _endpoints(value: Any, where: str) -> dict[int, SdsEndpoint]:
    out: dict[int, SdsEndpoint] = {}
    for key, ep in _object(value, f"{where}: 'sds'").items():
        sds_id = _id_key(key, f"{where}: SDS id")
        at = f"{where}: SDS {sds_id}"
        ep = _object(ep, at)
        address = ep.get("address")
        if not isinstance(address, str) or not address:
            raise PgMapError(f"{at}: an endpoint needs an address, got {address!r}")
        name = ep.get("name", "")
        if not isinstance(name, str):
            raise PgMapError(f"{at}: a name must be a string, got {name!r}")
        out[sds_id] = SdsEndpoint(sds_id, address, _count(ep, "data_port", at), name)
    return out


def _tree(value: Any, where: str) -> TreeDoc:
    doc = _object(value, where)
    versions: dict[int, int | None] = {}
    for key, parent in _object(doc.get("versions"), f"{where}: 'versions'").items():
        version = _id_key(key, f"{where}: version")
        versions[version] = (
            None if parent is None else _non_negative(parent, f"{where}: the parent of {version}")
        )
    if sum(p is None for p in versions.values()) != 1:
        raise PgMapError(f"{where}: a tree needs exactly one root version (parent null)")
    for version, parent in versions.items():
        if parent is not None and parent not in versions:
            raise PgMapError(f"{where}: the parent {parent} of version {version} is not a version")
    children: dict[int | None, list[int]] = {}
    for version, parent in versions.items():
        children.setdefault(parent, []).append(version)
    reached, todo = 0, list(children[None])
    while todo:
        reached += 1
        todo.extend(children.get(todo.pop(), ()))
    if reached != len(versions):
        raise PgMapError(f"{where}: the versions' parents form a cycle")
    parents = {p for p in versions.values() if p is not None}
    volumes: dict[int, TreeVolume] = {}
    for key, vol in _object(doc.get("volumes", {}), f"{where}: 'volumes'").items():
        volume = _id_key(key, f"{where}: volume id")
        at = f"{where}, volume {volume}"
        vol = _object(vol, at)
        view = _count(vol, "view", at)
        writable = vol.get("writable")
        if not isinstance(writable, bool):
            raise PgMapError(f"{at}: 'writable' must be true or false, got {writable!r}")
        if view not in versions:
            raise PgMapError(f"{at}: its view {view} is not a version of the tree")
        if writable and view in parents:
            raise PgMapError(f"{at}: writes version {view}, which has children")
        volumes[volume] = TreeVolume(view, writable)
    return TreeDoc(versions, volumes)


def parse(value: Any) -> PgMapDoc:
    """Validate a PG-map document and convert it; :class:`PgMapError` if malformed."""
    doc = _object(value, "a PG map")
    pool_id = _count(doc, "pool_id", "a PG map")
    where = f"the map of pool {pool_id}"
    epoch = _count(doc, "epoch", where)
    pg_count = _count(doc, "pg_count", where)
    if pg_count < 1:
        raise PgMapError(f"{where}: 'pg_count' must be positive")
    pgs_doc = doc.get("pgs")
    if not isinstance(pgs_doc, list):
        raise PgMapError(f"{where}: 'pgs' must be a list, got {pgs_doc!r}")
    pgs: list[PgEntry | None] = [None] * pg_count
    for value_ in pgs_doc:
        entry = _entry(value_, pg_count, where)
        if pgs[entry.pg] is not None:
            raise PgMapError(f"{where}: PG {entry.pg} is listed twice")
        pgs[entry.pg] = entry
    throttles = {name: _count(doc, name, where) for name in THROTTLES if name in doc}
    devices = None
    if "devices" in doc:
        devices_doc = doc["devices"]
        if not isinstance(devices_doc, list):
            raise PgMapError(f"{where}: 'devices' must be a list, got {devices_doc!r}")
        devices = tuple(_device(d, f"{where}: a device") for d in devices_doc)
    tombstones: dict[int, int] = {}
    for key, at_epoch in _object(doc.get("tombstones", {}), f"{where}: 'tombstones'").items():
        volume = _id_key(key, f"{where}: tombstone volume id")
        tombstones[volume] = _non_negative(at_epoch, f"{where}: the epoch of tombstone {volume}")
    trees = {
        _id_key(key, f"{where}: tree id"): _tree(tree, f"{where}, tree {key}")
        for key, tree in _object(doc.get("trees", {}), f"{where}: 'trees'").items()
    }
    return PgMapDoc(
        pool_id=pool_id,
        epoch=epoch,
        pg_count=pg_count,
        pgs=tuple(e if e is not None else PgEntry(pg) for pg, e in enumerate(pgs)),
        sds=_endpoints(doc.get("sds", {}), where),
        throttles=throttles,
        devices=devices,
        tombstones=tombstones,
        has_tombstones="tombstones" in doc,
        trees=trees,
    )
