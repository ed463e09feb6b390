"""``meshctl sds``: storage data servers and their devices."""

from __future__ import annotations

import time
from argparse import Namespace

from meshblock.cli import values
from meshblock.cli.client import JsonObject
from meshblock.cli.commands import impact, sds_join
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, NotFound
from meshblock.cli.output import render_fields, render_table, size, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun
from meshblock.cli.progress import ProgressBar

PATH = "/api/v1/sds"

_DEVICE_HELP = "a device as PATH:CAPACITY:POOL, e.g. /dev/sdb:1TiB:sp1 (a file path works too)"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "sds", "manage storage data servers (SDSs) and their devices")

    p = add_command(
        sub,
        "add",
        add,
        help="add an SDS with its devices",
        description="""
            Declares an SDS to the MDM. The SDS daemon registers itself under the same
            name when it starts; its state is 'connected' while it sends heartbeats.
            Each device goes into a pool of the SDS's protection domain.""",
        examples=[
            "meshctl sds add sds1 --pd pd1 --fault-set fs1 --address 10.0.0.1 "
            "--device /dev/sdb:1TiB:sp1 --device /dev/sdc:1TiB:sp1",
            "meshctl sds add sds2 --pd pd1 --address 10.0.0.2 --data-port 7072 "
            "--control-port 7073 --device /var/lib/meshblock/dev0.img:100GiB:sp1",
        ],
    )
    p.add_argument("name", help="name of the new SDS (unique in the cluster)")
    p.add_argument("--pd", required=True, metavar="PD", help="protection domain (name or id)")
    p.add_argument("--fault-set", metavar="FS", help="fault set of that protection domain")
    p.add_argument("--address", required=True, help="IP address or host name of the SDS")
    p.add_argument("--data-port", type=values.port, metavar="PORT", help="data port (default 7072)")
    p.add_argument(
        "--control-port", type=values.port, metavar="PORT", help="control port (default 7073)"
    )
    p.add_argument(
        "--device",
        dest="devices",
        action="append",
        type=values.device_spec,
        default=[],
        metavar="PATH:CAPACITY:POOL",
        help=_DEVICE_HELP + "; repeat for several devices",
    )

    add_command(
        sub,
        "list",
        list_,
        help="list SDSs with their state and capacity, and those waiting to join",
        description="""
            Below the SDSs, those that asked to join without a join token or a
            certificate of their name (STATE pending, approved or rejected): see
            'meshctl sds approve'. With --json, under "join_requests".""",
        examples=["meshctl sds list"],
        aliases=["ls"],
    )

    p = add_command(
        sub,
        "show",
        show,
        help="show an SDS and its devices",
        examples=["meshctl sds show sds1"],
    )
    p.add_argument("name", help="SDS name (or id)")

    p = add_command(
        sub,
        "remove",
        remove,
        help="drain an SDS, then remove it",
        description="""
            Drains the SDS first: rebalance moves every PG copy it holds to the other
            SDSs of its pools (each PG keeps two in-sync copies meanwhile), with a
            progress bar on standard error; then removes it. Refused (exit 5) when
            the other SDSs cannot hold its data (too little free capacity after the
            pool's spare, or fewer than two fault domains left). If the wait is cut
            short (Ctrl-C, --max-wait) the SDS keeps draining: run the command again
            to wait, or 'meshctl sds drain NAME --cancel' to stop. For an SDS
            waiting to join (pending or rejected), deletes its request.""",
        examples=[
            "meshctl sds remove sds4",
            "meshctl sds remove sds4 --max-wait 3600",
            "meshctl sds remove sds4 --no-wait   # start the drain and return",
            "meshctl sds remove evil   # a pending or rejected SDS: deletes its request",
            "meshctl sds remove sds4 --dry-run   # bytes to move, time at the rebalance throttle",
        ],
        aliases=["delete", "rm"],
    )
    p.add_argument("name", help="SDS name (or id)")
    p.add_argument("--dry-run", action="store_true", help=impact.DRY_RUN_HELP)
    p.add_argument("--no-wait", action="store_true", help="start the drain and return (exit 0)")
    p.add_argument(
        "--max-wait",
        type=values.positive_float,
        default=None,
        help="give up waiting after this many seconds (exit 1; the drain goes on)",
    )
    p.add_argument(
        "--interval", type=values.positive_float, default=2.0, help="seconds between polls"
    )

    p = add_command(
        sub,
        "drain",
        drain,
        help="start (or cancel) draining an SDS without removing it",
        description="""
            Rebalance moves every PG copy off the SDS; it stays in the cluster in
            mode 'draining' and takes no new copies until the drain is cancelled.""",
        examples=["meshctl sds drain sds4", "meshctl sds drain sds4 --cancel"],
    )
    p.add_argument("name", help="SDS name (or id)")
    p.add_argument("--cancel", action="store_true", help="stop draining: mode normal again")

    p = add_command(
        sub,
        "maintenance",
        maintenance,
        help="enter or exit maintenance mode (a planned outage)",
        description="""
            enter: the SDS's copies stop taking IO (the other copy of each PG serves
            it and records what changes); nothing is rebuilt away from it, so it may
            be stopped, upgraded or rebooted. Refused (exit 5) when a PG with a copy
            on it would be left without a copy (not clean, or its other copy is
            down, in maintenance or draining). exit: only what changed meanwhile is
            copied back (a delta resync), then its PGs are clean again; follow it
            with 'meshctl rebuild status --watch'. Ask 'meshctl sds ok-to-stop NAME'
            first; --dry-run lists the PGs that would be left with one copy.""",
        examples=[
            "meshctl sds maintenance enter sds2 --dry-run",
            "meshctl sds maintenance enter sds2",
            "meshctl sds maintenance exit sds2",
        ],
    )
    p.add_argument("action", choices=["enter", "exit"], help="enter or exit maintenance")
    p.add_argument("name", help="SDS name (or id)")
    p.add_argument("--dry-run", action="store_true", help=impact.DRY_RUN_HELP)

    p = add_command(
        sub,
        "clear-flapping",
        clear_flapping,
        help="let a flapping SDS return once it proves itself up",
        description="""
            An SDS that went down more than [cluster] flap_count times within
            flap_window_s (STATE 'disconnected (flapping)' in 'sds list') is kept out
            until this command: its downs are forgotten, and it returns once the MDM
            and a peer have reached its data port for [cluster] hold_down_s. Find
            and fix why it flapped first (docs/runbook.md, MeshblockSdsFlapping).
            Exit 5 when it is not flapping.""",
        examples=["meshctl sds clear-flapping sds2"],
    )
    p.add_argument("name", help="SDS name (or id)")

    p = add_command(
        sub,
        "device-add",
        device_add,
        help="add a device to an SDS",
        examples=[
            "meshctl sds device-add sds1 --device /dev/sdd:2TiB:sp1",
            "meshctl sds device-add sds1 --device /dev/sde:2TiB:sp1 --name sde",
        ],
    )
    p.add_argument("name", help="SDS name (or id)")
    p.add_argument(
        "--device",
        required=True,
        type=values.device_spec,
        metavar="PATH:CAPACITY:POOL",
        help=_DEVICE_HELP,
    )
    p.add_argument("--name", dest="device_name", metavar="NAME", help="a name for the device")

    p = add_command(
        sub,
        "device-remove",
        device_remove,
        help="remove a device from an SDS",
        description="""Refused (exit 5) while the device holds data. A failed device
            (state failed in `meshctl sds show`) is removed once its copies have been
            rebuilt elsewhere, whatever it still holds: replace it, then add the new
            one with device-add (docs/runbook.md, MeshblockDeviceFailed).""",
        examples=["meshctl sds device-remove sds1 /dev/sdd"],
    )
    p.add_argument("name", help="SDS name (or id)")
    p.add_argument("device", metavar="PATH", help="device path (or its name or id)")
    impact.register(sub)
    sds_join.register(sub)


