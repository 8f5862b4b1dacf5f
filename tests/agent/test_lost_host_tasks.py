"""What happens to function tasks and drains when their host is declared lost."""

import pytest
from rq.job import Job

from allocator.agent.fencing import claim_grant, finish_job
from allocator.agent.reaper import reap_lost_hosts
from allocator.errors import HostLost
from allocator.invariants import check

from .. import jobs
from .helpers import host

GRACE = 20.0


def lose(alloc, clock):
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)


def test_function_task_on_a_lost_host_is_requeued_at_the_front(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    later = alloc.allocate({"cpu_cores": 1}, on_busy="queue", selector="cluster=elsewhere")
    assert task.state == "active"
    lose(alloc, clock)
    assert task.state == "pending" and task.position == 1 and later.queue_position == 1
    assert alloc.position(later.allocation_id) == 2
    assert task.job.origin == f"{alloc.keys.namespace}.normal"
    assert check(alloc.snapshot()) == []


def test_function_task_with_fail_policy_fails_when_its_host_is_lost(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, on_host_lost="fail")
    lose(alloc, clock)
    assert task.state == "failed"
    assert task.job.get_status() == "failed"
    assert alloc.position(task.id) == 0


def preempted_while_running(alloc, make_agent, **kw):
    """A low task runs on h1 (claimed by its worker); a critical one preempts it, and the worker
    has not stopped it yet."""
    make_agent([host("h1", cores=4)]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 4}, priority="low", **kw)
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True)
    urgent = alloc.allocate({"cpu_cores": 4}, priority="critical", strategy="priority", on_busy="queue")
    assert urgent.state == "active" and alloc.redis.hget(alloc.keys.task(task.id), "state") == "preempting"
    return task, claim, urgent


def test_a_preempted_task_whose_host_is_lost_before_its_worker_reports_goes_back_in_line(alloc, make_agent, clock):
    task, claim, urgent = preempted_while_running(alloc, make_agent)
    lose(alloc, clock)  # no worker on h1 will report the stopped run now
    assert task.state == "pending" and task.position == 1
    # A report of that run arriving late changes nothing.
    end = finish_job(alloc, task.id, "h1", claim.token, status="stopped", job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (False, False)
    assert alloc.redis.zcard(alloc.keys.pending) == 1
    assert alloc.redis.hlen(alloc.keys.preempting) == 0
    assert check(alloc.snapshot()) == []


def test_a_preempted_task_with_fail_policy_fails_when_its_host_is_lost(alloc, make_agent, clock):
    task, _, _ = preempted_while_running(alloc, make_agent, on_host_lost="fail")
    lose(alloc, clock)
    assert task.state == "failed" and task.job.get_status() == "failed"
    assert alloc.redis.zcard(alloc.keys.pending) == 0


def test_a_preempted_task_whose_host_is_removed_before_its_worker_reports_goes_back_in_line(alloc, make_agent):
    task, _, _ = preempted_while_running(alloc, make_agent)
    alloc.remove_host("h1", force=True)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "pending"
    assert alloc.redis.zscore(alloc.keys.pending, task.id) is not None
    assert alloc.redis.hlen(alloc.keys.preempting) == 0


def test_a_preempted_task_failed_by_its_policy_is_kept_a_day_like_every_ended_task(alloc, make_agent, clock):
    task, _, _ = preempted_while_running(alloc, make_agent, on_host_lost="fail")
    lose(alloc, clock)
    assert 0 < alloc.redis.pttl(alloc.keys.task(task.id)) <= 86_400_000


def test_a_preempted_task_the_worker_reports_leaves_nothing_for_the_reaper(alloc, make_agent, clock):
    task, claim, _ = preempted_while_running(alloc, make_agent)
    end = finish_job(alloc, task.id, "h1", claim.token, status="stopped", job_key=Job.key_for(task.id))
    assert end.requeued and alloc.redis.hlen(alloc.keys.preempting) == 0
    lose(alloc, clock)
    assert task.state == "pending" and alloc.redis.zcard(alloc.keys.pending) == 1


def test_a_lost_host_cannot_be_resumed_or_drained_back_to_life(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    lose(alloc, clock)
    with pytest.raises(HostLost):
        alloc.resume_host("h1")
    with pytest.raises(HostLost):
        alloc.drain_host("h1")


def test_a_function_task_placed_on_a_host_removed_by_force_goes_back_in_line(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    assert task.state == "active"  # placed on h1, not started: no worker there will run it now
    assert alloc.remove_host("h1", force=True) == [task.id]
    assert task.state == "pending" and task.position == 1
    assert task.job.origin == f"{alloc.keys.namespace}.normal"
    alloc.register_host(id="h2", cpu_cores=2, ram_mb="4Gi")  # its pass places the task
    assert (task.state, alloc.get(task.id).host_id) == ("active", "h2")
    assert check(alloc.snapshot()) == []


def test_a_function_task_with_fail_policy_fails_when_its_host_is_removed_by_force(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, on_host_lost="fail")
    alloc.remove_host("h1", force=True)
    assert task.state == "failed"
    assert task.job.get_status() == "failed"


def test_a_host_removed_and_registered_again_without_an_agent_is_not_declared_lost(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()  # the agent beats once, then is gone
    alloc.remove_host("h1")
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="4Gi")
    lease = alloc.allocate({"cpu_cores": 1})
    lose(alloc, clock)
    assert alloc.get(lease.allocation_id).state == "active"
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") is None


def test_a_run_already_started_on_a_host_removed_by_force_is_released_not_run_again(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    claim_grant(alloc, task.id, "w1", "h1", start=True)  # its worker, still alive, runs it
    alloc.remove_host("h1", force=True)
    assert (task.state, alloc.get(task.id).release_reason) == ("released", "host_removed")
    assert alloc.redis.zcard(alloc.keys.pending) == 0


def test_a_task_put_back_in_line_by_a_removal_is_placed_before_a_later_submission(alloc, make_agent):
    make_agent([host("h1"), host("h2", gpus=[])]).run_once()
    alloc.allocate({"cpu_cores": 8}, ttl_seconds=None, selector=None, strategy="first_fit")  # fills h1's cores
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 8})  # placed on h2, not started
    assert alloc.get(task.id).host_id == "h2"
    alloc.register_host(id="h3", cpu_cores=8, ram_mb="32Gi")  # room for one such task
    alloc.remove_host("h2", force=True)  # the task goes back in line, and its pass places it on h3
    later = alloc.allocate({"cpu_cores": 8}, on_busy="queue", priority="low")
    assert alloc.get(task.id).host_id == "h3"
    assert later.state == "pending"


def test_grants_of_an_older_generation_freed_on_a_host_that_came_back_go_to_the_line_at_once(alloc, make_agent, clock):
    from allocator.agent.reaper import mark_lost

    agent = make_agent([host("h1", cores=4, gpus=[])])
    agent.run_once()
    old = alloc.allocate({"cpu_cores": 4}, ttl_seconds=None)
    clock.advance(GRACE)
    assert mark_lost(alloc, "h1", GRACE, limit=0) is not None  # declared lost; nothing released yet
    agent.run_once()  # the agent registers it again: a new generation, the old grant still held
    head = alloc.allocate({"cpu_cores": 4}, on_busy="queue", priority="high")
    mark_lost(alloc, "h1", GRACE, limit=10)  # frees the old generation's grant on the ready host
    assert alloc.get(old.allocation_id).state == "released"
    assert alloc.get(head.allocation_id).state == "active"
