"""``allocator allocate | release | show | list | capacity | queue | cancel``.

``allocate`` prints seed 004's result (``--json``) or a one-line summary; it fails fast unless
``--queue`` (wait in line, return at once with the position) or ``--wait`` (block until placed).
Read commands take ``--json``. Exit codes as in ``cli_common``: 0 done, 1 refused, 2 invalid.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import batch, cli_batch, seeds, views
from .cli_common import (
    AS_JSON,
    EXIT_INVALID,
    EXIT_REFUSED,
    NAMESPACE,
    REDIS_URL,
    err,
    fail,
    open_allocator,
    option_for,
    out,
    print_json,
    reporting,
    settings_url,
)
from .client import Allocator
from .errors import InvalidRequest
from .models import MAX_SECONDS, Allocation

STATES = ("pending", "active", "released", "failed", "cancelled")


def _requirements(gpus: Optional[int], gpu_memory: Optional[str], gpu_model: Optional[str], cpu_cores: Optional[str],
                  ram: Optional[str], priority: str, ttl: Optional[float], selector: Optional[str]) -> dict[str, Any]:
    req: dict[str, Any] = {"priority": priority}
    for key, value in (("gpus", gpus), ("gpu_memory_mb", gpu_memory), ("gpu_model", gpu_model), ("cpu_cores", cpu_cores),
                       ("ram_mb", ram), ("selector", selector)):
        if value is not None:
            req[key] = value
    if ttl is not None:
        # (the model's messages offer null, which a command line cannot give)
        if not math.isfinite(ttl) or ttl < 0:
            raise InvalidRequest("resource_requirements.ttl_seconds",
                                 f"must be a positive number of seconds, or 0 for no expiry, got {ttl:g}")
        if ttl > MAX_SECONDS:
            raise InvalidRequest("resource_requirements.ttl_seconds",
                                 f"at most {MAX_SECONDS} seconds (ten years), or 0 for no expiry, got {ttl:g}")
        req["ttl_seconds"] = None if ttl == 0 else ttl
    return req


def allocate(
    task_id: str = typer.Argument(..., help="Task id (recorded with the allocation)."),
    task_type: Optional[str] = typer.Option(None, "--task-type", help="Task type, e.g. ml_inference, rendering, processing."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="Number of GPUs (default 1 with --gpu-memory, else 0)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="GPU memory per GPU: MiB or '4Gi'. Omit for whole GPUs."),
    gpu_model: Optional[str] = typer.Option(None, "--gpu-model", help="Allowed GPU models, e.g. 'A100|H100'."),
    cpu_cores: Optional[str] = typer.Option(None, "--cpu-cores", help="Cores: 2 (pinned) or 0.5 / 500m (shared). Default 1."),
    ram: Optional[str] = typer.Option(None, "--ram", help="RAM: MiB or '4Gi'."),
    priority: str = typer.Option("normal", "--priority", help="low, normal, high, critical (or 0..3)."),
    strategy: str = typer.Option("best_fit", "--strategy", help="first_fit, best_fit, worst_fit or priority (with --queue: may preempt lower-priority work)."),
    ttl: Optional[float] = typer.Option(None, "--ttl", help="Lease seconds (default 3600; 0 = no expiry)."),
    expected_duration: Optional[float] = typer.Option(None, "--expected-duration", help="Expected seconds of use (backfill, ETAs)."),
    selector: Optional[str] = typer.Option(None, "--selector", help="Host labels, e.g. 'cluster=lab,zone=z1|z2'."),
    owner: Optional[str] = typer.Option(None, "--owner", help="Who it is for (usage accounting)."),
    metadata: Optional[str] = typer.Option(None, "--metadata", help="JSON object kept with the allocation."),
    queue: bool = typer.Option(False, "--queue", help="If it does not fit now, wait in line (return at once with the position)."),
    wait: bool = typer.Option(False, "--wait", help="Wait in line and block until placed (implies --queue)."),
    timeout: float = typer.Option(0, "--timeout", min=0, help="With --wait: give up after this many seconds (0 = never); the request stays queued."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Allocate GPU memory, CPU cores and RAM for TASK_ID on one host (prints the seed 004 result)."""
    meta: Optional[dict[str, Any]] = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
            fail(EXIT_INVALID, InvalidRequest.code, f"--metadata: not valid JSON ({type(exc).__name__})", "metadata",
                 as_json=as_json)
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        res = seeds.allocate_resources(
            task_id, task_type, _requirements(gpus, gpu_memory, gpu_model, cpu_cores, ram, priority, ttl, selector),  # type: ignore[arg-type]
            strategy, on_busy="queue" if (queue or wait) else "fail", allocator=a, owner=owner,
            expected_duration=expected_duration, metadata=meta,
        )
        if not res["success"]:
            e = res["error"]
            code = EXIT_INVALID if e["code"] == InvalidRequest.code else EXIT_REFUSED
            if as_json:
                print_json(res)
            where = option_for(e["field"]) if e.get("field") else None
            message = e["message"] if where is None or code != EXIT_INVALID else f"{where}: {e['message'].split(': ', 1)[-1]}"
            err.print(f"[bold red]{'invalid' if code == EXIT_INVALID else 'refused'}:[/] {escape(message)}")
            raise typer.Exit(code)
        if wait and res["queue_position"]:
            res = _wait_for_placement(a, res, timeout, as_json)
    if as_json:
        print_json(res)
    else:
        _print_result(a, res)


