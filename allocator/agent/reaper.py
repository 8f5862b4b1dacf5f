"""The reaper: hosts whose heartbeat stops are declared lost and what they held is freed.

``run_reaper`` is what ``allocator scheduler`` runs (or ``allocator reaper`` alone). Each pass
reads the hosts whose last heartbeat is older than the grace period, and for each calls the
``mark_lost`` script, which re-checks the heartbeat atomically (the agent may have beaten in the
meantime), marks the host lost, takes it out of every index and releases its allocations with
reason ``host_lost`` (bounded per call; a host with more left stays in the reclaim set and the
next call continues). Several reapers may run at once: the script is atomic and idempotent.

Only hosts an agent has heartbeated are watched; a host registered without an agent (tests,
static fleets registered by hand) is never declared lost.

Timing: heartbeats every 5 s, grace 20 s and a pass every 2 s mean a host that dies right after
a heartbeat is declared lost, and its grants freed, at most 22 s later (30 s is the target).

Hook for the queue: ``on_host_lost(LostHost)`` is called for each host declared lost or with
grants released in a pass; ``LostHost.released`` are allocation ids whose record now says state
``released`` and reason ``host_lost``. The same facts are in the outbox stream: one
``host_lost`` event per host, then one ``released`` event (reason ``host_lost``) per allocation,
so the queue can fail or requeue each function task by its own per-task policy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from ..client import Allocator
from ..errors import AllocatorError
from . import _redis
from .metrics import ALLOCATIONS_RECLAIMED, HOSTS_LOST, REAPER_PASSES

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 20.0
DEFAULT_REAPER_INTERVAL_S = 2.0
#: Most allocations one ``mark_lost`` call releases (bounds the time one script holds Redis).
RELEASE_BATCH = 256
#: Most stale hosts one pass looks at (the rest wait for the next pass).
HOST_BATCH = 1000
#: Most batches of stale hosts one pass handles (a bound, far above any real fleet's needs).
MAX_BATCHES_PER_PASS = 100


@dataclass
class LostHost:
    """What one ``mark_lost`` call did to a host."""

    host_id: str
    declared: bool
    released: list[str] = field(default_factory=list)
    remaining: int = 0
    gen: int = 1
    last_heartbeat_ms: int | None = None
    #: Preempted function tasks whose run on the host was being stopped: requeued or failed now,
    #: by their on_host_lost policy, since no worker will report their end.
    preempted: list[str] = field(default_factory=list)


def mark_lost(allocator: Allocator, host_id: str, grace_s: float = DEFAULT_GRACE_S, *,
              limit: int = RELEASE_BATCH) -> LostHost | None:
    """Declares ``host_id`` lost if its heartbeat is older than ``grace_s``, and frees its stale
    grants (at most ``limit``). None when the host is alive (or gone) and nothing was released."""
    r = _redis.call(allocator, "mark_lost", [allocator.keys.heartbeats, allocator.keys.reclaim],
                    host_id, int(grace_s * 1000), int(limit), allocator.pass_depth, allocator.scan_cap)
    if not r.get("ok"):
        return None
    lost = LostHost(host_id, bool(r.get("declared")), _redis.as_list(r.get("released")), int(r.get("remaining") or 0),
                    int(r.get("gen") or 1), r.get("last_heartbeat"), _redis.as_list(r.get("preempted")))
    if not lost.declared and not lost.released and not lost.remaining and not lost.preempted:
        return None
    return lost


def stale_hosts(allocator: Allocator, grace_s: float = DEFAULT_GRACE_S, *, limit: int = HOST_BATCH) -> list[str]:
    """Hosts whose heartbeat is older than ``grace_s``, plus hosts with grants left to reclaim."""
    cutoff = _redis.now_ms(allocator) - int(grace_s * 1000)
    pipe = allocator.redis.pipeline(transaction=False)
    pipe.zrangebyscore(allocator.keys.heartbeats, "-inf", cutoff, start=0, num=limit)
    pipe.zrange(allocator.keys.reclaim, 0, limit - 1)
    beats, reclaim = pipe.execute()
    return list(dict.fromkeys([*beats, *reclaim]))


def reap_lost_hosts(allocator: Allocator, grace_s: float = DEFAULT_GRACE_S, *, limit: int = RELEASE_BATCH,
                    on_host_lost: Callable[[LostHost], None] | None = None) -> list[LostHost]:
    """One reaper pass: every stale host is declared lost and its grants freed; returns what was done.

    Stale hosts are read ``HOST_BATCH`` at a time; each ``mark_lost`` call makes progress (the
    host leaves the heartbeats set, or releases up to ``limit`` grants), so the pass ends."""
    done: list[LostHost] = []
    for _ in range(MAX_BATCHES_PER_PASS):
        batch = stale_hosts(allocator, grace_s)
        for h in batch:
            lost = mark_lost(allocator, h, grace_s, limit=limit)
            if lost is not None:
                done.append(lost)
                _report(lost, grace_s, on_host_lost)
        if len(batch) < HOST_BATCH:
            break
    return done


def _report(lost: LostHost, grace_s: float, on_host_lost: Callable[[LostHost], None] | None) -> None:
    """Log, metrics and the queue's hook for one host's reclaim."""
    if lost.declared:
        HOSTS_LOST.inc()
        log.warning("host %s declared lost (no heartbeat for %.1f s); %d allocation(s) released",
                    lost.host_id, grace_s, len(lost.released))
    ALLOCATIONS_RECLAIMED.inc(len(lost.released))
    if on_host_lost is not None:
        try:
            on_host_lost(lost)
        except Exception:  # a failing hook must not stop the reaper
            log.exception("on_host_lost hook failed for host %s", lost.host_id)


def run_reaper(
    allocator: Allocator,
    grace_s: float = DEFAULT_GRACE_S,
    interval_s: float = DEFAULT_REAPER_INTERVAL_S,
    stop_event: threading.Event | None = None,
    *,
    on_host_lost: Callable[[LostHost], None] | None = None,
    expire_leases: bool = True,
) -> None:
    """Runs reaper passes every ``interval_s`` until ``stop_event`` is set.

    Each pass declares stale hosts lost (``reap_lost_hosts``) and, with ``expire_leases``, also
    releases allocations past their TTL (``Allocator.expire``). Redis errors are logged and the
    loop goes on: a reaper that dies on a network blip would let lost hosts keep their grants.
    """
    stop = stop_event or threading.Event()
    while not stop.is_set():
        try:
            reap_lost_hosts(allocator, grace_s, on_host_lost=on_host_lost)
            if expire_leases:
                allocator.expire()
            REAPER_PASSES.inc()
        except (redis.RedisError, AllocatorError) as exc:
            log.error("reaper pass failed: %s", exc)
        stop.wait(interval_s)
