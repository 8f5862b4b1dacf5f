"""The queue: one priority order for all tasks, positions, waiting, EASY backfill, preemption, cancel."""

import pytest

from allocator import InsufficientResources, InvalidRequest

from .conftest import _namespace, ledger_dump

WHOLE = {"gpus": 1, "cpu_cores": 1}


def one_gpu_host(a, host_id="h1"):
    a.register_host(id=host_id, cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])


def queued(a, priority="normal", resources=WHOLE, **kw):
    return a.allocate(resources, on_busy="queue", priority=priority, **kw)


def test_a_request_that_fits_is_placed_at_once(alloc):
    one_gpu_host(alloc)
    x = queued(alloc)
    assert (x.state, x.host_id, x.queue_position) == ("active", "h1", 0)


def test_waiting_tasks_are_ordered_by_priority_then_arrival(alloc):
    one_gpu_host(alloc)
    holder = alloc.allocate(WHOLE)
    low = queued(alloc, "low")
    n1 = queued(alloc, "normal")
    n2 = queued(alloc, "normal")
    high = queued(alloc, "high")
    crit = queued(alloc, 3)
    assert [alloc.position(x.allocation_id) for x in (crit, high, n1, n2, low)] == [1, 2, 3, 4, 5]
    assert low.state == "pending" and low.host_id is None


def test_positions_move_up_as_tasks_ahead_start(alloc):
    one_gpu_host(alloc)
    holder = alloc.allocate(WHOLE)
    first, second, third = queued(alloc), queued(alloc), queued(alloc)
    alloc.release(holder.allocation_id)
    assert alloc.get(first.allocation_id).state == "active"
    assert [alloc.position(x.allocation_id) for x in (first, second, third)] == [0, 1, 2]
    alloc.release(first.allocation_id)
    assert [alloc.position(x.allocation_id) for x in (second, third)] == [0, 1]


def test_a_waiting_task_starts_when_resources_free(alloc):
    one_gpu_host(alloc)
    holder = alloc.allocate({"gpu_memory_mb": "12Gi"})
    waiting = queued(alloc, resources={"gpu_memory_mb": "8Gi"})
    assert waiting.state == "pending"
    released = alloc.release(holder.allocation_id)
    assert released.state == "released"
    placed = alloc.get(waiting.allocation_id)
    assert (placed.state, placed.host_id, placed.gpus[0].memory_mb) == ("active", "h1", 8192)


def test_waiting_tasks_start_when_a_host_joins(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    waiting = queued(alloc)
    one_gpu_host(alloc, "h2")
    assert alloc.get(waiting.allocation_id).host_id == "h2"


@pytest.mark.parametrize("reaping_call", ["scheduler tick", "direct allocation"])
def test_expired_lease_frees_room_for_the_queue(alloc, clock, reaping_call):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE, ttl_seconds=60)
    waiting = queued(alloc)
    clock.advance(61)
    if reaping_call == "scheduler tick":
        alloc.schedule()
    else:
        alloc.allocate({"cpu_cores": 1})  # reaps the expired lease on its way, then runs a pass
    assert alloc.get(waiting.allocation_id).state == "active"


