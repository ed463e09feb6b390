"""The SDS's IO path: what each data-protocol request does.

:class:`DataService` gets every decoded request from a connection
(:mod:`meshblock.sds.server`) and answers it with exactly one reply. It is only the
request handler: what it serves from (store, maps, peers, locks, the degraded record,
tombstones, identity) is the SDS's state, :class:`~meshblock.sds.state.SdsState`,
which it shares with the copy jobs, the metrics and the MDM link; it holds nothing
but the tasks of the requests in progress.

- the checks of ``docs/protocol.md`` §3: range, epoch against the pool's map
  (``EPOCH_STALE`` for older, a short wait then ``MAP_PENDING`` for newer), the role
  of this SDS for the PG (``NOT_PRIMARY`` / ``NOT_REPLICA``; the secondary of a PG
  that is not ``clean`` holds a stale copy and refuses REPL ops with ``NOT_REPLICA``);
- reads and the secondary's replication ops run synchronously in the event loop
  (page-cache IO, no task); primary writes run as a task: the write is queued to the
  secondary first, then applied locally, then the secondary's answer is awaited, all
  under a per-chunk range lock (:class:`~meshblock.sds.replication.RangeLocks`);
- in a PG that is not ``clean`` (degraded / inactive) the primary writes alone and
  records the chunk in :class:`~meshblock.sds.replication.DegradedWrites`; a write
  whose forwarding fails for a lost connection is completed alone when our newest map
  already says that the PG is served by us alone, else refused (``REPLICA_FAILED``);
- FLUSH syncs the local devices and REPL_FLUSHes the peers written to since; a peer
  that fails it and is no longer the in-sync secondary of any PG we are primary of
  holds only stale copies and is dropped from the flush;
- fail-stop on device errors (``docs/sds.md``, "Device errors"): a request whose copy
  is on a failed device is answered ``DEVICE_FAILED`` (retriable: the MDM fails the
  copy over), and a FLUSH fails the same way as long as our map names a failed device
  as an in-sync copy; once it does not, that device's copies are stale and the flush
  covers the working devices.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final, Protocol, cast

from meshblock import pki
from meshblock.chunks import CHUNK_SIZE, ChunkRef, pg_of
from meshblock.sds.access import SdcAccess
from meshblock.sds.checksums import ChecksumError, bad_in_rows
from meshblock.sds.heal import repair_from_peer
from meshblock.sds.maps import PgMap
from meshblock.sds.refusals import RefusalAudit
from meshblock.sds.resync import Resync
from meshblock.sds.scrub import crcs_of, unchecked_in, with_adopted
from meshblock.sds.state import SdsState
from meshblock.sds.store import Device, DeviceFailed, NoSpace, VolumeDeleted, chunk_key
from meshblock.wire import csum
from meshblock.wire.client import ConnectionLost, Reply, WireError
from meshblock.wire.protocol import (
    CHUNK_ENTRY,
    MAP_WAIT_S,
    MAX_CHUNK_INDEX,
    MAX_PAYLOAD,
    PRIMARY_OPS,
    Op,
    ReplyFlag,
    ReqFlag,
    Request,
    Status,
)

log = logging.getLogger(__name__)

_FUA: Final = int(ReqFlag.FUA)
_REPLICA: Final = int(ReqFlag.REPLICA)
_HOLE: Final = int(ReplyFlag.HOLE)
_HEAL: Final = int(ReqFlag.HEAL)
_CLIENT_CHECKS: Final = int(ReqFlag.CLIENT_CHECKS)
_ADOPT: Final = int(ReqFlag.ADOPT)
_NO_SLOT: Final = (b"", b"")  # CHUNK_CSUMS of a chunk without a slot here
_WAIT: Final = -1  # check result: the request's epoch is ahead of our map
_OK: Final = int(Status.OK)
_FAILED: Final = int(Status.DEVICE_FAILED)
_MISMATCH: Final = int(Status.CHECKSUM_MISMATCH)
_LOST: Final = -2  # a forward's outcome: the connection to the peer is lost
_READ_ONLY: Final = -3  # check result: a client write to a read-only view (a snapshot)
_REPL_OF: Final[dict[int, Op]] = {
    Op.WRITE: Op.REPL_WRITE,
    Op.WRITE_ZEROES: Op.REPL_WRITE_ZEROES,
    Op.TRIM: Op.REPL_TRIM,
}
# Client IO checked against the mappings, and those of it that write (sds/access.py).
_VOLUME_IO: Final = frozenset({int(Op.READ), int(Op.WRITE), int(Op.WRITE_ZEROES), int(Op.TRIM)})
_READ: Final = int(Op.READ)
# What an SDS peer reads of a PG's copy here: only a peer holding a copy of the PG may.
_PEER_READS: Final = frozenset({int(Op.CHUNK_READ_RAW), int(Op.CHUNK_CSUMS), int(Op.CHUNK_LIST)})
_PRIMARY_READS: Final = frozenset({int(Op.CHUNK_CSUMS), int(Op.CHUNK_LIST)})
# A request's chunk address: Request's fields 5 to 9 are ChunkRef's, in its order
# (tests/test_sds_requests.py), so _chunk_ref(req[5:10]) makes one with a slice.
_chunk_ref: Final = ChunkRef._make
# What a secondary's answer becomes in the reply to the client.
_PEER_STATUS: Final = {
    Status.EPOCH_STALE: Status.EPOCH_STALE,
    Status.MAP_PENDING: Status.MAP_PENDING,
    Status.NO_SPACE: Status.NO_SPACE,
    Status.SHUTTING_DOWN: Status.REPLICA_FAILED,
    Status.DELETED: Status.DELETED,  # the secondary knew of the delete first
    # the forwarded payload arrived damaged: the client sends it again
    Status.CHECKSUM_MISMATCH: Status.CHECKSUM_MISMATCH,
}


def _sender(conn: Connection, primary: bool) -> str | None:
    """The SDS a replica request comes from, by its certificate's name (None for a
    request to the primary, or on a connection without TLS): what _check compares
    with the PG's primary."""
    return None if primary else getattr(conn, "peer_sds", None)


