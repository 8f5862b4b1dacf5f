"""Read-side views shared by the CLI, the tools and the live view: the pending line with positions
and ETAs, a task's requested resources, and human formatting of sizes and times.

ETAs come from ``Allocator.estimated_start_times()`` / ``estimated_start_time(id)`` (allocator/eta/)
when those exist; without them an ETA is unknown (None, shown as "-").
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from .client import Allocator
from .models import Allocation
from .seeds import _iso

log = logging.getLogger(__name__)
#: Most ETAs computed one by one in a listing (those not in the scheduler's cache yet).
MAX_SINGLE_ESTIMATES = 10


def requested(alloc: Allocation) -> dict[str, Any]:
    """What a task asked for (from its stored request): gpus, MiB per GPU, cores, RAM MiB."""
    r = alloc.request.get("resources") if isinstance(alloc.request, dict) else None
    r = r if isinstance(r, dict) else {}
    return {"gpus": int(r.get("gpus") or 0), "gpu_memory_mb": r.get("gpu_memory_mb"),
            "cpu_cores": r.get("cpu_cores", 0), "ram_mb": int(r.get("ram_mb") or 0)}


def estimates(a: Allocator, ids: list[str]) -> dict[str, datetime | None]:
    """ETAs of pending tasks; {} entries are None when no estimator is available or it fails."""
    if not ids:
        return {}
    out: dict[str, datetime | None] = dict.fromkeys(ids)
    try:
        many = getattr(a, "estimated_start_times", None)
        one = getattr(a, "estimated_start_time", None)
        found = (many() or {}) if many is not None and len(ids) > 1 else {}
        out.update({i: found[i] for i in ids if i in found})
        if one is not None:
            # Tasks newer than the scheduler's cached estimates: computed one by one (bounded).
            for i in [i for i in ids if i not in found][:MAX_SINGLE_ESTIMATES]:
                out[i] = one(i)
    except Exception as exc:  # an estimate must never break a listing
        log.warning("ETA unavailable: %s", exc)
    return out


def start_time(a: Allocator, alloc: Allocation) -> datetime | None:
    """Activation time once placed; the ETA estimate while pending; None otherwise."""
    if alloc.state == "pending":
        return estimates(a, [alloc.allocation_id]).get(alloc.allocation_id)
    if alloc.state == "active":
        return alloc.activated_at or alloc.created_at
    return alloc.activated_at


def pending_allocations(a: Allocator, limit: int) -> tuple[list[Allocation], int]:
    """The first ``limit`` pending tasks in line order, and how many are pending in all."""
    if limit <= 0:  # (ZRANGE 0 -1 would be all of them)
        return [], int(a.redis.zcard(a.keys.pending))
    pipe = a.redis.pipeline(transaction=True)
    pipe.zrange(a.keys.pending, 0, limit - 1)
    pipe.zcard(a.keys.pending)
    ids, total = pipe.execute()
    pipe = a.redis.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(a.keys.alloc(i))
    out: list[Allocation] = []
    for pos, rec in enumerate(pipe.execute() if ids else [], start=1):
        if rec and rec.get("state") == "pending":
            alloc = Allocation.from_record(rec)
            alloc.queue_position = pos
            out.append(alloc)
    return out, int(total)


def pending_tasks(a: Allocator, limit: int = 50) -> tuple[list[dict[str, Any]], int]:
    """JSON rows of the pending line: position, ids, priority, type, request, waiting, ETA."""
    allocs, total = pending_allocations(a, limit)
    etas = estimates(a, [x.allocation_id for x in allocs])
    now = a.clock() if a.clock is not None else time.time()
    rows = [
        {
            "position": x.queue_position,
            "task_id": x.allocation_id,
            "name": x.task_id,
            "kind": x.kind,
            "priority": x.priority,
            "task_type": x.task_type,
            "owner": x.owner,
            "resources": requested(x),
            "submitted_at": _iso(x.created_at),
            "waiting_s": round(max(0.0, now - x.created_at.timestamp()), 3),
            "estimated_start_time": _iso(etas.get(x.allocation_id)),
        }
        for x in allocs
    ]
    return rows, total


# -- formatting -----------------------------------------------------------------------------


def mib(n: float | int | None) -> str:
    """512 MiB, 4 GiB, 1.5 TiB."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("TiB", 1024 * 1024), ("GiB", 1024)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v.is_integer() else f"{v:.1f} {unit}"
    return f"{n:.0f} MiB"


def cores(n: float) -> str:
    return f"{n:g}"


def when(dt: datetime | None, now: float | None = None) -> str:
    """HH:MM:SS (in 35s / 2m ago) in local time; "-" when unknown."""
    if dt is None:
        return "-"
    now = time.time() if now is None else now
    delta = dt.timestamp() - now
    rel = f"in {_span(delta)}" if delta >= 0.5 else (f"{_span(-delta)} ago" if delta <= -0.5 else "now")
    return f"{dt.astimezone().strftime('%H:%M:%S')} ({rel})"


def _span(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def request_text(r: dict[str, Any]) -> str:
    """'1 GPU × 4 GiB, 2 cores, 8 GiB RAM' for a requested-resources dict."""
    parts = []
    if r.get("gpus"):
        per = r.get("gpu_memory_mb")
        parts.append(f"{r['gpus']} GPU" + ("s" if r["gpus"] > 1 else "") + (f" × {mib(per)}" if per else " (whole)"))
    parts.append(f"{cores(float(r.get('cpu_cores') or 0))} cores")
    if r.get("ram_mb"):
        parts.append(f"{mib(r['ram_mb'])} RAM")
    return ", ".join(parts)


def grant_text(x: Allocation) -> str:
    """'gpu-a GPU0 (A100, 4 GiB) cores [0, 1] 8 GiB RAM' for a placed allocation."""
    if not x.host_id:
        return "-"
    gpus = " ".join(f"GPU{g.index} ({g.model}, {mib(g.memory_mb)})" for g in x.gpus)
    cpu = f"cores {x.cpu_cores}" if x.cpu_cores else ""
    if x.cpu_shared:
        cpu = (cpu + " + " if cpu else "") + f"{x.cpu_shared:g} shared"
    return " ".join(p for p in (x.host_id, gpus, cpu, f"{mib(x.ram_mb)} RAM" if x.ram_mb else "") if p)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
