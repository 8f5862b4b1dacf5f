"""``Allocator``: the core API over the Redis ledger.

Every change of free capacity goes through one Lua script (``allocator/lua``); this module only
builds script arguments, calls them and turns replies into models or named errors. Reads
(capacity, listings) are plain Redis reads inside MULTI so each host is seen consistently.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import redis
from pydantic_core import from_json, to_json

from . import batch as _batch
from . import embedded, queue
from . import services as _services
from .config import Settings
from .errors import AllocationNotFound, AllocatorError, InvalidRequest, from_code
from .keys import Keys
from .models import (
    ALLOCATION_STATES,
    Allocation,
    AllocationRequest,
    Capacity,
    GpuCapacity,
    HostCapacity,
    HostSpec,
    Resources,
    Strategy,
    Usage,
    check_printable,
    given_fields,
    parse,
    short_repr,
)
from .scripts import Scripts
from .units import duration_ms

ResourcesLike = Resources | Mapping[str, Any]


def new_allocation_id() -> str:
    """"alloc-" and 16 random hex digits (64 bits: collisions stay negligible for billions of ids)."""
    return "alloc-" + os.urandom(8).hex()


def delete_keys(client: redis.Redis, keys: Iterable[Any], batch: int = 500) -> int:
    """Deletes ``keys`` (any iterable, e.g. a SCAN) ``batch`` at a time; returns how many existed."""
    n = 0
    chunk: list[Any] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) >= batch:
            n += client.delete(*chunk)
            chunk = []
    if chunk:
        n += client.delete(*chunk)
    return n


#: The URL schemes redis-py connects with.
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(url: str) -> None:
    """Refuses a URL redis-py cannot connect with, before its ValueError surfaces as a traceback
    in a command. The URL itself is not echoed: it may carry a password."""
    if not url.startswith(REDIS_URL_SCHEMES):
        raise InvalidRequest("redis_url", "expected a URL starting with redis://, rediss:// or unix:// "
                                          "(e.g. redis://127.0.0.1:6379/0)")
    if "#" in url:  # redis-py would drop what follows, and connect somewhere else
        raise InvalidRequest("redis_url", "'#' ends a URL: percent-encode it in a password (%23)")
    try:
        redis.connection.parse_url(url)  # a bad port, IPv6 address or database number
    except ValueError:
        raise InvalidRequest("redis_url", "not a valid Redis URL (host, port and database number, "
                                          "e.g. redis://127.0.0.1:6379/0)") from None


#: Deepest nesting accepted in request metadata (JSON objects and arrays).
MAX_DEPTH = 64


def check_text(value: Any, field: str, _depth: int = 0) -> None:
    """Refuses text the ledger and the history cannot carry: a lone UTF-16 surrogate (which
    JSON input such as ``"\\ud800"`` can produce) is not valid Unicode and has no UTF-8 form, so
    Redis and the Lua scripts cannot take it; a NUL character is refused by Postgres (text and
    JSONB), so the history could not record the allocation. Walks dicts and lists; the error
    names the field (or key) where the bad text is. Deeper than ``MAX_DEPTH`` is refused too."""
    if _depth > MAX_DEPTH:
        raise InvalidRequest(field, f"nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(field, f"contains text that is not valid Unicode (a lone surrogate at position {exc.start})") from None
        if "\x00" in value:
            raise InvalidRequest(field, f"contains a NUL character (at position {value.index(chr(0))})")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_text(k, field, _depth + 1)
            check_text(v, f"{field}.{k}" if isinstance(k, str) and _utf8(k) else field, _depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_text(v, f"{field}.{i}", _depth + 1)


MAX_NAMESPACE_LEN = 64
"""Longest namespace: the history's ``namespace`` columns are ``String(64)``."""


def check_namespace(namespace: Any) -> None:
    """A namespace: an id of at most ``MAX_NAMESPACE_LEN`` characters (the history's columns)
    that keeps host queue names readable. A host's RQ queue is "<namespace>.host.<host>", which
    workers split at the first ".host.": a namespace holding ".host." or ending in ".host" would
    be split wrongly, and its workers would serve another namespace."""
    check_id(namespace, "namespace", MAX_NAMESPACE_LEN)
    if queue.parse_host_queue(queue.host_queue_name(namespace, "h")) != (namespace, "h"):
        raise InvalidRequest("namespace", "must not contain '.host.' or end in '.host' (it separates the namespace "
                                          "from the host in the names of host queues)")


def check_id(value: Any, field: str, max_len: int = 256) -> None:
    """An id (or short name) used in a key or a script argument: a non-empty string of at most
    ``max_len`` characters that ``check_text`` accepts."""
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequest(field, f"expected a non-empty string of at most {max_len} characters, got {short_repr(value)}")
    check_text(value, field)
    check_printable(value, field)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _check_host_input(data: Any) -> None:
    """Text Redis, Lua or Postgres cannot carry, refused before ``HostSpec`` (whose own bounds
    refuse sizes and ids the scripts cannot keep exactly) would quote it in its messages."""
    if isinstance(data, Mapping):
        check_text(dict(data), "host")


