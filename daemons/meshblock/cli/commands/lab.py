"""``meshctl lab``: a whole cluster on this machine (``meshblock.cli.lab``, docs/lab.md).

Unlike the other nouns it does not talk to an MDM that already runs: it starts one,
with the SDSs and the SDC, and builds the topology through its API. Progress lines go
to stderr, the result to stdout (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

from meshblock.cli import lab, values
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, Conflict, ExitCode, InvalidInput
from meshblock.cli.output import render_table, to_json
from meshblock.cli.parser import Subparsers, add_command, add_noun
from meshblock.sizes import format_size

_DIR_HELP = f"the lab's directory (default ${lab.DIR_ENV}, else ./{lab.DEFAULT_DIR})"


def register(root: Subparsers) -> None:
    sub = add_noun(root, "lab", "run a whole cluster on this machine, for trying meshblock out")

    p = add_command(
        sub,
        "up",
        up,
        help="start an MDM, three SDSs and an SDC on loopback with a volume mapped",
        description=f"""
            Starts the daemons as detached processes (logs in DIR/logs/), creates
            protection domain {lab.PROTECTION_DOMAIN}, fault sets fs1..fs3 and pool {lab.POOL}, lets
            the SDSs register (three sparse file devices under DIR/data/), creates
            volume {lab.VOLUME} and maps it to the SDC, waits until the SDC serves it,
            and prints its NBD URIs. Refused (exit 5) while a lab runs in DIR;
            --force stops it and starts afresh. A lab that 'lab down' stopped is
            started again with its data. Ports: MDM 6611, SDSs 7072/7073, 7082/7083,
            7092/7093, SDC 7074 and NBD 10809; --base-port N (or $MESHBLOCK_BASE_PORT)
            uses N..N+8 instead.""",
        examples=[
            "meshctl lab up",
            "meshctl lab up --dir /tmp/lab --base-port 20000 --volume-size 8GiB",
            "meshctl lab up --force",
        ],
    )
    _dir_option(p)
    p.add_argument(
        "--volume-size",
        type=values.size,
        default=lab.DEFAULT_VOLUME_SIZE,
        metavar="SIZE",
        help=f"size of {lab.VOLUME} (default {format_size(lab.DEFAULT_VOLUME_SIZE)})",
    )
    p.add_argument(
        "--device-size",
        type=values.size,
        default=lab.DEFAULT_DEVICE_SIZE,
        metavar="SIZE",
        help="capacity of each SDS's sparse device file "
        f"(default {format_size(lab.DEFAULT_DEVICE_SIZE)})",
    )
    p.add_argument(
        "--base-port",
        type=values.port,
        metavar="N",
        help=f"use ports N..N+8 (default ${lab.BASE_PORT_ENV}, else the standard ports)",
    )
    p.add_argument("--force", action="store_true", help="stop a running lab and start afresh")

    p = add_command(
        sub,
        "status",
        status,
        help="show each process of the lab: pid, alive, ports, health",
        description="Exits 1 when a process is not running or not healthy, 4 without a lab.",
        examples=["meshctl lab status", "meshctl lab status --json"],
    )
    _dir_option(p)

    p = add_command(
        sub,
        "down",
        down,
        help="stop the lab's processes (SIGTERM, then SIGKILL)",
        description="""
            The data directory stays, so 'lab up' starts the same cluster again;
            --purge removes it. Nothing running is not an error.""",
        examples=["meshctl lab down", "meshctl lab down --purge"],
    )
    _dir_option(p)
    p.add_argument("--purge", action="store_true", help="also remove the lab's directory")
    p.add_argument(
        "--kill-after",
        type=float,
        default=lab.STOP_TIMEOUT_S,
        metavar="SECONDS",
        help=f"SIGKILL what still runs this long after SIGTERM (default {lab.STOP_TIMEOUT_S:g})",
    )


def _dir_option(p: Any) -> None:
    p.add_argument("--dir", type=Path, metavar="DIR", help=_DIR_HELP)


def _lab(args: Namespace) -> lab.Lab:
    return lab.Lab(args.dir if args.dir is not None else lab.default_dir())


def _base_port(ctx: Context, args: Namespace) -> int | None:
    """``--base-port``, else ``$MESHBLOCK_BASE_PORT`` (README, docs/lab.md), else None:
    the standard ports."""
    if args.base_port is not None:
        return int(args.base_port)
    text = ctx.env.get(lab.BASE_PORT_ENV, "").strip()
    if not text:
        return None
    try:
        return values.port(text)
    except argparse.ArgumentTypeError as exc:
        raise InvalidInput(f"{lab.BASE_PORT_ENV}={text!r}: {exc}") from None


def _progress(line: str) -> None:
    print(f"==> {line}", file=sys.stderr, flush=True)


def _dir_flag(the_lab: lab.Lab) -> str:
    """``--dir DIR`` for the hints we print, unless DIR is the default."""
    default = Path(os.path.abspath(lab.default_dir()))
    return "" if the_lab.root == default else f" --dir {the_lab.root}"


def up(ctx: Context, args: Namespace) -> None:
    the_lab = _lab(args)
    try:
        doc = the_lab.up(
            volume_size=args.volume_size,
            device_size=args.device_size,
            base_port=_base_port(ctx, args),
            force=args.force,
            progress=_progress,
        )
    except lab.LabRunning as exc:
        raise Conflict(str(exc)) from None
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    ctx.emit(doc, lambda: _up_text(the_lab, doc))


def _up_text(the_lab: lab.Lab, doc: dict[str, Any]) -> str:
    tcp, unix = doc["nbd"]["tcp"], doc["nbd"]["unix"]
    vol = doc["volume"]
    name = vol["name"]
    flag = _dir_flag(the_lab)
    logs = ", ".join(f"{p['name']}.log" for p in doc["processes"])
    tls = _tls_text(doc) + _mgmt_text(doc)
    return f"""
