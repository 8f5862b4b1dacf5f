"""The scan summary: the packed copy of a host's scheduling fields that placement reads."""

import pytest

from allocator import Allocator, InsufficientResources
from allocator.invariants import check


def one_gpu_host(a: Allocator, host_id: str) -> None:
    a.register_host(id=host_id, cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])


def test_every_registered_host_has_a_summary_in_step_with_its_fields(alloc_any):
    one_gpu_host(alloc_any, "h1")
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1, "ram_mb": "1Gi"})
    assert alloc_any.redis.exists(alloc_any.keys.host_summary("h1")) == 1
    assert check(alloc_any.snapshot()) == []
    alloc_any.release(x.allocation_id)
    assert check(alloc_any.snapshot()) == []


def test_a_host_without_a_summary_is_placed_from_its_hash_and_gets_one_at_its_next_change(alloc_any):
    # A ledger written before summaries existed: placement falls back to the host hash.
    one_gpu_host(alloc_any, "h1")
    alloc_any.redis.delete(alloc_any.keys.host_summary("h1"))
    assert check(alloc_any.snapshot()) == []  # valid as it is: placement reads the hash
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1})
    assert (x.host_id, [g.index for g in x.gpus], x.cpu_cores) == ("h1", [0], [0])
    assert alloc_any.redis.exists(alloc_any.keys.host_summary("h1")) == 1
    assert check(alloc_any.snapshot()) == []


def test_the_invariant_check_reports_a_summary_out_of_step_with_its_host(alloc_any):
    one_gpu_host(alloc_any, "h1")
    key = alloc_any.keys.host_summary("h1")
    before = alloc_any.redis.dump(key)  # binary: DUMP and RESTORE carry it undecoded
    alloc_any.allocate({"gpu_memory_mb": "4Gi"})
    alloc_any.redis.restore(key, 0, before, replace=True)  # the copy from before the grant
    assert [v for v in check(alloc_any.snapshot()) if "scan summary" in v] != []


def test_removing_a_host_deletes_its_summary(alloc_any):
    one_gpu_host(alloc_any, "h1")
    alloc_any.remove_host("h1")
    assert alloc_any.redis.exists(alloc_any.keys.host_summary("h1")) == 0


def test_a_summary_whose_host_hash_is_gone_names_no_host(alloc_any):
    one_gpu_host(alloc_any, "h1")
    alloc_any.redis.delete(alloc_any.keys.host("h1"))  # a lost key; summary and indexes remain
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": "0.5"})
    assert alloc_any.redis.exists(alloc_any.keys.host("h1")) == 0


def test_a_placement_passes_over_a_summary_whose_host_hash_is_gone_to_a_real_host(alloc_any):
    # The best-fit walk reaches the lost host first (its GPU is the tighter fit) and must go on.
    alloc_any.register_host(id="lost", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "8Gi"}])
    alloc_any.register_host(id="real", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc_any.redis.delete(alloc_any.keys.host("lost"))
    x = alloc_any.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1})
    assert (x.host_id, [g.index for g in x.gpus], x.cpu_cores) == ("real", [0], [0])
    assert alloc_any.redis.exists(alloc_any.keys.host("lost")) == 0
