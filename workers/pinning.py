"""What a work horse does with its grant before the job runs (GPUs, cores, thread counts, env),
and how its worker finds what the run left behind."""

from __future__ import annotations

import logging
import math
import os
import signal
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
    #: ``cores`` is not the grant's own but the host's shared pool at the claim (the cores nobody
    #: held exclusively then), where a grant without exclusive cores runs: a share of the CPU, or
    #: none at all. An empty pool then means every core was pinned, and the run gets idle priority
    #: (``apply``); an empty ``cores`` otherwise leaves the process's CPU as it is.
    shared_pool: bool = False
    #: The placement the run claimed (``claim_grant``'s token): with the allocation id it names this
    #: run, where the id alone also names a later placement of the same task (``kill_processes_of``).
    placement: str = ""

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
        if self.placement:
            env["ALLOCATOR_PLACEMENT"] = self.placement
        env.update({v: threads for v in THREAD_VARS})
        if not real:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env


def apply(grant: Grant) -> None:
    """Applies the grant to the current process (called in the forked work horse)."""
    os.environ.update(grant.environment())
    if grant.shared_pool and not grant.cores:
        # Every core of the host was pinned to other runs by the claim: the run keeps its
        # affinity (there are no cores to keep to) but gets only CPU time nobody else uses.
        if grant.cpu_amount > 0:
            # A share lends from the pool, and an exclusive grant is placed only while the pool
            # keeps what it lent (free cores x 1000 >= shared millicores): a share finds the pool
            # empty only on a host registered again with fewer cores than its grants hold
            # (overcommitted), where the exclusive grants keep their cores.
            log.warning("grant %s: a share of %g cores, but every core of host %s is pinned (overcommitted "
                        "host); it runs at idle priority", grant.allocation_id, grant.cpu_amount, grant.host_id)
        _idle_priority()
        return
    if not grant.cores or not hasattr(os, "sched_setaffinity"):
        return
    usable = set(grant.cores) & os.sched_getaffinity(0)
    if not usable:
        log.warning("grant %s names cores %s, none of which this process may use; affinity unchanged",
                    grant.allocation_id, grant.cores)
        return
    os.sched_setaffinity(0, usable)


def _idle_priority() -> None:
    """Idle CPU priority for this process and what it starts: Linux's SCHED_IDLE, else nice 19."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except OSError:
            log.warning("SCHED_IDLE refused; nice 19 instead", exc_info=True)
    os.nice(19)


def kill_processes_of(allocation_id: str, placement: str = "") -> list[int]:
    """SIGKILL to this user's processes whose environment says they run for ``allocation_id``
    under ``placement`` (``ALLOCATOR_ALLOCATION_ID`` and ``ALLOCATOR_PLACEMENT``, which ``apply``
    sets in the work horse and its children inherit; "" matches the id alone): what a run started
    in a session or process group of its own outlives the horse's group. The placement keeps a run
    of the same task placed again meanwhile (its host declared lost and back) out of it.

    ``/proc/<pid>/environ`` is the environment a process started with (its exec): a process that
    cleared or replaced its environment, or a bare fork of the horse (which started as its worker),
    is not found; only a cgroup per run would hold those. Processes whose environment cannot be
    read are skipped. Passes over ``/proc`` until one finds nothing new (a process may fork as it
    is found); a pass costs about 5 us per process. Linux only; elsewhere nothing. Returns the pids
    killed."""
    wanted = [b"ALLOCATOR_ALLOCATION_ID=" + allocation_id.encode()]
    if placement:
        wanted.append(b"ALLOCATOR_PLACEMENT=" + placement.encode())
    killed: list[int] = []
    for _ in range(_KILL_PASSES):
        found = [pid for pid in _processes_with(wanted) if pid not in killed]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:  # gone meanwhile
                pass
        if not found:
            break
    return killed


_KILL_PASSES = 5


def _processes_with(entries: list[bytes]) -> list[int]:
    """This user's processes, this one aside, whose environment holds every one of ``entries``
    ("NAME=value"); none where there is no ``/proc``."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    me, uid, pids = os.getpid(), os.geteuid(), []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
            if entries[0] not in environ or not set(entries) <= set(environ.split(b"\0")):
                continue
            if int(name) != me and os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except OSError:  # gone, or not ours to read
            continue
    return pids
