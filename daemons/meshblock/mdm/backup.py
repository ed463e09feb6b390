"""``meshblock-mdm backup PATH`` and ``meshblock-mdm restore PATH``.

- **SQLite**: the backup is a copy of the database file made through SQLite's online
  backup API, one step under one read transaction: consistent while the MDM runs and
  writes. Restore checks the copy, checkpoints the current database, keeps it as
  ``<db>.pre-restore-<time>``, and renames the copy into place (fsynced).
- **PostgreSQL**: ``pg_dump --format=custom`` of the MDM's tables (MGMT may share the
  database: its tables are left alone); restore is ``pg_restore --clean --if-exists
  --single-transaction``: all of it or nothing.

Before the restored copy serves anything, restore makes it safe (:func:`make_safe`):
it brings it to this release's schema, raises every id sequence of the tables whose
ids name data by :data:`ID_MARGIN` and every epoch by :data:`EPOCH_MARGIN`, and writes
the durable "restored" marker (table ``restore_pending``: the SDSs that have not
reported since).

Restore refuses while an MDM answers on the configured API address (it would keep
serving, and writing, the state the restore replaces). Order of operations and what
happens to SDSs and SDCs that saw newer epochs: docs/mdm.md, "Backup and restore".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from meshblock.files import fsync_directory
from meshblock.mdm.config import MdmConfig
from meshblock.mdm.db import SchemaError, create_engine, migrate
from meshblock.mdm.idcounters import highest_id, raise_id_counter
from meshblock.mdm.models import Base

SQLITE_MAGIC = b"SQLite format 3\x00"
PG_CUSTOM_MAGIC = b"PGDMP"
VERSION_TABLE = "alembic_version"
PROBE_TIMEOUT_S = 2.0
# How far a restore raises every id sequence above the copy's highest id: more objects
# than a cluster creates between a backup and its restore, and small enough that ids
# stay below the API's 2**31-1 (mdm/routing.py) and the wire's u32 pool id after
# thousands of restores.
ID_MARGIN = 1 << 20
# How far a restore raises every map epoch and the cluster epoch: more changes than a
# cluster makes between a backup and its restore, far below the 2**62 cap on epochs
# components may report (mdm/schemas.py) and BIGINT's 2**63-1.
EPOCH_MARGIN = 1 << 32
# The tables whose ids name data on an SDS or an SDC (as in migration 0004).
ID_TABLES = ("storage_pools", "sdss", "devices", "sdcs", "volumes")


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why. Nothing changed."""


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "backup",
        help="copy the metadata store to PATH (safe while the MDM runs)",
        description="Copy the MDM's database to PATH, consistently, while the MDM runs. "
        "SQLite: a database file made with SQLite's online backup API. PostgreSQL: a "
        "pg_dump archive in custom format of the MDM's tables (pg_dump on PATH). PATH "
        "must not exist.",
    )
    b.add_argument("path", type=Path, metavar="PATH", help="the backup file to create")
    r = sub.add_parser(
        "restore",
        help="replace the metadata store with the backup at PATH (MDM stopped)",
        description="Replace the MDM's database with the backup at PATH, made by "
        "'meshblock-mdm backup' on the same engine. Stop the MDM first (refused while "
        "it answers on [api] host:port), restore, start it. SQLite keeps the replaced "
        "database as <db>.pre-restore-<time>; PostgreSQL restores in one transaction "
        "(pg_restore on PATH). See docs/mdm.md, 'Backup and restore'.",
    )
    r.add_argument("path", type=Path, metavar="PATH", help="a file made by meshblock-mdm backup")


