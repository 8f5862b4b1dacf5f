"""Fault: one of two ``allocator scheduler`` replicas is killed with kill -9 again and again,
including with a scheduling script sent and not yet run, while queued work streams in.

Every pass, expiry and reclaim is one Lua script, which Redis runs whole or not at all: a
replica that dies can leave nothing half-done, and the other replica's ticks keep the line
moving. The replica's history recorder may die between its database commit and its XACK; the
surviving recorder claims those entries (here the test's own recorder claims them at once
instead of after the 60 s idle time) and the events table's key makes the replay a no-op.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid
from pathlib import Path

import psutil
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.history.audit import compare_allocations, compare_events
from allocator.history.recorder import Recorder

from .conftest import url_text
from .helpers import Procs, assert_consistent, events_by_id, keep_stream, wait_for, watching

HOSTS = [{"id": f"s{i}", "cpu_cores": 8, "ram_mb": "32Gi",
          "gpus": [{"index": g, "model": "A100", "memory_mb": "40Gi"} for g in range(2)]} for i in range(4)]


def _scripts_of(r, pid: int, held: bool = False) -> bool:
    """Whether one of ``pid``'s Redis connections last ran EVALSHA (``held``: and is held in
    flight by CLIENT PAUSE, the command sent and not yet run)."""
    try:
        ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.laddr}
    except psutil.Error:
        return False
    for cl in r.client_list():
        port = int(cl["addr"].rsplit(":", 1)[1])
        if port in ports and cl.get("cmd") == "evalsha" and (not held or "b" in cl.get("flags", "")):
            return True
    return False


def _poll(pred, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


def test_kill_9_of_a_scheduler_while_a_second_one_runs(private_redis, tmp_path: Path, pg_url: URL,
                                                        pg_engine: Engine) -> None:
    """Two scheduler replicas (tick 10 ms, recorder on, Postgres); queued leases of 2 cores with a
    0.3 s TTL arrive at ~100/s on 32 cores while the kills go on, so the line grows and only
    expiries (done by the ticks) let it move. Replica S1 is killed four times with SIGKILL and restarted: twice
    with one of its ledger scripts sent and held in flight (CLIENT PAUSE), twice at a random
    moment of its loop.
    Expected: no lease is placed twice (one ``allocated`` and one ``released`` event each), the
    invariants hold at every check, the whole line drains (nothing stuck pending or active), and
    after a final recorder pass every outbox entry is in Postgres once and the history agrees
    with the ledger."""
    server = private_redis()
    ns = "rel-" + uuid.uuid4().hex[:10]
    a = Allocator(server.url, namespace=ns)
    keep_stream(a)
    for h in HOSTS:
        a.register_host(h)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Procs(logs, server.url, ns)
    db = url_text(pg_url)
    admin = server.client()
    kills = {"in_flight": 0, "random": 0}
    try:
        s1 = procs.scheduler("s1", "--interval", "0.01", database_url=db)
        procs.scheduler("s2", "--interval", "0.01", database_url=db)
        ids: list[str] = []
        done = threading.Event()

        def load() -> None:  # ~100 leases/s until the kills are over; the line grows meanwhile
            c = Allocator(server.url, namespace=ns)
            while not done.is_set():
                x = c.allocate({"cpu_cores": 2, "ram_mb": "1Gi"}, on_busy="queue", ttl_seconds=0.3,
                               task_type="soak", allocation_id=f"q{len(ids):05d}")
                ids.append(x.allocation_id)
                time.sleep(0.01)

        rng = random.Random(7)
        with watching(a):
            t = threading.Thread(target=load, daemon=True)
            t.start()
            for n in range(4):
                wait_for(lambda: _scripts_of(admin, s1.pid), timeout=20, step=0.01, what="s1 running passes")
                time.sleep(rng.uniform(0.05, 0.3))
                if n % 2 == 0:
                    # Hold every write for a moment; when s1's next write is a ledger script (and
                    # not, say, its ETA cache's MULTI), kill it with that script in flight.
                    for _ in range(50):
                        admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
                        try:
                            held = _poll(lambda: _scripts_of(admin, s1.pid, held=True), 0.2)
                            if held:
                                s1.send_signal(signal.SIGKILL)
                                s1.wait(10)
                        finally:
                            admin.execute_command("CLIENT", "UNPAUSE")
                        if held:
                            kills["in_flight"] += 1
                            break
                else:
                    s1.send_signal(signal.SIGKILL)
                    s1.wait(10)
                    kills["random"] += 1
                s1 = procs.scheduler(f"s1-{n}", "--interval", "0.01", database_url=db)
            # The kills take a few seconds, less on a quick machine: keep the load on until the
            # line has seen enough leases for the checks below to mean something.
            wait_for(lambda: len(ids) > 300, timeout=30, what="over 300 leases queued")
            done.set()
            t.join(30)
            wait_for(lambda: a.redis.zcard(a.keys.pending) == 0 and a.redis.zcard(a.keys.active) == 0,
                     timeout=30, what="the line drained and every lease expired")
        procs.stop_all()
        print(f"\n{len(ids)} queued leases, {kills['in_flight']} kills with a script in flight, {kills['random']} at random; "
              f"line drained; {a.redis.xlen(a.keys.events)} events")
        assert kills == {"in_flight": 2, "random": 2}
        assert len(ids) > 300
        by_id = events_by_id(a)
        for aid in ids:
            kinds = [(e["type"], e["data"].get("reason")) for e in by_id[aid] if e["type"] in ("allocated", "released")]
            assert kinds == [("allocated", None), ("released", "expired")], (aid, kinds)
        assert_consistent(a)
        # The killed replicas' recorders left entries delivered but unacknowledged: claim them now.
        rec = Recorder(a, pg_engine, block_ms=0, claim_idle_ms=1, estimates_every_s=0)
        rec.drain(timeout_s=60)
        missing, extra = compare_events(pg_engine, a, [sid for sid, _ in a.redis.xrange(a.keys.events)])
        assert (missing, extra) == ([], [])
        assert compare_allocations(pg_engine, a) == []
    finally:
        procs.stop_all()
        a.redis.close()
