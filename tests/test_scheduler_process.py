"""``allocator scheduler`` as a process: it schedules while the history database is away, and a
SIGTERM stops it cleanly, its recorder leaving the outbox's consumer group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from allocator import Allocator

ROOT = Path(__file__).resolve().parent.parent


def start_scheduler(a: Allocator, database_url: str) -> subprocess.Popen:
    url = "redis://{host}:{port}/{db}".format(**a.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": a.keys.namespace,
           "ALLOCATOR_DATABASE_URL": database_url}
    return subprocess.Popen([sys.executable, "-m", "allocator", "scheduler", "--interval", "0.2", "--grace", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_the_scheduler_schedules_while_the_history_database_is_away(live):
    live.register_host(id="h1", cpu_cores=2, ram_mb=1024)
    live.allocate({"cpu_cores": 2}, ttl_seconds=1)  # its expiry is the scheduler's to find
    waiting = live.allocate({"cpu_cores": 2}, on_busy="queue")
    proc = start_scheduler(live, "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    try:
        wait_until(lambda: live.get(waiting.allocation_id).state == "active")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sigterm_stops_the_scheduler_and_its_recorder_leaves_the_consumer_group(live, tmp_path):
    live.register_host(id="h1", cpu_cores=2, ram_mb=1024)
    proc = start_scheduler(live, f"sqlite:///{tmp_path / 'history.sqlite3'}")
    try:
        group = live.keys.recorder_group
        wait_until(lambda: live.redis.exists(live.keys.events) and any(
            g["name"] == group for g in live.redis.xinfo_groups(live.keys.events))
            and live.redis.xinfo_consumers(live.keys.events, group))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert live.redis.xinfo_consumers(live.keys.events, group) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
