"""Allocator.release_many: several allocations released in one script call, each on its own."""

import pytest
from rq import Queue

from allocator import Allocator, InvalidRequest
from allocator import batch
from allocator.errors import AllocationNotFound
from allocator.models import Allocation

from . import jobs
from .conftest import ledger_dump


def two_gpu_host(a, host_id: str = "h1") -> None:
    a.register_host(id=host_id, cpu_cores=8, ram_mb="64Gi",
                    gpus=[{"index": i, "model": "T4", "memory_mb": "16Gi"} for i in range(2)])


def share(gib: int, cores: int = 1) -> dict:
    return {"gpus": 1, "gpu_memory_mb": f"{gib}Gi", "cpu_cores": cores}


def test_each_id_is_released_as_release_would_release_it(alloc_any):
    two_gpu_host(alloc_any)
    held = [alloc_any.allocate(share(4, 2)).allocation_id for _ in range(3)]
    res = alloc_any.release_many(held)
    assert [(x.allocation_id, x.state, x.released_now) for x in res] == [(aid, "released", True) for aid in held]
    cap = alloc_any.capacity()
    assert (cap.gpu_memory_mb.allocated, cap.cpu_cores.allocated) == (0, 0)
    assert [alloc_any.get(aid).state for aid in held] == ["released"] * 3


def test_an_unknown_id_gets_not_found_and_the_others_are_still_released(alloc_any):
    two_gpu_host(alloc_any)
    first, last = (alloc_any.allocate(share(4)).allocation_id for _ in range(2))
    res = alloc_any.release_many([first, "alloc-nothing-here", last])
    assert isinstance(res[1], AllocationNotFound) and "alloc-nothing-here" in res[1].message
    assert (res[0].released_now, res[2].released_now) == (True, True)
    assert alloc_any.capacity().gpu_memory_mb.allocated == 0


def test_an_id_given_twice_is_released_once(alloc):
    two_gpu_host(alloc)
    aid = alloc.allocate(share(4)).allocation_id
    once, again = alloc.release_many([aid, aid])
    assert (once.released_now, again.released_now) == (True, False)
    assert again.state == "released"


def test_an_allocation_ended_already_keeps_its_end(alloc):
    two_gpu_host(alloc)
    aid = alloc.allocate(share(4)).allocation_id
    alloc.release(aid, reason="failed")
    [x] = alloc.release_many([aid])
    assert (x.state, x.release_reason, x.released_now) == ("failed", "failed", False)


def test_the_reason_is_recorded_on_each(alloc):
    two_gpu_host(alloc)
    held = [alloc.allocate(share(4)).allocation_id for _ in range(2)]
    assert [x.state for x in alloc.release_many(held, reason="failed")] == ["failed", "failed"]
    assert alloc.get(held[0]).release_reason == "failed"


def test_a_queued_allocation_is_withdrawn_from_the_line(alloc):
    two_gpu_host(alloc)
    alloc.allocate({"gpus": 2})
    waiting = alloc.allocate({"gpus": 1}, on_busy="queue")
    [x] = alloc.release_many([waiting.allocation_id])
    assert x.state == "cancelled"
    assert alloc.redis.zcard(alloc.keys.pending) == 0


def test_a_queued_allocation_leaves_the_line_before_what_the_others_free_could_place_it(alloc):
    two_gpu_host(alloc)
    held = alloc.allocate({"gpus": 2}).allocation_id
    waiting = alloc.allocate({"gpus": 1}, on_busy="queue").allocation_id
    withdrawn, released = alloc.release_many([waiting, held])
    assert (withdrawn.state, withdrawn.activated_at, withdrawn.released_now) == ("cancelled", None, True)
    assert released.state == "released"
    assert alloc.capacity().gpus_idle == 2


def test_a_queued_allocation_withdrawn_in_a_batch_preempts_nobody(alloc):
    two_gpu_host(alloc)
    mine = alloc.allocate({"gpus": 1}, priority="high").allocation_id
    other = alloc.allocate({"gpus": 1}, priority="low").allocation_id
    waiting = alloc.allocate({"gpus": 2}, priority="high", strategy="priority", on_busy="queue").allocation_id
    alloc.release_many([waiting, mine])
    assert alloc.get(other).state == "active"
    assert alloc.get(waiting).state == "cancelled"


@pytest.mark.parametrize("budget_ms", [batch.BUDGET_MS, 0])
def test_a_queued_allocation_sent_after_what_frees_its_room_is_still_withdrawn_first(alloc, monkeypatch, budget_ms):
    # One id per call: the call that releases `mine` must not place `waiting`, which comes later.
    monkeypatch.setattr(batch, "BUDGET_MS", budget_ms)
    two_gpu_host(alloc)
    mine = alloc.allocate({"gpus": 1}, priority="high").allocation_id
    other = alloc.allocate({"gpus": 1}, priority="low").allocation_id
    waiting = alloc.allocate({"gpus": 2}, priority="high", strategy="priority", on_busy="queue").allocation_id
    res = alloc.release_many([mine, waiting], chunk_size=1)
    assert [(x.allocation_id, x.state) for x in res] == [(mine, "released"), (waiting, "cancelled")]
    assert alloc.get(other).state == "active"


def test_a_queued_function_task_leaves_the_line_and_its_job_is_cancelled(alloc):
    two_gpu_host(alloc)
    held = alloc.allocate({"gpus": 2}).allocation_id
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    assert task.state == "pending"
    withdrawn, _ = alloc.release_many([task.id, held])
    assert (withdrawn.state, withdrawn.activated_at) == ("cancelled", None)
    assert task.job.get_status() == "canceled"


