"""Request and result models (pydantic) shared by every entry point.

Request fields follow the seed tool (``gpus``, ``gpu_memory_mb``, ``cpu_cores``, ``ram_mb``);
memory fields also take unit strings. Invalid values raise ``InvalidRequest`` naming the field
(see ``parse``), never a bare pydantic error.
"""

from __future__ import annotations

import enum
import json
import math
import re
import unicodedata
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import from_json

from .errors import InvalidRequest
from .units import parse_cpu_millis, parse_memory_mb

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
ID_RULE = "1-128 characters: letters, digits and . _ : @ / -, starting with a letter or digit"
# A function task's id is also its RQ job's, and RQ takes fewer characters.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
JOB_ID_RULE = "1-128 characters: letters, digits, _ and -, starting with a letter or digit (an RQ job id)"
MAX_SECONDS = 10 * 365 * 86400  # the longest TTL or duration a request may give (ten years)
#: The states an allocation's record can be in.
ALLOCATION_STATES = ("pending", "active", "released", "failed", "cancelled")
#: The states an allocation does not leave: its id is spent.
ENDED_STATES = frozenset({"released", "failed", "cancelled"})
#: The metadata key under which the seed APIs (allocator.seeds) keep their own record of an
#: allocation (which API made it, workers, MCP server names, the original limit strings). They
#: read it back as theirs, so no request may bring it.
SEED_KEY = "_seed"


class Priority(enum.IntEnum):
    """Task priority; ``critical`` may use a reserve kept back from the others."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: object, field: str = "priority") -> Priority:
        if isinstance(value, Priority):
            return value
        if isinstance(value, bool):
            raise InvalidRequest(field, f"expected low/normal/high/critical or 0..3, got {value!r}")
        if (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                or (isinstance(value, str) and value.strip().isascii() and value.strip().isdigit())):
            n = int(value)
            if 0 <= n <= 3:
                return cls(n)
            raise InvalidRequest(field, f"must be between 0 (low) and 3 (critical), got {n}")
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        raise InvalidRequest(field, f"expected low/normal/high/critical or 0..3, got {value!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


class Strategy(str, enum.Enum):
    """Placement strategy. ``priority`` places like best_fit (preemption comes with the queue)."""

    FIRST_FIT = "first_fit"
    BEST_FIT = "best_fit"
    WORST_FIT = "worst_fit"
    PRIORITY = "priority"

    @classmethod
    def parse(cls, value: object, field: str = "strategy") -> Strategy:
        if isinstance(value, Strategy):
            return value
        if isinstance(value, str):
            v = value.strip().lower().replace("-", "_")
            if v == "spread":
                return cls.WORST_FIT
            for s in cls:
                if s.value == v:
                    return s
        raise InvalidRequest(field, f"expected one of first_fit, best_fit, worst_fit (spread), priority; got {value!r}")

    @property
    def scan_mode(self) -> str:
        """The index walk the place script uses for this strategy."""
        return {"first_fit": "first", "worst_fit": "worst"}.get(self.value, "best")


def check_printable(value: object, field: str) -> object:
    """Refuses control characters (ESC, BEL, newline, DEL, C1) in text the command line and
    ``allocator top`` print as given: ids, task types, owners, labels, GPU models. Received
    from the API or the tool, they would move the cursor, clear or retitle an operator's
    terminal."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if unicodedata.category(ch) == "Cc":
                raise InvalidRequest(field, f"contains a control character ({ch!r} at position {i})")
    return value


