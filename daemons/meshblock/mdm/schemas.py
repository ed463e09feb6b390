"""JSON schemas of the MDM API: request bodies (validated) and responses (documented).

Request schemas are strict (``additionalProperties: false``): a misspelt field is a
422, not silently ignored. Response schemas are the component schemas of the
OpenAPI document.
"""

from __future__ import annotations

from typing import Any

from meshblock.mdm.routing import MAX_ID

MAX_VOLUME_BYTES = 1 << 50  # 1 PiB
MAX_DEVICE_BYTES = 1 << 50

NAME: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    "description": "1-64 characters: letters, digits, '.', '_', '-'; starts with a letter or digit",
}
ID: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
#: An epoch a component reports: capped far below BIGINT's 2**63-1, so that raising
#: above it (the reconciliation after a restore, mdm/reconcile.py) never overflows.
MAX_REPORTED_EPOCH = 2**62
EPOCH: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_REPORTED_EPOCH}
PORT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 65535}
ADDRESS: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9.:\[\]_-]{1,255}$",
    "description": "host name or IP address",
}
SIZE: dict[str, Any] = {
    "description": "bytes, as an integer or a string with a unit: 16GiB, 500GB, 1TiB "
    "(binary units are powers of 1024, decimal ones of 1000)",
    "oneOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_VOLUME_BYTES},
        {
            "type": "string",
            "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[A-Za-z]{0,3}\s*$",
            "maxLength": 32,
        },
    ],
}
OPTIONAL_LIMIT: dict[str, Any] = {
    "oneOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": 2**53}],
}
OPTIONAL_BANDWIDTH: dict[str, Any] = {
    "description": "bytes per second, an integer or a size string (100MiB); null: no limit",
    "oneOf": [{"type": "null"}, *SIZE["oneOf"]],
}
PERCENT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 100}
MIBPS: dict[str, Any] = {
    "type": "integer", "minimum": 0, "maximum": 100_000,
    "description": "MiB/s per device; 0 means unlimited",
}  # fmt: skip
CONCURRENCY: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 256}
PATH: dict[str, Any] = {"type": "string", "pattern": r"^/[^\x00]{0,1022}$"}
GUID: dict[str, Any] = {"type": "string", "pattern": r"^[A-Za-z0-9-]{1,64}$"}


