"""``meshctl faultset``: fault sets, groups of SDSs that may fail together.

Copies of a PG are placed in different fault sets where fault sets exist.
"""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.context import Context
from meshblock.cli.output import render_fields, render_table, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/fault-sets"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "faultset", "manage fault sets", aliases=["fault-set", "fs"])

    p = add_command(
        sub,
        "create",
        create,
        help="create a fault set in a protection domain",
        description="Fault set names are unique within their protection domain.",
        examples=["meshctl faultset create fs1 --pd pd1"],
    )
    p.add_argument("name", help="name of the new fault set")
    p.add_argument("--pd", required=True, metavar="PD", help="protection domain (name or id)")

    p = add_command(
        sub,
        "list",
        list_,
        help="list fault sets",
        examples=["meshctl faultset list", "meshctl faultset list --pd pd1"],
        aliases=["ls"],
    )
    p.add_argument("--pd", metavar="PD", help="only those of this protection domain")

    p = add_command(
        sub,
        "show",
        show,
        help="show a fault set and its SDSs",
        examples=["meshctl faultset show fs1", "meshctl faultset show fs1 --pd pd1"],
    )
    p.add_argument("name", help="fault set name (or id)")
    p.add_argument("--pd", metavar="PD", help="its protection domain, if the name is ambiguous")

    p = add_command(
        sub,
        "delete",
        delete,
        help="delete an empty fault set",
        description="Refused (exit 5) while SDSs are in it.",
        examples=["meshctl faultset delete fs1 --pd pd1"],
        aliases=["remove", "rm"],
    )
    p.add_argument("name", help="fault set name (or id)")
    p.add_argument("--pd", metavar="PD", help="its protection domain, if the name is ambiguous")


def create(ctx: Context, args: Namespace) -> None:
    pd = ctx.names.protection_domain(args.pd)
    fs = ctx.client.post(PATH, {"name": args.name, "protection_domain_id": pd["id"]})
    ctx.done(f"created fault set {fs['name']!r} in protection domain {pd['name']!r}", fs)


def list_(ctx: Context, args: Namespace) -> None:
    query = {"protection_domain_id": ctx.names.protection_domain(args.pd)["id"]} if args.pd else {}
    doc = ctx.client.get(PATH, query)
    fault_sets = doc["fault_sets"]

    def human() -> str:
        rows = []
        for f in fault_sets:
            members = [s for s in ctx.names.sds_list() if s.get("fault_set_id") == f["id"]]
            rows.append(
                [
                    f["id"],
                    f["name"],
                    ctx.names.name_of("protection_domain", f["protection_domain_id"]),
                    len(members),
                    timestamp(f.get("created_at")),
                ]
            )
        return render_table(
            ["ID", "NAME", "PD", "SDS", "CREATED"],
            rows,
            right={"ID", "SDS"},
            empty="no fault sets",
        )

    ctx.emit(doc, human)


def show(ctx: Context, args: Namespace) -> None:
    fs = ctx.client.get(f"{PATH}/{ctx.names.fault_set(args.name, args.pd)['id']}")

    def human() -> str:
        members = [s for s in ctx.names.sds_list() if s.get("fault_set_id") == fs["id"]]
        return render_fields(
            [
                ("id", fs["id"]),
                ("name", fs["name"]),
                (
                    "protection domain",
                    ctx.names.name_of("protection_domain", fs["protection_domain_id"]),
                ),
                ("created", timestamp(fs.get("created_at"))),
                ("sds", ", ".join(f"{s['name']} ({s.get('state')})" for s in members)),
            ]
        )

    ctx.emit(fs, human)


def delete(ctx: Context, args: Namespace) -> None:
    fs = ctx.names.fault_set(args.name, args.pd)
    ctx.client.delete(f"{PATH}/{fs['id']}")
    ctx.done(f"deleted fault set {fs['name']!r}")
