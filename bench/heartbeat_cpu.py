#!/usr/bin/env python3
"""MDM CPU per SDS heartbeat, measured in process.

Builds an MDM application (SQLite in a temporary directory, no background tasks) with
``--sds`` SDSs of one device each and ``--volumes`` volumes written straight to the
store, then sends rounds of heartbeats through aiohttp's test client: in each round
every SDS sends one, reporting ``--per-sds`` volume chunk counts of which ``--moving``
changed since its previous heartbeat. After each round the heartbeat writer's batch is
flushed, as the MDM does once a second.

Reported: the MDM's CPU per heartbeat in the handler (measured by an outermost
middleware: body read, decoding, validation, the handler, the reply; the HTTP
parsing and the test client are outside it) and in the writer's batch, per
heartbeat. ``--mode full`` sends every volume in every heartbeat (the SDSs of
earlier releases); ``--mode delta`` sends what changed (the SDS's default).

    .venv/bin/python bench/heartbeat_cpu.py --sds 200 --volumes 2000 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshblock.mdm import app as mdm_app
from meshblock.mdm.config import AuthConfig, ClusterConfig, DatabaseConfig, MdmConfig
from meshblock.mdm.context import CTX
from meshblock.mdm.models import Device, ProtectionDomain, Sds, StoragePool, Volume, VolumeType

MiB = 1 << 20
SECRET = "bench-secret"


class Meter:
    def __init__(self) -> None:
        self.handler_s = 0.0
        self.count = 0

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        t0 = time.process_time()
        try:
            return await handler(request)
        finally:
            if request.path.endswith("/heartbeat"):
                self.handler_s += time.process_time() - t0
                self.count += 1


async def populate(app: web.Application, n_sds: int, n_volumes: int) -> tuple[list[int], list[int]]:
    c = app[CTX]
    async with c.sessions() as s, s.begin():
        pd = ProtectionDomain(name="pd")
        s.add(pd)
        await s.flush()
        pool = StoragePool(
            name="pool", protection_domain_id=pd.id, pg_count=256, allocation_granularity_bytes=MiB
        )
        s.add(pool)
        await s.flush()
        sdss = [
            Sds(name=f"sds{i}", protection_domain_id=pd.id, address=f"10.0.{i // 250}.{i % 250}")
            for i in range(n_sds)
        ]
        s.add_all(sdss)
        await s.flush()
        devices = [
            Device(sds_id=x.id, pool_id=pool.id, path="/dev/sdb", capacity_bytes=1 << 40)
            for x in sdss
        ]
        s.add_all(devices)
        vols = [
            Volume(name=f"v{i}", pool_id=pool.id, type=VolumeType.THIN, size_bytes=1 << 34)
            for i in range(n_volumes)
        ]
        s.add_all(vols)
        await s.flush()
        return [d.id for d in devices], [v.id for v in vols]


class SimSds:
    """One SDS's heartbeats: full every time, or full first then what changed."""

    def __init__(self, sds_id: int, device_id: int, volumes: list[int], delta: bool) -> None:
        self.id = sds_id
        self.device_id = device_id
        self.used = 0
        self.chunks = {v: 100 for v in volumes}
        self.delta = delta
        self.sent: dict[int, int] | None = None  # acknowledged volume counts
        self.seq = 1
        self.acked: int | None = None

    def body(self) -> dict[str, Any]:
        device = [{"id": self.device_id, "used_bytes": self.used}]
        if not self.delta:
            return {
                "devices": device,
                "volumes": [{"id": v, "chunks": n} for v, n in self.chunks.items()],
            }
        self.seq += 1
        if self.sent is None or self.acked is None:
            return {
                "seq": self.seq,
                "full": True,
                "devices": device,
                "volumes": [{"id": v, "chunks": n} for v, n in self.chunks.items()],
            }
        changed = [{"id": v, "chunks": n} for v, n in self.chunks.items() if self.sent.get(v) != n]
        return {"seq": self.seq, "base": self.acked, "devices": device, "volumes": changed}

    def answered(self, doc: dict[str, Any]) -> None:
        if self.delta:
            if doc.get("send_full"):
                self.sent = self.acked = None
            else:
                self.sent, self.acked = dict(self.chunks), self.seq


async def run(args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        config = MdmConfig(
            auth=AuthConfig(admin_token="bench-admin", cluster_secret=SECRET),
            database=DatabaseConfig(url=f"sqlite+aiosqlite:///{Path(tmp) / 'mdm.db'}"),
            cluster=ClusterConfig(heartbeat_timeout_s=600.0),
        )
        app = mdm_app.create_app(config)
        meter = Meter()
        app.middlewares.insert(0, meter.middleware)
        app.cleanup_ctx[:] = [f for f in app.cleanup_ctx if f is not mdm_app._background]
        async with TestClient(TestServer(app)) as client:
            dev_ids, vol_ids = await populate(app, args.sds, args.volumes)
            c = app[CTX]
            sims = [
                SimSds(i + 1, dev_ids[i], rng.sample(vol_ids, args.per_sds), args.mode == "delta")
                for i in range(args.sds)
            ]
            headers = {"Authorization": f"Bearer {SECRET}"}
            flush_s = 0.0
            for r in range(args.rounds + 1):
                if r == 1:  # the first round (full state, first lookups) is not counted
                    meter.handler_s, meter.count, flush_s = 0.0, 0, 0.0
                for sim in sims:
                    sim.used += MiB
                    for v in rng.sample(list(sim.chunks), args.moving):
                        sim.chunks[v] += 1
                    resp = await client.post(
                        f"/api/v1/sds/{sim.id}/heartbeat", json=sim.body(), headers=headers
                    )
                    doc = await resp.json()
                    assert resp.status == 200, doc
                    sim.answered(doc)
                t0 = time.process_time()
                await c.liveness.flush(c.sessions, c.write_gate)
                flush_s += time.process_time() - t0
    n = meter.count
    return {
        "heartbeats": n,
        "handler_us": 1e6 * meter.handler_s / n,
        "writer_us": 1e6 * flush_s / n,
        "total_us": 1e6 * (meter.handler_s + flush_s) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sds", type=int, default=200)
    p.add_argument("--volumes", type=int, default=2000)
    p.add_argument("--per-sds", type=int, default=200, help="volumes each SDS holds chunks of")
    p.add_argument("--moving", type=int, default=5, help="of them, changed per heartbeat")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--mode", choices=("full", "delta"), default="delta")
    args = p.parse_args(argv)
    r = asyncio.run(run(args))
    print(
        f"{args.mode}: {r['heartbeats']:.0f} heartbeats ({args.sds} SDSs, {args.per_sds} of "
        f"{args.volumes} volumes each, {args.moving} moving): MDM CPU per heartbeat "
        f"{r['total_us']:.0f} us (handler {r['handler_us']:.0f} us, writer {r['writer_us']:.0f} us)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
