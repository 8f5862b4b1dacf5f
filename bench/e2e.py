"""End-to-end benchmark: trivial RQ jobs through the allocator versus plain RQ, same worker class.

Both paths run the same no-op job (``bench.e2e.noop``, ``result_ttl=600``) on the fork worker
(``rq.Worker`` for plain RQ, ``workers.ResourceWorker`` (a ``rq.Worker`` subclass) for the
allocator), started the same way: a subprocess running this file in worker mode, which builds the
worker on ``redis.Redis.from_url(url)`` and calls ``work()``.

- plain RQ: ``rq.Queue("<ns>-plain").enqueue(...)``; worker on that queue.
- allocator: one simulated host ``bench-host`` (this machine's cores, 64 GiB RAM, 2 made-up
  16 GiB GPUs), ``Allocator.enqueue(..., resources={"cpu_cores": "0.1"})`` (placed at once while
  the host has room; the job moves to ``<ns>.host.bench-host``); ``ResourceWorker`` on that queue.

Measurements (the two paths alternate inside each round so they share the machine's noise:
latency job by job, throughput run by run with the order flipping every round; figures are
medians over rounds):

- latency: one long-lived (non-burst) worker per path, already idle (its connection is blocked in
  BLMOVE, checked with CLIENT LIST before every job). One job at a time, alternating between the
  two paths job by job (so bursts of noise hit both): latency = the job's
  ``started_at`` (set in the work horse just before the function runs; UTC) minus the wall clock
  read just before the enqueue call. p50 / p99 over ``--latency-jobs`` (after a few warm-up jobs).
- throughput: ``--jobs`` jobs are enqueued first (allocator: 0.1 core each on a 2-core host, so
  20 are placed at once and the rest wait and are placed as releases happen: the real path), then
  a burst worker, already started and imported, is told to go; jobs/s = jobs / wall time from go
  to the worker's exit (queue empty). Also: the worker-side gap between one job's ``ended_at`` and
  the next one's ``started_at`` (per-job worker overhead outside the job).

Ratios are allocator / plain measured in the same run. Goals (issue text): latency p50 and p99 at
most 1.25x plain RQ's, throughput at least 0.8x.

``--profile`` (diagnostic) instead runs a few jobs per path against a private redis-server with
MONITOR on, and counts the Redis commands per job by side (enqueuing client, worker, inside Lua
scripts), then cProfiles the burst worker's parent process.

    .venv/bin/python bench/e2e.py --json bench-e2e.json
    .venv/bin/python bench/e2e.py --profile
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import os
import platform
import pstats
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402

JOB_FUNC = "bench.e2e.noop"  # by name, so the worker imports the same function on both paths
RESULT_TTL = 600  # both paths; long enough that no job hash expires before it is counted
HOST_ID = "bench-host"
RESOURCES = {"cpu_cores": "0.1"}
GOAL_LATENCY = 1.25  # allocator latency (p50 and p99) <= 1.25 x plain RQ's
GOAL_THROUGHPUT = 0.8  # allocator jobs/s >= 0.8 x plain RQ's
WARMUP_JOBS = 5
PROBE = "e2e-probe"  # client name of the profile mode's own probes (idle checks, status polls)


def noop() -> None:
    """The trivial job."""
    return None


# -- worker mode (subprocess) ------------------------------------------------------------------

def worker_main(args: argparse.Namespace) -> int:
    """Builds the worker, says ``ready``, waits for ``go`` on stdin when asked, then works."""
    import importlib

    importlib.import_module("bench.e2e")  # the job's module, imported once in the parent (both paths)
    from rq import Worker

    from workers import ResourceWorker

    # The RQ connection is named after the worker (the idle check looks for it in CLIENT LIST; its
    # horses' connections carry the name too, on both paths). The allocator's own client is built
    # from the URL as ResourceWorker builds it by default, but unnamed, as in production; the
    # profile mode names it too, to tell the worker's commands apart.
    from allocator.client import Allocator
    from allocator.queue import parse_host_queue

    conn = redis.Redis.from_url(args.url, client_name=args.name)
    if args.worker_mode == "allocator":
        kwargs = {}
        if not args.name_all:
            ns = parse_host_queue(args.queue)[0]  # type: ignore[index]
            kwargs["allocator"] = Allocator(client=redis.Redis.from_url(args.url, decode_responses=True), namespace=ns)
        w = ResourceWorker([args.queue], connection=conn, name=args.name, **kwargs)
    else:
        w = Worker([args.queue], connection=conn, name=args.name)
    print("ready", flush=True)
    # RQ logs to stdout: send it to /dev/null (both paths) so a full pipe never blocks the worker
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    if args.wait_go:
        sys.stdin.readline()
    prof = cProfile.Profile() if args.cprofile else None
    if prof is not None:
        prof.enable()
    w.work(burst=args.burst, logging_level=args.log_level)
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.cprofile)
    return 0


class WorkerProc:
    """A worker subprocess (this file in worker mode), started the same way for both paths."""

    def __init__(self, mode: str, queue: str, name: str, url: str, *, burst: bool, wait_go: bool,
                 log_level: str, cprofile: str | None = None, name_all: bool = False) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-mode", mode, "--queue", queue,
               "--name", name, "--url", url, "--log-level", log_level]
        if burst:
            cmd.append("--burst")
        if wait_go:
            cmd.append("--wait-go")
        if cprofile:
            cmd += ["--cprofile", cprofile]
        if name_all:
            cmd.append("--name-all")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        self.name = name
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"worker {name} did not start (rc {self.proc.poll()})")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # rq: warm shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- helpers -------------------------------------------------------------------------------------

def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def parse_rq_time(raw: bytes | str | None) -> float | None:
    """RQ timestamps ('%Y-%m-%dT%H:%M:%S.%fZ', UTC) as epoch seconds."""
    if not raw:
        return None
    s = raw.decode() if isinstance(raw, bytes) else raw
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def wait_idle(raw: redis.Redis, worker_name: str, timeout: float = 20.0) -> None:
    """Until the worker's connection is blocked in BLPOP (idle, waiting for a job)."""
    deadline = time.monotonic() + timeout
    while True:
        for c in raw.client_list(_type="normal"):
            if c.get("name") == worker_name and c.get("cmd") in ("blpop", "blmove", "brpoplpush") and "b" in c.get("flags", ""):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {worker_name} not idle within {timeout} s")
        time.sleep(0.001)


