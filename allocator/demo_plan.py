"""What ``allocator demo`` runs: this machine plus three simulated GPU hosts, and a mix of tasks of
every priority and size arriving in three waves (times and durations are divided by ``--speed``).

The mix is chosen so the first minute shows what the allocator does: whole-GPU and shared-GPU
work packed side by side, CPU-only work on any host, a critical task jumping the line, a large
two-GPU training run waiting for its reservation while short tasks backfill around it, and one
request no host could ever hold, refused at once with its reason.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

SIMULATED_HOSTS: list[dict[str, Any]] = [
    {"id": "sim-a100", "labels": {"kind": "simulated", "zone": "z1"}, "cpu_cores": 16, "ram_mb": "128Gi",
     "gpus": [{"index": 0, "model": "A100-40GB", "memory_mb": "40Gi"}, {"index": 1, "model": "A100-40GB", "memory_mb": "40Gi"}]},
    {"id": "sim-l4", "labels": {"kind": "simulated", "zone": "z1"}, "cpu_cores": 8, "ram_mb": "64Gi",
     "gpus": [{"index": 0, "model": "L4", "memory_mb": "24Gi"}, {"index": 1, "model": "L4", "memory_mb": "24Gi"}]},
    {"id": "sim-t4", "labels": {"kind": "simulated", "zone": "z2"}, "cpu_cores": 8, "ram_mb": "32Gi",
     "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]},
]
#: Worker processes per host: as many as tasks the host may hold at once in this mix.
WORKERS_PER_HOST = {"sim-a100": 3, "sim-l4": 3, "sim-t4": 2}
LOCAL_WORKERS = 2


@dataclass(frozen=True)
class DemoTask:
    """One task of the mix: when it arrives (s), what runs, for how long (s), what it needs."""

    at: float
    name: str
    task: str
    seconds: float
    priority: str
    resources: dict[str, Any]
    strategy: str = "best_fit"
    kind: str = "job"  # "job" (a function task run by a worker) or "lease" (direct allocation)
    extra: dict[str, Any] = field(default_factory=dict)


def _t(at: float, name: str, task: str, seconds: float, priority: str, strategy: str = "best_fit", **resources: Any) -> DemoTask:
    return DemoTask(at, name, task, seconds, priority, resources, strategy)


MIX: list[DemoTask] = [
    # wave 1: the fleet fills up
    _t(0, "train-llama", "demo.train", 18, "high", gpus=2, gpu_memory_mb="30Gi", cpu_cores=8, ram_mb="64Gi"),
    _t(0, "train-bert", "demo.train", 12, "normal", gpus=1, gpu_memory_mb="20Gi", cpu_cores=4, ram_mb="16Gi"),
    _t(0, "render-frames", "demo.render", 8, "normal", gpus=1, cpu_cores=2, ram_mb="8Gi"),
    _t(0, "render-preview", "demo.render", 14, "low", gpus=1, cpu_cores=2, ram_mb="8Gi"),
    _t(0, "infer-a", "demo.infer", 4, "high", gpu_memory_mb="4Gi", cpu_cores=1, ram_mb="4Gi"),
    _t(0, "infer-b", "demo.infer", 4, "normal", gpu_memory_mb="4Gi", cpu_cores=1, ram_mb="4Gi"),
    _t(0, "etl-logs", "demo.etl", 3, "low", cpu_cores=1, ram_mb="2Gi"),
    _t(0, "etl-features", "demo.etl", 5, "normal", cpu_cores=1, ram_mb="2Gi"),
    DemoTask(0, "notebook", "", 10, "normal", {"gpu_memory_mb": "8Gi", "cpu_cores": 1, "ram_mb": "8Gi"}, kind="lease"),
    # wave 2: more than fits — a critical task jumps the line
    _t(4, "infer-c", "demo.infer", 4, "normal", gpu_memory_mb="6Gi", cpu_cores=1, ram_mb="4Gi"),
    _t(4, "render-final", "demo.render", 6, "normal", gpus=1, cpu_cores=2, ram_mb="8Gi"),
    _t(4, "etl-daily", "demo.etl", 4, "low", cpu_cores=1, ram_mb="2Gi"),
    # strategy "priority": it may preempt lower-priority work (the low render is stopped and requeued)
    _t(5, "hotfix-infer", "demo.infer", 3, "critical", "priority", gpu_memory_mb="8Gi", cpu_cores=1, ram_mb="4Gi"),
    # wave 3: a large run waits for its reservation; short work backfills around it
    _t(8, "train-xl", "demo.train", 12, "high", gpus=2, gpu_memory_mb="36Gi", cpu_cores=8, ram_mb="64Gi"),
    _t(9, "infer-d", "demo.infer", 3, "low", gpu_memory_mb="4Gi", cpu_cores=1, ram_mb="2Gi"),
    _t(9, "etl-report", "demo.etl", 3, "normal", cpu_cores=1, ram_mb="2Gi"),
    _t(10, "render-thumbs", "demo.render", 4, "low", gpus=1, cpu_cores=1, ram_mb="4Gi"),
]
#: Refused at once: no host has 4 GPUs.
TOO_BIG = {"gpus": 4, "gpu_memory_mb": "40Gi", "cpu_cores": 8, "ram_mb": "64Gi"}


def local_host_id() -> str:
    """This machine's host id: its hostname, reduced to the characters ids allow."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname() or "localhost").strip("-.") or "localhost"
    return name[:60]


def local_host() -> tuple[dict[str, Any], str]:
    """This machine as a host (cores from the affinity mask, RAM and GPUs from psutil/NVML), and
    a description of where the figures came from. Uses the agent's providers when available."""
    labels = {"kind": "local"}
    try:
        from .agent.inventory import host_spec
        from .agent.providers import LocalProvider

        provider = LocalProvider(local_host_id(), labels=labels)
        try:
            inv = provider.hosts()[0]
        finally:
            provider.close()
        nvml = str(inv.info.get("nvml", "ok")).split(":")[0]
        note = f"{len(inv.cpu_cores)} cores, {inv.ram_mb} MiB RAM (psutil), " + (
            f"{len(inv.gpus)} GPU(s) (NVML)" if inv.gpus else f"no GPUs ({nvml})" if nvml != "ok" else "no GPUs (NVML)")
        return host_spec(inv), note
    except ImportError:  # the agent package is optional for the demo
        import psutil

        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        ram = int(psutil.virtual_memory().total) // (1024 * 1024)
        return {"id": local_host_id(), "labels": labels, "cpu_cores": cores, "ram_mb": ram}, \
            f"{len(cores)} cores, {ram} MiB RAM (psutil), GPUs not probed"
