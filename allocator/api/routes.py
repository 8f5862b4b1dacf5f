"""REST routes: health and metrics (open), and under /v1 (bearer token when configured)
capacity, hosts, allocations and queued tasks.

Handlers are plain functions: FastAPI runs them in its thread pool, where the synchronous
``Allocator`` (redis-py) belongs. Errors are raised as allocator errors and turned into
``{"error": {...}}`` by the app's handlers.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from rq.exceptions import NoSuchJobError
from rq.job import Job

from .. import queue
from ..client import Allocator, check_id
from ..errors import AllocationNotFound, AllocatorError, HostNotFound, InvalidRequest
from ..models import Allocation, Capacity, Priority
from .errors import error_body, status_of
from .metrics import count_refusal, count_refusals
from .schemas import (
    AllocateBody,
    AllocateManyBody,
    AllocationFields,
    BatchResult,
    BatchResults,
    ErrorBody,
    Health,
    HostIn,
    HostView,
    QueueEntry,
    ReleaseManyBody,
    ReleaseResults,
    RegistryEntry,
    TaskStatus,
    TaskSubmitBody,
    WouldFit,
)
from .state import ApiState, api_state
from .waiters import estimated_start

bearer = HTTPBearer(auto_error=False, description="The operator's ALLOCATOR_API_TOKEN (when one is configured).")


def require_token(request: Request, _: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    api_state(request).check_token(request.headers.get("authorization"))


def _err(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


COMMON = _err(400, 401, 422)


def _id() -> Any:
    """A path id parameter (a fresh Path per route: FastAPI binds it to the parameter's name)."""
    return Path(min_length=1, max_length=256)


open_router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], responses=COMMON)


# -- open -----------------------------------------------------------------------------------


@open_router.get("/health", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
def health(st: ApiState = Depends(api_state)) -> Any:
    """Liveness and Redis reachability (no token needed)."""
    try:
        ok = bool(st.allocator.redis.ping())
    except Exception:
        ok = False
    body = Health(status="ok" if ok else "degraded", redis=ok, namespace=st.allocator.keys.namespace)
    return body if ok else JSONResponse(body.model_dump(), status_code=503)


@open_router.get("/metrics", tags=["operations"], response_class=Response,
                 responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}})
def metrics(st: ApiState = Depends(api_state)) -> Response:
    """Prometheus metrics, read from Redis at scrape time (no token needed)."""
    return Response(generate_latest(st.registry), media_type=CONTENT_TYPE_LATEST)


# -- capacity and hosts ---------------------------------------------------------------------


def _now_ms(a: Allocator) -> int:
    if a.clock is not None:
        return int(a.clock() * 1000)
    sec, usec = a.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def host_views(a: Allocator, only: str | None = None) -> list[HostView]:
    cap = a.capacity()
    beats = dict(a.redis.zrange(a.keys.heartbeats, 0, -1, withscores=True))
    now = _now_ms(a) if beats else 0
    out = []
    for h in cap.hosts:
        if only is not None and h.host_id != only:
            continue
        beat = beats.get(h.host_id)
        out.append(HostView(**h.model_dump(), cluster=h.labels.get("cluster", "default"),
                            heartbeat_age_s=round(max(0.0, (now - beat) / 1000), 3) if beat is not None else None))
    return out


def _one_host(a: Allocator, host_id: str) -> HostView:
    views = host_views(a, host_id)
    if not views:
        raise HostNotFound(f"host {host_id} not found")
    return views[0]


@v1.get("/capacity", response_model=Capacity, tags=["capacity"])
def capacity(st: ApiState = Depends(api_state)) -> Capacity:
    """Totals, allocated, available and utilisation per resource, per host and for the fleet."""
    return st.allocator.capacity()


@v1.get("/hosts", response_model=list[HostView], tags=["hosts"])
def list_hosts(st: ApiState = Depends(api_state)) -> list[HostView]:
    """Every registered host with its inventory, free capacity and heartbeat age."""
    return host_views(st.allocator)


@v1.get("/hosts/{host_id}", response_model=HostView, tags=["hosts"], responses=_err(404))
def get_host(host_id: str = _id(), st: ApiState = Depends(api_state)) -> HostView:
    return _one_host(st.allocator, host_id)


