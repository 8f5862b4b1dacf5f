"""Request and response models of the HTTP and WebSocket API.

Request models describe the wire format for the OpenAPI schema and reject what is plainly
malformed; the allocator's own models (``allocator.models``) then validate the meaning (units,
selectors, limits) exactly as for every other entry point, so an error names the same field
whether it came from the CLI, the library or HTTP. Responses reuse the allocator's models.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from ..models import (
    GPU_UUID_PATTERN, JOB_ID_PATTERN, MAX_GPU_MODELS, MAX_SECONDS, MAX_SELECTOR_LABELS, MAX_SELECTOR_VALUES, Allocation, GpuCapacity,
    HostCapacity, Usage,
)

ALLOC_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
JOB_ID = JOB_ID_PATTERN.pattern

PriorityIn = Annotated[
    Literal["low", "normal", "high", "critical"] | Annotated[int, Field(ge=0, le=3)],
    Field(description="low, normal, high, critical (or 0..3)."),
]
StrategyIn = Literal["first_fit", "best_fit", "worst_fit", "spread", "priority"]
MemoryIn = Annotated[int, Field(ge=0, le=1 << 40)] | Annotated[str, Field(min_length=1, max_length=32)]
Text = Annotated[str, Field(min_length=1, max_length=256)]
#: A label selector as a mapping (label -> value or values), within the limits every entry point keeps.
Selector = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=128)],
         Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_SELECTOR_VALUES)] | Annotated[str, Field(max_length=256)]],
    Field(max_length=MAX_SELECTOR_LABELS),
]


def _mentions_number(tp: Any) -> bool:
    """Whether a field's type takes a number (int or float), directly or inside a union, an
    Annotated or a list: fields of free JSON (metadata, args, kwargs) do not."""
    if tp in (int, float):
        return True
    return any(_mentions_number(a) for a in get_args(tp) if a is not Any)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON true/false is no number (pydantic's lax mode made true a 1-GPU, 1-MiB,
        1-second request), as the allocator's own models refuse it for every other entry point;
        whole numbers written as floats (1.0) stay accepted."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _mentions_number(field.annotation):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) for v in items):
                raise ValueError("expected a number, got a boolean")
        return value


class ResourcesIn(_In):
    """What the task needs on one host; memory also as "20Gi", "512Mi", CPU also as "500m"."""

    gpus: int = Field(0, ge=0, le=64, description="GPUs, all on one host.")
    gpu_memory_mb: MemoryIn | None = Field(None, description="MiB per GPU (or '20Gi'); omit for whole GPUs.")
    gpu_model: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=MAX_GPU_MODELS)] | Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description=f"Allowed GPU models: a list or 'A100|H100' (at most {MAX_GPU_MODELS}).")
    cpu_cores: Annotated[float, Field(ge=0, le=4096)] | Annotated[str, Field(min_length=1, max_length=16)] = Field(
        1, description="Integers pin exclusive cores; fractions (0.5, '500m') come from the shared pool.")
    ram_mb: MemoryIn = Field(0, description="RAM in MiB (or '32Gi').")


class AllocationFields(_In):
    """Fields shared by every way of asking for resources."""

    resources: ResourcesIn = Field(default_factory=ResourcesIn)
    priority: PriorityIn = "normal"
    strategy: StrategyIn = "best_fit"
    ttl_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(3600, description="Lease length; null = no expiry.")
    expected_duration: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(None, description="Expected run time in seconds (backfill, ETA).")
    selector: Selector | Annotated[str, Field(max_length=1024)] | None = Field(
        None, description="Host labels: {'cluster': 'a'}, {'cluster': ['a', 'b']} or 'cluster=a|b,zone=z1' "
                          f"(at most {MAX_SELECTOR_LABELS} labels, {MAX_SELECTOR_VALUES} values each).")
    metadata: dict[str, Any] = Field(default_factory=dict)
    task_id: Text | None = None
    task_type: Text | None = None
    owner: Text | None = None

    def allocation_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``Allocator.allocate`` / ``enqueue`` (only what was sent)."""
        out = self.model_dump(exclude_unset=True, exclude={"resources"})
        for k in list(out):
            if k not in AllocationFields.model_fields:
                out.pop(k)
        return out

    def resources_dict(self) -> dict[str, Any]:
        return self.resources.model_dump(exclude_unset=True)


