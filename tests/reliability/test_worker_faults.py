"""Fault: a worker parent dies (kill -9) while its work horse runs a job.

RQ forks a work horse per job in a process group of its own, so killing the worker parent leaves
the horse running; the parent, which would have released the allocation after the job, is gone.
Before this suite the grant stayed held until its TTL (an hour by default). Now the host's agent
(same machine) sees that neither the claiming worker nor any horse of the run is alive and
releases the allocation with the placement the worker claimed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from allocator import Allocator

from . import jobs
from .helpers import (
    Procs,
    alloc_state,
    assert_consistent,
    ends,
    events_of,
    hold,
    host_entry,
    keep_stream,
    signal_tree,
    starts,
    wait_for,
    watching,
    write_inventory,
)

RES = {"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1, "ram_mb": "1Gi"}


def test_kill_9_of_a_worker_parent_mid_task(ledger: Allocator, procs: Procs, tmp_path: Path) -> None:
    """Expected: the orphaned horse finishes its job exactly once and keeps its grant while it
    runs; once it has exited the agent releases the allocation (reason ``released``: the job
    finished; a ``finished`` event with ``worker_lost``). When worker and horse are both killed
    the allocation is released as ``failed``. A new worker on the host runs the next job. The
    ledger invariants hold throughout and nothing stays allocated."""
    a = ledger
    keep_stream(a)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    procs.agent(write_inventory(tmp_path / "fleet.yaml", [host_entry("h1", cores=4, gpus=1)]))
    wait_for(lambda: a.redis.zscore(a.keys.heartbeats, "h1"), what="agent heartbeat")
    worker = procs.worker("h1")
    with watching(a):
        # 1. Only the parent dies; the horse runs on.
        j1 = a.enqueue(jobs.record_run, str(runs_dir), "j1", "j1.go", resources=RES, task_type="rel")
        horse = wait_for(lambda: starts(runs_dir, "j1"), what="j1 started")[0]["pid"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert psutil.pid_exists(horse)
        hold(lambda: alloc_state(a, j1.id)[0] == "active", 1.0, what="the running horse's grant")  # 5 agent checks
        (runs_dir / "j1.go").touch()
        t0 = time.monotonic()
        wait_for(lambda: alloc_state(a, j1.id)[0] == "released", timeout=10, what="j1 released by the agent")
        print(f"\norphaned horse exited -> released by the agent in {time.monotonic() - t0:.2f} s")
        assert alloc_state(a, j1.id) == ("released", "h1", "released")
        assert len(starts(runs_dir, "j1")) == len(ends(runs_dir, "j1")) == 1
        assert [e["data"]["worker_lost"] for e in events_of(a, j1.id, "finished")] == [True]

        # 2. Parent and horse die together (the whole worker killed): released as failed.
        worker_b = procs.worker("h1", "worker-h1-b")
        j2 = a.enqueue(jobs.record_run, str(runs_dir), "j2", "j2.go", resources=RES, task_type="rel")
        wait_for(lambda: starts(runs_dir, "j2"), what="j2 started")
        assert len(signal_tree(worker_b.pid, signal.SIGKILL)) == 2  # parent and horse
        t0 = time.monotonic()
        worker_b.wait(10)
        wait_for(lambda: alloc_state(a, j2.id)[0] == "failed", timeout=10, what="j2 released by the agent")
        print(f"worker and horse killed -> released (failed) by the agent in {time.monotonic() - t0:.2f} s")
        assert alloc_state(a, j2.id) == ("failed", "h1", "failed")
        assert ends(runs_dir, "j2") == []

        # 3. Nothing is stuck: a new worker runs the next job on the freed capacity.
        procs.worker("h1", "worker-h1-c")
        j3 = a.enqueue(jobs.record_run, str(runs_dir), "j3", resources={"gpus": 1, "cpu_cores": 4}, task_type="rel")
        wait_for(lambda: alloc_state(a, j3.id)[0] == "released", timeout=20, what="j3 run and released")
    assert len(starts(runs_dir, "j3")) == 1
    assert_consistent(a)
    cap = a.capacity()
    assert cap.active_allocations == 0 and cap.gpus_idle == cap.gpu_count == 1
    # Each allocation was released exactly once.
    for t in (j1, j2, j3):
        assert len(events_of(a, t.id, "released")) == 1
    assert "died; allocation released" in procs.log("agent")
