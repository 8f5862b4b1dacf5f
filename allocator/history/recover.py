"""``allocator recover``: rebuild the ledger's active allocations from the history after Redis
lost its data.

Steps, with placements refused throughout (the recovery gate, ``recovery.lua``):

1. open the gate: ``place`` answers RECOVERING, so nothing new lands on capacity that is about to
   be claimed back by allocations that already run;
2. re-register the hosts the history knows and the ledger does not (skipped with
   ``restore_hosts=False`` when the agents re-register them; either order works, because a host
   registration recomputes usage from the allocations already restored on it); a drain comes
   back as whoever made it (``hosts.drained_by``), and an operator's drain is applied again to
   a host its agent registered before the recovery (``restore_drains``);
3. restore every allocation the history has as active, in placement order, in batches
   (``restore_allocation.lua``): grants are re-checked against what is free, and one that no
   longer fits is closed with reason ``recovery_conflict`` instead of oversubscribing;
4. check the ledger invariants on an atomic snapshot; only a consistent ledger closes the gate.

What the recorder had not written when Redis lost its data cannot come back: allocations placed
in that window are unknown (their owners get ALLOCATION_NOT_FOUND on release) and leases
released in that window come back as active until released again or their TTL ends. Function
tasks are checked against RQ first: one whose run ended meanwhile (RQ wrote its end again)
is closed instead of restored ("ended"). Tasks that waited in line are not restored (the line is
not rebuilt); the report lists them ("lost").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from .. import invariants
from ..client import Allocator
from ..errors import AllocatorError, InvalidRequest
from ..models import shown
from ..queue import RUN_ENDED
from ..units import duration_ms
from .db import dt_to_ms
from .models import allocations as A
from .models import hosts as H

log = logging.getLogger(__name__)


class RecoveryFailed(AllocatorError):
    """The rebuilt ledger is not consistent; placements stay refused until an operator looks."""

    code = "RECOVERY_FAILED"
    default_message = "recovery left the ledger inconsistent; placements stay refused"


@dataclass
class RecoveryReport:
    restored: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    hosts_restored: list[str] = field(default_factory=list)
    # Hosts whose recorded inventory this release refuses (e.g. a control character in a GPU
    # model recorded before such were refused): left for their agents to register.
    hosts_refused: list[dict[str, str]] = field(default_factory=list)
    drains_restored: list[str] = field(default_factory=list)  # operator drains applied again (restore_drains)
    ended: list[str] = field(default_factory=list)  # function tasks closed, not restored (see _ended_jobs)
    lost: list[str] = field(default_factory=list)  # tasks that waited in line: the line is not rebuilt

    def as_dict(self) -> dict[str, Any]:
        return {"restored": len(self.restored), "deferred": len(self.deferred), "existing": len(self.existing),
                "conflicts": self.conflicts, "hosts_restored": self.hosts_restored, "hosts_refused": self.hosts_refused,
                "drains_restored": self.drains_restored, "ended": self.ended,
                "lost": self.lost}


def _script(a: Allocator, name: str, *args: object) -> dict[str, Any]:
    raw = a.scripts[name](keys=a.keys.ledger_keys(), args=[a.keys.prefix, a._now_arg(), *args])
    res = json.loads(raw)
    if not res.get("ok", True):
        raise AllocatorError(res.get("message"), details={"code": res.get("code")})
    return res


def _ids(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def begin(a: Allocator, reason: str = "allocator recover") -> bool:
    """Opens the recovery gate (placements refused); True if this call opened it."""
    return bool(_script(a, "recovery", "begin", json.dumps({"reason": reason}))["changed"])


def finish(a: Allocator, report: RecoveryReport | None = None) -> bool:
    """Closes the recovery gate; True if this call closed it."""
    details = report.as_dict() if report else {}
    return bool(_script(a, "recovery", "end", json.dumps(details))["changed"])


def close_after_loss(a: Allocator) -> bool:
    """Closes the recovery gate after a loss of Redis's data, unless a recovery stamp shows the
    ledger was rebuilt since (decided in ``recovery.lua``); True if placements are now stopped."""
    res = _script(a, "recovery", "lost", "{}")
    return bool(res["changed"] or res["recovering"])


def is_recovering(a: Allocator) -> bool:
    return a.redis.hget(a.keys.seq, "recovering") == "1"


def _expected_ms(request: Any) -> int:
    """The duration hint the request gave (``expected_duration`` seconds), 0 for none: the expected
    end is rebuilt from it as a placement builds it."""
    v = request.get("expected_duration") if isinstance(request, dict) else None
    return duration_ms(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0


def _slots(request: Any) -> int:
    """The worker slots the request held (``resources.workers``, 0 for none): the ledger counts
    them on the host (``slots_used``), so a restored grant must hold them again or the host's
    slots could be handed out twice."""
    res = request.get("resources") if isinstance(request, dict) else None
    v = res.get("workers") if isinstance(res, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def restore_record(row: dict[str, Any], ended: str | None = None) -> dict[str, Any]:
    """The restore_allocation payload for one ``allocations`` row; ``ended``: the reason to close
    it with instead of restoring it (see ``_ended_jobs``)."""
    cores = row["cores"] if isinstance(row["cores"], list) else []
    placed = dt_to_ms(row["placed_at"])
    rec = {
        "id": row["allocation_id"], "task_id": row["task_id"] or "", "task_type": row["task_type"] or "",
        "owner": row["owner"] or "", "priority": row["priority"] if row["priority"] is not None else 1,
        "strategy": row["strategy"] or "", "host": row["host_id"], "host_gen": row["host_gen"] or 1,
        "gpus": row["gpus"] if isinstance(row["gpus"], list) else [], "cores": cores,
        "shared_millis": max(0, int(row["cpu_millis"] or 0) - 1000 * len(cores)), "ram_mb": int(row["ram_mb"] or 0),
        "created": dt_to_ms(row["submitted_at"]) or placed, "activated": placed, "ttl_ms": int(row["ttl_ms"] or 0),
        "expires": dt_to_ms(row["expires_at"]) or 0, "metadata": json.dumps(row["metadata"] or {}),
        "request": json.dumps(row["request"] or {}), "kind": row["kind"] or "lease",
        "requeues": int(row.get("requeues") or 0), "expected_ms": _expected_ms(row["request"]),
        "slots": _slots(row["request"]),
    }
    if ended:
        rec["ended"] = ended
    return rec


def _host_spec(host_id: str, stored: Any) -> dict[str, Any]:
    """The ``register_host`` input for a host whose ``spec`` column holds the payload it was last
    registered with (``Allocator.register_host``: ``cpu_cores`` sent as ``cores``). Every field of
    that payload is passed back, not only the capacity: reserved GPUs, worker slots and the service
    port pool decide what may be placed on the host, so a restored host must offer what it did."""
    spec = dict(stored) if isinstance(stored, dict) else {}
    out: dict[str, Any] = {"id": host_id, "labels": spec.get("labels") or {}, "cpu_cores": spec.get("cores") or [],
                           "ram_mb": spec.get("ram_mb") or 0, "gpus": spec.get("gpus") or [],
                           "reserve_gpus": spec.get("reserve_gpus") or 0}
    if spec.get("worker_slots") is not None:  # None: one slot per core, the default
        out["worker_slots"] = spec["worker_slots"]
    if spec.get("service_ports"):
        out["service_ports"] = spec["service_ports"]
    return out


def restore_hosts(a: Allocator, engine: Engine, *, watch: bool = False,
                  refused: list[dict[str, str]] | None = None) -> list[str]:
    """Registers hosts the history knows (not removed or lost) that the ledger lacks, in the order
    they were first registered: a registration gives a new host the next ordinal, and first fit
    scans hosts by ordinal, so the restored fleet is scanned in the order it was before. ``watch``
    (every host is served by an agent): each gets a heartbeat at the recovery's time, so a machine
    that died with the data is declared lost after the grace. Without it a restored host is not
    watched until its agent reports, as a host registered by hand never is (the history does not
    say which hosts had an agent). A host whose recorded inventory no longer validates is skipped
    (listed in ``refused``): one host must not keep the whole ledger closed to placements."""
    q = (select(H).where(H.c.namespace == a.keys.namespace, H.c.state.in_(("ready", "draining")))
         .order_by(H.c.registered_at, H.c.host_id))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    done: list[str] = []
    for r in rows:
        if a.redis.exists(a.keys.host(r["host_id"])):
            continue
        try:
            # Only if still absent, checked in the script: an agent may register the host between
            # the check above and this call, and its inventory is newer than the history's.
            if a.register_host(_host_spec(r["host_id"], r["spec"]), only_new=True).get("skipped"):
                continue
        except InvalidRequest as exc:
            log.warning("host %r not restored: its recorded inventory is refused now (%s)", r["host_id"], shown(exc))
            if refused is not None:
                refused.append({"host_id": r["host_id"], "reason": str(exc)})
            continue
        if r["state"] == "draining":
            # As whoever drained it: an agent's own drain is resumed by its next start, an
            # operator's (or one the history does not attribute) stays until resumed.
            a.drain_host(r["host_id"], by_agent=r["drained_by"] == "agent")
        if watch:  # as if its agent had just reported (the reaper never looks at a host without one)
            a.redis.zadd(a.keys.heartbeats, {r["host_id"]: a.now_ms()}, nx=True)
        done.append(r["host_id"])
    return done


def restore_drains(a: Allocator, engine: Engine) -> list[str]:
    """Applies the drains the history has to the rebuilt ledger (``drain_host.lua``'s "restore"
    and "end_agent_drain"), whatever registered the hosts and whenever: restore_hosts, or agents
    before or during the recovery.

    An operator's drain stays until the operator resumes: a ready host drains again, a draining
    or lost one becomes the operator's (a lost one comes back draining), and one not registered
    yet gets the drain when it registers (``Keys.drain_on_register``). An agent's own drain ended
    with the ledger that held it (its agent's next registration starts the host ready), so a
    host not registered or ready is recorded as resumed and the history stops calling it
    draining. Returns the hosts with an operator's drain restored."""
    # A lost host keeps its drain in the history: an operator's must come back at its next
    # registration, an agent's ends (the ledger that would have said so is gone).
    q = select(H.c.host_id, H.c.drained_by).where(
        H.c.namespace == a.keys.namespace,
        (H.c.state == "draining") | ((H.c.state == "lost") & H.c.drained_by.is_not(None)))
    with engine.connect() as conn:
        rows = [(r.host_id, r.drained_by) for r in conn.execute(q)]
    done: list[str] = []
    for host_id, by in rows:
        mode = "end_agent_drain" if by == "agent" else "restore"
        _script(a, "drain_host", host_id, mode, 0, a.scan_cap)
        if mode == "restore":
            done.append(host_id)
    return done


def restore_allocations(a: Allocator, engine: Engine, *, batch: int = 200) -> RecoveryReport:
    """Restores the history's active allocations (the gate must be open)."""
    report = RecoveryReport()
    q = (select(A).where(A.c.namespace == a.keys.namespace, A.c.state == "active")
         .order_by(A.c.placed_at, A.c.allocation_id))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(q).mappings()]
    ended = _ended_jobs(a, rows)
    for i in range(0, len(rows), batch):
        payload = [restore_record(r, ended.get(r["allocation_id"])) for r in rows[i:i + batch]
                   if r["host_id"] and r["placed_at"]]
        if not payload:
            continue
        res = _script(a, "restore_allocation", json.dumps(payload))
        report.restored += _ids(res.get("restored"))
        report.deferred += _ids(res.get("deferred"))
        report.existing += _ids(res.get("existing"))
        report.conflicts += _ids(res.get("conflicts"))
        report.ended += _ids(res.get("ended"))
    return report


