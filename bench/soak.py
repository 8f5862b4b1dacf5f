"""Bounded soak run: many clients against a simulated fleet, with an invariant checker alongside.

For ``--seconds`` (default 60):

- a simulated fleet of ``--hosts`` hosts (default 16: 4 GPUs and 16 cores each) served by one
  in-process host agent (static inventory file, heartbeat 0.5 s);
- ``--clients`` client processes (default 6) in a loop of allocate (fail fast), allocate
  (queue when busy), enqueue a function task (a real RQ job), release, cancel, a repeated
  release or allocate (the retry a lost reply causes), batches of placements
  (``allocate_many``) and of releases (``release_many``, of held leases, queued requests and
  tasks alike, with an id repeated), with random priorities, strategies,
  selectors, TTLs (1-8 s for leases, 5-20 s for tasks) and expected durations;
- simulated workers: placed function tasks are claimed (``claim_grant``, as a worker does before
  it starts a job) and released with the claimed placement after 0.1-1.5 s;
- two scheduler replicas (``run_scheduler``: reaper with a 3 s grace, TTL expiry, the pass, the
  ETA refresh) and two history recorders (Postgres with ``--database-url``, else SQLite);
- chaos: every ``--chaos`` seconds one host drops out of the inventory file (the agent stops
  heartbeating it, the reaper declares it lost, frees its grants and requeues its tasks) and
  comes back a few seconds later (registered again under the next generation);
- an invariant checker: ``allocator.invariants.check`` on an atomic snapshot, back to back.

Then the clients stop, what they hold is released and the line emptied, the recorders drain,
and the history is compared with the ledger: every outbox entry in the ``events`` table once,
every allocation's state, host, release reason and requeue count equal, and each allocation
placed exactly once per placement (``allocated`` events = requeues + 1).

Figures: operations done by kind, invariant checks run, violations found (must be 0), history
mismatches (must be 0). Exit status 1 if anything was found.

    .venv/bin/python bench/soak.py --seconds 60
    .venv/bin/python bench/soak.py --seconds 60 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test --json soak.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
import yaml  # noqa: E402

from allocator import Allocator  # noqa: E402
from allocator.agent import Agent, StaticProvider  # noqa: E402
from allocator.agent.fencing import claim_grant  # noqa: E402
from allocator.embedded import start_redis_server, stop_redis_server  # noqa: E402
from allocator.errors import AllocatorError, InvalidRequest  # noqa: E402
from allocator.history.audit import compare_allocations, compare_events  # noqa: E402
from allocator.history.db import make_engine, redacted  # noqa: E402
from allocator.history.migrate import upgrade  # noqa: E402
from allocator.history.recorder import Recorder  # noqa: E402
from allocator.invariants import check  # noqa: E402
from allocator.worker_cli import run_scheduler  # noqa: E402

GRACE_S = 3.0
HEARTBEAT_S = 0.5


def fleet(n: int) -> list[dict[str, Any]]:
    zones = ["a", "b", "c"]
    return [{"id": f"sim-{i:03d}", "cpu_cores": 16, "ram_mb": "64Gi", "labels": {"zone": zones[i % 3]},
             "gpus": [{"index": g, "model": "A100" if i % 2 else "T4", "memory_mb": "40Gi" if i % 2 else "16Gi"}
                      for g in range(4)]} for i in range(n)]


def write_inventory(path: Path, hosts: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False))
    os.replace(tmp, path)


def random_request(rng: random.Random) -> dict[str, Any]:
    k = rng.random()
    if k < 0.2:
        return {"cpu_cores": rng.choice([1, 2, "0.5", "250m"]), "ram_mb": rng.choice(["1Gi", "4Gi", 512])}
    if k < 0.35:
        return {"gpus": rng.choice([1, 2]), "cpu_cores": rng.randint(1, 4), "ram_mb": "8Gi"}
    return {"gpus": rng.choice([1, 1, 1, 2]), "gpu_memory_mb": rng.choice(["2Gi", "4Gi", "8Gi", "12Gi", "20Gi"]),
            "cpu_cores": rng.choice([1, 2, "1.5"]), "ram_mb": rng.choice(["2Gi", "8Gi", "16Gi"])}


def client(url: str, ns: str, seed: int, stop_at: float, out: mp.Queue) -> None:
    rng = random.Random(seed)
    a = Allocator(url, namespace=ns)
    held: list[str] = []
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    while time.time() < stop_at:
        r = rng.random()
        try:
            if len(held) > 3 and r < 0.04:
                some = rng.sample(held, rng.randint(2, min(8, len(held))))
                for aid in some:
                    held.remove(aid)
                a.release_many([*some, some[0]], chunk_size=rng.choice([1, 3, 32]))
                ops["release_many"] += 1
            elif held and (r < 0.28 or len(held) > 20):
                aid = held.pop(rng.randrange(len(held)))
                a.release(aid)
                ops["release"] += 1
                if rng.random() < 0.1:
                    a.release(aid)  # a retry after a lost reply: must change nothing
                    ops["release_repeat"] += 1
            elif held and r < 0.36:
                a.cancel(held.pop(rng.randrange(len(held))))
                ops["cancel"] += 1
            elif r < 0.40:
                batch = [{"resources": random_request(rng), "ttl_seconds": rng.uniform(1, 8), "owner": f"o{seed}",
                          "allocation_id": f"c{seed}-{uuid.uuid4().hex[:10]}"} for _ in range(rng.randint(2, 5))]
                for x in a.allocate_many(batch, chunk_size=rng.choice([1, 2, 32])):
                    if isinstance(x, AllocatorError):
                        ops["refused"] += 1
                    else:
                        held.append(x.allocation_id)
                        ops["allocate"] += 1
                ops["allocate_many"] += 1
            elif r < 0.56:
                aid = f"c{seed}-{uuid.uuid4().hex[:10]}"
                try:
                    a.allocate(random_request(rng), allocation_id=aid, ttl_seconds=rng.uniform(1, 8),
                               strategy=rng.choice(["best_fit", "first_fit", "worst_fit"]), owner=f"o{seed}")
                    held.append(aid)
                    ops["allocate"] += 1
                    if rng.random() < 0.05:
                        a.allocate(random_request(rng), allocation_id=aid)  # retried: returns the first grant
                        ops["allocate_repeat"] += 1
                except AllocatorError:
                    ops["refused"] += 1
            elif r < 0.8:
                x = a.allocate(random_request(rng), on_busy="queue", ttl_seconds=rng.uniform(1, 8),
                               priority=rng.choice(["low", "normal", "normal", "high", "critical"]),
                               strategy=rng.choice(["best_fit", "first_fit", "priority"]),
                               expected_duration=rng.choice([None, 1, 3]),
                               selector=rng.choice([None, None, {"zone": ["a", "b"]}]), owner=f"o{seed}")
                held.append(x.allocation_id)
                ops["queue"] += 1
            else:
                t = a.enqueue(time.sleep, 0, resources=random_request(rng), ttl_seconds=rng.uniform(5, 20),
                              priority=rng.choice(["low", "normal", "high"]), task_type=rng.choice(["train", "infer"]),
                              expected_duration=rng.choice([None, 1]), on_host_lost=rng.choice(["requeue", "fail"]))
                if rng.random() < 0.2:
                    held.append(t.id)  # this client will cancel or release it; otherwise its worker does
                ops["enqueue"] += 1
        except InvalidRequest as exc:
            errors[f"invalid: {exc.field}"] += 1
        except (AllocatorError, redis.RedisError) as exc:
            errors[type(exc).__name__] += 1
    for aid in held:
        try:
            a.release(aid)
        except (AllocatorError, redis.RedisError):
            pass
    out.put({"ops": dict(ops), "errors": dict(errors)})


class SimWorkers(threading.Thread):
    """Claims placed function tasks and releases each after a short run, by its claimed placement."""

    def __init__(self, url: str, ns: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.a = Allocator(url, namespace=ns)
        self.stop = stop
        self.running: dict[str, tuple[float, str]] = {}
        self.rng = random.Random(99)
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        a = self.a
        while not self.stop.is_set():
            try:
                ids = a.redis.zrange(a.keys.active, 0, -1)
                pipe = a.redis.pipeline(transaction=False)
                for i in ids:
                    pipe.hmget(a.keys.alloc(i), "kind", "host", "claim")
                now = time.monotonic()
                for aid, (kind, host, claim) in zip(ids, pipe.execute() if ids else []):
                    if kind != "job" or claim or aid in self.running:
                        continue
                    st = claim_grant(a, aid, f"sim-worker-{host}", host or "", node="soak", pid=0)
                    self.counts["claimed" if st.current else f"claim refused: {st.reason}"] += 1
                    if st.current:
                        self.running[aid] = (now + self.rng.uniform(0.1, 1.5), st.token or "")
                for aid, (due, token) in list(self.running.items()):
                    if now >= due:
                        del self.running[aid]
                        r = a.release(aid, placement=token)
                        if r.released_now:
                            self.counts["released"] += 1
                        elif r.state in ("active", "pending"):  # requeued (host lost) and maybe placed again
                            self.counts["release of a stale placement: no-op"] += 1
                        else:  # released meanwhile by its client, its TTL or the reaper
                            self.counts["already ended"] += 1
            except (AllocatorError, redis.RedisError) as exc:
                self.counts[f"error: {type(exc).__name__}"] += 1
            self.stop.wait(0.05)


class Checker(threading.Thread):
    def __init__(self, url: str, ns: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.a = Allocator(url, namespace=ns)
        self.stop = stop
        self.checks = 0
        self.violations: list[str] = []
        self.max_pending = self.max_active = 0

    def run(self) -> None:
        while not self.stop.is_set():
            snap = self.a.snapshot()
            bad = check(snap)
            self.checks += 1
            self.max_active = max(self.max_active, len(snap.get("allocs") or {}))
            self.max_pending = max(self.max_pending, int(self.a.redis.zcard(self.a.keys.pending)))
            if bad:
                self.violations.extend(bad[:20])
            self.stop.wait(0.02)


class Chaos(threading.Thread):
    """Drops one host out of the inventory every ``every_s`` and brings it back after a while."""

    def __init__(self, path: Path, hosts: list[dict[str, Any]], every_s: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.path, self.hosts, self.every_s, self.stop = path, hosts, every_s, stop
        self.rng = random.Random(7)
        self.dropped = 0

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            gone = self.rng.choice(self.hosts)
            write_inventory(self.path, [h for h in self.hosts if h is not gone])
            self.dropped += 1
            if self.stop.wait(GRACE_S + 2.0):
                break
            write_inventory(self.path, self.hosts)
        write_inventory(self.path, self.hosts)


def events_summary(a: Allocator) -> tuple[Counter[str], Counter[str], list[str]]:
    """Event counts by type, releases by reason, and allocations placed more often than their
    requeues allow."""
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    allocated: Counter[str] = Counter()
    last = "-"
    while True:
        batch = a.redis.xrange(a.keys.events, min=f"({last}" if last != "-" else "-", count=5000)
        if not batch:
            break
        for sid, f in batch:
            kinds[f["type"]] += 1
            if f["type"] == "allocated":
                allocated[f["id"]] += 1
            elif f["type"] == "released":
                reasons[json.loads(f["data"]).get("reason") or "?"] += 1
        last = batch[-1][0]
    pipe = a.redis.pipeline(transaction=False)
    ids = list(allocated)
    for i in ids:
        pipe.hget(a.keys.alloc(i), "requeues")
    # Each placement ends in a release or a requeue, and each requeue follows a placement: so
    # requeues <= placements <= requeues + 1; more placements would be the same task placed twice.
    doubles = [f"{i}: placed {n} times with {int(rq or 0)} requeues" for i, n, rq in zip(ids, (allocated[i] for i in ids),
                                                                                          pipe.execute() if ids else [])
               if not int(rq or 0) <= n <= int(rq or 0) + 1]
    return kinds, reasons, doubles


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--chaos", type=float, default=10.0, help="seconds between host losses (0: none)")
    ap.add_argument("--redis-url", default=None, help="default: a private redis-server for the run")
    ap.add_argument("--database-url", default=None, help="history database (default: a temporary SQLite file)")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    server = None
    url = args.redis_url
    if url is None:
        url, proc, data_dir = start_redis_server()
        server = (proc, data_dir)
    db_url = args.database_url or f"sqlite:///{tmp / 'history.sqlite3'}"
    ns = "soak-" + uuid.uuid4().hex[:8]
    a = Allocator(url, namespace=ns)
    a.redis.xgroup_create(a.keys.events, "soak-audit", id="0", mkstream=True)  # keeps every entry for the audit
    engine = make_engine(db_url)
    upgrade(engine=engine)
    hosts = fleet(args.hosts)
    inv = tmp / "fleet.yaml"
    write_inventory(inv, hosts)
    stop = threading.Event()
    agent = Agent(Allocator(url, namespace=ns), StaticProvider(inv), interval_s=HEARTBEAT_S, orphan_check_s=0)
    agent.run_once()
    threads: list[threading.Thread] = [threading.Thread(target=agent.run, args=(stop,), daemon=True)]
    for _ in range(2):
        threads.append(threading.Thread(target=run_scheduler, args=(Allocator(url, namespace=ns), 0.1, stop),
                                        kwargs={"grace_s": GRACE_S}, daemon=True))
    recorders = [Recorder(Allocator(url, namespace=ns), engine, block_ms=200, estimates_every_s=5) for _ in range(2)]
    rec_threads = [r.start() for r in recorders]
    sim = SimWorkers(url, ns, stop)
    checker = Checker(url, ns, stop)
    chaos = Chaos(inv, hosts, args.chaos, stop) if args.chaos > 0 else None
    threads += [sim, checker] + ([chaos] if chaos else [])
    for t in threads:
        t.start()

    t0 = time.time()
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=client, args=(url, ns, seed, t0 + args.seconds, out)) for seed in range(args.clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    load_s = time.time() - t0

    # Wind down: hosts back, nothing held, the line empty, the recorders caught up.
    if chaos:
        chaos.stop.set()  # (the shared stop also ends the other threads; restart what must go on)
    stop.set()
    for t in threads:
        t.join(10)
    write_inventory(inv, hosts)
    agent.run_once()
    for tid in a.redis.zrange(a.keys.pending, 0, -1):
        a.cancel(tid)
    for aid in a.redis.zrange(a.keys.active, 0, -1):
        a.release(aid)
    final_violations = check(a.snapshot())
    for _, stop_rec in rec_threads:
        stop_rec.set()
    for t, _ in rec_threads:
        t.join(10)
    drain = Recorder(a, engine, block_ms=0, claim_idle_ms=1, estimates_every_s=0)
    drain.drain(timeout_s=600)
    produced = []
    last = "-"
    while True:
        batch = a.redis.xrange(a.keys.events, min=f"({last}" if last != "-" else "-", count=10000)
        if not batch:
            break
        produced += [sid for sid, _ in batch]
        last = batch[-1][0]
    missing, extra = compare_events(engine, a, produced)
    mismatches = compare_allocations(engine, a)
    kinds, reasons, doubles = events_summary(a)

    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        ops.update(r["ops"])
        errors.update(r["errors"])
    figures = {
        "seconds": round(load_s, 1), "hosts": args.hosts, "clients": args.clients,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "redis": "private redis-server" if server else "given URL",
        "history": redacted(db_url).split("://")[0],
        "operations": dict(sorted(ops.items())), "operations_total": sum(ops.values()),
        "operations_per_s": round(sum(ops.values()) / load_s, 1),
        "client_errors": dict(errors), "simulated_workers": dict(sim.counts),
        "hosts_lost_by_chaos": chaos.dropped if chaos else 0,
        "events": dict(sorted(kinds.items())), "releases_by_reason": dict(sorted(reasons.items())),
        "events_total": len(produced),
        "max_active_allocations": checker.max_active, "max_pending_tasks": checker.max_pending,
        "invariant_checks": checker.checks, "invariant_violations": len(checker.violations) + len(final_violations),
        "double_placements": len(doubles), "history_events_missing": len(missing), "history_events_extra": len(extra),
        "history_mismatches": len(mismatches),
        "examples": {"violations": (checker.violations + final_violations)[:10], "doubles": doubles[:10],
                     "missing": missing[:10], "mismatches": mismatches[:10]},
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    a.destroy()
    engine.dispose()
    if server:
        stop_redis_server(*server)
    shutil.rmtree(tmp, ignore_errors=True)
    bad = (figures["invariant_violations"] + figures["double_placements"] + figures["history_events_missing"]
           + figures["history_events_extra"] + figures["history_mismatches"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