class Connection(Protocol):
    """What the handler needs of a connection (:class:`meshblock.sds.server.DataConnection`)."""

    @property
    def allowed(self) -> frozenset[int]:
        """The opcodes its role may send."""

    @property
    def role(self) -> str:
        """What the peer is (``client``, ``sds_peer``, ``tool``)."""

    def reply(
        self,
        request_id: int,
        status: int,
        epoch: int,
        flags: int,
        payload: memoryview | None,
        length: int = -1,
    ) -> None:
        """``length`` > 0: ``payload`` is that many bytes, then their checksums."""


class IdentifiedConnection(Connection, Protocol):
    """A connection whose client's certificate names an SDC (``sdc_guid``) or an SDS
    (``peer_sds``)."""

    @property
    def sdc_guid(self) -> str | None:
        """The GUID of the SDC the client's certificate names."""

    @property
    def peer_sds(self) -> str | None:
        """The name of the SDS the client's certificate names."""

    def refuse(self, req: Request, why: str) -> None:
        """Answer ``req`` NOT_PERMITTED, logged with the identity and counted."""


def _is_mdm_probe(conn: Connection) -> bool:
    """Whether a PING on ``conn`` is the MDM's data-path probe, which keeps a primary
    cut off from its peers from fencing itself (docs/sds.md, "Self-fencing"): on a TLS
    data port only from an ``mdm:`` certificate (any identity may PING on a TOOL
    connection: a stolen SDC key must not keep a cut-off SDS unfenced); on a plain-TCP
    port, which names no identity, a TOOL connection's, as the cluster secret is all
    there is to tell the MDM by there (docs/security.md)."""
    if conn.role != "tool":
        return False
    identity = getattr(conn, "identity", None)
    return identity is None or getattr(identity, "kind", None) == pki.Kind.MDM


