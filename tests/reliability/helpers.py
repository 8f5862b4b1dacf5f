"""Real processes for the fault tests: agents, workers and schedulers started as ``python -m
allocator ...`` (exactly what an operator runs), each with its output in a log file the tests
read back (to find credentials, and to explain a failure), plus a continuous invariant checker
and small polling helpers. No sleeps that race: every wait polls a condition with a deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

from allocator import Allocator
from allocator.invariants import check

ROOT = Path(__file__).resolve().parents[2]

# Short timings so every fault plays out in seconds (production defaults: heartbeat 5 s,
# grace 20 s, reaper pass 2 s, scheduler tick 1 s).
HEARTBEAT_S = 0.2
GRACE_S = 1.5
TICK_S = 0.1


def wait_for(pred: Callable[[], Any], timeout: float = 40.0, step: float = 0.02, what: str = "condition") -> Any:
    """Polls ``pred`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(step)


def hold(pred: Callable[[], Any], seconds: float, step: float = 0.05, what: str = "condition") -> None:
    """Asserts ``pred`` stays truthy for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), f"{what} stopped holding"
        time.sleep(step)


def host_entry(host_id: str, *, cores: int = 4, ram: str = "16Gi", gpus: int = 1, gpu_mem: str = "16Gi") -> dict[str, Any]:
    return {"id": host_id, "cpu_cores": cores, "ram_mb": ram,
            "gpus": [{"index": i, "model": "T4", "memory_mb": gpu_mem} for i in range(gpus)]}


def write_inventory(path: Path, hosts: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False), encoding="utf-8")
    return path


class Procs:
    """Starts and cleans up the processes of one test; every process logs to its own file."""

    def __init__(self, log_dir: Path, redis_url: str, namespace: str) -> None:
        self.log_dir = log_dir
        self.redis_url = redis_url
        self.namespace = namespace
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_REDIS_URL": self.redis_url,
               "ALLOCATOR_NAMESPACE": self.namespace, "PYTHONUNBUFFERED": "1"}
        env.pop("ALLOCATOR_DATABASE_URL", None)
        env.update(extra)
        return env

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, "-m", "allocator", *args], cwd=ROOT, env=env or self.env(),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def agent(self, inventory: Path, name: str = "agent", *extra: str) -> subprocess.Popen[bytes]:
        return self.start(name, "agent", "--inventory", str(inventory), "--interval", str(HEARTBEAT_S),
                          "--orphan-check", str(HEARTBEAT_S), "--log-level", "INFO", *extra)

    def worker(self, host: str, name: str | None = None, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(name or f"worker-{host}", "worker", "--host", host, *extra)

    def scheduler(self, name: str = "scheduler", *extra: str, database_url: str | None = None, grace: float = GRACE_S,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = ["scheduler", "--interval", str(TICK_S), "--grace", str(grace)]
        args += ["--database-url", database_url] if database_url else ["--no-recorder"]
        return self.start(name, *args, *extra, env=env)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                for proc in _tree(p.pid):
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def signal_tree(pid: int, sig: int) -> list[int]:
    """Sends ``sig`` to a process and all its descendants (a worker and its work horse, which
    runs in a process group of its own). Returns the pids signalled."""
    done = []
    for proc in _tree(pid):
        try:
            proc.send_signal(sig)
            done.append(proc.pid)
        except psutil.Error:
            pass
    return done


class InvariantWatch:
    """Checks the ledger invariants continuously (one atomic snapshot every ``every_s``) in a
    thread while a fault plays out; ``violations`` collects what it saw."""

    def __init__(self, a: Allocator, every_s: float = 0.05) -> None:
        self.a = Allocator(client=a.redis, namespace=a.keys.namespace)
        self.every_s = every_s
        self.checks = 0
        self.errors = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                bad = check(self.a.snapshot())
                self.checks += 1
                self.violations.extend(bad)
            except redis.RedisError:  # Redis restarting: nothing to check this time
                self.errors += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> InvariantWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


@contextmanager
def watching(a: Allocator) -> Iterator[InvariantWatch]:
    """``with watching(a) as w:`` ... then ``w.violations`` must be empty."""
    w = InvariantWatch(a)
    with w:
        yield w
    assert w.checks > 0, "the invariant checker never ran"
    assert w.violations == [], w.violations[:10]


def logical_dump(r: redis.Redis, match: str = "*") -> dict[str, Any]:
    """Every key without a TTL and its content, read by type (so two servers, or one server
    before and after an AOF reload, compare equal when they hold the same data), plus each
    stream's consumer groups (last delivered id, pending count). ``r`` must not decode
    responses: RQ's job hashes hold compressed pickles."""
    out: dict[str, Any] = {}
    for key in sorted(r.scan_iter(match=match, count=1000)):
        if r.pttl(key) != -1:
            continue  # heartbeat-style keys that expire on their own
        t = r.type(key).decode()
        if t == "hash":
            v: Any = r.hgetall(key)
        elif t == "zset":
            v = r.zrange(key, 0, -1, withscores=True)
        elif t == "set":
            v = sorted(r.smembers(key))
        elif t == "list":
            v = r.lrange(key, 0, -1)
        elif t == "stream":
            groups = sorted((g["name"], g["last-delivered-id"], g["pending"]) for g in r.xinfo_groups(key))
            v = {"entries": r.xrange(key), "groups": groups}
        else:
            v = r.get(key)
        out[key] = (t, v)
    return out


def ledger_dump(a: Allocator) -> dict[bytes, bytes]:
    """Every key of the namespace with its DUMP (``tests.conftest.ledger_dump``), less the API's
    metrics counters (``api_stats``: the API counts refused requests on purpose)."""
    from ..conftest import ledger_dump as dump_all

    skip = a.keys.api_stats.encode()
    return {k: v for k, v in dump_all(a).items() if k != skip}


def assert_consistent(a: Allocator) -> None:
    bad = check(a.snapshot())
    assert bad == [], bad[:10]


def runs(log_dir: Path, label: str) -> list[dict[str, Any]]:
    """The runs ``jobs.record_run`` logged for ``label`` (one dict per start or end line)."""
    path = log_dir / f"{label}.runs"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def starts(log_dir: Path, label: str) -> list[dict[str, Any]]:
    return [r for r in runs(log_dir, label) if r["event"] == "start"]


def ends(log_dir: Path, label: str) -> list[dict[str, Any]]:
    return [r for r in runs(log_dir, label) if r["event"] == "end"]


def alloc_state(a: Allocator, aid: str) -> tuple[str | None, str | None, str | None]:
    state, host, reason = a.redis.hmget(a.keys.alloc(aid), "state", "host", "reason")
    return state, host, reason


def events_of(a: Allocator, aid: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Outbox entries about ``aid`` (the tests keep the stream with a group that never acks)."""
    out = []
    for sid, f in a.redis.xrange(a.keys.events):
        if f.get("id") == aid and (kind is None or f.get("type") == kind):
            out.append({"stream_id": sid, **f, "data": json.loads(f.get("data") or "{}")})
    return out


def events_by_id(a: Allocator) -> dict[str, list[dict[str, Any]]]:
    """Every outbox entry, grouped by the allocation (or host) id it is about, in stream order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sid, f in a.redis.xrange(a.keys.events):
        out.setdefault(f.get("id", ""), []).append({"stream_id": sid, **f, "data": json.loads(f.get("data") or "{}")})
    return out


def keep_stream(a: Allocator) -> None:
    """A consumer group that never acknowledges: the recorder's trim keeps every entry, so the
    test can list everything that was produced."""
    try:
        a.redis.xgroup_create(a.keys.events, "audit", id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
