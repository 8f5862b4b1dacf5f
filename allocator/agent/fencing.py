"""Fencing: a worker checks that a grant is still current right before it starts a job.

When the reaper declares a host lost it frees the host's allocations; when the host comes back it
registers under a new generation (``gen``). A worker on that host may still hold job ids placed
before the loss. ``check_grant`` reads the allocation and its host in one atomic script and says
whether the grant is still good: active, host present and not lost, and made under the host's
current generation (the record's ``host_gen``). Anything else is refused with the reason.

A worker uses two calls per job: ``claim_grant(..., start=True)`` before it forks (check, claim
the placement, return the grant, record ``started``) and ``finish_job`` after the job (drop the
horse's pid, requeue a preempted task, or record ``finished`` and release the claimed placement).
Each is one atomic script, so the worker pays two round trips instead of one per step.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from ..client import Allocator
from ..errors import InvalidRequest, Refused
from . import _redis

#: Reasons ``check_grant`` gives, besides "ok" (``claim_grant`` adds "wrong_host", "already_claimed"
#: and "expired").
REASONS = ("not_found", "not_active", "host_missing", "host_lost", "stale_generation")


class StaleGrant(Refused):
    """The allocation may not be used to start work (released, host lost, or an old generation)."""

    code = "STALE_GRANT"
    default_message = "the grant is no longer current"


@dataclass(frozen=True)
class GrantStatus:
    allocation_id: str
    current: bool
    reason: str
    state: str | None = None
    host_id: str | None = None
    host_state: str | None = None
    gen: int | None = None
    host_gen: int | None = None
    token: str | None = None  # claim_grant: the placement "<host>|<host_gen>|<activated ms>|<requeues>"
    claimed_by: str | None = None
    grant: ClaimedGrant | None = None  # claim_grant(start=True), on a successful claim only
    expires_ms: int | None = None  # claim_grant(run_lease_s=...): the deadline after the claim (0 = none)


@dataclass(frozen=True)
class ClaimedGrant:
    """What a claim with ``start=True`` returns of the allocation, so the worker can confine the
    work horse without reading the record again: the GPU grants as recorded (dicts with ``pos``,
    ``index``, ``uuid``, ``model``, ``memory_mb``), the exclusive core ids, the shared CPU in
    millicores and, for a grant of shared CPU only, the host's cores nobody holds exclusively at
    the claim (where fractional grants run)."""

    gpus: list[dict[str, Any]] = field(default_factory=list)
    cores: list[int] = field(default_factory=list)
    shared_millis: int = 0
    pool: list[int] = field(default_factory=list)

    @property
    def cpu_amount(self) -> float:
        """Cores granted: the exclusive ones plus the shared share (as ``Allocation.cpu_total``)."""
        return len(self.cores) + self.shared_millis / 1000


@dataclass(frozen=True)
class JobEnd:
    """What ``finish_job`` did after a worker's job ended."""

    requeued: bool  # the task was being preempted: it went back to the front of its priority
    released: bool  # this call released the allocation (reason "released" or "failed")
    stale: bool  # still active on this host, but placed again since the claim: nothing freed
    status: str | None = None  # the job status the "finished" event recorded


def check_grant(allocator: Allocator, allocation_id: str) -> GrantStatus:
    """Whether ``allocation_id`` may start work now, with the reason when it may not."""
    r = _redis.call(allocator, "grant_check", [], allocation_id)
    return GrantStatus(
        allocation_id=allocation_id, current=bool(r.get("current")), reason=str(r.get("reason")),
        state=r.get("state"), host_id=r.get("host"), host_state=r.get("host_state"),
        gen=r.get("gen"), host_gen=r.get("host_gen"),
    )


def placement_token(host: str | None, host_gen: str | None, activated: str | None, requeues: str | None) -> str:
    """The name of one placement of an allocation, as ``claim_grant.lua`` and ``release.lua`` build it
    from the record's fields ``host``, ``host_gen``, ``activated`` and ``requeues``."""
    return f"{host or ''}|{host_gen or '1'}|{activated or ''}|{requeues or '0'}"


#: Record fields ``placement_token`` is built from, in its argument order.
PLACEMENT_FIELDS = ("host", "host_gen", "activated", "requeues")


def node_name() -> str:
    """The machine a worker's claim names and the agent's dead-worker check compares with its own:
    ``ALLOCATOR_NODE`` when set (containers of one machine: agent and workers set the same value),
    else the hostname."""
    return os.environ.get("ALLOCATOR_NODE") or socket.gethostname()


