"""What the placement scan costs inside Redis, per request shape and per candidate host compared.

``place`` spends most of its server time choosing a host: best fit walks an index and compares
up to ``BEST_WINDOW`` (8) hosts that fit before it chooses. This benchmark registers a fleet
(5,000 hosts x 8 GPUs by default), holds ``--held`` allocations of the ledger benchmark's request
mix, and then runs the scan of ``place``'s own library (``allocator/lua/includes/placement.lua``,
nothing is written) in a loop inside one EVALSHA, so neither the network nor the script's entry
is in the figure. It does so for four request shapes (1 GPU with 2-32 GiB, 2 GPUs with 2-16 GiB
each, 1 whole GPU, CPU only; cores and RAM from the ledger benchmark's mix), with first fit,
worst fit, and best fit comparing 1, 2, 4 and 8 hosts (the same library text with the constant
changed; 8 is what ships).

Baseline, measured in the same script and loop: what a scan cannot avoid for one candidate, one
GET of a host's scan summary. A scan's iteration first copies its request (a scan may mark it);
the copy is measured alone too and taken off every scan figure. Figures are server µs per scan (the median
of ``--repeat`` rounds), that per GET, and, for best fit, µs per extra host compared
((window 8 - window 1) / 7).

    .venv/bin/python bench/scan_cost.py --redis-url redis://127.0.0.1:6390/4 --json scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
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
from allocator.scripts import source  # noqa: E402

try:
    from bench import fleets  # python -m bench.scan_cost
    from bench.ledger import make_requests
except ImportError:  # python bench/scan_cost.py
    import fleets  # type: ignore[no-redef]
    from ledger import make_requests  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)

WINDOW_LINE = "local BEST_WINDOW = 8"
BODY_MARK = "return cjson.encode(place_request("  # place.lua's first statement after the includes
SHAPES = ("1 GPU shared", "2 GPUs shared", "1 whole GPU", "CPU only")
CASES = (("first", 1), ("worst", 1), ("best", 1), ("best", 2), ("best", 4), ("best", 8))

# Runs after place's library: ARGV[3] = the payloads (JSON list), ARGV[4] = rounds, ARGV[5] = mode
# ("get" = the baseline's GET alone, "copy" = the copy alone, else a scan mode). A scan's payload
# is copied first, since a scan may mark its request (req.short, req.gone). Returns the summed server µs of the loop
# (TIME before and after) and the number of scans.
LOOP = """
local reqs, rounds, mode = cjson.decode(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local keys = {}
for i, q in ipairs(reqs) do keys[i] = host_sum_key(q.probe_host) end
local t0 = rcall('TIME')
local n = 0
for _ = 1, rounds do
  for i, q in ipairs(reqs) do
    if mode == 'get' then rcall('GET', keys[i]) else
      local c = {}
      for k, v in pairs(q) do c[k] = v end
      if mode ~= 'copy' then scan(c, mode) end
    end
    n = n + 1
  end
end
local t1 = rcall('TIME')
return {(tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2]), n}
"""


def shape_requests(rng: random.Random, n: int) -> dict[str, list[dict[str, Any]]]:
    """``n`` requests of each shape, cores and RAM drawn as in the ledger benchmark's mix."""
    mix = make_requests(rng, 8 * n)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SHAPES}
    for r in mix:
        if "gpus" not in r:
            out["CPU only"].append(r)
        elif r["gpus"] == 2:
            out["2 GPUs shared"].append(r)
        else:
            out["1 GPU shared"].append(r)
            out["1 whole GPU"].append({"gpus": 1, "cpu_cores": r["cpu_cores"], "ram_mb": r["ram_mb"]})
    return {s: v[:n] for s, v in out.items()}


def scan_script(window: int) -> str:
    """place's library with best fit comparing ``window`` hosts, and the measuring loop."""
    text = source("place", wrap=False)  # the library at the top level, so that the loop can follow it
    if WINDOW_LINE not in text or BODY_MARK not in text:
        raise SystemExit("place.lua no longer has the shape this benchmark expects "
                         f"({WINDOW_LINE!r}, {BODY_MARK!r}): update bench/scan_cost.py")
    lib = text[: text.index(BODY_MARK)].replace(WINDOW_LINE, f"local BEST_WINDOW = {window}")
    return lib + LOOP


