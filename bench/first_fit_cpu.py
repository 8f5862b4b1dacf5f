"""First fit for CPU-only requests while the hosts at the front of the registration order fill up.

First fit takes the first host in registration order that fits. For CPU-only requests the walk
goes over the schedulable hosts in that order (the ``cpu_ord`` index), so hosts whose CPU or RAM
is exhausted are not walked at all, and a placement costs the same with 0 or 2,000 full hosts in
front. This benchmark registers ``--hosts`` hosts of 8 cores, then places whole-host CPU-only
requests with first fit in steps of ``--step``; each one exhausts the first host that still has
cores. It reports the server µs per ``place`` (``INFO commandstats``) of each step, against the
trivial script (``noop.lua``) measured in the same run, and against the first step.

    .venv/bin/python bench/first_fit_cpu.py --redis-url redis://127.0.0.1:6390/4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from allocator.client import Allocator  # noqa: E402

try:
    from bench.ledger import evalsha_us  # python -m bench.first_fit_cpu
except ImportError:  # python bench/first_fit_cpu.py
    from ledger import evalsha_us  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)


def run(args: argparse.Namespace) -> dict[str, Any]:
    alloc = Allocator(redis_url=args.redis_url, namespace=f"bench-ffcpu-{uuid.uuid4().hex[:8]}")
    r = alloc.redis
    try:
        for i in range(args.hosts):
            alloc.register_host(id=f"h{i:05d}", cpu_cores=8, ram_mb="64Gi")
        noop = alloc.scripts["noop"]
        keys, prefix = alloc._ledger_keys, alloc._prefix_arg
        trivial = evalsha_us(r, 2000, lambda: noop(keys=keys, args=[prefix, ""]))[0]

        def place() -> None:
            alloc.allocate({"cpu_cores": 8, "ram_mb": 1024}, strategy="first_fit")

        rows, full = [], 0
        while full + args.step <= args.hosts - args.step:
            us = evalsha_us(r, args.step, place)[0]
            rows.append({"full_hosts_before": full, "place_us": us})
            full += args.step
        base = rows[0]["place_us"]
        for row in rows:
            row["vs_trivial"] = row["place_us"] / trivial
            row["vs_first_step"] = row["place_us"] / base
        return {"hosts": args.hosts, "step": args.step, "trivial_us": trivial, "results": rows}
    finally:
        alloc.destroy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3000)
    ap.add_argument("--step", type=int, default=500, help="placements per step (each exhausts one host)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.step < 1 or args.hosts < 2 * args.step:
        raise SystemExit("need --step >= 1 and --hosts >= 2 x --step")
    doc = run(args)
    t = Table(title=f"First fit, CPU-only, {doc['hosts']:,} hosts of 8 cores (trivial script: {doc['trivial_us']:.1f} µs)")
    for col in ("full hosts in front", "server µs per place", "÷ trivial", "÷ first step"):
        t.add_column(col, justify="right")
    for row in doc["results"]:
        t.add_row(f"{row['full_hosts_before']:,}", f"{row['place_us']:.0f}", f"{row['vs_trivial']:.1f}x",
                  f"{row['vs_first_step']:.2f}x")
    console.print(t)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(doc, indent=2))
        console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