def shown(text: object) -> str:
    """``text`` for a terminal: control characters written as escapes (``\x1b``). For text read
    back from records an earlier release accepted, which ``check_printable`` would refuse now."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) == "Cc" else ch for ch in str(text))


#: Largest request metadata, as compact JSON: labels and notes, not a store for payloads.
MAX_METADATA_BYTES = 64 * 1024


def short_repr(value: object, limit: int = 64) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: a refused value
    may be megabytes of text."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 4] + "..."


#: A GPU's uuid: NVML's ("GPU-5f2c...", "MIG-GPU-.../1/0", "MIG-5f2c...") or an inventory's own
#: (the default "<host>-gpu<index>", hence "@" and 256 characters). Jobs get their GPUs as
#: CUDA_VISIBLE_DEVICES=<uuid>,<uuid>: a comma (or a blank) in one would name other devices.
GPU_UUID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}$")
GPU_UUID_RULE = "1-256 characters: letters, digits and . _ : @ / -, starting with a letter or digit"


def check_gpu_uuid(value: object, field: str = "uuid") -> object:
    """A GPU uuid (``GPU_UUID_PATTERN``) or None, else InvalidRequest naming ``field``."""
    if value is not None and (not isinstance(value, str) or not GPU_UUID_PATTERN.fullmatch(value)):
        raise InvalidRequest(field, f"{short_repr(value)} is not a GPU uuid ({GPU_UUID_RULE})")
    return value


def check_id_format(value: object, field: str) -> str:
    """An id as hosts and allocations take it (``ID_RULE``), or InvalidRequest naming ``field``."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidRequest(field, f"{value!r} is not a valid id ({ID_RULE})")
    return value


#: Most labels one selector may name, and values one label may offer; most GPU models one request
#: may allow. The ledger's Lua scripts unpack these lists, and Lua 5.1 unpacks at most about 8,000 values.
MAX_SELECTOR_LABELS = 64
MAX_SELECTOR_VALUES = 256
MAX_GPU_MODELS = 256


def parse_selector(value: object, field: str = "selector") -> dict[str, list[str]] | None:
    """Label selector: {"cluster": "a"}, {"cluster": ["a", "b"]} or "cluster=a|b,zone=z1".

    At most ``MAX_SELECTOR_LABELS`` labels, each with at most ``MAX_SELECTOR_VALUES`` values."""
    if value is None or value == {} or value == "":
        return None
    if isinstance(value, str):
        out: dict[str, list[str]] = {}
        for part in value.split(","):
            if "=" not in part:
                raise InvalidRequest(field, f"{short_repr(part)} is not label=value (alternatives with |)")
            k, v = part.split("=", 1)
            if k.strip() in out:
                # "a=x,a=y" reads as x and y at once in Kubernetes, as x or y to others: neither is taken.
                raise InvalidRequest(field, f"label {short_repr(k.strip())} is given twice; give its alternatives once, as {k.strip()}=x|y")
            out[k.strip()] = [x.strip() for x in v.split("|") if x.strip()]
        value = out
    if not isinstance(value, dict):
        raise InvalidRequest(field, f"expected a mapping of label to value(s), got {type(value).__name__}")
    if len(value) > MAX_SELECTOR_LABELS:
        raise InvalidRequest(field, f"at most {MAX_SELECTOR_LABELS} labels, got {len(value)}")
    sel: dict[str, list[str]] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise InvalidRequest(field, f"label names must be non-empty strings without '=', got {short_repr(k)}")
        vals = [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v
        if not isinstance(vals, list) or not vals or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in vals):
            raise InvalidRequest(f"{field}.{k}", f"expected a value or a non-empty list of values, got {short_repr(v)}")
        if len(vals) > MAX_SELECTOR_VALUES:
            raise InvalidRequest(f"{field}.{k}", f"at most {MAX_SELECTOR_VALUES} values, got {len(vals)}")
        sel[k] = [str(x) for x in vals]
    return sel


SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_service_names(value: object, field: str = "services") -> list[str] | None:
    """Service names as a list (duplicates dropped, order kept); None/[] = no services.

    Names only: what runs for a name comes from the operator's catalog on the host, never from
    the request."""
    if value is None or value == [] or value == ():
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidRequest(field, f"expected a list of service names, got {short_repr(value)}")
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or not SERVICE_NAME.fullmatch(v):
            raise InvalidRequest(field, f"{short_repr(v)} is not a service name (1-64 letters, digits, . _ -, starting with a letter or digit)")
        if v not in out:
            out.append(v)
    if len(out) > 64:
        raise InvalidRequest(field, f"at most 64 services per request, got {len(out)}")
    return out


M = TypeVar("M", bound=BaseModel)


