"""The summary ``allocator demo`` prints at the end: per task (wait, run, where), waits by
priority, per-host use, and the same run as the history database recorded it."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from rich.table import Table

from .models import Allocation, Priority

if TYPE_CHECKING:
    from .demo import Demo


def _seconds(a, b) -> float | None:  # noqa: ANN001 - datetimes or None
    return (b - a).total_seconds() if a is not None and b is not None else None


def print_summary(demo: Demo, elapsed: float) -> None:
    console, a = demo.console, demo.a
    records: dict[str, Allocation] = {}
    for x in demo.tasks:
        rec = a.get(x.id)
        if rec is not None:
            records[x.id] = rec
    t = Table("task", "priority", "waited", "ran", "host", "GPUs", "result", title="summary", title_justify="left")
    waits: dict[str, list[float]] = defaultdict(list)
    per_host: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # tasks, GPU-s, core-s
    for x in demo.tasks:
        r = records.get(x.id)
        if r is None:
            continue
        waited = _seconds(r.created_at, r.activated_at)
        ran = _seconds(r.activated_at, r.released_at)
        if waited is not None:
            waits[r.priority].append(waited)
        if r.host_id and ran is not None:
            h = per_host[r.host_id]
            h[0] += 1
            h[1] += len(r.gpus) * ran
            h[2] += r.cpu_total * ran
        gpus = ", ".join(f"GPU{g.index}" for g in r.gpus) or "-"
        result = r.release_reason or r.state
        if r.requeues:
            result += f" (preempted {r.requeues}×)"
        t.add_row(x.spec.name, r.priority, f"{waited:.1f}s" if waited is not None else "-",
                  f"{ran:.1f}s" if ran is not None else "-", r.host_id or "-", gpus,
                  f"[green]{result}[/]" if result == "released" else f"[yellow]{result}[/]")
    console.print(t)
    done = sum(1 for r in records.values() if r.state == "released" and r.release_reason == "released")
    failed = sum(1 for r in records.values() if r.state in ("failed", "cancelled"))
    preempted = sum(r.requeues for r in records.values())
    console.print(f"[bold]{done}[/] of {len(demo.tasks)} tasks finished, {failed} failed or cancelled, "
                  f"{preempted} preemption(s) (requeued and run again), {len(demo.refused)} refused at once")
    for line in demo.refused:
        console.print(f"  refused {line}")
    order = [p.label for p in sorted(Priority, reverse=True)]
    console.print("wait by priority: " + "; ".join(
        f"{p} mean {sum(w) / len(w):.1f}s max {max(w):.1f}s" for p in order if (w := waits.get(p))))
    recorded = _per_host_recorded(demo)
    if recorded is not None:
        console.print("per host (every placement, preempted runs included, as the history recorded them): " + recorded)
    else:  # no history: the ledger keeps each task's last run only
        console.print("per host (each task's last run): " + "; ".join(
            f"{h}: {int(v[0])} task(s), {v[1]:.0f} GPU-s, {v[2]:.0f} core-s" for h, v in sorted(per_host.items())))
    _history(demo)
    console.print(f"demo took {elapsed:.1f} s from start to the last task (speed ×{demo.speed:g})")


def _per_host_recorded(demo: Demo) -> str | None:
    """Per-host use from the history, which has every placement: a task's ledger record keeps
    only its last run, so a run a preemption stopped would be missing from the host it ran on."""
    if demo.svc.engine is None:
        return None
    try:
        from .history.queries import usage
    except ImportError:
        return None
    rows = usage(demo.svc.engine, demo.namespace, since=demo.started_at, by="host")
    return "; ".join(f"{r.key}: {r.placements} placement(s), {r.gpu_hours * 3600:.0f} GPU-s, {r.cpu_hours * 3600:.0f} core-s"
                     for r in sorted(rows, key=lambda r: str(r.key)))


def _history(demo: Demo) -> None:
    if demo.svc.engine is None:
        return
    try:
        from .history.queries import usage
    except ImportError:
        return
    rows = usage(demo.svc.engine, demo.namespace, since=demo.started_at, by="task_type")
    written = demo.svc.recorder.totals.written if demo.svc.recorder is not None else 0
    t = Table("task type", "placements", "GPU-s", "GPU-GiB-s", "core-s", "mean wait", title=f"history ({written} events recorded)",
              title_justify="left")
    for r in rows:
        t.add_row(r.key, str(r.placements), f"{r.gpu_hours * 3600:.0f}", f"{r.gpu_memory_gib_hours * 3600:.0f}",
                  f"{r.cpu_hours * 3600:.0f}", f"{r.mean_wait_s:.1f}s" if r.mean_wait_s is not None else "-")
    demo.console.print(t)
