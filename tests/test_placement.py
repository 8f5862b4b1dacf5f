"""Placement strategies on tiny inline fleets, with the exact GPUs and cores expected."""

import pytest

from allocator import Allocator, InsufficientResources, invariants
from allocator.keys import FF_SHIFT, gpu_ffc_score

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
    assert alloc_any.would_fit({"gpu_memory_mb": "10Gi"}, strategy="best_fit")["host_id"] == "h2"
    assert where(alloc_any.allocate({"gpu_memory_mb": "10Gi"}, strategy="priority")) == ("h2", [0])


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
    # h2 has one idle GPU, h1 two: best fit keeps h1's pair together.
    x = alloc_any.allocate({"gpus": 1}, strategy="best_fit")
    assert where(x) == ("h2", [0]) and x.gpus[0].memory_mb == 24 * GiB
    alloc_any.allocate({"gpu_memory_mb": "1Gi"}, strategy="worst_fit")  # h1 GPU1 is no longer idle
    y = alloc_any.allocate({"gpus": 1})
    assert where(y) == ("h1", [0]) and y.gpus[0].memory_mb == 16 * GiB
    with pytest.raises(InsufficientResources, match="no idle GPU"):
        alloc_any.allocate({"gpus": 1})


def test_best_fit_takes_a_whole_gpu_from_the_host_with_the_fewest_idle_gpus(alloc_any):
    alloc_any.register_host(id="eight", cpu_cores=64, ram_mb="256Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(8)])
    alloc_any.register_host(id="one", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "80Gi"}])
    # Not the smallest idle GPU (16Gi on "eight"): that would break up the host an 8-GPU task needs.
    assert where(alloc_any.allocate({"gpus": 1, "cpu_cores": 4}, strategy="best_fit")) == ("one", [0])
    assert where(alloc_any.allocate({"gpus": 8}, strategy="best_fit")) == ("eight", list(range(8)))


def test_best_fit_keeps_cpu_only_work_off_the_cores_idle_gpus_need(alloc_any):
    # "gpu": 4 idle GPUs and 4 cores per GPU; "cpu": no GPU. Taking 8 of gpu's 16 cores would
    # leave two of its GPUs without the cores to use them, though gpu has the tighter CPU fit.
    alloc_any.register_host(id="gpu", cpu_cores=16, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(4)])
    alloc_any.register_host(id="cpu", cpu_cores=32, ram_mb="64Gi")
    assert alloc_any.allocate({"cpu_cores": 8}, strategy="best_fit").host_id == "cpu"
    assert alloc_any.allocate({"cpu_cores": 8}, strategy="first_fit").host_id == "gpu"


def test_best_fit_puts_a_cpu_heavy_gpu_task_where_the_cores_are_to_spare(alloc_any):
    # Same GPUs and idle count; 12 cores would leave "a-lean"'s other three GPUs with 4 cores.
    alloc_any.register_host(id="a-lean", cpu_cores=16, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(4)])
    alloc_any.register_host(id="b-wide", cpu_cores=64, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(4)])
    assert alloc_any.allocate({"gpus": 1, "cpu_cores": 12}, strategy="best_fit").host_id == "b-wide"


def test_best_fit_uses_gpus_that_lack_cores_for_a_task_that_needs_few(alloc_any):
    # "short" keeps 2 idle GPUs but only 2 of its 16 cores: a GPU task needing 1 core goes there,
    # using a GPU that most tasks could not, rather than to a host with the cores for its GPUs.
    alloc_any.register_host(id="a-full", cpu_cores=32, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(2)])
    alloc_any.register_host(id="short", cpu_cores=16, ram_mb="64Gi", labels={"pool": "s"},
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(2)])
    alloc_any.allocate({"cpu_cores": 14}, selector="pool=s")
    assert alloc_any.allocate({"gpus": 1, "cpu_cores": 1}, strategy="best_fit").host_id == "short"


