"""What a stop or a change would do: ``meshctl sds ok-to-stop`` and the ``--dry-run``
output of ``sds maintenance``, ``sds remove`` and ``pool set`` (the MDM computes both:
docs/api.md, "Ok to stop" and "Dry runs")."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from meshblock.cli.client import JsonObject
from meshblock.cli.context import Context
from meshblock.cli.errors import ExitCode, NotFound, UsageError
from meshblock.cli.output import render_table, size
from meshblock.cli.parser import Subparsers, add_command

OK_TO_STOP = "/api/v1/sds/ok-to-stop"
SHOWN = 20  # PGs listed in the human output (--json has the MDM's first 100)

DRY_RUN_HELP = (
    "print what would change (PGs left with one copy, bytes to copy, estimated time "
    "at the pool's throttle) and change nothing; the MDM answers from the same "
    "checks, so a change it would refuse is refused here too"
)


def register(sub: Subparsers) -> None:
    p = add_command(
        sub,
        "ok-to-stop",
        ok_to_stop,
        help="whether stopping these SDSs together leaves every PG with a copy",
        description="""
            Asks the MDM whether the named SDSs may be stopped together (for an
            upgrade, a reboot, a config change) without a PG losing its last
            up-to-date copy. A clean PG has two; a degraded, resyncing or rebuilding
            one has one (its primary); a copy on an SDS that is already down or in
            maintenance, or on a failed device, does not count. Exit 0 when safe:
            every PG with a copy on them keeps one (those left with a single copy
            are listed: one more failure makes them unavailable). Exit 8 when not:
            the PGs that would have no copy, and the volumes with data in them, are
            listed. --fault-set adds every SDS of a fault set (copies of a PG are
            in two fault sets, so one fault set may stop when every PG is clean).
            The answer holds for the moment it is given: a playbook asks again
            before each stop. Read-only (the read-only token may ask).""",
        examples=[
            "meshctl sds ok-to-stop sds2",
            "meshctl sds ok-to-stop sds2 sds3",
            "meshctl sds ok-to-stop --fault-set fs1",
            "meshctl sds ok-to-stop sds2 --json   # exit 0 safe, 8 not safe",
        ],
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="SDS name (or id)")
    p.add_argument(
        "--fault-set",
        dest="fault_sets",
        action="append",
        default=[],
        metavar="FS",
        help="every SDS of this fault set too; repeat for several",
    )
    p.add_argument("--pd", metavar="PD", help="the protection domain of --fault-set, if ambiguous")


def ok_to_stop(ctx: Context, args: Namespace) -> int:
    names = [ctx.names.sds(n)["name"] for n in args.names]  # unknown names: exit 4
    for ref in args.fault_sets:
        fs = ctx.names.fault_set(ref, args.pd)
        members = [s["name"] for s in ctx.names.sds_list() if s.get("fault_set_id") == fs["id"]]
        if not members:
            raise NotFound(f"fault set {fs['name']!r} has no SDS")
        names += members
    names = list(dict.fromkeys(names))
    if not names:
        raise UsageError("name at least one SDS, or --fault-set (see --help)")
    doc = ctx.client.get(OK_TO_STOP, {"names": ",".join(names)})
    ctx.emit(doc, lambda: render_stop(doc))
    return ExitCode.OK if doc.get("safe") else ExitCode.NOT_SAFE


def render_stop(doc: JsonObject) -> str:
    who = ", ".join(_who(s) for s in doc.get("sds", []))
    lost = doc.get("unavailable") or {}
    if doc.get("safe"):
        head = f"safe to stop {who}: every PG with a copy on them keeps an up-to-date copy"
    else:
        head = (
            f"NOT safe to stop {who}: {lost.get('count', 0)} PG(s) would have no "
            "up-to-date copy (their IO would wait)"
        )
    parts = [head, *_impact(doc)]
    if doc.get("pgs_with_copy_not_clean"):
        parts.append(
            f"{doc['pgs_with_copy_not_clean']} PG(s) with a copy on them not clean "
            "(a resync or rebuild is under way)"
        )
    already = [
        f"{doc[k]} PG(s) {what}"
        for k, what in (
            ("already_unavailable", "elsewhere have no up-to-date copy already"),
            ("already_single_copy", "elsewhere have one copy already"),
        )
        if doc.get(k)
    ]
    if already:
        parts.append("; ".join(already))
    return "\n".join(parts)


def _who(sds: JsonObject) -> str:
    notes = [str(sds[k]) for k in ("state", "mode") if sds.get(k) not in ("connected", "normal")]
    return f"{sds['name']} ({', '.join(notes)})" if notes else str(sds["name"])


def _impact(doc: JsonObject) -> list[str]:
    """The PGs left with no copy and with one, and their volumes."""
    out = []
    for key, vkey, what in (
        ("unavailable", "volumes_unavailable", "with no up-to-date copy"),
        ("single_copy", "volumes_single_copy", "left with a single copy"),
    ):
        group = doc.get(key) or {}
        count = int(group.get("count") or 0)
        if not count:
            continue
        pgs = group.get("pgs") or []
        listed = " ".join(
            f"{g['pool']}/{g['pg']}{'*' if g.get('already') else ''}" for g in pgs[:SHOWN]
        )
        more = f" (+{count - min(len(pgs), SHOWN)} more)" if count > min(len(pgs), SHOWN) else ""
        out.append(f"{count} PG(s) {what}: {listed}{more}")
        volumes = doc.get(vkey) or []
        if volumes:
            out.append(f"  volumes with data in them: {', '.join(volumes)}")
    if any(g.get("already") for k in ("unavailable", "single_copy") for g in _pgs(doc, k)):
        out.append("  (* as many copies before the stop)")
    return out


def _pgs(doc: JsonObject, key: str) -> list[JsonObject]:
    return list((doc.get(key) or {}).get("pgs") or [])


def dry_run(ctx: Context, method: str, path: str, body: JsonObject | None = None) -> None:
    """Send the change with ``?dry_run=true`` and print the MDM's plan."""
    plan = ctx.client.request(method, path, query={"dry_run": "true"}, body=body)
    ctx.emit(plan, lambda: render_plan(plan))