def claim_grant(allocator: Allocator, allocation_id: str, worker: str, host_id: str, *,
                node: str | None = None, pid: int | None = None, start: bool = False,
                run_lease_s: float | None = None) -> GrantStatus:
    """``check_grant`` for a worker about to start the job, which also claims the placement:
    each placement (host, generation, activation time) is claimed once, so a second copy of the
    same queue entry (popped by a worker before its host was declared lost) cannot start a
    second run of it. The claim records the worker's machine (``node``, default ``node_name()``)
    and ``pid`` (default this process), so the host's agent can tell when the worker died. ``token`` names the placement; pass it to ``Allocator.release(...,
    placement=token)`` so the end of this run frees only this placement.

    ``start=True`` (a worker about to fork the job's work horse): a successful claim also returns
    the grant (``GrantStatus.grant``) and appends the job's ``started`` event with the server
    clock, in the same atomic call: one round trip before the fork instead of one per step.

    ``run_lease_s`` (a worker: the job's time limit plus the time it may take to kill an
    overrunning horse; ``math.inf`` for a job without a time limit) moves the deadline of an
    allocation with a TTL to the claim time plus the run lease when that is later, or removes it
    for a job without a time limit, so a TTL never ends a run before RQ would stop it; None
    leaves the deadline as placed. A claim after the deadline passed releases the allocation as
    expired and is refused (reason ``expired``)."""
    r = _redis.call(allocator, "claim_grant", [], allocation_id, worker, host_id,
                    node_name() if node is None else node, os.getpid() if pid is None else pid,
                    "1" if start else "", _lease_arg(run_lease_s))
    g = r.get("grant")
    grant = None if not isinstance(g, dict) else ClaimedGrant(
        gpus=json.loads(g.get("gpus") or "[]") or [], cores=json.loads(g.get("cores") or "[]") or [],
        shared_millis=int(g.get("shared_millis") or 0), pool=_redis.as_list(g.get("pool")))
    return GrantStatus(
        allocation_id=allocation_id, current=bool(r.get("current")), reason=str(r.get("reason")),
        state=r.get("state"), host_id=r.get("host"), host_state=r.get("host_state"),
        gen=r.get("gen"), host_gen=r.get("host_gen"), token=r.get("token"), claimed_by=r.get("claimed_by"),
        grant=grant, expires_ms=None if r.get("expires") is None else int(r["expires"]),
    )


#: The longest run lease a claim sends (about three years; the script takes at most 12 digits).
_MAX_LEASE_MS = 10**11


def _lease_arg(run_lease_s: float | None) -> str:
    """``claim_grant.lua``'s ARGV[9]: "" keep, "0" no time limit, else whole ms (a limit beyond
    ``_MAX_LEASE_MS``, about three years, counts as that)."""
    if run_lease_s is None:
        return ""
    if isinstance(run_lease_s, bool) or not isinstance(run_lease_s, (int, float)) or math.isnan(run_lease_s) \
            or run_lease_s <= 0:
        raise InvalidRequest("run_lease_s", f"must be a positive number of seconds or math.inf, got {run_lease_s!r}")
    return "0" if math.isinf(run_lease_s) else str(min(_MAX_LEASE_MS, max(1, math.ceil(run_lease_s * 1000))))


def finish_job(allocator: Allocator, allocation_id: str, host_id: str, placement: str | None, *,
               horse_pid: int | None = None, status: str | None = None, outcome: str | None = None,
               job_key: str | bytes, worker_lost: bool = False) -> JobEnd:
    """After a job's work horse ended, whatever the outcome: in one atomic call
    (``finish_job.lua``), drop the horse's entry from the host's work-horse map, requeue the task
    if it was being preempted, else (only while the claimed ``placement`` is still the current
    one) record the ``finished`` event and release the allocation, "released" when the job
    finished and "failed" otherwise. ``status`` is the job's RQ status; None reads it from the
    job hash ``job_key`` inside the script (no extra round trip). A hash that is gone counts as
    ``outcome``, what the worker's horse reported ("finished" or "failed"): RQ deletes the hash of
    a successful job kept for ``result_ttl=0`` before the worker gets here, and only the horse knew
    it succeeded; without one, status "None", a failure. ``worker_lost``: the host's agent
    reports for a worker that died (the ``finished`` event says so)."""
    r = _redis.call(allocator, "finish_job", [allocator.keys.host_pids(host_id), job_key], allocation_id, host_id,
                    placement or "", "" if not horse_pid else str(horse_pid), status or "",
                    allocator.pass_depth, allocator.scan_cap, outcome or "", "1" if worker_lost else "")
    return JobEnd(requeued=bool(r.get("requeued")), released=bool(r.get("released")), stale=bool(r.get("stale")),
                  status=r.get("status"))


def grant_is_current(allocator: Allocator, allocation_id: str) -> bool:
    return check_grant(allocator, allocation_id).current


def require_current_grant(allocator: Allocator, allocation_id: str) -> GrantStatus:
    """``check_grant`` that raises ``StaleGrant`` (with the reason) unless the grant is current."""
    st = check_grant(allocator, allocation_id)
    if not st.current:
        where = f" on host {st.host_id}" if st.host_id else ""
        gens = f" (granted under generation {st.host_gen}, host is at {st.gen})" if st.reason == "stale_generation" else ""
        raise StaleGrant(f"allocation {allocation_id}{where} may not start work: {st.reason}{gens}",
                         details={"reason": st.reason, "host": st.host_id})
    return st


def signal_run(pid: int, sig: int) -> None:
    """Sends ``sig`` to a work horse and whatever it started: a horse leads its own process group
    (one just forked, not yet in its group, runs nothing else yet). ProcessLookupError when it is
    gone."""
    if os.getpgid(pid) == pid:
        os.killpg(pid, sig)
    else:
        os.kill(pid, sig)

