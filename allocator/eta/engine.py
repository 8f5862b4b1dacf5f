"""The engine: estimates on demand or from the cache the scheduler tick writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from .fleet import DEFAULT_MAX_AGE_S, DEFAULT_OVERDUE_FACTOR, DEFAULT_STAT, Snapshot
from .simulation import Simulation
from .snapshot import _Cache, read_snapshot

if TYPE_CHECKING:
    from ..client import Allocator


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
