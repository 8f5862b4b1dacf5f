"""Agent benchmark: one agent process serving the 1,213 OpenB hosts, and the reaper at fleet scale.

Phases, in a fresh namespace of the given Redis:

- ``first round``: the agent's first round registers every host (one ``register_host`` call each)
  and heartbeats them (``heartbeat.lua``, 500 hosts per call, inventory JSON included);
- ``steady round``: ``--rounds`` further rounds (inventory unchanged, so heartbeats only);
  p50 / p95 / max of the whole round and of its heartbeat part, and the baseline: the same
  EVALSHA calls with the same bytes to the trivial ``noop`` script (machines are noisy: compare
  the ratio heartbeat / baseline across runs, not absolute times);
- ``fleet lost``: ``--allocations`` small allocations are spread over the fleet, then the reaper
  runs one pass with a clock ``grace`` seconds ahead: every host is declared lost and every
  allocation released (what a partition of the whole fleet from Redis would cost);
- ``fleet returns``: the next agent round finds every host lost and registers it again under
  generation 2.

    .venv/bin/python bench/agent_heartbeat.py --rounds 20 --json bench-agent.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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

from allocator.agent import Agent, StaticProvider, reap_lost_hosts  # noqa: E402
from allocator.client import Allocator  # noqa: E402
from allocator.errors import InsufficientResources  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)
OPENB_CSV = "openb_node_list_gpu_node.csv"


def openb_csv(override: str | None) -> Path:
    base = Path(override or os.environ.get("ALLOCATOR_OPENB_DIR") or REPO_ROOT / ".." / "shared" / "data" / "openb")
    return (base / OPENB_CSV if base.is_dir() else base).resolve()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def trivial_round(a: Allocator, agent: Agent) -> float:
    """The baseline: the same EVALSHA calls as one heartbeat round (same KEYS, same ARGV bytes),
    to the trivial ``noop`` script. What is left of a heartbeat round is the Lua work."""
    keys = [*a.keys.ledger_keys(), a.keys.heartbeats]
    t0 = time.perf_counter()
    for i in range(0, len(agent.hosts), agent.heartbeat_batch):
        argv: list[Any] = [a.keys.prefix, "", 15000]
        for h in agent.hosts[i: i + agent.heartbeat_batch]:
            argv += [h, agent._inventory.get(h, "")]
        a.scripts["noop"](keys=keys, args=argv)
    return (time.perf_counter() - t0) * 1000


def run(args: argparse.Namespace) -> dict[str, Any]:
    csv_path = openb_csv(args.openb_dir)
    ns = "bench-agent-" + uuid.uuid4().hex[:8]
    a = Allocator(args.redis_url, namespace=ns)
    out: dict[str, Any] = {"redis_url": args.redis_url.split("@")[-1], "namespace": ns, "csv": str(csv_path),
                           "python": platform.python_version(), "machine": platform.machine(),
                           "redis_version": a.redis.info("server").get("redis_version")}
    try:
        agent = Agent(a, StaticProvider(csv_path), interval_s=5.0)
        first = agent.run_once()
        out["hosts"] = first.hosts
        out["first_round_ms"] = first.total_ms
        out["first_round_registered"] = len(first.registered)
        rounds = [agent.run_once() for _ in range(args.rounds)]
        tot = [r.total_ms for r in rounds]
        hb = [r.heartbeat_ms for r in rounds]
        out["steady_round_ms"] = {"p50": statistics.median(tot), "p95": pct(tot, 0.95), "max": max(tot)}
        out["steady_heartbeat_ms"] = {"p50": statistics.median(hb), "p95": pct(hb, 0.95), "max": max(hb)}
        base = [trivial_round(a, agent) for _ in range(args.rounds)]
        out["trivial_round_ms"] = {"p50": statistics.median(base), "p95": pct(base, 0.95), "max": max(base)}
        out["heartbeat_over_trivial"] = round(statistics.median(hb) / statistics.median(base), 2)

        placed = 0
        for _ in range(args.allocations):
            try:
                a.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 1, "ram_mb": "4Gi"}, strategy="spread")
                placed += 1
            except InsufficientResources:
                break
        ahead = Allocator(client=a.redis, namespace=ns, clock=lambda: time.time() + args.grace + 1)
        t0 = time.perf_counter()
        lost = reap_lost_hosts(ahead, args.grace)
        out["fleet_lost"] = {"hosts": sum(1 for x in lost if x.declared), "allocations_released": sum(len(x.released) for x in lost),
                             "allocations_placed": placed, "ms": round((time.perf_counter() - t0) * 1000, 1)}
        back = agent.run_once()
        out["fleet_returns"] = {"hosts": len(back.reregistered), "ms": back.total_ms}
    finally:
        a.destroy()
    return out


def show(r: dict[str, Any]) -> None:
    t = Table("phase", "figure", title=f"Agent: {r['hosts']} OpenB hosts from one process (Redis {r['redis_version']})")
    t.add_row("first round", f"{r['first_round_ms']:.0f} ms (registers {r['first_round_registered']} hosts + heartbeat)")
    s, h = r["steady_round_ms"], r["steady_heartbeat_ms"]
    t.add_row("steady round", f"p50 {s['p50']:.1f} ms, p95 {s['p95']:.1f} ms, max {s['max']:.1f} ms")
    t.add_row("  of which heartbeat", f"p50 {h['p50']:.1f} ms, p95 {h['p95']:.1f} ms, max {h['max']:.1f} ms")
    b = r["trivial_round_ms"]
    t.add_row("  trivial EVALSHA baseline", f"p50 {b['p50']:.1f} ms (same calls and bytes, no work); "
              f"heartbeat / baseline = {r['heartbeat_over_trivial']}")
    f = r["fleet_lost"]
    t.add_row("fleet lost (1 reaper pass)", f"{f['hosts']} hosts lost, {f['allocations_released']} allocations released in {f['ms']:.0f} ms")
    t.add_row("fleet returns (1 round)", f"{r['fleet_returns']['hosts']} hosts registered again in {r['fleet_returns']['ms']:.0f} ms")
    console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="steady rounds to time (default 20)")
    ap.add_argument("--allocations", type=int, default=2000, help="allocations held when the fleet is lost (default 2000)")
    ap.add_argument("--grace", type=float, default=20.0, help="reaper grace in seconds (default 20)")
    ap.add_argument("--openb-dir", default=None, help="OpenB directory or CSV (default $ALLOCATOR_OPENB_DIR or ../shared/data/openb)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the reaper warns once per lost host: 1,213 lines here
    try:
        r = run(args)
    except redis.ConnectionError as exc:
        console.print(f"[red]cannot reach Redis at {args.redis_url}: {exc}[/]")
        raise SystemExit(1) from None
    show(r)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
