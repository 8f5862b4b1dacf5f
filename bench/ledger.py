"""Ledger benchmark: allocations per second and allocate latency against a trivial EVALSHA.

For each fleet (16 hosts, the 1,213 OpenB hosts, 5,000 hosts x 8 GPUs) the fleet is registered in
a fresh namespace, then for 1 and 4 client processes:

- ``trivial``: each process calls the ``noop`` script (EVALSHA, same 16 KEYS and ARGV shape as the
  ledger scripts, through the same ``Allocator._call`` plumbing) back to back for ``--seconds``;
- ``burst`` (the allocation rate): rounds in which every process, started together, makes
  ``--window`` allocations of random requests from a realistic mix with ``Allocator.allocate``;
  when all have finished, each releases what it allocated with ``Allocator.release`` and the next
  round starts. Allocations per second = allocations / the summed wall time of the allocating
  halves (first start to last finish of each round); releases are timed apart the same way.
- ``ledger`` (steady state): each process keeps a window of ``--window`` held allocations: it
  allocates and, once the window is full, releases the oldest first, so every allocation costs an
  allocate and a release call. The window is filled before the clock starts and emptied after it
  stops.
- ``batch`` (``--batch N``, 0 skips it): the burst phase with ``Allocator.allocate_many``, N
  requests per call (``chunk_size=N``): the allocation rate of a caller with many requests at
  once. Latencies are per call (N allocations each); the releases go N per
  ``Allocator.release_many`` call, their latencies per call too.
- ``script`` (diagnostic, ``--no-script-only`` skips it): the same loop calling the ``place`` and
  ``release`` scripts directly with pre-built ARGV, the same arguments ``Allocator.allocate`` and
  ``Allocator.release`` send (``script_ops``), i.e. without the pydantic validation, the ARGV's
  encoding and the reply parsing (``Allocation.from_record``) of the Python API, to split the cost
  between Lua and the client.

Machines are noisy, so the headline figures are ratios against the trivial EVALSHA measured in the
same run: allocs/s (burst) / trivial calls/s, and allocate p50 at each fleet / allocate p50 at 16
hosts. The steady-state rate is reported next to it: it pays a release per allocation, so it can
reach at most half the trivial rate even if the scripts cost nothing.

Single runs of the same code differ by up to a quarter on a shared machine: ``--repeat N`` runs
each (fleet, clients) measurement N times, shows the run with the median ratio in the tables (for
an even N the lower of the two middle runs), with that run's own figures, and judges the goals on
each figure's median over the runs, kept apart in ``*_median*`` fields: the ratio, the burst and
steady-state allocate p99, the allocate p50 (fleet-size goal). Each median is the lower middle
value, a figure some run had, never the mean of two runs. Every run's figures are in the JSON and
the Markdown.

Where the processes run (``bench/cpus.py``): by default the server and the clients share every
CPU, so on a small machine the clients' Python competes with Redis for the same cores.
``--redis-cpus 0 --client-cpus 1`` pins a local server to CPU 0 for the run (its CPUs are given
back afterwards) and the clients to CPU 1: Redis then runs as deployed, on a core of its own. The
header and the JSON say which layout a run used.

    .venv/bin/python bench/ledger.py --seconds 5 --json bench-ledger.json
    .venv/bin/python bench/ledger.py --seconds 5 --redis-cpus 0 --client-cpus 1
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
from pydantic_core import from_json  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from allocator.batch import MAX_CHUNK  # noqa: E402
from allocator.client import Allocator, new_allocation_id  # noqa: E402
from allocator.errors import InsufficientResources  # noqa: E402
from allocator.models import Allocation  # noqa: E402
from allocator.scripts import SCRIPT_NAMES, source  # noqa: E402

try:
    from bench import cpus, fleets  # python -m bench.ledger
except ImportError:  # python bench/ledger.py
    import cpus  # type: ignore[no-redef]
    import fleets  # type: ignore[no-redef]

GIB = 1024
console = Console(width=None if sys.stdout.isatty() else 200)

# -- goals (issue text) ---------------------------------------------------------------------
GOAL_RATIO = 0.5  # allocs/s >= half the trivial EVALSHA calls/s (4 clients, 5,000 hosts)
GOAL_P99_MS = 2.0  # allocate p99 < 2 ms (4 clients, 5,000 hosts)
GOAL_SCALE = 1.5  # allocate p50 at 5,000 hosts <= 1.5 x allocate p50 at 16 hosts


# -- request mix ----------------------------------------------------------------------------

def make_requests(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` requests: 70% 1 GPU with 2-32 GiB, 15% 2 GPUs with 2-16 GiB each, 15% CPU only.

    Cores (exclusive) 1/2/4/8 with weights 4/3/2/1 (mean 2.6); RAM 4/8/16/32/64 GiB with weights
    3/3/2/1/1 (mean 16.4 GiB). Moderate, so refusals stay rare even on 16 hosts with 4 clients.
    """
    out = []
    for _ in range(n):
        cores = rng.choices([1, 2, 4, 8], weights=[4, 3, 2, 1])[0]
        ram = rng.choices([4, 8, 16, 32, 64], weights=[3, 3, 2, 1, 1])[0] * GIB
        r = rng.random()
        if r < 0.15:
            out.append({"cpu_cores": cores, "ram_mb": ram})
        elif r < 0.30:
            out.append({"gpus": 2, "gpu_memory_mb": rng.randint(2, 16) * GIB, "cpu_cores": cores, "ram_mb": ram})
        else:
            out.append({"gpus": 1, "gpu_memory_mb": rng.randint(2, 32) * GIB, "cpu_cores": cores, "ram_mb": ram})
    return out


# -- worker processes -------------------------------------------------------------------------

@dataclass
class PhaseConfig:
    kind: str  # "trivial" | "burst" | "batch" | "ledger" | "script"
    redis_url: str
    namespace: str
    seconds: float
    window: int
    strategy: str
    seed: int
    batch: int = 1  # requests per allocate call (the "batch" phase)


@dataclass
class Rounds:
    """What the processes of a burst phase share: a barrier they meet at before and after each
    allocating half, and whether another round starts (decided once, by the barrier's action, so
    every process runs the same number of rounds)."""

    barrier: Any  # its action (_decide) sets go
    go: Any  # multiprocessing.Value("b"): 1 while rounds go on


