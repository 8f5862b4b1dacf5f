"""Seed-compatible entry points: thin layers over ``Allocator`` with the seeds' signatures and shapes.

Three earlier designs ("seeds") described the API their callers were written against:

* ``allocate_resources(...)`` — the resource_allocator tool (seed 004): one call, one result dict.
* ``AllocationManager`` — the cortex allocation manager (seed 000): jobs, workers, MCP servers.
* ``ResourceAllocator`` — the lab-instance controller's allocator (seed 002): async, k8s strings.

They keep their callers working while every change of capacity goes through the Redis ledger, so
several processes share one consistent view (the seeds kept state in memory). Each layer only
translates arguments and results; validation, placement and accounting stay in ``Allocator``.

Allocations made through ``AllocationManager`` and ``ResourceAllocator`` carry bookkeeping under
the reserved metadata key ``_seed`` (which API made them, worker count, MCP server names, the
original k8s strings); it is stripped from the metadata these layers return.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .client import Allocator, new_allocation_id
from .errors import AllocationNotFound, InsufficientResources, InvalidRequest
from .models import Allocation, Capacity, HostCapacity
from .units import parse_cpu_millis, parse_memory_mb

log = logging.getLogger(__name__)

SEED_KEY = "_seed"
MANAGER_API = "AllocationManager"
RESOURCE_ALLOCATOR_API = "ResourceAllocator"

_default: Allocator | None = None
_default_lock = threading.Lock()


def default_allocator() -> Allocator:
    """The process-wide ``Allocator.from_env()``, made on first use (seed callers pass none)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Allocator.from_env()
        return _default


# -- small shared helpers ------------------------------------------------------------------------


def _iso(dt: datetime | None) -> str | None:
    """ISO-8601 UTC with a trailing Z, as the seeds print timestamps."""
    if dt is None:
        return None
    dt = dt.astimezone(timezone.utc)
    spec = "seconds" if dt.microsecond == 0 else "milliseconds"
    return dt.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _num(x: float) -> int | float:
    """Whole amounts as int (the seeds show 8, not 8.0), fractions as float."""
    return int(x) if float(x).is_integer() else round(float(x), 3)


def _now(allocator: Allocator) -> float:
    """Seconds since the epoch on the allocator's clock (the injected one in tests)."""
    return allocator.clock() if allocator.clock is not None else time.time()


def _seed_info(a: Allocation) -> dict[str, Any]:
    info = a.metadata.get(SEED_KEY)
    return info if isinstance(info, dict) else {}


def _user_metadata(a: Allocation) -> dict[str, Any]:
    return {k: v for k, v in a.metadata.items() if k != SEED_KEY}


def _age_seconds(a: Allocation, now: float) -> float:
    return round(max(0.0, now - a.created_at.timestamp()), 3)


def _is_expired(a: Allocation, now: float) -> bool:
    """Expired = released by TTL, or still active past its deadline (not yet reaped)."""
    if a.release_reason == "expired":
        return True
    return a.state == "active" and a.expires_at is not None and a.expires_at.timestamp() <= now


def _ledger_field(code: str) -> str | None:
    """The request field a ledger refusal is about (for structured errors)."""
    return {
        "INSUFFICIENT_GPUS": "resource_requirements.gpus",
        "INSUFFICIENT_GPU_MEMORY": "resource_requirements.gpu_memory_mb",
        "INSUFFICIENT_CPU": "resource_requirements.cpu_cores",
        "INSUFFICIENT_RAM": "resource_requirements.ram_mb",
    }.get(code)


# -- seed 004: allocate_resources ------------------------------------------------------------------

_REQUIREMENT_RESOURCES = ("gpus", "gpu_memory_mb", "gpu_model", "cpu_cores", "ram_mb")
_REQUIREMENT_OPTIONS = ("priority", "ttl_seconds", "selector")