def obj(
    properties: dict[str, Any], required: tuple[str, ...] = (), min_properties: int = 0
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    if min_properties:
        schema["minProperties"] = min_properties
    return schema


PD_CREATE = obj({"name": NAME}, ("name",))
PD_UPDATE = obj({"name": NAME}, ("name",))
FAULT_SET_CREATE = obj({"name": NAME, "protection_domain_id": ID}, ("name", "protection_domain_id"))

_POOL_SETTINGS: dict[str, Any] = {
    "spare_percent": {"type": "integer", "minimum": 0, "maximum": 90},
    "rebuild_bandwidth_mibps": MIBPS,
    "rebuild_concurrency": CONCURRENCY,
    "rebalance_bandwidth_mibps": MIBPS,
    "rebalance_concurrency": CONCURRENCY,
    "capacity_alert_high_percent": PERCENT,
    "capacity_alert_critical_percent": PERCENT,
}
POOL_CREATE = obj(
    {
        "name": NAME,
        "protection_domain_id": ID,
        "pg_count": {"type": "integer", "minimum": 1, "maximum": 16384},
        "allocation_granularity": SIZE,
        **_POOL_SETTINGS,
    },
    ("name", "protection_domain_id"),
)
POOL_UPDATE = obj({"name": NAME, **_POOL_SETTINGS}, min_properties=1)

DEVICE_SPEC = obj(
    {"path": PATH, "capacity": SIZE, "pool_id": ID, "name": NAME},
    ("path", "capacity", "pool_id"),
)
SDS_CREATE = obj(
    {
        "name": NAME,
        "protection_domain_id": ID,
        "fault_set_id": {"oneOf": [{"type": "null"}, ID]},
        "address": ADDRESS,
        "data_port": PORT,
        "control_port": PORT,
        "devices": {"type": "array", "items": DEVICE_SPEC, "maxItems": 64},
    },
    ("name", "protection_domain_id", "address"),
)
SDS_REGISTER = obj(
    {
        "name": NAME,
        "protection_domain": NAME,
        "fault_set": {"oneOf": [{"type": "null"}, NAME]},
        "address": ADDRESS,
        "data_port": PORT,
        "control_port": PORT,
        "devices": {
            "type": "array",
            "maxItems": 64,
            "items": obj(
                {"path": PATH, "capacity": SIZE, "pool": NAME, "name": NAME},
                ("path", "capacity", "pool"),
            ),
        },
        # Devices whose superblock lacked CLEAN at start (docs/mdm.md, "Unclean starts").
        "unclean_devices": {"type": "array", "maxItems": 64, "items": PATH},
        # A new SDS without a certificate of its name joins with a join token
        # (docs/security.md, "Joining the cluster"); ignored for an SDS already known.
        "join_token": {"type": "string", "maxLength": 128},
    },
    ("name", "protection_domain", "address"),
)
JOIN_TOKEN_CREATE = obj(
    {
        "ttl_s": {
            "type": "integer",
            "minimum": 1,
            "maximum": 365 * 24 * 3600,
            "description": "seconds until it expires (default 86400, at most a year)",
        },
        "uses": {
            "type": "integer",
            "minimum": 1,
            "maximum": 1_000_000,
            "description": "how many new SDSs may join with it (default 1)",
        },
        "description": {"type": "string", "maxLength": 255},
    }
)
PG_SYNCED = obj(
    {
        "pool_id": ID,
        "pg": {"type": "integer", "minimum": 0, "maximum": 16383},
        "epoch": EPOCH,
    },
    ("pool_id", "pg", "epoch"),
)
#: The most reports one ``pgs-synced`` call carries.
MAX_SYNCED_REPORTS = 1024
PGS_SYNCED = obj(
    {
        "reports": {
            "type": "array",
            "items": PG_SYNCED,
            "minItems": 1,
            "maxItems": MAX_SYNCED_REPORTS,
        }
    },
    ("reports",),
)

_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": 2**62}
#: An SDS's scrub report (docs/mdm.md, "Scrub"): per pool the pass it works on, the
#: PGs it scrubbed in it and its counters; its findings the MDM has not taken yet.
SCRUB_REPORT = obj(
    {
        # the SDS process's: its findings are numbered from 1 in each
        "instance": {"type": "string", "maxLength": 64},
        "pools": {
            "type": "array",
            "maxItems": 1024,
            "items": obj(
                {
                    "pool_id": ID,
                    "pass": _COUNT,
                    "pgs_done": {
                        "type": "array",
                        "maxItems": 65536,
                        "items": {"type": "integer", "minimum": 0, "maximum": 2**31},
                    },
                    "chunks": _COUNT,
                    "bytes": _COUNT,
                    "errors": {"type": "object", "additionalProperties": _COUNT},
                    "repaired": _COUNT,
                    "checksummed": _COUNT,
                },
                ("pool_id", "pass", "pgs_done", "chunks", "bytes", "repaired"),
            ),
        },
        "findings": {
            "type": "array",
            "maxItems": 1024,
            "items": {
                "type": "object",
                "required": ["seq", "pool_id", "kind"],
                "properties": {"seq": _COUNT, "pool_id": ID, "kind": {"type": "string"}},
            },
        },
    }
)
_GONE: dict[str, Any] = {"type": "array", "maxItems": 100_000, "items": ID}
#: The counters of one tree's garbage pass in an SDS heartbeat (``tree_gc``).
TREE_GC_COUNTS = ("chunks", "chunks_done", "blocks_freed", "slots_freed", "collapsed")
#: The states of a tree's garbage pass (``failed``: tried again later by the SDS).
TREE_GC_STATES = ("running", "failed", "done")
SDS_HEARTBEAT = obj(
    {
        # Heartbeats that carry what changed (docs/mdm.md, "Heartbeats"): this one's
        # number, whether it carries the SDS's whole state, and, when it does not, the
        # number of the last one the MDM acknowledged, whose state it changes. None of
        # the three: an SDS of an earlier release, whose heartbeats carry everything.
        "seq": EPOCH,
        "full": {"type": "boolean"},
        "base": EPOCH,
        "devices": {
            "type": "array",
            "maxItems": 64,
            "items": obj(
                {
                    "id": ID,
                    "used_bytes": {"type": "integer", "minimum": 0, "maximum": MAX_DEVICE_BYTES},
                },
                ("id", "used_bytes"),
            ),
        },
        "volumes": {
            "type": "array",
            "maxItems": 100_000,
            "items": obj(
                {"id": ID, "chunks": {"type": "integer", "minimum": 0, "maximum": 2**40}},
                ("id", "chunks"),
            ),
        },
        # Volumes this SDS no longer stores chunks of (in a heartbeat that is not full)
        "volumes_gone": _GONE,
        # The highest cluster epoch this SDS has been told (reconciled after a restore).
        "epoch": EPOCH,
        # The epoch of each pool's map this SDS has (reconciled after a restore).
        "map_epochs": {
            "type": "array",
            "maxItems": 1024,
            "items": obj(
                {"pool_id": ID, "epoch": EPOCH},
                ("pool_id", "epoch"),
            ),
        },
        # Per tombstone this SDS holds (durably): the chunks of it still stored here.
        "tombstones": {
            "type": "array",
            "maxItems": 100_000,
            "items": obj(
                {
                    "id": ID,
                    "chunks_left": {"type": "integer", "minimum": 0, "maximum": 2**40},
                    # The MDM epoch of the delete (acted on after a restore only if
                    # newer than the backup; absent from SDSs of older releases).
                    "epoch": EPOCH,
                },
                ("id", "chunks_left"),
            ),
        },
        # Tombstones this SDS no longer holds (in a heartbeat that is not full)
        "tombstones_gone": _GONE,
        # How long this SDS has reached each held SDS the MDM named (``probe``) without
        # a break, in seconds (0: its last ping failed).
        "probes": {
            "type": "array",
            "maxItems": 1024,
            "items": obj(
                {"sds_id": ID, "reachable_s": {"type": "number", "minimum": 0, "maximum": 2**31}},
                ("sds_id", "reachable_s"),
            ),
        },
        "copies": {
            "type": "array",
            "maxItems": 1024,
            "items": obj(
                {
                    "pool_id": ID,
                    "kind": {"type": "string", "enum": ["rebuild", "rebalance"]},
                    "remaining_bytes": {"type": "integer", "minimum": 0, "maximum": 2**62},
                    "copied_bytes": {"type": "integer", "minimum": 0, "maximum": 2**62},
                },
                ("pool_id", "kind", "remaining_bytes", "copied_bytes"),
            ),
        },
        "scrub": SCRUB_REPORT,
        # Per snapshot tree, this SDS's newest garbage pass (sds/tree_gc.py; absent
        # until the SDS has one)
        "tree_gc": {
            "type": "array",
            "maxItems": 100_000,
            "items": obj(
                {
                    "tree_id": ID,
                    "pool_id": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                    "state": {"type": "string", "enum": list(TREE_GC_STATES)},
                    **{
                        k: {"type": "integer", "minimum": 0, "maximum": 2**40}
                        for k in TREE_GC_COUNTS
                    },
                    "unread_slots": {
                        "type": "array",
                        "maxItems": 100_000,
                        "items": obj(
                            {
                                "version": {"type": "integer", "minimum": 0, "maximum": 2**62},
                                "slots": {"type": "integer", "minimum": 0, "maximum": 2**40},
                            },
                            ("version", "slots"),
                        ),
                    },
                },
                ("tree_id", "pool_id", "state", *TREE_GC_COUNTS, "unread_slots"),
            ),
        },
        # trees the MDM has a pass of that the SDS no longer reports (a delta only)
        "tree_gc_gone": _GONE,
        # entries of tree_gc the SDS sends with later heartbeats (absent: none)
        "tree_gc_left": {"type": "integer", "minimum": 0, "maximum": 2**40},
    }
)
SDS_MAINTENANCE = obj({"mode": {"type": "string", "enum": ["enter", "exit"]}}, ("mode",))
SDS_DRAIN = obj({"cancel": {"type": "boolean"}})
SDS_UNREACHABLE = obj({"reporter": {"type": "string", "maxLength": 128}})
DEVICE_FAILED = obj({"error": {"type": "string", "maxLength": 1024}}, ("error",))
SDC_CREATE = obj(
    {"guid": GUID, "name": NAME, "address": ADDRESS, "control_port": PORT, "nbd_port": PORT},
    ("guid", "name"),
)
SDC_UPDATE = obj({"name": NAME}, ("name",))
SDC_HEARTBEAT = obj({"epoch": EPOCH})

VOLUME_TYPE: dict[str, Any] = {"type": "string", "enum": ["thin", "thick"]}
VOLUME_CREATE = obj(
    {"name": NAME, "pool_id": ID, "size": SIZE, "type": VOLUME_TYPE},
    ("name", "pool_id", "size"),
)
VOLUME_UPDATE = obj({"name": NAME, "size": SIZE}, min_properties=1)

ACCESS_MODE: dict[str, Any] = {"type": "string", "enum": ["read_write", "read_only"]}
MAPPING_CREATE = obj(
    {
        "volume_id": ID,
        "sdc_id": ID,
        "access_mode": ACCESS_MODE,
        "iops_limit": OPTIONAL_LIMIT,
        "bandwidth_limit": OPTIONAL_BANDWIDTH,
    },
    ("volume_id", "sdc_id"),
)
MAPPING_UPDATE = obj(
    {
        "access_mode": ACCESS_MODE,
        "iops_limit": OPTIONAL_LIMIT,
        "bandwidth_limit": OPTIONAL_BANDWIDTH,
    },
    min_properties=1,
)

# ---- responses (OpenAPI components) ------------------------------------------------

_TS = {"type": ["string", "null"], "format": "date-time"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_NINT = {"type": ["integer", "null"]}
_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_STATE = {"type": "string", "enum": ["connected", "disconnected"]}


def _resp(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties)}


_ERROR = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": _STR, "message": _STR, "details": {"type": "object"}},
}

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": _resp({"error": _ERROR}),
    "ProtectionDomain": _resp({"id": _INT, "name": _STR, "created_at": _TS}),
    "FaultSet": _resp({"id": _INT, "name": _STR, "protection_domain_id": _INT, "created_at": _TS}),
    "PoolCapacity": _resp(
        {
            k: _INT
            for k in (
                "pool_id",
                "total_bytes",
                "spare_bytes",
                "usable_bytes",
                "thick_reserved_bytes",
                "thin_used_bytes",
                "allocated_bytes",
                "free_bytes",
            )
        }
        | {"used_percent": {"type": "number"}}
    ),
    "Pool": _resp(
        {
            "id": _INT,
            "name": _STR,
            "protection_domain_id": _INT,
            "pg_count": _INT,
            "allocation_granularity_bytes": _INT,
            "spare_percent": _INT,
            "rebuild_bandwidth_mibps": _INT,
            "rebuild_concurrency": _INT,
            "rebalance_bandwidth_mibps": _INT,
            "rebalance_concurrency": _INT,
            "capacity_alert_high_percent": _INT,
            "capacity_alert_critical_percent": _INT,
            "map_epoch": _INT,
            "capacity": {"$ref": "#/components/schemas/PoolCapacity"},
            "created_at": _TS,
        }
    ),
    "Device": _resp(
        {
            "id": _INT,
            "sds_id": _INT,
            "pool_id": _INT,
            "path": _STR,
            "name": _NSTR,
            "capacity_bytes": _INT,
            "used_bytes": _INT,
            "state": {"type": "string", "enum": ["normal", "failed"]},
            "failed_at": _TS,
            "error": _NSTR,
        }
    ),
    "Sds": _resp(
        {
            "id": _INT,
            "name": _STR,
            "protection_domain_id": _INT,
            "fault_set_id": _NINT,
            "address": _STR,
            "data_port": _INT,
            "control_port": _INT,
            "state": _STATE,
            "held_down": {"type": "boolean"},
            "flapping": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["normal", "maintenance", "draining"]},
            "last_seen": _TS,
            "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "created_at": _TS,
        }
    ),
    "JoinToken": _resp(
        {
            "id": _INT,
            "token_id": _STR,
            "description": _NSTR,
            "uses": _INT,
            "max_uses": _INT,
            "expires_at": _TS,
            "state": {"type": "string", "enum": ["valid", "expired", "used up"]},
            "created_by": _NSTR,
            "last_used_at": _TS,
            "last_used_by": _NSTR,
            "created_at": _TS,
        }
    ),
    "SdsJoinRequest": _resp(
        {
            "id": _INT,
            "name": _STR,
            "state": {"type": "string", "enum": ["pending", "approved", "rejected"]},
            "protection_domain": _STR,
            "fault_set": _NSTR,
            "address": _STR,
            "data_port": _INT,
            "control_port": _INT,
            "devices": _INT,
            "capacity_bytes": _INT,
            "caller": _STR,
            "remote": _NSTR,
            "decided_by": _NSTR,
            "last_seen": _TS,
            "created_at": _TS,
        }
    ),
    "Sdc": _resp(
        {
            "id": _INT,
            "guid": _STR,
            "name": _STR,
            "address": _NSTR,
            "control_port": _NINT,
            "nbd_port": _NINT,
            "state": _STATE,
            "last_seen": _TS,
            "created_at": _TS,
        }
    ),
    "Volume": _resp(
        {
            "id": _INT,
            "name": _STR,
            "pool_id": _INT,
            "type": VOLUME_TYPE,
            "size_bytes": _INT,
            "allocated_bytes": _INT,
            "mapped_sdc_ids": {"type": "array", "items": _INT},
            "state": {"type": "string", "enum": ["active", "deleting"]},
            "chunks_left": _INT,
            "bytes_left": _INT,
            "created_at": _TS,
        }
    ),
    "Mapping": _resp(
        {
            "id": _INT,
            "volume_id": _INT,
            "sdc_id": _INT,
            "access_mode": ACCESS_MODE,
            "iops_limit": _NINT,
            "bandwidth_limit_bps": _NINT,
            "created_at": _TS,
        }
    ),
    "PgMap": _resp(
        {
            "pool_id": _INT,
            "epoch": _INT,
            "term": _INT,
            "pg_count": _INT,
            "rebuild_concurrency": _INT,
            "rebuild_bandwidth_mibps": _INT,
            "rebalance_concurrency": _INT,
            "rebalance_bandwidth_mibps": _INT,
            "pgs": {"type": "array", "items": {"type": "object"}},
            "sds": {"type": "object"},
            "tombstones": {"type": "object", "additionalProperties": _INT},
        }
    ),
    "SdcMaps": _resp(
        {
            "epoch": _INT,
            "term": _INT,
            "sdc_id": _INT,
            "volumes": {"type": "array", "items": {"type": "object"}},
            "pools": {"type": "object"},
        }
    ),
    # "unchanged" (asked with since= at the caller's epoch): no volumes
    "PoolMappings": {
        "type": "object",
        "required": ["pool_id", "epoch"],
        "properties": {
            "pool_id": _INT,
            "epoch": _INT,
            "term": _INT,
            "volumes": {"type": "array", "items": {"type": "object"}},
            "unchanged": {"type": "boolean"},
        },
    },
    # An unmap's answer with confirm_timeout: which SDSs of the pool hold the mappings
    # epoch that revoked it (mdm/mappings.py, Confirmations; see docs/security.md too).
    "MappingRevocation": _resp(
        {
            "mapping_id": _INT,
            "volume_id": _INT,
            "sdc_id": _INT,
            "pool_id": _INT,
            "mappings_epoch": _INT,
            # the SDSs check client IO by the mappings (the MDM's API has TLS)
            "enforced": {"type": "boolean"},
            # every SDS of the pool holds mappings_epoch (or a later one)
            "confirmed": {"type": "boolean"},
            # the names of those that do not: they may still serve the SDC
            "unconfirmed": {"type": "array", "items": _STR},
            "sds": {
                "type": "array",
                "items": _resp(
                    {
                        "id": _INT,
                        "name": _STR,
                        "state": _STR,
                        "confirmed": {"type": "boolean"},
                        "epoch": _NINT,
                        "last_heard_s": {"type": ["number", "null"]},
                        "asking": {"type": "boolean"},
                    }
                ),
            },
        }
    ),
    "Heartbeat": _resp(
        {"state": _STATE, "epoch": _INT, "term": _INT, "heartbeat_interval_s": _NUM}
    ),
    "SdsHeartbeat": _resp(
        {
            "state": _STATE,
            "epoch": _INT,
            "term": _INT,
            # how often to heartbeat ([cluster] heartbeat_interval_s)
            "heartbeat_interval_s": _NUM,
            # the MDM has not the state this heartbeat changes: send the whole of it next
            "send_full": {"type": "boolean"},
            # Held SDSs this SDS should ping and report on in its heartbeats' probes
            # (docs/mdm.md, "Hold-down and flapping")
            "probe": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["sds_id", "address", "data_port"],
                    "properties": {"sds_id": _INT, "address": _STR, "data_port": _INT},
                },
            },
            # every pool's scrub order, and the newest of this SDS's findings taken
            "scrub": _resp(
                {
                    "orders": {"type": "array", "items": {"type": "object"}},
                    "findings_acked": _INT,
                }
            ),
        }
    ),
    "Scrub": _resp(
        {
            "pool_id": _INT,
            "name": _STR,
            "state": {"type": "string", "enum": ["idle", "running", "paused", "held"]},
            "pass": _INT,
            "pgs_total": _INT,
            "pgs_done": _INT,
            "progress_percent": {"type": "number"},
            "pass_started_at": {"type": ["number", "null"]},
            "last_complete_at": {"type": ["number", "null"]},
            "next_pass_at": {"type": ["number", "null"]},
            "passes_completed": _INT,
            "period_s": {"type": "number"},
            "bandwidth_mibps": _INT,
            "chunks_scrubbed": _INT,
            "bytes_scrubbed": _INT,
            "errors": {"type": "object", "additionalProperties": _INT},
            "repaired_blocks": _INT,
            "checksummed_blocks": _INT,
            "findings": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "SnapshotGc": _resp(
        {
            "trees": {"type": "array", "items": {"$ref": "#/components/schemas/TreeGc"}},
            "unreported": {"type": "object", "additionalProperties": _INT},
        }
    ),
    "TreeGc": _resp(
        {
            "tree_id": _INT,
            "pool_id": _INT,
            "state": {"type": "string", "enum": list(TREE_GC_STATES)},
            "sds_reporting": _INT,
            "chunks": _INT,
            "chunks_done": _INT,
            "chunks_left": _INT,
            "blocks_freed": _INT,
            "slots_freed": _INT,
            "collapsed": _INT,
            "unread_slots": {"type": "object", "additionalProperties": _INT},
            "sds": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "Rebuild": _resp(
        {"pools": {"type": "array", "items": {"$ref": "#/components/schemas/PoolRebuild"}}}
    ),
    "PoolRebuild": _resp(
        {
            "pool_id": _INT,
            "name": _STR,
            "protection_domain": _STR,
            "pgs": {"type": "object"},
            "pgs_moving": _INT,
            "rebuild": {"$ref": "#/components/schemas/CopyProgress"},
            "rebalance": {"$ref": "#/components/schemas/CopyProgress"},
            "rebuild_concurrency": _INT,
            "rebuild_bandwidth_mibps": _INT,
            "rebuild_delay_left_s": {"type": ["number", "null"]},
        }
    ),
    "CopyProgress": _resp(
        {
            "active": {"type": "boolean"},
            "remaining_bytes": _INT,
            "copied_bytes": _INT,
            "rate_bytes_per_s": {"type": "number"},
            "eta_s": {"type": ["number", "null"]},
        }
    ),
    "PgCopies": _resp({"sds_id": _INT, "mode": _STR, "pg_copies": _INT}),
    "PgImpact": _resp(
        {
            "count": _INT,
            "pgs": {
                "type": "array",
                "items": _resp(
                    {
                        "pool_id": _INT,
                        "pool": _STR,
                        "pg": _INT,
                        "copies_now": _INT,
                        "already": {"type": "boolean"},
                    }
                ),
            },
        }
    ),
    "OkToStop": _resp(
        {
            "safe": {"type": "boolean"},
            "sds": {
                "type": "array",
                "items": _resp({"id": _INT, "name": _STR, "state": _STATE, "mode": _STR}),
            },
            "pgs_with_copy": _INT,
            "pgs_with_copy_not_clean": _INT,
            "unavailable": {"$ref": "#/components/schemas/PgImpact"},
            "single_copy": {"$ref": "#/components/schemas/PgImpact"},
            "volumes_unavailable": {"type": "array", "items": _STR},
            "volumes_single_copy": {"type": "array", "items": _STR},
            "already_unavailable": _INT,
            "already_single_copy": _INT,
        }
    ),
    "DryRun": {
        "type": "object",
        "required": [
            "dry_run",
            "action",
            "target",
            "unavailable",
            "single_copy",
            "volumes_unavailable",
            "volumes_single_copy",
            "bytes_to_copy",
            "estimated_seconds",
            "pools",
            "estimate",
        ],
        "properties": {
            "dry_run": {"const": True},
            "action": _STR,
            "target": _STR,
            "unavailable": {"$ref": "#/components/schemas/PgImpact"},
            "single_copy": {"$ref": "#/components/schemas/PgImpact"},
            "volumes_unavailable": {"type": "array", "items": _STR},
            "volumes_single_copy": {"type": "array", "items": _STR},
            "bytes_to_copy": _NINT,
            "estimated_seconds": {"type": ["number", "null"]},
            "pools": {"type": "array", "items": {"type": "object"}},
            "estimate": _STR,
            "changes": {"type": "object"},
            "copies_in_progress": {"type": "array", "items": {"type": "object"}},
        },
    },
    "SdsOrDryRun": {
        "anyOf": [{"$ref": "#/components/schemas/Sds"}, {"$ref": "#/components/schemas/DryRun"}]
    },
    "PoolOrDryRun": {
        "anyOf": [{"$ref": "#/components/schemas/Pool"}, {"$ref": "#/components/schemas/DryRun"}]
    },
    "Unreachable": _resp({"sds_id": _INT, "confirmed": {"type": "boolean"}, "state": _STATE}),
    "PgSynced": _resp({"pool_id": _INT, "pg": _INT, "state": _STR, "epoch": _INT}),
    "PgsSynced": _resp(
        {
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["pool_id", "pg", "accepted"],
                    "properties": {
                        "pool_id": _INT,
                        "pg": _INT,
                        "accepted": {"type": "boolean"},
                        "epoch": _INT,
                        "error": _ERROR,
                    },
                },
            }
        }
    ),
    "Topology": _resp(
        {
            "cluster": {"type": "object"},
            "protection_domains": {"type": "array"},
            "sdc": {"type": "array"},
        }
    ),
    "Capacity": _resp(
        {"pools": {"type": "array", "items": {"$ref": "#/components/schemas/PoolCapacity"}}}
    ),
    "Health": _resp({"status": _STR, "cluster": _STR, "epoch": _INT, "version": _STR}),
    "Components": _resp({"components": {"type": "array", "items": {"type": "object"}}}),
    "HealthMetrics": {"type": "object"},
}


def list_of(key: str, item: str) -> dict[str, Any]:
    return _resp({key: {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}}})


