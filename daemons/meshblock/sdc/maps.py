"""The maps an SDC follows: the volumes mapped to it and their pools' PG maps.

:func:`parse_maps` turns the MDM's ``GET /api/v1/sdc/{id}/maps`` document into frozen
objects (and rejects a malformed one with :class:`MapError`, so that a bad document
never replaces a good cached one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from meshblock import pgmap_doc
from meshblock.pgmap_doc import SdsEndpoint as SdsEndpoint


class MapError(ValueError):
    """The MDM sent a maps document this SDC cannot use."""


@dataclass(frozen=True)
class PoolMap:
    """One pool's PG map: ``primaries[pg]`` / ``secondaries[pg]`` are SDS ids or None;
    ``clean[pg]``: both copies in sync (empty: unknown, as none)."""

    pool_id: int
    epoch: int
    pg_count: int
    primaries: tuple[int | None, ...]
    secondaries: tuple[int | None, ...]
    sds: dict[int, SdsEndpoint]
    clean: tuple[bool, ...] = ()
    # Volumes of the pool's snapshot trees that read a frozen version (read-only
    # snapshots, the map's ``trees``): exported read-only whatever their mapping.
    read_only: frozenset[int] = frozenset()

    def replica(self, pg: int) -> int | None:
        """The SDS that may serve a READ of ``pg`` besides its primary: the secondary
        of a clean PG (it holds every acknowledged write), else None."""
        if pg < len(self.clean) and self.clean[pg]:
            return self.secondaries[pg]
        return None

    def holders(self) -> set[int]:
        """Every SDS that holds a copy of some PG of the pool."""
        return {s for s in self.primaries + self.secondaries if s is not None}


@dataclass(frozen=True)
class VolumeMapping:
    id: int
    name: str
    pool_id: int
    size_bytes: int
    read_only: bool
    iops_limit: int | None
    bandwidth_limit_bps: int | None


@dataclass(frozen=True)
class SdcMaps:
    epoch: int
    sdc_id: int
    volumes: dict[int, VolumeMapping]
    pools: dict[int, PoolMap]


def _int(doc: dict[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MapError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def _req(doc: dict[str, Any], key: str) -> int:
    value = _int(doc, key)
    assert value is not None
    return value


def parse_pool(doc: Any) -> PoolMap:
    """The SDC's view of a PG-map document (:mod:`meshblock.pgmap_doc`)."""
    try:
        parsed = pgmap_doc.parse(doc)
    except pgmap_doc.PgMapError as exc:
        raise MapError(str(exc)) from None
    primaries = tuple(None if e.primary is None else e.primary.sds_id for e in parsed.pgs)
    secondaries = tuple(None if e.secondary is None else e.secondary.sds_id for e in parsed.pgs)
    for s in primaries + secondaries:
        if s is not None and s not in parsed.sds:
            raise MapError(f"SDS {s} is in the PG map but has no endpoint")
    return PoolMap(
        pool_id=parsed.pool_id,
        epoch=parsed.epoch,
        pg_count=parsed.pg_count,
        primaries=primaries,
        secondaries=secondaries,
        sds=dict(parsed.sds),
        clean=tuple(e.state == pgmap_doc.CLEAN for e in parsed.pgs),
        read_only=parsed.read_only_volumes(),
    )


def parse_maps(doc: Any) -> SdcMaps:
    """Validate and convert an SdcMaps document."""
    if not isinstance(doc, dict):
        raise MapError("the maps document must be an object")
    volumes: dict[int, VolumeMapping] = {}
    vols = doc.get("volumes")
    if not isinstance(vols, list):
        raise MapError("'volumes' must be a list")
    for v in vols:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"]:
            raise MapError("a volume needs a name")
        mode = v.get("access_mode")
        if mode not in ("read_write", "read_only"):
            raise MapError(f"unknown access_mode {mode!r}")
        vm = VolumeMapping(
            id=_req(v, "id"),
            name=v["name"],
            pool_id=_req(v, "pool_id"),
            size_bytes=_req(v, "size_bytes"),
            read_only=mode == "read_only",
            iops_limit=_int(v, "iops_limit", optional=True) or None,
            bandwidth_limit_bps=_int(v, "bandwidth_limit_bps", optional=True) or None,
        )
        volumes[vm.id] = vm
    pools_doc = doc.get("pools", {})
    if not isinstance(pools_doc, dict):
        raise MapError("'pools' must be an object")
    pools = {}
    for p in pools_doc.values():
        pm = parse_pool(p)
        pools[pm.pool_id] = pm
    for vm in list(volumes.values()):
        if vm.pool_id not in pools:
            raise MapError(f"volume {vm.name!r}: no map for its pool {vm.pool_id}")
        if not vm.read_only and vm.id in pools[vm.pool_id].read_only:
            volumes[vm.id] = replace(vm, read_only=True)  # a snapshot: never written
    return SdcMaps(
        epoch=_req(doc, "epoch"), sdc_id=_req(doc, "sdc_id"), volumes=volumes, pools=pools
    )
