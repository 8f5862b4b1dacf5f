"""Stopping an agent: drain (no new placements), let running work finish, then deregister."""

from __future__ import annotations

import threading

import pytest

from allocator import InsufficientResources

from .helpers import events, host, wait_for


def _state(alloc, h="h1"):
    return alloc.redis.hget(alloc.keys.host(h), "state")


def test_shutdown_of_an_idle_agent_deregisters_its_hosts(alloc, make_agent):
    agent = make_agent([host("h1"), host("h2")])
    agent.run_once()
    assert agent.shutdown() == []
    assert alloc.capacity().host_count == 0
    assert alloc.redis.zcard(alloc.keys.heartbeats) == 0
    assert alloc.redis.exists(alloc.keys.host_inventory("h1")) == 0
    assert [e["id"] for e in events(alloc, "host_removed")] == ["h1", "h2"]


def test_shutdown_drains_and_waits_for_running_work(alloc, make_agent):
    agent = make_agent([host("h1")], drain_timeout_s=None)
    agent.run_once()
    x = alloc.allocate({"cpu_cores": 1})
    out: list[list[str]] = []
    t = threading.Thread(target=lambda: out.append(agent.shutdown()))
    t.start()
    wait_for(lambda: _state(alloc) == "draining")
    with pytest.raises(InsufficientResources):
        alloc.allocate({"cpu_cores": 1})
    assert alloc.get(x.allocation_id).state == "active"
    alloc.release(x.allocation_id)  # the running work finishes
    t.join(10)
    assert not t.is_alive() and out == [[]]
    assert alloc.capacity().host_count == 0


def test_work_still_running_after_the_drain_timeout_is_released(alloc, make_agent):
    agent = make_agent([host("h1")], drain_timeout_s=0)
    agent.run_once()
    x = alloc.allocate({"cpu_cores": 1})
    assert agent.shutdown() == [x.allocation_id]
    assert alloc.get(x.allocation_id).release_reason == "host_removed"
    assert alloc.capacity().host_count == 0


def test_a_second_signal_stops_waiting(alloc, make_agent):
    agent = make_agent([host("h1")], drain_timeout_s=None)
    agent.run_once()
    x = alloc.allocate({"cpu_cores": 1})
    abort = threading.Event()
    abort.set()
    assert agent.shutdown(abort) == [x.allocation_id]


def test_draining_host_keeps_heartbeating(alloc, make_agent, clock):
    from allocator.agent import reap_lost_hosts

    agent = make_agent([host("h1")], drain_timeout_s=None, interval_s=0.01)
    agent.run_once()
    x = alloc.allocate({"cpu_cores": 1})
    t = threading.Thread(target=agent.shutdown)
    t.start()
    wait_for(lambda: _state(alloc) == "draining")
    clock.advance(5)
    beat = clock() * 1000
    wait_for(lambda: alloc.redis.zscore(alloc.keys.heartbeats, "h1") == beat)
    assert reap_lost_hosts(alloc, 1.0) == []  # draining is not lost
    alloc.release(x.allocation_id)
    t.join(10)
    assert not t.is_alive()


def test_shutdown_with_one_host_declared_lost_still_drains_and_deregisters_the_others(alloc, make_agent, clock):
    from allocator.agent import mark_lost

    agent = make_agent([host("h1"), host("h2")])
    agent.run_once()
    clock.advance(1)
    mark_lost(alloc, "h1", grace_s=0.5)  # a partition: the reaper declared h1 lost
    assert alloc.redis.hget(alloc.keys.host("h1"), "state") == "lost"
    assert agent.shutdown() == []
    assert alloc.redis.hget(alloc.keys.host("h2"), "state") is None  # h2 deregistered
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h2") is None


