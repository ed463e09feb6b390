"""``meshctl mapping``: the volume-to-SDC mappings, cluster-wide.

Mappings are made and changed with ``meshctl volume map|unmap|set-limits|set-access``;
this noun lists and shows them.
"""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli.client import QueryValue
from meshblock.cli.context import Context
from meshblock.cli.output import rate, render_fields, render_table, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/mappings"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "mapping", "list volume-to-SDC mappings", aliases=["mappings"])

    p = add_command(
        sub,
        "list",
        list_,
        help="list mappings, optionally of one volume or one SDC",
        examples=[
            "meshctl mapping list",
            "meshctl mapping list --volume vol1",
            "meshctl mapping list --sdc host1 --json",
        ],
        aliases=["ls"],
    )
    p.add_argument("--volume", help="only the mappings of this volume")
    p.add_argument("--sdc", help="only the mappings of this SDC")

    p = add_command(
        sub,
        "show",
        show,
        help="show one mapping by its id (see 'meshctl mapping list')",
        examples=["meshctl mapping show 7"],
    )
    p.add_argument("id", type=int, help="mapping id")


def list_(ctx: Context, args: Namespace) -> None:
    query: dict[str, QueryValue] = {}
    if args.volume:
        query["volume_id"] = ctx.names.volume(args.volume)["id"]
    if args.sdc:
        query["sdc_id"] = ctx.names.sdc(args.sdc)["id"]
    doc = ctx.client.get(PATH, query)

    def human() -> str:
        return render_table(
            ["ID", "VOLUME", "SDC", "ACCESS", "IOPS LIMIT", "BANDWIDTH LIMIT", "CREATED"],
            [
                [
                    m["id"],
                    ctx.names.name_of("volume", m.get("volume_id")),
                    ctx.names.name_of("sdc", m.get("sdc_id")),
                    m.get("access_mode"),
                    m.get("iops_limit"),
                    rate(m.get("bandwidth_limit_bps")),
                    timestamp(m.get("created_at")),
                ]
                for m in doc["mappings"]
            ],
            right={"ID", "IOPS LIMIT", "BANDWIDTH LIMIT"},
            empty="no mappings",
        )

    ctx.emit(doc, human)


def show(ctx: Context, args: Namespace) -> None:
    m = ctx.client.get(f"{PATH}/{args.id}")

    def human() -> str:
        return render_fields(
            [
                ("id", m["id"]),
                ("volume", ctx.names.name_of("volume", m.get("volume_id"))),
                ("sdc", ctx.names.name_of("sdc", m.get("sdc_id"))),
                ("access", m.get("access_mode")),
                ("iops limit", m.get("iops_limit")),
                ("bandwidth limit", rate(m.get("bandwidth_limit_bps"))),
                ("created", timestamp(m.get("created_at"))),
            ]
        )

    ctx.emit(m, human)
