"""The worker's two script calls per job, without a worker process: the claim that also returns the
grant and records ``started`` (``claim_grant`` with start), and ``finish_job``, which drops the
horse's pid, requeues a preempted task or records ``finished`` and releases the claimed placement."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
import redis
from rq.job import Job

from allocator import invariants
from allocator.agent import _redis
from allocator.agent.fencing import claim_grant, finish_job
from allocator.errors import InvalidRequest
from allocator.models import MAX_SECONDS

from . import jobs
from .conftest import ledger_dump

CORES = sorted(os.sched_getaffinity(0))


def gpu_host(a, host: str = "h1") -> None:
    a.register_host(id=host, cpu_cores=CORES, ram_mb="8Gi",
                    gpus=[{"index": 0, "uuid": "GPU-11111111", "model": "T4", "memory_mb": "16Gi"},
                          {"index": 1, "uuid": "GPU-22222222", "model": "T4", "memory_mb": "16Gi"}])


def events_of(a, aid: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [{**f, "data": json.loads(f["data"])} for _, f in a.redis.xrange(a.keys.events)
            if f.get("id") == aid and (kind is None or f.get("type") == kind)]


def started_job(a, resources: dict[str, Any], *, host: str = "h1", pid: int = 4242) -> tuple[Any, Any]:
    """A placed function task claimed by worker "w1", its horse's pid in the host's map, RQ
    status "started" as a running job has."""
    task = a.enqueue(jobs.add, 1, 2, resources=resources)
    claim = claim_grant(a, task.id, "w1", host, start=True)
    assert claim.current, claim.reason
    a.redis.hset(a.keys.host_pids(host), str(pid), task.id)
    a.rq_connection.hset(Job.key_for(task.id), mapping={"status": "started", "worker_name": "w1"})
    return task, claim


def test_claim_with_start_returns_the_grant_and_records_started(alloc_any, clock):
    alloc = alloc_any  # also on Redis 6.2
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1})
    before = len(events_of(alloc, task.id))
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True)
    rec = alloc.get(task.id)
    assert (claim.current, claim.reason) == (True, "ok")
    g = claim.grant
    assert [(x["uuid"], x["index"], x["memory_mb"]) for x in g.gpus] == [(x.uuid, x.index, x.memory_mb) for x in rec.gpus]
    assert (g.cores, g.shared_millis, g.pool, g.cpu_amount) == (rec.cpu_cores, 0, [], 1.0)
    events = events_of(alloc, task.id)
    assert len(events) == before + 1
    ev = events[-1]
    now = round(clock.now * 1000)
    assert (ev["type"], ev["ts"], ev["data"]) == ("started", str(now), {"host": "h1", "worker": "w1", "started": now})
    again = claim_grant(alloc, task.id, "w2", "h1", start=True)
    assert (again.current, again.reason, again.grant) == (False, "already_claimed", None)
    assert len(events_of(alloc, task.id, "started")) == 1


def test_the_same_workers_claim_sent_again_gets_the_same_answer(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=600)
    first = claim_grant(alloc, task.id, "w1", "h1", pid=4242, start=True, run_lease_s=60)
    clock.advance(5)
    # The reply to the first call was lost and the client sent it again.
    again = claim_grant(alloc, task.id, "w1", "h1", pid=4242, start=True, run_lease_s=60)
    assert (again.current, again.reason, again.expires_ms, again.grant) == (True, "ok", first.expires_ms, first.grant)
    assert len(events_of(alloc, task.id, "started")) == 1
    other_run = claim_grant(alloc, task.id, "w1", "h1", pid=5353, start=True)  # a second copy of the queue entry
    assert (other_run.current, other_run.reason) == (False, "already_claimed")


def test_destroy_also_deletes_rq_keys_of_the_namespace(redis_url, clock):
    from allocator import Allocator

    a = Allocator(redis_url, namespace="test-rq-" + uuid.uuid4().hex[:8], clock=clock)
    gpu_host(a)
    placed = a.enqueue(jobs.add, 1, 2, resources={"gpus": 1})  # on the host's queue
    waiting = a.enqueue(jobs.add, 3, 4, resources={"gpus": 1}, job_id="waiting-" + uuid.uuid4().hex[:8])  # in line
    assert a.redis.exists(f"rq:job:{placed.id}", f"rq:job:{waiting.id}") == 2
    a.destroy()
    left = list(a.redis.scan_iter(match=a.keys.rq_queue_pattern()))
    assert left == [] and a.redis.exists(f"rq:job:{placed.id}", f"rq:job:{waiting.id}") == 0
    assert not [q for q in a.redis.smembers(a.keys.RQ_QUEUES) if q.startswith(a.keys.rq_queue_prefix())]


def test_destroy_also_deletes_the_registry_of_a_jobs_runs_that_rq_leaves_behind(redis_url, clock):
    from allocator import Allocator

    a = Allocator(redis_url, namespace="test-rq-" + uuid.uuid4().hex[:8], clock=clock)
    gpu_host(a)
    task = a.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    a.rq_connection.zadd(f"rq:executions:{task.id}", {"e1": 1})  # as a worker's run records it
    a.destroy()
    assert not a.redis.exists(f"rq:executions:{task.id}")


def test_destroy_unregisters_workers_of_the_namespace_only(redis_url, clock):
    from allocator import Allocator

    a = Allocator(redis_url, namespace="test-rq-" + uuid.uuid4().hex[:8], clock=clock)
    ns = a.keys.namespace
    mine, shared = f"rq:worker:{ns}-w1", f"rq:worker:{ns}-w2"
    a.redis.hset(mine, mapping={"queues": f"{ns}.host.h1", "current_job": "gone"})  # killed, still registered
    a.redis.hset(shared, mapping={"queues": f"{ns}.host.h1,other.host.h1"})
    a.redis.sadd(a.keys.RQ_WORKERS, mine, shared)
    try:
        a.destroy()
        assert a.redis.sismember(a.keys.RQ_WORKERS, mine) == 0 and a.redis.exists(mine) == 0
        assert a.redis.sismember(a.keys.RQ_WORKERS, shared) == 1  # it serves another namespace too
    finally:
        a.redis.srem(a.keys.RQ_WORKERS, shared)
        a.redis.delete(shared)


def test_claim_without_start_records_nothing(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    claim = claim_grant(alloc, task.id, "w1", "h1")
    assert claim.current and claim.grant is None
    assert events_of(alloc, task.id, "started") == []


def test_shared_cpu_grant_gets_the_cores_nobody_holds(alloc):
    gpu_host(alloc)
    held = alloc.allocate({"cpu_cores": 1})
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": "0.5"})
    g = claim_grant(alloc, task.id, "w1", "h1", start=True).grant
    assert (g.cores, g.shared_millis, g.cpu_amount) == ([], 500, 0.5)
    assert g.pool == [c for c in CORES if c not in held.cpu_cores]


def test_a_grant_without_cpu_gets_the_cores_nobody_holds_too(alloc):
    gpu_host(alloc)
    held = alloc.allocate({"cpu_cores": 1})
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1, "cpu_cores": 0})
    g = claim_grant(alloc, task.id, "w1", "h1", start=True).grant
    assert (g.cores, g.shared_millis) == ([], 0)
    assert g.pool == [c for c in CORES if c not in held.cpu_cores]


def test_refused_claim_records_no_start(alloc):
    gpu_host(alloc)
    gpu_host(alloc, "h2")
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    other = "h2" if alloc.get(task.id).host_id == "h1" else "h1"
    claim = claim_grant(alloc, task.id, "w1", other, start=True)
    assert (claim.current, claim.reason, claim.grant) == (False, "wrong_host", None)
    assert events_of(alloc, task.id, "started") == []


def test_finished_job_is_recorded_and_released_in_one_call(alloc_any, clock):
    alloc = alloc_any  # also on Redis 6.2
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 1})
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "finished")
    clock.advance(2)
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert (end.released, end.requeued, end.stale, end.status) == (True, False, False, "finished")
    assert alloc.redis.hlen(alloc.keys.host_pids("h1")) == 0
    rec = alloc.get(task.id)
    assert (rec.state, rec.release_reason) == ("released", "released")
    assert alloc.capacity().gpus_idle == 2
    kinds = [e["type"] for e in events_of(alloc, task.id)]
    assert kinds[-2:] == ["finished", "released"]
    fin = events_of(alloc, task.id, "finished")[-1]
    assert (fin["ts"], fin["data"]) == (str(round(clock.now * 1000)), {"host": "h1", "status": "finished", "outcome": "ok"})


def test_failed_job_is_released_as_failed(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"cpu_cores": 1})
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "failed")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert end.released and end.status == "failed"
    assert (alloc.get(task.id).state, alloc.get(task.id).release_reason) == ("failed", "failed")
    assert events_of(alloc, task.id, "finished")[-1]["data"] == {"host": "h1", "status": "failed", "outcome": "failed"}


def test_status_given_by_the_caller_wins_and_a_gone_job_hash_is_a_failure(alloc):
    gpu_host(alloc)
    given, c1 = started_job(alloc, {"cpu_cores": 1}, pid=1)
    gone, c2 = started_job(alloc, {"cpu_cores": 1}, pid=2)
    alloc.rq_connection.delete(Job.key_for(gone.id))
    assert finish_job(alloc, given.id, "h1", c1.token, horse_pid=1, status="finished",
                      job_key=Job.key_for(given.id)).status == "finished"
    assert alloc.get(given.id).release_reason == "released"
    assert finish_job(alloc, gone.id, "h1", c2.token, horse_pid=2, job_key=Job.key_for(gone.id)).status == "None"
    assert alloc.get(gone.id).state == "failed"
    assert events_of(alloc, gone.id, "finished")[-1]["data"] == {"host": "h1", "status": "None", "outcome": "None"}


def test_outcome_from_the_worker_counts_when_the_job_hash_is_gone(alloc):
    # A successful job enqueued with result_ttl=0: RQ deletes its hash before the worker's call.
    gpu_host(alloc)
    task, claim = started_job(alloc, {"cpu_cores": 1})
    alloc.rq_connection.delete(Job.key_for(task.id))
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, outcome="finished",
                     job_key=Job.key_for(task.id))
    assert (end.released, end.status) == (True, "finished")
    assert (alloc.get(task.id).state, alloc.get(task.id).release_reason) == ("released", "released")
    assert events_of(alloc, task.id, "finished")[-1]["data"] == {"host": "h1", "status": "finished", "outcome": "ok"}


def test_job_hash_still_present_wins_over_the_workers_outcome(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"cpu_cores": 1})
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "failed")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, outcome="finished",
                     job_key=Job.key_for(task.id))
    assert end.status == "failed"
    assert alloc.get(task.id).release_reason == "failed"


def waiting_job_whose_rq_job_expired(a, resources: dict[str, Any]) -> Any:
    """A function task in line behind a lease holding both GPUs, its RQ job hash gone as when the
    job's RQ ``ttl`` runs out while it waits; returns (task, the blocking lease)."""
    blocker = a.allocate({"gpus": 2})
    task = a.enqueue(jobs.add, 1, 2, resources=resources)
    assert a.get(task.id).state == "pending"
    a.rq_connection.delete(Job.key_for(task.id))
    return task, blocker