def test_a_host_left_draining_by_an_agent_killed_during_its_drain_is_resumed_by_the_next(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    alloc.allocate({"cpu_cores": 1})
    alloc.drain_host("h1", by_agent=True)  # the agent began its drain and was killed while it waited
    make_agent([host("h1")]).run_once()  # its successor
    assert _state(alloc) == "ready"
    alloc.allocate({"cpu_cores": 1})


def test_a_host_an_operator_drained_stays_draining_when_its_agent_restarts(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    alloc.drain_host("h1", by_agent=True)
    alloc.drain_host("h1")  # an operator's drain since supersedes the agent's
    make_agent([host("h1")]).run_once()
    assert _state(alloc) == "draining"


def test_an_operator_drain_made_while_a_starting_agent_resumes_its_own_stays(alloc, make_agent, monkeypatch):
    make_agent([host("h1")]).run_once()
    alloc.drain_host("h1", by_agent=True)
    resume = alloc.resume_host

    def operator_drains_first(host_id, **kw):  # the operator's drain lands just before the resume
        alloc.drain_host("h1")
        return resume(host_id, **kw)

    monkeypatch.setattr(alloc, "resume_host", operator_drains_first)
    make_agent([host("h1")]).run_once()
    assert _state(alloc) == "draining"


def test_an_agent_draining_a_host_an_operator_drained_leaves_it_the_operators(alloc, make_agent):
    make_agent([host("h1")]).run_once()
    alloc.drain_host("h1")  # the operator's maintenance drain
    alloc.drain_host("h1", by_agent=True)  # then the agent stops (and is killed while it waits)
    make_agent([host("h1")]).run_once()
    assert _state(alloc) == "draining"


def test_a_drain_that_meets_a_redis_error_is_tried_again_while_the_agent_waits(alloc, make_agent, monkeypatch):
    import redis as redis_lib

    agent = make_agent([host("h1")], drain_timeout_s=1)
    agent.run_once()
    x = alloc.allocate({"cpu_cores": 1})
    real = alloc.drain_host
    calls = []

    def flaky(h, **kw):
        calls.append(h)
        if len(calls) == 1:
            raise redis_lib.ConnectionError("blip")
        return real(h, **kw)

    monkeypatch.setattr(alloc, "drain_host", flaky)
    seen = []
    t = threading.Thread(target=agent.shutdown)
    t.start()
    wait_for(lambda: _state(alloc) == "draining")
    seen.append(_state(alloc))
    t.join(10)
    assert seen == ["draining"] and len(calls) >= 2
    assert alloc.get(x.allocation_id).release_reason == "host_removed"


def test_a_host_an_operator_drained_keeps_the_drain_through_its_loss(alloc, make_agent, clock):
    from allocator.agent.reaper import reap_lost_hosts

    agent = make_agent([host("h1")])
    agent.run_once()
    alloc.drain_host("h1")  # maintenance
    clock.advance(30)
    reap_lost_hosts(alloc, 20.0)  # its agent went silent
    assert _state(alloc) == "lost"
    make_agent([host("h1")]).run_once()  # an agent registers it again
    assert _state(alloc) == "draining"
    # The history reads a registration as the end of a loss: the outbox says it drains still.
    types = [f["type"] for _, f in alloc.redis.xrange(alloc.keys.events) if f["id"] == "h1"]
    assert types[-2:] == ["host_updated", "host_draining"]


@pytest.mark.parametrize("marked", [True, False])  # False: drained before drains were marked
def test_an_agent_stopping_leaves_a_host_an_operator_drained_registered_and_lost(alloc, make_agent, marked):
    from allocator.errors import AllocatorError

    agent = make_agent([host("h1"), host("h2")])
    agent.run_once()
    alloc.drain_host("h1")
    if not marked:
        alloc.redis.hdel(alloc.keys.host("h1"), "drained_by")
    agent.shutdown()
    assert _state(alloc, "h1") == "lost" and alloc.redis.exists(alloc.keys.host("h2")) == 0
    with pytest.raises(AllocatorError):  # no agent serves it: nobody can resume it meanwhile
        alloc.resume_host("h1")
    make_agent([host("h1"), host("h2")]).run_once()  # its next agent
    assert (_state(alloc, "h1"), _state(alloc, "h2")) == ("draining", "ready")


def test_an_operator_drain_made_while_an_agent_stops_is_kept(alloc, make_agent, monkeypatch):
    agent = make_agent([host("h1"), host("h2")])
    agent.run_once()
    read = agent._host_states

    def operator_drains_after_the_read(hosts):  # the agent read the states, then the drain lands
        states = read(hosts)
        alloc.drain_host("h2")
        return states

    monkeypatch.setattr(agent, "_host_states", operator_drains_after_the_read)
    agent.shutdown()
    assert alloc.redis.exists(alloc.keys.host("h1")) == 0
    assert _state(alloc, "h2") == "lost"  # kept registered, as for a drain read in time
    make_agent([host("h1"), host("h2")]).run_once()
    assert (_state(alloc, "h1"), _state(alloc, "h2")) == ("ready", "draining")


def test_an_agent_stopping_keeps_a_host_an_operator_drained_before_it_was_lost(alloc, make_agent):
    from allocator.agent.reaper import mark_lost

    agent = make_agent([host("h1")])
    agent.run_once()
    alloc.drain_host("h1")
    mark_lost(alloc, "h1", 0.0)  # lost, the operator's drain kept for its return
    agent.shutdown()
    assert _state(alloc, "h1") == "lost"
    make_agent([host("h1")]).run_once()  # its next agent
    assert _state(alloc, "h1") == "draining"