def given_fields(data: object) -> object:
    """A model instance as the fields to build it again from, for validating it again; anything
    else as it is. pydantic checks a model when it is built, not what is assigned to it since
    (``r.ram_mb = -4096``) nor what is changed inside its lists and mappings.

    A field is given when it was set (built with it, or assigned since) or no longer holds its
    default (a label added to the default ``labels``); the others are left out, so that what
    depends on a field being left out stays so (``gpus`` left out with ``gpu_memory_mb``: one GPU).
    Models inside are given the same way; other values are passed as they are."""
    if not isinstance(data, BaseModel):
        return data
    out: dict[str, object] = {}
    for name, info in type(data).model_fields.items():
        value = getattr(data, name)
        if name in data.model_fields_set or value != info.get_default(call_default_factory=True):
            if isinstance(value, list) and any(isinstance(x, BaseModel) for x in value):
                value = [given_fields(x) for x in value]
            out[name] = given_fields(value)
    return out


def parse(model: type[M], data: object, prefix: str = "") -> M:
    """Validates ``data`` into ``model``; the first problem becomes an ``InvalidRequest``. An
    instance of ``model`` is validated again (``given_fields``) into a new one."""
    if isinstance(data, model):
        data = given_fields(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):
            # A validator named the field itself; nest it under where pydantic found the error.
            if loc and (cause.field == loc[-1] or cause.field.startswith(loc[-1] + ".")):
                loc = loc[:-1]
            raise InvalidRequest(prefix + ".".join([*loc, cause.field]), cause.reason) from None
        field = prefix + ".".join(loc) if loc else (prefix.rstrip(".") or model.__name__)
        reason = err["msg"]
        if err["type"] == "extra_forbidden":
            reason = "unknown field"
        elif err["type"] == "missing":
            reason = "required field is missing"
        elif err["type"] == "value_error" and cause is not None:
            reason = str(cause)  # the validator's own words, without pydantic's "Value error, "
        raise InvalidRequest(field, reason) from None


def _whole(v: object, field: str) -> object:
    """A whole number as an inventory gives it: True, 9000.7 or inf would pass pydantic's lax int
    as 1, an error text or an overflow; numeric strings are left to pydantic."""
    if isinstance(v, bool):
        raise InvalidRequest(field, f"expected a whole number, got {v!r}")
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        raise InvalidRequest(field, f"expected a whole number, got {v!r}")
    return v


