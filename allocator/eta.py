"""Estimated start times: the pending line simulated against the expected releases.

The engine reads one snapshot of the ledger (hosts, active allocations with their start times and
expected ends, the pending line with each task's place request, the duration estimates) and runs
a discrete-event simulation of what the scheduler will do: a scheduling pass now, then after each
expected release a pass again, each pass being a Python mirror of the Lua pass
(``lua/includes/queue.lua``) over a Python mirror of the placement walk
(``lua/includes/placement.lua``):

- the walk: best fit over the free-GPU-memory index from the requested memory up (whole GPUs over
  the hosts by idle GPU count), comparing the first ``BEST_WINDOW`` hosts that fit by the GPU
  capacity they would strand, the idle GPUs they would break up and the CPU they would leave;
  worst fit from the top down, first fit in registration order over the schedulable hosts (falling
  back to best fit when the bounded walk stops at ``scan_cap``, and for CPU-only requests when it
  finds nothing), whole GPUs over the idle-GPU index, CPU-only requests over the CPU index;
  parking (a host with no free CPU or RAM leaves the indexes); a host's k best GPUs by the same
  rule; GPU models; label selectors; the critical reserve of idle GPUs;
- the pass: the first ``pass_depth`` tasks in line (priority, then front, then arrival); the first
  task that does not fit (after trying preemption when its strategy is ``priority``) gets an EASY
  reservation from the allocations' expected ends (the ``ends`` index, first 256); later tasks start
  on other hosts, or on the reserved host only when their expected end is before the shadow time;
  a pass that placed something is repeated at the same instant (what the scheduler's tick does a
  moment later), so a pass depth of 1 is strict FIFO without backfill; within a pass a refused
  request shape is not tried again (the Lua's memo; cleared by a preemption);
- worker slots, shared services (the host's catalog), requests pinned to one host;
- tasks waiting for a retry's interval (``{ns}:delayed``): skipped by every pass until then, and a
  pass at that time (the scheduler's tick).

``tests/test_eta.py`` checks on random fleets and lines that the simulated starts are exactly what
the real ledger then does when every allocation runs for exactly its expected duration.

Two notions of duration are kept apart. The pass's own view (reservation order, shadow time,
backfill test) is exactly what the Lua reads: the ``ends`` index for running allocations, and for
tasks the history's p80 per task type, else the hint, else the TTL. The *simulated release* of a
running allocation or of a task started in the simulation uses the engine's estimate: the history
estimate for the task type (``Keys.durations``, statistic ``stat``, p50 by default: it predicted
starts best in the OpenB replay), else the task's hint (``expected_ms``), else the prior (the
n-weighted median of that statistic over all task types), else its TTL, never beyond its TTL
deadline. An allocation already past its expected end is assumed to overrun as long again as it
has so far (``overdue_factor``): long-running outliers of a heavy-tailed type keep running.
Allocations with no estimate at all never end in the simulation, and tasks that only they could
make room for get no estimate (``None``). Not modelled: tasks that will arrive later (a
higher-priority arrival delays a waiting task beyond its estimate) and free service ports.

Cost: the snapshot is one pipelined read (consistent: ``WATCH`` on the outbox stream, retried);
payloads of pending tasks and records of active allocations are cached per id, since they do not
change while a task waits or an allocation runs. The simulation keeps the free-capacity indexes in
``SortedList`` s, so a walk costs O(log n) plus the members it looks at; and a request shape that
fitted nowhere is not walked again until a host it could use gains capacity and keeps it (the
freed hosts it could use are kept as suspects: once taken again, the no-fit holds again). A pass
asks each shape behind the blocked task once whether it fits nowhere and drops its tasks in one
sweep, and does not try a task whose every attempt its memo of refusals already refuses. The
reservation is not a walk over ``ends`` but the least of the hosts' fit points, kept per request
shape and host and recomputed only for hosts that changed (``_reserve_fit``). A pass after a
release is not run when it provably places nothing (``_still_quiet``). Each of these shortcuts is
exact: ``tests/test_eta.py`` checks them against the work they skip, and ``bench/eta_cost.py
--compare`` / ``bench/eta_replay.py --compare`` the estimates of two versions on the same line.
See ``docs/architecture.md`` (ETA, Cost) for the measured cost at 10,000 pending tasks on 1,213
hosts.
"""

from __future__ import annotations

import heapq
import json
from bisect import bisect_left, insort
import operator
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import redis
from sortedcontainers import SortedList

from .keys import FF_CLASSES, ff_class, gpu_ord_score

if TYPE_CHECKING:
    from .client import Allocator

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


