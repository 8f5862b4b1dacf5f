"""Typer commands ``allocator agent``, ``allocator hosts`` and ``allocator reaper``.

``register(app)`` adds them to the main CLI (``allocator/cli.py``). Exit codes follow the rest of
the CLI: 2 for invalid input (a malformed inventory file, a bad label), 1 for other failures.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..cli_common import log_level as check_log_level
from ..cli_common import open_allocator, print_json, reporting, require_positive
from ..client import Allocator
from ..config import Settings
from ..errors import InvalidRequest
from ..models import MAX_SECONDS, HostSpec, check_id_format, parse
from ..services import ServiceCatalog
from .daemon import DEFAULT_DRAIN_TIMEOUT_S, DEFAULT_GRANULARITY_MB, DEFAULT_INTERVAL_S, Agent
from .hosts import host_rows
from .orphans import DEFAULT_ORPHAN_CHECK_S
from .providers import InventoryProvider, LocalProvider
from .reaper import DEFAULT_GRACE_S, DEFAULT_REAPER_INTERVAL_S, run_reaper
from .static import StaticProvider
from .watchdog import Watchdog

console = Console()
err = Console(stderr=True)

REDIS_HELP = "Redis URL of the fleet's ledger (required: an agent on a private Redis serves no one)."


def parse_labels(values: list[str] | None) -> dict[str, str]:
    """``["cluster=a,zone=z1", "rack=r7"]`` -> {"cluster": "a", "zone": "z1", "rack": "r7"}."""
    out: dict[str, str] = {}
    for v in values or []:
        for part in v.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise InvalidRequest("labels", f"{part!r} is not key=value")
            k, val = part.split("=", 1)
            if not k.strip():
                raise InvalidRequest("labels", f"{part!r} has an empty key")
            out[k.strip()] = val.strip()
    return out


def _allocator(redis_url: str | None, namespace: str | None) -> Allocator:
    """The agent's and the reaper's Allocator, with the operator's settings (pass depth, scan cap,
    record retention) applied to the passes and releases they run, as in every other process."""
    try:
        s = Settings.from_env()
        url = redis_url or s.redis_url
        if not url:
            err.print("[red]error:[/] no Redis URL: pass --redis-url or set ALLOCATOR_REDIS_URL")
            raise typer.Exit(2)
        return Allocator.from_env(redis_url=url, namespace=namespace or s.namespace)
    except InvalidRequest as exc:  # a malformed URL or setting
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None


def _serve_metrics(port: int) -> None:
    """Prometheus metrics on ``port`` (0: none); a port in use or not allowed is one line, exit 1."""
    if not port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port)
    except OSError as exc:
        err.print(f"[red]error:[/] --metrics-port {port}: cannot listen there: {escape(exc.strerror or str(exc))}")
        raise typer.Exit(1) from None


def _signals(stop: threading.Event, abort: threading.Event) -> None:
    """First SIGTERM/SIGINT: stop (drain, then deregister). Second: stop waiting for running work."""

    def handler(signum: int, _frame: object) -> None:
        (abort if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def agent_command(
    inventory: Optional[str] = typer.Option(
        None, "--inventory",
        help="Static inventory: JSON/YAML file of simulated hosts, or an OpenB node-list CSV.",
    ),
    nvml: bool = typer.Option(
        True, "--nvml/--no-nvml",
        help="This machine's GPUs through NVML (no driver: zero GPUs, a warning).",
    ),
    use_psutil: bool = typer.Option(
        True, "--psutil/--no-psutil",
        help="This machine's cores (affinity, cgroup quota) and RAM.",
    ),
    host_id: Optional[str] = typer.Option(
        None, "--host-id",
        help="Host id for this machine (default: the hostname).",
    ),
    interval: float = typer.Option(
        DEFAULT_INTERVAL_S, "--interval", envvar="ALLOCATOR_HEARTBEAT_INTERVAL_S",
        help="Seconds between rounds (inventory + heartbeat).",
    ),
    labels: Optional[list[str]] = typer.Option(
        None, "--labels",
        help="k=v[,k=v] labels added to every host (cluster, zone, ...); repeatable.",
    ),
    enforce: bool = typer.Option(
        False, "--enforce",
        help="Stop processes over their GPU memory grant (SIGTERM, then SIGKILL).",
    ),
    kill_grace: float = typer.Option(
        5.0, "--kill-grace",
        help="Seconds between SIGTERM and SIGKILL with --enforce.",
    ),
    drain_timeout: float = typer.Option(
        DEFAULT_DRAIN_TIMEOUT_S, "--drain-timeout",
        help="On SIGTERM: seconds to let running work finish before it is released (<0: wait for it).",
    ),
    granularity: int = typer.Option(
        DEFAULT_GRANULARITY_MB, "--granularity-mb", min=1,
        help="Unmanaged GPU memory is rounded up to this many MiB.",
    ),
    metrics_port: int = typer.Option(
        0, "--metrics-port", min=0, max=65535,
        help="Serve Prometheus metrics on this port (0: off).",
    ),
    services: Optional[str] = typer.Option(
        None, "--services", envvar="ALLOCATOR_SERVICES",
        help="Service catalog (YAML/JSON: name -> command with {port}, health, idle_timeout_s) this host runs on demand.",
    ),
    service_address: Optional[str] = typer.Option(
        None, "--service-address", envvar="ALLOCATOR_SERVICE_ADDRESS",
        help="Address in service endpoints (http://ADDRESS:port); default: the hostname.",
    ),
    service_ports: Optional[str] = typer.Option(
        None, "--service-ports", envvar="ALLOCATOR_SERVICE_PORTS",
        help="Port pool for named services, FIRST-LAST (default 9000-9099).",
    ),
    worker_slots: Optional[int] = typer.Option(
        None, "--worker-slots", envvar="ALLOCATOR_WORKER_SLOTS",
        help="Worker slots per host (default: RQ workers on the host queue, else one per core).",
    ),
    orphan_check: float = typer.Option(
        DEFAULT_ORPHAN_CHECK_S, "--orphan-check",
        help="Seconds between checks for runs whose worker died on this machine (their grants are freed; 0: off).",
    ),
    once: bool = typer.Option(
        False, "--once",
        help="One round, print its report as JSON, exit (hosts stay registered).",
    ),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help=REDIS_HELP),
    namespace: Optional[str] = typer.Option(
        None, "--namespace", envvar="ALLOCATOR_NAMESPACE",
        help="Key namespace.",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Host agent: publish inventory and heartbeats, keep capacity truthful, watch GPU memory grants."""
    logging.basicConfig(level=check_log_level(log_level, "--log-level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require_positive(interval, "--interval")
    _check_interval_against_grace(interval)
    require_positive(kill_grace, "--kill-grace", zero_means="SIGKILL at once")
    require_positive(orphan_check, "--orphan-check", zero_means="no checks")
    if math.isnan(drain_timeout) or drain_timeout > MAX_SECONDS:  # nan: a deadline never reached
        raise typer.BadParameter(f"must be at most {MAX_SECONDS} s, or below 0 to wait for the work, got {drain_timeout:g}",
                                 param_hint="--drain-timeout")
    try:
        if host_id is not None:
            check_id_format(host_id, "--host-id")  # ('' would silently mean the hostname)
        extra = parse_labels(labels)
        catalog = ServiceCatalog.load(services)
        # Checked as a registration would check them, now: refused only at each registration, the
        # agent would run on without registering its hosts.
        probe: dict[str, object] = {"id": "x", "labels": extra}
        if service_ports:
            probe["service_ports"] = service_ports
        if worker_slots is not None:
            probe["worker_slots"] = worker_slots
        checked = parse(HostSpec, probe)
        ports = checked.service_ports if service_ports else None
        provider: InventoryProvider
        if inventory:
            provider = StaticProvider(inventory)
            if len(catalog) and len(provider.hosts()) > 1:
                # Named services run as processes of this machine, on ports of one pool: two hosts
                # served from here would be handed the same ports.
                raise InvalidRequest("services", "named services run on this machine: serve them with an agent "
                                                 "of one host (this inventory has several)")
        else:
            provider = LocalProvider(host_id, nvml=nvml, use_psutil=use_psutil)
            check_id_format(provider.host_id, "--host-id")  # the hostname, by default
    except InvalidRequest as exc:
        err.print(f"[red]invalid input:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    a = _allocator(redis_url, namespace)
    agent = Agent(a, provider, interval_s=interval, labels=extra, granularity_mb=granularity,
                  watchdog=Watchdog(a, enforce=enforce, kill_grace_s=kill_grace),
                  drain_timeout_s=None if drain_timeout < 0 else drain_timeout,
                  services=catalog, service_address=service_address, worker_slots=worker_slots, service_ports=ports,
                  orphan_check_s=orphan_check)
    if once:
        with reporting(url=redis_url or Settings.from_env().redis_url):
            rep = agent.run_once()
        print_json(rep.__dict__)
        return
    _serve_metrics(metrics_port)
    stop, abort = threading.Event(), threading.Event()
    _signals(stop, abort)
    logging.getLogger(__name__).info("agent serving %s every %.1f s", inventory or agent_host_label(provider), interval)
    agent.run(stop)
    released = agent.shutdown(abort)
    logging.getLogger(__name__).info("agent stopped; hosts deregistered (%d allocation(s) released)", len(released))


def agent_host_label(provider: InventoryProvider) -> str:
    return f"host {provider.host_id}" if isinstance(provider, LocalProvider) else type(provider).__name__


def hosts_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help=REDIS_HELP),
    namespace: Optional[str] = typer.Option(
        None, "--namespace", envvar="ALLOCATOR_NAMESPACE",
        help="Key namespace.",
    ),
) -> None:
    """Hosts with state, heartbeat age, GPUs and free capacity."""
    a = open_allocator(redis_url, namespace, as_json=as_json)  # (its errors as every read view words them)
    with reporting(as_json, url=redis_url or Settings.from_env().redis_url):  # (as every command words it)
        rows = host_rows(a)
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    t = Table("host", "state", "gen", "heartbeat", "GPUs", "GPU MiB free/total", "cores free/total",
              "RAM MiB free/total", "allocs", title=f"{len(rows)} host(s)")
    colour = {"ready": "green", "draining": "yellow", "lost": "red"}
    for r in rows:
        if r.heartbeat_age_s is not None:
            beat = f"{r.heartbeat_age_s:.1f} s ago"
        elif r.state == "lost" and r.lost_since_s is not None:
            beat = f"lost {r.lost_since_s:.0f} s ago"
        else:
            beat = "no agent"
        gpus = Text(f"{r.gpus} x {r.gpu_models}" if r.gpus else "-")
        t.add_row(r.host_id, f"[{colour.get(r.state, 'white')}]{r.state}[/]", str(r.gen), beat, gpus,
                  f"{r.gpu_memory_free_mb:.0f}/{r.gpu_memory_total_mb:.0f}", f"{r.cpu_free:g}/{r.cpu_total:g}",
                  f"{r.ram_free_mb:.0f}/{r.ram_total_mb:.0f}", str(r.allocations))
    console.print(t)


def _check_interval_against_grace(interval: float) -> None:
    """Refuses a heartbeat interval above half the reaper's grace, as this machine's settings give
    it (``ALLOCATOR_HOST_GRACE_S``, the variable the reaper and the scheduler read; 20 s unset):
    the reaper would declare the host lost between two heartbeats and free its grants, round after
    round. A reaper started with another ``--grace`` is not seen from here (docs/agent.md)."""
    raw = os.environ.get("ALLOCATOR_HOST_GRACE_S")
    try:
        grace = float(raw) if raw else DEFAULT_GRACE_S
    except ValueError:
        return  # the reaper refuses it where it reads it
    if math.isfinite(grace) and grace > 0 and interval * 2 > grace:
        raise typer.BadParameter(
            f"{interval:g} s is more than half the reaper's grace ({grace:g} s, ALLOCATOR_HOST_GRACE_S): a "
            "healthy host would be declared lost between two heartbeats; keep it at most a quarter of the grace "
            "(the defaults: 5 s and 20 s)", param_hint="--interval")


def reaper_command(
    grace: float = typer.Option(
        DEFAULT_GRACE_S, "--grace", envvar="ALLOCATOR_HOST_GRACE_S",
        help="Seconds without heartbeat before a host is lost.",
    ),
    interval: float = typer.Option(
        DEFAULT_REAPER_INTERVAL_S, "--interval",
        help="Seconds between reaper passes.",
    ),
    expire: bool = typer.Option(
        True, "--expire/--no-expire",
        help="Also release allocations past their TTL.",
    ),
    metrics_port: int = typer.Option(
        0, "--metrics-port", min=0, max=65535,
        help="Serve Prometheus metrics on this port (0: off).",
    ),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help=REDIS_HELP),
    namespace: Optional[str] = typer.Option(
        None, "--namespace", envvar="ALLOCATOR_NAMESPACE",
        help="Key namespace.",
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
) -> None:
    """Reaper alone (``allocator scheduler`` also runs it): lost hosts and expired leases."""
    logging.basicConfig(level=check_log_level(log_level, "--log-level"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    require_positive(grace, "--grace")
    require_positive(interval, "--interval")
    a = _allocator(redis_url, namespace)
    _serve_metrics(metrics_port)
    stop, abort = threading.Event(), threading.Event()
    _signals(stop, abort)
    run_reaper(a, grace, interval, stop, expire_leases=expire)


def register(app: typer.Typer) -> None:
    """Adds ``agent``, ``hosts`` and ``reaper`` to the main CLI."""
    app.command("agent")(agent_command)
    app.command("hosts")(hosts_command)
    app.command("reaper")(reaper_command)