#: Most worker slots a host may offer (far below the 1e14 the scripts keep exactly).
MAX_WORKER_SLOTS = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Strict):
    """What one task needs on one host.

    ``gpus`` GPUs each with ``gpu_memory_mb`` MiB free (a GPU may be shared by memory), or whole
    GPUs when ``gpu_memory_mb`` is omitted. Integer ``cpu_cores`` are pinned exclusive cores;
    fractional ones come from the host's shared pool (Kubernetes' static CPU manager policy).
    """

    gpus: int = Field(0, ge=0, le=64, description="Number of GPUs, all on one host.")
    gpu_memory_mb: int | None = Field(None, description="MiB per GPU (number or '20Gi'); omit for whole GPUs.")
    gpu_model: list[str] | None = Field(None, description="Allowed GPU models, e.g. 'V100M16|V100M32' (at most 256).")
    cpu_cores: float = Field(1.0, description="Cores: integers are exclusive core ids, fractions shared (e.g. 0.5 or '500m').")
    ram_mb: int = Field(0, description="RAM in MiB (number or '32Gi').")
    workers: int = Field(0, ge=0, le=100_000, description="Worker slots of the host (counted apart from CPU and RAM).")

    @field_validator("gpus", "workers", mode="before")
    @classmethod
    def _whole(cls, v: object, info: Any) -> object:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise InvalidRequest(info.field_name, f"must be a whole number, got {v!r}")
        if isinstance(v, float):
            return int(v)
        return v

    @field_validator("gpu_memory_mb", mode="before")
    @classmethod
    def _gpu_mem(cls, v: object) -> object:
        return None if v is None else parse_memory_mb(v, "gpu_memory_mb")

    @field_validator("ram_mb", mode="before")
    @classmethod
    def _ram(cls, v: object) -> object:
        return parse_memory_mb(v, "ram_mb")

    @field_validator("cpu_cores", mode="before")
    @classmethod
    def _cpu(cls, v: object) -> object:
        return parse_cpu_millis(v, "cpu_cores") / 1000

    @field_validator("gpu_model", mode="before")
    @classmethod
    def _models(cls, v: object) -> object:
        if v is None or v == "":
            return None
        items = v.split("|") if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(x, str) and x.strip() for x in items):
            raise InvalidRequest("gpu_model", f"expected a model name, 'A|B', or a list of names, got {short_repr(v)}")
        if len(items) > MAX_GPU_MODELS:
            raise InvalidRequest("gpu_model", f"at most {MAX_GPU_MODELS} GPU models, got {len(items)}")
        return [x.strip() for x in items]

    @model_validator(mode="after")
    def _coherent(self) -> Resources:
        if self.gpu_memory_mb == 0:
            if self.gpus > 0:
                raise InvalidRequest("gpu_memory_mb", "must be positive; omit it to ask for whole GPUs")
            self.gpu_memory_mb = None
        elif self.gpu_memory_mb is not None and self.gpus == 0:
            if "gpus" in self.model_fields_set:
                raise InvalidRequest("gpus", "0 GPUs with gpu_memory_mb given; ask for 1 or more, or leave gpus out")
            self.gpus = 1
        if self.gpu_model and self.gpus == 0:
            raise InvalidRequest("gpu_model", "a GPU model was given but no GPUs were requested")
        return self

    @property
    def cpu_millis(self) -> int:
        return round(self.cpu_cores * 1000)

    @property
    def exclusive_cores(self) -> bool:
        """Whole numbers of cores are pinned to exclusive core ids."""
        return self.cpu_millis % 1000 == 0


class AllocationRequest(_Strict):
    """A complete allocation request: resources plus scheduling and bookkeeping fields."""

    resources: Resources
    priority: Priority = Priority.NORMAL
    strategy: Strategy = Strategy.BEST_FIT
    ttl_seconds: float | None = Field(3600, description="Lease length; None = no expiry.")
    expected_duration: float | None = Field(None, description="Expected run time in seconds (backfill and ETA).")
    selector: dict[str, list[str]] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    task_id: str | None = None
    task_type: str | None = None
    owner: str | None = None
    allocation_id: str | None = None
    services: list[str] | None = Field(None, description="Shared named services (catalog names) to start or reuse on the host.")

    @field_validator("services", mode="before")
    @classmethod
    def _services(cls, v: object) -> object:
        return parse_service_names(v)

    @field_validator("task_id", "task_type", "owner", mode="before")
    @classmethod
    def _printable(cls, v: object, info: Any) -> object:
        return check_printable(v, info.field_name)

    @field_validator("priority", mode="before")
    @classmethod
    def _prio(cls, v: object) -> object:
        return Priority.parse(v)

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, v: object) -> object:
        return Strategy.parse(v if v is not None else "best_fit")

    @field_validator("selector", mode="before")
    @classmethod
    def _selector(cls, v: object) -> object:
        return parse_selector(v)

    @field_validator("ttl_seconds", mode="before")
    @classmethod
    def _ttl(cls, v: object) -> object:
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v <= 0:
            raise InvalidRequest("ttl_seconds", f"must be a positive number of seconds (or null for none), got {v!r}")
        if v > MAX_SECONDS:
            raise InvalidRequest("ttl_seconds", f"at most {MAX_SECONDS} seconds (ten years; null for no expiry), got {v!r}")
        return v

    @field_validator("expected_duration", mode="before")
    @classmethod
    def _expected(cls, v: object) -> object:
        if v is None:
            return None
        if hasattr(v, "total_seconds"):
            v = v.total_seconds()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v <= 0:
            raise InvalidRequest("expected_duration", f"must be a positive number of seconds, got {v!r}")
        if v > MAX_SECONDS:
            raise InvalidRequest("expected_duration", f"at most {MAX_SECONDS} seconds (ten years), got {v!r}")
        return v

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, v: object) -> object:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise InvalidRequest("metadata", f"expected a JSON object, got {type(v).__name__}")
        if SEED_KEY in v:
            raise InvalidRequest(f"metadata.{SEED_KEY}", "is reserved for the seed APIs' own record of an allocation")
        try:
            size = len(json.dumps(v, allow_nan=False, separators=(",", ":")).encode())
        except (TypeError, ValueError) as exc:
            raise InvalidRequest("metadata", f"must be JSON-serialisable: {exc}") from None
        if size > MAX_METADATA_BYTES:
            # It is kept in the record twice (metadata and request), in an outbox event and the history.
            raise InvalidRequest("metadata", f"{size} bytes as JSON, more than the {MAX_METADATA_BYTES} a request may carry")
        return v

    @field_validator("task_id", "task_type", "owner", mode="before")
    @classmethod
    def _text(cls, v: object, info: Any) -> object:
        if v is None:
            return None
        if not isinstance(v, (str, int)) or isinstance(v, bool) or len(str(v)) > 256 or not str(v).strip():
            raise InvalidRequest(info.field_name, f"expected a non-empty string of at most 256 characters, got {v!r}")
        return str(v)

    @field_validator("allocation_id", mode="before")
    @classmethod
    def _alloc_id(cls, v: object) -> object:
        return None if v is None else check_id_format(v, "allocation_id")


