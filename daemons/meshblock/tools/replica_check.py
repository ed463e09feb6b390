"""Prove that both copies of every chunk of a volume are byte-identical.

docs/design.md, invariant 2: once no write is in flight, the two replicas of a chunk are
byte-identical. This checker reads, for every chunk of a volume, the copy on the PG's
primary and the copy on its secondary straight from the two SDSs (``CHUNK_READ_RAW``
over the data protocol, role ``TOOL``, authenticated with the cluster secret) and
compares them. The operator runs it as ``meshctl volume verify VOLUME``
(``docs/meshctl.md``); :func:`check_volume` is the library entry.

- Each chunk's block checksums are compared first (``CHUNK_CSUMS``, when both SDSs
  have it; ``meshblock.sds.scrub.classify``): blocks that do not match their
  checksums on one copy are reported with the copy that is right
  (:class:`BadBlocks`) and the chunk's bytes are not read (the SDS's read would
  repair them); with ``repair`` the bad copy's SDS rewrites them from the right one
  (``CHUNK_CSUMS`` with ``HEAL``) and the bytes are compared after. A difference
  whose copies each match their own checksums is ``divergent``: which is right is
  not known.
- A chunk that neither SDS stores (never written, or trimmed) is identical: both read
  as zeroes. A chunk stored on one copy only is compared as zeroes on the other and
  counted in ``allocation_mismatches`` (informational: the bytes are what matter).
- A chunk whose copies differ is read again (``RECHECKS`` times, ``RECHECK_PAUSE_S``
  apart) before it is reported, so a write that is in flight during the check is not
  taken for a divergence. Run it on a volume that nobody writes for a clean proof.
- A chunk that cannot be compared (its PG has fewer than two copies in the map, an
  SDS cannot be reached or fails the read) is reported as ``unchecked``.
- Only ``clean`` PGs are compared (a map without ``state`` is all clean). In a
  ``degraded`` PG the secondary is stale by design until it is resynchronised, and an
  ``inactive`` PG has no reachable in-sync copy: their chunks are not read, only
  counted (``skipped_degraded`` / ``skipped_inactive``), and the PGs are listed
  (``degraded_pgs`` / ``inactive_pgs``, every such PG of the pool). They do not make
  the check fail: ``ok`` (exit code 0 of ``meshctl volume verify``) means that every
  chunk of every clean PG was compared and both copies are identical; exit code 1
  means some differ or could not be compared. ``fully_redundant`` is ``ok`` with no
  PG of the pool degraded or inactive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshblock.chunks import CHUNK_SIZE, pg_of
from meshblock.pgmap_doc import CLEAN, PgCopy, PgMapDoc
from meshblock.pgmap_doc import parse as parse_pgmap
from meshblock.sds.scrub import (
    BOTH_BAD,
    DIVERGENT,
    PRIMARY_BAD,
    Rows,
    ask_csums,
    classify,
    fixed,
    unchecked_of,
)
from meshblock.wire import HandshakeError, PeerRole, WireClient, WireError
from meshblock.wire.handshake import FEATURE_CHUNK_CSUMS

CONCURRENCY = 16  # chunks compared at once (two 1 MiB reads each)
RECHECKS = 2
RECHECK_PAUSE_S = 0.5
COMPARE_BLOCK = 4096  # granularity at which the first difference is located
DEGRADED, INACTIVE = "degraded", "inactive"

_ZEROES = bytes(CHUNK_SIZE)

Progress = Callable[[int, int], None]  # (chunks done, chunks total)


@dataclass(frozen=True)
class Copy:
    """Where one copy of a PG lives: the SDS's id, name (if known) and data address."""

    sds_id: int
    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Difference:
    chunk: int
    pg: int
    primary: str
    secondary: str
    offset: int  # first differing byte within the chunk
    differing_bytes: int
    # what the checksums say: "divergent" (each copy matches its own: which is right
    # is not known), None when they were not compared (a peer without CHUNK_CSUMS)
    judged: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "pg": self.pg,
            "primary": self.primary,
            "secondary": self.secondary,
            "offset_in_chunk": self.offset,
            "volume_offset": self.chunk * CHUNK_SIZE + self.offset,
            "differing_bytes": self.differing_bytes,
            "judged": self.judged,
        }


