"""Expected run time per task type, from the history, written back to Redis.

The scheduler's backfill and the ETA need to know how long a running task will likely hold its
resources. For each task type we take the run times of its most recent allocations that ended
normally (released by their owner, or a job that finished ``ok``; expired leases, preemptions
and lost hosts say nothing about how long the work takes) and keep p50, p80 and the mean.

Redis hash ``Keys.durations``: field = task_type, value = JSON
``{"p50_ms", "p80_ms", "mean_ms", "max_ms", "n", "updated_ms"}``; read with ``read_estimates``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from sqlalchemy import Engine, and_, func, or_, select

from ..client import Allocator
from ..keys import Keys
from .models import allocations as A

DEFAULT_WINDOW = 200


@dataclass(frozen=True)
class Estimate:
    task_type: str
    n: int
    p50_ms: int
    p80_ms: int
    mean_ms: int
    max_ms: int


def percentile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, Postgres percentile_cont)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def duration_estimates(engine: Engine, namespace: str, *, window: int = DEFAULT_WINDOW) -> dict[str, Estimate]:
    """p50/p80/mean run time of the last ``window`` normal completions of each task type."""
    normal_end = or_(A.c.release_reason == "released", A.c.outcome == "ok")
    recent = (
        select(
            A.c.task_type,
            A.c.run_ms,
            func.row_number().over(partition_by=A.c.task_type, order_by=A.c.released_at.desc()).label("rn"),
        )
        .where(and_(A.c.namespace == namespace, A.c.task_type.is_not(None), A.c.run_ms.is_not(None), normal_end))
        .subquery()
    )
    q = select(recent.c.task_type, recent.c.run_ms).where(recent.c.rn <= window)
    by_type: dict[str, list[int]] = {}
    with engine.connect() as conn:
        for task_type, run_ms in conn.execute(q):
            by_type.setdefault(task_type, []).append(int(run_ms))
    out: dict[str, Estimate] = {}
    for task_type, values in by_type.items():
        values.sort()
        out[task_type] = Estimate(task_type, len(values), round(percentile(values, 0.5)), round(percentile(values, 0.8)),
                                  round(sum(values) / len(values)), values[-1])
    return out


def write_estimates(client: redis.Redis, keys: Keys, estimates: dict[str, Estimate]) -> None:
    """Replaces the durations hash in one MULTI, so readers never see half an update."""
    now = int(time.time() * 1000)
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.durations)
    if estimates:
        pipe.hset(keys.durations, mapping={
            t: json.dumps({k: v for k, v in asdict(e).items() if k != "task_type"} | {"updated_ms": now})
            for t, e in estimates.items()
        })
    pipe.execute()


def refresh_estimates(engine: Engine, allocator: Allocator, *, window: int = DEFAULT_WINDOW) -> dict[str, Estimate]:
    """Computes the estimates for the allocator's namespace and stores them in Redis."""
    est = duration_estimates(engine, allocator.keys.namespace, window=window)
    write_estimates(allocator.redis, allocator.keys, est)
    return est


def read_estimates(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """The estimates as stored in Redis: task_type -> {p50_ms, p80_ms, mean_ms, max_ms, n, updated_ms}."""
    return {t: json.loads(v) for t, v in client.hgetall(keys.durations).items()}
