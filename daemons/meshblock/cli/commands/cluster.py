"""Cluster-wide views: ``meshctl topology``, ``meshctl capacity``, ``meshctl health``."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from meshblock.cli.client import JsonObject
from meshblock.cli.commands.pools import capacity_state
from meshblock.cli.context import Context
from meshblock.cli.errors import CliError, ExitCode
from meshblock.cli.output import (
    TreeNode,
    percent,
    rate,
    render_table,
    render_tree,
    size,
    timestamp,
)
from meshblock.cli.parser import Subparsers, add_command

# Component states that make `meshctl health` exit 1.
UNHEALTHY_STATES = frozenset(
    {"disconnected", "degraded", "down", "failed", "error", "unreachable", "offline"}
)


def register(root: Subparsers) -> None:
    add_command(
        root,
        "topology",
        topology,
        help="show the whole cluster as a tree",
        description="""
            Protection domains -> fault sets -> SDSs -> devices, then pools -> volumes
            -> mappings, then the SDCs. --json prints the API's topology document.""",
        examples=["meshctl topology", "meshctl topology --json"],
        aliases=["topo"],
    )
    add_command(
        root,
        "capacity",
        capacity,
        help="show the capacity of every storage pool",
        description="""
            usable = total - spare; allocated = thick reserved + thin used;
            free = usable - allocated. STATE compares the used percentage with the
            pool's alert thresholds.""",
        examples=["meshctl capacity", "meshctl capacity --json"],
    )
    add_command(
        root,
        "health",
        health,
        help="show the cluster's health and its components; exit 1 if unhealthy",
        description="""
            Needs no token. Exits 0 when the cluster is healthy, 1 when the MDM reports
            it degraded or any component is disconnected or degraded, so it can serve
            as a check in scripts. --json prints /health with the components
            (/health/components) and the totals (/health/metrics) added.""",
        examples=["meshctl health", "meshctl health --json", "meshctl health && echo healthy"],
    )


# -- topology ---------------------------------------------------------------------


