"""The agent registers what its hosts really have and keeps it up to date without breaking grants."""

from __future__ import annotations

import pytest

from allocator import InsufficientResources
from allocator.invariants import check

from .helpers import host


def _host(alloc, host_id="h1"):
    return next(h for h in alloc.capacity().hosts if h.host_id == host_id)


def test_first_round_registers_every_host_with_labels(alloc, make_agent):
    agent = make_agent([host("h1", labels={"zone": "z1"}), host("h2", gpus=[])], labels={"cluster": "lab"})
    rep = agent.run_once()
    assert rep.registered == ["h1", "h2"] and rep.hosts == 2
    h1 = _host(alloc)
    assert h1.state == "ready" and h1.labels == {"zone": "z1", "cluster": "lab", "gpu_model": "T4"}
    assert (h1.gpu_memory_mb.total, h1.cpu_cores.total, h1.ram_mb.total) == (16384, 8, 32768)
    assert alloc.allocate({"gpu_memory_mb": "4Gi"}, selector="zone=z1,gpu_model=T4").host_id == "h1"


def test_unchanged_inventory_is_not_registered_again(alloc, make_agent):
    agent = make_agent([host("h1")])
    agent.run_once()
    n = alloc.redis.xlen(alloc.keys.events)
    assert agent.run_once().registered == []
    assert alloc.redis.xlen(alloc.keys.events) == n  # heartbeats write no outbox events


def test_capacity_update_keeps_allocations_intact(alloc, make_agent, inventory):
    agent = make_agent([host("h1", cores=8, ram="32Gi")])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "10Gi", "cpu_cores": 2, "ram_mb": "8Gi"})
    inventory.write([host("h1", cores=16, ram="64Gi", gpus=[{"index": 0, "model": "T4", "memory_mb": "24Gi"},
                                                             {"index": 1, "model": "T4", "memory_mb": "24Gi"}])])
    assert agent.run_once().registered == ["h1"]
    h = _host(alloc)
    assert alloc.get(x.allocation_id).state == "active"
    assert h.gpus[0].memory.allocated == 10240 and h.gpus[0].memory.available == 24576 - 10240
    assert (h.cpu_cores.available, h.ram_mb.available) == (14, 65536 - 8192)
    check(alloc.snapshot())


def test_capacity_shrinking_below_grants_never_goes_negative(alloc, make_agent, inventory):
    agent = make_agent([host("h1", cores=4, ram="16Gi")])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "12Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    inventory.write([host("h1", cores=2, ram="8Gi", gpus=[{"index": 0, "memory_mb": "8Gi"}])])
    agent.run_once()
    h = _host(alloc)
    assert (h.gpus[0].memory.available, h.cpu_cores.available, h.ram_mb.available) == (0, 0, 0)
    assert alloc.get(x.allocation_id).state == "active"
    check(alloc.snapshot())


def test_foreign_gpu_memory_reduces_free_memory(alloc, make_agent, inventory):
    agent = make_agent([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "6Gi"}])])
    agent.run_once()
    g = _host(alloc).gpus[0]
    assert (g.memory.available, g.memory.unmanaged) == (10240, 6144)
    with pytest.raises(InsufficientResources):
        alloc.allocate({"gpu_memory_mb": "12Gi"})
    inventory.write([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "1Gi"}])])
    agent.run_once()
    assert alloc.allocate({"gpu_memory_mb": "12Gi"}).host_id == "h1"


def test_unlisted_processes_are_foreign_and_work_horses_are_not(alloc, make_agent, inventory):
    agent = make_agent([host("h1")])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "8Gi"})
    alloc.redis.hset(alloc.keys.host_pids("h1"), mapping={"4001": x.allocation_id})
    inventory.write([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "processes": [
        {"pid": 4001, "used_mb": "5Gi"},    # the allocation's work horse, within its grant
        {"pid": 4002, "used_mb": "2Gi"},    # someone else's process
    ]}])])
    agent.run_once()
    g = _host(alloc).gpus[0]
    assert (g.memory.allocated, g.memory.unmanaged, g.memory.available) == (8192, 2048, 16384 - 8192 - 2048)


def test_memory_of_a_released_allocation_counts_as_foreign(alloc, make_agent, inventory):
    agent = make_agent([host("h1")])
    agent.run_once()
    x = alloc.allocate({"gpu_memory_mb": "8Gi"})
    alloc.redis.hset(alloc.keys.host_pids("h1"), mapping={"4001": x.allocation_id})
    inventory.write([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "processes": [{"pid": 4001, "used_mb": "5Gi"}]}])])
    agent.run_once()
    assert _host(alloc).gpus[0].memory.unmanaged == 0
    alloc.release(x.allocation_id)  # its process still holds memory: nobody may be granted it
    agent.run_once()
    assert _host(alloc).gpus[0].memory.unmanaged == 5120


def test_unmanaged_memory_is_rounded_up_to_the_granularity(alloc, make_agent):
    agent = make_agent([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": 300}])], granularity_mb=256)
    agent.run_once()
    assert _host(alloc).gpus[0].memory.unmanaged == 512


def test_mig_devices_are_registered_as_separate_gpus(alloc, make_agent):
    agent = make_agent([host("h1", gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi", "mig_devices": [
        {"uuid": "MIG-a", "profile": "3g.20gb", "memory_mb": "20Gi"}, {"uuid": "MIG-b", "profile": "3g.20gb", "memory_mb": "20Gi"}]}])])
    agent.run_once()
    assert [(g.index, g.uuid, g.memory.total) for g in _host(alloc).gpus] == [(100, "MIG-a", 20480), (101, "MIG-b", 20480)]
    assert alloc.allocate({"gpus": 2}).gpus[1].uuid == "MIG-b"


def test_inventory_is_published_with_the_heartbeat(alloc, make_agent):
    import json

    agent = make_agent([host("h1", gpus=[{"index": 0, "memory_mb": "16Gi", "utilization_pct": 42}])])
    agent.run_once()
    inv = json.loads(alloc.redis.get(alloc.keys.host_inventory("h1")))
    assert inv["gpus"][0]["utilization_pct"] == 42 and inv["provider"] == "static"
    assert 0 < alloc.redis.pttl(alloc.keys.host_inventory("h1")) <= 1000  # 3 intervals, at least 1 s
