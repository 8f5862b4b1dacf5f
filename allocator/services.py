"""Shared named services ("MCP servers"): the operator's catalog and the ledger's view of them.

A request may name services (``Allocator.allocate(..., services=["filesystem"])``,
``AllocationManager.request_resources(mcp_servers=[...])``). The placement takes one reference
to each on the chosen host, atomically with the rest of the grant (``includes/placement.lua``):
a service already running there is shared; a new one gets the lowest free port of the host's pool
(default 9000-9099) and state ``starting``. The agent on that host (``allocator/agent/services.py``)
starts the catalog's command on that port, health-checks it and marks it ``running`` with its
endpoint, or ``failed`` (the allocations holding it fail and free what they hold). When the last
reference is dropped the agent stops it after the catalog's idle timeout and the port is free again.

The catalog maps a name to a command; it lives on the host (a YAML/JSON file given to the agent,
``--services`` / ``ALLOCATOR_SERVICES``). Only names and timeouts are published to the ledger:
nothing a request sends chooses what runs. This module holds the catalog model and loader and
the client-side reads (instances, endpoints of an allocation, waiting for them).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import AllocationNotFound, AllocatorError, InvalidRequest
from .models import MAX_SECONDS, SERVICE_NAME, Allocation, parse

if TYPE_CHECKING:
    from .client import Allocator

#: Placeholders a catalog command, health check or endpoint may use.
PLACEHOLDERS = ("{port}", "{host}", "{name}")
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_START_TIMEOUT_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 5.0


class ServiceFailed(AllocatorError):
    """A service an allocation holds did not start; the allocation was failed and freed."""

    code = "SERVICE_FAILED"
    default_message = "a service failed to start"


class ServiceSpec(BaseModel):
    """One catalog entry: how the agent runs a named service.

    ``command``: argv list, or a string split like a shell would (no shell runs it); ``{port}``,
    ``{host}`` (the agent's advertised address) and ``{name}`` are replaced in every argument.
    ``health``: ``tcp`` (connect to 127.0.0.1:port, the default), ``tcp://HOST:PORT`` or an
    ``http(s)://`` URL that must answer below 500. ``endpoint``: what clients get
    (default ``http://{host}:{port}``).
    """

    # Timeouts are finite: the ledger stores them as JSON, which has no infinity. At most ten
    # years, as a request's TTL: "never" written as 1e306 overflowed the supervisor's milliseconds.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    command: list[str]
    health: str = "tcp"
    endpoint: str = "http://{host}:{port}"
    idle_timeout_s: float = Field(DEFAULT_IDLE_TIMEOUT_S, ge=0, le=MAX_SECONDS)
    start_timeout_s: float = Field(DEFAULT_START_TIMEOUT_S, gt=0, le=MAX_SECONDS)
    stop_timeout_s: float = Field(DEFAULT_STOP_TIMEOUT_S, gt=0, le=MAX_SECONDS)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SERVICE_NAME.fullmatch(v):
            raise InvalidRequest("name", f"{v!r} is not a service name (1-64 letters, digits, . _ -)")
        return v

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: object) -> object:
        if isinstance(v, str):
            v = shlex.split(v)
        if not isinstance(v, list) or not v or not all(isinstance(x, (str, int)) for x in v):
            raise InvalidRequest("command", f"expected a command line or a non-empty list of arguments, got {v!r}")
        return [str(x) for x in v]

    @field_validator("health")
    @classmethod
    def _health(cls, v: str) -> str:
        if v != "tcp" and not v.startswith(("tcp://", "http://", "https://")):
            raise InvalidRequest("health", f"expected 'tcp', 'tcp://host:port' or an http(s) URL, got {v!r}")
        if v.startswith("tcp://"):
            try:
                # {port} stands for the service's port: any number parses the same way.
                urlsplit(v.replace("{port}", "1").replace("{host}", "localhost").replace("{name}", "x")).port
            except ValueError:
                raise InvalidRequest("health", f"expected tcp://host:port, got {v!r}") from None
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: object) -> object:
        if v is None:
            return {}
        if isinstance(v, Mapping):
            return {str(k): str(x) for k, x in v.items()}
        return v

    def render(self, text: str, port: int, host: str) -> str:
        return text.replace("{port}", str(port)).replace("{host}", host).replace("{name}", self.name)

    def argv(self, port: int, host: str) -> list[str]:
        return [self.render(a, port, host) for a in self.command]

    def public(self) -> dict[str, Any]:
        """What the ledger learns about the entry (never the command or its environment)."""
        return {"idle_timeout_s": self.idle_timeout_s, "start_timeout_s": self.start_timeout_s}


class ServiceCatalog:
    """The named services a host can run (name -> ``ServiceSpec``), from a file or a mapping.

    File (YAML or JSON)::

        services:                      # or the file is just this mapping
          filesystem:
            command: python -m http.server {port} --bind 127.0.0.1
            health: http://127.0.0.1:{port}/
            idle_timeout_s: 300
          github: {command: [my-mcp-github, --port, "{port}"], env: {GITHUB_TOKEN: ...}}
    """

    def __init__(self, specs: Mapping[str, ServiceSpec] | None = None) -> None:
        self.specs: dict[str, ServiceSpec] = dict(specs or {})

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    def get(self, name: str) -> ServiceSpec | None:
        return self.specs.get(name)

    def names(self) -> list[str]:
        return sorted(self.specs)

    def public(self) -> dict[str, dict[str, Any]]:
        return {n: s.public() for n, s in self.specs.items()}

    @classmethod
    def from_mapping(cls, data: object, source: str = "services") -> ServiceCatalog:
        if isinstance(data, Mapping) and set(data) == {"services"}:
            data = data["services"]
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise InvalidRequest(source, f"expected a mapping of service name to its entry, got {type(data).__name__}")
        specs: dict[str, ServiceSpec] = {}
        for name, entry in data.items():
            if isinstance(entry, ServiceSpec):
                specs[str(name)] = entry
                continue
            if isinstance(entry, (str, list)):
                entry = {"command": entry}
            if not isinstance(entry, Mapping):
                raise InvalidRequest(f"{source}.{name}", "expected a command or a mapping with a command")
            specs[str(name)] = parse(ServiceSpec, {**entry, "name": str(name)}, f"{source}.{name}.")
        return cls(specs)

    @classmethod
    def load(cls, source: ServiceCatalog | Mapping[str, Any] | str | os.PathLike[str] | None) -> ServiceCatalog:
        """A catalog from a catalog, a mapping, or a YAML/JSON file path (None = empty)."""
        if source is None:
            return cls()
        if isinstance(source, ServiceCatalog):
            return source
        if isinstance(source, Mapping):
            return cls.from_mapping(source)
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest("services", f"cannot read the service catalog {path}: {exc}") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except ValueError as exc:  # yaml.YAMLError is not a ValueError; handled below
            raise InvalidRequest("services", f"{path}: not valid JSON: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - yaml's errors
            raise InvalidRequest("services", f"{path}: not valid YAML: {exc}") from None
        return cls.from_mapping(data, str(path))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceCatalog:
        """The catalog named by ``ALLOCATOR_SERVICES`` (a file path), else empty."""
        path = (os.environ if env is None else env).get("ALLOCATOR_SERVICES")
        return cls.load(path) if path else cls()


class ServiceInstance(BaseModel):
    """A named service on one host as the ledger holds it."""

    host_id: str
    name: str
    port: int
    refs: int = Field(description="Active allocations holding it.")
    state: str = Field(description="starting, running or stopping.")
    endpoint: str | None = None
    pid: int | None = None
    since_ms: int = 0
    idle_since_ms: int | None = None
    error: str | None = None

    @classmethod
    def from_entry(cls, host_id: str, name: str, raw: str) -> ServiceInstance:
        e = json.loads(raw)
        return cls(host_id=host_id, name=name, port=int(e["port"]), refs=int(e.get("refs") or 0),
                   state=str(e.get("state") or "starting"), endpoint=e.get("endpoint") or None,
                   pid=int(e.get("pid") or 0) or None, since_ms=int(e.get("since") or 0),
                   idle_since_ms=int(e.get("idle_since") or 0) or None, error=e.get("error") or None)


def publish_catalog(a: Allocator, host_id: str, catalog: ServiceCatalog) -> dict[str, Any]:
    """Publishes the names (and timeouts) a host's agent can run; an empty catalog withdraws them."""
    res = a._call("service_catalog", host_id, json.dumps(catalog.public()))
    return a._raise_unless_ok(res)


def check_names(a: Allocator, names: list[str], *, together: bool = False) -> None:
    """Raises ``InvalidRequest`` (field ``services``) for a name no host's catalog offers, and with
    ``together`` (a request that would wait in line) for names no single host offers together: it
    runs on one host, so it would wait for ever. That check reads every host's catalog; a request
    placed now needs none (the placement refuses it)."""
    scores = a.redis.zmscore(a.keys.svc_names, names)
    for name, score in zip(names, scores):
        if not score or score <= 0:
            raise InvalidRequest("services", f"unknown service {name!r}: no host's catalog offers it")
    if not together or len(set(names)) < 2:
        return
    hosts = a.redis.zrange(a.keys.hosts, 0, -1)
    pipe = a.redis.pipeline(transaction=False)
    for h in hosts:
        pipe.hmget(a.keys.svc_catalog(h), names)
    if not any(all(v is not None for v in offered) for offered in (pipe.execute() if hosts else [])):
        raise InvalidRequest("services", f"no host's catalog offers {', '.join(map(repr, names))} together")


def instances(a: Allocator, host_id: str | None = None) -> list[ServiceInstance]:
    """Service instances of one host, or of every host, ordered by host then port."""
    hosts = [host_id] if host_id is not None else a.redis.zrange(a.keys.hosts, 0, -1)
    pipe = a.redis.pipeline(transaction=False)
    for h in hosts:
        pipe.hgetall(a.keys.svc(h))
    out: list[ServiceInstance] = []
    for h, entries in zip(hosts, pipe.execute() if hosts else []):
        out.extend(ServiceInstance.from_entry(h, n, raw) for n, raw in entries.items())
    return sorted(out, key=lambda s: (s.host_id, s.port))


def held(a: Allocator, alloc: Allocation) -> list[ServiceInstance | None]:
    """The instances an allocation holds, in its order (None where the host has none by that name)."""
    if not alloc.services or not alloc.host_id:
        return []
    raws = a.redis.hmget(a.keys.svc(alloc.host_id), alloc.services)
    return [ServiceInstance.from_entry(alloc.host_id, n, r) if r else None for n, r in zip(alloc.services, raws)]


def wait_for_services(a: Allocator, allocation_id: str, timeout_s: float, poll_s: float = 0.005) -> list[ServiceInstance]:
    """Waits up to ``timeout_s`` for every service of an allocation to be running; returns the
    instances as they are then (some may still be ``starting`` when the time is up).

    Raises ``ServiceFailed`` when the allocation failed meanwhile (a service did not start), and
    ``AllocationNotFound`` for an unknown id. Polls with a growing interval (5 ms up to 100 ms).
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    delay = poll_s
    while True:
        alloc = a.get(allocation_id)
        if alloc is None:
            raise AllocationNotFound(f"allocation {allocation_id} not found")
        if alloc.state == "failed" and alloc.error:
            raise ServiceFailed(alloc.error, details={"allocation_id": allocation_id})
        got = held(a, alloc)
        if alloc.state != "active" or all(s is not None and s.state == "running" for s in got):
            return [s for s in got if s is not None]
        left = deadline - time.monotonic()
        if left <= 0:
            return [s for s in got if s is not None]
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)


__all__ = ["ServiceCatalog", "ServiceFailed", "ServiceInstance", "ServiceSpec", "check_names", "held", "instances",
           "publish_catalog", "wait_for_services"]