class AllocateBody(AllocationFields):
    allocation_id: Annotated[str, Field(pattern=ALLOC_ID)] | None = Field(None, description="Idempotency key: repeating it returns the first result.")
    on_busy: Literal["fail", "queue"] = Field("fail", description="fail: 409 when it does not fit now; queue: wait in line (202).")


class BatchRequest(AllocationFields):
    """One request of a batch: the fields of ``POST /v1/allocations`` but ``on_busy`` (a batch
    places now or refuses)."""

    allocation_id: Annotated[str, Field(pattern=ALLOC_ID)] | None = Field(None, description="Idempotency key: repeating it returns the first result.")


class AllocateManyBody(_In):
    """Several requests placed in order, each on its own (``Allocator.allocate_many``)."""

    requests: list[BatchRequest] = Field(max_length=1000, description="At most 1,000; an empty list places nothing.")
    chunk_size: int = Field(32, ge=1, le=256, description="Requests per script call (each call holds Redis while it runs).")


class ReleaseManyBody(_In):
    """Several allocations released in order, each on its own (``Allocator.release_many``)."""

    allocation_ids: list[Annotated[str, Field(pattern=ALLOC_ID)]] = Field(
        max_length=1000, description="At most 1,000; an empty list releases nothing.")
    chunk_size: int = Field(32, ge=1, le=256, description="Releases per script call (each call holds Redis while it runs).")


class TaskSubmitBody(AllocationFields):
    """A registered function task to queue: its name, JSON arguments, and what it needs."""

    task: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="Name from the operator's task registry.")
    args: list[Any] = Field(default_factory=list, max_length=256)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    job_id: Annotated[str, Field(pattern=JOB_ID)] | None = Field(None, description="Id for the task (idempotency); default: generated.")
    job_timeout: Annotated[int, Field(ge=-1, le=MAX_SECONDS)] | None = Field(
        None, description="Seconds the run may take (RQ's job_timeout); -1: no limit.")
    result_ttl: Annotated[int, Field(ge=-1, le=MAX_SECONDS)] | None = Field(
        None, description="Seconds RQ keeps the result; 0: not kept; -1: kept until deleted.")

    @field_validator("job_timeout")
    @classmethod
    def _timeout(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("0 is no time limit RQ takes: give seconds >= 1, or -1 for none")
        return v


class GpuIn(_In):
    index: int = Field(ge=0, le=1023)
    uuid: Annotated[str, Field(min_length=1, max_length=128, pattern=GPU_UUID_PATTERN.pattern)] | None = Field(
        None, description="NVML's uuid (GPU-..., MIG-...): letters, digits and . _ : @ / -; default '<host>-gpu<index>'.")
    model: Annotated[str, Field(min_length=1, max_length=64)] = "GPU"
    memory_mb: MemoryIn
    used_mb: MemoryIn = 0


class HostIn(_In):
    """A host's whole inventory (what an agent registers): a PUT replaces it, so what it leaves
    out takes its default."""

    labels: dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(max_length=256)]] = Field(default_factory=dict)
    cpu_cores: Annotated[int, Field(ge=0, le=4096)] | list[Annotated[int, Field(ge=0, le=65535)]] = 0
    ram_mb: MemoryIn = 0
    gpus: list[GpuIn] = Field(default_factory=list, max_length=64)
    reserve_gpus: int = Field(0, ge=0, le=64)
    worker_slots: Annotated[int, Field(ge=0)] | None = Field(None, description="Worker slots offered; null = one per core.")
    service_ports: Annotated[str, Field(min_length=1, max_length=16)] | list[int] | None = Field(
        None, description="Port pool for shared services: 'first-last' or [first, last]; default 9000-9099.")


# -- responses --------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchResult(BaseModel):
    """One item's outcome: its allocation, or the error its single route (``POST
    /v1/allocations`` for a request of a batch, ``DELETE /v1/allocations/{id}`` for an id of a
    batch of releases) would have answered (``status``: the HTTP status that route would have used)."""

    status: int
    allocation: Allocation | None = None
    error: dict[str, Any] | None = Field(None, description="What the single route would have answered under "
                                                           "`error`: code, message, field (and details when the ledger gave some).")


class BatchResults(BaseModel):
    results: list[BatchResult]
    allocated: int = Field(description="How many requests hold an active allocation (status 201).")


