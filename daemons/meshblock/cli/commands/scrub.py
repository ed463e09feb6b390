"""``meshctl scrub``: the background scrub of each storage pool (status, start, pause)."""

from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

from meshblock.cli.context import Context
from meshblock.cli.errors import CliError
from meshblock.cli.output import render_table
from meshblock.cli.parser import Subparsers, add_command, add_noun, add_watch_options
from meshblock.cli.progress import ProgressBar

PATH = "/api/v1/scrub"
_FINDINGS_SHOWN = 20


def register(root: Subparsers) -> None:
    sub = add_noun(root, "scrub", "follow and drive the background scrub of each storage pool")
    p = add_command(
        sub,
        "status",
        status,
        help="show each pool's scrub: state, progress, errors found and repaired",
        description="""
            Per storage pool: the scrub's state (running, held while the pool
            rebuilds or rebalances, paused, idle), the current pass and how many of
            the pool's PGs it has scrubbed, when the last complete pass ended, the
            bad 4 KiB blocks found by kind and those repaired, and the newest
            findings. With --watch, a progress bar on standard error until no pass
            runs (or --max-wait), then the table.""",
        examples=[
            "meshctl scrub status",
            "meshctl scrub status --watch",
            "meshctl --json scrub status",
        ],
    )
    add_watch_options(p, "wait until no pass is running")
    for verb, fn, text in (
        ("start", start, "start a scrub pass of the pool now (or resume a paused one)"),
        ("pause", pause, "pause the pool's scrub: no pass runs until it is started again"),
    ):
        c = add_command(
            sub, verb, fn, help=text, description=text, examples=[f"meshctl scrub {verb} pool1"]
        )
        c.add_argument("pool", help="storage pool name (or id)")


def _running(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["pools"] if p["state"] in ("running", "held")]


def watch(ctx: Context, timeout: float | None, interval: float) -> dict[str, Any]:
    bar = ProgressBar("scrub")
    start = time.monotonic()
    try:
        while True:
            doc: dict[str, Any] = ctx.client.get(PATH)
            running = _running(doc)
            total = sum(p["pgs_total"] for p in running)
            done = sum(p["pgs_done"] for p in running)
            errors = sum(sum(p["errors"].values()) for p in doc["pools"])
            bar.update(
                done / total if total else 1.0,
                f"{done}/{total} PG(s) scrubbed, {errors} bad block(s) found",
            )
            if not running:
                return doc
            if timeout is not None and time.monotonic() - start > timeout:
                raise CliError(f"scrub not finished after {timeout:g} s: {done}/{total} PG(s)")
            time.sleep(interval)
    finally:
        bar.close()


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _human(doc: dict[str, Any]) -> str:
    rows = [
        [
            p["name"],
            p["state"],
            p["pass"],
            f"{p['pgs_done']}/{p['pgs_total']}",
            p["chunks_scrubbed"],
            sum(p["errors"].values()),
            p["repaired_blocks"],
            p["errors"].get("unrecoverable", 0),
            p["errors"].get("divergent", 0),
            _when(p["last_complete_at"]),
        ]
        for p in doc["pools"]
    ]
    out = render_table(
        ["POOL", "STATE", "PASS", "PGS", "CHUNKS", "BAD", "REPAIRED", "UNRECOVERABLE",
         "DIVERGENT", "LAST COMPLETE"],
        rows,
        right={"PASS", "PGS", "CHUNKS", "BAD", "REPAIRED", "UNRECOVERABLE", "DIVERGENT"},
        empty="no storage pools",
    )  # fmt: skip
    findings = [(p["name"], f) for p in doc["pools"] for f in p["findings"]]
    if findings:
        frows = [
            [
                name,
                f.get("volume_id"),
                f.get("chunk"),
                ",".join(map(str, f.get("blocks", []))),
                f["kind"],
                f.get("bad_sds_id") or "-",
                "yes" if f.get("repaired") else "no",
            ]
            for name, f in findings[-_FINDINGS_SHOWN:]
        ]
        out += "\n\nFINDINGS (newest last):\n" + render_table(
            ["POOL", "VOLUME", "CHUNK", "BLOCKS", "KIND", "BAD ON SDS", "REPAIRED"],
            frows,
            right={"VOLUME", "CHUNK"},
        )
    return out


def status(ctx: Context, args: Namespace) -> None:
    doc = watch(ctx, args.max_wait, args.interval) if args.watch else ctx.client.get(PATH)
    ctx.emit(doc, lambda: _human(doc))


def _act(ctx: Context, ref: str, verb: str) -> None:
    pool = ctx.names.pool(ref)
    doc = ctx.client.post(f"/api/v1/pools/{pool['id']}/scrub/{verb}", {})
    ctx.emit(doc, lambda: f"scrub of pool {doc['name']}: {doc['state']} (pass {doc['pass']})")


def start(ctx: Context, args: Namespace) -> None:
    _act(ctx, args.pool, "start")


def pause(ctx: Context, args: Namespace) -> None:
    _act(ctx, args.pool, "pause")