@dataclass
class BadBlocks:
    """4 KiB blocks of one copy of a chunk that do not match their checksums, judged
    against the other copy's (``meshblock.sds.scrub.classify``)."""

    chunk: int
    pg: int
    blocks: list[int]
    bad: str  # the copy whose blocks are bad ("both": no copy is right)
    right: str | None  # the copy that is right, None when neither is
    repaired: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk": self.chunk,
            "pg": self.pg,
            "blocks": self.blocks,
            "bad_copy": self.bad,
            "right_copy": self.right,
            "repaired": self.repaired,
        }


@dataclass(frozen=True)
class Unchecked:
    chunk: int
    pg: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "pg": self.pg, "reason": self.reason}


@dataclass
class Report:
    volume_id: int
    volume_name: str
    chunks: int
    identical: int = 0
    stored_on_both: int = 0
    stored_on_neither: int = 0
    allocation_mismatches: list[int] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    bad_blocks: list[BadBlocks] = field(default_factory=list)
    unchecked: list[Unchecked] = field(default_factory=list)
    degraded_pgs: list[int] = field(default_factory=list)  # of the pool, from the map
    inactive_pgs: list[int] = field(default_factory=list)
    skipped_degraded: int = 0  # chunks of this volume in degraded PGs (not compared)
    skipped_inactive: int = 0  # chunks in inactive PGs (not compared)

    @property
    def ok(self) -> bool:
        """True when every chunk was compared, both copies are identical and no block
        is left that does not match its checksum."""
        return (
            not self.differences and not self.unchecked and all(b.repaired for b in self.bad_blocks)
        )

    @property
    def fully_redundant(self) -> bool:
        """``ok``, and every PG of the pool is clean (two in-sync copies)."""
        return self.ok and not self.degraded_pgs and not self.inactive_pgs

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": {"id": self.volume_id, "name": self.volume_name},
            "ok": self.ok,
            "fully_redundant": self.fully_redundant,
            "chunks": self.chunks,
            "identical": self.identical,
            "stored_on_both": self.stored_on_both,
            "stored_on_neither": self.stored_on_neither,
            "allocation_mismatches": sorted(self.allocation_mismatches),
            "differences": [d.to_json() for d in sorted(self.differences, key=_by_chunk)],
            "bad_blocks": [b.to_json() for b in sorted(self.bad_blocks, key=_by_chunk)],
            "unchecked": [u.to_json() for u in sorted(self.unchecked, key=_by_chunk)],
            "degraded_pgs": sorted(self.degraded_pgs),
            "inactive_pgs": sorted(self.inactive_pgs),
            "skipped_degraded": self.skipped_degraded,
            "skipped_inactive": self.skipped_inactive,
        }


def _by_chunk(x: Difference | Unchecked | BadBlocks) -> int:
    return x.chunk


def copies_of(pgmap: PgMapDoc, names: Mapping[int, str]) -> list[tuple[Copy, Copy] | None]:
    """For each PG of a map, its (primary, secondary), or None if it lacks one."""

    def copy(entry: PgCopy | None) -> Copy | None:
        where = None if entry is None else pgmap.sds.get(entry.sds_id)
        if where is None:
            return None
        name = names.get(where.sds_id, f"sds#{where.sds_id}")
        return Copy(where.sds_id, name, where.address, where.data_port)

    out: list[tuple[Copy, Copy] | None] = []
    for pg in pgmap.pgs:
        p, s = copy(pg.primary), copy(pg.secondary)
        out.append((p, s) if p is not None and s is not None else None)
    return out