def two_gpu_host_with_two_small_tasks(a):
    a.register_host(id="h1", cpu_cores=8, ram_mb="64Gi",
                    gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    small_a = a.allocate(WHOLE, expected_duration=100)
    small_b = a.allocate(WHOLE, expected_duration=100)
    return small_a, small_b


def test_a_large_high_priority_task_is_not_starved_by_small_ones(alloc):
    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    late_small = queued(alloc, "normal", WHOLE, expected_duration=1000)
    alloc.release(small_a.allocation_id)
    # The big task holds a reservation on h1 from when small_b is expected to end: the long small
    # task may not take the GPU small_a left, or the big one would wait 1000 s more.
    assert alloc.get(late_small.allocation_id).state == "pending"
    alloc.release(small_b.allocation_id)
    assert alloc.get(big.allocation_id).state == "active"
    assert alloc.position(late_small.allocation_id) == 1


def test_a_short_task_backfills_when_it_ends_before_the_reservation(alloc, clock):
    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    short = queued(alloc, "normal", WHOLE, expected_duration=50)
    alloc.release(small_a.allocation_id)
    assert alloc.get(short.allocation_id).state == "active"
    assert alloc.get(big.allocation_id).state == "pending"


def test_backfill_onto_another_host_is_always_allowed(alloc):
    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    one_gpu_host(alloc, "h2")  # joins while big waits for h1
    late_small = queued(alloc, "normal", WHOLE, expected_duration=1000)
    assert alloc.get(late_small.allocation_id).host_id == "h2"


def test_priority_strategy_preempts_lower_priority_work(alloc):
    one_gpu_host(alloc)
    low = alloc.allocate(WHOLE, priority="low")
    urgent = queued(alloc, "high", strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "active"
    victim = alloc.get(low.allocation_id)
    assert (victim.state, victim.release_reason) == ("released", "preempted")


def test_a_preempted_task_back_in_line_comes_before_later_lower_priority_tasks_in_the_same_pass(alloc, clock):
    from . import jobs

    # h0: the only GPU; h1: CPU only. The victim (normal, unclaimed) runs on h0; X holds the GPU
    # and B fills h1 until 100 s; C (critical) and L2 (low) wait. At 100 s one pass reaps X and B:
    # C preempts the victim, which goes back to the front of its priority, ahead of L2, and fits
    # on h1 where B was. The rest of that pass must not give h1 to L2 instead.
    cpu2 = {"cpu_cores": 2, "ram_mb": "1Gi"}
    alloc.register_host(id="h0", cpu_cores=3, ram_mb="4Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="4Gi")
    victim = alloc.enqueue(jobs.add, 1, 2, resources=cpu2, priority="normal", strategy="first_fit")
    assert alloc.get(victim.id).host_id == "h0"
    alloc.allocate({"gpus": 1, "cpu_cores": 1, "ram_mb": "1Gi"}, priority="critical", allocation_id="X",
                   ttl_seconds=100)
    alloc.allocate(cpu2, allocation_id="B", ttl_seconds=100)
    queued(alloc, "critical", {"gpus": 1, "cpu_cores": 2, "ram_mb": "1Gi"}, strategy="priority", allocation_id="C")
    queued(alloc, "low", cpu2, allocation_id="L2")
    clock.advance(100)
    assert sorted(alloc.expire()) == ["B", "X"]
    assert (alloc.get("C").state, alloc.get("C").host_id) == ("active", "h0")
    back = alloc.get(victim.id)
    assert (back.state, back.host_id, back.requeues) == ("active", "h1", 1)
    assert alloc.get("L2").state == "pending"


def test_a_task_back_in_line_shows_no_deadline_ram_or_slots_of_its_earlier_placement(alloc):
    from . import jobs

    one_gpu_host(alloc)
    victim = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1, "cpu_cores": 1, "ram_mb": "1Gi", "workers": 1},
                           priority="low", ttl_seconds=600)
    placed = alloc.get(victim.id)
    assert (placed.expires_at is not None, placed.ram_mb, placed.workers) == (True, 1024, 1)
    queued(alloc, "high", strategy="priority")
    back = alloc.get(victim.id)
    assert (back.state, back.requeues) == ("pending", 1)
    assert (back.expires_at, back.ram_mb, back.workers, back.services) == (None, 0, 0, [])


def test_preemption_never_touches_equal_or_higher_priority(alloc):
    one_gpu_host(alloc)
    peer = alloc.allocate(WHOLE, priority="high")
    urgent = queued(alloc, "high", strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(peer.allocation_id).state == "active"


def test_preemption_takes_the_newest_low_priority_work_first(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="64Gi",
                        gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    old = alloc.allocate(WHOLE, priority="low")
    clock.advance(10)
    new = alloc.allocate(WHOLE, priority="low")
    queued(alloc, "critical", strategy="priority")
    assert alloc.get(new.allocation_id).release_reason == "preempted"
    assert alloc.get(old.allocation_id).state == "active"


def test_preemption_ends_nothing_when_the_critical_reserve_would_still_refuse_the_request(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", reserve_gpus=1,
                        gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    low = alloc.allocate(WHOLE, priority="low")
    # Two whole GPUs for high (not critical) work: one of them is the reserve, freed or not.
    urgent = queued(alloc, "high", {"gpus": 2, "cpu_cores": 1}, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_preemption_ends_nothing_on_a_host_whose_ram_would_stay_exhausted(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="8Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    low = alloc.allocate(WHOLE, priority="low")  # the GPU, no RAM
    alloc.allocate({"cpu_cores": 1, "ram_mb": "8Gi"}, priority="critical")  # all the RAM
    # Freeing the GPU leaves the host without free RAM: it takes no work, not even this request.
    urgent = queued(alloc, "high", WHOLE, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_preemption_ends_nothing_on_a_gpu_whose_other_tenant_took_what_the_victim_would_free(alloc):
    gpu = {"index": 0, "uuid": "U0", "memory_mb": "16Gi"}
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="32Gi", gpus=[gpu])
    low = alloc.allocate({"gpus": 1, "gpu_memory_mb": "8Gi", "cpu_cores": 1}, priority="low")
    # Another process now uses 12 GiB: the host is overcommitted, and ending the 8 GiB share
    # would leave 4 GiB free, not the 8 GiB asked for.
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="32Gi", gpus=[{**gpu, "used_mb": "12Gi"}])
    urgent = queued(alloc, "critical", {"gpus": 1, "gpu_memory_mb": "8Gi", "cpu_cores": 1}, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_preemption_ends_nothing_on_a_host_whose_ram_shrank_below_what_is_granted(alloc):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="32Gi")
    low = alloc.allocate({"cpu_cores": 1, "ram_mb": "16Gi"}, priority="low")
    alloc.allocate({"cpu_cores": 1, "ram_mb": "16Gi"}, priority="critical")
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="24Gi")  # 32 GiB granted on 24
    urgent = queued(alloc, "critical", {"cpu_cores": 1, "ram_mb": "16Gi"}, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_preemption_does_not_count_cores_the_host_no_longer_lists(alloc):
    alloc.register_host(id="h1", cpu_cores=[0, 1, 2, 3], ram_mb="32Gi")
    low = alloc.allocate({"cpu_cores": 2}, priority="low")  # cores 0 and 1
    alloc.allocate({"cpu_cores": 2}, priority="critical")  # cores 2 and 3
    alloc.register_host(id="h1", cpu_cores=[2, 3], ram_mb="32Gi")  # 0 and 1 are gone
    urgent = queued(alloc, "critical", {"cpu_cores": 2}, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_a_lease_reaped_by_a_policy_commit_starts_the_task_waiting_for_it(alloc, clock):
    from allocator.api.placing import place_on

    one_gpu_host(alloc)
    alloc.register_host(id="h2", cpu_cores=8, ram_mb="64Gi")
    alloc.allocate(WHOLE, ttl_seconds=60)
    waiting = queued(alloc)
    clock.advance(61)
    res = place_on(alloc, alloc.build_request({"cpu_cores": 1}), "policy-1", "h2", [], False)
    assert res["ok"] and alloc.get(waiting.allocation_id).state == "active"


def test_a_policy_commit_does_not_grant_a_gpu_the_line_took_when_a_lease_was_reaped(alloc, clock):
    from allocator import invariants
    from allocator.api.placing import place_on

    alloc.register_host(id="h", cpu_cores=16, ram_mb="64Gi", gpus=[{"index": i, "memory_mb": 16384} for i in range(3)])
    alloc.allocate(WHOLE, ttl_seconds=10)  # GPU 0, until its deadline
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 8000, "cpu_cores": 1}, ttl_seconds=None)  # a share of GPU 1
    waiting = queued(alloc, "normal", {"gpus": 2, "cpu_cores": 1}, ttl_seconds=None)  # two whole GPUs
    clock.advance(60)  # the lease is past its deadline; nothing has reaped it yet
    # The policy chose GPU 2, idle when it looked. The commit reaps the lease first, and the
    # waiting task takes GPUs 0 and 2: the commit must not also grant GPU 2.
    res = place_on(alloc, alloc.build_request({"gpus": 1, "gpu_memory_mb": 8000, "cpu_cores": 1}, ttl_seconds=None),
                   "policy-1", "h", [2], False)
    assert alloc.get(waiting.allocation_id).state == "active"
    assert not res["ok"] and res["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert invariants.check(alloc.snapshot()) == []


def two_gpu_host(a):
    a.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(2)])


def test_a_direct_request_does_not_take_the_room_reserved_for_the_task_waiting_first(alloc, clock):
    from allocator import InsufficientResources

    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)  # one GPU busy until 100
    head = queued(alloc, "high", {"gpus": 2, "cpu_cores": 1})  # reserved: h1 at 100
    with pytest.raises(InsufficientResources) as exc:
        alloc.allocate(WHOLE, priority="low", expected_duration=500)  # would hold the free GPU past 100
    assert exc.value.code == "QUEUE_AHEAD" and head.allocation_id in exc.value.message
    assert alloc.would_fit(WHOLE, priority="low", expected_duration=500) is None


def test_a_direct_request_that_ends_before_the_waiting_task_can_start_is_placed(alloc, clock):
    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    queued(alloc, "high", {"gpus": 2, "cpu_cores": 1})
    short = alloc.allocate(WHOLE, priority="low", expected_duration=50)  # done before 100: a backfill
    assert short.state == "active"


def test_a_direct_request_of_higher_priority_than_the_waiting_task_is_placed(alloc, clock):
    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    queued(alloc, "normal", {"gpus": 2, "cpu_cores": 1})
    assert alloc.allocate(WHOLE, priority="high", expected_duration=500).state == "active"


def test_a_job_without_time_limit_is_not_backfilled_on_the_belief_it_ends_at_its_ttl(alloc, clock):
    from . import jobs

    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=7200, ttl_seconds=None)  # one GPU busy for 2 h
    queued(alloc, "normal", {"gpus": 2, "cpu_cores": 1}, ttl_seconds=None)  # reserved: h1 at +2 h
    # Its TTL (1 h) bounds only its wait for a worker; it is expected to run 10 h.
    task = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_timeout=-1, ttl_seconds=3600, expected_duration=36000)
    assert task.state == "pending"