def _decide(go: Any, deadline: Any, seconds: float) -> None:
    """Barrier action of a burst phase: the first call sets the deadline; later calls stop the
    rounds once it has passed."""
    now = time.perf_counter()
    if deadline.value == 0.0:
        deadline.value = now + seconds
    go.value = 1 if now < deadline.value else 0


def _worker(cfg: PhaseConfig, wid: int, barrier: Any, out: Any, rounds: Rounds | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Process.terminate() ends a worker at once
    try:
        out.put((wid, _run_worker(cfg, wid, barrier, rounds)))
    except BaseException as exc:  # report, never hang the parent
        for b in (barrier, rounds.barrier if rounds else None):
            try:
                if b is not None:
                    b.abort()
            except Exception:
                pass
        out.put((wid, {"error": f"{type(exc).__name__}: {exc}"}))


class _Allocs:
    """The timed allocate calls of one process: latencies, allocations and refusals."""

    def __init__(self, do_alloc: Any) -> None:
        self.do_alloc = do_alloc
        self.lat: list[float] = []
        self.allocs = self.refusals = 0

    def take(self, i: int) -> tuple[str | None, float]:
        """Allocates request ``i``; returns the allocation id (None when refused) and the end time."""
        s = time.perf_counter()
        aid = self.do_alloc(i)
        e = time.perf_counter()
        self.lat.append(e - s)
        if aid is None:
            self.refusals += 1
        else:
            self.allocs += 1
        return aid, e

    def take_many(self, i: int, n: int) -> tuple[list[str], float]:
        """Allocates requests ``i`` to ``i + n - 1`` in one call (``do_alloc`` takes both then);
        returns the ids of those placed and the end time. One latency per call."""
        s = time.perf_counter()
        ids = self.do_alloc(i, n)
        e = time.perf_counter()
        self.lat.append(e - s)
        placed = [x for x in ids if x is not None]
        self.allocs += len(placed)
        self.refusals += len(ids) - len(placed)
        return placed, e


def _run_burst(cfg: PhaseConfig, rounds: Rounds, barrier: Any, do_alloc: Any, do_release: Any) -> dict[str, Any]:
    """Rounds of ``cfg.window`` allocations then their releases, in step with the other processes."""
    perf = time.perf_counter
    taken = _Allocs(do_alloc)
    lat_r: list[float] = []
    released = 0
    spans_a: list[tuple[float, float]] = []
    spans_r: list[tuple[float, float]] = []
    batch = cfg.kind == "batch"
    for i in range(20):  # warm up: connection, scripts, code paths
        for aid in do_alloc(i, 1) if batch else [do_alloc(i)]:
            if aid is not None:
                do_release([aid] if batch else aid)
    i = 0
    barrier.wait(timeout=120)
    while True:
        rounds.barrier.wait(timeout=120)
        if not rounds.go.value:
            break
        held: list[str] = []
        t0 = e = perf()
        if batch:
            for start in range(0, cfg.window, cfg.batch):
                n = min(cfg.batch, cfg.window - start)
                ids, e = taken.take_many(i, n)
                i += n
                held += ids
        else:
            for _ in range(cfg.window):
                aid, e = taken.take(i)
                i += 1
                if aid is not None:
                    held.append(aid)
        spans_a.append((t0, e))
        rounds.barrier.wait(timeout=120)  # everyone has allocated: now release
        t0 = e = perf()
        step = cfg.batch if batch else 1
        for start in range(0, len(held), step):
            s = perf()
            do_release(held[start:start + step] if batch else held[start])
            e = perf()
            lat_r.append(e - s)
        released += len(held)
        spans_r.append((t0, e))
    return {"allocs": taken.allocs, "refusals": taken.refusals, "releases": released, "lat_a": taken.lat,
            "lat_r": lat_r, "spans_a": spans_a, "spans_r": spans_r}


def api_ops(alloc: Allocator, reqs: list[dict[str, Any]],
            strategy: str) -> tuple[Callable[[int], str | None], Callable[[str], None]]:
    """Allocate and release of the burst and steady-state phases: the Python API, as users call it
    (request ``i`` of ``reqs``; None for a refusal)."""
    n = len(reqs)

    def do_alloc(i: int) -> str | None:
        try:
            return alloc.allocate(reqs[i % n], strategy=strategy).allocation_id
        except InsufficientResources:
            return None

    def do_release(aid: str) -> None:
        alloc.release(aid)

    return do_alloc, do_release


def batch_ops(alloc: Allocator, reqs: list[dict[str, Any]],
              strategy: str) -> tuple[Callable[[int, int], list[str | None]], Callable[[list[str]], None]]:
    """Allocate and release of the batch phase: ``Allocator.allocate_many`` of requests ``i`` to
    ``i + n - 1`` in one call (None for each refusal), and ``Allocator.release_many`` of ids."""
    m = len(reqs)

    def do_alloc(i: int, n: int) -> list[str | None]:
        res = alloc.allocate_many([{"resources": reqs[(i + k) % m], "strategy": strategy} for k in range(n)],
                                  chunk_size=n)
        return [x.allocation_id if isinstance(x, Allocation) else None for x in res]

    def do_release(aids: list[str]) -> None:
        alloc.release_many(aids, chunk_size=len(aids))

    return do_alloc, do_release


_ID = "@@ID@@"  # where a pre-built place payload takes its allocation id


def script_ops(alloc: Allocator, reqs: list[dict[str, Any]],
               strategy: str) -> tuple[Callable[[int], str | None], Callable[[str], None]]:
    """Allocate and release of the script phase: the ``place`` and ``release`` scripts called with
    the ARGV ``Allocator.allocate`` and ``Allocator.release`` send (``place_args``: the payload, the
    request's JSON and its metadata; the release's reason, pass depth, scan cap and no placement
    token), built before the clock starts. Fewer arguments would measure cheaper scripts than the
    real calls run: ``place`` stores the request and metadata only when given them, and
    ``release`` runs its scheduling pass only with a pass depth."""
    call = alloc._call
    tmpls = [alloc.place_args(alloc.build_request(r, strategy=strategy), _ID) for r in reqs]
    n = len(tmpls)

    def do_alloc(i: int) -> str | None:
        aid = new_allocation_id()
        payload, request, metadata = tmpls[i % n]
        res = call("place", payload.replace(_ID, aid, 1), request, metadata)
        return aid if res.get("ok") else None

    def do_release(aid: str) -> None:
        call("release", aid, "released", alloc.pass_depth, alloc.scan_cap, "")

    return do_alloc, do_release


def _run_worker(cfg: PhaseConfig, wid: int, barrier: Any, rounds: Rounds | None = None) -> dict[str, Any]:
    alloc = Allocator(redis_url=cfg.redis_url, namespace=cfg.namespace)
    rng = random.Random(cfg.seed * 1009 + wid)
    perf = time.perf_counter
    lat_a: list[float] = []
    lat_r: list[float] = []
    releases = 0

    if cfg.kind == "trivial":
        # The same plumbing as Allocator._call (KEYS list, prefix and clock ARGV, Script.__call__),
        # minus the decoding of the reply: the bare EVALSHA round trip.
        noop_script = alloc.scripts["noop"]
        keys, prefix = alloc._ledger_keys, alloc._prefix_arg

        def noop() -> Any:
            return noop_script(keys=keys, args=[prefix, alloc._now_arg()])

        for _ in range(50):
            noop()
        barrier.wait(timeout=120)
        t0 = perf()
        end = t0 + cfg.seconds
        e = t0
        while e < end:
            s = perf()
            noop()
            e = perf()
            lat_a.append(e - s)
        return {"calls": len(lat_a), "elapsed": e - t0, "lat_a": lat_a}

    reqs = make_requests(rng, 4096)
    window: deque[str] = deque()

    do_alloc: Any
    if cfg.kind in ("ledger", "burst"):
        do_alloc, do_release = api_ops(alloc, reqs, cfg.strategy)
    elif cfg.kind == "batch":
        do_alloc, do_release = batch_ops(alloc, reqs, cfg.strategy)
    else:  # "script": the Lua scripts with pre-built ARGV, no pydantic on the hot path
        do_alloc, do_release = script_ops(alloc, reqs, cfg.strategy)

    if cfg.kind in ("burst", "batch"):
        assert rounds is not None
        return _run_burst(cfg, rounds, barrier, do_alloc, do_release)

    taken = _Allocs(do_alloc)
    i = 0
    while len(window) < cfg.window and i < 20 * cfg.window:  # fill the window, untimed
        aid = do_alloc(i)
        i += 1
        if aid is not None:
            window.append(aid)
    barrier.wait(timeout=120)
    t0 = perf()
    end = t0 + cfg.seconds
    e = t0
    while e < end:
        if len(window) >= cfg.window:
            aid = window.popleft()
            s = perf()
            do_release(aid)
            e = perf()
            lat_r.append(e - s)
            releases += 1
        aid, e = taken.take(i)
        i += 1
        if aid is not None:
            window.append(aid)
    elapsed = e - t0
    while window:  # empty the window, untimed
        do_release(window.popleft())
    return {"allocs": taken.allocs, "refusals": taken.refusals, "releases": releases, "elapsed": elapsed,
            "lat_a": taken.lat, "lat_r": lat_r}


# -- statistics ------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile in ms (``values`` in seconds, sorted)."""
    if not values:
        return float("nan")
    # The ceil(q% of n)-th value: round() would round halves to even, one sample too high.
    k = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return values[k] * 1000


# Commands a benchmark or its own bookkeeping runs outside the scripts (the rest ran inside them).
_NOT_IN_SCRIPTS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script", "cmdstat_info", "cmdstat_config",
                   "cmdstat_client", "cmdstat_ping", "cmdstat_select", "cmdstat_hello", "cmdstat_flushall",
                   "cmdstat_flushdb", "cmdstat_scan", "cmdstat_del", "cmdstat_unlink", "cmdstat_latency")