class Simulation:
    """The ledger and the pass, in memory; ``run`` returns each pending task's simulated start."""

    def __init__(self, snap: Snapshot, *, stat: str = DEFAULT_STAT, overdue_factor: float = DEFAULT_OVERDUE_FACTOR,
                 reqs: dict[str, _Req] | None = None, use_prior: bool = True):
        self.now = snap.now
        self.depth = snap.pass_depth
        self.cap = snap.scan_cap
        self.durations = snap.durations
        self.stat_key = stat + "_ms"
        self.overdue_factor = overdue_factor
        self.prior = self._prior() if use_prior else None
        self.hosts: dict[str, _Host] = {}
        self.by_ord: list[_Host] = []
        self.gpu_of: dict[str, tuple[_Host, _Gpu]] = {}
        self.gpu_idx: SortedList = SortedList()
        self.gpu_idle: SortedList = SortedList()
        self.gpu_idle_ord: SortedList = SortedList()  # gpu_idle in registration order
        self.gpu_ord: SortedList = SortedList()
        # gpu_ffc: each free-memory class (ff_class) in ordinal order, as first fit merges them.
        self.gpu_ffc: list[SortedList] = [SortedList() for _ in range(FF_CLASSES)]
        self.cpu_idx: SortedList = SortedList()
        self._gidx: dict[str, int] = {}
        self._gidle: dict[str, int] = {}
        self._gord: dict[str, int] = {}  # member of gpu_ord -> its class in gpu_ffc
        self._cpu: dict[str, int] = {}
        self.allocs: dict[str, _Alloc] = {}
        self.ends: SortedList = SortedList()  # (pass_end, id): the `ends` index
        self.byprio: SortedList = SortedList()  # (score, id): preemption order (see _byprio_index)
        self._byprio_on = False
        self.releases: list[tuple[float, int, str]] = []
        self._n = 0
        self.pending: SortedList = SortedList()  # (score, id)
        self.score: dict[str, float] = {}
        self.tasks: dict[str, _Req] = {}
        self.started: dict[str, int] = {}
        self._started_order: list[str] = []
        self._idle: dict[str, int] = {}  # host -> GPUs with no holder and free memory
        self.idle_hosts: SortedList = SortedList()  # (that count, host), schedulable hosts
        self.freed: list[str] = []  # hosts that gained capacity, in order
        # (shape, exclude) -> how far `freed` was looked at since it last fitted nowhere; the shape
        # by its number (_skid) for tasks in line
        self._nofit: dict[tuple[Any, ...], int] = {}
        # (shape, exclude) -> [host, its version, mode] of hosts seen there that could fit (see _fits_nowhere)
        self._suspect: dict[tuple[Any, ...], list[list[Any]]] = {}
        self._refused: set[tuple[Any, ...]] = set()  # the current pass's refused shapes
        self._ever: dict[tuple[Any, ...], bool] = {}
        # For the reservation (see _reserve): a version per host, bumped whenever its capacity or
        # its entries in `ends` change, and its entries in `ends`, in order.
        self._hver: dict[str, int] = {}
        self._hends: dict[str, list[tuple[float, str]]] = {}
        self._hlog: list[str] = []  # hosts in the order their versions were bumped
        self._resv_heap: dict[tuple[Any, ...], tuple[list[tuple[Any, ...]], list[int]]] = {}
        self._resv_exact = True
        self._pass_ms: dict[str, int | None] = {}
        self._nw_known: dict[int, int] = {}  # shape (_nwkey) -> len(freed) when it last fitted nowhere
        # For skipping a pass that cannot place anything (see _still_quiet).
        self._changes = 0  # grants and finishes so far
        self._unproven = False  # the current pass refused something no no-fit memo speaks for
        self._last_fit: tuple[str, float] | None = None  # the last _reserve_fit
        self._quiet: tuple[Any, ...] | None = None
        self.skipped = 0  # passes known to place nothing, not run (counted in passes too)
        # The line's window as the last pass saw it, while the line is unchanged (_pver: changes
        # to `pending`): a pass after a release that placed nothing sees the same window.
        self._pver = 0
        self._window_seen: tuple[Any, ...] | None = None
        # Tasks in line that may not start yet (a retry's interval): id -> not-before ms. A pass
        # skips them as the Lua does; each time one becomes due, a pass runs then (the scheduler's
        # tick), with the line's caches invalidated (_arrive).
        self.hold: dict[str, int] = {}
        self.rq_gone = dict(snap.rq_gone)  # task in line -> when RQ discards its job (ms)
        self.dropped: set[str] = set()  # tasks the simulated pass dropped because their job was gone
        self.arrivals: list[tuple[int, str]] = []
        self.passes = 0
        self.events = 0
        for hid, h in snap.hosts.items():
            host = _Host(hid, h)
            host.catalog = frozenset(snap.catalogs.get(hid, ()))
            self.hosts[hid] = host
            for g in host.gpus:
                self.gpu_of[g.member] = (host, g)
        self.by_ord = sorted(self.hosts.values(), key=lambda x: (x.ord, x.id))
        for host in self.hosts.values():
            self._reindex(host, None)
        self._load_running([self._running(a) for a in snap.allocs])
        reqs = {} if reqs is None else reqs
        self._jobs = snap.jobs  # running function tasks: id -> (payload, seq), for preemption
        for tid, score, payload, kind, seq in snap.pending:
            req = reqs.get(tid)
            if req is None or req.seq != seq:  # seq: an id submitted again is another request
                try:
                    req = reqs[tid] = _Req(tid, json.loads(payload), kind, seq)
                except (ValueError, TypeError, AttributeError):
                    continue
            self.tasks[tid] = req
            self.score[tid] = score
            self.pending.add((score, tid))
            nb = snap.delayed.get(tid)
            if nb is not None and nb > self.now:
                self.hold[tid] = nb
                self.arrivals.append((nb, tid))
        heapq.heapify(self.arrivals)
        # Per task, as small ints (a shape tuple is slow to hash, and _pass looks them up for
        # every task in its window): the shape under which _pass may skip the task once the line
        # is blocked (None: never), and what the pass's memo of refusals knows it by, less the
        # host excluded or required (shape, strategy, priority, pin).
        self._shapes: dict[tuple[Any, ...], int] = {}
        self._sigs: dict[tuple[Any, ...], int] = {}
        self._skid: dict[str, int] = {}
        self._nwkey: dict[str, int | None] = {}
        self._sig: dict[str, int] = {}
        self._cpu_need: dict[str, int] = {}
        self._ram_need: dict[str, int] = {}
        for tid, r in self.tasks.items():
            self._index_task(tid, r)

    def _index_task(self, tid: str, r: _Req) -> None:
        self._skid[tid] = self._shapes.setdefault(r.shape, len(self._shapes))
        self._nwkey[tid] = self._skid[tid] if r.pin is None and r.cpu_millis > 0 and r.ram > 0 else None
        self._sig[tid] = self._sigs.setdefault((r.shape, r.mode, r.priority, r.pin), len(self._sigs))
        self._cpu_need[tid] = r.cpu_millis
        self._ram_need[tid] = r.ram

    def _job_task(self, aid: str) -> _Req | None:
        """The request of function task aid, in line or running (a running one that a simulated
        preemption ends goes back in line, as requeue_task does); None for a lease."""
        t = self.tasks.get(aid)
        if t is not None or aid not in self._jobs:
            return t
        payload, seq = self._jobs[aid]
        try:
            t = _Req(aid, json.loads(payload), "job", seq)
        except (ValueError, TypeError, AttributeError):
            return None
        self.tasks[aid] = t
        self._index_task(aid, t)
        return t

    # -- durations -----------------------------------------------------------------------------

    def pass_ms(self, req: _Req) -> int | None:
        """expected_run_ms(req) of placement.lua: history p80, else the hint, else the TTL (per task:
        the backfill test asks for it on every pass)."""
        v = self._pass_ms.get(req.id, -1)
        if v == -1:
            v = self._pass_ms[req.id] = self._pass_ms_of(req)
        return v

    def _pass_ms_of(self, req: _Req) -> int | None:
        v = _hist(self.durations, req.task_type, "p80_ms") or req.expected_ms or req.ttl_ms or None
        if v and req.ttl_ms > 0 and v > req.ttl_ms and req.kind != "job":
            v = req.ttl_ms  # a lease never outlives its TTL
        return v

    def run_ms(self, task_type: str | None, hint_ms: int, ttl_ms: int) -> int | None:
        """The simulated run time: history estimate (``stat``) for the task type, else the hint,
        else the estimate over all task types (``prior``), else the TTL; never beyond the TTL."""
        v = _hist(self.durations, task_type, self.stat_key)
        if not v and hint_ms > 0:
            v = hint_ms
        if not v:
            v = self.prior
        if ttl_ms > 0 and (not v or v > ttl_ms):
            v = ttl_ms
        return v or None

    def _prior(self) -> int | None:
        """The n-weighted median of the statistic over all task types in the history."""
        pts = []
        for e in self.durations.values():
            try:
                v, n = float(e.get(self.stat_key) or 0), float(e.get("n") or 1)
            except (TypeError, ValueError, AttributeError):
                continue
            if v > 0 and n > 0:
                pts.append((v, n))
        if not pts:
            return None
        pts.sort()
        half, acc = sum(n for _, n in pts) / 2, 0.0
        for v, n in pts:
            acc += n
            if acc >= half:
                return int(v)
        return int(pts[-1][0])

    def _running(self, a: dict[str, Any]) -> _Alloc:
        """A running allocation of the snapshot, with its simulated release."""
        start = int(a["start"])
        # A job without a time limit has a deadline only until a worker claims it (its wait for
        # one), and the simulation has it claimed, as its own started jobs.
        expires = 0 if a.get("unbounded") else int(a.get("expires") or 0)
        end = a.get("end")  # the ends index: history p80 or hint at grant time, else the TTL
        est = _hist(self.durations, a.get("task_type"), self.stat_key)
        if est:
            release: float | None = start + est
        elif end is not None and (a.get("hinted") or expires <= 0 or end != expires):
            release = end  # the hint (a lease's capped at its TTL), or an end the claim moved
        elif self.prior:
            release = start + self.prior
        else:
            release = end
        if expires > 0 and (release is None or release > expires):
            release = expires
        if release is not None and release <= self.now and not (expires > 0 and release >= expires):
            # Running past its expected end: assume it runs as long again as it has overrun.
            release = self.now + max(1000.0, self.overdue_factor * (self.now - release))
        if release is not None and release < self.now:
            release = self.now
        cores = a["cores"]
        host = self.hosts.get(a["host"])
        if host is not None and host.taken is not None:
            cores = sum(1 for c in a.get("core_ids", ()) if str(c) in host.taken)
        al = _Alloc(a["id"], a["host"], a["grants"], cores, a["shared"], a["ram"],
                    a["priority"], a.get("kind") or "lease", start, release, a.get("end"))
        al.slots = a.get("slots", 0)
        al.by_ttl = expires > 0 and release == expires
        return al

    def _load_running(self, als: list[_Alloc]) -> None:
        """_track for the snapshot's allocations, with the indexes built in one go."""
        if self.allocs or len({al.id for al in als}) != len(als):
            for al in als:
                self._track(al)
            return
        ends = []
        for al in als:
            self.allocs[al.id] = al
            if al.pass_end is not None:
                e = (al.pass_end, al.id)
                ends.append(e)
                self._hends.setdefault(al.host, []).append(e)
            self._touch(al.host)
            if al.release is not None:
                self._n += 1
                self.releases.append((al.release, self._n, al.id))
        self.ends.update(ends)
        for es in self._hends.values():
            es.sort()
        heapq.heapify(self.releases)

    def _byprio_index(self) -> SortedList:
        """The preemption order (``byprio``), built when first needed: only preemption reads
        it, and most lines have no task that may preempt."""
        if not self._byprio_on:
            self.byprio = SortedList((al.byprio, aid) for aid, al in self.allocs.items())
            self._byprio_on = True
        return self.byprio

    def _track(self, al: _Alloc) -> None:
        if al.id in self.allocs:
            self._resv_exact = False  # an id held twice (inconsistent read): _reserve walks `ends` itself
            self._byprio_index()  # from here on kept up to date: it holds both entries, as the ZSET would
        self.allocs[al.id] = al
        if al.pass_end is not None:
            e = (al.pass_end, al.id)
            self.ends.add(e)
            insort(self._hends.setdefault(al.host, []), e)
        self._touch(al.host)
        if self._byprio_on:
            self.byprio.add((al.byprio, al.id))
        if al.release is not None:
            self._n += 1
            heapq.heappush(self.releases, (al.release, self._n, al.id))

    # -- indexes (reindex_host / reindex_gpu of ledger.lua) --------------------------------------

    def _reindex(self, h: _Host, touched: Iterable[_Gpu] | None) -> None:
        schedulable = h.ready and h.cpu > 0 and h.ramf > 0
        if schedulable != h.indexed:
            touched = None
        h.indexed = schedulable
        hid = h.id
        # Index entries are (score, member, host, position): ordered like the Lua ZSETs (score,
        # then member), with the host and position at hand for the walk.
        for g in (h.gpus if touched is None else touched):
            m = g.member
            free = g.free
            old = self._gidx.pop(m, None)
            if old is not None:
                self.gpu_idx.remove((old, m, hid, g.pos))
            old = self._gidle.pop(m, None)
            if old is not None:
                self.gpu_idle.remove((old, m, hid, g.pos))
                self.gpu_idle_ord.remove((g.ordscore, m, hid, g.pos))
            cls = self._gord.get(m)
            if schedulable and free > 0:
                self._gidx[m] = free
                self.gpu_idx.add((free, m, hid, g.pos))
                c = ff_class(free)
                if cls != c:
                    if cls is None:
                        self.gpu_ord.add((g.ordscore, m, hid, g.pos))
                    else:
                        self.gpu_ffc[cls].remove((g.ordscore, m, hid, g.pos))
                    self._gord[m] = c
                    self.gpu_ffc[c].add((g.ordscore, m, hid, g.pos))
                if g.n == 0:
                    self._gidle[m] = free
                    self.gpu_idle.add((free, m, hid, g.pos))
                    self.gpu_idle_ord.add((g.ordscore, m, hid, g.pos))
            elif cls is not None:
                del self._gord[m]
                self.gpu_ord.remove((g.ordscore, m, hid, g.pos))
                self.gpu_ffc[cls].remove((g.ordscore, m, hid, g.pos))
        old = self._idle.pop(hid, None)
        if old is not None:
            self.idle_hosts.remove((old, hid))
        if schedulable:
            n_idle = sum(1 for g in h.gpus if g.n == 0 and g.cap > g.used)
            self._idle[hid] = n_idle
            self.idle_hosts.add((n_idle, hid))
        old = self._cpu.pop(h.id, None)
        if old is not None:
            self.cpu_idx.remove((old, h.id))
        if schedulable:
            self._cpu[h.id] = h.cpu
            self.cpu_idx.add((h.cpu, h.id))

    # -- placement (placement.lua) -----------------------------------------------------------------

    @staticmethod
    def _gpu_fits(req: _Req, free: int, n: int, model: str) -> bool:
        if req.gpu_mem == 0:
            if n != 0 or free <= 0:
                return False
        elif free < req.gpu_mem:
            return False
        if req.models is not None:
            return model in req.models
        return True

    @staticmethod
    def _labels_match(selector: dict[str, list[str]], labels: dict[str, Any]) -> bool:
        for key, allowed in selector.items():
            v = labels.get(key)
            if v is None or str(v) not in allowed:
                return False
        return True

    def _eligible(self, req: _Req, h: _Host | None, exclude: str | None, only: str | None) -> bool:
        if h is None or not h.ready:
            return False
        if exclude is not None and h.id == exclude:
            return False
        if only is not None and h.id != only:
            return False
        if req.selector and not self._labels_match(req.selector, h.labels):
            return False
        return True

    @staticmethod
    def _allowance(req: _Req, h: _Host) -> int | None:
        if h.reserve <= 0 or req.priority >= 3:
            return None
        return sum(1 for g in h.gpus if g.n == 0 and g.free > 0) - h.reserve

    def _pick(self, req: _Req, h: _Host, pos: int | None, mode: str) -> list[_Gpu] | None:
        k = req.gpus
        allowance = self._allowance(req, h)
        if k == 1 and pos is not None:
            g = h.gpus[pos] if pos < len(h.gpus) else None
            if g is None or not self._gpu_fits(req, g.free, g.n, g.model):
                return None
            if allowance is not None and g.n == 0 and allowance < 1:
                return None
            return [g]
        cands = [g for g in h.gpus if self._gpu_fits(req, g.free, g.n, g.model)]
        if len(cands) < k:
            return None
        if mode == "best":
            cands.sort(key=lambda g: (g.free, g.pos))
        elif mode == "worst":
            cands.sort(key=lambda g: (-g.free, g.pos))
        out: list[_Gpu] = []
        idle_used = 0
        for g in cands:
            if allowance is None or g.n > 0 or idle_used < allowance:
                if g.n == 0:
                    idle_used += 1
                out.append(g)
                if len(out) == k:
                    return out
        return None

    def _window(self, req: _Req, mode: str, only: str | None) -> tuple[list[str], list[int | None]]:
        """The candidates a walk looks at, in its order, at most ``scan_cap`` of them: hosts and
        GPU positions (None for CPU-only requests)."""
        k = req.gpus
        cap = self.cap
        if only is not None:
            if k == 0:
                return [only], [None]
            h = self.hosts.get(only)
            poss: list[int | None] = [g.pos for g in h.gpus][:cap] if h else []
            return [only] * len(poss), poss
        if k > 0:
            if req.gpu_mem == 0 and mode == "best":
                # Whole GPUs, best fit: hosts by idle GPU count, from k up (the idle_hosts ZSET).
                ents = list(islice(self.idle_hosts.irange((k,)), cap))
                return list(map(_ID, ents)), [None] * len(ents)
            if req.gpu_mem == 0:
                idx, lo = self.gpu_idle, 1
            else:
                idx, lo = self.gpu_idx, req.gpu_mem
            if mode == "best":
                i = idx.bisect_left((lo,))
                win = list(idx.islice(i, i + cap))
            elif mode == "worst":
                i, n = idx.bisect_left((lo,)), len(idx)
                win = list(idx.islice(max(i, n - cap), n))
                win.reverse()
            elif req.gpu_mem == 0:  # whole GPUs: gpu_idle_ord
                win = list(self.gpu_idle_ord.islice(0, cap))
            elif lo < 1024:  # requests under 1 GiB: gpu_ord
                win = list(self.gpu_ord.islice(0, cap))
            else:  # gpu_ord's first page, then the classes of gpu_ffc that can hold it, merged (ff_page)
                win = list(self.gpu_ord.islice(0, min(FIRST_PAGE, cap)))
                win += islice(heapq.merge(*self.gpu_ffc[ff_class(lo):]), cap - len(win))
            return list(map(_HOST, win)), list(map(_POS, win))
        if mode == "first":  # the cpu_ord ZSET: schedulable hosts in registration order
            hosts = list(islice((h.id for h in self.by_ord if h.indexed), cap))
        else:
            i, n = self.cpu_idx.bisect_left((req.cpu_millis,)), len(self.cpu_idx)
            if mode == "best":
                hosts = [e[1] for e in self.cpu_idx.islice(i, i + cap)]
            else:
                hosts = [e[1] for e in self.cpu_idx.islice(max(i, n - cap), n)]
                hosts.reverse()
        return hosts, [None] * len(hosts)

    def _host_ok(self, req: _Req, hid: str, exclude: str | None, only: str | None) -> _Host | None:
        h = self.hosts.get(hid)
        if (h is not None and self._eligible(req, h, exclude, only) and h.cpu >= req.cpu_millis
                and h.ramf >= req.ram and h.cpu > 0 and h.ramf > 0 and self._extras_fit(req, h)):
            return h
        return None

    @staticmethod
    def _cost(req: _Req, h: _Host, gs: list[_Gpu]) -> tuple[int, int, int]:
        """placement_cost of placement.lua, compared as a tuple: thousandths of a GPU that
        placing req on h (GPUs gs) leaves stranded beyond what h strands already (negative: it
        puts stranded capacity to use), how much it breaks up h's idle GPUs (taking j of i costs
        i^2 - (i-j)^2), and the millicores left free on h."""
        gm = idle = 0
        for g in h.gpus:
            gm += _milli_free(g.cap, g.free)
            if g.n == 0 and g.cap > g.used:
                idle += 1
        after, j = gm, 0
        for g in gs:
            mem = req.gpu_mem if req.gpu_mem else g.free
            after += _milli_free(g.cap, g.free - mem) - _milli_free(g.cap, g.free)
            if g.n == 0:
                j += 1
        cpu, ram = h.cpu - req.cpu_millis, h.ramf - req.ram
        return _stranded(h, after, cpu, ram) - _stranded(h, gm, h.cpu, h.ramf), j * (2 * idle - j), cpu

    def _scan(self, req: _Req, mode: str, exclude: str | None, only: str | None
              ) -> tuple[tuple[_Host, list[_Gpu]] | None, bool]:
        """scan() of placement.lua: first and worst fit take the first candidate that fits; best
        fit the cheapest (``_cost``, the earliest on a tie) of the first ``BEST_WINDOW`` hosts
        that fit. None and whether the walk stopped at the cap (it then looked at exactly
        ``scan_cap`` candidates) when nothing fits."""
        hosts, poss = self._window(req, mode, only)
        capped = len(hosts) >= self.cap
        window = BEST_WINDOW if mode == "best" and only is None else 1
        best: tuple[_Host, list[_Gpu]] | None = None
        best_cost = (0, 0, 0)
        fits = 0
        for cand in self._fitting(req, mode, exclude, only, hosts, poss):
            if window == 1:
                return cand, False
            cost = self._cost(req, *cand)
            if best is None or cost < best_cost:
                best, best_cost = cand, cost
            fits += 1
            if fits >= window:
                return best, False
        return (best, False) if best is not None else (None, capped)

    def _fitting(self, req: _Req, mode: str, exclude: str | None, only: str | None, hosts: list[str],
                 poss: list[int | None]) -> Iterator[tuple[_Host, list[_Gpu]]]:
        """The placements the walk finds, in its order, one per host (the candidates' loop of
        scan() in placement.lua)."""
        k = req.gpus
        if k != 1 or poss[:1] == [None]:
            # Each host is looked at once, at its first candidate (its GPUs are then chosen by
            # the strategy, whatever candidate led to it).
            need_idle = k if req.gpu_mem == 0 else 0
            idle = self._idle
            for hid in dict.fromkeys(hosts):
                if need_idle and idle.get(hid, 0) < need_idle and only is None:
                    continue  # fewer idle GPUs than whole GPUs asked: pick_on_host would fail
                s = self._host_ok(req, hid, exclude, only)
                if s is None:
                    continue
                gs = [] if k == 0 else self._pick(req, s, None, mode)
                if gs is not None:
                    yield s, gs
            return
        # One GPU: each candidate GPU is tried where it is; a host is left once it fitted (the
        # walk compares hosts) or cannot take the request at all.
        tried: set[str] = set()
        ok: dict[str, _Host | None] = {}
        for hid, pos in zip(hosts, poss):
            if hid in tried:
                continue
            if hid in ok:
                s = ok[hid]
            else:
                s = ok[hid] = self._host_ok(req, hid, exclude, only)
            if s is None:
                tried.add(hid)
                continue
            gs = self._pick(req, s, pos, mode)
            if gs:
                yield s, gs
                tried.add(hid)

    @staticmethod
    def _extras_fit(req: _Req, h: _Host) -> bool:
        """Worker slots, and services in the host's catalog (free service ports are not modelled)."""
        if req.slots and h.slotf < req.slots:
            return False
        if req.services and not h.catalog.issuperset(req.services):
            return False
        return True

    def _could_ever_fit(self, req: _Req, h: _Host) -> bool:
        """Whether req fits on h empty (its whole capacity): static, cached per shape and host."""
        key = (req.shape, h.id)
        v = self._ever.get(key)
        if v is None:
            v = (h.ncores * 1000 >= req.cpu_millis and h.ram >= req.ram and (not req.slots or h.slots >= req.slots)
                 and sum(1 for g in h.gpus if self._gpu_fits(req, g.cap, 0, g.model)) >= req.gpus)
            self._ever[key] = v
        return v

    def _could_fit(self, req: _Req, h: _Host) -> bool:
        """A necessary condition for a walk (not a single-host try) to find h for req, used to
        revalidate a no-fit: h is in the indexes (every walk goes over indexed hosts), eligible,
        and has the capacity free."""
        if not h.indexed:
            return False
        if (not self._eligible(req, h, None, None) or h.cpu < req.cpu_millis or h.ramf < req.ram
                or not self._extras_fit(req, h)):
            return False
        return sum(1 for g in h.gpus if self._gpu_fits(req, g.free, g.n, g.model)) >= req.gpus

    def _somewhere(self, req: _Req, exclude: str | None) -> bool:
        """Whether some host other than exclude could take req now (_could_fit)."""
        if req.gpus > 0 and req.gpu_mem == 0:
            cands: Iterable[_Host] = (self.hosts[hid] for _, hid in self.idle_hosts.irange((req.gpus,)))
        else:
            cands = self.hosts.values()
        return any(self._could_fit(req, h) for h in cands if h.id != exclude)

    def _fits_nowhere(self, req: _Req, exclude: str | None = None) -> bool:
        """Whether a walk for req (skipping host exclude) is known to find nothing: it found
        nothing before, and no host it may use has gained capacity it could fit in since.
        (Placements only take capacity away, so a walk that ran out of candidates stays empty.)

        The hosts that gained capacity since are looked at once each, in order (``_nofit`` holds
        how far); those that could fit are kept as suspects and looked at again on the next call,
        rather than forgetting the no-fit: a suspect that no longer could fit (a placement took
        what it had gained) cannot come back without gaining capacity again, i.e. without
        reappearing in ``freed``. So once the task that fitted on the freed host has taken it, the
        next task of the shape is known to fit nowhere without a walk. A suspect is not looked at
        again while its version (``_touch``) is the same: ``_could_fit`` depends only on the
        request and the host's own state."""
        if exclude is not None and self._fits_nowhere(req):
            return True
        key = (self._skid.get(req.id, req.shape), exclude)
        at = self._nofit.get(key)
        if at is None:
            return False
        freed = self.freed
        n = len(freed)
        sus = self._suspect.get(key)
        if at == n and not sus:
            return True
        hosts = self.hosts
        hver = self._hver
        could = self._could_fit
        mode = req.mode
        if sus:
            for i, s in enumerate(sus):
                hid = s[0]
                v = hver.get(hid, 0)
                if (s[1] == v and s[2] == mode) or could(req, hosts[hid]):
                    s[1], s[2] = v, mode
                    del sus[:i]  # those before it no longer could fit
                    return False
            sus.clear()
        cpu, ram = req.cpu_millis, req.ram
        for i in range(at, n):
            hid = freed[i]
            if hid != exclude:
                h = hosts.get(hid)
                # (A host short of the CPU or RAM cannot take req: a quick no before _could_fit.)
                if h is not None and h.cpu >= cpu and h.ramf >= ram and could(req, h):
                    self._nofit[key] = i + 1
                    self._suspect.setdefault(key, []).append([hid, hver.get(hid, 0), mode])
                    return False
        self._nofit[key] = n
        return True

    def _memo(self, req: _Req, exclude: str | None, only: str | None) -> tuple[Any, ...]:
        """The key of try_place(req, exclude, only) in the pass's memo of refusals (the shape by
        its number, ``_skid``: quicker to hash than the shape)."""
        sk = self._skid.get(req.id, req.shape)
        return sk, req.mode, req.priority, exclude, (only if only is not None else req.pin)

    def try_place(self, req: _Req, exclude: str | None = None, only: str | None = None
                  ) -> tuple[_Host, list[_Gpu]] | None:
        """try_place of placement.lua, through the pass's memo of refused shapes (``attempt``
        in queue.lua): a shape refused once in a pass is refused again in it."""
        only = only if only is not None else req.pin
        sk = self._skid.get(req.id, req.shape)
        memo = (sk, req.mode, req.priority, exclude, only)  # _memo
        if memo in self._refused:
            return None
        if only is not None:
            self._unproven = True  # a one-host try: no no-fit memo speaks for its refusal
        elif self._fits_nowhere(req, exclude):
            self._refused.add(memo)
            return None
        mode = req.mode
        found, capped = self._scan(req, mode, exclude, only)
        if found is None and mode == "first":
            found, capped = self._scan(req, "best", exclude, only)
        if found is None:
            self._refused.add(memo)
            if only is None and (not capped or not self._somewhere(req, exclude)):
                # The walk ran out of candidates, or stopped at the cap where no host could take
                # req anyway: placements only take capacity away, so it finds nothing until some
                # host it could use gains capacity (see _fits_nowhere).
                self._nofit[(sk, exclude)] = len(self.freed)
                self._suspect.pop((sk, exclude), None)
            else:
                self._unproven = True
        return found

    def _grant(self, req: _Req, placement: tuple[_Host, list[_Gpu]], now: int) -> None:
        self._changes += 1
        h, gs = placement
        if h.reserve > 0 and req.priority >= 3 and any(g.n == 0 for g in gs):
            # A critical grant on an idle GPU of a host with a reserve: that GPU is now in use,
            # and GPUs in use are no reserve, so shares below critical may go there. The one
            # grant that gives capacity: the no-fit memos must look at this host again.
            self._touch(h.id)
            self.freed.append(h.id)
        grants = []
        for g in gs:
            mem = req.gpu_mem if req.gpu_mem else g.free
            g.used += mem
            g.n += 1
            grants.append((g.pos, g.uuid, mem))
        cores = shared = 0
        if req.exclusive:
            if req.cpu_millis > 0:
                cores = req.cpu_millis // 1000
                h.cfree -= cores
        else:
            shared = req.cpu_millis
            h.shared += shared
        h.ram_used += req.ram
        h.slots_used += req.slots
        self._reindex(h, gs)
        pe = self.pass_ms(req)
        run = self.run_ms(req.task_type, req.expected_ms, req.ttl_ms)
        al = _Alloc(req.id, h.id, grants, cores, shared, req.ram, req.priority, req.kind, now,
                    None if run is None else now + run, None if pe is None else now + pe)
        al.slots = req.slots
        al.by_ttl = run is not None and req.ttl_ms > 0 and run == req.ttl_ms
        self._track(al)

    def _finish(self, aid: str) -> _Alloc | None:
        al = self.allocs.pop(aid, None)
        if al is None or not al.alive:
            return None
        self._changes += 1
        al.alive = False
        if al.pass_end is not None:
            e = (al.pass_end, aid)
            self.ends.discard(e)
            mine = self._hends.get(al.host)
            if mine:
                i = bisect_left(mine, e)
                if i < len(mine) and mine[i] == e:
                    del mine[i]
        self._touch(al.host)
        if self._byprio_on:
            self.byprio.discard((al.byprio, aid))
        h = self.hosts.get(al.host)
        if h is None:
            return al
        touched = []
        for pos, uuid, mem in al.grants:
            if not (pos < len(h.gpus) and h.gpus[pos].uuid == uuid):
                # return_grant: a grant recorded where its GPU no longer is is found by uuid.
                pos = next((x.pos for x in h.gpus if x.uuid == uuid), len(h.gpus))
            if pos < len(h.gpus):
                g = h.gpus[pos]
                g.used = max(0, g.used - mem)
                g.n = max(0, g.n - 1)
                touched.append(g)
        h.cfree += al.cores
        h.shared = max(0, h.shared - al.shared)
        h.ram_used = max(0, h.ram_used - al.ram)
        h.slots_used = max(0, h.slots_used - al.slots)
        self._reindex(h, touched)
        self.freed.append(h.id)
        return al

    # -- reservation and preemption (queue.lua) ----------------------------------------------------

    def _first_fit_after(self, req: _Req, ids: Iterable[tuple[float, str]], limit: int
                         ) -> tuple[str, list[str], float] | None:
        sims: dict[str, Any] = {}
        freed: dict[str, list[str]] = {}
        for i, (score, aid) in enumerate(ids):
            if i >= limit:
                break
            al = self.allocs.get(aid)
            if al is None:
                continue
            hid = al.host
            if hid not in sims:
                h = self.hosts.get(hid)
                sims[hid] = self._sim_host(req, h)  # None: what sim_fits would never accept on this host
                freed[hid] = []
            sim = sims[hid]
            if sim is None:
                continue
            self._sim_give(sim, al)
            freed[hid].append(aid)
            if self._sim_fits(req, sim[4], sim[0], sim[1], sim[3], sim[2].values()):
                return hid, freed[hid], score
        return None

    def _sim_host(self, req: _Req, h: _Host | None) -> list[Any] | None:
        """sim_host of queue.lua: [cpu, ram, {uuid: [free, holders, model]}, slots, reserve] free
        now, or None for a host req could never take (ineligible, too small, its catalog lacks
        a service req names)."""
        if not (self._eligible(req, h, None, req.pin) and self._could_ever_fit(req, h)):  # type: ignore[arg-type]
            return None
        assert h is not None
        if req.services and not h.catalog.issuperset(req.services):
            return None
        # Not floored at 0, as in queue.lua: on an overcommitted host a grant ended frees only
        # what it holds beyond the excess.
        return [h.cfree * 1000 - h.shared, h.ram - h.ram_used, {g.uuid: [g.cap - g.used, g.n, g.model] for g in h.gpus},
                h.slots - h.slots_used, h.reserve]

    @staticmethod
    def _sim_give(sim: list[Any], al: Any) -> None:
        """sim_give of queue.lua: what allocation al holds, back to the simulated host."""
        for _pos, uuid, mem in al.grants:
            sg = sim[2].get(uuid)
            if sg is not None:
                sg[0] += mem
                sg[1] -= 1
        sim[0] += al.cores * 1000 + al.shared
        sim[1] += al.ram
        sim[3] += al.slots

    def _fewest_victims(self, req: _Req, hid: str, victims: list[str]) -> list[str]:
        """fewest_victims of queue.lua: each victim, from the last gathered to the first, is
        spared when the others still make room for req on host hid."""
        if len(victims) <= 1:
            return victims
        base = self._sim_host(req, self.hosts.get(hid))
        assert base is not None
        keep = [True] * len(victims)
        for i in range(len(victims) - 1, -1, -1):
            keep[i] = False
            sim = [base[0], base[1], {u: list(g) for u, g in base[2].items()}, base[3], base[4]]
            for j, aid in enumerate(victims):
                if keep[j]:
                    self._sim_give(sim, self.allocs[aid])
            if not self._sim_fits(req, sim[4], sim[0], sim[1], sim[3], sim[2].values()):
                keep[i] = True
        return [aid for aid, k in zip(victims, keep) if k]

    def _sim_fits(self, req: _Req, reserve: int, cpu: int, ram: int, slots: int,
                  gpus: Iterable[list[Any]]) -> bool:
        """sim_fits of queue.lua: CPU, RAM and slots, no parked host (no free CPU or RAM), and
        GPUs that fit ([free, holders, model] each), idle ones only beyond the critical reserve
        for work below critical."""
        if cpu < req.cpu_millis or ram < req.ram or cpu <= 0 or ram <= 0 or (req.slots and slots < req.slots):
            return False
        busy = idle_fit = idle = 0
        for f, c, m in gpus:
            if c <= 0 and f > 0:
                idle += 1
            if self._gpu_fits(req, f, c, m):
                if c <= 0:
                    idle_fit += 1
                else:
                    busy += 1
        if reserve > 0 and req.priority < 3:
            idle_fit = min(idle_fit, max(0, idle - reserve))
        return busy + idle_fit >= req.gpus

    def _touch(self, hid: str) -> None:
        """Notes that host hid's capacity or its entries in `ends` changed (see _reserve)."""
        self._hver[hid] = self._hver.get(hid, 0) + 1
        self._hlog.append(hid)

    def _fit_point(self, req: _Req, hid: str) -> tuple[float, str] | None:
        """The entry of `ends` at which first_fit_after finds that req fits on host hid: the
        host's own entries, in order, added back one by one to what it has free now; None when
        it never does (or is not eligible)."""
        h = self.hosts.get(hid)
        sim = self._sim_host(req, h)
        if sim is None:
            return None
        assert h is not None
        cpu, ram, gpus, slots = sim[0], sim[1], sim[2], sim[3]
        allocs = self.allocs
        for e in self._hends.get(hid, ()):
            al = allocs[e[1]]
            for _pos, uuid, mem in al.grants:
                sg = gpus.get(uuid)
                if sg is not None:
                    sg[0] += mem
                    sg[1] -= 1
            cpu += al.cores * 1000 + al.shared
            ram += al.ram
            slots += al.slots
            if self._sim_fits(req, h.reserve, cpu, ram, slots, gpus.values()):
                return e
        return None

    def _reserve(self, req: _Req, now: int) -> tuple[str, float] | None:
        """reservation(req, now, 256) of queue.lua: the host and the shadow time (see _reserve_fit)."""
        fit = self._last_fit = self._reserve_fit(req)
        return None if fit is None else (fit[0], max(fit[1], now))

    def _reserve_fit(self, req: _Req) -> tuple[str, float] | None:
        """first_fit_after(req, ends, 256) of queue.lua (its host and score), computed without
        walking the first 256 entries of `ends`. A host's simulation in first_fit_after only adds
        back the host's own entries, so the walk returns at min over hosts of the host's fit point
        (``_fit_point``), when that entry is among the first 256. Fit points are kept per request
        shape in a heap of exact values and lower bounds (a host's first entry in `ends`), each at
        a host version, and recomputed only for hosts whose version changed since (``_hlog``):
        between two passes only a few hosts change, and hosts behind the answer are never looked
        at. Exactly what the walk returns (see tests/test_eta.py and bench/eta_replay.py)."""
        if not self._resv_exact:
            r = self._first_fit_after(req, iter(self.ends), RESERVE_LIMIT)
            return None if r is None else (r[0], r[2])
        key = (self._skid.get(req.id, req.shape), req.pin)
        hends, hver = self._hends, self._hver
        st = self._resv_heap.get(key)
        if st is None or len(st[0]) > 4 * len(hends) + 1024:
            heap = [(es[0], 0, hver.get(hid, 0), hid) for hid, es in hends.items() if es]
            heapq.heapify(heap)
            st = self._resv_heap[key] = (heap, [len(self._hlog)])
        else:
            heap, pos = st
            log = self._hlog
            if pos[0] < len(log):
                for hid in set(log[pos[0]:]):
                    es = hends.get(hid)
                    if es:
                        heapq.heappush(heap, (es[0], 0, hver.get(hid, 0), hid))
                pos[0] = len(log)
        n = len(self.ends)
        last = self.ends[RESERVE_LIMIT - 1] if n >= RESERVE_LIMIT else None
        while heap:
            at, exact, ver, hid = heap[0]
            if ver != hver.get(hid, 0):
                heapq.heappop(heap)  # stale: the host changed, a fresh lower bound was pushed
                continue
            if last is not None and at > last:
                return None  # every fit point is beyond the first 256 entries
            if exact:
                return hid, at[0]
            heapq.heappop(heap)
            p = self._fit_point(req, hid)
            if p is not None:
                heapq.heappush(heap, (p, 1, ver, hid))
        return None

    def _preempt_for(self, req: _Req, now: int) -> bool:
        self._refused = set()  # capacity comes back: the pass's memo of refusals is void
        bound = req.priority * 10**13
        cands = self._byprio_index().irange(maximum=(bound, ""), inclusive=(True, False))
        r = self._first_fit_after(req, ((s, a) for s, a in cands if s < bound), PREEMPT_LIMIT)
        if r is None:
            return False
        for victim in self._fewest_victims(req, r[0], r[1]):
            al = self._finish(victim)
            if al is not None and al.kind == "job":
                t = self._job_task(victim)
                if t is not None:  # back to the front of its priority, original sequence kept
                    self.score[victim] = _front_score(t.priority, t.seq)
                    self.pending.add((self.score[victim], victim))
                    self._pver += 1
        return True

    # -- the pass ------------------------------------------------------------------------------

    def _pass(self, now: int) -> int:
        """schedule_pass of queue.lua over the first ``pass_depth`` tasks in line."""
        self.passes += 1
        self._refused = set()
        self._quiet = None
        self._unproven = False
        pver = self._pver
        seen = self._window_seen
        if seen is not None and seen[0] == pver:
            ids = seen[1]
        else:
            ids = list(map(_ID, self.pending.islice(0, self.depth)))
            seen = self._window_seen = (pver, ids, None)
        tasks = self.tasks
        placed = 0
        blocked: _Req | None = None
        i = 0
        hold = self.hold
        gone = self.rq_gone
        dropped = False
        for i, tid in enumerate(ids):
            if hold and tid in hold:
                continue  # may not start yet: in no one's way
            req = tasks[tid]
            p = self.try_place(req)
            if p is None and req.preempt:
                self._unproven = True  # (another pass may find what to preempt)
                if gone and self._drop_gone(tid, now):  # (checked before a preemption too)
                    dropped = True
                    continue
                if self._preempt_for(req, now):
                    p = self.try_place(req)
            if p is None:
                blocked = req
                break
            if gone and self._drop_gone(tid, now):
                dropped = True
                continue
            self._start(tid, req, p, now)
            placed += 1
        if blocked is None:
            return placed + dropped  # a drop shifts the window: the scheduler's next tick looks again
        # Blocked: from here on nothing frees capacity (preemption happens only before), so a
        # shape that fits nowhere keeps fitting nowhere for the rest of the pass. Each shape is
        # asked once, for its first task, and its tasks are dropped in one sweep: most of the
        # line behind a blocked head is tasks that fit nowhere. (Asking earlier than the task's
        # turn changes only what the no-fit memo has looked at: its answer True is final.)
        # A shape known to fit nowhere with nothing freed since still does (the pass before at
        # the same instant only placed).
        nwk = self._nwkey
        if placed == 0 and seen[2] is not None:
            rest, keys, firsts = seen[2]
        else:
            rest = ids[i + 1:]
            if hold:
                rest = [tid for tid in rest if tid not in hold]
            keys = list(map(nwk.__getitem__, rest))
            firsts = list(dict(zip(reversed(keys), reversed(rest))).items())  # shape -> its first task
            if placed == 0:
                self._window_seen = (pver, ids, (rest, keys, firsts))
        nowhere: set[int | None] = set()
        n_freed, known = len(self.freed), self._nw_known
        for k, tid in firsts:
            if k is not None and (known.get(k) == n_freed or self._fits_nowhere(tasks[tid])):
                known[k] = n_freed
                nowhere.add(k)
        if nowhere:
            rest = [tid for tid, k in zip(rest, keys) if k not in nowhere]
        resv: tuple[str, float] | None = None
        resv_done = False
        rhost, shadow = "", 0.0  # the reservation's host and shadow time, once asked for
        # What the pass's memo of refusals already says, by task signature (shape, strategy,
        # priority, pin): 0, its attempt on the hosts other than the reserved one is refused (only
        # the backfill onto the reserved host is left to try, for tasks short enough); 1, every
        # attempt it can make is. The memo only grows once the line is blocked, so a later task of
        # the signature is refused those attempts again without asking. (A task of signature 0
        # whose shape fits nowhere tries the reserved host rather than being skipped: a shape that
        # fits nowhere fits on no single host either, so the try fails, as skipping it would.)
        sigs = self._sig
        known_sig: dict[int, int] = {}
        refused = self._refused  # (only a preemption replaces it, and none happens from here on)
        pms = self._pass_ms
        for tid in rest:
            sig = sigs[tid]
            st = known_sig.get(sig)
            if st is not None:
                if st:
                    continue
                pe = pms.get(tid, -1)
                if pe == -1:
                    pe = self.pass_ms(tasks[tid])
                if pe is None or now + pe > shadow:
                    continue
                req = tasks[tid]
                p = self.try_place(req, only=rhost)
                if p is None:
                    if self._memo(req, None, rhost) in refused:
                        known_sig[sig] = 1
                    continue
                if gone and self._drop_gone(tid, now):
                    dropped = True
                    continue
                self._start(tid, req, p, now)
                placed += 1
                continue
            req = tasks[tid]
            k = nwk[tid]
            if k is not None:
                if k in nowhere:
                    continue
                if self._fits_nowhere(req):
                    nowhere.add(k)
                    continue  # cannot start anywhere, reserved host included
            if not resv_done:
                resv, resv_done = self._reserve(blocked, now), True
                rhost, shadow = resv if resv is not None else ("", 0.0)
            if resv is None:
                p = self.try_place(req)
                if p is None and self._memo(req, None, None) in refused:
                    known_sig[sig] = 1
            else:
                p = self.try_place(req, exclude=rhost)
                if p is None and (req.pin is None or req.pin == rhost):
                    a_refused = self._memo(req, rhost, None) in refused
                    pe = self.pass_ms(req)
                    if pe is not None and now + pe <= shadow:
                        p = self.try_place(req, only=rhost)
                        if p is None and a_refused:
                            known_sig[sig] = 1 if self._memo(req, None, rhost) in refused else 0
                    elif a_refused:
                        known_sig[sig] = 0
                elif p is None and self._memo(req, rhost, None) in refused:
                    known_sig[sig] = 1  # pinned elsewhere: no backfill onto the reserved host
            if p is not None:
                if gone and self._drop_gone(tid, now):
                    dropped = True
                    continue
                self._start(tid, req, p, now)
                placed += 1
        if dropped:
            return placed + 1  # the window moved: not a quiet pass, and the next tick looks again
        if placed == 0 and not self._unproven:
            self._quiet = (self._changes, blocked, resv_done, self._last_fit if resv_done else None, ids, None)
        return placed

    def _due_with(self, t: float) -> list[str]:
        """Takes from the release heap every other allocation that ends by its deadline at t: the
        reaper frees them all in one call. Those that end at t by their expected end (a worker's
        report, a release) stay in the heap: each is an event of its own."""
        out, keep = [], []
        while self.releases and self.releases[0][0] == t:
            item = heapq.heappop(self.releases)
            al = self.allocs.get(item[2])
            if al is None or not al.alive or al.release != t:
                continue  # an entry the allocation's end has made stale
            if al.by_ttl:
                out.append(al.id)
            else:
                keep.append(item)
        for item in keep:
            heapq.heappush(self.releases, item)
        return out

    def _still_quiet(self, al: _Alloc | None) -> bool:
        """Whether the pass due after allocation al ended is known to place nothing, so that it
        need not run: the pass before placed nothing and every refusal in it was proven by a
        no-fit memo (no one-host try, no preemption), al's end is the only change since, its host
        still lacks the CPU or RAM of every task in the pass's window (so every no-fit holds), and
        the reservation is the same host and score (a later pass lets no task backfill onto it
        that the one before did not: ``now + ends <= shadow`` only gets harder)."""
        q = self._quiet
        if q is None or al is None or self._changes != q[0] + 1:
            return False
        need = q[5]
        if need is None:  # the least CPU and RAM a task in the window asks for
            need = (min(map(self._cpu_need.__getitem__, q[4])), min(map(self._ram_need.__getitem__, q[4])))
        h = self.hosts.get(al.host)
        if h is not None and h.cpu >= need[0] and h.ramf >= need[1]:
            return False
        if q[2] and self._reserve_fit(q[1]) != q[3]:
            return False
        self._quiet = (self._changes,) + q[1:5] + (need,)
        return True

    def _start(self, tid: str, req: _Req, p: tuple[_Host, list[_Gpu]], now: int) -> None:
        # RQ keeps a job that has started (it persists the hash): preempted and back in line, it
        # is no longer discarded by its ttl.
        self.rq_gone.pop(tid, None)
        self._grant(req, p, now)
        self.pending.discard((self.score[tid], tid))
        self._pver += 1
        if tid not in self.started:  # a preempted and restarted job keeps its first start
            self.started[tid] = now
            self._started_order.append(tid)

    def _drop_gone(self, tid: str, now: int) -> bool:
        """job_gone of queue.lua: a function task whose RQ job has expired by the time the pass
        would place it (or preempt for it) leaves the line and never starts."""
        at = self.rq_gone.get(tid)
        if at is None or at > now:
            return False
        self.pending.discard((self.score[tid], tid))
        self.dropped.add(tid)
        self._pver += 1
        self._changes += 1
        return True

    def _arrive(self, tid: str) -> None:
        """Task tid may start from now on: the line's window and a quiet pass no longer hold."""
        self.hold.pop(tid, None)
        self._pver += 1
        self._changes += 1
        self._quiet = None

    def _settle(self, now: int) -> None:
        for _ in range(10_000):
            if not self.pending or self._pass(now) == 0:
                return

    def run(self, targets: set[str] | None = None, *, max_events: int | None = None) -> dict[str, int | None]:
        """Simulates until every target (default: every pending task) has started or nothing
        more is expected to end; returns id -> simulated start ms (None: no estimate)."""
        want = set(self.tasks) if targets is None else {t for t in targets if t in self.tasks}
        left = set(want)
        budget = max_events if max_events is not None else 20 * (len(self.allocs) + len(self.tasks)) + 1000
        now = self.now
        # Allocations expected to end by now (TTL due, overdue handled at load) end first.
        while self.releases and self.releases[0][0] <= now:
            _, _, aid = heapq.heappop(self.releases)
            self._finish(aid)
        self._settle(now)
        left -= self.started.keys()
        left -= self.dropped
        while left and (self.releases or self.arrivals) and budget > 0:
            if self.arrivals and (not self.releases or self.arrivals[0][0] < self.releases[0][0]):
                # A task's retry interval is over: the next pass (the scheduler's tick) sees it.
                # (A release at the same instant comes first: its pass already sees the task.)
                t_due, tid = heapq.heappop(self.arrivals)
                budget -= 1
                self.events += 1
                now = t_due
                self._arrive(tid)
                while self.arrivals and self.arrivals[0][0] == t_due:  # due together: one pass sees all
                    self._arrive(heapq.heappop(self.arrivals)[1])
                n = len(self.started)
                self._settle(now)
                if len(self.started) != n:
                    left.difference_update(self._started_order[n:])
                left.difference_update(self.dropped)
                continue
            t, _, aid = heapq.heappop(self.releases)
            al = self.allocs.get(aid)
            if al is None or not al.alive or al.release != t:
                continue
            budget -= 1
            self.events += 1
            now = int(t)
            while self.arrivals and self.arrivals[0][0] <= now:  # due at this instant: its pass sees them
                self._arrive(heapq.heappop(self.arrivals)[1])
            # Leases due at the same instant are reaped together, before one pass (expire.lua,
            # the scheduler's tick); a worker's end of a job runs its own pass.
            together = self._due_with(t) if al.by_ttl else []
            ended = self._finish(aid)
            for other in together:
                self._finish(other)
            if not together and self._still_quiet(ended):
                self.passes += 1
                self.skipped += 1
                continue
            n = len(self.started)
            self._settle(now)
            if len(self.started) != n:
                left.difference_update(self._started_order[n:])
            left.difference_update(self.dropped)
        return {tid: self.started.get(tid) for tid in want}