def device_body(ctx: Context, spec: values.DeviceSpec, name: str | None = None) -> JsonObject:
    body: JsonObject = {
        "path": spec.path,
        "capacity": spec.capacity,
        "pool_id": ctx.names.pool(spec.pool)["id"],
    }
    if name:
        body["name"] = name
    return body


def add(ctx: Context, args: Namespace) -> None:
    pd = ctx.names.protection_domain(args.pd)
    body: JsonObject = {
        "name": args.name,
        "protection_domain_id": pd["id"],
        "address": args.address,
        "devices": [device_body(ctx, spec) for spec in args.devices],
    }
    if args.fault_set:
        body["fault_set_id"] = ctx.names.fault_set(args.fault_set, args.pd)["id"]
    if args.data_port is not None:
        body["data_port"] = args.data_port
    if args.control_port is not None:
        body["control_port"] = args.control_port
    sds = ctx.client.post(PATH, body)
    devices = sds.get("devices", [])
    total = sum(d.get("capacity_bytes", 0) for d in devices)
    ctx.done(
        f"added SDS {sds['name']!r} at {sds.get('address')} with {len(devices)} "
        f"device(s), {size(total)}",
        sds,
    )


def list_(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get(PATH)
    servers = doc["sds"]
    doc["join_requests"] = waiting = sds_join.requests(ctx)

    def human() -> str:
        rows = []
        for s in servers:
            devices = s.get("devices", [])
            rows.append(
                [
                    s["id"],
                    s["name"],
                    ctx.names.name_of("protection_domain", s.get("protection_domain_id")),
                    ctx.names.name_of("fault_set", s.get("fault_set_id")),
                    f"{s.get('address')}:{s.get('data_port')}",
                    state_cell(s),
                    _devices_cell(devices),
                    size(sum(d.get("capacity_bytes", 0) for d in devices)),
                    size(sum(d.get("used_bytes", 0) for d in devices)),
                    timestamp(s.get("last_seen")),
                ]
            )
        table = render_table(
            ["ID", "NAME", "PD", "FAULT SET", "ADDRESS", "STATE", "DEVICES", "CAPACITY", "USED",
             "LAST SEEN"],
            rows,
            right={"ID", "DEVICES", "CAPACITY", "USED"},
            empty="no SDSs",
        )  # fmt: skip
        if waiting:
            table += "\n\nwaiting to join (meshctl sds approve NAME):\n"
            table += sds_join.requests_table(waiting)
        return table

    ctx.emit(doc, human)


def state_cell(sds: JsonObject) -> str:
    """``connected``, ``disconnected``, ``disconnected (held)`` (down on a failure
    report, not proven up yet) or ``disconnected (flapping)``."""
    state = str(sds.get("state"))
    if sds.get("flapping"):
        return f"{state} (flapping)"
    if sds.get("held_down"):
        return f"{state} (held)"
    return state


def _devices_cell(devices: list[JsonObject]) -> str:
    """``3``, or ``3 (1 failed)``."""
    failed = sum(1 for d in devices if d.get("state") == "failed")
    return f"{len(devices)} ({failed} failed)" if failed else str(len(devices))


def show(ctx: Context, args: Namespace) -> None:
    sds = ctx.client.get(f"{PATH}/{ctx.names.sds(args.name)['id']}")

    def human() -> str:
        fields = render_fields(
            [
                ("id", sds["id"]),
                ("name", sds["name"]),
                (
                    "protection domain",
                    ctx.names.name_of("protection_domain", sds.get("protection_domain_id")),
                ),
                ("fault set", ctx.names.name_of("fault_set", sds.get("fault_set_id"))),
                ("address", sds.get("address")),
                ("data port", sds.get("data_port")),
                ("control port", sds.get("control_port")),
                ("state", sds.get("state")),
                ("held down", sds.get("held_down")),
                ("flapping", sds.get("flapping")),
                ("mode", sds.get("mode")),
                ("last seen", timestamp(sds.get("last_seen"))),
                ("created", timestamp(sds.get("created_at"))),
            ]
        )
        devices = render_table(
            ["ID", "NAME", "PATH", "POOL", "STATE", "CAPACITY", "USED", "ERROR"],
            [
                [
                    d.get("id"),
                    d.get("name"),
                    d.get("path"),
                    ctx.names.name_of("pool", d.get("pool_id")),
                    d.get("state", "normal"),
                    size(d.get("capacity_bytes")),
                    size(d.get("used_bytes")),
                    d.get("error"),
                ]
                for d in sds.get("devices", [])
            ],
            right={"ID", "CAPACITY", "USED"},
            empty="no devices",
        )
        return f"{fields}\n\n{devices}"

    ctx.emit(sds, human)


def remove(ctx: Context, args: Namespace) -> None:
    try:
        sds = ctx.names.sds(args.name)
    except NotFound:  # perhaps one waiting to join: its request goes
        waiting = [r for r in sds_join.requests(ctx) if r["name"] == args.name]
        if not waiting:
            raise
        if args.dry_run:
            ctx.done(f"dry run: would delete the request to join of {args.name!r}")
            return
        sds_join.delete_request(ctx, waiting[0])
        return
    path = f"{PATH}/{sds['id']}"
    used = sum(int(d.get("used_bytes") or 0) for d in sds.get("devices", []))
    empty = _copies_left(ctx, path) == 0 and not used
    if args.dry_run:  # the removal's own checks when it holds nothing, else the drain's
        if empty:
            impact.dry_run(ctx, "DELETE", path)
        else:
            impact.dry_run(ctx, "POST", f"{path}/drain", {})
        return
    if empty:  # holds nothing: no drain needed
        ctx.client.delete(path)
        ctx.done(f"removed SDS {sds['name']!r}")
        return
    if sds.get("mode") != "draining":
        ctx.client.post(f"{path}/drain", {})
    if args.no_wait:
        ctx.done(f"SDS {sds['name']!r} is draining; run the command again to remove it")
        return
    bar = ProgressBar(f"draining {sds['name']}")
    start = time.monotonic()
    first = 0
    try:
        while True:
            left = _copies_left(ctx, path)
            first = max(first, left)
            bar.update(1.0 - left / first if first else 1.0, f"{left} PG copies left")
            if left == 0:
                break
            if args.max_wait is not None and time.monotonic() - start > args.max_wait:
                raise CliError(
                    f"SDS {sds['name']!r} still holds {left} PG copies after "
                    f"{args.max_wait:g} s; it keeps draining (run the command again to wait)"
                )
            time.sleep(args.interval)
    finally:
        bar.close()
    ctx.client.delete(path)
    ctx.done(f"drained and removed SDS {sds['name']!r}")


def _copies_left(ctx: Context, path: str) -> int:
    """PG copies (and move targets) the map still places on the SDS."""
    return int(ctx.client.get(f"{path}/pg-copies")["pg_copies"])


def drain(ctx: Context, args: Namespace) -> None:
    sds = ctx.names.sds(args.name)
    doc = ctx.client.post(f"{PATH}/{sds['id']}/drain", {"cancel": bool(args.cancel)})
    if args.cancel:
        ctx.done(f"SDS {sds['name']!r}: drain cancelled", doc)
    else:
        ctx.done(
            f"SDS {sds['name']!r} is draining; 'meshctl rebuild status --watch' follows it",
            doc,
        )


def clear_flapping(ctx: Context, args: Namespace) -> None:
    sds = ctx.names.sds(args.name)
    doc = ctx.client.post(f"{PATH}/{sds['id']}/clear-flapping", {})
    ctx.done(
        f"SDS {sds['name']!r}: flapping cleared; it returns once the MDM and a peer "
        "have reached it for the hold-down period",
        doc,
    )


def maintenance(ctx: Context, args: Namespace) -> None:
    sds = ctx.names.sds(args.name)
    if args.dry_run:
        impact.dry_run(ctx, "POST", f"{PATH}/{sds['id']}/maintenance", {"mode": args.action})
        return
    doc = ctx.client.post(f"{PATH}/{sds['id']}/maintenance", {"mode": args.action})
    if args.action == "enter":
        ctx.done(f"SDS {sds['name']!r} is in maintenance: it may be stopped now", doc)
    else:
        ctx.done(
            f"SDS {sds['name']!r} left maintenance; its copies resynchronise "
            "('meshctl rebuild status --watch')",
            doc,
        )


def device_add(ctx: Context, args: Namespace) -> None:
    sds = ctx.names.sds(args.name)
    device = ctx.client.post(
        f"{PATH}/{sds['id']}/devices", device_body(ctx, args.device, args.device_name)
    )
    ctx.done(
        f"added device {device.get('path')} ({size(device.get('capacity_bytes'))}) "
        f"to SDS {sds['name']!r}, pool {args.device.pool!r}",
        device,
    )


def find_device(sds: JsonObject, ref: str) -> JsonObject:
    devices: list[JsonObject] = sds.get("devices", [])
    for key in ("path", "name"):
        for d in devices:
            if d.get(key) == ref:
                return d
    if ref.isdigit():
        for d in devices:
            if d.get("id") == int(ref):
                return d
    raise NotFound(f"SDS {sds['name']!r} has no device {ref!r}")


def device_remove(ctx: Context, args: Namespace) -> None:
    sds = ctx.names.sds(args.name)
    device = find_device(sds, args.device)
    ctx.client.delete(f"{PATH}/{sds['id']}/devices/{device['id']}")
    ctx.done(f"removed device {device.get('path')} from SDS {sds['name']!r}")
