"""Capacity figures per host and for the fleet."""


def test_capacity_per_resource_host_and_fleet(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="64Gi",
                            gpus=[{"index": 0, "memory_mb": "40Gi"}, {"index": 1, "memory_mb": "40Gi"}])
    alloc_any.register_host(id="h2", cpu_cores=8, ram_mb="64Gi")
    alloc_any.allocate({"gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"})
    alloc_any.allocate({"cpu_cores": "0.5", "ram_mb": "16Gi"}, selector={"cluster": "default"}, strategy="worst_fit")
    cap = alloc_any.capacity()
    assert (cap.host_count, cap.gpu_count, cap.gpus_idle, cap.active_allocations) == (2, 2, 1, 2)
    assert cap.gpu_memory_mb.model_dump() == {"total": 81920, "allocated": 20480, "available": 61440,
                                              "unmanaged": 0, "unschedulable": 0, "utilization_pct": 25.0}
    assert (cap.cpu_cores.total, cap.cpu_cores.allocated, cap.cpu_cores.available) == (16, 4.5, 11.5)
    assert cap.ram_mb.utilization_pct == 37.5
    h1, h2 = cap.hosts
    assert (h1.host_id, h1.cpu_cores.available, h1.active_allocations) == ("h1", 4, 1)
    assert (h2.host_id, h2.cpu_cores.available, h2.ram_mb.available) == ("h2", 7.5, 49152)


def test_empty_fleet_has_zero_capacity(alloc_any):
    cap = alloc_any.capacity()
    assert cap.host_count == 0 and cap.gpu_memory_mb.total == 0 and cap.gpu_memory_mb.utilization_pct == 0


def test_what_is_free_on_a_draining_host_is_not_available_to_the_fleet(alloc):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=4096, gpus=[{"index": 0, "memory_mb": 16384}])
    alloc.register_host(id="h2", cpu_cores=2, ram_mb=2048)
    alloc.drain_host("h1")
    cap = alloc.capacity()
    assert (cap.cpu_cores.total, cap.cpu_cores.available, cap.cpu_cores.unschedulable) == (6, 2, 4)
    assert (cap.gpu_memory_mb.available, cap.gpu_memory_mb.unschedulable, cap.gpus_idle) == (0, 16384, 0)
    assert cap.cpu_cores.unmanaged == 0 and cap.cpu_cores.utilization_pct == 0
    h1 = next(h for h in cap.hosts if h.host_id == "h1")
    assert h1.cpu_cores.available == 4  # the host itself still says what is free on it


def test_unmanaged_gpu_memory_is_what_other_processes_use_even_on_an_overcommitted_host(alloc):
    gpu = {"index": 0, "uuid": "GPU-a", "model": "T4", "memory_mb": 8000, "used_mb": 2000}
    alloc.register_host(id="a", cpu_cores=2, ram_mb="4Gi", gpus=[gpu])
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 6000})
    alloc.register_host(id="a", cpu_cores=2, ram_mb="4Gi", gpus=[{**gpu, "used_mb": 4000}])  # grants now over the total
    alloc.register_host(id="b", cpu_cores=2, ram_mb="4Gi",
                        gpus=[{"index": 0, "uuid": "GPU-b", "model": "T4", "memory_mb": 8000, "used_mb": 4000}])
    cap = alloc.capacity()
    a, b = (h.gpu_memory_mb for h in cap.hosts)
    assert (a.allocated, a.available, a.unmanaged) == (6000, 0, 4000)
    assert (b.allocated, b.available, b.unmanaged) == (0, 4000, 4000)
    assert cap.gpu_memory_mb.unmanaged == 8000  # each host's, not what the fleet's figures leave over


def test_cores_granted_on_a_host_an_update_overcommitted_count_in_full(alloc):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    alloc.allocate({"cpu_cores": 3, "ram_mb": "6Gi"})
    alloc.allocate({"cpu_cores": "0.5", "ram_mb": "1Gi"})
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="4Gi")  # legal: the host is marked overcommitted
    h1 = alloc.capacity().hosts[0]
    assert (h1.cpu_cores.total, h1.cpu_cores.allocated, h1.cpu_cores.available) == (2, 3.5, 0)
    assert (h1.ram_mb.total, h1.ram_mb.allocated) == (4096, 7168)


def test_cores_a_host_no_longer_lists_still_count_as_granted(alloc):
    alloc.register_host(id="h1", cpu_cores=[0, 1, 2, 3], ram_mb="8Gi")
    x = alloc.allocate({"cpu_cores": 2})
    assert x.cpu_cores == [0, 1]
    alloc.register_host(id="h1", cpu_cores=[2, 3, 4, 5], ram_mb="8Gi")
    cpu = alloc.capacity().hosts[0].cpu_cores
    assert (cpu.total, cpu.allocated, cpu.available) == (4, 2, 4)
    alloc.release(x.allocation_id)
    cpu = alloc.capacity().hosts[0].cpu_cores
    assert (cpu.total, cpu.allocated, cpu.available) == (4, 0, 4)


def test_what_is_free_on_a_host_whose_cores_are_all_taken_is_not_available_to_the_fleet(alloc):
    # A host with no free core takes no new work, GPU work included (it is parked): what it has
    # free is unschedulable, as on a draining host, so the fleet figures agree with a refusal.
    alloc.register_host(id="h1", cpu_cores=4, ram_mb=16384, gpus=[{"index": 0, "memory_mb": 16384}])
    alloc.register_host(id="h2", cpu_cores=2, ram_mb=2048)
    alloc.allocate({"cpu_cores": 4, "ram_mb": 1024}, selector={"cluster": "default"}, strategy="first_fit")
    cap = alloc.capacity()
    h1 = next(h for h in cap.hosts if h.host_id == "h1")
    assert h1.parked and h1.state == "ready" and not h1.takes_new_work
    assert (cap.gpu_memory_mb.available, cap.gpu_memory_mb.unschedulable, cap.gpus_idle) == (0, 16384, 0)
    assert (cap.ram_mb.available, cap.ram_mb.unschedulable) == (2048, 15360)
    assert h1.gpu_memory_mb.available == 16384  # the host itself still says what is free on it


def test_capacity_says_which_hosts_an_update_left_overcommitted(alloc):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    alloc.allocate({"cpu_cores": 1, "ram_mb": "6Gi"})
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="4Gi")
    alloc.register_host(id="h2", cpu_cores=4, ram_mb="4Gi")
    assert [(h.host_id, h.overcommitted) for h in alloc.capacity().hosts] == [("h1", True), ("h2", False)]
