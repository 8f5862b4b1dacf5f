"""Cost of the ETA engine (allocator/eta.py) at scale: the 1,213 OpenB hosts filled with running
allocations, then N pending tasks (default 10,000), all from the OpenB request mix.

Measures ``Allocator.refresh_estimated_start_times()`` (every pending task: what the scheduler
tick does) cold (first read: every payload and allocation record fetched) and warm (the engine's
per-id caches hold them, as on every later tick), and ``Allocator.estimated_start_time`` on
demand for the task at the head, the middle and the end of the line.

  .venv/bin/python bench/eta_cost.py [--pending 10000] [--redis-url ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator import Allocator  # noqa: E402
from allocator.errors import InsufficientResources  # noqa: E402
from bench.fleets import openb_fleet  # noqa: E402
from bench.replay import load_trace  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.s = 1_800_000_000.0

    def __call__(self) -> float:
        return self.s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--pending", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="cProfile one warm tick (top 30 by own time)")
    args = ap.parse_args(argv)

    clock = Clock()
    ns = f"bench-eta-{uuid.uuid4().hex[:8]}"
    filler = Allocator(args.redis_url, namespace=ns, clock=clock, pass_depth=1)
    a = Allocator(args.redis_url, namespace=ns, clock=clock)  # default pass depth (100)
    out: dict = {}
    try:
        hosts = openb_fleet()
        for h in hosts:
            filler.register_host(h)
        tasks = load_trace()
        # Duration estimates per task type, as the history would have them.
        by_type: dict[str, list[int]] = {}
        for t in tasks:
            by_type.setdefault(t.task_type, []).append(t.duration_ms)
        est = {}
        for tt, v in by_type.items():
            v.sort()
            est[tt] = json.dumps({"p50_ms": v[len(v) // 2], "p80_ms": v[(len(v) * 4) // 5],
                                  "mean_ms": sum(v) // len(v), "n": len(v)})
        a.redis.hset(a.keys.durations, mapping=est)
        t0 = time.perf_counter()
        running = refused = 0
        i = 0
        while refused < 200:  # fill the fleet: direct allocations until the mix stops fitting
            t = tasks[i % len(tasks)]
            i += 1
            clock.s += 0.001
            try:
                filler.allocate(t.resources, task_type=t.task_type, priority=t.priority, ttl_seconds=None)
                running += 1
                refused = 0
            except InsufficientResources:
                refused += 1
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = []
        for j in range(args.pending):
            t = tasks[(i + j) % len(tasks)]
            clock.s += 0.001
            x = filler.allocate(t.resources, on_busy="queue", task_type=t.task_type, priority=t.priority,
                                ttl_seconds=None)
            ids.append(x.allocation_id)
        submit_s = time.perf_counter() - t0
        pending = a.redis.zcard(a.keys.pending)
        cap = a.capacity()
        print(f"{len(hosts)} hosts, {cap.gpu_count} GPUs; {running} running allocations "
              f"({100 * cap.gpu_memory_mb.utilization_pct / 100:.0f}% GPU memory allocated, {cap.gpus_idle} idle GPUs); "
              f"{pending} pending (fill {fill_s:.0f} s, submit {submit_s:.0f} s)", flush=True)
        out = {"hosts": len(hosts), "gpus": cap.gpu_count, "running": running, "pending": pending, "runs": []}
        for r in range(args.repeat):
            t0 = time.perf_counter()
            info = a.refresh_estimated_start_times()
            wall = (time.perf_counter() - t0) * 1000
            n_est = sum(1 for k, v in a.redis.hgetall(a.keys.eta).items() if not k.startswith("_") and v)
            row = {"kind": "all (tick)", "cold": r == 0, "wall_ms": round(wall), **info, "with_estimate": n_est}
            out["runs"].append(row)
            print(row, flush=True)
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(a.refresh_estimated_start_times)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        a.redis.delete(a.keys.eta)  # on-demand path
        ranks = a.redis.zrange(a.keys.pending, 0, -1)
        for label, tid in (("head", ranks[0]), ("middle", ranks[len(ranks) // 2]), ("end", ranks[-1])):
            t0 = time.perf_counter()
            v = a.estimated_start_time(tid)
            wall = (time.perf_counter() - t0) * 1000
            row = {"kind": f"one task ({label} of the line)", "wall_ms": round(wall), "has_estimate": v is not None}
            out["runs"].append(row)
            print(row, flush=True)
    finally:
        a.destroy()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
