"""Allocator.allocate_many: several direct requests in one script call, each placed on its own."""

import pytest

from allocator import InsufficientResources, InvalidRequest
from allocator.errors import Recovering
from allocator.models import Allocation

from . import jobs
from .conftest import ledger_dump


def two_gpu_host(a, host_id: str = "h1") -> None:
    a.register_host(id=host_id, cpu_cores=8, ram_mb="64Gi",
                    gpus=[{"index": i, "model": "T4", "memory_mb": "16Gi"} for i in range(2)])


def share(gib: int, cores: int = 1) -> dict:
    return {"resources": {"gpus": 1, "gpu_memory_mb": f"{gib}Gi", "cpu_cores": cores}}


def test_each_request_gets_what_allocate_would_give_it_after_the_ones_before(alloc_any):
    two_gpu_host(alloc_any)
    res = alloc_any.allocate_many([share(12, 2), share(12, 2), share(8), {"resources": {"cpu_cores": 1}}])
    first, second, third, fourth = res
    assert (first.host_id, [g.index for g in first.gpus], first.cpu_cores) == ("h1", [0], [0, 1])
    assert (second.host_id, [g.index for g in second.gpus], second.cpu_cores) == ("h1", [1], [2, 3])
    assert isinstance(third, InsufficientResources)
    assert "requested 8192 MiB per GPU, largest free 4096 MiB" in third.message
    assert isinstance(fourth, Allocation) and fourth.cpu_cores == [4]
    assert alloc_any.capacity().gpu_memory_mb.allocated == 24 * 1024


def test_a_batch_places_as_the_same_requests_allocated_one_by_one(alloc_any):
    two_gpu_host(alloc_any, "h1")
    two_gpu_host(alloc_any, "h2")
    requests = [share(4), share(10, 2), share(6), share(3, 4), {"resources": {"cpu_cores": 2, "ram_mb": "8Gi"}}]
    batched = alloc_any.allocate_many(requests, chunk_size=2)  # three script calls
    placed = [(x.host_id, [(g.index, g.memory_mb) for g in x.gpus], x.cpu_cores, x.ram_mb) for x in batched]
    for x in batched:
        alloc_any.release(x.allocation_id)
    one_by_one = []
    for r in requests:
        x = alloc_any.allocate(**r)
        one_by_one.append((x.host_id, [(g.index, g.memory_mb) for g in x.gpus], x.cpu_cores, x.ram_mb))
    assert placed == one_by_one


def test_an_allocation_of_a_batch_carries_its_request_and_metadata(alloc):
    two_gpu_host(alloc)
    [x] = alloc.allocate_many([{**share(4), "priority": "high", "task_type": "sweep", "metadata": {"trial": 7}}])
    assert x.priority == "high" and x.task_type == "sweep" and x.metadata == {"trial": 7}
    assert x.request["resources"]["gpu_memory_mb"] == 4096
    assert x.allocation_time_ms is not None and x.allocation_time_ms > 0
    assert alloc.get(x.allocation_id).metadata == {"trial": 7}


def test_an_invalid_request_places_nothing_and_names_its_index_and_field(alloc_any):
    two_gpu_host(alloc_any)
    before = ledger_dump(alloc_any)
    with pytest.raises(InvalidRequest) as exc:
        alloc_any.allocate_many([share(4), {"resources": {"gpus": -1}}])
    assert exc.value.field == "requests.1.resources.gpus"
    assert ledger_dump(alloc_any) == before


@pytest.mark.parametrize("item, field", [
    ("gpus=1", "requests.0"),
    ({"resources": {"cpu_cores": 1}, "colour": "red"}, "requests.0.colour"),
    ({"resources": {"cpu_cores": 1}, "on_busy": "queue"}, "requests.0.on_busy"),
    ({1: "x"}, "requests.0"),
    ({"resources": {"cpu_cores": 1}, "self": 1}, "requests.0.self"),
])
def test_an_entry_that_is_no_request_is_refused_naming_it(alloc, item, field):
    two_gpu_host(alloc)
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate_many([item])
    assert exc.value.field == field
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("requests", ["abc", {"resources": {}}, 5])
def test_requests_that_are_no_list_are_refused(alloc, requests):
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate_many(requests)
    assert exc.value.field == "requests"


@pytest.mark.parametrize("chunk_size", [0, -1, 257, 1.5, True, "8"])
def test_a_chunk_size_out_of_range_is_refused(alloc, chunk_size):
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate_many([{"resources": {"cpu_cores": 1}}], chunk_size=chunk_size)
    assert exc.value.field == "chunk_size"