def _split_requirements(req: object) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits seed 004's flat requirements into resources and scheduling options."""
    if not isinstance(req, Mapping):
        raise InvalidRequest("resource_requirements", f"expected an object, got {type(req).__name__}")
    resources: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in req.items():
        if key in _REQUIREMENT_RESOURCES:
            resources[key] = value
        elif key in _REQUIREMENT_OPTIONS:
            options[key] = value
        else:
            raise InvalidRequest(f"resource_requirements.{key}", "unknown field")
    return resources, options


def _tool_field(field: str) -> str:
    """Names a core request field as the tool's caller wrote it."""
    if field.startswith("resources."):
        return "resource_requirements." + field[len("resources.") :]
    if field.split(".")[0] in _REQUIREMENT_OPTIONS:
        return "resource_requirements." + field
    if field == "strategy":
        return "allocation_strategy"
    return field


def _tool_failure(task_id: object, code: str, message: str, field: str | None) -> dict[str, Any]:
    return {
        "success": False,
        "task_id": task_id,
        "allocation_id": None,
        "error": {"code": code, "message": message, "field": field},
        "queue_position": None,
        "estimated_start_time": None,
    }


def _tool_success(a: Allocation, cap: Capacity) -> dict[str, Any]:
    """Seed 004's result, plus host_id, per-GPU detail and cpu_shared as extra keys."""
    return {
        "success": True,
        "allocation_id": a.allocation_id,
        "task_id": a.task_id,
        "resources": {
            "gpu_id": f"gpu_{a.gpus[0].index}" if a.gpus else None,
            "gpu_memory_mb": a.gpu_memory_mb,
            "cpu_cores": list(a.cpu_cores) if a.cpu_shared == 0 else _num(a.cpu_shared),
            "ram_mb": a.ram_mb,
            "host_id": a.host_id,
            "gpus": [g.model_dump() for g in a.gpus],
            "cpu_shared": _num(a.cpu_shared),
        },
        "queue_position": 0,
        "estimated_start_time": _iso(a.created_at),
        "metadata": {
            "allocation_time_ms": a.allocation_time_ms,
            "available_resources": {
                "gpu_memory_mb": _num(cap.gpu_memory_mb.available),
                "cpu_cores": _num(cap.cpu_cores.available),
                "ram_mb": _num(cap.ram_mb.available),
            },
            "task_type": a.task_type,
            "expires_at": _iso(a.expires_at),
        },
    }


def allocate_resources(
    task_id: str,
    task_type: str,
    resource_requirements: Mapping[str, Any],
    allocation_strategy: str = "best_fit",
    *,
    allocator: Allocator | None = None,
) -> dict[str, Any]:
    """Seed 004's tool: allocate now and return its result dict; never raises for bad input.

    ``resource_requirements``: gpu_memory_mb (per GPU), cpu_cores, ram_mb, priority (0..3 or
    low/normal/high/critical), and optionally gpus, gpu_model, ttl_seconds (default 3600, the
    core's lease; null = none) and selector. In the result, ``resources.gpu_memory_mb`` is the
    total granted over all GPUs and ``resources.cpu_cores`` lists the pinned core ids — for a
    fractional request (e.g. 0.5) it is the amount lent from the host's shared pool instead, as a
    number, because no core id is dedicated. Placement is immediate (fail fast): a success has
    ``queue_position`` 0 and ``estimated_start_time`` = now; a request that does not fit returns
    ``success: False`` with the ledger's reason rather than a queue slot.
    """
    a = allocator if allocator is not None else default_allocator()
    try:
        resources, options = _split_requirements(resource_requirements)
        alloc = a.allocate(resources, task_id=task_id, task_type=task_type, strategy=allocation_strategy, **options)
    except InvalidRequest as exc:
        return _tool_failure(task_id, exc.code, exc.message, _tool_field(exc.field))
    except InsufficientResources as exc:
        return _tool_failure(task_id, exc.code, exc.message, _ledger_field(exc.code))
    return _tool_success(alloc, a.capacity())


# -- seed 000: AllocationManager -------------------------------------------------------------------