SLOW_US = 528  # a bucket bound of Redis's latency histogram (powers of two, in µs)


def _evalsha_over(r: redis.Redis, bound: int) -> float:
    """EVALSHA calls so far that took the server more than ``bound`` µs (Redis 7's LATENCY
    HISTOGRAM, cumulative per bucket); NaN where the server has none (Redis 6.2)."""
    try:
        raw = r.execute_command("LATENCY", "HISTOGRAM", "evalsha")
    except redis.ResponseError:
        return float("nan")
    flat = raw.get("evalsha") or raw.get(b"evalsha") if isinstance(raw, dict) else None
    if not flat:
        return 0.0
    calls = flat.get("calls", flat.get(b"calls", 0))
    hist = flat.get("histogram_usec", flat.get(b"histogram_usec", {}))
    within = max((n for b, n in hist.items() if int(b) <= bound), default=0)  # cumulative counts
    return float(calls - within)


def server_stats(r: redis.Redis) -> dict[str, float]:
    """Cumulative server figures: EVALSHA calls and µs, the µs of the commands the scripts ran
    (Redis counts a command a script runs under its own name), Redis CPU seconds, our clock."""
    cs = r.info("commandstats")
    ev = cs.get("cmdstat_evalsha", {})
    inner = sum(float(v.get("usec", 0)) for k, v in cs.items() if not k.startswith(_NOT_IN_SCRIPTS))
    cpu = r.info("cpu")
    return {"evalsha_calls": float(ev.get("calls", 0)), "evalsha_usec": float(ev.get("usec", 0)), "inner_usec": inner,
            "cpu": float(cpu.get("used_cpu_user", 0)) + float(cpu.get("used_cpu_sys", 0)), "t": time.perf_counter(),
            "slow_calls": _evalsha_over(r, SLOW_US)}


def evalsha_us(r: redis.Redis, n: int, call: Any) -> tuple[float, int]:
    """Server µs per EVALSHA over ``n`` calls of ``call`` (INFO commandstats deltas), and how many
    EVALSHA the server counted meanwhile (more than ``n``: another client ran scripts too)."""
    before = server_stats(r)
    for _ in range(n):
        call()
    after = server_stats(r)
    calls = int(after["evalsha_calls"] - before["evalsha_calls"])
    return ((after["evalsha_usec"] - before["evalsha_usec"]) / calls if calls else float("nan")), calls