def test_a_direct_request_respects_the_first_waiting_task_that_may_start(alloc, clock):
    from rq.job import Job

    from allocator import InsufficientResources
    from allocator.agent.fencing import finish_job

    from . import jobs

    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=7200, ttl_seconds=None)
    retried = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE)  # placed on the other GPU
    waiting = queued(alloc, "normal", {"gpus": 2, "cpu_cores": 1}, ttl_seconds=None)
    # retried's run fails and RQ schedules its retry in 600 s: it waits in line, first, but blocks nothing.
    origin = alloc.rq_connection.hget(Job.key_for(retried.id), "origin").decode()
    alloc.rq_connection.hset(Job.key_for(retried.id), "status", "scheduled")
    alloc.rq_connection.zadd(f"rq:scheduled:{origin}", {retried.id: clock() + 600})
    finish_job(alloc, retried.id, "h1", None, job_key=Job.key_for(retried.id))
    assert alloc.position(retried.id) == 1
    with pytest.raises(InsufficientResources) as exc:
        alloc.allocate(WHOLE, expected_duration=36000, ttl_seconds=None)
    assert exc.value.code == "QUEUE_AHEAD" and waiting.allocation_id in exc.value.message


def test_a_policys_commit_does_not_take_the_room_reserved_for_the_task_waiting_first(alloc, clock):
    from allocator.api.placing import place_on

    two_gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    queued(alloc, "high", {"gpus": 2, "cpu_cores": 1})  # reserved: h1 at 100
    req = alloc.build_request(WHOLE, priority="low", expected_duration=500)
    res = place_on(alloc, req, "policy-1", "h1", [], False)
    assert (res["ok"], res["code"]) == (False, "QUEUE_AHEAD")
    short = alloc.build_request(WHOLE, priority="low", expected_duration=50)  # ends before 100
    assert place_on(alloc, short, "policy-2", "h1", [], False)["ok"]


