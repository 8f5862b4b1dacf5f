"""The queue: function tasks (RQ jobs) and queued direct requests in one priority order.

Pending function tasks are RQ jobs waiting in one RQ queue per priority (``<ns>.critical``,
``<ns>.high``, ``<ns>.normal``, ``<ns>.low``), so rq-dashboard shows them; the order the
scheduler uses is the sorted set ``Keys.pending`` (priority, then requeued-at-front, then
arrival), which also gives every task its global position in O(log n). When the scheduling pass
(Lua, see ``lua/includes/queue.lua``) places a task, the same script grants its resources and
moves its RQ job to the host's queue ``<ns>.host.<host_id>`` with ``origin`` updated; the
host's ``workers.ResourceWorker`` runs it with the GPUs and cores pinned.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rq import Queue
from rq.command import send_command
from rq.defaults import DEFAULT_JOB_MONITORING_INTERVAL
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job

from .errors import AllocationNotFound, InvalidRequest
from .models import JOB_ID_PATTERN, JOB_ID_RULE, MAX_SECONDS, Allocation, AllocationRequest, Priority, short_repr

if TYPE_CHECKING:
    from .client import Allocator

RQ_PREFIX = "rq:"
#: RQ job statuses of a run that has ended, whatever its outcome.
RUN_ENDED = ("finished", "failed", "stopped", "canceled")
#: RQ's enqueue options the allocator passes on to RQ (as Queue.enqueue does: ``timeout`` is no
#: option of RQ's, it reaches the function).
RQ_OPTIONS = {"job_timeout", "result_ttl", "ttl", "failure_ttl", "description", "meta",
              "retry", "on_success", "on_failure", "on_stopped"}
#: RQ's enqueue options the allocator does not take: the line's order is its own (priority,
#: then arrival), and a dependency would hold a grant while it waits. Refused rather than passed
#: on to the function as arguments.
UNSUPPORTED_RQ_OPTIONS = {"depends_on": "dependencies between tasks are not supported",
                          "at_front": "the line's order is by priority: use priority='high'",
                          "enqueue_at_front": "the line's order is by priority: use priority='high'",
                          "pipeline": "not supported",
                          "repeat": "repeating a task is not supported: submit it again (each run waits for its own grant)",
                          "rate_limit": "not supported: the line's order and the fleet's capacity pace the tasks",
                          "webhooks": "not supported",
                          "unique": "a task id is unique already: submitting a job_id again changes nothing"}
ALLOC_FIELDS = {"priority", "strategy", "ttl_seconds", "expected_duration", "selector", "metadata",
                "task_id", "task_type", "owner"}
#: Keyword names a task's own kwargs may not use: Allocator.enqueue takes them itself (the request
#: fields, RQ's options, and its own parameters), so the function would never receive them.
RESERVED_KWARGS = frozenset(ALLOC_FIELDS | RQ_OPTIONS | set(UNSUPPORTED_RQ_OPTIONS)
                            | {"resources", "job_id", "on_host_lost", "func", "self", "args", "kwargs"})


def check_task_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Keyword arguments a task submitted as JSON (REST, the tool, MCP) may carry: Python names
    that the allocator and RQ do not take for themselves. A name such as "x y" could only make
    the job fail with a TypeError when it runs."""
    for key in kwargs:
        if key in RESERVED_KWARGS:
            raise InvalidRequest(f"kwargs.{key}", "reserved for the allocator or RQ (a request field or an RQ option); "
                                                  "not passed to tasks")
        if not isinstance(key, str) or not key.isidentifier():
            raise InvalidRequest(f"kwargs.{key}", "not a Python argument name")


#: After a job's timeout, RQ's worker kills a horse that did not stop itself once it is this many
#: seconds past it, at its next monitoring tick (``--job-monitoring-interval``).
RQ_KILL_DELAY_S = 60
#: Margin past that moment before the ledger may release the grant of a stuck worker's job.
RUN_LEASE_SLACK_S = 30