def test_best_fit_shares_an_idle_gpu_of_the_host_with_the_fewest_idle_gpus(alloc_any):
    # Same GPUs and cores per GPU; "a" (registered first, first in the index) has 4 idle GPUs.
    for name, n in (("a", 4), ("b", 1)):
        alloc_any.register_host(id=name, cpu_cores=8 * n, ram_mb=f"{32 * n}Gi",
                                gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(n)])
    assert where(alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1}, strategy="best_fit")) == ("b", [0])
    # Now b's GPU is shared: the next share goes there too (tightest GPU, no idle GPU broken up).
    assert where(alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1}, strategy="best_fit")) == ("b", [0])


def test_best_fit_keeps_the_larger_host_whole_when_all_else_ties(alloc_any):
    # Both have 8 idle GPUs and cores to spare for them; "a-big" has more cores.
    alloc_any.register_host(id="a-big", cpu_cores=128, ram_mb="768Gi",
                            gpus=[{"index": i, "memory_mb": "32Gi"} for i in range(8)])
    alloc_any.register_host(id="b-small", cpu_cores=96, ram_mb="384Gi",
                            gpus=[{"index": i, "memory_mb": "32Gi"} for i in range(8)])
    assert alloc_any.allocate({"gpus": 1, "cpu_cores": 8}, strategy="best_fit").host_id == "b-small"


def test_best_fit_packs_a_share_beside_another_when_more_hosts_than_it_compares_tie(alloc_any):
    # 12 hosts, every idle GPU ties at 16 GiB free: best fit compares 8 of them, and the host that
    # already holds a share must be among those 8. Ordering the ties by GPU position first (h02#0,
    # h03#0, ... before h01#1) left it out and spread the second share onto an empty host.
    for i in range(1, 13):
        alloc_any.register_host(id=f"h{i:02d}", cpu_cores=16, ram_mb="128Gi",
                                gpus=[{"index": j, "memory_mb": "16Gi"} for j in range(2)])
    first = alloc_any.allocate({"gpu_memory_mb": "10Gi", "cpu_cores": 1}, strategy="best_fit")
    assert (first.host_id, first.gpus[0].index) == ("h01", 0)
    second = alloc_any.allocate({"gpu_memory_mb": "12Gi", "cpu_cores": 1}, strategy="best_fit")
    assert (second.host_id, second.gpus[0].index) == ("h01", 1)


def test_idle_host_index_follows_grants_releases_drain_and_removal(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(3)])
    idle = alloc_any.keys.idle_hosts
    assert alloc_any.redis.zscore(idle, "h1") == 3
    x = alloc_any.allocate({"gpus": 2, "cpu_cores": 1})
    y = alloc_any.allocate({"gpu_memory_mb": "1Gi", "cpu_cores": 1})
    assert alloc_any.redis.zscore(idle, "h1") is None  # every GPU has a holder
    alloc_any.release(x.allocation_id)
    assert alloc_any.redis.zscore(idle, "h1") == 2
    alloc_any.drain_host("h1")
    assert alloc_any.redis.zscore(idle, "h1") is None
    alloc_any.resume_host("h1")
    assert alloc_any.redis.zscore(idle, "h1") == 2
    alloc_any.release(y.allocation_id)
    alloc_any.remove_host("h1")
    assert alloc_any.redis.zcard(idle) == 0


def test_multi_gpu_requests_stay_on_one_host(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "8Gi", "cpu_cores": 4})
    assert where(x) == ("h1", [0, 1])
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "16Gi"})  # 8Gi + 32Gi left on h1, one GPU on h2


def four_gpu_host(a: Allocator, host_id: str = "h1", **extra) -> None:
    """GPU 0 T4 16Gi, GPU 1 A100 40Gi, GPUs 2 and 3 A10 24Gi: free memory differs, with one tie."""
    a.register_host(id=host_id, cpu_cores=16, ram_mb="64Gi", gpus=[
        {"index": 0, "model": "T4", "memory_mb": "16Gi"}, {"index": 1, "model": "A100", "memory_mb": "40Gi"},
        {"index": 2, "model": "A10", "memory_mb": "24Gi"}, {"index": 3, "model": "A10", "memory_mb": "24Gi"}], **extra)


