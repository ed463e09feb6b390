"""A real MDM and three real ``meshblock-sds`` processes on loopback, driven through
the wire client: mirrored writes, the IO invariants of docs/design.md that concern the
SDS, auth, malformed input, /health and /metrics.

The MDM runs on SQLite only: these tests are about the data plane.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

import _tls
from _cluster import Cluster, route
from _mdm import MdmDaemon
from _sds import DEVICE_BYTES, PG_COUNT, POOL, SdsDaemon
from _wait import wait_until
from meshblock.chunks import CHUNK_SIZE, ChunkRef
from meshblock.wire import (
    ConnectionLost,
    HandshakeError,
    PeerRole,
    RequestError,
    Status,
    WireClient,
)
from meshblock.wire.handshake import CLIENT_HELLO, HELLO_MAGIC
from meshblock.wire.protocol import REQUEST, REQUEST_MAGIC, Op, pack_request

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("sds-cluster")
    mdm = MdmDaemon(root / "mdm", f"sqlite+aiosqlite:///{root / 'mdm.db'}", tls=True)
    mdm.start()
    daemons: list[SdsDaemon] = []
    try:
        api = mdm.api()
        status, pd = api.post("/api/v1/protection-domains", {"name": "pd1"})
        assert status == 201, pd
        for i in range(1, 5):
            status, body = api.post(
                "/api/v1/fault-sets", {"name": f"fs{i}", "protection_domain_id": pd["id"]}
            )
            assert status == 201, body
        status, pool = api.post(
            "/api/v1/pools",
            {"name": POOL, "protection_domain_id": pd["id"], "pg_count": PG_COUNT},
        )
        assert status == 201, pool
        daemons = [SdsDaemon(root / f"sds{i}", f"sds{i}", mdm, f"fs{i}") for i in range(1, 4)]
        for d in daemons:
            d.start()
        c = Cluster(mdm, daemons, pool["id"], root)
        # The tests' client identity (sdc:tests-client) as an SDC: the SDSs serve its
        # client IO only to volumes mapped to it (mapped_volume).
        status, body = api.post("/api/v1/sdc", {"guid": CLIENT_GUID, "name": "tests-client"})
        assert status == 201, body
        for d in daemons:
            d.wait_serving()
        c.wait_epoch_everywhere(c.pgmap()["epoch"])
        yield c
    finally:
        codes = {}
        for d in daemons:
            codes[d.name] = d.stop()
        mdm.stop()
        mdm.kill()
        for d in daemons:
            assert mdm.cluster_secret not in d.log_text(), f"{d.name} logged the secret"
        assert all(rc == 0 for rc in codes.values()), (
            f"SDS exit codes on SIGTERM: {codes}\n" + "\n".join(d.log_text() for d in daemons)
        )


# -- helpers -------------------------------------------------------------------------

CLIENT_GUID = _tls.ROLE_IDENTITY[PeerRole.CLIENT].removeprefix("sdc:")


def mapped_volume(c: Cluster, name: str) -> int:
    """A new volume of the pool mapped to the tests' client identity; its id."""
    api = c.mdm.api()
    status, vol = api.post(
        "/api/v1/volumes", {"name": name, "pool_id": c.pool_id, "size": "1GiB", "type": "thin"}
    )
    assert status == 201, vol
    status, sdcs = api.get("/api/v1/sdc")
    assert status == 200, sdcs
    (sdc_id,) = [x["id"] for x in sdcs["sdc"] if x["guid"] == CLIENT_GUID]
    status, m = api.post("/api/v1/mappings", {"volume_id": vol["id"], "sdc_id": sdc_id})
    assert status == 201, m
    return int(vol["id"])


async def connect(d: SdsDaemon, c: Cluster, role: PeerRole = PeerRole.CLIENT) -> WireClient:
    return await WireClient.connect("127.0.0.1", d.data_port, c.secret, role, tls=d.data_tls(role))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- tests ---------------------------------------------------------------------------


def test_map_has_primaries_and_secondaries_on_distinct_sds(cluster: Cluster) -> None:
    doc = cluster.pgmap()
    assert doc["pg_count"] == PG_COUNT
    for pg in doc["pgs"]:
        assert pg["primary"] and pg["secondary"]
        assert pg["primary"]["sds_id"] != pg["secondary"]["sds_id"]
    assert len(cluster.by_id(doc)) == 3


