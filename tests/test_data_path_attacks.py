"""An attacker on the data path (issue 13): a stolen SDC certificate, a stolen SDS
certificate, and none, each with the cluster secret, against a cluster whose data
protocol runs over TLS with client certificates (the harness's default).

Every attack is refused with a clear status (or in the TLS handshake), logged by the
SDS with the identity, and changes nothing: ``meshctl volume verify``'s checker finds
both copies of every chunk identical and the PG map's epoch has not moved.

- as the SDC: CHUNK_READ_RAW, CHUNK_CSUMS and CHUNK_LIST of a volume (claiming the
  TOOL role), a REPL_WRITE to a chunk's secondary (claiming SDS_PEER); client IO to a
  volume not mapped to it, to a volume id that does not exist, and writes to a volume
  mapped to it read-only (the SDS checks client IO against the mappings the MDM
  publishes: sds/access.py);
- as an SDS that is not the chunk's primary: a REPL_WRITE to its secondary, and client
  IO (a WRITE, claiming CLIENT); as one holding no copy of the chunk's PG, a raw read,
  the checksums and the PG's chunk list from its primary;
- without a certificate: the TLS handshake is refused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import _tls
from _cluster import SmallCluster, small_cluster
from _sds import PG_COUNT, SdsDaemon
from _wait import wait_until
from meshblock import pki
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.tools.replica_check import check_volume
from meshblock.wire import tls as wire_tls
from meshblock.wire.client import RequestError, WireClient
from meshblock.wire.handshake import HandshakeError
from meshblock.wire.protocol import PeerRole, Status
from test_nbd_server import qemu_io

pytestmark = pytest.mark.cluster

VOLUME = "attacked"
MiB = 1024 * 1024
CHUNK = 3  # a chunk the test writes through the SDC first
Op = Callable[[WireClient], Awaitable[Any]]  # a request on a connection


@pytest.fixture(scope="module")
def ac(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallCluster]:
    root = tmp_path_factory.mktemp("attacks")
    with small_cluster(root, VOLUME, "64MiB", {"cluster": {"heartbeat_timeout_s": 30.0}}) as c:
        qemu_io(c.sdc.uri(VOLUME), f"write -P 0x42 {CHUNK * CHUNK_SIZE} 64k", "flush")
        yield c


def stolen(identity: str) -> ssl.SSLContext:
    files = _tls.component_identity(identity)
    return wire_tls.dial_context(files.ca, files.cert, files.key, files.crl)


def sdc_identity(c: SmallCluster) -> str:
    return f"sdc:{c.sdc.settings['sdc'].get('guid') or c.sdc.cert_guid}"


def roles(c: SmallCluster, doc: dict[str, Any]) -> tuple[ChunkRef, SdsDaemon, SdsDaemon, SdsDaemon]:
    """The chunk's ref, its primary's, its secondary's and the third SDS's daemons."""
    pg = pg_of(c.volume_id, CHUNK, PG_COUNT)
    entry = doc["pgs"][pg]
    by_id = {c.sds_id(d): d for d in c.sds}
    primary = by_id[entry["primary"]["sds_id"]]
    secondary = by_id[entry["secondary"]["sds_id"]]
    (third,) = [d for d in c.sds if d not in (primary, secondary)]
    ref = ChunkRef(c.pool_id, pg, doc["epoch"], c.volume_id, CHUNK)
    return ref, primary, secondary, third


async def refused(d: SdsDaemon, secret: str, tls: ssl.SSLContext, role: PeerRole, op: Any) -> None:
    """``op(client)`` on a connection to ``d`` as ``role`` is refused NOT_PERMITTED."""
    async with await WireClient.connect("127.0.0.1", d.data_port, secret, role, tls=tls) as client:
        with pytest.raises(RequestError) as info:
            await op(client)
        assert info.value.status == Status.NOT_PERMITTED


def refusal_logged(d: SdsDaemon, what: str, identity: str) -> bool:
    """Whether ``d`` logged a refused request ``what...`` from ``identity``."""
    return any(
        f"refused {what}" in line and f"from {identity} at" in line
        for line in d.log_text().splitlines()
    )


def unchanged(c: SmallCluster, epoch: int) -> None:
    doc = c.pgmap()
    assert doc["epoch"] == epoch
    vol = {"id": c.volume_id, "name": VOLUME, "size_bytes": 64 * MiB}
    report = asyncio.run(
        check_volume(vol, doc, c.mdm.cluster_secret, tls=_tls.data_context(c.mdm.tls))
    )
    assert report.ok and report.fully_redundant, report.to_json()
    # the chunk still reads as written (qemu_io fails on a pattern mismatch)
    qemu_io(c.sdc.uri(VOLUME), f"read -P 0x42 {CHUNK * CHUNK_SIZE} 64k", read_only=True)


def test_stolen_sdc_certificate_reads_no_raw_chunk_and_writes_no_replica(ac: SmallCluster) -> None:
    doc = ac.pgmap()
    ref, primary, secondary, _ = roles(ac, doc)
    sdc = sdc_identity(ac)
    tls = stolen(sdc)
    secret = ac.mdm.cluster_secret

    async def main() -> None:
        for op in (
            lambda cl: cl.read_raw_chunk(ac.volume_id, CHUNK),
            lambda cl: cl.chunk_csums(ac.volume_id, CHUNK),
            lambda cl: cl.list_chunks(ac.pool_id, ref.pg),
        ):
            await refused(primary, secret, tls, PeerRole.TOOL, op)
        await refused(
            secondary,
            secret,
            tls,
            PeerRole.SDS_PEER,
            lambda cl: cl.repl_write(ref, 0, b"\xee" * 4096),
        )

    asyncio.run(main())
    assert refusal_logged(primary, f"CHUNK_READ_RAW (volume {ac.volume_id} chunk {CHUNK})", sdc)
    assert refusal_logged(primary, f"CHUNK_CSUMS (volume {ac.volume_id} chunk {CHUNK})", sdc)
    assert refusal_logged(primary, "CHUNK_LIST (volume 0 chunk 0)", sdc)
    assert refusal_logged(secondary, f"REPL_WRITE (volume {ac.volume_id} chunk {CHUNK})", sdc)
    unchanged(ac, doc["epoch"])


def test_stolen_sds_certificate_does_no_client_io(ac: SmallCluster) -> None:
    doc = ac.pgmap()
    ref, primary, _, third = roles(ac, doc)
    tls = stolen(f"sds:{third.name}")

    async def main() -> None:
        await refused(
            primary,
            ac.mdm.cluster_secret,
            tls,
            PeerRole.CLIENT,
            lambda cl: cl.write(ref, 0, b"\xee" * 4096),
        )

    asyncio.run(main())
    assert refusal_logged(primary, "WRITE (volume", f"sds:{third.name}")
    unchanged(ac, doc["epoch"])


def test_stolen_sds_certificate_writes_no_replica_of_a_pg_it_is_not_primary_of(
    ac: SmallCluster,
) -> None:
    """The SDS that is neither the chunk's primary nor its secondary, and the secondary
    itself, send REPL_WRITE to the secondary: refused, only the primary's are taken."""
    doc = ac.pgmap()
    ref, _, secondary, third = roles(ac, doc)
    secret = ac.mdm.cluster_secret

    async def main() -> None:
        for thief in (third, secondary):
            await refused(
                secondary,
                secret,
                stolen(f"sds:{thief.name}"),
                PeerRole.SDS_PEER,
                lambda cl: cl.repl_write(ref, 0, b"\xee" * 4096),
            )

    asyncio.run(main())
    for thief in (third, secondary):
        assert refusal_logged(secondary, "REPL_WRITE (volume", f"sds:{thief.name}")
    assert "not the PG's primary" in secondary.log_text()
    unchanged(ac, doc["epoch"])


