"""Engines for the history database: URL handling, the SQLite fallback, portable SQL helpers.

Postgres (``postgresql+psycopg://``) is the real store; when no URL is configured the history
goes to a SQLite file so a single machine works with nothing else installed. Both run the same
models and the same Alembic migrations; the few dialect differences live in this module.
"""

from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement
from sqlalchemy.types import Float, TypeDecorator

from ..errors import AllocatorError, InvalidRequest


class HistoryError(AllocatorError):
    """The history database is misconfigured or unusable."""

    code = "HISTORY_ERROR"
    default_message = "history database error"


def default_sqlite_path() -> Path:
    """Where the embedded SQLite history lives: ``ALLOCATOR_STATE_DIR`` or the XDG data dir."""
    base = os.environ.get("ALLOCATOR_STATE_DIR")
    if base:
        root = Path(base)
    else:
        root = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "rq-allocator"
    return root / "history.sqlite3"


def resolve_url(url: str | URL | None) -> URL:
    """The SQLAlchemy URL to use: the SQLite fallback for None, psycopg 3 for plain postgres URLs.

    ``postgres://`` and ``postgresql://`` mean psycopg 3 here (SQLAlchemy 2.0 would otherwise
    pick psycopg2, which is not a dependency).
    """
    if url is None or (isinstance(url, str) and not url.strip()):
        path = default_sqlite_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return make_url(f"sqlite:///{path}")
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    try:
        u = make_url(url)
    except ArgumentError as exc:  # no URL at all: invalid input, which no retry would mend
        raise InvalidRequest("history database URL", str(exc).splitlines()[0]) from None
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("postgresql", "sqlite"):
        raise InvalidRequest("history database URL",
                             f"unsupported database {u.get_backend_name()!r}: use postgresql+psycopg:// or sqlite://")
    return u


def redacted(url: str | URL | None) -> str:
    """The URL with its password hidden, for logs and messages."""
    return resolve_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL | None = None, *, connect_timeout_s: int = 5, **kwargs: Any) -> Engine:
    """An engine for the history database (see ``resolve_url``).

    Postgres connections time out after ``connect_timeout_s`` so an unreachable database is
    noticed quickly (the recorder then waits and retries) and are pinged before reuse so a
    restarted server does not surface as an error. SQLite gets WAL (readers do not block the
    recorder), a busy timeout, and foreign keys.
    """
    u = resolve_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(u, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            if u.database and u.database != ":memory:":
                _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    connect_args = {"connect_timeout": connect_timeout_s, **kwargs.pop("connect_args", {})}
    return create_engine(u, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def _wal(cur: Any, attempts: int = 100, pause_s: float = 0.05) -> None:
    """Put a SQLite file in WAL mode, waiting out another connection that holds it.

    The switch needs the file to itself and SQLite answers "database is locked" at once rather
    than through the busy timeout, so two processes opening a new file together (the recorder
    and a command) made one of them fail. A file already in WAL is left alone; the mode stays
    with the file.
    """
    for attempt in range(attempts):
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause_s)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware.

    Postgres keeps ``timestamptz``; SQLite has no time zones, so values are stored as naive UTC
    and get their tzinfo back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def ms_to_dt(ms: int | float | str | None) -> datetime | None:
    """Epoch milliseconds (as the ledger writes them) to an aware UTC datetime; 0/empty = None."""
    if ms in (None, "", "0", 0):
        return None
    return datetime.fromtimestamp(int(float(ms)) / 1000, tz=timezone.utc)


def dt_to_ms(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return round(dt.timestamp() * 1000)


class epoch_ms(FunctionElement[float]):
    """``epoch_ms(ts_column)``: milliseconds since the epoch, for duration arithmetic in SQL.

    Compiles to ``EXTRACT(EPOCH FROM x) * 1000`` on Postgres and to a julianday() expression on
    SQLite (where the column holds UTC text); usage queries use it to clip intervals to a period.
    """

    type = Float()
    inherit_cache = True
    name = "epoch_ms"


@compiles(epoch_ms, "postgresql")
def _epoch_ms_pg(element: epoch_ms, compiler: Any, **kw: Any) -> str:
    return f"(EXTRACT(EPOCH FROM {compiler.process(element.clauses, **kw)}) * 1000)"


@compiles(epoch_ms, "sqlite")
def _epoch_ms_sqlite(element: epoch_ms, compiler: Any, **kw: Any) -> str:
    # julianday() is a double a few microseconds off; times are stored to the millisecond, so
    # rounding gives the exact figure Postgres does (sums of held time would differ otherwise).
    return f"ROUND((julianday({compiler.process(element.clauses, **kw)}) - 2440587.5) * 86400000.0)"


def epoch_ms_of(col: ColumnElement[Any]) -> epoch_ms:
    return epoch_ms(col)
