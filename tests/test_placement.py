"""Placement strategies on tiny inline fleets, with the exact GPUs and cores expected."""

import pytest

from allocator import Allocator, InsufficientResources

GiB = 1024


def two_hosts(a: Allocator) -> None:
    """h1: GPU0 16Gi + GPU1 40Gi; h2: GPU0 24Gi. 8 cores and 64Gi RAM each; h1 registered first."""
    a.register_host(id="h1", cpu_cores=8, ram_mb="64Gi",
                    gpus=[{"index": 0, "model": "T4", "memory_mb": "16Gi"}, {"index": 1, "model": "A100", "memory_mb": "40Gi"}])
    a.register_host(id="h2", cpu_cores=8, ram_mb="64Gi", labels={"cluster": "b"},
                    gpus=[{"index": 0, "model": "A10", "memory_mb": "24Gi"}])


def where(x) -> tuple[str, list[int]]:
    return x.host_id, [g.index for g in x.gpus]


def test_best_fit_takes_the_smallest_gpu_that_fits(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "20Gi", "cpu_cores": 2}, strategy="best_fit")
    assert where(x) == ("h2", [0])
    assert x.gpus[0].memory_mb == 20 * GiB and x.gpus[0].uuid == "h2-gpu0"


def test_first_fit_takes_the_first_host_in_registration_order(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "20Gi", "cpu_cores": 2}, strategy="first_fit")
    assert where(x) == ("h1", [1])


def test_worst_fit_spreads_onto_the_emptiest_gpu(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi"}, strategy="worst_fit")
    y = alloc_any.allocate({"gpu_memory_mb": "4Gi"}, strategy="spread")
    assert where(x) == ("h1", [1])  # 40Gi free
    assert where(y) == ("h1", [1])  # still 36Gi free, more than 24Gi


def test_priority_strategy_places_like_best_fit(alloc_any):
    two_hosts(alloc_any)
    assert where(alloc_any.allocate({"gpu_memory_mb": "10Gi"}, strategy="priority")) == ("h1", [0])


def test_gpu_memory_is_shared_between_allocations(alloc_any):
    two_hosts(alloc_any)
    a1 = alloc_any.allocate({"gpu_memory_mb": "20Gi"}, selector={"cluster": "default"})
    a2 = alloc_any.allocate({"gpu_memory_mb": "20Gi"}, selector={"cluster": "default"})
    assert where(a1) == where(a2) == ("h1", [1])
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpu_memory_mb": "20Gi"}, selector={"cluster": "default"})


def test_exclusive_cores_are_the_lowest_free_ids(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=[10, 11, 12, 13], ram_mb="8Gi")
    x = alloc_any.allocate({"cpu_cores": 2})
    y = alloc_any.allocate({"cpu_cores": 1})
    assert (x.cpu_cores, y.cpu_cores) == ([10, 11], [12])
    alloc_any.release(x.allocation_id)
    assert alloc_any.allocate({"cpu_cores": 2}).cpu_cores == [10, 11]


def test_fractional_cpu_comes_from_the_shared_pool(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=2, ram_mb="8Gi")
    x = alloc_any.allocate({"cpu_cores": "0.5"})
    assert x.cpu_cores == [] and x.cpu_shared == 0.5
    # The shared pool lent 0.5 of a core, so only one whole core is left to pin.
    assert alloc_any.allocate({"cpu_cores": 1}).cpu_cores == [0]
    with pytest.raises(InsufficientResources, match="insufficient CPU"):
        alloc_any.allocate({"cpu_cores": 1})
    assert alloc_any.allocate({"cpu_cores": "500m"}).cpu_shared == 0.5


def test_whole_gpus_take_an_idle_gpu_and_all_its_memory(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpus": 1}, strategy="best_fit")
    assert where(x) == ("h1", [0]) and x.gpus[0].memory_mb == 16 * GiB
    alloc_any.allocate({"gpu_memory_mb": "1Gi"}, strategy="worst_fit")  # h1 GPU1 is no longer idle
    y = alloc_any.allocate({"gpus": 1})
    assert where(y) == ("h2", [0])
    with pytest.raises(InsufficientResources, match="no idle GPU"):
        alloc_any.allocate({"gpus": 1})


def test_multi_gpu_requests_stay_on_one_host(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "8Gi", "cpu_cores": 4})
    assert where(x) == ("h1", [0, 1])
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "16Gi"})  # 8Gi + 32Gi left on h1, one GPU on h2