class Allocator:
    """Allocate and release GPU memory, CPU cores and RAM across a fleet of hosts.

    ``Allocator(redis_url=..., namespace=...)``; with no URL a private redis-server is started for
    this process. The constructor reads no environment: ``Allocator.from_env()`` takes the URL and
    namespace from ``ALLOCATOR_REDIS_URL`` and ``ALLOCATOR_NAMESPACE``. ``clock`` returns seconds since the epoch
    and overrides the Redis server clock (for tests and simulations).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "alloc",
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] | None = None,
        scan_cap: int = 2048,
        record_retention_s: int = 86400,
        pass_depth: int = 100,
    ) -> None:
        # Checked before anything is written: the history's tables hold the namespace in 64
        # characters, and a longer one would make the recorder fail on every batch, for ever.
        check_namespace(namespace)
        if client is None:
            if redis_url:
                check_redis_url(redis_url)
            client = redis.Redis.from_url(redis_url or embedded.embedded_url(), decode_responses=True)
        self.redis = client
        self.keys = Keys(namespace)
        # Encoded once: redis-py encodes every str argument of every call, and a ledger script
        # call sends 16 keys and the prefix (bytes pass through as they are).
        self._ledger_keys = [k.encode() for k in self.keys.ledger_keys()]
        self._prefix_arg = self.keys.prefix.encode()
        self.scripts = Scripts(client)
        self.clock = clock
        self.scan_cap = scan_cap
        self.record_retention_s = record_retention_s
        self.pass_depth = pass_depth
        self._rq_connection: redis.Redis | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Allocator:
        """Builds an Allocator from ``ALLOCATOR_*`` variables; keyword arguments win."""
        s = Settings.from_env()
        kwargs: dict[str, Any] = {
            "redis_url": s.redis_url,
            "namespace": s.namespace,
            "scan_cap": s.scan_cap,
            "record_retention_s": s.record_retention_s,
            "pass_depth": s.pass_depth,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- script plumbing -------------------------------------------------------------------

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(int(self.clock() * 1000))

    def _call(self, name: str, *args: object, extra_keys: Sequence[str] = ()) -> Any:
        """A script with the ledger's keys (then ``extra_keys``), the prefix and clock, then ``args``."""
        keys = [*self._ledger_keys, *extra_keys] if extra_keys else self._ledger_keys
        raw = self.scripts[name](keys=keys, args=[self._prefix_arg, self._now_arg(), *args])
        # pydantic-core's parser: the same values as json.loads at a fraction of its cost (every
        # allocate and release decodes one reply).
        return from_json(raw)

    @staticmethod
    def _raise_unless_ok(res: dict[str, Any]) -> dict[str, Any]:
        if not res.get("ok", True):
            if res["code"] == "UNKNOWN_SERVICE":  # a bad name in the request, not a lack of capacity
                raise InvalidRequest("services", res["message"])
            raise from_code(res["code"], res["message"], res.get("details") or None)
        return res

    # -- hosts -------------------------------------------------------------------------------

    def register_host(self, host: HostSpec | Mapping[str, Any] | None = None, *, only_new: bool = False,
                      heartbeat: bool = False, **fields: Any) -> dict[str, Any]:
        """Adds a host or updates its inventory; existing grants stay valid.

        Accepts a ``HostSpec``, a mapping, or keyword fields (id, labels, cpu_cores, ram_mb, gpus).
        ``only_new``: a host registered already is left as it is (the reply says ``skipped``).
        ``heartbeat``: the host's agent registers it, and the registration counts as a heartbeat
        (the reaper then watches the host from this moment). A host the reaper declared lost comes
        back watched whoever registers it (an operator's update included): only a watched host is
        declared lost, and one brought back with no agent beating for it is declared lost again
        once the grace passes, rather than taking work no one watches.
        """
        # A HostSpec is checked again: its fields may have been changed since it was built.
        data = given_fields(host if host is not None else fields)
        _check_host_input(data)
        spec = parse(HostSpec, data)  # its bounds are the model's (HostSpec._bounds)
        payload = spec.model_dump()
        payload["service_ports"] = list(spec.service_ports)
        payload["cores"] = payload.pop("cpu_cores")
        return self._call("register_host", json.dumps(payload), self.pass_depth, self.scan_cap, "1" if only_new else "0",
                          "1" if heartbeat else "0", extra_keys=[self.keys.heartbeats])

    def drain_host(self, host_id: str, *, by_agent: bool = False) -> None:
        """No new placements on the host; what runs there keeps its resources. ``by_agent``: the
        host's agent drains it as it stops, and its next start resumes it (an operator's drain
        stays until resumed)."""
        self._raise_unless_ok(self._call("drain_host", host_id, "agent_drain" if by_agent else "drain"))

    def resume_host(self, host_id: str, *, by_agent: bool = False) -> str:
        """Undo ``drain_host``; returns the host's state. ``by_agent``: the host's agent, starting,
        resumes only a drain of its own (``drain_host(by_agent=True)``), never an operator's."""
        mode = "agent_resume" if by_agent else "resume"
        return str(self._raise_unless_ok(self._call("drain_host", host_id, mode, self.pass_depth, self.scan_cap))["state"])

    def remove_host(self, host_id: str, *, force: bool = False, keep_operator_drain: bool = False) -> list[str]:
        """Removes a host; refused while it holds allocations unless ``force`` (which ends them:
        its function tasks not yet started go back in line or fail by their ``on_host_lost``, as
        on a lost host; started runs are stopped by their workers).
        Its heartbeat and published inventory go too. ``keep_operator_drain`` (an agent that
        stops): refused with ``OperatorDrained``, in the same script, while an operator drains it."""
        check_id(host_id, "host_id")
        keys = [*self._ledger_keys, self.keys.heartbeats, self.keys.reclaim, self.keys.host_inventory(host_id)]
        raw = self.scripts["remove_host"](keys=keys, args=[self._prefix_arg, self._now_arg(), host_id, "1" if force else "0",
                                                           self.pass_depth, self.scan_cap,
                                                           "1" if keep_operator_drain else "0"])
        res = self._raise_unless_ok(from_json(raw))
        return list(res.get("released") or [])

    # -- allocations -------------------------------------------------------------------------

    def build_request(self, resources: ResourcesLike | None = None, /, **fields: Any) -> AllocationRequest:
        """Validates a request; ``InvalidRequest`` names the first bad field."""
        data = {k: v for k, v in fields.items() if v is not None or k == "ttl_seconds"}
        resources = given_fields(resources)  # a Resources instance is checked again, as fields
        # Text that is not valid Unicode (or holds NUL) and nesting deeper than MAX_DEPTH are
        # refused before the models see them: their own error messages would carry the bad text,
        # and thousands of levels exhaust the recursion of json and pydantic.
        check_text(resources, "resources")
        for name, value in data.items():
            check_text(value, name)
        data["resources"] = parse(Resources, resources if resources is not None else {}, "resources.")
        return parse(AllocationRequest, data)

    def _place_payload(self, req: AllocationRequest, allocation_id: str, dry_run: bool, *, unbounded: bool = False) -> str:
        """The place request the scripts read. ``unbounded``: a job without a time limit, whose TTL
        bounds only its wait for a worker, so its TTL is no estimate of its run (backfill, ETAs)."""
        r = req.resources
        payload: dict[str, Any] = {
            "id": allocation_id,
            "task_id": req.task_id or "",
            "task_type": req.task_type or "",
            "owner": req.owner or "",
            "priority": int(req.priority),
            "strategy": req.strategy.scan_mode,
            "strategy_name": req.strategy.value,
            "gpus": r.gpus,
            "gpu_mem": r.gpu_memory_mb or 0,
            "cpu_millis": r.cpu_millis,
            "exclusive": r.exclusive_cores,
            "ram": r.ram_mb,
            # Rounded to a microsecond before the ceiling: 257.083 s is 257083.00000000003 ms as
            # a float, which is 257083 ms, not 257084.
            "ttl_ms": max(1, math.ceil(round(req.ttl_seconds * 1000, 3))) if req.ttl_seconds else 0,
            "expected_ms": duration_ms(req.expected_duration),
            "preempt": req.strategy is Strategy.PRIORITY,
            "scan_cap": self.scan_cap,
            "pass_depth": self.pass_depth,
            "dry_run": dry_run,
        }
        if unbounded:
            payload["unbounded"] = True
        if r.workers:
            payload["slots"] = r.workers
        if req.services:
            payload["services"] = req.services
        if r.gpu_model:
            payload["models"] = {m: True for m in r.gpu_model}
        if req.selector:
            payload["selector"] = req.selector
        return to_json(payload).decode()

    def submit(self, req: AllocationRequest) -> Allocation:
        """Places a validated request now or raises ``InsufficientResources`` with the reason.

        Idempotent by ``allocation_id``: repeating it returns the allocation made the first time.
        """
        return self.submit_placed(req)[0]

    def submit_placed(self, req: AllocationRequest) -> tuple[Allocation, bool]:
        """``submit``, and whether the id was taken already (the allocation returned is then the
        one made before, by whoever made it)."""
        allocation_id = req.allocation_id or new_allocation_id()
        t0 = time.perf_counter()
        args = self.place_args(req, allocation_id)
        res = self._raise_unless_ok(self._call("place", *args))
        alloc = self._placed(res, req, args)
        alloc.allocation_time_ms = round((time.perf_counter() - t0) * 1000, 3)
        return alloc, bool(res.get("existing"))

    def _placed(self, res: dict[str, Any], req: AllocationRequest, args: tuple[str, str, str]) -> Allocation:
        """The allocation of place's successful reply ``res`` to ``req`` sent with ``args``
        (``place_args``). A repeat of an id must name a direct allocation (``queue.check_lease``)."""
        alloc = Allocation.from_record(res["alloc"])
        if res.get("existing"):
            queue.check_lease(alloc)
        else:
            # The script does not echo back what the caller sent: fill it in from the request (the
            # JSON just sent decodes to what model_dump(mode="json") builds, at a third of its cost).
            alloc.request, alloc.metadata = from_json(args[1]), req.metadata
        return alloc

    def place_args(self, req: AllocationRequest, allocation_id: str, dry_run: bool = False) -> tuple[str, str, str]:
        """ARGV of place.lua after the prefix and clock: payload, request JSON, metadata JSON."""
        metadata = json.dumps(req.metadata) if req.metadata else "{}"
        return self._place_payload(req, allocation_id, dry_run), req.model_dump_json(), metadata

    def allocate(self, resources: ResourcesLike | None = None, *, on_busy: str = "fail", **fields: Any) -> Allocation:
        """Allocates now. Fields: priority, strategy, ttl_seconds, expected_duration, selector,
        metadata, task_id, task_type, owner, allocation_id.

        ``on_busy="fail"`` (default) raises ``InsufficientResources`` with the reason when the
        request does not fit now; ``on_busy="queue"`` puts it in line instead and returns the
        allocation in state ``pending`` with its ``queue_position`` (see ``Allocator.task``).
        """
        if on_busy not in ("fail", "queue"):
            raise InvalidRequest("on_busy", f"expected 'fail' or 'queue', got {on_busy!r}")
        return self.allocate_request(self.build_request(resources, **fields), on_busy=on_busy)

    def allocate_request(self, req: AllocationRequest, *, on_busy: str = "fail") -> Allocation:
        """``allocate`` of a request ``build_request`` validated, sent as it is (not validated
        again): for callers that add to it after validation what no request may bring (the seed
        APIs' record in its metadata). Anything else should go through ``allocate`` or
        ``build_request``, which check an instance changed since it was built."""
        if on_busy not in ("fail", "queue"):
            raise InvalidRequest("on_busy", f"expected 'fail' or 'queue', got {on_busy!r}")
        if req.services:
            # A queued request must not wait for a name no host offers, or for names no host offers together.
            _services.check_names(self, req.services, together=on_busy == "queue")
        if on_busy == "queue":
            return queue.submit_lease(self, req)
        return self.submit(req)

    def allocate_many(self, requests: Iterable[AllocationRequest | Mapping[str, Any]], *,
                      chunk_size: int = _batch.DEFAULT_CHUNK) -> list[Allocation | AllocatorError]:
        """Places several requests now, each on its own and in order, ``chunk_size`` per script
        call: one entry per request, what ``allocate`` would have returned for it, or the error
        it would have raised (a refusal does not stop the others; nothing is all-or-nothing). Each
        request is a mapping of ``allocate``'s arguments (``resources`` and the fields) or an
        ``AllocationRequest``; ``InvalidRequest`` (field ``requests.<i>...``) before anything is
        placed when one is malformed. See ``allocator.batch``."""
        return _batch.allocate_many(self, requests, chunk_size=chunk_size)

    def would_fit(self, resources: ResourcesLike | None = None, **fields: Any) -> dict[str, Any] | None:
        """Where the request would be placed now (host, gpus, cores), or None. It grants nothing;
        like a placement it first ends up to 8 leases past their TTL (and lets waiting tasks take
        what they free), so that its answer is what ``allocate`` would do next."""
        req = self.build_request(resources, **fields)
        # A fresh id: the dry run asks where the request would go, not whether the id exists.
        res = self._call("place", *self.place_args(req, new_allocation_id(), True))
        if not res.get("ok"):
            return None
        return {"host_id": res["host"], "gpus": res.get("gpus") or [], "cores": res.get("cores") or []}

    def release(self, allocation_id: str, *, reason: str = "released", placement: str | None = None) -> Allocation:
        """Ends an allocation; releasing it again is harmless and returns the same record.
        Releasing a running function task stops its job too (as ``cancel`` does, with the reason
        given here); its worker's own end of the run passes ``placement``.

        ``released_now`` on the result tells whether this call did the release (False on a repeat).
        ``placement`` (a token from ``claim_grant``, "<host>|<host_gen>|<activated>|<requeues>") releases
        only that placement: a worker whose run outlived its grant (host declared lost, task
        placed again meanwhile) then frees nothing of the new placement.
        """
        check_id(allocation_id, "allocation_id")
        check_id(reason, "reason", 64)
        return self._released(allocation_id, self._call("release", allocation_id, reason, self.pass_depth,
                                                       self.scan_cap, placement or ""))

    def release_many(self, allocation_ids: Iterable[str], *, reason: str = "released",
                     chunk_size: int = _batch.DEFAULT_CHUNK) -> list[Allocation | AllocatorError]:
        """Releases several allocations, each on its own and in order (those waiting in line
        withdrawn first), ``chunk_size`` per script call: one entry per id, in the order given,
        what ``release`` would have returned for it, or the error it would have raised
        (``AllocationNotFound``; it does not stop the others). What they free goes to waiting
        tasks once the call's releases are done. ``InvalidRequest`` (field
        ``allocation_ids.<i>``) before anything is released when an id is malformed. See
        ``allocator.batch``."""
        return _batch.release_many(self, allocation_ids, reason=reason, chunk_size=chunk_size)

    def _released(self, allocation_id: str, reply: dict[str, Any]) -> Allocation:
        """``release``'s result from its script's reply (release.lua, or one entry of
        release_many.lua, which withdrew a queued allocation from the line themselves): the RQ
        job of a function task the script ended is stopped, or cancelled while it waited."""
        res = self._raise_unless_ok(reply)
        if res.get("job"):  # a function task, released by a user: its run stops too
            queue.stop_job(self, allocation_id, res.get("worker"))
        alloc = Allocation.from_record(res["alloc"])
        alloc.released_now = bool(res.get("changed"))  # (false for a stale placement token too)
        return alloc

    def get(self, allocation_id: str) -> Allocation | None:
        check_id(allocation_id, "allocation_id")
        rec = self.redis.hgetall(self.keys.alloc(allocation_id))
        if not rec:
            return None
        alloc = Allocation.from_record(rec)
        if alloc.state == "pending":
            self._fill_positions([alloc])
        return alloc

    def _fill_positions(self, allocs: list[Allocation]) -> None:
        """Each pending allocation's place in line (1 = next), read in one round trip."""
        pending = [x for x in allocs if x.state == "pending"]
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        for x in pending:
            pipe.zrank(self.keys.pending, x.allocation_id)
        for x, rank in zip(pending, pipe.execute()):
            x.queue_position = None if rank is None else int(rank) + 1

    def require(self, allocation_id: str) -> Allocation:
        alloc = self.get(allocation_id)
        if alloc is None:
            raise AllocationNotFound(f"allocation {allocation_id} not found")
        return alloc

    def grant_is_current(self, allocation_id: str) -> bool:
        """Whether the allocation may start work now: active, on a host that is not lost, under
        the host's current generation (fencing; ``allocator.agent.check_grant`` gives the reason)."""
        check_id(allocation_id, "allocation_id")
        from .agent.fencing import grant_is_current

        return grant_is_current(self, allocation_id)

    def list(
        self,
        *,
        state: str | None = None,
        task_id: str | None = None,
        host_id: str | None = None,
        limit: int | None = 1000,
    ) -> list[Allocation]:
        """Allocations, newest first; finished ones stay listed for the retention period.
        ``limit``: the newest this many (None: all)."""
        if state is not None and state not in ALLOCATION_STATES:
            raise InvalidRequest("state", f"expected one of {', '.join(ALLOCATION_STATES)}, got {state!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidRequest("limit", f"expected a whole number >= 0 or None, got {limit!r}")
        if host_id is not None:
            check_id(host_id, "host_id")
        if task_id is not None:
            check_id(task_id, "task_id")
        if host_id is not None and state == "active":
            ids: Iterable[str] = self.redis.smembers(self.keys.host_allocs(host_id))
        elif state == "active":
            ids = self.redis.zrevrange(self.keys.active, 0, -1)
        else:
            ids = self.redis.zrevrange(self.keys.allocs, 0, -1)
        out: list[Allocation] = []
        pipe = self.redis.pipeline(transaction=False)
        ids = list(ids)
        for i in ids:
            pipe.hgetall(self.keys.alloc(i))
        for rec in pipe.execute():
            if not rec:
                continue
            a = Allocation.from_record(rec)
            if state is not None and a.state != state:
                continue
            if task_id is not None and a.task_id != task_id:
                continue
            if host_id is not None and a.host_id != host_id:
                continue
            out.append(a)
        # Sorted before the cut: a host's set of allocations comes in no order, and the newest
        # are the ones to keep.
        out.sort(key=lambda a: (a.created_at, a.allocation_id), reverse=True)
        out = out[:limit]
        self._fill_positions(out)
        return out

    def expire(self, *, batch: int = 500) -> list[str]:
        """Releases every allocation whose TTL has passed (in bounded batches); returns their ids."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidRequest("batch", f"expected a whole number >= 1, got {batch!r}")  # 0 or less never ends
        expired: list[str] = []
        while True:
            res = self._call("expire", batch, self.record_retention_s * 1000, self.pass_depth, self.scan_cap)
            ids = res.get("expired") or []
            expired.extend(ids)
            if len(ids) < batch and res.get("purged", 0) < batch:
                return expired

    # -- queue -------------------------------------------------------------------------------

    @property
    def rq_connection(self) -> redis.Redis:
        """A client for RQ on the same server: RQ needs raw bytes (decode_responses=False)."""
        if self._rq_connection is None:
            pool = self.redis.connection_pool
            kwargs = {**pool.connection_kwargs, "decode_responses": False}
            self._rq_connection = redis.Redis(
                connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
            )
        return self._rq_connection

    def enqueue(self, func: Any, *args: Any, resources: ResourcesLike | None = None, **kwargs: Any) -> queue.Task:
        """Queues a function task (an RQ job) that runs on a worker of the host it is placed on.

        Allocation fields (priority, strategy, ttl_seconds, expected_duration, selector,
        metadata, task_id, task_type, owner) are taken from ``kwargs``; RQ options
        (job_timeout, result_ttl, failure_ttl, ttl, description, meta, on_success, on_failure,
        on_stopped, retry) too, and ``on_host_lost`` ("requeue", the default, or "fail": what
        happens to the task if its host is declared lost while it holds the grant); everything
        else goes to ``func``, or, as with RQ, ``args=`` and ``kwargs=`` give its arguments.
        RQ's ``depends_on``, ``at_front``, ``repeat``, ``rate_limit``, ``webhooks``, ``unique``
        and ``pipeline`` are refused.
        """
        return queue.enqueue(self, func, args, resources, kwargs)

    def task(self, task_id: str) -> queue.Task:
        """A handle on a queued task or allocation (position, state, allocation, wait)."""
        return queue.Task(self, task_id)

    def cancel(self, task_id: str) -> Allocation:
        """Cancels a task: a pending one leaves the line; a running one is stopped and released."""
        check_id(task_id, "task_id")
        return queue.cancel(self, task_id)

    def schedule(self) -> list[str]:
        """Runs one scheduling pass now (the scheduler does this on its tick); returns placed ids."""
        res = self._call("schedule", self.pass_depth, self.scan_cap)
        return list(res.get("placed") or [])

    def position(self, task_id: str) -> int | None:
        """Global place in line (1 = next), 0 once placed, None for an unknown id or a task that
        left the line without being placed (cancelled)."""
        check_id(task_id, "task_id")
        return queue.position(self, task_id)

    def estimated_start_time(self, task_id: str) -> datetime | None:
        """When the task is expected to start (``allocator.eta``): its activation once placed;
        for a pending task the scheduler tick's cached estimate when fresh, else computed now.
        None for an unknown or cancelled id, or when no estimate is possible."""
        from .eta import engine_for, to_datetime

        return to_datetime(engine_for(self).estimate_ms(task_id))

    def estimated_start_times(self) -> dict[str, datetime | None]:
        """Estimated start of every pending task (the tick's cache when fresh, else computed now)."""
        from .eta import engine_for, to_datetime

        return {tid: to_datetime(ms) for tid, ms in engine_for(self).estimate_all_ms().items()}

    def refresh_estimated_start_times(self) -> dict[str, Any]:
        """Computes every pending task's estimate and stores them for readers (the scheduler
        tick calls this); returns the cost figures."""
        from .eta import engine_for

        r = engine_for(self).refresh()
        return {"pending": r.pending, "read_ms": round(r.read_ms, 1), "sim_ms": round(r.sim_ms, 1),
                "events": r.events, "passes": r.passes}

    # -- capacity ----------------------------------------------------------------------------

    def capacity(self) -> Capacity:
        """Totals, allocated, available and utilisation per resource, per host and for the fleet."""
        host_ids = self.redis.zrange(self.keys.hosts, 0, -1)
        pipe = self.redis.pipeline(transaction=True)
        for h in host_ids:
            pipe.hgetall(self.keys.host(h))
            pipe.scard(self.keys.host_allocs(h))
        replies = pipe.execute() if host_ids else []
        held = self._held_by_grants({h: replies[2 * i] for i, h in enumerate(host_ids)
                                     if replies[2 * i].get("overcommitted") == "1"})
        hosts = [
            _host_capacity(h, replies[2 * i], int(replies[2 * i + 1]), *held.get(h, (None, 0)))
            for i, h in enumerate(host_ids)
            if replies[2 * i]
        ]

        def fleet(attr: str) -> Usage:
            # What is free on a host that takes no new work (draining, lost, parked: no free core
            # or RAM) is not available to the fleet, as Slurm and Ray leave drained and down nodes
            # out of what is idle.
            return Usage.of(
                sum(getattr(x, attr).total for x in hosts),
                sum(getattr(x, attr).allocated for x in hosts),
                sum(getattr(x, attr).available for x in hosts if x.takes_new_work),
                sum(getattr(x, attr).available for x in hosts if not x.takes_new_work),
                unmanaged=sum(getattr(x, attr).unmanaged for x in hosts),  # each host's, never netted
            )

        return Capacity(
            hosts=hosts,
            host_count=len(hosts),
            gpu_count=sum(len(x.gpus) for x in hosts),
            gpus_idle=sum(x.gpus_idle for x in hosts if x.takes_new_work),
            gpu_memory_mb=fleet("gpu_memory_mb"),
            cpu_cores=fleet("cpu_cores"),
            ram_mb=fleet("ram_mb"),
            active_allocations=int(self.redis.zcard(self.keys.active)),
            worker_slots=fleet("worker_slots"),
        )

    def _held_by_grants(self, hosts: dict[str, dict[str, str]]) -> dict[str, tuple[int, int]]:
        """For each host (id -> its hash): the exclusive cores its active grants hold, and the
        GPU memory they hold on GPUs the host no longer lists. Only an overcommitted host needs
        this read: there a grant may hold cores or a GPU its host no longer lists, which the
        host's own counts cannot show. (Read after the hosts, not in their MULTI: such hosts
        are rare, and the figure is as of this read.)"""
        if not hosts:
            return {}
        host_ids = list(hosts)
        pipe = self.redis.pipeline(transaction=True)
        for h in host_ids:
            pipe.smembers(self.keys.host_allocs(h))
        members = pipe.execute()
        pipe = self.redis.pipeline(transaction=True)
        for ids in members:
            for i in sorted(ids):
                pipe.hmget(self.keys.alloc(i), "state", "host", "cores", "gpus")
        fields = iter(pipe.execute())
        out: dict[str, tuple[int, int]] = {}
        for h, ids in zip(host_ids, members):
            listed = {hosts[h].get(f"g{pos}:uuid") for pos in range(int(hosts[h].get("ngpu") or 0))}
            n = unlisted_mb = 0
            for state, host, cores, gpus in (next(fields) for _ in ids):
                if state == "active" and host == h:
                    n += len(_json_list(cores))
                    unlisted_mb += sum(int(g.get("memory_mb") or 0) for g in _json_list(gpus)
                                       if isinstance(g, dict) and g.get("uuid") not in listed)
            out[h] = (n, unlisted_mb)
        return out

    def now_ms(self) -> int:
        """The ledger's clock: the injected one, else the Redis server's."""
        if self.clock is not None:
            return int(self.clock() * 1000)
        sec, usec = self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    def record_event(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        """Appends an event that changes no capacity (a job started or finished) to the outbox."""
        self.redis.xadd(self.keys.events, {"type": kind, "id": subject, "ts": str(self.now_ms()), "data": json.dumps(data)})

    def services(self, host_id: str | None = None) -> list[_services.ServiceInstance]:
        """Named service instances (state, port, endpoint, references), of one host or all."""
        return _services.instances(self, host_id)

    def service_endpoints(self, allocation_id: str, *, wait_s: float = 0.0) -> list[_services.ServiceInstance]:
        """The service instances an allocation holds, after waiting up to ``wait_s`` seconds for
        all of them to be running. Raises ``ServiceFailed`` if the allocation failed meanwhile."""
        return _services.wait_for_services(self, allocation_id, wait_s)

    def snapshot(self) -> dict[str, Any]:
        """Atomic copy of the whole ledger (hosts, indexes, active allocations); for checks."""
        return json.loads(self.scripts["snapshot"](keys=self.keys.ledger_keys(), args=[self.keys.prefix, ""]))

    def recount_names(self) -> int:
        """Rebuilds the count of the hosts' GPU models and labels (``keys.names``), and the sets of
        the hosts with each model and label (``keys.model_hosts``, ``keys.label_hosts``), from the
        host hashes, for a ledger an
        earlier release wrote to after this one had counted (the checker reports it); returns the
        hosts counted. Reads every host, in one script."""
        return int(self._call("recount_names")["hosts"])

    def _own_rq_jobs(self, batch: int = 1000) -> Iterator[str]:
        """The namespace's allocation ids whose RQ job is the namespace's (its origin one of the
        namespace's queues): RQ job ids are global to a Redis, and a lease's id may name another
        application's job."""
        ids = self.redis.zrange(self.keys.allocs, 0, -1)
        mine = self.keys.rq_queue_name_prefix()
        for at in range(0, len(ids), batch):
            chunk = ids[at:at + batch]
            pipe = self.redis.pipeline(transaction=False)
            for i in chunk:
                pipe.hget(self.keys.rq_job(i), "origin")
            for i, origin in zip(chunk, pipe.execute()):
                if origin is not None and origin.startswith(mine):
                    yield i

    def destroy(self) -> int:
        """Deletes every key of this namespace (tests, benchmarks, decommissioning), in batches:
        a fleet of thousands of hosts leaves tens of thousands of keys. RQ's keys for the
        namespace's tasks go too: their jobs (by the allocation ids the namespace still lists),
        its queues with their registries, their entries in RQ's set of queues, and the workers
        registered on those queues only."""
        n = delete_keys(self.redis, (k for i in self._own_rq_jobs() for k in self.keys.rq_job_keys(i)))
        n += delete_keys(self.redis, self.redis.scan_iter(match=self.keys.rq_queue_pattern(), count=1000))
        queues = [q for q in self.redis.smembers(self.keys.RQ_QUEUES) if q.startswith(self.keys.rq_queue_prefix())]
        if queues:
            self.redis.srem(self.keys.RQ_QUEUES, *queues)
        # Workers registered on this namespace's queues only (a worker killed without its own
        # cleanup stays registered for minutes): their current job may be gone now.
        mine = self.keys.rq_queue_name_prefix()
        for w in self.redis.smembers(self.keys.RQ_WORKERS):
            names = (self.redis.hget(w, "queues") or "").split(",")
            if names != [""] and all(q.startswith(mine) for q in names):
                self.redis.srem(self.keys.RQ_WORKERS, w)
                n += self.redis.delete(w)
        return n + delete_keys(self.redis, self.redis.scan_iter(match=self.keys.pattern(), count=1000))


def _json_list(text: str | None) -> list[Any]:
    """A JSON list field of a record; anything else reads as empty (the checker reports it)."""
    try:
        got = json.loads(text or "[]")
    except ValueError:
        return []
    return got if isinstance(got, list) else []


def _host_capacity(host_id: str, h: dict[str, str], active: int, cores_held: int | None = None,
                   unlisted_gpu_mb: int = 0) -> HostCapacity:
    """One host's figures from its hash. ``cores_held``: the exclusive cores its grants hold,
    given for an overcommitted host (see ``Allocator._held_by_grants``); elsewhere they are the
    listed cores that are not free. ``unlisted_gpu_mb``: GPU memory its grants hold on GPUs it
    no longer lists (an overcommitted host's), counted as allocated as such cores are."""
    gpus: list[GpuCapacity] = []
    for pos in range(int(h.get("ngpu", 0))):
        p = f"g{pos}:"
        total, ext, used = int(h[p + "total"]), int(h[p + "ext"]), int(h[p + "used"])
        gpus.append(
            GpuCapacity(
                index=int(h[p + "idx"]),
                uuid=h[p + "uuid"],
                model=h[p + "model"],
                memory=Usage.of(total, used, max(0, total - ext - used), unmanaged=min(ext, total)),
                holders=int(h[p + "n"]),
            )
        )
    cores = json.loads(h.get("cores") or "[]") or []
    ncores = len(cores) if isinstance(cores, list) else 0
    cfree, shared = int(h["cfree"]), int(h["shared"])
    cpu_avail = max(0, cfree * 1000 - shared) / 1000
    # Granted: pinned cores plus the shared pool's share, which may exceed the total where an
    # update left the host overcommitted (as RAM and GPU memory do).
    pinned = ncores - cfree if cores_held is None else cores_held
    cpu = Usage.of(ncores, pinned + shared / 1000, cpu_avail, unmanaged=0.0)
    ram, ram_used = int(h["ram"]), int(h["ram_used"])
    slots, slots_used = int(h.get("slots") or 0), int(h.get("slots_used") or 0)
    return HostCapacity(
        host_id=host_id,
        state=h["state"],
        labels=json.loads(h.get("labels") or "{}") or {},
        gpus=gpus,
        gpu_memory_mb=Usage.of(
            sum(g.memory.total for g in gpus), sum(g.memory.allocated for g in gpus) + unlisted_gpu_mb,
            sum(g.memory.available for g in gpus),
            unmanaged=sum(g.memory.unmanaged for g in gpus),
        ),
        gpus_idle=sum(1 for g in gpus if g.holders == 0 and g.memory.available > 0),  # the ledger's idle
        cpu_cores=cpu,
        ram_mb=Usage.of(ram, ram_used, max(0, ram - ram_used)),
        active_allocations=active,
        worker_slots=Usage.of(slots, slots_used, max(0, slots - slots_used)),
        reserve_gpus=int(h.get("reserve_gpus") or 0),
        parked=h.get("parked") == "1",
        overcommitted=h.get("overcommitted") == "1",
    )