def test_repeating_a_placed_queued_request_while_others_wait_returns_it(alloc):
    one_gpu_host(alloc)
    first = queued(alloc, allocation_id="again-1")  # placed at once
    queued(alloc)  # waits
    repeat = queued(alloc, allocation_id="again-1")
    assert (repeat.allocation_id, repeat.state, repeat.host_id) == ("again-1", "active", first.host_id)


def test_a_direct_request_under_a_tasks_id_is_refused(alloc):
    from . import jobs

    one_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 64})  # waits: no host has 64 cores
    before = alloc.get(task.id)
    for on_busy in ("fail", "queue"):
        with pytest.raises(InvalidRequest) as exc:
            alloc.allocate({"cpu_cores": 1}, allocation_id=task.id, on_busy=on_busy)
        assert exc.value.field == "allocation_id"
    assert alloc.get(task.id) == before
    from allocator.api.placing import submit_to_line

    with pytest.raises(InvalidRequest):  # a policy's way into the line, as the WebSocket takes
        submit_to_line(alloc, alloc.build_request({"cpu_cores": 1}), task.id)


def test_a_pending_allocation_read_back_shows_its_place_in_line(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    first, second = queued(alloc), queued(alloc)
    assert alloc.get(second.allocation_id).queue_position == 2
    assert {x.allocation_id: x.queue_position for x in alloc.list(state="pending")} == {
        first.allocation_id: 1, second.allocation_id: 2}
    alloc.cancel(first.allocation_id)
    assert alloc.get(first.allocation_id).queue_position is None  # left the line unplaced
    assert alloc.get(second.allocation_id).queue_position == 1


def test_a_request_pinned_to_a_host_that_is_removed_leaves_the_line(alloc):
    from allocator.api.placing import submit_to_line

    one_gpu_host(alloc)
    alloc.register_host(id="h2", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.allocate(WHOLE, selector={"cluster": "default"}, strategy="first_fit")  # h1's GPU
    pinned = submit_to_line(alloc, alloc.build_request(WHOLE), "pin-1", only="h1")
    assert pinned.state == "pending"
    alloc.remove_host("h1", force=True)
    alloc.schedule()
    gone = alloc.get("pin-1")
    assert (gone.state, gone.release_reason) == ("cancelled", "host_removed")
    assert alloc.redis.zcard(alloc.keys.pending) == 0


def test_preemption_ends_only_what_the_preempting_request_needs(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    gpu_user = alloc.allocate(WHOLE, priority="low")
    clock.advance(10)
    cpu_user = alloc.allocate({"cpu_cores": 1}, priority="low")  # newer, so walked first; holds no GPU
    urgent = queued(alloc, "high", WHOLE, strategy="priority")
    assert alloc.get(urgent.allocation_id).state == "active"
    assert alloc.get(gpu_user.allocation_id).release_reason == "preempted"
    assert alloc.get(cpu_user.allocation_id).state == "active"


def test_preemption_ends_nothing_on_a_host_that_does_not_offer_the_requested_service(alloc):
    from allocator.services import ServiceCatalog, publish_catalog

    alloc.register_host(id="h1", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.register_host(id="h2", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    publish_catalog(alloc, "h2", ServiceCatalog.load({"svc": {"command": ["true"]}}))
    low = alloc.allocate(WHOLE, priority="low", selector={"cluster": "default"}, strategy="first_fit")
    alloc.allocate(WHOLE, priority="critical")  # the other host's GPU, which no one may preempt
    urgent = queued(alloc, "critical", WHOLE, strategy="priority", services=["svc"])
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert alloc.get(low.allocation_id).state == "active"


def test_a_parked_host_backfills_nothing_not_even_a_request_for_no_cores(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="8Gi")
    alloc.allocate({"cpu_cores": 1}, ttl_seconds=100)  # no free CPU left: the host is parked
    queued(alloc, "normal", {"cpu_cores": 1}, ttl_seconds=100)  # blocked, reserves h1
    late = queued(alloc, "normal", {"cpu_cores": 0, "ram_mb": 1024}, ttl_seconds=50)
    assert alloc.get(late.allocation_id).state == "pending"


def test_cancelling_a_pending_task_allocates_nothing_and_moves_the_line(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    a, b = queued(alloc), queued(alloc)
    cancelled = alloc.cancel(a.allocation_id)
    assert (cancelled.state, cancelled.release_reason) == ("cancelled", "cancelled")
    assert alloc.position(b.allocation_id) == 1
    assert alloc.capacity().active_allocations == 1


def test_releasing_a_pending_task_cancels_it_and_says_this_call_did(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    waiting = queued(alloc)
    first, again = alloc.release(waiting.allocation_id), alloc.release(waiting.allocation_id)
    assert (first.state, first.released_now) == ("cancelled", True)
    assert (again.state, again.released_now) == ("cancelled", False)


def test_cancelling_a_lease_leaves_an_rq_job_of_the_same_id_alone(alloc):
    from rq import Queue

    alloc.register_host(id="h1", cpu_cores=1, ram_mb="8Gi")
    foreign = Queue(f"plain-{alloc.keys.namespace}", connection=alloc.rq_connection).enqueue(
        "tests.jobs.add", 1, 2, job_id=f"{alloc.keys.namespace}-build-42")
    try:
        alloc.allocate({"cpu_cores": 1}, allocation_id=foreign.id)
        alloc.cancel(foreign.id)
        assert foreign.get_status(refresh=True) == "queued"
        alloc.destroy()
        assert alloc.rq_connection.exists(foreign.key) == 1
    finally:
        foreign.delete()
        alloc.rq_connection.delete(f"rq:queue:plain-{alloc.keys.namespace}")
        alloc.rq_connection.srem("rq:queues", f"rq:queue:plain-{alloc.keys.namespace}")


def test_a_task_cancelled_before_it_was_placed_has_no_position(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    waiting = queued(alloc)
    alloc.cancel(waiting.allocation_id)
    assert alloc.position(waiting.allocation_id) is None


def test_cancelling_a_placed_lease_releases_it(alloc):
    one_gpu_host(alloc)
    x = alloc.allocate(WHOLE)
    assert alloc.cancel(x.allocation_id).release_reason == "cancelled"
    assert alloc.capacity().gpus_idle == 1


def test_releasing_a_pending_request_cancels_it(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    waiting = queued(alloc)
    assert alloc.release(waiting.allocation_id).state == "cancelled"


def test_on_busy_must_be_fail_or_queue(alloc):
    with pytest.raises(InvalidRequest, match="on_busy"):
        alloc.allocate(WHOLE, on_busy="wait")


def test_queued_requests_are_idempotent_by_id(alloc):
    one_gpu_host(alloc)
    alloc.allocate(WHOLE)
    a1 = queued(alloc, allocation_id="req-1")
    a2 = queued(alloc, allocation_id="req-1")
    assert a1.allocation_id == a2.allocation_id and alloc.redis.zcard(alloc.keys.pending) == 1


def test_history_estimate_for_the_task_type_outranks_the_hint_for_backfill(alloc):
    alloc.redis.hset(alloc.keys.durations, "quick", '{"p50_ms": 20000, "p80_ms": 30000, "n": 40}')
    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    # The submitter hints 1000 s, but tasks of this type have taken at most ~30 s: it backfills.
    short = queued(alloc, "normal", WHOLE, expected_duration=1000, task_type="quick")
    alloc.release(small_a.allocation_id)
    assert alloc.get(short.allocation_id).state == "active"
    assert alloc.get(big.allocation_id).state == "pending"


def test_a_job_without_time_limit_never_backfills_onto_the_reserved_host(alloc):
    from . import jobs

    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    # Its 50 s TTL bounds only its wait for a worker: it may run for ever, so it is no short task.
    endless = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, ttl_seconds=50, job_timeout=-1)
    alloc.release(small_a.allocation_id)
    assert endless.state == "pending"
    assert alloc.get(big.allocation_id).state == "pending"


def test_a_job_without_time_limit_backfills_on_its_duration_hint(alloc):
    from . import jobs

    small_a, small_b = two_gpu_host_with_two_small_tasks(alloc)
    big = queued(alloc, "high", {"gpus": 2, "cpu_cores": 2})
    bounded = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, ttl_seconds=50, job_timeout=-1, expected_duration=50)
    alloc.release(small_a.allocation_id)
    assert bounded.state == "active"
    assert alloc.get(big.allocation_id).state == "pending"


def test_enqueueing_an_id_already_submitted_returns_that_task_and_changes_nothing(alloc):
    from rq.job import Job

    from . import jobs

    one_gpu_host(alloc)
    first = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_id="same")
    again = alloc.enqueue(jobs.add, 40, 2, resources=WHOLE, job_id="same", priority="low")
    assert again.id == first.id == "same"
    assert Job.fetch("same", connection=alloc.rq_connection).args == (1, 2)
    assert alloc.get("same").priority == "normal"


@pytest.mark.parametrize("job_id", ["a b/c", "run.1", "a:b", "abc\n"])  # ids an allocation takes and RQ does not
def test_enqueueing_with_an_invalid_job_id_names_job_id(alloc, job_id):
    from . import jobs

    one_gpu_host(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_id=job_id)
    assert exc.value.field == "job_id"


def test_enqueue_again_after_a_submit_that_failed_reuses_its_own_rq_job(alloc, monkeypatch):
    import redis as redis_lib

    from allocator import queue as queue_mod

    from . import jobs

    one_gpu_host(alloc)
    real_submit = queue_mod._submit

    def lost(*args, **kwargs):
        raise redis_lib.ConnectionError("connection lost")

    monkeypatch.setattr(queue_mod, "_submit", lost)
    with pytest.raises(redis_lib.ConnectionError):
        alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_id="idem-1")
    monkeypatch.setattr(queue_mod, "_submit", real_submit)
    task = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_id="idem-1")
    assert alloc.get(task.id).state == "active"


@pytest.mark.parametrize("option", ["depends_on", "at_front", "repeat", "rate_limit", "webhooks", "unique"])
def test_rq_options_the_line_does_not_take_are_refused_not_passed_to_the_function(alloc, option):
    from . import jobs

    one_gpu_host(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, **{option: True})
    assert exc.value.field == option


def test_rqs_explicit_args_and_kwargs_form_gives_the_functions_arguments(alloc):
    from . import jobs

    one_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, args=(1,), kwargs={"y": 2}, resources=WHOLE, job_timeout=30)
    assert (task.job.args, task.job.kwargs, task.job.timeout) == ((1,), {"y": 2}, 30)
    with pytest.raises(InvalidRequest) as exc:
        alloc.enqueue(jobs.add, 1, args=(2,), resources=WHOLE)
    assert exc.value.field == "args"


def test_timeout_goes_to_the_function_as_with_rq(alloc):
    from . import jobs

    one_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, timeout=10)
    plain = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE)
    assert task.job.kwargs == {"timeout": 10} and task.job.timeout == plain.job.timeout


def test_a_waiting_task_whose_rq_job_was_cancelled_leaves_the_line_instead_of_running(alloc):
    from . import jobs

    one_gpu_host(alloc)
    holder = alloc.allocate(WHOLE)
    task = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE)
    task.job.cancel()  # RQ's own cancel, while it waits in line
    alloc.release(holder.allocation_id)
    rec = alloc.get(task.id)
    assert (rec.state, rec.release_reason) == ("cancelled", "job_gone")