class ReleaseResults(BaseModel):
    results: list[BatchResult] = Field(description="Per id, in order: status 200 and the record as "
                                                   "`DELETE /v1/allocations/{id}` would answer it, or 404.")
    released: int = Field(description="How many allocations this call ended (a repeat, or one ended before, is not counted).")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    namespace: str


class HostView(HostCapacity):
    cluster: str = Field(description="The host's 'cluster' label (seed 003's cluster_id).")
    heartbeat_age_s: float | None = Field(None, description="Seconds since its agent's last heartbeat; null = no agent.")


class WouldFit(BaseModel):
    fits: bool
    host_id: str | None = None
    gpus: list[dict[str, Any]] = Field(default_factory=list)
    cores: list[int] = Field(default_factory=list)


class TaskStatus(BaseModel):
    task_id: str
    state: str = Field(description="pending, active, released, failed or cancelled.")
    position: int | None = Field(None, description="Place in line (1 = next); 0 once placed; null for a task that left the line unplaced.")
    estimated_start_time: datetime | None = Field(
        None, description="Predicted start while pending, its start once placed (as the tool and the CLI report); "
                          "null when unknown or ended.")
    allocation: Allocation | None = None
    task: str | None = Field(None, description="Registered task name (function tasks).")
    job_status: str | None = Field(None, description="RQ job status (function tasks).")


class QueueEntry(BaseModel):
    task_id: str
    position: int
    priority: str
    kind: str
    created_at: datetime | None = None


class RegistryEntry(BaseModel):
    name: str
    task_type: str
    description: str | None = None
    resources: dict[str, Any] = Field(default_factory=dict, description="What the task gets when the request names no resources.")


class Placement(BaseModel):
    """Seed 003's output: cluster (the host's 'cluster' label), node (host id), GPU indexes."""

    cluster_id: str
    node_id: str
    gpus: list[str] = Field(description="GPU indexes on the node, as strings (seed 003 shows ['0', '2']).")


# -- WebSocket --------------------------------------------------------------------------------


class PolicyInputs(AllocationFields):
    """``inputs`` of the seed-003 message: the request, plus any keys the policy wants."""

    model_config = ConfigDict(extra="allow")

    allocation_id: Annotated[str, Field(pattern=ALLOC_ID)] | None = None


class ExecutionSettings(BaseModel):
    """Keys of ``settings`` the server itself reads (all of ``settings`` also goes to the policy)."""

    model_config = ConfigDict(extra="allow")

    on_busy: Literal["fail", "queue"] = Field("queue", description="queue: wait in line, streaming position and ETA.")
    timeout_s: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(None, description="Give up (and cancel) after this long.")
    max_attempts: int | None = Field(None, ge=1, le=10, description="Policy evaluations when its choice is taken meanwhile.")
    # A floor: every frame reads the line and the estimates, and a client must not make that a busy loop.
    progress_interval_s: Annotated[float, Field(ge=0.1, le=3600)] | None = None


class AllocateMessage(BaseModel):
    """The seed-003 WebSocket message."""

    model_config = ConfigDict(extra="forbid")

    adhoc: StrictBool = Field(description="Must be true (the JSON boolean).")
    policy_rule_uri: str = Field(min_length=1, max_length=256, description="Dotted path (module:Class) or an allocator.policies entry point.")
    clusters: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, description="Candidate clusters (hosts' 'cluster' label).")
    filter: dict[str, Any] | str | None = Field(None, description="Label selector over hosts.")
    search: dict[str, Any] | None = Field(None, description="Similarity search: not supported (must be empty).")
    inputs: PolicyInputs
    parameters: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("adhoc")
    @classmethod
    def _adhoc(cls, v: bool) -> bool:
        if v is not True:
            raise ValueError("must be true")
        return v

    @field_validator("policy_rule_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        # One spelling per policy: the loader's cache and each policy's context are kept by it.
        v = v.strip()
        if not v:
            raise ValueError("must name a policy")
        return v


__all__ = [
    "AllocateBody", "AllocateMessage", "Allocation", "ErrorBody", "ExecutionSettings", "GpuCapacity", "Health",
    "HostIn", "HostView", "Placement", "PolicyInputs", "QueueEntry", "RegistryEntry", "ResourcesIn",
    "TaskStatus", "TaskSubmitBody", "Usage", "WouldFit",
]