@pytest.mark.parametrize(("strategy", "expected"), [
    ("best_fit", [2, 3]),  # the least free memory that fits, the lower position first on a tie
    ("worst_fit", [1, 2]),  # the most free memory, then the lower of the tied pair
    ("first_fit", [1, 2]),  # the lowest positions that fit
])
def test_multi_gpu_request_takes_gpus_of_one_host_in_the_strategys_order(alloc_any, strategy, expected):
    four_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "20Gi"}, strategy=strategy)
    assert where(x) == ("h1", expected)


def test_multi_gpu_request_takes_whole_idle_gpus_smallest_first(alloc_any):
    four_gpu_host(alloc_any)
    alloc_any.allocate({"gpu_memory_mb": "1Gi", "gpu_model": "A10"})  # GPU 2 is no longer idle
    x = alloc_any.allocate({"gpus": 2}, strategy="best_fit")
    assert where(x) == ("h1", [0, 3])
    assert [g.memory_mb for g in x.gpus] == [16 * GiB, 24 * GiB]


def test_multi_gpu_request_with_a_model_constraint_takes_only_those_models(alloc_any):
    four_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpus": 2, "gpu_memory_mb": "4Gi", "gpu_model": "A100|T4"}, strategy="best_fit")
    assert where(x) == ("h1", [0, 1])
    assert [g.model for g in x.gpus] == ["T4", "A100"]


@pytest.mark.parametrize("strategy", ["best_fit", "worst_fit", "first_fit"])
def test_a_host_with_a_critical_reserve_picks_the_gpus_a_host_without_one_picks(alloc_any, strategy):
    # With a reserve the GPUs are chosen by sorting the host's GPUs (the reserve may bind); without
    # one, by a walk over the host's scan summary. Where the reserve does not bind, both agree.
    four_gpu_host(alloc_any, "plain", labels={"cluster": "plain"})
    four_gpu_host(alloc_any, "reserved", labels={"cluster": "reserved"}, reserve_gpus=1)
    for req in ({"gpus": 2, "gpu_memory_mb": "20Gi"}, {"gpus": 3, "gpu_memory_mb": "4Gi"}, {"gpus": 3}):
        picks = {h: [g["index"] for g in alloc_any.would_fit(req, strategy=strategy, selector=f"cluster={h}")["gpus"]]
                 for h in ("plain", "reserved")}
        assert picks["plain"] == picks["reserved"], (req, picks)