def test_write_then_both_copies_hold_it(cluster: Cluster) -> None:
    """docs/design.md, invariant 1: once a write is acknowledged, the secondary's copy
    has it."""
    doc = cluster.pgmap()
    volume = mapped_volume(cluster, "v101")

    async def main() -> None:
        for chunk in range(4):
            r = route(cluster, doc, volume, chunk)
            data = os.urandom(4096)
            async with (
                await connect(r.primary, cluster) as cl,
                await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
                await connect(r.primary, cluster, PeerRole.TOOL) as pri,
            ):
                await cl.write(r.ref, 8192, data)
                # right after the ack, with no flush and no delay:
                raw = await sec.read_raw_chunk(volume, chunk)
                assert raw.allocated
                assert bytes(raw.data[8192 : 8192 + 4096]) == data
                assert bytes(raw.data[:8192]) == bytes(8192)
                mine = await pri.read_raw_chunk(volume, chunk)
                assert bytes(mine.data) == bytes(raw.data)
                got = await cl.read(r.ref, 8192, 4096)
                assert bytes(got) == data
                # the third SDS holds no copy
                async with await connect(r.others[0], cluster, PeerRole.TOOL) as other:
                    assert not (await other.read_raw_chunk(volume, chunk)).allocated

    run(main())


def test_unwritten_chunk_reads_as_zeroes(cluster: Cluster) -> None:
    doc = cluster.pgmap()
    r = route(cluster, doc, mapped_volume(cluster, "v102"), 7)

    async def main() -> None:
        async with await connect(r.primary, cluster) as cl:
            got = await cl.read(r.ref, 0, CHUNK_SIZE)
            assert len(got) == CHUNK_SIZE and not any(got)

    run(main())


def test_concurrent_overlapping_writes_leave_identical_copies(cluster: Cluster) -> None:
    """docs/design.md, invariant 2: many overlapping writes from several connections
    at once, then both copies of every chunk are byte-identical (and equal to what the
    primary serves)."""
    doc = cluster.pgmap()
    volume = mapped_volume(cluster, "v103")
    chunks = list(range(6))
    rng = random.Random(1234)

    async def writer(conns: list[WireClient], n: int) -> None:
        for _ in range(n):
            chunk = rng.choice(chunks)
            r = route(cluster, doc, volume, chunk)
            cl = conns[cluster.sds.index(r.primary)]
            off = rng.randrange(0, CHUNK_SIZE - 65536, 512)
            size = rng.choice([512, 4096, 16384, 65536])
            op = rng.random()
            if op < 0.8:
                await cl.write(r.ref, off, rng.randbytes(size))
            elif op < 0.9:
                await cl.write_zeroes(r.ref, off, size)
            else:
                await cl.trim(r.ref, off, size)

    async def main() -> None:
        sets = [[await connect(d, cluster) for d in cluster.sds] for _ in range(4)]
        try:
            await asyncio.gather(*(writer(conns, 150) for conns in sets for _ in range(8)))
            for chunk in chunks:
                r = route(cluster, doc, volume, chunk)
                async with (
                    await connect(r.primary, cluster, PeerRole.TOOL) as a,
                    await connect(r.secondary, cluster, PeerRole.TOOL) as b,
                ):
                    ra, rb = (
                        await a.read_raw_chunk(volume, chunk),
                        await b.read_raw_chunk(volume, chunk),
                    )
                    assert ra.allocated == rb.allocated
                    assert bytes(ra.data) == bytes(rb.data), f"chunk {chunk} copies differ"
                    served = await sets[0][cluster.sds.index(r.primary)].read(r.ref, 0, CHUNK_SIZE)
                    assert bytes(served) == bytes(ra.data)
        finally:
            for conns in sets:
                for cl in conns:
                    await cl.close()

    run(main())


