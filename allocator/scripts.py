"""Loads the Lua scripts of ``allocator/lua`` and registers them once per Redis client.

Scripts may include shared helpers with a line ``--- @include "name"`` (file
``lua/includes/<name>.lua``), as BullMQ's scripts do; each include is inlined once.
redis-py's ``Script`` objects run EVALSHA and reload the source on NOSCRIPT, so a Redis restart
or ``SCRIPT FLUSH`` is transparent.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from importlib import resources

import redis

_INCLUDE = re.compile(r'^---[ \t]*@include[ \t]+"([\w-]+)"[ \t]*$', re.MULTILINE)

SCRIPT_NAMES = (
    "register_host",
    "drain_host",
    "remove_host",
    "place",
    "release",
    "expire",
    "snapshot",
    "noop",
    "submit",
    "schedule",
    "cancel",
    "requeue",
    "recovery",
    "restore_allocation",
    "trim_outbox",
    "heartbeat",
    "mark_lost",
    "grant_check",
    "claim_grant",  # workers: one run per placement
    "finish_job",  # workers: after the job, release (or requeue) and record its end in one call
    "place_on",  # allocator/api: commit a policy's choice
    "tally_outbox",  # allocator/api: outbox counts for /metrics
    "service_catalog",  # allocator/services: what a host's agent can run
    "service_state",  # allocator/agent/services: a named service started, failed, stopped
)


def _read(rel: str) -> str:
    return resources.files("allocator").joinpath("lua", rel).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def source(name: str) -> str:
    """The script ``name`` with its includes inlined."""
    seen: set[str] = set()

    def expand(match: re.Match[str]) -> str:
        inc = match.group(1)
        if inc in seen:
            return ""
        seen.add(inc)
        return _INCLUDE.sub(expand, _read(f"includes/{inc}.lua"))

    return _INCLUDE.sub(expand, _read(f"{name}.lua"))


class Scripts:
    """The registered scripts for one Redis client, by name."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:  # a redis.commands.core.Script
        script = self._scripts.get(name)
        if script is None:
            if name not in SCRIPT_NAMES:
                raise KeyError(f"unknown ledger script {name!r}")
            script = self._scripts[name] = self._client.register_script(source(name))
        return script