def test_stolen_sds_certificate_reads_nothing_of_a_pg_it_holds_no_copy_of(
    ac: SmallCluster,
) -> None:
    """The SDS that holds no copy of the chunk's PG asks its primary for the chunk's
    bytes, checksums and the PG's chunk list: refused; the secondary (which heals
    from the primary) is served."""
    doc = ac.pgmap()
    ref, primary, secondary, third = roles(ac, doc)
    secret = ac.mdm.cluster_secret
    reads: list[Op] = [
        lambda cl: cl.read_raw_chunk(ac.volume_id, CHUNK),
        lambda cl: cl.chunk_csums(ac.volume_id, CHUNK),
        lambda cl: cl.list_chunks(ac.pool_id, ref.pg),
    ]

    async def main() -> None:
        thief = stolen(f"sds:{third.name}")
        for op in reads:
            await refused(primary, secret, thief, PeerRole.SDS_PEER, op)
        mate = stolen(f"sds:{secondary.name}")
        async with await WireClient.connect(
            "127.0.0.1", primary.data_port, secret, PeerRole.SDS_PEER, tls=mate
        ) as cl:
            assert bytes((await cl.read_raw_chunk(ac.volume_id, CHUNK, 0, 4096)).data) == (
                b"\x42" * 4096
            )

    asyncio.run(main())
    ident = f"sds:{third.name}"
    assert refusal_logged(primary, f"CHUNK_READ_RAW (volume {ac.volume_id} chunk {CHUNK})", ident)
    assert refusal_logged(primary, f"CHUNK_CSUMS (volume {ac.volume_id} chunk {CHUNK})", ident)
    assert refusal_logged(primary, "CHUNK_LIST (volume 0 chunk 0)", ident)
    assert "holds no copy of the chunk's PG" in primary.log_text()
    unchanged(ac, doc["epoch"])


