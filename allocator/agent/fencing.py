"""Fencing: a worker checks that a grant is still current right before it starts a job.

When the reaper declares a host lost it frees the host's allocations; when the host comes back it
registers under a new generation (``gen``). A worker on that host may still hold job ids placed
before the loss. ``check_grant`` reads the allocation and its host in one atomic script and says
whether the grant is still good: active, host present and not lost, and made under the host's
current generation (the record's ``host_gen``). Anything else is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..client import Allocator
from ..errors import Refused
from . import _redis

#: Reasons ``check_grant`` gives, besides "ok".
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


def check_grant(allocator: Allocator, allocation_id: str) -> GrantStatus:
    """Whether ``allocation_id`` may start work now, with the reason when it may not."""
    r = _redis.call(allocator, "grant_check", [], allocation_id)
    return GrantStatus(
        allocation_id=allocation_id, current=bool(r.get("current")), reason=str(r.get("reason")),
        state=r.get("state"), host_id=r.get("host"), host_state=r.get("host_state"),
        gen=r.get("gen"), host_gen=r.get("host_gen"),
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
