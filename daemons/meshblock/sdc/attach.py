"""Attaching exports to local block devices with the kernel's NBD client.

With ``[nbd] attach_nbd = true``, each mapped volume is connected to a free
``/dev/nbdN`` by ``nbd-client`` (userspace does the handshake, the kernel the IO) and
gets a stable link ``/dev/disk/by-meshblock/<volume>``; unmapping detaches it
(``nbd-client -d``) before the export goes away. This needs the ``nbd`` kernel module
(``/sys/module/nbd``); without it every attach fails with a log line that says so,
and the volume stays available as an NBD export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

#: Block size given to the kernel, and how long the kernel waits for a reply.
BLOCK_SIZE = 4096
KERNEL_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 30.0

_NBD_DEV = re.compile(r"^nbd(\d+)$")
_SAFE_LINK = re.compile(r"^[A-Za-z0-9._+-][A-Za-z0-9._+:@-]*$")


class AttachError(Exception):
    pass


class NbdAttacher:
    def __init__(
        self,
        *,
        nbd_client: str = "nbd-client",
        host: str = "127.0.0.1",
        port: int = 10809,
        unix_socket: str = "",
        connections: int = 1,
        sys_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
    ) -> None:
        self.nbd_client = nbd_client
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        self.port = port
        self.unix_socket = unix_socket
        self.connections = connections
        self.sys_root = sys_root
        self.dev_root = dev_root
        self.link_dir = dev_root / "disk" / "by-meshblock"
        self.attached: dict[str, str] = {}  # export name -> /dev/nbdN

    # -- what it would run -----------------------------------------------------------

    def kernel_supported(self) -> bool:
        return (self.sys_root / "module" / "nbd").is_dir()

    def attach_command(self, device: str, export: str, *, read_only: bool) -> list[str]:
        """The nbd-client command line that connects ``device`` to ``export``."""
        if self.unix_socket:
            cmd = [self.nbd_client, "-unix", self.unix_socket, device]
        else:
            cmd = [self.nbd_client, self.host, str(self.port), device]
        cmd += [
            "-name",
            export,
            "-block-size",
            str(BLOCK_SIZE),
            "-timeout",
            str(KERNEL_TIMEOUT_S),
            "-connections",
            str(self.connections),
        ]
        if read_only:
            cmd.append("-readonly")
        return cmd

    def detach_command(self, device: str) -> list[str]:
        return [self.nbd_client, "-d", device]

    def link_path(self, export: str) -> Path | None:
        """Where the stable link of ``export`` goes (None for a name unfit for a path)."""
        if not _SAFE_LINK.match(export) or export in (".", ".."):
            return None
        return self.link_dir / export

    def free_device(self) -> str | None:
        """The lowest /dev/nbdN that no client holds (no ``pid`` in sysfs)."""
        block = self.sys_root / "block"
        busy = set(self.attached.values())
        found = []
        with contextlib.suppress(OSError):
            for entry in block.iterdir():
                m = _NBD_DEV.match(entry.name)
                if m and not (entry / "pid").exists():
                    found.append(int(m.group(1)))
        for n in sorted(found):
            dev = str(self.dev_root / f"nbd{n}")
            if dev not in busy:
                return dev
        return None

    # -- doing it --------------------------------------------------------------------

    async def _run(self, cmd: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise AttachError(f"cannot run {cmd[0]}: {exc}") from exc
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AttachError(
                f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT_S:g} s"
            ) from None
        if proc.returncode != 0:
            text = out.decode(errors="replace").strip()
            raise AttachError(f"{' '.join(cmd)} exited with {proc.returncode}: {text}")

    async def attach(self, export: str, *, read_only: bool) -> str | None:
        """Attach ``export``; return the device, or None (the reason is logged)."""
        if export in self.attached:
            return self.attached[export]
        if not self.kernel_supported():
            log.error(
                "cannot attach volume %r: attach_nbd is set but this kernel has no nbd module "
                "(%s is absent; load it with 'modprobe nbd'); the volume stays available "
                "as an NBD export",
                export,
                self.sys_root / "module" / "nbd",
            )
            return None
        device = self.free_device()
        if device is None:
            log.error("cannot attach volume %r: no free /dev/nbdN device", export)
            return None
        try:
            await self._run(self.attach_command(device, export, read_only=read_only))
        except AttachError as exc:
            log.error("cannot attach volume %r to %s: %s", export, device, exc)
            return None
        self.attached[export] = device
        link = self.link_path(export)
        if link is None:
            log.warning("volume %r attached to %s; its name is unfit for a link", export, device)
        else:
            try:
                link.parent.mkdir(parents=True, exist_ok=True)
                tmp = link.with_name(f".{export}.tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink(device, tmp)
                tmp.replace(link)
            except OSError as exc:
                log.warning("cannot create %s: %s", link, exc)
        log.info("volume %r attached to %s", export, device)
        return device

    async def detach(self, export: str) -> None:
        device = self.attached.pop(export, None)
        if device is None:
            return
        link = self.link_path(export)
        if link is not None:
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link) == device:
                    link.unlink()
        try:
            await self._run(self.detach_command(device))
            log.info("volume %r detached from %s", export, device)
        except AttachError as exc:
            log.error("cannot detach volume %r from %s: %s", export, device, exc)

    async def detach_all(self) -> None:
        for export in list(self.attached):
            await self.detach(export)
