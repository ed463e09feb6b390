"""PG maps of storage pools: recomputed from the pool's devices, stored, served.

:func:`recompute` runs inside the transaction of a change of the pool's membership
(an SDS or a device joining or leaving, the pool created). It hands the pool's devices
and its current map to :func:`meshblock.mdm.placement.compute_map` (through the pure
:func:`plan_map`) and writes the PGs that changed through the PG table's gateway
(:mod:`meshblock.mdm.pgtable`) in a new ``map_epoch`` of the pool, changed or not: the
membership is part of the map.

Data safety: once a pool has volumes, a copy that is in place is never moved by a
recompute, because moving it means moving its data, which is the job of rebalance
(:mod:`meshblock.mdm.rebalance`, with the data). Only missing copies are filled. A
pool without volumes holds no data: its map is laid out afresh each time. A draining
SDS's devices take no new copy (:func:`pool_devices`); those holding data keep theirs
until rebalance moves them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import zlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from meshblock import pgmap_delta
from meshblock.mdm import pgtable
from meshblock.mdm.deletion import pool_tombstones
from meshblock.mdm.models import (
    Device,
    DeviceState,
    PgState,
    PlacementGroup,
    Sds,
    SdsMode,
    StoragePool,
    Volume,
)
from meshblock.mdm.pgtable import PgChange, PgRow
from meshblock.mdm.placement import DeviceInfo, PgAssignment, compute_map
from meshblock.mdm.vtrees import pool_trees, trees_doc


async def pool_devices(
    session: AsyncSession, pool_id: int, *, failed: bool = False, without: Collection[int] = ()
) -> list[DeviceInfo]:
    """The pool's devices that may take copies: not failed, and not of a draining
    SDS (its copies go, none comes). With ``failed``, every device that may keep its
    copies: failed ones and those of a draining SDS too (a copy holding data stays
    until rebalance moves it). Never those of ``without`` (being removed)."""
    q = (
        select(Device.id, Device.sds_id, Sds.fault_set_id, Device.capacity_bytes)
        .join(Sds, Sds.id == Device.sds_id)
        .where(Device.pool_id == pool_id)
        .order_by(Device.id)
    )
    if not failed:
        q = q.where(Device.state != DeviceState.FAILED, Sds.mode != SdsMode.DRAINING)
    if without:
        q = q.where(Device.id.not_in(list(without)))
    return [DeviceInfo(d, s, f, c) for d, s, f, c in await session.execute(q)]


async def recompute(
    session: AsyncSession, pool: StoragePool, *, without: Collection[int] = ()
) -> bool:
    """Recompute and store ``pool``'s map, in a new map epoch; True when a PG changed.
    ``without``: devices being removed, taken out of every PG first. Load, decide
    (:func:`plan_map`), write."""
    devices = await pool_devices(session, pool.id, without=without)
    rows = await pgtable.load(session, pool_id=pool.id)
    has_data = await holds_volumes(session, pool.id)
    # Every device that may keep its copies, failed ones too: the failure detector
    # fails a failed one over (it alone knows which copy is in sync).
    keeping = await pool_devices(session, pool.id, failed=True, without=without)
    changes = plan_map(pool.id, pool.pg_count, rows, devices, keeping, has_data=has_data)
    await pgtable.write(session, pool, changes)
    return bool(changes)


def plan_map(
    pool_id: int,
    pg_count: int,
    rows: Sequence[PgRow],
    devices: Sequence[DeviceInfo],
    keeping: Sequence[DeviceInfo],
    *,
    has_data: bool,
) -> list[PgChange]:
    """The changes that give a pool the map placement computes over ``devices`` (those
    that may take copies), pure. Copies on devices not in ``keeping`` (removed) are
    dropped first, with a move towards one. A pool that holds data keeps every other
    copy and only fills the missing ones (the filled PGs become ``rebuilding``); one
    without data is laid out afresh, so that it is as balanced and its copies'
    partners as spread as placement makes them, whatever the order in which the SDSs
    joined. A PG whose copies change loses its move (a move needs a clean PG with the
    copies it was planned on). A PG missing from ``rows`` is added."""
    present = {d.device_id for d in keeping}
    by_pg = {row.pg: _without_removed(row, present) for row in rows}
    previous: dict[int, PgAssignment] = {n: (r.primary, r.secondary) for n, r in by_pg.items()}
    if has_data:
        new = _fill_only(previous, compute_map(pg_count, devices, previous), keeping)
    else:
        new = compute_map(pg_count, devices)
    # A copy placed anew next to one holding data is empty: the primary rebuilds it.
    filled_state = PgState.REBUILDING if has_data else PgState.CLEAN
    changes = []
    for row in rows:
        if row.pg >= pg_count:
            continue
        after = by_pg[row.pg]
        primary, secondary = new.get(row.pg, (None, None))
        if (primary, secondary) != previous[row.pg]:
            # A move needs a clean PG with the copies it was planned on: it goes. (A
            # PgRow made directly: dataclasses.replace costs twice as much, for every
            # PG of a pool laid out afresh.)
            after = PgRow(
                after.pool_id, after.pg, primary, secondary, filled_state, epoch=after.epoch
            )
        if after != row:
            changes.append(PgChange(row, after))
    for n in range(pg_count):
        if n not in by_pg:
            primary, secondary = new.get(n, (None, None))
            changes.append(PgChange(None, PgRow(pool_id, n, primary, secondary, PgState.CLEAN)))
    return changes


def _without_removed(row: PgRow, present: Collection[int]) -> PgRow:
    """``row`` without the copies (and the move) on devices not ``present``: ``row``
    itself when they all are (most rows: no new PgRow for them)."""
    if (
        (row.primary is None or row.primary in present)
        and (row.secondary is None or row.secondary in present)
        and (row.target in present if row.target is not None else row.moving is None)
    ):
        return row

    def kept(device: int | None) -> int | None:
        return device if device in present else None

    target, moving = (row.target, row.moving) if row.target in present else (None, None)
    return replace(
        row,
        primary=kept(row.primary),
        secondary=kept(row.secondary),
        target=target,
        moving=moving,
    )


async def holds_volumes(session: AsyncSession, pool_id: int) -> bool:
    found = await session.execute(select(Volume.id).where(Volume.pool_id == pool_id).limit(1))
    return found.scalar() is not None


def _fill_only(
    previous: dict[int, PgAssignment],
    proposed: dict[int, PgAssignment],
    devices: Sequence[DeviceInfo],
) -> dict[int, PgAssignment]:
    """Keep every copy in place; fill a missing copy from ``proposed`` where legal."""
    info = {d.device_id: d for d in devices}

    def domain(dev: int) -> tuple[str, int]:
        d = info[dev]
        return ("fs", d.fault_set_id) if d.fault_set_id is not None else ("sds", d.sds_id)

    def compatible(a: int, b: int) -> bool:
        return info[a].sds_id != info[b].sds_id and domain(a) != domain(b)

    out: dict[int, PgAssignment] = {}
    for pg, (p, s) in proposed.items():
        old_p, old_s = previous.get(pg, (None, None))
        kept = [c for c in (old_p, old_s) if c is not None and c in info]
        if len(kept) == 2:
            out[pg] = (kept[0], kept[1])
        elif len(kept) == 1:
            partner = next(
                (c for c in (p, s) if c is not None and c != kept[0] and compatible(kept[0], c)),
                None,
            )
            out[pg] = (kept[0], partner)
        else:
            out[pg] = (p, s)
    return out


@dataclass
class MapDocument:
    """One pool's PG map document at one map epoch, encoded once and shared by every
    request and long-poll that serves that epoch (``body``: its JSON; the gzip of it
    made once, on the first request that accepts gzip)."""

    epoch: int
    doc: dict[str, Any]
    encoded: bytes | None = None  # ``body`` if given; else made by ``make`` when asked
    make: Callable[[], bytes] | None = field(default=None, repr=False)
    _gzipped: bytes | None = None
    _deflated: bytes | None = None

    @property
    def body(self) -> bytes:
        """The document's JSON, encoded once, when first asked for: a document that
        only deltas are served from (:meth:`MapCache.delta`) is never encoded whole."""
        if self.encoded is None:
            self.encoded = self.make() if self.make is not None else encode(self.doc)
        return self.encoded

    def deflated(self) -> bytes:
        """``body`` as raw deflate blocks ending at a byte boundary (a full flush,
        not the last block), made once: spliced into another gzip stream
        (:func:`gzip_pieces`), as ``GET /sdc/{id}/maps`` does with each pool's map."""
        if self._deflated is None:
            c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._deflated = c.compress(self.body) + c.flush(zlib.Z_FULL_FLUSH)
        return self._deflated

    async def gzipped(self) -> bytes:
        """The gzip of ``body``, compressed once, in a thread (zlib lets the event
        loop run meanwhile: half a megabyte takes 10-15 ms)."""
        if self._gzipped is None:
            self._gzipped = await asyncio.to_thread(gzip.compress, self.body, GZIP_LEVEL)
        return self._gzipped