def test_a_waiting_job_whose_rq_job_is_gone_leaves_the_line_instead_of_being_placed(alloc):
    gpu_host(alloc)
    task, blocker = waiting_job_whose_rq_job_expired(alloc, {"gpus": 1})
    alloc.release(blocker.allocation_id)  # its pass would place the task
    rec = alloc.get(task.id)
    assert (rec.state, rec.release_reason, rec.host_id) == ("cancelled", "job_gone", None)
    assert alloc.redis.zcard(alloc.keys.pending) == 0
    assert not alloc.rq_connection.exists(Job.key_for(task.id))  # no stub hash without expiry
    assert alloc.rq_connection.llen(f"rq:queue:{alloc.keys.namespace}.host.h1") == 0
    assert [e["data"] for e in events_of(alloc, task.id, "cancelled")] == [{"reason": "job_gone"}]
    assert alloc.capacity().gpus_idle == 2
    assert invariants.check(alloc.snapshot()) == []


def test_a_job_gone_from_rq_does_not_hold_up_the_task_behind_it(alloc):
    gpu_host(alloc)
    gone, blocker = waiting_job_whose_rq_job_expired(alloc, {"gpus": 2})
    behind = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2})
    alloc.release(blocker.allocation_id)
    assert alloc.get(gone.id).state == "cancelled"
    assert (alloc.get(behind.id).state, alloc.get(behind.id).host_id) == ("active", "h1")


