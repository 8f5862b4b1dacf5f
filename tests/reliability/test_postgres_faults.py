"""Fault: Postgres becomes unreachable for a while under a running ``allocator scheduler`` (whose
recorder writes the history), and comes back. A TCP proxy in front of Postgres is cut: open
connections break and new ones are refused, as with a crashed server or a partition."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.history.audit import compare_allocations, compare_events
from allocator.history.recorder import Recorder

from ..history.tcp_proxy import TcpProxy
from .conftest import url_text
from .helpers import Procs, assert_consistent, hold, keep_stream, wait_for, watching

FLEET = [{"id": f"p{i}", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]}
         for i in range(2)]


@pytest.fixture
def proxy(pg_url: URL) -> Iterator[TcpProxy]:
    p = TcpProxy(pg_url.host or "127.0.0.1", pg_url.port or 5432)
    p.start()
    yield p
    p.stop()


def test_postgres_unreachable_for_a_while_loses_no_event(ledger: Allocator, procs: Procs, tmp_path: Path,
                                                          pg_url: URL, pg_engine: Engine, proxy: TcpProxy) -> None:
    """Fault: the scheduler's recorder reaches Postgres only through the proxy; the proxy is cut
    while 80 allocations are made and half of them released (and 8 queued requests wait), then
    restored.
    Expected: placements and releases go on unaffected (the ledger does not wait for the
    history); the recorder reports the error and writes nothing meanwhile (entries wait in the
    stream); after the database returns, the backlog drains to zero, every outbox entry is in
    ``events`` exactly once, and every allocation's history row agrees with the ledger."""
    a = ledger
    keep_stream(a)
    for h in FLEET:
        a.register_host(h)
    via_proxy = url_text(pg_url.set(host="127.0.0.1", port=proxy.port))
    procs.scheduler(database_url=via_proxy)
    rec = Recorder(a, pg_engine, block_ms=0, estimates_every_s=0)  # to read the backlog only
    with watching(a):
        held = [a.allocate({"cpu_cores": 1}, owner="before").allocation_id for _ in range(4)]
        wait_for(lambda: rec.backlog().total == 0, timeout=30, what="history written before the outage")

        proxy.stop()
        made = []
        for i in range(80):
            x = a.allocate({"cpu_cores": 0.25, "ram_mb": 64}, owner="during", task_type=f"t{i % 4}")
            made.append(x.allocation_id)
            if i % 2:
                a.release(x.allocation_id)
        queued = [a.allocate({"gpus": 1, "gpu_memory_mb": "16Gi"}, on_busy="queue").allocation_id for _ in range(4)]
        queued += [a.allocate({"gpus": 2}, on_busy="queue", owner="waits").allocation_id for _ in range(4)]
        wait_for(lambda: a.redis.hget(a.keys.recorder, "last_error"), timeout=20, what="the recorder noticing")
        hold(lambda: rec.backlog().total >= 80 + 40, 1.0, what="the backlog waiting in Redis")

        waiting = rec.backlog().total
        proxy.start()
        t0 = time.monotonic()
        for aid in held + made[::2] + queued:
            a.release(aid)
        wait_for(lambda: rec.backlog().total == 0, timeout=60, what="the backlog written")
        print(f"\n{waiting} events waited in Redis during the outage; backlog written {time.monotonic() - t0:.2f} s "
              "after Postgres returned")
    assert_consistent(a)
    missing, extra = compare_events(pg_engine, a, [sid for sid, _ in a.redis.xrange(a.keys.events)])
    assert (missing, extra) == ([], [])
    assert compare_allocations(pg_engine, a) == []
    assert "database write failed" in procs.log("scheduler")