GZIP_LEVEL = 6
GZIP_ABOVE = 16 * 1024  # a smaller document is sent as it is


def gzip_if_large(document: MapDocument) -> Callable[[], Awaitable[bytes]] | None:
    """``document``'s :meth:`MapDocument.gzipped` when it is worth compressing."""
    return document.gzipped if len(document.body) > GZIP_ABOVE else None


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time


def gzip_pieces(pieces: Sequence[bytes | MapDocument]) -> tuple[bytes, bytes]:
    """The concatenation of ``pieces`` (bytes, and map documents' bodies) and its
    gzip, one member, in which each document's deflated body (:meth:`MapDocument.
    deflated`, compressed once) is spliced as it is and only the bytes between them
    are compressed here. Each piece is compressed on its own and ends at a byte
    boundary (a full flush), so no back-reference crosses from one into another, and
    the stream is one valid deflate stream; the CRC-32 and length are the whole's."""
    deflate: list[bytes] = [_GZIP_HEADER]
    plain: list[bytes] = []
    crc = 0
    for piece in pieces:
        if isinstance(piece, MapDocument):
            data, packed = piece.body, piece.deflated()
        else:
            c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
            data, packed = piece, c.compress(piece) + c.flush(zlib.Z_FULL_FLUSH)
        crc = zlib.crc32(data, crc)
        plain.append(data)
        deflate.append(packed)
    body = b"".join(plain)
    # the last block: empty, final
    end = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH)
    deflate.append(end + struct.pack("<II", crc, len(body) & 0xFFFFFFFF))
    return body, b"".join(deflate)


