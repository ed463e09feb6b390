#!/usr/bin/env python3
"""CPU per MiB of the data protocol's transport, plain TCP against TLS 1.3, one pair.

One SDS data server (``meshblock.sds.server.DataServer`` on a sparse store file in a
temporary directory, primary of every PG, no secondary) runs in a child process; this
process dials it as an SDC would (``WireClient``, role CLIENT, the SDC's certificate
over TLS) and moves ``--mib`` MiB in 1 MiB requests, ``--qd`` at once, first writes
then reads, once over plain TCP and once over TLS, ``--runs`` times alternating. For
each it prints the process CPU time (user + system, ``getrusage``) per MiB of the
client and of the server: the load of other processes on the machine moves it far
less than throughput. Checksums are on (the default), as in the secure defaults.

``--profile FILE`` runs the client under cProfile (on CPU time) for one more TLS pass
(writes, then reads) and writes the stats there; ``--only tls`` or ``--only plain``
measures one. ``--transports`` compares the bare transports instead: one process
sends ``--mib`` MiB in 1 MiB writes to another over a plain socket, a blocking
``ssl.SSLSocket`` (OpenSSL on the socket) and asyncio's TLS transport (memory BIOs),
and each side's CPU per MiB is printed.

A single process pair on loopback, seconds long: the transport alone, without NBD,
the SDC's IO path or replication (``bench/cpu_per_io.py`` measures the whole cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshblock import pki
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.wire import tls as wire_tls
from meshblock.wire.client import WireClient
from meshblock.wire.protocol import PeerRole

MiB = 1024 * 1024
SECRET = "tls-cost-bench"
POOL, PG_COUNT, EPOCH = 5, 16, 3
SDC = "sdc:4f1c2a7e-0b6d-4c1e-9a55-3f2b8e7d1c90"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def faults() -> int:
    """Minor page faults of this process so far (fresh buffers: each costs a fault and
    a page cleared by the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_pki(root: Path) -> dict[str, dict[str, Path]]:
    ca = pki.Ca.init(root / "ca")
    out: dict[str, dict[str, Path]] = {}
    for text in ("sds:bench", SDC):
        ident = pki.Identity.parse(text)
        cert, key = ca.issue(ident, sans=("127.0.0.1",))
        paths = pki.write_identity(root / text.split(":")[0], ident, cert, key, ca.load()[0])
        out[text] = {"cert": paths["cert"], "key": paths["key"], "ca": ca.cert_path}
    return out


async def serve(root: Path, tls: bool) -> None:
    """The child: a data server; prints its port, then its CPU time per line read."""
    from meshblock.sds.io_path import DataService
    from meshblock.sds.maps import MapCache, PgMap
    from meshblock.sds.replication import Peers
    from meshblock.sds.resync import Resync
    from meshblock.sds.server import DataServer
    from meshblock.sds.state import SdsState
    from meshblock.sds.stats import SdsStats
    from meshblock.sds.store import ChunkStore, DeviceSpec

    ctx = None
    if tls:
        files = root / "sds"
        ident = pki.Identity.parse("sds:bench")
        paths = pki.identity_paths(files, ident)
        ctx = pki.server_context(
            paths["cert"],
            paths["key"],
            root / "ca" / pki.CA_CERT,
            client_certs=pki.ClientCerts.REQUIRED,
        )
    dev = str(root / f"dev-{os.getpid()}.img")
    store = ChunkStore([DeviceSpec(dev, 1 << 30, "pool")], checksums=True)
    store.open()
    maps = MapCache()
    maps.update(
        PgMap(
            pool_id=POOL,
            epoch=EPOCH,
            pg_count=PG_COUNT,
            primary=((1, 10),) * PG_COUNT,
            secondary=((0, 0),) * PG_COUNT,
            sds={1: ("127.0.0.1", 0)},
            doc={},
        )
    )
    sds = SdsState(store, maps, Peers(SECRET, 5.0), SdsStats())
    sds.set_identity(1, {dev: (10, POOL)})
    guid = SDC.split(":", 1)[1]
    sds.access.update(
        {
            "pool_id": POOL,
            "epoch": 1,
            "volumes": [{"id": 1, "sdcs": [{"guid": guid, "read_only": False}]}],
        }
    )
    server = DataServer(DataService(sds, Resync(sds)), SECRET, tls=ctx)
    await server.start("127.0.0.1", 0)
    print(server.port, flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(f"{cpu():.6f}", flush=True)
    await server.stop()
    store.close()


class Server:
    def __init__(self, root: Path, tls: bool) -> None:
        args = [sys.executable, __file__, "--serve", str(root)] + (["--tls"] if tls else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def cpu(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


async def move(client: WireClient, mib: int, qd: int, write: bool) -> None:
    data = os.urandom(MiB)
    per_chunk = CHUNK_SIZE // MiB
    todo = (i % 512 for i in range(mib))  # within the 1 GiB store

    async def worker() -> None:
        for i in todo:
            chunk = i // per_chunk
            ref = ChunkRef(POOL, pg_of(1, chunk, PG_COUNT), EPOCH, 1, chunk)
            off = (i % per_chunk) * MiB
            if write:
                await client.write(ref, off, data)
            else:
                got = await client.read(ref, off, MiB)
                assert len(got) == MiB

    await asyncio.gather(*(worker() for _ in range(qd)))


async def measure(
    root: Path, tls: bool, mib: int, qd: int, profile: cProfile.Profile | None = None
) -> dict[str, float]:
    server = Server(root, tls)
    try:
        ctx = None
        if tls:
            paths = pki.identity_paths(root / "sdc", pki.Identity.parse(SDC))
            ctx = wire_tls.dial_context(root / "ca" / pki.CA_CERT, paths["cert"], paths["key"])
        client = await WireClient.connect(
            "127.0.0.1", server.port, SECRET, PeerRole.CLIENT, tls=ctx
        )
        out: dict[str, float] = {}
        await move(client, 16, qd, True)  # warm: allocate the chunks, the arenas
        await move(client, 16, qd, False)
        for name, write in (("write", True), ("read", False)):
            s0, c0, f0, t0 = server.cpu(), cpu(), faults(), time.monotonic()
            if profile is not None:
                profile.enable()
            await move(client, mib, qd, write)
            if profile is not None:
                profile.disable()
            s1, c1, f1, t1 = server.cpu(), cpu(), faults(), time.monotonic()
            out[f"{name} client ms/MiB"] = (c1 - c0) * 1000 / mib
            out[f"{name} server ms/MiB"] = (s1 - s0) * 1000 / mib
            out[f"{name} client faults/MiB"] = (f1 - f0) / mib
            out[f"{name} MiB/s"] = mib / (t1 - t0)
        await client.close()
        return out
    finally:
        server.stop()


def _contexts(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ids = {
        t: pki.identity_paths(root / t.split(":")[0], pki.Identity.parse(t))
        for t in ("sds:bench", SDC)
    }
    ca = root / "ca" / pki.CA_CERT
    server = pki.server_context(
        ids["sds:bench"]["cert"], ids["sds:bench"]["key"], ca, client_certs=pki.ClientCerts.REQUIRED
    )
    return server, wire_tls.dial_context(ca, ids[SDC]["cert"], ids[SDC]["key"])


def receive(root: Path, kind: str, mib: int, out: int) -> None:
    """The receiving child of ``--transports``: accepts one connection, reads ``mib``
    MiB and prints its CPU per MiB (from the first byte)."""
    server_ctx, _ = _contexts(root)
    listener = socket.create_server(("127.0.0.1", 0))
    os.write(out, f"{listener.getsockname()[1]}\n".encode())
    total = mib * MiB
    if kind == "asyncio":

        async def run() -> float:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[float] = loop.create_future()

            class Sink(asyncio.BufferedProtocol):
                def __init__(self) -> None:
                    self.view = memoryview(bytearray(2 * MiB))
                    self.got = 0
                    self.start = 0.0

                def get_buffer(self, sizehint: int) -> memoryview:
                    return self.view

                def buffer_updated(self, nbytes: int) -> None:
                    if not self.got:
                        self.start = cpu()
                    self.got += nbytes
                    if self.got >= total and not done.done():
                        done.set_result(cpu() - self.start)

            listener.setblocking(False)
            conn, _ = await loop.sock_accept(listener)
            await loop.connect_accepted_socket(Sink, conn, ssl=server_ctx)
            return await done

        used = asyncio.run(run())
    else:
        conn, _ = listener.accept()
        if kind == "sslsocket":
            conn = server_ctx.wrap_socket(conn, server_side=True)
        view = memoryview(bytearray(2 * MiB))
        got, start = 0, 0.0
        while got < total:
            n = conn.recv_into(view)
            if not got:
                start = cpu()
            got += n
        used = cpu() - start
    print(f"{kind} receive ms/MiB {used * 1000 / mib:.3f}", flush=True)


def send(root: Path, kind: str, mib: int) -> None:
    """Start a receiving child, send it ``mib`` MiB over ``kind``; print both sides'
    CPU per MiB (this side's until the child has read everything: idle waits cost
    nothing, and the sends left in the transport's buffer are counted)."""
    _, client_ctx = _contexts(root)
    rd, wr = os.pipe()
    args = [sys.executable, __file__, "--receive", str(root), kind, str(mib), str(wr)]
    child = subprocess.Popen(args, pass_fds=(wr,))
    os.close(wr)
    port = int(os.read(rd, 64).split()[0])
    data = memoryview(os.urandom(MiB))
    if kind == "asyncio":

        async def run() -> None:
            loop = asyncio.get_running_loop()
            writable = asyncio.Event()
            writable.set()

            class Source(asyncio.Protocol):
                def pause_writing(self) -> None:
                    writable.clear()

                def resume_writing(self) -> None:
                    writable.set()

            transport, _ = await loop.create_connection(
                Source, "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
            )
            for _ in range(mib):
                await writable.wait()
                transport.write(data)
            await loop.run_in_executor(None, child.wait, 60)
            transport.abort()

        start = cpu()
        asyncio.run(run())
        used = cpu() - start
    else:
        conn = socket.create_connection(("127.0.0.1", port))
        if kind == "sslsocket":
            conn = client_ctx.wrap_socket(conn)
        start = cpu()
        for _ in range(mib):
            conn.sendall(data)
        child.wait(60)
        used = cpu() - start
        conn.close()
    print(f"{kind} send ms/MiB {used * 1000 / mib:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512, help="MiB moved per direction and run")
    ap.add_argument("--qd", type=int, default=8, help="requests in flight")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=("tls", "plain"))
    ap.add_argument("--profile", type=Path, help="cProfile the client in one more TLS run")
    ap.add_argument("--transports", action="store_true", help="compare the bare transports")
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--receive", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.tls))
        return
    if args.receive is not None:
        where, kind, mib, out = args.receive
        receive(Path(where), kind, int(mib), int(out))
        return
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the store off the disk
    with tempfile.TemporaryDirectory(prefix="tls-cost-", dir=shm) as tmp:
        root = Path(tmp)
        make_pki(root)
        if args.transports:
            for run in range(args.runs):
                for kind in ("plain", "sslsocket", "asyncio"):
                    print(f"run {run + 1}: ", end="", flush=True)
                    send(root, kind, args.mib)
            return
        modes = [m for m in ("plain", "tls") if args.only in (None, m)]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for run in range(args.runs):
            for mode in modes:
                r = asyncio.run(measure(root, mode == "tls", args.mib, args.qd))
                results[mode].append(r)
                print(f"run {run + 1} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
        for mode in modes:
            keys = results[mode][0].keys()
            med = {k: statistics.median(r[k] for r in results[mode]) for k in keys}
            print(f"median {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()))
        if args.profile is not None:
            prof = cProfile.Profile(time.process_time)  # CPU, not the busy wall clock
            asyncio.run(measure(root, True, args.mib, args.qd, prof))
            prof.dump_stats(args.profile)
            print(f"profile of the client written to {args.profile}")


if __name__ == "__main__":
    main()
