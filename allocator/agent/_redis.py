"""Calling the agent's Lua scripts and reading the clock the ledger uses.

The agent's scripts take the ledger's fixed KEYS followed by their own keys (heartbeats,
reclaim); the scripts find those as the last KEYS, so the fixed list may grow.
"""

from __future__ import annotations

import json
from typing import Any

from ..client import Allocator


def now_arg(a: Allocator) -> str:
    """The clock override a script receives: "" = Redis server TIME, else the injected clock in ms."""
    return "" if a.clock is None else str(int(a.clock() * 1000))


def now_ms(a: Allocator) -> int:
    """Milliseconds on the clock the scripts use (the injected clock, else the Redis server's)."""
    if a.clock is not None:
        return int(a.clock() * 1000)
    sec, usec = a.redis.time()
    return int(sec) * 1000 + int(usec) // 1000


def call(a: Allocator, name: str, extra_keys: list[str], *args: object) -> Any:
    """Runs script ``name`` with KEYS = ledger keys + ``extra_keys``; returns the decoded JSON."""
    raw = a.scripts[name](keys=[*a.keys.ledger_keys(), *extra_keys], args=[a.keys.prefix, now_arg(a), *args])
    return json.loads(raw)


def as_list(v: Any) -> list[Any]:
    """cjson encodes an empty Lua table as {}; read that (and null) as an empty list."""
    return v if isinstance(v, list) else []
