"""What every route shares: the allocator, the operator's configuration, and the helpers built
from it once per app (task registry, policy loader, waiters, metrics registry, policy threads)."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from prometheus_client import CollectorRegistry, Histogram

from ..client import Allocator
from .config import ApiConfig
from .errors import Unauthorized
from .policies import PolicyLoader
from .tasks import TaskRegistry
from .waiters import Waiters


@dataclass
class ApiState:
    allocator: Allocator
    config: ApiConfig
    tasks: TaskRegistry
    policies: PolicyLoader
    waiters: Waiters
    registry: CollectorRegistry
    api_latency: Histogram
    policy_threads: ThreadPoolExecutor

    def check_token(self, authorization: str | None) -> None:
        """Raises ``Unauthorized`` unless the header carries the configured bearer token (no
        token configured = open). Constant-time comparison; the token is never logged."""
        token = self.config.token
        if not token:
            return
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Unauthorized()


def api_state(request: Request) -> ApiState:
    return request.app.state.api  # type: ignore[no-any-return]