def states_of(pgmap: PgMapDoc) -> dict[int, str]:
    """Each PG's state in a map (``clean`` when the document has none)."""
    return {pg.pg: pg.state for pg in pgmap.pgs}


def first_difference(a: bytes, b: bytes) -> tuple[int, int]:
    """(offset of the first differing byte, number of differing bytes) of two equal-length
    buffers that differ."""
    first = -1
    count = 0
    for start in range(0, len(a), COMPARE_BLOCK):
        x, y = a[start : start + COMPARE_BLOCK], b[start : start + COMPARE_BLOCK]
        if x == y:
            continue
        diffs = [i for i in range(len(x)) if x[i] != y[i]]
        if first < 0:
            first = start + diffs[0]
        count += len(diffs)
    return first, count


class _Connections:
    """One TOOL connection per SDS, opened on first use and shared by all chunks."""

    def __init__(self, secret: str, min_version: int, tls: ssl.SSLContext | None) -> None:
        self._secret = secret
        self._tls = tls
        self._min_version = min_version
        self._clients: dict[tuple[str, int], asyncio.Task[WireClient]] = {}

    async def get(self, copy: Copy) -> WireClient:
        key = (copy.host, copy.port)
        task = self._clients.get(key)
        if task is None or (task.done() and (task.exception() or task.result().closed)):
            task = asyncio.ensure_future(
                WireClient.connect(
                    copy.host,
                    copy.port,
                    self._secret,
                    PeerRole.TOOL,
                    min_version=self._min_version,
                    tls=self._tls,
                )
            )
            self._clients[key] = task
        return await asyncio.shield(task)

    async def close(self) -> None:
        for task in self._clients.values():
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await (await task).close()


