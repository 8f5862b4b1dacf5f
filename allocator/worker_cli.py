"""``allocator worker`` and ``allocator scheduler``: the per-host worker and the scheduling tick."""

from __future__ import annotations

import logging
import threading
import time

import redis
import typer

from .client import Allocator, check_redis_url
from .config import Settings
from .errors import InvalidRequest
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
    connection = redis.Redis.from_url(url)
    queue = host_queue_name(ns, host)
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
    grace: float = typer.Option(20.0, help="Seconds without heartbeat before a host is declared lost (0 = no reaper)."),
    database_url: str = typer.Option(None, envvar="ALLOCATOR_DATABASE_URL",
                                     help="History database (unset = the SQLite file in ALLOCATOR_STATE_DIR)."),
    recorder: bool = typer.Option(True, "--recorder/--no-recorder", help="Also record the outbox into the history."),
) -> None:
    """Periodic scheduling passes, TTL expiry and lost-host reclaim. Several replicas at once are
    safe: each pass and each reclaim is one atomic script."""
    settings = Settings.from_env()
    a = Allocator.from_env(**{k: v for k, v in {"redis_url": redis_url, "namespace": namespace}.items() if v})
    if not (redis_url or settings.redis_url):
        raise typer.BadParameter("a scheduler needs a shared Redis: set --redis-url or ALLOCATOR_REDIS_URL")
    stop_recorder = None
    if recorder and not once:
        from .history.recorder import start_recorder

        _, _, stop_recorder = start_recorder(a, database_url)
    try:
        run_scheduler(a, interval, threading.Event(), once=once, grace_s=grace or None)
    finally:
        if stop_recorder is not None:
            stop_recorder.set()


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
        if started >= eta_due:
            # Estimated start times for readers (allocator.eta); when computing them takes longer
            # than the interval, they are refreshed every 2x their cost instead of every tick.
            eta_started = time.monotonic()
            try:
                a.refresh_estimated_start_times()
            except redis.RedisError as exc:
                log.warning("ETA refresh failed: %s", exc)
            eta_due = started + max(interval, 2 * (time.monotonic() - eta_started))
        if once:
            return
        stop.wait(max(0.0, interval - (time.monotonic() - started)))