def run_lease_s(timeout: int | float | None, monitoring_interval: float = DEFAULT_JOB_MONITORING_INTERVAL) -> float:
    """How long a job's run may hold its grant: until RQ has surely stopped it. ``timeout`` is the
    job's (RQ's default when None; -1 or less = no time limit: ``math.inf``)."""
    t = timeout or Queue.DEFAULT_TIMEOUT
    if t <= 0:
        return math.inf
    return float(t) + RQ_KILL_DELAY_S + monitoring_interval + RUN_LEASE_SLACK_S


def pending_queue_name(namespace: str, priority: Priority) -> str:
    """RQ queue where a task of this priority waits (visible in rq-dashboard)."""
    return f"{namespace}.{priority.label}"


def host_queue_name(namespace: str, host_id: str) -> str:
    """RQ queue a host's workers listen on."""
    return f"{namespace}.host.{host_id}"


def parse_host_queue(name: str) -> tuple[str, str] | None:
    """(namespace, host id) of a host queue name, or None: lets plain ``rq worker`` flags work."""
    ns, sep, host = name.partition(".host.")
    return (ns, host) if sep and ns and host else None


def _task_json(a: Allocator, req: AllocationRequest, task_id: str, kind: str, on_host_lost: str = "requeue",
               unbounded: bool = False) -> str:
    return json.dumps({
        "kind": kind,
        "on_host_lost": on_host_lost,
        "payload": a._place_payload(req, task_id, False, unbounded=unbounded),
        "rq_prefix": RQ_PREFIX,
        "rq_queue": pending_queue_name(a.keys.namespace, req.priority),
        "host_queue_prefix": host_queue_name(a.keys.namespace, ""),
    })


def _submit(a: Allocator, req: AllocationRequest, task_id: str, kind: str, on_host_lost: str = "requeue",
            unbounded: bool = False) -> dict[str, Any]:
    return a._raise_unless_ok(a._call("submit", _task_json(a, req, task_id, kind, on_host_lost, unbounded), a.pass_depth,
                                      a.scan_cap, req.model_dump_json(), json.dumps(req.metadata)))


def check_lease(alloc: Allocation) -> None:
    """A direct request repeated under an id that exists gets that record back, but only if it is
    a direct allocation's: a function task's id names someone's job, whose record (and, by its
    release, whose run) is not the caller's. Enqueue refuses the opposite case."""
    if alloc.kind != "lease":
        raise InvalidRequest("allocation_id", f"{alloc.allocation_id!r} is the id of a task (an RQ job), "
                                              "not of a direct allocation")


def submit_lease(a: Allocator, req: AllocationRequest) -> Allocation:
    """Queues a direct allocation request; it is granted in line like any task."""
    from .client import new_allocation_id

    task_id = req.allocation_id or new_allocation_id()
    t0 = time.perf_counter()
    res = _submit(a, req, task_id, "lease")
    alloc = a.require(task_id)
    if res.get("existing"):
        check_lease(alloc)
    alloc.queue_position = int(res["position"])
    if alloc.state == "active":
        alloc.allocation_time_ms = round((time.perf_counter() - t0) * 1000, 3)
    return alloc