def test_stolen_secondary_certificate_gets_no_checksums_or_chunk_list_of_the_primary(
    ac: SmallCluster,
) -> None:
    """Only a PG's primary asks for a copy's checksums (its scrub) and chunk list (its
    copy jobs): the secondary's certificate asking the primary for them is refused,
    its raw read (it heals from the primary) still served."""
    doc = ac.pgmap()
    ref, primary, secondary, _ = roles(ac, doc)
    mate = stolen(f"sds:{secondary.name}")
    reads: list[Op] = [
        lambda cl: cl.chunk_csums(ac.volume_id, CHUNK),
        lambda cl: cl.list_chunks(ac.pool_id, ref.pg),
    ]

    async def main() -> None:
        for op in reads:
            await refused(primary, ac.mdm.cluster_secret, mate, PeerRole.SDS_PEER, op)

    asyncio.run(main())
    ident = f"sds:{secondary.name}"
    assert refusal_logged(primary, f"CHUNK_CSUMS (volume {ac.volume_id} chunk {CHUNK})", ident)
    assert refusal_logged(primary, "CHUNK_LIST (volume 0 chunk 0)", ident)
    assert "is not the primary of the chunk's PG" in primary.log_text()
    # and in its audit log, summarised per caller (sds/refusals.py)
    wait_until(
        lambda: any(
            '"event":"data_refused"' in line and f'"who":"{ident}"' in line
            for line in primary.log_text().splitlines()
        ),
        10,
        "the refusals in the audit log",
    )
    unchanged(ac, doc["epoch"])


def test_no_certificate_is_refused_in_the_handshake(ac: SmallCluster, tmp_path: Path) -> None:
    doc = ac.pgmap()
    _, primary, _, _ = roles(ac, doc)
    ca = _tls.ca()
    bare = pki.client_context(ca.cert_path, crl=ca.crl_path)
    bare.check_hostname = False

    async def main() -> None:
        with pytest.raises(HandshakeError):
            await WireClient.connect(
                "127.0.0.1", primary.data_port, ac.mdm.cluster_secret, PeerRole.SDS_PEER, tls=bare
            )

    asyncio.run(main())
    # logged once the SDS has closed the connection, which the client may see first
    wait_until(
        lambda: "it presented no certificate" in primary.log_text(), 10.0, "the refusal logged"
    )
    unchanged(ac, doc["epoch"])


# -- client IO checked against the mappings (sds/access.py) -------------------------


def volume(c: SmallCluster, name: str, access_mode: str | None) -> int:
    """A new volume of the pool, mapped to the SDC with ``access_mode`` (None: not
    mapped); its id."""
    api = c.mdm.api()
    status, vol = api.post(
        "/api/v1/volumes", {"name": name, "pool_id": c.pool_id, "size": "64MiB", "type": "thin"}
    )
    assert status == 201, vol
    if access_mode is not None:
        sdc_id = c.sdc.health()["sdc_id"]
        body = {"volume_id": vol["id"], "sdc_id": sdc_id, "access_mode": access_mode}
        status, m = api.post("/api/v1/mappings", body)
        assert status == 201, m
    return int(vol["id"])


def chunk_route(
    c: SmallCluster, doc: dict[str, Any], vol: int, chunk: int
) -> tuple[ChunkRef, SdsDaemon]:
    """The chunk's ref and its primary's daemon."""
    pg = pg_of(vol, chunk, PG_COUNT)
    by_id = {c.sds_id(d): d for d in c.sds}
    primary = by_id[doc["pgs"][pg]["primary"]["sds_id"]]
    return ChunkRef(c.pool_id, pg, doc["epoch"], vol, chunk), primary


def as_sdc(c: SmallCluster, d: SdsDaemon) -> Any:
    """A client connection to ``d`` with the SDC's stolen certificate."""
    return WireClient.connect(
        "127.0.0.1", d.data_port, c.mdm.cluster_secret, PeerRole.CLIENT, tls=stolen(sdc_identity(c))
    )


def stored_nowhere(c: SmallCluster, vol: int, chunk: int) -> None:
    """No SDS holds a slot of the chunk (read raw with the admin certificate)."""

    async def main() -> None:
        for d in c.sds:
            tls = _tls.data_context(c.mdm.tls)
            async with await WireClient.connect(
                "127.0.0.1", d.data_port, c.mdm.cluster_secret, PeerRole.TOOL, tls=tls
            ) as cl:
                assert not (await cl.read_raw_chunk(vol, chunk)).allocated, d.name

    asyncio.run(main())


