"""Tasks the demo runs (and that tool/MCP callers may submit by name): they hold their grant for a
while and report what the worker pinned for them.

They only sleep, so simulated hosts can run them on any machine; each returns the environment
the worker set (``CUDA_VISIBLE_DEVICES``, core affinity), which shows the pinning worked.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .task_registry import task

MAX_SECONDS = 600.0


def _hold(seconds: float) -> dict[str, Any]:
    seconds = max(0.0, min(float(seconds), MAX_SECONDS))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = []
    return {
        "seconds": seconds,
        "allocation_id": os.environ.get("ALLOCATOR_ALLOCATION_ID"),
        "host_id": os.environ.get("ALLOCATOR_HOST_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "affinity": affinity,
    }


@task("demo.train", description="Simulated training run: holds its GPUs and cores for `seconds`.",
      resources={"gpus": 1, "gpu_memory_mb": "16Gi", "cpu_cores": 4, "ram_mb": "16Gi"}, task_type="finetune")
def train(seconds: float = 10.0) -> dict[str, Any]:
    """Simulated training run: holds its GPUs and cores for ``seconds``."""
    return _hold(seconds)


@task("demo.infer", description="Simulated inference batch: holds a slice of one GPU for `seconds`.",
      resources={"gpu_memory_mb": "4Gi", "cpu_cores": 1, "ram_mb": "4Gi"}, task_type="ml_inference")
def infer(seconds: float = 3.0) -> dict[str, Any]:
    """Simulated inference batch: holds a slice of one GPU for ``seconds``."""
    return _hold(seconds)


@task("demo.render", description="Simulated rendering job: one whole GPU for `seconds`.",
      resources={"gpus": 1, "cpu_cores": 2, "ram_mb": "8Gi"}, task_type="rendering")
def render(seconds: float = 5.0) -> dict[str, Any]:
    """Simulated rendering job: one whole GPU for ``seconds``."""
    return _hold(seconds)


@task("demo.etl", description="Simulated CPU-only processing step for `seconds`.",
      resources={"cpu_cores": 1, "ram_mb": "2Gi"}, task_type="processing")
def etl(seconds: float = 2.0) -> dict[str, Any]:
    """Simulated CPU-only processing step for ``seconds``."""
    return _hold(seconds)
