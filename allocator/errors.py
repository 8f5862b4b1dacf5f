"""One exception root for the allocator; each subclass carries its default message and code.

Error codes returned by the Lua scripts (``{"ok": false, "code": ...}``) map to these classes in
``from_code``. ``InvalidRequest`` is also a ``ValueError`` so that code written against the seed
APIs (``except ValueError``) keeps working.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions as _redis_errors

#: Redis errors that mean the ledger cannot be reached or written now (try again later), as
#: opposed to a reply that shows a bug or a key clash (a wrong type, a script's error).
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    _redis_errors.ConnectionError, _redis_errors.TimeoutError, _redis_errors.BusyLoadingError,
    _redis_errors.ReadOnlyError, _redis_errors.MasterDownError, _redis_errors.ClusterDownError,
    _redis_errors.TryAgainError, _redis_errors.OutOfMemoryError,
)


class AllocatorError(Exception):
    """Root of every error the allocator raises on purpose."""

    code = "ALLOCATOR_ERROR"
    default_message = "allocator error"

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None) -> None:
        self.message = message or self.default_message
        self.details = details or {}
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class TaskRegistryError(AllocatorError):
    """The operator's task configuration is wrong: a task or task module that cannot be imported,
    a malformed entry (configuration, never a request's fault)."""

    code = "TASK_REGISTRY"
    default_message = "the task registry could not be loaded"


class InvalidRequest(AllocatorError, ValueError):
    """A request field is malformed; nothing was changed."""

    code = "INVALID_REQUEST"
    default_message = "invalid request"

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}", details={"field": field, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}

    def renamed(self, names: dict[str, str]) -> InvalidRequest:
        """The same error under the name the caller used for its field (``names``: core field ->
        the caller's), itself when the field is not among them."""
        return InvalidRequest(names[self.field], self.reason) if self.field in names else self

    def unprefixed(self, prefix: str) -> InvalidRequest:
        """The same error without ``prefix`` on its field, for callers that pass those fields bare
        (``resources.gpus`` is ``gpus`` to them)."""
        return InvalidRequest(self.field[len(prefix):], self.reason) if self.field.startswith(prefix) else self


class NotConfigured(AllocatorError):
    """What the command needs is not set up: no Redis URL and no redis-server for the embedded
    default. Invalid input for the command line (exit 2), as a missing setting is."""

    code = "NOT_CONFIGURED"
    default_message = "not configured"


class Refused(AllocatorError):
    """A valid request that cannot be granted now."""

    code = "REFUSED"
    default_message = "request refused"


class InsufficientResources(Refused, ValueError):
    """Nothing in the fleet can hold the request right now (the message says which resource)."""

    code = "NO_FIT"
    default_message = "insufficient resources"

    def __init__(self, message: str | None = None, *, code: str = "NO_FIT", details: dict[str, Any] | None = None) -> None:
        self.code = code
        super().__init__(message, details=details)


class NotFound(AllocatorError):
    code = "NOT_FOUND"
    default_message = "not found"


class AllocationNotFound(NotFound):
    code = "ALLOCATION_NOT_FOUND"
    default_message = "allocation not found"


class HostNotFound(NotFound):
    code = "HOST_NOT_FOUND"
    default_message = "host not found"


class HostBusy(Refused):
    code = "HOST_BUSY"
    default_message = "host still holds active allocations"


class OperatorDrained(Refused):
    """An agent's deregistration of a host an operator drains: the host stays registered (the
    drain is the operator's to end)."""

    code = "OPERATOR_DRAINED"
    default_message = "host is drained by an operator; it stays registered"


class AllocationEnded(Refused):
    """A request named the id of an allocation that has ended: placing is idempotent by id, so
    that id cannot be placed again (a new request needs a new id)."""

    code = "ALLOCATION_ENDED"
    default_message = "that allocation has ended; a new request needs a new id"


class Recovering(Refused):
    """The ledger is being rebuilt from the durable history; placements resume when it is done."""

    code = "RECOVERING"
    default_message = "the ledger is being rebuilt; try again shortly"


class HostLost(Refused):
    code = "HOST_LOST"
    default_message = "host is lost; it must register again"


class LedgerCorrupt(AllocatorError):
    """A script found the ledger inconsistent; it wrote nothing. Report it: this is a bug."""

    code = "LEDGER_CORRUPT"
    default_message = "ledger inconsistent"


_BY_CODE: dict[str, type[AllocatorError]] = {
    "ALLOCATION_NOT_FOUND": AllocationNotFound,
    "HOST_NOT_FOUND": HostNotFound,
    "HOST_BUSY": HostBusy,
    "HOST_LOST": HostLost,
    "LEDGER_CORRUPT": LedgerCorrupt,
    "OPERATOR_DRAINED": OperatorDrained,
    "RECOVERING": Recovering,
}


def from_code(code: str, message: str, details: dict[str, Any] | None = None) -> AllocatorError:
    """The exception for an error code returned by a ledger script."""
    if code.startswith("INSUFFICIENT_") or code in ("NO_FIT", "QUEUE_AHEAD"):
        return InsufficientResources(message, code=code, details=details)
    cls = _BY_CODE.get(code, AllocatorError)
    return cls(message, details=details)