@pytest.mark.parametrize("rq_status", ["queued", "scheduled"])
def test_a_failed_run_rq_will_retry_puts_the_task_back_in_line_under_its_id(alloc, rq_status):
    # RQ's Retry re-enqueued the job in the host queue ("queued") or its scheduled registry
    # ("scheduled", with an interval) before the worker's call: the task must be placed again.
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    hostq = f"{alloc.keys.namespace}.host.h1"
    alloc.rq_connection.hset(Job.key_for(task.id), "status", rq_status)
    if rq_status == "queued":
        alloc.rq_connection.rpush(f"rq:queue:{hostq}", task.id)
    else:
        alloc.rq_connection.zadd(f"rq:scheduled:{hostq}", {task.id: 1})
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (True, True)
    rec = alloc.get(task.id)
    assert (rec.state, rec.host_id, rec.requeues) == ("active", "h1", 1)  # its own freed GPUs
    assert alloc.rq_connection.lrange(f"rq:queue:{hostq}", 0, -1) == [task.id.encode()]
    assert alloc.rq_connection.zcard(f"rq:scheduled:{hostq}") == 0
    assert claim_grant(alloc, task.id, "w1", "h1", start=True).current
    assert invariants.check(alloc.snapshot()) == []


def retried_later(a, task, claim, *, in_s: int) -> int:
    """RQ's Retry(interval=in_s) scheduled the failed job in its host queue's scheduled registry
    (score: when, in seconds) before the worker's finish_job; returns that time in ms."""
    at = math.floor(a.clock()) + in_s
    hostq = f"{a.keys.namespace}.host.h1"
    a.rq_connection.hset(Job.key_for(task.id), "status", "scheduled")
    a.rq_connection.zadd(f"rq:scheduled:{hostq}", {task.id: at})
    end = finish_job(a, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (True, True)
    return at * 1000


def test_a_retry_with_an_interval_waits_in_line_until_its_time(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    at_ms = retried_later(alloc, task, claim, in_s=30)
    rec = alloc.get(task.id)
    assert (rec.state, rec.not_before, alloc.position(task.id)) == ("pending", datetime.fromtimestamp(at_ms / 1000, timezone.utc), 1)
    clock.advance(29)
    assert alloc.schedule() == [] and alloc.get(task.id).state == "pending"
    clock.advance(1)
    assert alloc.schedule() == [task.id]
    rec = alloc.get(task.id)
    assert (rec.state, rec.host_id, rec.not_before) == ("active", "h1", None)
    assert alloc.redis.zcard(alloc.keys.delayed) == 0
    assert invariants.check(alloc.snapshot()) == []


def test_a_task_waiting_for_its_retry_interval_holds_up_no_one(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    behind = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2})  # waits for the two GPUs
    retried_later(alloc, task, claim, in_s=30)  # frees them, but may not take them back yet
    assert (alloc.get(behind.id).state, alloc.get(task.id).state) == ("active", "pending")
    assert alloc.position(task.id) == 1


def test_the_estimated_start_of_a_retry_is_when_its_interval_ends(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    at_ms = retried_later(alloc, task, claim, in_s=30)
    assert alloc.estimated_start_time(task.id) == datetime.fromtimestamp(at_ms / 1000, timezone.utc)


def test_a_retry_whose_interval_ends_first_is_estimated_to_start_when_its_gpus_free(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    retried_later(alloc, task, claim, in_s=30)
    lease = alloc.allocate({"gpus": 2}, expected_duration=60)  # takes the GPUs meanwhile
    assert lease.state == "active"
    ends = lease.activated_at.timestamp() + 60
    assert alloc.estimated_start_time(task.id) == datetime.fromtimestamp(ends, timezone.utc)


def test_a_due_retry_keeps_its_place_ahead_of_a_task_submitted_after_its_interval(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    retried_later(alloc, task, claim, in_s=30)
    clock.advance(31)  # due, and no pass has run since
    later = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2})
    assert (alloc.get(task.id).state, alloc.get(later.id).state) == ("active", "pending")


def test_a_due_retry_met_by_a_pass_becomes_an_ordinary_task_in_line(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    retried_later(alloc, task, claim, in_s=30)
    holder = alloc.allocate({"gpus": 1})  # the retry will not fit when due
    clock.advance(30)
    assert alloc.schedule() == []
    rec = alloc.get(task.id)
    assert (rec.state, rec.not_before, alloc.redis.zcard(alloc.keys.delayed)) == ("pending", None, 0)
    alloc.release(holder.allocation_id)
    assert alloc.get(task.id).state == "active"


def test_retries_due_at_the_same_moment_are_estimated_in_their_order_in_line(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=CORES, ram_mb="8Gi",
                        gpus=[{"index": 0, "uuid": "GPU-1", "model": "T4", "memory_mb": "16Gi"},
                              {"index": 1, "uuid": "GPU-2", "model": "T4", "memory_mb": "16Gi"}])
    runs = []
    for job_id in ("zz-first", "aa-second"):  # ids in the opposite order to the line's
        t = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, job_id=job_id)
        c = claim_grant(alloc, t.id, "w-" + job_id, "h1", start=True)
        alloc.rq_connection.hset(Job.key_for(t.id), mapping={"status": "started", "worker_name": "w-" + job_id})
        runs.append((t, c))
    at = math.floor(alloc.clock()) + 30
    hostq = f"{alloc.keys.namespace}.host.h1"
    for t, c in runs:  # RQ scheduled both retries for the same second
        alloc.rq_connection.hset(Job.key_for(t.id), "status", "scheduled")
        alloc.rq_connection.zadd(f"rq:scheduled:{hostq}", {t.id: at})
        finish_job(alloc, t.id, "h1", c.token, job_key=Job.key_for(t.id))
    lease = alloc.allocate({"gpus": 1}, expected_duration=600)
    first = alloc.estimated_start_time("zz-first")
    assert first == datetime.fromtimestamp(at, timezone.utc)
    assert alloc.estimated_start_time("aa-second") == datetime.fromtimestamp(lease.activated_at.timestamp() + 600, timezone.utc)
    clock.advance(at - clock.now)
    assert alloc.schedule() == ["zz-first"]


def test_a_retry_waiting_out_its_interval_does_not_make_a_policy_yield_to_the_line(alloc, clock):
    from allocator.api.placing import place_on

    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 1})
    retried_later(alloc, task, claim, in_s=300)
    res = place_on(alloc, alloc.build_request({"gpus": 1}), "policy-1", "h1", [1], True)
    assert res["ok"], res


