"""Cost of the ETA engine (allocator/eta/) at scale: the 1,213 OpenB hosts filled with running
allocations, then N pending tasks (default 10,000), all from the OpenB request mix.

Measures ``Allocator.refresh_estimated_start_times()`` (every pending task: what the scheduler
tick does) cold (first read: every payload and allocation record fetched) and warm (the engine's
per-id caches hold them, as on every later tick), and ``Allocator.estimated_start_time`` on
demand for the task at the head, the middle and the end of the line.

  .venv/bin/python bench/eta_cost.py [--pending 10000] [--redis-url ...]

``--compare OTHER_ETA`` then measures another version of the package ``allocator/eta/`` (a copy of
the directory, or of the single module ``allocator/eta.py`` it was before) on the same state and
checks that every estimate (tick and on demand) is the same.
``--estimates FILE`` writes every estimate (JSON, in line order: the state is deterministic, fixed
clock and trace order, the ids are not). ``--snapshot FILE`` pickles a tick's ledger snapshot for
offline runs of the simulation alone (``bench/eta_replay.py``). ``--profile`` profiles one warm
tick.
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


def measure(a: Allocator, repeat: int) -> tuple[list[dict], dict]:
    """The figures (ticks: the first cold, from a new engine; then one task on demand at the
    head, middle and end of the line) and the estimates, in line order (ids are random, the
    line and its estimates are not)."""
    from allocator.eta import engine_for

    a.__dict__.pop("_eta_engine", None)  # a new engine: empty per-id caches
    rows: list[dict] = []
    for r in range(repeat):
        t0 = time.perf_counter()
        info = a.refresh_estimated_start_times()
        wall = (time.perf_counter() - t0) * 1000
        n_est = sum(1 for k, v in a.redis.hgetall(a.keys.eta).items() if not k.startswith("_") and v)
        row = {"kind": "all (tick)", "cold": r == 0, "wall_ms": round(wall), **info, "with_estimate": n_est}
        rows.append(row)
        print(row, flush=True)
    cached = a.redis.hgetall(a.keys.eta)
    ranks = a.redis.zrange(a.keys.pending, 0, -1)
    estimates: dict = {"tick": [cached.get(tid) for tid in ranks], "one": {}}
    a.redis.delete(a.keys.eta)  # on-demand path
    for label, tid in (("head", ranks[0]), ("middle", ranks[len(ranks) // 2]), ("end", ranks[-1])):
        t0 = time.perf_counter()
        v = engine_for(a).estimate_ms(tid)
        wall = (time.perf_counter() - t0) * 1000
        row = {"kind": f"one task ({label} of the line)", "wall_ms": round(wall), "has_estimate": v is not None}
        estimates["one"][label] = v
        rows.append(row)
        print(row, flush=True)
    return rows, estimates


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--pending", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="cProfile one warm tick (top 30 by own time)")
    ap.add_argument("--estimates", default=None, help="write every estimate (tick and on demand) to this JSON file")
    ap.add_argument("--snapshot", default=None, help="pickle the ledger snapshot of a tick to this file")
    ap.add_argument("--compare", default=None,
                    help="another version of allocator/eta/ (a directory) or of the former allocator/eta.py: "
                         "measure it on the same state, check the estimates")
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
        if args.snapshot:
            import pickle

            from allocator.eta import engine_for, read_snapshot
            Path(args.snapshot).write_bytes(pickle.dumps(read_snapshot(a, cache=engine_for(a)._cache)))
        if args.profile:
            import cProfile
            import pstats
            a.refresh_estimated_start_times()
            prof = cProfile.Profile()
            prof.runcall(a.refresh_estimated_start_times)
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        rows, estimates = measure(a, args.repeat)
        out["runs"] = rows
        if args.compare:
            # The same state through another version of the estimates: its figures, and
            # whether every estimate is the same.
            from allocator.eta import engine
            from bench.eta_replay import load_module
            mine = engine.Simulation
            engine.Simulation = load_module(args.compare).Simulation  # what EtaEngine.simulate builds
            try:
                print(f"-- {args.compare}", flush=True)
                other_rows, other_est = measure(a, args.repeat)
            finally:
                engine.Simulation = mine
            same_tick = sum(1 for x, y in zip(estimates["tick"], other_est["tick"]) if x == y)
            same = estimates == other_est
            print(f"-- estimates of the tick: {same_tick} of {len(estimates['tick'])} the same; "
                  f"on demand: {estimates['one'] == other_est['one']}; all identical: {same}", flush=True)
            out["compare"] = {"module": args.compare, "runs": other_rows, "identical": same}
    finally:
        a.destroy()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.estimates:
        Path(args.estimates).write_text(json.dumps(estimates, sort_keys=True))  # type: ignore[possibly-undefined]
    return out


if __name__ == "__main__":
    main()