class GpuSpec(_Strict):
    """One GPU of a host as the inventory reports it."""

    index: int = Field(ge=0)
    uuid: str | None = Field(None, description=f"{GPU_UUID_RULE}; default '<host>-gpu<index>'.")
    model: str = "GPU"
    memory_mb: int = Field(description="Total memory in MiB (number or '16Gi').")
    used_mb: int = Field(0, description="Memory used by processes the allocator does not manage.")

    @field_validator("memory_mb", "used_mb", mode="before")
    @classmethod
    def _mem(cls, v: object, info: Any) -> object:
        return parse_memory_mb(v, info.field_name)

    @field_validator("uuid", mode="before")
    @classmethod
    def _uuid(cls, v: object) -> object:
        return check_gpu_uuid(v)

    @field_validator("model", mode="before")
    @classmethod
    def _printable(cls, v: object) -> object:
        return check_printable(v, "model")

    @field_validator("index", mode="before")
    @classmethod
    def _index(cls, v: object) -> object:
        return _whole(v, "index")

    @model_validator(mode="after")
    def _positive(self) -> GpuSpec:
        if self.memory_mb <= 0:
            raise InvalidRequest("memory_mb", "a GPU must have some memory")
        return self


#: Highest core id (and GPU index) a host may declare (Linux supports at most a few thousand CPUs).
MAX_CORE_ID = 1 << 20


