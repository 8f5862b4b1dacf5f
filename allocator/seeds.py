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
import json
import logging
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .client import Allocator, new_allocation_id
from .errors import AllocationEnded, AllocationNotFound, InsufficientResources, InvalidRequest, Refused
from .models import MAX_SECONDS, SEED_KEY, Allocation, AllocationRequest, Capacity, HostCapacity, Priority, parse_service_names
from .services import ServiceCatalog, ServiceFailed, held, wait_for_services
from .units import parse_cpu_millis, parse_memory_mb

if TYPE_CHECKING:
    from .agent.services import ServiceSupervisor

log = logging.getLogger(__name__)

MANAGER_API = "AllocationManager"
RESOURCE_ALLOCATOR_API = "ResourceAllocator"
MAX_AGE_HOURS = MAX_SECONDS // 3600  # ten years, the longest TTL a request may give


class NotAllocated(Refused, ValueError):
    """Seed 002's ValueError for a refusal other than a lack of resources (the ledger being
    rebuilt by ``allocator recover``): its controllers catch ValueError alone. ``code`` is the
    refusal's own."""

    default_message = "the allocation was refused"

    def __init__(self, refused: Refused) -> None:
        self.code = refused.code
        super().__init__(refused.message, details=refused.details)

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
    """ISO-8601 UTC in whole seconds with a trailing Z, as the seeds print timestamps
    ("2025-12-08T19:00:00Z"): one form always, so a client parsing it with the seed's format
    does not fail on the calls that happen to fall between two seconds."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def _num(x: float) -> int | float:
    """Whole amounts as int (the seeds show 8, not 8.0), fractions as float."""
    return int(x) if float(x).is_integer() else round(float(x), 3)


def _now(allocator: Allocator) -> float:
    """Seconds since the epoch on the ledger's clock (``Allocator.now_ms``: the injected one, else
    the Redis server's TIME), which stamped the records: ages, expiry and max-age cleanups then
    agree with the ledger whatever this machine's clock reads."""
    return allocator.now_ms() / 1000