def run(command: str, path: Path, config: MdmConfig) -> str:
    """Do ``command`` (``backup`` or ``restore``); return a line for the operator."""
    url = make_url(config.database.url)
    engine = url.get_backend_name()
    if engine not in ("sqlite", "postgresql"):
        raise BackupError(f"database engine {engine!r} is not supported")
    if command == "backup":
        if path.exists() or path.is_symlink():
            raise BackupError(f"{path} exists: give the name of a new file")
        if not path.parent.is_dir():
            raise BackupError(f"{path.parent} is not a directory")
        if engine == "sqlite":
            _sqlite_backup(_sqlite_path(url), path)
        else:
            _pg_backup(url, path)
        return f"backup of the MDM's {engine} database written to {path}"
    if not path.is_file():
        raise BackupError(f"{path} is not a file")
    kind = _backup_kind(path)
    if kind != engine:
        raise BackupError(
            f"{path} is a {kind} backup, but [database] url of the configuration is "
            f"{engine}: restore it into a {kind} database"
        )
    _refuse_if_mdm_answers(config)
    if engine == "sqlite":
        kept = _sqlite_restore(path, _sqlite_path(url))
        where = f"; the replaced database is kept as {kept}" if kept else ""
        return f"restored {path} into {_sqlite_path(url)}{where}; start the MDM"
    _pg_restore(url, path)
    # pg_restore commits in one transaction, then this one; an MDM started in between
    # would serve the copy unraised: it is refused above, and a failure here says so.
    _make_safe_sync(config.database.url, "PostgreSQL database " + str(url.database))
    return f"restored {path} into PostgreSQL database {url.database}; start the MDM"


# -- making a restored copy safe ----------------------------------------------------------


def _make_safe_sync(url: str, what: str) -> None:
    try:
        asyncio.run(make_safe(url))
    except (SchemaError, OSError) as exc:
        raise BackupError(f"cannot prepare the restored copy in {what}: {exc}") from None
    except Exception as exc:  # a database error: the message names it
        raise BackupError(
            f"cannot prepare the restored copy in {what}: {type(exc).__name__}: {exc}; "
            "do not start the MDM on it: restore again"
        ) from None


async def make_safe(url: str) -> None:
    """Bring the restored database at ``url`` to this release's schema; in one
    transaction raise its id sequences by :data:`ID_MARGIN`, its epochs and the leader
    term by :data:`EPOCH_MARGIN`, and mark every SDS it knows as not yet reported since."""
    engine = create_engine(url, pool_size=1)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            for table in ID_TABLES:
                await _raise_sequence(conn, table)
            await conn.execute(text("DELETE FROM restore_pool_epochs"))
            await conn.execute(
                text(
                    "INSERT INTO restore_pool_epochs (pool_id, map_epoch) "
                    "SELECT id, map_epoch FROM storage_pools"
                )
            )
            await conn.execute(
                text(
                    "UPDATE storage_pools SET map_epoch = map_epoch + :m, "
                    "mappings_epoch = mappings_epoch + :m"
                ),
                {"m": EPOCH_MARGIN},
            )
            await conn.execute(text("UPDATE cluster SET epoch = epoch + :m"), {"m": EPOCH_MARGIN})
            await _raise_term(conn)
            await conn.execute(text("DELETE FROM restore_pending"))
            await conn.execute(text("INSERT INTO restore_pending (sds_id) SELECT id FROM sdss"))
    finally:
        await engine.dispose()


async def _raise_term(conn: AsyncConnection) -> None:
    """Raise the leader term by :data:`EPOCH_MARGIN`, above every term SDSs and SDCs
    saw (they refuse maps and orders of an older one): the next MDM to lead takes the
    one above. A copy without the lease row gets one, expired."""
    raised = await conn.execute(
        text("UPDATE mdm_leader SET term = term + :m WHERE id = 1"), {"m": EPOCH_MARGIN}
    )
    if raised.rowcount == 0:
        await conn.execute(
            text(
                "INSERT INTO mdm_leader (id, term, holder, acquired_at, renewed_at, expires_at) "
                "VALUES (1, :m, '', 0, 0, 0)"
            ),
            {"m": EPOCH_MARGIN},
        )


async def _raise_sequence(conn: AsyncConnection, table: str) -> None:
    """The next id of ``table``: above both its counter and its ids, plus the margin."""
    top = int((await conn.execute(text(f"SELECT COALESCE(MAX(id), 0) FROM {table}"))).scalar_one())
    value = max(top, await highest_id(conn, table)) + ID_MARGIN
    await raise_id_counter(conn, table, value)


# -- SQLite -------------------------------------------------------------------------------


def _sqlite_path(url: URL) -> Path:
    if not url.database or url.database == ":memory:":
        raise BackupError("an in-memory SQLite database has nothing to back up or restore")
    return Path(url.database)


