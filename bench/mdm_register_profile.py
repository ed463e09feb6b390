"""Where an SDS registration's CPU goes: the MDM app in this process, profiled.

Starts the MDM's application (``meshblock.mdm.app.create_app``) in this process under
aiohttp's test server, on a new SQLite database in a temporary directory, with the
garbage collector settings the daemon applies (``meshblock.mdm.__main__._tune_gc``;
``--python-gc`` leaves Python's defaults). It makes a protection domain, ``--fault-sets``
fault sets, a pool of ``--pg-count`` PGs and a join token, then registers ``--sds`` SDSs
one at a time (one device each, 2 or 4 TiB, by name with the join token, as
``bench/mdm_api.py`` and an SDS daemon do) and prints:

- the process's CPU per registration (all threads: aiosqlite's too), over all of them
  and over the first and the last 10% (does the cost grow with the cluster?);
- the part of it in the pool's map recompute (``pgmaps.recompute``): placement
  (``compute_map``), the rest of ``plan_map``, and the wall time of loading and
  writing the PG rows; and the garbage collector's time per generation.

With ``--cprofile FILE`` the registrations run under cProfile (``python -m pstats
FILE``); cProfile roughly doubles the CPU, so compare figures without it. The server,
the client and the background loops share the process, as the loops share the daemon's
event loop: the figures are the MDM's CPU for the registrations, the client's small
part included. Compare CPU, not wall time, on a machine that runs other work.

Example: ``.venv/bin/python bench/mdm_register_profile.py --sds 300`` (from a worktree
whose package the venv does not install: ``PYTHONPATH=$PWD/daemons`` before it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import logging
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from meshblock import audit
from meshblock.mdm import pgmaps, pgtable
from meshblock.mdm.__main__ import _tune_gc
from meshblock.mdm.app import create_app
from meshblock.mdm.config import (
    AuthConfig,
    ClusterConfig,
    DatabaseConfig,
    MdmConfig,
    ScrubConfig,
)

TiB = 1 << 40
ADMIN = {"Authorization": "Bearer bench-admin"}
COMPONENT = {"Authorization": "Bearer bench-cluster-secret"}


def cpu_seconds() -> float:
    """This process's CPU (user + system, every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Spent:
    """Time spent in a few functions of the recompute and in the garbage collector."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._gc_started = 0.0

    def wrap(self, module: Any, name: str) -> None:
        """Time ``module.name``: main-thread CPU of a function, wall time of a
        coroutine function (it awaits the database)."""
        fn = getattr(module, name)
        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self.seconds[f"{name} (wall)"] += time.perf_counter() - t

            setattr(module, name, timed_async)
        else:

            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.seconds[name] += time.thread_time() - t

            setattr(module, name, timed)

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.thread_time()
        else:
            key = f"gc generation {info['generation']}"
            self.seconds[key] += time.thread_time() - self._gc_started
            self.seconds[key + " collections"] += 1


async def run(args: argparse.Namespace, workdir: Path, spent: Spent) -> list[str]:
    config = MdmConfig(
        auth=AuthConfig(
            admin_token="bench-admin",
            readonly_token="bench-readonly",
            cluster_secret="bench-cluster-secret",
        ),
        database=DatabaseConfig(url=f"sqlite+aiosqlite:///{workdir / 'mdm.db'}"),
        cluster=ClusterConfig(name="bench", heartbeat_interval_s=1.0, heartbeat_timeout_s=600.0),
        scrub=ScrubConfig(start_delay_s=3600.0),
    )
    app = create_app(config)
    logging.getLogger(audit.LOGGER).setLevel(logging.WARNING)  # a line per registration
    if not args.python_gc:
        app.cleanup_ctx.append(_tune_gc)  # as the daemon does
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:

        async def ok(path: str, body: Any, headers: dict[str, str] = ADMIN) -> Any:
            r = await client.post(path, json=body, headers=headers)
            if r.status not in (200, 201):
                raise SystemExit(f"POST {path} -> {r.status}: {await r.text()}")
            return await r.json()

        pd = (await ok("/api/v1/protection-domains", {"name": "pd"}))["id"]
        for f in range(args.fault_sets):
            await ok("/api/v1/fault-sets", {"name": f"fs{f:02d}", "protection_domain_id": pd})
        await ok(
            "/api/v1/pools", {"name": "pool", "protection_domain_id": pd, "pg_count": args.pg_count}
        )
        token = (await ok("/api/v1/sds/join-tokens", {"uses": args.sds, "ttl_s": 3600}))["token"]

        profile = cProfile.Profile() if args.cprofile else None
        per: list[float] = []
        spent.seconds.clear()
        gc.callbacks.append(spent.gc_callback)
        started_cpu, started = cpu_seconds(), time.perf_counter()
        try:
            for i in range(args.sds):
                capacity = (2 + 2 * (i % 2)) * TiB
                body: dict[str, Any] = {
                    "name": f"sds{i:04d}",
                    "protection_domain": "pd",
                    "address": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
                    "devices": [{"path": "/dev/nvme0n1", "pool": "pool", "capacity": capacity}],
                    "join_token": token,
                }
                if args.fault_sets:
                    body["fault_set"] = f"fs{i % args.fault_sets:02d}"
                before = cpu_seconds()
                if profile is not None:
                    profile.enable()
                await ok("/api/v1/sds/register", body, COMPONENT)
                if profile is not None:
                    profile.disable()
                per.append(cpu_seconds() - before)
        finally:
            gc.callbacks.remove(spent.gc_callback)
        total_cpu, wall = cpu_seconds() - started_cpu, time.perf_counter() - started
    if profile is not None:
        profile.dump_stats(args.cprofile)

    n = args.sds
    tenth = max(1, n // 10)

    def ms(seconds: float) -> str:
        return f"{1000 * seconds / n:.1f} ms"

    out = [
        f"{n} SDS registrations, pool of {args.pg_count} PGs, {args.fault_sets} fault sets, "
        f"SQLite, {'Python GC defaults' if args.python_gc else 'the daemon GC settings'}"
        f"{', under cProfile' if profile else ''}",
        f"  CPU {total_cpu:.1f} s in {wall:.1f} s: {ms(total_cpu)} per registration "
        f"(first 10%: {1000 * sum(per[:tenth]) / tenth:.1f} ms, "
        f"last 10%: {1000 * sum(per[-tenth:]) / tenth:.1f} ms)",
    ]
    for key in sorted(spent.seconds):
        value = spent.seconds[key]
        out.append(
            f"  {key}: {value:.0f}" if key.endswith("collections") else f"  {key}: {ms(value)}"
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sds", type=int, default=300, help="SDSs registered (default 300)")
    p.add_argument("--pg-count", type=int, default=4096, help="PGs of the pool (default 4096)")
    p.add_argument("--fault-sets", type=int, default=10, help="fault sets (default 10; 0: none)")
    p.add_argument("--cprofile", metavar="FILE", help="profile the registrations into FILE")
    p.add_argument(
        "--python-gc", action="store_true", help="keep Python's GC defaults (not the daemon's)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("meshblock").setLevel(logging.WARNING)
    spent = Spent()
    wrap: list[tuple[Any, str]] = [
        (pgmaps, "recompute"),
        (pgmaps, "plan_map"),
        (pgmaps, "compute_map"),
        (pgtable, "load"),
        (pgtable, "write"),
    ]
    for module, name in wrap:
        spent.wrap(module, name)
    with tempfile.TemporaryDirectory(prefix="mdm-register-") as tmp:
        lines = asyncio.run(run(args, Path(tmp), spent))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