# -- reading the ledger ------------------------------------------------------------------------

class _Cache:
    """Per-id caches of what does not change: payloads of pending tasks, records of running ones."""

    def __init__(self, limit: int = 200_000) -> None:
        # payload, kind, seq, line score, when RQ discards the job (ms; None: never)
        self.tasks: dict[str, tuple[str, str, int, float, int | None]] = {}
        self.reqs: dict[str, _Req] = {}
        self.allocs: dict[str, tuple[float, dict[str, Any], str | None]] = {}  # byprio score, record, host cver
        self.jobs: dict[str, tuple[str, int, float]] = {}  # running function tasks: payload, seq, byprio score
        self.limit = limit

    def trim(self, pending: set[str], active: set[str]) -> None:
        if len(self.tasks) > self.limit:
            self.tasks = {k: v for k, v in self.tasks.items() if k in pending}
            self.reqs = {k: v for k, v in self.reqs.items() if k in pending}
        if len(self.allocs) > self.limit:
            self.allocs = {k: v for k, v in self.allocs.items() if k in active}
        if len(self.jobs) > self.limit:
            self.jobs = {k: v for k, v in self.jobs.items() if k in active}


def _parse_alloc(aid: str, f: dict[str, Any], score: float) -> dict[str, Any] | None:
    """An active allocation record as the simulation needs it (None if it is not active)."""
    if f.get("state") != "active" or not f.get("host"):
        return None
    try:
        gpus = json.loads(f.get("gpus") or "[]")
        cores = json.loads(f.get("cores") or "[]")
    except ValueError:
        return None
    try:
        grants = [(int(g["pos"]), str(g["uuid"]), int(g["memory_mb"])) for g in gpus]
    except (TypeError, KeyError, ValueError):
        return None
    return {
        "id": aid, "host": f["host"], "grants": grants,
        "cores": len(cores) if isinstance(cores, list) else 0, "core_ids": cores if isinstance(cores, list) else [],
        "shared": int(f.get("shared_millis") or 0),
        "ram": int(f.get("ram_mb") or 0), "priority": int(f.get("priority") or 1), "kind": f.get("kind"),
        "start": int(f.get("activated") or 0) or int(10**13 - 1 - (score - int(score // 10**13) * 10**13)),
        "task_type": f.get("task_type"), "slots": int(f.get("slots") or 0),
        "hinted": int(f.get("expected_ms") or 0) > 0, "unbounded": f.get("unbounded") == "1",
    }


def read_snapshot(a: Allocator, *, cache: _Cache | None = None, attempts: int = 5) -> Snapshot:
    """A consistent read of what the simulation needs (``WATCH`` on the outbox stream; every
    ledger script appends to it, so an unchanged stream means an unchanged ledger)."""
    t0 = time.perf_counter()
    k = a.keys
    cache = cache if cache is not None else _Cache()
    reread: set[str] = set()
    for attempt in range(attempts):
        pipe = a.redis.pipeline(transaction=True)
        try:
            if attempt < attempts - 1:
                pipe.watch(k.events)
                reader: Any = pipe
            else:
                reader = a.redis  # last try: no isolation; inconsistencies are tolerated below
            host_ids = reader.zrange(k.hosts, 0, -1)
            pending = reader.zrange(k.pending, 0, -1, withscores=True)
            delayed = reader.zrange(k.delayed, 0, -1, withscores=True)
            byprio = reader.zrange(k.byprio, 0, -1, withscores=True)
            if reader is pipe:
                pipe.multi()
            else:
                pipe = a.redis.pipeline(transaction=False)
            for h in host_ids:
                pipe.hgetall(k.host(h))
            new_allocs = [aid for aid, score in byprio
                          if aid in reread or cache.allocs.get(aid, (None,))[0] != score]
            for aid in new_allocs:
                pipe.hmget(k.alloc(aid), *_ALLOC_FIELDS)
            # By id and line score: the score holds the submission's sequence number, so an id
            # submitted again (after its record was purged) is read again.
            new_tasks = [tid for tid, score in pending if cache.tasks.get(tid, (None,) * 4)[3] != score]
            for tid in new_tasks:
                pipe.hmget(k.task(tid), *_TASK_FIELDS)
                pipe.pttl(k.rq_job(tid))  # RQ's ttl: a job RQ discards while it waits never starts
            pipe.zrange(k.ends, 0, -1, withscores=True)
            pipe.zrange(k.expiry, 0, -1, withscores=True)  # a worker's claim moves a deadline
            pipe.hgetall(k.durations)
            pipe.hget(k.seq, "recovering")
            pipe.time()
            pipe.hkeys(k.preempting)
            res = pipe.execute()
        except redis.WatchError:
            continue
        finally:
            pipe.reset()
        # A registration rewrites the grants of the host's allocations (a whole GPU's grant grows,
        # GPUs renumber): records read under another registration of their host are read again.
        cver = {h: (res[i] or {}).get("cver") for i, h in enumerate(host_ids)}
        fresh = set(new_allocs)
        stale = {aid for aid, _ in byprio if aid not in fresh and aid in cache.allocs
                 and cache.allocs[aid][2] != cver.get(cache.allocs[aid][1]["host"])}
        if not stale or attempt == attempts - 1:
            break
        reread |= stale
    i = len(host_ids)
    hosts: dict[str, dict[str, str]] = {h: res[j] for j, h in enumerate(host_ids) if res[j]}
    byprio_score = dict(byprio)
    for aid in new_allocs:
        rec = _parse_alloc(aid, dict(zip(_ALLOC_FIELDS, res[i])), byprio_score[aid])
        i += 1
        if rec is not None:
            cache.allocs[aid] = (byprio_score[aid], rec, cver.get(rec["host"]))
    pending_score = dict(pending)
    new_pttl: dict[str, int] = {}
    for tid in new_tasks:
        f = dict(zip(_TASK_FIELDS, res[i]))
        new_pttl[tid] = int(res[i + 1])
        i += 2
        if f.get("payload") and f.get("state") in ("pending", None):
            cache.tasks[tid] = (f["payload"], f.get("kind") or "lease", int(f.get("seq") or 0), pending_score[tid], None)
        else:
            cache.tasks.pop(tid, None)
    ends = dict(res[i])
    expiry = dict(res[i + 1])
    durations_raw = res[i + 2] or {}
    recovering = res[i + 3] == "1"
    srv = res[i + 4]
    stopping = res[i + 5] or []
    if a.clock is not None:
        now = int(a.clock() * 1000)
    else:
        now = int(srv[0]) * 1000 + int(srv[1]) // 1000
    for tid, pttl in new_pttl.items():
        t = cache.tasks.get(tid)
        if t is not None and t[1] == "job" and pttl != -1:  # -1: kept for good; -2: gone already
            cache.tasks[tid] = (*t[:4], now + max(0, pttl))
    durations: dict[str, dict[str, Any]] = {}
    for t, v in durations_raw.items():
        try:
            e = json.loads(v)
        except ValueError:
            continue
        if isinstance(e, dict):
            durations[t] = e
    allocs = []
    for aid, score in byprio:
        rec = cache.allocs.get(aid, (None, None))[1]
        if rec is None:
            continue
        allocs.append({**rec, "end": ends.get(aid), "expires": int(expiry.get(aid) or 0)})
    pend = []
    rq_gone: dict[str, int] = {}
    for tid, score in pending:
        t = cache.tasks.get(tid)
        if t is not None:
            pend.append((tid, score, t[0], t[1], t[2]))
            if t[4] is not None:
                rq_gone[tid] = t[4]
    # Preempted jobs whose worker is stopping the run go back to the front of their priority when
    # it reports (requeue_task): in line already, as far as start times go.
    if stopping:
        pipe = a.redis.pipeline(transaction=False)
        for tid in stopping:
            pipe.hmget(k.task(tid), *_TASK_FIELDS)
        in_line = {p[0] for p in pend}
        for tid, (kind, payload, seq, state) in zip(stopping, pipe.execute()):
            if state == "preempting" and payload and tid not in in_line:
                try:
                    prio = int(json.loads(payload).get("priority", 1))
                except (ValueError, TypeError, AttributeError):
                    continue
                pend.append((tid, _front_score(prio, int(seq or 0)), payload, kind or "job", int(seq or 0)))
    # Running function tasks' requests, for a simulated preemption to put back in line: only when a
    # task in line may preempt; they do not change while they run (cached by id).
    jobs: dict[str, tuple[str, int]] = {}
    if any('"preempt":true' in p[2].replace(" ", "") for p in pend):
        running = [x["id"] for x in allocs if x.get("kind") == "job"]
        # By id and placement (byprio score): an id placed again is another run, maybe of another request.
        unread = [aid for aid in running if cache.jobs.get(aid, (None,) * 3)[2] != byprio_score[aid]]
        if unread:
            pipe = a.redis.pipeline(transaction=False)
            for aid in unread:
                pipe.hmget(k.task(aid), "payload", "seq")
            for aid, (payload, seq) in zip(unread, pipe.execute()):
                if payload:
                    cache.jobs[aid] = (payload, int(seq or 0), byprio_score[aid])
        jobs = {aid: cache.jobs[aid][:2] for aid in running if aid in cache.jobs}
    catalogs: dict[str, set[str]] = {}
    if any('"services"' in p[2] for p in pend):
        # Which host can run which shared named service (changes only with the host's agent).
        pipe = a.redis.pipeline(transaction=False)
        for h in hosts:
            pipe.hkeys(k.svc_catalog(h))
        catalogs = {h: set(names) for h, names in zip(hosts, pipe.execute())}
    cache.trim({p[0] for p in pend}, {x["id"] for x in allocs})
    return Snapshot(now=now, hosts=hosts, allocs=allocs, pending=pend, durations=durations, catalogs=catalogs,
                    pass_depth=a.pass_depth, scan_cap=a.scan_cap, recovering=recovering,
                    read_ms=(time.perf_counter() - t0) * 1000,
                    delayed={tid: int(nb) for tid, nb in delayed if nb > now}, jobs=jobs, rq_gone=rq_gone)


# -- the engine and its cache ------------------------------------------------------------------

@dataclass
class EtaResult:
    now: int
    starts: dict[str, int | None]
    pending: int
    read_ms: float
    sim_ms: float
    events: int
    passes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_ms(self) -> float:
        return self.read_ms + self.sim_ms


class EtaEngine:
    """Estimated start times for one allocator (one namespace)."""

    def __init__(self, allocator: Allocator, *, stat: str = DEFAULT_STAT,
                 overdue_factor: float = DEFAULT_OVERDUE_FACTOR, max_age_s: float = DEFAULT_MAX_AGE_S,
                 use_prior: bool = True) -> None:
        if stat not in ("p50", "p80", "mean"):
            raise ValueError(f"stat must be p50, p80 or mean, got {stat!r}")
        self.a = allocator
        self.stat = stat
        self.overdue_factor = overdue_factor
        self.max_age_s = max_age_s
        self.use_prior = use_prior
        self._cache = _Cache()

    def simulate(self, snap: Snapshot, targets: set[str] | None = None) -> EtaResult:
        t0 = time.perf_counter()
        sim = Simulation(snap, stat=self.stat, overdue_factor=self.overdue_factor, reqs=self._cache.reqs,
                         use_prior=self.use_prior)
        starts = {} if snap.recovering else sim.run(targets)
        if snap.recovering:
            starts = {p[0]: None for p in snap.pending if targets is None or p[0] in targets}
        return EtaResult(now=snap.now, starts=starts, pending=len(snap.pending), read_ms=snap.read_ms,
                         sim_ms=(time.perf_counter() - t0) * 1000, events=sim.events, passes=sim.passes)

    def compute_all(self) -> EtaResult:
        """Every pending task's estimate from a fresh snapshot."""
        return self.simulate(read_snapshot(self.a, cache=self._cache))

    def compute_one(self, task_id: str) -> int | None:
        """One pending task's estimate. The whole line is read: while the task waits, tasks
        ahead of it start and the pass window moves on, so a task far behind it may come into
        the window and backfill into what it needs. The simulation stops once it has started."""
        pipe = self.a.redis.pipeline(transaction=False)
        pipe.zrank(self.a.keys.pending, task_id)
        pipe.hexists(self.a.keys.preempting, task_id)
        rank, preempting = pipe.execute()
        if rank is None and not preempting:
            return None
        snap = read_snapshot(self.a, cache=self._cache)
        return self.simulate(snap, {task_id}).starts.get(task_id)

    # -- the cache the scheduler tick writes -------------------------------------------------------

    def refresh(self) -> EtaResult:
        """Computes every estimate and stores them in ``Keys.eta`` (replaced atomically)."""
        r = self.compute_all()
        mapping: dict[str, str] = {tid: ("" if ms is None else str(ms)) for tid, ms in r.starts.items()}
        mapping.update({"_at": str(r.now), "_cost_ms": f"{r.cost_ms:.1f}", "_pending": str(r.pending)})
        key = self.a.keys.eta
        with self.a.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                cur = pipe.hget(key, "_at")
                if cur and int(cur) > r.now:
                    return r  # another scheduler replica stored a newer snapshot's estimates
                pipe.multi()
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.execute()
            except redis.WatchError:
                pass  # another replica wrote meanwhile: its estimates stand
        return r

    def _now_ms(self) -> int:
        if self.a.clock is not None:
            return int(self.a.clock() * 1000)
        s, us = self.a.redis.time()
        return int(s) * 1000 + int(us) // 1000

    def _fresh(self, at: str | None, cost_ms: str | None = None) -> bool:
        """Whether a cache computed at ``at`` may still be read. The tick refreshes it every
        max(interval, 2 x cost) and the new one lands a cost later, so a cache whose computation
        took c ms is replaced before it is max(interval + c, 3c) old: past ``max_age_s`` too when
        a refresh takes more than a second or so."""
        if not at:
            return False
        return self._now_ms() - int(at) <= max(self.max_age_s * 1000, 3 * float(cost_ms or 0) + 1000)

    def estimate_ms(self, task_id: str) -> int | None:
        """Start (ms) of a task: activation once placed; for a pending one the tick's cached
        estimate when fresh, else computed now; None for unknown, cancelled or unplaceable ones."""
        k = self.a.keys
        pipe = self.a.redis.pipeline(transaction=False)
        pipe.hmget(k.alloc(task_id), "state", "activated")
        pipe.hmget(k.eta, task_id, "_at", "_cost_ms")
        pipe.hexists(k.preempting, task_id)
        (state, activated), (cached, at, cost), stopping = pipe.execute()
        if state is None:
            return None
        if state != "pending" and not stopping:  # (a preempted run being stopped starts again later)
            return int(activated) if activated else None
        if cached is not None and self._fresh(at, cost):
            return int(cached) if cached else None
        return self.compute_one(task_id)

    def estimate_all_ms(self) -> dict[str, int | None]:
        raw = self.a.redis.hgetall(self.a.keys.eta)
        if self._fresh(raw.get("_at"), raw.get("_cost_ms")):
            # Only what waits now: a task cancelled or placed since the tick is no longer listed;
            # one queued since has no cached estimate, and then the whole line is simulated now.
            k = self.a.keys  # (a run being stopped for a preemption waits in line too)
            pipe = self.a.redis.pipeline(transaction=False)
            pipe.zrange(k.pending, 0, -1)
            pipe.hkeys(k.preempting)
            waiting, stopping = pipe.execute()
            pending = set(waiting) | set(stopping)
            if pending <= raw.keys():
                return {tid: (int(raw[tid]) if raw[tid] else None) for tid in pending}
        return self.compute_all().starts


def engine_for(a: Allocator) -> EtaEngine:
    """The allocator's engine (created on first use; keeps the per-id read caches)."""
    eng = a.__dict__.get("_eta_engine")
    if eng is None:
        eng = EtaEngine(a)
        a.__dict__["_eta_engine"] = eng
    return eng