ACTIONS = {
    "maintenance_enter": "enter maintenance",
    "maintenance_exit": "exit maintenance",
    "drain": "drain",
    "drain_cancel": "cancel the drain of",
    "remove": "remove",
    "pool_update": "change pool",
}


def render_plan(plan: JsonObject) -> str:
    action = ACTIONS.get(str(plan.get("action")), str(plan.get("action")))
    lines = [f"dry run: {action} {plan.get('target')}; nothing was changed"]
    for name, change in (plan.get("changes") or {}).items():
        lines.append(f"  {name}: {change.get('from')} -> {change.get('to')}")
    impact = _impact(plan)
    lines += impact or ["no PG is left with fewer than two copies by it"]
    lines.append(
        f"bytes to copy: {_bytes(plan.get('bytes_to_copy'))}, "
        f"estimated time: {_seconds(plan.get('estimated_seconds'))}"
    )
    pools = plan.get("pools") or []
    if pools:
        lines.append(
            render_table(
                ["POOL", "COPIES TO MOVE", "BYTES", "THROTTLE", "ESTIMATED"],
                [
                    [
                        p.get("pool"),
                        p.get("pg_copies_to_move"),
                        size(p.get("bytes_to_copy")),
                        f"{p.get('throttle')} {_rate(p.get('bandwidth_mibps'))}",
                        _seconds(p.get("estimated_seconds")),
                    ]
                    for p in pools
                ],
                right={"COPIES TO MOVE", "BYTES", "ESTIMATED"},
            )
        )
    backlog = plan.get("copies_in_progress") or []
    if any(b.get("bytes_left") for b in backlog):
        lines.append(
            render_table(
                ["IN PROGRESS", "BYTES LEFT", "NOW", "AFTER"],
                [
                    [
                        b.get("kind"),
                        size(b.get("bytes_left")),
                        _seconds(b.get("estimated_seconds_before")),
                        _seconds(b.get("estimated_seconds_after")),
                    ]
                    for b in backlog
                ],
                right={"BYTES LEFT", "NOW", "AFTER"},
            )
        )
    lines.append(f"estimate: {plan.get('estimate')}")
    return "\n".join(lines)


def _bytes(value: Any) -> str:
    return "not known in advance" if value is None else size(value)


def _rate(mibps: Any) -> str:
    return "unlimited" if not mibps else f"{mibps} MiB/s per device"


def _seconds(value: Any) -> str:
    """``0 s``, ``42 s``, ``1 h 3 min``; None: not known (an unlimited throttle)."""
    if value is None:
        return "not known (unthrottled)"
    s = round(float(value))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
