"""``meshctl pool``: storage pools, their settings, capacity and PG map."""

from __future__ import annotations

import argparse
from argparse import Namespace
from collections import Counter
from typing import Any

from meshblock.cli import values
from meshblock.cli.client import JsonObject
from meshblock.cli.commands import impact
from meshblock.cli.context import Context
from meshblock.cli.errors import UsageError
from meshblock.cli.output import percent, render_fields, render_table, size, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/pools"

# (flag, API field, argparse type, metavar, help) of the settings `pool set` may change.
_SETTINGS: list[tuple[str, str, Any, str, str]] = [
    ("--spare-percent", "spare_percent", values.number, "PCT",
     "capacity kept free to rebuild a lost SDS (default 10)"),
    ("--rebuild-bandwidth", "rebuild_bandwidth_mibps", values.bandwidth_mibps, "MiB/s",
     "rebuild throttle per device, e.g. 200 or 200MiB/s; 0 or unlimited: none"),
    ("--rebuild-concurrency", "rebuild_concurrency", int, "N",
     "concurrent rebuild copies per device"),
    ("--rebalance-bandwidth", "rebalance_bandwidth_mibps", values.bandwidth_mibps, "MiB/s",
     "rebalance throttle per device, e.g. 100 or 100MiB/s; 0 or unlimited: none"),
    ("--rebalance-concurrency", "rebalance_concurrency", int, "N",
     "concurrent rebalance copies per device"),
    ("--alert-high", "capacity_alert_high_percent", values.number, "PCT",
     "used percentage that raises a capacity warning (e.g. 80)"),
    ("--alert-critical", "capacity_alert_critical_percent", values.number, "PCT",
     "used percentage that raises a critical capacity alert (e.g. 90)"),
]  # fmt: skip


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pool settings")
    for flag, _field, kind, metavar, help in _SETTINGS:
        group.add_argument(flag, type=kind, metavar=metavar, help=help)


def _settings_body(args: Namespace) -> JsonObject:
    body: JsonObject = {}
    for flag, field, _kind, _metavar, _help in _SETTINGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            body[field] = value
    return body


def register(root: Subparsers) -> None:
    sub = add_noun(root, "pool", "manage storage pools", aliases=["storage-pool", "sp"])

    p = add_command(
        sub,
        "create",
        create,
        help="create a storage pool in a protection domain",
        description="""
            The PG count and the allocation granularity are fixed at creation; the
            other settings can be changed later with 'meshctl pool set'.""",
        examples=[
            "meshctl pool create sp1 --pd pd1",
            "meshctl pool create sp1 --pd pd1 --pg-count 256 --granularity 1GiB "
            "--spare-percent 10 --alert-high 80 --alert-critical 90",
        ],
    )
    p.add_argument("name", help="name of the new pool (unique in the cluster)")
    p.add_argument("--pd", required=True, metavar="PD", help="protection domain (name or id)")
    p.add_argument("--pg-count", type=int, metavar="N", help="placement groups in the pool")
    p.add_argument(
        "--granularity",
        type=values.size,
        metavar="SIZE",
        help="allocation granularity; volume sizes round up to it (default 1GiB)",
    )
    _add_settings(p)

    p = add_command(
        sub,
        "set",
        set_,
        help="change a pool's settings",
        examples=[
            "meshctl pool set sp1 --spare-percent 15",
            "meshctl pool set sp1 --rebuild-bandwidth 400MiB/s --rebuild-concurrency 4",
            "meshctl pool set sp1 --rebalance-bandwidth 20 --dry-run",
        ],
        description="""
            A settings change moves no data. With --dry-run nothing changes: the MDM
            checks the change as it would make it and prints each setting that would
            change, and for the copies in progress (rebuilds and resyncs, rebalance
            moves) the bytes left and the estimated time at the old and the new
            throttle.""",
    )
    p.add_argument("name", help="pool name (or id)")
    p.add_argument("--dry-run", action="store_true", help=impact.DRY_RUN_HELP)
    _add_settings(p)

    p = add_command(
        sub,
        "list",
        list_,
        help="list storage pools with their capacity",
        examples=["meshctl pool list", "meshctl pool list --pd pd1"],
        aliases=["ls"],
    )
    p.add_argument("--pd", metavar="PD", help="only those of this protection domain")

    p = add_command(
        sub,
        "show",
        show,
        help="show a pool's settings, capacity, devices and volumes",
        examples=["meshctl pool show sp1"],
    )
    p.add_argument("name", help="pool name (or id)")

    p = add_command(
        sub,
        "delete",
        delete,
        help="delete an empty storage pool",
        description="Refused (exit 5) while it has volumes or devices.",
        examples=["meshctl pool delete sp1"],
        aliases=["remove", "rm"],
    )
    p.add_argument("name", help="pool name (or id)")

    p = add_command(
        sub,
        "pgmap",
        pgmap,
        help="show a pool's placement-group map: PG -> primary and secondary copies",
        description="""
            With --wait-epoch N, wait until the map's epoch is greater than N (or the
            timeout passes) and print the map then.""",
        examples=["meshctl pool pgmap sp1", "meshctl pool pgmap sp1 --wait-epoch 12 --wait 20"],
    )
    p.add_argument("name", help="pool name (or id)")
    p.add_argument("--wait-epoch", type=int, metavar="N", help="long-poll for an epoch above N")
    p.add_argument(
        "--wait", type=float, metavar="SECONDS", help="longest wait with --wait-epoch (default 25)"
    )


