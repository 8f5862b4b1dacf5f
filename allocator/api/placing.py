"""Placing a request with a policy: candidates, evaluation, and the atomic commit.

The policy decides *where*; the ledger decides whether it still fits and the line decides
*when*. One attempt reads the candidate hosts (inventory + live free capacity), asks the policy,
checks its answer, and commits it with ``place_on.lua``, which re-checks the host and GPUs in
the same atomic step as the grant. If the capacity was taken in between (another client won the
race), the policy is asked again with fresh figures, up to ``attempts`` times; then the request
either waits in line pinned to the policy's last choice (``on_busy="queue"``) or fails with
``PolicyConflict`` naming the last reason. With ``on_busy="queue"`` a choice is committed at once
only when no task of the same or a higher priority is waiting; otherwise the request joins the
line behind them (pinned to the chosen host), so a policy never jumps the queue.

When the policy leaves the host to the ledger (built-in strategies, ``{}``, or a cluster only),
the request goes through the ledger's own paths: ``place.lua`` (fail when busy) or the line
(``submit.lua``), restricted to the candidates by a label selector.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from .. import queue
from ..client import Allocator
from ..errors import InvalidRequest, Recovering, from_code
from ..models import Allocation, AllocationRequest, GpuCapacity, parse_selector
from .errors import NoCandidates, PolicyConflict, PolicyError
from .policies import BUILTINS, PolicyChoice, check_output
from .schemas import Placement

log = logging.getLogger(__name__)

CONFLICT_CODES = {"INSUFFICIENT_CPU", "INSUFFICIENT_RAM", "INSUFFICIENT_GPU_MEMORY", "INSUFFICIENT_GPUS",
                  "NO_FIT", "HOST_NOT_READY", "HOST_NOT_FOUND"}


@dataclass
class Candidate:
    """A host a policy may choose: static inventory plus live free capacity."""

    node_id: str
    cluster_id: str
    labels: dict[str, str]
    gpus: list[GpuCapacity]
    cpu_total: float
    cpu_free: float
    ram_total: float
    ram_free: float
    active_allocations: int
    heartbeat_age_s: float | None = None
    reserve_gpus: int = 0

    def data(self) -> dict[str, Any]:
        """Static inventory (seed 003's cluster ``data``, per node); ``reserve_gpus``: idle GPUs
        the node keeps for critical-priority work (the ledger refuses a lower priority that
        would leave fewer idle)."""
        return {"node_id": self.node_id, "cluster_id": self.cluster_id, "labels": self.labels,
                "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model, "memory_mb": g.memory.total} for g in self.gpus],
                "cpu_cores": self.cpu_total, "ram_mb": self.ram_total, "reserve_gpus": self.reserve_gpus}

    def metrics(self) -> dict[str, Any]:
        """Live free capacity (seed 003's ``cluster_metrics``, per node)."""
        return {"gpus": [{"index": g.index, "uuid": g.uuid, "free_mb": g.memory.available,
                          "allocated_mb": g.memory.allocated, "holders": g.holders} for g in self.gpus],
                "cpu_free": self.cpu_free, "ram_free_mb": self.ram_free,
                # The ledger parks a host with no free CPU or no free RAM: it takes no new work,
                # not even a request for no CPU or RAM, until something there is released.
                "schedulable": self.cpu_free > 0 and self.ram_free > 0,
                "active_allocations": self.active_allocations, "heartbeat_age_s": self.heartbeat_age_s}

    def flat(self) -> dict[str, Any]:
        d = self.data()
        m = self.metrics()
        d["gpus"] = [{**s, **l, "model": s["model"]} for s, l in zip(d["gpus"], m.pop("gpus"))]
        return {**d, **m}


def merge_selectors(*selectors: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    """Intersection of label selectors (a label named twice must take a value both allow)."""
    out: dict[str, list[str]] = {}
    for sel in selectors:
        for k, vals in (sel or {}).items():
            out[k] = [v for v in out[k] if v in vals] if k in out else list(vals)
    return out or None


def candidate_selector(clusters: list[str] | None, filter_: Any, request_selector: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
    sel_clusters = {"cluster": list(clusters)} if clusters else None
    return merge_selectors(sel_clusters, parse_selector(filter_, "filter"), request_selector)


def read_candidates(a: Allocator, selector: dict[str, list[str]] | None) -> dict[str, Candidate]:
    """Ready hosts matching ``selector``, with live free capacity, in registration order."""
    cap = a.capacity()
    beats = dict(a.redis.zrange(a.keys.heartbeats, 0, -1, withscores=True))
    now_ms = _now_ms(a) if beats else 0
    out: dict[str, Candidate] = {}
    for h in cap.hosts:
        if h.state != "ready":
            continue
        if selector and not labels_match(h.labels, selector):
            continue
        beat = beats.get(h.host_id)
        out[h.host_id] = Candidate(
            node_id=h.host_id, cluster_id=h.labels.get("cluster", "default"), labels=h.labels, gpus=h.gpus,
            cpu_total=h.cpu_cores.total, cpu_free=h.cpu_cores.available, ram_total=h.ram_mb.total,
            ram_free=h.ram_mb.available, active_allocations=h.active_allocations,
            heartbeat_age_s=round((now_ms - beat) / 1000, 3) if beat is not None else None, reserve_gpus=h.reserve_gpus)
    return out


def labels_match(labels: dict[str, str], selector: dict[str, list[str]]) -> bool:
    """The ledger's rule (placement.lua): every selector label present with an allowed value."""
    return all(k in labels and str(labels[k]) in vals for k, vals in selector.items())


def matching_hosts(a: Allocator, selector: dict[str, list[str]] | None) -> list[str]:
    """Ready hosts matching ``selector``: the cheap check (state and labels only) done before a
    request is accepted, so "no such cluster" is an error at once rather than a wait."""
    ids = a.redis.zrange(a.keys.hosts, 0, -1)
    pipe = a.redis.pipeline(transaction=False)
    for h in ids:
        pipe.hmget(a.keys.host(h), "state", "labels")
    out = []
    for h, (state, labels) in zip(ids, pipe.execute() if ids else []):
        if state == "ready" and (not selector or labels_match(json.loads(labels or "{}") or {}, selector)):
            out.append(h)
    return out


def _now_ms(a: Allocator) -> int:
    if a.clock is not None:
        return int(a.clock() * 1000)
    sec, usec = a.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def request_view(req: AllocationRequest) -> dict[str, Any]:
    r = req.resources
    return {"gpus": r.gpus, "gpu_memory_mb": r.gpu_memory_mb, "gpu_model": r.gpu_model, "cpu_cores": r.cpu_cores,
            "ram_mb": r.ram_mb, "priority": req.priority.label, "strategy": req.strategy.value,
            "ttl_seconds": req.ttl_seconds, "expected_duration": req.expected_duration}


def input_data(cands: dict[str, Candidate], inputs: dict[str, Any], req: AllocationRequest, attempt: int,
               last_refusal: dict[str, Any] | None) -> dict[str, Any]:
    """What ``eval`` receives: seed 003's ``cluster_data`` and ``inputs``, plus a flat list."""
    clusters: dict[str, Any] = {}
    for c in cands.values():
        entry = clusters.setdefault(c.cluster_id, {"data": {"cluster_id": c.cluster_id, "nodes": {}},
                                                   "cluster_metrics": {"nodes": {}, "gpu_memory_free_mb": 0.0,
                                                                       "gpus_idle": 0, "cpu_free": 0.0, "ram_free_mb": 0.0}})
        entry["data"]["nodes"][c.node_id] = c.data()
        m = entry["cluster_metrics"]
        m["nodes"][c.node_id] = c.metrics()
        m["gpu_memory_free_mb"] += sum(g.memory.available for g in c.gpus)
        m["gpus_idle"] += sum(1 for g in c.gpus if g.holders == 0 and g.memory.available > 0)
        m["cpu_free"] += c.cpu_free
        m["ram_free_mb"] += c.ram_free
    return {"cluster_data": clusters, "candidates": [c.flat() for c in cands.values()], "inputs": inputs,
            "request": request_view(req), "attempt": attempt, "last_refusal": last_refusal}


class ClusterClient:
    """Seed 003's ``settings['cluster_client']``, answered from the ledger (read-only)."""

    def __init__(self, a: Allocator, selector: dict[str, list[str]] | None) -> None:
        self._a, self._selector = a, selector

    def read_cluster(self, cluster_id: str) -> tuple[bool, Any]:
        nodes = {c.node_id: c.data() for c in read_candidates(self._a, self._selector).values() if c.cluster_id == cluster_id}
        return (True, {"cluster_id": cluster_id, "nodes": nodes}) if nodes else (False, f"cluster {cluster_id!r} not found")

    def execute_query(self, query: Any) -> tuple[bool, Any]:
        try:
            sel = merge_selectors(self._selector, parse_selector(query, "query"))
        except InvalidRequest as exc:
            return False, str(exc)
        return True, [c.data() for c in read_candidates(self._a, sel).values()]


class ClusterMetricsClient:
    """Seed 003's ``settings['cluster_metrics_client']``, answered from the ledger (read-only)."""

    def __init__(self, a: Allocator, selector: dict[str, list[str]] | None) -> None:
        self._a, self._selector = a, selector

    def get_cluster(self, cluster_id: str) -> dict[str, Any]:
        return {c.node_id: c.metrics() for c in read_candidates(self._a, self._selector).values() if c.cluster_id == cluster_id}

    def query_clusters(self, query_params: Any = None) -> list[dict[str, Any]]:
        sel = merge_selectors(self._selector, parse_selector(query_params, "query_params"))
        return [{"node_id": c.node_id, "cluster_id": c.cluster_id, **c.metrics()} for c in read_candidates(self._a, sel).values()]


# -- commits ------------------------------------------------------------------------------


def place_on(a: Allocator, req: AllocationRequest, allocation_id: str, host: str, gpus: list[int | str],
             yield_to_line: bool) -> dict[str, Any]:
    """Runs ``place_on.lua``: the grant on ``host`` (and ``gpus``) if they still fit, else a refusal."""
    return a._call("place_on", *a.place_args(req, allocation_id), host, json.dumps(gpus), "1" if yield_to_line else "0")


def submit_to_line(a: Allocator, req: AllocationRequest, allocation_id: str, only: str | None = None) -> Allocation:
    """Puts a direct request in line (``submit.lua``), optionally pinned to one host; it is placed
    now if it fits and nothing ahead blocks it, else later by a scheduling pass."""
    return line_submit(a, req, allocation_id, only)[0]


def line_submit(a: Allocator, req: AllocationRequest, allocation_id: str, only: str | None = None
                ) -> tuple[Allocation, bool]:
    """``submit_to_line``, and whether the id was taken already."""
    payload = json.loads(a._place_payload(req, allocation_id, False))
    if only:
        payload["only"] = only
    task = json.dumps({"kind": "lease", "payload": json.dumps(payload), "rq_prefix": queue.RQ_PREFIX,
                       "rq_queue": queue.pending_queue_name(a.keys.namespace, req.priority),
                       "host_queue_prefix": queue.host_queue_name(a.keys.namespace, "")})
    res = a._raise_unless_ok(a._call("submit", task, a.pass_depth, a.scan_cap, req.model_dump_json(), json.dumps(req.metadata)))
    alloc = a.require(allocation_id)
    if res.get("existing"):
        queue.check_lease(alloc)
    alloc.queue_position = int(res.get("position") or 0)
    return alloc, bool(res.get("existing"))


def placement_of(a: Allocator, alloc: Allocation) -> Placement | None:
    """Seed 003's output for a placed allocation (None while pending)."""
    if not alloc.host_id:
        return None
    labels = json.loads(a.redis.hget(a.keys.host(alloc.host_id), "labels") or "{}") or {}
    return Placement(cluster_id=str(labels.get("cluster", "default")), node_id=alloc.host_id,
                     gpus=[str(g.index) for g in alloc.gpus])


@dataclass
class PolicyRun:
    """Everything one policy placement needs; ``evaluate`` calls the policy (with a timeout)."""

    allocator: Allocator
    request: AllocationRequest
    allocation_id: str
    selector: dict[str, list[str]] | None
    inputs: dict[str, Any]
    evaluate: Callable[[dict[str, Any]], Any]
    on_busy: str = "queue"
    attempts: int = 3
    selector_field: str = "clusters"
    needs_candidates: bool = True  # False for the built-in ledger strategies, which do not read them
    log: list[dict[str, Any]] = field(default_factory=list)
    # The id was taken by the time this run committed (another client, REST or CLI, made an
    # allocation under it meanwhile): what ``run`` returns is not this run's to cancel.
    existing: bool = False

    def _line(self, req: AllocationRequest, only: str | None = None) -> Allocation:
        alloc, self.existing = line_submit(self.allocator, req, self.allocation_id, only)
        return alloc

    def run(self) -> Allocation:
        """Returns the allocation: active when placed, pending when it waits in line."""
        a, req = self.allocator, self.request
        last: dict[str, Any] | None = None
        choice: PolicyChoice | None = None
        for attempt in range(1, self.attempts + 1):
            if self.needs_candidates:
                cands = read_candidates(a, self.selector)
                if not cands:
                    raise NoCandidates(self.selector_field, f"no ready host matches {self.selector or 'the request'}")
                raw = self.evaluate(input_data(cands, self.inputs, req, attempt, last))
            else:
                cands = {}
                raw = self.evaluate({"cluster_data": {}, "candidates": [], "inputs": self.inputs,
                                     "request": request_view(req), "attempt": attempt, "last_refusal": last})
            choice = check_output(raw, cands, req.resources.gpus)
            self.log.append({"attempt": attempt, "choice": {"cluster_id": choice.cluster_id, "node_id": choice.node_id,
                                                            "gpus": choice.gpus}})
            if choice.node_id is None:
                return self._ledger_decides(choice)
            res = place_on(a, req, self.allocation_id, choice.node_id, choice.gpus, self.on_busy == "queue")
            if res.get("ok"):
                placed = Allocation.from_record(res["alloc"])
                if res.get("existing"):
                    self.existing = True
                    queue.check_lease(placed)
                return placed
            code = res.get("code", "")
            if code == "QUEUE_AHEAD":
                if self.on_busy == "queue":
                    return self._line(req, only=choice.node_id)
                # Refused as a built-in strategy's request is: only the line's reserved room holds it.
                raise from_code(code, res.get("message", code), res.get("details") or None)
            if code == "INVALID_GPU_CHOICE":
                raise PolicyError(res.get("message", "invalid GPU choice"), field="policy_output.gpus")
            if code == "RECOVERING":
                raise Recovering(res.get("message"))
            if code not in CONFLICT_CODES:
                raise from_code(code, res.get("message", code), res.get("details") or None)
            last = {"code": code, "message": res.get("message"), "node_id": choice.node_id}
            self.log[-1]["refused"] = last
            log.info("policy choice %s refused on attempt %d: %s", choice.node_id, attempt, last["message"])
        assert choice is not None and last is not None
        if self.on_busy == "queue":
            return self._line(req, only=choice.node_id)
        raise PolicyConflict(f"the policy's choice did not fit on any of {self.attempts} attempt(s); "
                             f"last: {last['message']}", details={"last_code": last["code"], "node_id": last["node_id"]})

    def _ledger_decides(self, choice: PolicyChoice) -> Allocation:
        scope = merge_selectors(self.selector, {"cluster": [choice.cluster_id]} if choice.cluster_id else None)
        req = self.request.model_copy(update={"selector": scope, "strategy": choice.strategy or self.request.strategy,
                                              "allocation_id": self.allocation_id})
        if self.on_busy == "queue":
            return self._line(req)
        alloc, self.existing = self.allocator.submit_placed(req)
        return alloc


def timed_eval(executor: Executor, policy: Any, parameters: dict[str, Any], context: dict[str, Any],
               timeout_s: float) -> Callable[[dict[str, Any]], Any]:
    """``evaluate`` for ``PolicyRun``: the policy's eval in a worker thread with a time limit.
    A policy that raises or overruns becomes ``PolicyError`` and nothing is committed (an
    overrunning eval keeps its thread until it returns; its answer is dropped). A built-in
    strategy is called directly."""

    # The built-in strategies answer at once and cannot hang: they run in the caller's thread, so
    # policies that overrun their timeout (each keeps a thread of the pool until it returns) never
    # hold up placements that name a built-in.
    inline = type(policy) in BUILTINS.values()

    def evaluate(data: dict[str, Any]) -> Any:
        try:
            if inline:
                return policy.eval(parameters, data, context)
            return executor.submit(policy.eval, parameters, data, context).result(timeout=timeout_s)
        except FutureTimeout:
            raise PolicyError(f"the policy did not answer within {timeout_s:g} s") from None
        except Exception as exc:
            raise PolicyError(f"the policy raised {type(exc).__name__}: {exc}") from None

    return evaluate


__all__ = ["Candidate", "ClusterClient", "ClusterMetricsClient", "PolicyRun", "candidate_selector", "place_on",
           "matching_hosts", "placement_of", "read_candidates", "submit_to_line", "timed_eval"]
