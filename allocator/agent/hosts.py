"""The fleet as operators look at it: state, heartbeat age, GPUs and free capacity per host.

Built from ``Allocator.capacity()`` (one MULTI over the host hashes) plus the heartbeats set, each
host's generation and its published inventory (utilisation). Reads only; cost grows with the
fleet (one round trip for each of the four reads), which suits ``allocator hosts`` and dashboards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..client import Allocator
from . import _redis


@dataclass
class HostRow:
    host_id: str
    state: str
    gen: int
    heartbeat_age_s: float | None  # None: no agent heartbeats this host
    gpus: int
    gpu_models: str
    gpu_memory_free_mb: float
    gpu_memory_total_mb: float
    gpus_idle: int
    cpu_free: float
    cpu_total: float
    ram_free_mb: float
    ram_total_mb: float
    allocations: int
    labels: dict[str, str] = field(default_factory=dict)
    gpu_utilization_pct: float | None = None
    lost_at_ms: int | None = None
    lost_since_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def host_rows(allocator: Allocator) -> list[HostRow]:
    """One row per registered host, in registration order."""
    cap = allocator.capacity()
    now = _redis.now_ms(allocator)
    ids = [h.host_id for h in cap.hosts]
    pipe = allocator.redis.pipeline(transaction=False)
    pipe.zrange(allocator.keys.heartbeats, 0, -1, withscores=True)
    for h in ids:
        pipe.hmget(allocator.keys.host(h), "gen", "lost_at")
        pipe.get(allocator.keys.host_inventory(h))
    replies = pipe.execute()
    beats = {m: s for m, s in replies[0]}
    rows = []
    for i, h in enumerate(cap.hosts):
        gen, lost_at = replies[1 + 2 * i]
        inv = json.loads(replies[2 + 2 * i]) if replies[2 + 2 * i] else {}
        utils = [g["utilization_pct"] for g in inv.get("gpus", []) if g.get("utilization_pct") is not None]
        models = sorted({g.model for g in h.gpus})
        rows.append(HostRow(
            host_id=h.host_id, state=h.state, gen=int(gen or 1),
            heartbeat_age_s=round((now - beats[h.host_id]) / 1000, 1) if h.host_id in beats else None,
            gpus=len(h.gpus), gpu_models="/".join(models), gpu_memory_free_mb=h.gpu_memory_mb.available,
            gpu_memory_total_mb=h.gpu_memory_mb.total, gpus_idle=h.gpus_idle, cpu_free=h.cpu_cores.available,
            cpu_total=h.cpu_cores.total, ram_free_mb=h.ram_mb.available, ram_total_mb=h.ram_mb.total,
            allocations=h.active_allocations, labels=h.labels,
            gpu_utilization_pct=round(sum(utils) / len(utils), 1) if utils else None,
            lost_at_ms=int(lost_at) if lost_at else None,
            lost_since_s=round((now - int(lost_at)) / 1000, 1) if lost_at and h.state == "lost" else None,
        ))
    return rows
