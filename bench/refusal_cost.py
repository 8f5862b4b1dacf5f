"""What a refusal costs Redis, and what a task in line that cannot start costs every release.

A request that cannot be placed is refused either before the placement walk (a quick refusal:
more CPU or RAM than any host has free, a GPU model or label no host has, a model whose few hosts
cannot take it now) or by the walk, which reads candidates up to the scan cap (2,048) first. A
refusal of the walk holds Redis for tens of milliseconds on a large fleet, and a task in line that
the walk refuses is tried again by the scheduling pass of every release.

On ``--hosts`` hosts of ``--gpus`` GPUs (the ledger benchmark's synthetic fleet) plus
``--model-hosts`` hosts of a rarer model (B100) whose GPUs are all taken, this measures the server
µs per EVALSHA (``INFO commandstats``) of:

- the trivial script (the baseline, in the same run);
- refusals, ``--rounds`` each, of: a GPU of the taken model; a GPU of a model no host has; more
  RAM than any host has free;
- releases of a one-GPU lease with nothing in line, and the same releases while a task waiting
  for the taken model heads the line.

Each figure is the median of ``--repeat`` measurements, shown with its ratio to the trivial call.

    .venv/bin/python bench/refusal_cost.py --redis-url redis://127.0.0.1:6390/4 --json refusal.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from allocator.client import Allocator  # noqa: E402
from allocator.errors import InsufficientResources  # noqa: E402

try:
    from bench import fleets  # python -m bench.refusal_cost
except ImportError:  # python bench/refusal_cost.py
    import fleets  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)

RARE = "B100"
REFUSALS = {
    "taken model": {"gpus": 1, "gpu_model": RARE, "cpu_cores": 1},
    "absent model": {"gpus": 1, "gpu_model": "A10O", "cpu_cores": 1},
    "RAM no host has free": {"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 1, "ram_mb": "100Ti"},
}
LEASE = {"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 1}


def _evalsha(r: redis.Redis) -> tuple[int, int]:
    stats = r.info("commandstats").get("cmdstat_evalsha") or {}
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def server_us(r: redis.Redis, call: Callable[[], Any], n: int) -> float:
    """Server µs per EVALSHA over ``n`` calls of ``call``, from the counters' change (a shared
    server's other clients count too: use a server of its own for figures)."""
    calls0, usec0 = _evalsha(r)
    for _ in range(n):
        call()
    calls1, usec1 = _evalsha(r)
    return (usec1 - usec0) / max(1, calls1 - calls0)


def refuse(a: Allocator, resources: dict[str, Any]) -> None:
    try:
        a.allocate(resources)
    except InsufficientResources:
        return
    raise SystemExit(f"expected a refusal of {resources}: the fleet no longer has the shape this benchmark needs")


def releases_us(a: Allocator, n: int) -> float:
    """Server µs per release of ``n`` one-GPU leases allocated beforehand."""
    held = [a.allocate(LEASE).allocation_id for _ in range(n)]
    it = iter(held)
    return server_us(a.redis, lambda: a.release(next(it)), n)


def run(args: argparse.Namespace) -> dict[str, Any]:
    a = Allocator(redis_url=args.redis_url, namespace=f"bench-refusal-{uuid.uuid4().hex[:8]}")
    r: redis.Redis = a.redis
    try:
        for h in fleets.synthetic_fleet(args.hosts, gpus=args.gpus):
            a.register_host(h)
        for i in range(args.model_hosts):
            a.register_host(id=f"rare{i:03d}", cpu_cores=96, ram_mb="1Ti",
                            gpus=[{"index": g, "model": RARE, "memory_mb": "80Gi"} for g in range(args.gpus)])
            a.allocate({"gpus": args.gpus, "gpu_model": RARE, "cpu_cores": 1})  # every GPU of the model taken
        rows: dict[str, list[float]] = {}

        def measure(name: str, f: Callable[[], float]) -> None:
            rows.setdefault(name, []).append(f())

        for _ in range(args.repeat):
            measure("trivial", lambda: server_us(r, lambda: a._call("noop"), args.rounds))
            for name, res in REFUSALS.items():
                measure(f"refusal: {name}", lambda res=res: server_us(r, lambda: refuse(a, res), args.rounds))
            measure("release, nothing in line", lambda: releases_us(a, args.rounds))
        waiting = a.allocate(REFUSALS["taken model"], on_busy="queue")
        for _ in range(args.repeat):
            measure("release, a task for the taken model heads the line", lambda: releases_us(a, args.rounds))
        a.release(waiting.allocation_id)
        base = statistics.median(rows["trivial"])
        results = [{"what": k, "server_us": statistics.median(v), "runs_us": v,
                    "vs_trivial": statistics.median(v) / base} for k, v in rows.items()]
        return {"hosts": args.hosts, "gpus": args.gpus, "model_hosts": args.model_hosts, "rounds": args.rounds,
                "repeat": args.repeat, "redis_version": r.info("server")["redis_version"], "results": results}
    finally:
        a.destroy()


def show(doc: dict[str, Any]) -> None:
    t = Table(title=f"{doc['hosts']:,} hosts x {doc['gpus']} GPUs, {doc['model_hosts']} hosts of {RARE} (all taken); "
                    f"server µs per call, median of {doc['repeat']}")
    for col in ("call", "server µs", "÷ trivial"):
        t.add_column(col)
    for row in doc["results"]:
        t.add_row(row["what"], f"{row['server_us']:,.1f}", f"{row['vs_trivial']:,.1f}")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--model-hosts", type=int, default=10, help=f"hosts of {RARE}, every GPU of which is taken")
    ap.add_argument("--rounds", type=int, default=20, help="calls per measurement")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per figure (the median is shown)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    doc = run(args)
    show(doc)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(doc, indent=2))
        console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