def _seed_info(a: Allocation) -> dict[str, Any]:
    """This module's record of ``a``, its well-typed fields only. Requests may not bring the key
    (``models.SEED_KEY``), but a record restored by ``allocator recover`` or written by an older
    version holds whatever it was given, and one bad record must not break every listing."""
    info = a.metadata.get(SEED_KEY)
    if not isinstance(info, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(info.get("api"), str):
        out["api"] = info["api"]
    for name in ("workers", "worker_memory"):
        v = info.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[name] = v
    v = info.get("worker_cpu")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"):
        out["worker_cpu"] = v
    v = info.get("mcp_servers")
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        out["mcp_servers"] = v
    v = info.get("limits")
    if isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        out["limits"] = v
    return out


def _with_seed_record(req: AllocationRequest, record: dict[str, Any]) -> AllocationRequest:
    """``req`` with this module's record in its metadata, added after validation, which refuses
    the key from any caller."""
    return req.model_copy(update={"metadata": {**req.metadata, SEED_KEY: record}})


def _user_metadata(a: Allocation) -> dict[str, Any]:
    return {k: v for k, v in a.metadata.items() if k != SEED_KEY}


def _age_seconds(a: Allocation, now: float) -> int | float:
    """Seconds since ``a`` was made, whole ones as int (seed 000 shows 3600)."""
    return _num(max(0.0, now - a.created_at.timestamp()))


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


def _available(cap: Capacity) -> dict[str, Any]:
    return {
        "gpu_memory_mb": _num(cap.gpu_memory_mb.available),
        "cpu_cores": _num(cap.cpu_cores.available),
        "ram_mb": _num(cap.ram_mb.available),
    }


def _eta(allocator: Allocator, alloc: Allocation) -> datetime | None:
    """When the task starts: its activation time once placed; the ETA estimate while pending.

    The estimate comes from ``Allocator.estimated_start_time`` (allocator/eta/) when that
    exists; None (shown as null) when it does not or cannot tell.
    """
    if alloc.state != "pending":
        return alloc.activated_at or alloc.created_at
    estimate = getattr(allocator, "estimated_start_time", None)
    if estimate is None:
        return None
    try:
        return estimate(alloc.allocation_id)
    except Exception as exc:  # an estimate must never break an allocation reply
        log.warning("no ETA for %s: %s", alloc.allocation_id, exc)
        return None


def _requested(alloc: Allocation) -> dict[str, Any]:
    """What a pending request asks for, from its stored request (nothing is granted yet)."""
    r = alloc.request.get("resources") if isinstance(alloc.request, dict) else None
    r = r if isinstance(r, dict) else {}
    gpus, per_gpu = int(r.get("gpus") or 0), int(r.get("gpu_memory_mb") or 0)
    return {"gpus": gpus, "gpu_memory_mb": gpus * per_gpu, "cpu_cores": r.get("cpu_cores", 0), "ram_mb": int(r.get("ram_mb") or 0)}


def tool_result(allocator: Allocator, alloc: Allocation, cap: Capacity | None = None) -> dict[str, Any]:
    """Seed 004's success result for an allocation, placed or still in line.

    Extra keys beyond the seed: ``resources.host_id``, ``resources.gpus`` (per-GPU detail),
    ``resources.cpu_shared``, ``metadata.task_type``, ``metadata.expires_at`` and
    ``metadata.state`` (active, or pending while queued). A pending request has no GPU or core
    ids yet: ``gpu_id`` is null, ``cpu_cores`` is [], and the memory figures are what it asks for.
    ``cpu_cores`` is always a list of pinned core ids: a grant from the shared pool (0.5) has none,
    and its amount is ``cpu_shared``.
    """
    cap = cap if cap is not None else allocator.capacity()
    meta = {
        "allocation_time_ms": alloc.allocation_time_ms,
        "available_resources": _available(cap),
        "task_type": alloc.task_type,
        "expires_at": _iso(alloc.expires_at),
        "state": alloc.state,
    }
    if alloc.state == "pending":
        want = _requested(alloc)
        position = alloc.queue_position or allocator.position(alloc.allocation_id)
        resources = {"gpu_id": None, "gpu_memory_mb": want["gpu_memory_mb"], "cpu_cores": [], "ram_mb": want["ram_mb"],
                     "host_id": None, "gpus": [], "cpu_shared": 0}
    else:
        position = 0
        resources = {
            "gpu_id": f"gpu_{alloc.gpus[0].index}" if alloc.gpus else None,
            "gpu_memory_mb": alloc.gpu_memory_mb,
            "cpu_cores": list(alloc.cpu_cores),  # always the pinned ids (a list, as the seed shows); a share is in cpu_shared
            "ram_mb": alloc.ram_mb,
            "host_id": alloc.host_id,
            "gpus": [g.model_dump() for g in alloc.gpus],
            "cpu_shared": _num(alloc.cpu_shared),
        }
    return {
        "success": True,
        "allocation_id": alloc.allocation_id,
        "task_id": alloc.task_id,
        "resources": resources,
        "queue_position": position,
        "estimated_start_time": _iso(_eta(allocator, alloc)),
        "metadata": meta,
    }


def _gpus_ever_usable(h: HostCapacity, req: AllocationRequest) -> int:
    """How many GPUs of h the request could ever take: those of its models and size; for whole
    GPUs below critical priority, not the idle GPUs h keeps for critical work (a share may also
    go on GPUs others hold, which the reserve does not count)."""
    r = req.resources
    usable = sum(1 for g in h.gpus if (not r.gpu_model or g.model in r.gpu_model)
                 and (r.gpu_memory_mb is None or g.memory.total - g.memory.unmanaged >= r.gpu_memory_mb))
    if r.gpu_memory_mb is None and req.priority < Priority.CRITICAL:
        usable = min(usable, len(h.gpus) - h.reserve_gpus)
    return usable


def could_ever_fit(cap: Capacity, req: AllocationRequest) -> bool:
    """Whether some host could hold the request once everything on it is released.

    A queued request that no host can ever hold would wait forever, so the queueing entry points
    refuse it at once instead (with the ledger's reason). Advisory: read from one capacity
    snapshot; the ledger stays the judge of every placement.
    """
    r = req.resources
    for h in cap.hosts:
        if h.state == "lost" or not _takes_work(h):
            continue
        if req.selector and any(h.labels.get(k) not in vals for k, vals in req.selector.items()):
            continue
        if r.cpu_cores > h.cpu_cores.total or r.ram_mb > h.ram_mb.total or r.workers > h.worker_slots.total:
            continue
        if r.gpus and _gpus_ever_usable(h, req) < r.gpus:
            continue
        return True
    return False


def _takes_work(h: HostCapacity) -> bool:
    """A host registered without cores or RAM (an agent run with --no-psutil) is parked for good:
    the ledger places nothing, not even a request for none, on a host with no free CPU or RAM."""
    return h.cpu_cores.total > 0 and h.ram_mb.total > 0


def never_fits(cap: Capacity, req: AllocationRequest) -> InsufficientResources:
    """Why no host could ever hold the request (for one ``could_ever_fit`` rejected)."""
    r = req.resources
    hosts = [h for h in cap.hosts if h.state != "lost"]
    if not hosts:
        return InsufficientResources("no host is registered", code="NO_FIT")
    if not any(_takes_work(h) for h in hosts):
        return InsufficientResources("no host has CPU cores and RAM registered (a host without them takes no work)",
                                     code="NO_FIT")
    if r.gpus:
        model = f" of model {'|'.join(r.gpu_model)}" if r.gpu_model else ""
        if r.gpu_model and not any(g.model in r.gpu_model for h in hosts for g in h.gpus):
            return InsufficientResources(f"no host has a GPU{model}", code="INSUFFICIENT_GPUS",
                                         details={"field": "resource_requirements.gpu_model"})
        sizes = [g.memory.total - g.memory.unmanaged for h in hosts for g in h.gpus
                 if not r.gpu_model or g.model in r.gpu_model]
        if r.gpu_memory_mb is not None and (not sizes or max(sizes) < r.gpu_memory_mb):
            largest = f"the largest has {_num(max(sizes))} MiB" if sizes else "there is none"
            return InsufficientResources(f"no GPU{model} could ever hold {r.gpu_memory_mb} MiB: {largest}",
                                         code="INSUFFICIENT_GPU_MEMORY")

        most = max(_gpus_ever_usable(h, req) for h in hosts)
        if most < r.gpus:
            each = f" with {r.gpu_memory_mb} MiB each" if r.gpu_memory_mb else ""
            kept = (" (below critical priority, not the GPUs a host keeps for critical work)"
                    if r.gpu_memory_mb is None and req.priority < Priority.CRITICAL and any(h.reserve_gpus for h in hosts)
                    else "")
            return InsufficientResources(f"no host could ever hold {r.gpus} GPUs{each}{model}: at most {most} on one host{kept}",
                                         code="INSUFFICIENT_GPUS")
    most_cpu = max(h.cpu_cores.total for h in hosts)
    if r.cpu_cores > most_cpu:
        return InsufficientResources(f"no host could ever hold {_num(r.cpu_cores)} cores: the largest has {_num(most_cpu)}",
                                     code="INSUFFICIENT_CPU")
    most_ram = max(h.ram_mb.total for h in hosts)
    if r.ram_mb > most_ram:
        return InsufficientResources(f"no host could ever hold {r.ram_mb} MiB RAM: the largest has {_num(most_ram)} MiB",
                                     code="INSUFFICIENT_RAM")
    where = f" matching selector {req.selector}" if req.selector else ""
    return InsufficientResources(f"no host{where} could ever hold all of this request at once", code="NO_FIT")


ON_BUSY = ("queue", "fail")


def allocate_resources(
    task_id: str,
    task_type: str,
    resource_requirements: Mapping[str, Any],
    allocation_strategy: str = "best_fit",
    *,
    on_busy: str = "queue",
    allocator: Allocator | None = None,
    owner: str | None = None,
    expected_duration: float | None = None,
    metadata: dict[str, Any] | None = None,
    allocation_id: str | None = None,
) -> dict[str, Any]:
    """Seed 004's tool: allocate (or queue) and return its result dict; never raises for bad input.

    ``resource_requirements``: gpu_memory_mb (per GPU), cpu_cores, ram_mb, priority (0..3 or
    low/normal/high/critical), and optionally gpus, gpu_model, ttl_seconds (default 3600, the
    core's lease; null = none) and selector. In the result, ``resources.gpu_memory_mb`` is the
    total granted over all GPUs and ``resources.cpu_cores`` is always the list of pinned core ids:
    a fractional request (e.g. 0.5) gets no dedicated core, so it is [] and the amount lent from
    the host's shared pool is ``resources.cpu_shared`` (0.5).

    ``on_busy="queue"`` (the seed's behaviour, default here): a request that does not fit now
    waits in line and the result says ``queue_position`` (>= 1) and ``estimated_start_time`` (null
    when unknown); one that no host could ever hold is refused at once. ``on_busy="fail"``:
    refused unless it fits now. A placed request has ``queue_position`` 0 and its start time. A
    refusal is ``success: False`` with the ledger's reason.
    """
    a = allocator if allocator is not None else default_allocator()
    try:
        if not isinstance(task_id, str) or not task_id:
            raise InvalidRequest("task_id", f"required: a non-empty string, got {task_id!r}")
        if on_busy not in ON_BUSY:
            raise InvalidRequest("on_busy", f"expected 'queue' or 'fail', got {on_busy!r}")
        resources, options = _split_requirements(resource_requirements)
        fields = dict(task_id=task_id, task_type=task_type, strategy=allocation_strategy, owner=owner,
                      expected_duration=expected_duration, metadata=metadata, allocation_id=allocation_id, **options)
        if on_busy == "queue":
            cap, req = a.capacity(), a.build_request(resources, **fields)
            if not could_ever_fit(cap, req):
                raise never_fits(cap, req)  # it would wait forever: refuse now, changing nothing
        alloc = a.allocate(resources, on_busy=on_busy, **fields)
    except InvalidRequest as exc:
        field = _tool_field(exc.field)
        return _tool_failure(task_id, exc.code, f"{field}: {exc.reason}", field)
    except Refused as exc:
        field = exc.details.get("field") or _ledger_field(exc.code)
        if field is None and exc.code == "NO_FIT" and isinstance(resource_requirements, Mapping) \
                and resource_requirements.get("selector"):
            field = "resource_requirements.selector"  # fits nowhere, now or ever: where it may go
        return _tool_failure(task_id, exc.code, exc.message, field)
    if alloc.ended:  # an allocation_id given again after it ended
        return _tool_failure(task_id, AllocationEnded.code, f"allocation {alloc.allocation_id} has ended "
                             f"({alloc.state}); a new request needs a new id", "allocation_id")
    return tool_result(a, alloc)


# -- seed 000: AllocationManager -------------------------------------------------------------------

_MANAGER_RESOURCES = ("gpus", "gpu_memory_mb", "gpu_model", "cpu_cores", "ram_mb")


MAX_WORKERS = 100_000  # far above any fleet; bounds the arithmetic on untrusted input


def _whole(value: object, field: str) -> int:
    """A whole number >= 0 given to a seed constructor (2.0 counts), or InvalidRequest naming it."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(field, f"expected a whole number >= 0, got {value!r}")
    return value


def _core_count(value: object, field: str) -> int:
    """A host's core count from a seed constructor's total CPU (a number; 16.5 registers 16 cores)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value > 1 << 20:
        raise InvalidRequest(field, f"expected a number of cores >= 0, got {value!r}")
    return int(value)


def _seed_host(allocator: Allocator, host_id: str, cores: int, ram_mb: int, **fields: Any) -> dict[str, Any]:
    """The host a seed constructor registers from its totals: ``cores`` cores, ``ram_mb`` RAM and
    ``fields`` (worker slots, service ports), on top of what the ledger has for ``host_id``
    already, whose GPUs, labels, critical reserve, ports and other fields stay (an agent or an
    operator may have registered it: totals given to a seed constructor are its CPU and RAM, not
    the whole inventory). Its core ids stay, trimmed from the end or extended with ids it does not
    list (an agent's cpuset need not start at 0)."""
    h = allocator.redis.hgetall(allocator.keys.host(host_id))
    spec: dict[str, Any] = {"id": host_id}
    if h:
        labels = json.loads(h.get("labels") or "{}") or {}
        listed = json.loads(h.get("cores") or "[]") or []
        spec["labels"] = labels
        spec["reserve_gpus"] = int(h.get("reserve_gpus") or 0)
        spec["gpus"] = [{"index": int(h.get(f"g{p}:idx") or p), "uuid": h.get(f"g{p}:uuid") or f"{host_id}-gpu{p}",
                         "model": h.get(f"g{p}:model") or "GPU", "memory_mb": int(h.get(f"g{p}:total") or 0),
                         "used_mb": int(h.get(f"g{p}:ext") or 0)}
                        for p in range(int(h.get("ngpu") or 0))]
        if h.get("port_lo") and h.get("port_hi"):
            spec["service_ports"] = [int(h["port_lo"]), int(h["port_hi"])]
        if not isinstance(listed, list):
            listed = []
        # The listed core ids (an agent's cpuset, say) stay: trimmed from the end, or extended
        # with the next ids not listed.
        cores_given: Any = list(listed[:cores])
        taken, nxt = set(listed), 0
        while len(cores_given) < cores:
            while nxt in taken:
                nxt += 1
            cores_given.append(nxt)
            nxt += 1
        if "worker_slots" not in fields and int(h.get("slots") or 0) != len(listed):
            spec["worker_slots"] = int(h.get("slots") or 0)  # set on purpose: kept
    else:
        cores_given = cores
    spec.update(cpu_cores=cores_given, ram_mb=ram_mb, **fields)
    return spec


def _check_workers(workers: object) -> int:
    if workers is None:
        return 0
    workers = _whole(workers, "workers")  # 2.0 counts: JSON's integer, as the tool schema says
    if workers > MAX_WORKERS:
        raise InvalidRequest("workers", f"at most {MAX_WORKERS} workers per request, got {workers}")
    return workers


def _task_type(metadata: dict[str, Any] | None) -> str | None:
    """The seed passes the task type in metadata; record it natively when it is a string."""
    value = (metadata or {}).get("task_type")
    return value if isinstance(value, str) and value.strip() else None


def _host_slots(h: HostCapacity, worker_millis: int, worker_mb: int) -> int:
    """Workers one host can take now: its free worker slots, bounded by worker-sized shares of its
    free CPU/RAM (a request never spans hosts)."""
    if not h.takes_new_work:
        return 0
    slots = min(int(h.worker_slots.available), round(h.cpu_cores.available * 1000) // worker_millis)
    if worker_mb > 0:
        slots = min(slots, int(h.ram_mb.available) // worker_mb)
    return int(slots)


def _running_names(allocator: Allocator) -> list[str]:
    names: list[str] = []
    for inst in sorted((i for i in allocator.services() if i.state == "running"), key=lambda i: i.port):
        if inst.name not in names:
            names.append(inst.name)
    return names


#: Seed 000's default cluster capacity: cores, MiB of RAM, worker slots.
DEFAULT_CAPACITY = (16.0, 32768, 10)


class AllocationManager:
    """Seed 000's manager: jobs request workers (and MCP servers) and release them by id.

    ``AllocationManager(total_cpu=16.0, total_memory=32768, total_workers=10)`` registers one host
    (``host_id``, int(total_cpu) cores, total_memory MiB) — the seed's quick start; the totals may
    also be given by position, in that order. With an ``allocator`` (by name) and no totals it
    uses the hosts already registered. ``AllocationManager()`` with
    neither (the seed's direct use) works on the default ledger (``Allocator.from_env()``): on its
    hosts when it has some, else on one host of the seed's default capacity (``DEFAULT_CAPACITY``:
    16 cores, 32768 MiB, 10 worker slots), so that call never registers a host beside a fleet. A worker is one worker slot
    of a host plus ``worker_cpu`` cores and ``worker_memory`` MiB, all taken atomically by the
    ledger; a request's workers all land on one host. ``total_workers`` is the slot count of the
    host the manager registers; fleet hosts get theirs from their agent. Given any of the three
    totals, the manager registers its host, and a total left out takes the seed's default.

    MCP servers are the ledger's shared named services (docs/services.md): each name must be in
    the catalog of some host. In a fleet where no host has a catalog (the seed's quick start as
    written), the names are accepted and recorded only: nothing is started, and each is listed with
    status "not_started" and endpoint None. ``services`` (a catalog, a mapping or a YAML/JSON path) makes this
    manager run the services of its own host ``host_id`` in a background thread (in a fleet the
    host agents run them); ``service_ports`` is that host's port pool (default 9000-9099).
    ``request_resources`` waits up to ``service_wait_s`` for its servers to be running and returns
    their endpoints; servers still starting then are listed with status "starting" and endpoint
    None (``get_allocation`` shows the endpoint once it is up). A server that fails to start fails
    the allocation, which frees everything it took. ``close()`` stops the manager's services.
    """

    def __init__(
        self,
        total_cpu: float | None = None,
        total_memory: int | None = None,
        total_workers: int | None = None,
        *,
        allocator: Allocator | None = None,
        host_id: str = "local",
        worker_cpu: float = 1.0,
        worker_memory: int = 2048,
        services: ServiceCatalog | Mapping[str, Any] | str | None = None,
        service_ports: str | tuple[int, int] | None = None,
        service_address: str = "localhost",
        service_wait_s: float = 30.0,
    ) -> None:
        no_totals = total_cpu is None and total_memory is None and total_workers is None
        if allocator is None and no_totals:
            allocator = default_allocator()
            if allocator.redis.zcard(allocator.keys.hosts) == 0:
                total_cpu, total_memory, total_workers = DEFAULT_CAPACITY
        elif not no_totals:  # the seed's signature: each total left out has its default
            total_cpu = DEFAULT_CAPACITY[0] if total_cpu is None else total_cpu
            total_memory = DEFAULT_CAPACITY[1] if total_memory is None else total_memory
            total_workers = DEFAULT_CAPACITY[2] if total_workers is None else total_workers
        self.allocator = allocator if allocator is not None else default_allocator()
        self.host_id = host_id
        self.service_wait_s = service_wait_s
        self._supervisor: ServiceSupervisor | None = None
        self.total_workers = total_workers
        self.worker_millis = parse_cpu_millis(worker_cpu, "worker_cpu")
        self.worker_memory = parse_memory_mb(worker_memory, "worker_memory")
        if self.worker_millis <= 0:
            raise InvalidRequest("worker_cpu", "a worker needs some CPU")
        if total_cpu is not None:
            extra: dict[str, Any] = {"worker_slots": _whole(total_workers, "total_workers")}
            if service_ports is not None:
                extra["service_ports"] = service_ports
            try:
                host = _seed_host(self.allocator, host_id, _core_count(total_cpu, "total_cpu"),
                                  parse_memory_mb(total_memory, "total_memory"), **extra)
                self.allocator.register_host(host)
            except InvalidRequest as exc:
                raise exc.renamed({"worker_slots": "total_workers", "ram_mb": "total_memory",
                                   "cpu_cores": "total_cpu"}) from None
        if services is not None:
            from .agent.services import ServiceSupervisor

            self._supervisor = ServiceSupervisor(self.allocator, host_id, ServiceCatalog.load(services),
                                                 address=service_address, exit_when_host_gone=True)
            self._supervisor.publish()
            self._supervisor.start()

    def close(self) -> None:
        """Stops the services this manager runs and withdraws its catalog (no-op without one)."""
        if self._supervisor is not None:
            self._supervisor.close(withdraw=True)
            self._supervisor = None

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
        out["workers"] = workers
        return out

    def _failed(self, allocation_id: str, job_id: object, message: str, code: str, field: str | None = None) -> dict[str, Any]:
        """Seed 000's failure shape, plus ``error_code`` and ``error_field`` (the bad field, if any)."""
        return {"allocation_id": allocation_id, "status": "failed", "error": message, "job_id": job_id,
                "error_code": code, "error_field": field}

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
        *,
        allocation_id: str | None = None,
        **resources: Any,
    ) -> dict[str, Any]:
        """Reserves ``workers`` workers (plus explicit gpus/gpu_memory_mb/cpu_cores/ram_mb) for a job.

        Returns seed 000's shape with status "active", or status "failed" and the reason (never
        raises for bad input). ``mcp_servers`` are started (or shared) on the allocation's host and
        their endpoints returned, waiting up to ``service_wait_s`` (see the class docstring). A
        refused request leaves no record, so its allocation_id is not found afterwards; one whose
        server failed to start stays readable in state "failed".

        ``allocation_id`` (keyword only; default a new id): the caller's id, so that a retry after
        a lost reply places nothing twice. A request repeating an id gets the allocation made under
        it, as it stands, whatever else it asks for; one naming an allocation that has ended fails
        with ``ALLOCATION_ENDED`` (a new request needs a new id). A malformed id fails naming
        ``allocation_id``.
        """
        allocation_id = new_allocation_id() if allocation_id is None else allocation_id
        try:
            if not isinstance(job_id, str) or not job_id:
                raise InvalidRequest("job_id", f"required: a non-empty string, got {job_id!r}")
            n = _check_workers(workers)
            # Service names, checked as such even where they are only recorded (no host runs services).
            servers = parse_service_names(mcp_servers, "mcp_servers") or []
            wanted = self._resources(n, resources)
            if metadata is not None and not isinstance(metadata, dict):
                raise InvalidRequest("metadata", f"expected a JSON object, got {type(metadata).__name__}")
            run = servers if servers and self._fleet_runs_services() else []
            req = self.allocator.build_request(
                wanted,
                allocation_id=allocation_id,
                task_id=job_id,
                task_type=_task_type(metadata),
                priority=priority,
                ttl_seconds=ttl_seconds,
                metadata=metadata,
                services=run,
            )
            alloc = self.allocator.allocate_request(_with_seed_record(req, self._seed_record(n, servers)))
            if alloc.ended:  # an allocation_id given again after its allocation ended
                return self._failed(allocation_id, job_id, f"allocation {allocation_id} has ended ({alloc.state}); "
                                    "a new request needs a new id", AllocationEnded.code, "allocation_id")
            if run:
                wait_for_services(self.allocator, alloc.allocation_id, self.service_wait_s)
                alloc = self.allocator.require(alloc.allocation_id)
        except ServiceFailed as exc:
            return self._failed(allocation_id, job_id, exc.message, exc.code)
        except InvalidRequest as exc:
            # The seed's names: resources are keyword arguments, the task type comes in metadata.
            exc = exc.renamed({"services": "mcp_servers", "task_id": "job_id",
                               "task_type": "metadata.task_type"}).unprefixed("resources.")
            return self._failed(allocation_id, job_id, exc.message, exc.code, exc.field)
        except InsufficientResources as exc:
            msg = exc.message if exc.code == "INSUFFICIENT_SERVICE_PORTS" else (self._workers_message(n) if n else None) or exc.message
            return self._failed(allocation_id, job_id, msg, "INSUFFICIENT_WORKERS" if msg != exc.message else exc.code)
        except Refused as exc:  # e.g. RECOVERING while allocator recover rebuilds the ledger: never raised
            return self._failed(allocation_id, job_id, exc.message, exc.code)
        return self._request_result(alloc)

    def _fleet_runs_services(self) -> bool:
        """Whether any host offers named services (has a catalog): then MCP server names are
        services to start, each one some host must offer; else they are only recorded."""
        if self._supervisor is not None:
            return True
        return bool(self.allocator.redis.zrangebyscore(self.allocator.keys.svc_names, 1, "+inf", start=0, num=1))

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
            "workers": a.workers or int(info.get("workers", 0)),
            "gpus": [g.model_dump() for g in a.gpus],
            "gpu_memory_mb": a.gpu_memory_mb,
            "cpu_core_ids": list(a.cpu_cores),
            "host_id": a.host_id,
        }

    def _servers(self, a: Allocation) -> list[dict[str, Any]]:
        """Seed 000's MCP server entries (name, endpoint, status, plus server_name, port, host_id)."""
        if not a.services:  # recorded only, in a fleet that runs no services (see request_resources)
            return [{"name": name, "server_name": name, "endpoint": None, "status": "not_started", "port": None,
                     "host_id": a.host_id} for name in _seed_info(a).get("mcp_servers", [])]
        names = a.services
        got = held(self.allocator, a) if a.state == "active" else [None] * len(names)
        out = []
        for name, inst in zip(names, got):
            live = inst is not None and inst.state == "running"
            out.append({"name": name, "server_name": name, "endpoint": inst.endpoint if live else None,
                        "status": inst.state if inst is not None else a.state,
                        "port": inst.port if inst is not None else None, "host_id": a.host_id})
        return out

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
            for i in range(a.workers or int(info.get("workers", 0)))
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
        except InvalidRequest as exc:  # not an id at all (None, a number, "", too long): the seed's error shape
            return {"status": "error", "error": exc.message, "error_code": exc.code, "error_field": exc.field}
        repeat = not a.released_now
        # A request cancelled while it waited in line held nothing, so it frees nothing either.
        held = not repeat and a.host_id is not None
        released_at = a.released_at or a.created_at
        return {
            "status": "released",
            "allocation_id": a.allocation_id,
            "job_id": a.task_id,
            "workers_released": a.workers or int(_seed_info(a).get("workers", 0)) if held else 0,
            "cpu_freed": a.cpu_total if held else 0.0,
            "memory_freed": a.ram_mb if held else 0,
            "gpu_memory_freed": a.gpu_memory_mb if held else 0,
            "released_at": _iso(released_at),
            "duration_seconds": _num((released_at - a.created_at).total_seconds()),
            "already_released": repeat,
            "reason": a.release_reason,
        }

    # -- reads -------------------------------------------------------------------------------

    def _active(self) -> list[Allocation]:
        return self.allocator.list(state="active", limit=None)

    def _available_workers(self, cap: Capacity) -> int:
        return max((_host_slots(h, self.worker_millis, self.worker_memory) for h in cap.hosts), default=0)

    def get_capacity(self) -> dict[str, Any]:
        """Seed 000's capacity figures for the whole fleet, plus GPU totals.

        total/allocated_workers are the fleet's worker slots; available_workers is what the single
        freest host can take now (free slots, bounded by its free CPU and RAM in worker-sized
        shares: a request's workers never span hosts). ``running_mcp_servers``: names of the
        services running (each once, in port order).
        """
        cap = self.allocator.capacity()
        return {
            "total_cpu": float(cap.cpu_cores.total),
            "total_memory": _num(cap.ram_mb.total),
            "total_workers": int(cap.worker_slots.total),
            "allocated_cpu": float(cap.cpu_cores.allocated),
            "allocated_memory": _num(cap.ram_mb.allocated),
            "allocated_workers": int(cap.worker_slots.allocated),
            "available_cpu": float(cap.cpu_cores.available),
            "available_memory": _num(cap.ram_mb.available),
            "available_workers": self._available_workers(cap),
            "running_mcp_servers": _running_names(self.allocator),
            "active_allocations": cap.active_allocations,
            "total_gpu_memory": _num(cap.gpu_memory_mb.total),
            "allocated_gpu_memory": _num(cap.gpu_memory_mb.allocated),
            "available_gpu_memory": _num(cap.gpu_memory_mb.available),
            "total_gpus": cap.gpu_count,
        }

    def get_allocation(self, allocation_id: str) -> dict[str, Any] | None:
        """Seed 000's detail view of one allocation, or None when not found: unknown, purged, or
        no allocation id at all (None, "", a number, longer than 256 characters)."""
        try:
            a = self.allocator.get(allocation_id)
        except InvalidRequest:  # no id can name an allocation: not found, as the seed says
            return None
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
                "workers": a.workers or int(info.get("workers", 0)),
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
        """Seed 000's summaries, newest first; finished ones stay listed for the retention period.
        An unknown state or a malformed job id raises ``InvalidRequest`` naming it."""
        now = _now(self.allocator)
        if state == "releasing":
            # One of seed 000's states; a release here is one atomic step, so nothing is ever in it.
            return []
        try:
            found = self.allocator.list(state=state, task_id=job_id, limit=None)  # the seed sets no limit
        except InvalidRequest as exc:
            raise exc.renamed({"task_id": "job_id"}) from None
        return [
            {
                "allocation_id": a.allocation_id,
                "job_id": a.task_id,
                "state": a.state,
                "priority": a.priority,
                "workers": a.workers or int(_seed_info(a).get("workers", 0)),
                "age_seconds": _age_seconds(a, now),
                "is_expired": _is_expired(a, now),
            }
            for a in found
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


#: Seed 002's default capacity: cores, GiB of RAM.
RESOURCE_ALLOCATOR_DEFAULTS = (32.0, 128)


class ResourceAllocator:
    """Seed 002's allocator for lab instances: async checks, allocations and releases.

    Memory strings are read as everywhere in this project (allocator/units.py): Mi/Gi/Ki/Ti are
    binary and K/M/G/T decimal, as in Kubernetes ("2G" is 1908 MiB, not 2048), but a bare number is
    MiB, not bytes as in Kubernetes: "512" and 512 are 512 MiB. A lower-case "m" is refused.
    Allocations have no TTL (the seed has none); ``cleanup_expired_allocations`` ends old ones.
    The host registered from ``total_cpu`` gets int(total_cpu) cores, so 2.5 means 2 cores.
    Usage figures cover the whole fleet of the allocator; the allocation listing and the cleanup
    only touch allocations made through this API.
    """

    def __init__(
        self,
        total_cpu: float | None = None,
        total_memory_gb: int | None = None,
        *,
        allocator: Allocator | None = None,
        host_id: str = "local",
        register: bool | None = None,
    ) -> None:
        """The host, as ``AllocationManager`` does: given ``total_cpu`` or ``total_memory_gb`` (the
        seed's environment configuration passes both, from TOTAL_CPU_CORES and TOTAL_MEMORY_GB),
        it registers ``host_id`` with them, or updates that host when it is registered already; a
        total left out takes the seed's default (32 cores, 128 GiB). Given neither, an ``allocator``
        is used with the hosts it has; with no allocator either (the seed's plain
        ``ResourceAllocator()``), the default ledger is used with its hosts, and only a ledger with
        no host gets ``host_id`` with the seed's defaults, so that call never adds a host beside a
        fleet. ``register`` overrides the choice: True registers (or updates) ``host_id``, False
        registers nothing."""
        self.allocator = allocator if allocator is not None else default_allocator()
        no_totals = total_cpu is None and total_memory_gb is None
        if register is None:
            register = not no_totals or (allocator is None and self.allocator.redis.zcard(self.allocator.keys.hosts) == 0)
        if register:
            cores = _core_count(RESOURCE_ALLOCATOR_DEFAULTS[0] if total_cpu is None else total_cpu, "total_cpu")
            gb = RESOURCE_ALLOCATOR_DEFAULTS[1] if total_memory_gb is None else total_memory_gb
            ram_mb = _whole(gb, "total_memory_gb") * 1024
            try:
                self.allocator.register_host(_seed_host(self.allocator, host_id, cores, ram_mb))
            except InvalidRequest as exc:
                raise exc.renamed({"ram_mb": "total_memory_gb", "cpu_cores": "total_cpu"}) from None

    async def check_availability(self, resource_limits: Mapping[str, str]) -> bool:
        """True when the limits fit now, as ``allocate_resources`` would find (``Allocator.would_fit``:
        it grants nothing, and first ends leases past their TTL as a placement does). Invalid limits
        are logged and read False."""
        try:
            resources = _limits_to_resources(resource_limits)
            spot = await asyncio.to_thread(self.allocator.would_fit, resources, ttl_seconds=None)
        except InvalidRequest as exc:
            log.warning("invalid resource limits %r: %s", resource_limits, exc)
            return False
        return spot is not None

    async def allocate_resources(self, resource_limits: Mapping[str, str], *,
                                 allocation_id: str | None = None) -> dict[str, str]:
        """Allocates now; raises ValueError otherwise (InvalidRequest, InsufficientResources, or
        NotAllocated while the ledger is being rebuilt), as seed 002 documents.

        ``allocation_id`` (keyword only; default a new id): the caller's id, so that a retry after
        a lost reply places nothing twice. A call repeating an id returns the allocation made under
        it, as it stands, whatever limits it gives; one naming an allocation that has ended raises
        NotAllocated with code ``ALLOCATION_ENDED`` (a new request needs a new id). A malformed id
        raises InvalidRequest naming ``allocation_id``."""
        resources = _limits_to_resources(resource_limits)
        seed = {"api": RESOURCE_ALLOCATOR_API, "limits": {k: str(v) for k, v in resource_limits.items()}}
        req = _with_seed_record(self.allocator.build_request(resources, ttl_seconds=None, allocation_id=allocation_id), seed)
        try:
            a = await asyncio.to_thread(self.allocator.allocate_request, req)
        except Refused as exc:
            if isinstance(exc, ValueError):
                raise
            raise NotAllocated(exc) from exc
        if a.ended:  # an allocation_id given again after its allocation ended
            raise NotAllocated(AllocationEnded(f"allocation {a.allocation_id} has ended ({a.state}); a new request "
                                               "needs a new id", details={"field": "allocation_id"}))
        if a.state != "active":  # the id of a request someone queued through another entry point
            raise InvalidRequest("allocation_id", f"{a.allocation_id!r} names a request waiting in line, "
                                                  "not an allocation made now")
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
        return [a for a in self.allocator.list(state="active", limit=None)
                if _seed_info(a).get("api") == RESOURCE_ALLOCATOR_API]

    def get_active_allocations(self) -> dict[str, dict[str, str]]:
        """Active allocations made through this API, by id."""
        return {a.allocation_id: self._allocation_data(a) for a in self._own_active()}

    async def cleanup_expired_allocations(self, max_age_hours: float = 24) -> int:
        """Releases this API's allocations created more than ``max_age_hours`` ago; returns how many."""
        if (isinstance(max_age_hours, bool) or not isinstance(max_age_hours, (int, float))
                or not 0 <= max_age_hours <= MAX_AGE_HOURS):
            raise InvalidRequest("max_age_hours", f"must be a number of hours from 0 to {MAX_AGE_HOURS}, got {max_age_hours!r}")
        cutoff = _now(self.allocator) - max_age_hours * 3600
        old = [a for a in await asyncio.to_thread(self._own_active) if a.created_at.timestamp() < cutoff]
        released = 0
        for a in old:
            try:
                done = await asyncio.to_thread(self.allocator.release, a.allocation_id, reason="expired")
            except AllocationNotFound:  # purged meanwhile
                continue
            released += bool(done.released_now)  # another cleanup running at once may have ended it
        return released


__all__ = ["AllocationManager", "NotAllocated", "ResourceAllocator", "allocate_resources", "could_ever_fit", "default_allocator", "never_fits", "tool_result"]
