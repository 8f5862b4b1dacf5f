"""GPU memory watchdog: actual per-process GPU memory against each allocation's grant.

Few schedulers enforce GPU memory grants (Slurm and Ray only account for them); this one does.
Each agent round, the GPU processes a provider lists (NVML ``nvmlDeviceGetComputeRunningProcesses``
or the static file's simulated list) are mapped to allocations through the hash
``Keys.host_pids(host)`` (pid -> allocation id) that the worker writes for its work horses; a
process not in the map is attributed to its nearest mapped ancestor (a job's own subprocesses).

The same attribution gives the unmanaged memory the ledger must not grant: everything in use on
a GPU except what active allocations of this host use within their grants. Memory used beyond a
grant, and memory of processes whose allocation has ended (a host that was declared lost while
its jobs ran on), counts as unmanaged, so capacity stays truthful either way.

An allocation over its grant on a GPU starts an episode: one outbox event
``gpu_memory_exceeded`` and one count of ``allocator_gpu_memory_exceeded_total{host}``, and the
gauge ``allocator_gpu_memory_over_grant_bytes{host}`` shows the excess while it lasts. With
``enforce`` its processes on that GPU get SIGTERM, then SIGKILL after ``kill_grace_s``; the worker
sees its work horse die and releases the allocation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from ..client import Allocator
from . import _redis
from .inventory import HostInventory
from .metrics import GPU_MEMORY_EXCEEDED, GPU_MEMORY_OVER_GRANT, GPU_PROCESSES_STOPPED

log = logging.getLogger(__name__)

MIB = 1024 * 1024
EVENT_TYPE = "gpu_memory_exceeded"


@dataclass(frozen=True)
class Grant:
    """What an allocation holds, as far as the watchdog needs it."""

    allocation_id: str
    host_id: str
    active: bool
    gpu_mb: dict[str, int]  # GPU uuid -> MiB granted on it
    whole: frozenset[str] = frozenset()  # GPUs (uuids) it holds whole


@dataclass(frozen=True)
class Overuse:
    """An allocation using more memory on one GPU than it was granted there."""

    host_id: str
    allocation_id: str
    gpu_uuid: str
    used_mb: int
    granted_mb: int
    pids: tuple[int, ...]

    @property
    def excess_mb(self) -> int:
        return self.used_mb - self.granted_mb


@dataclass
class Attribution:
    unmanaged_mb: dict[str, int] = field(default_factory=dict)  # GPU uuid -> MiB
    overuse: list[Overuse] = field(default_factory=list)


def ancestor_owner(pid: int, pid_map: dict[int, str]) -> str | None:
    """The allocation of the nearest ancestor of ``pid`` in ``pid_map`` (None if none, or no such process)."""
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid in pid_map:
                return pid_map[parent.pid]
    except psutil.Error:
        return None
    return None


def attribute(
    inv: HostInventory,
    pid_map: dict[int, str],
    grants: dict[str, Grant],
    *,
    resolve: Callable[[int, dict[int, str]], str | None] | None = ancestor_owner,
) -> Attribution:
    """Splits each GPU's used memory into managed (within active grants) and unmanaged, and finds
    allocations over their grant. A process whose memory NVML cannot report counts as using none
    of it: the GPU's used memory is then all another tenant's as far as the ledger knows. That
    over-counts what is taken by that process's real use, never the other way: assuming it used
    its whole grant subtracted the grant from other tenants' memory when it used less, and the
    ledger then granted memory those tenants held."""
    out = Attribution()
    for unit in inv.gpus:
        used: dict[str, int] = {}
        unknown: set[str] = set()
        pids: dict[str, list[int]] = {}
        for proc in unit.processes:
            aid = pid_map.get(proc.pid)
            if aid is None and resolve is not None and pid_map:
                aid = resolve(proc.pid, pid_map)
            g = grants.get(aid) if aid else None
            if g is None or not g.active or g.host_id != inv.host_id:
                continue  # not ours (or no longer): unmanaged
            pids.setdefault(g.allocation_id, []).append(proc.pid)
            if proc.used_mb is None:
                unknown.add(g.allocation_id)
            else:
                used[g.allocation_id] = used.get(g.allocation_id, 0) + proc.used_mb
        managed = 0
        for aid, plist in pids.items():
            granted = grants[aid].gpu_mb.get(unit.uuid, 0)
            if unit.uuid in grants[aid].whole:
                # A GPU held whole is its holder's, all that other processes leave of it: its
                # grant is that room as the agent last rounded it up (--granularity-mb), so a
                # holder filling the GPU is not over it by the rounding.
                granted = max(granted, unit.memory_mb - (unit.used_mb - used.get(aid, 0)))
            if aid in unknown:
                continue  # no size to attribute: none of the used memory is counted as its
            managed += min(used.get(aid, 0), granted)
            if used.get(aid, 0) > granted:
                out.overuse.append(Overuse(inv.host_id, aid, unit.uuid, used[aid], granted, tuple(sorted(plist))))
        out.unmanaged_mb[unit.uuid] = max(0, unit.used_mb - managed)
    return out


def read_grants(allocator: Allocator, host_ids: Iterable[str]) -> tuple[dict[str, dict[int, str]], dict[str, Grant]]:
    """The pid maps of ``host_ids`` and the grants they point at, in two pipelined round trips."""
    hosts = list(host_ids)
    if not hosts:
        return {}, {}
    pipe = allocator.redis.pipeline(transaction=False)
    for h in hosts:
        pipe.hgetall(allocator.keys.host_pids(h))
    maps: dict[str, dict[int, str]] = {}
    for h, raw in zip(hosts, pipe.execute()):
        maps[h] = {int(p): a for p, a in raw.items() if p.isdigit()}
    ids = sorted({a for m in maps.values() for a in m.values()})
    grants: dict[str, Grant] = {}
    if ids:
        pipe = allocator.redis.pipeline(transaction=False)
        for a in ids:
            pipe.hmget(allocator.keys.alloc(a), "state", "host", "gpus")
        for a, (state, host, gpus) in zip(ids, pipe.execute()):
            if state is None:
                continue
            per_gpu: dict[str, int] = {}
            whole: set[str] = set()
            for g in _redis.as_list(json.loads(gpus or "[]")):
                per_gpu[g["uuid"]] = per_gpu.get(g["uuid"], 0) + int(g["memory_mb"])
                if g.get("whole"):
                    whole.add(g["uuid"])
            grants[a] = Grant(a, host or "", state == "active", per_gpu, frozenset(whole))
    return maps, grants


class Watchdog:
    """Reports (and with ``enforce`` stops) allocations over their GPU memory grant."""

    def __init__(self, allocator: Allocator, *, enforce: bool = False, kill_grace_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.allocator = allocator
        self.enforce = enforce
        self.kill_grace_s = kill_grace_s
        self.monotonic = monotonic
        self._open: dict[tuple[str, str, str], Overuse] = {}
        self._pending: dict[int, tuple[float, psutil.Process, str]] = {}  # pid -> (SIGKILL at, process, host)

    @property
    def tracked_hosts(self) -> set[str]:
        """Hosts with an open episode or a pending SIGKILL: observed every round until they clear."""
        return {k[0] for k in self._open} | {v[2] for v in self._pending.values()}

    def observe(self, host_id: str, overuse: list[Overuse]) -> list[dict[str, Any]]:
        """Takes one round's findings for a host; returns the events it emitted."""
        GPU_MEMORY_OVER_GRANT.labels(host=host_id).set(sum(o.excess_mb for o in overuse) * MIB)
        seen = {(host_id, o.allocation_id, o.gpu_uuid): o for o in overuse}
        for key in [k for k in self._open if k[0] == host_id and k not in seen]:
            del self._open[key]  # the episode ended (back under the grant, or the process is gone)
        events = []
        for key, o in seen.items():
            stopped = self._stop(o) if self.enforce else []
            if key in self._open:
                continue
            self._open[key] = o
            GPU_MEMORY_EXCEEDED.labels(host=host_id).inc()
            action = "reported" if not self.enforce else ("stopped" if stopped else "stop_failed")
            events.append(self._emit(o, action, stopped))
            log.warning("allocation %s uses %d MiB on GPU %s, granted %d MiB (pids %s): %s", o.allocation_id,
                        o.used_mb, o.gpu_uuid, o.granted_mb, ",".join(map(str, o.pids)), action)
        self._escalate(host_id)
        return events

    def _emit(self, o: Overuse, action: str, stopped: list[int]) -> dict[str, Any]:
        data = {"host": o.host_id, "gpu_uuid": o.gpu_uuid, "used_mb": o.used_mb, "granted_mb": o.granted_mb,
                "excess_mb": o.excess_mb, "pids": list(o.pids), "action": action, "stopped_pids": stopped}
        fields = {"type": EVENT_TYPE, "id": o.allocation_id, "ts": str(_redis.now_ms(self.allocator)),
                  "data": json.dumps(data)}
        self.allocator.redis.xadd(self.allocator.keys.events, fields)
        return {**fields, "data": data}

    def _stop(self, o: Overuse) -> list[int]:
        """SIGTERM to the allocation's processes on that GPU (once each); the pids signalled."""
        done = []
        for pid in o.pids:
            if pid in self._pending:
                done.append(pid)
                continue
            if pid <= 1 or pid == os.getpid():
                continue
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
            except psutil.Error as exc:
                log.error("could not stop pid %d of allocation %s: %s", pid, o.allocation_id, exc)
                continue
            GPU_PROCESSES_STOPPED.labels(host=o.host_id, signal="SIGTERM").inc()
            self._pending[pid] = (self.monotonic() + self.kill_grace_s, proc, o.host_id)
            done.append(pid)
        return done

    def _escalate(self, host_id: str) -> None:
        """SIGKILL for processes still alive ``kill_grace_s`` after their SIGTERM."""
        now = self.monotonic()
        for pid, (deadline, proc, host) in list(self._pending.items()):
            if host != host_id:
                continue
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                del self._pending[pid]
            elif now >= deadline:
                try:
                    proc.kill()
                    GPU_PROCESSES_STOPPED.labels(host=host, signal="SIGKILL").inc()
                except psutil.Error:
                    pass
                del self._pending[pid]
