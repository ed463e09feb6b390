"""One NBD export per volume mapped to this SDC, kept in step with the maps.

:meth:`ExportTable.apply` is called with every new maps document: a newly mapped
volume gets an export named after it; an unmapped one loses its export, and its
connections are closed (after the local nbd device, if attached, is detached); a
changed mapping updates in place (QoS limits, a grown size for new connections) or,
when the name or the access mode changes, replaces the export, since connected
clients were told the old ones.

Multi-connection: exports advertise NBD_FLAG_CAN_MULTI_CONN (``[nbd] multi_conn``).
It is safe here because one SDC process serves every connection to an export and
keeps no cache: a read always goes to the PG's primary, a write is acknowledged only
once both copies have it, and a FLUSH on any connection goes to every SDS holding
data of the volume, which makes every acknowledged write durable whichever
connection it came through. See docs/sdc.md.
"""

from __future__ import annotations

import asyncio
import logging

from meshblock.nbd.server import Export, NbdServer
from meshblock.sdc.attach import NbdAttacher
from meshblock.sdc.datapath import DataPath
from meshblock.sdc.maps import SdcMaps, VolumeMapping
from meshblock.sdc.metrics import SdcMetrics
from meshblock.sdc.volume_io import MapSource, VolumeIO
from meshblock.timeouts import LatencyBudgets

log = logging.getLogger(__name__)


class ExportTable:
    def __init__(
        self,
        server: NbdServer,
        maps: MapSource,
        path: DataPath,
        metrics: SdcMetrics,
        *,
        timeout_s: float,
        attempt_timeout_s: float,
        budgets: LatencyBudgets | None = None,
        multi_conn: bool = True,
        attacher: NbdAttacher | None = None,
    ) -> None:
        self.server = server
        self.maps = maps
        self.path = path
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.budgets = budgets  # per SDS, shared by every volume
        self.multi_conn = multi_conn
        self.attacher = attacher
        self.volumes: dict[int, tuple[VolumeIO, Export]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._attach_lock = asyncio.Lock()

    def apply(self, maps: SdcMaps) -> None:
        for vol_id, (io, export) in list(self.volumes.items()):
            vm = maps.volumes.get(vol_id)
            if vm is None:
                self._remove(vol_id, "volume unmapped")
            elif vm.name != export.name or vm.read_only != export.read_only:
                self._remove(vol_id, "mapping changed (name or access mode)")
                self._add(vm)
            else:
                io.update(vm)
                if vm.size_bytes != export.size:
                    log.info(
                        "export %r: size %d -> %d (for new connections)",
                        vm.name,
                        export.size,
                        vm.size_bytes,
                    )
                    export.size = vm.size_bytes
        for vol_id, vm in maps.volumes.items():
            if vol_id not in self.volumes:
                self._add(vm)

    def _add(self, vm: VolumeMapping) -> None:
        if vm.name in self.server.exports:  # a renamed volume took a freed name
            for vol_id, (_, export) in list(self.volumes.items()):
                if export.name == vm.name:
                    self._remove(vol_id, "name taken by another volume")
        io = VolumeIO(
            vm,
            self.maps,
            self.path,
            self.metrics.volume(vm.name),
            timeout_s=self.timeout_s,
            attempt_timeout_s=self.attempt_timeout_s,
            budgets=self.budgets,
        )
        export = Export(
            vm.name,
            io,
            vm.size_bytes,
            read_only=vm.read_only,
            multi_conn=self.multi_conn,
            description=f"meshblock volume {vm.id} (pool {vm.pool_id})",
        )
        self.server.add_export(export)
        self.volumes[vm.id] = (io, export)
        if self.attacher is not None:
            self._spawn(self._attach(vm.name, vm.read_only))

    def _remove(self, vol_id: int, reason: str) -> None:
        io, export = self.volumes.pop(vol_id)
        if self.attacher is not None and export.name in self.attacher.attached:
            # Offer it no more, detach (the kernel flushes through its open
            # connections), then close those connections.
            if self.server.exports.get(export.name) is export:
                del self.server.exports[export.name]
            self._spawn(self._detach_then_close(io, export, reason))
        else:
            self._close(io, export, reason)

    def _close(self, io: VolumeIO, export: Export, reason: str) -> None:
        if self.server.exports.get(export.name) is export:
            self.server.remove_export(export.name, reason)
        else:
            export.close_connections(reason)
        io.close()
        self.metrics.forget_volume(export.name)

    async def _attach(self, name: str, read_only: bool) -> None:
        assert self.attacher is not None
        async with self._attach_lock:
            await self.attacher.attach(name, read_only=read_only)

    async def _detach_then_close(self, io: VolumeIO, export: Export, reason: str) -> None:
        assert self.attacher is not None
        async with self._attach_lock:
            await self.attacher.detach(export.name)
        self._close(io, export, reason)

    def _spawn(self, coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Detach what is attached and close every export."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.attacher is not None:
            async with self._attach_lock:
                await self.attacher.detach_all()
        for vol_id in list(self.volumes):
            io, export = self.volumes.pop(vol_id)
            self._close(io, export, "SDC stopping")