_MANAGER_RESOURCES = ("gpus", "gpu_memory_mb", "gpu_model", "cpu_cores", "ram_mb")


def _check_workers(workers: object) -> int:
    if workers is None:
        return 0
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InvalidRequest("workers", f"expected a whole number of workers >= 0, got {workers!r}")
    return workers


def _check_mcp_servers(names: object) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise InvalidRequest("mcp_servers", f"expected a list of server names, got {names!r}")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise InvalidRequest("mcp_servers", "every server name must be a non-empty string")
    return list(names)


def _task_type(metadata: dict[str, Any] | None) -> str | None:
    """The seed passes the task type in metadata; record it natively when it is a string."""
    value = (metadata or {}).get("task_type")
    return value if isinstance(value, str) and value.strip() else None


def _host_slots(h: HostCapacity, worker_millis: int, worker_mb: int) -> int:
    """Worker-sized slots in one host's free CPU/RAM (a request never spans hosts)."""
    if h.state != "ready":
        return 0
    slots = round(h.cpu_cores.available * 1000) // worker_millis
    if worker_mb > 0:
        slots = min(slots, int(h.ram_mb.available) // worker_mb)
    return int(slots)


def _host_total_slots(h: HostCapacity, worker_millis: int, worker_mb: int) -> int:
    slots = round(h.cpu_cores.total * 1000) // worker_millis
    if worker_mb > 0:
        slots = min(slots, int(h.ram_mb.total) // worker_mb)
    return int(slots)


class AllocationManager:
    """Seed 000's manager: jobs request workers (and MCP servers) and release them by id.

    ``AllocationManager(total_cpu=16.0, total_memory=32768, total_workers=10)`` registers one host
    (``host_id``, int(total_cpu) cores, total_memory MiB) — the seed's quick start. With an
    ``allocator`` and no totals it uses the hosts already registered. A worker is ``worker_cpu``
    cores and ``worker_memory`` MiB; a request's workers all land on one host. ``total_workers``
    caps the workers held at once; the ledger cannot see that cap, so it is checked before placing
    and two managers racing may exceed it (CPU and RAM accounting stay exact).
    """

    def __init__(
        self,
        allocator: Allocator | None = None,
        *,
        total_cpu: float | None = None,
        total_memory: int | None = None,
        total_workers: int | None = None,
        host_id: str = "local",
        worker_cpu: float = 1.0,
        worker_memory: int = 2048,
    ) -> None:
        self.allocator = allocator if allocator is not None else default_allocator()
        self.total_workers = total_workers
        self.worker_millis = parse_cpu_millis(worker_cpu, "worker_cpu")
        self.worker_memory = parse_memory_mb(worker_memory, "worker_memory")
        if self.worker_millis <= 0:
            raise InvalidRequest("worker_cpu", "a worker needs some CPU")
        if total_workers is not None and (isinstance(total_workers, bool) or total_workers < 0):
            raise InvalidRequest("total_workers", f"must be a whole number >= 0, got {total_workers!r}")
        if total_cpu is not None or total_memory is not None:
            self.allocator.register_host(id=host_id, cpu_cores=int(total_cpu or 0), ram_mb=total_memory or 0)

    @property
    def worker_cpu(self) -> float:
        return self.worker_millis / 1000

    # -- requests --------------------------------------------------------------------------

    def _resources(self, workers: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Explicit resources plus ``workers`` worker-sized shares of CPU and RAM."""
        unknown = [k for k in extra if k not in _MANAGER_RESOURCES]
        if unknown:
            raise InvalidRequest(unknown[0], "unknown field")
        out = dict(extra)
        millis = parse_cpu_millis(extra.get("cpu_cores", 0)) + workers * self.worker_millis
        out["cpu_cores"] = millis / 1000
        out["ram_mb"] = parse_memory_mb(extra.get("ram_mb", 0), "ram_mb") + workers * self.worker_memory
        return out

    def _failed(self, allocation_id: str, job_id: object, message: str, code: str) -> dict[str, Any]:
        return {"allocation_id": allocation_id, "status": "failed", "error": message, "job_id": job_id, "error_code": code}

    def _workers_message(self, requested: int) -> str | None:
        """Seed wording when the worker count is what does not fit; None when it fits."""
        available = self._available_workers(self.allocator.capacity())
        if requested > available:
            return f"Insufficient workers: requested {requested}, available {available}"
        return None

    def request_resources(
        self,
        job_id: str,
        mcp_servers: list[str] | None = None,
        workers: int | None = None,
        priority: str = "normal",
        ttl_seconds: float | None = 3600,
        metadata: dict[str, Any] | None = None,
        **resources: Any,
    ) -> dict[str, Any]:
        """Reserves ``workers`` workers (plus explicit gpus/gpu_memory_mb/cpu_cores/ram_mb) for a job.

        Returns seed 000's shape with status "active", or status "failed" and the reason (never
        raises for bad input). MCP servers are recorded and echoed with ``endpoint: None`` and
        status "requested": starting them (ports, endpoints) is a later issue. A refused request
        leaves no record, so its allocation_id is not found afterwards.
        """
        allocation_id = new_allocation_id()
        try:
            n = _check_workers(workers)
            servers = _check_mcp_servers(mcp_servers)
            wanted = self._resources(n, resources)
            if metadata is not None and not isinstance(metadata, dict):
                raise InvalidRequest("metadata", f"expected a JSON object, got {type(metadata).__name__}")
            if n and self.total_workers is not None and (msg := self._workers_message(n)):
                return self._failed(allocation_id, job_id, msg, "INSUFFICIENT_WORKERS")
            alloc = self.allocator.allocate(
                wanted,
                allocation_id=allocation_id,
                task_id=job_id,
                task_type=_task_type(metadata),
                priority=priority,
                ttl_seconds=ttl_seconds,
                metadata={**(metadata or {}), SEED_KEY: self._seed_record(n, servers)},
            )
        except InvalidRequest as exc:
            return self._failed(allocation_id, job_id, exc.message, exc.code)
        except InsufficientResources as exc:
            msg = (self._workers_message(n) if n else None) or exc.message
            return self._failed(allocation_id, job_id, msg, "INSUFFICIENT_WORKERS" if msg != exc.message else exc.code)
        return self._request_result(alloc)

    def _seed_record(self, workers: int, servers: list[str]) -> dict[str, Any]:
        return {
            "api": MANAGER_API,
            "workers": workers,
            "mcp_servers": servers,
            "worker_cpu": self.worker_cpu,
            "worker_memory": self.worker_memory,
        }

    def _request_result(self, a: Allocation) -> dict[str, Any]:
        info = _seed_info(a)
        return {
            "allocation_id": a.allocation_id,
            "status": a.state,
            "job_id": a.task_id,
            "mcp_servers": self._servers(a),
            "workers_allocated": self._workers(a),
            "resources": self._resource_summary(a, info),
            "ttl_seconds": _num(a.ttl_seconds) if a.ttl_seconds else None,
            "created_at": _iso(a.created_at),
            "expires_at": _iso(a.expires_at),
        }

    @staticmethod
    def _resource_summary(a: Allocation, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "cpu": a.cpu_total,
            "memory": a.ram_mb,
            "workers": int(info.get("workers", 0)),
            "gpus": [g.model_dump() for g in a.gpus],
            "gpu_memory_mb": a.gpu_memory_mb,
            "cpu_core_ids": list(a.cpu_cores),
            "host_id": a.host_id,
        }

    @staticmethod
    def _servers(a: Allocation) -> list[dict[str, Any]]:
        status = "requested" if a.state == "active" else a.state
        return [{"name": s, "endpoint": None, "status": status} for s in _seed_info(a).get("mcp_servers", [])]

    @staticmethod
    def _workers(a: Allocation) -> list[dict[str, Any]]:
        info = _seed_info(a)
        status = "active" if a.state == "active" else a.state
        return [
            {
                "worker_id": f"worker-{a.task_id}-{i:03d}",
                "worker_type": "cortex-worker",
                "cpu": float(info.get("worker_cpu", 0)),
                "memory": int(info.get("worker_memory", 0)),
                "status": status,
                "endpoint": None,
                "host_id": a.host_id,
            }
            for i in range(int(info.get("workers", 0)))
        ]

    # -- release -----------------------------------------------------------------------------

    def release_resources(self, allocation_id: str) -> dict[str, Any]:
        """Releases an allocation (seed shape); a repeat reports "released" and frees nothing.

        ``already_released`` tells a repeat apart (its freed amounts are 0); the release script
        reports it, so of two concurrent releases exactly one reports the freed amounts.
        """
        try:
            a = self.allocator.release(allocation_id)
        except AllocationNotFound:
            return {"status": "error", "error": f"Allocation {allocation_id} not found"}
        repeat = not a.released_now
        released_at = a.released_at or a.created_at
        return {
            "status": "released",
            "allocation_id": a.allocation_id,
            "job_id": a.task_id,
            "workers_released": 0 if repeat else int(_seed_info(a).get("workers", 0)),
            "cpu_freed": 0.0 if repeat else a.cpu_total,
            "memory_freed": 0 if repeat else a.ram_mb,
            "gpu_memory_freed": 0 if repeat else a.gpu_memory_mb,
            "released_at": _iso(released_at),
            "duration_seconds": round((released_at - a.created_at).total_seconds(), 3),
            "already_released": repeat,
            "reason": a.release_reason,
        }

    # -- reads -------------------------------------------------------------------------------

    def _active(self) -> list[Allocation]:
        return self.allocator.list(state="active")

    def _allocated_workers(self) -> int:
        return sum(int(_seed_info(a).get("workers", 0)) for a in self._active() if _seed_info(a).get("api") == MANAGER_API)

    def _available_workers(self, cap: Capacity) -> int:
        slots = max((_host_slots(h, self.worker_millis, self.worker_memory) for h in cap.hosts), default=0)
        if self.total_workers is None:
            return slots
        return max(0, min(slots, self.total_workers - self._allocated_workers()))

    def _total_workers(self, cap: Capacity) -> int:
        if self.total_workers is not None:
            return self.total_workers
        return sum(_host_total_slots(h, self.worker_millis, self.worker_memory) for h in cap.hosts)

    def get_capacity(self) -> dict[str, Any]:
        """Seed 000's capacity figures for the whole fleet, plus GPU totals.

        available_workers counts worker-sized slots on the single freest host (a request's
        workers never span hosts), capped by total_workers minus the workers held.
        ``running_mcp_servers`` stays empty until MCP servers are really started.
        """
        cap = self.allocator.capacity()
        return {
            "total_cpu": float(cap.cpu_cores.total),
            "total_memory": _num(cap.ram_mb.total),
            "total_workers": self._total_workers(cap),
            "allocated_cpu": float(cap.cpu_cores.allocated),
            "allocated_memory": _num(cap.ram_mb.allocated),
            "allocated_workers": self._allocated_workers(),
            "available_cpu": float(cap.cpu_cores.available),
            "available_memory": _num(cap.ram_mb.available),
            "available_workers": self._available_workers(cap),
            "running_mcp_servers": [],
            "active_allocations": cap.active_allocations,
            "total_gpu_memory": _num(cap.gpu_memory_mb.total),
            "allocated_gpu_memory": _num(cap.gpu_memory_mb.allocated),
            "available_gpu_memory": _num(cap.gpu_memory_mb.available),
            "total_gpus": cap.gpu_count,
        }

    def get_allocation(self, allocation_id: str) -> dict[str, Any] | None:
        """Seed 000's detail view of one allocation, or None when unknown (or purged)."""
        a = self.allocator.get(allocation_id)
        if a is None:
            return None
        now = _now(self.allocator)
        info = _seed_info(a)
        return {
            "allocation_id": a.allocation_id,
            "job_id": a.task_id,
            "state": a.state,
            "priority": a.priority,
            "resources": {
                "cpu_allocated": a.cpu_total,
                "memory_allocated": a.ram_mb,
                "workers": int(info.get("workers", 0)),
                "gpus": [g.model_dump() for g in a.gpus],
                "gpu_memory_allocated": a.gpu_memory_mb,
                "host_id": a.host_id,
            },
            "mcp_servers": self._servers(a),
            "workers": self._workers(a),
            "timestamps": {
                "created_at": _iso(a.created_at),
                "activated_at": _iso(a.activated_at),
                "released_at": _iso(a.released_at),
                "age_seconds": _age_seconds(a, now),
            },
            "ttl_seconds": _num(a.ttl_seconds) if a.ttl_seconds else None,
            "is_expired": _is_expired(a, now),
            "metadata": _user_metadata(a),
        }

    def list_allocations(self, state: str | None = None, job_id: str | None = None) -> list[dict[str, Any]]:
        """Seed 000's summaries, newest first; finished ones stay listed for the retention period."""
        now = _now(self.allocator)
        return [
            {
                "allocation_id": a.allocation_id,
                "job_id": a.task_id,
                "state": a.state,
                "priority": a.priority,
                "workers": int(_seed_info(a).get("workers", 0)),
                "age_seconds": _age_seconds(a, now),
                "is_expired": _is_expired(a, now),
            }
            for a in self.allocator.list(state=state, task_id=job_id)
        ]

    def cleanup_expired_allocations(self) -> list[str]:
        """Releases allocations past their TTL; returns their ids.

        Placements also reap a few expired allocations on their way, so an id may already be
        gone by the time this runs; it is then not in the list (but is released).
        """
        return self.allocator.expire()


# -- seed 002: ResourceAllocator -------------------------------------------------------------------

_LIMIT_FIELDS = {"cpu": "cpu_cores", "memory": "ram_mb"}


def _limits_to_resources(resource_limits: object) -> dict[str, Any]:
    """Maps k8s-style limits {"cpu": "0.5", "memory": "512Mi"} to core fields; absent = 0."""
    if not isinstance(resource_limits, Mapping):
        raise InvalidRequest("resource_limits", f"expected a mapping, got {type(resource_limits).__name__}")
    for key in resource_limits:
        if key not in _LIMIT_FIELDS:
            raise InvalidRequest(f"resource_limits.{key}", "unknown resource; use cpu and memory")
    return {
        "cpu_cores": parse_cpu_millis(resource_limits.get("cpu", 0), "resource_limits.cpu") / 1000,
        "ram_mb": parse_memory_mb(resource_limits.get("memory", 0), "resource_limits.memory"),
    }


def _pct(u: float) -> float:
    return round(u, 2)


class ResourceAllocator:
    """Seed 002's allocator for lab instances: async checks, allocations and releases.

    Memory strings follow Kubernetes: Mi/Gi are binary, M/G decimal ("2G" is 1908 MiB, not 2048).
    Allocations have no TTL (the seed has none); ``cleanup_expired_allocations`` ends old ones.
    The host registered from ``total_cpu`` gets int(total_cpu) cores, so 2.5 means 2 cores.
    Usage figures cover the whole fleet of the allocator; the allocation listing and the cleanup
    only touch allocations made through this API.
    """

    def __init__(
        self,
        total_cpu: float = 32.0,
        total_memory_gb: int = 128,
        *,
        allocator: Allocator | None = None,
        host_id: str = "local",
        register: bool | None = None,
    ) -> None:
        """``register`` (default: only when no allocator is passed) registers ``host_id``."""
        self.allocator = allocator if allocator is not None else default_allocator()
        if register if register is not None else allocator is None:
            ram_mb = parse_memory_mb(total_memory_gb * 1024, "total_memory_gb")
            self.allocator.register_host(id=host_id, cpu_cores=int(total_cpu), ram_mb=ram_mb)

    async def check_availability(self, resource_limits: Mapping[str, str]) -> bool:
        """True when the limits fit now; changes nothing. Invalid limits are logged and read False."""
        try:
            resources = _limits_to_resources(resource_limits)
            spot = await asyncio.to_thread(self.allocator.would_fit, resources, ttl_seconds=None)
        except InvalidRequest as exc:
            log.warning("invalid resource limits %r: %s", resource_limits, exc)
            return False
        return spot is not None

    async def allocate_resources(self, resource_limits: Mapping[str, str]) -> dict[str, str]:
        """Allocates now; raises ValueError (InvalidRequest / InsufficientResources) otherwise."""
        resources = _limits_to_resources(resource_limits)
        seed = {"api": RESOURCE_ALLOCATOR_API, "limits": {k: str(v) for k, v in resource_limits.items()}}
        a = await asyncio.to_thread(self.allocator.allocate, resources, ttl_seconds=None, metadata={SEED_KEY: seed})
        return self._allocation_data(a)

    @staticmethod
    def _allocation_data(a: Allocation) -> dict[str, str]:
        """The string dict a controller stores in its resource status."""
        limits = _seed_info(a).get("limits", {})
        return {
            "allocation_id": a.allocation_id,
            "cpu": str(limits.get("cpu", _num(a.cpu_total))),
            "memory": str(limits.get("memory", f"{a.ram_mb}Mi")),
            "cpu_cores": str(_num(a.cpu_total)),
            "memory_mb": str(a.ram_mb),
            "host_id": a.host_id,
            "allocated_at": _iso(a.created_at) or "",
        }

    async def release_resources(self, allocation_data: Mapping[str, str]) -> None:
        """Releases what ``allocate_resources`` returned; repeats and unknown ids are harmless."""
        allocation_id = allocation_data.get("allocation_id") if isinstance(allocation_data, Mapping) else None
        if not allocation_id:
            raise InvalidRequest("allocation_id", "allocation data has no allocation_id")
        try:
            await asyncio.to_thread(self.allocator.release, allocation_id)
        except AllocationNotFound:
            log.warning("release of unknown allocation %s ignored", allocation_id)

    def get_resource_usage(self) -> dict[str, float]:
        """Seed 002's usage figures (fleet-wide: what this allocator can still give)."""
        cap = self.allocator.capacity()
        return {
            "total_cpu": float(cap.cpu_cores.total),
            "allocated_cpu": float(cap.cpu_cores.allocated),
            "available_cpu": float(cap.cpu_cores.available),
            "cpu_utilization": _pct(cap.cpu_cores.utilization_pct),
            "total_memory_mb": _num(cap.ram_mb.total),
            "allocated_memory_mb": _num(cap.ram_mb.allocated),
            "available_memory_mb": _num(cap.ram_mb.available),
            "memory_utilization": _pct(cap.ram_mb.utilization_pct),
            "active_allocations": cap.active_allocations,
        }

    def _own_active(self) -> list[Allocation]:
        return [a for a in self.allocator.list(state="active") if _seed_info(a).get("api") == RESOURCE_ALLOCATOR_API]

    def get_active_allocations(self) -> dict[str, dict[str, str]]:
        """Active allocations made through this API, by id."""
        return {a.allocation_id: self._allocation_data(a) for a in self._own_active()}

    async def cleanup_expired_allocations(self, max_age_hours: float = 24) -> int:
        """Releases this API's allocations created more than ``max_age_hours`` ago; returns how many."""
        cutoff = _now(self.allocator) - max_age_hours * 3600
        old = [a for a in await asyncio.to_thread(self._own_active) if a.created_at.timestamp() < cutoff]
        for a in old:
            await asyncio.to_thread(self.allocator.release, a.allocation_id, reason="expired")
        return len(old)


__all__ = ["AllocationManager", "ResourceAllocator", "allocate_resources", "default_allocator"]