class HostSpec(_Strict):
    """A host's inventory: what ``register_host`` records (and updates on re-registration).
    Its bounds hold wherever one is built (the API, an agent's static inventory file): numbers
    the ledger scripts keep exactly (far below 1e14), and an inventory that adds up."""

    id: str
    labels: dict[str, str] = Field(default_factory=dict)
    cpu_cores: list[int] = Field(default_factory=list, description="Core ids the allocator may grant (an int n means 0..n-1).")
    ram_mb: int = 0
    gpus: list[GpuSpec] = Field(default_factory=list)
    reserve_gpus: int = Field(0, ge=0, description="Whole GPUs kept idle for critical-priority work only.")
    worker_slots: int | None = Field(None, ge=0, le=MAX_WORKER_SLOTS, description="Worker slots offered; None = one per core.")
    service_ports: tuple[int, int] = Field((9000, 9099), description="Port pool (first, last) for shared services.")

    @field_validator("service_ports", mode="before")
    @classmethod
    def _ports(cls, v: object) -> object:
        if isinstance(v, str) and "-" in v:
            lo, _, hi = v.partition("-")
            v = (lo.strip(), hi.strip())
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise InvalidRequest("service_ports", f"expected 'first-last' or [first, last], got {v!r}")
        try:
            lo, hi = (int(_whole(x, "service_ports")) for x in v)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise InvalidRequest("service_ports", f"expected two port numbers, got {v!r}") from None
        if not 1 <= lo <= hi <= 65535:
            raise InvalidRequest("service_ports", f"need 1 <= first <= last <= 65535, got {lo}-{hi}")
        return (lo, hi)

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, v: object) -> object:
        return check_id_format(v, "id")

    @field_validator("cpu_cores", mode="before")
    @classmethod
    def _cores(cls, v: object) -> object:
        # A count written 4.0 or "4" (a JSON float, a quoted YAML value) is the count 4.
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        elif isinstance(v, str) and re.fullmatch(r"\s*[0-9]+\s*", v):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 0:
                raise InvalidRequest("cpu_cores", f"must not be negative, got {v}")
            if v > MAX_CORE_ID:  # before the list of ids is built: a huge count would exhaust memory
                raise InvalidRequest("cpu_cores", f"at most {MAX_CORE_ID} cores, got {v}")
            return list(range(v))
        if not isinstance(v, (list, tuple)):
            _whole(v, "cpu_cores")
            raise InvalidRequest("cpu_cores", f"expected a number of cores n (ids 0..n-1) or a list of core ids, got {short_repr(v)}")
        for c in v:
            _whole(c, "cpu_cores")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> HostSpec:
        from .keys import MAX_GPUS_PER_HOST

        if len(self.gpus) > MAX_GPUS_PER_HOST:
            raise InvalidRequest("gpus", f"at most {MAX_GPUS_PER_HOST} GPUs per host, got {len(self.gpus)}")
        if self.reserve_gpus > len(self.gpus):
            raise InvalidRequest("reserve_gpus", f"{self.reserve_gpus} reserved but the host has {len(self.gpus)} GPU(s)")
        for c in self.cpu_cores:  # after parsing: ids given as text or floats are ints now
            if not 0 <= c < MAX_CORE_ID:
                raise InvalidRequest("cpu_cores", f"core ids must be between 0 and {MAX_CORE_ID - 1}, got {c}")
        for i, g in enumerate(self.gpus):
            if g.index >= MAX_CORE_ID:
                raise InvalidRequest(f"gpus.{i}.index", f"must be below {MAX_CORE_ID}, got {g.index}")
            if g.used_mb > g.memory_mb:
                raise InvalidRequest(f"gpus.{i}.used_mb", f"{g.used_mb} MiB in use is more than the GPU's {g.memory_mb} MiB")
        return self

    @field_validator("reserve_gpus", "worker_slots", mode="before")
    @classmethod
    def _counts(cls, v: object, info: Any) -> object:
        return _whole(v, info.field_name)

    @field_validator("ram_mb", mode="before")
    @classmethod
    def _ram(cls, v: object) -> object:
        return parse_memory_mb(v, "ram_mb")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: object) -> object:
        if v is None:
            return {}
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    raise InvalidRequest("labels", f"label names must be strings, got {k!r}")
                check_printable(k, "labels")
                if not k or "=" in k:
                    # A selector names a label as name=value: a name with "=" could not be told apart
                    # (Kubernetes refuses it too), nor could the set of the hosts with the label.
                    raise InvalidRequest("labels", f"label names must be non-empty and without '=', got {short_repr(k)}")
                check_printable(x, f"labels.{k}")
                # Text, or a number written as text; a list, None or a mapping has no label form.
                if isinstance(x, bool) or not isinstance(x, (str, int, float)) or (isinstance(x, float) and not math.isfinite(x)):
                    raise InvalidRequest(f"labels.{k}", f"expected text or a number, got {x!r}")
                out[k] = str(x)
            return out
        return v

    @model_validator(mode="after")
    def _coherent(self) -> HostSpec:
        if len(set(self.cpu_cores)) != len(self.cpu_cores) or any(c < 0 for c in self.cpu_cores):
            raise InvalidRequest("cpu_cores", "core ids must be distinct non-negative integers")
        self.labels.setdefault("cluster", "default")
        indexes = [g.index for g in self.gpus]
        if len(set(indexes)) != len(indexes):
            raise InvalidRequest("gpus", "GPU indexes must be distinct")
        for g in self.gpus:
            if g.uuid is None:
                g.uuid = f"{self.id}-gpu{g.index}"
        if len({g.uuid for g in self.gpus}) != len(self.gpus):
            raise InvalidRequest("gpus", "GPU uuids must be distinct")
        self.gpus.sort(key=lambda g: g.index)
        if self.worker_slots is None:
            self.worker_slots = len(self.cpu_cores)
        return self