def test_whole_chunk_trim_frees_the_slot_on_both_copies(cluster: Cluster) -> None:
    doc = cluster.pgmap()
    volume, chunk = mapped_volume(cluster, "v104"), 0
    r = route(cluster, doc, volume, chunk)

    async def main() -> None:
        async with (
            await connect(r.primary, cluster) as cl,
            await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
        ):
            await cl.write(r.ref, 0, b"x" * CHUNK_SIZE)
            assert (await sec.read_raw_chunk(volume, chunk)).allocated
            await cl.trim(r.ref, 0, CHUNK_SIZE)
            assert not (await sec.read_raw_chunk(volume, chunk)).allocated
            got = await cl.read(r.ref, 0, 4096)
            assert not any(got)
            await cl.flush()

    run(main())


def test_not_primary_and_bad_pg_are_refused(cluster: Cluster) -> None:
    doc = cluster.pgmap()
    volume, chunk = mapped_volume(cluster, "v105"), 3
    r = route(cluster, doc, volume, chunk)

    async def main() -> None:
        async with await connect(r.secondary, cluster) as cl:
            with pytest.raises(RequestError) as ei:
                await cl.write(r.ref, 0, b"a" * 512)
            assert ei.value.status == Status.NOT_PRIMARY and ei.value.retriable
            with pytest.raises(RequestError) as ei:
                await cl.read(r.ref, 0, 512)
            assert ei.value.status == Status.NOT_PRIMARY
        async with await connect(r.primary, cluster) as cl:
            wrong_pg = (r.pg + 1) % PG_COUNT
            with pytest.raises(RequestError) as ei:
                await cl.write(ChunkRef(doc["pool_id"], wrong_pg, r.epoch, volume, chunk), 0, b"a")
            assert ei.value.status in (Status.INVALID, Status.NOT_PRIMARY)
            with pytest.raises(RequestError) as ei:
                await cl.read(r.ref, CHUNK_SIZE - 1, 2)
            assert ei.value.status == Status.INVALID and not ei.value.retriable
            # a client may not use replication ops, a tool may not write
            with pytest.raises(RequestError) as ei:
                await cl.repl_write(r.ref, 0, b"a")
            assert ei.value.status == Status.NOT_PERMITTED
        async with await connect(r.primary, cluster, PeerRole.TOOL) as tool:
            with pytest.raises(RequestError) as ei:
                await tool.write(r.ref, 0, b"a")
            assert ei.value.status == Status.NOT_PERMITTED
            # nothing was written by any refused request
            assert not (await tool.read_raw_chunk(volume, chunk)).allocated

    run(main())


def test_io_through_a_v2_and_a_v1_connection(cluster: Cluster) -> None:
    """Real daemons: a client of this release speaks protocol version 2 to an SDS, one
    that offers only version 1 (a client of the release before it) speaks 1; IO
    through either is mirrored to the secondary (SDS to SDS, version 2) and reads
    back through the other. docs/protocol.md §8."""
    doc = cluster.pgmap()
    volume = mapped_volume(cluster, "v109")

    async def main() -> None:
        for chunk in range(3):
            r = route(cluster, doc, volume, chunk)
            port, secret = r.primary.data_port, cluster.secret
            tls = r.primary.data_tls(PeerRole.CLIENT)
            async with (
                await WireClient.connect("127.0.0.1", port, secret, tls=tls) as v2,
                await WireClient.connect("127.0.0.1", port, secret, max_version=1, tls=tls) as v1,
                await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
            ):
                assert (v2.version, v1.version, sec.version) == (2, 1, 2)
                new, old = os.urandom(8192), os.urandom(4096)
                await v2.write(r.ref, 0, new, fua=True)
                await v1.write(r.ref, 65536, old)
                assert bytes(await v1.read(r.ref, 0, 8192)) == new
                assert bytes(await v2.read(r.ref, 65536, 4096)) == old
                await v1.flush()
                raw = await sec.read_raw_chunk(volume, chunk)
                assert raw.allocated
                assert bytes(raw.data[:8192]) == new
                assert bytes(raw.data[65536 : 65536 + 4096]) == old
                assert await v1.ping(doc["pool_id"]) == await v2.ping(doc["pool_id"]) >= 1

    run(main())


