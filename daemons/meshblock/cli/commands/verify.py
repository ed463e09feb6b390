"""``meshctl volume verify``: are both copies of every chunk of a volume identical?

The checking is :mod:`meshblock.tools.replica_check`; this module finds the volume
and its pool's PG map through the MDM, reads the cluster secret, draws a progress bar
on a terminal and prints the report.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from meshblock import pki
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, ExitCode, UsageError
from meshblock.cli.output import render_table
from meshblock.cli.parser import Subparsers, add_command
from meshblock.config import ConfigError, read_secret_file
from meshblock.pgmap_doc import PgMapError
from meshblock.tools.replica_check import Report, check_volume
from meshblock.wire import tls as wire_tls
from meshblock.wire.handshake import HandshakeError
from meshblock.wire.protocol import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION

SECRET_FILE_ENV = "MESHBLOCK_CLUSTER_SECRET_FILE"
SECRET_ENV = "MESHBLOCK_CLUSTER_SECRET"
_SHOWN = 20  # differing / unchecked chunks listed in the human output


def register(sub: Subparsers) -> None:
    """Adds ``verify`` to ``meshctl volume``."""
    p = add_command(
        sub,
        "verify",
        verify,
        help="check that both copies of every chunk of a volume are identical",
        description=f"""
            Reads every chunk of the volume from the PG's primary and from its
            secondary SDS (the data protocol, as a tool, with the cluster secret) and
            compares them (PGs that are not clean are reported, not compared: their
            secondary is stale). Exits 0 when all compared copies are identical, 1 when some differ
            or could not be read. A chunk that differs is read again before it is
            reported, but for a clean proof run it while nobody writes the volume.
            Each chunk's block checksums are compared first: a 4 KiB block that does
            not match its checksum on one copy is reported with the copy that is right
            (and the chunk's bytes are not read, which would repair it); with
            --repair the SDS of the bad copy rewrites it from the right one. Copies
            that differ while each matches its own checksums are reported
            "divergent": which is right is not known (docs/mdm.md, Scrub).
            The cluster secret comes from --secret-file, ${SECRET_FILE_ENV} or
            ${SECRET_ENV} (the lab's env file sets the first).""",
        examples=[
            "meshctl volume verify vol1",
            "meshctl volume verify vol1 --secret-file /etc/meshblock/cluster.secret --json",
            "meshctl volume verify vol1 --repair",
        ],
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="rewrite blocks that do not match their checksums from the right copy",
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument(
        "--secret-file",
        type=Path,
        metavar="PATH",
        help=f"file holding the cluster secret (default ${SECRET_FILE_ENV})",
    )
    p.add_argument(
        "--concurrency", type=int, default=16, metavar="N", help="chunks compared at once"
    )
    p.add_argument(
        "--wire-min-version",
        type=int,
        choices=range(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 1),
        default=MIN_PROTOCOL_VERSION,
        metavar="N",
        help="the lowest data protocol version spoken to the SDSs (docs/protocol.md)",
    )


def cluster_secret(flag: Path | None, env: Mapping[str, str] = os.environ) -> str:
    path = flag or (Path(env[SECRET_FILE_ENV]) if env.get(SECRET_FILE_ENV) else None)
    if path is not None:
        try:
            return read_secret_file(path, "the cluster secret file")
        except ConfigError as exc:
            raise CliError(str(exc)) from None
    if env.get(SECRET_ENV):
        return env[SECRET_ENV]
    raise UsageError(
        f"the cluster secret is needed: give --secret-file PATH or set {SECRET_FILE_ENV}"
    )


class ProgressBar:
    """``verify vol1 [#######.........]  1234/4096 chunks  30%`` on a terminal."""

    WIDTH = 30

    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.enabled = out.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (done < total and now - self._last < 0.1):
            return
        self._last = now
        filled = self.WIDTH * done // max(total, 1)
        pct = 100 * done // max(total, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.out.write(f"\r{self.label} [{bar}] {done}/{total} chunks {pct:3d}%")
        if done >= total:
            self.out.write("\n")
        self.out.flush()


def verify(ctx: Context, args: Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    secret = cluster_secret(args.secret_file)
    vol = ctx.names.volume(args.name)
    pgmap = ctx.client.get(f"/api/v1/pools/{vol['pool_id']}/pgmap")
    names = {int(s["id"]): str(s["name"]) for s in ctx.names.sds_list()}
    bar = ProgressBar(f"verify {vol['name']}", sys.stderr)
    try:
        report = asyncio.run(
            check_volume(
                vol,
                pgmap,
                secret,
                sds_names=names,
                concurrency=args.concurrency,
                progress=bar,
                wire_min_version=args.wire_min_version,
                tls=_data_tls(ctx),
                repair=args.repair,
            )
        )
    except PgMapError as exc:
        raise CliError(f"the MDM sent an unusable PG map: {exc}") from None
    except HandshakeError as exc:  # the secret, or --wire-min-version above an SDS's
        raise CliError(f"an SDS refused the data protocol's handshake: {exc}") from None
    ctx.emit(report.to_json(), lambda: _text(report))
    return int(ExitCode.OK if report.ok else ExitCode.ERROR)


def _data_tls(ctx: Context) -> ssl.SSLContext | None:
    """The SDSs' data ports are dialled over TLS with the admin certificate
    (MESHCTL_TLS_CERT), in plain TCP without one."""
    s = ctx.settings
    if s.tls_ca is None or s.tls_cert is None or s.tls_key is None:
        return None
    try:
        return wire_tls.dial_context(s.tls_ca, s.tls_cert, s.tls_key)
    except pki.PkiError as exc:
        raise CliError(str(exc)) from None


def _text(r: Report) -> str:
    lines = [
        f"volume {r.volume_name}: {r.chunks} chunks, {r.identical} identical on both copies "
        f"({r.stored_on_both} stored, {r.stored_on_neither} never written or trimmed)"
    ]
    if r.allocation_mismatches:
        lines.append(
            f"{len(r.allocation_mismatches)} chunk(s) stored on one copy only, zeroes on "
            "the other (same bytes)"
        )
    if r.differences:
        lines += ["", f"DIFFERENT: {len(r.differences)} chunk(s) whose copies differ:"]
        rows: list[list[Any]] = [
            [d.chunk, d.pg, d.primary, d.secondary, d.offset, d.differing_bytes, d.judged or "-"]
            for d in sorted(r.differences, key=lambda d: d.chunk)[:_SHOWN]
        ]
        lines.append(
            render_table(
                [
                    "CHUNK",
                    "PG",
                    "PRIMARY",
                    "SECONDARY",
                    "FIRST DIFF AT",
                    "BYTES DIFFER",
                    "CHECKSUMS",
                ],
                rows,
                right={"CHUNK", "PG", "FIRST DIFF AT", "BYTES DIFFER"},
            )
        )
        if any(d.judged == "divergent" for d in r.differences):
            lines.append(
                "divergent: each copy matches its own checksums, so which is right is not "
                "known; clients read the primary's (docs/mdm.md, Scrub)"
            )
    if r.bad_blocks:
        left = [b for b in r.bad_blocks if not b.repaired]
        lines += [
            "",
            f"BAD BLOCKS: {sum(len(b.blocks) for b in r.bad_blocks)} block(s) in "
            f"{len(r.bad_blocks)} copy(ies) of chunks do not match their checksums"
            + (f", {sum(len(b.blocks) for b in left)} not repaired" if left else ", repaired"),
        ]
        rows = [
            [b.chunk, b.pg, ",".join(map(str, b.blocks)), b.bad, b.right or "none",
             "yes" if b.repaired else "no"]
            for b in sorted(r.bad_blocks, key=lambda b: b.chunk)[:_SHOWN]
        ]  # fmt: skip
        lines.append(
            render_table(
                ["CHUNK", "PG", "BLOCKS", "BAD COPY", "RIGHT COPY", "REPAIRED"],
                rows,
                right={"CHUNK", "PG"},
            )
        )
        if left and any(b.right for b in left):
            lines.append("run with --repair to rewrite them from the right copy")
    if r.unchecked:
        lines += ["", f"UNCHECKED: {len(r.unchecked)} chunk(s) could not be compared:"]
        rows = [[u.chunk, u.pg, u.reason] for u in sorted(r.unchecked, key=lambda u: u.chunk)]
        lines.append(render_table(["CHUNK", "PG", "REASON"], rows[:_SHOWN], right={"CHUNK", "PG"}))
    if r.degraded_pgs or r.inactive_pgs:
        lines += [
            "",
            f"NOT REDUNDANT: {len(r.degraded_pgs)} degraded and {len(r.inactive_pgs)} inactive "
            f"PG(s) in the pool; {r.skipped_degraded + r.skipped_inactive} chunk(s) of this "
            "volume in them were not compared (a stale copy waits for a resync)",
        ]
    if r.fully_redundant:
        lines.append("all copies identical")
    elif r.ok:
        lines.append("every in-sync copy identical")
    return "\n".join(lines)