def _sqlite_backup(db: Path, target: Path) -> None:
    if not db.is_file():
        raise BackupError(f"no database at {db}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)  # one step: a consistent snapshot of the source
                dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            finally:
                dst.close()
        finally:
            src.close()
        _check_sqlite_backup(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.link(tmp, target)  # fails if the target appeared meanwhile: never overwrite
        fsync_directory(target.parent)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {db}: {exc}") from None
    except FileExistsError:
        raise BackupError(f"{target} exists: give the name of a new file") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_sqlite_backup(path: Path) -> None:
    """An intact SQLite file with the MDM's schema bookkeeping, or BackupError."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (result,) = conn.execute("PRAGMA quick_check").fetchone()
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a usable SQLite database: {exc}") from None
    if result != "ok":
        raise BackupError(f"{path} is damaged: {result}")
    if VERSION_TABLE not in tables or "volumes" not in tables:
        raise BackupError(f"{path} is not an MDM database (no {VERSION_TABLE} or volumes)")


def _sqlite_restore(backup: Path, db: Path) -> Path | None:
    _check_sqlite_backup(backup)
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".restore", dir=db.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open(backup, "rb") as src:
            os.fchmod(out.fileno(), 0o600)
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        _make_safe_sync(f"sqlite+aiosqlite:///{tmp}", str(tmp))
        kept: Path | None = None
        if db.exists():
            # Fold the WAL of the current database into it (its last connection then
            # removes the WAL): a WAL left next to the restored file would be replayed
            # onto it. The old database is kept whole for the operator.
            try:
                conn = sqlite3.connect(db, timeout=30)
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                raise BackupError(f"cannot checkpoint the current database {db}: {exc}") from None
            kept = db.with_name(f"{db.name}.pre-restore-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(db, kept)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                db.with_name(db.name + suffix).unlink()
        os.replace(tmp, db)
        fsync_directory(db.parent)
        return kept
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + x) for x in ("-wal", "-shm"))):
            with contextlib.suppress(OSError):
                leftover.unlink()


# -- PostgreSQL ---------------------------------------------------------------------------


def _pg_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise BackupError(f"{name} not found on PATH (install the PostgreSQL client tools)")
    return exe


def _pg_env(url: URL) -> dict[str, str]:
    env = dict(os.environ)
    for var, value in (
        ("PGHOST", url.host),
        ("PGPORT", str(url.port) if url.port else None),
        ("PGUSER", url.username),
        ("PGPASSWORD", url.password),
        ("PGDATABASE", url.database),
    ):
        if value:
            env[var] = value  # the password goes by environment, never on a command line
    return env


def _pg_run(argv: list[str], url: URL, what: str) -> None:
    proc = subprocess.run(argv, env=_pg_env(url), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _pg_backup(url: URL, target: Path) -> None:
    tables = [*sorted(Base.metadata.tables), VERSION_TABLE]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        argv = [_pg_tool("pg_dump"), "--format=custom", f"--file={tmp}", "--no-owner"]
        argv += [f"--table=public.{t}" for t in tables]
        _pg_run(argv, url, "pg_dump")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.link(tmp, target)
        fsync_directory(target.parent)
    except FileExistsError:
        raise BackupError(f"{target} exists: give the name of a new file") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _pg_restore(url: URL, backup: Path) -> None:
    argv = [
        _pg_tool("pg_restore"),
        "--clean",
        "--if-exists",
        "--single-transaction",
        "--exit-on-error",
        "--no-owner",
        "--no-privileges",
        f"--dbname={url.database}",
        str(backup),
    ]
    _pg_run(argv, url, "pg_restore")


# -- checks -------------------------------------------------------------------------------


def _backup_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head.startswith(SQLITE_MAGIC):
        return "sqlite"
    if head.startswith(PG_CUSTOM_MAGIC):
        return "postgresql"
    raise BackupError(f"{path} is not a backup made by meshblock-mdm backup")


def _refuse_if_mdm_answers(config: MdmConfig) -> None:
    host = config.api.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    netloc = f"[{host}]" if ":" in host else host
    url = f"http://{netloc}:{config.api.port}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # something answers HTTP there: an MDM
    except (urllib.error.URLError, OSError):
        return  # nothing listens: the MDM is stopped
    raise BackupError(
        f"an MDM answers on {config.api.host}:{config.api.port}: stop it before restoring "
        "(it would keep serving and writing the state the restore replaces)"
    )