async def check_volume(
    volume: Mapping[str, Any],
    pgmap: Mapping[str, Any],
    secret: str,
    *,
    sds_names: Mapping[int, str] | None = None,
    concurrency: int = CONCURRENCY,
    progress: Progress | None = None,
    wire_min_version: int = 1,
    tls: ssl.SSLContext | None = None,
    repair: bool = False,
) -> Report:
    """Compare both copies of every chunk of ``volume`` (an API Volume document) using
    ``pgmap`` (the API's PgMap document of the volume's pool; a malformed one raises
    :class:`meshblock.pgmap_doc.PgMapError`). ``wire_min_version``: the lowest data
    protocol version spoken to the SDSs (``docs/protocol.md`` §8); ``tls``: dial their
    data ports over TLS with it (an admin certificate: ``meshblock.wire.tls``).

    Each chunk's checksums are compared first (CHUNK_CSUMS, when both SDSs have it):
    blocks that do not match their checksums are reported with the copy that is
    right (:class:`BadBlocks`), and the chunk's bytes are not read (a read heals, and
    without ``repair`` nothing is changed). With ``repair`` the SDS of the bad copy
    rewrites them from the other copy (CHUNK_CSUMS with HEAL), then the bytes are
    compared as usual."""
    parsed = parse_pgmap(pgmap)
    volume_id = int(volume["id"])
    chunks = -(-int(volume["size_bytes"]) // CHUNK_SIZE)
    report = Report(volume_id, str(volume.get("name", volume_id)), chunks)
    pg_count = parsed.pg_count
    placement = copies_of(parsed, sds_names or {})
    states = states_of(parsed)
    # degraded or resyncing: one in-sync copy; the other is stale or being caught up
    report.degraded_pgs = sorted(pg for pg, st in states.items() if st not in (CLEAN, INACTIVE))
    report.inactive_pgs = sorted(pg for pg, st in states.items() if st == INACTIVE)
    conns = _Connections(secret, wire_min_version, tls)
    done = 0
    next_chunk = iter(range(chunks))

    async def read(copy: Copy, chunk: int) -> bytes | None:
        """The copy's bytes, or None when the SDS holds no slot for it (zeroes)."""
        client = await conns.get(copy)
        raw = await client.read_raw_chunk(volume_id, chunk)
        return bytes(raw.data) if raw.allocated else None

    async def judge(primary: Copy, secondary: Copy, chunk: int, pg: int) -> tuple[bool, str | None]:
        """The chunk's checksums on both copies: (whether to go on and compare its
        bytes, ``divergent`` when its copies differ each matching its checksums)."""
        cp, cs = await asyncio.gather(conns.get(primary), conns.get(secondary))
        if not cp.features & cs.features & FEATURE_CHUNK_CSUMS:
            return True, None  # an SDS of an older release: the bytes alone
        rows: list[Rows | None] = list(
            await asyncio.gather(cp.chunk_csums(volume_id, chunk), cs.chunk_csums(volume_id, chunk))
        )
        found = classify(rows[0], rows[1])
        by_kind: dict[str, list[int]] = {}
        for block, kind in found:
            by_kind.setdefault(kind, []).append(block)
        divergent = DIVERGENT if by_kind.pop(DIVERGENT, None) else None
        left = False
        for kind, blocks in sorted(by_kind.items()):
            if kind == BOTH_BAD:
                entry = BadBlocks(chunk, pg, blocks, "both", None)
            elif kind == PRIMARY_BAD:
                entry = BadBlocks(chunk, pg, blocks, primary.name, secondary.name)
            else:
                entry = BadBlocks(chunk, pg, blocks, secondary.name, primary.name)
            if repair and kind != BOTH_BAD:
                # Judged by the rows after: a block without a checksum is replaced too,
                # and counts as repaired once it has one and the other copy's bytes.
                ours = kind == PRIMARY_BAD
                bad, other = (rows[0], rows[1]) if ours else (rows[1], rows[0])
                client = cp if ours else cs
                unknown = unchecked_of(bad, blocks)
                healed = await ask_csums(client, volume_id, chunk, unknown, True)
                entry.repaired = fixed(healed, other, blocks) == blocks
            report.bad_blocks.append(entry)
            left = left or not entry.repaired
        return not left, divergent

    async def compare(chunk: int) -> None:
        pg = pg_of(volume_id, chunk, pg_count)
        state = states.get(pg, CLEAN)
        if state != CLEAN:
            # the secondary is stale (degraded) or nothing is reachable (inactive)
            if state == INACTIVE:
                report.skipped_inactive += 1
            else:
                report.skipped_degraded += 1
            return
        pair = placement[pg] if pg < len(placement) else None
        if pair is None:
            report.unchecked.append(Unchecked(chunk, pg, "the PG has fewer than two copies"))
            return
        primary, secondary = pair
        try:
            go_on, judged = await judge(primary, secondary, chunk, pg)
        except HandshakeError:
            raise
        except (WireError, OSError, TimeoutError) as exc:
            report.unchecked.append(Unchecked(chunk, pg, f"checksums not read: {exc}"))
            return
        if not go_on:
            return
        for attempt in range(RECHECKS + 1):
            try:
                a, b = await asyncio.gather(read(primary, chunk), read(secondary, chunk))
            except HandshakeError:
                raise  # the secret or the version: no chunk can be read
            except (WireError, OSError, TimeoutError) as exc:
                report.unchecked.append(Unchecked(chunk, pg, f"read failed: {exc}"))
                return
            if (a or _ZEROES) == (b or _ZEROES):
                break
            if attempt < RECHECKS:
                await asyncio.sleep(RECHECK_PAUSE_S)
        else:
            offset, count = first_difference(a or _ZEROES, b or _ZEROES)
            report.differences.append(
                Difference(chunk, pg, primary.name, secondary.name, offset, count, judged)
            )
            return
        report.identical += 1
        if a is not None and b is not None:
            report.stored_on_both += 1
        elif a is None and b is None:
            report.stored_on_neither += 1
        else:
            report.allocation_mismatches.append(chunk)

    async def worker() -> None:
        nonlocal done
        for chunk in next_chunk:
            await compare(chunk)
            done += 1
            if progress is not None:
                progress(done, chunks)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        await conns.close()
    return report
