"""``allocator worker`` and ``allocator scheduler``: the per-host worker and the scheduling tick."""

from __future__ import annotations

import logging
import signal
import threading
import time

import redis
import typer

from .cli_common import log_level, reporting, require_positive
from .client import Allocator, check_namespace, check_redis_url
from .config import Settings
from .errors import InvalidRequest
from .models import check_id_format
from .queue import host_queue_name

REDIS_URL_HELP = "Redis URL (ALLOCATOR_REDIS_URL)."


def worker(
    host: str = typer.Option(..., "--host", help="Host id whose queue to work on."),
    num_workers: int = typer.Option(1, "-n", "--num-workers", min=1, help="Worker processes (tasks at once)."),
    burst: bool = typer.Option(False, "--burst", help="Quit when the host queue is empty."),
    redis_url: str = typer.Option(None, envvar="ALLOCATOR_REDIS_URL", help=REDIS_URL_HELP),
    namespace: str = typer.Option(None, envvar="ALLOCATOR_NAMESPACE", help="Key namespace (default alloc)."),
    logging_level: str = typer.Option("INFO", help="Log level."),
) -> None:
    """Run RQ workers on HOST's queue; each job runs inside its grant and is released after."""
    from rq.worker_pool import WorkerPool

    from workers import ResourceWorker

    settings = Settings.from_env()
    url = redis_url or settings.redis_url
    if not url:
        raise typer.BadParameter("a worker needs a shared Redis: set --redis-url or ALLOCATOR_REDIS_URL")
    ns = namespace or settings.namespace
    try:
        check_redis_url(url)
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.reason, param_hint="--redis-url") from None
    try:
        check_namespace(ns)
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.reason, param_hint="--namespace") from None
    try:
        check_id_format(host, "host")  # a host id no registration takes would name a queue no task reaches
    except InvalidRequest as exc:
        raise typer.BadParameter(exc.reason, param_hint="--host") from None
    logging_level = log_level(logging_level, "--logging-level")
    connection = redis.Redis.from_url(url)
    queue = host_queue_name(ns, host)
    with reporting(url=url):
        connection.ping()  # an unreachable Redis: one line and exit 1, not a traceback from RQ
    if num_workers == 1:
        ResourceWorker([queue], connection=connection).work(burst=burst, logging_level=logging_level)
        return
    pool = WorkerPool([queue], connection=connection, num_workers=num_workers, worker_class=ResourceWorker)
    pool.start(burst=burst, logging_level=logging_level)


def scheduler(
    interval: float = typer.Option(1.0, help="Seconds between scheduling passes."),
    redis_url: str = typer.Option(None, envvar="ALLOCATOR_REDIS_URL", help=REDIS_URL_HELP),
    namespace: str = typer.Option(None, envvar="ALLOCATOR_NAMESPACE", help="Key namespace (default alloc)."),
    once: bool = typer.Option(False, "--once", help="Run one pass and exit."),
    grace: float = typer.Option(20.0, envvar="ALLOCATOR_HOST_GRACE_S",
                                help="Seconds without heartbeat before a host is declared lost (0 = no reaper)."),
    database_url: str = typer.Option(None, envvar="ALLOCATOR_DATABASE_URL",
                                     help="History database (unset = the SQLite file in ALLOCATOR_STATE_DIR)."),
    recorder: bool = typer.Option(True, "--recorder/--no-recorder", help="Also record the outbox into the history."),
) -> None:
    """Periodic scheduling passes, TTL expiry and lost-host reclaim. Several replicas at once are
    safe: each pass and each reclaim is one atomic script."""
    settings = Settings.from_env()
    require_positive(interval, "--interval")
    require_positive(grace, "--grace", zero_means="no reaper")
    if not (redis_url or settings.redis_url):  # (before any Allocator: one without a URL starts a private server)
        raise typer.BadParameter("a scheduler needs a shared Redis: set --redis-url or ALLOCATOR_REDIS_URL")
    a = Allocator.from_env(**{k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v})
    if once:
        with reporting(url=redis_url or settings.redis_url):
            a.redis.ping()  # --once reports an unreachable Redis (exit 1) instead of a failed pass
    stop = threading.Event()
    if not once:  # SIGTERM ends the loop like Ctrl-C, so the recorder leaves its consumer group cleanly
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if recorder and not once and database_url:
        from .history.db import resolve_url

        try:
            resolve_url(database_url)  # no URL: refused now (an unreachable database is retried)
        except InvalidRequest as exc:
            raise typer.BadParameter(exc.reason, param_hint="--database-url") from None
    recording = _start_recorder_when_possible(a, database_url) if recorder and not once else None
    try:
        run_scheduler(a, interval, stop, once=once, grace_s=grace or None)
    except KeyboardInterrupt:
        pass
    finally:
        if recording is not None:
            recording[0].set()
            recording[1].join(15)


def _start_recorder_when_possible(a: Allocator, database_url: str | None) -> tuple[threading.Event, threading.Thread]:
    """Runs the history recorder in this process, opening its database in the background and
    retrying while it cannot (Postgres away): scheduling must not wait for the history, and the
    outbox keeps what the recorder has not written. Set the event to stop it; join the thread to
    let it leave its consumer group."""
    from .history.recorder import start_recorder

    log = logging.getLogger("allocator.scheduler")
    done = threading.Event()

    def run() -> None:
        delay = 1.0
        while not done.is_set():
            try:
                _, thread, stop = start_recorder(a, database_url)
            except Exception as exc:  # the database, its schema or its driver: say so, try again later
                log.error("history recorder not started (%s: %s); trying again in %.0f s", type(exc).__name__, exc, delay)
                done.wait(delay)
                delay = min(2 * delay, 60.0)
                continue
            done.wait()
            stop.set()
            thread.join(10)
            return

    t = threading.Thread(target=run, name="recorder-start", daemon=True)
    t.start()
    return done, t


def run_scheduler(a: Allocator, interval: float, stop: threading.Event, *, once: bool = False,
                  grace_s: float | None = 20.0) -> None:
    """The scheduler loop: reclaim lost hosts, expire leases, then place what fits; until ``stop``."""
    from .agent.reaper import reap_lost_hosts

    log = logging.getLogger("allocator.scheduler")
    eta_due = 0.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            if grace_s:
                reap_lost_hosts(a, grace_s)
            expired = a.expire()
            placed = a.schedule()
            if expired or placed:
                log.info("expired %d, placed %d", len(expired), len(placed))
        except redis.RedisError as exc:
            log.warning("scheduling pass failed: %s", exc)
        except Exception:  # one bad pass must not end the scheduler: passes, expiry and reclaim stop with it
            log.exception("scheduling pass failed unexpectedly")
        if started >= eta_due:
            # Estimated start times for readers (allocator.eta); when computing them takes longer
            # than the interval, they are refreshed every 2x their cost instead of every tick.
            eta_started = time.monotonic()
            try:
                a.refresh_estimated_start_times()
            except redis.RedisError as exc:
                log.warning("ETA refresh failed: %s", exc)
            except Exception:
                log.exception("ETA refresh failed unexpectedly")
            eta_due = started + max(interval, 2 * (time.monotonic() - eta_started))
        if once:
            return
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
