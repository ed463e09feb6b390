"""Membership and maps: registration, heartbeats, and following the maps.

:class:`MapFollower` registers the SDC with the MDM, sends heartbeats and keeps the
latest maps, following them with the MDM's long-poll so that a change reaches the SDC
as soon as the MDM commits it. The IO path asks for an immediate refresh
(:meth:`MapFollower.refresh`) when an SDS refuses a request for a stale epoch.

When no MDM can be reached, the SDC keeps serving IO on the maps it has (docs/design.md,
invariant 5); the maps are also kept in ``<state_dir>/maps.json`` so that an SDC
restarted while the MDM is down still serves its volumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshblock import pgmap_delta
from meshblock.files import write_atomic
from meshblock.sdc.maps import MapError, PoolMap, SdcMaps, parse_maps
from meshblock.sdc.mdm_client import MdmClient, MdmRefused, MdmUnavailable, sleep_backoff
from meshblock.terms import Terms
from meshblock.timeouts import heartbeat_interval

log = logging.getLogger(__name__)

#: Refreshes closer together than this share one request to the MDM.
MIN_REFRESH_INTERVAL_S = 0.05
REPORT_EVERY_S = 2.0  # an unreachable SDS is reported at most this often


class MapFollower:
    def __init__(
        self,
        client: MdmClient,
        *,
        guid: str,
        name: str,
        address: str,
        control_port: int,
        nbd_port: int,
        state_dir: Path,
        heartbeat_interval_s: float,
        longpoll_s: float,
    ) -> None:
        self.client = client
        self.guid = guid
        self.name = name
        self.address = address
        self.control_port = control_port
        self.nbd_port = nbd_port
        self.state_dir = state_dir
        self.heartbeat_interval_s = heartbeat_interval_s
        self.longpoll_s = longpoll_s
        self.sdc_id: int | None = None
        self.maps: SdcMaps | None = None
        self.mdm_reachable = False
        self.last_contact: float | None = None
        self.listeners: list[Callable[[SdcMaps], None]] = []
        self._registered = asyncio.Event()
        self._refreshing: asyncio.Future[None] | None = None
        self._last_refresh = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: dict[int, float] = {}  # SDS -> when we last reported it
        self._doc: dict[str, Any] | None = None  # the maps document of self.maps, whole
        self._whole = False  # ask for whole maps (a delta did not make the MDM's)
        self.deltas_applied = 0  # pools' maps updated by a delta
        # pool key -> (its document in self._doc, that document's digest): computed once
        # (off the event loop) for a map taken whole, then updated by each delta
        self._digests: dict[str, tuple[Any, int]] = {}
        # the highest MDM leader term seen: maps and answers of an older one (a deposed
        # MDM's) are refused (meshblock.terms)
        self.terms = Terms()

    # -- MapSource ----------------------------------------------------------------

    def pool(self, pool_id: int) -> PoolMap | None:
        return self.maps.pools.get(pool_id) if self.maps is not None else None

    async def refresh(self) -> None:
        """Fetch the maps now (one request shared by concurrent callers)."""
        if self._refreshing is None:
            if time.monotonic() - self._last_refresh < MIN_REFRESH_INTERVAL_S:
                await asyncio.sleep(MIN_REFRESH_INTERVAL_S)
                if self._refreshing is None:
                    return
            else:
                self._refreshing = asyncio.ensure_future(self._refresh_once())
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)

    async def _refresh_once(self) -> None:
        try:
            if self.sdc_id is not None:
                try:
                    answer = await self.client.maps(self.sdc_id, map_epochs=self._map_epochs())
                    await self._digest_held(answer)
                    self._apply(answer)
                except MapError:
                    if not self._whole:
                        raise
                    self._apply(await self.client.maps(self.sdc_id))  # once, whole
                self._reachable(True)
        except (MdmUnavailable, MdmRefused, MapError) as exc:
            self._reachable(False, str(exc))
        finally:
            self._last_refresh = time.monotonic()
            self._refreshing = None

    def report_unreachable(self, sds_id: int) -> None:
        """An SDS did not answer a connection: tell the MDM, in the background and at
        most every ``REPORT_EVERY_S`` per SDS; the MDM confirms before it acts."""
        now = time.monotonic()
        if now - self._reported.get(sds_id, -REPORT_EVERY_S) < REPORT_EVERY_S:
            return
        self._reported[sds_id] = now
        task = asyncio.ensure_future(self._send_unreachable(sds_id))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send_unreachable(self, sds_id: int) -> None:
        try:
            # Its identity (sdc:GUID): what its certificate names, if it has one.
            doc = await self.client.report_unreachable(sds_id, f"sdc:{self.guid}")
        except (MdmUnavailable, MdmRefused) as exc:
            log.info("cannot report SDS %d unreachable: %s", sds_id, exc)
            return
        if isinstance(doc, dict) and doc.get("confirmed"):
            log.warning("reported SDS %d unreachable; the MDM confirmed it", sds_id)

    # -- state -----------------------------------------------------------------------

    def _reachable(self, ok: bool, why: str = "") -> None:
        if ok:
            self.last_contact = time.time()
            if not self.mdm_reachable:
                log.info("MDM reachable")
        elif self.mdm_reachable:
            log.warning("MDM unreachable, serving from cached maps: %s", why)
        self.mdm_reachable = ok

    def _map_epochs(self) -> dict[int, int] | None:
        """Pool -> the map epoch we have whole, for the MDM to answer deltas from."""
        if self._whole or self._doc is None or self.maps is None:
            return None
        return {p: m.epoch for p, m in self.maps.pools.items()}

    def _digest(self, key: str, pool: Any) -> int:
        """The digest of ``pool``, our map of pool ``key`` (computed once per map)."""
        known = self._digests.get(key)
        if known is not None and known[0] is pool:
            return known[1]
        value = pgmap_delta.digest(pool)
        self._digests[key] = (pool, value)
        return value

    async def _digest_held(self, doc: Any) -> None:
        """The digests of our maps that ``doc``'s deltas apply to, computed in a thread
        (about 20 ms of CPU for 4096 PGs) where we do not have them yet."""
        pools = doc.get("pools") if isinstance(doc, dict) else None
        had = (self._doc or {}).get("pools", {})
        if not isinstance(pools, dict) or not isinstance(had, dict):
            return
        for key, pool in pools.items():
            old = had.get(key)
            known = self._digests.get(key)
            if not (pgmap_delta.is_delta(pool) and isinstance(old, dict) and old):
                continue
            if known is None or known[0] is not old:
                self._digests[key] = (old, await asyncio.to_thread(pgmap_delta.digest, old))

    def _whole_maps(self, doc: Any) -> Any:
        """``doc`` with each pool's delta applied to the map we have (MapError if one
        does not make the MDM's map: we ask for whole maps next). An answer at the
        epoch we have is checked too: its digest must be that of our map."""
        pools = doc.get("pools") if isinstance(doc, dict) else None
        if not isinstance(pools, dict) or not any(map(pgmap_delta.is_delta, pools.values())):
            self._whole = False
            return doc
        had = (self._doc or {}).get("pools", {})
        whole: dict[str, Any] = {}
        for key, pool in pools.items():
            if not pgmap_delta.is_delta(pool):
                whole[key] = pool
                continue
            old = had.get(key)
            if (
                old is not None
                and pool.get("epoch") == old.get("epoch")
                and pool.get("from_epoch") == old.get("epoch")
            ):
                ours = pgmap_delta.digest_hex(self._digest(key, old))
                if pool.get("digest") != ours:
                    self._whole = True
                    raise MapError(
                        f"pool {key}: our map at epoch {old.get('epoch')} is not the MDM's "
                        f"(digest {ours}, the MDM's {pool.get('digest')})"
                    )
                whole[key] = old  # unchanged
                continue
            try:
                held = self._digest(key, old) if isinstance(old, dict) and old else None
                whole[key], value = pgmap_delta.apply_digested(old or {}, pool, held)
                self._digests[key] = (whole[key], value)
                self.deltas_applied += 1
            except ValueError as exc:
                self._whole = True
                raise MapError(f"pool {key}: {exc}") from None
        self._whole = False
        return {**doc, "pools": whole}

    def _apply(self, doc: Any) -> None:
        if not self.terms.admit(doc, "the maps"):
            raise MapError("the maps of an older MDM leader term (a deposed MDM's) refused")
        doc = self._whole_maps(doc)
        maps = parse_maps(doc)
        current = self.maps
        if current is not None and maps.epoch < current.epoch:
            return  # an older answer overtaken by a newer one
        self._doc = doc
        pools = doc.get("pools") or {}
        self._digests = {k: v for k, v in self._digests.items() if pools.get(k) is v[0]}
        if maps == current:
            return
        self.maps = maps
        self.sdc_id = maps.sdc_id
        log.info(
            "maps updated to epoch %d: %d volume(s) mapped (%d pool map(s) by delta so far)",
            maps.epoch,
            len(maps.volumes),
            self.deltas_applied,
        )
        self._save(doc)
        for listener in self.listeners:
            listener(maps)

    def _save(self, doc: Any) -> None:
        path = self.state_dir / "maps.json"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"guid": self.guid, "maps": doc}))
        except OSError as exc:
            log.warning("cannot save the maps to %s: %s", path, exc)

    def load_cached(self) -> None:
        """Start from the maps saved by a previous run (same GUID), if any."""
        path = self.state_dir / "maps.json"
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or saved.get("guid") != self.guid:
                return
            self._apply(saved["maps"])
            log.info("serving cached maps (epoch %d) until the MDM answers", self.epoch)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, MapError) as exc:
            log.warning("ignoring cached maps in %s: %s", path, exc)

    @property
    def epoch(self) -> int:
        return self.maps.epoch if self.maps is not None else 0

    # -- background tasks ------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow(), name="sdc-map-follower"),
            loop.create_task(self._heartbeats(), name="sdc-heartbeat"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing

    async def _register(self) -> None:
        attempt = 0
        while True:
            try:
                sdc_id = await self.client.register(
                    self.guid, self.name, self.address, self.control_port, self.nbd_port
                )
            except (MdmUnavailable, MdmRefused) as exc:
                self._reachable(False, str(exc))
                if attempt == 0:
                    log.warning("cannot register with the MDM yet: %s", exc)
                await sleep_backoff(attempt)
                attempt += 1
                continue
            self.sdc_id = sdc_id
            self._reachable(True)
            self._registered.set()
            log.info(
                "registered with the MDM as SDC %d (%s, guid %s)", sdc_id, self.name, self.guid
            )
            return

    async def _follow(self) -> None:
        attempt = 0
        while True:
            if self.sdc_id is None or not self._registered.is_set():
                await self._register()
            assert self.sdc_id is not None
            try:
                # after a delta that did not make the MDM's map, the whole maps at once
                wait = self.epoch if self.maps is not None and not self._whole else None
                doc = await self.client.maps(self.sdc_id, wait, self.longpoll_s, self._map_epochs())
                await self._digest_held(doc)
                self._apply(doc)
                self._reachable(True)
                attempt = 0
            except MdmRefused as exc:
                if exc.status == 404:
                    log.warning("the MDM no longer knows SDC %d: registering again", self.sdc_id)
                    self._registered.clear()
                else:
                    self._reachable(False, str(exc))
                    await sleep_backoff(attempt)
                    attempt += 1
            except (MdmUnavailable, MapError) as exc:
                if self._whole and isinstance(exc, MapError):
                    log.warning("%s; fetching the whole maps", exc)
                    continue
                self._reachable(False, str(exc))
                await sleep_backoff(attempt)
                attempt += 1

    def _set_interval(self, said: object) -> None:
        """The heartbeat interval the cluster sets (absent from an older MDM's answer)."""
        interval = heartbeat_interval(said, self.heartbeat_interval_s)
        if interval != self.heartbeat_interval_s:
            log.info("heartbeat interval %g s, as the MDM says", interval)
            self.heartbeat_interval_s = interval

    async def _heartbeats(self) -> None:
        await self._registered.wait()
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            sdc_id = self.sdc_id
            if sdc_id is None or not self._registered.is_set():
                continue
            try:
                doc = await self.client.heartbeat(sdc_id, self.epoch)
                if not self.terms.admit(doc, "a heartbeat answer"):
                    # a deposed MDM's answer: no leader has heard us
                    self._reachable(False, "only a deposed MDM (an older leader term) answered")
                    continue
                self._reachable(True)
                if isinstance(doc, dict):
                    self._set_interval(doc.get("heartbeat_interval_s"))
            except MdmRefused as exc:
                if exc.status == 404:
                    self._registered.clear()
                self._reachable(False, str(exc))
            except MdmUnavailable as exc:
                self._reachable(False, str(exc))
