"""Fencing: a worker checks that a grant is still current right before it starts a job.

When the reaper declares a host lost it frees the host's allocations; when the host comes back it
registers under a new generation (``gen``). A worker on that host may still hold job ids placed
before the loss. ``check_grant`` reads the allocation and its host in one atomic script and says
whether the grant is still good: active, host present and not lost, and made under the host's
current generation (the record's ``host_gen``). Anything else is refused with the reason.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..client import Allocator
from ..errors import Refused
from . import _redis

#: Reasons ``check_grant`` gives, besides "ok" (``claim_grant`` adds "wrong_host" and "already_claimed").
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


def claim_grant(allocator: Allocator, allocation_id: str, worker: str, host_id: str, *,
                node: str | None = None, pid: int | None = None) -> GrantStatus:
    """``check_grant`` for a worker about to start the job, which also claims the placement:
    each placement (host, generation, activation time) is claimed once, so a second copy of the
    same queue entry (popped by a worker before its host was declared lost) cannot start a
    second run of it. The claim records the worker's machine (``node``, default this hostname)
    and ``pid`` (default this process), so the host's agent can tell when the worker died. ``token`` names the placement; pass it to ``Allocator.release(...,
    placement=token)`` so the end of this run frees only this placement."""
    r = _redis.call(allocator, "claim_grant", [], allocation_id, worker, host_id,
                    socket.gethostname() if node is None else node, os.getpid() if pid is None else pid)
    return GrantStatus(
        allocation_id=allocation_id, current=bool(r.get("current")), reason=str(r.get("reason")),
        state=r.get("state"), host_id=r.get("host"), host_state=r.get("host_state"),
        gen=r.get("gen"), host_gen=r.get("host_gen"), token=r.get("token"), claimed_by=r.get("claimed_by"),
    )


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
