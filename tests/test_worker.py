"""Function tasks run on a real RQ worker of their host, pinned to their grant, and are released
on every outcome. Workers run in subprocesses in burst mode (they quit when the queue is empty)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.job import Job

from allocator.queue import host_queue_name

from . import jobs

ROOT = Path(__file__).resolve().parent.parent
CORES = sorted(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def _server_clock(clock):
    """Workers claim on the server's clock and set deadlines from it: the test's calls must agree."""
    import time

    clock.now = time.time()


def run_worker(a, host: str, *, plain_rq: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    url = "redis://{host}:{port}/{db}".format(**a.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": a.keys.namespace}
    if plain_rq:
        cmd = [str(Path(sys.executable).parent / "rq"), "worker", "--burst", "--url", url,
               "--worker-class", "workers.ResourceWorker", host_queue_name(a.keys.namespace, host)]
    else:
        cmd = [sys.executable, "-m", "allocator", "worker", "--host", host, "--burst"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def gpu_host(a, host="h1"):
    a.register_host(id=host, cpu_cores=CORES, ram_mb="8Gi",
                    gpus=[{"index": 0, "uuid": "GPU-11111111", "model": "T4", "memory_mb": "16Gi"},
                          {"index": 1, "uuid": "GPU-22222222", "model": "T4", "memory_mb": "16Gi"}])


def test_job_runs_on_its_host_with_gpus_and_cores_pinned(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.report_environment, resources={"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1})
    grant = task.wait_for_placement(timeout=5)
    assert task.job.origin == host_queue_name(alloc.keys.namespace, "h1")
    run_worker(alloc, "h1")
    job = Job.fetch(task.id, connection=alloc.rq_connection)
    assert job.get_status() == "finished"
    assert job.return_value() == {
        "CUDA_VISIBLE_DEVICES": grant.gpus[0].uuid,
        "OMP_NUM_THREADS": "1",
        "ALLOCATOR_ALLOCATION_ID": task.id,
        "affinity": grant.cpu_cores,
    }
    assert alloc.get(task.id).state == "released"


@pytest.mark.skipif(len(CORES) < 2, reason="needs a core to pin and one left over")
def test_a_job_granted_no_cpu_runs_on_the_cores_nobody_holds(alloc):
    gpu_host(alloc)
    pinned = alloc.allocate({"cpu_cores": 1})
    task = alloc.enqueue(jobs.report_cpu, resources={"gpus": 1, "cpu_cores": 0})
    run_worker(alloc, "h1")
    pool = [c for c in CORES if c not in pinned.cpu_cores]
    assert task.job.return_value() == {"policy": os.SCHED_OTHER, "affinity": pool,
                                       "ALLOCATOR_CPU_CORES": ",".join(map(str, pool))}


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_a_job_granted_no_cpu_runs_at_idle_priority_when_every_core_was_pinned_before_its_claim(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.report_cpu, resources={"gpus": 1, "cpu_cores": 0})
    assert alloc.get(task.id).state == "active"
    alloc.allocate({"cpu_cores": len(CORES)})  # between its placement and its claim: no shared pool is left
    run_worker(alloc, "h1")
    # Only CPU time nobody else uses; its affinity is the worker's, as there are no cores to keep to.
    assert task.job.return_value() == {"policy": os.SCHED_IDLE, "affinity": CORES, "ALLOCATOR_CPU_CORES": ""}


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
@pytest.mark.parametrize(("shared_pool", "policy"), [(True, "SCHED_IDLE"), (False, "SCHED_OTHER")])
def test_an_empty_core_list_means_idle_priority_only_for_a_grant_on_the_shared_pool(shared_pool, policy):
    code = ("import os; from workers.pinning import Grant, apply; "
            f"apply(Grant('a1', 'h1', cores=[], shared_pool={shared_pool})); print(os.sched_getscheduler(0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert int(out) == getattr(os, policy)


def test_plain_rq_worker_with_the_worker_class_works(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 2, 3, resources={"cpu_cores": 1})
    proc = run_worker(alloc, "h1", plain_rq=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert task.job.return_value() == 5
    assert alloc.get(task.id).release_reason == "released"


def test_failed_job_is_released_as_failed(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.fail, resources={"cpu_cores": 1})
    run_worker(alloc, "h1")
    assert task.job.get_status() == "failed"
    assert (alloc.get(task.id).state, alloc.get(task.id).release_reason) == ("failed", "failed")
    assert alloc.capacity().cpu_cores.allocated == 0


def test_successful_job_whose_result_is_not_kept_is_released_as_finished(alloc):
    # result_ttl=0: RQ deletes the job hash as the job succeeds, before the worker releases.
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1}, result_ttl=0)
    run_worker(alloc, "h1")
    assert not alloc.rq_connection.exists(Job.key_for(task.id))
    assert (alloc.get(task.id).state, alloc.get(task.id).release_reason) == ("released", "released")


def test_a_job_with_retries_runs_again_until_it_succeeds(alloc, tmp_path):
    from rq import Retry

    gpu_host(alloc)
    counter = tmp_path / "attempts"
    task = alloc.enqueue(jobs.fail_until, str(counter), 2, resources={"gpus": 1}, retry=Retry(max=3))
    run_worker(alloc, "h1")
    assert counter.read_text() == "3"
    assert task.job.get_status() == "finished"
    assert (alloc.get(task.id).release_reason, alloc.get(task.id).requeues) == ("released", 2)


def test_a_retry_with_an_interval_runs_again_only_once_the_interval_is_over(alloc, clock, tmp_path):
    from rq import Retry

    gpu_host(alloc)
    counter = tmp_path / "attempts"
    task = alloc.enqueue(jobs.fail_until, str(counter), 1, resources={"gpus": 1}, retry=Retry(max=1, interval=600))
    started = time.time()
    run_worker(alloc, "h1")  # the first run fails; RQ schedules the retry 600 s later
    rec = alloc.get(task.id)
    assert (counter.read_text(), rec.state, rec.requeues) == ("1", "pending", 1)
    assert started + 600 - 2 <= rec.not_before.timestamp() <= time.time() + 600
    assert alloc.schedule() == []  # the worker's own pass left it waiting, and so does this one
    clock.advance(rec.not_before.timestamp() - clock.now)
    assert alloc.schedule() == [task.id]
    run_worker(alloc, "h1")
    assert counter.read_text() == "2"
    assert task.job.get_status() == "finished"
    assert (alloc.get(task.id).release_reason, alloc.get(task.id).requeues) == ("released", 1)


def test_a_subprocess_a_job_left_behind_is_stopped_before_its_grant_is_handed_on(alloc, tmp_path):
    import psutil

    gpu_host(alloc)
    pid_file = tmp_path / "child"
    task = alloc.enqueue(jobs.leave_a_child_behind, str(pid_file), resources={"cpu_cores": 1})
    run_worker(alloc, "h1")
    assert alloc.get(task.id).state == "released"
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_subprocess_a_job_started_in_a_session_of_its_own_is_stopped_before_its_grant_is_handed_on(alloc, tmp_path):
    import psutil

    gpu_host(alloc)
    pid_file = tmp_path / "child"
    task = alloc.enqueue(jobs.leave_a_detached_child_behind, str(pid_file), resources={"gpus": 1, "cpu_cores": 1})
    try:
        run_worker(alloc, "h1")
        assert alloc.get(task.id).state == "released"
        child = int(pid_file.read_text())
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    finally:
        if pid_file.exists() and psutil.pid_exists(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds processes through /proc")
def test_the_processes_of_a_run_are_told_from_those_of_a_later_placement_of_its_task():
    import uuid

    from workers.pinning import kill_processes_of

    allocation_id = uuid.uuid4().hex
    env = {**os.environ, "ALLOCATOR_ALLOCATION_ID": allocation_id, "ALLOCATOR_PLACEMENT": "h1|2|1000|0"}
    later_run = subprocess.Popen(["sleep", "300"], env=env)  # the task placed again on h1 after a loss of h1
    try:
        assert kill_processes_of(allocation_id, "h1|1|500|0") == []
        assert later_run.poll() is None
        assert kill_processes_of(allocation_id, "h1|2|1000|0") == [later_run.pid]
        assert later_run.wait(10) == -9
    finally:
        later_run.kill()


def test_a_worker_refuses_more_than_one_queue(alloc):
    from redis import Redis
    from rq import Queue

    from workers import ResourceWorker

    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    conn = Redis.from_url(url)
    queues = [Queue(host_queue_name(alloc.keys.namespace, h), connection=conn) for h in ("h2", "h1")]
    with pytest.raises(ValueError, match="exactly one host queue"):
        ResourceWorker(queues, connection=conn, allocator=alloc)


def test_gpus_registered_without_uuids_are_named_by_index_for_cuda():
    from workers.pinning import Grant

    env = Grant("a1", "h1", gpu_uuids=["h1-gpu0", "h1-gpu2"], gpu_indexes=[0, 2]).environment()
    assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == ("0,2", "PCI_BUS_ID")
    env = Grant("a1", "h1", gpu_uuids=["GPU-1f2e", "MIG-7a"], gpu_indexes=[0, 1]).environment()
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1f2e,MIG-7a" and "CUDA_DEVICE_ORDER" not in env


def test_timed_out_job_is_released(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.sleep_for, 30, resources={"cpu_cores": 1}, job_timeout=1)
    run_worker(alloc, "h1")
    assert task.job.get_status() == "failed"
    assert alloc.get(task.id).state == "failed"


def test_a_timed_out_job_is_recorded_as_failed_there_is_no_timeout_outcome(alloc):
    import json

    gpu_host(alloc)
    task = alloc.enqueue(jobs.sleep_for, 30, resources={"cpu_cores": 1}, job_timeout=1)
    run_worker(alloc, "h1")
    finished = [json.loads(f["data"]) for _, f in alloc.redis.xrange(alloc.keys.events)
                if f["type"] == "finished" and f["id"] == task.id]
    assert [e["outcome"] for e in finished] == ["failed"]


def test_killed_work_horse_is_released(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.kill_own_horse, resources={"gpus": 1})
    run_worker(alloc, "h1")
    assert task.job.get_status() == "failed"
    assert alloc.capacity().gpus_idle == 2


def test_waiting_job_runs_after_the_one_ahead_releases(alloc):
    gpu_host(alloc)
    first = alloc.enqueue(jobs.add, 1, 1, resources={"gpus": 2})
    second = alloc.enqueue(jobs.add, 2, 2, resources={"gpus": 2})
    assert (first.position, second.position) == (0, 1)
    run_worker(alloc, "h1")  # runs first; its release places second on the same host queue
    assert first.job.return_value() == 2 and second.job.return_value() == 4
    assert alloc.capacity().gpus_idle == 2


def test_pending_job_waits_in_its_priority_queue_visible_to_rq(alloc):
    gpu_host(alloc)
    alloc.allocate({"gpus": 2})
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, priority="high")
    assert task.state == "pending" and task.position == 1
    assert task.job.origin == f"{alloc.keys.namespace}.high"
    assert alloc.rq_connection.lrange(f"rq:queue:{alloc.keys.namespace}.high", 0, -1) == [task.id.encode()]


def test_cancelled_pending_job_never_runs(alloc):
    gpu_host(alloc)
    alloc.allocate({"gpus": 2})
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1})
    task.cancel()
    assert task.job.get_status() == "canceled"
    assert task.state == "cancelled"


def test_preempted_job_that_had_not_started_goes_back_to_the_front(alloc):
    gpu_host(alloc)
    low = alloc.enqueue(jobs.add, 1, 1, resources={"gpus": 2}, priority="low")
    assert low.state == "active"
    urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
    assert urgent.state == "active"
    assert low.state == "pending" and low.position == 1
    assert low.job.origin == f"{alloc.keys.namespace}.low"
    alloc.release(urgent.allocation_id)
    assert low.state == "active"
    run_worker(alloc, "h1")
    assert low.job.return_value() == 2


def start_worker(a, host: str) -> subprocess.Popen:
    url = "redis://{host}:{port}/{db}".format(**a.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": a.keys.namespace}
    return subprocess.Popen([sys.executable, "-m", "allocator", "worker", "--host", host], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until(predicate, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("failure_ttl", [None, 0, 5])
def test_running_job_preempted_is_stopped_and_requeued_at_the_front(alloc, tmp_path, failure_ttl):
    gpu_host(alloc)
    flag = tmp_path / "go"
    low = alloc.enqueue(jobs.sleep_until_file, str(flag), resources={"gpus": 2}, priority="low", failure_ttl=failure_ttl)
    later_low = alloc.enqueue(jobs.add, 1, 1, resources={"gpus": 2}, priority="low")
    worker = start_worker(alloc, "h1")
    try:
        wait_until(lambda: low.job.get_status() == "started")
        urgent = alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")
        assert alloc.get(urgent.allocation_id).state == "active"
        wait_until(lambda: low.state == "pending")
        assert alloc.get(low.id).requeues == 1
        assert (low.position, later_low.position) == (1, 2)  # front of its queue, ahead of later work
        # The stopped run was not filed as failed: the failure_ttl that filing applies would expire
        # the job's hash (at 0: delete it) while it waits in line.
        conn = alloc.rq_connection
        assert conn.hget(low.job.key, "data") is not None and conn.ttl(low.job.key) == -1
        assert low.job.get_status() == "queued"
        flag.touch()
        alloc.release(urgent.allocation_id)
        wait_until(lambda: low.job.get_status() == "finished")
        assert low.job.return_value() == "done"
    finally:
        worker.terminate()
        worker.wait(10)


def in_process_worker(a, host: str, **kwargs):
    """A ResourceWorker in this process, for tests that step into its run."""
    from rq import Queue

    from workers import ResourceWorker

    conn = a.rq_connection
    return ResourceWorker([Queue(host_queue_name(a.keys.namespace, host), connection=conn)], connection=conn,
                          allocator=a, **kwargs)


def work_in_process(worker) -> None:
    """``worker.work(burst=True)``, leaving this process's signal handlers as they were."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.work(burst=True)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def preempt_right_after_the_claim(alloc, worker) -> list:
    """Has a critical request for 2 GPUs preempt the worker's job once its claim has recorded
    "started", before RQ sets up the execution or forks the horse (RQ alone would ignore the
    stop-job command, and the job would run on). Returns the list its allocation goes into."""
    prepare, urgent = worker.prepare_execution, []

    def preempt_then_prepare(job):
        urgent.append(alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue"))
        wait_until(lambda: worker._kill_pending is not None, timeout=10)
        return prepare(job)

    worker.prepare_execution = preempt_then_prepare
    return urgent


def test_a_preemption_right_after_the_claim_stops_the_job_as_soon_as_its_horse_exists(alloc, tmp_path):
    gpu_host(alloc)
    done = tmp_path / "done"
    low = alloc.enqueue(jobs.sleep_then_touch, 8.0, str(done), resources={"gpus": 2}, priority="low")
    worker = in_process_worker(alloc, "h1")
    urgent = preempt_right_after_the_claim(alloc, worker)
    work_in_process(worker)
    assert not done.exists()  # stopped, not run to its end
    assert alloc.get(urgent[0].allocation_id).state == "active"
    assert low.state == "pending"
    assert alloc.get(low.id).requeues == 1


@pytest.mark.parametrize("step, stop_first", [("claim_grant", False), ("finish_job", True)],
                         ids=["as-the-claim-returns", "as-the-release-starts"])
def test_a_warm_shutdown_during_the_claim_or_the_release_lets_it_complete_then_stops_the_worker(
        alloc, monkeypatch, step, stop_first):
    import signal

    import workers.worker

    gpu_host(alloc)
    first = alloc.enqueue(jobs.add, 2, 3, resources={"gpus": 1}, job_timeout=-1)
    second = alloc.enqueue(jobs.add, 1, 1, resources={"gpus": 1})
    call = getattr(workers.worker, step)

    def with_sigterm(*args, **kwargs):  # the operator's stop, as the script call is made
        if stop_first:
            signal.raise_signal(signal.SIGTERM)
        out = call(*args, **kwargs)
        if not stop_first:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(workers.worker, step, with_sigterm)
    work_in_process(in_process_worker(alloc, "h1"))
    assert first.job.return_value() == 5  # the claimed job ran
    assert alloc.get(first.id).release_reason == "released"  # and its release completed
    assert second.job.get_status() == "queued"  # the worker stopped after the job in hand
    assert (alloc.get(second.id).state, alloc.redis.hget(alloc.keys.alloc(second.id), "claim")) == ("active", None)


def run_rq_intermediate_list_maintenance(a, host: str) -> None:
    """RQ's maintenance of the host queue's intermediate list, twice, as a minute apart: a job id
    found there both times that is not running is failed ("stuck in intermediate queue")."""
    from rq import Queue

    queue = Queue(host_queue_name(a.keys.namespace, host), connection=a.rq_connection)
    worker = in_process_worker(a, host)
    queue.intermediate_queue.cleanup(worker, queue)
    for job_id in queue.intermediate_queue.get_job_ids():
        a.rq_connection.set(queue.intermediate_queue.get_first_seen_key(job_id), time.time() - 120)
    queue.intermediate_queue.cleanup(worker, queue)


def test_a_job_stopped_before_its_horse_ran_leaves_nothing_in_rqs_intermediate_list(alloc):
    gpu_host(alloc)
    low = alloc.enqueue(jobs.add, 2, 3, resources={"gpus": 2}, priority="low")
    worker = in_process_worker(alloc, "h1")
    urgent = preempt_right_after_the_claim(alloc, worker)
    work_in_process(worker)  # stopped before its horse took the job from the intermediate list
    assert low.state == "pending"
    alloc.release(urgent[0].allocation_id)  # placed again on h1, where it runs to its end
    work_in_process(in_process_worker(alloc, "h1"))
    assert low.job.return_value() == 5
    run_rq_intermediate_list_maintenance(alloc, "h1")
    assert low.job.get_status() == "finished"  # not failed as "stuck in intermediate queue"


def test_a_stop_that_came_after_a_run_ended_does_not_mark_the_next_run_stopped(alloc):
    from rq import Retry

    gpu_host(alloc)
    task = alloc.enqueue(jobs.fail, resources={"gpus": 1}, retry=Retry(max=1))
    worker = in_process_worker(alloc, "h1")
    after, runs = worker._after, []

    def stop_arrives_late(job, placement=None, queue=None):
        runs.append(job.id)
        if len(runs) == 1:
            worker._stopped_job_id = job.id  # RQ's stop-job handler, just after the horse ended
        return after(job, placement, queue)

    worker._after = stop_arrives_late
    work_in_process(worker)
    assert len(runs) == 2  # the retry ran
    assert task.job.get_status() == "failed"  # its own failure, not a stop


def run_into_a_cold_shutdown(worker, while_running=lambda: None) -> None:
    """Works until the job's horse runs, calls ``while_running``, then does what RQ's second Ctrl+C
    does: kills the horse and exits."""
    import signal

    def cold_shutdown(job, queue, *execution):
        wait_until(lambda: job.get_status(refresh=True) == "started")
        while_running()
        os.kill(worker.horse_pid, signal.SIGKILL)
        os.waitpid(worker.horse_pid, 0)
        raise SystemExit()

    worker.monitor_work_horse = cold_shutdown
    try:
        work_in_process(worker)
    except SystemExit:
        pass


def test_a_cold_shutdown_during_a_run_hands_the_job_to_its_retry(alloc):
    from rq import Retry

    gpu_host(alloc)
    task = alloc.enqueue(jobs.sleep_for, 30.0, resources={"gpus": 1}, retry=Retry(max=1))
    run_into_a_cold_shutdown(in_process_worker(alloc, "h1"))
    assert task.job.get_status() == "queued"  # RQ's retry, taken at once
    again = alloc.get(task.id)  # back in line, and placed again at once on the free GPU
    assert (again.state, again.requeues) == ("active", 1)


def test_a_cold_shutdown_while_a_preemption_stops_the_run_puts_the_task_back_in_line(alloc):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.sleep_for, 30.0, resources={"gpus": 2}, priority="low")
    worker = in_process_worker(alloc, "h1")
    worker.handle_payload = lambda message: None  # the stop-job command does not reach the worker before it exits
    urgent = []
    run_into_a_cold_shutdown(worker, lambda: urgent.append(
        alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")))
    assert alloc.get(urgent[0].allocation_id).state == "active"
    assert task.job.get_status() == "queued"  # in line again as an RQ job, not failed
    again = alloc.get(task.id)
    assert (again.state, again.requeues) == ("pending", 1)


def test_a_success_kept_with_no_result_logs_no_error(alloc, caplog):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, result_ttl=0)
    with caplog.at_level("ERROR", logger="workers.worker"):
        work_in_process(in_process_worker(alloc, "h1"))
    assert alloc.get(task.id).release_reason == "released"
    assert not [r for r in caplog.records if r.name == "workers.worker"]


def test_cancelling_right_after_the_claim_stops_the_job_as_soon_as_its_horse_exists(alloc, tmp_path):
    gpu_host(alloc)
    done = tmp_path / "done"
    task = alloc.enqueue(jobs.sleep_then_touch, 8.0, str(done), resources={"gpus": 1})
    worker = in_process_worker(alloc, "h1")
    prepare = worker.prepare_execution

    def cancel_then_prepare(job):
        assert task.cancel().release_reason == "cancelled"  # claimed, not yet marked started by RQ
        wait_until(lambda: worker._kill_pending is not None, timeout=10)
        return prepare(job)

    worker.prepare_execution = cancel_then_prepare
    work_in_process(worker)
    assert not done.exists()  # stopped, not run to its end
    assert task.job.get_status() == "stopped"
    assert alloc.get(task.id).state == "released" and alloc.capacity().gpus_idle == 2


def work_losing_stop_commands(a, host: str, once_running) -> None:
    """Runs the host's queue in a worker without a command channel (every stop-job is lost) and a
    monitoring tick a second; ``once_running`` is called from another thread once a horse runs."""
    import threading

    worker = in_process_worker(a, host, job_monitoring_interval=1)
    worker.subscribe = lambda: None

    def act():
        wait_until(lambda: a.redis.hlen(a.keys.host_pids(host)) == 1)
        once_running()

    actor = threading.Thread(target=act)
    actor.start()
    work_in_process(worker)
    actor.join(5)


def test_a_preempted_job_whose_stop_command_was_lost_is_stopped_at_the_next_monitoring_tick(alloc, tmp_path):
    gpu_host(alloc)
    done = tmp_path / "done"
    low = alloc.enqueue(jobs.sleep_then_touch, 8.0, str(done), resources={"gpus": 2}, priority="low")
    urgent = []
    work_losing_stop_commands(alloc, "h1", once_running=lambda: urgent.append(
        alloc.allocate({"gpus": 2}, priority="critical", strategy="priority", on_busy="queue")))
    assert not done.exists()  # stopped, not run to its end
    assert alloc.get(urgent[0].allocation_id).state == "active"
    assert low.state == "pending"
    assert alloc.get(low.id).requeues == 1


def test_a_cancelled_job_whose_stop_command_was_lost_is_stopped_at_the_next_monitoring_tick(alloc, tmp_path):
    gpu_host(alloc)
    done = tmp_path / "done"
    task = alloc.enqueue(jobs.sleep_then_touch, 8.0, str(done), resources={"gpus": 1})
    work_losing_stop_commands(alloc, "h1", once_running=task.cancel)
    assert not done.exists()  # stopped, not run to its end
    assert task.job.get_status() == "stopped"
    assert alloc.capacity().gpus_idle == 2


def test_a_run_without_a_task_hash_is_stopped_once_its_allocation_ends(alloc, tmp_path):
    """A run restored by `allocator recover` has no task hash and no claim: nothing can mark it or
    name its worker, so the worker stops it when it sees its allocation end."""
    gpu_host(alloc)
    done = tmp_path / "done"
    task = alloc.enqueue(jobs.sleep_then_touch, 8.0, str(done), resources={"gpus": 1})

    def restored_then_released() -> None:
        alloc.redis.delete(alloc.keys.task(task.id))  # as after a recovery
        alloc.release(task.id)

    work_losing_stop_commands(alloc, "h1", once_running=restored_then_released)
    assert not done.exists()  # stopped, not run to its end
    assert alloc.capacity().gpus_idle == 2


def test_cancelling_a_running_job_stops_it_and_releases(alloc, tmp_path):
    gpu_host(alloc)
    task = alloc.enqueue(jobs.sleep_until_file, str(tmp_path / "never"), resources={"gpus": 1})
    worker = start_worker(alloc, "h1")
    try:
        wait_until(lambda: task.job.get_status() == "started")
        assert task.cancel().release_reason == "cancelled"
        wait_until(lambda: task.job.get_status() in ("stopped", "failed"))
        assert alloc.capacity().gpus_idle == 2
    finally:
        worker.terminate()
        worker.wait(10)


def _horse_pids(alloc) -> list[str]:
    return list(alloc.redis.hgetall(alloc.keys.host_pids("h1")).values())


def _let_it_finish(alloc, task, flag) -> None:
    """Lets a ``sleep_until_file`` job end; its pid then leaves the host's map."""
    flag.touch()
    wait_until(lambda: task.job.get_status() == "finished")
    wait_until(lambda: alloc.redis.hlen(alloc.keys.host_pids("h1")) == 0)


def test_work_horse_pid_is_mapped_to_its_grant_while_it_runs(alloc, tmp_path):
    gpu_host(alloc)
    flag = tmp_path / "go"
    task = alloc.enqueue(jobs.sleep_until_file, str(flag), resources={"gpus": 1})
    worker = start_worker(alloc, "h1")
    try:
        wait_until(lambda: _horse_pids(alloc) == [task.id])
        _let_it_finish(alloc, task, flag)
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_running_jobs_pid_entry_comes_back_at_the_next_monitoring_tick_after_redis_lost_it(alloc, tmp_path):
    gpu_host(alloc)
    flag = tmp_path / "go"
    task = alloc.enqueue(jobs.sleep_until_file, str(flag), resources={"gpus": 1})
    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_NAMESPACE": alloc.keys.namespace}
    worker = subprocess.Popen([str(Path(sys.executable).parent / "rq"), "worker", "--url", url, "--worker-class",
                               "workers.ResourceWorker", "--job-monitoring-interval", "1",
                               host_queue_name(alloc.keys.namespace, "h1")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _horse_pids(alloc) == [task.id])
        alloc.redis.delete(alloc.keys.host_pids("h1"))  # lost with Redis's data
        wait_until(lambda: _horse_pids(alloc) == [task.id], timeout=10)
        _let_it_finish(alloc, task, flag)
    finally:
        worker.terminate()
        worker.wait(10)


def test_worker_command_channel_stops_within_its_short_read_timeout(alloc):
    # RQ reads its command channel with a 60 s timeout; stopping that thread (at every worker exit)
    # waited for it with redis-py 8.2. The worker reads for a second at a time instead.
    import time

    from redis import Redis
    from rq import Queue

    from workers import ResourceWorker

    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    conn = Redis.from_url(url)
    w = ResourceWorker([Queue(host_queue_name(alloc.keys.namespace, "h1"), connection=conn)], connection=conn,
                       allocator=alloc)
    w.subscribe()
    assert w.pubsub_thread.sleep_time == ResourceWorker.PUBSUB_POLL_S == 1.0
    time.sleep(0.2)  # the thread is reading
    t0 = time.monotonic()
    w.unsubscribe()
    assert time.monotonic() - t0 < 3 and not w.pubsub_thread.is_alive()


def test_a_running_job_without_time_limit_keeps_its_grant_past_its_ttl(alloc, clock, tmp_path):
    gpu_host(alloc)
    flag = tmp_path / "go"
    task = alloc.enqueue(jobs.sleep_until_file, str(flag), resources={"gpus": 1}, ttl_seconds=5, job_timeout=-1)
    worker = start_worker(alloc, "h1")
    try:
        wait_until(lambda: task.job.get_status() == "started")
        clock.advance(600)  # ten minutes into the run; its 5 s TTL (the wait for a worker) long past
        assert alloc.expire() == []
        assert alloc.get(task.id).state == "active"
        flag.touch()
        wait_until(lambda: alloc.get(task.id).state != "active")
        assert alloc.get(task.id).release_reason == "released"
    finally:
        flag.touch()
        worker.terminate()
        worker.wait(10)


@pytest.mark.parametrize(("timeout", "lease"), [(3600, 3600 + 60 + 30 + 30), (None, 180 + 60 + 30 + 30),
                                              (-1, math.inf)])
def test_a_job_holds_its_grant_as_long_as_rq_lets_it_run(alloc, timeout, lease):
    worker = in_process_worker(alloc, "h1", job_monitoring_interval=30)
    job = Job.create(jobs.add, args=(1, 2), connection=alloc.rq_connection, timeout=timeout)
    assert worker.run_lease_s(job) == lease


def test_a_job_whose_deadline_passed_before_a_worker_took_it_does_not_run(alloc, clock):
    import time

    clock.now = time.time() - 3600  # placed an hour ago with a one-minute TTL, never reaped
    gpu_host(alloc)
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1}, ttl_seconds=60, job_timeout=-1)
    run_worker(alloc, "h1")
    assert task.job.get_status() == "canceled"
    rec = alloc.get(task.id)
    assert (rec.state, rec.release_reason) == ("released", "expired")
    assert alloc.capacity().gpus_idle == 2