def _wait_for_placement(a: Allocator, res: dict[str, Any], timeout: float, as_json: bool) -> dict[str, Any]:
    """Polls until the queued request is placed, showing its position and ETA on stderr."""
    alloc_id = res["allocation_id"]
    deadline = time.monotonic() + timeout if timeout else None
    with err.status(f"queued at position {res['queue_position']}") as status:
        while True:
            alloc = a.require(alloc_id)
            if alloc.state == "active":
                return seeds.tool_result(a, alloc)
            if alloc.state != "pending":
                fail(EXIT_REFUSED, "NOT_PLACED", f"{alloc_id} ended while waiting: {alloc.state} ({alloc.release_reason})",
                     as_json=as_json)
            position = a.position(alloc_id)
            eta = views.start_time(a, alloc)
            status.update(f"waiting for {alloc_id}: position {position}, ETA {views.when(eta)}")
            if deadline is not None and time.monotonic() >= deadline:
                fail(EXIT_REFUSED, "TIMEOUT", f"not placed within {timeout:g} s; {alloc_id} stays in line at position "
                     f"{position} (`allocator cancel {alloc_id}` withdraws it)", as_json=as_json)
            time.sleep(0.2)


def _print_result(a: Allocator, res: dict[str, Any]) -> None:
    alloc = a.require(res["allocation_id"])
    if alloc.state == "pending":
        eta = res.get("estimated_start_time")
        out.print(f"[yellow]queued[/] {escape(str(res['task_id']))} at position {res['queue_position']} "
                  f"(ETA {views.when(_parse_iso(eta)) if eta else 'unknown'}); allocation {alloc.allocation_id}")
        return
    ms = res["metadata"].get("allocation_time_ms")
    took = f" in {ms:g} ms" if isinstance(ms, (int, float)) else ""
    out.print(f"[green]placed[/] {escape(str(res['task_id']))} -> {escape(views.grant_text(alloc))}{took}; "
              f"allocation {escape(alloc.allocation_id)}"
              + (f", expires {views.when(alloc.expires_at)}" if alloc.expires_at else ""))


def _dump(x: Allocation, a: Allocator) -> dict[str, Any]:
    d = x.model_dump(mode="json", exclude={"allocation_time_ms"})
    if x.state == "pending":
        d["queue_position"] = a.position(x.allocation_id)
    elif x.activated_at is None:
        d["queue_position"] = None  # left the line without being placed (cancelled): no place to show
    d["estimated_start_time"] = seeds._iso(views.start_time(a, x))
    return d


