"""Errors of the API layer and their HTTP form.

Every error leaves the server as ``{"error": {"code", "message", "field"}}`` (``field`` null when
no single field is to blame, ``details`` when the ledger gave some), with the status that tells a
client what to do: 400 unreadable body, 401 missing/wrong token, 404 unknown id, 409 valid but
not possible now (refused, conflict), 422 a field is wrong, 503 the ledger is recovering or its
Redis does not answer. The
WebSocket uses the same body and closes with code 4000 + status (4401, 4409, 4422, ...).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import AllocatorError, InvalidRequest, NotFound, Recovering, Refused


class Unauthorized(AllocatorError):
    code = "UNAUTHORIZED"
    default_message = "missing or wrong bearer token"


class UnknownTask(InvalidRequest):
    """A task name that is not in the operator's registry (nothing else can be submitted)."""

    code = "UNKNOWN_TASK"


class NoCandidates(InvalidRequest):
    """No registered, ready host matches the request's clusters and filter."""

    code = "NO_CANDIDATES"


class BackendUnavailable(AllocatorError):
    """The ledger's Redis did not answer: nothing was decided, try again (503, as while recovering)."""

    code = "BACKEND_UNAVAILABLE"
    default_message = "the ledger's Redis is unavailable; try again shortly"


class PolicyError(AllocatorError):
    """The policy could not be loaded, raised, or returned something that is not a placement.
    Nothing was allocated."""

    code = "POLICY_ERROR"
    default_message = "policy error"

    def __init__(self, message: str, *, field: str = "policy_rule_uri", details: dict[str, Any] | None = None) -> None:
        self.field = field
        super().__init__(message, details=details)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "field": self.field}


class PolicyConflict(Refused):
    """The policy's choice no longer fitted when it was committed, on every attempt."""

    code = "POLICY_CONFLICT"
    default_message = "the policy's choice no longer fits"


class WaitTimeout(Refused):
    code = "TIMEOUT"
    default_message = "not placed within the time the request allowed; it was cancelled"


def http_status(exc: AllocatorError) -> int:
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, (InvalidRequest, PolicyError)):
        return 422
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Recovering, BackendUnavailable)):
        return 503
    if isinstance(exc, Refused):
        return 409
    return 500  # LedgerCorrupt and anything unexpected: a bug, not the caller's fault


def error_body(exc: AllocatorError) -> dict[str, Any]:
    d = exc.to_dict()
    d.setdefault("field", getattr(exc, "field", None))
    return {"error": d}


_TAG = re.compile(r"^(constrained-)?(int|str|float|bool|none|bytes|dict|list)$")


def _union_tag(part: object) -> bool:
    """pydantic names the member of a union it tried in the error location ('constrained-int',
    "literal['low',...]", 'list[str]'); those are not field names."""
    return isinstance(part, str) and (bool(_TAG.match(part)) or "[" in part)


def from_validation_errors(errors: list[dict[str, Any]]) -> AllocatorError:
    """FastAPI's validation errors -> one ``InvalidRequest`` naming the first bad field (as
    ``allocator.models.parse`` does), or a 400-style error for a body that is not JSON."""
    if not errors:
        return InvalidRequest("body", "invalid request")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header") and not _union_tag(p)]
    if err.get("type") == "json_invalid":
        return MalformedBody(f"request body is not valid JSON: {err.get('msg', '')}".rstrip(": "))
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidRequest):
        if loc and (cause.field == loc[-1] or cause.field.startswith(loc[-1] + ".")):
            loc = loc[:-1]
        return InvalidRequest(".".join([*loc, cause.field]), cause.reason)
    reason = {"extra_forbidden": "unknown field", "missing": "required field is missing"}.get(err.get("type", ""), err.get("msg", "invalid"))
    return InvalidRequest(".".join(loc) or "body", reason)


class MalformedBody(AllocatorError):
    code = "MALFORMED_JSON"
    default_message = "request body is not valid JSON"


STATUS_OVERRIDES: dict[type[AllocatorError], int] = {MalformedBody: 400}


def status_of(exc: AllocatorError) -> int:
    for cls, status in STATUS_OVERRIDES.items():
        if isinstance(exc, cls):
            return status
    return http_status(exc)
