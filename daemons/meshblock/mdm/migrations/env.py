"""Alembic environment: runs on the connection that the MDM hands over."""

from __future__ import annotations

from alembic import context

from meshblock.mdm.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "meshblock migrations run inside the MDM (meshblock-mdm --migrate-only); "
            "the alembic command line is for developers with a connection configured"
        )
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        version_table=context.config.attributes.get("version_table", "alembic_version"),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported")
run_migrations_online()
