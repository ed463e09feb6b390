"""The SDS's link to the MDM: registration, heartbeats, and following the PG maps.

- At start the SDS registers by the names in its config
  (``POST /api/v1/sds/register``), retrying with back-off until the MDM answers, and
  learns its id and its devices' ids and pools.
- Every heartbeat interval (the MDM's ``[cluster] heartbeat_interval_s``, the
  config's ``heartbeat_interval_s`` until it answers) it reports device usage and
  chunks per volume, what changed since the MDM's last acknowledgement
  (``POST /api/v1/sds/{id}/heartbeat``, :mod:`meshblock.sds.heartbeat`); an MDM that
  no longer knows it makes it register again.
- One task per pool long-polls ``GET /api/v1/pools/{id}/pgmap?wait_epoch=N``, and,
  with a certificate (the MDM refuses them to the cluster secret), one its mappings
  (``GET /api/v1/pools/{id}/mappings?wait_epoch=N&since=N``: which SDC may do client
  IO to which volume, :mod:`meshblock.sds.access`), which are also fetched at once
  when a client's IO to a volume they do not map to it arrives.
- Copies done (resync, rebuild, moves) are reported together: those that end within
  ``SYNCED_BATCH_S`` of each other in one ``POST /api/v1/sds/{id}/pgs-synced``.
- A device that fails (``meshblock.sds.store``, fail-stop) is reported at once
  (``POST /api/v1/sds/{id}/devices/{device}/failed``), again until the MDM accepts it
  and again after every registration; it is saved in the state file, so that it stays
  failed after a restart (:func:`saved_failed_devices`) until the operator replaces it.
- Identity, maps and failed devices are saved in ``state_dir/state.json`` (by
  :func:`meshblock.files.write_atomic`), and loaded at the next start: with the MDM
  unreachable the SDS serves on its cached maps (docs/design.md, invariant 5) and keeps
  retrying. Several MDM URLs are tried in turn. The file is written in a thread (two
  fsyncs), one save at a time, the newest state winning.
- Devices that need a full copy after a power cut stay in ``state_dir/unclean.json``
  until the MDM accepted a registration carrying them (docs/sds.md, "Power cuts").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

from meshblock import pgmap_delta, pki
from meshblock.config import ConfigError
from meshblock.files import fsync_directory, write_atomic
from meshblock.sds.config import SdsConfig
from meshblock.sds.heartbeat import Heartbeats, Snapshot
from meshblock.sds.maps import PgMap
from meshblock.sds.peer_probe import PeerProbes, wire_pinger
from meshblock.sds.resync import Resync
from meshblock.sds.scrub import Scrubber
from meshblock.sds.state import SdsState
from meshblock.sds.store import Device
from meshblock.timeouts import heartbeat_interval
from meshblock.tls import MdmTls, mdm_tls

log = logging.getLogger(__name__)

# Exit code of an SDS that cannot save that one of its devices failed (docs/sds.md).
EXIT_FAILURE_NOT_SAVED = 4


def fail_stop(message: str) -> NoReturn:
    """Log ``message`` and end the process at once: no request in progress is answered,
    no device is marked clean (the next start is an unclean one)."""
    log.critical("%s", message)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(OSError):
        os.write(2, f"meshblock-sds: {message}\n".encode())
    os._exit(EXIT_FAILURE_NOT_SAVED)


STATE_FILE = "state.json"
# Devices whose copies need a full copy, until the MDM accepts a registration that says
# so (docs/sds.md, "Power cuts"): written at start, removed after that registration.
UNCLEAN_FILE = "unclean.json"


def pending_unclean(state_dir: Path) -> list[str]:
    """The devices recorded by :func:`record_pending_unclean`; none without a record.
    A record that cannot be read or parsed raises ``OSError`` (never taken as none)."""
    path = state_dir / UNCLEAN_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise OSError(f"malformed {path}: {exc}") from exc
    if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
        raise OSError(f"malformed {path}: not a list of device paths")
    return doc


def record_pending_unclean(state_dir: Path, paths: list[str]) -> None:
    """Durably record that ``paths`` need a full copy (none: remove the record)."""
    path = state_dir / UNCLEAN_FILE
    if paths:
        write_atomic(path, json.dumps(paths))
        return
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_directory(state_dir)


REPORT_EVERY_S = 2.0  # a peer is reported unreachable at most this often
# Copies done within this long of the first one go to the MDM in one report, which
# makes all of their PGs clean at one map epoch (one map fetch for every SDS and SDC).
SYNCED_BATCH_S = 0.2
MAX_SYNCED_REPORTS = 1024  # per call, as the MDM accepts


FAILURE_RETRY_S = 1.0  # a failed device's report is sent again this often until accepted


class MdmUnavailable(Exception):
    """No MDM URL answered."""


def mdm_tls_of(config: SdsConfig) -> MdmTls:
    """How this SDS reaches the MDM (``[tls]``, meshblock.tls); its certificate must
    name it (``sds:<name>``). :class:`ConfigError` otherwise."""
    link = mdm_tls(config.tls, config.mdm_urls, pki.Kind.SDS, key="mdm_urls")
    if link.identity is not None and link.identity.name != config.name:
        raise ConfigError(
            f"[tls] cert {config.tls.cert} names {link.identity}, but this SDS is sds:{config.name}"
        )
    return link


def saved_failed_devices(state_dir: str) -> dict[str, str]:
    """Path -> hex uuid of the devices a previous run failed (from the state file)."""
    try:
        state = json.loads((Path(state_dir) / STATE_FILE).read_text())
        failed = state.get("failed_devices", {})
        return {str(path): str(doc["uuid"]) for path, doc in failed.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # Unreadable: the store opens every device (and fails it again on its error).
        log.warning("cannot read the failed devices from the state file: %s", exc)
        return {}


def unchanged(doc: Any) -> bool:
    """Whether a mappings answer says "no change since the epoch you have" (``since=``)."""
    return isinstance(doc, dict) and doc.get("unchanged") is True


class MdmLink:
    def __init__(self, config: SdsConfig, secret: str, sds: SdsState, resync: Resync) -> None:
        self._config = config
        self._secret = secret
        self._sds = sds
        self._resync = resync
        self.scrubber: Scrubber | None = None  # the background scrub (set by the app)
        self._urls = [u.rstrip("/") for u in config.mdm_urls]
        self._cur = 0
        self._session: aiohttp.ClientSession | None = None
        self._followers: dict[int, asyncio.Task[None]] = {}
        self._mappings_followers: dict[int, asyncio.Task[None]] = {}
        # Only an SDS whose data port has TLS identities (a certificate, and [data] tls
        # on) checks client IO against the mappings, and the MDM gives them only to its
        # certificate (docs/security.md). Another does not follow them, so it never
        # names a mappings epoch: an unmap cannot count it as having taken one.
        self._follows_mappings = bool(config.tls.cert) and config.data.tls
        self._tasks: list[asyncio.Task[None]] = []
        self._state_path = Path(config.state_dir) / STATE_FILE
        self._state_lock = threading.Lock()  # one writer of the state file at a time
        self._state_taken = 0  # states taken for saving (each numbered)
        self._state_written = 0  # the newest of them in the file
        # Per pool, the mappings epoch the state file holds: the one our requests name
        # (since=E), never a newer one only in memory (the MDM counts a named epoch as
        # taken for good: an SDS that restarted would serve by the older file's).
        self._mappings_saved: dict[int, int] = {}
        self.reachable = False
        # The highest cluster epoch the MDM's heartbeat replies carried: reported back,
        # so that an MDM restored from an older database sees it (mdm/reconcile.py).
        self.cluster_epoch = 0
        self.registered = asyncio.Event()
        resync.reporter = self._report_synced
        sds.peer_unreachable = self.report_unreachable
        self._reported: dict[int, float] = {}  # peer SDS -> when we last reported it
        # copies done, waiting for the next pgs-synced call, and the task that sends it
        self._synced: list[tuple[tuple[int, int, int], asyncio.Future[int | None]]] = []
        self._synced_task: asyncio.Task[None] | None = None
        # Failed devices (path -> {"uuid", "error"}): saved, and reported to the MDM.
        saved = saved_failed_devices(config.state_dir)
        self._failures: dict[str, dict[str, str]] = {}
        for dev in sds.store.devices:
            if dev.failed:
                uuid = dev.uuid.hex() if dev.uuid else saved.get(dev.path, "")
                self._failures[dev.path] = {"uuid": uuid, "error": dev.failed}
        self._failures_reported: set[str] = set()
        self._failure_task: asyncio.Task[None] | None = None
        sds.device_failed = self._device_failed
        sds.access.fetcher = self._fetch_mappings
        # SDSs held down by the MDM that it asks us to ping (docs/mdm.md, hold-down)
        self.peer_probes = PeerProbes(wire_pinger(secret, config.wire_min_version, sds.peers.tls))
        self.beats = Heartbeats()
        # The config's until the MDM says otherwise (its heartbeat answers).
        self.heartbeat_interval_s = config.heartbeat_interval_s

    # -- state file -------------------------------------------------------------------

    def load_state(self) -> None:
        """Load identity and maps saved by a previous run, if any."""
        try:
            state = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self._state_path, exc)
            return
        try:
            devices = {p: (int(v[0]), int(v[1])) for p, v in state["devices"].items()}
            self._sds.set_identity(int(state["sds_id"]), devices)
            for doc in state["maps"].values():
                self._sds.maps.update(PgMap.from_doc(doc))
            for doc in (state.get("mappings") or {}).values():
                self._sds.maps.terms.saw(doc)
                self._sds.access.update(doc)
            self._saved_mappings(self._mappings_epochs())
            # A cached map may be older than writes we made alone before we stopped:
            # it must not make a record look complete (resync falls back to full).
            self._sds.seen_maps.clear()
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed state file %s: %s", self._state_path, exc)
            return
        log.info(
            "loaded cached identity (SDS %d) and %d map(s) from %s",
            self._sds.sds_id,
            len(self._sds.maps.maps),
            self._state_path,
        )

    def _state_doc(self) -> str:
        sds = self._sds
        state = {
            "sds_id": sds.sds_id,
            "devices": {
                d.path: [d.mdm_id, d.pool_id]
                for d in sds.store.devices
                if d.mdm_id is not None and d.pool_id is not None
            },
            "maps": {str(pid): m.doc for pid, m in sds.maps.maps.items()},
            "mappings": sds.access.docs(),
            "failed_devices": self._failures,
        }
        return json.dumps(state)

    async def _save_state(self) -> bool:
        """Save identity and maps, in a thread (two fsyncs). The state is taken now; a
        save that reaches the file after a newer one has is skipped, and one writes at
        a time, so the newest state wins. Whether the state taken now is in the file
        (this save or a newer one wrote it)."""
        self._state_taken += 1
        epochs = self._mappings_epochs()
        saved = await asyncio.to_thread(self._write_state, self._state_taken, self._state_doc())
        if saved:
            self._saved_mappings(epochs)
        return saved

    def _save_state_now(self) -> None:
        """Save the state on the event loop, before returning: numbered like the saves
        in threads (an older one still waiting is skipped). Raises ``OSError``."""
        self._state_taken += 1
        epochs = self._mappings_epochs()
        self._write_state(self._state_taken, self._state_doc(), fatal=True)
        self._saved_mappings(epochs)

    def _write_state(self, seq: int, data: str, *, fatal: bool = False) -> bool:
        with self._state_lock:
            if seq <= self._state_written:
                return True  # a newer state is in the file already
            try:
                self._state_path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self._state_path, data)
            except OSError as exc:
                if fatal:
                    raise
                log.warning("cannot save state to %s: %s", self._state_path, exc)
                return False
            self._state_written = seq
            return True

    def _mappings_epochs(self) -> dict[int, int]:
        access = self._sds.access
        return {int(p): access.epoch(int(p)) for p in access.docs()}

    def _saved_mappings(self, epochs: dict[int, int]) -> None:
        saved = self._mappings_saved
        for pool_id, epoch in epochs.items():
            saved[pool_id] = max(saved.get(pool_id, -1), epoch)

    def _named_epoch(self, pool_id: int) -> int:
        """The mappings epoch our requests name for the pool (-1: none): the newest
        we have taken and saved, not one a failed save left only in memory."""
        return min(self._sds.access.epoch(pool_id), self._mappings_saved.get(pool_id, -1))

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        link = mdm_tls_of(self._config)
        # With a certificate the MDM goes by its identity: the secret stays at home.
        headers = {} if link.identity else {"Authorization": f"Bearer {self._secret}"}
        self._session = aiohttp.ClientSession(headers=headers, connector=link.connector())
        self._tasks.append(asyncio.create_task(self._main(), name="mdm-link"))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._followers.values(), *self._mappings_followers.values()]
        self._sds.access.stop()
        if self._synced_task is not None:
            tasks.append(self._synced_task)
        if self._failure_task is not None:
            tasks.append(self._failure_task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.peer_probes.stop()
        if self._session is not None:
            await self._session.close()

    async def _main(self) -> None:
        if self._sds.sds_id:
            self._follow_pools()  # serve and follow on cached identity meanwhile
        await self._register()
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._heartbeat()
            except MdmUnavailable as exc:
                self._unreachable(exc)

    # -- HTTP -------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, body: Any = None, wait_s: float = 10.0
    ) -> tuple[int, Any]:
        assert self._session is not None
        last: BaseException | None = None
        timeout = aiohttp.ClientTimeout(total=wait_s)
        for _ in range(len(self._urls)):
            url = self._urls[self._cur] + path
            try:
                async with self._session.request(method, url, json=body, timeout=timeout) as r:
                    data = await r.json(content_type=None)
                    if not self.reachable:
                        log.info("MDM at %s reachable", self._urls[self._cur])
                    self.reachable = True
                    return r.status, data
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = exc
                self._cur = (self._cur + 1) % len(self._urls)
        raise MdmUnavailable(f"no MDM answered ({last!r})")

    async def _report_synced(self, pool_id: int, pg: int, epoch: int) -> int | None:
        """Tell the MDM a PG's copy is done; the pool's map epoch that has it done, or
        None when the MDM refused. Reports made within ``SYNCED_BATCH_S`` of the
        first waiting one go in one ``pgs-synced`` call."""
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._synced.append(((pool_id, pg, epoch), fut))
        if self._synced_task is None or self._synced_task.done():
            self._synced_task = asyncio.create_task(self._send_synced(), name="pgs-synced")
        return await fut

    async def _send_synced(self) -> None:
        while self._synced:
            await asyncio.sleep(SYNCED_BATCH_S)
            batch = self._synced[:MAX_SYNCED_REPORTS]
            del self._synced[:MAX_SYNCED_REPORTS]
            try:
                results = await self._post_synced([report for report, _ in batch])
            except Exception as exc:  # MDM unreachable: each job retries on its own
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(MdmUnavailable(str(exc)))
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def _post_synced(
        self, reports: list[tuple[int, int, int]]
    ) -> list[int | Exception | None]:
        """Per report: the map epoch that has it done, None (refused), or the error
        that left it unanswered."""
        body = {"reports": [{"pool_id": p, "pg": g, "epoch": e} for p, g, e in reports]}
        path = f"/api/v1/sds/{self._sds.sds_id}/pgs-synced"
        status, doc = await self._call("POST", path, body)
        if status in (404, 405):
            # An MDM of an older release has no pgs-synced (or it does not know us, and
            # each report is refused the same way): one call per PG, each answered on
            # its own (one that fails does not undo those the MDM accepted).
            one_by_one: list[int | Exception | None] = []
            for report in reports:
                try:
                    one_by_one.append(await self._report_one(*report))
                except MdmUnavailable as exc:
                    one_by_one.append(exc)
            return one_by_one
        if status != 200:
            raise MdmUnavailable(f"pgs-synced answered {status}")
        out: list[int | Exception | None] = []
        for (pool_id, pg, epoch), result in zip(reports, doc["results"], strict=True):
            if result["accepted"]:
                out.append(int(result["epoch"]))
                continue
            log.info(
                "MDM refused PG %d/%d synced at epoch %d: %s",
                pool_id,
                pg,
                epoch,
                result.get("error"),
            )
            out.append(None)
        return out

    async def _report_one(self, pool_id: int, pg: int, epoch: int) -> int | None:
        body = {"pool_id": pool_id, "pg": pg, "epoch": epoch}
        status, doc = await self._call("POST", f"/api/v1/sds/{self._sds.sds_id}/pg-synced", body)
        if status == 200:
            return int(doc["epoch"])
        if status in (404, 409):
            log.info("MDM refused PG %d/%d synced at epoch %d: %s", pool_id, pg, epoch, doc)
            return None
        raise MdmUnavailable(f"pg-synced answered {status}")

    def report_unreachable(self, peer: int) -> None:
        """Tell the MDM (in the background, at most every ``REPORT_EVERY_S`` per peer)
        that a peer SDS did not answer: it confirms and fails it at once instead of
        after the heartbeat timeout."""
        now = time.monotonic()
        if (
            self._session is None
            or now - self._reported.get(peer, -REPORT_EVERY_S) < REPORT_EVERY_S
        ):
            return
        self._reported[peer] = now
        task = asyncio.create_task(self._send_unreachable(peer), name=f"unreachable-{peer}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send_unreachable(self, peer: int) -> None:
        body = {"reporter": f"sds:{self._sds.sds_id}"}
        try:
            status, doc = await self._call("POST", f"/api/v1/sds/{peer}/unreachable", body, 5.0)
        except MdmUnavailable as exc:
            log.info("cannot report SDS %d unreachable: %s", peer, exc)
            return
        if status == 200 and doc.get("confirmed"):
            log.warning("reported SDS %d unreachable; the MDM confirmed it", peer)

    # -- failed devices ---------------------------------------------------------------

    def _device_failed(self, dev: Device) -> None:
        """A device just failed: save it (it stays failed after a restart) before the
        request that hit the error is answered, and report it to the MDM now.

        The save blocks the event loop (write_atomic: two fsyncs, and waiting for a
        save in a thread to finish): a device failure is rare, and forgetting one is
        worse. If it cannot be saved the whole SDS stops at once (fail-stop, exit code
        :data:`EXIT_FAILURE_NOT_SAVED`), answering nothing more: restarted with the
        device open and a cached map naming it in sync, it would serve stale copies."""
        uuid = dev.uuid.hex() if dev.uuid else ""
        self._failures[dev.path] = {"uuid": uuid, "error": dev.failed or ""}
        try:
            self._save_state_now()
        except OSError as exc:
            fail_stop(
                f"device {dev.path} failed ({dev.failed}) and this cannot be saved to "
                f"{self._state_path}: {exc}; stopping the SDS (exit code "
                f"{EXIT_FAILURE_NOT_SAVED}) rather than risk serving it again after a restart"
            )
        self._report_failures()

    def _report_failures(self) -> None:
        if self._session is None or not self._sds.sds_id:
            return  # reported after the registration
        if self._failure_task is None or self._failure_task.done():
            self._failure_task = asyncio.create_task(self._send_failures(), name="device-failures")

    async def _send_failures(self) -> None:
        while True:
            todo = [
                d
                for d in self._sds.store.failed_devices()
                if d.mdm_id is not None and d.path not in self._failures_reported
            ]
            if not todo:
                return
            for dev in todo:
                if await self._send_failure(dev):
                    self._failures_reported.add(dev.path)
            if any(d.path not in self._failures_reported for d in todo):
                await asyncio.sleep(FAILURE_RETRY_S)

    async def _send_failure(self, dev: Device) -> bool:
        """Report one failed device; True when the MDM has it (or will never take it)."""
        path = f"/api/v1/sds/{self._sds.sds_id}/devices/{dev.mdm_id}/failed"
        try:
            status, doc = await self._call("POST", path, {"error": (dev.failed or "")[:1000]}, 5.0)
        except MdmUnavailable as exc:
            self._unreachable(exc)
            return False
        if status == 200:
            log.warning("reported device %s (id %s) failed to the MDM", dev.path, dev.mdm_id)
            return True
        if status == 404:
            log.error("the MDM does not know device %s (id %s): %s", dev.path, dev.mdm_id, doc)
            return True
        log.warning("report of failed device %s answered %d: %s", dev.path, status, doc)
        return False

    def _unreachable(self, exc: Exception) -> None:
        if self.reachable:
            log.warning("MDM unreachable, serving on cached maps: %s", exc)
        self.reachable = False

    # -- registration and heartbeats --------------------------------------------------

    async def _register(self) -> None:
        cfg = self._config
        body: dict[str, Any] = {
            "name": cfg.name,
            "protection_domain": cfg.protection_domain,
            "address": cfg.address,
            "data_port": cfg.data.port,
            "control_port": cfg.control.port,
            "devices": [
                {"path": d.path, "capacity": d.capacity_bytes, "pool": d.pool}
                | ({"name": d.name} if d.name else {})
                for d in cfg.devices
            ],
        }
        if cfg.fault_set:
            body["fault_set"] = cfg.fault_set
        unclean = list(self._sds.store.unclean)
        if unclean:
            body["unclean_devices"] = unclean
        delay = 0.5
        pending = False
        while True:
            # A new SDS's admission (docs/security.md), read at each attempt (a pending
            # SDS may be given one meanwhile); the MDM ignores it for a known SDS.
            try:
                token = cfg.token()
            except ConfigError as exc:
                log.warning("registering without a join token: %s", exc)
                token = None
            body.pop("join_token", None)
            if token:
                body["join_token"] = token
            try:
                status, doc = await self._call("POST", "/api/v1/sds/register", body)
            except MdmUnavailable as exc:
                self._unreachable(exc)
            else:
                if status in (200, 201):
                    break
                if status == 202:  # held until an admin approves us; ask again
                    if not pending:
                        log.warning(
                            "the MDM holds SDS %s as pending until an admin approves it "
                            "(meshctl sds approve %s); asking again every few seconds",
                            cfg.name,
                            cfg.name,
                        )
                    pending = True
                else:
                    message = doc.get("error", {}).get("message") if isinstance(doc, dict) else doc
                    log.error("the MDM refused our registration (%d): %s", status, message)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        devices = {d["path"]: (int(d["id"]), int(d["pool_id"])) for d in doc["devices"]}
        self._sds.set_identity(int(doc["id"]), devices)
        self._fail_as_the_mdm_says(doc["devices"])
        log.info(
            "registered as SDS %d with %d device(s)%s",
            self._sds.sds_id,
            len(devices),
            " (after an unclean stop: their copies are recopied)" if unclean else "",
        )
        # The MDM has made every PG with a copy on them copy it anew, in the same
        # transaction: a later registration (the MDM forgot us), or the next start,
        # need not say it again.
        store = self._sds.store
        store.unclean = [p for p in store.unclean if p not in unclean]
        if unclean:
            state_dir = Path(self._config.state_dir)
            try:
                await asyncio.to_thread(record_pending_unclean, state_dir, store.unclean)
            except OSError as exc:  # the next start says it again: one more full copy
                log.warning("cannot clear the pending full copies in %s: %s", state_dir, exc)
        await self._save_state()
        self.registered.set()
        self._failures_reported.clear()  # the MDM may have been restored meanwhile
        self._report_failures()
        self._follow_pools()

    def _fail_as_the_mdm_says(self, docs: list[dict[str, Any]]) -> None:
        """Fail the devices that the MDM holds as failed and we do not: our record of
        the failure was lost (state.json not written, or replaced). Saved again at once
        (:meth:`_device_failed`)."""
        by_path = {d.path: d for d in self._sds.store.devices}
        for doc in docs:
            dev = by_path.get(doc["path"])
            if doc.get("state") != "failed" or dev is None or dev.failed:
                continue
            log.error(
                "%s: failed at the MDM but not in our state file: failing it again",
                dev.path,
            )
            self._sds.store.fail(dev, f"failed at the MDM: {doc.get('error') or 'IO error'}")

    def _snapshot(self) -> Snapshot:
        sds = self._sds
        tombstones = sds.tombstones.report()
        # A deleted volume's count until it reaches 0, so that the MDM sees it freed.
        volumes = sds.store.volume_chunks() | {t["id"]: t["chunks_left"] for t in tombstones}
        return Snapshot(
            devices={d.mdm_id: d.used_bytes for d in sds.store.devices if d.mdm_id is not None},
            volumes=volumes,
            tombstones={t["id"]: (t["chunks_left"], t["epoch"]) for t in tombstones},
            map_epochs={p: m.epoch for p, m in sorted(sds.maps.maps.items())},
            epoch=self.cluster_epoch,
            copies=self._resync.report(),
            scrub=self.scrubber.report() if self.scrubber is not None else None,
            tree_gc=sds.tree_gc.heartbeat(),
        )

    async def _heartbeat(self) -> None:
        """One heartbeat: what changed since the state the MDM acknowledged, or
        everything (:mod:`meshblock.sds.heartbeat`); then what the MDM answers."""
        sds = self._sds
        body = self.beats.body(self._snapshot())
        probes = self.peer_probes.report()
        if probes:
            body["probes"] = probes
        try:
            status, doc = await self._call("POST", f"/api/v1/sds/{sds.sds_id}/heartbeat", body)
        except MdmUnavailable:
            self.beats.answered(0, None)
            raise
        if status == 200 and not sds.maps.terms.admit(doc, "a heartbeat answer"):
            self.beats.answered(0, None)  # a deposed MDM's: as if unanswered
            return
        self.beats.answered(status, doc)
        if status == 200 and isinstance(doc, dict) and isinstance(doc.get("epoch"), int):
            self.cluster_epoch = max(self.cluster_epoch, doc["epoch"])
        if status == 200 and isinstance(doc, dict):
            # absent from an MDM of an older release
            self.peer_probes.set_targets(doc.get("probe") or ())
            scrub = doc.get("scrub")
            if self.scrubber is not None and isinstance(scrub, dict):
                self.scrubber.order(scrub.get("orders"), scrub.get("findings_acked"))
            self._set_interval(doc.get("heartbeat_interval_s"))
        if status == 404:
            log.warning("the MDM does not know SDS %d any more; registering again", sds.sds_id)
            await self._register()
        elif status != 200:
            log.warning("heartbeat refused with status %d", status)

    def _set_interval(self, said: object) -> None:
        """The heartbeat interval the cluster sets ([cluster] heartbeat_interval_s)."""
        interval = heartbeat_interval(said, self.heartbeat_interval_s)
        if interval != self.heartbeat_interval_s:
            log.info("heartbeat interval %g s, as the MDM says", interval)
            self.heartbeat_interval_s = interval

    # -- maps -------------------------------------------------------------------------

    def _follow_pools(self) -> None:
        pools = {d.pool_id for d in self._sds.store.devices if d.pool_id is not None}
        for pool_id in pools - self._mappings_followers.keys() if self._follows_mappings else ():
            self._mappings_followers[pool_id] = asyncio.create_task(
                self._follow_mappings(pool_id), name=f"mappings-{pool_id}"
            )
            self._sds.access.followed.add(pool_id)
        for pool_id in pools - self._followers.keys():
            self._followers[pool_id] = asyncio.create_task(
                self._follow(pool_id), name=f"pgmap-{pool_id}"
            )

    async def _follow(self, pool_id: int) -> None:
        maps = self._sds.maps
        poll = self._config.map_poll_timeout_s
        whole = False  # ask for the whole map at once (a delta did not make the MDM's)
        # our map and its digest: computed once (off the event loop) for a map taken
        # whole, then updated by each delta from the items it changes
        held: tuple[PgMap, int] | None = None
        while True:
            epoch = maps.epoch(pool_id)
            path = f"/api/v1/pools/{pool_id}/pgmap"
            have = maps.get(pool_id)
            if not whole:
                path += f"?wait_epoch={epoch}&timeout={poll:g}"
                if have is not None:
                    path += f"&since={have.epoch}"  # the changes since, when the MDM has them
            try:
                status, doc = await self._call("GET", path, wait_s=poll + 10)
            except MdmUnavailable as exc:
                self._unreachable(exc)
                await asyncio.sleep(1.0)
                continue
            if status == 403:
                # With a certificate, the MDM gives the map only of a pool this SDS
                # has a device in (a device removed from it since): ask again rarely.
                log.warning("map of pool %d refused (no device of this SDS in it?)", pool_id)
                await asyncio.sleep(max(poll, 1.0))
                continue
            if status != 200:
                log.warning("map of pool %d: status %d", pool_id, status)
                await asyncio.sleep(1.0)
                continue
            if not maps.terms.admit(doc, f"the map of pool {pool_id}"):
                await asyncio.sleep(1.0)  # a deposed MDM's: until another answers
                continue
            same_epoch, whole = whole, False
            delta = pgmap_delta.is_delta(doc)
            digest: int | None = None  # of ``doc``, once it is whole
            if delta:
                if have is None:
                    continue
                if held is None or held[0] is not have:
                    held = (have, await asyncio.to_thread(pgmap_delta.digest, have.doc))
                if doc.get("epoch") == have.epoch and doc.get("from_epoch") == have.epoch:
                    # no change (the long-poll's timeout), if ours is the MDM's map
                    ours = pgmap_delta.digest_hex(held[1])
                    if doc.get("digest") == ours:
                        continue
                    log.warning(
                        "pool %d: our map at epoch %d is not the MDM's (digest %s, the MDM's "
                        "%s); fetching the whole map",
                        pool_id,
                        have.epoch,
                        ours,
                        doc.get("digest"),
                    )
                    whole = True
                    continue
                try:
                    doc, digest = pgmap_delta.apply_digested(have.doc, doc, held[1])
                except ValueError as exc:
                    log.warning("pool %d: %s; fetching the whole map", pool_id, exc)
                    whole = True
                    continue
            try:
                m = PgMap.from_doc(doc)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("malformed map of pool %d: %s", pool_id, exc)
                await asyncio.sleep(1.0)
                continue
            if maps.update(m, same_epoch=same_epoch):
                if digest is not None:
                    held = (m, digest)
                log.info(
                    "pool %d: map epoch %d%s", pool_id, m.epoch, " by a delta" if delta else ""
                )
                await self._save_state()
                self._sds.collect_garbage(m)

    # -- mappings (sds/access.py) -----------------------------------------------------

    async def _follow_mappings(self, pool_id: int) -> None:
        """Long-poll the pool's mappings document, keeping each newer one (saved). Each
        answer confirms the document held, when it is the MDM's (SdcAccess.confirm)."""
        access = self._sds.access
        poll = self._config.map_poll_timeout_s
        while True:
            if access.epoch(pool_id) > self._named_epoch(pool_id):
                # Taken, but its save failed: not named to the MDM before it is saved.
                if not await self._save_state():
                    await asyncio.sleep(1.0)
                    continue
            epoch = self._named_epoch(pool_id)
            # at a timeout with nothing changed, "unchanged" rather than the document
            wait = f"?wait_epoch={epoch}&timeout={poll:g}&since={epoch}" if epoch >= 0 else ""
            try:
                status, doc = await self._call(
                    "GET", f"/api/v1/pools/{pool_id}/mappings{wait}", wait_s=poll + 10
                )
            except MdmUnavailable as exc:
                self._unreachable(exc)
                await asyncio.sleep(1.0)
                continue
            if status != 200:
                log.warning("mappings of pool %d: status %d", pool_id, status)
                await asyncio.sleep(max(poll, 1.0) if status == 403 else 1.0)
                continue
            if not self._sds.maps.terms.admit(doc, f"the mappings of pool {pool_id}"):
                await asyncio.sleep(1.0)
                continue
            try:
                newer = not unchanged(doc) and access.update(doc)
            except ValueError as exc:
                log.error("mappings of pool %d: %s", pool_id, exc)
                await asyncio.sleep(1.0)
                continue
            # "unchanged" is at the epoch asked for; a document (newer, or the one held)
            # at its own
            access.confirm(pool_id, epoch if unchanged(doc) else int(doc["epoch"]))
            if newer:
                log.info("pool %d: mappings epoch %d", pool_id, access.epoch(pool_id))
                await self._save_state()

    async def _fetch_mappings(self, pool_id: int) -> dict[str, Any] | None:
        """The pool's mappings document now if it changed since the one we have: taken
        and saved here (the access keeps it; None: unchanged, or the MDM did not give
        it, or it is not newer). A document an earlier refresh took but did not save
        (its save failed, or REFRESH_TIMEOUT_S cancelled it) is saved first: the MDM
        would only send it again, not newer, and it would never be saved."""
        access = self._sds.access
        if access.epoch(pool_id) > self._named_epoch(pool_id):
            await self._save_state()
        epoch = self._named_epoch(pool_id)
        since = f"?since={epoch}" if epoch >= 0 else ""
        try:
            status, doc = await self._call(
                "GET", f"/api/v1/pools/{pool_id}/mappings{since}", wait_s=5.0
            )
        except MdmUnavailable as exc:
            self._unreachable(exc)
            return None
        if status != 200 or not isinstance(doc, dict):
            log.warning("mappings of pool %d: status %d", pool_id, status)
            return None
        if not self._sds.maps.terms.admit(doc, f"the mappings of pool {pool_id}"):
            return None
        if unchanged(doc) or not access.update(doc):
            return None
        await self._save_state()  # named by our next request only once saved
        return doc