def run_phase(cfg: PhaseConfig, clients: int, r: redis.Redis) -> dict[str, Any]:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(clients + 1)
    out = ctx.Queue()
    rounds = None
    if cfg.kind in ("burst", "batch"):
        go, deadline = ctx.Value("b", 1), ctx.Value("d", 0.0)
        rounds = Rounds(ctx.Barrier(clients, action=functools.partial(_decide, go, deadline, cfg.seconds)), go)
    procs = [ctx.Process(target=_worker, args=(cfg, w, barrier, out, rounds), daemon=True) for w in range(clients)]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        try:
            barrier.wait(timeout=180)  # every worker is connected and warmed up (window filled)
        except Exception:
            pass
        before = server_stats(r)
        time.sleep(cfg.seconds)
        # Workers finish their last call and then release their windows; take the server counters
        # right after the timed part so the untimed clean-up is (mostly) outside them.
        after = server_stats(r)
        deadline = time.monotonic() + cfg.seconds + 120
        while len(results) < clients:
            wid, res = out.get(timeout=max(1.0, deadline - time.monotonic()))
            results[wid] = res
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    errors = [res["error"] for res in results.values() if "error" in res]
    if errors:
        raise RuntimeError(f"{cfg.kind} worker failed: {errors[0]}")

    lat_a = sorted(x for res in results.values() for x in res["lat_a"])
    lat_r = sorted(x for res in results.values() for x in res.get("lat_r", []))
    d_calls = after["evalsha_calls"] - before["evalsha_calls"]
    d_usec = after["evalsha_usec"] - before["evalsha_usec"]
    wall = after["t"] - before["t"]
    summary: dict[str, Any] = {
        "kind": cfg.kind,
        "clients": clients,
        "a_p50_ms": pct(lat_a, 50),
        "a_p99_ms": pct(lat_a, 99),
        "a_mean_ms": (sum(lat_a) / len(lat_a) * 1000) if lat_a else float("nan"),
        "server_us_per_evalsha": (d_usec / d_calls) if d_calls else float("nan"),
        # Of that, the Redis commands the scripts ran; the rest is the Lua interpreter's own work.
        "server_cmd_us_per_evalsha": ((after["inner_usec"] - before["inner_usec"]) / d_calls) if d_calls else float("nan"),
        # Share of the calls that held the server over SLOW_US: the tail the other clients wait behind.
        "server_slow_share": ((after["slow_calls"] - before["slow_calls"]) / d_calls) if d_calls else float("nan"),
        "server_evalsha_calls": int(d_calls),
        "redis_cpu_pct": 100 * (after["cpu"] - before["cpu"]) / wall if wall > 0 else float("nan"),
    }
    if cfg.kind == "batch":  # requests per call: a window smaller than --batch is one call
        summary["batch"] = min(cfg.batch, cfg.window)
    if cfg.kind == "trivial":
        summary["calls"] = sum(res["calls"] for res in results.values())
        summary["calls_per_s"] = sum(res["calls"] / res["elapsed"] for res in results.values())
        summary["client_calls"] = summary["calls"]
    elif cfg.kind in ("burst", "batch"):
        wall_a, wall_r = _round_walls(results, "spans_a"), _round_walls(results, "spans_r")
        summary["rounds"] = min(len(res["spans_a"]) for res in results.values())
        summary["allocating_s"], summary["releasing_s"] = wall_a, wall_r
        summary["allocs_per_s"] = sum(res["allocs"] for res in results.values()) / wall_a if wall_a else float("nan")
        summary["releases_per_s"] = sum(res["releases"] for res in results.values()) / wall_r if wall_r else float("nan")
    else:
        summary["allocs_per_s"] = sum(res["allocs"] / res["elapsed"] for res in results.values())
        summary["ledger_calls_per_s"] = sum(
            (res["allocs"] + res["refusals"] + res["releases"]) / res["elapsed"] for res in results.values()
        )
    if cfg.kind != "trivial":
        for key in ("allocs", "refusals", "releases"):
            summary[key] = sum(res[key] for res in results.values())
        summary["r_p50_ms"] = pct(lat_r, 50)
        summary["r_p99_ms"] = pct(lat_r, 99)
        summary["client_calls"] = summary["allocs"] + summary["refusals"] + summary["releases"]
        if cfg.kind == "batch":  # one script call per batch, not per allocation or release
            summary["client_calls"] = len(lat_a) + len(lat_r)
    # The Redis server is shared: the EVALSHA counters are ours only if their count matches.
    summary["server_stats_clean"] = bool(d_calls) and abs(d_calls - summary["client_calls"]) <= max(
        50, 0.03 * summary["client_calls"]
    )
    return summary


def measure(args: argparse.Namespace, label: str, ns: str, n: int, r: redis.Redis) -> dict[str, Any]:
    """One run of every phase with ``n`` client processes on the registered fleet ``ns``."""
    base = PhaseConfig("trivial", args.redis_url, ns, args.seconds, args.window, args.strategy, args.seed,
                       max(1, args.batch))
    row: dict[str, Any] = {"fleet": label, "clients": n}
    kinds = (["trivial", "burst"] + (["batch"] if args.batch > 0 else []) + ["ledger"]
             + ([] if args.no_script_only else ["script"]))
    for kind in kinds:
        with console.status(f"{label}: {n} client(s), {kind} for {args.seconds:g} s"):
            cfg = PhaseConfig(**{**base.__dict__, "kind": kind})
            row[kind] = run_phase(cfg, n, r)
    B, L, T = row["burst"], row["ledger"], row["trivial"]
    row["ratio"] = B["allocs_per_s"] / T["calls_per_s"]
    row["steady_ratio"] = L["allocs_per_s"] / T["calls_per_s"]
    if "batch" in row:
        row["batch_ratio"] = row["batch"]["allocs_per_s"] / T["calls_per_s"]
        # release_many's releases/s over release's, both measured in this run
        row["batch_release_speedup"] = row["batch"]["releases_per_s"] / B["releases_per_s"]
    console.print(f"  {n} client(s): {B['allocs_per_s']:,.0f} allocs/s (p50 {B['a_p50_ms']:.3f} ms, "
                  f"p99 {B['a_p99_ms']:.3f} ms, {B['refusals']} refused), trivial {T['calls_per_s']:,.0f} "
                  f"calls/s (p50 {T['a_p50_ms']:.3f} ms) -> ratio {row['ratio']:.3f}; steady state "
                  f"{L['allocs_per_s']:,.0f} allocs/s (p99 {L['a_p99_ms']:.3f} ms) -> {row['steady_ratio']:.3f}")
    if "batch" in row:
        A = row["batch"]
        console.print(f"  {n} client(s), allocate_many of {args.batch}: {A['allocs_per_s']:,.0f} allocs/s (per call: "
                      f"p50 {A['a_p50_ms']:.3f} ms, p99 {A['a_p99_ms']:.3f} ms, {A['refusals']} refused) -> ratio "
                      f"{row['batch_ratio']:.3f}; release_many: {A['releases_per_s']:,.0f} releases/s against "
                      f"{B['releases_per_s']:,.0f} one by one")
    return row