class DataService:
    """The request handler of one SDS: what each request does, on the SDS's state
    (:class:`~meshblock.sds.state.SdsState`); the copy jobs (:class:`Resync`) are told
    of the forwarded writes a move target missed."""

    def __init__(self, state: SdsState, resync: Resync) -> None:
        self._state = state
        #: Where refusals are summarised for the audit log (set by the app).
        self.refusal_audit: RefusalAudit | None = None
        self._resync = resync
        self._cache = state.maps
        self._maps = state.maps.maps  # pool id -> newest map
        self._store = state.store
        self.stats = state.stats  # also bumped by the connections (server.py)
        self._peers = state.peers
        self._locks = state.locks
        self._degraded = state.degraded
        self._refused = state.tombstones.refused  # the one lookup on the request path
        self._access: SdcAccess = state.access
        self._tasks: set[asyncio.Task[None]] = set()
        # Until the first FLUSH (with maps): this process does not know which peers
        # an earlier one forwarded to (:meth:`_mark_every_peer`).
        self._peers_unknown = True
        #: Test-only (the fault hook, docs/sds.md): damages a received write payload.
        self.corrupt_payload: Callable[[memoryview], None] | None = None

    @property
    def store_checksums(self) -> bool:
        """Whether the store keeps block checksums (``[store] checksums``)."""
        return self._store.checksums

    # -- dispatch ---------------------------------------------------------------------

    def handle(self, conn: Connection, req: Request, payload: memoryview) -> None:
        """Answer one request (now, or from a task)."""
        t0 = time.perf_counter()
        op = req.opcode
        if op not in conn.allowed:
            refuse = getattr(conn, "refuse", None)
            if refuse is not None:  # with its reason, not the replica writes' one
                refuse(req, f"not an operation its connection ({conn.role}) may send")
            else:
                self._reply(conn, req, t0, Status.NOT_PERMITTED)
            return
        # An SDC's certificate: client IO only to a volume mapped to it (sds/access.py).
        guid = getattr(conn, "sdc_guid", None)
        if guid is not None and op in _VOLUME_IO:
            if self._access.refusal(req.pool_id, req.volume_id, guid, op != _READ) is not None:
                sdc = cast(IdentifiedConnection, conn)
                self._spawn(self._mapped_after_refresh(sdc, guid, req, payload, t0))
                return
        elif op in _PEER_READS:
            sds = getattr(conn, "peer_sds", None)
            if sds is not None and self._copy_holder(req, sds) is not None:
                peer = cast(IdentifiedConnection, conn)
                self._spawn(self._held_after_map(peer, sds, req, payload, t0))
                return
        self._serve(conn, req, payload, t0)

    def _copy_holder(self, req: Request, sds: str) -> int | None:
        """None when the SDS named ``sds`` may read what ``req`` asks (a raw read, the
        checksums or the chunk list of a PG): our map of the PG's pool names it as a
        copy of the PG or its move target (for the checksums and the chunk list, which
        only the PG's primary asks for, by its scrub and its copy jobs: as its primary),
        or the chunk has no slot here (nothing to read), or we have no map of the pool
        or one that names no SDS (an older MDM). Else the pool whose newer map may name
        it."""
        if req.opcode == Op.CHUNK_LIST:
            pool = req.pool_id
            m = self._maps.get(pool)
            pg = req.pg
        else:
            loc = self._store.location(req.volume_id, req.chunk_index)
            if loc is None or loc[0].pool_id is None:
                return None
            pool = loc[0].pool_id
            m = self._maps.get(pool)
            pg = 0 if m is None else pg_of(req.volume_id, req.chunk_index, m.pg_count)
        if m is None or not m.sds_names or pg >= m.pg_count:
            return None  # answered as before: MAP_PENDING, INVALID
        sds_id = m.sds_names.get(sds)
        if sds_id is None:
            return pool
        if req.opcode in _PRIMARY_READS:  # only the PG's primary scrubs and copies it
            return None if m.primary[pg][0] == sds_id else pool
        return None if m.names(pg, sds_id) else pool

    async def _held_after_map(
        self, conn: IdentifiedConnection, sds: str, req: Request, payload: memoryview, t0: float
    ) -> None:
        """A peer's read of a PG that our map does not make it hold: served if a newer
        map within MAP_WAIT_S does (each map that comes is checked, and ours once more
        at the deadline), else refused NOT_PERMITTED. The epoch the request was sent
        by (0: unknown) only refuses early: once our map is at it or past it, the
        reader's map is the one that lags and no map of ours will name it sooner."""
        pool = self._copy_holder(req, sds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAP_WAIT_S
        while pool is not None:
            ours = self._cache.epoch(pool)
            left = deadline - loop.time()
            if left <= 0 or 0 < req.epoch <= ours:
                break
            # the next map, not the request's: a map in between may name the reader
            await self._cache.wait_for(pool, ours + 1, left)
            pool = self._copy_holder(req, sds)  # also the last check at the deadline
        if pool is None:
            self._serve(conn, req, payload, t0)
        else:
            why = "is not the primary of" if req.opcode in _PRIMARY_READS else "holds no copy of"
            conn.refuse(req, f"sds:{sds} {why} the chunk's PG in this SDS's map")

    async def _mapped_after_refresh(
        self, conn: IdentifiedConnection, guid: str, req: Request, payload: memoryview, t0: float
    ) -> None:
        """A client IO that the newest mappings refuse: served if the pool's mappings
        fetched after it arrived allow it (mapped since), else refused NOT_PERMITTED.
        Only for a pool we have a map of: a pool id of the client's choosing costs the
        MDM no fetch and us no memory."""
        if req.pool_id in self._maps:
            await self._access.refreshed(req.pool_id, time.monotonic())
        why = self._access.refusal(req.pool_id, req.volume_id, guid, req.opcode != _READ)
        if why is None:
            self._serve(conn, req, payload, t0)
        else:
            conn.refuse(req, why)

    def _serve(self, conn: Connection, req: Request, payload: memoryview, t0: float) -> None:
        op = req.opcode
        if self._state.stopping:
            self._reply(conn, req, t0, Status.SHUTTING_DOWN)
            return
        if self.corrupt_payload is not None and payload:
            self.corrupt_payload(payload)
        if req.csum_type and payload and not self._payload_intact(conn, req, payload):
            self._reply(conn, req, t0, _MISMATCH)  # nothing written, nothing forwarded
            return
        if op == Op.PING:
            if _is_mdm_probe(conn):
                self._peers.fence.mdm_probed()
            self._reply(conn, req, t0, _OK)
            return
        if op == Op.FLUSH or op == Op.REPL_FLUSH:
            self._spawn(self._flush(conn, req, t0, op == Op.FLUSH))
            return
        if op == Op.CHUNK_LIST:
            self._list(conn, req, t0)
            return
        if req.volume_id in self._refused:
            # A deleted volume: nothing of it is read, written or copied any more.
            self._reply(conn, req, t0, Status.DELETED)
            return
        length = req.length
        if length > MAX_PAYLOAD:
            self._reply(conn, req, t0, Status.TOO_LARGE)
            return
        if req.offset + length > CHUNK_SIZE or req.chunk_index >= MAX_CHUNK_INDEX:
            self._reply(conn, req, t0, Status.INVALID)
            return
        if op == Op.CHUNK_READ_RAW:
            self._read(conn, req, t0)
            return
        if op == Op.CHUNK_CSUMS:
            self._csums(conn, req, t0)
            return
        primary = op in _REPL_OF or op == Op.READ
        # a replica write's sender: the SDS its certificate names (None: no TLS)
        status = self._check(req, primary, _sender(conn, primary))
        if status == _WAIT:
            self._spawn(self._after_map(conn, req, payload, t0, primary))
        elif status:
            self._refuse_or_reply(conn, req, t0, status)
        else:
            self._checked(conn, req, payload, t0)

    def _payload_intact(self, conn: Connection, req: Request, payload: memoryview) -> bool:
        """Whether a WRITE's or REPL_WRITE's payload matches the checksums that follow
        it (CSUM_CRC32C; docs/protocol.md §8.6); a mismatch is logged and counted.
        Unit by unit (``exact``), never in one pass: the checksums of the blocks it
        covers whole are stored as they came, and the sender chose them with the bytes
        (differences built to cancel in one pass would leave rows that disagree with
        the data on both copies)."""
        n = req.length
        bad = csum.bad_units(payload[:n], payload[n:], req.offset, exact=True)
        if not bad:
            return True
        self.stats.wire_checksum_mismatch(conn.role)
        log.warning(
            "%s payload of chunk %d/%d (offset %d, %d bytes) from a %s does not match its "
            "checksums (4 KiB unit(s) %s): refused, nothing written",
            Op(req.opcode).name,
            req.volume_id,
            req.chunk_index,
            req.offset,
            n,
            conn.role,
            ", ".join(map(str, bad[:8])),
        )
        return False

    def _checked(self, conn: Connection, req: Request, payload: memoryview, t0: float) -> None:
        op = req.opcode
        if op == Op.READ:
            self._read(conn, req, t0)
        elif op == Op.REPL_MARK_BAD:
            self._mark_bad(conn, req, t0)
        elif op in _REPL_OF:
            self._spawn(self._primary_write(conn, req, payload, t0))
        else:
            self._replica_apply(conn, req, payload, t0)

    def _check(self, req: Request, primary: bool, sender: str | None = None) -> int:
        """0 when this SDS may serve the request now; a status; or ``_WAIT``."""
        m = self._maps.get(req.pool_id)
        epoch = req.epoch
        if m is None or epoch > m.epoch:
            return _WAIT
        if epoch < m.epoch:
            return Status.EPOCH_STALE
        pg = req.pg
        if pg >= m.pg_count or pg != pg_of(req.volume_id, req.chunk_index, m.pg_count):
            return Status.INVALID
        me = self._state.sds_id
        if primary:
            if me and m.primary[pg][0] == me:
                if m.read_only and req.volume_id in m.read_only and req.opcode in _REPL_OF:
                    return _READ_ONLY  # a snapshot's frozen view: never written
                return _OK
            if (
                req.flags & _REPLICA
                and req.opcode == Op.READ
                and me
                and m.secondary[pg][0] == me
                and m.clean[pg]
            ):
                # A clean PG's secondary holds every write acknowledged (both copies
                # are written before the ack): a READ that failed over may read it.
                return _OK
            return Status.NOT_PRIMARY
        if me and m.secondary[pg][0] == me and m.forwards(pg):
            return self._from_primary(m, pg, sender)
        if me and m.target[pg][0] == me:
            # a rebalance move to us: forwarded writes and the copy
            return self._from_primary(m, pg, sender)
        return Status.NOT_REPLICA

    def _refuse_or_reply(self, conn: Connection, req: Request, t0: float, status: int) -> None:
        """Answer ``status``, a NOT_PERMITTED (:meth:`_from_primary`) as the connection's
        refusal: logged, counted and audited with its reason and volume."""
        refuse = getattr(conn, "refuse", None)
        if status == _READ_ONLY:
            if refuse is None:
                self._reply(conn, req, t0, Status.NOT_PERMITTED)
            else:
                refuse(
                    req,
                    f"volume {req.volume_id} is a read-only snapshot in this SDS's map "
                    f"(pool {req.pool_id}, epoch {self._cache.epoch(req.pool_id)})",
                )
            return
        if status != Status.NOT_PERMITTED or refuse is None:
            self._reply(conn, req, t0, status)
            return
        m = self._maps.get(req.pool_id)
        refuse(
            req,
            f"sds:{getattr(conn, 'peer_sds', None)} is not the PG's primary in this SDS's "
            f"map (PG {req.pool_id}/{req.pg}, epoch {-1 if m is None else m.epoch})",
        )

    @staticmethod
    def _from_primary(m: PgMap, pg: int, sender: str | None) -> int:
        """OK for a replica write or copy from the PG's primary (``sender``: the name of
        the SDS whose certificate the connection has; None: no TLS), NOT_PERMITTED from
        another SDS of the map's."""
        if sender is None or not m.sds_names or m.sds_names.get(sender) == m.primary[pg][0]:
            return _OK
        return Status.NOT_PERMITTED

    async def _after_map(
        self, conn: Connection, req: Request, payload: memoryview, t0: float, primary: bool
    ) -> None:
        await self._cache.wait_for(req.pool_id, req.epoch, MAP_WAIT_S)
        status = self._check(req, primary, _sender(conn, primary))
        if status == _WAIT:
            self._reply(conn, req, t0, Status.MAP_PENDING)
        elif status:
            self._refuse_or_reply(conn, req, t0, status)
        else:
            self._checked(conn, req, payload, t0)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(
        self,
        conn: Connection,
        req: Request,
        t0: float,
        status: int,
        flags: int = 0,
        payload: memoryview | None = None,
        length: int = -1,
    ) -> None:
        epoch = self._cache.epoch(req.pool_id)
        if length < 0:
            conn.reply(req.request_id, status, epoch, flags, payload)
        else:
            conn.reply(req.request_id, status, epoch, flags, payload, length)
        self.stats.record(req.opcode, req.length, time.perf_counter() - t0, status == _OK)

    # -- reads ------------------------------------------------------------------------

    def _read(self, conn: Connection, req: Request, t0: float, heal: bool = True) -> None:
        store = self._store
        # A READ with csum_type asks for its payload's checksums (CSUM_CRC32C): they
        # follow its bytes in one buffer. With CLIENT_CHECKS the client checks the
        # bytes against them, a check that covers ours (docs/sds.md, "Checksums"):
        # the stored ones are sent unchecked, and a mismatch brings the READ back
        # without the flag, checked and healed here.
        summed = req.csum_type and req.length
        try:
            if summed:
                check = not req.flags & _CLIENT_CHECKS
                data = store.read_reply(
                    req.volume_id, req.chunk_index, req.offset, req.length, check=check
                )
            else:
                data = store.read(req.volume_id, req.chunk_index, req.offset, req.length)
        except DeviceFailed:
            self._reply(conn, req, t0, _FAILED)
            return
        except ChecksumError as exc:
            # Healed from another copy (heal.py), unless a peer asks: it is itself
            # repairing from us, and our copy being bad is its answer.
            if heal and Op.REPL_FLUSH not in conn.allowed:
                self._spawn(self._heal_read(conn, req, t0, exc.blocks))
            else:
                self._reply(conn, req, t0, Status.IO_ERROR)
            return
        except OSError as exc:
            log.error("read of chunk %d/%d failed: %s", req.volume_id, req.chunk_index, exc)
            self._reply(conn, req, t0, Status.IO_ERROR)
            return
        if data is None and self._state.unknown(req.pool_id):
            self._reply(conn, req, t0, _FAILED)  # a hole here may be a lost chunk
        elif data is None:
            self._reply(conn, req, t0, _OK, _HOLE)
        elif summed:
            self._reply(conn, req, t0, _OK, 0, data, req.length)
        else:
            self._reply(conn, req, t0, _OK, 0, data)

    async def _heal_read(
        self, conn: Connection, req: Request, t0: float, blocks: list[int]
    ) -> None:
        """A read that found bad blocks: repair them from another copy, then read
        again; ``IO_ERROR`` (EIO at the client) when no copy could, never wrong bytes.
        A failover read (``REPLICA``) does not ask the primary, which the SDC has just
        given up on: waiting for it would outlast the SDC's budget for us. Nor does a
        client's READ wait for our next map when a copy refuses us for map lag: it is
        answered at once (``EPOCH_STALE``), not after waits under the range lock."""
        failover = req.opcode == Op.READ and req.flags & _REPLICA
        m = self._maps.get(req.pool_id) if failover else None
        exclude = (m.primary[req.pg][0],) if m is not None and req.pg < m.pg_count else ()
        lagging: set[int] = set()
        try:
            left = await repair_from_peer(
                self._state,
                req.volume_id,
                req.chunk_index,
                blocks,
                exclude=exclude,
                lagging=lagging,
                wait=req.opcode != Op.READ,
            )
        except DeviceFailed:
            self._reply(conn, req, t0, _FAILED)
            return
        except OSError as exc:
            log.error("repair of chunk %d/%d failed: %s", req.volume_id, req.chunk_index, exc)
            left = blocks
        if left and failover:
            # The SDC came to us, the secondary, because the primary did not answer;
            # it may hold the good bytes: NOT_PRIMARY sends the SDC back to it.
            self._reply(conn, req, t0, Status.NOT_PRIMARY)
        elif left:
            # A copy that refused us for a lagging map may hold them good: the SDC
            # refreshes its map and retries (EPOCH_STALE) rather than answer EIO.
            self._reply(conn, req, t0, Status.EPOCH_STALE if lagging else Status.IO_ERROR)
        else:
            self._read(conn, req, t0, heal=False)

    def _csums(self, conn: Connection, req: Request, t0: float) -> None:
        """CHUNK_CSUMS: this SDS's copy of the chunk checked against its checksums
        (the stored row, then the row of its bytes), whatever its role in the PG; HOLE
        when it holds no slot for it. With HEAL, bad blocks are first repaired from
        the PG's other copies (heal.py) and the rows read again (``docs/sds.md``,
        "Scrub"); the bad blocks a HEAL request finds were counted by the look that
        made the caller ask (CHUNK_CSUMS without HEAL), not again. The blocks of the
        range (offset, length) that have no checksum recorded are, with ADOPT, given
        the CRC32C of their bytes, and with HEAL repaired as bad ones."""
        flags = req.flags
        rows = self._checksum_rows(conn, req, t0, count=not flags & (_HEAL | _ADOPT))
        if rows is None:
            return
        unknown: list[int] = []
        if rows != _NO_SLOT and req.length:
            unknown = unchecked_in(rows[0], req.offset >> 12, req.length >> 12)
        if unknown and flags & _ADOPT:
            try:
                given = self._store.adopt_checksums(
                    req.volume_id, req.chunk_index, crcs_of(rows[1], unknown)
                )
            except OSError as exc:
                failed = isinstance(exc, DeviceFailed)
                self._reply(conn, req, t0, _FAILED if failed else Status.IO_ERROR)
                return
            rows = with_adopted(rows, given)
        bad = bad_in_rows(*rows) if rows != _NO_SLOT and flags & _HEAL else []
        if bad or (unknown and flags & _HEAL):
            self._spawn(self._csums_healed(conn, req, t0, bad, unknown))
        else:
            self._csums_reply(conn, req, t0, rows)

    def _checksum_rows(
        self, conn: Connection, req: Request, t0: float, *, count: bool = True
    ) -> tuple[bytes, bytes] | None:
        """The copy's rows, ``_NO_SLOT``; None once an error was answered."""
        try:
            rows = self._store.checksum_rows(req.volume_id, req.chunk_index, count=count)
        except DeviceFailed:
            self._reply(conn, req, t0, _FAILED)
            return None
        except OSError as exc:
            log.error("scrub of chunk %d/%d failed: %s", req.volume_id, req.chunk_index, exc)
            self._reply(conn, req, t0, Status.IO_ERROR)
            return None
        return _NO_SLOT if rows is None else rows

    async def _csums_healed(
        self, conn: Connection, req: Request, t0: float, bad: list[int], unknown: list[int]
    ) -> None:
        try:
            await repair_from_peer(
                self._state, req.volume_id, req.chunk_index, bad + unknown, unchecked=unknown
            )
        except DeviceFailed:
            self._reply(conn, req, t0, _FAILED)
            return
        except OSError as exc:
            log.error("repair of chunk %d/%d failed: %s", req.volume_id, req.chunk_index, exc)
        rows = self._checksum_rows(conn, req, t0, count=False)
        if rows is not None:
            self._csums_reply(conn, req, t0, rows)

    def _csums_reply(
        self, conn: Connection, req: Request, t0: float, rows: tuple[bytes, bytes]
    ) -> None:
        if rows == _NO_SLOT:
            self._reply(conn, req, t0, _OK, _HOLE)
        else:
            self._reply(conn, req, t0, _OK, 0, memoryview(rows[0] + rows[1]))

    def _list(self, conn: Connection, req: Request, t0: float) -> None:
        """CHUNK_LIST: the chunks of PG ``pg`` of pool ``pool_id`` this SDS stores, from
        the key (``volume_id``, ``chunk_index``) on, ascending, at most
        ``length // CHUNK_ENTRY.size`` of them. Whatever this SDS's role in the PG."""
        m = self._maps.get(req.pool_id)
        if m is None:
            self._reply(conn, req, t0, Status.MAP_PENDING)
            return
        pg, length, start = req.pg, req.length, (req.volume_id, req.chunk_index)
        most = length // CHUNK_ENTRY.size
        if pg >= m.pg_count or not most or length > MAX_PAYLOAD or start[1] >= MAX_CHUNK_INDEX:
            self._reply(conn, req, t0, Status.INVALID)
            return
        stored = self._store.chunks_of_pg(req.pool_id, pg) or []  # indexed by the map's arrival
        first = bisect.bisect_left(stored, start)
        deleted = self._state.tombstones.deleted
        keys = list(itertools.islice((k for k in stored[first:] if not deleted(k[0])), most))
        payload = b"".join(CHUNK_ENTRY.pack(v, c) for v, c in keys)
        conn.reply(req.request_id, _OK, m.epoch, 0, memoryview(payload))
        self.stats.record(req.opcode, len(payload), time.perf_counter() - t0, True)  # bytes sent

    # -- writes on the secondary ------------------------------------------------------

    def _replica_apply(
        self, conn: Connection, req: Request, payload: memoryview, t0: float
    ) -> None:
        m = self._maps[req.pool_id]
        dev = self._state.device(m, req.pg, primary=False)
        if dev.failed or self._state.target_device(dev, req.volume_id, req.chunk_index).failed:
            self._reply(conn, req, t0, _FAILED)
            return
        if req.flags & _FUA or self._store.needs_reclaim(dev, req.volume_id, req.chunk_index):
            self._spawn(self._replica_apply_async(conn, req, payload, t0, dev))
            return
        bad: list[int] = []
        status = self._apply(dev, req, payload, bad)
        if bad:  # a block written in part is bad here: healed, then written
            self._spawn(self._replica_apply_async(conn, req, payload, t0, dev, bad))
        else:
            self._reply(conn, req, t0, status)

    def _mark_bad(self, conn: Connection, req: Request, t0: float) -> None:
        """REPL_MARK_BAD from a copy job whose source has no good bytes for these
        blocks: they read as EIO here from now on (docs/sds.md, "Healing")."""
        try:
            self._store.mark_bad(req.volume_id, req.chunk_index, req.offset, req.length)
        except DeviceFailed:
            self._reply(conn, req, t0, _FAILED)
            return
        except ValueError:
            self._reply(conn, req, t0, Status.INVALID)
            return
        except OSError as exc:
            log.error("REPL_MARK_BAD of chunk %d/%d: %s", req.volume_id, req.chunk_index, exc)
            self._reply(conn, req, t0, Status.IO_ERROR)
            return
        self._reply(conn, req, t0, _OK)

    async def _replica_apply_async(
        self,
        conn: Connection,
        req: Request,
        payload: memoryview,
        t0: float,
        dev: Device,
        bad: list[int] | None = None,
    ) -> None:
        if self._store.needs_reclaim(dev, req.volume_id, req.chunk_index):
            try:
                await self._store.reclaim(dev)
            except OSError:
                self._reply(conn, req, t0, _FAILED if dev.failed else Status.IO_ERROR)
                return
        fua = req.flags & _FUA
        written = self._state.target_device(dev, req.volume_id, req.chunk_index) if fua else dev
        status = await self._apply_healing(dev, req, payload, locked=False, bad=bad)
        if status == _OK and fua:
            status = await self._sync([written])
        self._reply(conn, req, t0, status)

    def _apply(
        self, dev: Device, req: Request, payload: memoryview, bad: list[int] | None = None
    ) -> int:
        """Apply a write / write-zeroes / trim to the local copy; return the status.
        A block the request covers in part that fails its checksum refuses it
        (``IO_ERROR``, nothing written); ``bad`` is then given those blocks, for
        :meth:`_apply_healing`."""
        op = req.opcode
        try:
            if req.csum_type:  # the payload's checksums follow it, checked on arrival
                n = req.length
                self._store.write(
                    dev, req.volume_id, req.chunk_index, req.offset, payload[:n], payload[n:]
                )
            elif op == Op.WRITE or op == Op.REPL_WRITE:
                self._store.write(dev, req.volume_id, req.chunk_index, req.offset, payload)
            else:
                self._store.zero(req.volume_id, req.chunk_index, req.offset, req.length)
        except NoSpace:
            return Status.NO_SPACE
        except VolumeDeleted:
            # Tombstoned while this request waited (for a free slot, the range lock):
            # it passed the dispatch check before the delete reached us.
            return Status.DELETED
        except DeviceFailed:
            return _FAILED
        except ChecksumError as exc:
            if bad is None:
                log.error("write of chunk %d/%d refused: %s", req.volume_id, req.chunk_index, exc)
            else:
                bad.extend(exc.blocks)
            return Status.IO_ERROR
        except OSError as exc:
            log.error(
                "write of chunk %d/%d on %s failed: %s",
                req.volume_id,
                req.chunk_index,
                dev.path,
                exc,
            )
            return Status.IO_ERROR
        return _OK

    async def _apply_healing(
        self,
        dev: Device,
        req: Request,
        payload: memoryview,
        *,
        locked: bool,
        bad: list[int] | None = None,
    ) -> int:
        """:meth:`_apply`, and when a block the request covers only in part fails its
        checksum, that block repaired from the PG's other copies first (heal.py) and
        the request applied again; ``IO_ERROR`` when no copy could repair it.
        ``locked``: the caller (the primary's write) holds the chunk's range lock.

        On the primary, the copy it heals from is the secondary (or a move's
        target), which has this write's forward or not: either way the block's
        bytes outside the write are the ones both copies had, and the write is
        applied on top. On the secondary, it is the primary, whose range lock held
        for this write does not delay the fetch (CHUNK_READ_RAW takes no range lock),
        so this cannot wait on the write it serves. ``bad``: the blocks an
        :meth:`_apply` already refused the request for. A client's write whose
        repair a copy refused for map lag is answered ``EPOCH_STALE`` at once (the
        SDC retries), without waiting for our next map under the range lock."""
        if not bad:
            bad = []
            status = self._apply(dev, req, payload, bad)
            if not bad:
                return status
        lagging: set[int] = set()
        client = req.opcode in PRIMARY_OPS
        try:
            left = await repair_from_peer(
                self._state,
                req.volume_id,
                req.chunk_index,
                bad,
                locked=locked,
                lagging=lagging,
                wait=not client,
            )
        except DeviceFailed:
            return _FAILED
        except OSError as exc:
            log.error("repair of chunk %d/%d failed: %s", req.volume_id, req.chunk_index, exc)
            return Status.IO_ERROR
        if left:
            # a client's write whose good copy refused us for map lag: retried by the SDC
            return Status.EPOCH_STALE if lagging and client else Status.IO_ERROR
        return self._apply(dev, req, payload)

    async def _sync(self, devices: list[Device] | None) -> int:
        return await self._synced(self._store.sync(devices))

    async def _sync_dirty(self, devices: list[Device]) -> int:
        return await self._synced(self._store.sync_dirty(devices))

    @staticmethod
    async def _synced(sync: Coroutine[Any, Any, None]) -> int:
        """The status of a sync of the store."""
        try:
            await sync
        except DeviceFailed:
            return _FAILED
        except OSError as exc:
            log.error("fdatasync failed: %s", exc)
            return Status.IO_ERROR
        return _OK

    # -- writes on the primary --------------------------------------------------------

    async def _primary_write(
        self, conn: Connection, req: Request, payload: memoryview, t0: float
    ) -> None:
        ref = _chunk_ref(req[5:10])
        pool, pg, vol, chunk, off = req.pool_id, req.pg, req.volume_id, req.chunk_index, req.offset
        key = chunk_key(vol, chunk)
        ticket, earlier = self._locks.acquire(key, off, off + req.length)
        try:
            for fut in earlier:
                await fut
            # The map may have moved on while we waited.
            status = self._check(req, True)
            if status:
                if status == _READ_ONLY:  # not a wire status (the map's read-only set)
                    status = int(Status.NOT_PERMITTED)
                self._reply(conn, req, t0, Status.EPOCH_STALE if status == _WAIT else status)
                return
            m = self._maps[pool]
            dev = self._state.device(m, pg, primary=True)
            store = self._store
            if dev.failed or self._state.target_device(dev, vol, chunk).failed:
                self._reply(conn, req, t0, _FAILED)
                return
            if store.needs_reclaim(dev, vol, chunk):
                try:
                    await store.reclaim(dev)
                except OSError:
                    self._reply(conn, req, t0, _FAILED if dev.failed else Status.IO_ERROR)
                    return
            if req.opcode == Op.WRITE and not dev.free and store.location(vol, chunk) is None:
                self._reply(conn, req, t0, Status.NO_SPACE)
                return
            # The copies besides ours: the secondary (not while the PG is not clean:
            # its copy is stale, we are the acting set) and a move's target.
            sec = m.secondary[pg][0] if m.forwards(pg) else 0
            if (sec or m.target[pg][0]) and self._peers.fence.fenced():
                self._reply(conn, req, t0, Status.NOT_PRIMARY)  # docs/sds.md Self-fencing
                return
            if not sec:
                self._degraded.record(ref)
            sec_fut = tgt_fut = None
            if sec:
                sec_fut = await self._forward(m, sec, req, ref, payload)
                if sec_fut.done():  # not sent: not written here either, unless we are alone
                    status = self._secondary_outcome(ref, await self._forwarded(sec, sec_fut, t0))
                    if status != _OK:
                        self._reply(conn, req, t0, status)
                        return
                    sec_fut = None
            tgt = m.target[pg][0]
            if tgt:
                tgt_fut = await self._forward(m, tgt, req, ref, payload)
            # Checked again right before our copy changes: the waits above (the
            # write-intent mark, a connect to a peer) may have outlasted our role.
            # (The role only: a newer map that keeps us the primary, e.g. with the
            # PG degraded, lets the write go on as before.)
            newest = self._maps.get(pool)
            if newest is None or newest.primary[pg][0] != self._state.sds_id:
                for peer, sent in ((sec, sec_fut), (tgt, tgt_fut)):
                    if sent is not None:
                        await self._forwarded(peer, sent, t0)
                self._reply(conn, req, t0, Status.EPOCH_STALE)
                return
            fua = req.flags & _FUA
            written = self._state.target_device(dev, vol, chunk) if fua else dev
            status = await self._apply_healing(dev, req, payload, locked=True)
            if status == _OK and fua:
                status = await self._sync([written])
            if tgt_fut is not None:
                tgt_status = self._target_outcome(ref, await self._forwarded(tgt, tgt_fut, t0))
                if status == _OK:
                    status = tgt_status
            if sec_fut is not None:
                sec_status = self._secondary_outcome(ref, await self._forwarded(sec, sec_fut, t0))
                if status == _OK and sec_status != _OK:
                    # Our copy has the write, the secondary's has not: recorded, so
                    # that a delta resync copies the chunk if the client gives up.
                    self._degraded.record(ref)
                if status == _OK:
                    status = sec_status
            if status == _MISMATCH and not req.csum_type:
                # A peer found our forward damaged (we checksum forwards ourselves):
                # a client that sent no checksums may not know the status (§8.6).
                status = Status.REPLICA_FAILED
            self._reply(conn, req, t0, status)
        finally:
            self._locks.release(key, ticket)

    # -- forwarding to the secondary and to a move's target -------------------------

    async def _forward(
        self, m: PgMap, peer: int, req: Request, ref: ChunkRef, payload: memoryview
    ) -> asyncio.Future[Reply]:
        """Put a client's write on the wire to ``peer``, the PG's secondary or a move's
        target, as its REPL op (same flags, chunk address with the routing epoch,
        range and payload) on the persistent peer connection, connecting first if
        there is none; the peer is then flushed by the next FLUSH. Returns the
        reply's future at once: the caller writes its own copy meanwhile. A failure
        to send (no address in the map, no connection, a refused handshake) is that
        future's exception, set at once (the future is done), so that
        :meth:`_forwarded` handles it as it handles the failures of the reply."""
        try:
            address = m.sds.get(peer)
            if address is None:
                raise WireError(f"no address of SDS {peer} in map epoch {m.epoch}")
            client = self._peers.connected(peer, address) or await self._peers.get(peer, address)
            op = _REPL_OF[req.opcode]
            n = req.length
            if req.csum_type:  # the client's checksums go on unchanged
                fut = client.submit(
                    op, req.flags, ref, req.offset, n, payload[:n], client.future(), payload[n:]
                )
            else:
                fut = client.submit(op, req.flags, ref, req.offset, n, payload, client.future())
        except WireError as exc:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
            return fut
        self._peers.mark(peer)
        return fut

    async def _forwarded(self, peer: int, fut: asyncio.Future[Reply], t0: float) -> int:
        """The outcome of a forward (:meth:`_forward`) of the request that arrived at
        ``t0``, secondary and move target alike: OK (the time since ``t0`` feeds the
        peer's budget: :meth:`Peers.answered`); ``_LOST`` when the connection to the
        peer is lost, cannot be made or answers nothing for the peer's budget (the
        peer is reported to the MDM, which probes it: ``peer_unreachable``);
        ``REPLICA_FAILED`` for any other failure to send or to answer; a refusal as
        ``_PEER_STATUS`` maps it. Every failure is logged and counted
        (``meshblock_sds_peer_errors_total``)."""
        try:
            status = (await fut).status
        except ConnectionLost as exc:
            log.warning("forward to SDS %d failed: %s", peer, exc)
            self.stats.peer_error(peer)
            self._resync.lost(peer)
            self._peers.lost(peer)
            if self._state.peer_unreachable is not None:
                self._state.peer_unreachable(peer)
            return _LOST
        except WireError as exc:
            log.warning("forward to SDS %d failed: %s", peer, exc)
            self.stats.peer_error(peer)
            return Status.REPLICA_FAILED
        if status == _OK:
            # (Again: a FLUSH that began between the send and now took the peer out
            # of the set; the write it acknowledged is flushed by the next one.)
            self._peers.mark(peer)
            self._peers.answered(peer, time.perf_counter() - t0)
            return _OK
        self.stats.peer_error(peer)
        try:
            mapped = _PEER_STATUS.get(Status(status), Status.REPLICA_FAILED)
        except ValueError:
            mapped = Status.REPLICA_FAILED
        log.warning("SDS %d refused a forwarded write: status %d", peer, status)
        return mapped

    def _secondary_outcome(self, ref: ChunkRef, status: int) -> int:
        """What the secondary's outcome makes of the client's write. A lost connection:
        done, as a write made alone (recorded for the resync), when our newest map
        already has us as the PG's whole acting set (the MDM declared the secondary
        down meanwhile); else ``REPLICA_FAILED``, which the client retries."""
        if status != _LOST:
            return status
        if self._state.alone(ref.pool_id, ref.pg):
            self._degraded.record(ref)
            return _OK
        return Status.REPLICA_FAILED

    def _target_outcome(self, ref: ChunkRef, status: int) -> int:
        """What a move target's outcome makes of the client's write. A failure does not
        fail it while the move still copies (the PG's two in-sync copies have it, and
        the move copies the chunk again: :meth:`Resync.missed`); once the move is past
        its last copy it does (``REPLICA_FAILED``, or the target's refusal) and the
        client retries on the newer map."""
        if status == _OK:
            return _OK
        if self._resync.missed(ref):
            log.info(
                "chunk %d/%d of PG %d/%d: copied to the move's target again",
                ref.volume_id,
                ref.chunk_index,
                ref.pool_id,
                ref.pg,
            )
            return _OK
        return Status.REPLICA_FAILED if status == _LOST else status

    # -- flush ------------------------------------------------------------------------

    async def _flush(self, conn: Connection, req: Request, t0: float, peers: bool) -> None:
        """FLUSH (``peers``) or REPL_FLUSH: every write acknowledged so far durable.
        The devices written since their last sync are synced (ChunkStore.sync_dirty),
        and for a FLUSH the peers forwarded to since the last one are REPL_FLUSHed at
        the same time: the two copies sync in parallel."""
        # A failed device is never synced again: its copies are covered only once no
        # map names it as an in-sync copy (the MDM has failed them over); until then
        # the FLUSH fails, retriably.
        if peers and self._peers_unknown:
            self._mark_every_peer()
        local = self._sync_dirty([d for d in self._store.devices if not d.failed])
        if peers and self._peers.unflushed:
            status, failed = await asyncio.gather(local, self._peers.flush())
        else:
            status, failed = await local, []
        if status == _OK and self._state.failed_in_sync():
            status = _FAILED
        if status == _OK:
            if failed:
                # A peer that is no longer the in-sync secondary of any PG of ours
                # holds only stale copies: what it missed does not count.
                # Its mark stays if a forward to it was acknowledged since its
                # REPL_FLUSH began (it may be in sync by the next FLUSH).
                stale = {i for i in failed if not self._state.replicates_to(i)}
                if stale:
                    log.info("not flushing SDS(s) %s: they hold only stale copies", sorted(stale))
                    self._peers.drop_unmarked(stale)
                if len(stale) < len(failed):
                    status = Status.REPLICA_FAILED
        self._reply(conn, req, t0, status)

    def _mark_every_peer(self) -> None:
        """At the first FLUSH of this process (once it has maps): the peers an earlier
        process may have forwarded to without their REPL_FLUSH since, which it did
        not tell us (the secondary and the move target of every PG we are primary
        of), are REPL_FLUSHed as if written to, as every device starts dirty."""
        me = self._state.sds_id
        if not self._maps or not me:
            return
        self._peers_unknown = False
        for m in self._maps.values():
            for pg in range(m.pg_count):
                if m.primary[pg][0] != me:
                    continue
                for peer in (m.secondary[pg][0], m.target[pg][0]):
                    address = m.sds.get(peer)
                    if peer and peer != me and address is not None:
                        self._peers.mark(peer, address)

    # -- shutdown ---------------------------------------------------------------------

    async def drain(self, grace_s: float = 5.0) -> None:
        """Refuse new requests and wait for those in progress (then cancel them)."""
        self._state.stopping = True
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
