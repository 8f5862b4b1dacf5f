"""Host registration, capacity updates that keep grants intact, drain and removal."""

import pytest

from allocator import HostBusy, HostNotFound, InsufficientResources, InvalidRequest


def test_capacity_update_keeps_existing_grants(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpu_memory_mb": "10Gi", "cpu_cores": 2, "ram_mb": "8Gi"})
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="32Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "2Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    h = alloc_any.capacity().hosts[0]
    assert h.gpus[0].memory.allocated == 10240 and h.gpus[0].memory.available == 4096
    assert h.gpus[0].memory.unmanaged == 2048
    assert h.cpu_cores.available == 6 and h.ram_mb.available == 24576
    assert alloc_any.get(x.allocation_id).state == "active"
    # The granted cores stay taken: new exclusive grants get other ids.
    assert alloc_any.allocate({"cpu_cores": 2}).cpu_cores == [2, 3]


def test_shrinking_below_what_is_granted_never_goes_negative(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpu_memory_mb": "12Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    alloc_any.register_host(id="h1", cpu_cores=2, ram_mb="8Gi", gpus=[{"index": 0, "memory_mb": "8Gi"}])
    h = alloc_any.capacity().hosts[0]
    assert (h.gpus[0].memory.available, h.cpu_cores.available, h.ram_mb.available) == (0, 0, 0)
    alloc_any.release(x.allocation_id)
    h = alloc_any.capacity().hosts[0]
    assert (h.gpus[0].memory.available, h.cpu_cores.available, h.ram_mb.available) == (8192, 2, 8192)


def test_dropping_a_gpu_keeps_the_grant_on_the_other(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi",
                            gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "4Gi"})
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    assert alloc_any.capacity().hosts[0].gpus[0].memory.allocated == 4096
    alloc_any.release(x.allocation_id)
    assert alloc_any.capacity().gpu_memory_mb.allocated == 0
    assert alloc_any.redis.zcard(alloc_any.keys.gpu_idx) == 1


def test_drained_host_takes_no_new_work_until_resumed(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")
    x = alloc_any.allocate({"cpu_cores": 1})
    alloc_any.drain_host("h1")
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"cpu_cores": 1})
    assert alloc_any.get(x.allocation_id).state == "active"
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")  # re-registering keeps the drain
    assert alloc_any.capacity().hosts[0].state == "draining"
    alloc_any.resume_host("h1")
    assert alloc_any.allocate({"cpu_cores": 1}).host_id == "h1"


def test_removing_a_busy_host_needs_force(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="16Gi")
    x = alloc_any.allocate({"cpu_cores": 1})
    with pytest.raises(HostBusy, match="still holds 1 active allocation"):
        alloc_any.remove_host("h1")
    assert alloc_any.remove_host("h1", force=True) == [x.allocation_id]
    assert alloc_any.get(x.allocation_id).release_reason == "host_removed"
    assert alloc_any.capacity().host_count == 0


def test_unknown_host_operations_are_not_found(alloc_any):
    with pytest.raises(HostNotFound):
        alloc_any.drain_host("ghost")
    with pytest.raises(HostNotFound):
        alloc_any.remove_host("ghost")


def test_a_host_with_more_gpus_than_the_indexes_can_order_is_refused(alloc_any):
    with pytest.raises(InvalidRequest) as exc:
        alloc_any.register_host(id="h1", cpu_cores=4, gpus=[{"index": i, "memory_mb": 1024} for i in range(1025)])
    assert exc.value.field == "gpus" and "at most 1024 GPUs per host, got 1025" in str(exc.value)
    assert alloc_any.redis.zcard(alloc_any.keys.hosts) == 0
