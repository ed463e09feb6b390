"""What the MDM's handlers and background tasks share, under one typed app key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from meshblock.auth import TokenTable
from meshblock.mdm.config import MdmConfig
from meshblock.mdm.db import WriteGate
from meshblock.mdm.deletion import TombstoneReports
from meshblock.mdm.epochs import EpochNotifier
from meshblock.mdm.failures import FailureDetector
from meshblock.mdm.leader import Lease
from meshblock.mdm.liveness import Liveness
from meshblock.mdm.mappings import MappingDocs
from meshblock.mdm.pgmaps import MapCache, MapEpochs
from meshblock.mdm.progress import CopyProgress
from meshblock.mdm.reconcile import Reported
from meshblock.mdm.scrub import ScrubSchedule
from meshblock.mdm.snapshot_gc import TreeGcReports
from meshblock.mdm.stopping import Background
from meshblock.tls import ServerTls


@dataclass
class MdmContext:
    config: MdmConfig
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    tokens: TokenTable
    notifier: EpochNotifier
    liveness: Liveness
    write_gate: WriteGate
    map_cache: MapCache = field(default_factory=MapCache)
    map_epochs: MapEpochs = field(default_factory=MapEpochs)
    mapping_docs: MappingDocs = field(default_factory=MappingDocs)
    progress: CopyProgress = field(default_factory=CopyProgress)
    tombstones: TombstoneReports = field(default_factory=TombstoneReports)
    tree_gc: TreeGcReports = field(default_factory=TreeGcReports)
    reported: Reported = field(default_factory=Reported)
    detector: FailureDetector | None = None  # set by the background tasks
    scrub: ScrubSchedule | None = None  # set by the background tasks
    # ("sds", id) -> name, ("sdc", id) -> GUID: whom a certificate may act as (authz.py)
    owners: dict[tuple[str, int], str] = field(default_factory=dict)
    lease: Lease | None = None  # the leader lease this MDM holds (leader.py)
    deposed: str | None = None  # why this MDM lost its leadership, once it has
    # Tasks started on the way (an isolation report's settling): stopped with the loops
    background: Background = field(default_factory=Background)
    stopping: bool = False  # set when the stop begins (aiohttp's on_shutdown)

    @property
    def term(self) -> int:
        """This MDM's leader term, which its maps and answers carry (0: no lease)."""
        return self.lease.term if self.lease is not None else 0


CTX = web.AppKey("meshblock_mdm_context", MdmContext)
# The API's TLS with its CRL (set by __main__ with [tls]; absent: plain HTTP, or tests).
SERVER_TLS = web.AppKey("meshblock_mdm_server_tls", ServerTls)
# Called once this MDM has lost its leadership and stopped acting (set by __main__ to
# stop the process; absent: tests).
ON_DEPOSED: web.AppKey[Callable[[], None]] = web.AppKey("meshblock_mdm_on_deposed")


def ctx(request: web.Request) -> MdmContext:
    return request.app[CTX]