def wait_done(raw: redis.Redis, job_id: str, timeout: float = 30.0, poll: float = 0.002) -> str:
    key = f"rq:job:{job_id}"
    deadline = time.monotonic() + timeout
    while True:
        st = raw.hget(key, "status")
        if st in (b"finished", b"failed", b"stopped", b"canceled"):
            return st.decode()
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not done within {timeout} s (status {st!r})")
        time.sleep(poll)


def job_times(raw: redis.Redis, ids: list[str]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(status, enqueued_at, started_at, ended_at) per job."""
    pipe = raw.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(f"rq:job:{i}", "status", "enqueued_at", "started_at", "ended_at")
    out = []
    for st, enq, start, end in pipe.execute():
        out.append(((st or b"").decode(), parse_rq_time(enq), parse_rq_time(start), parse_rq_time(end)))
    return out


class Side:
    """One side of the comparison: how to enqueue, which queue and worker class."""

    def __init__(self, kind: str, ns: str, url: str, raw: redis.Redis) -> None:
        self.kind = kind
        self.ns = ns
        self.url = url
        self.raw = raw
        if kind == "plain":
            from rq import Queue

            self.queue_name = f"{ns}-plain"
            self.q = Queue(self.queue_name, connection=redis.Redis.from_url(url))
            self.alloc = None
        else:
            from allocator.client import Allocator
            from allocator.queue import host_queue_name

            self.alloc = Allocator(client=redis.Redis.from_url(url, decode_responses=True), namespace=ns)
            self.queue_name = host_queue_name(ns, HOST_ID)
        self.seq = 0

    def new_id(self, tag: str) -> str:
        self.seq += 1
        return f"{self.ns}-{self.kind[0]}-{tag}-{self.seq:05d}"

    def enqueue(self, job_id: str) -> None:
        if self.alloc is None:
            self.q.enqueue(JOB_FUNC, job_id=job_id, result_ttl=RESULT_TTL)
        else:
            self.alloc.enqueue(JOB_FUNC, resources=RESOURCES, job_id=job_id, result_ttl=RESULT_TTL)

    def check_clean(self) -> str | None:
        """Allocator: nothing left allocated or pending after a phase."""
        if self.alloc is None:
            return None
        cap = self.alloc.capacity()
        pending = self.alloc.redis.zcard(self.alloc.keys.pending)
        if cap.active_allocations or pending:
            return f"{cap.active_allocations} active, {pending} pending"
        return None


# -- phases ----------------------------------------------------------------------------------------

def run_latency(sides: list[Side], n: int, round_no: int, log_level: str) -> dict[str, dict[str, Any]]:
    """One idle long-lived worker per side; jobs one at a time, alternating sides job by job (the
    first side flips every job) so both paths see the same moments of the machine's noise."""
    workers: dict[str, WorkerProc] = {}
    lat: dict[str, list[float]] = {p.kind: [] for p in sides}
    enq: dict[str, list[float]] = {p.kind: [] for p in sides}
    try:
        for p in sides:
            name = f"{p.ns}-lat-{p.kind}-r{round_no}"
            workers[p.kind] = WorkerProc(p.kind, p.queue_name, name, p.url, burst=False, wait_go=False,
                                         log_level=log_level)
        for i in range(WARMUP_JOBS + n):
            for p in (sides if i % 2 == 0 else sides[::-1]):
                name = workers[p.kind].name
                job_id = p.new_id(f"r{round_no}-lat")
                wait_idle(p.raw, name)
                t0 = time.time()
                p.enqueue(job_id)
                t1 = time.time()
                status = wait_done(p.raw, job_id)
                if status != "finished":
                    raise RuntimeError(f"{p.kind} job {job_id} {status}")
                started = parse_rq_time(p.raw.hget(f"rq:job:{job_id}", "started_at"))
                assert started is not None
                wait_idle(p.raw, name)  # its release (allocator) is over before the next job
                if i >= WARMUP_JOBS:
                    lat[p.kind].append(started - t0)
                    enq[p.kind].append(t1 - t0)
    finally:
        for w in workers.values():
            w.stop()
    out = {}
    for p in sides:
        L, E = lat[p.kind], enq[p.kind]
        out[p.kind] = {
            "jobs": n,
            "p50_ms": percentile(L, 50) * 1000,
            "p90_ms": percentile(L, 90) * 1000,
            "p99_ms": percentile(L, 99) * 1000,
            "mean_ms": statistics.fmean(L) * 1000,
            "enqueue_call_p50_ms": percentile(E, 50) * 1000,
            "after_enqueue_p50_ms": percentile([a - b for a, b in zip(L, E)], 50) * 1000,
            "leftover": p.check_clean(),
        }
    return out


def run_throughput(p: Side, n: int, round_no: int, log_level: str, cprofile: str | None = None,
                   name_all: bool = False) -> dict[str, Any]:
    ids = [p.new_id(f"r{round_no}-tp") for _ in range(n)]
    t0 = time.perf_counter()
    for job_id in ids:
        p.enqueue(job_id)
    enqueue_s = time.perf_counter() - t0
    name = f"{p.ns}-tp-{p.kind}-r{round_no}"
    w = WorkerProc(p.kind, p.queue_name, name, p.url, burst=True, wait_go=True, log_level=log_level, cprofile=cprofile,
                   name_all=name_all)
    try:
        t0 = time.perf_counter()
        w.go()
        rc = w.wait(timeout=600)
        wall = time.perf_counter() - t0
    finally:
        w.stop()
    times = job_times(p.raw, ids)
    statuses = Counter(t[0] for t in times)
    done = [t for t in times if t[2] is not None and t[3] is not None]
    done.sort(key=lambda t: t[2])
    gaps = [b[2] - a[3] for a, b in zip(done, done[1:])]
    runs = [t[3] - t[2] for t in done]
    span = (done[-1][3] - done[0][2]) if done else float("nan")
    return {
        "jobs": n,
        "worker_rc": rc,
        "finished": statuses.get("finished", 0),
        "statuses": dict(statuses),
        "wall_s": wall,
        "jobs_per_s": n / wall,
        "span_s": span,  # first started_at -> last ended_at
        "jobs_per_s_span": n / span if span > 0 else float("nan"),
        "enqueue_s": enqueue_s,
        "enqueues_per_s": n / enqueue_s,
        "gap_p50_ms": percentile(gaps, 50) * 1000,  # ended_at -> next started_at, worker side
        "run_p50_ms": percentile(runs, 50) * 1000,  # started_at -> ended_at, inside the horse
        "leftover": p.check_clean(),
    }


# -- profile mode ----------------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Records every command the server executes (MONITOR), with its client address."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.lines: list[dict[str, Any]] = []
        self.stop_flag = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with self.client.monitor() as m:
            self.ready.set()
            for cmd in m.listen():
                self.lines.append(cmd)
                if self.stop_flag.is_set() and "__e2e_stop__" in cmd.get("command", ""):
                    return


def profile(args: argparse.Namespace) -> int:
    from allocator import embedded

    url, proc, data_dir = embedded.start_redis_server()
    console = _console()
    try:
        raw = redis.Redis.from_url(url, client_name=PROBE)  # our probes, left out of the counts
        ns = f"bench-e2e-prof-{uuid.uuid4().hex[:6]}"
        paths = {k: Side(k, ns, url, raw) for k in ("plain", "allocator")}
        _register_host(paths["allocator"])
        result: dict[str, Any] = {"redis_url": url, "code": tree_state(), "paths": {}}
        for kind, p in paths.items():
            n = args.profile_jobs
            name = f"{ns}-prof-{kind}"
            w = WorkerProc(kind, p.queue_name, name, url, burst=False, wait_go=False, log_level=args.log_level,
                           name_all=True)
            try:
                for _ in range(3):  # warm-up (script loading, first imports)
                    jid = p.new_id("warm")
                    wait_idle(raw, name)
                    p.enqueue(jid)
                    wait_done(raw, jid)
                wait_idle(raw, name)
                bench_addrs = _client_addrs(raw, exclude_names={name, PROBE})
                mon = Monitor(url)
                mon.start()
                mon.ready.wait(5)
                time.sleep(0.1)
                marks = []
                for _ in range(n):
                    jid = p.new_id("prof")
                    wait_idle(raw, name)  # CLIENT LIST calls are ours (counted as bench overhead, removed)
                    raw.echo("__e2e_mark__")
                    p.enqueue(jid)
                    wait_done(raw, jid, poll=0.01)
                    marks.append(jid)
                wait_idle(raw, name)
                worker_addrs = _client_addrs(raw, name=name)
                probe_addrs = _client_addrs(raw, name=PROBE)
                mon.stop_flag.set()
                raw.echo("__e2e_stop__")
                mon.join(10)
            finally:
                w.stop()
            result["paths"][kind] = _count_commands(mon.lines, bench_addrs, worker_addrs, probe_addrs, n)
        # burst run: cProfile of the worker's parent process, and every command's server time
        # (SLOWLOG with a 0 µs threshold) split by who sent it
        prof_files = {}
        raw.config_set("slowlog-max-len", 1_000_000)
        for kind, p in paths.items():
            pf = str(Path(data_dir) / f"worker-{kind}.prof")
            raw.config_set("slowlog-log-slower-than", 0)
            raw.slowlog_reset()
            tp = run_throughput(p, args.profile_burst_jobs, 0, args.log_level, cprofile=pf, name_all=True)
            raw.config_set("slowlog-log-slower-than", 10000)
            entries = raw.slowlog_get(1_000_000)
            result["paths"][kind]["burst"] = {k: tp[k] for k in ("jobs_per_s", "gap_p50_ms", "run_p50_ms", "enqueues_per_s")}
            result["paths"][kind]["server_us_per_job"] = _slowlog_summary(entries, f"{ns}-tp-{kind}-r0",
                                                                         args.profile_burst_jobs)
            prof_files[kind] = pf
        for kind, pf in prof_files.items():
            st = pstats.Stats(pf)
            result["paths"][kind]["cprofile"] = _profile_summary(st, args.profile_burst_jobs)
        _print_profile(console, result)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=2, default=str))
            console.print(f"wrote {args.json_path}")
    finally:
        proc.terminate()
        proc.wait()
    return 0


