"""Agent tools: ``allocator tool`` (one JSON document in, one out) and the tools ``allocator mcp`` serves.

Request: ``{"tool": NAME, "params": {...}}``. Every request is checked against the tool's
published JSON Schema (``tool_schema``), then in depth by the allocator's own models; whatever
is wrong is reported with the field that is wrong, and nothing in the ledger changes.

Results: the seeds' shapes. ``resource_allocator`` returns exactly seed 004's result (its
failures too); the seed 000 operations return seed 000's shapes, with two deviations so every
result is a JSON object that says what happened: ``list_allocations`` returns
``{"allocations": [...], "count"}``, ``cleanup_expired`` returns ``{"expired": [...], "count"}``,
and ``get_allocation`` of an unknown id is a NOT_FOUND error instead of ``None``. Malformed
JSON, unknown tools and invalid parameters return ``{"success": false, "error": {"code",
"message", "field"}}``.

Outcome classes (the exit codes of ``allocator tool``): 0 done, 1 refused (does not fit, not
found, backend unavailable), 2 invalid input.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from pydantic import BaseModel

from . import seeds, tool_models as m
from .client import Allocator, check_id
from .errors import AllocatorError, InvalidRequest, NotFound, Refused, TaskRegistryError
from .tool_schema import native_schema, render

log = logging.getLogger("allocator.tool")

OK, REFUSED, INVALID = 0, 1, 2
MAX_DOCUMENT_BYTES = 1 << 20


@dataclass
class ToolOutcome:
    """A tool's result document and its outcome class (0 done, 1 refused, 2 invalid)."""

    payload: dict[str, Any]
    status: int = OK

    @property
    def is_error(self) -> bool:
        return self.status != OK

    @property
    def message(self) -> str:
        err = self.payload.get("error")
        if isinstance(err, dict):
            return str(err.get("message"))
        return str(err) if err is not None else ""


def error(code: str, message: str, field: str | None = None, status: int = INVALID) -> ToolOutcome:
    return ToolOutcome({"success": False, "error": {"code": code, "message": message, "field": field}}, status)


def invalid(exc: InvalidRequest) -> ToolOutcome:
    return error(exc.code, exc.message, exc.field, INVALID)


class ToolContext:
    """What the tools run against: one Allocator (thread-safe), made on first use."""

    def __init__(self, allocator: Allocator | Callable[[], Allocator]) -> None:
        self._allocator = allocator

    @cached_property
    def allocator(self) -> Allocator:
        return self._allocator if isinstance(self._allocator, Allocator) else self._allocator()

    @cached_property
    def manager(self) -> seeds.AllocationManager:
        return seeds.AllocationManager(allocator=self.allocator)


Handler = Callable[[ToolContext, dict[str, Any]], ToolOutcome]


@dataclass(frozen=True)
class ToolSpec:
    name: str
    params: type[BaseModel]
    handler: Handler
    description: str
    #: How invalid input is reported (seed 004 reports it in its own result shape).
    on_invalid: Callable[[dict[str, Any], InvalidRequest], ToolOutcome] = lambda _p, exc: invalid(exc)

    @cached_property
    def schema(self) -> dict[str, Any]:
        schema = native_schema(self.params)
        if self.name == "submit_task":
            from .task_registry import registry

            schema["properties"]["task"]["enum"] = registry.names()
        return schema

    @cached_property
    def validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.schema)


def _given(d: dict[str, Any] | None) -> dict[str, Any]:
    """Parameters actually given: null means "not given" (strict-mode clients send every key)."""
    return {k: v for k, v in (d or {}).items() if v is not None}


# -- handlers ------------------------------------------------------------------------------


