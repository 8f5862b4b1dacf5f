"""Reading the history: allocation listings, one allocation's events, usage (GPU-hours) per group.

Usage counts the time resources were *held* (placement to release, or to now while still held),
clipped to the period asked for, from the ``placements`` table so that a preempted and re-placed
task is charged for every run. GPU-hours charge a GPU memory slice its share of the GPU. Wait is
that of each placement made in the period: from the task's submission, or from the end of its
previous placement (a preempted or requeued task waits again from then), to the placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Engine, and_, case, func, literal, or_, select

from .db import dt_to_ms, epoch_ms
from .models import allocations as A
from .models import events as E
from .models import placements as P

GroupBy = Literal["owner", "task_type", "host"]
MS_PER_HOUR = 3_600_000


def history(
    engine: Engine,
    namespace: str,
    *,
    task_type: str | None = None,
    host: str | None = None,
    state: str | None = None,
    owner: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Allocations, newest first. ``since`` keeps those still alive at or after that time."""
    conds = [A.c.namespace == namespace]
    if task_type is not None:
        conds.append(A.c.task_type == task_type)
    if host is not None:
        conds.append(A.c.host_id == host)
    if state is not None:
        conds.append(A.c.state == state)
    if owner is not None:
        conds.append(A.c.owner == owner)
    if since is not None:
        conds.append(or_(A.c.released_at.is_(None), A.c.released_at >= since))
    newest = func.coalesce(A.c.placed_at, A.c.submitted_at)
    q = select(A).where(and_(*conds)).order_by(newest.desc(), A.c.allocation_id).limit(limit)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def allocation(engine: Engine, namespace: str, allocation_id: str) -> dict[str, Any] | None:
    """One allocation's row, or None."""
    q = select(A).where(A.c.namespace == namespace, A.c.allocation_id == allocation_id)
    with engine.connect() as conn:
        r = conn.execute(q).mappings().first()
    return dict(r) if r else None


def allocation_events(engine: Engine, namespace: str, allocation_id: str) -> list[dict[str, Any]]:
    """Every recorded event about one allocation, in stream order."""
    q = (select(E).where(E.c.namespace == namespace, E.c.subject == allocation_id)
         .order_by(E.c.stream_ms, E.c.stream_seq))
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


@dataclass(frozen=True)
class UsageRow:
    key: str
    placements: int
    gpu_hours: float
    gpu_memory_gib_hours: float
    cpu_hours: float
    ram_gib_hours: float
    allocations_placed: int  # placements made in the period (each with its own wait; the name is kept for --json readers)
    wait_hours: float
    mean_wait_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _placement_waits(namespace: str, key: Any, since: datetime, until: datetime) -> Any:
    """Per group: the placements made in [since, until) and their summed wait. A placement's wait
    runs from when its task last entered the line: its submission, or the end of its previous
    placement (preempted, or its host lost), so a task's earlier runs are not counted as waiting."""
    placed = epoch_ms(P.c.placed_at)
    previous_end = func.lag(epoch_ms(P.c.released_at)).over(partition_by=(P.c.namespace, P.c.allocation_id),
                                                            order_by=P.c.placed_ms)
    entered = func.coalesce(previous_end, epoch_ms(A.c.submitted_at), placed)
    wait = case((placed > entered, placed - entered), else_=literal(0))
    in_period = (select(P.c.allocation_id)
                 .where(P.c.namespace == namespace, P.c.placed_at >= since, P.c.placed_at < until))
    each = (
        select(key.label("key"), P.c.placed_at.label("placed_at"), wait.label("wait_ms"))
        .select_from(P.outerjoin(A, and_(A.c.namespace == P.c.namespace, A.c.allocation_id == P.c.allocation_id)))
        .where(P.c.namespace == namespace, P.c.allocation_id.in_(in_period))
        .subquery()
    )
    return (
        select(each.c.key, func.count().label("n"), func.sum(each.c.wait_ms).label("wait_ms"))
        .where(each.c.placed_at >= since, each.c.placed_at < until)
        .group_by(each.c.key)
    )


def usage(
    engine: Engine,
    namespace: str,
    *,
    since: datetime,
    until: datetime | None = None,
    by: GroupBy = "owner",
    now: datetime | None = None,
) -> list[UsageRow]:
    """GPU-hours, GPU-memory-GiB-hours, CPU-hours, RAM-GiB-hours held, and queue wait, per group.

    Held time is each placement's [placed, released or now] clipped to [since, until).
    """
    now = now or datetime.now(timezone.utc)
    until = until or now
    if until <= since:  # an empty period (a start after its end, or in the future): nothing held in it
        return []
    since_ms, until_ms, now_ms = dt_to_ms(since), dt_to_ms(until), dt_to_ms(now)
    pcol = {"owner": P.c.owner, "task_type": P.c.task_type, "host": P.c.host_id}[by]

    placed = epoch_ms(P.c.placed_at)
    ended = case((P.c.released_at.is_(None), literal(now_ms)), else_=epoch_ms(P.c.released_at))
    start = case((placed > since_ms, placed), else_=literal(since_ms))
    end = case((ended < until_ms, ended), else_=literal(until_ms))
    held_ms = case((end > start, end - start), else_=literal(0))
    held = (
        select(
            pcol.label("key"),
            func.count().label("placements"),
            func.sum(func.coalesce(P.c.gpu_share_milli, P.c.gpu_count * 1000) * held_ms).label("gpu_milli_ms"),
            func.sum(P.c.gpu_memory_mb * held_ms).label("gpu_mem_mb_ms"),
            func.sum(P.c.cpu_millis * held_ms).label("cpu_milli_ms"),
            func.sum(P.c.ram_mb * held_ms).label("ram_mb_ms"),
        )
        # Held at some time in the period: placed before its end, and released (or "now", while
        # still held) after its start, so a period after "now" holds nothing.
        .where(P.c.namespace == namespace, P.c.placed_at < until, ended > since_ms)
        .group_by(pcol)
    )
    waits = _placement_waits(namespace, pcol, since, until)
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for r in conn.execute(held).mappings():
            out[r["key"] or "(none)"] = dict(r)
        wait_rows = {(r["key"] or "(none)"): r for r in conn.execute(waits).mappings()}
    rows: list[UsageRow] = []
    for key in sorted(set(out) | set(wait_rows)):
        h = out.get(key, {})
        w = wait_rows.get(key)
        n_placed = int(w["n"]) if w else 0
        wait_ms = float(w["wait_ms"] or 0) if w else 0.0
        rows.append(UsageRow(
            key=key,
            placements=int(h.get("placements") or 0),
            gpu_hours=float(h.get("gpu_milli_ms") or 0) / 1000 / MS_PER_HOUR,
            gpu_memory_gib_hours=float(h.get("gpu_mem_mb_ms") or 0) / 1024 / MS_PER_HOUR,
            cpu_hours=float(h.get("cpu_milli_ms") or 0) / 1000 / MS_PER_HOUR,
            ram_gib_hours=float(h.get("ram_mb_ms") or 0) / 1024 / MS_PER_HOUR,
            allocations_placed=n_placed,
            wait_hours=wait_ms / MS_PER_HOUR,
            mean_wait_s=(wait_ms / n_placed / 1000) if n_placed else None,
        ))
    rows.sort(key=lambda r: (-r.gpu_hours, -r.cpu_hours, r.key))
    return rows