def test_stolen_sdc_certificate_does_no_io_to_a_volume_not_mapped_to_it(ac: SmallCluster) -> None:
    vol = volume(ac, "unmapped", None)
    doc = ac.pgmap()
    ref, primary = chunk_route(ac, doc, vol, 0)
    ops: dict[str, Op] = {
        "WRITE": lambda cl: cl.write(ref, 0, b"\xee" * 4096),
        "READ": lambda cl: cl.read(ref, 0, 4096),
        "TRIM": lambda cl: cl.trim(ref, 0, 4096),
        "WRITE_ZEROES": lambda cl: cl.write_zeroes(ref, 0, 4096),
    }

    async def main() -> None:
        async with await as_sdc(ac, primary) as cl:
            for op in ops.values():
                with pytest.raises(RequestError) as info:
                    await op(cl)
                assert info.value.status == Status.NOT_PERMITTED

    asyncio.run(main())
    for name in ops:
        assert refusal_logged(primary, f"{name} (volume {vol} chunk 0)", sdc_identity(ac))
    assert "is not mapped to it" in primary.log_text()
    stored_nowhere(ac, vol, 0)
    unchanged(ac, doc["epoch"])


def test_stolen_sdc_certificate_does_no_io_to_a_volume_that_does_not_exist(
    ac: SmallCluster,
) -> None:
    doc = ac.pgmap()
    vol = 999_999
    ref, primary = chunk_route(ac, doc, vol, 0)

    # and a pool id the SDS has no map of: refused without asking the MDM
    no_pool = ref._replace(pool_id=4242)

    async def main() -> None:
        async with await as_sdc(ac, primary) as cl:
            for r in (ref, no_pool):
                with pytest.raises(RequestError) as info:
                    await cl.write(r, 0, b"\xee" * 4096)
                assert info.value.status == Status.NOT_PERMITTED

    asyncio.run(main())
    assert refusal_logged(primary, f"WRITE (volume {vol} chunk 0)", sdc_identity(ac))
    assert "volume 999999 of pool 4242 is not mapped" in primary.log_text()
    assert "/api/v1/pools/4242/mappings" not in ac.mdm.log_text()
    stored_nowhere(ac, vol, 0)
    unchanged(ac, doc["epoch"])


def test_stolen_sdc_certificate_does_not_write_a_volume_mapped_to_it_read_only(
    ac: SmallCluster,
) -> None:
    vol = volume(ac, "readonly", "read_only")
    doc = ac.pgmap()
    ref, primary = chunk_route(ac, doc, vol, 0)
    writes: dict[str, Op] = {
        "WRITE": lambda cl: cl.write(ref, 0, b"\xee" * 4096),
        "TRIM": lambda cl: cl.trim(ref, 0, 4096),
        "WRITE_ZEROES": lambda cl: cl.write_zeroes(ref, 0, 4096),
    }

    async def main() -> None:
        async with await as_sdc(ac, primary) as cl:
            assert bytes(await cl.read(ref, 0, 4096)) == bytes(4096)  # reads are served
            for op in writes.values():
                with pytest.raises(RequestError) as info:
                    await op(cl)
                assert info.value.status == Status.NOT_PERMITTED

    asyncio.run(main())
    for name in writes:
        assert refusal_logged(primary, f"{name} (volume {vol} chunk 0)", sdc_identity(ac))
    assert f"volume {vol} is mapped to it read-only" in primary.log_text()
    stored_nowhere(ac, vol, 0)
    unchanged(ac, doc["epoch"])


def test_io_right_after_map_is_served_and_after_unmap_refused(ac: SmallCluster) -> None:
    """The SDC's first IO after the map call returned is served even if the SDS has
    not had the new mappings yet (it fetches them once before refusing); after the
    unmap call returns the SDS refuses the SDC within the long-poll's answer."""
    vol = volume(ac, "mapped-now", "read_write")  # IO at once, no wait for the SDS
    doc = ac.pgmap()
    ref, primary = chunk_route(ac, doc, vol, 0)

    async def write() -> None:
        async with await as_sdc(ac, primary) as cl:
            await cl.write(ref, 0, b"\x5a" * 4096)

    asyncio.run(write())
    api = ac.mdm.api()
    status, found = api.get(f"/api/v1/mappings?volume_id={vol}")
    assert status == 200, found
    (mapping,) = found["mappings"]
    status, _ = api.delete(f"/api/v1/mappings/{mapping['id']}")
    assert status == 204

    async def refused_write() -> bool:
        async with await as_sdc(ac, primary) as cl:
            try:
                await cl.write(ref, 0, b"\xa5" * 4096)
            except RequestError as exc:
                return exc.status == Status.NOT_PERMITTED
        return False

    wait_until(lambda: asyncio.run(refused_write()), 5.0, "the unmapped volume's write refused")
    assert "is not mapped to it" in primary.log_text()