def test_gpu_model_constraint_skips_other_models(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi", "gpu_model": "A100|V100M32"})
    assert where(x) == ("h1", [1])
    with pytest.raises(InsufficientResources, match="no registered host has a GPU of model H100"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi", "gpu_model": "H100"})
    alloc_any.drain_host("h1")  # the only A100 host: the walk finds no host with one free
    with pytest.raises(InsufficientResources, match="on the requested GPU models"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi", "gpu_model": "A100"})


def test_label_selector_limits_candidate_hosts(alloc_any):
    two_hosts(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi"}, selector="cluster=b")
    assert where(x) == ("h2", [0])
    with pytest.raises(InsufficientResources, match="no registered host has the label cluster=nowhere"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi"}, selector={"cluster": "nowhere"})
    alloc_any.drain_host("h2")  # the only host in cluster b: the walk finds none free
    with pytest.raises(InsufficientResources, match="among hosts matching the selector"):
        alloc_any.allocate({"gpu_memory_mb": "4Gi"}, selector="cluster=b")


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


def test_first_fit_for_cpu_only_work_walks_only_hosts_with_free_cpu_and_ram(alloc_any):
    # h1 and h2 are full (parked). With a scan cap of 2, a walk over every host in registration
    # order would stop on them and fall back to best fit (h4, the tightest fit); the walk over the
    # schedulable hosts reaches h3, the first in order that fits.
    for h, cores in (("h1", 2), ("h2", 2), ("h3", 8), ("h4", 4)):
        alloc_any.register_host(id=h, cpu_cores=cores, ram_mb="16Gi")
    for _ in range(2):
        alloc_any.allocate({"cpu_cores": 2}, strategy="first_fit")
    assert alloc_any.redis.zrange(alloc_any.keys.cpu_ord, 0, -1) == ["h3", "h4"]
    alloc_any.scan_cap = 2
    assert alloc_any.allocate({"cpu_cores": 2}, strategy="first_fit").host_id == "h3"


def test_cpu_order_index_holds_exactly_the_schedulable_hosts(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=2, ram_mb="8Gi")
    alloc_any.register_host(id="h2", cpu_cores=2, ram_mb="8Gi")

    def order() -> list[str]:
        return alloc_any.redis.zrange(alloc_any.keys.cpu_ord, 0, -1)

    assert order() == ["h1", "h2"]
    x = alloc_any.allocate({"cpu_cores": 2}, strategy="first_fit")  # h1's CPU is exhausted
    assert order() == ["h2"]
    alloc_any.release(x.allocation_id)
    assert order() == ["h1", "h2"]
    alloc_any.drain_host("h1")
    assert order() == ["h2"]
    alloc_any.resume_host("h1")
    assert order() == ["h1", "h2"]
    alloc_any.remove_host("h2")
    assert order() == ["h1"]
    assert invariants.check(alloc_any.snapshot()) == []


def test_first_fit_for_cpu_only_work_places_on_a_ledger_written_before_the_cpu_order_index(alloc_any):
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    alloc_any.redis.delete(alloc_any.keys.cpu_ord)  # as an older version left it
    x = alloc_any.allocate({"cpu_cores": 2}, strategy="first_fit")  # found through the CPU index
    assert x.host_id == "h1"
    alloc_any.release(x.allocation_id)
    assert alloc_any.redis.zrange(alloc_any.keys.cpu_ord, 0, -1) == []  # a release keeps membership
    alloc_any.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")  # as the upgrade procedure does
    assert alloc_any.redis.zrange(alloc_any.keys.cpu_ord, 0, -1) == ["h1"]
    assert invariants.check(alloc_any.snapshot()) == []


def one_gpu_hosts(a: Allocator, *sizes: str) -> None:
    """h1, h2, ... in registration order, one GPU of each size, 8 cores and 64Gi RAM each."""
    for i, mem in enumerate(sizes, 1):
        a.register_host(id=f"h{i}", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": mem}])


def test_first_fit_for_gpus_walks_only_gpus_with_at_least_half_the_request_free(alloc_any):
    # h1-h6 have 10Gi GPUs. With a scan cap of 5, a walk over every GPU in registration order
    # would stop on them and fall back to best fit (h8, the tightest fit). First fit reads the
    # first page of that order (h1-h4, none fits), then walks from the request's free-memory class
    # (16Gi and up for 30Gi), where h7 comes first: the 5th GPU it looks at.
    one_gpu_hosts(alloc_any, *["10Gi"] * 6, "80Gi", "40Gi")
    alloc_any.scan_cap = 5
    assert where(alloc_any.allocate({"gpu_memory_mb": "30Gi"}, strategy="first_fit")) == ("h7", [0])


def test_first_fit_goes_by_registration_order_across_free_memory_classes(alloc_any):
    one_gpu_hosts(alloc_any, "80Gi", "16Gi", "40Gi")  # h1's GPU is in a higher class than h2's
    assert alloc_any.allocate({"gpu_memory_mb": "8Gi"}, strategy="first_fit").host_id == "h1"
    assert alloc_any.allocate({"gpu_memory_mb": "8Gi"}, strategy="first_fit").host_id == "h1"  # 72Gi left
    assert alloc_any.allocate({"gpus": 1}, strategy="first_fit").host_id == "h2"  # h1's GPU has holders


def test_first_fit_for_whole_gpus_walks_only_gpus_with_no_holder(alloc_any):
    # h1-h6 each hold a 50Gi share on their one GPU; h7 has two idle GPUs, h8 one. With a scan cap
    # of 5, a walk over every GPU with free memory would stop on h1-h5 and fall back to best fit
    # (h8: the fewest idle GPUs); the walk over the GPUs with no holder starts at h7.
    one_gpu_hosts(alloc_any, *["80Gi"] * 6)
    alloc_any.register_host(id="h7", cpu_cores=8, ram_mb="64Gi", gpus=[
        {"index": 0, "model": "A100", "memory_mb": "80Gi"}, {"index": 1, "model": "A100", "memory_mb": "80Gi"}])
    alloc_any.register_host(id="h8", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "80Gi"}])
    for _ in range(6):
        alloc_any.allocate({"gpu_memory_mb": "50Gi"}, strategy="first_fit")
    assert alloc_any.redis.zrange(alloc_any.keys.gpu_idle_ord, 0, -1) == ["h7#0", "h7#1", "h8#0"]
    alloc_any.scan_cap = 5
    assert where(alloc_any.allocate({"gpus": 1}, strategy="first_fit")) == ("h7", [0])
    assert invariants.check(alloc_any.snapshot()) == []


def test_idle_gpu_order_index_holds_exactly_the_gpus_with_no_holder(alloc_any):
    one_gpu_hosts(alloc_any, "80Gi", "80Gi")

    def order() -> list[str]:
        return alloc_any.redis.zrange(alloc_any.keys.gpu_idle_ord, 0, -1)

    assert order() == ["h1#0", "h2#0"]
    x = alloc_any.allocate({"gpu_memory_mb": "10Gi"}, strategy="first_fit")
    assert order() == ["h2#0"]
    alloc_any.release(x.allocation_id)
    assert order() == ["h1#0", "h2#0"]
    alloc_any.drain_host("h2")
    assert order() == ["h1#0"]
    alloc_any.resume_host("h2")
    alloc_any.remove_host("h1")
    assert order() == ["h2#0"]
    assert invariants.check(alloc_any.snapshot()) == []


def test_first_fit_class_index_moves_a_gpu_between_free_memory_classes_as_it_is_granted_and_released(alloc_any):
    one_gpu_hosts(alloc_any, "80Gi")
    ord_ = int(alloc_any.redis.hget(alloc_any.keys.prefix + "host:h1", "ord"))

    def score() -> float | None:
        return alloc_any.redis.zscore(alloc_any.keys.gpu_ffc, "h1#0")

    assert score() == gpu_ffc_score(ord_, 0, 80 * GiB) == 7 * FF_SHIFT + ord_ * 1024  # 64Gi up to 128Gi
    x = alloc_any.allocate({"gpu_memory_mb": "20Gi"}, strategy="first_fit")
    assert score() == 6 * FF_SHIFT + ord_ * 1024  # 60Gi free: 32Gi up to 64Gi
    assert invariants.check(alloc_any.snapshot()) == []
    y = alloc_any.allocate({"gpu_memory_mb": "60Gi"}, strategy="first_fit")
    assert score() is None  # no free memory: out of the index
    alloc_any.release(y.allocation_id)
    alloc_any.release(x.allocation_id)
    assert score() == 7 * FF_SHIFT + ord_ * 1024
    alloc_any.remove_host("h1")
    assert alloc_any.redis.zcard(alloc_any.keys.gpu_ffc) == 0
    assert invariants.check(alloc_any.snapshot()) == []


def test_first_fit_for_gpus_places_on_a_ledger_written_before_the_class_index(alloc_any):
    one_gpu_hosts(alloc_any, "80Gi", "80Gi")
    alloc_any.redis.delete(alloc_any.keys.gpu_ffc)  # as an older version left it
    x = alloc_any.allocate({"gpu_memory_mb": "40Gi"}, strategy="first_fit")  # found through best fit's walk
    assert x.host_id in ("h1", "h2")
    for h in ("h1", "h2"):  # as the upgrade procedure does
        alloc_any.register_host(id=h, cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "80Gi"}])
    assert alloc_any.redis.zcard(alloc_any.keys.gpu_ffc) == 2
    assert invariants.check(alloc_any.snapshot()) == []


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


@pytest.mark.parametrize("strategy", ["first_fit", "best_fit", "worst_fit", "priority"])
@pytest.mark.parametrize("resources", [{"gpus": 1}, {"gpu_memory_mb": "1Gi"}])
def test_a_gpu_filled_by_other_processes_does_not_count_toward_the_critical_reserve(alloc_any, strategy, resources):
    # GPU 0 has no holder but no memory free either: GPU 1 is the one idle GPU, kept for critical work.
    alloc_any.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", reserve_gpus=1,
                            gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    with pytest.raises(InsufficientResources):
        alloc_any.allocate(resources, priority="normal", strategy=strategy)
    assert alloc_any.allocate(resources, priority="critical", strategy=strategy).gpus[0].index == 1


def test_best_fit_counts_the_cores_of_hosts_registered_without_a_core_count(alloc_any):
    # Hosts written before the host hash kept "ncores": the scan takes it from the core map.
    alloc_any.register_host(id="a-lean", cpu_cores=16, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(4)])
    alloc_any.register_host(id="b-wide", cpu_cores=64, ram_mb="64Gi",
                            gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(4)])
    for h in ("a-lean", "b-wide"):
        assert alloc_any.redis.hdel(alloc_any.keys.host(h), "ncores") == 1
        assert alloc_any.redis.delete(alloc_any.keys.host_summary(h)) == 1  # nor a scan summary
    assert alloc_any.allocate({"gpus": 1, "cpu_cores": 12}, strategy="best_fit").host_id == "b-wide"