def fill(alloc: Allocator, held: int, seed: int) -> int:
    """Holds up to ``held`` allocations of the ledger benchmark's mix (best fit); returns how many."""
    n = 0
    for r in make_requests(random.Random(seed), held * 2):
        if n >= held:
            break
        try:
            alloc.allocate(r, strategy="best_fit")
            n += 1
        except InsufficientResources:
            pass
    return n


def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = f"bench-scan-{uuid.uuid4().hex[:8]}"
    alloc = Allocator(redis_url=args.redis_url, namespace=ns)
    r: redis.Redis = alloc.redis
    try:
        t0 = time.perf_counter()
        hosts = fleets.synthetic_fleet(args.hosts, gpus=args.gpus)
        for h in hosts:
            alloc.register_host(h)
        held = fill(alloc, args.held, args.seed)
        console.print(f"{args.hosts:,} hosts x {args.gpus} GPUs, {held:,} allocations held "
                      f"({time.perf_counter() - t0:.1f} s to build)")
        rng = random.Random(args.seed + 1)
        payloads: dict[str, str] = {}
        for shape, reqs in shape_requests(rng, args.requests).items():
            built = []
            for q in reqs:
                p = json.loads(alloc._place_payload(alloc.build_request(q, strategy="best_fit"), "probe", True))
                p["probe_host"] = rng.choice(hosts)["id"]  # the baseline's GET reads a random host
                built.append(p)
            payloads[shape] = json.dumps(built)
        shas = {w: r.script_load(scan_script(w)) for w in sorted({w for _, w in CASES})}
        keys, prefix = alloc._ledger_keys, alloc._prefix_arg

        def per_call(shape: str, mode: str, window: int) -> float:
            out = []
            for _ in range(args.repeat):
                us, n = r.evalsha(shas[window], len(keys), *keys, prefix, "", payloads[shape], args.rounds, mode)
                out.append(us / n)
            return statistics.median(out)

        rows = []
        for shape in SHAPES:
            copy = per_call(shape, "copy", 8)
            row: dict[str, Any] = {"shape": shape, "copy_us": copy, "get_us": per_call(shape, "get", 8)}
            for mode, window in CASES:
                row[f"{mode}{window}_us"] = per_call(shape, mode, window) - copy
            row["per_host_us"] = (row["best8_us"] - row["best1_us"]) / 7
            rows.append(row)
        return {"hosts": args.hosts, "gpus": args.gpus, "held": held, "requests_per_shape": args.requests,
                "rounds": args.rounds, "repeat": args.repeat, "redis_version": r.info("server")["redis_version"],
                "results": rows}
    finally:
        alloc.destroy()


def show(doc: dict[str, Any]) -> None:
    t = Table(title="Scan cost inside Redis, µs per scan (÷ one summary GET)")
    for col in ("request", "GET", "first fit", "worst fit", "best, 1 host", "best, 2", "best, 4",
                "best, 8 (shipped)", "µs per extra host"):
        t.add_column(col, justify="left" if col == "request" else "right")
    for row in doc["results"]:
        g = row["get_us"]

        def cell(key: str) -> str:
            return f"{row[key]:.1f} ({row[key] / g:.0f}x)"

        t.add_row(row["shape"], f"{g:.2f}", *(cell(f"{m}{w}_us") for m, w in CASES), f"{row['per_host_us']:.1f}")
    console.print(t)


def fleet_arguments(description: str, *, rounds: int, requests_help: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that measure server time on a held fleet (this one and
    bench/place_floor.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--held", type=int, default=1500, help="allocations held while measuring")
    ap.add_argument("--requests", type=int, default=64, help=requests_help)
    ap.add_argument("--rounds", type=int, default=rounds, help="passes over the requests per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per figure (the median is shown)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    return ap


def report(doc: dict[str, Any], shown: Any, json_path: str | None) -> int:
    """Prints the results with ``shown`` and writes them as JSON when asked."""
    shown(doc)
    if json_path:
        Path(json_path).write_text(json.dumps(doc, indent=2))
        console.print(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = fleet_arguments(__doc__.split("\n\n")[0], rounds=20, requests_help="requests of each shape").parse_args(argv)
    return report(run(args), show, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