def _explicit_call(args: tuple[Any, ...], rest: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """RQ's explicit form, ``enqueue(f, args=(1, 2), kwargs={"a": 1}, job_timeout=30)``: the
    function's arguments are those two, so nothing else may be left for it."""
    if args:
        raise InvalidRequest("args", "positional arguments cannot be combined with args= and kwargs=")
    f_args, f_kwargs = rest.pop("args", None), rest.pop("kwargs", None)
    if rest:
        raise InvalidRequest(next(iter(rest)), "with args= and kwargs=, the function's keyword arguments go in kwargs=")
    if f_args is not None and not isinstance(f_args, (list, tuple)):
        raise InvalidRequest("args", f"expected a list or tuple, got {type(f_args).__name__}")
    if f_kwargs is not None and not isinstance(f_kwargs, dict):
        raise InvalidRequest("kwargs", f"expected a mapping, got {type(f_kwargs).__name__}")
    return tuple(f_args or ()), dict(f_kwargs or {})


#: RQ's written timeouts ("90", "90s", "15m", "2h", "1d"; "-1": no limit), as its parse_timeout reads them.
_TIMEOUT_TEXT = re.compile(r"([+-]?[0-9]+)([smhd]?)")
_TIMEOUT_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: The longest run time a worker can enforce: RQ's worker stops a run with an alarm, whose
#: seconds are a C int (68 years).
MAX_JOB_TIMEOUT_S = 2**31 - 1


def _job_timeout(value: Any) -> int | None:
    """RQ's ``job_timeout`` as a worker can run it, in seconds: -1 (no limit), or 1 s to
    ``MAX_JOB_TIMEOUT_S`` as a number or as RQ writes it ("90", "15m", "2h", "1d"). Anything else
    is refused here, naming the option: RQ took ``True`` for one second, failed every run of a
    limit its alarm cannot hold, and refused NaN with a bare AssertionError. None: RQ's default."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, complex)):
        seconds = float(value)  # int, float, Decimal, NumPy's numbers
    elif isinstance(value, str) and (m := _TIMEOUT_TEXT.fullmatch(value.strip().lower())):
        seconds = float(int(m[1]) * _TIMEOUT_UNITS[m[2]])
    if seconds is None or not math.isfinite(seconds) or not (seconds == -1 or 1 <= seconds <= MAX_JOB_TIMEOUT_S):
        raise InvalidRequest("job_timeout", f"expected -1 (no limit) or 1 to {MAX_JOB_TIMEOUT_S} seconds "
                                            f"(a number, or e.g. '90s', '15m', '2h', '1d'), got {short_repr(value)}")
    return int(seconds)


def enqueue(a: Allocator, func: Any, args: tuple[Any, ...], resources: Any, kwargs: dict[str, Any]) -> Task:
    """Creates the RQ job in its priority queue, then submits it to the scheduler."""
    from .client import new_allocation_id

    for k in kwargs:
        if k in UNSUPPORTED_RQ_OPTIONS:
            raise InvalidRequest(k, UNSUPPORTED_RQ_OPTIONS[k])
    alloc_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in ALLOC_FIELDS}
    rq_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in RQ_OPTIONS}
    task_id = kwargs.pop("job_id", None) or new_allocation_id()
    if not isinstance(task_id, str) or not JOB_ID_PATTERN.fullmatch(task_id):
        # RQ would refuse it with a ValueError of its own, after the request was built.
        raise InvalidRequest("job_id", f"{JOB_ID_RULE}, got {short_repr(task_id)}")
    on_host_lost = kwargs.pop("on_host_lost", "requeue")
    if "args" in kwargs or "kwargs" in kwargs:
        args, kwargs = _explicit_call(args, kwargs)
    if on_host_lost not in ("requeue", "fail"):
        raise InvalidRequest("on_host_lost", f"expected 'requeue' or 'fail', got {on_host_lost!r}")
    try:
        req = a.build_request(resources, allocation_id=task_id, **alloc_fields)
    except InvalidRequest as exc:
        raise exc.renamed({"allocation_id": "job_id"}) from None
    pipe = a.redis.pipeline(transaction=False)
    pipe.hget(a.keys.alloc(task_id), "kind")
    pipe.hget(Job.key_for(task_id), "origin")
    kind, origin = pipe.execute()
    if kind == "job":
        # Submitted before: changes nothing, as submit.lua would (its RQ job keeps its arguments).
        return Task(a, task_id)
    if kind is not None:
        raise InvalidRequest("job_id", f"{task_id!r} is the id of a direct allocation, not of a task")
    if origin is not None and not origin.startswith(a.keys.rq_queue_name_prefix()):
        # RQ's job ids are global: another namespace's task or a plain RQ job would be rewritten.
        # (One of this namespace's own queues is ours to reuse: a submit that failed after its
        # job was written, or a job kept by RQ after its record's retention ended.)
        raise InvalidRequest("job_id", f"an RQ job {task_id!r} already exists outside this allocator's line "
                                       "(another namespace or plain RQ); choose another id")
    if "job_timeout" in rq_opts:
        rq_opts["timeout"] = _job_timeout(rq_opts.pop("job_timeout"))
    q = Queue(pending_queue_name(a.keys.namespace, req.priority), connection=a.rq_connection)
    job = q.create_job(func, args=args, kwargs=kwargs, job_id=task_id, **rq_opts)
    # A job's TTL bounds its wait for a worker and then its run: never shorter than RQ lets it run
    # (a job without a time limit, lease inf: its claim removes the deadline, see claim_grant.lua).
    lease = run_lease_s(job.timeout)
    if req.ttl_seconds is not None and math.isfinite(lease) and req.ttl_seconds < lease:
        req = req.model_copy(update={"ttl_seconds": min(lease, MAX_SECONDS)})
    pipe = a.rq_connection.pipeline()
    q.enqueue_job(job, pipeline=pipe)
    pipe.execute()
    _submit(a, req, task_id, "job", on_host_lost, unbounded=not math.isfinite(lease))
    return Task(a, task_id)


def cancel(a: Allocator, task_id: str) -> Allocation:
    """Cancels a pending task (nothing allocated) or stops a running one (released)."""
    res = a._raise_unless_ok(a._call("cancel", task_id, a.pass_depth, a.scan_cap))
    if res.get("job"):
        stop_job(a, task_id, res.get("worker"))
    alloc = a.require(task_id)
    alloc.released_now = bool(res.get("ended"))  # (a repeat finds it ended)
    return alloc


def stop_job(a: Allocator, task_id: str, worker: str | None) -> None:
    """Stops the RQ job of a function task the scripts just ended (cancel, or a user's release).
    Only for the namespace's own tasks: RQ job ids are global to a Redis, and a lease's id may
    name another application's job."""
    try:
        job = Job.fetch(task_id, connection=a.rq_connection)
    except NoSuchJobError:
        return
    if worker:
        # To the worker the script named: one that has claimed the job may not have marked it
        # started yet (RQ's send_stop_job_command would refuse), and takes the command anyway.
        send_command(a.rq_connection, worker, "stop-job", job_id=task_id)
    elif job.get_status() not in RUN_ENDED:
        try:
            job.cancel()
        except InvalidJobOperation:
            pass


def position(a: Allocator, task_id: str) -> int | None:
    """1 = next in line; 0 once placed (also after its run ended); None for an unknown id or a
    task that left the line without being placed (cancelled, job gone)."""
    rank = a.redis.zrank(a.keys.pending, task_id)
    if rank is not None:
        return int(rank) + 1
    return 0 if a.redis.hget(a.keys.alloc(task_id), "activated") else None


class Task:
    """Handle on one queued task: its RQ job, state, global position and allocation."""

    def __init__(self, allocator: Allocator, task_id: str) -> None:
        self.allocator = allocator
        self.id = task_id

    def __repr__(self) -> str:
        return f"Task({self.id!r}, state={self.state!r}, position={self.position!r})"

    @property
    def job(self) -> Job | None:
        """The RQ job (None for a queued direct request)."""
        try:
            return Job.fetch(self.id, connection=self.allocator.rq_connection)
        except NoSuchJobError:
            return None

    @property
    def state(self) -> str:
        """pending, active, released, failed or cancelled (the allocation's state)."""
        state = self.allocator.redis.hget(self.allocator.keys.alloc(self.id), "state")
        if state is None:
            raise AllocationNotFound(f"task {self.id} not found")
        return str(state)

    @property
    def position(self) -> int | None:
        """Global place in line: 1 = next to start; 0 once placed or running."""
        return position(self.allocator, self.id)

    @property
    def estimated_start_time(self) -> datetime | None:
        """When the task is expected to start (see ``Allocator.estimated_start_time``)."""
        return self.allocator.estimated_start_time(self.id)

    @property
    def allocation(self) -> Allocation | None:
        """The grant once placed (None while pending)."""
        a = self.allocator.get(self.id)
        return a if a is not None and a.host_id else None

    def wait_for_placement(self, timeout: float = 30.0, poll: float = 0.02) -> Allocation:
        """Blocks until the task is placed; raises TimeoutError (the task stays queued)."""
        deadline = time.monotonic() + timeout
        while True:
            a = self.allocator.get(self.id)
            if a is not None and a.host_id:
                return a
            if a is not None and a.state == "cancelled":
                raise InvalidRequest("task_id", f"task {self.id} was cancelled")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {self.id} not placed within {timeout} s (position {self.position})")
            time.sleep(poll)

    def cancel(self) -> Allocation:
        return cancel(self.allocator, self.id)
