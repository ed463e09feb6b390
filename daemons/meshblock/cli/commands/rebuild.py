"""``meshctl rebuild``: rebuild, resync and rebalance progress per storage pool."""

from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

from meshblock.cli.context import Context
from meshblock.cli.errors import CliError
from meshblock.cli.output import rate, render_table, size
from meshblock.cli.parser import Subparsers, add_command, add_noun, add_watch_options
from meshblock.cli.progress import ProgressBar, eta_text, seconds_text

PATH = "/api/v1/rebuild"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "rebuild", "follow rebuild, resync and rebalance progress")
    p = add_command(
        sub,
        "status",
        status,
        help="show rebuild and rebalance progress per storage pool",
        description="""
            Per storage pool: PGs by state (clean, degraded, rebuilding, resyncing,
            inactive), PG copies being moved by rebalance, and for rebuilds (with
            resyncs) and rebalance the bytes left to copy, the copy rate over the
            last 30 s and an ETA. A pool whose rebuild waits out rebuild_delay_s (a
            lost SDS that may come back) gets a line under the table saying when the
            rebuild starts. With --watch, a progress bar on standard error until no
            copy is left (or --max-wait), then the table.""",
        examples=[
            "meshctl rebuild status",
            "meshctl rebuild status --watch",
            "meshctl --json rebuild status",
        ],
    )
    add_watch_options(p, "wait until every copy is done")


def busy(pool: dict[str, Any]) -> bool:
    pgs = pool["pgs"]
    return bool(
        pgs.get("rebuilding")
        or pgs.get("resyncing")
        or pgs.get("degraded")
        or pgs.get("inactive")
        or pool.get("pgs_moving")
    )


def delay_left(pool: dict[str, Any]) -> float | None:
    """Seconds until the pool's rebuild starts, while the MDM waits out
    ``rebuild_delay_s`` for a lost SDS holding its data; ``None`` otherwise (and from an
    MDM that does not say)."""
    left = pool.get("rebuild_delay_left_s")
    if isinstance(left, int | float) and not isinstance(left, bool):
        return float(left)
    return None


def _waiting(pools: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(pool name, ``12 s``) per pool whose rebuild waits out rebuild_delay_s."""
    return [(p["name"], seconds_text(left)) for p in pools if (left := delay_left(p)) is not None]


def waiting_notes(pools: list[dict[str, Any]]) -> list[str]:
    """``sp1: waiting out rebuild_delay_s: starts in 12 s ...`` per waiting pool."""
    return [
        f"{name}: waiting out rebuild_delay_s: starts in {left} unless the lost SDS comes back"
        for name, left in _waiting(pools)
    ]


def watch(ctx: Context, timeout: float | None, interval: float) -> dict[str, Any]:
    bar = ProgressBar("rebuild")
    start = time.monotonic()
    first_left: int | None = None
    try:
        while True:
            doc: dict[str, Any] = ctx.client.get(PATH)
            pools = doc["pools"]
            pending = sum(
                p["pgs"].get("rebuilding", 0)
                + p["pgs"].get("resyncing", 0)
                + p["pgs"].get("degraded", 0)
                + p["pgs"].get("inactive", 0)
                + p.get("pgs_moving", 0)
                for p in pools
            )
            if first_left is None or pending > first_left:
                first_left = pending
            remaining = sum(
                p[k]["remaining_bytes"] for p in pools for k in ("rebuild", "rebalance")
            )
            speed = sum(p[k]["rate_bytes_per_s"] for p in pools for k in ("rebuild", "rebalance"))
            eta = remaining / speed if speed > 0 and remaining else None
            done = 1.0 - (pending / first_left if first_left else 0.0)
            waits = [
                f"{name} waiting out rebuild_delay_s: starts in {left}"
                for name, left in _waiting(pools)
            ]
            bar.update(
                done,
                f"{pending} PG(s) left, {size(remaining)} to copy at {rate(speed)}, "
                + eta_text(eta)
                + "".join(f"; {w}" for w in waits),
            )
            if not any(busy(p) for p in pools):
                return doc
            if timeout is not None and time.monotonic() - start > timeout:
                raise CliError(f"rebuild not finished after {timeout:g} s: {pending} PG(s) left")
            time.sleep(interval)
    finally:
        bar.close()


def status(ctx: Context, args: Namespace) -> None:
    doc = watch(ctx, args.max_wait, args.interval) if args.watch else ctx.client.get(PATH)

    def human() -> str:
        rows = []
        for p in doc["pools"]:
            pgs = p["pgs"]
            for kind in ("rebuild", "rebalance"):
                k = p[kind]
                rows.append(
                    [
                        p["name"],
                        p["protection_domain"],
                        kind,
                        pgs.get("clean", 0),
                        pgs.get("degraded", 0),
                        pgs.get("rebuilding", 0) + pgs.get("resyncing", 0)
                        if kind == "rebuild"
                        else p.get("pgs_moving", 0),
                        pgs.get("inactive", 0),
                        size(k["remaining_bytes"]),
                        rate(k["rate_bytes_per_s"]),
                        eta_text(k["eta_s"]).removeprefix("ETA ") if k["active"] else "-",
                    ]
                )
        table = render_table(
            ["POOL", "PD", "KIND", "CLEAN", "DEGRADED", "COPYING", "INACTIVE", "LEFT", "RATE",
             "ETA"],
            rows,
            right={"CLEAN", "DEGRADED", "COPYING", "INACTIVE", "LEFT", "RATE"},
            empty="no storage pools",
        )  # fmt: skip
        return "\n".join([table, *waiting_notes(doc["pools"])])

    ctx.emit(doc, human)