def _client_addrs(raw: redis.Redis, *, name: str | None = None, exclude_names: set[str] | None = None) -> set[str]:
    out = set()
    for c in raw.client_list():
        if name is not None and c.get("name") != name:
            continue
        if exclude_names and c.get("name") in exclude_names:
            continue
        out.add(c["addr"])
    return out


def _count_commands(lines: list[dict[str, Any]], bench: set[str], worker: set[str], probes: set[str], n: int) -> dict[str, Any]:
    """Commands per job: by the enqueuing client, by the worker parent, by short-lived worker
    connections (the work horses), and inside Lua scripts; our own probes are left out."""
    sides: dict[str, Counter[str]] = {"enqueue client": Counter(), "worker parent": Counter(),
                                       "work horse": Counter(), "inside Lua": Counter()}
    started = False
    for ln in lines:
        cmd = ln.get("command", "")
        if "__e2e_mark__" in cmd:
            started = True
            continue
        if not started or "__e2e_stop__" in cmd:
            continue
        name = cmd.split(" ", 1)[0].upper()
        if ln.get("client_type") == "lua":
            sides["inside Lua"][name] += 1
            continue
        addr = f"{ln.get('client_address')}:{ln.get('client_port')}"
        if addr in bench:
            sides["enqueue client"][name] += 1
        elif addr in worker:
            sides["worker parent"][name] += 1
        elif addr not in probes:
            sides["work horse"][name] += 1
    return {
        "jobs": n,
        "per_job": {s: round(sum(c.values()) / n, 2) for s, c in sides.items()},
        "by_command": {s: {k: round(v / n, 2) for k, v in c.most_common()} for s, c in sides.items()},
    }


