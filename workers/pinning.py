"""What a work horse does with its grant before the job runs: GPUs, cores, thread counts, env."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class Grant:
    """The parts of an allocation a process needs to confine itself."""

    allocation_id: str
    host_id: str
    gpu_uuids: list[str] = field(default_factory=list)
    gpu_indexes: list[int] = field(default_factory=list)
    gpu_memory_mb: list[int] = field(default_factory=list)
    cores: list[int] = field(default_factory=list)
    cpu_amount: float = 0.0

    def environment(self) -> dict[str, str]:
        """Variables set in the work horse. GPUs are named by UUID, which stays right when
        device enumeration order differs between processes (CUDA_DEVICE_ORDER). A host registered
        by hand without uuids has placeholders ("<host>-gpu<index>") that CUDA cannot read: its
        GPUs are named by index then, in PCI bus order (how nvidia-smi numbers them)."""
        threads = str(max(1, math.ceil(self.cpu_amount)))
        real = all(u.startswith(("GPU-", "MIG-")) for u in self.gpu_uuids)
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(self.gpu_uuids if real else (str(i) for i in self.gpu_indexes)),
            "ALLOCATOR_ALLOCATION_ID": self.allocation_id,
            "ALLOCATOR_HOST_ID": self.host_id,
            "ALLOCATOR_GPU_INDEXES": ",".join(str(i) for i in self.gpu_indexes),
            "ALLOCATOR_GPU_MEMORY_MB": ",".join(str(m) for m in self.gpu_memory_mb),
            "ALLOCATOR_CPU_CORES": ",".join(str(c) for c in self.cores),
        }
        env.update({v: threads for v in THREAD_VARS})
        if not real:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env


def apply(grant: Grant) -> None:
    """Applies the grant to the current process (called in the forked work horse)."""
    os.environ.update(grant.environment())
    if not grant.cores or not hasattr(os, "sched_setaffinity"):
        return
    usable = set(grant.cores) & os.sched_getaffinity(0)
    if not usable:
        log.warning("grant %s names cores %s, none of which this process may use; affinity unchanged",
                    grant.allocation_id, grant.cores)
        return
    os.sched_setaffinity(0, usable)
