"""Replay of the OpenB trace through the real ledger and queue, on the real Redis, in virtual time.

Every task of ``../shared/data/openb/openb_pod_list_default.csv`` that ran (7,255 of 8,152: the
897 pods the trace shows deleted while still Pending never ran and have no run time) is submitted
at its (compressed) arrival time with ``Allocator.allocate(..., on_busy="queue")`` and released at
its start plus its real run time (``deletion_time - scheduled_time``). The allocator's clock is
the replay's virtual clock (``Allocator(clock=...)``), so every Lua script sees virtual time and
the replay jumps from event to event. What happened is read back from the ledger's outbox stream
(``allocated`` events give each start, ``released`` events with reason ``preempted`` the
preemptions). After a call that placed something, ``Allocator.schedule()`` runs again at the same
instant until it places nothing (what the scheduler's tick would do a moment later).

Mapping (the OpenB README): cpu_milli/1000 -> CPU cores (whole numbers pinned, fractions from the
shared pool), memory_mib -> RAM MiB, num_gpu -> GPUs; a GPU-sharing task (num_gpu 1, gpu_milli <
1000) asks for gpu_milli/1000 of 16 GiB (the smallest GPU of the fleet, so it fits on any GPU; on
a 32 GiB GPU it therefore takes a smaller share than in the trace), other GPU tasks take whole
GPUs; gpu_spec -> GPU model list; qos LS -> high, Burstable/Guaranteed -> normal, BE -> low.
Per-GPU memory of the hosts: see ``bench/fleets.py``.

What the submitter is told and tells: the task type is the task's qos and request shape
(``LS/g1x460/c6000/m12288``), what a submitter knows about its own work; no duration hint (the
trace has none) and no TTL. Duration estimates per task type are written to ``Keys.durations``
(p50/p80/mean/max of the last 200 completions, the history module's format) from tasks that have
finished earlier in the replay only. The ``best_fit_oracle`` run instead passes the true run time
as ``expected_duration`` and writes no history: an upper bound on what duration knowledge gives,
labelled as such.

Policies (each in its own namespace, same tasks, same fleet):
  fifo        strict FIFO without backfill: pass depth 1 (head-of-line blocking; see
              tests/test_replay.py) and one priority for every task (arrival order), best fit
  first_fit   strategy first_fit, pass depth 100 with EASY backfill, qos priorities
  best_fit    strategy best_fit, pass depth 100 with EASY backfill, qos priorities
  priority    strategy priority (best fit + preemption of lower-priority work), qos priorities;
              a preempted task is resubmitted at once (at the back of its priority: queued
              direct requests have no front-of-line resubmission), its work lost; its wait is
              counted to its first start
  best_fit_oracle  (with --oracle) best_fit with the true run time as the hint

Load: the fleet is every k-th host of the 1,213 (``--fleet-fraction``, model mix kept) and
arrivals are compressed by ``--compress``; the tasks created before the trace's main window
(first percentile of creation times) arrive at time 0. The offered GPU load is printed.

ETA accuracy: right after each submission (same virtual instant, after the pass it triggered)
the replay asks ``Allocator.estimated_start_time`` (the engine in allocator/eta/, on demand,
as a client would) and compares it with the task's real first start: share within
max(60 s, 20% of the task's wait), share within 10 min, median absolute error; for all tasks
(a task placed at once has its true start as estimate) and for the tasks that had to wait.

Usage:
  .venv/bin/python bench/replay.py                       # full benchmark, all policies, plots
  .venv/bin/python bench/replay.py --limit 400 --fleet-fraction 32 --no-plots
Results: JSON (``--json``), markdown table (``--markdown``), PNGs under docs/img/.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator import Allocator  # noqa: E402
from allocator.eta import EtaEngine  # noqa: E402
from bench.fleets import OPENB_GPU_MEMORY_MB, openb_dir, openb_fleet  # noqa: E402

GIB = 1024
SHARE_BASE_MB = 16 * GIB
PRIORITY = {"LS": "high", "Burstable": "normal", "Guaranteed": "normal", "BE": "low"}
BASE_S = 1_800_000_000.0
HISTORY_WINDOW = 200


@dataclass(frozen=True)
class Policy:
    name: str
    label: str
    strategy: str
    pass_depth: int = 100
    uniform_priority: bool = False
    oracle: bool = False


POLICIES = {
    "fifo": Policy("fifo", "strict FIFO, no backfill", "best_fit", pass_depth=1, uniform_priority=True),
    "first_fit": Policy("first_fit", "first_fit + backfill", "first_fit"),
    "best_fit": Policy("best_fit", "best_fit + backfill", "best_fit"),
    "priority": Policy("priority", "priority + preemption", "priority"),
    "best_fit_oracle": Policy("best_fit_oracle", "best_fit + backfill, ORACLE run times as hints", "best_fit",
                              oracle=True),
}


@dataclass
class TraceTask:
    name: str
    arrival_ms: int
    duration_ms: int
    qos: str
    priority: str
    task_type: str
    resources: dict[str, Any]
    gpu_share: float  # GPUs worth of demand (0.46 for a 46% share)


def task_type_of(row: dict[str, str]) -> str:
    g = int(row["num_gpu"] or 0)
    m = int(row["gpu_milli"] or 0)
    spec = (row.get("gpu_spec") or "").strip()
    t = f"{row['qos']}/g{g}x{m}/c{row['cpu_milli']}/m{row['memory_mib']}"
    return t + (f"/{spec}" if spec else "")


def resources_of(row: dict[str, str]) -> tuple[dict[str, Any], float]:
    g = int(row["num_gpu"] or 0)
    milli = int(row["gpu_milli"] or 0)
    spec = [s for s in (row.get("gpu_spec") or "").split("|") if s.strip()]
    r: dict[str, Any] = {"gpus": g, "cpu_cores": int(row["cpu_milli"]) / 1000, "ram_mb": int(row["memory_mib"])}
    share = float(g)
    if g == 1 and 0 < milli < 1000:
        base = min((OPENB_GPU_MEMORY_MB.get(s, SHARE_BASE_MB) for s in spec), default=SHARE_BASE_MB)
        r["gpu_memory_mb"] = math.ceil(milli / 1000 * base)
        share = milli / 1000
    if spec and g > 0:
        r["gpu_model"] = spec
    return r, share


def load_trace(directory: str | os.PathLike[str] | None = None, *, variant: str = "default", compress: float = 1.0,
               skip: int = 0, limit: int | None = None) -> list[TraceTask]:
    """Tasks that ran, by creation time; arrivals compressed and starting at 0."""
    p = openb_dir(directory) / f"openb_pod_list_{variant}.csv"
    with p.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("scheduled_time") and r.get("deletion_time")]
    rows.sort(key=lambda r: (int(r["creation_time"]), r["name"]))
    rows = rows[skip:]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        return []
    created = sorted(int(r["creation_time"]) for r in rows)
    window = created[len(created) // 100]  # the first percentile: earlier tasks arrive at 0
    out = []
    for r in rows:
        res, share = resources_of(r)
        out.append(TraceTask(
            name=r["name"], arrival_ms=round(max(0, int(r["creation_time"]) - window) * 1000 / compress),
            duration_ms=max(1, int(r["deletion_time"]) - int(r["scheduled_time"])) * 1000, qos=r["qos"],
            priority=PRIORITY.get(r["qos"], "normal"), task_type=task_type_of(r), resources=res, gpu_share=share,
        ))
    return out


def fleet_of(fraction: int, directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every ``fraction``-th OpenB host (1 = all 1,213)."""
    return openb_fleet(directory)[::max(1, fraction)]


