"""What happens to function tasks and drains when their host is declared lost."""

import pytest

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


def test_a_lost_host_cannot_be_resumed_or_drained_back_to_life(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    lose(alloc, clock)
    with pytest.raises(HostLost):
        alloc.resume_host("h1")
    with pytest.raises(HostLost):
        alloc.drain_host("h1")
