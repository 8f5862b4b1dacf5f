"""Heartbeats, lost hosts and their reclaim, with an injected clock (the kill -9 test is separate)."""

from __future__ import annotations

import json
import threading

from allocator.agent import mark_lost, reap_lost_hosts, run_reaper
from allocator.invariants import check

from .helpers import events, host, wait_for

GRACE = 1.0


def test_heartbeat_records_the_ledger_clock(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") == int(clock() * 1000)


def test_host_without_heartbeat_for_the_grace_is_lost_and_its_allocations_freed(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    xs = [alloc.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1}) for _ in range(2)]
    clock.advance(GRACE)
    (lost,) = reap_lost_hosts(alloc, GRACE)
    assert lost.declared and sorted(lost.released) == sorted(x.allocation_id for x in xs)
    for x in xs:
        a = alloc.get(x.allocation_id)
        assert (a.state, a.release_reason) == ("released", "host_lost")
    h = alloc.capacity().hosts[0]
    assert h.state == "lost" and h.gpu_memory_mb.allocated == 0
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") is None
    check(alloc.snapshot())


def test_a_host_whose_agent_died_before_its_first_heartbeat_is_still_declared_lost(alloc, make_agent, clock):
    agent = make_agent([host("h1")])
    agent._heartbeat = lambda hosts: []  # it registers the host, then dies before the heartbeat
    agent.run_once()
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") == int(clock() * 1000)  # the registration counted
    clock.advance(GRACE)
    (lost,) = reap_lost_hosts(alloc, GRACE)
    assert lost.declared and alloc.capacity().hosts[0].state == "lost"


def test_a_lost_host_an_operator_updates_is_watched_again_and_declared_lost_without_its_agent(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)  # the agent died
    alloc.register_host(id="h1", labels={"team": "ml"}, cpu_cores=4, ram_mb="8Gi")  # an operator's update, no agent
    assert alloc.capacity().hosts[0].state == "ready"
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") == int(clock() * 1000)
    clock.advance(GRACE)
    (lost,) = reap_lost_hosts(alloc, GRACE)
    assert lost.declared and alloc.capacity().hosts[0].state == "lost"


def test_host_is_not_lost_before_the_grace(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    clock.advance(GRACE - 0.001)
    assert reap_lost_hosts(alloc, GRACE) == []
    assert alloc.capacity().hosts[0].state == "ready"


def test_regular_heartbeats_keep_a_host_alive(alloc, make_agent, clock):
    agent = make_agent([host("h1")])
    for _ in range(5):
        agent.run_once()
        clock.advance(GRACE * 0.6)
        assert reap_lost_hosts(alloc, GRACE) == []


def test_mark_lost_rechecks_the_heartbeat_atomically(alloc, make_agent, clock):
    agent = make_agent([host("h1")])
    agent.run_once()
    clock.advance(GRACE)
    agent.run_once()  # the agent beat after the reaper's read, before its script ran
    assert mark_lost(alloc, "h1", GRACE) is None
    assert alloc.capacity().hosts[0].state == "ready"


def test_lost_host_leaves_every_index_and_takes_no_work(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)
    snap = alloc.snapshot()
    assert not snap["gpu_idx"] and not snap["cpu_idx"] and not snap["ram_idx"]
    assert alloc.would_fit({"cpu_cores": 1}) is None


def test_hosts_registered_without_an_agent_are_never_lost(alloc, clock):
    alloc.register_host(id="manual", cpu_cores=4, ram_mb="8Gi")
    clock.advance(3600)
    assert reap_lost_hosts(alloc, GRACE) == []


def test_loss_emits_host_lost_then_released_events(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    x = alloc.allocate({"cpu_cores": 1})
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)
    (ev,) = events(alloc, "host_lost")
    data = json.loads(ev["data"])
    assert ev["id"] == "h1" and data["gen"] == 1 and data["active"] == 1
    rel = [json.loads(e["data"]) for e in events(alloc, "released") if e["id"] == x.allocation_id]
    assert rel[0]["reason"] == "host_lost"


def test_release_is_bounded_per_call_and_the_rest_follows(alloc, make_agent, clock):
    make_agent([host("h1", cores=8)]).run_once()
    xs = [alloc.allocate({"cpu_cores": 1}) for _ in range(5)]
    clock.advance(GRACE)
    first = reap_lost_hosts(alloc, GRACE, limit=2)[0]
    assert first.declared and len(first.released) == 2 and first.remaining == 3
    assert alloc.redis.zscore(alloc.keys.reclaim, "h1") is not None
    done = [x for lh in reap_lost_hosts(alloc, GRACE, limit=2) + reap_lost_hosts(alloc, GRACE, limit=2) for x in lh.released]
    assert sorted(first.released + done) == sorted(x.allocation_id for x in xs)
    assert alloc.redis.zscore(alloc.keys.reclaim, "h1") is None
    check(alloc.snapshot())


def test_returning_host_registers_again_under_a_new_generation(alloc, make_agent, clock):
    agent = make_agent([host("h1")])
    agent.run_once()
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)
    rep = agent.run_once()  # the agent comes back: its heartbeat is refused, so it registers again
    assert rep.reregistered == ["h1"]
    assert alloc.redis.hget(alloc.keys.host("h1"), "gen") == "2"
    assert alloc.capacity().hosts[0].state == "ready"
    assert alloc.redis.zscore(alloc.keys.heartbeats, "h1") == int(clock() * 1000)
    x = alloc.allocate({"gpu_memory_mb": "4Gi"})
    assert alloc.grant_is_current(x.allocation_id)