@v1.put("/hosts/{host_id}", response_model=HostView, tags=["hosts"])
def put_host(body: HostIn, host_id: str = _id(), st: ApiState = Depends(api_state)) -> HostView:
    """Registers a host or updates its inventory (what an agent does); existing grants stay valid."""
    # null asks for the default, as leaving the field out does.
    fields = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    st.allocator.register_host({**fields, "id": host_id})
    return _one_host(st.allocator, host_id)


@v1.post("/hosts/{host_id}/drain", response_model=HostView, tags=["hosts"], responses=_err(404))
def drain_host(host_id: str = _id(), st: ApiState = Depends(api_state)) -> HostView:
    """No new placements on the host; what runs there keeps its resources."""
    st.allocator.drain_host(host_id)
    return _one_host(st.allocator, host_id)


@v1.post("/hosts/{host_id}/resume", response_model=HostView, tags=["hosts"], responses=_err(404))
def resume_host(host_id: str = _id(), st: ApiState = Depends(api_state)) -> HostView:
    st.allocator.resume_host(host_id)
    return _one_host(st.allocator, host_id)


class HostRemoved(BaseModel):
    host_id: str
    released: list[str]


@v1.delete("/hosts/{host_id}", response_model=HostRemoved, tags=["hosts"], responses=_err(404, 409))
def delete_host(host_id: str = _id(), force: bool = Query(False, description="End its allocations (reason host_removed)."),
                st: ApiState = Depends(api_state)) -> HostRemoved:
    """Removes a host; 409 while it holds allocations unless force."""
    return HostRemoved(host_id=host_id, released=st.allocator.remove_host(host_id, force=force))


# -- allocations ----------------------------------------------------------------------------


@v1.post("/allocations", response_model=Allocation, status_code=201, tags=["allocations"],
         responses={**_err(409, 503), 202: {"model": Allocation, "description": "Queued (on_busy=queue): waiting in line"},
                    200: {"model": Allocation, "description": "A repeat of an id whose allocation has ended: its record"}})
def allocate(body: AllocateBody, response: Response, st: ApiState = Depends(api_state)) -> Allocation:
    """Allocates now (201), or queues (202, ``on_busy=queue``), or refuses with the reason (409).
    Idempotent by ``allocation_id``: a repeat answers as the allocation stands (201 active, 202
    pending, 200 with the record once it has ended)."""
    a = st.allocator
    t0 = time.perf_counter()
    try:
        alloc = a.allocate(body.resources_dict(), on_busy=body.on_busy, allocation_id=body.allocation_id,
                           **body.allocation_fields())
    except AllocatorError as exc:
        count_refusal(a, exc.code)
        raise
    if alloc.state == "pending":
        response.status_code = 202
        estimated_start(a, alloc.allocation_id)
    elif alloc.ended:
        # A repeat of an id whose allocation has ended since (released, cancelled, failed): its
        # record, but not "created", which would read as a lease the client holds.
        response.status_code = 200
    else:
        st.api_latency.labels("rest").observe(time.perf_counter() - t0)
    return alloc


@v1.post("/allocations/batch", response_model=BatchResults, tags=["allocations"], responses=_err(503))
def allocate_many(body: AllocateManyBody, st: ApiState = Depends(api_state)) -> BatchResults:
    """Places several requests now, in order, each on its own, ``chunk_size`` per script call:
    one result per request, with the status ``POST /v1/allocations`` would have answered (201
    placed; for a repeat of an id, 202 while it waits in line, 200 once it has ended; 409
    refused, 422 its id names a task, 503 recovering).
    A refusal does not stop the others; nothing is all-or-nothing. A malformed request answers
    422 for the whole batch (field ``requests.<i>...``), and nothing is placed."""
    a = st.allocator
    items = [{"resources": r.resources_dict(), "allocation_id": r.allocation_id, **r.allocation_fields()}
             for r in body.requests]
    try:
        outcomes = a.allocate_many(items, chunk_size=body.chunk_size)
    except AllocatorError as exc:
        count_refusal(a, exc.code)
        raise
    results = []
    for x in outcomes:
        if isinstance(x, Allocation):
            results.append(BatchResult(status=202 if x.state == "pending" else 200 if x.ended else 201, allocation=x))
        else:
            results.append(BatchResult(status=status_of(x), error=error_body(x)["error"]))
    count_refusals(a, [x.code for x in outcomes if isinstance(x, AllocatorError)])
    return BatchResults(results=results, allocated=sum(1 for r in results if r.status == 201))


