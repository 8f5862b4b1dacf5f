"""Command line (typer + rich). The full command set (allocate, queue, top, tool, ...) builds on this."""

from __future__ import annotations

import uuid

import redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import cli_batch, cli_commands, demo, live, tool_cli, worker_cli
from .agent import cli as agent_cli
from .api import cli as api_cli
from .history import cli as history_cli
from .client import Allocator
from .cli_common import startup_failure
from .config import Settings
from .errors import REDIS_UNAVAILABLE, InsufficientResources, InvalidRequest

app = typer.Typer(help="rq-allocator: GPU memory, CPU core and RAM allocation for queued tasks.", no_args_is_help=True)
console = Console()

EXAMPLE_FLEET = [
    {"id": "gpu-a", "labels": {"cluster": "lab"}, "cpu_cores": 16, "ram_mb": "128Gi",
     "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}, {"index": 1, "model": "A100", "memory_mb": "40Gi"}]},
    {"id": "gpu-b", "labels": {"cluster": "lab"}, "cpu_cores": 8, "ram_mb": "64Gi",
     "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]},
]


@app.callback()
def _root() -> None:
    """rq-allocator command line."""


@app.command()
def example(
    redis_url: str = typer.Option(None, envvar="ALLOCATOR_REDIS_URL", help="Redis URL; unset = a private embedded redis-server."),
) -> None:
    """Register a two-host fleet, allocate and release on it, and show capacity at each step."""
    namespace = "example-" + uuid.uuid4().hex[:8]
    a = Allocator(redis_url or Settings.from_env().redis_url, namespace=namespace)
    try:
        for host in EXAMPLE_FLEET:
            a.register_host(host)
        console.print(f"[bold]Fleet[/] registered in namespace {namespace!r}")
        _capacity_table(a)
        train = a.allocate({"gpus": 1, "gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"},
                           priority="high", task_type="finetune", task_id="train-1")
        infer = a.allocate({"gpu_memory_mb": "2Gi", "cpu_cores": 2, "ram_mb": "4Gi"}, task_type="ml_inference", task_id="task_123")
        for x in (train, infer):
            gpus = ", ".join(f"GPU {g.index} ({g.model}, {g.memory_mb} MiB)" for g in x.gpus)
            console.print(f"[green]placed[/] {x.task_id} -> {x.host_id}: {gpus}; cores {x.cpu_cores}; "
                          f"{x.ram_mb} MiB RAM in {x.allocation_time_ms} ms")
        try:
            a.allocate({"gpu_memory_mb": "48Gi"})
        except InsufficientResources as exc:
            console.print(f"[yellow]refused[/] 48Gi on one GPU: {exc}")
        _capacity_table(a)
        for x in (train, infer):
            a.release(x.allocation_id)
        console.print("[bold]released both[/]")
        _capacity_table(a)
    finally:
        a.destroy()


def _capacity_table(a: Allocator) -> None:
    cap = a.capacity()
    t = Table("host", "GPU memory MiB (free/total)", "cores (free/total)", "RAM MiB (free/total)", "allocations")
    for h in cap.hosts:
        t.add_row(h.host_id, f"{h.gpu_memory_mb.available:.0f}/{h.gpu_memory_mb.total:.0f}",
                  f"{h.cpu_cores.available:g}/{h.cpu_cores.total:g}", f"{h.ram_mb.available:.0f}/{h.ram_mb.total:.0f}",
                  str(h.active_allocations))
    console.print(t)


app.command("worker")(worker_cli.worker)
app.command("scheduler")(worker_cli.scheduler)
agent_cli.register(app)  # agent, hosts, reaper
history_cli.register(app)  # db, history, usage, recover, recorder, estimates
api_cli.register(app)  # api (HTTP + WebSocket + /metrics)
cli_commands.register(app)  # allocate, release, show, list, capacity, queue, cancel
cli_batch.register(app)  # allocate-many
tool_cli.register(app)  # tool, mcp
live.register(app)  # top
demo.register(app)  # demo


def main() -> None:
    try:
        app()
    except InvalidRequest as exc:
        # Raised before a command's own error reporting took over (a malformed Redis URL or an
        # operator setting, say): invalid input, exit 2, without a traceback.
        Console(stderr=True).print(f"[bold red]invalid:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(2) from None
    except redis.RedisError as exc:
        # Likewise for a Redis that does not answer: refused, exit 1 (redis-py's message names
        # the host and port, never a password).
        what = "Redis unavailable" if isinstance(exc, REDIS_UNAVAILABLE) else f"Redis error ({type(exc).__name__})"
        Console(stderr=True).print(f"[bold red]refused:[/] {what}: {escape(str(exc))}", highlight=False)
        raise SystemExit(1) from None
    except Exception as exc:
        # An embedded Redis that cannot start, a history database out of reach (``example``,
        # ``api``, ...): one line, not a traceback. Anything else is a bug and keeps its traceback.
        known = startup_failure(exc)
        if known is None:
            raise
        code, line = known
        Console(stderr=True).print(Text(line, style="bold red"), highlight=False)
        raise SystemExit(code) from None