#: Map epochs of a pool whose deltas the MDM keeps: a caller whose map is older than
#: the last this many epochs the MDM served (or of an epoch it never served, or from
#: before its start) gets the whole document (docs/mdm.md, "PG-map deltas").
DELTA_WINDOW = 64
#: A delta whose JSON is larger than this fraction of the whole document's is not
#: served: the caller gets the whole document (smaller to send, and no slower to take
#: than a delta that replaces most of it).
DELTA_MAX_FRACTION = 0.5
#: A delta of at most this many bytes is served whatever the whole document's size,
#: which is then not encoded to compare (a small pool's whole map is a few KB).
DELTA_ALWAYS_BELOW = 4096


@dataclass
class _Deltas:
    """A pool's deltas: ``steps[e]`` makes the next kept epoch's map of epoch ``e``'s
    (oldest first, at most :data:`DELTA_WINDOW`); ``digest``: of the newest document;
    ``answers``: the deltas from an epoch to the newest, encoded, made once each (None:
    too large, the caller gets the whole document)."""

    digest: int
    steps: dict[int, dict[str, Any]]
    answers: dict[int, MapDocument | None]


class MapCache:
    """The newest document of each pool, keyed by its map epoch, and the deltas that
    lead to it from the epochs served before (:meth:`delta`).

    A pool's ``map_epoch`` goes up with every change of what its document holds (its
    PGs, members, member SDSs' endpoints, throttles, tombstones, trees: docs/api.md,
    PgMap),
    in the transaction of the change, so a document built at one map epoch stays right
    for as long as the pool is at that epoch, whatever else changes in the cluster
    (volumes, mappings: the cluster epoch). A newer epoch read from the store replaces
    the entry; another MDM sharing the database bumps the same column."""

    def __init__(self, term: int = 0) -> None:
        # the leader term of this MDM (leader.py): in every document's head, so in the
        # deltas and their digests too (0: none, as documents of older MDMs)
        self.term = term
        self._docs: dict[int, MapDocument] = {}
        self._deltas: dict[int, _Deltas] = {}
        self.builds = 0  # documents built (a hit costs none)
        self.delta_builds = 0  # delta answers encoded (each shared by its callers)
        # pool -> its PGs' part of the document, reused by the next build while the
        # PG rows are the same (a tombstone or a member's endpoint changes the map
        # epoch, not the rows)
        self.pg_parts: dict[int, PgPart] = {}

    def get(self, pool_id: int, map_epoch: int) -> MapDocument | None:
        hit = self._docs.get(pool_id)
        return hit if hit is not None and hit.epoch == map_epoch else None

    def put(self, pool_id: int, document: MapDocument) -> None:
        old = self._docs.get(pool_id)
        if old is not None and old.epoch >= document.epoch:
            return
        self._docs[pool_id] = document
        kept = self._deltas.get(pool_id)
        try:
            if old is None or kept is None:
                raise ValueError("no earlier map")
            step = pgmap_delta.diff(old.doc, document.doc)
        except ValueError:
            # the first map (or one that cannot follow the last): deltas start here
            digest = pgmap_delta.digest(document.doc)
            self._deltas[pool_id] = _Deltas(digest, {}, {})
            return
        kept.digest = pgmap_delta.digest_after(kept.digest, old.doc, step)
        step["digest"] = pgmap_delta.digest_hex(kept.digest)
        kept.steps[old.epoch] = step
        while len(kept.steps) > DELTA_WINDOW:
            del kept.steps[next(iter(kept.steps))]
        kept.answers = {}

    def forget(self, pool_id: int) -> None:
        """Drop what is kept of a deleted pool (its document, deltas and PG part)."""
        self._docs.pop(pool_id, None)
        self._deltas.pop(pool_id, None)
        self.pg_parts.pop(pool_id, None)

    def delta(self, pool_id: int, since: int, document: MapDocument) -> MapDocument | None:
        """The delta from the pool's map at epoch ``since`` to ``document`` (the pool's
        newest), made once per ``since`` and shared; None when there is none: an epoch
        not served within the last :data:`DELTA_WINDOW` (or not by this MDM), a
        ``document`` of another epoch than the newest one kept, or a delta larger than
        :data:`DELTA_MAX_FRACTION` of the whole document (and than
        :data:`DELTA_ALWAYS_BELOW`)."""
        kept = self._deltas.get(pool_id)
        newest = self._docs.get(pool_id)
        # (``document`` may be another build of the same epoch, made concurrently)
        if kept is None or newest is None or newest.epoch != document.epoch:
            return None
        document = newest
        if since in kept.answers:
            return kept.answers[since]
        if since == document.epoch:
            answer = {k: v for k, v in document.doc.items() if k not in pgmap_delta.COLLECTIONS}
            answer |= {
                "from_epoch": since,
                "pgs": [],
                "digest": pgmap_delta.digest_hex(kept.digest),
            }
            for key in pgmap_delta.KEYED:
                answer |= {key: {}, key + "_removed": []}
        elif since in kept.steps:
            epochs = list(kept.steps)
            answer = kept.steps[since]
            for e in epochs[epochs.index(since) + 1 :]:
                answer = pgmap_delta.compose(answer, kept.steps[e])
        else:
            return None
        self.delta_builds += 1
        body = encode(answer)
        too_large = len(body) > DELTA_ALWAYS_BELOW and len(body) > DELTA_MAX_FRACTION * len(
            document.body
        )
        hit = kept.answers[since] = None if too_large else MapDocument(document.epoch, answer, body)
        return hit