def lost_line(a: Allocator, engine: Engine) -> list[str]:
    """The tasks the history has as waiting in line that the ledger no longer knows: the line is
    not rebuilt (their requests, and a function task's RQ job, went with the data). Reported, not
    closed: one may have been placed and started since the recorder's last write, and run on."""
    q = select(A.c.allocation_id).where(A.c.namespace == a.keys.namespace, A.c.state == "pending")
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(q)]
    if not ids:
        return []
    pipe = a.redis.pipeline(transaction=False)
    for i in ids:
        pipe.exists(a.keys.alloc(i))
    return [i for i, known in zip(ids, pipe.execute()) if not known]


#: RQ statuses of a run that is over.


def _ended_jobs(a: Allocator, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Function tasks the history has as active whose run ended while Redis was without its data
    (RQ wrote the job's end again), with the reason to close them with: "released" when it
    finished, "failed" otherwise. Any other job is restored: one whose hash is gone may still run
    (RQ does not write a running job's hash again, and the history may not have its start yet), and
    its worker releases it at its end."""
    jobs = [r for r in rows if r["kind"] == "job"]
    if not jobs:
        return {}
    pipe = a.rq_connection.pipeline(transaction=False)
    for r in jobs:
        pipe.hget(a.keys.rq_job(r["allocation_id"]), "status")
    out: dict[str, str] = {}
    for r, status in zip(jobs, pipe.execute()):
        status = status.decode() if isinstance(status, bytes) else status
        if status in RUN_ENDED:
            out[r["allocation_id"]] = "released" if status == "finished" else "failed"
    return out


def recover(a: Allocator, engine: Engine, *, with_hosts: bool = True, watch_hosts: bool = False,
            batch: int = 200) -> RecoveryReport:
    """The whole procedure (see the module docstring). Raises ``RecoveryFailed`` and leaves the
    gate closed to placements if the rebuilt ledger breaks an invariant. ``watch_hosts``: see
    ``restore_hosts``."""
    begin(a)
    report = RecoveryReport()
    if with_hosts:
        report.hosts_restored = restore_hosts(a, engine, watch=watch_hosts, refused=report.hosts_refused)
    report.drains_restored = restore_drains(a, engine)
    restored = restore_allocations(a, engine, batch=batch)
    report.restored, report.deferred = restored.restored, restored.deferred
    report.existing, report.conflicts, report.ended = restored.existing, restored.conflicts, restored.ended
    report.lost = lost_line(a, engine)
    a.recount_names()  # the count of models and labels, whatever wrote the hosts before
    violations = invariants.check(a.snapshot())
    if violations:
        raise RecoveryFailed(details={"violations": violations[:50], **report.as_dict()})
    finish(a, report)
    log.info("recovered ledger %s: %s", a.keys.namespace, report.as_dict())
    return report
