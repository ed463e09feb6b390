"""``meshctl sds join-token ...`` and ``meshctl sds approve|reject``: who may add an SDS.

A new SDS registers with a join token an admin made, or by a certificate of its own
name; one that has neither is held as a request to join, ``pending``, until an admin
approves or rejects it (docs/security.md, "Joining the cluster").
"""

from __future__ import annotations

import argparse
import re
from argparse import Namespace

from meshblock.cli.client import JsonObject
from meshblock.cli.context import Context
from meshblock.cli.names import find
from meshblock.cli.output import render_table, size, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

TOKENS = "/api/v1/sds/join-tokens"
REQUESTS = "/api/v1/sds/join-requests"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*([0-9]+)\s*([smhd]?)\s*$")
MAX_TTL_S = 365 * 86400


def duration(text: str) -> int:
    """Seconds, from ``90``, ``90s``, ``30m``, ``24h`` or ``7d`` (at most a year)."""
    m = _DURATION.match(text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 30m, 24h, 7d): {text!r}")
    seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not 0 < seconds <= MAX_TTL_S:
        raise argparse.ArgumentTypeError(f"must be between 1s and 365d: {text!r}")
    return seconds


def register(sub: Subparsers) -> None:
    """The commands, under ``meshctl sds``."""
    tok = add_noun(
        sub, "join-token", "make, list and delete the join tokens new SDSs register with"
    )
    p = add_command(
        tok,
        "create",
        token_create,
        help="make a join token",
        description="""
            Prints the token (ID.SECRET) once: the MDM keeps only a hash of its
            secret. Put it in each new SDS's sds.toml (join_token, or join_token_file
            for a file that holds it). Each SDS that joins with it takes one use; it
            stops working when its uses are taken or its time to live is over, and
            an SDS already registered needs none. An SDS with a certificate of its
            own name (sds:NAME) joins without a token.""",
        examples=[
            "meshctl sds join-token create",
            "meshctl sds join-token create --uses 1000 --ttl 2h --description 'rack 12'",
            "meshctl sds join-token create --json | jq -r .token > join.token",
        ],
    )
    p.add_argument(
        "--ttl",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long it works: 90s, 30m, 24h, 7d (default 24h, at most 365d)",
    )
    p.add_argument(
        "--uses",
        type=_uses,
        default=None,
        metavar="N",
        help="how many new SDSs may join with it (default 1)",
    )
    p.add_argument("--description", help="what it is for (shown by list)")

    add_command(
        tok,
        "list",
        token_list,
        help="list join tokens: id, uses, expiry, state (never their secrets)",
        examples=["meshctl sds join-token list", "meshctl sds join-token list --json"],
        aliases=["ls"],
    )
    p = add_command(
        tok,
        "delete",
        token_delete,
        help="delete a join token: no SDS joins with it any more",
        description="SDSs that joined with it stay. Exit 4 when there is no such token.",
        examples=["meshctl sds join-token delete 3f9k2a"],
        aliases=["rm"],
    )
    p.add_argument("token_id", metavar="TOKEN_ID", help="the token's id (the part before the dot)")

    p = add_command(
        sub,
        "approve",
        approve,
        help="let a pending SDS join",
        description="""
            An SDS that registered without a join token or a certificate of its
            name is listed by 'meshctl sds list' as pending, with the address it
            asked from; it is placed on nothing meanwhile. Once approved, its next
            registration from that address and data port creates it (the SDS asks
            again every few seconds) and its devices take PGs. Exit 4 when no such
            SDS is pending, 5 when it was rejected.""",
        examples=["meshctl sds approve sds7"],
    )
    p.add_argument("name", help="name of the pending SDS")
    p = add_command(
        sub,
        "reject",
        reject,
        help="refuse a pending SDS",
        description="""
            Its registrations are refused (403) from then on. 'meshctl sds remove
            NAME' deletes the request, after which it may ask again.""",
        examples=["meshctl sds reject evil", "meshctl sds remove evil"],
    )
    p.add_argument("name", help="name of the pending SDS")


def _uses(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000: {value}")
    return value


def token_create(ctx: Context, args: Namespace) -> None:
    body: JsonObject = {}
    if args.ttl is not None:
        body["ttl_s"] = args.ttl
    if args.uses is not None:
        body["uses"] = args.uses
    if args.description:
        body["description"] = args.description
    doc = ctx.client.post(TOKENS, body)
    ctx.done(
        f"{doc['token']}\n(join token {doc['token_id']}: {doc['max_uses']} use(s) until "
        f"{timestamp(doc['expires_at'])}; it is not shown again)",
        doc,
    )


def token_list(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get(TOKENS)

    def human() -> str:
        return render_table(
            ["ID", "STATE", "USES", "EXPIRES", "LAST USED BY", "DESCRIPTION"],
            [
                [
                    t["token_id"],
                    t["state"],
                    f"{t['uses']}/{t['max_uses']}",
                    timestamp(t.get("expires_at")),
                    t.get("last_used_by"),
                    t.get("description"),
                ]
                for t in doc["join_tokens"]
            ],
            empty="no join tokens",
        )

    ctx.emit(doc, human)


def token_delete(ctx: Context, args: Namespace) -> None:
    tokens = ctx.client.get(TOKENS)["join_tokens"]
    ref = args.token_id
    token = find(tokens, ref, "join token", also=lambda t: t["token_id"] == ref)
    ctx.client.delete(f"{TOKENS}/{token['id']}")
    ctx.done(f"deleted join token {token['token_id']}")


def requests(ctx: Context) -> list[JsonObject]:
    """The SDSs that asked to join without a token (pending, approved, rejected)."""
    return list(ctx.client.get(REQUESTS)["join_requests"])


def find_request(ctx: Context, name: str) -> JsonObject:
    return find(requests(ctx), name, "SDS waiting to join")


def approve(ctx: Context, args: Namespace) -> None:
    req = find_request(ctx, args.name)
    doc = ctx.client.post(f"{REQUESTS}/{req['id']}/approve", {})
    ctx.done(
        f"approved SDS {req['name']!r} at {req['address']}:{req['data_port']}; it joins at "
        "its next registration",
        doc,
    )


def reject(ctx: Context, args: Namespace) -> None:
    req = find_request(ctx, args.name)
    doc = ctx.client.post(f"{REQUESTS}/{req['id']}/reject", {})
    ctx.done(f"rejected SDS {req['name']!r}; 'meshctl sds remove' deletes the request", doc)


def delete_request(ctx: Context, req: JsonObject) -> None:
    ctx.client.delete(f"{REQUESTS}/{req['id']}")
    ctx.done(f"deleted the {req['state']} request to join of SDS {req['name']!r}")


def requests_table(reqs: list[JsonObject]) -> str:
    """The requests to join, for ``meshctl sds list``."""
    return render_table(
        ["NAME", "STATE", "PD", "ADDRESS", "DEVICES", "CAPACITY", "ASKED BY", "LAST SEEN"],
        [
            [
                r["name"],
                r["state"],
                r["protection_domain"],
                f"{r['address']}:{r['data_port']}",
                r["devices"],
                size(r["capacity_bytes"]),
                f"{r['caller']} from {r.get('remote') or '?'}",
                timestamp(r.get("last_seen")),
            ]
            for r in reqs
        ],
        right={"DEVICES", "CAPACITY"},
    )