def test_a_call_that_used_up_its_time_budget_leaves_the_rest_to_the_next_call(alloc, monkeypatch):
    from allocator import batch

    two_gpu_host(alloc)
    monkeypatch.setattr(batch, "BUDGET_MS", 0)  # every call stops after its first request
    calls = []
    res = batch.allocate_many(alloc, [share(4), share(30), {"resources": {"cpu_cores": 1}}],
                              progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert isinstance(res[0], Allocation) and isinstance(res[1], InsufficientResources)
    assert isinstance(res[2], Allocation) and res[2].cpu_cores == [1]


def test_no_requests_place_nothing(alloc):
    assert alloc.allocate_many([]) == []


def test_a_repeated_id_within_a_batch_returns_the_first_grant(alloc_any):
    two_gpu_host(alloc_any)
    first, again = alloc_any.allocate_many([{**share(4), "allocation_id": "sweep-1"},
                                            {**share(4), "allocation_id": "sweep-1"}])
    assert first.allocation_id == again.allocation_id == "sweep-1"
    assert first.gpus == again.gpus
    assert alloc_any.capacity().gpu_memory_mb.allocated == 4096


def test_a_batch_repeated_after_an_unknown_outcome_places_nothing_twice(alloc):
    two_gpu_host(alloc)
    requests = [{**share(4), "allocation_id": f"sweep-{i}"} for i in range(3)]
    first = alloc.allocate_many(requests)
    again = alloc.allocate_many(requests)
    assert [x.allocation_id for x in again] == [x.allocation_id for x in first]
    assert [x.gpus for x in again] == [x.gpus for x in first]
    assert alloc.capacity().gpu_memory_mb.allocated == 3 * 4096


def test_the_id_of_a_task_in_a_batch_is_an_error_in_its_entry_and_the_others_are_placed(alloc):
    two_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_id="job-7")
    res = alloc.allocate_many([{**share(4), "allocation_id": task.id}, share(4)])
    assert isinstance(res[0], InvalidRequest) and res[0].field == "requests.0.allocation_id"
    assert isinstance(res[1], Allocation) and res[1].state == "active"


def test_a_batch_while_the_ledger_is_recovering_places_nothing_and_every_entry_says_why(alloc):
    two_gpu_host(alloc)
    alloc.redis.hset(alloc.keys.seq, "recovering", "1")
    before = ledger_dump(alloc)
    res = alloc.allocate_many([share(4), share(4), share(4)], chunk_size=2)
    assert len(res) == 3 and all(isinstance(x, Recovering) for x in res)
    assert ledger_dump(alloc) == before


def test_a_repeat_in_a_batch_while_the_ledger_is_recovering_gets_its_allocation_as_allocate_would(alloc):
    two_gpu_host(alloc)
    held = alloc.allocate(**share(4), allocation_id="sweep-1")
    alloc.redis.hset(alloc.keys.seq, "recovering", "1")
    new, repeat = alloc.allocate_many([share(4), {**share(4), "allocation_id": "sweep-1"}])
    assert isinstance(new, Recovering)
    assert isinstance(repeat, Allocation) and repeat.gpus == held.gpus


def test_an_allocation_request_whose_resources_were_replaced_by_a_mapping_is_validated(alloc):
    two_gpu_host(alloc)
    template = alloc.build_request({"cpu_cores": 1})
    [x] = alloc.allocate_many([template.model_copy(update={"resources": {"cpu_cores": 2}})])
    assert x.cpu_cores == [0, 1]
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate_many([template.model_copy(update={"resources": {"cpu_cores": -2}})])
    assert exc.value.field == "requests.0.resources.cpu_cores"


def test_on_busy_fail_is_what_a_batch_does_and_is_accepted(alloc):
    two_gpu_host(alloc)
    [x] = alloc.allocate_many([{"resources": {"cpu_cores": 1}, "on_busy": "fail"}])
    assert x.state == "active"


def test_a_changed_allocation_request_is_validated_again_and_nothing_is_placed(alloc):
    two_gpu_host(alloc)
    template = alloc.build_request({"cpu_cores": 1, "ram_mb": "1Gi"})
    bad = template.model_copy(update={"resources": template.resources.model_copy(update={"ram_mb": -1000})})
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate_many([template.model_copy(update={"allocation_id": f"s-{i}"}) for i in range(40)] + [bad])
    assert exc.value.field == "requests.40.resources.ram_mb"
    assert ledger_dump(alloc) == before


def test_allocation_requests_built_from_one_template_are_placed(alloc):
    two_gpu_host(alloc)
    template = alloc.build_request({"cpu_cores": 1})
    res = alloc.allocate_many([template.model_copy(update={"allocation_id": f"s-{i}"}) for i in range(3)])
    assert [(x.allocation_id, x.cpu_cores) for x in res] == [("s-0", [0]), ("s-1", [1]), ("s-2", [2])]


def test_a_batch_appends_one_allocated_event_per_placement_and_none_for_a_refusal(alloc):
    two_gpu_host(alloc)
    start = alloc.redis.xrevrange(alloc.keys.events, count=1)[0][0]
    placed = [x for x in alloc.allocate_many([share(16), share(16), share(16)]) if isinstance(x, Allocation)]
    events = alloc.redis.xrange(alloc.keys.events, min=f"({start}")
    assert [(e["type"], e["id"]) for _, e in events] == [("allocated", x.allocation_id) for x in placed]
    assert len(placed) == 2


def test_each_request_of_a_batch_reaps_expired_leases_as_its_own_allocate_would(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi")
    for _ in range(16):
        alloc.allocate({"cpu_cores": "0.5"}, ttl_seconds=10)
    clock.advance(11)  # all 16 expired; a placement reaps at most 8 of them
    res = alloc.allocate_many([{"resources": {"cpu_cores": 1}}] * 8)
    assert [x.cpu_cores for x in res] == [[i] for i in range(8)]


def test_a_batch_reaps_an_expired_lease_before_placing(alloc, clock):
    two_gpu_host(alloc)
    old = alloc.allocate({"gpus": 2}, ttl_seconds=10)
    clock.advance(11)
    [x] = alloc.allocate_many([share(16)])
    assert isinstance(x, Allocation)
    assert alloc.get(old.allocation_id).release_reason == "expired"
