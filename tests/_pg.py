"""A throwaway PostgreSQL server for the test session.

:class:`PgServer` runs ``initdb`` into a fresh temporary directory and starts
``postgres`` on 127.0.0.1 and a free port, with its unix socket in that directory and
``trust`` authentication, so that tests connect as ``postgres`` without a password.
PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
``postgres`` OS user (created by the Debian package) through ``runuser``.

The binaries come from ``$MESHBLOCK_PG_BINDIR``, else the newest
``/usr/lib/postgresql/*/bin``, else ``$PATH``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from _ports import free_port

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found. The tests "
    "need a real PostgreSQL server: install it with `make deps` (as root: "
    "`apt-get install -y postgresql`), or point MESHBLOCK_PG_BINDIR at a directory "
    "that holds them."
)


class PgUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the server could not be started."""


def find_bindir() -> Path:
    """The directory that holds ``initdb`` and ``pg_ctl``; raise PgUnavailable."""
    env = os.environ.get("MESHBLOCK_PG_BINDIR")
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))
    versions = glob.glob("/usr/lib/postgresql/*/bin")

    def version_key(p: str) -> tuple[int, str]:
        v = Path(p).parent.name
        return (int(v) if v.isdigit() else 0, v)

    candidates += [Path(p) for p in sorted(versions, key=version_key, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres", "psql")):
            return d
    raise PgUnavailable(INSTALL_HINT)


class PgServer:
    """One PostgreSQL cluster in a temporary directory; see the module docstring."""

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="meshblock-pg-"))
        self.datadir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self._os_user: str | None = None
        self._started = False

    # -- running commands -------------------------------------------------------------

    def _cmd(self, exe: str, *args: str) -> list[str]:
        argv = [str(self.bindir / exe), *args]
        if self._os_user is not None:
            return ["runuser", "-u", self._os_user, "--", *argv]
        return argv

    def _run(self, exe: str, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            self._cmd(exe, *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if proc.returncode != 0:
            raise PgUnavailable(
                f"{exe} {' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}{self.log_tail()}"
            )
        return proc.stdout

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PgUnavailable(
                    "running as root, but there is no `postgres` OS user to run the server "
                    "as (PostgreSQL refuses to run as root). " + INSTALL_HINT
                ) from None
            self._os_user = pw.pw_name
            self.socket_dir.mkdir()
            for p in (self.root, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        else:
            self.socket_dir.mkdir()
        self._run(
            "initdb",
            "--pgdata",
            str(self.datadir),
            "--username",
            self.user,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )
        last_error: PgUnavailable | None = None
        for _attempt in range(3):  # the free port may be taken by someone else meanwhile
            self.port = free_port(self.host)
            self._write_settings()
            try:
                self._run(
                    "pg_ctl",
                    "--pgdata",
                    str(self.datadir),
                    "--log",
                    str(self.logfile),
                    "--wait",
                    "--timeout",
                    "60",
                    "start",
                )
            except PgUnavailable as exc:
                last_error = exc
                continue
            self._started = True
            return
        assert last_error is not None
        raise last_error

    def _write_settings(self) -> None:
        conf = self.datadir / "postgresql.auto.conf"
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            # Durability is not under test here: trade it for speed.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
        }
        text = "".join(f"{k} = {v}\n" for k, v in settings.items())
        conf.write_text(text)
        if self._os_user is not None:
            pw = pwd.getpwnam(self._os_user)
            os.chown(conf, pw.pw_uid, pw.pw_gid)

    def stop(self) -> None:
        try:
            if self._started:
                self._run(
                    "pg_ctl", "--pgdata", str(self.datadir), "--mode", "fast", "--wait", "stop"
                )
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- using it ---------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` with psql over TCP; return its unaligned output."""
        return self._run(
            "psql",
            "--no-psqlrc",
            "--quiet",
            "--tuples-only",
            "--no-align",
            "--set",
            "ON_ERROR_STOP=1",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--username",
            self.user,
            "--dbname",
            dbname,
            "--command",
            sql,
        )

    def url(self, dbname: str, driver: str = "postgresql+asyncpg") -> str:
        """An SQLAlchemy URL for database ``dbname`` on this server."""
        return f"{driver}://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "mdm") -> str:
        """Create an empty database with a unique name; return its SQLAlchemy URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)