def test_a_placed_function_task_leaves_its_host_queue_and_is_cancelled(alloc):
    two_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    host_queue = Queue(task.job.origin, connection=alloc.rq_connection)
    assert (alloc.get(task.id).state, host_queue.count) == ("active", 1)
    [x] = alloc.release_many([task.id])
    assert x.state == "released"
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "cancelled"
    assert host_queue.count == 0


def test_what_the_releases_free_goes_to_the_tasks_in_line(alloc):
    two_gpu_host(alloc)
    held = [alloc.allocate({"gpus": 1}).allocation_id for _ in range(2)]
    waiting = [alloc.allocate({"gpus": 1}, on_busy="queue").allocation_id for _ in range(2)]
    alloc.release_many(held)
    assert [alloc.get(aid).state for aid in waiting] == ["active", "active"]


def test_the_line_moves_as_far_as_releasing_one_by_one_would_move_it(redis_url, clock):
    # One pass looks at pass_depth tasks; the call runs another after each that placed one.
    a = Allocator(redis_url, namespace=f"test-rm-{id(clock)}", clock=clock, pass_depth=1)
    try:
        two_gpu_host(a)
        held = [a.allocate({"gpus": 1}).allocation_id for _ in range(2)]
        waiting = [a.allocate({"gpus": 1}, on_busy="queue").allocation_id for _ in range(2)]
        a.release_many(held)
        assert [a.get(aid).state for aid in waiting] == ["active", "active"]
    finally:
        a.destroy()
        a.redis.close()


def test_a_pass_that_only_dropped_a_task_whose_job_is_gone_is_followed_by_another(redis_url, clock):
    a = Allocator(redis_url, namespace=f"test-rm-gone-{id(clock)}", clock=clock, pass_depth=1)
    try:
        two_gpu_host(a)
        held = [a.allocate({"gpus": 1}).allocation_id for _ in range(2)]
        gone = a.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
        behind = a.enqueue(jobs.add, 3, 4, resources={"gpus": 1})
        gone.job.delete()  # its RQ job deleted (or expired) while it waited: no worker would run it
        a.release_many(held)
        assert (a.get(gone.id).state, a.get(gone.id).release_reason) == ("cancelled", "job_gone")
        assert a.get(behind.id).state == "active"
    finally:
        a.destroy()
        a.redis.close()


def test_nothing_is_released_when_an_id_is_malformed_and_the_error_names_its_index(alloc):
    two_gpu_host(alloc)
    aid = alloc.allocate(share(4)).allocation_id
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.release_many([aid, ""])
    assert exc.value.field == "allocation_ids.1"
    with pytest.raises(InvalidRequest) as exc:
        alloc.release_many([aid, 7])
    assert exc.value.field == "allocation_ids.1"
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("ids", [None, "alloc-1", b"alloc-1", {"alloc-1": 1}, 5])
def test_the_ids_must_be_a_list(alloc, ids):
    with pytest.raises(InvalidRequest) as exc:
        alloc.release_many(ids)
    assert exc.value.field == "allocation_ids"


@pytest.mark.parametrize("chunk_size", [0, 257, True, 2.0, "8"])
def test_chunk_size_must_be_a_whole_number_from_1_to_256(alloc, chunk_size):
    with pytest.raises(InvalidRequest) as exc:
        alloc.release_many(["alloc-1"], chunk_size=chunk_size)
    assert exc.value.field == "chunk_size"


def test_a_bad_reason_releases_nothing(alloc):
    two_gpu_host(alloc)
    aid = alloc.allocate(share(4)).allocation_id
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.release_many([aid], reason="")
    assert exc.value.field == "reason"
    assert ledger_dump(alloc) == before


def test_no_ids_release_nothing(alloc):
    assert alloc.release_many([]) == []


def test_ids_are_sent_chunk_size_per_call_and_a_call_out_of_time_leaves_the_rest_to_the_next(alloc, monkeypatch):
    two_gpu_host(alloc)
    held = [alloc.allocate(share(2)).allocation_id for _ in range(5)]
    calls = []
    real = alloc._call

    def counting(name, *args, **kw):
        if name == "release_many":
            calls.append(len(args) - 4)  # budget, reason, depth, cap, then the ids
        return real(name, *args, **kw)

    monkeypatch.setattr(alloc, "_call", counting)
    assert all(isinstance(x, Allocation) and x.released_now for x in alloc.release_many(held[:3], chunk_size=2))
    assert calls == [2, 1]
    calls.clear()
    monkeypatch.setattr(batch, "BUDGET_MS", 0)  # every call stops after its first release
    assert all(x.released_now for x in alloc.release_many(held[3:], chunk_size=8))
    assert calls == [2, 1]
    assert alloc.capacity().gpu_memory_mb.allocated == 0


def test_a_batch_of_releases_leaves_the_ledger_as_releases_one_by_one(alloc):
    two_gpu_host(alloc, "h1")
    two_gpu_host(alloc, "h2")
    held = [alloc.allocate(share(gib, cores)).allocation_id for gib, cores in ((4, 2), (10, 1), (3, 3), (6, 1))]
    alloc.release_many(held[:2])
    after_batch = alloc.capacity().model_dump()
    for aid in held[2:]:
        alloc.release(aid)
    held = [alloc.allocate(share(gib, cores)).allocation_id for gib, cores in ((4, 2), (10, 1), (3, 3), (6, 1))]
    for aid in held[:2]:
        alloc.release(aid)
    after_one_by_one = alloc.capacity().model_dump()
    assert after_batch == after_one_by_one