def test_a_host_that_returns_with_a_changed_inventory_is_reported_as_returned(alloc, make_agent, inventory, clock):
    agent = make_agent([host("h1", cores=8)])
    agent.run_once()
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)
    inventory.write([host("h1", cores=4)])  # it comes back smaller: registered as a change, before any heartbeat
    rep = agent.run_once()
    assert (rep.reregistered, rep.registered) == (["h1"], [])
    assert alloc.redis.hget(alloc.keys.host("h1"), "gen") == "2"


def test_a_host_removed_then_changed_is_reported_as_returned(alloc, make_agent, inventory):
    agent = make_agent([host("h1", cores=8)])
    agent.run_once()
    alloc.remove_host("h1")
    inventory.write([host("h1", cores=4)])
    rep = agent.run_once()
    assert (rep.reregistered, rep.registered) == (["h1"], [])


def test_stale_grants_left_on_a_returned_host_are_freed(alloc, make_agent, clock):
    agent = make_agent([host("h1", cores=8)])
    agent.run_once()
    xs = [alloc.allocate({"cpu_cores": 1}) for _ in range(3)]
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE, limit=1)  # declared lost, 2 grants still held
    agent.run_once()  # comes back (generation 2) before the reaper finished
    fresh = alloc.allocate({"cpu_cores": 1})
    left = [x.allocation_id for x in xs if alloc.get(x.allocation_id).state == "active"]
    assert len(left) == 2 and not any(alloc.grant_is_current(i) for i in left)
    released = [i for lh in reap_lost_hosts(alloc, GRACE) for i in lh.released]
    assert sorted(released) == sorted(left)
    assert alloc.get(fresh.allocation_id).state == "active" and alloc.grant_is_current(fresh.allocation_id)
    assert alloc.capacity().hosts[0].state == "ready"
    check(alloc.snapshot())


def test_removed_host_is_dropped_from_the_watch(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    alloc.remove_host("h1")
    clock.advance(GRACE)
    assert reap_lost_hosts(alloc, GRACE) == []
    assert alloc.redis.zcard(alloc.keys.heartbeats) == 0


def test_on_host_lost_hook_gets_the_released_ids(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    x = alloc.allocate({"cpu_cores": 1})
    clock.advance(GRACE)
    seen = []
    reap_lost_hosts(alloc, GRACE, on_host_lost=seen.append)
    assert [(lh.host_id, lh.released) for lh in seen] == [("h1", [x.allocation_id])]


def test_run_reaper_loops_until_stopped(alloc, make_agent, clock):
    make_agent([host("h1")]).run_once()
    clock.advance(GRACE)
    stop = threading.Event()
    seen = []
    t = threading.Thread(target=run_reaper, args=(alloc, GRACE, 0.01, stop), kwargs={"on_host_lost": seen.append})
    t.start()
    wait_for(lambda: seen)
    stop.set()
    t.join(5)
    assert not t.is_alive() and seen[0].host_id == "h1"


def test_lose_reclaim_and_return_work_on_redis_6_2(alloc_any, inventory, clock):
    from allocator.agent import Agent, StaticProvider

    inventory.write([host("h1")])
    agent = Agent(alloc_any, StaticProvider(inventory.path))
    agent.run_once()
    x = alloc_any.allocate({"cpu_cores": 1})
    clock.advance(GRACE)
    assert reap_lost_hosts(alloc_any, GRACE)[0].released == [x.allocation_id]
    assert agent.run_once().reregistered == ["h1"]
    check(alloc_any.snapshot())
