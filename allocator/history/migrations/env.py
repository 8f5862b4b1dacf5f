"""Alembic environment for the history schema.

Run through ``allocator db upgrade`` (``allocator/history/migrate.py`` builds the Alembic config
in code, so it works from any directory and from an installed wheel). The caller may hand over an
open Connection or an Engine in ``config.attributes["connection"]``; otherwise the URL comes from
``sqlalchemy.url`` or ``ALLOCATOR_DATABASE_URL`` (unset = the SQLite fallback).
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, Engine, pool

from allocator.history.db import make_engine
from allocator.history.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _configure(given)
        return
    engine = given if isinstance(given, Engine) else None
    if engine is None:
        url = config.get_main_option("sqlalchemy.url") or os.environ.get("ALLOCATOR_DATABASE_URL") or None
        engine = make_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection)


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("ALLOCATOR_DATABASE_URL")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
