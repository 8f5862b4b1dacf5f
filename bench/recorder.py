"""Recorder benchmark: outbox events written to the history database per second, by batch size.

A workload of allocate/release pairs on a small fleet fills the outbox of a fresh namespace (the
stream is kept: the recorder runs with trimming off). Then, for each batch size and each database,
the tables are emptied, the consumer group is rewound to the start, and ``Recorder.drain`` writes
the whole stream; events/s = events / wall time (Redis reads, the transaction with the upserts,
XACK, all included).

    .venv/bin/python bench/recorder.py --events 20000 \
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test --json bench-recorder.json

Without --database-url only SQLite (a temporary file) is measured. The database is migrated to
head first; the benchmark deletes its own namespace's rows afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid

from sqlalchemy import delete

from allocator import Allocator
from allocator.history import migrate
from allocator.history.db import make_engine, redacted
from allocator.history.models import allocations, events, hosts, placements
from allocator.history.recorder import Recorder


def fill(a: Allocator, n_events: int) -> int:
    for i in range(8):
        a.register_host(id=f"h{i}", cpu_cores=64, ram_mb="512Gi",
                        gpus=[{"index": g, "model": "A100", "memory_mb": "80Gi"} for g in range(8)])
    while a.redis.xlen(a.keys.events) < n_events:
        x = a.allocate({"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 2, "ram_mb": "8Gi"},
                       task_type=f"t{int(time.time() * 1000) % 7}", owner=f"user{os.getpid() % 5}")
        a.release(x.allocation_id)
    return int(a.redis.xlen(a.keys.events))


def run_one(a: Allocator, url: str | None, batch: int) -> dict[str, float]:
    engine = make_engine(url)
    migrate.upgrade(engine=engine)
    with engine.begin() as conn:
        for t in (events, allocations, placements, hosts):
            conn.execute(delete(t).where(t.c.namespace == a.keys.namespace))
    try:
        a.redis.xgroup_setid(a.keys.events, a.keys.recorder_group, "0")
    except Exception:  # noqa: BLE001 - first run: no group yet
        pass
    rec = Recorder(a, engine, batch_size=batch, block_ms=0, trim=False, estimates_every_s=0)
    t0 = time.perf_counter()
    total = rec.drain(timeout_s=3600)
    dt = time.perf_counter() - t0
    with engine.begin() as conn:
        for t in (events, allocations, placements, hosts):
            conn.execute(delete(t).where(t.c.namespace == a.keys.namespace))
    engine.dispose()
    return {"batch": batch, "events": total.written, "seconds": round(dt, 3), "events_per_s": round(total.written / dt)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--database-url", default=os.environ.get("ALLOCATOR_DATABASE_URL"))
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--batches", default="50,200,500,1000")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    a = Allocator(args.redis_url, namespace="bench-rec-" + uuid.uuid4().hex[:8])
    tmp = tempfile.mkdtemp(prefix="bench-recorder-")
    targets = [("sqlite", f"sqlite:///{tmp}/history.sqlite3")]
    if args.database_url:
        targets.insert(0, ("postgres", args.database_url))
    out: dict[str, object] = {"machine": platform.platform(), "cpus": os.cpu_count(), "results": []}
    try:
        n = fill(a, args.events)
        out["stream_events"] = n
        for name, url in targets:
            for b in (int(x) for x in args.batches.split(",")):
                r = {"database": name, "url": redacted(url), **run_one(a, url, b)}
                out["results"].append(r)  # type: ignore[union-attr]
                print(f"{name:9} batch {b:5}: {r['events']} events in {r['seconds']:.2f}s = {r['events_per_s']:,} events/s")
    finally:
        a.destroy()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
