"""Configuration from the environment (prefix ``ALLOCATOR_``); every value is also a parameter."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidRequest
from .models import MAX_SECONDS

DEFAULT_NAMESPACE = "alloc"


def _shown(v: float) -> str:
    """A bound as the docs write it: 315360000, not 3.1536e+08."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def env_number(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float = math.inf,
               integer: bool = False) -> float:
    """An operator's numeric setting, or its default when unset; a value that is not a number,
    or outside ``minimum``..``maximum``, is refused naming the variable (a setting of 0
    candidates would refuse every placement with a reason that looks like a full fleet)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    kind = "a whole number" if integer else "a number"
    bounds = f">= {_shown(minimum)}" if maximum == math.inf else f"from {_shown(minimum)} to {_shown(maximum)}"
    try:
        v = int(raw) if integer else float(raw)
    except ValueError:
        raise InvalidRequest(name, f"expected {kind} {bounds}, got {raw!r}") from None
    if not math.isfinite(v) or not minimum <= v <= maximum:
        raise InvalidRequest(name, f"expected {kind} {bounds}, got {raw!r}")
    return v


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
            scan_cap=int(env_number(e, "ALLOCATOR_SCAN_CAP", 2048, minimum=1, integer=True)),
            # At most ten years: Redis refuses an expiry that long in milliseconds past its range, and
            # a release would then fail after it had been decided.
            record_retention_s=int(env_number(e, "ALLOCATOR_RECORD_RETENTION_S", 86400, minimum=0,
                                              maximum=MAX_SECONDS, integer=True)),
            pass_depth=int(env_number(e, "ALLOCATOR_PASS_DEPTH", 100, minimum=1, integer=True)),
        )