class MapEpochs:
    """Every pool's map epoch as of a cluster epoch, read once for all the map
    long-polls that wake at that cluster epoch: a change wakes every SDS following a
    map (a thousand long-polls), and each asked the store for its pool's map epoch;
    now the first reads them all in one query and the others take its answer."""

    def __init__(self) -> None:
        self._at = -1  # the cluster epoch the store was read at (or after)
        self._epochs: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self.reads = 0

    async def get(
        self, sessions: async_sessionmaker[AsyncSession], cluster_epoch: int
    ) -> dict[int, int]:
        """Pool id -> map epoch, read at or after ``cluster_epoch`` (the epoch the
        caller has seen published: every change up to it is committed)."""
        if self._at < cluster_epoch:
            async with self._lock:
                if self._at < cluster_epoch:
                    async with sessions() as s:
                        rows = await s.execute(select(StoragePool.id, StoragePool.map_epoch))
                        self._epochs = {i: int(e) for i, e in rows}
                    self._at = cluster_epoch
                    self.reads += 1
        return self._epochs


async def map_documents(
    session: AsyncSession, pools: list[StoragePool], cache: MapCache | None = None
) -> dict[int, MapDocument]:
    """The PG map documents of ``pools`` (see docs/api.md, PgMap), at the map epoch
    each ``pools`` row carries.

    With ``cache``, a document is built once per map epoch: a thousand SDSs fetching a
    changed map, and every SDC maps request meanwhile, cost one build, not a thousand.
    A document is cached only when the pool's map epoch read again after the build is
    still the one it was built for: on SQLite the statements of one read see the
    store as of each statement, and a change committed between them would otherwise be
    cached under the older epoch.
    """
    if not pools:
        return {}
    out: dict[int, MapDocument] = {}
    missing = []
    for p in pools:
        hit = cache.get(p.id, p.map_epoch) if cache is not None else None
        if hit is not None:
            out[p.id] = hit
        else:
            missing.append(p)
    if missing:
        built = await _build(
            session,
            missing,
            cache.pg_parts if cache is not None else None,
            cache.term if cache is not None else 0,
        )
        if cache is not None:
            cache.builds += len(missing)
            now = dict(
                (
                    await session.execute(
                        select(StoragePool.id, StoragePool.map_epoch).where(
                            StoragePool.id.in_([p.id for p in missing])
                        )
                    )
                ).all()
            )
        for p in missing:
            doc, body = built[p.id]
            document = MapDocument(p.map_epoch, doc, make=body)
            out[p.id] = document
            if cache is not None and now.get(p.id) == p.map_epoch:
                cache.put(p.id, document)
    return out


