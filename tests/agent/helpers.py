"""Helpers for the agent tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from allocator import Allocator

def host(host_id: str = "h1", *, cores: int = 8, ram: str = "32Gi", gpus: list[dict[str, Any]] | None = None,
         **extra: Any) -> dict[str, Any]:
    """A static host entry; by default one 16 GiB GPU."""
    if gpus is None:
        gpus = [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]
    return {"id": host_id, "cpu_cores": cores, "ram_mb": ram, "gpus": gpus, **extra}


class InventoryFile:
    """A YAML inventory file that tests rewrite; each write gets a newer mtime, so the provider
    notices even two writes within one filesystem timestamp tick."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime_ns = 0

    def write(self, hosts: list[dict[str, Any]] | dict[str, Any]) -> Path:
        doc = {"hosts": hosts} if isinstance(hosts, list) else hosts
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1_000_000)
        os.utime(self.path, ns=(self._mtime_ns, self._mtime_ns))
        return self.path


def unique(prefix: str) -> str:
    """A host id no other test uses (metrics are process-wide and labelled by host)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def events(a: Allocator, kind: str) -> list[dict[str, str]]:
    return [f for _, f in a.redis.xrange(a.keys.events) if f["type"] == kind]


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """Polls ``pred`` until it returns something truthy; fails the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)

