"""Attaching exports to local block devices with the kernel's NBD client.

With ``[nbd] attach_nbd = true``, each mapped volume is connected to a free
``/dev/nbdN`` by ``nbd-client`` (userspace does the handshake, the kernel the IO) and
gets a stable link ``/dev/disk/by-meshblock/<volume>``; unmapping detaches it
(``nbd-client -d``) before the export goes away. This needs the ``nbd`` kernel module
(``/sys/module/nbd``); without it every attach fails with a log line that says so,
and the volume stays available as an NBD export.

Handing sockets to the kernel needs CAP_SYS_ADMIN. With ``[nbd] attach_helper`` set the
SDC has none: it asks the privileged helper (:mod:`meshblock.sdc.nbd_helper`) on that
unix socket to connect or disconnect a device, and the helper makes and removes the
link. Without it the SDC runs ``nbd-client`` and makes the link itself (as root, or with
the capability).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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


def nbd_client_command(
    nbd_client: str,
    device: str,
    export: str,
    *,
    unix_socket: str,
    read_only: bool,
    connections: int,
) -> list[str]:
    """nbd-client's command line connecting ``device`` to ``export`` on ``unix_socket``."""
    cmd = [nbd_client, "-unix", unix_socket, device, "-name", export]
    cmd += ["-block-size", str(BLOCK_SIZE), "-timeout", str(KERNEL_TIMEOUT_S)]
    cmd += ["-connections", str(connections)]
    if read_only:
        cmd.append("-readonly")
    return cmd


def link_path(link_dir: Path, export: str) -> Path | None:
    """Where the stable link of ``export`` goes (None for a name unfit for a path)."""
    if not _SAFE_LINK.match(export) or export in (".", ".."):
        return None
    return link_dir / export


def make_link(link_dir: Path, export: str, device: str) -> None:
    """Point ``link_dir/export`` at ``device`` (replacing any link there); logs failures."""
    link = link_path(link_dir, export)
    if link is None:
        log.warning("volume %r attached to %s; its name is unfit for a link", export, device)
        return
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{export}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(device, tmp)
        tmp.replace(link)
    except OSError as exc:
        log.warning("cannot create %s: %s", link, exc)


def remove_link(link_dir: Path, export: str, device: str) -> None:
    """Remove ``link_dir/export`` if it points at ``device``."""
    link = link_path(link_dir, export)
    if link is not None:
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link) == device:
                link.unlink()


class NbdAttacher:
    def __init__(
        self,
        *,
        nbd_client: str = "nbd-client",
        host: str = "127.0.0.1",
        port: int = 10809,
        unix_socket: str = "",
        helper_socket: str = "",
        connections: int = 1,
        sys_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
    ) -> None:
        self.nbd_client = nbd_client
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        self.port = port
        self.unix_socket = unix_socket
        self.helper_socket = helper_socket
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
        cmd = nbd_client_command(
            self.nbd_client,
            device,
            export,
            unix_socket=self.unix_socket,
            read_only=read_only,
            connections=self.connections,
        )
        if not self.unix_socket:
            cmd[1:4] = [self.host, str(self.port), device]
        return cmd

    def detach_command(self, device: str) -> list[str]:
        return [self.nbd_client, "-d", device]

    def link_path(self, export: str) -> Path | None:
        """Where the stable link of ``export`` goes (None for a name unfit for a path)."""
        return link_path(self.link_dir, export)

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

    async def _ask_helper(self, request: dict[str, object]) -> None:
        """Send one request to the attach helper; AttachError unless it says ok."""
        try:
            reader, writer = await asyncio.open_unix_connection(self.helper_socket)
        except OSError as exc:
            raise AttachError(
                f"cannot reach the attach helper at {self.helper_socket}: {exc}"
            ) from None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S + 10):
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            raise AttachError("the attach helper did not answer in time") from None
        except OSError as exc:
            raise AttachError(f"the attach helper at {self.helper_socket}: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise AttachError(f"the attach helper gave no answer: {line[:200]!r}")
        if reply.get("ok") is not True:
            raise AttachError(f"the attach helper refused: {reply.get('error')}")

    async def _connect(self, device: str, export: str, read_only: bool) -> None:
        if not self.helper_socket:
            await self._run(self.attach_command(device, export, read_only=read_only))
            make_link(self.link_dir, export, device)
            return
        await self._ask_helper(
            {
                "op": "connect",
                "device": f"/dev/{Path(device).name}",  # the kernel's name; the helper's /dev
                "export": export,
                "read_only": read_only,
                "connections": self.connections,
            }
        )

    async def _disconnect(self, device: str, export: str) -> None:
        if not self.helper_socket:
            remove_link(self.link_dir, export, device)
            await self._run(self.detach_command(device))
            return
        request: dict[str, object] = {"op": "disconnect", "device": f"/dev/{Path(device).name}"}
        request["export"] = export
        await self._ask_helper(request)

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
            await self._connect(device, export, read_only)
        except AttachError as exc:
            log.error("cannot attach volume %r to %s: %s", export, device, exc)
            return None
        self.attached[export] = device
        log.info("volume %r attached to %s", export, device)
        return device

    async def detach(self, export: str) -> None:
        device = self.attached.pop(export, None)
        if device is None:
            return
        try:
            await self._disconnect(device, export)
            log.info("volume %r detached from %s", export, device)
        except AttachError as exc:
            log.error("cannot detach volume %r from %s: %s", export, device, exc)

    async def detach_all(self) -> None:
        for export in list(self.attached):
            await self.detach(export)
