"""Faults of Redis itself, on a private redis-server per test (never the shared one):

- killed with kill -9 and restarted with its append-only file: the ledger comes back exactly,
  the script cache does not (Redis never persists it) and every client reloads the scripts on
  NOSCRIPT without noticing; agents, workers and schedulers reconnect and carry on;
- killed and restarted empty (no persistence: the data is lost): agents register their hosts
  again, the recorder closes the recovery gate, and ``allocator recover`` rebuilds the active
  allocations from Postgres; a job that ran through it all is released once when it ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.errors import Recovering
from allocator.history.audit import compare_allocations, compare_events
from allocator.history.recorder import Recorder
from allocator.scripts import source

from . import jobs
from .conftest import url_text
from .helpers import (
    ROOT,
    Procs,
    alloc_state,
    assert_consistent,
    ends,
    hold,
    host_entry,
    keep_stream,
    logical_dump,
    signal_tree,
    starts,
    wait_for,
    watching,
    write_inventory,
)

FLEET = [host_entry("h1", cores=4, gpus=2), host_entry("h2", cores=4, gpus=1)]


def _grants(a: Allocator) -> dict[str, tuple]:
    return {x.allocation_id: (x.host_id, sorted((g.uuid, g.memory_mb) for g in x.gpus), x.cpu_cores, x.cpu_shared,
                              x.ram_mb) for x in a.list(state="active")}


def _norm(snap: dict) -> dict:
    """A snapshot with set members sorted (a set's order may change when Redis reloads it)."""
    return {**snap, "host_allocs": {h: sorted(v or []) for h, v in (snap.get("host_allocs") or {}).items()}}


def _sha(name: str) -> str:
    import hashlib

    return hashlib.sha1(source(name).encode()).hexdigest()


def test_redis_restarted_with_aof_keeps_the_ledger_and_reloads_scripts(
        private_redis, tmp_path: Path, pg_url: URL, pg_engine: Engine) -> None:
    """Fault: the Redis server (``--appendonly yes --appendfsync always``) is killed with SIGKILL
    and started again on its data directory, while an agent, a worker running a job, and a
    scheduler with its recorder are connected (frozen with SIGSTOP around the restart, so the
    data can be compared before and after).
    Expected: every persistent key (ledger, indexes, outbox stream and its consumer groups, RQ
    queues and jobs) reads back identical; the script cache is empty after the restart and the
    next calls reload scripts transparently (NOSCRIPT is never seen by a caller); the processes
    reconnect: the agent's heartbeats go on (no host declared lost), the running job's end
    releases it, a queued lease is placed by the release, a new job runs; the invariants hold;
    the history has every event once and agrees with the ledger."""
    server = private_redis(["--appendonly", "yes", "--appendfsync", "always"])
    ns = "rel-" + uuid.uuid4().hex[:10]
    a = Allocator(server.url, namespace=ns)
    keep_stream(a)
    raw = redis.Redis.from_url(server.url)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    procs = Procs(logs, server.url, ns)
    try:
        agent = procs.agent(write_inventory(tmp_path / "fleet.yaml", FLEET))
        wait_for(lambda: a.redis.zcard(a.keys.heartbeats) == 2, what="both hosts heartbeating")
        sched = procs.scheduler(database_url=url_text(pg_url), grace=5.0)
        workers = [procs.worker("h1"), procs.worker("h2")]
        with watching(a):
            big, other, third = (a.allocate({"gpus": 1, "gpu_memory_mb": "16Gi"}) for _ in range(3))
            waiting = a.allocate({"gpus": 1, "gpu_memory_mb": "16Gi"}, on_busy="queue")
            job = a.enqueue(jobs.record_run, str(runs_dir), "j", "j.go", resources={"cpu_cores": 1}, task_type="rel")
            wait_for(lambda: starts(runs_dir, "j"), what="job running")
            assert waiting.state == "pending"
            frozen = [signal_tree(p.pid, signal.SIGSTOP) for p in (agent, sched, *workers)]
            before = logical_dump(raw)
            snap = _norm(a.snapshot())

            server.kill()
            t0 = time.monotonic()
            server.start()
            print(f"\nredis-server killed and back from its AOF in {time.monotonic() - t0:.2f} s; "
                  f"{len(before)} persistent keys compared")
            assert raw.script_exists(_sha("release"), _sha("place")) == [False, False]  # cache gone
            assert logical_dump(raw) == before
            assert _norm(a.snapshot()) == snap  # the test's own client: reconnects, reloads snapshot.lua
            for pids in frozen:
                for pid in pids:
                    signal_tree(pid, signal.SIGCONT)

            beat = float(a.redis.zscore(a.keys.heartbeats, "h1"))
            wait_for(lambda: float(a.redis.zscore(a.keys.heartbeats, "h1")) > beat, what="agent heartbeating again")
            assert a.release(big.allocation_id).released_now  # NOSCRIPT answered by a reload, invisibly
            assert alloc_state(a, waiting.allocation_id)[0] == "active"  # placed by the release's pass
            (runs_dir / "j.go").touch()
            wait_for(lambda: alloc_state(a, job.id)[0] == "released", timeout=20, what="job released by its worker")
            job2 = a.enqueue(jobs.record_run, str(runs_dir), "j2", resources={"cpu_cores": 1}, task_type="rel")
            wait_for(lambda: alloc_state(a, job2.id)[0] == "released", timeout=20, what="a new job run after the restart")
            hold(lambda: {h.state for h in a.capacity().hosts} == {"ready"}, 1.0, what="no host lost")
            for x in (other, third, waiting):
                a.release(x.allocation_id)
        assert len(ends(runs_dir, "j")) == len(ends(runs_dir, "j2")) == 1
        assert_consistent(a)
        assert a.capacity().active_allocations == 0
        assert "NOSCRIPT" not in procs.logs()
        rec = Recorder(a, pg_engine, block_ms=0, estimates_every_s=0)
        wait_for(lambda: rec.backlog().total == 0, timeout=20, what="recorder backlog empty")
        missing, extra = compare_events(pg_engine, a, [sid for sid, _ in a.redis.xrange(a.keys.events)])
        assert (missing, extra) == ([], [])
        assert compare_allocations(pg_engine, a) == []
    finally:
        procs.stop_all()
        raw.close()


def test_redis_data_lost_allocator_recover_restores_from_postgres_and_agents(
        private_redis, tmp_path: Path, pg_url: URL, pg_engine: Engine) -> None:
    """Fault: Redis (no persistence) is killed with SIGKILL and started empty: the ledger, the
    outbox and the RQ queues are gone, while an agent, a scheduler with its recorder and a worker
    running a job stay up.
    Expected: the agent registers its hosts again on its next round; the recorder finds its
    consumer group gone and closes the recovery gate, so placements are refused (RECOVERING)
    instead of handing out capacity that running work still holds; ``allocator recover`` (the
    CLI) restores exactly the allocations that were active (same ids, hosts, GPUs, cores, RAM),
    the invariants hold and placements reopen; the job running through it all ends and its
    worker releases it once; the history agrees with the ledger afterwards. Not restored (by
    design, see docs/history.md): the pending line, which lived only in Redis."""
    server = private_redis()
    ns = "rel-" + uuid.uuid4().hex[:10]
    a = Allocator(server.url, namespace=ns)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    procs = Procs(logs, server.url, ns)
    db = url_text(pg_url)
    try:
        procs.agent(write_inventory(tmp_path / "fleet.yaml", FLEET))
        wait_for(lambda: a.redis.zcard(a.keys.heartbeats) == 2, what="both hosts heartbeating")
        procs.scheduler(database_url=db, grace=5.0)
        procs.worker("h1")
        procs.worker("h2")
        a.allocate({"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 1, "ram_mb": "2Gi"}, owner="alice")
        a.allocate({"cpu_cores": "0.5", "ram_mb": "1Gi"}, owner="bob", ttl_seconds=None)
        done = a.allocate({"cpu_cores": 1})
        a.release(done.allocation_id)
        job = a.enqueue(jobs.record_run, str(runs_dir), "j", "j.go",
                        resources={"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 1}, task_type="rel")
        wait_for(lambda: starts(runs_dir, "j"), what="job running")
        before = _grants(a)
        assert len(before) == 3
        rec = Recorder(a, pg_engine, block_ms=0, estimates_every_s=0)
        wait_for(lambda: rec.backlog().total == 0, timeout=20, what="history up to date")

        server.kill()
        server.start()  # empty: no persistence
        wait_for(lambda: a.redis.hget(a.keys.seq, "recovering") == "1", timeout=20, what="recovery gate closed")
        wait_for(lambda: a.redis.zcard(a.keys.hosts) == 2, what="agent registered the hosts again")
        with pytest.raises(Recovering):
            a.allocate({"cpu_cores": 1})

        env = procs.env(ALLOCATOR_DATABASE_URL=db)
        r = subprocess.run([sys.executable, "-m", "allocator", "recover", "--json"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        print(f"\nrecover: {report}")
        assert report["ok"] and report["restored"] == 3 and report["conflicts"] == []
        assert _grants(a) == before
        assert_consistent(a)
        with watching(a):
            x = a.allocate({"cpu_cores": 1})  # placements open again
            a.release(x.allocation_id)
            (runs_dir / "j.go").touch()
            wait_for(lambda: alloc_state(a, job.id)[0] in ("released", "failed"), timeout=20,
                     what="the job released by its worker")
        assert len(ends(runs_dir, "j")) == 1
        assert_consistent(a)
        assert a.capacity().active_allocations == 2
        wait_for(lambda: rec.backlog().total == 0, timeout=20, what="history up to date again")
        assert compare_allocations(pg_engine, a) == []
    finally:
        procs.stop_all()
        a.redis.close()
