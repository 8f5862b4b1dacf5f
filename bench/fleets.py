"""Host fleets for benchmarks: lists of host dicts ready for ``Allocator.register_host``.

- ``small_fleet(16)``: identical big GPU hosts (8 GPUs x 80 GiB, 64 cores, 512 GiB RAM).
- ``openb_fleet(path)``: the 1,213 hosts of Alibaba's OpenB trace (``openb_node_list_gpu_node.csv``).
  The trace gives GPU counts and models but no GPU memory; per-GPU memory assumed (as in
  ``../shared/data/openb/README.md``): P100 16 GiB, T4 16 GiB, V100M16 16 GiB, V100M32 32 GiB,
  A10 24 GiB, G2 and G3 32 GiB (any other model: 16 GiB). Hosts with ``gpu == 0`` get no GPUs.
- ``synthetic_fleet(5000, gpus=8)``: many identical hosts (8 GPUs x 80 GiB, 96 cores, 1 TiB RAM).

The OpenB directory defaults to ``../shared/data/openb`` relative to the repository root and can be
overridden with the environment variable ``ALLOCATOR_OPENB_DIR`` (``bench/ledger.py`` also takes
``--openb-dir``); ``openb_dir()`` resolves it.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

GIB = 1024

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENB_CSV = "openb_node_list_gpu_node.csv"

#: Per-GPU memory (MiB) assumed for the OpenB models, which the trace does not state.
OPENB_GPU_MEMORY_MB: dict[str, int] = {
    "P100": 16 * GIB,
    "T4": 16 * GIB,
    "V100M16": 16 * GIB,
    "V100M32": 32 * GIB,
    "A10": 24 * GIB,
    "G2": 32 * GIB,
    "G3": 32 * GIB,
}
OPENB_DEFAULT_GPU_MEMORY_MB = 16 * GIB


def _host(host_id: str, *, gpus: int, gpu_mem_mb: int, model: str, cores: int, ram_mb: int,
          labels: dict[str, str]) -> dict[str, Any]:
    return {
        "id": host_id,
        "labels": labels,
        "cpu_cores": list(range(cores)),
        "ram_mb": ram_mb,
        "gpus": [
            {"index": i, "uuid": f"{host_id}-gpu{i}", "model": model, "memory_mb": gpu_mem_mb}
            for i in range(gpus)
        ],
    }


def small_fleet(n: int = 16, *, gpus: int = 8, gpu_mem_mb: int = 80 * GIB, cores: int = 64,
                ram_mb: int = 512 * GIB, model: str = "H100") -> list[dict[str, Any]]:
    """``n`` identical hosts: by default 8 GPUs x 80 GiB, 64 cores, 512 GiB RAM."""
    return [
        _host(f"small-{i:04d}", gpus=gpus, gpu_mem_mb=gpu_mem_mb, model=model, cores=cores, ram_mb=ram_mb,
              labels={"cluster": "small", "gpu_model": model})
        for i in range(n)
    ]


def synthetic_fleet(n: int = 5000, gpus: int = 8, *, gpu_mem_mb: int = 80 * GIB, cores: int = 96,
                    ram_mb: int = 1024 * GIB, model: str = "H100") -> list[dict[str, Any]]:
    """``n`` identical hosts with ``gpus`` GPUs each (80 GiB, 96 cores, 1 TiB RAM by default)."""
    return [
        _host(f"syn-{i:05d}", gpus=gpus, gpu_mem_mb=gpu_mem_mb, model=model, cores=cores, ram_mb=ram_mb,
              labels={"cluster": "synthetic", "gpu_model": model})
        for i in range(n)
    ]


def openb_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where the OpenB CSVs are: ``override``, else ``$ALLOCATOR_OPENB_DIR``, else ``../shared/data/openb``."""
    if override:
        return Path(override)
    env = os.environ.get("ALLOCATOR_OPENB_DIR")
    if env:
        return Path(env)
    return (REPO_ROOT / ".." / "shared" / "data" / "openb").resolve()


def openb_fleet(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The OpenB hosts. ``path`` is the CSV itself or the directory holding it (default: ``openb_dir()``).

    cores = cpu_milli // 1000 core ids, ram = memory_mib, ``gpu`` GPUs of the row's model with the
    assumed memory of ``OPENB_GPU_MEMORY_MB``; labels {"cluster": "openb", "gpu_model": model}.
    Raises ``FileNotFoundError`` when the CSV is missing.
    """
    p = Path(path) if path is not None else openb_dir()
    if p.is_dir():
        p = p / OPENB_CSV
    if not p.is_file():
        raise FileNotFoundError(f"OpenB node list not found: {p}")
    hosts: list[dict[str, Any]] = []
    with p.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ngpu = int(row["gpu"] or 0)
            model = (row.get("model") or "").strip()
            labels = {"cluster": "openb"}
            if model and ngpu > 0:
                labels["gpu_model"] = model
            hosts.append(
                _host(
                    row["sn"].strip(),
                    gpus=ngpu,
                    gpu_mem_mb=OPENB_GPU_MEMORY_MB.get(model, OPENB_DEFAULT_GPU_MEMORY_MB),
                    model=model or "GPU",
                    cores=int(row["cpu_milli"]) // 1000,
                    ram_mb=int(row["memory_mib"]),
                    labels=labels,
                )
            )
    return hosts


def describe(hosts: list[dict[str, Any]]) -> dict[str, int]:
    """Totals of a fleet (hosts, GPUs, GPU memory MiB, cores, RAM MiB)."""
    return {
        "hosts": len(hosts),
        "gpus": sum(len(h["gpus"]) for h in hosts),
        "gpu_memory_mb": sum(g["memory_mb"] for h in hosts for g in h["gpus"]),
        "cpu_cores": sum(len(h["cpu_cores"]) for h in hosts),
        "ram_mb": sum(h["ram_mb"] for h in hosts),
    }
