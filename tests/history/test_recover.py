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
from allocator.errors import AllocatorError, Recovering
from allocator.history import recover as rec_mod
from allocator.history.recorder import Recorder

from .fleet import FLEET, all_rows, allocation_row, events, register_fleet


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
