"""What a host has, as an inventory provider reports it, and how that becomes a ledger ``HostSpec``.

Providers (NVML, psutil, a static file) all produce ``HostInventory`` objects, so the agent's
registration, heartbeat and watchdog logic is the same whether the GPUs are real or simulated.
A ``GpuUnit`` is what the ledger schedules: a whole GPU, or one MIG device of a GPU in MIG mode
(registered under its own ``MIG-…`` uuid, so ``CUDA_VISIBLE_DEVICES`` by uuid selects it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest

#: MIG device ``p`` of GPU ``i`` is registered with index ``(i + 1) * MIG_INDEX_BASE + p``, so its
#: index never collides with a physical GPU index (NVML reports at most a few dozen per host).
MIG_INDEX_BASE = 100


class InvalidInventory(InvalidRequest):
    """An inventory source (file, CSV row) is malformed; ``field`` names the offending entry."""

    code = "INVALID_INVENTORY"

    def __init__(self, source: str, field: str, reason: str) -> None:
        self.source = source
        super().__init__(field, reason)
        self.message = f"{source}: {field}: {reason}"
        self.args = (self.message,)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field, "source": self.source}


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU unit. ``used_mb`` is None when NVML cannot tell."""

    pid: int
    used_mb: int | None


@dataclass
class GpuUnit:
    """One schedulable GPU (or MIG device) with what is in use on it right now.

    ``used_mb`` is all memory in use on the unit (as NVML reports it), by the allocator's work
    horses and by anything else; the agent splits it into managed and unmanaged with the pid map.
    """

    index: int
    uuid: str
    model: str
    memory_mb: int
    used_mb: int = 0
    processes: list[GpuProcess] = field(default_factory=list)
    utilization_pct: float | None = None
    parent_index: int | None = None
    parent_uuid: str | None = None
    mig_profile: str | None = None

    def describe(self, foreign_mb: int | None = None) -> dict[str, Any]:
        """The unit as published in the host's inventory JSON."""
        out: dict[str, Any] = {"index": self.index, "uuid": self.uuid, "model": self.model,
                               "memory_mb": self.memory_mb, "used_mb": self.used_mb,
                               "processes": len(self.processes)}
        if foreign_mb is not None:
            out["unmanaged_mb"] = foreign_mb
        if self.utilization_pct is not None:
            out["utilization_pct"] = self.utilization_pct
        if self.parent_uuid is not None:
            out.update(parent_index=self.parent_index, parent_uuid=self.parent_uuid, mig_profile=self.mig_profile)
        return out


@dataclass
class HostInventory:
    """A host as one provider round sees it."""

    host_id: str
    cpu_cores: list[int]
    ram_mb: int
    gpus: list[GpuUnit] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_processes(self) -> bool:
        return any(g.processes for g in self.gpus)


def round_up(mb: int, granularity_mb: int) -> int:
    """Unmanaged memory is rounded up to ``granularity_mb`` so small NVML jitter does not turn
    into a capacity update (and an outbox event) every round; rounding up never over-grants."""
    if mb <= 0:
        return 0
    if granularity_mb <= 1:
        return mb
    return int(math.ceil(mb / granularity_mb) * granularity_mb)


def host_spec(
    inv: HostInventory,
    *,
    unmanaged_mb: dict[str, int] | None = None,
    labels: dict[str, str] | None = None,
    granularity_mb: int = 1,
) -> dict[str, Any]:
    """The ``register_host`` payload for an inventory.

    ``unmanaged_mb`` (uuid -> MiB) is memory held by processes the allocator does not manage; a
    unit missing from it counts all its used memory as unmanaged (nothing is attributed to a
    grant without a pid map). Labels: the inventory's, then ``labels`` (the agent's ``--labels``)
    over them, plus ``gpu_model`` when every GPU of the host is the same model.
    """
    merged = dict(inv.labels)
    merged.update(labels or {})
    models = {g.model for g in inv.gpus}
    if len(models) == 1 and "gpu_model" not in merged:
        merged["gpu_model"] = next(iter(models))
    gpus = []
    for g in inv.gpus:
        ext = g.used_mb if unmanaged_mb is None or g.uuid not in unmanaged_mb else unmanaged_mb[g.uuid]
        gpus.append({"index": g.index, "uuid": g.uuid, "model": g.model, "memory_mb": g.memory_mb,
                     "used_mb": min(g.memory_mb, round_up(ext, granularity_mb))})
    return {"id": inv.host_id, "labels": merged, "cpu_cores": list(inv.cpu_cores), "ram_mb": inv.ram_mb, "gpus": gpus}
