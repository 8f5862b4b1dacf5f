"""Allocate, release, expire: idempotency, TTLs on an injected clock, records and events."""

import json

import pytest

from allocator import AllocationNotFound, InsufficientResources, InvalidRequest
from allocator.errors import Recovering

from .conftest import ledger_dump


def one_gpu_host(a) -> None:
    a.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "model": "T4", "memory_mb": "16Gi"}])


def test_release_gives_everything_back(alloc_any):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "16Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    r = alloc_any.release(x.allocation_id)
    assert r.state == "released" and r.release_reason == "released" and r.released_at is not None
    again = alloc_any.allocate({"gpu_memory_mb": "16Gi", "cpu_cores": 4, "ram_mb": "16Gi"})
    assert again.cpu_cores == [0, 1, 2, 3]


def test_release_twice_is_one_release(alloc_any):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "8Gi", "cpu_cores": 2})
    alloc_any.release(x.allocation_id)
    before = ledger_dump(alloc_any)
    second = alloc_any.release(x.allocation_id)
    assert second.state == "released"
    assert ledger_dump(alloc_any) == before


def test_release_of_unknown_allocation_is_not_found(alloc_any):
    with pytest.raises(AllocationNotFound, match="allocation nope not found"):
        alloc_any.release("nope")


def test_allocate_with_the_same_id_returns_the_first_grant(alloc_any):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "8Gi"}, allocation_id="job-42")
    y = alloc_any.allocate({"gpu_memory_mb": "8Gi"}, allocation_id="job-42")
    assert x.allocation_id == y.allocation_id == "job-42"
    assert alloc_any.capacity().gpu_memory_mb.allocated == 8192


def test_ttl_expiry_follows_the_injected_clock(alloc_any, clock):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "8Gi"}, ttl_seconds=60)
    clock.advance(59)
    assert alloc_any.expire() == []
    clock.advance(2)
    assert alloc_any.expire() == [x.allocation_id]
    rec = alloc_any.get(x.allocation_id)
    assert (rec.state, rec.release_reason) == ("released", "expired")
    assert alloc_any.capacity().gpu_memory_mb.allocated == 0


def test_allocation_without_ttl_never_expires(alloc_any, clock):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "8Gi"}, ttl_seconds=None)
    clock.advance(10 * 365 * 86400)
    assert alloc_any.expire() == []
    assert alloc_any.get(x.allocation_id).state == "active"


def test_placing_reaps_expired_leases_first(alloc_any, clock):
    one_gpu_host(alloc_any)
    old = alloc_any.allocate({"gpu_memory_mb": "16Gi"}, ttl_seconds=30)
    clock.advance(31)
    new = alloc_any.allocate({"gpu_memory_mb": "16Gi"})
    assert new.host_id == "h1"
    assert alloc_any.get(old.allocation_id).release_reason == "expired"


def test_finished_records_are_purged_after_retention(alloc_any, clock):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "1Gi"})
    alloc_any.release(x.allocation_id)
    clock.advance(alloc_any.record_retention_s - 1)
    alloc_any.expire()
    assert alloc_any.get(x.allocation_id) is not None
    clock.advance(2)
    alloc_any.expire()
    assert alloc_any.get(x.allocation_id) is None


def test_refused_or_invalid_request_leaves_the_ledger_byte_for_byte_unchanged(alloc_any):
    one_gpu_host(alloc_any)
    alloc_any.allocate({"gpu_memory_mb": "8Gi", "cpu_cores": 1})
    before = ledger_dump(alloc_any)
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"gpu_memory_mb": "12Gi"})
    with pytest.raises(InsufficientResources):
        alloc_any.allocate({"cpu_cores": 4})
    with pytest.raises(InvalidRequest):
        alloc_any.allocate({"gpu_memory_mb": "twelve"})
    assert alloc_any.would_fit({"gpu_memory_mb": "8Gi"}) is not None
    assert ledger_dump(alloc_any) == before


def test_a_refusal_still_releases_leases_past_their_ttl(alloc, clock):
    """The one write a refused place makes: its reap of expired leases (which the refusal then
    counts as free), as expire() would have made them."""
    one_gpu_host(alloc)
    lease = alloc.allocate({"cpu_cores": 1}, ttl_seconds=10)
    clock.advance(20)
    with pytest.raises(InsufficientResources):
        alloc.allocate({"cpu_cores": 1000})
    rec = alloc.get(lease.allocation_id)
    assert (rec.state, rec.release_reason) == ("released", "expired")
    assert alloc.expire() == []


