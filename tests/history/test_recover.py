"""``allocator recover``: after Redis lost its data, the active allocations come back from the history."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from sqlalchemy.engine import URL
from typer.testing import CliRunner

from allocator import Allocator, invariants
from allocator.cli import app
from allocator.errors import AllocatorError, InsufficientResources, Recovering
from allocator.history import recover as rec_mod
from allocator.history.recorder import Recorder

from tests.conftest import ledger_dump

from .fleet import FLEET, all_rows, allocation_row, events, hosts, register_fleet


def _active(a: Allocator) -> dict[str, tuple[Any, ...]]:
    """What each active allocation holds: host, GPU uuids and MiB, cores, shared CPU, RAM."""
    return {x.allocation_id: (x.host_id, sorted((g.uuid, g.memory_mb) for g in x.gpus), x.cpu_cores, x.cpu_shared, x.ram_mb,
                              x.task_type, x.owner)
            for x in a.list(state="active")}


def _workload(a: Allocator) -> None:
    register_fleet(a)
    a.allocate({"gpus": 1, "gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"}, task_type="train", owner="alice")
    a.allocate({"gpus": 1, "cpu_cores": 2}, task_type="train", owner="bob", ttl_seconds=None)
    a.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 0.5, "ram_mb": "1Gi"}, task_type="infer", owner="carol")
    done = a.allocate({"cpu_cores": 3}, task_type="etl")
    a.release(done.allocation_id)


def test_recover_after_flushing_redis_reproduces_the_active_allocations(alloc: Allocator, recorder: Recorder, engine) -> None:
    _workload(alloc)
    recorder.drain()
    before = _active(alloc)
    alloc.destroy()  # Redis lost every key of the namespace
    report = rec_mod.recover(alloc, engine)
    assert sorted(report.hosts_restored) == ["gpu-a", "gpu-b"] and len(report.restored) == 3 and not report.conflicts
    assert _active(alloc) == before
    assert invariants.check(alloc.snapshot()) == []
    assert not rec_mod.is_recovering(alloc)
    alloc.allocate({"cpu_cores": 1})  # placements are open again


def test_recover_works_while_agents_register_their_hosts(alloc: Allocator, recorder: Recorder, engine) -> None:
    _workload(alloc)
    recorder.drain()
    before = _active(alloc)
    alloc.destroy()
    alloc.register_host(FLEET[0])  # gpu-a's agent came back first
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.restored and report.deferred  # gpu-b's grants wait for gpu-b
    alloc.register_host(FLEET[1])  # gpu-b's agent registers: its usage is recomputed from the restored grants
    assert _active(alloc) == before
    assert invariants.check(alloc.snapshot()) == []
    cap = {h.host_id: h for h in alloc.capacity().hosts}
    assert cap["gpu-b"].gpu_memory_mb.available == 0  # bob's whole T4 is held again


def test_an_agent_registering_its_host_while_recover_restores_it_keeps_its_newer_inventory(
        alloc: Allocator, recorder: Recorder, engine, monkeypatch) -> None:
    register_fleet(alloc)
    recorder.drain()
    alloc.destroy()
    newer = {**FLEET[0], "gpus": [{**g, "used_mb": 4096} for g in FLEET[0]["gpus"]]}  # others took 4 GiB since
    register = alloc.register_host

    def agent_registers_first(host: Any = None, **kw: Any) -> Any:  # between recover's check and its call
        if isinstance(host, dict) and host.get("id") == "gpu-a" and not alloc.redis.exists(alloc.keys.host("gpu-a")):
            register(newer)
        return register(host, **kw)

    monkeypatch.setattr(alloc, "register_host", agent_registers_first)
    rec_mod.recover(alloc, engine)
    assert alloc.redis.hget(alloc.keys.host("gpu-a"), "g0:ext") == "4096"


def _host_state(a: Allocator, host_id: str) -> tuple[str | None, str | None]:
    return a.redis.hget(a.keys.host(host_id), "state"), a.redis.hget(a.keys.host(host_id), "drained_by")


def test_an_agents_own_drain_comes_back_as_the_agents(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-a", by_agent=True)  # its agent stopping
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert _host_state(alloc, "gpu-a") == ("draining", "agent")
    assert alloc.resume_host("gpu-a", by_agent=True) == "ready"  # so its next start resumes it


def test_an_operators_drain_comes_back_on_a_host_its_agent_registered_first(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-a", by_agent=True)
    alloc.drain_host("gpu-a")  # the operator takes the drain over
    recorder.drain()
    alloc.destroy()
    alloc.register_host(FLEET[0])  # its agent came back before the recovery: ready
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.drains_restored == ["gpu-a"]
    assert _host_state(alloc, "gpu-a") == ("draining", "operator")
    assert alloc.resume_host("gpu-a", by_agent=True) == "draining"  # an agent's start does not end it


def test_an_operators_drain_comes_back_on_a_host_its_agent_registers_after_the_recovery(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-a")
    recorder.drain()
    alloc.destroy()
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.drains_restored == ["gpu-a"]
    alloc.register_host(FLEET[0])  # its agent, after the recovery
    alloc.register_host(FLEET[1])
    assert _host_state(alloc, "gpu-a") == ("draining", "operator")
    assert _host_state(alloc, "gpu-b") == ("ready", None)
    recorder.drain()
    assert {r["host_id"]: (r["state"], r["drained_by"]) for r in all_rows(engine, alloc, hosts)} == {
        "gpu-a": ("draining", "operator"), "gpu-b": ("ready", None)}


def _history_state(engine, a: Allocator, recorder: Recorder) -> dict[str, tuple[str, str | None]]:
    recorder.drain()
    return {r["host_id"]: (r["state"], r["drained_by"]) for r in all_rows(engine, a, hosts)}


def test_an_operators_drain_of_a_host_lost_after_its_agent_registered_it_comes_back_at_its_registration(
        alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import mark_lost

    register_fleet(alloc)
    alloc.drain_host("gpu-a")
    recorder.drain()
    alloc.destroy()
    alloc.register_host(FLEET[0])  # its agent came back first...
    alloc.redis.zadd(alloc.keys.heartbeats, {"gpu-a": clock.now * 1000})
    clock.advance(100)
    assert mark_lost(alloc, "gpu-a", 30).declared  # ...and its machine died before the recovery ran
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.drains_restored == ["gpu-a"]
    alloc.register_host(FLEET[0])
    assert _host_state(alloc, "gpu-a") == ("draining", "operator")
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("draining", "operator")


def test_an_operators_drain_restored_over_an_agents_is_recorded_as_the_operators(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-a")
    recorder.drain()
    alloc.destroy()
    alloc.register_host(FLEET[0])
    alloc.drain_host("gpu-a", by_agent=True)  # its agent stopping again before the recovery
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.drains_restored == ["gpu-a"]
    assert _host_state(alloc, "gpu-a") == ("draining", "operator")
    assert alloc.resume_host("gpu-a", by_agent=True) == "draining"  # the agent's next start does not end it
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("draining", "operator")


def test_an_agents_drain_of_a_host_its_agent_registered_first_ends_in_the_history_too(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-a", by_agent=True)  # its agent stopping
    recorder.drain()
    alloc.destroy()
    alloc.register_host(FLEET[0])  # its agent started again: ready
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.drains_restored == []
    assert _host_state(alloc, "gpu-a") == ("ready", None)
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("ready", None)


def _lost_while_drained(alloc: Allocator, clock, *, by_agent: bool = False) -> None:
    """gpu-a drained (by its agent or an operator), then declared lost: no heartbeat for 100 s."""
    from allocator.agent.reaper import mark_lost

    alloc.drain_host("gpu-a", by_agent=by_agent)
    alloc.redis.zadd(alloc.keys.heartbeats, {"gpu-a": clock.now * 1000})
    clock.advance(100)
    assert mark_lost(alloc, "gpu-a", 30).declared


def _recovered_without_hosts_after_a_drain(alloc: Allocator, recorder: Recorder, engine, *, by_agent: bool = False) -> None:
    """gpu-a drained (by its agent or an operator) and recorded; Redis loses its data; recover
    --no-hosts: no agent has registered gpu-a again yet."""
    register_fleet(alloc)
    alloc.drain_host("gpu-a", by_agent=by_agent)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine, with_hosts=False)


def test_an_agents_drain_of_a_host_not_registered_yet_ends_in_the_history_too(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    _recovered_without_hosts_after_a_drain(alloc, recorder, engine, by_agent=True)
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("ready", None)
    alloc.register_host(FLEET[0])  # its agent's next start
    assert _host_state(alloc, "gpu-a") == ("ready", None)


def test_resuming_a_host_whose_restored_drain_waits_for_its_registration_withdraws_the_drain(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    _recovered_without_hosts_after_a_drain(alloc, recorder, engine)  # the drain waits for gpu-a's registration
    assert alloc.resume_host("gpu-a") == "unregistered"
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("ready", None)
    alloc.register_host(FLEET[0])
    assert _host_state(alloc, "gpu-a") == ("ready", None)


def test_removing_a_host_whose_restored_drain_waits_for_its_registration_succeeds_and_is_recorded(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    _recovered_without_hosts_after_a_drain(alloc, recorder, engine)  # the drain waits for gpu-a's registration
    assert alloc.remove_host("gpu-a") == []
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("removed", None)
    alloc.register_host(FLEET[0])  # registered again later: a new host, not drained
    assert _host_state(alloc, "gpu-a") == ("ready", None)
    with pytest.raises(AllocatorError, match="not registered"):
        alloc.remove_host("gpu-z")


def test_an_operators_drain_of_a_host_lost_before_the_data_comes_back_at_its_registration(
        alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    register_fleet(alloc)
    _lost_while_drained(alloc, clock)  # its agent stopped (or its machine died), drain kept
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("lost", "operator")
    alloc.destroy()
    report = rec_mod.recover(alloc, engine)
    assert "gpu-a" not in report.hosts_restored and report.drains_restored == ["gpu-a"]
    alloc.register_host(FLEET[0])  # its agent's next start
    assert _host_state(alloc, "gpu-a") == ("draining", "operator")
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("draining", "operator")


@pytest.mark.parametrize("with_drain", [True, False])
def test_removing_a_host_whose_restored_allocations_wait_for_it_needs_force_and_ends_them(
        alloc: Allocator, recorder: Recorder, engine, with_drain: bool) -> None:
    from allocator.errors import HostBusy

    register_fleet(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_model": "A100"})
    assert x.host_id == "gpu-a"
    if with_drain:
        alloc.drain_host("gpu-a")
    recorder.drain()
    alloc.destroy()
    assert rec_mod.recover(alloc, engine, with_hosts=False).deferred == [x.allocation_id]
    before = ledger_dump(alloc)
    with pytest.raises(HostBusy):
        alloc.remove_host("gpu-a")
    assert ledger_dump(alloc) == before
    assert alloc.remove_host("gpu-a", force=True) == [x.allocation_id]
    assert alloc.get(x.allocation_id).state == "released"
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("removed", None)
    alloc.register_host(FLEET[0])  # a new host under the old id: nothing held, not drained
    assert _host_state(alloc, "gpu-a") == ("ready", None)
    assert invariants.check(alloc.snapshot()) == []


def test_an_agents_drain_ends_in_the_history_when_its_lost_host_registers_again(
        alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    register_fleet(alloc)
    _lost_while_drained(alloc, clock, by_agent=True)
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("lost", "agent")
    alloc.register_host(FLEET[0])  # a new start of its agent
    assert _host_state(alloc, "gpu-a") == ("ready", None)
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("ready", None)


def test_an_agents_drain_of_a_host_lost_before_the_data_ends_with_the_recovery(
        alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    register_fleet(alloc)
    _lost_while_drained(alloc, clock, by_agent=True)
    recorder.drain()
    alloc.destroy()
    assert rec_mod.recover(alloc, engine).drains_restored == []
    alloc.register_host(FLEET[0])
    assert _host_state(alloc, "gpu-a") == ("ready", None)
    assert _history_state(engine, alloc, recorder)["gpu-a"] == ("ready", None)


def test_a_restored_allocation_that_ends_before_its_host_registers_leaves_the_host_holding_nothing(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_model": "A100"})
    recorder.drain()
    alloc.destroy()
    assert rec_mod.recover(alloc, engine, with_hosts=False).deferred == [x.allocation_id]
    alloc.release(x.allocation_id)  # its owner is done before the agent comes back
    assert alloc.redis.scard(alloc.keys.host_allocs("gpu-a")) == 0
    alloc.register_host(FLEET[0])
    assert {h.host_id: h.active_allocations for h in alloc.capacity().hosts}["gpu-a"] == 0
    assert invariants.check(alloc.snapshot()) == []
    assert alloc.remove_host("gpu-a") == []  # nothing holds it


def test_a_host_whose_recorded_inventory_is_refused_now_does_not_stop_the_recovery(
        alloc: Allocator, recorder: Recorder, engine) -> None:
    from sqlalchemy import update

    register_fleet(alloc)
    recorder.drain()
    spec = next(r["spec"] for r in all_rows(engine, alloc, hosts) if r["host_id"] == "gpu-a")
    bad = {**spec, "gpus": [{**g, "model": "A100\tSXM"} for g in spec["gpus"]]}  # accepted by an earlier release
    with engine.begin() as conn:
        conn.execute(update(hosts).where(hosts.c.namespace == alloc.keys.namespace, hosts.c.host_id == "gpu-a")
                     .values(spec=bad))
    alloc.destroy()
    report = rec_mod.recover(alloc, engine)
    assert report.hosts_restored == ["gpu-b"] and [h["host_id"] for h in report.hosts_refused] == ["gpu-a"]
    assert not rec_mod.is_recovering(alloc)


def test_recover_writes_a_refused_host_id_from_the_history_as_escapes_not_terminal_codes(
        alloc: Allocator, recorder: Recorder, engine, database_url: URL) -> None:
    from sqlalchemy import update

    register_fleet(alloc)
    recorder.drain()
    bad = "gpu-b\x1b]0;PWNED\x07"  # an id an earlier release accepted
    with engine.begin() as conn:
        conn.execute(update(hosts).where(hosts.c.namespace == alloc.keys.namespace, hosts.c.host_id == "gpu-b")
                     .values(host_id=bad))
    alloc.destroy()
    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    r = CliRunner().invoke(app, ["recover", "--database-url", database_url.render_as_string(hide_password=False),
                                 "--redis-url", url, "--namespace", alloc.keys.namespace])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\\x1b]0;PWNED\\x07" in r.output


def test_a_restored_lease_keeps_its_hint_for_the_estimates(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    held = alloc.allocate({"gpus": 1, "gpu_model": "T4"}, expected_duration=3600, ttl_seconds=600)  # ends at its TTL
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.hget(alloc.keys.alloc(held.allocation_id), "expected_ms") == "3600000"


def test_tasks_that_waited_in_line_are_reported_lost(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    waiting = alloc.allocate({"cpu_cores": 1, "gpus": 64}, on_busy="queue")  # no host has 64 GPUs: it waits
    recorder.drain()
    alloc.destroy()
    report = rec_mod.recover(alloc, engine)
    assert report.lost == [waiting.allocation_id]


def test_placements_are_refused_while_recovering(alloc: Allocator) -> None:
    register_fleet(alloc)
    assert rec_mod.begin(alloc)
    with pytest.raises(Recovering):
        alloc.allocate({"cpu_cores": 1})
    assert rec_mod.finish(alloc)
    alloc.allocate({"cpu_cores": 1})


def test_restoring_outside_recovery_is_refused(alloc: Allocator) -> None:
    with pytest.raises(AllocatorError, match="recovery gate"):
        rec_mod._script(alloc, "restore_allocation", "[]")


def test_recovering_twice_changes_nothing(alloc: Allocator, recorder: Recorder, engine) -> None:
    _workload(alloc)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    snap = _active(alloc)
    again = rec_mod.recover(alloc, engine)
    assert len(again.existing) == 3 and not again.restored and _active(alloc) == snap


def test_a_grant_that_no_longer_fits_is_closed_not_oversubscribed(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.register_host(id="solo", cpu_cores=4, ram_mb=1024)
    old = alloc.allocate({"cpu_cores": 4}, task_type="old")
    recorder.drain()
    alloc.destroy()
    alloc.register_host(id="solo", cpu_cores=4, ram_mb=1024)
    alloc.allocate({"cpu_cores": 2})  # slipped in before recovery started
    report = rec_mod.recover(alloc, engine)
    assert [c["id"] for c in report.conflicts] == [old.allocation_id]
    assert invariants.check(alloc.snapshot()) == []
    recorder.drain()
    row = allocation_row(engine, alloc, old.allocation_id)
    assert (row["state"], row["release_reason"]) == ("released", "recovery_conflict")


def test_restored_allocations_are_recorded_as_restored_not_allocated_again(alloc: Allocator, recorder: Recorder, engine) -> None:
    _workload(alloc)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    recorder.drain()
    types = Counter(e["type"] for e in all_rows(engine, alloc, events))
    assert (types["allocated"], types["restored"], types["recovery_started"], types["recovery_finished"]) == (4, 3, 1, 1)
    assert all(allocation_row(engine, alloc, i)["state"] == "active" for i in _active(alloc))


def test_cli_recover_prints_the_report(alloc: Allocator, recorder: Recorder, engine, database_url: URL, redis_url: str) -> None:
    _workload(alloc)
    recorder.drain()
    alloc.destroy()
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False), "ALLOCATOR_REDIS_URL": redis_url,
           "ALLOCATOR_NAMESPACE": alloc.keys.namespace}
    r = CliRunner().invoke(app, ["recover", "--json"], env=env)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] and out["restored"] == 3 and sorted(out["hosts_restored"]) == ["gpu-a", "gpu-b"]


def test_a_running_job_comes_back_with_the_deadline_its_claim_set(alloc: Allocator, recorder: Recorder, engine) -> None:
    from allocator.agent.fencing import claim_grant

    from .. import jobs

    register_fleet(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=60)
    claim = claim_grant(alloc, task.id, "w1", alloc.get(task.id).host_id, start=True, run_lease_s=7200)
    recorder.drain()
    assert allocation_row(engine, alloc, task.id)["expires_at"] == alloc.get(task.id).expires_at
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) == claim.expires_ms
    assert alloc.redis.zscore(alloc.keys.ends, task.id) == claim.expires_ms  # the end the claim moved
    assert invariants.check(alloc.snapshot()) == []


def test_a_job_whose_run_ended_meanwhile_is_closed_not_restored(alloc: Allocator, recorder: Recorder, engine) -> None:
    from rq.job import Job

    from allocator.agent.fencing import claim_grant

    from .. import jobs

    register_fleet(alloc)
    ran = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    claim_grant(alloc, ran.id, "w1", alloc.get(ran.id).host_id, start=True)
    running = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    claim_grant(alloc, running.id, "w1", alloc.get(running.id).host_id, start=True)
    placed = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})  # placed, not started (as far as the history knows)
    recorder.drain()
    alloc.destroy()  # Redis lost the namespace's data, its RQ jobs included...
    alloc.rq_connection.hset(Job.key_for(ran.id), mapping={"status": "finished", "origin": f"{alloc.keys.namespace}.low"})
    report = rec_mod.recover(alloc, engine)  # (RQ wrote that run's end since; destroy() deletes it with its origin)
    assert report.ended == [ran.id]
    assert (alloc.get(ran.id).state, alloc.get(ran.id).release_reason) == ("released", "released")
    # A job whose hash is gone may still run (RQ does not write a running job's hash again): restored.
    assert sorted(report.restored) == sorted([running.id, placed.id])
    assert invariants.check(alloc.snapshot()) == []


def test_a_running_job_without_time_limit_comes_back_without_deadline(alloc: Allocator, recorder: Recorder, engine) -> None:
    import math

    from allocator.agent.fencing import claim_grant

    from .. import jobs

    register_fleet(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=60, job_timeout=-1)
    claim_grant(alloc, task.id, "w1", alloc.get(task.id).host_id, start=True, run_lease_s=math.inf)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) is None
    assert alloc.redis.zscore(alloc.keys.ends, task.id) is None
    assert invariants.check(alloc.snapshot()) == []


def test_a_duration_hint_gives_the_restored_allocation_its_expected_end(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1}, expected_duration=90)
    placed_end = alloc.redis.zscore(alloc.keys.ends, x.allocation_id)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.zscore(alloc.keys.ends, x.allocation_id) == placed_end


def test_a_restored_host_keeps_its_reserved_gpus_worker_slots_and_service_ports(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.register_host({"id": "rich", "cpu_cores": 8, "ram_mb": "64Gi", "worker_slots": 2, "reserve_gpus": 1,
                         "service_ports": [9100, 9110],
                         "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi", "used_mb": 1024},
                                  {"index": 1, "model": "A100", "memory_mb": "40Gi"}]})
    before = alloc.redis.hgetall(alloc.keys.host("rich"))
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    after = alloc.redis.hgetall(alloc.keys.host("rich"))
    kept = ("reserve_gpus", "slots", "port_lo", "port_hi", "g0:ext", "g0:uuid", "g1:uuid", "ncores", "ram")
    assert {k: after.get(k) for k in kept} == {k: before[k] for k in kept}


def test_restored_hosts_keep_their_registration_order(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    for h in ("zeta", "alpha", "mid"):
        alloc.register_host(id=h, cpu_cores=2, ram_mb=1024)
        clock.advance(1)
    alloc.register_host(id="zeta", cpu_cores=4, ram_mb=1024)  # an update moves no host in the order
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.zrange(alloc.keys.hosts, 0, -1) == ["zeta", "alpha", "mid"]


def test_a_restored_allocation_holds_its_worker_slots_again(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.register_host(id="w", cpu_cores=8, ram_mb="64Gi", worker_slots=2)
    x = alloc.allocate({"cpu_cores": 1, "workers": 2}, owner="o")
    recorder.drain()
    alloc.destroy()
    alloc.register_host(id="w", cpu_cores=8, ram_mb="64Gi", worker_slots=2)  # its agent re-registers first
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert report.restored == [x.allocation_id]
    assert alloc.get(x.allocation_id).workers == 2
    assert alloc.redis.hget(alloc.keys.host("w"), "slots_used") == "2"
    with pytest.raises(InsufficientResources, match="worker slots"):  # the host's slots are all held
        alloc.allocate({"cpu_cores": 1, "workers": 1})


def test_a_whole_gpu_grant_grown_since_it_was_recorded_is_restored_whole(alloc: Allocator, recorder: Recorder, engine) -> None:
    gpu = {"index": 0, "uuid": "U0", "memory_mb": "16Gi"}
    alloc.register_host(id="g", cpu_cores=4, ram_mb="16Gi", gpus=[{**gpu, "used_mb": "1Gi"}])
    x = alloc.allocate({"gpus": 1, "cpu_cores": 1})  # recorded with the 15 GiB then free
    recorder.drain()
    alloc.register_host(id="g", cpu_cores=4, ram_mb="16Gi", gpus=[gpu])  # the grant grows to 16 GiB
    alloc.destroy()
    alloc.register_host(id="g", cpu_cores=4, ram_mb="16Gi", gpus=[gpu])  # its agent re-registers first
    assert rec_mod.recover(alloc, engine, with_hosts=False).restored == [x.allocation_id]
    assert alloc.get(x.allocation_id).gpus[0].memory_mb == 16384
    assert alloc.would_fit({"gpus": 1, "gpu_memory_mb": "1Gi"}) is None
    assert invariants.check(alloc.snapshot()) == []


def test_a_grant_whose_worker_slots_are_taken_is_closed_not_oversubscribed(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.register_host(id="w", cpu_cores=8, ram_mb="64Gi", worker_slots=2)
    old = alloc.allocate({"cpu_cores": 0.5, "workers": 2}, task_type="old")
    recorder.drain()
    alloc.destroy()
    alloc.register_host(id="w", cpu_cores=8, ram_mb="64Gi", worker_slots=2)
    alloc.allocate({"cpu_cores": 0.5, "workers": 1})  # slipped in before recovery started
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert [c["id"] for c in report.conflicts] == [old.allocation_id]
    assert "worker slots" in report.conflicts[0]["reason"]
    assert invariants.check(alloc.snapshot()) == []


def test_a_grant_made_after_its_host_came_back_from_lost_stays_current(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import mark_lost

    spec = {"id": "h1", "cpu_cores": 8, "ram_mb": "64Gi", "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}]}
    alloc.register_host(spec)
    alloc.redis.zadd(alloc.keys.heartbeats, {"h1": clock.now * 1000})
    clock.advance(100)
    assert mark_lost(alloc, "h1", 30).declared
    alloc.register_host(spec)  # back under generation 2
    x = alloc.allocate({"gpus": 1, "cpu_cores": 2})
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    assert alloc.redis.hget(alloc.keys.host("h1"), "gen") == "2"
    assert alloc.grant_is_current(x.allocation_id)
    alloc.redis.zadd(alloc.keys.reclaim, {"h1": clock.now * 1000})
    mark_lost(alloc, "h1", 30)  # the reaper's sweep of stale grants leaves it alone
    assert alloc.get(x.allocation_id).state == "active"
    assert invariants.check(alloc.snapshot()) == []


def test_a_deferred_grant_raises_the_generation_of_the_host_its_agent_registers(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import mark_lost

    spec = {"id": "h1", "cpu_cores": 8, "ram_mb": "64Gi"}
    alloc.register_host(spec)
    alloc.redis.zadd(alloc.keys.heartbeats, {"h1": clock.now * 1000})
    clock.advance(100)
    mark_lost(alloc, "h1", 30)
    alloc.register_host(spec)  # back under generation 2
    x = alloc.allocate({"cpu_cores": 2})
    recorder.drain()
    alloc.destroy()
    assert rec_mod.recover(alloc, engine, with_hosts=False).deferred == [x.allocation_id]
    alloc.register_host(spec)  # the agent registers the host after the recovery
    assert alloc.redis.hget(alloc.keys.host("h1"), "gen") == "2"
    assert alloc.grant_is_current(x.allocation_id)


def test_with_watch_hosts_a_restored_host_is_declared_lost_when_no_agent_reports(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import reap_lost_hosts

    spec = {"id": "h1", "cpu_cores": 8, "ram_mb": "64Gi", "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}]}
    alloc.register_host(spec)
    x = alloc.allocate({"gpus": 1, "cpu_cores": 2})
    recorder.drain()
    alloc.destroy()  # the machine died with the data: its agent never reports again
    assert rec_mod.recover(alloc, engine, watch_hosts=True).hosts_restored == ["h1"]
    assert reap_lost_hosts(alloc, 30) == []  # within the grace
    clock.advance(31)
    (lost,) = reap_lost_hosts(alloc, 30)
    assert lost.declared and lost.released == [x.allocation_id]
    assert alloc.get(x.allocation_id).release_reason == "host_lost"


def test_a_grant_on_a_host_declared_lost_before_recover_is_a_conflict(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import mark_lost

    spec = {"id": "h1", "cpu_cores": 8, "ram_mb": "64Gi", "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}]}
    alloc.register_host(spec)
    x = alloc.allocate({"gpus": 1, "cpu_cores": 2})
    recorder.drain()
    alloc.destroy()
    alloc.register_host(spec)  # its agent registered the host again, then stopped reporting
    alloc.redis.zadd(alloc.keys.heartbeats, {"h1": clock.now * 1000})
    clock.advance(100)
    assert mark_lost(alloc, "h1", 30).declared
    report = rec_mod.recover(alloc, engine, with_hosts=False)
    assert [c["id"] for c in report.conflicts] == [x.allocation_id]
    alloc.register_host(spec)  # back under generation 2: nothing stale is left held
    assert alloc.capacity().gpus_idle == 1
    assert invariants.check(alloc.snapshot()) == []


def test_without_watch_hosts_a_restored_host_without_an_agent_stays_unwatched(alloc: Allocator, recorder: Recorder, engine, clock) -> None:
    from allocator.agent.reaper import reap_lost_hosts

    alloc.register_host({"id": "h1", "cpu_cores": 8, "ram_mb": "64Gi"})  # by hand: no agent serves it
    x = alloc.allocate({"cpu_cores": 2}, ttl_seconds=None)
    recorder.drain()
    alloc.destroy()
    rec_mod.recover(alloc, engine)
    clock.advance(3600)
    assert reap_lost_hosts(alloc, 30) == []
    assert alloc.get(x.allocation_id).state == "active"
