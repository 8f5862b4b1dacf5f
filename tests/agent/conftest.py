"""Fixtures for the agent tests: static inventory files, agents on them, a real-clock Allocator.

NVML is simulated only through the static-inventory provider (``StaticProvider``); everything
else is real: Redis, the Lua scripts, psutil, child processes and signals.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from allocator import Allocator
from allocator.agent import Agent, StaticProvider, Watchdog

from .helpers import InventoryFile


@pytest.fixture
def inventory(tmp_path: Path) -> InventoryFile:
    return InventoryFile(tmp_path / "fleet.yaml")


@pytest.fixture
def make_agent(alloc: Allocator, inventory: InventoryFile) -> Callable[..., Agent]:
    """Builds an Agent on the ``alloc`` namespace serving the hosts given (written to the file)."""

    def make(hosts: list[dict[str, Any]], *, enforce: bool = False, **kwargs: Any) -> Agent:
        inventory.write(hosts)
        kwargs.setdefault("interval_s", 0.2)
        kwargs.setdefault("granularity_mb", 1)
        wd = kwargs.pop("watchdog", None) or Watchdog(alloc, enforce=enforce)
        return Agent(alloc, StaticProvider(inventory.path), watchdog=wd, **kwargs)

    return make


@pytest.fixture
def live_alloc(redis_url: str) -> Iterator[Allocator]:
    """An Allocator on its own namespace that uses the Redis server clock, like a real agent
    subprocess and reaper do (the ``alloc`` fixture's injected clock cannot reach a subprocess)."""
    a = Allocator(redis_url, namespace="test-" + uuid.uuid4().hex[:12])
    yield a
    a.destroy()
    a.redis.close()
