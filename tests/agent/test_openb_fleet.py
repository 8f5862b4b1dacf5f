"""One agent process serves the whole OpenB fleet (1,213 hosts): registration and heartbeat rounds."""

from __future__ import annotations

import time

import pytest

from allocator.agent import Agent, StaticProvider, reap_lost_hosts

from .test_static_inventory import OPENB_CSV


@pytest.fixture
def openb_agent(alloc):
    if not OPENB_CSV.is_file():
        pytest.skip(f"OpenB data not found at {OPENB_CSV}")
    return Agent(alloc, StaticProvider(OPENB_CSV), labels={"zone": "openb-z1"})


def test_one_agent_registers_and_heartbeats_the_1213_openb_hosts(alloc, openb_agent):
    first = openb_agent.run_once()
    assert len(first.registered) == 1213
    rounds = [openb_agent.run_once() for _ in range(3)]
    assert all(r.registered == [] and r.hosts == 1213 for r in rounds)
    cap = alloc.capacity()
    assert (cap.host_count, cap.gpu_count) == (1213, sum(len(h.gpus) for h in openb_agent.provider.hosts()))
    assert alloc.redis.zcard(alloc.keys.heartbeats) == 1213
    steady = sorted(r.total_ms for r in rounds)[1]
    print(f"\nOpenB 1,213 hosts, one agent: first round (registration + heartbeat) {first.total_ms:.0f} ms, "
          f"steady heartbeat round {steady:.1f} ms (heartbeat scripts {rounds[1].heartbeat_ms:.1f} ms)")
    assert steady < 5000  # a round must fit well inside the 5 s default interval


def test_reaper_reclaims_the_whole_openb_fleet_at_once(alloc, openb_agent, clock):
    openb_agent.run_once()
    held = [alloc.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1}, strategy="spread") for _ in range(200)]
    clock.advance(20)
    t0 = time.perf_counter()
    lost = reap_lost_hosts(alloc, 20)
    ms = (time.perf_counter() - t0) * 1000
    print(f"\nreaper: 1,213 hosts declared lost, {len(held)} allocations released in {ms:.0f} ms")
    assert len(lost) == 1213 and sum(len(x.released) for x in lost) == len(held)
    assert {h.state for h in alloc.capacity().hosts} == {"lost"}
