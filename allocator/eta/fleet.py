"""What the simulation is made of: its hosts, GPUs, requests and allocations, read from the
ledger's own fields, and the constants it shares with the Lua (``lua/includes/*.lua``)."""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..keys import gpu_ord_score


#: Statistic of the history estimate used for simulated run times (see docs/benchmarks.md, ETA).
DEFAULT_STAT = "p50"
#: An allocation past its expected end is assumed to run this many times its overrun longer.
DEFAULT_OVERDUE_FACTOR = 1.0
#: The cache written by the scheduler tick is used while younger than this (seconds).
DEFAULT_MAX_AGE_S = 5.0

RESERVE_LIMIT = 256  # reservation(req, now, 256) in queue.lua
PREEMPT_LIMIT = 128  # preempt_for(req, now, 128) in queue.lua
BEST_WINDOW = 8  # BEST_WINDOW in placement.lua: fitting hosts best fit compares
FIRST_PAGE = 4  # FIRST_PAGE in placement.lua: the first page a first-fit walk reads
BAND = 4398046511104  # 2^42: pending score per priority band


def _front_score(priority: int, seq: int) -> float:
    """A task's score back at the front of its priority, original sequence kept (requeue_task)."""
    return (3 - priority) * BAND + seq
BACK = 2199023255552  # 2^41: added for tasks not requeued at the front

_ALLOC_FIELDS = ("host", "gpus", "cores", "shared_millis", "ram_mb", "priority", "activated", "slots",
                 "task_type", "kind", "state", "expected_ms", "unbounded")
_TASK_FIELDS = ("kind", "payload", "seq", "state")
_META = ("_at", "_cost_ms", "_pending")
_HOST = operator.itemgetter(2)
_POS = operator.itemgetter(3)
_ID = operator.itemgetter(1)


def _milli_free(cap: int, free: int) -> int:
    """milli_free of ledger.lua: thousandths of a GPU of grantable memory cap that are free."""
    if cap <= 0 or free <= 0:
        return 0
    return free * 1000 // cap


def _stranded(h: _Host, gm: int, cpu: int, ram: int) -> int:
    """stranded of ledger.lua: of gm thousandths of a GPU free on h, those its free CPU (cpu
    millicores) or free RAM (ram MiB) cannot feed at h's own cores per GPU and RAM per GPU."""
    if gm <= 0:
        return 0
    n = len(h.gpus)
    by_cpu = cpu * n // h.ncores if h.ncores > 0 else 0
    by_ram = ram * n * 1000 // h.ram if h.ram > 0 else 0
    return max(0, gm - by_cpu, gm - by_ram)


def to_datetime(ms: int | float | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)



# -- the simulated ledger ------------------------------------------------------------------------

class _Gpu:
    __slots__ = ("pos", "uuid", "model", "cap", "used", "n", "member", "ordscore")

    def __init__(self, pos: int, uuid: str, model: str, cap: int, used: int, n: int, member: str, ordscore: int):
        self.pos, self.uuid, self.model, self.cap, self.used, self.n = pos, uuid, model, cap, used, n
        self.member, self.ordscore = member, ordscore

    @property
    def free(self) -> int:
        v = self.cap - self.used
        return v if v > 0 else 0


class _Host:
    __slots__ = ("id", "ord", "ready", "labels", "reserve", "cfree", "shared", "ram", "ram_used", "gpus",
                 "indexed", "slots", "slots_used", "catalog", "ncores", "taken")

    def __init__(self, hid: str, h: dict[str, str]) -> None:
        self.id = hid
        self.ord = int(h.get("ord") or 0)
        self.ready = h.get("state") == "ready"
        self.labels = json.loads(h.get("labels") or "{}") or {}
        self.reserve = int(h.get("reserve_gpus") or 0)
        self.cfree = int(h.get("cfree") or 0)
        self.shared = int(h.get("shared") or 0)
        self.ram = int(h.get("ram") or 0)
        self.ram_used = int(h.get("ram_used") or 0)
        self.slots = int(h.get("slots") or 0)
        self.slots_used = int(h.get("slots_used") or 0)
        try:
            cores = json.loads(h.get("cores") or "[]")
        except ValueError:
            cores = []
        self.ncores = len(cores) if isinstance(cores, list) else 0
        # On a host an update left overcommitted, a grant may hold cores the host no longer
        # lists: its release gives back only the listed ones it holds (return_grant), so the
        # simulation needs the ids still taken. Elsewhere every granted core comes back.
        self.taken: frozenset[str] | None = None
        if h.get("overcommitted") == "1" and isinstance(cores, list):
            cmap = h.get("cmap") or ""
            self.taken = frozenset(str(c) for i, c in enumerate(cores) if cmap[i:i + 1] == "0")
        self.catalog: frozenset[str] = frozenset()
        self.gpus: list[_Gpu] = []
        for p in range(int(h.get("ngpu") or 0)):
            k = f"g{p}:"
            self.gpus.append(_Gpu(p, h.get(k + "uuid", ""), h.get(k + "model", ""),
                                  int(h.get(k + "total") or 0) - int(h.get(k + "ext") or 0),
                                  int(h.get(k + "used") or 0), int(h.get(k + "n") or 0),
                                  f"{hid}#{p}", gpu_ord_score(self.ord, p)))
        self.indexed = False

    @property
    def cpu(self) -> int:
        v = self.cfree * 1000 - self.shared
        return v if v > 0 else 0

    @property
    def ramf(self) -> int:
        v = self.ram - self.ram_used
        return v if v > 0 else 0

    @property
    def slotf(self) -> int:
        v = self.slots - self.slots_used
        return v if v > 0 else 0