for _key, _item, _name in (
    ("protection_domains", "ProtectionDomain", "ProtectionDomainList"),
    ("fault_sets", "FaultSet", "FaultSetList"),
    ("pools", "Pool", "PoolList"),
    ("sds", "Sds", "SdsList"),
    ("join_tokens", "JoinToken", "JoinTokenList"),
    ("join_requests", "SdsJoinRequest", "SdsJoinRequestList"),
    ("sdc", "Sdc", "SdcList"),
    ("volumes", "Volume", "VolumeList"),
    ("mappings", "Mapping", "MappingList"),
    ("pools", "Scrub", "ScrubList"),
):
    COMPONENTS[_name] = list_of(_key, _item)
# a PATCH's answer: with confirm_timeout, "revocation" (null unless it made the
# mapping read-only)
COMPONENTS["MappingUpdated"] = {
    "type": "object",
    "properties": {
        **COMPONENTS["Mapping"]["properties"],
        "revocation": {
            "oneOf": [{"$ref": "#/components/schemas/MappingRevocation"}, {"type": "null"}]
        },
    },
    "required": COMPONENTS["Mapping"]["required"],
}
COMPONENTS["JoinTokenCreated"] = {
    "type": "object",
    "properties": {**COMPONENTS["JoinToken"]["properties"], "token": _STR},
    "required": [*COMPONENTS["JoinToken"]["required"], "token"],
}
