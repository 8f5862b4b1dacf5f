"""Named task functions: the only code a tool call, an MCP call or an HTTP request may start.

Python callers enqueue any importable function (``Allocator.enqueue(fn, ...)``): they already run
code in their own process. Requests that arrive as JSON name a task instead, and the name is
looked up here; a name that is not registered is refused as invalid input. Nothing received as
JSON is ever imported, resolved as a dotted path, or unpickled.

Modules register their functions with the ``task`` decorator when imported. The built-in demo
tasks (``allocator.demo_tasks``) are always loaded; an operator adds more with
``ALLOCATOR_TASK_MODULES`` (comma-separated module names), which is configuration, not input.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import InvalidRequest, TaskRegistryError

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
BUILTIN_MODULES = ("allocator.demo_tasks",)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegisteredTask:
    """A function callers may run by name, with what it needs when the caller does not say."""

    name: str
    func: Callable[..., Any]
    description: str = ""
    resources: dict[str, Any] = field(default_factory=dict)
    task_type: str | None = None
    expected_duration: float | None = None


class TaskRegistry:
    """Name -> function. Thread-safe; registering the same function twice under one name is a no-op."""

    def __init__(self) -> None:
        self._tasks: dict[str, RegisteredTask] = {}
        self._lock = threading.Lock()
        self._loaded = False

    def register(
        self,
        name: str,
        func: Callable[..., Any],
        *,
        description: str = "",
        resources: dict[str, Any] | None = None,
        task_type: str | None = None,
        expected_duration: float | None = None,
    ) -> RegisteredTask:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"task name {name!r} must match {NAME_PATTERN.pattern}")
        if getattr(func, "__module__", None) in (None, "__main__") or "<" in getattr(func, "__qualname__", "<"):
            raise ValueError(f"task {name!r}: workers import tasks by module path; {func!r} is not importable")
        entry = RegisteredTask(name, func, description or (func.__doc__ or "").strip().split("\n")[0],
                               dict(resources or {}), task_type, expected_duration)
        with self._lock:
            old = self._tasks.get(name)
            if old is not None and old.func is not func:
                raise ValueError(f"task name {name!r} is already registered for {old.func!r}")
            self._tasks[name] = entry
        return entry

    def ensure_loaded(self) -> None:
        """Imports the built-in task modules and those named in ``ALLOCATOR_TASK_MODULES`` (once)."""
        if self._loaded:
            return
        extra = [m.strip() for m in os.environ.get("ALLOCATOR_TASK_MODULES", "").split(",") if m.strip()]
        for module in (*BUILTIN_MODULES, *extra):
            try:
                importlib.import_module(module)
            except Exception as exc:  # configuration: say which module, without a traceback
                raise TaskRegistryError(f"task module {module!r} (ALLOCATOR_TASK_MODULES) failed to import: "
                                        f"{type(exc).__name__}: {exc}") from None
        self._loaded = True

    def get(self, name: object, field_name: str = "task") -> RegisteredTask:
        """The registered task, or ``InvalidRequest`` naming the field (never an import)."""
        self.ensure_loaded()
        with self._lock:
            entry = self._tasks.get(name) if isinstance(name, str) else None
        if entry is None:
            known = ", ".join(self.names()) or "none"
            raise InvalidRequest(field_name, f"unknown task {name!r}; registered tasks: {known}")
        return entry

    def names(self) -> list[str]:
        self.ensure_loaded()
        with self._lock:
            return sorted(self._tasks)

    def describe(self) -> list[dict[str, Any]]:
        """Name, description and default resources of every task (for ``get_queue`` and docs)."""
        return [{"name": t.name, "description": t.description, "resources": t.resources, "task_type": t.task_type}
                for t in (self.get(n) for n in self.names())]


registry = TaskRegistry()


def task(
    name: str,
    *,
    description: str = "",
    resources: dict[str, Any] | None = None,
    task_type: str | None = None,
    expected_duration: float | None = None,
) -> Callable[[F], F]:
    """Decorator: ``@task("demo.train", resources={"gpus": 1})`` registers the function by name."""

    def decorate(func: F) -> F:
        registry.register(name, func, description=description, resources=resources, task_type=task_type,
                          expected_duration=expected_duration)
        return func

    return decorate


__all__ = ["RegisteredTask", "TaskRegistry", "registry", "task"]