def _slowlog_summary(entries: list[dict[str, Any]], worker_name: str, n: int) -> dict[str, Any]:
    """Server µs per job by side (worker / enqueue client) and by command (EVALSHA by script)."""
    import hashlib

    from allocator.scripts import SCRIPT_NAMES, source

    names = {}
    for name in SCRIPT_NAMES:
        try:
            names[hashlib.sha1(source(name).encode()).hexdigest()] = name
        except (FileNotFoundError, OSError):
            pass
    out: dict[str, Counter[str]] = {"worker": Counter(), "enqueue client": Counter(), "inside Lua": Counter()}
    calls: dict[str, Counter[str]] = {"worker": Counter(), "enqueue client": Counter(), "inside Lua": Counter()}
    for e in entries:
        cmd = e["command"].decode(errors="replace") if isinstance(e["command"], bytes) else str(e["command"])
        parts = cmd.split(" ")
        op = parts[0].upper()
        if op in ("SLOWLOG", "CONFIG", "CLIENT"):
            continue
        if op == "EVALSHA" and len(parts) > 1:
            op = "EVALSHA " + names.get(parts[1].lower(), parts[1][:8])
        cname = e.get("client_name") or b""
        cname = cname.decode() if isinstance(cname, bytes) else str(cname)
        addr = e.get("client_address") or b""
        addr = addr.decode() if isinstance(addr, bytes) else str(addr)
        if cname == PROBE:
            continue
        # commands run by a script are logged too (address ?:0); their time is part of the
        # script's EVALSHA, so "inside Lua" is a breakdown, not an addition
        side = "inside Lua" if addr == "?:0" else "worker" if cname == worker_name else "enqueue client"
        out[side][op] += int(e["duration"])
        calls[side][op] += 1
    return {side: {"total_us": round(sum(c.values()) / n, 1),
                   "by_command": {k: {"us": round(v / n, 1), "calls": round(calls[side][k] / n, 2)}
                                  for k, v in c.most_common(12)}}
            for side, c in out.items()}