def test_wrong_secret_is_refused(cluster: Cluster) -> None:
    d = cluster.sds[0]

    async def main() -> None:
        with pytest.raises(HandshakeError):
            await WireClient.connect("127.0.0.1", d.data_port, "not-the-secret", tls=d.data_tls())
        # still serving the right secret
        async with await connect(d, cluster) as cl:
            assert await cl.ping(cluster.pool_id) >= 1

    run(main())
    assert "refusing data connection" in d.log_text()


def test_data_port_serves_tls_only(cluster: Cluster) -> None:
    """The harness's SDSs have certificates (as the lab's), so their data ports serve
    only TLS: a plain-TCP client is told so at once."""
    d = cluster.sds[0]

    async def main() -> None:
        with pytest.raises(HandshakeError, match="TLS_REQUIRED"):
            await WireClient.connect("127.0.0.1", d.data_port, cluster.secret)

    run(main())
    assert "a plain-TCP client: this data port serves only TLS" in d.log_text()


def test_raw_handshake_with_bad_proof_is_refused(cluster: Cluster) -> None:
    d = cluster.sds[1]
    with raw_connect(d) as s:
        s.sendall(CLIENT_HELLO.pack(HELLO_MAGIC, 1, PeerRole.CLIENT, 0, os.urandom(32)))
        s.recv(72)
        s.sendall(struct.pack(">I32s", 0x4D424850, os.urandom(32)))
        result = s.recv(8)
        assert result[4] == 1  # AUTH_FAILED
        assert s.recv(100) == b""  # closed


def _raw_session(d: SdsDaemon, secret: str) -> socket.socket:
    """A socket past the handshake, for sending hand-made frames."""
    from meshblock.wire.handshake import ClientHandshake

    s = raw_connect(d)
    hs = ClientHandshake(secret.encode(), PeerRole.CLIENT, version=1)  # v1 frames follow
    s.sendall(hs.hello())
    s.sendall(hs.on_server_hello(memoryview(_recv_exact(s, 72))))
    hs.on_result(memoryview(_recv_exact(s, 8)))
    return s


def raw_connect(d: SdsDaemon) -> socket.socket:
    """A socket to the SDS's data port, inside TLS as the harness's admin when the port
    serves TLS."""
    s = socket.create_connection(("127.0.0.1", d.data_port), timeout=5)
    tls = d.data_tls(PeerRole.CLIENT)
    return s if tls is None else tls.wrap_socket(s, server_hostname="127.0.0.1")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = s.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return buf


def _closed(s: socket.socket) -> bool:
    try:
        while True:
            part = s.recv(65536)
            if not part:
                return True
    except (ConnectionResetError, TimeoutError):
        return True


def test_fuzz_malformed_frames_drop_only_that_connection(cluster: Cluster) -> None:
    """Malformed, truncated, oversized frames and random bytes: the SDS drops that
    connection with a logged reason, keeps serving others and applies no partial
    write."""
    doc = cluster.pgmap()
    volume, chunk = mapped_volume(cluster, "v106"), 1
    r = route(cluster, doc, volume, chunk)
    d = r.primary
    rng = random.Random(99)

    def good_write(length: int, payload: bytes) -> bytes:
        return (
            pack_request(
                Op.WRITE,
                1,
                pool_id=doc["pool_id"],
                pg=r.pg,
                epoch=r.epoch,
                volume_id=volume,
                chunk_index=chunk,
                offset=0,
                length=length,
            )
            + payload
        )

    cases: list[bytes] = [
        b"\x00" * REQUEST.size,  # bad magic
        REQUEST.pack(REQUEST_MAGIC, 99, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0),  # unknown opcode
        REQUEST.pack(REQUEST_MAGIC, Op.PING, 0, 7, 1, 0, 0, 0, 0, 0, 0, 0),  # reserved != 0
        good_write(CHUNK_SIZE + 1, b"z" * 1000),  # oversized payload
        good_write(8192, b"P" * 5000),  # truncated: payload never completes
        *[rng.randbytes(rng.randrange(1, 300)) for _ in range(20)],  # random bytes
    ]
    for case in cases:
        s = _raw_session(d, cluster.secret)
        with s:
            s.settimeout(5)
            s.sendall(case)
            if case.startswith(good_write(8192, b"")[:8]) and len(case) < REQUEST.size + 8192:
                s.shutdown(socket.SHUT_WR)  # truncated frame then EOF
            elif len(case) < REQUEST.size:
                s.sendall(rng.randbytes(REQUEST.size))  # complete a header with junk
            assert _closed(s), f"connection survived {case[:16]!r}"
    # random bytes before/instead of the handshake
    for _ in range(10):
        with raw_connect(d) as s:
            s.sendall(rng.randbytes(rng.randrange(40, 200)))
            assert _closed(s)

    async def main() -> None:
        async with (
            await connect(d, cluster) as cl,
            await connect(d, cluster, PeerRole.TOOL) as tool,
            await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
        ):
            assert await cl.ping(doc["pool_id"]) == doc["epoch"]
            # no partial write from the truncated/oversized frames, on either copy
            assert not (await tool.read_raw_chunk(volume, chunk)).allocated
            assert not (await sec.read_raw_chunk(volume, chunk)).allocated
            await cl.write(r.ref, 0, b"ok" * 10)

    run(main())
    log = d.log_text()
    assert "bad request magic" in log
    assert "unknown opcode 99" in log
    assert "exceeds" in log
    assert "in the middle of a frame" in log
    assert d.proc is not None and d.proc.poll() is None