def test_cancelling_a_task_that_waits_for_its_retry_interval_leaves_nothing_behind(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    retried_later(alloc, task, claim, in_s=30)
    alloc.cancel(task.id)
    assert alloc.get(task.id).state == "cancelled"
    assert alloc.redis.zcard(alloc.keys.delayed) == 0


def test_a_retry_without_an_interval_may_start_at_once_even_after_one_with(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2})
    retried_later(alloc, task, claim, in_s=30)
    clock.advance(30)
    alloc.schedule()
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True)
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "queued")  # Retry without an interval
    finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    rec = alloc.get(task.id)
    assert (rec.state, rec.not_before, rec.requeues) == ("active", None, 2)
    assert alloc.redis.hget(alloc.keys.task(task.id), "not_before") is None


def test_stale_placement_frees_nothing_but_drops_the_pid(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"cpu_cores": 1})
    alloc.redis.hincrby(alloc.keys.alloc(task.id), "requeues", 1)  # placed again since the claim
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert (end.released, end.stale) == (False, True)
    assert alloc.get(task.id).state == "active"
    assert events_of(alloc, task.id, "finished") == []
    assert alloc.redis.hlen(alloc.keys.host_pids("h1")) == 0


def test_already_released_allocation_is_left_alone(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"cpu_cores": 1})
    alloc.release(task.id, reason="cancelled")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=4242, job_key=Job.key_for(task.id))
    assert (end.released, end.stale, end.requeued) == (False, False, False)
    assert alloc.get(task.id).release_reason == "cancelled"
    assert events_of(alloc, task.id, "finished") == []


