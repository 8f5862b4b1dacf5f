"""Worker slots: a ledger resource per host, taken atomically with CPU and RAM, never parking a host."""

from __future__ import annotations

import threading
import uuid

import pytest
from rq import Queue, Worker

from allocator import Allocator
from allocator.agent import Agent, StaticProvider
from allocator.errors import InsufficientResources, InvalidRequest
from allocator.invariants import check
from allocator.queue import host_queue_name
from allocator.seeds import AllocationManager

from .agent.helpers import InventoryFile
from .conftest import ledger_dump


def ok(a: Allocator) -> None:
    assert check(a.snapshot()) == []


def slots(a: Allocator, host: str = "h1") -> tuple[int, int]:
    h = next(x for x in a.capacity().hosts if x.host_id == host)
    return int(h.worker_slots.total), int(h.worker_slots.allocated)


def test_a_host_offers_one_slot_per_core_unless_told(alloc):
    alloc.register_host(id="h1", cpu_cores=6, ram_mb=8192)
    alloc.register_host(id="h2", cpu_cores=6, ram_mb=8192, worker_slots=2)
    assert slots(alloc, "h1") == (6, 0) and slots(alloc, "h2") == (2, 0)
    assert alloc.capacity().worker_slots.total == 8


def test_workers_take_slots_and_release_gives_them_back(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=5)
    a = alloc.allocate({"cpu_cores": 3, "workers": 3})
    assert a.workers == 3 and slots(alloc) == (5, 3)
    assert alloc.get(a.allocation_id).workers == 3
    ok(alloc)
    alloc.release(a.allocation_id)
    alloc.release(a.allocation_id)
    assert slots(alloc) == (5, 0)
    ok(alloc)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "two"])
def test_bad_worker_counts_are_invalid(alloc, bad):
    with pytest.raises(InvalidRequest) as e:
        alloc.allocate({"cpu_cores": 1, "workers": bad})
    assert e.value.field == "resources.workers"


def test_no_free_slot_is_refused_with_the_reason_and_changes_nothing(alloc):
    alloc.register_host(id="h1", cpu_cores=16, ram_mb=32768, worker_slots=10)
    alloc.allocate({"cpu_cores": 4, "workers": 4})
    before = ledger_dump(alloc)
    with pytest.raises(InsufficientResources) as e:
        alloc.allocate({"cpu_cores": 7, "workers": 7})
    assert e.value.code == "INSUFFICIENT_WORKERS"
    assert e.value.message == "insufficient worker slots: requested 7, largest free 6 on a host with the CPU and RAM"
    assert e.value.details == {"largest_free_worker_slots": 6}
    assert ledger_dump(alloc) == before


def test_placement_skips_a_host_without_free_slots(alloc):
    alloc.register_host(id="full", cpu_cores=32, ram_mb=65536, worker_slots=1)
    alloc.register_host(id="roomy", cpu_cores=4, ram_mb=8192, worker_slots=4)
    got = alloc.allocate({"cpu_cores": 2, "workers": 2}, strategy="worst_fit")  # worst fit prefers "full"
    assert got.host_id == "roomy"
    ok(alloc)


def test_a_host_out_of_slots_still_takes_work_that_needs_none(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=2)
    alloc.allocate({"cpu_cores": 2, "workers": 2})
    assert alloc.redis.zscore(alloc.keys.cpu_idx, "h1") == 6000  # not parked
    other = alloc.allocate({"cpu_cores": 2, "ram_mb": 1024})
    assert other.host_id == "h1" and other.workers == 0
    ok(alloc)


def test_register_host_recounts_slots_from_active_allocations(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=4)
    alloc.allocate({"cpu_cores": 1, "workers": 3})
    alloc.redis.hset(alloc.keys.host("h1"), "slots_used", 0)  # corrupt the counter
    assert any("slots_used 0 != allocations' 3" in v for v in check(alloc.snapshot()))
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=6)
    assert slots(alloc) == (6, 3)
    ok(alloc)


def test_a_queued_request_waits_for_slots(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=2)
    first = alloc.allocate({"cpu_cores": 1, "workers": 2})
    queued = alloc.allocate({"cpu_cores": 1, "workers": 1}, on_busy="queue")
    assert queued.state == "pending" and queued.queue_position == 1
    alloc.release(first.allocation_id)
    assert alloc.get(queued.allocation_id).state == "active" and slots(alloc) == (2, 1)
    ok(alloc)


def test_preemption_frees_slots_for_a_higher_priority_request(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb=8192, worker_slots=2)
    low = alloc.allocate({"cpu_cores": 1, "workers": 2}, priority="low")
    high = alloc.allocate({"cpu_cores": 1, "workers": 2}, priority="high", strategy="priority", on_busy="queue")
    assert high.state == "active"
    assert alloc.get(low.allocation_id).release_reason == "preempted"
    ok(alloc)


def test_concurrent_requests_never_exceed_the_slots(redis_url):
    ns = "test-" + uuid.uuid4().hex[:12]
    setup = Allocator(redis_url, namespace=ns)
    setup.register_host(id="h1", cpu_cores=64, ram_mb=1 << 20, worker_slots=10)
    granted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        a = Allocator(redis_url, namespace=ns)
        for _ in range(5):
            try:
                got = a.allocate({"cpu_cores": 1, "workers": 1})
                with lock:
                    granted.append(got.allocation_id)
            except InsufficientResources as exc:
                with lock:
                    refused.append(exc.code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(granted) == 10 and len(refused) == 30 and set(refused) == {"INSUFFICIENT_WORKERS"}
        assert slots(setup) == (10, 10)
        ok(setup)
    finally:
        setup.destroy()


def test_two_managers_share_the_cap_through_the_ledger(alloc):
    one = AllocationManager(allocator=alloc, total_cpu=16.0, total_memory=32768, total_workers=10)
    two = AllocationManager(allocator=alloc)
    assert one.request_resources("job-1", workers=6)["status"] == "active"
    r = two.request_resources("job-2", workers=6)
    assert r["error"] == "Insufficient workers: requested 6, available 4"
    cap = two.get_capacity()
    assert (cap["total_workers"], cap["allocated_workers"], cap["available_workers"]) == (10, 6, 4)


def test_agent_registers_the_worker_slots_it_is_told(alloc, tmp_path):
    inv = InventoryFile(tmp_path / "fleet.yaml")
    inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])
    Agent(alloc, StaticProvider(inv.path), worker_slots=3).run_once()
    assert slots(alloc) == (3, 0)


def test_agent_counts_the_rq_workers_of_the_host_queue_by_default(alloc, tmp_path):
    inv = InventoryFile(tmp_path / "fleet.yaml")
    inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])
    agent = Agent(alloc, StaticProvider(inv.path))
    agent.run_once()
    assert slots(alloc) == (8, 0)  # no worker yet: one slot per core
    q = Queue(host_queue_name(alloc.keys.namespace, "h1"), connection=alloc.rq_connection)
    workers = [Worker([q], connection=alloc.rq_connection, name=f"w{i}-{uuid.uuid4().hex[:6]}") for i in range(3)]
    try:
        for w in workers:
            w.register_birth()
        agent.run_once()
        assert slots(alloc) == (3, 0)
    finally:
        for w in workers:
            w.register_death()
    agent.run_once()
    assert slots(alloc) == (8, 0)