def offered_load(tasks: list[TraceTask], hosts: list[dict[str, Any]]) -> dict[str, float]:
    """Demand over the arrival window as if every task started on arrival: mean and peak
    concurrent GPU demand (GPU shares) and CPU demand, relative to the fleet."""
    gpus = sum(len(h["gpus"]) for h in hosts)
    cores = sum(len(h["cpu_cores"]) for h in hosts)
    end = max(t.arrival_ms for t in tasks)
    ev = []
    for t in tasks:
        ev.append((t.arrival_ms, t.gpu_share, t.resources["cpu_cores"]))
        ev.append((t.arrival_ms + t.duration_ms, -t.gpu_share, -t.resources["cpu_cores"]))
    ev.sort()
    g = c = 0.0
    gi = ci = peak = 0.0
    last = 0
    for at, dg, dc in ev:
        if at > end:
            break
        gi += g * (at - last)
        ci += c * (at - last)
        last = at
        g += dg
        c += dc
        peak = max(peak, g)
    span = max(1, end)
    return {"arrival_span_s": span / 1000, "gpu_load": gi / span / gpus, "gpu_peak": peak / gpus,
            "cpu_load": ci / span / cores, "fleet_gpus": gpus, "fleet_cores": cores, "fleet_hosts": len(hosts)}


