"""The invariants checker (allocator/invariants.py): it reports damage instead of raising, accepts the
legal states a re-registration can leave, and notices index entries that name nothing."""

from __future__ import annotations

import pytest

from allocator import invariants


def one_gpu_host(a, *, cores: int = 4, ram: str = "16Gi", gpu_mem: str = "16Gi", used: str = "0") -> None:
    a.register_host(id="h1", cpu_cores=cores, ram_mb=ram,
                    gpus=[{"index": 0, "uuid": "GPU-0", "model": "T4", "memory_mb": gpu_mem, "used_mb": used}])


def test_a_consistent_ledger_has_no_violations(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1.5, "ram_mb": "2Gi"}, ttl_seconds=60)
    assert invariants.check(alloc.snapshot()) == []


def test_an_active_allocation_whose_record_is_gone_is_reported_not_raised(alloc):
    one_gpu_host(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_memory_mb": "4Gi"})
    alloc.redis.delete(alloc.keys.alloc(x.allocation_id))
    bad = invariants.check(alloc.snapshot())
    assert f"{x.allocation_id}: in the active set but its record is gone or names no host" in bad


def test_a_host_hash_missing_its_counters_is_reported_not_raised(alloc):
    one_gpu_host(alloc)
    snap = alloc.snapshot()
    snap["hosts"]["h1"] = {}
    assert any(v.startswith("h1: unreadable host hash") for v in invariants.check(snap))


def test_a_record_with_unparsable_grants_is_reported_not_raised(alloc):
    one_gpu_host(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_memory_mb": "4Gi"})
    snap = alloc.snapshot()
    snap["allocs"][x.allocation_id]["gpus"] = "[{not json"
    assert any(v.startswith(f"{x.allocation_id}: unreadable record") for v in invariants.check(snap))


@pytest.mark.parametrize("field, value", [("expires", "soon"), ("cores", "[[0]]"), ("services", '[{"a": 1}]'),
                                          ("cores", "[null]")])
def test_a_record_with_a_damaged_field_is_reported_not_raised(alloc, field, value):
    one_gpu_host(alloc)
    x = alloc.allocate({"cpu_cores": 1})
    snap = alloc.snapshot()
    snap["allocs"][x.allocation_id][field] = value
    assert any(v.startswith(f"{x.allocation_id}: unreadable record") for v in invariants.check(snap))


@pytest.mark.parametrize("value", ["[1]", "null", "7"])
def test_a_service_instance_that_is_no_object_is_reported_not_raised(alloc, value):
    one_gpu_host(alloc)
    snap = alloc.snapshot()
    snap.setdefault("services", {})["h1"] = {"svcA": value}
    assert "h1: service svcA: unreadable instance " + value in invariants.check(snap)


def test_a_host_reregistered_below_what_it_grants_is_not_a_violation(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"gpus": 1, "gpu_memory_mb": "12Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    one_gpu_host(alloc, cores=2, ram="8Gi", gpu_mem="8Gi")
    assert alloc.redis.hget(alloc.keys.host("h1"), "overcommitted") == "1"
    assert invariants.check(alloc.snapshot()) == []


def test_more_gpu_memory_used_by_other_processes_after_a_grant_is_not_a_violation(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"gpus": 1, "gpu_memory_mb": "8Gi"})
    one_gpu_host(alloc, used="15Gi")  # the agent now sees another tenant's 15 GiB on the GPU
    assert invariants.check(alloc.snapshot()) == []


def test_a_shared_cpu_pool_left_without_cores_by_a_reregistration_is_not_a_violation(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"cpu_cores": 0.5})
    alloc.register_host(id="h1", cpu_cores=0, ram_mb="16Gi", gpus=[])
    assert invariants.check(alloc.snapshot()) == []


def test_a_reregistration_back_within_what_is_granted_clears_the_mark(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"cpu_cores": 4})
    one_gpu_host(alloc, cores=2)
    one_gpu_host(alloc, cores=4)
    assert alloc.redis.hget(alloc.keys.host("h1"), "overcommitted") is None


def test_oversubscription_on_a_host_that_was_not_shrunk_is_still_reported(alloc):
    one_gpu_host(alloc)
    alloc.allocate({"ram_mb": "8Gi"})
    snap = alloc.snapshot()
    snap["hosts"]["h1"]["ram"] = "4096"  # as if a grant had gone past the host's RAM
    assert "h1: RAM oversubscribed 8192 > 4096" in invariants.check(snap)


@pytest.mark.parametrize("index, member", [
    ("gpu_idx", "ghost#0"), ("gpu_ord", "ghost#0"), ("gpu_idle", "h1#7"), ("gpu_ffc", "h1#7"),
    ("gpu_idle_ord", "ghost#0"), ("cpu_idx", "ghost"), ("ram_idx", "ghost"), ("expiry", "alloc-gone"),
])
def test_an_index_entry_that_names_nothing_is_reported(alloc, index, member):
    one_gpu_host(alloc)
    alloc.redis.zadd(getattr(alloc.keys, index), {member: 1})
    bad = invariants.check(alloc.snapshot())
    assert any(member in v and v.startswith(index) for v in bad), bad


def test_one_allocation_holding_the_same_gpu_twice_is_reported(alloc):
    one_gpu_host(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_memory_mb": "2Gi"})
    snap = alloc.snapshot()
    rec = snap["allocs"][x.allocation_id]
    grant = rec["gpus"][1:-1]
    rec["gpus"] = f"[{grant},{grant}]"
    snap["hosts"]["h1"]["g0:used"] = str(4096)
    snap["hosts"]["h1"]["g0:n"] = "2"
    bad = invariants.check(snap)
    assert any(v.startswith(f"{x.allocation_id}: holds the same GPU more than once") for v in bad), bad
