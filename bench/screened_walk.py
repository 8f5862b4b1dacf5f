"""What a request for a GPU model or label that few hosts have costs when the walk meets the rest
of the fleet first.

The walk by free GPU memory (or free CPU) meets GPUs of equal free memory in host-name order, so on
an idle fleet the hosts of a rarer model or label may come after every other host. It passes over
the hosts a request's models or selector rule out without counting them toward the scan cap; after
32 of them it reads the allowed hosts from the label and model host sets and, when at most 64 are
allowed (or 512 and it met none of them yet), goes on from a list of their members in the walk's
order, else passes over at most 2 x the cap of other hosts' members (docs/architecture.md,
"Placement").

On ``--hosts`` hosts of ``--gpus`` GPUs (the ledger benchmark's synthetic fleet, named ``syn-*``),
plus ``--rare-hosts`` hosts of model B100 with label ``zone=rare`` and ``--mid-hosts`` hosts with
``zone=mid`` (both named ``zz-*``: last in name order), this measures the server µs per EVALSHA
(``INFO commandstats``) of:

- the trivial script (the baseline, in the same run);
- ``allocate`` of one shared GPU: without constraints; with ``zone=rare``; with the B100 model;
  with ``zone=mid`` (a list of 400 hosts); with ``cluster=synthetic`` (a label every
  ``syn-*`` host has: nothing to pass over). Each placed allocation is released outside the
  measurement; a refusal is counted;
- ``allocate`` of one GPU with ``zone=rare`` while the host sets are out of step (as after a
  registration by a release without them): no list, the walk passes over at most 2 x the scan cap
  of other hosts' members once it has met 32, and stops (a refusal);
- the refusal of ``zone=rare`` once its hosts are taken, and a release while a task waiting for
  them heads the line.

Each figure is the median of ``--repeat`` measurements, shown with its ratio to the trivial call.

    .venv/bin/python bench/screened_walk.py --redis-url redis://127.0.0.1:6390/4 --json screened.json
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
    from bench import fleets  # python -m bench.screened_walk
    from bench.refusal_cost import server_us
except ImportError:  # python bench/screened_walk.py
    import fleets  # type: ignore[no-redef]
    from refusal_cost import server_us  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)

GPU = {"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 1}
PLACEMENTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no constraint": (GPU, {}),
    "zone=rare": (GPU, {"selector": "zone=rare"}),
    "model B100": (dict(GPU, gpu_model="B100"), {}),
    "zone=mid": (GPU, {"selector": "zone=mid"}),
    "cluster=synthetic": (GPU, {"selector": "cluster=synthetic"}),
}


def placements_us(a: Allocator, resources: dict[str, Any], fields: dict[str, Any], n: int) -> tuple[float, int]:
    """Server µs per ``allocate`` of ``n`` calls, and how many were refused; what they placed is
    released after the measurement."""
    placed: list[str] = []
    refused = 0

    def one() -> None:
        nonlocal refused
        try:
            placed.append(a.allocate(resources, **fields).allocation_id)
        except InsufficientResources:
            refused += 1

    us = server_us(a.redis, one, n)
    for aid in placed:
        a.release(aid)
    return us, refused


def run(args: argparse.Namespace) -> dict[str, Any]:
    a = Allocator(redis_url=args.redis_url, namespace=f"bench-screened-{uuid.uuid4().hex[:8]}")
    r: redis.Redis = a.redis
    try:
        for h in fleets.synthetic_fleet(args.hosts, gpus=args.gpus):
            a.register_host(h)
        for i in range(args.rare_hosts):
            a.register_host(id=f"zz-rare-{i:03d}", labels={"zone": "rare"}, cpu_cores=96, ram_mb="1Ti",
                            gpus=[{"index": g, "model": "B100", "memory_mb": "80Gi"} for g in range(args.gpus)])
        for i in range(args.mid_hosts):
            a.register_host(id=f"zz-mid-{i:04d}", labels={"zone": "mid"}, cpu_cores=96, ram_mb="1Ti",
                            gpus=[{"index": g, "model": "H100", "memory_mb": "80Gi"} for g in range(args.gpus)])
        rows: dict[str, list[float]] = {}
        refused: dict[str, int] = {}

        def measure(name: str, f: Callable[[], float]) -> None:
            rows.setdefault(name, []).append(f())

        for _ in range(args.repeat):
            measure("trivial", lambda: server_us(r, lambda: a._call("noop"), args.rounds))
            for name, (res, fields) in PLACEMENTS.items():
                us, n = placements_us(a, res, fields, args.rounds)
                rows.setdefault(f"place: {name}", []).append(us)
                refused[f"place: {name}"] = refused.get(f"place: {name}", 0) + n
        stamp = r.hget(a.keys.names, "stamp")
        r.hset(a.keys.names, "stamp", "out of step")
        for _ in range(args.repeat):
            us, n = placements_us(a, GPU, {"selector": "zone=rare"}, args.rounds)
            rows.setdefault("place: zone=rare, host sets out of step", []).append(us)
            refused["place: zone=rare, host sets out of step"] = refused.get("place: zone=rare, host sets out of step", 0) + n
        r.hset(a.keys.names, "stamp", stamp or "0")
        taken = []
        for _ in range(args.rare_hosts):
            try:
                taken.append(a.allocate({"gpus": args.gpus, "cpu_cores": 1}, selector="zone=rare").allocation_id)
            except InsufficientResources:
                break  # (a version whose walk cannot reach them: the last two rows are not measured)
        lease = {"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 1}

        def refuse() -> None:
            try:
                a.allocate(GPU, selector="zone=rare")
            except InsufficientResources:
                return
            raise SystemExit("expected zone=rare to be refused once its hosts are taken")

        def releases() -> float:
            held = [a.allocate(lease).allocation_id for _ in range(args.rounds)]
            it = iter(held)
            return server_us(r, lambda: a.release(next(it)), args.rounds)

        if len(taken) == args.rare_hosts:
            for _ in range(args.repeat):
                measure("refusal: zone=rare, its hosts taken", lambda: server_us(r, refuse, args.rounds))
            waiting = a.allocate(GPU, selector="zone=rare", on_busy="queue")
            for _ in range(args.repeat):
                measure("release, a task for zone=rare heads the line", releases)
            a.release(waiting.allocation_id)
        for aid in taken:
            a.release(aid)
        base = statistics.median(rows["trivial"])
        results = [{"what": k, "server_us": statistics.median(v), "runs_us": v, "vs_trivial": statistics.median(v) / base,
                    "refused": refused.get(k, 0)} for k, v in rows.items()]
        return {"hosts": args.hosts, "gpus": args.gpus, "rare_hosts": args.rare_hosts, "mid_hosts": args.mid_hosts,
                "rounds": args.rounds, "repeat": args.repeat, "redis_version": r.info("server")["redis_version"],
                "results": results}
    finally:
        a.destroy()


def show(doc: dict[str, Any]) -> None:
    t = Table(title=f"{doc['hosts']:,} hosts x {doc['gpus']} GPUs, then {doc['rare_hosts']} of zone=rare (B100) and "
                    f"{doc['mid_hosts']} of zone=mid; server µs per call, median of {doc['repeat']}")
    for col in ("call", "server µs", "÷ trivial", "refused"):
        t.add_column(col)
    for row in doc["results"]:
        t.add_row(row["what"], f"{row['server_us']:,.1f}", f"{row['vs_trivial']:,.1f}", str(row["refused"]))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rare-hosts", type=int, default=10, help="hosts of model B100 with zone=rare")
    ap.add_argument("--mid-hosts", type=int, default=400, help="hosts with zone=mid")
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