def encode(doc: Any) -> bytes:
    """JSON as the API serves it (aiohttp's ``json_response`` encoder)."""
    return json.dumps(doc).encode()


def _pg_rows_query() -> Select[Any]:
    """PGs, each copy with its SDS, in (pool, PG) order: the statements below are
    built once, so that their compiled forms are cached."""
    pg = PlacementGroup.__table__
    dev = Device.__table__
    pdev, sdev, tdev = dev.alias("pdev"), dev.alias("sdev"), dev.alias("tdev")
    return (
        select(
            pg.c.pool_id,
            pg.c.pg,
            pg.c.primary_device_id,
            pg.c.secondary_device_id,
            pg.c.state,
            pg.c.target_device_id,
            pg.c.moving,
            pdev.c.sds_id,
            sdev.c.sds_id,
            tdev.c.sds_id,
        )
        .select_from(
            pg.outerjoin(pdev, pdev.c.id == pg.c.primary_device_id)
            .outerjoin(sdev, sdev.c.id == pg.c.secondary_device_id)
            .outerjoin(tdev, tdev.c.id == pg.c.target_device_id)
        )
        .order_by(pg.c.pool_id, pg.c.pg)
    )


_PG_ROWS = _pg_rows_query().where(
    PlacementGroup.__table__.c.pool_id.in_(bindparam("pool_ids", expanding=True))
)
# one pool's rows written after a map epoch (``since``)
_PG_ROWS_SINCE = _pg_rows_query().where(
    PlacementGroup.__table__.c.pool_id == bindparam("pool_id"),
    PlacementGroup.__table__.c.epoch > bindparam("since"),
)


