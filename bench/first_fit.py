"""First fit while the hosts at the front of the registration order fill up.

First fit takes the first host (for GPU requests: the first GPU) in registration order that fits.
Its walk must not pass every host or GPU that can no longer take the request one by one, or a
placement costs more the fuller the front of the fleet gets. Two shapes, each on a fleet of
``--hosts`` hosts, measured in steps of ``--step`` filled hosts:

- ``cpu``: hosts of 8 cores; whole-host CPU-only requests, each of which exhausts the first host
  that still has cores. First fit walks the schedulable hosts in order (``cpu_ord``), so full
  hosts are not walked at all.
- ``gpu``: hosts of 8 GPUs of 80 GiB; each step leaves the next hosts' GPUs with 30 GiB free
  (eight 50 GiB requests per host) and measures ``--probes`` requests for 40 GiB, which fit only
  behind them. Past ``gpu_ord``'s first page, first fit walks ``gpu_ffc`` from the request's
  free-memory class up, so GPUs with less than half the request free are not walked.
- ``whole``: the same fleet and steps, measuring requests for one whole GPU, which the GPUs that
  hold a share cannot take. First fit walks ``gpu_idle_ord``, the GPUs with no holder, so those
  are not walked.

Each step reports the server µs per measured ``place`` (``INFO commandstats``) against the trivial
script (``noop.lua``) measured in the same run, and against the first step.

    .venv/bin/python bench/first_fit.py --redis-url redis://127.0.0.1:6390/4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from allocator.client import Allocator  # noqa: E402

try:
    from bench.ledger import evalsha_us  # python -m bench.first_fit
except ImportError:  # python bench/first_fit.py
    from ledger import evalsha_us  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)
SHAPES = ("cpu", "gpu", "whole")
GPU = {"gpus": 1, "cpu_cores": 1, "ram_mb": 1024}


def _register(alloc: Allocator, shape: str, hosts: int) -> None:
    for i in range(hosts):
        if shape == "cpu":
            alloc.register_host(id=f"h{i:05d}", cpu_cores=8, ram_mb="64Gi")
        else:
            alloc.register_host(id=f"h{i:05d}", cpu_cores=96, ram_mb="1024Gi",
                                gpus=[{"index": g, "uuid": f"GPU-{i}-{g}", "model": "A100", "memory_mb": "80Gi"}
                                      for g in range(8)])


def _step(alloc: Allocator, shape: str, step: int, probes: int) -> Callable[[], float]:
    """What one step measures: server µs per measured placement. It then fills ``step`` more
    hosts (CPU: the measured placements themselves do)."""
    r = alloc.redis

    def cpu() -> float:
        return evalsha_us(r, step, lambda: alloc.allocate({"cpu_cores": 8, "ram_mb": 1024}, strategy="first_fit"))[0]

    probe = {**GPU, "gpu_memory_mb": "40Gi"} if shape == "gpu" else GPU

    def gpu() -> float:
        held: list[str] = []
        us = evalsha_us(r, probes, lambda: held.append(alloc.allocate(probe, strategy="first_fit").allocation_id))[0]
        for aid in held:
            alloc.release(aid)
        for _ in range(step * 8):  # the next hosts' GPUs down to 30 GiB free
            alloc.allocate({**GPU, "gpu_memory_mb": "50Gi"}, strategy="first_fit")
        return us

    return cpu if shape == "cpu" else gpu


def run(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    alloc = Allocator(redis_url=args.redis_url, namespace=f"bench-ff{shape}-{uuid.uuid4().hex[:8]}")
    try:
        _register(alloc, shape, args.hosts)
        noop = alloc.scripts["noop"]
        keys, prefix = alloc._ledger_keys, alloc._prefix_arg
        trivial = evalsha_us(alloc.redis, 2000, lambda: noop(keys=keys, args=[prefix, ""]))[0]
        measure = _step(alloc, shape, args.step, args.probes)
        rows, full = [], 0
        while full + args.step <= args.hosts - args.step:
            rows.append({"full_hosts_before": full, "place_us": measure()})
            full += args.step
        base = rows[0]["place_us"]
        for row in rows:
            row["vs_trivial"] = row["place_us"] / trivial
            row["vs_first_step"] = row["place_us"] / base
        return {"shape": shape, "hosts": args.hosts, "step": args.step, "trivial_us": trivial, "results": rows}
    finally:
        alloc.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of cpu, gpu, whole (default all)")
    ap.add_argument("--hosts", type=int, default=3000, help="hosts per fleet (default 3000)")
    ap.add_argument("--step", type=int, default=500, help="hosts filled per step (default 500)")
    ap.add_argument("--probes", type=int, default=50, help="measured GPU placements per step (default 50)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(s not in SHAPES for s in shapes):
        raise SystemExit(f"--shapes: expected a comma list of {', '.join(SHAPES)}, got {args.shapes!r}")
    if args.step < 1 or args.probes < 1 or args.hosts < 2 * args.step:
        raise SystemExit("need --step >= 1, --probes >= 1 and --hosts >= 2 x --step")
    docs = []
    for shape in shapes:
        doc = run(args, shape)
        docs.append(doc)
        what = {"cpu": "CPU-only, hosts of 8 cores",
                "gpu": "40 GiB of one GPU, hosts of 8 GPUs with 30 GiB free on every GPU in front",
                "whole": "one whole GPU, hosts of 8 GPUs with a share held on every GPU in front"}[shape]
        t = Table(title=f"First fit, {what}, {doc['hosts']:,} hosts (trivial script: {doc['trivial_us']:.1f} µs)")
        for col in ("full hosts in front", "server µs per place", "÷ trivial", "÷ first step"):
            t.add_column(col, justify="right")
        for row in doc["results"]:
            t.add_row(f"{row['full_hosts_before']:,}", f"{row['place_us']:.0f}", f"{row['vs_trivial']:.1f}x",
                      f"{row['vs_first_step']:.2f}x")
        console.print(t)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"runs": docs}, indent=2))
        console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
