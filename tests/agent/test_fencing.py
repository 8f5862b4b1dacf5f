"""Fencing: a grant may start work only while active, on a live host, under the host's generation."""

from __future__ import annotations

import pytest

from allocator.agent import StaleGrant, check_grant, reap_lost_hosts, require_current_grant
from allocator.agent.daemon import Agent
from allocator.agent.static import StaticProvider

from .helpers import host

GRACE = 1.0


@pytest.fixture
def placed(alloc, make_agent):
    agent = make_agent([host("h1")])
    agent.run_once()
    return agent, alloc.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1})


def test_fresh_grant_is_current(alloc, placed):
    _, x = placed
    st = check_grant(alloc, x.allocation_id)
    assert (st.current, st.reason, st.host_id, st.gen, st.host_gen) == (True, "ok", "h1", 1, 1)
    assert alloc.grant_is_current(x.allocation_id)


def test_unknown_allocation_is_not_current(alloc):
    assert check_grant(alloc, "alloc-nope").reason == "not_found"


def test_released_allocation_is_not_current(alloc, placed):
    _, x = placed
    alloc.release(x.allocation_id)
    assert check_grant(alloc, x.allocation_id).reason == "not_active"


def test_grant_on_a_lost_host_is_refused(alloc, placed, clock):
    _, x = placed
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE, limit=0)  # declared lost; nothing released yet
    st = check_grant(alloc, x.allocation_id)
    assert (st.current, st.reason, st.state) == (False, "host_lost", "active")


def test_returning_host_cannot_run_work_from_stale_grants(alloc, placed, clock):
    agent, x = placed
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE, limit=0)
    agent.run_once()  # back under generation 2, the old grant still on record as active
    st = check_grant(alloc, x.allocation_id)
    assert (st.current, st.reason, st.host_gen, st.gen) == (False, "stale_generation", 1, 2)
    with pytest.raises(StaleGrant, match="stale_generation .granted under generation 1, host is at 2"):
        require_current_grant(alloc, x.allocation_id)


def test_returning_host_after_full_reclaim_refuses_the_released_grant(alloc, placed, clock):
    agent, x = placed
    clock.advance(GRACE)
    reap_lost_hosts(alloc, GRACE)
    agent.run_once()
    assert check_grant(alloc, x.allocation_id).reason == "not_active"


def test_grant_on_a_removed_host_is_refused(alloc, placed):
    _, x = placed
    alloc.redis.delete(alloc.keys.host("h1"))  # what a lost Redis key or a bad restore looks like
    assert check_grant(alloc, x.allocation_id).reason == "host_missing"


def test_fencing_script_runs_on_redis_6_2(alloc_any, inventory):
    inventory.write([host("h1")])
    Agent(alloc_any, StaticProvider(inventory.path)).run_once()
    x = alloc_any.allocate({"cpu_cores": 1})
    assert alloc_any.grant_is_current(x.allocation_id)
