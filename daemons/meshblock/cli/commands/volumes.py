"""``meshctl volume``: volumes and their mappings to SDCs."""

from __future__ import annotations

from argparse import Namespace

from meshblock.cli import values
from meshblock.cli.client import JsonObject
from meshblock.cli.commands import verify
from meshblock.cli.context import Context
from meshblock.cli.errors import ExitCode, NotFound, UsageError
from meshblock.cli.output import rate, render_fields, render_table, size, timestamp
from meshblock.cli.parser import Subparsers, add_command, add_noun

PATH = "/api/v1/volumes"
MAPPINGS = "/api/v1/mappings"


class _NotGiven:
    """Default of options where ``none`` means "clear": tells absent from cleared."""

    def __repr__(self) -> str:
        return "not given"


NOT_GIVEN = _NotGiven()


def register(root: Subparsers) -> None:
    sub = add_noun(root, "volume", "manage volumes and their mappings to SDCs", aliases=["vol"])

    p = add_command(
        sub,
        "create",
        create,
        help="create a volume in a storage pool",
        description="""
            The size is rounded up to the pool's allocation granularity. A thin volume
            takes space as it is written; a thick one reserves twice its size (two
            copies) at once and is refused (exit 5) when the pool cannot hold it.""",
        examples=[
            "meshctl volume create vol1 --pool sp1 --size 16GiB",
            "meshctl volume create db1 --pool sp1 --size 500GB --thick",
        ],
    )
    p.add_argument("name", help="name of the new volume (unique in the cluster)")
    p.add_argument("--pool", required=True, help="storage pool (name or id)")
    p.add_argument("--size", required=True, type=values.size, help="size, e.g. 16GiB, 500GB, 1TiB")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--thin", dest="type", action="store_const", const="thin", help="thin (the default)"
    )
    kind.add_argument(
        "--thick", dest="type", action="store_const", const="thick", help="thick: reserve now"
    )
    p.set_defaults(type="thin")

    p = add_command(
        sub,
        "list",
        list_,
        help="list volumes",
        examples=["meshctl volume list", "meshctl volume list --pool sp1 --json"],
        aliases=["ls"],
    )
    p.add_argument("--pool", help="only the volumes of this pool")

    p = add_command(
        sub,
        "show",
        show,
        help="show a volume and its mappings",
        examples=["meshctl volume show vol1"],
    )
    p.add_argument("name", help="volume name (or id)")

    p = add_command(
        sub,
        "rename",
        rename,
        help="rename a volume",
        examples=["meshctl volume rename vol1 vol2"],
    )
    p.add_argument("name", help="current name (or id)")
    p.add_argument("new_name", metavar="new-name", help="new name")

    p = add_command(
        sub,
        "extend",
        extend,
        help="grow a volume",
        description="""
            Volumes only grow: a smaller size is refused (exit 5). '+SIZE' adds to
            the current size. The new size is rounded up to the pool's granularity.""",
        examples=[
            "meshctl volume extend vol1 --size 32GiB",
            "meshctl volume extend vol1 --size +8GiB",
        ],
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument(
        "--size", required=True, type=values.size_change, help="new size (32GiB) or growth (+8GiB)"
    )

    p = add_command(
        sub,
        "delete",
        delete,
        help="delete a volume and free its data",
        description="""
            Refused (exit 5) while the volume is mapped: unmap it first. When the
            command returns, the volume is in state 'deleting': its data is unreadable
            (every SDS refuses it before serving anything more of the volume), its name
            may be used again at once, and it can no longer be mapped. The SDSs then
            free its chunks in the background ('meshctl volume list' shows what is
            left; the space counts as used until freed); an SDS that is down or in
            maintenance frees its copies when it returns, before it serves anything of
            that volume. Once every SDS of the pool has freed its copies the volume
            disappears. Its id is never given to another volume.

            On a terminal meshctl asks first; --yes (-y) does not ask. When stdin is
            not a terminal (a script, a pipe) and --yes is not given, nothing is
            deleted (exit 2): a script says --yes.""",
        examples=["meshctl volume delete vol1", "meshctl volume delete vol1 --yes"],
        aliases=["remove", "rm"],
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="delete without asking (needed when stdin is not a terminal)",
    )

    p = add_command(
        sub,
        "map",
        map_,
        help="map a volume to an SDC, which then exposes it as a block device",
        examples=[
            "meshctl volume map vol1 --sdc host1",
            "meshctl volume map vol1 --sdc host2 --read-only --iops-limit 5000 "
            "--bandwidth-limit 100MiB",
        ],
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument("--sdc", required=True, help="SDC (name, id or GUID)")
    p.add_argument("--read-only", action="store_true", help="map read-only (default read-write)")
    p.add_argument("--iops-limit", type=values.iops_limit, metavar="N", help="IOPS limit")
    p.add_argument(
        "--bandwidth-limit",
        type=values.bandwidth_limit,
        metavar="SIZE",
        help="bandwidth limit per second, e.g. 100MiB",
    )

    p = add_command(
        sub,
        "unmap",
        unmap,
        help="unmap a volume from an SDC (or from all of them)",
        description="""Then waits up to --confirm-timeout seconds for every SDS of the
            volume's pool to hold the new mappings, and names those that do not: an
            SDS cut off from the MDM serves the SDC by the mappings it has until it
            reaches the MDM again (docs/security.md, "Revoking a mapping"). Exit 0
            when every SDS confirmed; 9 when the unmap was made but some SDS has not
            (with --json: "confirmed": false and the names in "unconfirmed").""",
        examples=[
            "meshctl volume unmap vol1 --sdc host1",
            "meshctl volume unmap vol1 --all",
            "meshctl volume unmap vol1 --sdc host1 --json   # exit 0 confirmed, 9 not",
        ],
    )
    p.add_argument("name", help="volume name (or id)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sdc", help="SDC (name, id or GUID)")
    which.add_argument("--all", action="store_true", help="unmap from every SDC")
    p.add_argument(
        "--confirm-timeout",
        type=values.confirm_seconds,
        default=5.0,
        metavar="S",
        help="seconds to wait for the SDSs to confirm (0 to 30; default 5)",
    )

    p = add_command(
        sub,
        "set-limits",
        set_limits,
        help="change the QoS limits of a volume's mapping",
        description="'none' removes a limit.",
        examples=[
            "meshctl volume set-limits vol1 --sdc host1 --iops-limit 10000",
            "meshctl volume set-limits vol1 --sdc host1 --bandwidth-limit 200MiB",
            "meshctl volume set-limits vol1 --sdc host1 --iops-limit none --bandwidth-limit none",
        ],
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument("--sdc", required=True, help="SDC (name, id or GUID)")
    p.add_argument(
        "--iops-limit",
        type=values.iops_limit,
        default=NOT_GIVEN,
        metavar="N|none",
        help="IOPS limit",
    )
    p.add_argument(
        "--bandwidth-limit",
        type=values.bandwidth_limit,
        default=NOT_GIVEN,
        metavar="SIZE|none",
        help="bandwidth limit per second, e.g. 100MiB",
    )

    p = add_command(
        sub,
        "set-access",
        set_access,
        help="change the access mode of a volume's mapping",
        description="""--read-only then waits, as unmap does, for every SDS of the
            volume's pool to hold the change, and names those that do not (they may
            still serve the SDC's writes until they reach the MDM): exit 9.""",
        examples=["meshctl volume set-access vol1 --sdc host1 --read-only"],
    )
    p.add_argument("name", help="volume name (or id)")
    p.add_argument("--sdc", required=True, help="SDC (name, id or GUID)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--read-only", dest="access_mode", action="store_const", const="read_only")
    mode.add_argument("--read-write", dest="access_mode", action="store_const", const="read_write")
    p.add_argument(
        "--confirm-timeout",
        type=values.confirm_seconds,
        default=5.0,
        metavar="S",
        help="with --read-only: seconds to wait for the SDSs to confirm (0 to 30; default 5)",
    )

    verify.register(sub)


def create(ctx: Context, args: Namespace) -> None:
    pool = ctx.names.pool(args.pool)
    body = {"name": args.name, "pool_id": pool["id"], "size": args.size, "type": args.type}
    vol = ctx.client.post(PATH, body)
    note = rounding(args.size, vol, pool)
    ctx.done(
        f"created {vol.get('type')} volume {vol['name']!r} of {size(vol.get('size_bytes'))} "
        f"in pool {pool['name']!r}{f' ({note})' if note else ''}",
        vol,
    )


def rounding(requested: int, vol: JsonObject, pool: JsonObject | None = None) -> str:
    """``rounded up from 1.5 GiB to 2 GiB, ...`` when the MDM gave ``vol`` more than
    ``requested`` (it rounds a size up to the pool's allocation granularity), else ``""``."""
    got = vol.get("size_bytes")
    if not isinstance(got, int) or got <= requested:
        return ""
    before, after = size(requested), size(got)
    if before == after:  # 2147483647 B shows as 2 GiB too
        before, after = f"{requested} B", f"{got} B"
    text = f"rounded up from {before} to {after}"
    granularity = (pool or {}).get("allocation_granularity_bytes")
    if isinstance(granularity, int) and granularity > 0:
        text += f", a multiple of the pool's allocation granularity ({size(granularity)})"
    return text


def _sdc_names(ctx: Context, vol: JsonObject) -> str:
    return ", ".join(ctx.names.name_of("sdc", i) for i in vol.get("mapped_sdc_ids") or [])


def list_(ctx: Context, args: Namespace) -> None:
    query = {"pool_id": ctx.names.pool(args.pool)["id"]} if args.pool else {}
    doc = ctx.client.get(PATH, query)
    vols = doc["volumes"]

    def human() -> str:
        return render_table(
            ["ID", "NAME", "POOL", "TYPE", "SIZE", "ALLOCATED", "STATE", "MAPPED TO"],
            [
                [
                    v["id"],
                    v["name"],
                    ctx.names.name_of("pool", v.get("pool_id")),
                    v.get("type"),
                    size(v.get("size_bytes")),
                    size(v.get("allocated_bytes")),
                    _state(v),
                    _sdc_names(ctx, v),
                ]
                for v in vols
            ],
            right={"ID", "SIZE", "ALLOCATED"},
            empty="no volumes",
        )

    ctx.emit(doc, human)


def _state(v: JsonObject) -> str:
    state = str(v.get("state", "active"))
    if state == "deleting":
        return f"deleting ({v.get('chunks_left', 0)} chunks, {size(v.get('bytes_left'))} left)"
    return state


def mappings_table(ctx: Context, mappings: list[JsonObject]) -> str:
    return render_table(
        ["MAPPING", "SDC", "ACCESS", "IOPS LIMIT", "BANDWIDTH LIMIT"],
        [
            [
                m.get("id"),
                ctx.names.name_of("sdc", m.get("sdc_id")),
                m.get("access_mode"),
                m.get("iops_limit"),
                rate(m.get("bandwidth_limit_bps")),
            ]
            for m in mappings
        ],
        right={"MAPPING", "IOPS LIMIT", "BANDWIDTH LIMIT"},
        empty="not mapped",
    )


def show(ctx: Context, args: Namespace) -> None:
    vol = ctx.client.get(f"{PATH}/{ctx.names.volume(args.name)['id']}")

    def human() -> str:
        fields = render_fields(
            [
                ("id", vol["id"]),
                ("name", vol["name"]),
                ("pool", ctx.names.name_of("pool", vol.get("pool_id"))),
                ("type", vol.get("type")),
                ("size", size(vol.get("size_bytes"))),
                ("allocated", size(vol.get("allocated_bytes"))),
                ("state", _state(vol)),
                ("created", timestamp(vol.get("created_at"))),
            ]
        )
        mappings = ctx.client.get(MAPPINGS, {"volume_id": vol["id"]})["mappings"]
        return f"{fields}\n\n{mappings_table(ctx, mappings)}"

    ctx.emit(vol, human)


def rename(ctx: Context, args: Namespace) -> None:
    old = ctx.names.volume(args.name)
    vol = ctx.client.patch(f"{PATH}/{old['id']}", {"name": args.new_name})
    ctx.done(f"renamed volume {old['name']!r} to {vol['name']!r}", vol)


def extend(ctx: Context, args: Namespace) -> None:
    old = ctx.names.volume(args.name)
    new_size = args.size.apply(int(old.get("size_bytes", 0)))
    vol = ctx.client.patch(f"{PATH}/{old['id']}", {"size": new_size})
    note = rounding(new_size, vol)
    if note and not ctx.json:  # name the granularity: one more request, only then
        pools = ctx.names.pools()
        note = rounding(new_size, vol, next((p for p in pools if p["id"] == vol["pool_id"]), None))
    ctx.done(
        f"volume {vol['name']!r} is now {size(vol.get('size_bytes'))} "
        f"(was {size(old.get('size_bytes'))}{'; ' + note if note else ''})",
        vol,
    )


def delete(ctx: Context, args: Namespace) -> None:
    vol = ctx.names.volume(args.name)
    if not args.yes:
        mapped = _sdc_names(ctx, vol)
        ctx.confirm(
            f"delete volume {vol['name']!r} ({size(vol.get('size_bytes'))}"
            f"{', mapped to ' + mapped if mapped else ''})? Its data cannot be read again.",
            f"delete volume {vol['name']!r}",
        )
    ctx.client.delete(f"{PATH}/{vol['id']}")
    ctx.done(
        f"deleted volume {vol['name']!r}: unreadable now, its name free; the SDSs free "
        "its chunks in the background ('meshctl volume list' shows what is left)"
    )


def map_(ctx: Context, args: Namespace) -> None:
    vol = ctx.names.volume(args.name)
    sdc = ctx.names.sdc(args.sdc)
    body: JsonObject = {
        "volume_id": vol["id"],
        "sdc_id": sdc["id"],
        "access_mode": "read_only" if args.read_only else "read_write",
    }
    if args.iops_limit is not None:
        body["iops_limit"] = args.iops_limit
    if args.bandwidth_limit is not None:
        body["bandwidth_limit"] = args.bandwidth_limit
    mapping = ctx.client.post(MAPPINGS, body)
    ctx.done(
        f"mapped volume {vol['name']!r} to SDC {sdc['name']!r} ({mapping.get('access_mode')})",
        mapping,
    )


def find_mapping(ctx: Context, vol: JsonObject, sdc: JsonObject) -> JsonObject:
    doc = ctx.client.get(MAPPINGS, {"volume_id": vol["id"], "sdc_id": sdc["id"]})
    for m in doc["mappings"]:
        if m.get("volume_id") == vol["id"] and m.get("sdc_id") == sdc["id"]:
            return dict(m)
    raise NotFound(f"volume {vol['name']!r} is not mapped to SDC {sdc['name']!r}")


def unmap(ctx: Context, args: Namespace) -> int:
    vol = ctx.names.volume(args.name)
    if args.all:
        mappings = ctx.client.get(MAPPINGS, {"volume_id": vol["id"]})["mappings"]
    else:
        mappings = [find_mapping(ctx, vol, ctx.names.sdc(args.sdc))]
    report: JsonObject | None = None
    for i, m in enumerate(mappings):
        # The volume's mappings are all of one pool, whose mappings epoch only grows:
        # the SDSs holding the last unmap's epoch hold the others' too.
        # Only the last asks for the confirmation (the others' would be reported
        # unconfirmed, and logged so by the MDM, at once).
        last = i == len(mappings) - 1
        wait = args.confirm_timeout if last else 0
        answer = ctx.client.request(
            "DELETE",
            f"{MAPPINGS}/{m['id']}",
            query={"confirm_timeout": f"{wait:g}"} if last else None,
            timeout=wait + ctx.client.timeout,
        )
        if last and isinstance(answer, dict):
            report = answer
    sdcs = [ctx.names.name_of("sdc", m.get("sdc_id")) for m in mappings]
    if not mappings:
        ctx.done(f"volume {vol['name']!r} was not mapped", {"volume": vol["name"], "sdcs": []})
        return ExitCode.OK
    doc: JsonObject = {"volume": vol["name"], "sdcs": sdcs}
    if report is None:  # an MDM of an older release: 204, nothing known
        doc |= {"confirmed": None, "unconfirmed": None}
    else:
        doc |= {
            k: report.get(k)
            for k in ("pool_id", "mappings_epoch", "enforced", "confirmed", "unconfirmed", "sds")
        }
    ctx.emit(doc, lambda: render_unmap(doc, args.confirm_timeout))
    return ExitCode.UNCONFIRMED if doc.get("unconfirmed") else ExitCode.OK


def render_unmap(doc: JsonObject, timeout: float, read_only: bool = False) -> str:
    """What the SDSs confirmed of an unmap (``read_only``: of a change to read-only)."""
    sdcs = ", ".join(doc["sdcs"])
    if read_only:
        head, serve = f"made volume {doc['volume']!r} read-only for {sdcs}", "take its writes"
    else:
        head = f"unmapped volume {doc['volume']!r} from {sdcs}"
        serve = f"serve {'them' if len(doc['sdcs']) > 1 else 'it'}"
    if doc.get("confirmed") is None:
        return f"{head} (the MDM does not say which SDSs took it: an older release)"
    if not doc.get("enforced"):
        return f"{head} (the SDSs do not check client IO by the mappings: no TLS identities)"
    if doc.get("confirmed"):
        return f"{head}; every SDS of its pool confirmed (mappings epoch {doc['mappings_epoch']})"
    lines = [
        f"{head}; NOT confirmed within {timeout:g} s by {len(doc['unconfirmed'])} SDS(s), "
        f"which may still {serve} until they reach the MDM (mappings epoch "
        f"{doc['mappings_epoch']}):"
    ]
    for s in doc.get("sds") or []:
        if s.get("confirmed"):
            continue
        heard = s.get("last_heard_s")
        when = "never heard from by this MDM" if heard is None else f"last heard {heard:g} s ago"
        held = "no mappings" if s.get("epoch") is None else f"mappings epoch {s['epoch']}"
        lines.append(f"  sds {s.get('name')} ({s.get('state')}): holds {held}, {when}")
    return "\n".join(lines)


def set_limits(ctx: Context, args: Namespace) -> int:
    body: JsonObject = {}
    if args.iops_limit is not NOT_GIVEN:
        body["iops_limit"] = args.iops_limit
    if args.bandwidth_limit is not NOT_GIVEN:
        body["bandwidth_limit"] = args.bandwidth_limit
    if not body:
        raise UsageError("give --iops-limit and/or --bandwidth-limit")
    return _patch_mapping(ctx, args, body)


def set_access(ctx: Context, args: Namespace) -> int:
    wait = args.confirm_timeout if args.access_mode == "read_only" else None
    return _patch_mapping(ctx, args, {"access_mode": args.access_mode}, wait)


def _patch_mapping(
    ctx: Context, args: Namespace, body: JsonObject, confirm_timeout: float | None = None
) -> int:
    vol = ctx.names.volume(args.name)
    sdc = ctx.names.sdc(args.sdc)
    mapping = find_mapping(ctx, vol, sdc)
    path = f"{MAPPINGS}/{mapping['id']}"
    if confirm_timeout is None:
        m = ctx.client.patch(path, body)
    else:
        m = ctx.client.request(
            "PATCH",
            path,
            query={"confirm_timeout": f"{confirm_timeout:g}"},
            body=body,
            timeout=confirm_timeout + ctx.client.timeout,
        )
    text = (
        f"mapping of volume {vol['name']!r} to SDC {sdc['name']!r}: {m.get('access_mode')}, "
        f"iops limit {m.get('iops_limit') or '-'}, "
        f"bandwidth limit {rate(m.get('bandwidth_limit_bps'))}"
    )
    report = m.get("revocation")
    if not isinstance(report, dict):  # nothing revoked (or an MDM of an older release)
        ctx.done(text, m)
        return ExitCode.OK
    doc = {"volume": vol["name"], "sdcs": [sdc["name"]], **report}
    ctx.emit(m, lambda: f"{text}\n{render_unmap(doc, confirm_timeout or 0, True)}")
    return ExitCode.UNCONFIRMED if report.get("unconfirmed") else ExitCode.OK