def test_preempted_running_job_is_requeued_at_the_front(alloc_any):
    a = alloc_any
    gpu_host(a)
    task, claim = started_job(a, {"gpus": 2}, pid=77)
    urgent = a.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    assert urgent.state == "active"
    assert a.redis.hget(a.keys.task(task.id), "state") == "preempting"
    end = finish_job(a, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (True, False)
    assert a.get(task.id).state == "pending" and a.get(task.id).requeues == 1
    assert a.redis.hlen(a.keys.host_pids("h1")) == 0
    assert events_of(a, task.id, "finished") == []
    a.release(urgent.allocation_id)  # its release places the requeued task again, at once
    assert a.get(task.id).state == "active"


def test_a_preempted_job_whose_rq_job_is_gone_is_not_recreated_as_a_stub_but_leaves_the_line(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    alloc.rq_connection.delete(Job.key_for(task.id))  # deleted as the run stopped
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert end.requeued
    assert alloc.rq_connection.exists(Job.key_for(task.id)) == 0
    alloc.release(urgent.allocation_id)  # the pass finds the job gone: nothing is placed for it
    a = alloc.get(task.id)
    assert (a.state, a.release_reason) == ("cancelled", "job_gone")
    assert alloc.capacity().active_allocations == 0


def test_a_job_that_finished_before_its_preemption_stopped_it_is_not_run_again(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "finished")  # the run just completed
    alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (False, False)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "done"
    assert 0 < alloc.redis.pttl(alloc.keys.task(task.id)) <= 86_400_000  # kept a day, as every ended task
    assert alloc.redis.zscore(alloc.keys.pending, task.id) is None
    assert events_of(alloc, task.id, "finished")[-1]["data"]["outcome"] == "ok"


def test_a_job_that_failed_for_good_before_its_preemption_stopped_it_is_not_run_again(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "failed")  # the run just failed, no retry
    alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (False, False)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "done"
    assert alloc.redis.zscore(alloc.keys.pending, task.id) is None
    assert events_of(alloc, task.id, "finished")[-1]["data"]["outcome"] == "failed"


def test_a_preempted_run_that_failed_into_a_retry_interval_keeps_the_interval(alloc, clock):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    # The run failed on its own and RQ scheduled its retry in 600 s, as the preemption came.
    origin = alloc.rq_connection.hget(Job.key_for(task.id), "origin").decode()
    alloc.rq_connection.hset(Job.key_for(task.id), "status", "scheduled")
    alloc.rq_connection.zadd(f"rq:scheduled:{origin}", {task.id: clock() + 600})
    urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert end.requeued
    alloc.release(urgent.allocation_id)  # the GPUs are free, but the retry's interval is not over
    assert alloc.get(task.id).state == "pending"
    clock.advance(600)
    alloc.schedule()
    assert alloc.get(task.id).state == "active"


def test_a_task_cancelled_while_its_preemption_stops_it_does_not_come_back(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "preempting"
    assert alloc.cancel(task.id).released_now is True  # before the worker has stopped the horse
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (False, False)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "cancelled"
    assert 0 < alloc.redis.pttl(alloc.keys.task(task.id)) <= 86_400_000
    alloc.release(urgent.allocation_id)
    assert alloc.get(task.id).state == "released" and alloc.redis.zscore(alloc.keys.pending, task.id) is None


def test_a_task_released_while_its_preemption_stops_it_does_not_come_back(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 2}, pid=77)
    urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "preempting"
    assert alloc.release(task.id).released_now is True  # as cancel: the user wants it gone
    end = finish_job(alloc, task.id, "h1", claim.token, horse_pid=77, job_key=Job.key_for(task.id))
    assert (end.requeued, end.released) == (False, False)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "cancelled"
    alloc.release(urgent.allocation_id)
    assert alloc.redis.zscore(alloc.keys.pending, task.id) is None


def test_a_user_releasing_a_running_job_stops_it_on_its_worker(alloc):
    gpu_host(alloc)
    task, _ = started_job(alloc, {"gpus": 1})
    channel = alloc.rq_connection.pubsub(ignore_subscribe_messages=True)
    channel.subscribe("rq:pubsub:w1")
    channel.get_message(timeout=1)  # the subscription's confirmation
    alloc.release(task.id, reason="failed")
    message = channel.get_message(timeout=2)
    channel.close()
    assert message is not None and json.loads(message["data"]) == {"command": "stop-job", "job_id": task.id}
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "cancelled"  # the worker's tick backstop
    assert alloc.get(task.id).state == "failed"


def test_the_worker_releasing_its_own_run_stops_nothing(alloc):
    gpu_host(alloc)
    task, claim = started_job(alloc, {"gpus": 1})
    alloc.release(task.id, placement=claim.token)
    assert alloc.redis.hget(alloc.keys.task(task.id), "state") == "done"


def test_a_claim_after_a_long_wait_moves_the_deadline_to_give_the_run_its_whole_lease(alloc_any, clock):
    alloc = alloc_any  # also on Redis 6.2
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=300, job_timeout=60)
    clock.advance(200)  # waited in its host queue for a worker
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=180)
    deadline = round(clock.now * 1000) + 180_000
    assert claim.expires_ms == deadline
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) == deadline
    assert alloc.get(task.id).expires_at.timestamp() * 1000 == deadline
    assert events_of(alloc, task.id, "started")[-1]["data"]["expires"] == deadline
    assert alloc.redis.zscore(alloc.keys.ends, task.id) == deadline  # it was the TTL deadline
    clock.advance(150)  # past the placed deadline, within the run's lease
    assert alloc.expire() == []
    assert alloc.get(task.id).state == "active"
    clock.advance(31)
    assert alloc.expire() == [task.id]
    assert alloc.get(task.id).release_reason == "expired"


