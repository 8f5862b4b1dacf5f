"""Parameter models of the agent tools: the source of their JSON Schemas (see ``tool_schema``).

Types are JSON types (memory as MiB or a size string, priority as 0..3 or a name); the values are
checked in depth by the allocator's own request models when the tool runs, so these models say
what an agent may send and the error for a bad value still names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import JOB_ID_PATTERN, MAX_GPU_MODELS, MAX_SELECTOR_LABELS, MAX_SELECTOR_VALUES, SERVICE_NAME

Memory = Annotated[int | str, Field(description="MiB as a number, or a size string such as '512Mi', '4Gi', '2G'.")]
Cpu = Annotated[float | str, Field(description="Cores: 2 pins two exclusive cores; 0.5 or '500m' shares the host's pool.")]
PriorityName = Literal["low", "normal", "high", "critical"]
PriorityValue = Annotated[int, Field(ge=0, le=3)] | PriorityName
StrategyName = Literal["first_fit", "best_fit", "worst_fit", "priority"]
# Seed 000's "releasing" too: a release is one atomic step here, so nothing is ever listed in it.
AllocationState = Literal["pending", "active", "releasing", "released", "failed", "cancelled"]
Id = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(min_length=1, max_length=256)]
Seconds = Annotated[float, Field(gt=0, le=315_360_000)]
#: Leases of at least a second: the ledger keeps TTLs in whole milliseconds (and 0 means none).
TtlSeconds = Annotated[float, Field(ge=1, le=315_360_000)]
#: Allowed GPU models: one name, 'A|B', or a list of names (at most ``MAX_GPU_MODELS`` in all).
GpuModels = str | Annotated[list[str], Field(max_length=MAX_GPU_MODELS)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourceRequirements(_Params):
    """Seed 004's resource_requirements: what the task needs on one host, plus its priority."""

    gpu_memory_mb: Memory | None = Field(None, description="GPU memory per GPU (MiB or '4Gi'); implies one GPU. Omit for no GPU or whole GPUs.")
    cpu_cores: Cpu | None = Field(None, description="CPU cores (default 1).")
    ram_mb: Memory | None = Field(None, description="RAM (MiB or '8Gi'; default 0).")
    priority: PriorityValue | None = Field(None, description="0..3 or low/normal/high/critical (default normal = 1).")
    gpus: Annotated[int, Field(ge=0, le=64)] | None = Field(None, description="Number of GPUs, all on one host.")
    gpu_model: GpuModels | None = Field(None, description=f"Allowed GPU models, e.g. 'A100' or ['V100M16', 'V100M32'] (at most {MAX_GPU_MODELS}).")
    ttl_seconds: TtlSeconds | None = Field(None, description="Lease length in seconds (default 3600); the lease is released after it.")
    selector: str | None = Field(None, description="Host label selector, e.g. 'cluster=lab,zone=z1|z2' "
                                                    f"(at most {MAX_SELECTOR_LABELS} labels, {MAX_SELECTOR_VALUES} values each).")


class ResourceAllocatorParams(_Params):
    """Allocate GPU memory, CPU cores and RAM for a task (seed 004 resource_allocator)."""

    task_id: Text = Field(description="ID of the task to allocate resources for.")
    task_type: Text = Field(description="Type of task, e.g. ml_inference, rendering, processing.")
    resource_requirements: ResourceRequirements
    allocation_strategy: StrategyName | None = Field("best_fit", description="Placement strategy (default best_fit); priority may preempt lower-priority work while the request waits in line (on_busy queue).")
    on_busy: Literal["queue", "fail"] | None = Field("queue", description="When nothing fits now: wait in line (default) or fail at once.")


