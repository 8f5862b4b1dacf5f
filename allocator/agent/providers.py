"""Inventory providers for the machine the agent runs on: NVML (GPUs) and psutil (cores, RAM).

A provider has ``hosts() -> list[HostInventory]`` and ``close()``. ``LocalProvider`` combines
NVML and psutil into this machine's one host; ``StaticProvider`` (``static.py``) serves simulated
hosts from a file. No NVIDIA driver (or no nvidia-ml-py) means zero GPUs and one warning: a
CPU-only host must keep serving its cores and RAM, so the NVML path never raises.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any, Protocol

import psutil

from .inventory import MIG_INDEX_BASE, GpuProcess, GpuUnit, HostInventory

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
#: cgroup v1 writes "no limit" as a huge page-aligned number; anything above this is unlimited.
_V1_UNLIMITED = 1 << 60


class InventoryProvider(Protocol):
    """What the agent needs from a source of host inventory."""

    def hosts(self) -> list[HostInventory]: ...

    def close(self) -> None: ...


# -- NVML --------------------------------------------------------------------------------------


def _mib_floor(n: int) -> int:
    return int(n) // MIB


def _mib_ceil(n: int) -> int:
    return -(-int(n) // MIB)


class NvmlProvider:
    """GPUs of this machine through NVML (``import pynvml`` from the nvidia-ml-py package).

    Reports per GPU: index, uuid, name, total and used memory, utilisation, compute processes
    with their memory, and the MIG devices of GPUs in MIG mode (each a schedulable unit).
    Initialisation is tried once; when it fails (no library, driver not loaded) the provider
    logs one warning and reports zero GPUs from then on.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._failed: str | None = None
        self.driver_version: str | None = None

    @property
    def available(self) -> bool:
        return self._init() is not None

    @property
    def failure(self) -> str | None:
        """Why NVML is unavailable (after the first ``gpus()`` call), else None."""
        return self._failed

    def _init(self) -> Any:
        if self._nvml is not None or self._failed is not None:
            return self._nvml
        try:
            import pynvml
        except ImportError as exc:  # the dependency is declared; a broken install must not crash
            self._failed = f"nvidia-ml-py is not installed ({exc})"
            log.warning("NVML unavailable: %s; this host reports zero GPUs", self._failed)
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self._failed = f"{type(exc).__name__}: {exc}"
            log.warning("NVML unavailable (%s): no NVIDIA driver here; this host reports zero GPUs", self._failed)
            return None
        self._nvml = pynvml
        try:
            self.driver_version = str(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            self.driver_version = None
        return pynvml

    def gpus(self) -> list[GpuUnit]:
        """Schedulable GPU units now; [] without a driver. A GPU NVML cannot read is skipped."""
        nv = self._init()
        if nv is None:
            return []
        units: list[GpuUnit] = []
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            log.error("NVML could not count GPUs (%s); reporting none this round", exc)
            return []
        for i in range(count):
            try:
                units.extend(self._device_units(nv, i))
            except nv.NVMLError as exc:
                log.error("NVML could not read GPU %d (%s); it is left out this round", i, exc)
        return units

    @staticmethod
    def _processes(nv: Any, handle: Any) -> list[GpuProcess]:
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except nv.NVMLError:
            return []
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append(GpuProcess(pid=int(p.pid), used_mb=None if used is None else _mib_ceil(used)))
        return out

    def _device_units(self, nv: Any, i: int) -> list[GpuUnit]:
        h = nv.nvmlDeviceGetHandleByIndex(i)
        uuid = str(nv.nvmlDeviceGetUUID(h))
        name = str(nv.nvmlDeviceGetName(h))
        try:
            util: float | None = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
        except nv.NVMLError:
            util = None
        mig_enabled = False
        try:
            current, _pending = nv.nvmlDeviceGetMigMode(h)
            mig_enabled = current == nv.NVML_DEVICE_MIG_ENABLE
        except nv.NVMLError:  # NotSupported on GPUs without MIG
            pass
        if mig_enabled:
            units = []
            for p in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, p)
                except nv.NVMLError:  # NotFound: an empty slot
                    continue
                mem = nv.nvmlDeviceGetMemoryInfo(mh)
                mig_name = str(nv.nvmlDeviceGetName(mh))
                units.append(GpuUnit(
                    index=(i + 1) * MIG_INDEX_BASE + p, uuid=str(nv.nvmlDeviceGetUUID(mh)), model=mig_name,
                    memory_mb=_mib_floor(mem.total), used_mb=_mib_ceil(mem.used),
                    processes=self._processes(nv, mh), parent_index=i, parent_uuid=uuid,
                    mig_profile=mig_name.rsplit("MIG", 1)[-1].strip() or None,
                ))
            return units
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        return [GpuUnit(index=i, uuid=uuid, model=name, memory_mb=_mib_floor(mem.total), used_mb=_mib_ceil(mem.used),
                        processes=self._processes(nv, h), utilization_pct=util)]

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None


