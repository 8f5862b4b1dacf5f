"""A small fleet and row readers shared by the history tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select

from allocator import Allocator
from allocator.history.models import allocations, events, hosts, placements

FLEET = [
    {"id": "gpu-a", "cpu_cores": 16, "ram_mb": "128Gi",
     "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}, {"index": 1, "model": "A100", "memory_mb": "40Gi"}]},
    {"id": "gpu-b", "cpu_cores": 8, "ram_mb": "64Gi", "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]},
]


def register_fleet(a: Allocator) -> None:
    for h in FLEET:
        a.register_host(h)


def allocation_row(engine: Engine, a: Allocator, allocation_id: str) -> dict[str, Any] | None:
    q = select(allocations).where(allocations.c.namespace == a.keys.namespace, allocations.c.allocation_id == allocation_id)
    with engine.connect() as conn:
        r = conn.execute(q).mappings().first()
    return dict(r) if r else None


def all_rows(engine: Engine, a: Allocator, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).where(table.c.namespace == a.keys.namespace)).mappings()]


def count(engine: Engine, a: Allocator, table: Any = events) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(table.c.namespace == a.keys.namespace)).scalar_one())


__all__ = ["FLEET", "allocation_row", "all_rows", "allocations", "count", "events", "hosts", "placements", "register_fleet"]