def _ts(ms: str | int | None) -> datetime | None:
    if ms in (None, "", "0", 0):
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc)


def _json_of(text: str | None, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """A stored JSON list or object; empty when absent or of another kind. cjson encodes an empty
    Lua table as {}, which reads as an empty list too."""
    if not text or text == "{}":
        return kind()
    v = from_json(text)
    return v if isinstance(v, kind) else kind()


def _json_list(text: str | None) -> list[Any]:
    return _json_of(text, list)


class GpuGrant(BaseModel):
    index: int
    uuid: str
    model: str
    memory_mb: int


class Allocation(BaseModel):
    """One allocation as the ledger holds it."""

    allocation_id: str
    state: str = Field(description="pending, active, released, failed or cancelled.")
    host_id: str | None = Field(None, description="None while pending.")
    gpus: list[GpuGrant]
    cpu_cores: list[int] = Field(description="Exclusive core ids granted.")
    cpu_shared: float = Field(description="Cores from the shared pool (fractional requests).")
    ram_mb: int
    priority: str
    strategy: str | None = None
    task_id: str | None = None
    task_type: str | None = None
    owner: str | None = None
    created_at: datetime
    activated_at: datetime | None = None
    released_at: datetime | None = None
    expires_at: datetime | None = None
    ttl_seconds: float | None = None
    release_reason: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    request: dict[str, Any] = Field(default_factory=dict)
    allocation_time_ms: float | None = None
    released_now: bool | None = Field(None, description="Set by release and cancel: whether that call ended it.")
    kind: str = Field("lease", description="lease (direct allocation) or job (function task).")
    queue_position: int | None = Field(None, description="Place in line while pending (1 = next); 0 once placed; null for a request that left the line unplaced (cancelled).")
    requeues: int = 0
    not_before: datetime | None = Field(
        None, description="While pending: the earliest it may start (a retry's interval, as RQ's Retry(interval=...) asks).")
    workers: int = Field(0, description="Worker slots held.")
    services: list[str] = Field(default_factory=list, description="Shared named services held (one reference each).")
    error: str | None = Field(None, description="Why a failed allocation failed (e.g. a service did not start).")

    @property
    def ended(self) -> bool:
        """Released, failed or cancelled: a request naming its id again is not placed again."""
        return self.state in ENDED_STATES

    @property
    def gpu_memory_mb(self) -> int:
        return sum(g.memory_mb for g in self.gpus)

    @property
    def cpu_total(self) -> float:
        return len(self.cpu_cores) + self.cpu_shared

    @classmethod
    def from_record(cls, rec: dict[str, str]) -> Allocation:
        """Builds the model from the flat string record a script returns or HGETALL reads.

        Every field is converted here and then validated by pydantic's core in one pass, which
        costs less than ``model_construct`` (a Python loop over the fields): this runs on every
        allocate and release.
        """
        ttl_ms = int(rec.get("ttl_ms") or 0)
        state = rec["state"]
        priority = rec.get("priority") or "1"
        return cls.model_validate({
            "allocation_id": rec["id"],
            "state": state,
            "host_id": rec.get("host") or None,
            "gpus": _json_list(rec.get("gpus")),  # GpuGrant ignores the extra "pos"
            "cpu_cores": _json_list(rec.get("cores")),
            "cpu_shared": int(rec.get("shared_millis") or 0) / 1000,
            "ram_mb": int(rec.get("ram_mb") or 0),
            "priority": _PRIORITY_LABELS.get(priority) or Priority(int(priority)).label,
            "strategy": rec.get("strategy"),
            "task_id": rec.get("task_id") or None,
            "task_type": rec.get("task_type") or None,
            "owner": rec.get("owner") or None,
            "created_at": _ts(rec["created"]),
            "activated_at": _ts(rec.get("activated")),
            "released_at": _ts(rec.get("released")),
            "expires_at": _ts(rec.get("expires")),
            "ttl_seconds": ttl_ms / 1000 if ttl_ms else None,
            "release_reason": rec.get("reason") or None,
            "metadata": _json_of(rec.get("metadata"), dict),
            "request": _json_of(rec.get("request"), dict),
            "kind": rec.get("kind") or "lease",
            # 0 once placed; None while pending (Allocator.get and list fill the place in line)
            # and for a request that left the line unplaced (cancelled), which has no place.
            "queue_position": 0 if state != "pending" and rec.get("activated") else None,
            "requeues": int(rec.get("requeues") or 0),
            "not_before": _ts(rec.get("not_before")) if state == "pending" else None,
            "workers": int(rec.get("slots") or 0),
            "services": _json_list(rec.get("services")),
            "error": rec.get("error") or None,
        })


#: Priority labels by their number as the ledger stores it ("0".."3").
_PRIORITY_LABELS = {str(p.value): p.label for p in Priority}


class Usage(BaseModel):
    """Totals of one resource: ``total = allocated + available + unmanaged + unschedulable``,
    except on a host whose re-registration left its grants above its totals (``overcommitted``),
    where allocated and unmanaged may together exceed the total."""

    total: float
    allocated: float
    available: float
    unmanaged: float = Field(0, description="Held by processes the allocator does not manage.")
    unschedulable: float = Field(0, description="Free, but on hosts that take no new work (draining, lost, "
                                                "or parked: no free core or no free RAM); fleet totals only.")
    utilization_pct: float = Field(description="In use (allocated and unmanaged) as a share of the total.")

    @classmethod
    def of(cls, total: float, allocated: float, available: float, unschedulable: float = 0.0,
           unmanaged: float | None = None) -> Usage:
        """``unmanaged`` given (GPU memory: what other processes use), or what the other figures
        leave of the total. Given, it stays right on a host whose re-registration left its grants
        above its totals, where the remainder is nothing."""
        if unmanaged is None:
            unmanaged = max(0.0, total - allocated - available - unschedulable)
        pct = 100.0 * (total - available - unschedulable) / total if total else 0.0
        return cls(total=total, allocated=allocated, available=available, unmanaged=unmanaged,
                   unschedulable=unschedulable, utilization_pct=round(pct, 2))


class GpuCapacity(BaseModel):
    index: int
    uuid: str
    model: str
    memory: Usage
    holders: int


class HostCapacity(BaseModel):
    host_id: str
    state: str
    labels: dict[str, str]
    gpus: list[GpuCapacity]
    gpu_memory_mb: Usage
    gpus_idle: int = Field(description="GPUs with no holder and some memory free: what a critical whole-GPU "
                                       "request can take; other priorities can take all but reserve_gpus of them.")
    cpu_cores: Usage
    ram_mb: Usage
    active_allocations: int
    worker_slots: Usage = Field(default_factory=lambda: Usage.of(0, 0, 0))
    reserve_gpus: int = Field(0, description="Idle GPUs kept for critical-priority work only.")
    parked: bool = Field(False, description="Ready, but with no free core or no free RAM: it takes no new work, "
                                            "GPU work included, until something is released; what it has free "
                                            "counts as unschedulable in the fleet figures.")
    overcommitted: bool = Field(False, description="Its last registration left its grants above its totals "
                                                   "(fewer cores, less memory, a held GPU gone): legal, until "
                                                   "releases and a later registration bring them within it.")

    @property
    def takes_new_work(self) -> bool:
        return self.state == "ready" and not self.parked


class Capacity(BaseModel):
    """Fleet figures plus one entry per host."""

    hosts: list[HostCapacity]
    host_count: int
    gpu_count: int
    gpus_idle: int
    gpu_memory_mb: Usage
    cpu_cores: Usage
    ram_mb: Usage
    active_allocations: int
    worker_slots: Usage = Field(default_factory=lambda: Usage.of(0, 0, 0))