class RequestResourcesParams(_Params):
    """Reserve worker slots (and optionally GPUs) for a job (seed 000 request_resources)."""

    job_id: Text = Field(description="Unique job identifier.")
    mcp_servers: list[Annotated[str, Field(pattern=SERVICE_NAME.pattern)]] = Field(
        description="Named shared services the job uses (may be empty): each must be in the catalog of some host; they are "
                    "started (or shared) on the allocation's host and the call waits for them to run (up to 30 s). Where no host "
                    "has a service catalog, the names are only recorded (status not_started, no endpoint).")
    workers: Annotated[int, Field(ge=0, le=10_000)] | None = Field(None, description="Worker slots (1 core and 2048 MiB each; default 0).")
    priority: PriorityValue | None = Field(None, description="low, normal (default), high, critical.")
    ttl_seconds: TtlSeconds | None = Field(None, description="Lease length in seconds (default 3600).")
    metadata: dict[str, Any] | None = Field(None, description="Free-form JSON object kept with the allocation.")
    gpus: Annotated[int, Field(ge=0, le=64)] | None = Field(None, description="GPUs in addition to the workers.")
    gpu_memory_mb: Memory | None = Field(None, description="GPU memory per GPU in addition to the workers.")
    gpu_model: GpuModels | None = Field(None, description=f"Allowed GPU models (at most {MAX_GPU_MODELS}).")
    cpu_cores: Cpu | None = Field(None, description="Cores in addition to the workers' cores.")
    ram_mb: Memory | None = Field(None, description="RAM in addition to the workers' memory.")


class AllocationIdParams(_Params):
    allocation_id: Id = Field(description="Allocation identifier, as returned when it was made.")


class ListAllocationsParams(_Params):
    """List allocations, newest first, optionally filtered."""

    state: AllocationState | None = Field(None, description="Only allocations in this state.")
    job_id: Text | None = Field(None, description="Only allocations of this job (task id).")


class NoParams(_Params):
    pass


class TaskResources(_Params):
    """Resources for a submitted task; omitted fields take the task's registered defaults."""

    gpus: Annotated[int, Field(ge=0, le=64)] | None = Field(None, description="Number of GPUs, all on one host.")
    gpu_memory_mb: Memory | None = Field(None, description="GPU memory per GPU; omit for whole GPUs.")
    gpu_model: GpuModels | None = Field(None, description=f"Allowed GPU models (at most {MAX_GPU_MODELS}).")
    cpu_cores: Cpu | None = Field(None, description="CPU cores.")
    ram_mb: Memory | None = Field(None, description="RAM.")


class SubmitTaskParams(_Params):
    """Queue a registered task to run on a worker of the host it is placed on."""

    task: Annotated[str, Field(min_length=1, max_length=64)] = Field(description="Name of a registered task.")
    args: list[Any] | None = Field(None, description="Positional arguments (a JSON array).")
    kwargs: dict[str, Any] | None = Field(None, description="Keyword arguments (a JSON object).")
    resources: TaskResources | None = Field(None, description="Resources; the task's registered defaults when omitted.")
    priority: PriorityValue | None = Field(None, description="low, normal (default), high, critical.")
    strategy: StrategyName | None = Field(None, description="Placement strategy (default best_fit).")
    task_id: Annotated[str, Field(pattern=JOB_ID_PATTERN.pattern)] | None = Field(
        None, description="Task id (default: generated): letters, digits, _ and -, as RQ takes. Submitting the same id again changes nothing.")
    task_type: Text | None = Field(None, description="Task type (default: the task's registered type).")
    owner: Text | None = Field(None, description="Who the task is for (usage accounting).")
    expected_duration: Seconds | None = Field(None, description="Expected run time in seconds (backfill and ETA).")
    job_timeout: Annotated[int, Field(ge=1, le=604_800)] | None = Field(None, description="Seconds before the running task is stopped.")


class TaskIdParams(_Params):
    task_id: Id = Field(description="Task (allocation) id.")


class QueueParams(_Params):
    """Pending tasks in the order they will start."""

    limit: Annotated[int, Field(ge=1, le=1000)] | None = Field(None, description="Most tasks to return (default 50).")


class Envelope(_Params):
    """One request to ``allocator tool``: which tool, and its parameters."""

    tool: str = Field(description="Tool name.")
    params: dict[str, Any] = Field(default_factory=dict, description="The tool's parameters.")
