"""Real agent processes: kill -9 makes the host lost and reclaimed within the grace; a returning
host is refused its stale grants; SIGTERM drains and deregisters."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from allocator.agent import run_reaper

from .helpers import events, host, wait_for

GRACE_S = 1.0
INTERVAL_S = 0.2
REAPER_INTERVAL_S = 0.05


@pytest.fixture
def spawn(live_alloc, inventory, redis_url) -> Iterator:
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "allocator", "agent", "--inventory", str(inventory.path),
               "--interval", str(INTERVAL_S), "--redis-url", redis_url, "--namespace", live_alloc.keys.namespace,
               "--log-level", "WARNING", *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture
def reaper(live_alloc) -> Iterator[list]:
    stop = threading.Event()
    seen: list = []
    t = threading.Thread(target=run_reaper, args=(live_alloc, GRACE_S, REAPER_INTERVAL_S, stop),
                         kwargs={"on_host_lost": seen.append}, daemon=True)
    t.start()
    yield seen
    stop.set()
    t.join(5)


def _beating(a, h: str) -> bool:
    return a.redis.zscore(a.keys.heartbeats, h) is not None


def test_kill_9_of_the_agent_reclaims_the_host_within_the_grace(live_alloc, inventory, spawn, reaper):
    a = live_alloc
    inventory.write([host("k1", cores=8), host("k2", cores=8)])
    agent = spawn()
    wait_for(lambda: _beating(a, "k1") and _beating(a, "k2"), timeout=20)
    xs = [a.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 2}, selector={"gpu_model": "T4"}, strategy="spread")
          for _ in range(4)]
    assert {x.host_id for x in xs} == {"k1", "k2"}
    assert reaper == []  # alive: nothing reclaimed

    agent.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: all(a.get(x.allocation_id).state == "released" for x in xs), timeout=GRACE_S + 10, step=0.005)
    reclaim_s = time.monotonic() - t0
    print(f"\nkill -9 -> {len(xs)} allocations on 2 hosts reclaimed in {reclaim_s:.3f} s "
          f"(grace {GRACE_S} s, heartbeat every {INTERVAL_S} s, reaper pass every {REAPER_INTERVAL_S} s)")
    assert reclaim_s <= GRACE_S + 1.0
    # On the ledger's clock: declared lost (and freed, same script) right after the grace ran out.
    for ev in events(a, "host_lost"):
        lost_after_s = (int(ev["ts"]) - json.loads(ev["data"])["last_heartbeat"]) / 1000
        assert GRACE_S <= lost_after_s <= GRACE_S + 0.5
    assert {a.get(x.allocation_id).release_reason for x in xs} == {"host_lost"}
    assert {h.state for h in a.capacity().hosts} == {"lost"}
    # The reaper thread reports a host after the script that declared it returns: it may trail
    # the ledger by a moment.
    wait_for(lambda: sorted(lh.host_id for lh in reaper if lh.declared) == ["k1", "k2"], timeout=5)


def test_returning_host_is_refused_its_stale_grants(live_alloc, inventory, spawn, reaper):
    a = live_alloc
    inventory.write([host("k1")])
    first = spawn()
    wait_for(lambda: _beating(a, "k1"), timeout=20)
    old = a.allocate({"gpu_memory_mb": "4Gi"})
    first.send_signal(signal.SIGKILL)
    wait_for(lambda: a.redis.hget(a.keys.host("k1"), "state") == "lost", timeout=GRACE_S + 10)

    spawn()  # the host comes back
    wait_for(lambda: _beating(a, "k1"), timeout=20)
    assert a.redis.hget(a.keys.host("k1"), "gen") == "2"
    assert a.redis.hget(a.keys.host("k1"), "state") == "ready"
    assert not a.grant_is_current(old.allocation_id)
    new = a.allocate({"gpu_memory_mb": "4Gi"})
    assert a.grant_is_current(new.allocation_id)


def test_sigterm_drains_then_deregisters(live_alloc, inventory, spawn):
    a = live_alloc
    inventory.write([host("t1")])
    agent = spawn("--drain-timeout", "-1")
    wait_for(lambda: _beating(a, "t1"), timeout=20)
    x = a.allocate({"cpu_cores": 1})
    agent.send_signal(signal.SIGTERM)
    wait_for(lambda: a.redis.hget(a.keys.host("t1"), "state") == "draining")
    assert agent.poll() is None  # waits for the running work
    a.release(x.allocation_id)
    assert agent.wait(20) == 0, agent.stderr.read()
    assert a.capacity().host_count == 0 and not _beating(a, "t1")
