"""``allocator top``: a live view of the fleet — per host and GPU, allocated against free, with bars —
and the head of the line with positions and ETAs. ``allocator demo`` shows the same view.

A frame is built from one ``FleetSnapshot`` (capacity with one MULTI over the hosts, the pending
head with its ETAs), so it costs a few round trips whatever the refresh rate; it grows with the
fleet like ``allocator capacity`` and is meant for a person watching, not for hot paths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import views
from .cli_common import AS_JSON, NAMESPACE, REDIS_URL, open_allocator, out, print_json, reporting, settings_url
from .client import Allocator
from .models import Allocation, Capacity
from .seeds import _iso

BAR_WIDTH = 12


@dataclass
class FleetSnapshot:
    """What one frame shows: capacity, the head of the line and its ETAs."""

    namespace: str
    taken_at: float
    capacity: Capacity
    pending: list[Allocation]
    pending_total: int
    etas: dict[str, Optional[datetime]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "taken_at": _iso(datetime.fromtimestamp(self.taken_at).astimezone()),
            "capacity": self.capacity.model_dump(mode="json"),
            "pending": [
                {"position": x.queue_position, "task_id": x.allocation_id, "name": x.task_id, "priority": x.priority,
                 "task_type": x.task_type, "resources": views.requested(x),
                 "estimated_start_time": _iso(self.etas.get(x.allocation_id))}
                for x in self.pending
            ],
            "pending_total": self.pending_total,
        }


def take_snapshot(a: Allocator, queue_rows: int = 10) -> FleetSnapshot:
    pending, total = views.pending_allocations(a, queue_rows)
    return FleetSnapshot(a.keys.namespace, time.time(), a.capacity(), pending, total,
                         views.estimates(a, [x.allocation_id for x in pending]))


def bar(used: float, total: float, width: int = BAR_WIDTH) -> Text:
    """A text bar of ``used`` out of ``total``: green below 60 %, yellow below 85 %, red above."""
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    filled = round(frac * width)
    color = "green" if frac < 0.6 else "yellow" if frac < 0.85 else "red"
    t = Text("█" * filled, style=color)
    t.append("░" * (width - filled), style="grey37")
    t.append(f" {frac * 100:3.0f}%")
    return t


def fleet_table(cap: Capacity) -> Table:
    """Per host: cores and RAM; per GPU: memory allocated against total, and its holders."""
    t = Table("host / GPU", "model", "allocated", "", "free", "holders", box=None, pad_edge=False, expand=False)
    for h in cap.hosts:
        state = "" if h.state == "ready" else f" [yellow]({h.state})[/]"
        t.add_row(Text(h.host_id, style="bold") + Text.from_markup(state), "cores", f"{h.cpu_cores.allocated:g}/{h.cpu_cores.total:g}",
                  bar(h.cpu_cores.total - h.cpu_cores.available, h.cpu_cores.total), f"{h.cpu_cores.available:g}",
                  str(h.active_allocations))
        t.add_row("", "RAM", f"{views.mib(h.ram_mb.allocated)}/{views.mib(h.ram_mb.total)}",
                  bar(h.ram_mb.total - h.ram_mb.available, h.ram_mb.total), views.mib(h.ram_mb.available), "")
        for g in h.gpus:
            t.add_row(f"  GPU{g.index}", Text(g.model), f"{views.mib(g.memory.allocated)}/{views.mib(g.memory.total)}",
                      bar(g.memory.total - g.memory.available, g.memory.total), views.mib(g.memory.available),
                      str(g.holders) if g.holders else "-")
    return t


def queue_table(snap: FleetSnapshot) -> Table:
    t = Table("#", "task", "priority", "type", "request", "waiting", "ETA", box=None, pad_edge=False)
    for x in snap.pending:
        t.add_row(str(x.queue_position), Text(x.task_id or x.allocation_id), x.priority, Text(x.task_type or "-"),
                  Text(views.request_text(views.requested(x))), f"{max(0.0, snap.taken_at - x.created_at.timestamp()):.0f}s",
                  views.when(snap.etas.get(x.allocation_id), snap.taken_at))
    return t


def render(snap: FleetSnapshot, interval: Optional[float] = None, extra: Optional[list[RenderableType]] = None) -> Group:
    """One frame: header, fleet, queue head (plus ``extra`` renderables, e.g. the demo's task list)."""
    cap = snap.capacity
    clock = datetime.fromtimestamp(snap.taken_at).strftime("%H:%M:%S")
    head = Text.from_markup(
        f"[bold]rq-allocator[/] · {snap.namespace} · {cap.host_count} hosts, {cap.gpu_count} GPUs ({cap.gpus_idle} idle) · "
        f"[green]{cap.active_allocations} running[/] · [yellow]{snap.pending_total} pending[/] · {clock}"
        + (f" · every {interval:g}s (Ctrl-C quits)" if interval else "")
    )
    parts: list[RenderableType] = [head, Text(""), fleet_table(cap), Text("")]
    if snap.pending:
        more = f" (first {len(snap.pending)} of {snap.pending_total})" if snap.pending_total > len(snap.pending) else ""
        parts += [Text.from_markup(f"[bold]queue{more}[/]"), queue_table(snap)]
    else:
        parts.append(Text("queue empty", style="grey50"))
    parts += list(extra or [])
    return Group(*parts)


def top(
    interval: float = typer.Option(1.0, "--interval", "-i", min=0.1, help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    queue_rows: int = typer.Option(10, "--queue-rows", min=0, max=1000, help="Pending tasks to show."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Live fleet view: per host and GPU allocated against free, and the head of the line with ETAs."""
    a = open_allocator(redis_url, namespace, as_json=as_json)
    with reporting(as_json, settings_url(redis_url)):
        if as_json:
            print_json(take_snapshot(a, queue_rows).as_dict())
            return
        if once:
            out.print(render(take_snapshot(a, queue_rows)))
            return
        try:
            if not out.is_terminal:  # piped: one frame per interval
                while True:
                    out.print(render(take_snapshot(a, queue_rows), interval))
                    time.sleep(interval)
            with Live(render(take_snapshot(a, queue_rows), interval), console=out, auto_refresh=False,
                      screen=out.is_terminal) as live:
                while True:
                    time.sleep(interval)
                    live.update(render(take_snapshot(a, queue_rows), interval), refresh=True)
        except KeyboardInterrupt:
            return


def register(app: typer.Typer) -> None:
    app.command("top")(top)
