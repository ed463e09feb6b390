"""The PG-map document parser (meshblock.pgmap_doc): every field round-trips, and a
malformed document is refused with a message that says what is wrong and where."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshblock import pgmap_doc
from meshblock.pgmap_doc import PgCopy, PgEntry, PgMapError, SdsEndpoint

pytestmark = pytest.mark.unit

# Shaped as meshblock.mdm.pgmaps builds it: every field the MDM sends.
FULL: dict[str, Any] = {
    "pool_id": 3,
    "epoch": 17,
    "pg_count": 3,
    "rebuild_concurrency": 2,
    "rebuild_bandwidth_mibps": 50,
    "rebalance_concurrency": 1,
    "rebalance_bandwidth_mibps": 0,
    "pgs": [
        {"pg": 0, "primary": {"sds_id": 1, "device_id": 10},
         "secondary": {"sds_id": 2, "device_id": 20}, "state": "clean"},
        {"pg": 1, "primary": {"sds_id": 2, "device_id": 20},
         "secondary": {"sds_id": 1, "device_id": 10}, "state": "rebuilding",
         "target": {"sds_id": 4, "device_id": 40}, "moving": "secondary"},
        {"pg": 2, "primary": {"sds_id": 1, "device_id": 10}, "secondary": None,
         "state": "inactive"},
    ],
    "devices": [{"device_id": 10, "sds_id": 1}, {"device_id": 20, "sds_id": 2}],
    "sds": {"1": {"address": "127.0.0.1", "data_port": 7072},
            "2": {"address": "127.0.0.2", "data_port": 7073},
            "4": {"address": "127.0.0.4", "data_port": 7074}},
    "tombstones": {"12": 15, "13": 16},
}  # fmt: skip


def test_every_field_round_trips() -> None:
    parsed = pgmap_doc.parse(FULL)
    assert parsed.to_doc() == FULL
    assert (parsed.pool_id, parsed.epoch, parsed.pg_count) == (3, 17, 3)
    assert parsed.pgs[1] == PgEntry(
        1, PgCopy(2, 20), PgCopy(1, 10), "rebuilding", PgCopy(4, 40), moving="secondary"
    )
    assert parsed.pgs[2].secondary is None and parsed.pgs[2].state == "inactive"
    assert parsed.sds[4] == SdsEndpoint(4, "127.0.0.4", 7074)
    assert parsed.throttle("rebuild_bandwidth_mibps") == 50
    assert parsed.devices == (PgCopy(1, 10), PgCopy(2, 20))
    assert parsed.tombstones == {12: 15, 13: 16}
    assert pgmap_doc.parse(parsed.to_doc()) == parsed


def test_optional_fields_of_older_documents_have_their_defaults() -> None:
    """A map of an older MDM (or an SDS state file it wrote): no throttles, no states,
    no devices, no tombstones, a PG not listed; it parses, and gives back what it had."""
    doc: dict[str, Any] = {
        "pool_id": 1,
        "epoch": 2,
        "pg_count": 2,
        "pgs": [{"pg": 1, "primary": {"sds_id": 5, "device_id": 1}, "secondary": None}],
        "sds": {"5": {"address": "h", "data_port": 1}},
    }
    parsed = pgmap_doc.parse(doc)
    assert parsed.pgs == (PgEntry(0), PgEntry(1, PgCopy(5, 1), None, "clean"))
    assert parsed.throttle("rebuild_concurrency") is None
    assert parsed.devices is None and parsed.tombstones == {}
    back = parsed.to_doc()
    assert "tombstones" not in back and "devices" not in back
    assert "rebuild_concurrency" not in back


@pytest.mark.parametrize(
    "path, value, message",
    [
        ((), [], "a PG map must be an object"),
        (("pool_id",), "3", "'pool_id' must be a non-negative integer, got '3'"),
        (("epoch",), -1, "the map of pool 3: 'epoch' must be a non-negative integer"),
        (("epoch",), True, "'epoch' must be a non-negative integer, got True"),
        (("pg_count",), 0, "the map of pool 3: 'pg_count' must be positive"),
        (("rebuild_concurrency",), None, "'rebuild_concurrency' must be a non-negative"),
        (("pgs",), {}, "the map of pool 3: 'pgs' must be a list"),
        (("pgs", 0), "x", "the map of pool 3: a PG entry must be an object"),
        (("pgs", 0, "pg"), 3, "the map of pool 3: PG 3 out of range (pg_count 3)"),
        (("pgs", 1, "pg"), 0, "the map of pool 3: PG 0 is listed twice"),
        (("pgs", 0, "primary"), {"sds_id": 6}, "PG 0: the primary: 'device_id' must be"),
        (("pgs", 0, "secondary"), 7, "PG 0: the secondary must be an object, got 7"),
        (("pgs", 1, "target", "sds_id"), "4", "PG 1: the target: 'sds_id' must be"),
        (("pgs", 2, "state"), 3, "PG 2: 'state' must be a non-empty string, got 3"),
        (("pgs", 1, "moving"), True, "PG 1: 'moving' must be a string or null, got True"),
        (("devices",), {}, "the map of pool 3: 'devices' must be a list"),
        (("devices", 0, "sds_id"), None, "a device: 'sds_id' must be a non-negative"),
        (("sds",), [], "the map of pool 3: 'sds' must be an object"),
        (("sds", "x"), {"address": "h", "data_port": 1}, "SDS id 'x' is not an integer"),
        (("sds", "1"), {"data_port": 1}, "SDS 1: an endpoint needs an address, got None"),
        (("sds", "2", "data_port"), "7073", "SDS 2: 'data_port' must be a non-negative"),
        (("tombstones",), [], "the map of pool 3: 'tombstones' must be an object"),
        (("tombstones", "v"), 1, "tombstone volume id 'v' is not an integer"),
        (("tombstones", "12"), -1, "the epoch of tombstone 12 must be a non-negative"),
    ],
)
def test_a_malformed_document_is_refused_with_a_clear_message(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    doc: Any = copy.deepcopy(FULL)
    if not path:
        doc = value
    else:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    with pytest.raises(PgMapError) as caught:
        pgmap_doc.parse(doc)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("key", ["pool_id", "epoch", "pg_count", "pgs"])
def test_a_required_field_missing_is_named(key: str) -> None:
    doc = copy.deepcopy(FULL)
    del doc[key]
    with pytest.raises(PgMapError, match=repr(key)):
        pgmap_doc.parse(doc)


# The snapshot trees a map carries (docs/snapshots.md, "The MDM's records").
TREES: dict[str, Any] = {
    "7": {
        "versions": {"0": None, "1": 0, "2": 1, "3": 0, "4": 3},
        "volumes": {
            "7": {"view": 2, "writable": True},
            "30": {"view": 0, "writable": False},
            "31": {"view": 1, "writable": False},
            "32": {"view": 4, "writable": True},
            "33": {"view": 1, "writable": False},
        },
    }
}


def test_trees_round_trip() -> None:
    doc = copy.deepcopy(FULL) | {"trees": copy.deepcopy(TREES)}
    parsed = pgmap_doc.parse(doc)
    assert parsed.to_doc() == doc
    tree = parsed.trees[7]
    assert tree.versions == {0: None, 1: 0, 2: 1, 3: 0, 4: 3}
    assert tree.volumes[31] == pgmap_doc.TreeVolume(1, False)
    assert pgmap_doc.parse(FULL).trees == {}  # a map without trees: every volume alone
    assert "trees" not in pgmap_doc.parse(FULL).to_doc()


@pytest.mark.parametrize(
    "path, value, message",
    [
        ((), [], "the map of pool 3: 'trees' must be an object"),
        (("x",), TREES["7"], "tree id 'x' is not an integer"),
        (("7", "versions"), None, "tree 7: 'versions' must be an object"),
        (("7", "versions", "0"), 4, "tree 7: a tree needs exactly one root version"),
        (("7", "versions", "5"), None, "tree 7: a tree needs exactly one root version"),
        (("7", "versions", "3"), 9, "tree 7: the parent 9 of version 3 is not a version"),
        (("7", "versions", "3"), -1, "tree 7: the parent of 3 must be a non-negative"),
        (("7", "versions", "5"), 6, "tree 7: the parent 6 of version 5 is not a version"),
        (("7", "volumes", "30", "view"), 8, "volume 30: its view 8 is not a version"),
        (("7", "volumes", "30", "writable"), 1, "volume 30: 'writable' must be true or false"),
        (("7", "volumes", "30", "writable"), True, "volume 30: writes version 0, which has"),
        (("7", "volumes", "x"), {"view": 0, "writable": False}, "volume id 'x' is not an"),
    ],
)
def test_a_malformed_tree_is_refused_with_a_clear_message(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    doc: Any = copy.deepcopy(FULL) | {"trees": copy.deepcopy(TREES)}
    target: Any = doc
    for key in ("trees", *path[:-1]):
        target = target[key]
    if path:
        target[path[-1]] = value
    else:
        doc["trees"] = value
    with pytest.raises(PgMapError) as caught:
        pgmap_doc.parse(doc)
    assert message in str(caught.value)


def test_versions_whose_parents_form_a_cycle_are_refused() -> None:
    doc = copy.deepcopy(FULL) | {"trees": copy.deepcopy(TREES)}
    doc["trees"]["7"]["versions"] |= {"5": 6, "6": 5}
    with pytest.raises(PgMapError, match="tree 7: the versions' parents form a cycle"):
        pgmap_doc.parse(doc)