def test_a_claim_keeps_a_placed_deadline_that_leaves_the_run_its_lease(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=3600, job_timeout=60)
    placed = alloc.redis.zscore(alloc.keys.expiry, task.id)
    clock.advance(100)
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=180)
    assert claim.expires_ms == placed == alloc.redis.zscore(alloc.keys.expiry, task.id)


def test_a_claim_for_a_run_without_time_limit_removes_the_deadline(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=600, job_timeout=-1)
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=math.inf)
    assert claim.expires_ms == 0
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) is None
    assert alloc.redis.zscore(alloc.keys.ends, task.id) is None  # its end was the TTL deadline
    assert alloc.get(task.id).expires_at is None
    assert invariants.check(alloc.snapshot()) == []
    clock.advance(86_400)
    assert alloc.expire() == []
    assert alloc.get(task.id).state == "active"


def test_a_claim_leaves_an_allocation_without_ttl_without_deadline(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=None)
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=600)
    assert claim.current and claim.expires_ms == 0
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) is None
    assert alloc.get(task.id).expires_at is None


def test_a_claim_without_a_run_lease_keeps_the_placed_deadline(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=600)
    placed = alloc.redis.zscore(alloc.keys.expiry, task.id)
    clock.advance(500)
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True)
    assert claim.expires_ms is None
    assert alloc.redis.zscore(alloc.keys.expiry, task.id) == placed
    assert "expires" not in events_of(alloc, task.id, "started")[-1]["data"]