def test_a_task_waiting_for_an_expired_jobs_gpus_is_placed_when_its_claim_fails(alloc, clock):
    import time

    clock.now = time.time() - 3600  # placed an hour ago with a one-minute TTL, never reaped
    gpu_host(alloc)
    late = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 2}, ttl_seconds=60, job_timeout=-1)
    waiting = alloc.enqueue(jobs.add, 3, 4, resources={"gpus": 2})
    assert alloc.get(waiting.id).state == "pending"
    run_worker(alloc, "h1")  # no scheduler runs: the worker's refusal of the late job places it
    assert late.job.get_status() == "canceled"
    assert waiting.job.get_status() == "finished"
    assert waiting.job.return_value() == 7


def test_a_worker_applies_the_operators_settings_to_the_passes_it_runs(alloc, monkeypatch):
    from rq import Queue

    from workers import ResourceWorker

    monkeypatch.setenv("ALLOCATOR_PASS_DEPTH", "1")
    monkeypatch.setenv("ALLOCATOR_SCAN_CAP", "7")
    monkeypatch.setenv("ALLOCATOR_RECORD_RETENTION_S", "60")
    conn = alloc.rq_connection
    w = ResourceWorker([Queue(host_queue_name(alloc.keys.namespace, "h1"), connection=conn)], connection=conn)
    assert (w.allocator.pass_depth, w.allocator.scan_cap, w.allocator.record_retention_s) == (1, 7, 60)


