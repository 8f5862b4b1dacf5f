"""Several direct requests placed in one script call: ``Allocator.allocate_many``.

A caller with many requests at once (a job array, a parameter sweep, a scheduler of its own)
pays the script's entry, the clock, the reaper's look and a network round trip once per call
instead of once per request (docs/benchmarks.md, "Batches"). Each request is placed on its own,
in order, as ``allocate`` would place it right after the ones before it: a refusal does not stop
the others, and nothing is all-or-nothing. Requests are sent ``chunk_size`` at a time, so that
one call never holds Redis for long: every script blocks the server while it runs.

What is returned follows ``asyncio.gather(..., return_exceptions=True)``: one entry per request,
in order, an ``Allocation`` or the ``AllocatorError`` that ``allocate`` would have raised for it.
Only input that cannot be placed at all raises, before anything is sent (``InvalidRequest``
naming ``requests.<i>.<field>``), and so does a Redis error, as for ``allocate``: give each
request an ``allocation_id`` to retry such a call without placing anything twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import services as _services
from .errors import AllocatorError, InvalidRequest
from .models import Allocation, AllocationRequest, short_repr

if TYPE_CHECKING:
    from .client import Allocator

#: Requests per script call: a call holds Redis for about this many placements.
DEFAULT_CHUNK = 32
#: The most ``chunk_size`` may be (a few hundred placements hold Redis for tens of milliseconds).
MAX_CHUNK = 256

BatchItem = AllocationRequest | Mapping[str, Any]
BatchResult = Allocation | AllocatorError


def allocate_many(a: Allocator, requests: Iterable[BatchItem], *, chunk_size: int = DEFAULT_CHUNK,
                  progress: Callable[[int, int], None] | None = None) -> list[BatchResult]:
    """``Allocator.allocate_many``: see the module's docstring. ``progress(done, total)`` is
    called after each script call (the command line's progress bar)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_CHUNK:
        raise InvalidRequest("chunk_size", f"expected a whole number from 1 to {MAX_CHUNK}, got {short_repr(chunk_size)}")
    reqs = build_requests(a, requests)
    results: list[BatchResult] = []
    for start in range(0, len(reqs), chunk_size):
        chunk = reqs[start:start + chunk_size]
        try:
            results.extend(_place_chunk(a, chunk, start))
        except AllocatorError as exc:  # the whole call refused (RECOVERING): neither it nor the rest placed
            results.extend([exc] * (len(reqs) - start))
        if progress is not None:
            progress(len(results), len(reqs))
        if len(results) == len(reqs):
            break
    return results


def build_requests(a: Allocator, requests: Iterable[BatchItem]) -> list[AllocationRequest]:
    """Every request validated (and its service names known) before any is sent."""
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
        raise InvalidRequest("requests", f"expected a list of requests, got {type(requests).__name__}")
    out: list[AllocationRequest] = []
    for i, item in enumerate(requests):
        try:
            req = _build(a, item)
            if req.services:
                _services.check_names(a, req.services)
        except InvalidRequest as exc:
            raise InvalidRequest(f"requests.{i}.{exc.field}" if exc.field else f"requests.{i}", exc.reason) from None
        out.append(req)
    return out


def _build(a: Allocator, item: BatchItem) -> AllocationRequest:
    if isinstance(item, AllocationRequest):
        return item
    if not isinstance(item, Mapping):
        raise InvalidRequest("", f"expected a mapping of allocate's fields or an AllocationRequest, got {type(item).__name__}")
    fields = dict(item)
    if not all(isinstance(k, str) for k in fields):
        raise InvalidRequest("", "field names must be strings")
    if "on_busy" in fields:
        raise InvalidRequest("on_busy", "allocate_many places each request now or refuses it; "
                                        "put a request in line with allocate(..., on_busy='queue')")
    resources = fields.pop("resources", None)
    return a.build_request(resources, **fields)


def _place_chunk(a: Allocator, chunk: list[AllocationRequest], start: int) -> list[BatchResult]:
    """One ``place_many`` call; raises only when the whole call was refused."""
    from .client import new_allocation_id

    args = [a.place_args(req, req.allocation_id or new_allocation_id()) for req in chunk]
    t0 = time.perf_counter()
    res = a._raise_unless_ok(a._call("place_many", *[x for triple in args for x in triple]))
    ms = round((time.perf_counter() - t0) * 1000, 3)
    out: list[BatchResult] = []
    for i, (req, triple, reply) in enumerate(zip(chunk, args, res["results"]), start):
        try:
            alloc = a.placed(a._raise_unless_ok(reply), req, triple)
        except InvalidRequest as exc:
            out.append(InvalidRequest(f"requests.{i}.{exc.field}", exc.reason))
            continue
        except AllocatorError as exc:
            out.append(exc)
            continue
        alloc.allocation_time_ms = ms
        out.append(alloc)
    return out