def _resource_allocator(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    res = seeds.allocate_resources(
        p["task_id"], p["task_type"], _given(p["resource_requirements"]), p.get("allocation_strategy") or "best_fit",
        on_busy=p.get("on_busy") or "queue", allocator=ctx.allocator,
    )
    if res["success"]:
        return ToolOutcome(res)
    return ToolOutcome(res, INVALID if res["error"]["code"] == InvalidRequest.code else REFUSED)


def _seed004_invalid(p: dict[str, Any], exc: InvalidRequest) -> ToolOutcome:
    task_id = p.get("task_id") if isinstance(p, dict) and isinstance(p.get("task_id"), str) else None
    return ToolOutcome(seeds._tool_failure(task_id, exc.code, exc.message, exc.field), INVALID)


def _request_resources(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    p = _given(p)
    extra = {k: p[k] for k in ("gpus", "gpu_memory_mb", "gpu_model", "cpu_cores", "ram_mb") if k in p}
    res = ctx.manager.request_resources(
        p["job_id"], p["mcp_servers"], p.get("workers"), p.get("priority", "normal"), p.get("ttl_seconds", 3600),
        p.get("metadata"), **extra,
    )
    if res["status"] != "failed":
        return ToolOutcome(res)
    if res.get("error_code") == InvalidRequest.code:
        return error(InvalidRequest.code, res["error"], res.get("error_field"))
    return ToolOutcome(res, REFUSED)


def _release_resources(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    res = ctx.manager.release_resources(p["allocation_id"])
    return ToolOutcome(res, REFUSED if res["status"] == "error" else OK)


def _get_capacity(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    return ToolOutcome(ctx.manager.get_capacity())


def _get_allocation(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    res = ctx.manager.get_allocation(p["allocation_id"])
    if res is None:
        return error("ALLOCATION_NOT_FOUND", f"allocation {p['allocation_id']} not found", "allocation_id", REFUSED)
    return ToolOutcome(res)


def _list_allocations(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    rows = ctx.manager.list_allocations(state=p.get("state"), job_id=p.get("job_id"))
    return ToolOutcome({"allocations": rows, "count": len(rows)})


def _cleanup_expired(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    ids = ctx.manager.cleanup_expired_allocations()
    return ToolOutcome({"expired": ids, "count": len(ids)})


def _task_view(a: Allocator, task_id: str) -> dict[str, Any]:
    """State, place in line, start time (estimate while pending) and the grant of one task."""
    check_id(task_id, "task_id")
    alloc = a.require(task_id)
    position = a.position(task_id)
    alloc.queue_position = position
    return {
        "success": True,
        "task_id": task_id,
        "state": alloc.state,
        "queue_position": position,
        "estimated_start_time": seeds._iso(seeds._eta(a, alloc)) if alloc.state in ("pending", "active") else None,
        "allocation": alloc.model_dump(mode="json", exclude={"request", "released_now", "allocation_time_ms"}),
    }


def _submit_task(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    from .queue import check_task_kwargs
    from .task_registry import registry

    p = _given(p)
    entry = registry.get(p["task"])
    kwargs = dict(p.get("kwargs") or {})
    check_task_kwargs(kwargs)
    resources = {**entry.resources, **_given(p.get("resources"))}
    fields = {k: p[k] for k in ("priority", "strategy", "task_type", "owner", "expected_duration") if k in p}
    fields.setdefault("task_type", entry.task_type)
    fields.setdefault("expected_duration", entry.expected_duration)
    if "job_timeout" in p:
        fields["job_timeout"] = p["job_timeout"]
    if "task_id" in p:
        fields["job_id"] = p["task_id"]
    a = ctx.allocator
    req = a.build_request(resources, **{k: v for k, v in fields.items()
                                        if k in ("priority", "strategy", "task_type", "owner", "expected_duration")})
    cap = a.capacity()
    if not seeds.could_ever_fit(cap, req):
        raise seeds.never_fits(cap, req)
    try:
        task = a.enqueue(entry.func, *(p.get("args") or []), resources=resources,
                         **{k: v for k, v in fields.items() if v is not None}, **kwargs)
    except InvalidRequest as exc:
        raise exc.renamed({"job_id": "task_id"}) from None
    return ToolOutcome({**_task_view(a, task.id), "task": entry.name})


def _get_task(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    return ToolOutcome(_task_view(ctx.allocator, p["task_id"]))


def _cancel_task(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    alloc = ctx.allocator.cancel(p["task_id"])
    return ToolOutcome({"success": True, "task_id": alloc.allocation_id, "state": alloc.state,
                        "release_reason": alloc.release_reason})


def _get_queue(ctx: ToolContext, p: dict[str, Any]) -> ToolOutcome:
    from .views import pending_tasks

    rows, total = pending_tasks(ctx.allocator, int(p.get("limit") or 50))  # 10.0 is a valid JSON integer
    return ToolOutcome({"pending": rows, "count": total})


TOOLS: dict[str, ToolSpec] = {
    s.name: s
    for s in [
        ToolSpec("resource_allocator", m.ResourceAllocatorParams, _resource_allocator,
                 "Allocate GPU memory, CPU cores and RAM for a task on one host (seed 004). Places it now, or "
                 "queues it and reports queue_position and estimated_start_time.", _seed004_invalid),
        ToolSpec("request_resources", m.RequestResourcesParams, _request_resources,
                 "Reserve worker slots (1 core, 2048 MiB each) and optionally GPUs for a job; returns the allocation (seed 000)."),
        ToolSpec("release_resources", m.AllocationIdParams, _release_resources,
                 "Release an allocation; releasing twice is harmless."),
        ToolSpec("get_capacity", m.NoParams, _get_capacity,
                 "Fleet capacity: total, allocated and available CPU, memory, workers and GPU memory."),
        ToolSpec("get_allocation", m.AllocationIdParams, _get_allocation, "Details of one allocation."),
        ToolSpec("list_allocations", m.ListAllocationsParams, _list_allocations,
                 "List allocations, newest first, optionally by state or job."),
        ToolSpec("cleanup_expired", m.NoParams, _cleanup_expired,
                 "Release every allocation past its TTL; returns their ids."),
        ToolSpec("submit_task", m.SubmitTaskParams, _submit_task,
                 "Queue a registered task; it runs on a worker of the host it is placed on, with its GPUs and cores pinned."),
        ToolSpec("get_task", m.TaskIdParams, _get_task,
                 "State of a task: queue position and estimated start while pending, the grant once placed."),
        ToolSpec("cancel_task", m.TaskIdParams, _cancel_task,
                 "Cancel a task: a pending one leaves the line, a running one is stopped and released."),
        ToolSpec("get_queue", m.QueueParams, _get_queue,
                 "Pending tasks in the order they will start, with positions and estimated start times."),
    ]
}


# -- running a request ---------------------------------------------------------------------


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


def _schema_error(err: ValidationError, prefix: str = "") -> InvalidRequest:
    """A jsonschema error as ``InvalidRequest`` naming the field (unknown and missing keys included)."""
    base = _path(err.absolute_path)
    join = (lambda name: f"{prefix}{base}.{name}" if base else f"{prefix}{name}")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set((err.schema or {}).get("properties", {}))
        extra = sorted(str(k) for k in err.instance if k not in known)
        return InvalidRequest(join(extra[0]) if extra else prefix + base, "unknown field")
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        return InvalidRequest(join(missing[0]) if missing else prefix + base, "required field is missing")
    field = prefix + base if base else (prefix.rstrip(".") or "params")
    if err.validator == "maxItems" and isinstance(err.instance, list):
        # jsonschema's own words quote the whole list ("[...] is too long"): say the limit instead.
        return InvalidRequest(field, f"at most {err.validator_value} values, got {len(err.instance)}")
    return InvalidRequest(field, err.message if len(err.message) <= 300 else err.message[:300] + "...")


def _accepts(schema: dict[str, Any], kind: str) -> bool:
    if schema.get("type") == kind or (isinstance(schema.get("type"), list) and kind in schema["type"]):
        return True
    return any(_accepts(b, kind) for b in schema.get("anyOf", []))


def _decode_json_text(params: dict[str, Any], schema: dict[str, Any]) -> None:
    """Decodes, in place, parameters sent as JSON text where the schema wants an object or array.

    Strict-mode clients must send free-form JSON (metadata, args, kwargs) as text, and some
    clients send every nested object as text; the value is then checked like any other.
    """
    for key, prop in schema.get("properties", {}).items():
        value = params.get(key)
        if not isinstance(value, str) or _accepts(prop, "string"):
            continue
        if not (_accepts(prop, "object") or _accepts(prop, "array")):
            continue
        want = "object" if _accepts(prop, "object") else "array"
        try:
            params[key] = json.loads(value, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise InvalidRequest(key, f"expected a JSON {want} (or its JSON text), got a string") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def run_tool(name: object, params: object, ctx: ToolContext) -> ToolOutcome:
    """Runs one tool call; never raises (every failure is an outcome with an error document)."""
    spec = TOOLS.get(name) if isinstance(name, str) else None
    if spec is None:
        return error("UNKNOWN_TOOL", f"unknown tool {name!r}; available: {', '.join(TOOLS)}", "tool")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return spec.on_invalid({}, InvalidRequest("params", f"expected a JSON object, got {type(params).__name__}"))
    params = dict(params)
    try:
        _decode_json_text(params, spec.schema)
        err = best_match(spec.validator.iter_errors(params))
        if err is not None:
            raise _schema_error(err)
        return spec.handler(ctx, params)
    except InvalidRequest as exc:
        return spec.on_invalid(params, exc)
    except (Refused, NotFound) as exc:
        return ToolOutcome({"success": False, "error": {**exc.to_dict(), "field": None}}, REFUSED)
    except TaskRegistryError as exc:  # the operator's configuration, invalid input as for the CLI
        return error(exc.code, exc.message, None, INVALID)
    except AllocatorError as exc:
        return ToolOutcome({"success": False, "error": {**exc.to_dict(), "field": None}}, REFUSED)
    except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
        log.error("tool %s: Redis unavailable: %s", spec.name, exc)
        return error("BACKEND_UNAVAILABLE", f"Redis unavailable: {exc}", None, REFUSED)
    except Exception as exc:  # a bug: report it as a result, the details stay in the log
        log.error("tool %s failed unexpectedly: %r", spec.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return error("INTERNAL_ERROR", f"internal error in {spec.name}: {type(exc).__name__}", None, REFUSED)


def parse_document(text: str | bytes) -> tuple[Any, Any] | ToolOutcome:
    """(tool, params) of a request document, or the error outcome for a malformed one."""
    if isinstance(text, bytes):
        if len(text) > MAX_DOCUMENT_BYTES:
            return error("INVALID_JSON", f"request larger than {MAX_DOCUMENT_BYTES} bytes", None)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return error("INVALID_JSON", f"request is not UTF-8: {exc.reason} at byte {exc.start}", None)
    if len(text) > MAX_DOCUMENT_BYTES:
        return error("INVALID_JSON", f"request larger than {MAX_DOCUMENT_BYTES} bytes", None)
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return error("INVALID_JSON", "request nests too deeply", None)
    except ValueError as exc:
        return error("INVALID_JSON", f"request is not valid JSON: {exc}", None)
    if not isinstance(doc, dict):
        return error("INVALID_REQUEST", f"expected a JSON object {{\"tool\": ..., \"params\": {{...}}}}, got {type(doc).__name__}", None)
    unknown = sorted(str(k) for k in doc if k not in ("tool", "params"))
    if unknown:
        return error("INVALID_REQUEST", f"{unknown[0]}: unknown field (expected tool and params)", unknown[0])
    if "tool" not in doc:
        return error("INVALID_REQUEST", "tool: required field is missing", "tool")
    return doc["tool"], doc.get("params")


def run_document(text: str | bytes, ctx: ToolContext) -> ToolOutcome:
    """Runs one request document (the body of ``allocator tool``)."""
    parsed = parse_document(text)
    if isinstance(parsed, ToolOutcome):
        return parsed
    return run_tool(parsed[0], parsed[1], ctx)


def definitions(fmt: str = "native") -> Any:
    """The tool definitions in ``fmt`` (native, openai, anthropic); see ``tool_schema``."""
    envelope = native_schema(m.Envelope)
    envelope["properties"]["tool"]["enum"] = list(TOOLS)
    return render([(s.name, s.description, s.schema) for s in TOOLS.values()], fmt, envelope)


def dumps(payload: Any, indent: int | None = None) -> str:
    """JSON text of a result: a number that is not finite becomes null, so the output is valid
    JSON (``json`` writes floats itself and never asks ``default`` about them)."""
    return json.dumps(_finite(payload), allow_nan=False, default=_default, indent=indent)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _default(o: Any) -> Any:
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
