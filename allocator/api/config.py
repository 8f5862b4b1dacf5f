"""Operator settings of the API server, from ``ALLOCATOR_*`` variables or ``allocator api`` flags.

Everything that decides what remote callers may do lives here and only here: the bearer token,
the registry of function tasks they may submit by name, and the modules policies may be loaded
from. Nothing a caller sends can widen these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..config import env_number

BUILTIN_POLICY_MODULE = "allocator.api.policies"
DAY_S = 86400.0


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


@dataclass(frozen=True)
class ApiConfig:
    """What the API process allows and how it paces itself.

    ``token``: bearer token required on every route but /health and /metrics (None = open; the
    value is never logged or shown in a repr). ``tasks`` / ``tasks_file``: the task registry
    (see ``allocator.api.tasks``). ``policy_modules``: module prefixes a ``policy_rule_uri``
    given as a dotted path may name, besides the built-ins and the ``allocator.policies`` entry
    points (which the operator installed, so they are trusted).
    """

    token: str | None = field(default=None, repr=False)
    tasks: str | None = None
    tasks_file: str | None = None
    policy_modules: tuple[str, ...] = ()
    poll_interval_s: float = 0.1
    progress_interval_s: float = 5.0
    policy_timeout_s: float = 10.0
    policy_attempts: int = 3
    tally_interval_s: float = 1.0
    cancel_retry_s: float = 5.0
    max_body_bytes: int = 1 << 20

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> ApiConfig:
        e = os.environ if env is None else env
        values: dict[str, object] = {
            "token": e.get("ALLOCATOR_API_TOKEN") or None,
            "tasks": e.get("ALLOCATOR_TASKS") or None,
            "tasks_file": e.get("ALLOCATOR_TASKS_FILE") or None,
            "policy_modules": _split(e.get("ALLOCATOR_POLICY_MODULES")),
            # Periods and time limits: above 0, at most a day (longer would overflow a wait's
            # timeout and means no limit at all, which none of them may be).
            "poll_interval_s": env_number(e, "ALLOCATOR_API_POLL_S", 0.1, minimum=0.001, maximum=DAY_S),
            "progress_interval_s": env_number(e, "ALLOCATOR_API_PROGRESS_S", 5.0, minimum=0.1, maximum=3600),
            "policy_timeout_s": env_number(e, "ALLOCATOR_POLICY_TIMEOUT_S", 10.0, minimum=0.001, maximum=DAY_S),
            "policy_attempts": int(env_number(e, "ALLOCATOR_POLICY_ATTEMPTS", 3, minimum=1, maximum=10, integer=True)),
            "tally_interval_s": env_number(e, "ALLOCATOR_API_TALLY_S", 1.0, minimum=0.001, maximum=DAY_S),
            # How long a WebSocket session keeps trying to cancel what it made while Redis does not
            # answer (a restart or failover), before leaving it to its lease's TTL.
            "cancel_retry_s": env_number(e, "ALLOCATOR_API_CANCEL_RETRY_S", 5.0, minimum=0, maximum=300),
            # A request body larger than this is refused (413) before it is read whole.
            "max_body_bytes": int(env_number(e, "ALLOCATOR_API_MAX_BODY_BYTES", 1 << 20, minimum=1024, maximum=1 << 30,
                                             integer=True)),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values["policy_modules"], str):
            values["policy_modules"] = _split(values["policy_modules"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    @property
    def allowed_policy_modules(self) -> tuple[str, ...]:
        return (BUILTIN_POLICY_MODULE, *self.policy_modules)