@v1.post("/allocations/batch/release", response_model=ReleaseResults, tags=["allocations"])
def release_many(body: ReleaseManyBody, st: ApiState = Depends(api_state)) -> ReleaseResults:
    """Releases (or, while pending, cancels: those first) several allocations, in order, each on
    its own, ``chunk_size`` per script call: one result per id, with the status ``DELETE
    /v1/allocations/{id}`` would have answered (200 and the record, ``released_now`` false for a
    repeat; 404 unknown). An unknown id does not stop the others; what they free goes to the
    tasks in line. A malformed id answers 422 for the whole batch (field ``allocation_ids.<i>``),
    and nothing is released."""
    outcomes = st.allocator.release_many(body.allocation_ids, chunk_size=body.chunk_size)
    results = [BatchResult(status=200, allocation=x) if isinstance(x, Allocation)
               else BatchResult(status=status_of(x), error=error_body(x)["error"]) for x in outcomes]
    return ReleaseResults(results=results, released=sum(1 for x in outcomes if isinstance(x, Allocation) and x.released_now))


@v1.post("/allocations/check", response_model=WouldFit, tags=["allocations"])
def would_fit(body: AllocationFields, st: ApiState = Depends(api_state)) -> WouldFit:
    """Where the request would be placed now. It grants nothing; like a placement it first ends
    up to 8 leases past their TTL (waiting tasks may take what they free), so that it answers what
    the next placement would do."""
    res = st.allocator.would_fit(body.resources_dict(), **body.allocation_fields())
    return WouldFit(fits=False) if res is None else WouldFit(fits=True, **res)


@v1.get("/allocations", response_model=list[Allocation], tags=["allocations"])
def list_allocations(
    state: Literal["pending", "active", "released", "failed", "cancelled"] | None = None,
    task_id: str | None = Query(None, max_length=256),
    host_id: str | None = Query(None, max_length=256),
    limit: int = Query(100, ge=1, le=1000),
    st: ApiState = Depends(api_state),
) -> list[Allocation]:
    """Allocations, newest first (finished ones stay listed for the retention period)."""
    return st.allocator.list(state=state, task_id=task_id, host_id=host_id, limit=limit)


@v1.get("/allocations/{allocation_id}", response_model=Allocation, tags=["allocations"], responses=_err(404))
def get_allocation(allocation_id: str = _id(), st: ApiState = Depends(api_state)) -> Allocation:
    return st.allocator.require(allocation_id)


@v1.delete("/allocations/{allocation_id}", response_model=Allocation, tags=["allocations"], responses=_err(404))
def release_allocation(allocation_id: str = _id(), st: ApiState = Depends(api_state)) -> Allocation:
    """Releases (or, while pending, cancels) an allocation; repeating it changes nothing."""
    return st.allocator.release(allocation_id)


# -- queued tasks ---------------------------------------------------------------------------


def task_status(a: Allocator, task_id: str, *, with_allocation: bool = True) -> TaskStatus:
    check_id(task_id, "task_id")
    alloc = a.get(task_id)
    if alloc is None:
        raise AllocationNotFound(f"task {task_id} not found")
    position = queue.position(a, task_id)
    job_status = None
    task = None
    # The task hash knows whether it is a function task (a placed task's record may say "lease").
    if alloc.kind == "job" or a.redis.hget(a.keys.task(task_id), "kind") == "job":
        named = alloc.metadata.get("allocator_task")  # written by the task submission, not by a lease's caller
        task = named if isinstance(named, str) else None
        try:
            status = Job.fetch(task_id, connection=a.rq_connection).get_status()
            job_status = getattr(status, "value", status) or None
        except NoSuchJobError:
            job_status = None
    return TaskStatus(task_id=task_id, state=alloc.state, position=position,
                      # Only a prediction made while it waits counts for the ETA-error metric.
                      estimated_start_time=(estimated_start(a, task_id, record=alloc.state == "pending")
                                            if alloc.state in ("pending", "active") else None),
                      allocation=alloc if with_allocation else None, task=task,
                      job_status=job_status)


