"""Alembic environment for MGMT: runs on the connection that the service hands over."""

from __future__ import annotations

from alembic import context

from meshblock.mgmt.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "MGMT's migrations run inside the service (meshblock-mgmt --migrate-only); "
            "the alembic command line is for developers with a connection configured"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=context.config.attributes["version_table"],
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported")
run_migrations_online()