def _profile_summary(st: pstats.Stats, n: int) -> list[dict[str, Any]]:
    """Cumulative ms per job in the worker parent: every function of ``workers/`` and
    ``allocator/``, and RQ's main per-job steps."""
    rq_steps = ("execute_job", "fork_work_horse", "monitor_work_horse", "prepare_execution",
                "dequeue_job_and_maintain_ttl", "heartbeat", "get_status")
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():  # type: ignore[attr-defined]
        ours = ("/workers/" in file or "/allocator/" in file) and "site-packages" not in file
        if ours or ("/rq/" in file and fn in rq_steps) or ("redis/client.py" in file and fn == "execute_command"):
            if nc / n < 0.5 or fn.startswith("<"):
                continue  # one-off start-up work
            rows.append({"function": f"{Path(file).parent.name}/{Path(file).name}:{line} {fn}", "calls_per_job": round(nc / n, 2),
                         "cum_ms_per_job": round(ct / n * 1000, 3)})
    rows.sort(key=lambda r: -r["cum_ms_per_job"])
    return rows[:30]


def _print_profile(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="Redis commands per job (MONITOR, private redis-server)")
    t.add_column("side")
    for kind in result["paths"]:
        t.add_column(kind, justify="right")
    sides = list(next(iter(result["paths"].values()))["per_job"])
    for s in sides:
        t.add_row(s, *[str(result["paths"][k]["per_job"][s]) for k in result["paths"]])
    t.add_row("total", *[str(round(sum(result["paths"][k]["per_job"].values()), 2)) for k in result["paths"]])
    console.print(t)
    for kind, r in result["paths"].items():
        console.print(f"[bold]{kind}[/] by command: " + json.dumps(r["by_command"]))
        console.print(f"[bold]{kind}[/] burst: {r['burst']}")
        console.print(f"[bold]{kind}[/] burst, Redis server µs per job: " + json.dumps(r["server_us_per_job"]))
        pt = Table(title=f"{kind}: worker parent cProfile (ms per job, cumulative)")
        pt.add_column("function")
        pt.add_column("calls/job", justify="right")
        pt.add_column("ms/job", justify="right")
        for row in r["cprofile"]:
            pt.add_row(row["function"], str(row["calls_per_job"]), str(row["cum_ms_per_job"]))
        console.print(pt)