def create(ctx: Context, args: Namespace) -> None:
    pd = ctx.names.protection_domain(args.pd)
    body: JsonObject = {"name": args.name, "protection_domain_id": pd["id"]}
    if args.pg_count is not None:
        body["pg_count"] = args.pg_count
    if args.granularity is not None:
        body["allocation_granularity"] = args.granularity
    body.update(_settings_body(args))
    pool = ctx.client.post(PATH, body)
    ctx.done(
        f"created pool {pool['name']!r} in protection domain {pd['name']!r} "
        f"({pool.get('pg_count')} PGs)",
        pool,
    )


def set_(ctx: Context, args: Namespace) -> None:
    body = _settings_body(args)
    if not body:
        raise UsageError("nothing to change: give at least one setting (see --help)")
    pool = ctx.names.pool(args.name)
    if args.dry_run:
        impact.dry_run(ctx, "PATCH", f"{PATH}/{pool['id']}", body)
        return
    updated = ctx.client.patch(f"{PATH}/{pool['id']}", body)
    changed = ", ".join(f"{k}={updated.get(k)}" for k in body)
    ctx.done(f"updated pool {updated['name']!r}: {changed}", updated)


def list_(ctx: Context, args: Namespace) -> None:
    query = {"protection_domain_id": ctx.names.protection_domain(args.pd)["id"]} if args.pd else {}
    doc = ctx.client.get(PATH, query)
    pools = doc["pools"]

    def human() -> str:
        rows = []
        for p in pools:
            cap = p.get("capacity") or {}
            rows.append(
                [
                    p["id"],
                    p["name"],
                    ctx.names.name_of("protection_domain", p["protection_domain_id"]),
                    p.get("pg_count"),
                    size(cap.get("total_bytes")),
                    size(cap.get("usable_bytes")),
                    size(cap.get("allocated_bytes")),
                    size(cap.get("free_bytes")),
                    percent(cap.get("used_percent")),
                    capacity_state(p),
                ]
            )
        return render_table(
            ["ID", "NAME", "PD", "PGS", "TOTAL", "USABLE", "ALLOCATED", "FREE", "USED", "STATE"],
            rows,
            right={"ID", "PGS", "TOTAL", "USABLE", "ALLOCATED", "FREE", "USED"},
            empty="no storage pools",
        )

    ctx.emit(doc, human)


def capacity_state(pool: JsonObject) -> str:
    """``ok``, ``high`` or ``critical`` against the pool's own alert thresholds."""
    used = (pool.get("capacity") or {}).get("used_percent")
    if not isinstance(used, int | float):
        return "-"
    critical = pool.get("capacity_alert_critical_percent")
    high = pool.get("capacity_alert_high_percent")
    if isinstance(critical, int | float) and used >= critical:
        return "critical"
    if isinstance(high, int | float) and used >= high:
        return "high"
    return "ok"