def test_fuzz_random_frames_with_valid_magic(cluster: Cluster) -> None:
    """Headers with a valid magic and random fields: each gets a status or a drop,
    the daemon survives and a well-formed client on another connection is unaffected."""
    doc = cluster.pgmap()
    d = cluster.sds[2]
    rng = random.Random(7)

    async def main() -> None:
        async with await connect(d, cluster) as bystander:
            for _ in range(30):
                s = _raw_session(d, cluster.secret)
                with s:
                    s.settimeout(5)
                    op = rng.choice([*range(1, 7), 16, 17, 18, 19, 32, 200])
                    length = rng.choice([0, 1, 512, CHUNK_SIZE, CHUNK_SIZE + 1, 2**32 - 1])
                    hdr = REQUEST.pack(
                        REQUEST_MAGIC,
                        op,
                        rng.randrange(256),
                        0,
                        rng.randrange(2**64),
                        rng.choice([doc["pool_id"], rng.randrange(2**32)]),
                        rng.randrange(2**32),
                        rng.randrange(2**64),
                        rng.randrange(2**64),
                        rng.randrange(2**64),
                        rng.randrange(2**32),
                        length,
                    )
                    payload = b"" if op not in (2, 16) else rng.randbytes(min(length, 4096))
                    s.sendall(hdr + payload)
                    s.shutdown(socket.SHUT_WR)
                    assert _closed(s)
                assert await bystander.ping(doc["pool_id"]) == doc["epoch"]

    run(main())
    assert d.proc is not None and d.proc.poll() is None
    d.wait_serving()


def test_health_and_metrics(cluster: Cluster) -> None:
    d = cluster.sds[0]
    h = d.health()
    assert h["status"] == "ok" and h["state"] == "serving" and h["mdm_reachable"]
    assert h["maps"][str(cluster.pool_id)] >= 1
    (dev,) = h["devices"]
    assert dev["capacity_bytes"] == DEVICE_BYTES and dev["pool_id"] == cluster.pool_id
    r = d.control_get("/metrics")
    assert r.status == 200
    text = r.body
    assert re.search(r'meshblock_sds_ops_total\{op="(write|repl_write|read|ping)"\} [1-9]', text)
    assert "meshblock_sds_op_duration_seconds_bucket" in text
    m = re.search(rf'meshblock_sds_device_capacity_bytes{{device="{d.device}"}} (\S+)', text)
    assert m is not None and float(m.group(1)) == DEVICE_BYTES
    assert "meshblock_sds_protocol_errors_total" in text


def test_heartbeat_reports_usage_to_the_mdm(cluster: Cluster) -> None:
    def reported() -> int:
        status, body = cluster.mdm.api().get("/api/v1/sds")
        assert status == 200
        return sum(dev["used_bytes"] for s in body["sds"] for dev in s["devices"])

    used = wait_until(reported, 10, "the MDM to report used bytes", interval=0.2)
    local = sum(s.health()["devices"][0]["used_bytes"] for s in cluster.sds)
    assert used > 0 and local > 0