@pytest.mark.parametrize("failure_ttl", [None, 0])
def test_a_run_whose_task_was_placed_again_on_its_host_after_a_loss_is_stopped_at_the_next_tick(alloc, tmp_path,
                                                                                               failure_ttl):
    from allocator.agent import mark_lost

    gpu_host(alloc)
    runs = tmp_path / "runs"
    task = alloc.enqueue(jobs.log_run, str(runs), 3.0, resources={"gpus": 1}, failure_ttl=failure_ttl)

    def lost_and_placed_again() -> None:
        alloc.redis.zadd(alloc.keys.heartbeats, {"h1": 0})  # its agent went silent long ago
        assert mark_lost(alloc, "h1", grace_s=1) is not None  # the task goes back in line
        gpu_host(alloc)  # the host comes back (generation 2) and the task is placed on it again
        rec = alloc.get(task.id)
        assert (rec.state, rec.host_id, rec.requeues) == ("active", "h1", 1)

    work_losing_stop_commands(alloc, "h1", once_running=lost_and_placed_again)
    # The first run was stopped at its next monitoring tick (it would have held the GPU beside the
    # second run, which then ran to its end).
    assert runs.read_text().split() == ["start", "start", "end"]
    assert alloc.get(task.id).release_reason == "released" and alloc.capacity().gpus_idle == 2


def test_a_run_whose_task_was_placed_elsewhere_after_a_loss_is_stopped_and_the_job_runs_there(alloc, tmp_path):
    from allocator.agent import mark_lost

    gpu_host(alloc, "h1")
    runs = tmp_path / "runs"
    task = alloc.enqueue(jobs.log_run, str(runs), 3.0, resources={"gpus": 1}, failure_ttl=0)
    gpu_host(alloc, "h2")

    def lost_and_placed_elsewhere() -> None:
        alloc.redis.zadd(alloc.keys.heartbeats, {"h1": 0})
        assert mark_lost(alloc, "h1", grace_s=1) is not None
        assert (alloc.get(task.id).state, alloc.get(task.id).host_id) == ("active", "h2")

    work_losing_stop_commands(alloc, "h1", once_running=lost_and_placed_elsewhere)
    # The stopped run was not filed as failed: at failure_ttl 0 that deleted the job h2 is to run.
    assert alloc.rq_connection.exists(task.job.key) == 1
    run_worker(alloc, "h2")
    assert runs.read_text().split() == ["start", "start", "end"]
    assert alloc.get(task.id).release_reason == "released"