def _destroy_until_empty(a: Allocator, tries: int = 20) -> None:
    """Destroys the namespace, again while keys reappear: a client process killed on Ctrl-C may
    have left a call Redis has not run yet, which writes after the first sweep."""
    for _ in range(tries):
        a.destroy()
        time.sleep(0.1)
        if next(a.redis.scan_iter(match=a.keys.pattern(), count=1000), None) is None:
            return


def summarize_repeats(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ratio (the lower middle one of an even count), shown in the tables
    with its own figures untouched, plus the medians the goals are judged on (``*_median*``: each
    figure's own median over the runs) and every run's headline figures.

    Every median is the lower middle value, a figure some run had: the mean of the two middle
    runs would be a figure no run measured, and the ratio median is then the shown run's ratio."""
    shown = sorted(reps, key=lambda x: x["ratio"])[(len(reps) - 1) // 2]
    row = dict(shown)

    def median(figure: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median_low(figure(x) for x in reps)

    row["ratio_median"] = median(lambda x: x["ratio"])
    row["steady_ratio_median"] = median(lambda x: x["steady_ratio"])
    row["p99_median_ms"] = median(lambda x: x["burst"]["a_p99_ms"])
    row["steady_p99_median_ms"] = median(lambda x: x["ledger"]["a_p99_ms"])
    row["p50_median_ms"] = median(lambda x: x["burst"]["a_p50_ms"])
    row["server_us_median"] = median(lambda x: x["ledger"]["server_us_per_evalsha"])
    row["runs"] = [{"ratio": x["ratio"], "steady_ratio": x["steady_ratio"], "a_p99_ms": x["burst"]["a_p99_ms"],
                    "steady_a_p99_ms": x["ledger"]["a_p99_ms"], "a_p50_ms": x["burst"]["a_p50_ms"]} for x in reps]
    if all("batch" in x for x in reps):
        row["batch_ratio_median"] = median(lambda x: x["batch_ratio"])
        row["batch_p99_median_ms"] = median(lambda x: x["batch"]["a_p99_ms"])
        row["batch_release_speedup_median"] = median(lambda x: x["batch_release_speedup"])
        for run, x in zip(row["runs"], reps):
            run["batch_ratio"], run["batch_a_p99_ms"] = x["batch_ratio"], x["batch"]["a_p99_ms"]
            run["batch_release_speedup"] = x["batch_release_speedup"]
    return row


def _round_walls(results: dict[int, dict[str, Any]], key: str) -> float:
    """Summed wall time of a burst phase's halves: per round, first start to last finish over the
    processes (perf_counter is one monotonic clock for every process of the machine)."""
    spans = [res[key] for res in results.values()]
    n = min(len(x) for x in spans)
    return sum(max(x[j][1] for x in spans) - min(x[j][0] for x in spans) for j in range(n))


# -- client-side cost of the Python API (no Redis) ------------------------------------------

def client_overhead(alloc: Allocator, strategy: str, n: int = 3000) -> dict[str, float]:
    """Microseconds per call of the Python parts of allocate/release (validation, ARGV, parsing).

    The ARGV is built by ``place_args``, as ``Allocator.allocate`` builds it: the payload alone
    would leave out the request's and the metadata's JSON that every allocate also encodes."""
    reqs = make_requests(random.Random(7), 512)
    # One real allocation, only to get a record of the shape ``place`` returns.
    req = alloc.build_request(reqs[0], strategy=strategy)
    aid = new_allocation_id()
    res = alloc._call("place", *alloc.place_args(req, aid))
    rec = res["alloc"] if res.get("ok") else None
    if rec is not None:
        alloc.release(aid)
    t0 = time.perf_counter()
    for i in range(n):
        r = alloc.build_request(reqs[i % 512], strategy=strategy)
        alloc.place_args(r, new_allocation_id())
    build_us = (time.perf_counter() - t0) / n * 1e6
    parse_us = float("nan")
    if rec is not None:
        raw = json.dumps({"ok": True, "alloc": rec})
        t0 = time.perf_counter()
        for _ in range(n):
            Allocation.from_record(from_json(raw)["alloc"])
        parse_us = (time.perf_counter() - t0) / n * 1e6
    return {"request_build_us": build_us, "reply_parse_us": parse_us}


# -- fleets ------------------------------------------------------------------------------------

def load_fleets(names: list[str], args: argparse.Namespace) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(key, label, hosts) per fleet; a missing OpenB directory skips that fleet with a message."""
    out = []
    for name in names:
        if name == "small":
            out.append(("small", f"{args.small_hosts} hosts", fleets.small_fleet(args.small_hosts)))
        elif name == "openb":
            d = fleets.openb_dir(args.openb_dir)
            try:
                hosts = fleets.openb_fleet(d)
            except FileNotFoundError as exc:
                console.print(f"[yellow]skipping the OpenB fleet: {exc} (set --openb-dir or ALLOCATOR_OPENB_DIR)")
                continue
            out.append(("openb", f"OpenB {len(hosts):,} hosts", hosts))
        elif name == "synthetic":
            out.append(("synthetic", f"{args.synthetic_hosts:,} hosts x {args.gpus} GPUs",
                        fleets.synthetic_fleet(args.synthetic_hosts, gpus=args.gpus)))
        else:
            raise SystemExit(f"unknown fleet {name!r} (small, openb, synthetic)")
    return out


def register_fleet(alloc: Allocator, label: str, hosts: list[dict[str, Any]]) -> float:
    with Progress(TextColumn("register [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(hosts))
        t0 = time.perf_counter()
        for i, h in enumerate(hosts, 1):
            alloc.register_host(h)
            if i % 50 == 0 or i == len(hosts):
                progress.update(task, completed=i)
        return time.perf_counter() - t0


# -- report ------------------------------------------------------------------------------------

def fmt(v: float, nd: int = 2) -> str:
    return "-" if v is None or v != v else f"{v:,.{nd}f}"


def print_results(rows: list[dict[str, Any]], fleet_info: list[dict[str, Any]], overhead: dict[str, float]) -> None:
    t = Table(title="Ledger: Allocator.allocate/release vs trivial EVALSHA (same run)", show_lines=False)
    for col in ("fleet", "clients", "allocs/s", "alloc p50 / p99 ms", "releases/s", "release p50 / p99 ms",
                "refusals", "trivial calls/s", "trivial p50 / p99 ms", "allocs/s ÷ trivial", "p50 vs 16 hosts (medians)",
                "steady allocs/s", "steady alloc p50 / p99 ms", "steady ÷ trivial"):
        t.add_column(col, justify="left" if col == "fleet" else "right")
    for row in rows:
        B, L, T = row["burst"], row["ledger"], row["trivial"]
        t.add_row(row["fleet"], str(row["clients"]), fmt(B["allocs_per_s"], 0),
                  f"{fmt(B['a_p50_ms'], 3)} / {fmt(B['a_p99_ms'], 3)}", fmt(B["releases_per_s"], 0),
                  f"{fmt(B['r_p50_ms'], 3)} / {fmt(B['r_p99_ms'], 3)}",
                  f"{B['refusals'] + L['refusals']} / {B['allocs'] + B['refusals'] + L['allocs'] + L['refusals']}",
                  fmt(T["calls_per_s"], 0), f"{fmt(T['a_p50_ms'], 3)} / {fmt(T['a_p99_ms'], 3)}", fmt(row["ratio"], 3),
                  fmt(row.get("scale_p50"), 2) + "x", fmt(L["allocs_per_s"], 0),
                  f"{fmt(L['a_p50_ms'], 3)} / {fmt(L['a_p99_ms'], 3)}", fmt(row["steady_ratio"], 3))
    console.print(t)

    d = Table(title="Diagnostics (server µs/EVALSHA from INFO commandstats; '*' = shared server, counts disagree)")
    for col in ("fleet", "clients", "ledger calls/s ÷ trivial", "script-only allocs/s", "script-only ÷ trivial",
                "place p50/p99 ms", "server µs: ledger / trivial", "of which commands µs", f"calls > {SLOW_US} µs",
                "server µs vs 16 hosts (medians)",
                "redis CPU %: ledger / trivial"):
        d.add_column(col, justify="left" if col == "fleet" else "right")
    for row in rows:
        L, T, S = row["ledger"], row["trivial"], row.get("script")

        def srv(x: dict[str, Any]) -> str:
            return fmt(x["server_us_per_evalsha"], 1) + ("" if x["server_stats_clean"] else "*")

        d.add_row(row["fleet"], str(row["clients"]), fmt(L["ledger_calls_per_s"] / T["calls_per_s"], 3),
                  fmt(S["allocs_per_s"], 0) if S else "-", fmt(S["allocs_per_s"] / T["calls_per_s"], 3) if S else "-",
                  f"{fmt(S['a_p50_ms'], 3)} / {fmt(S['a_p99_ms'], 3)}" if S else "-",
                  f"{srv(L)} / {srv(T)}", fmt(L.get("server_cmd_us_per_evalsha"), 1),
                  fmt(100 * L.get("server_slow_share", float("nan")), 1) + "%",
                  fmt(row.get("scale_p50_server"), 2) + "x",
                  f"{fmt(L['redis_cpu_pct'], 0)} / {fmt(T['redis_cpu_pct'], 0)}")
    console.print(d)

    f = Table(title="Fleets")
    for col in ("fleet", "hosts", "GPUs", "GPU memory TiB", "cores", "RAM TiB", "register s", "hosts/s", "destroy s"):
        f.add_column(col, justify="left" if col == "fleet" else "right")
    for fi in fleet_info:
        f.add_row(fi["fleet"], f"{fi['hosts']:,}", f"{fi['gpus']:,}", fmt(fi["gpu_memory_mb"] / 2**20, 1),
                  f"{fi['cpu_cores']:,}", fmt(fi["ram_mb"] / 2**20, 1), fmt(fi["register_s"], 2),
                  fmt(fi["hosts"] / fi["register_s"], 0), fmt(fi.get("destroy_s"), 2))
    console.print(f)
    console.print(f"Client-side Python per allocate (validation + ARGV, no Redis): "
                  f"{overhead['request_build_us']:.0f} µs; reply parsing (Allocation.from_record): "
                  f"{overhead['reply_parse_us']:.0f} µs")


def evaluate_goals(rows: list[dict[str, Any]], big_label: str | None, base_label: str | None) -> list[dict[str, Any]]:
    """The goals, each judged on its figure's median over the runs (``summarize_repeats``), never
    on the figures of the one run the tables show."""
    goals = []
    big4 = next((r for r in rows if r["fleet"] == big_label and r["clients"] == 4), None)
    if big4:
        ratio = big4["ratio_median"]
        goals.append({"goal": f"4 clients, {big_label}: allocs/s ≥ {GOAL_RATIO} x trivial EVALSHA calls/s",
                      "value": ratio, "met": ratio >= GOAL_RATIO})
        p99, steady = big4["p99_median_ms"], big4["steady_p99_median_ms"]
        goals.append({"goal": f"4 clients, {big_label}: allocate p99 < {GOAL_P99_MS} ms",
                      "value": p99, "met": p99 < GOAL_P99_MS})
        goals.append({"goal": f"4 clients, {big_label}, steady state (allocate + release): allocate p99 < {GOAL_P99_MS} ms",
                      "value": steady, "met": steady < GOAL_P99_MS})
    for r in rows:
        if r["fleet"] == big_label and r.get("scale_p50") is not None:
            goals.append({"goal": f"{r['clients']} client(s): allocate p50 at {big_label} ≤ {GOAL_SCALE} x at {base_label}",
                          "value": r["scale_p50"], "met": r["scale_p50"] <= GOAL_SCALE})
    return goals


def markdown(rows: list[dict[str, Any]], fleet_info: list[dict[str, Any]], overhead: dict[str, float],
             goals: list[dict[str, Any]]) -> str:
    out = ["| fleet | clients | allocs/s | allocate p50 / p99 ms | releases/s | release p50 / p99 ms | refused | "
           "trivial calls/s | trivial p50 / p99 ms | allocs/s ÷ trivial | allocate p50 vs 16 hosts (medians) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        B, T = row["burst"], row["trivial"]
        out.append(f"| {row['fleet']} | {row['clients']} | {fmt(B['allocs_per_s'], 0)} | {fmt(B['a_p50_ms'], 3)} / "
                   f"{fmt(B['a_p99_ms'], 3)} | {fmt(B['releases_per_s'], 0)} | {fmt(B['r_p50_ms'], 3)} / "
                   f"{fmt(B['r_p99_ms'], 3)} | {B['refusals']} of {B['allocs'] + B['refusals']:,} | "
                   f"{fmt(T['calls_per_s'], 0)} | {fmt(T['a_p50_ms'], 3)} / {fmt(T['a_p99_ms'], 3)} | "
                   f"**{fmt(row['ratio'], 3)}** | {fmt(row.get('scale_p50'), 2)}x |")
    out += ["", "Steady state (every allocation also pays its release):", "",
            "| fleet | clients | allocs/s | allocate p50 / p99 ms | release p50 / p99 ms | refused | allocs/s ÷ trivial |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        L = row["ledger"]
        out.append(f"| {row['fleet']} | {row['clients']} | {fmt(L['allocs_per_s'], 0)} | {fmt(L['a_p50_ms'], 3)} / "
                   f"{fmt(L['a_p99_ms'], 3)} | {fmt(L['r_p50_ms'], 3)} / {fmt(L['r_p99_ms'], 3)} | "
                   f"{L['refusals']} of {L['allocs'] + L['refusals']:,} | {fmt(row['steady_ratio'], 3)} |")
    if any("batch" in row for row in rows):
        out += ["", "Batches (`Allocator.allocate_many` and `Allocator.release_many`, the burst phase's rounds; "
                "latency per call):", "",
                "| fleet | clients | requests per call | allocs/s | call p50 / p99 ms | refused | allocs/s ÷ trivial | "
                "÷ allocate's allocs/s | releases/s | release call p50 / p99 ms | ÷ release's releases/s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in rows:
            if "batch" in row:
                A, B = row["batch"], row["burst"]
                out.append(f"| {row['fleet']} | {row['clients']} | {A['batch']} | {fmt(A['allocs_per_s'], 0)} | "
                           f"{fmt(A['a_p50_ms'], 3)} / {fmt(A['a_p99_ms'], 3)} | {A['refusals']} of "
                           f"{A['allocs'] + A['refusals']:,} | **{fmt(row['batch_ratio'], 3)}** | "
                           f"{fmt(A['allocs_per_s'] / B['allocs_per_s'], 2)}x | {fmt(A['releases_per_s'], 0)} | "
                           f"{fmt(A['r_p50_ms'], 3)} / {fmt(A['r_p99_ms'], 3)} | "
                           f"{fmt(A['releases_per_s'] / B['releases_per_s'], 2)}x |")
    out += ["", "| fleet | clients | (allocate + release calls)/s ÷ trivial | script-only allocs/s | script-only ÷ trivial | "
            f"place script p50 / p99 ms | server µs per EVALSHA: ledger / trivial | of which Redis commands µs | "
            f"ledger calls over {SLOW_US} µs | server µs vs 16 hosts (medians) | Redis CPU %: ledger / trivial |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        L, T, S = row["ledger"], row["trivial"], row.get("script")
        star = lambda x: "" if x["server_stats_clean"] else "*"  # noqa: E731
        out.append(f"| {row['fleet']} | {row['clients']} | {fmt(L['ledger_calls_per_s'] / T['calls_per_s'], 3)} | "
                   + (f"{fmt(S['allocs_per_s'], 0)} | {fmt(S['allocs_per_s'] / T['calls_per_s'], 3)} | "
                      f"{fmt(S['a_p50_ms'], 3)} / {fmt(S['a_p99_ms'], 3)} | " if S else "- | - | - | ")
                   + f"{fmt(L['server_us_per_evalsha'], 1)}{star(L)} / {fmt(T['server_us_per_evalsha'], 1)}{star(T)} | "
                   f"{fmt(L.get('server_cmd_us_per_evalsha'), 1)} | {fmt(100 * L.get('server_slow_share', float('nan')), 1)}% | "
                   f"{fmt(row.get('scale_p50_server'), 2)}x | {fmt(L['redis_cpu_pct'], 0)} / {fmt(T['redis_cpu_pct'], 0)} |")
    out += ["", "| fleet | hosts | GPUs | cores | register s | hosts/s | destroy s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for fi in fleet_info:
        out.append(f"| {fi['fleet']} | {fi['hosts']:,} | {fi['gpus']:,} | {fi['cpu_cores']:,} | {fmt(fi['register_s'], 2)} | "
                   f"{fmt(fi['hosts'] / fi['register_s'], 0)} | {fmt(fi.get('destroy_s'), 2)} |")
    out += ["", f"Client-side Python per allocate, no Redis: request validation + ARGV "
            f"{overhead.get('request_build_us', float('nan')):.0f} µs, reply parsing "
            f"{overhead.get('reply_parse_us', float('nan')):.0f} µs.", ""]
    for row in rows:
        if len(row["runs"]) > 1:
            runs = row["runs"]
            out.append(f"- {row['fleet']}, {row['clients']} client(s), {len(runs)} runs (tables: the run with the "
                       f"median ratio, the lower middle of an even count; goals: each figure's median, likewise): "
                       f"ratio " + ", ".join(f"{x['ratio']:.3f}" for x in runs)
                       + "; allocate p99 ms " + ", ".join(f"{x['a_p99_ms']:.3f}" for x in runs)
                       + "; steady state p99 ms " + ", ".join(f"{x['steady_a_p99_ms']:.3f}" for x in runs)
                       + ("; batch ratio " + ", ".join(f"{x['batch_ratio']:.3f}" for x in runs)
                          + "; batch call p99 ms " + ", ".join(f"{x['batch_a_p99_ms']:.3f}" for x in runs)
                          + "; release_many ÷ release " + ", ".join(f"{x['batch_release_speedup']:.2f}x" for x in runs)
                          if "batch_ratio" in runs[0] else ""))
    for g in goals:
        out.append(f"- {'MET' if g['met'] else 'MISSED'}: {g['goal']} (measured {g['value']:.3f})")
    return "\n".join(out) + "\n"


# -- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per phase (default 5)")
    ap.add_argument("--clients", default="1,4", help="client process counts (default 1,4)")
    ap.add_argument("--window", type=int, default=50, help="held allocations per client (default 50)")
    ap.add_argument("--strategy", default="best_fit", help="first_fit | best_fit | worst_fit (default best_fit)")
    ap.add_argument("--fleets", default="small,openb,synthetic", help="comma list of small, openb, synthetic")
    ap.add_argument("--small-hosts", type=int, default=16)
    ap.add_argument("--synthetic-hosts", type=int, default=5000)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per synthetic host (default 8)")
    ap.add_argument("--openb-dir", default=None, help="OpenB data directory (default $ALLOCATOR_OPENB_DIR or ../shared/data/openb)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--redis-cpus", default=None,
                    help="pin the (local) Redis server to these CPUs for the run, e.g. 0 (default: leave it)")
    ap.add_argument("--client-cpus", default=None,
                    help="run this benchmark and its client processes on these CPUs, e.g. 1 (default: any)")
    ap.add_argument("--batch", type=int, default=25,
                    help="requests per Allocator.allocate_many call in the batch phase; 0 skips it (default 25: two calls per round of the default window)")
    ap.add_argument("--no-script-only", action="store_true", help="skip the diagnostic script-only phase")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each (fleet, clients) measurement; the goals are judged on the medians (default 1)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    ap.add_argument("--markdown", dest="md_path", default=None, help="write the result tables as Markdown to this file")
    args = ap.parse_args(argv)
    if not 0 <= args.batch <= MAX_CHUNK:
        ap.error(f"--batch: expected 0 (no batch phase) to {MAX_CHUNK} requests per call, got {args.batch}")

    # Ctrl-C (and SIGTERM) raise KeyboardInterrupt even when started from a script that ignores
    # SIGINT, so the namespaces are always destroyed.
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    clients_list = [int(x) for x in args.clients.split(",") if x.strip()]
    fleet_list = load_fleets([x.strip() for x in args.fleets.split(",") if x.strip()], args)
    r = redis.Redis.from_url(args.redis_url, decode_responses=True)
    server = r.info("server")
    try:
        redis_cpus = cpus.parse_cpus(args.redis_cpus, "--redis-cpus") if args.redis_cpus else None
        client_cpus = cpus.parse_cpus(args.client_cpus, "--client-cpus") if args.client_cpus else None
        server_pid = cpus.local_server_pid(r, args.redis_url) if redis_cpus else 0
    except cpus.CpuError as exc:
        ap.error(str(exc))
    placement = cpus.describe(redis_cpus, client_cpus)
    server_cpus_before = cpus.pin(server_pid, redis_cpus) if redis_cpus else None
    # The client processes are forked from this one and inherit its CPUs.
    client_cpus_before = cpus.pin(0, client_cpus) if client_cpus else None
    run_id = uuid.uuid4().hex[:8]
    live: list[Allocator] = []
    rows: list[dict[str, Any]] = []
    fleet_info: list[dict[str, Any]] = []
    overhead: dict[str, float] = {}
    console.print(f"Redis {server.get('redis_version')} at {args.redis_url}; {os.cpu_count()} CPUs; "
                  f"{args.seconds:g} s per phase; window {args.window}/client; strategy {args.strategy}; run {run_id}")
    console.print(f"CPUs: {placement}")
    t_start = time.perf_counter()
    try:
        for fi, (_key, label, hosts) in enumerate(fleet_list):
            ns = f"bench-ledger-{run_id}-{fi}"
            alloc = Allocator(redis_url=args.redis_url, namespace=ns)
            live.append(alloc)
            for name in SCRIPT_NAMES:  # loaded once, so no worker pays a NOSCRIPT round trip
                r.script_load(source(name))
            reg_s = register_fleet(alloc, label, hosts)
            info = {"fleet": label, "namespace": ns, **fleets.describe(hosts), "register_s": reg_s}
            console.print(f"[bold]{label}[/]: registered {len(hosts):,} hosts in {reg_s:.2f} s "
                          f"({len(hosts) / reg_s:,.0f} hosts/s)")
            if not overhead:
                overhead = client_overhead(alloc, args.strategy)
            for n in clients_list:
                reps = [measure(args, label, ns, n, r) for _ in range(args.repeat)]
                row = summarize_repeats(reps)
                if args.repeat > 1:
                    ratios = [x["ratio"] for x in reps]
                    console.print(f"  {n} client(s), {args.repeat} runs: ratio median {row['ratio_median']:.3f} "
                                  f"({min(ratios):.3f}-{max(ratios):.3f}), allocate p99 median "
                                  f"{row['p99_median_ms']:.3f} ms, steady state p99 median {row['steady_p99_median_ms']:.3f} ms")
                rows.append(row)
            t0 = time.perf_counter()
            info["destroyed_keys"] = alloc.destroy()
            info["destroy_s"] = time.perf_counter() - t0
            live.remove(alloc)
            fleet_info.append(info)
    except KeyboardInterrupt:
        console.print("[red]interrupted; cleaning up")
        return 130
    finally:
        for a in live:
            try:
                _destroy_until_empty(a)
            except Exception as exc:  # pragma: no cover - best effort
                console.print(f"[red]could not destroy {a.keys.namespace}: {exc}")
        if server_cpus_before is not None:
            cpus.pin(server_pid, server_cpus_before)  # the server gets its CPUs back
        if client_cpus_before is not None:
            cpus.pin(0, client_cpus_before)

    base_label = next((lbl for key, lbl, _ in fleet_list if key == "small"), None)
    big_label = next((lbl for key, lbl, _ in fleet_list if key == "synthetic"), None)
    for row in rows:
        ref = next((x for x in rows if x["fleet"] == base_label and x["clients"] == row["clients"]), None)
        if ref:
            # Judged on each fleet's median over the runs, like the other goals.
            row["scale_p50"] = row["p50_median_ms"] / ref["p50_median_ms"]
            row["scale_p50_server"] = row["server_us_median"] / ref["server_us_median"]

    print_results(rows, fleet_info, overhead)
    goals = evaluate_goals(rows, big_label, base_label)
    for g in goals:
        mark = "[green]MET[/]" if g["met"] else "[red]MISSED[/]"
        console.print(f"{mark}  {g['goal']}: {g['value']:.3f}")
    total = time.perf_counter() - t_start
    console.print(f"total {total:.0f} s")

    if args.md_path:
        Path(args.md_path).write_text(markdown(rows, fleet_info, overhead, goals))
        console.print(f"wrote {args.md_path}")
    if args.json_path:
        doc = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "redis_version": server.get("redis_version")},
            "cpus": {"redis": sorted(redis_cpus) if redis_cpus else None,
                     "clients": sorted(client_cpus) if client_cpus else None, "placement": placement},
            "fleets": fleet_info,
            "client_overhead_us": overhead,
            "results": rows,
            "goals": goals,
            "total_s": total,
        }
        Path(args.json_path).write_text(json.dumps(doc, indent=2, default=str))
        console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