def test_a_claim_after_the_deadline_passed_releases_the_allocation_as_expired(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=600, job_timeout=60)
    clock.advance(601)  # nothing has reaped it yet
    claim = claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=180)
    assert (claim.current, claim.reason, claim.state, claim.grant) == (False, "expired", "released", None)
    rec = alloc.get(task.id)
    assert (rec.state, rec.release_reason) == ("released", "expired")
    assert events_of(alloc, task.id, "started") == []
    assert alloc.capacity().gpus_idle == 2
    assert invariants.check(alloc.snapshot()) == []


def test_a_refused_claim_leaves_the_deadline_alone(alloc):
    gpu_host(alloc)
    gpu_host(alloc, "h2")
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, ttl_seconds=60)
    other = "h2" if alloc.get(task.id).host_id == "h1" else "h1"
    before = ledger_dump(alloc)
    claim = claim_grant(alloc, task.id, "w1", other, start=True, run_lease_s=600)
    assert (claim.current, claim.reason, claim.expires_ms) == (False, "wrong_host", None)
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("bad", [0, -5, float("nan"), "600", True, -math.inf])
def test_a_bad_run_lease_is_invalid_and_changes_nothing(alloc, bad):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as err:
        claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=bad)
    assert err.value.field == "run_lease_s"
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("bad", ["soon", "-1", "inf", "nan", "0x10", "1e3", "1.5", "9999999999999"])
def test_the_script_refuses_a_run_lease_that_is_not_whole_ms_and_changes_nothing(alloc, bad):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    before = ledger_dump(alloc)
    with pytest.raises(redis.ResponseError, match="run lease"):
        _redis.call(alloc, "claim_grant", [], task.id, "w1", "h1", "node", 1, "1", bad)
    assert ledger_dump(alloc) == before


def test_a_claim_keeps_an_expected_end_that_came_from_a_duration_hint(alloc, clock):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=60, expected_duration=30)
    hinted = alloc.redis.zscore(alloc.keys.ends, task.id)
    claim_grant(alloc, task.id, "w1", "h1", start=True, run_lease_s=600)
    assert alloc.redis.zscore(alloc.keys.ends, task.id) == hinted


def test_a_function_task_ttl_is_never_shorter_than_rq_lets_it_run(alloc):
    gpu_host(alloc)
    long_job = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_timeout=7200)
    short_job = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_timeout=60)
    unlimited = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_timeout=-1, ttl_seconds=600)
    no_ttl = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_timeout=7200, ttl_seconds=None)
    assert alloc.get(long_job.id).ttl_seconds == 7200 + 60 + 30 + 30
    assert alloc.get(short_job.id).ttl_seconds == 3600  # the default TTL already covers it
    assert alloc.get(unlimited.id).ttl_seconds == 600
    assert alloc.get(no_ttl.id).ttl_seconds is None


def test_a_function_task_ttl_raised_for_a_huge_timeout_stays_within_the_ttl_limit(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, job_timeout=20 * 365 * 86400)
    assert alloc.get(task.id).ttl_seconds == MAX_SECONDS


def test_claims_and_the_dead_worker_check_name_the_machine_allocator_node_gives(alloc, monkeypatch):
    from allocator.agent.orphans import OrphanReaper

    monkeypatch.setenv("ALLOCATOR_NODE", "gpu-host-7")  # agent and workers in containers of one machine
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    claim_grant(alloc, task.id, "w1", "h1", start=True)
    assert alloc.redis.hget(alloc.keys.alloc(task.id), "claimed_node") == "gpu-host-7"
    assert OrphanReaper(alloc).node == "gpu-host-7"


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def orphaned_run(a, rq_status: str, **enqueue: Any) -> tuple[Any, Any]:
    """A placed function task claimed on machine n1 by a worker that has died, its RQ job left at
    ``rq_status`` and its run in RQ's started registry (as ``<id>:<execution id>``); then the
    agent's check of that machine. Returns (task, report)."""
    from allocator.agent.orphans import OrphanReaper

    gpu_host(a)
    task = a.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, **enqueue)
    assert claim_grant(a, task.id, "w1", "h1", start=True, node="n1", pid=_dead_pid()).current
    a.rq_connection.hset(Job.key_for(task.id), "status", rq_status)
    a.rq_connection.zadd(f"rq:executions:{task.id}", {"e1": 1})
    a.rq_connection.zadd(f"rq:wip:{a.keys.namespace}.host.h1", {f"{task.id}:e1": 1})
    return task, OrphanReaper(a, node="n1").check(["h1"])


def test_the_agent_puts_back_in_line_a_retry_whose_worker_died(alloc):
    # The run failed and RQ's Retry put the job back (status "queued"); then the worker died.
    task, rep = orphaned_run(alloc, "queued")
    assert rep.requeued == [task.id]
    assert alloc.get(task.id).release_reason is None and alloc.get(task.id).state in ("pending", "active")
    assert alloc.get(task.id).requeues == 1
    assert events_of(alloc, task.id, "finished")[-1]["data"] == {"host": "h1", "status": "queued", "outcome": "retry",
                                                                  "worker_lost": True}


