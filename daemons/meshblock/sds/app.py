"""The SDS's aiohttp application: the control port, and every resource in
``cleanup_ctx`` (store, data server, MDM link), started in that order and stopped in
reverse, also when a later start step fails.

Control port routes (read-only): ``GET /health`` (JSON: status and state for anyone;
devices, map epochs and the rest for a caller that may read) and ``GET /metrics``
(Prometheus text, the SDS's own registry; a read credential, meshblock.metrics_access,
or the open listener of ``[metrics] port``). With the
test-only fault hook enabled (``test_faults = true`` and ``MESHBLOCK_SDS_TEST_FAULTS=1``,
see :mod:`meshblock.sds.device_io`) also ``GET``/``POST /test/faults``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meshblock import audit, metrics_access
from meshblock.files import write_atomic
from meshblock.sds import checksums, device_io
from meshblock.sds.config import SdsConfig
from meshblock.sds.io_path import DataService
from meshblock.sds.maps import MapCache
from meshblock.sds.mdm_client import (
    MdmLink,
    pending_unclean,
    record_pending_unclean,
    saved_failed_devices,
)
from meshblock.sds.metrics import sds_registry
from meshblock.sds.peer_probe import SelfFence, peers_needed, wire_pinger
from meshblock.sds.refusals import RefusalAudit
from meshblock.sds.replication import Peers
from meshblock.sds.resync import Resync
from meshblock.sds.scrub import Scrubber
from meshblock.sds.server import DataServer
from meshblock.sds.state import SdsState
from meshblock.sds.stats import SdsStats
from meshblock.sds.store import ChunkStore, DeviceSpec, StoreError
from meshblock.tls import crl_reload
from meshblock.wire import tls as wire_tls

log = logging.getLogger(__name__)


@dataclass
class SdsRuntime:
    config: SdsConfig
    state: SdsState
    resync: Resync
    service: DataService
    server: DataServer
    link: MdmLink
    registry: CollectorRegistry


CONFIG = web.AppKey("meshblock_sds_config", SdsConfig)
SECRET = web.AppKey("meshblock_sds_secret", str)
RUNTIME = web.AppKey("meshblock_sds_runtime", SdsRuntime)
FAULT_HOOK = web.AppKey("meshblock_sds_fault_hook", device_io.FaultHook)


BOOT_FILE = "boot_id"


def needs_full_copy(
    state_dir: Path, unclean: list[str], known: list[str], now: str | None
) -> list[str]:
    """The devices (of ``known``, in that order) whose copies need a full copy before
    this SDS serves from them; made durable before this returns.

    - those still pending from an earlier start: the MDM has not yet accepted a
      registration that carried them (a restart meanwhile, killed or clean, must not
      forget them: a clean stop marks the devices CLEAN);
    - those of ``unclean`` (no CLEAN) when the machine restarted since the previous
      start of this SDS: a new boot id ``now`` (:func:`device_io.boot_id`), no record
      yet, or a boot id that cannot be read (None: counts as a restart, the safe
      side). The same boot means only the process died: the kernel still has every
      write it acknowledged.

    The pending record (:func:`meshblock.sds.mdm_client.record_pending_unclean`) is
    written before this boot's id, so no order of crashes loses the fact. Raises
    :class:`StoreError` when the record cannot be written (the devices stay unclean)."""
    path = state_dir / BOOT_FILE
    try:
        before: str | None = path.read_text().strip()
    except OSError:
        before = None
    try:
        pending = pending_unclean(state_dir)
    except OSError as exc:
        log.warning("every device needs a full copy: the pending record is unreadable: %s", exc)
        pending = [*known, ""]  # "" is no device: the record is written anew
    lost = now is None or before != now
    if unclean and not lost:
        log.info(
            "unclean stop of the process only (same boot): no write lost on %s", ", ".join(unclean)
        )
    forgotten = [p for p in pending if p and p not in known]
    if forgotten:
        log.warning(
            "devices no longer configured, dropped from the pending full copies: %s",
            ", ".join(forgotten),
        )
    need = [p for p in known if p in pending or (lost and p in unclean)]
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if need != pending:
            record_pending_unclean(state_dir, need)
    except OSError as exc:
        raise StoreError(
            f"cannot record in {state_dir} that {', '.join(need)} need a full copy: {exc}"
        ) from exc
    if now is not None:
        try:
            write_atomic(path, now)
        except OSError as exc:
            log.warning("cannot record the boot id in %s: %s", path, exc)
    return need


async def _runtime(app: web.Application) -> AsyncIterator[None]:
    config, secret = app[CONFIG], app[SECRET]
    store = ChunkStore(
        (DeviceSpec(d.path, d.capacity_bytes, d.pool) for d in config.devices),
        saved_failed_devices(config.state_dir),
        checksums=config.store.checksums,
    )
    if config.store.checksums and not checksums.HARDWARE:
        log.warning("CRC32C without the CPU's instruction here: block checksums cost ~10x more CPU")
    await asyncio.to_thread(store.open)  # recovery may zero many slots
    # Before the try: a device whose fact cannot be recorded is not closed (stays unclean).
    store.unclean = needs_full_copy(
        Path(config.state_dir), store.unclean, [d.path for d in store.devices], device_io.boot_id()
    )
    verify: asyncio.Task[None] | None = None
    refusals: RefusalAudit | None = None
    try:
        peers = Peers(
            secret,
            config.peer_timeout_s,
            min_version=config.wire_min_version,
            timeout_min=config.peer_timeout_min_s,
            timeout_factor=config.peer_timeout_factor,
            tls=wire_tls.client_context(config.tls, config.data.tls),
        )
        state = SdsState(store, MapCache(), peers, SdsStats())
        peers.fence = SelfFence(
            config.self_fence_after_s,
            wire_pinger(secret, config.wire_min_version, peers.tls),
            lambda: peers_needed(state.maps.maps.values(), state.sds_id),
        )
        resync = Resync(state)
        service = DataService(state, resync)
        hook = device_io.installed_hook()
        if hook is not None:
            service.corrupt_payload = hook.corrupt_payload
        registry = sds_registry(state, resync)
        state.tombstones.rate = state.tree_gc.rate = config.delete_free_rate
        link = MdmLink(config, secret, state, resync)
        link.scrubber = Scrubber(state)
        if store.unclean:
            # Our copies may lack writes acknowledged without FUA/FLUSH: serve nothing
            # on cached maps; the MDM, told at registration, decides who serves.
            log.warning(
                "%s need a full copy: not serving on cached maps until the MDM has registered it",
                ", ".join(store.unclean),
            )
        else:
            link.load_state()
        server = DataServer(
            service,
            secret,
            min_version=config.wire_min_version,
            tls=wire_tls.server_context(config.tls, config.data.tls),
        )
        service.refusal_audit = refusals = RefusalAudit(app.get(audit.AUDIT))
        app[RUNTIME] = SdsRuntime(config, state, resync, service, server, link, registry)
        # Checksums of the slots marked at start: recomputed off the event loop.
        verify = asyncio.create_task(store.verify_marked(), name="verify-marked")
        yield
    finally:
        if refusals is not None:
            refusals.close()
        if verify is not None:
            verify.cancel()
            with contextlib.suppress(BaseException):
                await verify
        store.close()
        log.info("chunk store closed cleanly")


async def _data_server(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt.state.tombstones.start()
    rt.state.tree_gc.start()
    await rt.server.start(rt.config.data.host, rt.config.data.port)
    try:
        yield
    finally:
        await rt.server.stop()
        await rt.state.tombstones.close()
        await rt.state.tree_gc.close()
        await rt.resync.close()
        if rt.link.scrubber is not None:
            await rt.link.scrubber.close()
        await rt.state.peers.fence.stop()
        await rt.state.peers.close()


async def _mdm_link(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    await rt.link.start()
    try:
        yield
    finally:
        await rt.link.stop()


def _liveness(rt: SdsRuntime) -> dict[str, str]:
    """What ``/health`` tells anyone: up, one word of status and the state."""
    sds = rt.state
    pools = {d.pool_id for d in sds.store.devices if d.pool_id is not None}
    serving = bool(sds.sds_id) and pools <= sds.maps.maps.keys()
    return {
        "status": (
            "ok" if serving and rt.link.reachable and not sds.store.failed_devices() else "degraded"
        ),
        "state": "stopping" if sds.stopping else ("serving" if serving else "starting"),
    }


async def health(request: web.Request) -> web.Response:
    """Liveness for anyone; the details for a caller that may read the metrics."""
    rt = request.app[RUNTIME]
    sds, resync = rt.state, rt.resync
    if not request.app[metrics_access.ACCESS].reads(request):
        return web.json_response(_liveness(rt))
    return web.json_response(
        {
            **_liveness(rt),
            "name": rt.config.name,
            "sds_id": sds.sds_id or None,
            "mdm_reachable": rt.link.reachable,
            "data_port": rt.config.data.port,
            "connections": sds.stats.connections,
            "devices": [
                {
                    "path": d.path,
                    "id": d.mdm_id,
                    "pool_id": d.pool_id,
                    "capacity_bytes": d.capacity,
                    "used_bytes": d.used_bytes,
                    "slots": d.slot_count,
                    "free_slots": len(d.free) + len(d.pending),
                    "checksum_unverified_slots": len(d.unverified),
                    "checksum_errors": d.checksum_errors,
                    "checksum_repaired": d.checksum_repaired,
                    "checksum_unrepairable": d.checksum_unrepairable,
                    "state": "failed" if d.failed else "ok",
                    "error": d.failed,
                }
                for d in sds.store.devices
            ],
            "maps": {str(pid): m.epoch for pid, m in sorted(sds.maps.maps.items())},
            "degraded_writes": {
                str(pool): {str(pg): n for pg, n in pgs.items()}
                for pool, pgs in sds.degraded.counts().items()
            },
            "tombstones": {str(t["id"]): t["chunks_left"] for t in sds.tombstones.report()},
            "tree_gc": sds.tree_gc.report(),
            "peer_timeouts": {
                str(peer): round(budget, 3) for peer, budget in sds.peers.budgets.budgets().items()
            },
            "resync": {
                "active": resync.active(),
                "chunks_total": resync.chunks_total,
                "bytes_total": resync.bytes_total,
                "pgs_total": resync.pgs_total,
                "full_total": resync.full_total,
                "marked_bad_blocks_total": resync.marked_bad_total,
                "done": resync.done,
            },
        }
    )


async def faults_state(request: web.Request) -> web.Response:
    hook = request.app[FAULT_HOOK]
    return web.json_response(hook.state())


async def faults_command(request: web.Request) -> web.Response:
    """``POST /test/faults`` (test-only), a JSON object with ``action``:

    - ``{"action": "power_cut", "lose": "all"|"random", "seed": 0}``: lose the pages
      written since each device's last sync (all, or a random half) and die (SIGKILL);
      no answer comes back;
    - ``{"action": "fail", "device": PATH, "op": "pwrite"|"pread"|"fdatasync",
      "count": N}``: the next N calls (``count`` absent or null: every call) fail EIO;
    - ``{"action": "flip_payload", "count": N}``: flip a byte of each of the next N
      (default 1) write payloads received on the data port (WRITE, REPL_WRITE), before
      anything checks them: a payload damaged between its sender and this SDS;
    - ``{"action": "clear"}``: fail nothing any more;
    - ``{"action": "evict"}``: pages a failed fdatasync marked clean read as on disk.
    """
    hook = request.app[FAULT_HOOK]
    try:
        body = await request.json()
        action = body["action"]
        if action == "power_cut":
            lose = body.get("lose", "all")
            if lose not in ("all", "random"):
                raise ValueError("lose must be all or random")
            hook.power_cut(lose, int(body.get("seed", 0)))
        elif action == "fail":
            devices = {d.path for d in request.app[RUNTIME].state.store.devices}
            if body.get("device") not in devices:
                raise ValueError(f"device must be one of {sorted(devices)}")
            count = body.get("count")
            hook.fail(body["device"], str(body.get("op")), None if count is None else int(count))
        elif action == "flip_payload":
            hook.flip_payloads(int(body.get("count", 1)))
        elif action == "clear":
            hook.clear()
        elif action == "evict":
            hook.evict()
        else:
            raise ValueError("action must be power_cut, fail, flip_payload, clear or evict")
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": {"code": "invalid", "message": str(exc)}}, status=400)
    return web.json_response(hook.state())


@metrics_access.guarded
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RUNTIME].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _share_runtime(app: web.Application, side: web.Application) -> None:
    side[RUNTIME] = app[RUNTIME]


def create_app(config: SdsConfig, secret: str) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[SECRET] = secret
    app.cleanup_ctx.append(_runtime)
    app.cleanup_ctx.append(_data_server)
    app.cleanup_ctx.append(_mdm_link)
    app.cleanup_ctx.append(crl_reload(config.tls, "sds", lambda a: a[RUNTIME].registry))
    metrics_access.install(app, "sds", config.metrics, config.audit)
    if config.metrics.port:
        routes = (("/health", health), ("/metrics", metrics))
        app.cleanup_ctx.append(metrics_access.open_listener(config.metrics, routes, _share_runtime))
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    if config.test_faults and device_io.enabled_by_env():
        # Before the store opens its devices: the hook must see every write.
        cuts = Path(config.state_dir) / "test_power_cuts"
        app[FAULT_HOOK] = device_io.install_fault_hook(str(cuts))
        app.router.add_get("/test/faults", faults_state)
        app.router.add_post("/test/faults", faults_command)
    return app