@dataclass
class PgPart:
    """A pool's PGs as its document lists them (``pgs``; ``sds``: the SDSs they
    name; :meth:`body`: encoded, once), with what identifies the rows they were built
    from: their number and their highest epoch (:func:`meshblock.mdm.pgtable.row_keys`):
    while both are the same the rows are too, and the part is reused; when only the
    highest epoch moved, the rows changed since are read and patched in (the other
    entries shared with the older part)."""

    key: tuple[int, int]
    pgs: list[dict[str, Any]]
    sds: frozenset[int]
    _body: bytes | None = None

    def body(self) -> bytes:
        if self._body is None:
            self._body = encode(self.pgs)
        return self._body


async def _build(
    session: AsyncSession,
    pools: list[StoragePool],
    parts: dict[int, PgPart] | None = None,
    term: int = 0,
) -> dict[int, tuple[dict[str, Any], Callable[[], bytes]]]:
    """Each pool's document and what encodes it; with ``parts``, the PGs' part of a
    pool whose rows did not change since it was built is reused, one whose rows
    changed patched (and ``parts`` updated)."""
    ids = [p.id for p in pools]
    conn = await session.connection()
    # The rows' keys first, the PGs next (with the SDS of each copy from the same
    # statement), members and addresses after. On SQLite two SELECTs of one
    # transaction may see different snapshots: read in this order, a part is never
    # kept under a key newer than its rows, and every device and SDS a PG names is
    # there (a device leaves the PGs, a new key, before it is deleted).
    keys = await pgtable.row_keys(session, ids)
    have = parts if parts is not None else {}
    reused = {i: have[i] for i in ids if i in have and have[i].key == keys.get(i, (0, 0))}
    built: dict[int, PgPart] = {}
    for i in ids:
        # the same number of rows, some newer: only those are read
        old = have.get(i)
        if i not in reused and old is not None and old.key[0] == keys.get(i, (0, 0))[0]:
            since = (await conn.execute(_PG_ROWS_SINCE, {"pool_id": i, "since": old.key[1]})).all()
            patched = _patched(old, since, keys[i])
            if patched is not None:
                built[i] = patched
    stale = [i for i in ids if i not in reused and i not in built]
    built |= _pg_parts(
        (await conn.execute(_PG_ROWS, {"pool_ids": stale})).all() if stale else [],
        stale,
        keys,
    )
    if parts is not None:
        parts.update(built)
    pg_parts = reused | built
    dev_rows = (
        await conn.execute(
            select(Device.id, Device.sds_id, Device.pool_id)
            .where(Device.pool_id.in_(ids))
            .order_by(Device.id)
        )
    ).all()
    named = {sds for _, sds, _ in dev_rows}.union(*(part.sds for part in pg_parts.values()))
    sds_rows = (
        await conn.execute(
            select(Sds.id, Sds.address, Sds.data_port, Sds.name).where(Sds.id.in_(named))
        )
    ).all()
    # the name: an SDS checks a peer's certificate (sds:NAME) against the map
    sds_doc = {i: {"address": a, "data_port": p, "name": n} for i, a, p, n in sorted(sds_rows)}
    tombstones = await pool_tombstones(session, ids)
    trees = await pool_trees(session, ids)
    out: dict[int, tuple[dict[str, Any], Callable[[], bytes]]] = {}
    for p in pools:
        part = pg_parts[p.id]
        members = [(d, sds) for d, sds, pool_id in dev_rows if pool_id == p.id]
        member_sds = {sds for _, sds in members} | part.sds
        head = {
            "pool_id": p.id,
            "epoch": p.map_epoch,
            "pg_count": p.pg_count,
            "rebuild_concurrency": p.rebuild_concurrency,
            "rebuild_bandwidth_mibps": p.rebuild_bandwidth_mibps,
            "rebalance_concurrency": p.rebalance_concurrency,
            "rebalance_bandwidth_mibps": p.rebalance_bandwidth_mibps,
        }
        if term:
            head["term"] = term
        tail: dict[str, Any] = {
            "devices": [{"device_id": d, "sds_id": sds} for d, sds in members],
            "sds": {str(k): v for k, v in sds_doc.items() if k in member_sds},
            # Deleted volumes whose chunks the SDSs free: volume id -> map epoch of
            # the delete (meshblock.mdm.deletion).
            "tombstones": tombstones[p.id],
        }
        # Snapshot trees with more than one volume or version (meshblock.mdm.vtrees):
        # absent when there are none, so a pool without snapshots has the document
        # it had before trees. In the head of each delta, whole (pgmap_delta).
        pool_tree_doc = trees_doc(trees.get(p.id, {}))
        if pool_tree_doc:
            tail["trees"] = pool_tree_doc
        out[p.id] = ({**head, "pgs": part.pgs, **tail}, _splicer(head, part, tail))
    return out


