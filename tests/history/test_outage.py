"""Postgres goes away under a running recorder: events wait in Redis and land exactly once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.history.db import make_engine
from allocator.history.models import events
from allocator.history.recorder import Recorder

from .conftest import fresh_pg_database, wait_until
from .fleet import count, register_fleet
from .tcp_proxy import TcpProxy


@pytest.fixture
def proxied(pg_admin_url: URL, pg_template: str) -> Iterator[tuple[TcpProxy, Engine]]:
    """A private Postgres database reached only through a TCP proxy the test can cut."""
    url, drop = fresh_pg_database(pg_admin_url, pg_template)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    proxy.start()
    engine = make_engine(url.set(host="127.0.0.1", port=proxy.port), connect_timeout_s=2)
    yield proxy, engine
    proxy.stop()
    engine.dispose()
    drop()


def _recorded_ids(engine: Engine, a: Allocator) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(events.c.stream_id).where(events.c.namespace == a.keys.namespace)).scalars())


def test_outage_loses_nothing_and_writes_nothing_twice(alloc: Allocator, proxied: tuple[TcpProxy, Engine]) -> None:
    proxy, engine = proxied
    # An audit group that never acknowledges keeps every entry in the stream, so the test can list
    # what was produced (the recorder's trim respects every group).
    alloc.redis.xgroup_create(alloc.keys.events, "audit", id="0", mkstream=True)
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=20, backoff_s=(0.05, 0.2), estimates_every_s=0)
    thread, stop = rec.start()
    try:
        held = [alloc.allocate({"cpu_cores": 1}, owner="before").allocation_id for _ in range(5)]
        wait_until(lambda: count(engine, alloc) == 7)

        proxy.stop()  # Postgres unreachable: refused connections, pooled ones cut
        for i in range(40):
            x = alloc.allocate({"cpu_cores": 0.25}, owner="during", task_type=f"t{i % 3}")
            if i % 2:
                alloc.release(x.allocation_id)
        for h in held:
            alloc.release(h)
        wait_until(lambda: alloc.redis.hget(alloc.keys.recorder, "last_error") is not None)
        assert rec.backlog().total > 0

        proxy.start()
        wait_until(lambda: rec.backlog().total == 0, timeout_s=20)
    finally:
        stop.set()
        thread.join(5)
    produced = [sid for sid, _ in alloc.redis.xrange(alloc.keys.events)]
    recorded = _recorded_ids(engine, alloc)
    assert len(produced) == 7 + 40 + 20 + 5
    assert sorted(recorded) == sorted(produced)  # every event, once (the key forbids twice)
    assert int(alloc.redis.hget(alloc.keys.recorder, "events_total")) == len(produced)


def test_a_failed_write_leaves_entries_pending_until_the_database_returns(alloc: Allocator, proxied: tuple[TcpProxy, Engine]) -> None:
    proxy, engine = proxied
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=0, estimates_every_s=0)
    proxy.stop()
    r = rec.step(block_ms=0)
    assert r.error is not None and r.acked == 0 and rec.backlog().pending == 2
    assert alloc.redis.xlen(alloc.keys.events) == 2
    proxy.start()
    assert rec.drain().written == 2 and count(engine, alloc) == 2 and rec.backlog().total == 0