def test_the_agent_retries_a_run_left_started_by_a_worker_killed_with_its_horse_as_rq_would(alloc):
    from rq import Retry

    task, rep = orphaned_run(alloc, "started", retry=Retry(max=2))  # both killed mid-run
    assert rep.requeued == [task.id]
    rec = alloc.get(task.id)
    assert (rec.state, rec.requeues, rec.release_reason) == ("active", 1, None)  # placed again at once
    job = Job.fetch(task.id, connection=alloc.rq_connection)
    assert (job.get_status(), job.retries_left) == ("queued", 1)
    assert events_of(alloc, task.id, "finished")[-1]["data"]["outcome"] == "retry"
    # The dead run left RQ's started registry: RQ's maintenance would take the next run for it.
    assert alloc.rq_connection.zcard(f"rq:wip:{alloc.keys.namespace}.host.h1") == 0


def test_a_run_left_started_keeps_the_interval_rq_would_wait_before_its_retry(alloc, clock):
    from rq import Retry

    task, _ = orphaned_run(alloc, "started", retry=Retry(max=2, interval=[10, 60]))
    rec = alloc.get(task.id)
    assert rec.state == "pending" and rec.not_before == datetime.fromtimestamp(math.floor(clock() * 1000) / 1000 + 10, timezone.utc)


def test_a_run_left_started_without_retries_left_is_released_as_failed(alloc):
    task, rep = orphaned_run(alloc, "started")
    assert rep.released == [task.id]
    assert (alloc.get(task.id).state, alloc.get(task.id).release_reason) == ("failed", "failed")


@pytest.mark.parametrize("grant_ends", ["cancelled", "preempted"])
def test_the_agent_stops_an_orphaned_horse_once_its_grant_ends(alloc, grant_ends):
    import subprocess

    from allocator.agent.orphans import OrphanReaper, pid_alive

    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2})
    # A fork of its worker runs on with the worker's command line; its worker parent is dead.
    horse = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "worker"], start_new_session=True)
    try:
        assert claim_grant(alloc, task.id, "w1", "h1", start=True, node="n1", pid=_dead_pid()).current
        alloc.redis.hset(alloc.keys.host_pids("h1"), str(horse.pid), task.id)
        reaper = OrphanReaper(alloc, node="n1")
        assert reaper.check(["h1"]).running_without_worker == [task.id]  # its grant still holds: left alone
        if grant_ends == "cancelled":
            alloc.cancel(task.id)
        else:
            alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
        assert reaper.check(["h1"]).stopped == [task.id]  # nothing may run on what the ledger handed on
        horse.wait(5)
        assert not pid_alive(horse.pid)
        reaper.check(["h1"])  # then settled as a dead worker's run
        assert alloc.redis.hlen(alloc.keys.host_pids("h1")) == 0
        if grant_ends == "preempted":
            assert alloc.get(task.id).state == "pending"
    finally:
        horse.kill()
        horse.wait()


def test_a_job_left_taken_but_unclaimed_by_a_dead_worker_goes_back_to_its_host_queue(alloc):
    from rq import Queue

    from workers import ResourceWorker

    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    q = Queue(f"{alloc.keys.namespace}.host.h1", connection=alloc.rq_connection)
    # A worker took it (RQ moves it to the queue's intermediate list) and died before its claim.
    iq = q.intermediate_queue
    alloc.rq_connection.lmove(q.key, iq.key, "LEFT", "RIGHT")
    worker = ResourceWorker([q], connection=alloc.rq_connection, allocator=alloc)
    iq.set_first_seen(task.id)
    iq.should_be_cleaned_up = lambda job_id: True  # as RQ's maintenance, a minute later
    iq.cleanup(worker, q)
    assert alloc.rq_connection.lrange(q.key, 0, -1) == [task.id.encode()]
    assert alloc.rq_connection.lrange(iq.key, 0, -1) == []
    assert (task.job.get_status(), alloc.get(task.id).state) == ("queued", "active")  # not failed: a worker runs it


def test_the_agent_leaves_alone_a_process_that_reused_an_orphaned_horse_s_pid(alloc):
    import subprocess

    from allocator.agent.orphans import OrphanReaper, pid_alive

    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2})
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # no worker's: the horse's pid reused
    try:
        assert claim_grant(alloc, task.id, "w1", "h1", start=True, node="n1", pid=_dead_pid()).current
        alloc.redis.hset(alloc.keys.host_pids("h1"), str(other.pid), task.id)
        alloc.cancel(task.id)
        OrphanReaper(alloc, node="n1").check(["h1"])
        assert pid_alive(other.pid)
    finally:
        other.kill()
        other.wait()

