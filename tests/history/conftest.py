"""Fixtures for the history tests: a real Postgres (and the same tests on SQLite).

Postgres comes from ``ALLOCATOR_TEST_DATABASE_URL`` when set (on our machines
postgresql+psycopg://postgres@127.0.0.1:5432/test; the user needs CREATEDB). Otherwise a private
server is started with initdb/pg_ctl when those are installed (as the ``postgres`` user when the
tests run as root) and removed afterwards. Without either, the Postgres half skips and says how to
enable it; the SQLite half still runs. No fake database.

Isolation: the session migrates one template database; every test gets its own database created
from that template (a file copy on the server, a few tens of ms) and dropped afterwards. SQLite
tests copy a migrated template file.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL, make_url

from allocator import Allocator
from allocator.history import migrate
from allocator.history.db import make_engine, resolve_url
from allocator.history.recorder import Recorder

HOW_TO_ENABLE = (
    "no Postgres for the history tests: set ALLOCATOR_TEST_DATABASE_URL="
    "postgresql+psycopg://postgres@127.0.0.1:5432/test (a user with CREATEDB), or install "
    "PostgreSQL's initdb/pg_ctl so the tests can start a private server"
)


def _libpq(url: URL, database: str | None = None) -> str:
    u = url.set(drivername="postgresql", database=database or url.database)
    return u.render_as_string(hide_password=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _private_postgres() -> tuple[URL, Callable[[], None]]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(HOW_TO_ENABLE)
    data = tempfile.mkdtemp(prefix="allocator-pg-")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(HOW_TO_ENABLE + " (running as root and no 'postgres' user for initdb)")
        os.chown(data, pg_user.pw_uid, pg_user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*prefix, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -F"
    subprocess.run([*prefix, pg_ctl, "-D", data, "-o", opts, "-l", f"{data}/log", "-w", "start"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*prefix, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)

    return make_url(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"), stop


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[URL]:
    """A Postgres URL whose user may create databases."""
    env = os.environ.get("ALLOCATOR_TEST_DATABASE_URL")
    if env:
        url = resolve_url(env)
        try:
            psycopg.connect(_libpq(url), connect_timeout=3).close()
        except psycopg.Error as exc:
            pytest.skip(f"ALLOCATOR_TEST_DATABASE_URL is not reachable ({exc}); {HOW_TO_ENABLE}")
        yield url
        return
    url, stop = _private_postgres()
    try:
        yield url
    finally:
        stop()


def _admin(url: URL) -> psycopg.Connection:
    return psycopg.connect(_libpq(url), autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: URL) -> Iterator[str]:
    """A database at the newest migration that per-test databases are copied from."""
    name = "rqa_tpl_" + uuid.uuid4().hex[:10]
    with _admin(pg_admin_url) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(pg_admin_url.set(database=name))
    migrate.upgrade(engine=engine)
    engine.dispose()
    yield name
    with _admin(pg_admin_url) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "history.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine=engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


def fresh_pg_database(admin: URL, template: str | None = None) -> tuple[URL, Callable[[], None]]:
    name = "rqa_test_" + uuid.uuid4().hex[:12]
    with _admin(admin) as c:
        c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))

    def drop() -> None:
        with _admin(admin) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return admin.set(database=name), drop


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[URL]:
    """A private, migrated history database: Postgres, then the same test on SQLite."""
    if request.param == "sqlite":
        path = tmp_path / "history.sqlite3"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield make_url(f"sqlite:///{path}")
        return
    admin = request.getfixturevalue("pg_admin_url")
    url, drop = fresh_pg_database(admin, request.getfixturevalue("pg_template"))
    yield url
    drop()


@pytest.fixture(params=["postgres", "sqlite"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[URL]:
    """A private database with no tables (for the migration tests)."""
    if request.param == "sqlite":
        yield make_url(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
        return
    url, drop = fresh_pg_database(request.getfixturevalue("pg_admin_url"))
    yield url
    drop()


@pytest.fixture
def engine(database_url: URL) -> Iterator[Engine]:
    e = make_engine(database_url)
    yield e
    e.dispose()


@pytest.fixture
def recorder(alloc: Allocator, engine: Engine) -> Recorder:
    return Recorder(alloc, engine, block_ms=0, batch_size=100, estimates_every_s=0)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Polls ``predicate`` until true; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)
