"""meshblock-nbd-helper: the one privileged step of the SDC's kernel attach.

Connecting a ``/dev/nbdN`` hands sockets to the kernel's nbd driver, which needs
CAP_SYS_ADMIN. Rather than give the SDC daemon (network-facing, large) that capability,
systemd runs this small program as root for each connection to a unix socket
(``meshblock-nbd-helper.socket``, ``Accept=yes``, mode 0660 for the SDC's group; the
program's stdin is the accepted connection). It:

- takes requests only from the configured user (``SO_PEERCRED`` uid) or root;
- reads one JSON line, at most :data:`MAX_REQUEST` bytes, with exactly these fields:
  ``{"op": "connect", "device": "/dev/nbdN", "export": VOLUME, "read_only": BOOL,
  "connections": 1-16}`` or ``{"op": "disconnect", "device": "/dev/nbdN", "export":
  VOLUME}``; anything else is refused;
- connects only a device that exists and is free (no ``/sys/block/nbdN/pid``), and
  only to the NBD unix socket named on its own command line (never one the request
  names), which must be a socket owned by the configured user;
- disconnects only a device that it connected to the same export (a record per device
  in its state directory), so the SDC cannot detach devices of other users of nbd;
- makes and removes the stable link ``/dev/disk/by-meshblock/<volume>``;
- answers one JSON line, ``{"ok": true}`` or ``{"ok": false, "error": "..."}``, and exits.

The command lines are built here, from validated fields, with fixed block size and
timeout; ``nbd-client`` is run without a shell. docs/sdc.md and docs/security.md
explain the choice of design.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import re
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from meshblock.sdc.attach import (
    COMMAND_TIMEOUT_S,
    make_link,
    nbd_client_command,
    remove_link,
)

log = logging.getLogger("meshblock.nbd-helper")

#: The longest request line read.
MAX_REQUEST = 1024
#: A volume name, as the MDM allows it (mdm/schemas.py NAME).
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DEVICE = re.compile(r"^/dev/nbd(0|[1-9][0-9]{0,3})\Z")
MAX_CONNECTIONS = 16

_FIELDS = {
    "connect": {"op", "device", "export", "read_only", "connections"},
    "disconnect": {"op", "device", "export"},
}


class Refused(Exception):
    """A request the helper does not carry out; the message goes back to the caller."""


@dataclass(frozen=True)
class Request:
    op: str
    device: str
    index: int  # N of /dev/nbdN
    export: str
    read_only: bool = False
    connections: int = 1


def parse_request(line: bytes) -> Request:
    """The request in ``line``, strictly checked; Refused otherwise."""
    if len(line) > MAX_REQUEST:
        raise Refused("request too long")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise Refused("request is not JSON") from None
    if not isinstance(doc, dict):
        raise Refused("request is not a JSON object")
    op = doc.get("op")
    if not isinstance(op, str) or op not in _FIELDS:
        raise Refused("op must be 'connect' or 'disconnect'")
    if set(doc) != _FIELDS[op]:
        raise Refused(f"{op} takes exactly the fields {', '.join(sorted(_FIELDS[op]))}")
    device, export = doc["device"], doc["export"]
    m = DEVICE.match(device) if isinstance(device, str) else None
    if m is None:
        raise Refused("device must be /dev/nbdN")
    if not isinstance(export, str) or not VOLUME_NAME.match(export):
        raise Refused("export must be a volume name")
    if op == "disconnect":
        return Request(op, device, int(m.group(1)), export)
    read_only, connections = doc["read_only"], doc["connections"]
    if not isinstance(read_only, bool):
        raise Refused("read_only must be true or false")
    if type(connections) is not int or not 1 <= connections <= MAX_CONNECTIONS:
        raise Refused(f"connections must be an integer from 1 to {MAX_CONNECTIONS}")
    return Request(op, device, int(m.group(1)), export, read_only, connections)


def run_command(cmd: list[str]) -> None:
    """Run ``cmd`` (no shell, a fixed PATH); Refused with its output if it fails."""
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_S,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Refused(f"{cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        text = proc.stdout.decode(errors="replace").strip()[-500:]
        raise Refused(f"{' '.join(cmd)} exited with {proc.returncode}: {text}")


@dataclass
class Helper:
    """What the helper may do, fixed by its command line (the unit)."""

    nbd_socket: str  # the SDC's NBD unix socket: the only one nbd-client is pointed at
    uid: int  # the SDC's user: the only caller besides root, and the socket's owner
    nbd_client: str = "nbd-client"
    state_dir: Path = Path("/run/meshblock-nbd-helper")
    sys_root: Path = Path("/sys")
    dev_root: Path = Path("/dev")
    run: Callable[[list[str]], None] = field(default=run_command)

    def check_peer(self, uid: int) -> None:
        if uid not in (self.uid, 0):
            raise Refused(f"uid {uid} may not use the attach helper")

    def _check_nbd_socket(self) -> None:
        try:
            st = os.lstat(self.nbd_socket)
        except OSError as exc:
            raise Refused(f"the SDC's NBD socket {self.nbd_socket}: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != self.uid:
            raise Refused(f"{self.nbd_socket} is not a socket of the SDC's user")

    def _record(self, req: Request) -> Path:
        return self.state_dir / f"nbd{req.index}"

    def _device(self, req: Request) -> str:
        return str(self.dev_root / f"nbd{req.index}")

    def handle(self, req: Request) -> None:
        """Carry out ``req``; Refused (nothing done) when it may not be."""
        sysfs = self.sys_root / "block" / f"nbd{req.index}"
        if not sysfs.is_dir():
            raise Refused(f"{req.device} does not exist")
        record = self._record(req)
        link_dir = self.dev_root / "disk" / "by-meshblock"
        device = self._device(req)
        if req.op == "connect":
            if (sysfs / "pid").exists():
                raise Refused(f"{req.device} is in use")
            self._check_nbd_socket()
            cmd = nbd_client_command(
                self.nbd_client,
                device,
                req.export,
                unix_socket=self.nbd_socket,
                read_only=req.read_only,
                connections=req.connections,
            )
            self.run(cmd)
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            record.write_text(req.export + "\n")
            make_link(link_dir, req.export, device)
            return
        try:
            owner = record.read_text().strip()
        except OSError:
            owner = None
        if owner != req.export:
            raise Refused(f"{req.device} was not attached to {req.export!r} by this helper")
        remove_link(link_dir, req.export, device)
        self.run([self.nbd_client, "-d", device])
        record.unlink(missing_ok=True)

    def answer(self, uid: int, line: bytes) -> dict[str, object]:
        """The reply to ``line`` from a caller of ``uid`` (carrying it out if it may)."""
        try:
            self.check_peer(uid)
            req = parse_request(line)
            self.handle(req)
        except Refused as exc:
            log.warning("refused a request of uid %d: %s", uid, exc)
            return {"ok": False, "error": str(exc)}
        except OSError as exc:  # the record or the link after nbd-client ran
            log.error("request of uid %d failed: %s", uid, exc)
            return {"ok": False, "error": f"helper error: {exc}"}
        log.info("uid %d: %s %s for %r done", uid, req.op, req.device, req.export)
        return {"ok": True}

    def serve(self, conn: socket.socket) -> None:
        """Answer the one request on the accepted connection ``conn``."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        conn.settimeout(10.0)
        line = b""
        try:
            while b"\n" not in line and len(line) <= MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST + 1 - len(line))
                if not chunk:
                    break
                line += chunk
        except OSError as exc:
            log.warning("reading the request of uid %d: %s", uid, exc)
            return
        reply = self.answer(uid, line.split(b"\n", 1)[0] if b"\n" in line else line)
        conn.sendall(json.dumps(reply).encode() + b"\n")


def _user_id(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return int(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshblock-nbd-helper",
        description="Connect or disconnect one /dev/nbdN for the SDC (run by systemd, "
        "Accept=yes: stdin is the caller's connection).",
    )
    parser.add_argument("--nbd-socket", required=True, help="the SDC's NBD unix socket")
    parser.add_argument("--user", required=True, help="the SDC's user (name or uid)")
    parser.add_argument("--nbd-client", default="nbd-client")
    parser.add_argument("--state-dir", default="/run/meshblock-nbd-helper")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    helper = Helper(
        nbd_socket=args.nbd_socket,
        uid=_user_id(args.user),
        nbd_client=args.nbd_client,
        state_dir=Path(args.state_dir),
    )
    with socket.socket(fileno=os.dup(0)) as conn:
        if conn.family != socket.AF_UNIX:
            log.error("stdin is not a unix socket connection")
            return 2
        helper.serve(conn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