def test_sds_keeps_serving_without_the_mdm(cluster: Cluster) -> None:
    """docs/design.md, invariant 5: IO continues on cached maps while the MDM is down."""
    doc = cluster.pgmap()
    volume = mapped_volume(cluster, "v107")
    cluster.mdm.stop()
    try:
        time.sleep(1.5)  # at least one failed heartbeat

        async def main() -> None:
            for chunk in range(3):
                r = route(cluster, doc, volume, chunk)
                async with (
                    await connect(r.primary, cluster) as cl,
                    await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
                ):
                    data = os.urandom(4096)
                    await cl.write(r.ref, 0, data, fua=True)
                    got = await cl.read(r.ref, 0, 4096)
                    assert bytes(got) == data
                    assert bytes((await sec.read_raw_chunk(volume, chunk, 0, 4096)).data) == data
                    await cl.flush()

        run(main())
        assert not cluster.sds[0].health()["mdm_reachable"]

        # An SDS restarted while the MDM is away serves from its cached state file,
        # with the data written before.
        r = route(cluster, doc, volume, 0)
        assert r.primary.stop() == 0
        r.primary.start()
        h = r.primary.wait_serving()
        assert h["status"] == "degraded" and not h["mdm_reachable"]

        async def after_restart() -> None:
            async with await connect(r.primary, cluster) as cl:
                got = await cl.read(r.ref, 0, 4096)
                data = os.urandom(512)
                await cl.write(r.ref, 4096, data)
            async with await connect(r.secondary, cluster, PeerRole.TOOL) as sec:
                raw = await sec.read_raw_chunk(volume, 0, 0, 4096 + 512)
                assert bytes(raw.data[:4096]) == bytes(got)
                assert bytes(raw.data[4096:]) == data

        run(after_restart())
    finally:
        cluster.mdm.start()
    wait_until(lambda: cluster.sds[0].health()["mdm_reachable"], 10, "sds1 to reach the MDM")
    assert cluster.sds[0].health()["mdm_reachable"]


def test_stale_epoch_is_refused_after_a_map_change(cluster: Cluster) -> None:
    """docs/design.md, invariant 3: a fourth SDS joins, the map moves on; requests
    with the old epoch are refused with EPOCH_STALE and the reply tells the new epoch.
    Runs last: it changes the cluster."""
    old = cluster.pgmap()
    volume, chunk = mapped_volume(cluster, "v108"), 2
    r_old = route(cluster, old, volume, chunk)
    fourth = SdsDaemon(cluster.workdir / "sds4", "sds4", cluster.mdm, "fs4")
    fourth.start()
    cluster.sds.append(fourth)
    fourth.wait_serving()
    new = cluster.pgmap()
    assert new["epoch"] > old["epoch"]
    cluster.wait_epoch_everywhere(new["epoch"])

    async def main() -> None:
        async with await connect(r_old.primary, cluster) as cl:
            with pytest.raises(RequestError) as ei:
                await cl.write(r_old.ref, 0, b"s")
            assert ei.value.status == Status.EPOCH_STALE
            assert ei.value.retriable and ei.value.epoch == new["epoch"]
        # the client refreshes and retries on the (possibly new) primary
        r = route(cluster, new, volume, chunk)
        async with (
            await connect(r.primary, cluster) as cl,
            await connect(r.secondary, cluster, PeerRole.TOOL) as sec,
        ):
            await cl.write(r.ref, 0, b"fresh")
            assert bytes((await sec.read_raw_chunk(volume, chunk, 0, 5)).data) == b"fresh"
        # nothing of the refused write anywhere
        for d in cluster.sds:
            async with await connect(d, cluster, PeerRole.TOOL) as tool:
                raw = await tool.read_raw_chunk(volume, chunk, 0, 5)
                assert bytes(raw.data) in (b"fresh", bytes(5))

    run(main())


def test_connection_loss_fails_pending_requests_with_cause(cluster: Cluster) -> None:
    d = cluster.sds[0]

    async def main() -> None:
        cl = await connect(d, cluster)
        cl._p.transport.abort()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionLost) as ei:
            await cl.ping()
        assert ei.value.retriable and ei.value.__cause__ is not None
        await cl.close()

    run(main())
