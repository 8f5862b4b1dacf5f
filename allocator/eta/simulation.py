"""The simulated ledger and line: its state, the running allocations' expected ends, and the
duration estimates (the walk and the pass are its parts in ``walk.py`` and ``line.py``)."""

from __future__ import annotations

import heapq
import json
from bisect import insort
from typing import Any

from sortedcontainers import SortedList

from ..keys import FF_CLASSES
from .fleet import DEFAULT_OVERDUE_FACTOR, DEFAULT_STAT, Snapshot, _Alloc, _Gpu, _Host, _Req, _hist
from .line import Line
from .walk import Walk


class Simulation(Walk, Line):
    """The ledger and the pass, in memory; ``run`` returns each pending task's simulated start."""

    def __init__(self, snap: Snapshot, *, stat: str = DEFAULT_STAT, overdue_factor: float = DEFAULT_OVERDUE_FACTOR,
                 reqs: dict[str, _Req] | None = None, use_prior: bool = True):
        self.now = snap.now
        self.depth = snap.pass_depth
        self.cap = snap.scan_cap
        self.name_sets = snap.name_sets
        # Per request's models and selector: the bound from the sets' sizes, the hosts and GPUs they allow.
        self._allowed_n: dict[tuple[Any, str], tuple[int, int, int]] = {}
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