@pytest.mark.parametrize("request_", [{"cpu_cores": 1, "ram_mb": "20Gi"}, {"gpus": 1, "gpu_memory_mb": "1Gi", "ram_mb": "20Gi"},
                                      {"gpus": 1, "cpu_cores": 6}])
def test_more_cpu_or_ram_than_any_host_has_free_is_refused_at_once_not_after_the_scan_cap(alloc_any, request_):
    # The walks go by GPU memory or free CPU, not by free RAM: without a look at the largest free
    # CPU and RAM first, such a request read every candidate up to the cap (12 ms of Redis time
    # on 5,000 hosts) and said "stopped after N candidates".
    for i in range(4):
        alloc_any.register_host(id=f"h{i}", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc_any.scan_cap = 2
    with pytest.raises(InsufficientResources) as exc:
        alloc_any.allocate(request_)
    assert exc.value.code in ("INSUFFICIENT_RAM", "INSUFFICIENT_CPU")
    assert "stopped after" not in exc.value.message and "scan_cap_reached" not in exc.value.details


def test_a_refusal_counts_the_hosts_that_take_no_new_work(alloc):
    # Every core of h1 is taken: its free GPU memory and RAM are in no index, and the refusal
    # says why the largest free figure is 0 while capacity shows memory free.
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.allocate({"cpu_cores": 4, "ram_mb": "1Gi"})
    with pytest.raises(InsufficientResources) as exc:
        alloc.allocate({"gpus": 1, "gpu_memory_mb": "1Gi"})
    assert exc.value.message == ("insufficient GPU memory: requested 1024 MiB per GPU, largest free 0 MiB; "
                                 "1 of 1 host(s) take no new work now (draining, lost, or no free core or RAM)")
    assert exc.value.details["hosts_taking_no_work"] == 1