def test_gpu_model_constraint_skips_other_models(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi", "gpu_model": "A100|V100M32"})
    assert where(x) == ("h1", [1])
    with pytest.raises(InsufficientResources, match="GPU models"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi", "gpu_model": "H100"})


def test_label_selector_limits_candidate_hosts(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi"}, selector="cluster=b")
    assert where(x) == ("h2", [0])
    with pytest.raises(InsufficientResources, match="selector"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi"}, selector={"cluster": "nowhere"})


def test_cpu_only_requests_best_fit_by_free_cpu(alloc_any):
    alloc_any.register_host(id="big", cpu_cores=16, ram_mb="64Gi")
    alloc_any.register_host(id="small", cpu_cores=4, ram_mb="64Gi")
    assert alloc_any.allocate({"cpu_cores": 2}).host_id == "small"
    assert alloc_any.allocate({"cpu_cores": 2}, strategy="first_fit").host_id == "big"
    assert alloc_any.allocate({"cpu_cores": 2}, strategy="worst_fit").host_id == "big"


def test_ram_must_fit_on_the_same_host(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="8Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc_any.register_host(id="h2", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "80Gi"}])
    x = alloc_any.allocate({"gpu_memory_mb": "8Gi", "ram_mb": "32Gi"})
    assert x.host_id == "h2" and x.ram_mb == 32768


def test_refusal_names_the_scarce_resource(alloc_any):
    two_hosts(alloc_any)
    with pytest.raises(InsufficientResources) as exc:
        alloc_any.allocate({"gpu_memory_mb": "50Gi"})
    assert str(exc.value) == "insufficient GPU memory: requested 51200 MiB per GPU, largest free 40960 MiB"
    assert exc.value.code == "INSUFFICIENT_GPU_MEMORY"
    with pytest.raises(InsufficientResources, match="insufficient RAM: requested 102400 MiB, largest free 65536 MiB"):
        alloc_any.allocate({"cpu_cores": 1, "ram_mb": "100Gi"})
    with pytest.raises(InsufficientResources, match="insufficient CPU: requested 9 cores, largest free 8 cores"):
        alloc_any.allocate({"cpu_cores": 9})


def test_exhausted_host_does_not_hide_gpus_on_other_hosts(redis_url, clock):
    """h1 has many well-fitting GPUs but no free CPU; with a scan cap of 4 they would fill the
    whole scan if they stayed in the index."""
    a = Allocator(redis_url, namespace="test-park", clock=clock, scan_cap=4)
    try:
        a.register_host(id="h1", cpu_cores=2, ram_mb="64Gi", gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(8)])
        a.register_host(id="h2", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "80Gi"}])
        a.allocate({"cpu_cores": 2}, selector={"cluster": "default"}, strategy="first_fit")  # h1 CPU now full
        assert a.redis.zcard(a.keys.gpu_idx) == 1
        x = a.allocate({"gpu_memory_mb": "8Gi", "cpu_cores": 1}, strategy="best_fit")
        assert x.host_id == "h2"
    finally:
        a.destroy()


def test_host_with_no_free_ram_is_parked_and_comes_back(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="4Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    x = alloc_any.allocate({"cpu_cores": 1, "ram_mb": "4Gi"})
    assert alloc_any.redis.zcard(alloc_any.keys.gpu_idx) == 0
    alloc_any.release(x.allocation_id)
    assert alloc_any.redis.zscore(alloc_any.keys.gpu_idx, "h1#0") == 16384


def test_dry_run_reports_where_without_allocating(alloc_any):
    two_hosts(alloc_any)
    assert alloc_any.would_fit({"gpu_memory_mb": "20Gi"})["host_id"] == "h2"
    assert alloc_any.would_fit({"gpu_memory_mb": "60Gi"}) is None
    assert alloc_any.capacity().active_allocations == 0


def test_critical_reserve_keeps_idle_gpus_for_critical_work(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", reserve_gpus=1,
                            gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    first = alloc_any.allocate({"gpus": 1}, priority="high")
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpus": 1}, priority="high")
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "1Gi"}, priority="normal")
    critical = alloc_any.allocate({"gpus": 1}, priority="critical")
    alloc_any.release(first.allocation_id)
    with pytest.raises(InsufficientResources):  # GPU 0 is the one idle GPU left: the reserve
        alloc_any.allocate({"gpu_memory_mb": "1Gi"}, priority="low")
    alloc_any.release(critical.allocation_id)
    shared = alloc_any.allocate({"gpu_memory_mb": "1Gi"}, priority="low")
    # That GPU is in use now (not idle), so more low work may share it without touching the reserve.
    assert alloc_any.allocate({"gpu_memory_mb": "1Gi"}, priority="low").gpus[0].index == shared.gpus[0].index
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpus": 1}, priority="normal")