# -- one policy ------------------------------------------------------------------------------

def engine_variant(a: Allocator, spec: str) -> EtaEngine:
    """An ETA engine from a spec like ``p80``, ``p50@noprior`` or ``mean@o=0`` (overdue factor)."""
    stat, *opts = spec.split("@")
    kw: dict[str, Any] = {"stat": stat}
    for o in opts:
        if o == "noprior":
            kw["use_prior"] = False
        elif o.startswith("o="):
            kw["overdue_factor"] = float(o[2:])
        else:
            raise ValueError(f"unknown ETA variant option {o!r}")
    return EtaEngine(a, **kw)


class VirtualClock:
    def __init__(self) -> None:
        self.ms = 0

    def __call__(self) -> float:
        return BASE_S + self.ms / 1000


@dataclass
class Outcome:
    submit: int
    start: int | None = None
    eta: int | None = None  # estimate given at submit time (virtual ms)
    etas: dict[str, int | None] = field(default_factory=dict)
    at_once: bool = False
    preempted: int = 0
    finish: int | None = None


class Replay:
    def __init__(self, policy: Policy, tasks: list[TraceTask], hosts: list[dict[str, Any]], redis_url: str, *,
                 eta: bool = True, eta_stats: tuple[str, ...] = (), series_points: int = 400) -> None:
        self.p = policy
        self.tasks = tasks
        self.hosts = hosts
        self.clock = VirtualClock()
        self.ns = f"bench-replay-{uuid.uuid4().hex[:8]}-{policy.name}"
        self.a = Allocator(redis_url, namespace=self.ns, clock=self.clock, pass_depth=policy.pass_depth)
        self.eta_on = eta
        self.progress = 0
        self.max_events = 0
        self.detail = False
        self.extra_engines = {s: engine_variant(self.a, s) for s in eta_stats}
        self.out: dict[str, Outcome] = {}
        self.by_alloc: dict[str, str] = {}  # allocation id -> task name
        self.current: dict[str, str] = {}  # task name -> its live allocation id
        self.grants: dict[str, list[tuple[str, int]]] = {}
        self.cursor = "0-0"
        self.heap: list[tuple[int, int, str, str]] = []
        self._seq = 0
        self.task_of = {t.name: t for t in tasks}
        self.window_end = max((t.arrival_ms for t in tasks), default=0)
        self.hist: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=HISTORY_WINDOW))
        # GPU bookkeeping for allocation rate and fragmentation
        self.gpu_mem_total = sum(g["memory_mb"] for h in hosts for g in h["gpus"])
        self.gpu_count = sum(len(h["gpus"]) for h in hosts)
        self.holders: dict[str, int] = defaultdict(int)
        self.mem_alloc = 0
        self.busy = 0
        self.pending_gpu = 0
        self.last_t = 0
        self.integ = defaultdict(float)
        self.series: list[tuple[int, float, float, int]] = []
        self.series_points = series_points
        self.ledger_s = 0.0
        self.eta_s = 0.0
        self.eta_calls = 0
        self.placements = 0
        self.preemptions = 0
        self.lost_gpu_s = 0.0

    # -- plumbing -------------------------------------------------------------------------

    def _push(self, t: int, kind: str, ref: str) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, ref))

    def _drain(self) -> int:
        """Reads the outbox since the last call; returns how many placements it saw."""
        placed = 0
        while True:
            entries = self.a.redis.xrange(self.a.keys.events, min="(" + self.cursor, max="+", count=1000)
            if not entries:
                break
            for eid, f in entries:
                self.cursor = eid
                kind = f.get("type")
                if kind == "allocated":
                    placed += 1
                    self._on_start(f["id"], int(f["ts"]), json.loads(f.get("data") or "{}"))
                elif kind == "released":
                    data = json.loads(f.get("data") or "{}")
                    if data.get("reason") == "preempted":
                        self._on_preempted(f["id"], int(f["ts"]))
            if len(entries) < 1000:
                break
        self.a.redis.xtrim(self.a.keys.events, minid=self.cursor)
        return placed

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.ledger_s += time.perf_counter() - t0

    def _settle(self, placed: int) -> None:
        while placed:
            self._call(self.a.schedule)
            placed = self._drain()

    # -- what happens --------------------------------------------------------------------

    def _on_start(self, aid: str, ts: int, data: dict[str, Any]) -> None:
        name = self.by_alloc.get(aid)
        if name is None:
            return
        self.placements += 1
        t = self.task_of[name]
        o = self.out[name]
        vt = ts - int(BASE_S * 1000)
        if o.start is None:
            o.start = vt
        grants = [(g["uuid"], int(g["memory_mb"])) for g in data.get("gpus") or []]
        self.grants[aid] = grants
        for u, mem in grants:
            self.mem_alloc += mem
            if self.holders[u] == 0:
                self.busy += 1
            self.holders[u] += 1
        if t.resources["gpus"]:
            self.pending_gpu -= 1
        self._push(vt + t.duration_ms, "finish", aid)

    def _free(self, aid: str) -> None:
        for u, mem in self.grants.pop(aid, []):
            self.mem_alloc -= mem
            self.holders[u] -= 1
            if self.holders[u] == 0:
                self.busy -= 1

    def _on_preempted(self, aid: str, ts: int) -> None:
        name = self.by_alloc.get(aid)
        if name is None or self.current.get(name) != aid:
            return
        vt = ts - int(BASE_S * 1000)
        self.preemptions += 1
        t = self.task_of[name]
        o = self.out[name]
        o.preempted += 1
        started = self.a.get(aid)
        if started is not None and started.activated_at is not None:
            ran = vt - (int(started.activated_at.timestamp() * 1000) - int(BASE_S * 1000))
            self.lost_gpu_s += t.gpu_share * ran / 1000
        self._free(aid)
        self._resubmit.append(name)

    def _submit(self, t: TraceTask, aid: str) -> None:
        self.by_alloc[aid] = t.name
        self.current[t.name] = aid
        if t.resources["gpus"]:
            self.pending_gpu += 1
        prio = "normal" if self.p.uniform_priority else t.priority
        self._call(self.a.allocate, t.resources, on_busy="queue", allocation_id=aid, task_id=t.name,
                   task_type=t.task_type, priority=prio, strategy=self.p.strategy, ttl_seconds=None,
                   expected_duration=(t.duration_ms / 1000 if self.p.oracle else None))

    def _integrate(self, t: int) -> None:
        # Time averages cover the arrival window only: after the last arrival a few long tasks
        # (weeks, in the trace) would dominate them.
        t = min(t, self.window_end)
        dt = (t - self.last_t) / 1000
        if dt > 0:
            mem_frac = self.mem_alloc / self.gpu_mem_total if self.gpu_mem_total else 0.0
            busy_frac = self.busy / self.gpu_count if self.gpu_count else 0.0
            self.integ["time"] += dt
            self.integ["mem"] += mem_frac * dt
            self.integ["busy"] += busy_frac * dt
            if self.pending_gpu > 0:
                self.integ["wait_time"] += dt
                self.integ["wait_unalloc_mem"] += (1 - mem_frac) * dt
                self.integ["wait_idle_gpus"] += (1 - busy_frac) * dt
        self.last_t = t

    def _record_history(self, name: str, duration_ms: int) -> None:
        t = self.task_of[name]
        h = self.hist[t.task_type]
        h.append(duration_ms)
        v = sorted(h)

        def pct(q: float) -> int:
            pos = (len(v) - 1) * q
            lo, hi = math.floor(pos), math.ceil(pos)
            return round(v[lo] + (v[hi] - v[lo]) * (pos - lo))

        est = {"p50_ms": pct(0.5), "p80_ms": pct(0.8), "mean_ms": round(sum(v) / len(v)), "max_ms": v[-1],
               "n": len(v), "updated_ms": int(self.clock() * 1000)}
        self.a.redis.hset(self.a.keys.durations, t.task_type, json.dumps(est))

    def run(self) -> dict[str, Any]:
        wall0 = time.perf_counter()
        self.clock.ms = 0
        for h in self.hosts:
            self.a.register_host(h)
        self._drain()
        for t in self.tasks:
            self._push(t.arrival_ms, "arrive", t.name)
        self._resubmit: list[str] = []
        sample_every = max(1, (3 * len(self.tasks)) // self.series_points)
        n_events = 0
        try:
            while self.heap:
                t, _, kind, ref = heapq.heappop(self.heap)
                self._integrate(t)
                self.clock.ms = t
                if kind == "arrive":
                    task = self.task_of[ref]
                    self.out[ref] = Outcome(submit=t)
                    self._submit(task, ref)
                    self._settle(self._drain())
                    self._after_preemptions(t)
                    o = self.out[ref]
                    if o.start is not None:
                        o.eta, o.at_once = o.start, True
                        for s in self.extra_engines:
                            o.etas[s] = o.start
                    elif self.eta_on:
                        t0 = time.perf_counter()
                        est = self.a.estimated_start_time(ref)
                        self.eta_s += time.perf_counter() - t0
                        self.eta_calls += 1
                        o.eta = None if est is None else round(est.timestamp() * 1000) - int(BASE_S * 1000)
                        for s, eng in self.extra_engines.items():
                            ms = eng.compute_one(ref)
                            o.etas[s] = None if ms is None else ms - int(BASE_S * 1000)
                else:
                    name = self.by_alloc.get(ref)
                    if name is None or self.current.get(name) != ref or ref not in self.grants:
                        continue  # preempted meanwhile
                    self._call(self.a.release, ref)
                    self._free(ref)
                    self.out[name].finish = t
                    if not self.p.oracle:
                        self._record_history(name, self.task_of[name].duration_ms)
                    self._settle(self._drain())
                    self._after_preemptions(t)
                n_events += 1
                if self.progress and n_events % self.progress == 0:
                    pend = self.a.redis.zcard(self.a.keys.pending)
                    print(f"  [{self.p.name}] {n_events} events, t={t / 3600_000:.1f} h, {pend} pending, "
                          f"wall {time.perf_counter() - wall0:.0f} s (ledger {self.ledger_s:.0f} s, "
                          f"ETA {self.eta_s:.0f} s / {self.eta_calls})", file=sys.stderr, flush=True)
                if self.max_events and n_events >= self.max_events:
                    break
                if n_events % sample_every == 0 and t <= self.window_end:
                    self.series.append((t, self.mem_alloc / max(1, self.gpu_mem_total), self.busy / max(1, self.gpu_count),
                                        self.pending_gpu))
        finally:
            self.a.destroy()
        return self.summary(time.perf_counter() - wall0)

    def _after_preemptions(self, t: int) -> None:
        while self._resubmit:
            name = self._resubmit.pop(0)
            k = self.out[name].preempted
            self._submit(self.task_of[name], f"{name}.r{k}")
            self._settle(self._drain())

    # -- results -------------------------------------------------------------------------

    def summary(self, wall_s: float) -> dict[str, Any]:
        res: dict[str, Any] = {"policy": self.p.name, "label": self.p.label, "tasks": len(self.out)}
        waits: dict[str, list[float]] = defaultdict(list)
        for name, o in self.out.items():
            if o.start is None:
                continue
            w = (o.start - o.submit) / 1000
            waits[self.task_of[name].priority].append(w)
            waits["all"].append(w)
        res["wait"] = {k: {"n": len(v), "mean_s": statistics.fmean(v), "p95_s": _pct(v, 0.95)}
                       for k, v in waits.items() if v}
        res["never_started"] = sum(1 for o in self.out.values() if o.start is None)
        starts = [o.start for o in self.out.values() if o.start is not None]
        fins = [o.finish for o in self.out.values() if o.finish is not None]
        res["last_start_s"] = max(starts) / 1000 if starts else None
        res["makespan_s"] = max(fins) / 1000 if fins else None
        i = self.integ
        res["gpu_mem_alloc_mean"] = i["mem"] / i["time"] if i["time"] else 0.0
        res["gpu_busy_mean"] = i["busy"] / i["time"] if i["time"] else 0.0
        res["gpu_wait_time_s"] = i["wait_time"]
        res["frag_mem_unalloc_while_waiting"] = i["wait_unalloc_mem"] / i["wait_time"] if i["wait_time"] else 0.0
        res["frag_idle_gpus_while_waiting"] = i["wait_idle_gpus"] / i["wait_time"] if i["wait_time"] else 0.0
        res["placements"] = self.placements
        res["preemptions"] = self.preemptions
        res["lost_gpu_hours"] = self.lost_gpu_s / 3600
        res["ledger_s"] = self.ledger_s
        res["placements_per_s"] = self.placements / self.ledger_s if self.ledger_s else None
        res["eta_calls"] = self.eta_calls
        res["eta_ms_mean"] = 1000 * self.eta_s / self.eta_calls if self.eta_calls else None
        res["wall_s"] = wall_s
        res["eta"] = eta_accuracy([(o.submit, o.start, o.eta, o.at_once) for o in self.out.values()])
        res["eta_variants"] = list(self.extra_engines)
        for s in self.extra_engines:
            res[f"eta_{s}"] = eta_accuracy([(o.submit, o.start, o.etas.get(s), o.at_once) for o in self.out.values()])
        res["series"] = self.series
        if self.detail:
            res["detail"] = [
                {"name": n, "priority": self.task_of[n].priority, "type": self.task_of[n].task_type, "submit": o.submit,
                 "start": o.start, "eta": o.eta, "etas": o.etas, "at_once": o.at_once, "preempted": o.preempted,
                 "duration": self.task_of[n].duration_ms, "gpus": self.task_of[n].resources["gpus"]}
                for n, o in self.out.items()]
        return res


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def eta_accuracy(rows: list[tuple[int, int | None, int | None, bool]]) -> dict[str, Any]:
    """rows: (submit, actual start, estimate at submit, placed at once) in virtual ms."""

    def score(sel: list[tuple[int, int | None, int | None, bool]]) -> dict[str, Any]:
        sel = [r for r in sel if r[1] is not None]
        if not sel:
            return {"n": 0}
        hit = within10 = none = 0
        errs = []
        for submit, start, est, _ in sel:
            if est is None:
                none += 1
                continue
            err = abs(start - est) / 1000
            wait = (start - submit) / 1000
            errs.append(err)
            hit += err <= max(60.0, 0.2 * wait)
            within10 += err <= 600
        n = len(sel)
        errs_all = errs + [math.inf] * none
        return {"n": n, "within_tol": hit / n, "within_10min": within10 / n,
                "median_abs_err_s": statistics.median(errs_all) if errs_all else None, "no_estimate": none}

    return {"all": score(rows), "waited": score([r for r in rows if not r[3]])}


# -- report --------------------------------------------------------------------------------

def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    if v == math.inf:
        return "inf"
    if v >= 3600:
        return f"{v / 3600:.1f} h"
    if v >= 60:
        return f"{v / 60:.1f} min"
    return f"{v:.0f} s"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = []
    lines.append("| policy | mean wait (high / normal / low / all) | p95 wait (high / normal / low / all) | "
                 "GPU mem allocated (mean) | unallocated GPU mem while GPU tasks wait | idle GPUs while GPU tasks "
                 "wait | makespan | last start | placements/s (ledger) | preemptions |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["wait"]

        def g(k: str, f: str) -> str:
            return fmt_s(w[k][f]) if k in w else "-"

        lines.append(
            f"| {r['label']} | {g('high', 'mean_s')} / {g('normal', 'mean_s')} / {g('low', 'mean_s')} / "
            f"**{g('all', 'mean_s')}** | {g('high', 'p95_s')} / {g('normal', 'p95_s')} / {g('low', 'p95_s')} / "
            f"{g('all', 'p95_s')} | {100 * r['gpu_mem_alloc_mean']:.1f}% | "
            f"**{100 * r['frag_mem_unalloc_while_waiting']:.1f}%** | {100 * r['frag_idle_gpus_while_waiting']:.1f}% | "
            f"{fmt_s(r['makespan_s'])} | {fmt_s(r['last_start_s'])} | "
            f"{r['placements_per_s']:.0f} | {r['preemptions']} |")
    lines.append("")
    lines.append("| policy | ETA within max(60 s, 20% of wait): all tasks / tasks that waited | within 10 min: all / "
                 "waited | median abs. error: all / waited | no estimate | ETA cost per call |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        e = r["eta"]
        a, wt = e["all"], e["waited"]
        if not a.get("n") or not wt.get("n"):
            continue
        lines.append(
            f"| {r['label']} | **{100 * a['within_tol']:.1f}%** / {100 * wt.get('within_tol', 0):.1f}% (n={wt['n']}) | "
            f"{100 * a['within_10min']:.1f}% / {100 * wt.get('within_10min', 0):.1f}% | "
            f"{fmt_s(a['median_abs_err_s'])} / {fmt_s(wt.get('median_abs_err_s'))} | {wt.get('no_estimate', 0)} | "
            f"{r['eta_ms_mean'] or 0:.1f} ms |")
    for r in results:
        for s in r.get("eta_variants", []):
            e = r.get(f"eta_{s}")
            if e and e["all"].get("n") and e["waited"].get("n"):
                a, wt = e["all"], e["waited"]
                lines.append(f"| {r['label']}, engine variant {s} | {100 * a['within_tol']:.1f}% / "
                             f"{100 * wt['within_tol']:.1f}% | {100 * a['within_10min']:.1f}% / "
                             f"{100 * wt['within_10min']:.1f}% | {fmt_s(a['median_abs_err_s'])} / "
                             f"{fmt_s(wt['median_abs_err_s'])} | {wt['no_estimate']} | |")
    return "\n".join(lines) + "\n"


def can_plot() -> bool:
    """Whether matplotlib (the 'bench' extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def plots(results: list[dict[str, Any]], outdir: Path, prefix: str = "replay") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    files = []
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for r in results:
        s = r["series"]
        if not s:
            continue
        t = [x[0] / 3600_000 for x in s]
        axes[0].plot(t, [100 * x[1] for x in s], label=r["label"], linewidth=1)
        axes[1].plot(t, [x[3] for x in s], label=r["label"], linewidth=1)
    axes[0].set_ylabel("GPU memory allocated (%)")
    axes[1].set_ylabel("GPU tasks waiting")
    axes[1].set_xlabel("virtual time (h)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("OpenB replay: GPU allocation rate and queue over time")
    fig.tight_layout()
    f = outdir / f"{prefix}-allocation.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["label"] for r in results]
    for i, prio in enumerate(("high", "normal", "low")):
        vals = [r["wait"].get(prio, {}).get("mean_s", 0) / 60 for r in results]
        ax[0].bar([j + 0.27 * (i - 1) for j in range(len(results))], vals, width=0.27, label=prio)
    ax[0].set_xticks(range(len(results)))
    ax[0].set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax[0].set_ylabel("mean wait (min)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("mean wait per priority")
    ax[1].bar(range(len(results)), [100 * r["frag_mem_unalloc_while_waiting"] for r in results], color="tab:gray")
    ax[1].set_xticks(range(len(results)))
    ax[1].set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax[1].set_ylabel("% GPU memory unallocated while GPU tasks wait")
    ax[1].set_title("fragmentation")
    fig.tight_layout()
    f = outdir / f"{prefix}-wait-fragmentation.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    files.append(str(f))
    return files


def eta_error_plot(results: list[dict[str, Any]], raw: dict[str, list[tuple[int, int, int | None]]], outdir: Path,
                   prefix: str = "replay") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, rows in raw.items():
        pts = [((s - sub) / 60_000, (s - e) / 60_000) for sub, s, e in rows if e is not None and s - sub > 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, alpha=0.4, label=label)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xscale("symlog")
    ax.set_yscale("symlog")
    ax.set_xlabel("actual wait (min)")
    ax.set_ylabel("actual start - estimate at submit (min)")
    ax.set_title("ETA error of tasks that waited")
    ax.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    f = outdir / f"{prefix}-eta-error.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return str(f)


def _run_policy(job: tuple[str, list[TraceTask], list[dict[str, Any]], argparse.Namespace, tuple[str, ...]]
                ) -> tuple[dict[str, Any], list[tuple[int, int, int | None]]]:
    """One policy's replay: its summary and (submit, start, estimate) of the tasks that waited."""
    name, tasks, hosts, args, stats = job
    pol = POLICIES[name]
    r = Replay(pol, tasks, hosts, args.redis_url, eta=not args.no_eta,
               eta_stats=stats if name in (args.eta_stats_policies or "").split(",") else ())
    r.progress, r.max_events, r.detail = args.progress, args.max_events, args.detail
    res = r.run()
    return res, [(o.submit, o.start, o.eta) for o in r.out.values() if o.start is not None and not o.at_once]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    tasks = load_trace(args.openb_dir, variant=args.variant, compress=args.compress, skip=args.skip, limit=args.limit)
    hosts = fleet_of(args.fleet_fraction, args.openb_dir)
    load = offered_load(tasks, hosts)
    print(f"{len(tasks)} tasks on {len(hosts)} hosts ({load['fleet_gpus']} GPUs); arrivals compressed x{args.compress}; "
          f"offered load over {load['arrival_span_s'] / 3600:.1f} h of arrivals: GPU mean {load['gpu_load']:.2f} "
          f"(peak {load['gpu_peak']:.2f}), CPU mean {load['cpu_load']:.2f}",
          flush=True)
    results = []
    raw: dict[str, list[tuple[int, int, int | None]]] = {}
    stats = tuple(s for s in (args.eta_stats or "").split(",") if s)
    names = args.policies.split(",")
    jobs = [(name, tasks, hosts, args, stats) for name in names]
    if args.parallel > 1 and len(names) > 1:
        # Policies are independent (own namespace each): one process per policy.
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(min(args.parallel, len(names))) as pool:
            done = pool.map(_run_policy, jobs)
    else:
        done = [_run_policy(j) for j in jobs]
    for name, (res, pol_raw) in zip(names, done):
        pol = POLICIES[name]
        results.append(res)
        raw[pol.label] = pol_raw
        e = res["eta"]["all"]
        eta = ("" if args.no_eta else  # no estimates were computed: nothing to score
               f"ETA within tol {100 * e.get('within_tol', 0):.1f}% (waited {100 * res['eta']['waited'].get('within_tol', 0):.1f}%), ")
        print(f"{pol.name:16s} mean wait {fmt_s(res['wait']['all']['mean_s'])}, p95 {fmt_s(res['wait']['all']['p95_s'])}, "
              f"unalloc-while-waiting {100 * res['frag_mem_unalloc_while_waiting']:.1f}%, {eta}"
              f"{res['placements_per_s'] or 0:.0f} placements/s, wall {res['wall_s']:.0f} s", flush=True)
    meta = {"tasks": len(tasks), "compress": args.compress, "fleet_fraction": args.fleet_fraction, **load,
            "variant": args.variant, "skip": args.skip, "limit": args.limit}
    out = {"meta": meta, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    md = markdown(results, meta)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(md)
    if not args.no_plots:
        d = Path(args.img_dir)
        files = plots(results, d)
        files.append(eta_error_plot(results, raw, d))
        print("plots:", *files)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--openb-dir", default=None)
    ap.add_argument("--variant", default="default", help="default or gpuspec33")
    ap.add_argument("--policies", default="fifo,first_fit,best_fit,priority")
    ap.add_argument("--oracle", action="store_true", help="also run best_fit with the true run times as hints")
    ap.add_argument("--fleet-fraction", type=int, default=8, help="use every k-th host")
    ap.add_argument("--compress", type=float, default=10.0, help="arrival time compression factor")
    ap.add_argument("--skip", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--no-eta", action="store_true")
    ap.add_argument("--eta-stats", default="",
                    help="also score these engine variants, e.g. p50,p80,mean,p50@noprior,p50@o=0 (o = overdue factor)")
    ap.add_argument("--eta-stats-policies", default="best_fit")
    ap.add_argument("--progress", type=int, default=0, help="print progress every N events (stderr)")
    ap.add_argument("--max-events", type=int, default=0, help="stop each policy after N events (profiling)")
    ap.add_argument("--detail", action="store_true", help="per-task rows in the JSON (for analysis)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--img-dir", default=str(Path(__file__).resolve().parent.parent / "docs" / "img"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--parallel", type=int, default=1, help="replay up to N policies at once, one process each")
    args = ap.parse_args(argv)
    # Before the replay, not after it: the plots come last, and a replay takes minutes.
    if not args.no_plots and not can_plot():
        ap.error("the plots need matplotlib, which the 'bench' extra installs "
                 "(pip install -e '.[bench]'); or pass --no-plots")
    if args.oracle and "best_fit_oracle" not in args.policies:
        args.policies += ",best_fit_oracle"
    run_all(args)


if __name__ == "__main__":
    main()