# -- psutil and cgroups ------------------------------------------------------------------------


def _cgroup_dirs(root: Path, proc_cgroup: Path, controller: str | None) -> list[Path]:
    """Directories of this process's cgroup, deepest first, then each ancestor up to the mount.

    ``controller`` None means the cgroup v2 unified hierarchy; otherwise a v1 controller name.
    Inside a container the path is often "/" and the mount is already the container's cgroup.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    rel = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controller is None and controllers == "":
            rel = path
        elif controller is not None and controller in controllers.split(","):
            rel = path
    bases = [root] if controller is None else [root / d for d in (controller, f"{controller},cpuacct",
                                                                   f"cpuacct,{controller}", f"{controller},cpuset")]
    out: list[Path] = []
    for base in bases:
        if not base.is_dir():
            continue
        p = base / (rel or "/").lstrip("/")
        while True:
            out.append(p)
            if p == base or p.parent == p:
                break
            p = p.parent
    return out


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs this process may use under its cgroup quota (``cpu.max`` or v1 CFS), None if unlimited.

    The tightest quota on the path to the root wins, as the kernel enforces it.
    """
    limits: list[float] = []
    for d in _cgroup_dirs(root, proc_cgroup, None):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            limits.append(int(quota) / int(period))
    for d in _cgroup_dirs(root, proc_cgroup, "cpu"):
        try:
            quota_us = int((d / "cpu.cfs_quota_us").read_text())
            period_us = int((d / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota_us > 0 and period_us > 0:
            limits.append(quota_us / period_us)
    return min(limits) if limits else None


def cgroup_memory_limit_mb(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """This process's cgroup memory limit in MiB (``memory.max`` or v1 ``limit_in_bytes``), or None."""
    limits: list[int] = []
    for d in _cgroup_dirs(root, proc_cgroup, None):
        try:
            v = (d / "memory.max").read_text().strip()
        except OSError:
            continue
        if v and v != "max":
            limits.append(int(v))
    for d in _cgroup_dirs(root, proc_cgroup, "memory"):
        try:
            v = int((d / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError):
            continue
        if 0 < v < _V1_UNLIMITED:
            limits.append(v)
    return min(limits) // MIB if limits else None


class PsutilProvider:
    """Usable core ids and RAM of this machine.

    Cores: the process's CPU affinity (what the scheduler lets it, and so its work horses, run
    on), cut down to the cgroup CPU quota: a container with ``--cpus 2.5`` offers its first 2
    affinity cores (never more than the quota, at least one). RAM: total memory, or the cgroup
    memory limit when lower.
    """

    def __init__(self, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> None:
        self.cgroup_root = Path(cgroup_root)
        self.proc_cgroup = Path(proc_cgroup)

    def cores(self) -> tuple[list[int], dict[str, Any]]:
        try:
            affinity = sorted(psutil.Process().cpu_affinity() or [])
        except (AttributeError, psutil.Error):  # platforms without affinity
            affinity = list(range(psutil.cpu_count() or 1))
        quota = cgroup_cpu_limit(self.cgroup_root, self.proc_cgroup)
        cores = affinity
        if quota is not None:
            cores = affinity[: max(1, min(len(affinity), math.floor(quota)))]
        return cores, {"affinity_cores": len(affinity), "cpu_quota": quota}

    def ram_mb(self) -> tuple[int, dict[str, Any]]:
        total = int(psutil.virtual_memory().total) // MIB
        limit = cgroup_memory_limit_mb(self.cgroup_root, self.proc_cgroup)
        return (min(total, limit) if limit is not None else total), {"ram_total_mb": total, "ram_limit_mb": limit}


class LocalProvider:
    """This machine as one host: cores and RAM from psutil, GPUs from NVML (either may be off)."""

    def __init__(
        self,
        host_id: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        nvml: bool = True,
        use_psutil: bool = True,
        cgroup_root: Path = CGROUP_ROOT,
    ) -> None:
        self.host_id = host_id or socket.gethostname()
        self.labels = dict(labels or {})
        self.nvml = NvmlProvider() if nvml else None
        self.psutil = PsutilProvider(cgroup_root) if use_psutil else None

    def hosts(self) -> list[HostInventory]:
        info: dict[str, Any] = {"provider": "local", "hostname": socket.gethostname(), "agent_pid": os.getpid()}
        cores: list[int] = []
        ram = 0
        if self.psutil is not None:
            cores, ci = self.psutil.cores()
            ram, ri = self.psutil.ram_mb()
            info.update(ci, **ri)
        gpus: list[GpuUnit] = []
        if self.nvml is not None:
            gpus = self.nvml.gpus()
            info["nvml"] = "ok" if self.nvml.failure is None else self.nvml.failure
            if self.nvml.driver_version:
                info["driver_version"] = self.nvml.driver_version
        return [HostInventory(self.host_id, cores, ram, gpus, dict(self.labels), info)]

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()