def show(ctx: Context, args: Namespace) -> None:
    pool = ctx.client.get(f"{PATH}/{ctx.names.pool(args.name)['id']}")

    def human() -> str:
        cap = pool.get("capacity") or {}
        devices = [
            (s["name"], d)
            for s in ctx.names.sds_list()
            for d in s.get("devices", [])
            if d.get("pool_id") == pool["id"]
        ]
        volumes = [v for v in ctx.names.volumes() if v.get("pool_id") == pool["id"]]
        fields = render_fields(
            [
                ("id", pool["id"]),
                ("name", pool["name"]),
                (
                    "protection domain",
                    ctx.names.name_of("protection_domain", pool["protection_domain_id"]),
                ),
                ("pg count", pool.get("pg_count")),
                ("map epoch", pool.get("map_epoch")),
                ("granularity", size(pool.get("allocation_granularity_bytes"))),
                ("spare", percent(pool.get("spare_percent"))),
                ("rebuild", _throttle(pool, "rebuild")),
                ("rebalance", _throttle(pool, "rebalance")),
                ("alert high", percent(pool.get("capacity_alert_high_percent"))),
                ("alert critical", percent(pool.get("capacity_alert_critical_percent"))),
                ("total", size(cap.get("total_bytes"))),
                ("spare capacity", size(cap.get("spare_bytes"))),
                ("usable", size(cap.get("usable_bytes"))),
                ("thick reserved", size(cap.get("thick_reserved_bytes"))),
                ("thin used", size(cap.get("thin_used_bytes"))),
                ("allocated", size(cap.get("allocated_bytes"))),
                ("free", size(cap.get("free_bytes"))),
                ("used", f"{percent(cap.get('used_percent'))} ({capacity_state(pool)})"),
                ("created", timestamp(pool.get("created_at"))),
            ]
        )
        device_table = render_table(
            ["SDS", "DEVICE", "CAPACITY", "USED"],
            [
                [sds, d.get("path"), size(d.get("capacity_bytes")), size(d.get("used_bytes"))]
                for sds, d in devices
            ],
            right={"CAPACITY", "USED"},
            empty="no devices",
        )
        volume_table = render_table(
            ["VOLUME", "TYPE", "SIZE", "ALLOCATED"],
            [
                [
                    v["name"],
                    v.get("type"),
                    size(v.get("size_bytes")),
                    size(v.get("allocated_bytes")),
                ]
                for v in volumes
            ],
            right={"SIZE", "ALLOCATED"},
            empty="no volumes",
        )
        return f"{fields}\n\n{device_table}\n\n{volume_table}"

    ctx.emit(pool, human)


def _throttle(pool: JsonObject, kind: str) -> str:
    """``200 MiB/s per device, concurrency 4``; a bandwidth of 0 (or none) is no
    throttle at all (the MDM's pool schema: 0 = unlimited): ``unlimited``."""
    bandwidth = pool.get(f"{kind}_bandwidth_mibps")
    concurrency = pool.get(f"{kind}_concurrency")
    rate = f"{bandwidth} MiB/s per device" if bandwidth else "unlimited"
    return f"{rate}, concurrency {concurrency}"


def delete(ctx: Context, args: Namespace) -> None:
    pool = ctx.names.pool(args.name)
    ctx.client.delete(f"{PATH}/{pool['id']}")
    ctx.done(f"deleted pool {pool['name']!r}")


def pgmap(ctx: Context, args: Namespace) -> None:
    pool = ctx.names.pool(args.name)
    query: dict[str, int | float | None] = {"wait_epoch": args.wait_epoch, "timeout": args.wait}
    http_timeout = ctx.client.timeout
    if args.wait_epoch is not None:
        http_timeout = max(http_timeout, (args.wait or 25.0) + 10.0)
    doc = ctx.client.get(f"{PATH}/{pool['id']}/pgmap", query, timeout=http_timeout)

    def human() -> str:
        sds_by_id = {s["id"]: s for s in ctx.names.sds_list()}

        def copy(c: JsonObject | None) -> str:
            if not c:
                return "-"
            sds = sds_by_id.get(c.get("sds_id"))
            if sds is None:
                return f"sds#{c.get('sds_id')}:device#{c.get('device_id')}"
            path = next(
                (
                    d.get("path")
                    for d in sds.get("devices", [])
                    if d.get("id") == c.get("device_id")
                ),
                f"device#{c.get('device_id')}",
            )
            return f"{sds['name']}:{path}"

        pgs = doc.get("pgs", [])
        head = f"pool {pool['name']}  epoch {doc.get('epoch')}  {doc.get('pg_count')} PGs"
        table = render_table(
            ["PG", "PRIMARY", "SECONDARY"],
            [[g.get("pg"), copy(g.get("primary")), copy(g.get("secondary"))] for g in pgs],
            right={"PG"},
            empty="no placement groups",
        )
        primaries = Counter(copy_sds(g.get("primary")) for g in pgs)
        secondaries = Counter(copy_sds(g.get("secondary")) for g in pgs)
        unplaced = sum(1 for g in pgs if not g.get("primary") or not g.get("secondary"))
        names = sorted({*primaries, *secondaries} - {None}, key=str)
        balance = render_table(
            ["SDS", "PRIMARIES", "SECONDARIES"],
            [
                [sds_by_id[i]["name"] if i in sds_by_id else f"#{i}", primaries[i], secondaries[i]]
                for i in names
            ],
            right={"PRIMARIES", "SECONDARIES"},
        )
        tail = f"\n\n{unplaced} PGs lack a copy (degraded or not placed)" if unplaced else ""
        return f"{head}\n\n{table}\n\n{balance}{tail}"

    ctx.emit(doc, human)


def copy_sds(c: JsonObject | None) -> Any:
    return c.get("sds_id") if c else None