class _Req:
    """A pending task's place request (the payload JSON of ``Keys.task(id)``)."""

    __slots__ = ("id", "priority", "mode", "gpus", "gpu_mem", "models", "cpu_millis", "exclusive", "ram",
                 "ttl_ms", "expected_ms", "preempt", "selector", "task_type", "kind", "seq", "slots", "services",
                 "pin", "shape")

    def __init__(self, tid: str, payload: dict[str, Any], kind: str, seq: int) -> None:
        self.id = tid
        self.priority = int(payload.get("priority", 1))
        self.mode = payload.get("strategy") or "best"
        self.gpus = int(payload.get("gpus") or 0)
        self.gpu_mem = int(payload.get("gpu_mem") or 0)
        models = payload.get("models")
        self.models = frozenset(models) if models else None
        self.cpu_millis = int(payload.get("cpu_millis") or 0)
        self.exclusive = bool(payload.get("exclusive"))
        self.ram = int(payload.get("ram") or 0)
        # A job without a time limit: its TTL bounds only its wait, neither its run nor its estimate.
        self.ttl_ms = 0 if payload.get("unbounded") else int(payload.get("ttl_ms") or 0)
        self.expected_ms = int(payload.get("expected_ms") or 0)
        self.preempt = bool(payload.get("preempt"))
        sel = payload.get("selector")
        self.selector = {k: [str(x) for x in v] for k, v in sel.items()} if sel else None
        self.task_type = payload.get("task_type") or ""
        self.kind = kind
        self.seq = seq
        self.slots = int(payload.get("slots") or 0)
        services = payload.get("services")
        self.services = tuple(services) if services else None
        self.pin = payload.get("only") or None  # a request pinned to one host (API policies)
        self.shape = (self.gpus, self.gpu_mem, self.models, self.cpu_millis, self.ram,
                      json.dumps(self.selector, sort_keys=True) if self.selector else None,
                      self.priority >= 3, self.slots, self.services)


class _Alloc:
    __slots__ = ("id", "host", "grants", "cores", "shared", "ram", "priority", "kind", "start", "release",
                 "pass_end", "byprio", "alive", "slots", "by_ttl")

    def __init__(self, aid: str, host: str, grants: list[tuple[int, str, int]], cores: int, shared: int, ram: int,
                 priority: int, kind: str, start: int, release: float | None, pass_end: float | None) -> None:
        self.id, self.host, self.grants, self.cores, self.shared, self.ram = aid, host, grants, cores, shared, ram
        self.priority, self.kind, self.start, self.release, self.pass_end = priority, kind, start, release, pass_end
        self.byprio = priority * 10**13 + (10**13 - 1 - start)
        self.alive = True
        self.slots = 0
        self.by_ttl = False  # its simulated end is its deadline: the reaper ends it, with others due then


@dataclass
class Snapshot:
    """What the simulation starts from: a consistent read of the ledger (see ``read_snapshot``)."""

    now: int
    hosts: dict[str, dict[str, str]]
    allocs: list[dict[str, Any]]  # {id, host, grants [(pos, uuid, MiB)], cores (count), shared, ram, priority,
    #                                kind, start, task_type, expires, end (the ends index)}
    pending: list[tuple[str, float, str, str, int]]  # (id, score, payload JSON, kind, seq), in line order
    durations: dict[str, dict[str, Any]]
    pass_depth: int = 100
    scan_cap: int = 2048
    recovering: bool = False
    catalogs: dict[str, set[str]] = field(default_factory=dict)  # host -> services it can run
    read_ms: float = 0.0
    delayed: dict[str, int] = field(default_factory=dict)  # task in line -> not before (ms), a retry's interval
    # Running function tasks -> (payload, seq): what a simulated preemption puts back in line. Read
    # only when a task in line may preempt.
    jobs: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Function tasks in line whose RQ job expires (RQ's ``ttl``) -> when (ms): the pass drops such
    # a task (reason job_gone) when it would place it or preempt for it once its job is gone.
    rq_gone: dict[str, int] = field(default_factory=dict)
    # Whether the model and the label host sets are in step with the hosts (allowed_hosts in
    # placement.lua): a walk that passes over many hosts then goes on from the list of those it may use.
    name_sets: tuple[bool, bool] = (True, True)


def _hist(durations: dict[str, dict[str, Any]], task_type: str | None, key: str) -> int | None:
    if not task_type:
        return None
    e = durations.get(task_type)
    if not isinstance(e, dict):
        return None
    try:
        v = float(e.get(key) or 0)
    except (TypeError, ValueError):
        return None
    return int(v) if v > 0 else None
