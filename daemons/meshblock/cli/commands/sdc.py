"""``meshctl sdc``: storage data clients, the hosts that see volumes."""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.client import JsonObject
from meshblock.cli.context import Context
from meshblock.cli.output import rate, render_fields, render_table, size, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/sdc"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "sdc", "manage storage data clients (SDCs)")

    p = add_command(
        sub,
        "add",
        add,
        help="add an SDC (a host that will see volumes)",
        description="""
            The SDC daemon registers itself by GUID when it starts; adding it first
            lets volumes be mapped to it before it connects.""",
        examples=[
            "meshctl sdc add host1 --guid 4f1c9a52-8d0e-4c55-9a43-0a1b2c3d4e5f",
            "meshctl sdc add host1 --guid 4f1c9a52-8d0e-4c55-9a43-0a1b2c3d4e5f --address 10.0.1.1",
        ],
    )
    p.add_argument("name", help="name of the new SDC (unique in the cluster)")
    p.add_argument("--guid", required=True, help="the GUID the SDC identifies itself with")
    p.add_argument("--address", help="IP address or host name of the SDC")

    add_command(
        sub,
        "list",
        list_,
        help="list SDCs with their state and mapped volumes",
        examples=["meshctl sdc list"],
        aliases=["ls"],
    )

    p = add_command(
        sub,
        "show",
        show,
        help="show an SDC and the volumes mapped to it",
        examples=["meshctl sdc show host1"],
    )
    p.add_argument("name", help="SDC name (or id, or GUID)")

    p = add_command(
        sub,
        "rename",
        rename,
        help="rename an SDC",
        examples=["meshctl sdc rename host1 db-server-1"],
    )
    p.add_argument("name", help="current name (or id, or GUID)")
    p.add_argument("new_name", metavar="new-name", help="new name")

    p = add_command(
        sub,
        "remove",
        remove,
        help="remove an SDC",
        description="Refused (exit 5) while volumes are mapped to it.",
        examples=["meshctl sdc remove host1"],
        aliases=["delete", "rm"],
    )
    p.add_argument("name", help="SDC name (or id, or GUID)")

    p = add_command(
        sub,
        "maps",
        maps,
        help="show the maps an SDC receives: its volumes and their pools' PG epochs",
        examples=["meshctl sdc maps host1", "meshctl sdc maps host1 --json"],
    )
    p.add_argument("name", help="SDC name (or id, or GUID)")


def add(ctx: Context, args: Namespace) -> None:
    body: JsonObject = {"name": args.name, "guid": args.guid}
    if args.address:
        body["address"] = args.address
    sdc = ctx.client.post(PATH, body)
    ctx.done(f"added SDC {sdc['name']!r} (guid {sdc.get('guid')})", sdc)


def _mapped_volumes(ctx: Context, sdc_id: int) -> list[str]:
    return [v["name"] for v in ctx.names.volumes() if sdc_id in (v.get("mapped_sdc_ids") or [])]


def list_(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get(PATH)
    clients = doc["sdc"]

    def human() -> str:
        return render_table(
            ["ID", "NAME", "GUID", "ADDRESS", "STATE", "VOLUMES", "LAST SEEN"],
            [
                [
                    c["id"],
                    c["name"],
                    c.get("guid"),
                    c.get("address"),
                    c.get("state"),
                    ", ".join(_mapped_volumes(ctx, c["id"])),
                    timestamp(c.get("last_seen")),
                ]
                for c in clients
            ],
            right={"ID"},
            empty="no SDCs",
        )

    ctx.emit(doc, human)


def show(ctx: Context, args: Namespace) -> None:
    sdc = ctx.client.get(f"{PATH}/{ctx.names.sdc(args.name)['id']}")

    def human() -> str:
        fields = render_fields(
            [
                ("id", sdc["id"]),
                ("name", sdc["name"]),
                ("guid", sdc.get("guid")),
                ("address", sdc.get("address")),
                ("control port", sdc.get("control_port")),
                ("nbd port", sdc.get("nbd_port")),
                ("state", sdc.get("state")),
                ("last seen", timestamp(sdc.get("last_seen"))),
                ("created", timestamp(sdc.get("created_at"))),
            ]
        )
        mappings = ctx.client.get("/api/v1/mappings", {"sdc_id": sdc["id"]})["mappings"]
        table = render_table(
            ["VOLUME", "ACCESS", "IOPS LIMIT", "BANDWIDTH LIMIT"],
            [
                [
                    ctx.names.name_of("volume", m.get("volume_id")),
                    m.get("access_mode"),
                    m.get("iops_limit"),
                    rate(m.get("bandwidth_limit_bps")),
                ]
                for m in mappings
            ],
            right={"IOPS LIMIT", "BANDWIDTH LIMIT"},
            empty="no volumes mapped",
        )
        return f"{fields}\n\n{table}"

    ctx.emit(sdc, human)


def rename(ctx: Context, args: Namespace) -> None:
    old = ctx.names.sdc(args.name)
    sdc = ctx.client.patch(f"{PATH}/{old['id']}", {"name": args.new_name})
    ctx.done(f"renamed SDC {old['name']!r} to {sdc['name']!r}", sdc)


def remove(ctx: Context, args: Namespace) -> None:
    sdc = ctx.names.sdc(args.name)
    ctx.client.delete(f"{PATH}/{sdc['id']}")
    ctx.done(f"removed SDC {sdc['name']!r}")


def maps(ctx: Context, args: Namespace) -> None:
    sdc = ctx.names.sdc(args.name)
    doc = ctx.client.get(f"{PATH}/{sdc['id']}/maps")

    def human() -> str:
        pools = doc.get("pools") or {}
        head = f"SDC {sdc['name']}  maps epoch {doc.get('epoch')}"
        table = render_table(
            ["VOLUME", "POOL", "SIZE", "ACCESS", "IOPS LIMIT", "BANDWIDTH LIMIT", "PG EPOCH"],
            [
                [
                    v.get("name"),
                    ctx.names.name_of("pool", v.get("pool_id")),
                    size(v.get("size_bytes")),
                    v.get("access_mode"),
                    v.get("iops_limit"),
                    rate(v.get("bandwidth_limit_bps")),
                    (pools.get(str(v.get("pool_id"))) or {}).get("epoch"),
                ]
                for v in doc.get("volumes", [])
            ],
            right={"SIZE", "IOPS LIMIT", "BANDWIDTH LIMIT", "PG EPOCH"},
            empty="no volumes mapped",
        )
        return f"{head}\n\n{table}"

    ctx.emit(doc, human)
