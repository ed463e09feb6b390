"""The id counters of the MDM's tables, read and raised the same way on both engines.

SQLite keeps them in ``sqlite_sequence`` (the tables are AUTOINCREMENT: migration 0004),
PostgreSQL in each table's serial sequence. A counter is only ever raised: an id that
named data anywhere is never handed out again (docs/design.md, invariant 12).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection


async def _sequence(conn: AsyncConnection, table: str) -> str | None:
    name = (
        await conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table})
    ).scalar()
    return None if name is None else str(name)


async def highest_id(conn: AsyncConnection, table: str) -> int:
    """The highest id ``table``'s counter has handed out (0: none yet)."""
    if conn.dialect.name == "sqlite":
        seq = (
            await conn.execute(
                text("SELECT seq FROM sqlite_sequence WHERE name = :t"), {"t": table}
            )
        ).scalar()
        return int(seq or 0)
    name = await _sequence(conn, table)
    if name is None:
        return 0
    last = (await conn.execute(text("SELECT last_value, is_called FROM " + name))).one()
    return int(last[0]) if last[1] else int(last[0]) - 1


async def raise_id_counter(conn: AsyncConnection, table: str, value: int) -> None:
    """Make the next id of ``table`` greater than ``value`` (never lower it)."""
    if await highest_id(conn, table) >= value:
        return
    if conn.dialect.name == "sqlite":
        params = {"t": table, "v": value}
        updated = await conn.execute(
            text("UPDATE sqlite_sequence SET seq = :v WHERE name = :t"), params
        )
        if not updated.rowcount:
            await conn.execute(
                text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"), params
            )
        return
    name = await _sequence(conn, table)
    if name is not None:
        await conn.execute(text("SELECT setval(CAST(:s AS regclass), :v)"), {"s": name, "v": value})


@contextmanager
def counter_kept(conn: Connection, table: str) -> Iterator[None]:
    """Around a migration step that recreates ``table`` on SQLite (Alembic's batch
    mode: copy, drop, rename): the new table's ``sqlite_sequence`` entry starts at the
    highest id left in it, not the highest ever handed out, so a deleted row's id would
    be handed out again. The counter is read before and set back to the higher of the
    two after. PostgreSQL's sequences survive the step: nothing to do there."""
    if conn.dialect.name != "sqlite":
        yield
        return
    read = text("SELECT seq FROM sqlite_sequence WHERE name = :t")
    saved = int(conn.execute(read, {"t": table}).scalar() or 0)
    yield
    now = conn.execute(read, {"t": table}).scalar()
    if now is None and saved:
        conn.execute(
            text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"),
            {"t": table, "v": saved},
        )
    elif now is not None and int(now) < saved:
        conn.execute(
            text("UPDATE sqlite_sequence SET seq = :v WHERE name = :t"), {"t": table, "v": saved}
        )
