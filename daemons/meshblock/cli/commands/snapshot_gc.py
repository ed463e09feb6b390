"""``meshctl snapshot-gc``: the garbage passes of snapshot trees on the SDSs."""

from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

from meshblock.cli.context import Context
from meshblock.cli.errors import CliError
from meshblock.cli.output import render_table
from meshblock.cli.parser import Subparsers, add_command, add_noun, add_watch_options

PATH = "/api/v1/snapshot-gc"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "snapshot-gc", "follow the garbage collection of snapshot trees")
    p = add_command(
        sub,
        "status",
        status,
        help="show the SDSs' garbage passes over snapshot trees",
        description="""
            Per snapshot tree: whether its SDSs' garbage passes are running, failed
            (an SDS tries it again later) or done,
            the SDSs reporting, chunks visited and left, 4 KiB blocks and version
            slots freed, chunks where a version no volume reads was collapsed into its
            child, and the slots the SDSs still store of versions no volume reads
            (UNREAD: 0 once nothing of them is left). The passes start when a map
            changes a tree's versions or views (a snapshot deleted), paced by the
            SDSs' delete_free_rate. With --watch, until every pass is done (or
            --max-wait).""",
        examples=[
            "meshctl snapshot-gc status",
            "meshctl snapshot-gc status --watch --max-wait 600",
            "meshctl --json snapshot-gc status",
        ],
    )
    add_watch_options(p, "wait until every pass is done")


def watch(ctx: Context, timeout: float | None, interval: float) -> dict[str, Any]:
    start = time.monotonic()
    while True:
        doc: dict[str, Any] = ctx.client.get(PATH)
        left = [t for t in doc["trees"] if t["state"] != "done"]
        if not left:
            return doc
        if timeout is not None and time.monotonic() - start > timeout:
            chunks = sum(t["chunks_left"] for t in left)
            raise CliError(
                f"snapshot garbage collection not finished after {timeout:g} s: "
                f"{len(left)} tree(s), {chunks} chunk(s) left"
            )
        time.sleep(interval)


def status(ctx: Context, args: Namespace) -> None:
    doc = watch(ctx, args.max_wait, args.interval) if args.watch else ctx.client.get(PATH)

    def human() -> str:
        rows = [
            [
                t["tree_id"],
                t["pool_id"],
                t["state"],
                t["sds_reporting"],
                t["chunks_done"],
                t["chunks_left"],
                t["blocks_freed"],
                t["slots_freed"],
                t["collapsed"],
                sum(t["unread_slots"].values()),
            ]
            for t in doc["trees"]
        ]
        table = render_table(
            ["TREE", "POOL", "STATE", "SDS", "CHUNKS", "LEFT", "BLOCKS FREED", "SLOTS FREED",
             "COLLAPSED", "UNREAD"],
            rows,
            right={"TREE", "POOL", "SDS", "CHUNKS", "LEFT", "BLOCKS FREED", "SLOTS FREED",
                   "COLLAPSED", "UNREAD"},
            empty="no snapshot tree is being collected",
        )  # fmt: skip
        # An SDS with many trees reports them a bounded part per heartbeat.
        notes = [
            f"SDS {sds}: {n} tree report(s) still to come with its next heartbeats"
            for sds, n in (doc.get("unreported") or {}).items()
        ]
        return "\n".join([table, *notes])

    ctx.emit(doc, human)