@pytest.mark.parametrize("timeout", [True, float("nan"), float("inf"), 4_000_000_000, 0, "x", "-5", "--1", "\u00b2", "\u00b2h"])
def test_a_job_timeout_no_worker_can_run_is_refused_naming_it_and_writes_nothing(alloc, timeout):
    from . import jobs

    one_gpu_host(alloc)
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_timeout=timeout)
    assert exc.value.field == "job_timeout"
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("timeout, seconds", [(-1, -1), (30, 30), ("90s", 90), ("2h", 7200), (" 90s ", 90), ("+5", 5)])
def test_a_job_timeout_rq_takes_is_given_to_rq_in_seconds(alloc, timeout, seconds):
    from rq.job import Job

    from . import jobs

    one_gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_timeout=timeout)
    assert Job.fetch(task.id, connection=alloc.rq_connection).timeout == seconds


def test_preemption_ends_nothing_for_a_task_short_of_a_port_that_higher_priority_work_holds(alloc, clock):
    from allocator.services import ServiceCatalog, publish_catalog

    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}],
                        service_ports=(20000, 20000))
    publish_catalog(alloc, "h1", ServiceCatalog.load({"a": {"command": ["true"]}, "b": {"command": ["true"]}}))
    alloc.allocate({"cpu_cores": 1}, priority="high", services=["a"])  # holds the host's only port
    lows = [alloc.allocate({"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1}, priority="low") for _ in range(4)]
    urgent = queued(alloc, "high", {"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1}, strategy="priority",
                    services=["b"])
    for _ in range(3):
        clock.advance(1)
        alloc.schedule()
    assert alloc.get(urgent.allocation_id).state == "pending"
    assert [alloc.get(x.allocation_id).state for x in lows] == ["active"] * 4


def test_preemption_ends_the_lower_priority_work_whose_service_holds_the_port_a_task_needs(alloc):
    from allocator.services import ServiceCatalog, publish_catalog

    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", service_ports=(20000, 20000))
    publish_catalog(alloc, "h1", ServiceCatalog.load({"a": {"command": ["true"]}, "b": {"command": ["true"]}}))
    low = alloc.allocate({"cpu_cores": 1}, priority="low", services=["a"], ttl_seconds=None)  # service a's only holder
    other = alloc.allocate({"cpu_cores": 1}, priority="low", ttl_seconds=None)  # newer: walked first, holds no port
    queued(alloc, "high", {"cpu_cores": 1}, strategy="priority", services=["b"])
    assert alloc.get(low.allocation_id).release_reason == "preempted"  # a stops once idle, freeing the port
    assert alloc.get(other.allocation_id).state == "active"


def test_a_task_the_walk_refuses_where_it_would_fit_ends_no_more_work_pass_after_pass(alloc, clock):
    # scan_cap 1: the walk looks at h0's GPU only and refuses; h1 could take the task at once,
    # so preempting work there would not let it start.
    alloc.scan_cap = 1
    alloc.register_host(id="h0", cpu_cores=4, ram_mb="16Gi", labels={"n": "h0"}, gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", labels={"n": "h1"}, gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.allocate({"gpus": 1, "gpu_memory_mb": 10384, "cpu_cores": 3}, priority="high", selector="n=h0")
    lows = [alloc.allocate(r, priority="low", selector="n=h1") for r in
            ({"cpu_cores": 1}, {"gpus": 1, "gpu_memory_mb": "8Gi", "cpu_cores": 1}, {"cpu_cores": 1})]
    urgent = queued(alloc, "high", {"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 2}, strategy="priority")
    for _ in range(3):
        clock.advance(1)
        alloc.schedule()
    assert [alloc.get(x.allocation_id).state for x in lows] == ["active"] * 3
    assert alloc.get(urgent.allocation_id).state == "pending"


def test_an_id_submitted_again_after_its_record_was_purged_starts_with_a_new_task_hash(redis_url, clock):
    from allocator import Allocator

    a = Allocator(redis_url, namespace=_namespace(), clock=clock, record_retention_s=60)
    try:
        one_gpu_host(a)
        holder = a.allocate(WHOLE, ttl_seconds=None)
        queued(a, allocation_id="nightly", ttl_seconds=None)
        a.redis.hset(a.keys.task("nightly"), "not_before", int(clock.now * 1000) + 10**9)  # a retry's wait, as finish_job writes
        a.cancel("nightly")  # its task hash is kept a day, the record only a minute
        clock.advance(61)
        a.expire()
        assert a.get("nightly") is None
        queued(a, allocation_id="nightly", ttl_seconds=None)
        assert a.redis.pttl(a.keys.task("nightly")) == -1 and a.redis.hget(a.keys.task("nightly"), "not_before") is None
        a.release(holder.allocation_id)
        assert a.get("nightly").state == "active"
    finally:
        a.destroy()


def test_a_task_submitted_after_a_pass_stopped_at_its_depth_does_not_overtake_one_that_moved_up(alloc, clock):
    alloc.pass_depth = 2
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(3)])
    big = alloc.allocate({"gpus": 3, "cpu_cores": 3}, ttl_seconds=None)
    waiting = [queued(alloc, ttl_seconds=None, allocation_id=f"T{i}") for i in (1, 2, 3)]
    alloc.release(big.allocation_id)  # its pass places T1 and T2, and stops at its depth
    assert [alloc.get(t.allocation_id).state for t in waiting] == ["active", "active", "pending"]
    later = queued(alloc, ttl_seconds=None, allocation_id="N")
    assert alloc.get("T3").state == "active" and later.state == "pending"


def test_a_task_waiting_for_a_service_a_host_then_offers_starts_before_a_later_submission(alloc):
    from allocator.services import ServiceCatalog, publish_catalog

    svc = ServiceCatalog.load({"svc": {"command": ["true"]}})
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="8Gi")
    alloc.register_host(id="h2", cpu_cores=4, ram_mb="8Gi")
    publish_catalog(alloc, "h1", svc)
    alloc.allocate({"cpu_cores": 1}, selector={"cluster": "default"}, strategy="first_fit")  # h1's only core
    first = queued(alloc, resources={"cpu_cores": 1}, services=["svc"])  # h2 does not offer svc yet
    assert first.state == "pending"
    publish_catalog(alloc, "h2", svc)  # runs no pass
    queued(alloc, resources={"cpu_cores": 1})
    assert alloc.get(first.allocation_id).state == "active"


def test_a_direct_request_does_not_take_the_room_of_a_head_that_fits_untried(alloc, clock):
    from allocator import InsufficientResources
    from allocator.services import ServiceCatalog, publish_catalog

    svc = ServiceCatalog.load({"svc": {"command": ["true"]}})
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="8Gi")
    alloc.register_host(id="h2", cpu_cores=2, ram_mb="8Gi")
    publish_catalog(alloc, "h1", svc)
    alloc.allocate({"cpu_cores": 1}, ttl_seconds=None, selector={"cluster": "default"}, strategy="first_fit")  # h1's core
    alloc.allocate({"cpu_cores": 1}, ttl_seconds=600)  # on h2, with an end in sight
    head = queued(alloc, resources={"cpu_cores": 1}, services=["svc"], ttl_seconds=3600)
    publish_catalog(alloc, "h2", svc)  # the head fits on h2 now; no pass ran
    with pytest.raises(InsufficientResources, match="reserved for a task"):
        alloc.allocate({"cpu_cores": 1}, ttl_seconds=7200)
    clock.advance(1)
    alloc.schedule()
    assert alloc.get(head.allocation_id).host_id == "h2"


def test_the_end_of_a_recovery_leaves_the_line_unsettled_until_the_next_pass(alloc):
    from allocator.history import recover

    one_gpu_host(alloc)
    recover.begin(alloc)  # passes run none until it ends
    recover.finish(alloc)
    assert alloc.redis.hget(alloc.keys.seq, "line_unsettled") == "1"
    assert queued(alloc).state == "active"  # the whole pass, which saw the whole line
    assert alloc.redis.hget(alloc.keys.seq, "line_unsettled") is None


@pytest.mark.parametrize("on_busy", ["queue", "fail"])
def test_a_later_request_keeps_off_the_room_a_refused_heads_reservation_counts_on(alloc, clock, on_busy):
    # H is refused on h1 (no free port there) and reserves h0, whose lease ends at 100. A later
    # request, queued or direct, must not take h0 in the meantime.
    from allocator.services import ServiceCatalog, publish_catalog

    svc = ServiceCatalog.load({"a": {"command": ["true"]}, "b": {"command": ["true"]}})
    alloc.register_host(id="h0", cpu_cores=4, ram_mb="16Gi", labels={"n": "h0"}, service_ports=(21000, 21000))
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", labels={"n": "h1"}, service_ports=(20000, 20000))
    publish_catalog(alloc, "h0", svc)
    publish_catalog(alloc, "h1", svc)
    alloc.allocate({"cpu_cores": 3}, selector="n=h0", ttl_seconds=100)
    alloc.allocate({"cpu_cores": 1}, selector="n=h1", services=["a"], priority="high", ttl_seconds=None)  # h1's port
    alloc.allocate({"cpu_cores": 1}, selector="n=h1", ttl_seconds=50)
    head = queued(alloc, "high", {"cpu_cores": 4}, services=["b"], ttl_seconds=1000)
    clock.advance(1)
    alloc.schedule()
    try:
        later = alloc.allocate({"cpu_cores": 1}, on_busy=on_busy, ttl_seconds=7200)
        assert later.host_id != "h0"
    except InsufficientResources:
        assert on_busy == "fail"
    clock.advance(99)
    alloc.expire()
    assert alloc.get(head.allocation_id).host_id == "h0"
