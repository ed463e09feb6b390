"""``meshctl pd``: protection domains, the top of the topology."""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.context import Context
from meshblock.cli.output import render_fields, render_table, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/protection-domains"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "pd", "manage protection domains", aliases=["protection-domain"])

    p = add_command(
        sub,
        "create",
        create,
        help="create a protection domain",
        examples=["meshctl pd create pd1"],
    )
    p.add_argument("name", help="name of the new protection domain (unique in the cluster)")

    add_command(
        sub,
        "list",
        list_,
        help="list protection domains",
        examples=["meshctl pd list", "meshctl pd list --json"],
        aliases=["ls"],
    )

    p = add_command(
        sub,
        "show",
        show,
        help="show a protection domain with its fault sets, pools and SDSs",
        examples=["meshctl pd show pd1"],
    )
    p.add_argument("name", help="protection domain name (or id)")

    p = add_command(
        sub,
        "rename",
        rename,
        help="rename a protection domain",
        examples=["meshctl pd rename pd1 rack-a"],
    )
    p.add_argument("name", help="current name (or id)")
    p.add_argument("new_name", metavar="new-name", help="new name")

    p = add_command(
        sub,
        "delete",
        delete,
        help="delete an empty protection domain",
        description="Refused (exit 5) while it still has pools, fault sets or SDSs.",
        examples=["meshctl pd delete pd1"],
        aliases=["remove", "rm"],
    )
    p.add_argument("name", help="protection domain name (or id)")


def create(ctx: Context, args: Namespace) -> None:
    pd = ctx.client.post(PATH, {"name": args.name})
    ctx.done(f"created protection domain {pd['name']!r} (id {pd['id']})", pd)


def list_(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get(PATH)
    pds = doc["protection_domains"]

    def human() -> str:
        return render_table(
            ["ID", "NAME", "CREATED"],
            [[p["id"], p["name"], timestamp(p.get("created_at"))] for p in pds],
            right={"ID"},
            empty="no protection domains",
        )

    ctx.emit(doc, human)


def show(ctx: Context, args: Namespace) -> None:
    pd = ctx.client.get(f"{PATH}/{ctx.names.protection_domain(args.name)['id']}")

    def human() -> str:
        query = {"protection_domain_id": pd["id"]}
        fault_sets = ctx.client.get("/api/v1/fault-sets", query)["fault_sets"]
        pools = ctx.client.get("/api/v1/pools", query)["pools"]
        sds = [s for s in ctx.names.sds_list() if s.get("protection_domain_id") == pd["id"]]
        return render_fields(
            [
                ("id", pd["id"]),
                ("name", pd["name"]),
                ("created", timestamp(pd.get("created_at"))),
                ("fault sets", ", ".join(f["name"] for f in fault_sets)),
                ("pools", ", ".join(p["name"] for p in pools)),
                ("sds", ", ".join(s["name"] for s in sds)),
            ]
        )

    ctx.emit(pd, human)


def rename(ctx: Context, args: Namespace) -> None:
    old = ctx.names.protection_domain(args.name)
    pd = ctx.client.patch(f"{PATH}/{old['id']}", {"name": args.new_name})
    ctx.done(f"renamed protection domain {old['name']!r} to {pd['name']!r}", pd)


def delete(ctx: Context, args: Namespace) -> None:
    pd = ctx.names.protection_domain(args.name)
    ctx.client.delete(f"{PATH}/{pd['id']}")
    ctx.done(f"deleted protection domain {pd['name']!r}")
