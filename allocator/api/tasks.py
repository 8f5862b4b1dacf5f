"""The registry of function tasks remote callers may submit, by name.

Over HTTP a caller names a task (``"train"``), never code: the operator maps names to functions
in ``ALLOCATOR_TASKS="train=mypkg.jobs:train,infer=mypkg.jobs:infer"`` or in a YAML/JSON file
(``ALLOCATOR_TASKS_FILE``)::

    train: mypkg.jobs:train
    infer:
      function: mypkg.jobs:infer
      task_type: ml_inference        # default: the task's name (history estimates group by it)
      description: batch inference

Functions are imported when the API starts, so a typo fails the start instead of a request.
Tasks registered with ``allocator.task_registry`` (the ``@task`` decorator in the modules of
``ALLOCATOR_TASK_MODULES``, plus the built-in demo tasks) are accepted too, so tool JSON, MCP and
HTTP share one set of names; an entry here wins over one there with the same name.
Arguments travel as JSON values only; RQ pickles them into the job, and nothing a caller sends
is ever unpickled by the server.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TaskRegistryError
from .errors import UnknownTask

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TARGET = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$")


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    target: str
    func: Callable[..., Any]
    task_type: str
    description: str | None = None
    resources: dict[str, Any] = field(default_factory=dict)  # used when the caller sends none
    expected_duration: float | None = None


def _shared() -> Any:
    """The process-wide ``allocator.task_registry.registry`` (None if that module is absent)."""
    try:
        from ..task_registry import registry
    except ImportError:
        return None
    return registry


def _import(target: str) -> Callable[..., Any]:
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskRegistryError(f"task target {target!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise TaskRegistryError(f"task target {target!r} is not callable")
    return obj


class TaskRegistry:
    """Name -> function, fixed when the API starts."""

    def __init__(self, entries: Mapping[str, str | Mapping[str, Any]] | None = None, *, include_shared: bool = True) -> None:
        self._shared = _shared() if include_shared else None
        self._tasks: dict[str, RegisteredTask] = {}
        for name, spec in (entries or {}).items():
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise TaskRegistryError(f"task name {name!r} must be 1-64 letters, digits, '_', '.', '-'")
            if isinstance(spec, str):
                spec = {"function": spec}
            if not isinstance(spec, Mapping) or not isinstance(spec.get("function"), str):
                raise TaskRegistryError(f"task {name!r}: expected 'module:function' or a mapping with 'function'")
            target = spec["function"].strip()
            if not TARGET.fullmatch(target):
                raise TaskRegistryError(f"task {name!r}: {target!r} is not 'module:function'")
            resources = spec.get("resources") or {}
            if not isinstance(resources, Mapping):
                raise TaskRegistryError(f"task {name!r}: resources must be a mapping")
            self._tasks[name] = RegisteredTask(name, target, _import(target), str(spec.get("task_type") or name),
                                               spec.get("description"), dict(resources), spec.get("expected_duration"))

    @classmethod
    def from_config(cls, spec: str | None = None, file: str | None = None) -> TaskRegistry:
        """From ``name=module:function,...`` and/or a YAML/JSON file (the file's names win)."""
        entries: dict[str, Any] = {}
        for part in (spec or "").split(","):
            if not part.strip():
                continue
            name, sep, target = part.partition("=")
            if not sep:
                raise TaskRegistryError(f"ALLOCATOR_TASKS entry {part.strip()!r} is not name=module:function")
            entries[name.strip()] = target.strip()
        if file:
            import yaml

            try:
                text = Path(file).read_text(encoding="utf-8")
                data = json.loads(text) if file.endswith(".json") else yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # (JSON's error is a ValueError)
                raise TaskRegistryError(f"{file}: cannot be read: {type(exc).__name__}: {exc}") from None
            if not isinstance(data, dict):
                raise TaskRegistryError(f"{file}: expected a mapping of task name to 'module:function'")
            entries.update(data)
        return cls(entries)

    def _shared_names(self) -> list[str]:
        if self._shared is None:
            return []
        try:
            return list(self._shared.names())
        except TaskRegistryError:
            raise
        except Exception as exc:  # a task module of ALLOCATOR_TASK_MODULES failed to import
            raise TaskRegistryError(f"shared task registry failed to load: {type(exc).__name__}: {exc}") from None

    def names(self) -> list[str]:
        return sorted(set(self._tasks) | set(self._shared_names()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def get(self, name: str, field: str = "task") -> RegisteredTask:
        """The task registered under ``name``; ``UnknownTask`` naming ``field`` otherwise."""
        task = self._tasks.get(name) if isinstance(name, str) else None
        if task is not None:
            return task
        if isinstance(name, str) and name in self._shared_names():
            t = self._shared.get(name, field)
            return RegisteredTask(t.name, f"{t.func.__module__}:{t.func.__qualname__}", t.func, t.task_type or t.name,
                                  t.description or None, dict(t.resources), t.expected_duration)
        known = ", ".join(self.names()) or "none are registered"
        raise UnknownTask(field, f"unknown task {name!r}; registered tasks: {known}")

    def listing(self) -> list[dict[str, Any]]:
        """What callers may submit (names, task types, descriptions, default resources; not code paths)."""
        out = []
        for n in self.names():
            t = self.get(n)
            out.append({"name": t.name, "task_type": t.task_type, "description": t.description, "resources": t.resources})
        return out
