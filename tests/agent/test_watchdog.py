"""GPU memory watchdog: per-process GPU memory mapped to allocations through the worker's pids."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY

from allocator.agent import GpuProcess, GpuUnit, HostInventory, Watchdog
from allocator.agent.watchdog import Grant, attribute

from .helpers import events, host, unique


def _gpu_with(pids_mb: dict[int, str], memory: str = "16Gi") -> list[dict]:
    return [{"index": 0, "memory_mb": memory, "processes": [{"pid": p, "used_mb": mb} for p, mb in pids_mb.items()]}]


def _sample(name: str, host_id: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"host": host_id, **labels}) or 0.0


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def child():
    """A real child process standing in for a work horse; reaped afterwards whatever happens."""
    procs: list[subprocess.Popen] = []

    def start(ignore_term: bool = False) -> subprocess.Popen:
        code = "import signal, sys, time\n"
        if ignore_term:
            code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        code += "print('ready', flush=True)\ntime.sleep(120)\n"
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"  # signal handling is in place
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def test_attribution_splits_managed_and_unmanaged_memory():
    inv = HostInventory("h", [0], 1024, [GpuUnit(0, "g0", "T4", 16384, used_mb=9000, processes=[
        GpuProcess(1, 3000), GpuProcess(2, 5000), GpuProcess(3, 1000)])])
    grants = {"a": Grant("a", "h", True, {"g0": 4096}), "b": Grant("b", "h", True, {"g0": 4096})}
    att = attribute(inv, {1: "a", 2: "b"}, grants, resolve=None)
    # a uses 3000 of 4096; b uses 5000 of 4096 (904 over, which is not grantable either); pid 3 is foreign
    assert att.unmanaged_mb == {"g0": 9000 - 3000 - 4096}
    assert [(o.allocation_id, o.used_mb, o.granted_mb, o.pids) for o in att.overuse] == [("b", 5000, 4096, (2,))]


def test_a_process_of_unknown_memory_leaves_the_other_tenants_memory_unmanaged():
    # 4 GiB held by another tenant, and a grant of 8 GiB whose process NVML cannot size (it uses
    # 2 GiB): subtracting the whole grant left 0 unmanaged, and the ledger granted the 4 GiB again.
    inv = HostInventory("h", [0], 1024, [GpuUnit(0, "g0", "T4", 16384, used_mb=6144, processes=[GpuProcess(1, None)])])
    att = attribute(inv, {1: "a"}, {"a": Grant("a", "h", True, {"g0": 8192})}, resolve=None)
    assert att.unmanaged_mb == {"g0": 6144} and att.overuse == []  # over-counted, never under


def test_memory_on_a_gpu_outside_the_grant_is_overuse():
    inv = HostInventory("h", [0], 1024, [GpuUnit(1, "g1", "T4", 16384, used_mb=100, processes=[GpuProcess(1, 100)])])
    att = attribute(inv, {1: "a"}, {"a": Grant("a", "h", True, {"g0": 4096})}, resolve=None)
    assert [(o.gpu_uuid, o.granted_mb) for o in att.overuse] == [("g1", 0)]


def test_subprocess_of_a_work_horse_is_attributed_to_its_allocation(child):
    p = child()  # our child: its parent (this test process) is the mapped "work horse"
    inv = HostInventory("h", [0], 1024, [GpuUnit(0, "g0", "T4", 16384, used_mb=5000, processes=[GpuProcess(p.pid, 5000)])])
    att = attribute(inv, {os.getpid(): "a"}, {"a": Grant("a", "h", True, {"g0": 4096})})
    assert [(o.allocation_id, o.pids) for o in att.overuse] == [("a", (p.pid,))]


def test_over_grant_produces_one_event_and_metric_per_episode(alloc, make_agent, inventory):
    h = unique("wd")
    agent = make_agent([host(h)])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "4Gi"})
    alloc.redis.hset(alloc.keys.host_pids(h), "4242", x.allocation_id)
    before = _sample("allocator_gpu_memory_exceeded_total", h)
    inventory.write([host(h, gpus=_gpu_with({4242: "6Gi"}))])
    assert agent.run_once().events == 1
    assert agent.run_once().events == 0  # the same episode: no new event
    (ev,) = events(alloc, "gpu_memory_exceeded")
    data = json.loads(ev["data"])
    assert ev["id"] == x.allocation_id
    assert (data["host"], data["used_mb"], data["granted_mb"], data["pids"], data["action"]) == (h, 6144, 4096, [4242], "reported")
    assert _sample("allocator_gpu_memory_exceeded_total", h) == before + 1
    assert _sample("allocator_gpu_memory_over_grant_bytes", h) == 2048 * 1024 * 1024
    inventory.write([host(h, gpus=_gpu_with({4242: "3Gi"}))])  # back under the grant: episode over
    agent.run_once()
    assert _sample("allocator_gpu_memory_over_grant_bytes", h) == 0
    inventory.write([host(h, gpus=_gpu_with({4242: "5Gi"}))])
    assert agent.run_once().events == 1


def test_within_grant_produces_nothing(alloc, make_agent, inventory):
    h = unique("wd")
    agent = make_agent([host(h)])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "4Gi"})
    alloc.redis.hset(alloc.keys.host_pids(h), "4242", x.allocation_id)
    inventory.write([host(h, gpus=_gpu_with({4242: "4Gi"}))])
    assert agent.run_once().overuse == 0 and events(alloc, "gpu_memory_exceeded") == []


def test_a_whole_gpu_holder_filling_what_others_leave_is_not_over_its_rounded_grant(alloc, make_agent, inventory):
    # 100 MiB used by another process is rounded up to 256 (--granularity-mb), so the whole grant
    # is 16,128 MiB; the holder then fills the 16,284 MiB the GPU really has left.
    h = unique("wd")
    agent = make_agent([host(h, gpus=_gpu_with({9999: 100}))], granularity_mb=256)
    agent.run_once()
    x = alloc.allocate({"gpus": 1})
    assert x.gpus[0].memory_mb == 16128
    alloc.redis.hset(alloc.keys.host_pids(h), "4242", x.allocation_id)
    inventory.write([host(h, gpus=_gpu_with({9999: 100, 4242: 16284}))])
    assert agent.run_once().overuse == 0 and events(alloc, "gpu_memory_exceeded") == []


def test_a_whole_gpu_holder_is_its_own_tenant_beside_others_only_by_what_they_use():
    inv = HostInventory("h", [0], 1024, [GpuUnit(0, "g0", "T4", 16384, used_mb=16384, processes=[
        GpuProcess(1, 16284), GpuProcess(3, 100)])])
    att = attribute(inv, {1: "a"}, {"a": Grant("a", "h", True, {"g0": 16128}, frozenset({"g0"}))}, resolve=None)
    assert att.overuse == [] and att.unmanaged_mb == {"g0": 100}


def test_enforce_stops_a_real_process_over_its_grant(alloc, make_agent, inventory, child):
    h = unique("wd")
    agent = make_agent([host(h)], enforce=True)
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "4Gi"})
    p = child()
    alloc.redis.hset(alloc.keys.host_pids(h), str(p.pid), x.allocation_id)
    before = _sample("allocator_gpu_processes_stopped_total", h, signal="SIGTERM")
    inventory.write([host(h, gpus=_gpu_with({p.pid: "6Gi"}))])
    agent.run_once()
    assert p.wait(10) == -signal.SIGTERM
    (ev,) = events(alloc, "gpu_memory_exceeded")
    assert json.loads(ev["data"])["action"] == "stopped" and json.loads(ev["data"])["stopped_pids"] == [p.pid]
    assert _sample("allocator_gpu_processes_stopped_total", h, signal="SIGTERM") == before + 1


def test_enforce_escalates_to_sigkill_after_the_grace(alloc, child):
    p = child(ignore_term=True)
    mono = FakeMonotonic()
    wd = Watchdog(alloc, enforce=True, kill_grace_s=5.0, monotonic=mono)
    inv = HostInventory("hk", [0], 1024, [GpuUnit(0, "g0", "T4", 16384, used_mb=6000, processes=[GpuProcess(p.pid, 6000)])])
    over = attribute(inv, {p.pid: "a"}, {"a": Grant("a", "hk", True, {"g0": 4096})}, resolve=None).overuse
    wd.observe("hk", over)  # SIGTERM, ignored
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(0.2)
    mono.t += 5.0
    wd.observe("hk", over)
    assert p.wait(10) == -signal.SIGKILL


def test_without_enforce_nothing_is_stopped(alloc, make_agent, inventory, child):
    h = unique("wd")
    agent = make_agent([host(h)])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "4Gi"})
    p = child()
    alloc.redis.hset(alloc.keys.host_pids(h), str(p.pid), x.allocation_id)
    inventory.write([host(h, gpus=_gpu_with({p.pid: "6Gi"}))])
    agent.run_once()
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(0.2)
    assert json.loads(events(alloc, "gpu_memory_exceeded")[0]["data"])["action"] == "reported"
