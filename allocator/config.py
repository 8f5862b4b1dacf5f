"""Configuration from the environment (prefix ``ALLOCATOR_``); every value is also a parameter."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_NAMESPACE = "alloc"


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    database_url: str | None = None
    scan_cap: int = 2048
    record_retention_s: int = 86400
    pass_depth: int = 100

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        return cls(
            redis_url=e.get("ALLOCATOR_REDIS_URL") or None,
            namespace=e.get("ALLOCATOR_NAMESPACE") or DEFAULT_NAMESPACE,
            database_url=e.get("ALLOCATOR_DATABASE_URL") or None,
            scan_cap=int(e.get("ALLOCATOR_SCAN_CAP") or 2048),
            record_retention_s=int(e.get("ALLOCATOR_RECORD_RETENTION_S") or 86400),
            pass_depth=int(e.get("ALLOCATOR_PASS_DEPTH") or 100),
        )
