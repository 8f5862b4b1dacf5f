"""Durable history: the outbox stream recorded into Postgres (or SQLite), and what is read from it.

Modules: ``db`` (URLs, engines, the SQLite fallback), ``models`` (tables), ``migrate`` (Alembic
from code), ``projection`` (events -> rows), ``recorder`` (consumer group -> database, exactly
once), ``estimates`` (run-time percentiles per task type -> Redis), ``queries`` (history, usage),
``recover`` (rebuild the ledger after Redis lost its data), ``cli`` (typer commands).

Nothing is imported here, so ``import allocator`` does not pull in SQLAlchemy.
"""