def _splicer(head: dict[str, Any], part: PgPart, tail: dict[str, Any]) -> Callable[[], bytes]:
    """The document's JSON, made when first asked for: the PGs' part spliced in as
    encoded (once per part), the same bytes as encoding it all."""

    def body() -> bytes:
        return encode(head)[:-1] + b', "pgs": ' + part.body() + b", " + encode(tail)[1:]

    return body


def _entries(rows: Sequence[Any]) -> list[tuple[int, dict[str, Any]]]:
    """(pool id, PG entry) of each of ``rows`` (``_PG_ROWS``), pure."""
    dev_sds: dict[int, int] = {}
    for _, _, primary, secondary, _, target, _, p_sds, s_sds, t_sds in rows:
        for dev, sds in ((primary, p_sds), (secondary, s_sds), (target, t_sds)):
            if dev is not None and sds is not None:
                dev_sds.setdefault(dev, sds)
    copies: dict[int, dict[str, int] | None] = {}

    def copy(device_id: int | None) -> dict[str, int] | None:
        # one dict per device, shared by the PGs naming it (read-only: encoded once)
        if device_id is None:
            return None
        c = copies.get(device_id)
        if c is None:
            c = copies[device_id] = _copy(device_id, dev_sds)
        return c

    out = []
    for pool_id, pg, primary, secondary, state, target, moving, *_ in rows:
        entry: dict[str, Any] = {
            "pg": pg,
            "primary": copy(primary),
            "secondary": copy(secondary),
            "state": state.value,
        }
        if target is not None:
            entry["target"] = copy(target)
            entry["moving"] = moving
        out.append((pool_id, entry))
    return out


def _named(pgs: list[dict[str, Any]]) -> frozenset[int]:
    """The SDSs that PG entries name."""
    return frozenset(
        c["sds_id"]
        for entry in pgs
        for c in (entry["primary"], entry["secondary"], entry.get("target"))
        if c
    )


def _pg_parts(
    rows: Sequence[Any], pool_ids: list[int], keys: dict[int, tuple[int, int]]
) -> dict[int, PgPart]:
    """The PGs' parts of ``pool_ids`` from their rows (``_PG_ROWS``), pure."""
    pgs: dict[int, list[dict[str, Any]]] = {i: [] for i in pool_ids}
    for pool_id, entry in _entries(rows):
        pgs[pool_id].append(entry)
    return {i: PgPart(keys.get(i, (0, 0)), pgs[i], _named(pgs[i])) for i in pool_ids}


def _patched(old: PgPart, rows: Sequence[Any], key: tuple[int, int]) -> PgPart | None:
    """``old`` with the entries of ``rows`` (``_PG_ROWS_SINCE``: the rows written since
    ``old`` was built) in place of theirs, the others shared; None if a row is of a PG
    ``old`` does not list where its number says (build the part anew), pure."""
    pgs = list(old.pgs)
    for _, entry in _entries(rows):
        n = entry["pg"]
        if not (0 <= n < len(pgs) and pgs[n]["pg"] == n):
            return None
        pgs[n] = entry
    return PgPart(key, pgs, _named(pgs))


def _copy(device_id: int | None, dev_sds: dict[int, int]) -> dict[str, int] | None:
    if device_id is None:
        return None
    return {"sds_id": dev_sds[device_id], "device_id": device_id}