def topology(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get("/api/v1/topology")
    ctx.emit(doc, lambda: render_tree(topology_tree(doc)))


def topology_tree(doc: JsonObject) -> TreeNode:
    """The tree ``meshctl topology`` draws from the API's topology document."""
    cluster = doc.get("cluster") or {}
    root = TreeNode(f"cluster {cluster.get('name', '?')}  (epoch {cluster.get('epoch', '?')})")
    pool_names = {
        p["id"]: p["name"] for pd in doc.get("protection_domains", []) for p in pd.get("pools", [])
    }
    for pd in doc.get("protection_domains", []):
        pd_node = root.add(f"protection domain {pd['name']}")
        for fs in pd.get("fault_sets", []):
            fs_node = pd_node.add(f"fault set {fs['name']}")
            for sds in fs.get("sds", []):
                _add_sds(fs_node, sds, pool_names)
        without = pd.get("sds_without_fault_set", [])
        if without:
            group = pd_node.add("sds without fault set") if pd.get("fault_sets") else pd_node
            for sds in without:
                _add_sds(group, sds, pool_names)
        for pool in pd.get("pools", []):
            cap = pool.get("capacity") or {}
            pool_node = pd_node.add(
                f"pool {pool['name']}  {pool.get('pg_count')} PGs  "
                f"usable {size(cap.get('usable_bytes'))}  free {size(cap.get('free_bytes'))}  "
                f"used {percent(cap.get('used_percent'))}"
            )
            for vol in pool.get("volumes", []):
                vol_node = pool_node.add(
                    f"volume {vol['name']}  {vol.get('type')}  {size(vol.get('size_bytes'))}  "
                    f"allocated {size(vol.get('allocated_bytes'))}"
                )
                for m in vol.get("mappings", []):
                    vol_node.add(f"mapped to {m.get('sdc_name') or m.get('sdc_id')}  {_qos(m)}")
    sdcs = doc.get("sdc", [])
    if sdcs:
        sdc_node = root.add("SDCs")
        for sdc in sdcs:
            sdc_node.add(
                f"sdc {sdc['name']}  {sdc.get('address') or '-'}  {sdc.get('state')}  "
                f"guid {sdc.get('guid')}"
            )
    return root


def _add_sds(parent: TreeNode, sds: JsonObject, pool_names: dict[Any, str]) -> None:
    node = parent.add(
        f"sds {sds['name']}  {sds.get('address')}:{sds.get('data_port')}  {sds.get('state')}"
    )
    for d in sds.get("devices", []):
        pool = pool_names.get(d.get("pool_id"), f"#{d.get('pool_id')}")
        node.add(
            f"device {d.get('path')}  {size(d.get('capacity_bytes'))}  pool {pool}  "
            f"used {size(d.get('used_bytes'))}"
        )


def _qos(m: JsonObject) -> str:
    text = str(m.get("access_mode"))
    if m.get("iops_limit") is not None:
        text += f"  iops {m['iops_limit']}"
    if m.get("bandwidth_limit_bps") is not None:
        text += f"  bandwidth {rate(m['bandwidth_limit_bps'])}"
    return text


# -- capacity ---------------------------------------------------------------------


def capacity(ctx: Context, args: Namespace) -> None:
    doc = ctx.client.get("/api/v1/capacity")

    def human() -> str:
        pools = {p["id"]: p for p in ctx.names.pools()}
        rows: list[list[object]] = []
        totals = dict.fromkeys(_CAPACITY_FIELDS, 0)
        for c in doc.get("pools", []):
            pool = pools.get(c.get("pool_id"), {"name": f"#{c.get('pool_id')}"})
            for key in _CAPACITY_FIELDS:
                totals[key] += int(c.get(key) or 0)
            rows.append(
                [
                    pool["name"],
                    *(size(c.get(k)) for k in _CAPACITY_FIELDS),
                    percent(c.get("used_percent")),
                    capacity_state({**pool, "capacity": c}),
                ]
            )
        if len(rows) > 1:
            used = (
                100.0 * totals["allocated_bytes"] / totals["usable_bytes"]
                if totals["usable_bytes"]
                else 0.0
            )
            rows.append(["TOTAL", *(size(totals[k]) for k in _CAPACITY_FIELDS), percent(used), ""])
        return render_table(
            ["POOL", "TOTAL", "SPARE", "USABLE", "THICK RESERVED", "THIN USED", "ALLOCATED",
             "FREE", "USED", "STATE"],
            rows,
            right={"TOTAL", "SPARE", "USABLE", "THICK RESERVED", "THIN USED", "ALLOCATED",
                   "FREE", "USED"},
            empty="no storage pools",
        )  # fmt: skip

    ctx.emit(doc, human)


_CAPACITY_FIELDS = (
    "total_bytes",
    "spare_bytes",
    "usable_bytes",
    "thick_reserved_bytes",
    "thin_used_bytes",
    "allocated_bytes",
    "free_bytes",
)


# -- health -----------------------------------------------------------------------


def health(ctx: Context, args: Namespace) -> int:
    doc: JsonObject = dict(ctx.client.get("/health"))
    components = ctx.client.get("/health/components").get("components", [])
    doc["components"] = components
    try:
        doc["metrics"] = ctx.client.get("/health/metrics")
    except CliError:
        doc["metrics"] = None  # totals are a nicety; health is judged without them
    unhealthy = unhealthy_components(components)
    healthy = doc.get("status") == "ok" and not unhealthy

    def human() -> str:
        head = (
            f"cluster {doc.get('cluster')}: {doc.get('status')}  "
            f"(epoch {doc.get('epoch')}, version {doc.get('version')})"
        )
        table = render_table(
            ["TYPE", "NAME", "ADDRESS", "CONTROL", "DATA", "STATE", "LAST SEEN"],
            [
                [
                    c.get("component_type"),
                    c.get("name"),
                    c.get("address"),
                    c.get("control_port"),
                    c.get("data_port"),
                    c.get("state"),
                    timestamp(c.get("last_seen")),
                ]
                for c in components
            ],
            empty="no components",
        )
        parts = [head, table]
        metrics = doc.get("metrics")
        if isinstance(metrics, dict):
            parts.append(
                f"SDS {metrics.get('sds_connected')}/{metrics.get('sds_total')} connected, "
                f"SDC {metrics.get('sdc_connected')}/{metrics.get('sdc_total')} connected, "
                f"{metrics.get('volumes')} volumes, {metrics.get('mappings')} mappings, "
                f"capacity {size(metrics.get('capacity_allocated_bytes'))} allocated of "
                f"{size(metrics.get('capacity_total_bytes'))}"
            )
        if healthy:
            parts.append("healthy")
        else:
            names = ", ".join(f"{c.get('name')} ({c.get('state')})" for c in unhealthy)
            parts.append(f"UNHEALTHY: {names}" if names else f"UNHEALTHY: {doc.get('status')}")
        return "\n\n".join(parts)

    ctx.emit(doc, human)
    return ExitCode.OK if healthy else ExitCode.ERROR


def unhealthy_components(components: list[JsonObject]) -> list[JsonObject]:
    return [c for c in components if str(c.get("state")).lower() in UNHEALTHY_STATES]
