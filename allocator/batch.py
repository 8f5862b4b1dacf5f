"""Several direct requests placed in one script call: ``Allocator.allocate_many``.

A caller with many requests at once (a job array, a parameter sweep, a scheduler of its own)
pays the script's entry, the placement time's read and a network round trip once per call
instead of once per request (docs/benchmarks.md, "Run S"). Each request is placed on its own, in order, as
``allocate`` would place it right after the ones before it: a refusal does not stop the others,
and nothing is all-or-nothing. Requests are sent ``chunk_size`` at a time, and a call stops
after the request during which it passed ``BUDGET_MS`` of server time (the rest of its chunk
goes in the next call), so that one call never holds Redis for long: every script blocks the
server while it runs. An id given twice is idempotent, as for ``allocate``: the second entry
gets the first's allocation.

What is returned follows ``asyncio.gather(..., return_exceptions=True)``: one entry per request,
in order, the ``Allocation`` ``allocate`` would have returned (a repeat of an id returns that
allocation as it stands, pending or ended included) or the ``AllocatorError`` it would have
raised. Every allocation of one script call carries that call's time as ``allocation_time_ms``.
Only input that cannot be placed at all raises, before anything is sent (``InvalidRequest``
naming ``requests.<i>.<field>``), and so does a Redis error, as for ``allocate``: give each
request an ``allocation_id`` to retry such a call without placing anything twice.

``Allocator.release_many`` is the same for releases (Slurm's ``scancel`` of several jobs): one
``release_many.lua`` call ends up to ``chunk_size`` allocations, each as ``release`` would, and an
id that does not exist gets ``AllocationNotFound`` without stopping the others. What a call
frees goes to the tasks in line after its releases, in as many scheduling passes as move the
line (at most one per allocation ended, as releasing them one by one would run), so the line
sees one freed fleet rather than a release at a time. The ids of allocations waiting in line are
sent first, and each call withdraws them before its passes, so no pass of the batch places one
of them (or preempts for it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import services as _services
from .errors import AllocatorError, InvalidRequest
from .models import Allocation, AllocationRequest, given_fields, short_repr

if TYPE_CHECKING:
    from .client import Allocator

#: Requests (or ids) per script call: a call holds Redis for about this many placements (releases).
DEFAULT_CHUNK = 32
#: The most ``chunk_size`` may be (a few hundred placements hold Redis for tens of milliseconds).
MAX_CHUNK = 256
#: Server time after which one call stops placing (releasing) and leaves the rest of its chunk to
#: the next call: a refused request pays its whole scan (milliseconds on a large fleet), a release
#: may run scheduling passes, and while a script runs Redis serves nobody else, so a chunk must
#: not hold it for seconds.
BUDGET_MS = 20

BatchItem = AllocationRequest | Mapping[str, Any]
BatchResult = Allocation | AllocatorError
#: A request ready to send: the validated request and place.lua's three arguments for it.
Prepared = tuple[AllocationRequest, tuple[str, str, str]]


def allocate_many(a: Allocator, requests: Iterable[BatchItem], *, chunk_size: int = DEFAULT_CHUNK,
                  progress: Callable[[int, int], None] | None = None) -> list[BatchResult]:
    """``Allocator.allocate_many``: see the module's docstring. ``progress(done, total)`` is
    called after each script call (the command line's progress bar)."""
    check_chunk(chunk_size)
    prepared = prepare(a, requests)
    return _in_chunks(prepared, chunk_size, lambda start, chunk: _place_chunk(a, chunk, start), progress)


def release_many(a: Allocator, allocation_ids: Iterable[str], *, reason: str = "released",
                 chunk_size: int = DEFAULT_CHUNK, progress: Callable[[int, int], None] | None = None) -> list[BatchResult]:
    """``Allocator.release_many``: see the module's docstring. Every id is checked before any
    allocation is released."""
    from .client import check_id

    check_chunk(chunk_size)
    if isinstance(allocation_ids, (str, bytes, Mapping)) or not isinstance(allocation_ids, Iterable):
        raise InvalidRequest("allocation_ids", f"expected a list of allocation ids, got {type(allocation_ids).__name__}")
    ids = list(allocation_ids)
    for i, aid in enumerate(ids):
        check_id(aid, f"allocation_ids.{i}")
    check_id(reason, "reason", 64)
    order = _waiting_first(a, ids)
    done = _in_chunks([ids[i] for i in order], chunk_size, lambda start, chunk: _release_chunk(a, chunk, reason),
                      progress)
    by_position = dict(zip(order, done))
    return [by_position[i] for i in range(len(ids))]


def _waiting_first(a: Allocator, ids: list[str]) -> list[int]:
    """The positions of ``ids`` in the order they are sent: those of allocations waiting in line
    first. A call withdraws its own before its scheduling passes run, but not those of later
    calls, which its passes could place (and preempt for) before their call comes. Read in one
    round trip before the first call; one placed meanwhile by another client's pass is released
    as placed, as one by one."""
    pipe = a.redis.pipeline(transaction=False)
    for aid in ids:
        pipe.hget(a.keys.alloc(aid), "state")
    states = pipe.execute()
    return ([i for i, s in enumerate(states) if s == "pending"]
            + [i for i, s in enumerate(states) if s != "pending"])


def check_chunk(chunk_size: Any) -> None:
    """``InvalidRequest`` unless ``chunk_size`` is a whole number from 1 to ``MAX_CHUNK``."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK:
        raise InvalidRequest("chunk_size", f"expected a whole number from 1 to {MAX_CHUNK}, got {short_repr(chunk_size)}")


def _in_chunks(items: list[Any], chunk_size: int, call: Callable[[int, list[Any]], list[BatchResult]],
               progress: Callable[[int, int], None] | None) -> list[BatchResult]:
    """``call(start, chunk)`` over ``items``, ``chunk_size`` at a time: each call answers the
    items it got to before its time budget ran out (at least the first), and the next call
    starts after them."""
    results: list[BatchResult] = []
    while len(results) < len(items):
        start = len(results)
        results.extend(call(start, items[start:start + chunk_size]))
        if progress is not None:
            progress(len(results), len(items))
    return results


def prepare(a: Allocator, requests: Iterable[BatchItem]) -> list[Prepared]:
    """Every request validated (its service names known) and its arguments built before any is
    sent, so that nothing can fail once the first chunk is placed."""
    from .client import new_allocation_id

    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
        raise InvalidRequest("requests", f"expected a list of requests, got {type(requests).__name__}")
    out: list[Prepared] = []
    for i, item in enumerate(requests):
        try:
            req = _build(a, item)
            if req.services:
                _services.check_names(a, req.services)
        except InvalidRequest as exc:
            raise InvalidRequest(f"requests.{i}.{exc.field}" if exc.field else f"requests.{i}", exc.reason) from None
        out.append((req, a.place_args(req, req.allocation_id or new_allocation_id())))
    return out


def _build(a: Allocator, item: BatchItem) -> AllocationRequest:
    if isinstance(item, AllocationRequest):
        # Validated again: a model changed after it was built (model_copy(update=...), attribute
        # assignment) is not checked by pydantic, and a negative size would corrupt the ledger.
        # (So a request takes nothing here that allocate's validation refuses, such as the seed
        # APIs' record in its metadata.)
        item = given_fields(item)
    if not isinstance(item, Mapping):
        raise InvalidRequest("", f"expected a mapping of allocate's fields or an AllocationRequest, got {type(item).__name__}")
    fields = dict(item)
    if not all(isinstance(k, str) for k in fields):
        raise InvalidRequest("", "field names must be strings")
    if fields.get("on_busy", "fail") != "fail":
        raise InvalidRequest("on_busy", "allocate_many places each request now or refuses it; "
                                        "put a request in line with allocate(..., on_busy='queue')")
    fields.pop("on_busy", None)
    resources = fields.pop("resources", None)
    return a.build_request(resources, **fields)


def _place_chunk(a: Allocator, chunk: list[Prepared], start: int) -> list[BatchResult]:
    """One ``place_many`` call: the allocation or error of each request it got to before its
    time budget ran out (at least the first)."""
    t0 = time.perf_counter()
    res = a._raise_unless_ok(a._call("place_many", BUDGET_MS, *[x for _, args in chunk for x in args]))
    ms = round((time.perf_counter() - t0) * 1000, 3)
    out: list[BatchResult] = []
    for i, ((req, args), reply) in enumerate(zip(chunk, res["results"]), start):
        try:
            alloc = a._placed(a._raise_unless_ok(reply), req, args)
        except InvalidRequest as exc:
            out.append(InvalidRequest(f"requests.{i}.{exc.field}", exc.reason))
            continue
        except AllocatorError as exc:
            out.append(exc)
            continue
        alloc.allocation_time_ms = ms
        out.append(alloc)
    return out


def _release_chunk(a: Allocator, chunk: list[str], reason: str) -> list[BatchResult]:
    """One ``release_many`` call: the record or error of each id it got to before its time
    budget ran out (at least the first)."""
    res = a._raise_unless_ok(a._call("release_many", BUDGET_MS, reason, a.pass_depth, a.scan_cap, *chunk))
    out: list[BatchResult] = []
    for aid, reply in zip(chunk, res["results"]):
        try:
            out.append(a._released(aid, reply))
        except AllocatorError as exc:
            out.append(exc)
    return out