# -- main -------------------------------------------------------------------------------------------

def _console() -> Any:
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _register_host(p: Side) -> None:
    assert p.alloc is not None
    p.alloc.register_host(id=HOST_ID, cpu_cores=sorted(os.sched_getaffinity(0)), ram_mb="64Gi",
                          gpus=[{"index": 0, "uuid": "GPU-bench-0000-0000", "model": "T4", "memory_mb": "16Gi"},
                                {"index": 1, "uuid": "GPU-bench-0000-0001", "model": "T4", "memory_mb": "16Gi"}])


def _cleanup(raw: redis.Redis, ns: str, paths: dict[str, Side]) -> int:
    n = 0
    for p in paths.values():
        if p.alloc is not None:
            n += p.alloc.destroy()
    for key in raw.scan_iter(match=f"rq:*{ns}*", count=1000):
        n += raw.delete(key)
    time.sleep(0.5)  # a work horse of a killed worker may still write its result
    for key in raw.scan_iter(match=f"rq:*{ns}*", count=1000):
        n += raw.delete(key)
    for s in (b"rq:queues", b"rq:workers"):
        members = [m for m in raw.smembers(s) if ns.encode() in m]
        if members:
            raw.srem(s, *members)
    return n


def tree_state() -> dict[str, Any]:
    """Which code was measured: git HEAD, whether the allocator/worker sources differ from it, and
    a digest of those sources (other people may be editing the tree while benchmarks run)."""
    import hashlib

    h = hashlib.sha1()
    files = sorted([*REPO_ROOT.glob("allocator/**/*.py"), *REPO_ROOT.glob("allocator/lua/**/*.lua"),
                    *REPO_ROOT.glob("workers/*.py")])
    for f in files:
        h.update(str(f.relative_to(REPO_ROOT)).encode())
        h.update(f.read_bytes())
    out: dict[str, Any] = {"sources_sha1": h.hexdigest()[:12]}
    try:
        out["head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                     text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "allocator", "workers"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.split("\n")
        out["dirty"] = sorted(x[3:] for x in dirty if x.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300, help="jobs per throughput run (default 300)")
    ap.add_argument("--latency-jobs", type=int, default=100, help="jobs per latency run (default 100)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; both paths run in each (default 3)")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL") or "redis://127.0.0.1:6379/0")
    ap.add_argument("--log-level", default="INFO", help="worker logging level, both paths (default INFO)")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    ap.add_argument("--profile", action="store_true", help="diagnostic: Redis commands per job and worker cProfile")
    ap.add_argument("--profile-jobs", type=int, default=30)
    ap.add_argument("--profile-burst-jobs", type=int, default=200)
    # worker mode (internal)
    ap.add_argument("--worker-mode", choices=["plain", "allocator"], help=argparse.SUPPRESS)
    ap.add_argument("--queue", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--burst", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cprofile", help=argparse.SUPPRESS)
    ap.add_argument("--name-all", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_mode:
        return worker_main(args)
    if args.profile:
        return profile(args)

    from rich.table import Table

    console = _console()

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    raw = redis.Redis.from_url(args.redis_url)
    server = raw.info("server")
    ns = f"bench-e2e-{uuid.uuid4().hex[:8]}"
    paths = {"allocator": Side("allocator", ns, args.redis_url, raw), "plain": Side("plain", ns, args.redis_url, raw)}
    tree = tree_state()
    console.print(f"Redis {server.get('redis_version')} at {args.redis_url}; {os.cpu_count()} CPUs; namespace {ns}; "
                  f"{args.rounds} rounds x ({args.latency_jobs} latency + {args.jobs} throughput jobs) per path; "
                  f"code {tree.get('head', '?')} sources {tree['sources_sha1']}"
                  + (f" (uncommitted: {len(tree.get('dirty', []))} files)" if tree.get("dirty") else ""))
    rounds: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        _register_host(paths["allocator"])
        for r in range(1, args.rounds + 1):
            order = ["allocator", "plain"] if r % 2 else ["plain", "allocator"]
            rec: dict[str, Any] = {"round": r, "order": order, "latency": {}, "throughput": {},
                                   "loadavg_1m_before": os.getloadavg()[0]}
            with console.status(f"round {r}: latency, both paths job by job"):
                rec["latency"] = run_latency([paths[k] for k in order], args.latency_jobs, r, args.log_level)
            for kind in order[::-1]:  # the other path goes first for throughput
                with console.status(f"round {r}: {kind} throughput"):
                    rec["throughput"][kind] = run_throughput(paths[kind], args.jobs, r, args.log_level)
            L, T = rec["latency"], rec["throughput"]
            for k in ("allocator", "plain"):
                console.print(f"round {r} {k:9}: latency p50 {L[k]['p50_ms']:.2f} ms p99 {L[k]['p99_ms']:.2f} ms; "
                              f"{T[k]['jobs_per_s']:.1f} jobs/s ({T[k]['finished']}/{T[k]['jobs']} finished, "
                              f"gap p50 {T[k]['gap_p50_ms']:.2f} ms)"
                              + (f" [red]leftover: {L[k]['leftover'] or T[k]['leftover']}" if (L[k]['leftover'] or T[k]['leftover']) else ""))
            rounds.append(rec)
    except KeyboardInterrupt:
        console.print("[red]interrupted; cleaning up")
        return 130
    finally:
        deleted = _cleanup(raw, ns, paths)
        console.print(f"cleaned up {deleted} keys")

    def series(section: str, kind: str, field: str) -> list[float]:
        return [rec[section][kind][field] for rec in rounds]

    summary: dict[str, Any] = {}
    metrics = [("latency", "p50_ms"), ("latency", "p99_ms"), ("latency", "p90_ms"), ("latency", "enqueue_call_p50_ms"),
               ("latency", "after_enqueue_p50_ms"), ("throughput", "jobs_per_s"), ("throughput", "jobs_per_s_span"),
               ("throughput", "gap_p50_ms"), ("throughput", "run_p50_ms"), ("throughput", "enqueues_per_s")]
    for section, field in metrics:
        a, b = med(series(section, "allocator", field)), med(series(section, "plain", field))
        per_round = [x / y for x, y in zip(series(section, "allocator", field), series(section, "plain", field))]
        summary[f"{section}.{field}"] = {"allocator": a, "plain": b, "ratio": a / b, "ratio_per_round": per_round}
    goals = [
        {"goal": f"latency p50 <= {GOAL_LATENCY}x plain RQ", "ratio": summary["latency.p50_ms"]["ratio"]},
        {"goal": f"latency p99 <= {GOAL_LATENCY}x plain RQ", "ratio": summary["latency.p99_ms"]["ratio"]},
        {"goal": f"throughput >= {GOAL_THROUGHPUT}x plain RQ", "ratio": summary["throughput.jobs_per_s"]["ratio"]},
    ]
    goals[0]["met"] = goals[0]["ratio"] <= GOAL_LATENCY
    goals[1]["met"] = goals[1]["ratio"] <= GOAL_LATENCY
    goals[2]["met"] = goals[2]["ratio"] >= GOAL_THROUGHPUT

    t = Table(title=f"End to end, median of {len(rounds)} rounds (allocator / plain RQ, same run)")
    t.add_column("metric")
    t.add_column("plain RQ", justify="right")
    t.add_column("allocator", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("per round", justify="right")
    labels = {"latency.p50_ms": "latency p50 (ms)", "latency.p99_ms": "latency p99 (ms)", "latency.p90_ms": "latency p90 (ms)",
              "latency.enqueue_call_p50_ms": "  enqueue call p50 (ms)", "latency.after_enqueue_p50_ms": "  enqueue return -> started p50 (ms)",
              "throughput.jobs_per_s": "throughput (jobs/s)", "throughput.jobs_per_s_span": "  jobs/s, first start -> last end",
              "throughput.gap_p50_ms": "  worker gap between jobs p50 (ms)", "throughput.run_p50_ms": "  started -> ended p50 (ms)",
              "throughput.enqueues_per_s": "enqueue rate (jobs/s)"}
    for key, label in labels.items():
        s = summary[key]
        t.add_row(label, f"{s['plain']:.2f}", f"{s['allocator']:.2f}", f"{s['ratio']:.2f}x",
                  " ".join(f"{x:.2f}" for x in s["ratio_per_round"]))
    console.print(t)
    for g in goals:
        console.print(f"{'[green]MET[/]' if g['met'] else '[red]MISSED[/]'}  {g['goal']}: {g['ratio']:.2f}x")
    total = time.perf_counter() - t_start
    console.print(f"total {total:.0f} s")
    if args.json_path:
        import rq

        doc = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: v for k, v in vars(args).items() if v is not None and k not in ("burst", "wait_go")},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "redis_version": server.get("redis_version"), "rq_version": rq.__version__},
            "namespace": ns,
            "code": tree,
            "rounds": rounds,
            "summary": summary,
            "goals": goals,
            "total_s": total,
        }
        Path(args.json_path).write_text(json.dumps(doc, indent=2, default=str))
        console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
