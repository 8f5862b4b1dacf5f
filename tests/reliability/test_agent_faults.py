"""Fault: a host's agent is killed with kill -9 while the host holds work (and, as in a machine
crash, nobody else tells the fleet). The reaper (in a real ``allocator scheduler`` process) must
notice the silence, free what the host held and hand function tasks on by their policy, with
the history recording every step."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.history.audit import compare_allocations, compare_events
from allocator.history.recorder import Recorder

from . import jobs
from .conftest import url_text
from .helpers import (
    GRACE_S,
    Procs,
    alloc_state,
    assert_consistent,
    ends,
    events_of,
    host_entry,
    keep_stream,
    starts,
    wait_for,
    watching,
    write_inventory,
)

RES = {"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1, "ram_mb": "1Gi"}


def _beating(a: Allocator, h: str) -> bool:
    return a.redis.zscore(a.keys.heartbeats, h) is not None


def test_kill_9_of_an_agent(ledger: Allocator, procs: Procs, tmp_path: Path, pg_url: URL, pg_engine: Engine) -> None:
    """h1 holds a lease, a running task with ``on_host_lost="requeue"`` (the default) and a running
    task with ``on_host_lost="fail"``; h2 (own agent and worker) joins with room. Then h1's agent
    gets SIGKILL.
    Expected, within the grace plus a reaper pass: h1 is lost; the lease is released
    (``host_lost``); the requeue task is placed on h2 and runs there; the fail task fails and
    does not run again. h1's workers are alive (only the agent died), so the first runs go on;
    when they end they release nothing (their placements are gone). A restarted agent brings h1
    back under generation 2. Invariants hold throughout; afterwards every outbox entry is in
    Postgres exactly once and every allocation's history row agrees with the ledger."""
    a = ledger
    keep_stream(a)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    inv1 = write_inventory(tmp_path / "h1.yaml", [host_entry("h1", cores=4, gpus=1)])
    agent1 = procs.agent(inv1, "agent-h1")
    wait_for(lambda: _beating(a, "h1"), what="h1 heartbeat")
    procs.scheduler(database_url=url_text(pg_url))
    procs.worker("h1", "w1a")
    procs.worker("h1", "w1b")
    with watching(a):
        lease = a.allocate({"cpu_cores": 1, "ram_mb": "1Gi"}, owner="rel")
        t_req = a.enqueue(jobs.record_run, str(runs_dir), "req", "req-{pid}.go", resources=RES, task_type="rel")
        t_fail = a.enqueue(jobs.record_run, str(runs_dir), "fail", "fail-{pid}.go", resources=RES, task_type="rel",
                           on_host_lost="fail")
        first_req = wait_for(lambda: starts(runs_dir, "req"), what="req running on h1")[0]
        first_fail = wait_for(lambda: starts(runs_dir, "fail"), what="fail running on h1")[0]
        assert first_req["host"] == first_fail["host"] == "h1"

        procs.agent(write_inventory(tmp_path / "h2.yaml", [host_entry("h2", cores=4, gpus=1)]), "agent-h2")
        procs.worker("h2", "w2")
        wait_for(lambda: _beating(a, "h2"), what="h2 heartbeat")

        agent1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        agent1.wait(10)
        wait_for(lambda: a.redis.hget(a.keys.host("h1"), "state") == "lost", timeout=GRACE_S + 10, what="h1 lost")
        lost_s = time.monotonic() - t0
        assert alloc_state(a, lease.allocation_id) == ("released", "h1", "host_lost")
        wait_for(lambda: alloc_state(a, t_fail.id)[0] == "failed", what="fail task failed")
        second = wait_for(lambda: starts(runs_dir, "req")[1:], timeout=20, what="req running again on h2")[0]
        assert second["host"] == "h2"
        print(f"\nagent SIGKILL -> h1 lost and its grants freed in {lost_s:.2f} s (grace {GRACE_S} s); "
              f"requeued task running on h2 {time.monotonic() - t0:.2f} s after the kill")

        # The first runs end: their workers release nothing.
        (runs_dir / f"req-{first_req['pid']}.go").touch()
        (runs_dir / f"fail-{first_fail['pid']}.go").touch()
        wait_for(lambda: len(ends(runs_dir, "req")) == 1 and len(ends(runs_dir, "fail")) == 1, what="first runs end")
        assert alloc_state(a, t_req.id)[:2] == ("active", "h2")
        (runs_dir / f"req-{second['pid']}.go").touch()
        wait_for(lambda: alloc_state(a, t_req.id)[0] == "released", timeout=15, what="req released on h2")

        procs.agent(inv1, "agent-h1-again")
        wait_for(lambda: a.redis.hmget(a.keys.host("h1"), "state", "gen") == ["ready", "2"], what="h1 back, gen 2")
    assert len(starts(runs_dir, "fail")) == 1  # the fail policy: no second run
    assert [e["data"]["reason"] for e in events_of(a, t_req.id, "released")] == ["host_lost", "released"]
    assert [e["data"]["reason"] for e in events_of(a, t_fail.id, "released")] == ["host_lost"]
    assert_consistent(a)
    assert a.capacity().active_allocations == 0

    # The history has every event once, and says what the ledger says.
    rec = Recorder(a, pg_engine, block_ms=0, estimates_every_s=0)
    wait_for(lambda: rec.backlog().total == 0, timeout=20, what="recorder backlog empty")
    missing, extra = compare_events(pg_engine, a, [sid for sid, _ in a.redis.xrange(a.keys.events)])
    assert (missing, extra) == ([], [])
    assert compare_allocations(pg_engine, a) == []