The lab is up in {doc["dir"]}.

Volume {name} ({format_size(vol["size_bytes"])}, thin, two copies) is served over NBD:
  {tcp}
  {unix}

Use it with any NBD client, e.g.:
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{unix}'
  nbdinfo '{tcp}'
  nbdcopy disk.img '{tcp}'
  nbdcopy '{unix}' copy.img
  qemu-img convert -n -O raw disk.qcow2 '{unix}'

meshctl against the lab:  . {doc["env"]}
  meshctl topology; meshctl volume verify {name}   # are both copies of every chunk equal?{tls}
Logs:    {doc["logs"]}/ ({logs})
Status:  meshctl lab status{flag}
Stop:    meshctl lab down{flag}   (add --purge to remove the data)""".lstrip("\n")


def _tls_text(doc: dict[str, Any]) -> str:
    tls = doc.get("tls")
    if not tls:
        return ""
    return (
        "\nControl plane: HTTPS, every daemon and meshctl with a certificate of its own\n"
        f"  (the CA in {tls['ca']}, the certificates in {tls['certificates']})"
    )


def _mgmt_text(doc: dict[str, Any]) -> str:
    mgmt = doc.get("mgmt")
    if not mgmt:
        return ""
    cfg = mgmt["config"]
    return (
        "\nMGMT (the lab runs none), its cluster pages able to change the cluster:\n"
        f"  meshblock-mgmt --config {cfg} user add admin --role admin --password-file FILE\n"
        f"  meshblock-mgmt --config {cfg}   # then {mgmt['url']} (trust the lab's CA)"
    )


def status(ctx: Context, args: Namespace) -> int:
    the_lab = _lab(args)
    try:
        doc = the_lab.status()
    except lab.NoLab as exc:
        if ctx.json:
            ctx.write(to_json({"dir": str(the_lab.root), "up": False, "processes": []}))
        raise _NoLab(str(exc)) from None
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    ctx.emit(doc, lambda: _status_text(doc))
    return int(ExitCode.OK if doc["up"] else ExitCode.ERROR)


class _NoLab(CliError):
    exit_code = ExitCode.NOT_FOUND


def _status_text(doc: dict[str, Any]) -> str:
    rows = []
    for p in doc["processes"]:
        ports = ", ".join(f"{k} {v}" for k, v in p["ports"].items())
        rows.append([p["name"], p["pid"], "yes" if p["alive"] else "NO", ports, p["health"]])
    table = render_table(["NAME", "PID", "ALIVE", "PORTS", "HEALTH"], rows, right={"PID"})
    down = [p["name"] for p in doc["processes"] if not p["alive"]]
    sick = [
        p["name"] for p in doc["processes"] if p["alive"] and p["health"] not in ("ok", "serving")
    ]
    if doc["up"]:
        head = f"lab in {doc['dir']}: up"
    else:
        parts = ([f"not running: {', '.join(down)}"] if down else []) + (
            [f"unhealthy: {', '.join(sick)}"] if sick else []
        )
        head = f"lab in {doc['dir']}: DOWN ({'; '.join(parts)})"
    nbd = f"NBD: {doc['nbd']['tcp']}  {doc['nbd']['unix']}"
    return f"{head}\n\n{table}\n\n{nbd}"


def down(ctx: Context, args: Namespace) -> None:
    the_lab = _lab(args)
    if args.kill_after <= 0:
        raise InvalidInput("--kill-after must be positive")
    try:
        doc = the_lab.down(purge=args.purge, timeout=args.kill_after, progress=_progress)
    except lab.NoLab:
        ctx.done(
            f"no lab in {the_lab.root}: nothing to stop",
            {"dir": str(the_lab.root), "stopped": {}, "purged": False},
        )
        return
    except lab.LabError as exc:
        raise CliError(str(exc)) from None
    stopped = doc["stopped"]
    if stopped:
        killed = [n for n, how in stopped.items() if how == "killed"]
        text = f"stopped {', '.join(stopped)}" + (
            f" (SIGKILL: {', '.join(killed)})" if killed else ""
        )
    else:
        text = "nothing was running"
    if doc["purged"]:
        text += f"; removed {doc['dir']}"
    else:
        text += f"; the data stays in {doc['dir']} ('meshctl lab up' starts it again)"
    ctx.done(text, doc)