def release(
    allocation_ids: list[str] = typer.Argument(..., help="Allocation ids; '-' reads them from standard input "
                                                         "(separated by spaces or new lines)."),
    chunk_size: int = typer.Option(batch.DEFAULT_CHUNK, "--chunk-size",
                                   help=f"With several ids: releases per script call (1-{batch.MAX_CHUNK})."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Release allocations (a queued one is withdrawn); releasing twice is harmless."""
    with reporting(as_json, settings_url(redis_url), options={"chunk_size": "--chunk-size"}):
        batch.check_chunk(chunk_size)  # also with one id: an option given is an option checked
    if len(allocation_ids) > 1 or allocation_ids == ["-"]:
        cli_batch.release_many(allocation_ids, chunk_size=chunk_size, as_json=as_json, redis_url=redis_url,
                               namespace=namespace)
        return
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        x = a.release(allocation_ids[0])
    if as_json:
        print_json(x.model_dump(mode="json", exclude={"allocation_time_ms"}))
    elif x.released_now is False:
        out.print(Text(f"{x.allocation_id} was already {x.state} ({x.release_reason or '-'})"))
    else:
        who = x.task_id or "-"
        what = views.grant_text(x) if x.host_id else "nothing was allocated"
        out.print(f"[green]{x.state}[/] " + escape(f"{x.allocation_id} ({who}): {what}"))


def show(
    allocation_id: str = typer.Argument(..., help="Allocation id (a queued function task's id is its allocation id)."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """One allocation: state, grant, times, and its position and ETA while queued."""
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        d = _dump(a.require(allocation_id), a)
    if as_json:
        print_json(d)
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    for key in ("allocation_id", "state", "task_id", "task_type", "owner", "priority", "strategy", "kind", "host_id",
                "queue_position", "estimated_start_time", "created_at", "activated_at", "released_at", "expires_at",
                "release_reason", "requeues"):
        if d.get(key) not in (None, ""):
            t.add_row(f"[bold]{key}[/]", Text(str(d[key])))
    if d["gpus"]:
        t.add_row("[bold]gpus[/]", Text(", ".join(f"GPU{g['index']} {g['model']} {views.mib(g['memory_mb'])} ({g['uuid']})" for g in d["gpus"])))
    if d["host_id"]:
        t.add_row("[bold]cpu[/]", f"cores {d['cpu_cores']}" + (f" + {d['cpu_shared']:g} shared" if d["cpu_shared"] else ""))
        t.add_row("[bold]ram[/]", views.mib(d["ram_mb"]))
    elif isinstance(d.get("request"), dict):
        t.add_row("[bold]requested[/]", Text(views.request_text(views.requested(Allocation.model_validate(d)))))
    if d["metadata"]:
        t.add_row("[bold]metadata[/]", Text(json.dumps(d["metadata"])))
    out.print(t)


def list_(
    state: Optional[str] = typer.Option(None, "--state", help="pending, active, released, failed or cancelled."),
    task_id: Optional[str] = typer.Option(None, "--task-id", help="Only this task id."),
    host: Optional[str] = typer.Option(None, "--host", help="Only allocations on this host."),
    limit: int = typer.Option(100, "--limit", min=1, max=100_000, help="Most rows."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Allocations, newest first (finished ones stay listed for the retention period)."""
    if state is not None and state not in STATES:
        fail(EXIT_INVALID, InvalidRequest.code, f"--state: expected one of {', '.join(STATES)}, got {state!r}", "state",
             as_json=as_json)
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url), options={"task_id": "--task-id"}):
        rows = a.list(state=state, task_id=task_id, host_id=host, limit=limit)
    if as_json:
        print_json([x.model_dump(mode="json", exclude={"request", "allocation_time_ms", "released_now"}) for x in rows])
        return
    t = Table("allocation", "task", "type", "priority", "state", "placement", "created")
    for x in rows:
        where = " ".join([x.host_id, *(f"GPU{g.index}" for g in x.gpus)]) if x.host_id else views.request_text(views.requested(x))
        t.add_row(*map(Text, (x.allocation_id, x.task_id or "-", x.task_type or "-", x.priority, x.state, where,
                              views.when(x.created_at))))
    out.print(t)
    out.print(f"{len(rows)} allocation(s)")


def capacity(
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Fleet and per-host totals, allocated and free GPU memory, cores and RAM."""
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        cap = a.capacity()
    if as_json:
        print_json(cap.model_dump(mode="json"))
        return
    t = Table("host", "state", "GPUs (idle/total)", "GPU memory free/total", "cores free/total", "RAM free/total", "allocations")
    for h in cap.hosts:
        t.add_row(Text(h.host_id), h.state, f"{h.gpus_idle}/{len(h.gpus)}", f"{views.mib(h.gpu_memory_mb.available)} / {views.mib(h.gpu_memory_mb.total)}",
                  f"{h.cpu_cores.available:g} / {h.cpu_cores.total:g}", f"{views.mib(h.ram_mb.available)} / {views.mib(h.ram_mb.total)}",
                  str(h.active_allocations))
    out.print(t)
    out.print(f"fleet: {cap.host_count} host(s), {cap.gpu_count} GPU(s) ({cap.gpus_idle} idle); GPU memory "
              f"{cap.gpu_memory_mb.utilization_pct:g}% used, cores {cap.cpu_cores.utilization_pct:g}%, RAM "
              f"{cap.ram_mb.utilization_pct:g}%; {cap.active_allocations} active allocation(s)")


def queue(
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, help="Most tasks to show."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Pending tasks in the order they will start, with positions and estimated start times."""
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        rows, total = views.pending_tasks(a, limit)
    if as_json:
        print_json({"pending": rows, "count": total})
        return
    t = Table("#", "task", "name", "priority", "type", "request", "waiting", "ETA")
    now = time.time()
    for r in rows:
        eta = r["estimated_start_time"]
        t.add_row(*map(Text, (str(r["position"]), r["task_id"], r["name"] or "-", r["priority"], r["task_type"] or "-",
                              views.request_text(r["resources"]), f"{r['waiting_s']:.0f}s",
                              views.when(_parse_iso(eta), now) if eta else "-")))
    out.print(t)
    out.print(f"{total} pending" + (f" (first {len(rows)} shown)" if total > len(rows) else ""))


def _parse_iso(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def cancel(
    task_id: str = typer.Argument(..., help="Task or allocation id."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Cancel a task: a pending one leaves the line; a running one is stopped and released."""
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        x = a.cancel(task_id)
    if as_json:
        print_json(x.model_dump(mode="json", exclude={"request", "allocation_time_ms"}))
    else:
        out.print(Text(f"{x.allocation_id}: {x.state} ({x.release_reason or '-'})"))


def register(app: typer.Typer) -> None:
    """Adds these commands to the main CLI."""
    app.command("allocate")(allocate)
    app.command("release")(release)
    app.command("show")(show)
    app.command("list")(list_)
    app.command("capacity")(capacity)
    app.command("queue")(queue)
    app.command("cancel")(cancel)