def test_would_fit_with_the_id_of_an_existing_allocation_answers_where_it_would_go(alloc):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="8Gi")
    alloc.allocate({"cpu_cores": 1}, allocation_id="x")
    assert alloc.would_fit({"cpu_cores": 1}, allocation_id="x")["host_id"] == "h1"


def test_grant_records_request_and_metadata(alloc_any, clock):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "2Gi", "cpu_cores": 2, "ram_mb": "4Gi"}, priority="high",
                           task_id="task_123", task_type="ml_inference", owner="team-a", metadata={"run": 7})
    rec = alloc_any.get(x.allocation_id)
    assert (rec.task_id, rec.task_type, rec.owner, rec.priority) == ("task_123", "ml_inference", "team-a", "high")
    assert rec.metadata == {"run": 7}
    assert rec.request["resources"]["ram_mb"] == 4096
    assert rec.created_at.timestamp() == clock.now
    assert rec.expires_at.timestamp() == clock.now + 3600
    assert x.allocation_time_ms is not None and x.allocation_time_ms > 0


def test_list_filters_by_state_task_and_host(alloc_any):
    one_gpu_host(alloc_any)
    alloc_any.register_host(id="h2", cpu_cores=4, ram_mb="16Gi")
    a = alloc_any.allocate({"gpu_memory_mb": "1Gi"}, task_id="t1")
    b = alloc_any.allocate({"cpu_cores": 1}, task_id="t2", selector={"cluster": "default"}, strategy="worst_fit")
    alloc_any.release(a.allocation_id)
    assert [x.allocation_id for x in alloc_any.list(state="active")] == [b.allocation_id]
    assert [x.allocation_id for x in alloc_any.list(state="released")] == [a.allocation_id]
    assert [x.allocation_id for x in alloc_any.list(task_id="t1")] == [a.allocation_id]
    assert [x.host_id for x in alloc_any.list(host_id=b.host_id)] == [b.host_id]


def test_list_with_a_limit_keeps_the_newest_of_a_host(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=16, ram_mb="16Gi")
    made = []
    for i in range(12):
        made.append(alloc.allocate({"cpu_cores": 1}, allocation_id=f"x{i:02d}").allocation_id)
        clock.advance(1)
    newest = [x.allocation_id for x in alloc.list(state="active", host_id="h1", limit=3)]
    assert newest == made[::-1][:3]


def test_every_change_appends_an_outbox_event(alloc_any):
    one_gpu_host(alloc_any)
    x = alloc_any.allocate({"gpu_memory_mb": "1Gi"})
    alloc_any.release(x.allocation_id)
    alloc_any.release(x.allocation_id)  # no change, no event
    events = alloc_any.redis.xrange(alloc_any.keys.events)
    assert [(e["type"], e["id"]) for _, e in events] == [
        ("host_registered", "h1"), ("allocated", x.allocation_id), ("released", x.allocation_id)]
    assert json.loads(events[-1][1]["data"])["reason"] == "released"


def test_no_placement_while_the_ledger_is_recovering(alloc_any):
    one_gpu_host(alloc_any)
    alloc_any.redis.hset(alloc_any.keys.seq, "recovering", "1")
    with pytest.raises(Recovering):
        alloc_any.allocate({"gpu_memory_mb": "1Gi"})


@pytest.mark.parametrize("batch", [0, -1, 1.5, True])
def test_expire_with_a_batch_below_one_is_refused_not_run_for_ever(alloc, batch):
    with pytest.raises(InvalidRequest) as exc:
        alloc.expire(batch=batch)
    assert exc.value.field == "batch"


def test_a_negative_list_limit_is_refused_naming_it(alloc):
    with pytest.raises(InvalidRequest) as exc:
        alloc.list(limit=-1)
    assert exc.value.field == "limit"


@pytest.mark.parametrize("ttl, ms", [(257.083, 257083), (0.0005, 1), (1.0001, 1001)])
def test_a_ttl_in_seconds_becomes_whole_milliseconds_rounded_up_but_not_by_float_error(alloc, ttl, ms):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    x = alloc.allocate({"cpu_cores": 1}, ttl_seconds=ttl)
    assert int(alloc.redis.hget(alloc.keys.alloc(x.allocation_id), "ttl_ms")) == ms