@v1.get("/tasks/registry", response_model=list[RegistryEntry], tags=["tasks"])
def task_registry(st: ApiState = Depends(api_state)) -> list[RegistryEntry]:
    """The function tasks this server accepts, by name (configured by the operator)."""
    return [RegistryEntry(**t) for t in st.tasks.listing()]


@v1.post("/tasks", response_model=TaskStatus, status_code=202, tags=["tasks"], responses=_err(503))
def submit_task(body: TaskSubmitBody, st: ApiState = Depends(api_state)) -> TaskStatus:
    """Queues a registered function task (an RQ job) with JSON arguments; it runs on a worker of
    the host it is placed on."""
    a = st.allocator
    task = st.tasks.get(body.task)
    queue.check_task_kwargs(body.kwargs)
    known = a.get(body.job_id) if body.job_id else None
    if known is not None and known.kind == "job":  # submitted before: changes nothing (a lease's id: enqueue refuses)
        return task_status(a, body.job_id)
    _json_only(body.args, "args")
    _json_only(body.kwargs, "kwargs")
    fields = body.allocation_fields()
    fields.setdefault("task_type", task.task_type)
    if task.expected_duration is not None:
        fields.setdefault("expected_duration", task.expected_duration)
    fields["metadata"] = {**fields.get("metadata", {}), "allocator_task": task.name}
    rq_opts = {k: v for k, v in (("job_timeout", body.job_timeout), ("result_ttl", body.result_ttl)) if v is not None}
    resources = {**task.resources, **body.resources_dict()} if "resources" in body.model_fields_set else dict(task.resources)
    t = a.enqueue(task.func, *body.args, resources=resources, job_id=body.job_id,
                  meta={"allocator_task": task.name}, **fields, **rq_opts, **body.kwargs)
    return task_status(a, t.id)


def _json_only(value: Any, field: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(field, f"must be plain JSON values: {exc}") from None


@v1.get("/tasks", response_model=list[QueueEntry], tags=["tasks"])
def list_queue(limit: int = Query(100, ge=1, le=1000), st: ApiState = Depends(api_state)) -> list[QueueEntry]:
    """The line: waiting tasks and queued requests in the order they will be considered."""
    a = st.allocator
    ids = a.redis.zrange(a.keys.pending, 0, limit - 1)
    pipe = a.redis.pipeline(transaction=False)
    for i in ids:
        pipe.hmget(a.keys.alloc(i), "kind", "priority", "created")
    out = []
    for n, (i, (kind, prio, created)) in enumerate(zip(ids, pipe.execute() if ids else [])):
        out.append(QueueEntry(task_id=i, position=n + 1, priority=Priority(int(prio or 1)).label, kind=kind or "lease",
                              created_at=_ms(created)))
    return out


def _ms(v: str | None) -> datetime | None:
    return datetime.fromtimestamp(int(v) / 1000, tz=timezone.utc) if v else None


@v1.get("/tasks/{task_id}", response_model=TaskStatus, tags=["tasks"], responses=_err(404))
def get_task(task_id: str = _id(), st: ApiState = Depends(api_state)) -> TaskStatus:
    """State, place in line, ETA while pending, and the allocation once placed."""
    return task_status(st.allocator, task_id)


@v1.get("/tasks/{task_id}/position", response_model=TaskStatus, tags=["tasks"], responses=_err(404))
def get_position(task_id: str = _id(), st: ApiState = Depends(api_state)) -> TaskStatus:
    """Place in line (1 = next, 0 = placed) and ETA, without the allocation."""
    return task_status(st.allocator, task_id, with_allocation=False)


@v1.delete("/tasks/{task_id}", response_model=TaskStatus, tags=["tasks"], responses=_err(404))
def cancel_task(task_id: str = _id(), st: ApiState = Depends(api_state)) -> TaskStatus:
    """Cancels: a pending task leaves the line (nothing allocated); a running one is stopped and released."""
    a = st.allocator
    check_id(task_id, "task_id")
    a.require(task_id)
    a.cancel(task_id)
    return task_status(a, task_id)
