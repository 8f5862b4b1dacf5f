"""What every CLI command shares: connection options, exit codes, JSON output, error reporting.

Exit codes: 0 done; 1 refused (does not fit, not found, Redis unreachable); 2 invalid input
(including a missing Redis URL). Results go to stdout; progress, logs and errors to stderr, so
``--json`` output can always be piped.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Optional

import redis
import typer
from rich.console import Console
from rich.markup import escape

from .client import Allocator
from .config import Settings
from .errors import REDIS_UNAVAILABLE, AllocatorError, InvalidRequest, NotConfigured, NotFound, Refused
from .models import MAX_SECONDS

EXIT_OK, EXIT_REFUSED, EXIT_INVALID = 0, 1, 2

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

REDIS_URL = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help="Redis URL (ALLOCATOR_REDIS_URL).",
                         show_default=False)
NAMESPACE = typer.Option(None, "--namespace", envvar="ALLOCATOR_NAMESPACE", help="Key namespace (ALLOCATOR_NAMESPACE, default alloc).",
                         show_default=False)
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")

#: Option names to show for request fields in CLI error messages.
FIELD_OPTIONS = {
    "resource_requirements.gpu_memory_mb": "--gpu-memory",
    "resource_requirements.cpu_cores": "--cpu-cores",
    "resource_requirements.ram_mb": "--ram",
    "resource_requirements.gpus": "--gpus",
    "resource_requirements.gpu_model": "--gpu-model",
    "resource_requirements.priority": "--priority",
    "resource_requirements.ttl_seconds": "--ttl",
    "resource_requirements.selector": "--selector",
    "allocation_strategy": "--strategy",
    "expected_duration": "--expected-duration",
    "task_id": "TASK_ID",
    "task_type": "--task-type",
    "host_id": "--host",
    "owner": "--owner",
    "metadata": "--metadata",
}


def option_for(field: str, options: Optional[dict[str, str]] = None) -> str:
    """The command-line option a request field came from (``metadata.x`` from ``--metadata``),
    or the field itself when no option gives it. ``options``: the command's own names where they
    differ (``list --task-id`` where ``allocate`` takes TASK_ID)."""
    if options and field in options:
        return options[field]
    if field in FIELD_OPTIONS:
        return FIELD_OPTIONS[field]
    for prefix in ("resource_requirements.selector", "metadata"):
        if field.startswith(prefix + "."):
            return f"{FIELD_OPTIONS[prefix]} ({field.removeprefix(prefix + '.')})"
    return field


def redacted(url: str) -> str:
    """The URL without its password (before the host, or as redis-py's ``?password=``), for messages."""
    try:
        from urllib.parse import parse_qsl, urlencode, urlsplit

        u = urlsplit(url)
        netloc, query = u.netloc, u.query
        if "@" not in netloc and "@" in url.partition("://")[2]:
            # A password with "#", "?" or "/" not percent-encoded: the URL ends its host part
            # there, and the rest of the password shows up as a port, path, query or fragment.
            return f"{u.scheme}://***"
        if u.password:
            # The host part as written (IPv6 brackets, a unix socket's empty host), not as parsed.
            netloc = f"{u.username or ''}:***@{netloc.rpartition('@')[2]}"
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "password" for k, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        if (netloc, query) == (u.netloc, u.query):
            return url  # nothing to hide: as given
        # Built by hand: urlunsplit drops the "//" of a URL without a host (unix:///path).
        return (f"{u.scheme}://{netloc}{u.path}" + (f"?{query}" if query else "")
                + (f"#{u.fragment}" if u.fragment else ""))
    except ValueError:
        return "<redis url>"


def settings_url(redis_url: Optional[str]) -> Optional[str]:
    return redis_url or Settings.from_env().redis_url


def open_allocator(redis_url: Optional[str], namespace: Optional[str], *, as_json: bool = False) -> Allocator:
    """The Allocator the command works on; a shared Redis is required (no embedded default here:
    a private server would show an empty fleet and vanish with the command)."""
    url = settings_url(redis_url)
    if not url:
        fail(EXIT_INVALID, "NOT_CONFIGURED", "no Redis configured: set ALLOCATOR_REDIS_URL or --redis-url "
             "(to try things on this machine alone, run `allocator demo`)", "redis_url", as_json=as_json)
    ns = namespace or Settings.from_env().namespace
    try:
        return Allocator.from_env(redis_url=url, namespace=ns)
    except InvalidRequest as exc:  # a malformed URL
        fail(EXIT_INVALID, exc.code, str(exc), exc.field, as_json=as_json)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, default=_jsonable, allow_nan=False) + "\n")
    sys.stdout.flush()


def _jsonable(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def require_positive(value: float, option: str, *, zero_means: str | None = None) -> None:
    """Refuses a period that is not above zero (exit 2, naming the option): a grace of 0 s would
    declare every host lost at each pass, an interval of 0 s spins. ``zero_means``: what 0 asks
    for where it is allowed (e.g. "no reaper")."""
    if math.isfinite(value) and value <= MAX_SECONDS and (value > 0 or (zero_means is not None and value == 0)):
        return  # (inf, nan or 1e308 would overflow where the period becomes milliseconds)
    most = f"at most {MAX_SECONDS} s (ten years)"
    allowed = f"above 0 s and {most}, or 0 for {zero_means}" if zero_means else f"above 0 s and {most}"
    raise typer.BadParameter(f"must be {allowed}, got {value:g}", param_hint=option)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOG_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}  # logging's other names for two of them


def log_level(value: str, option: str) -> str:
    """The level named, upper-cased (an alias as its usual name), or exit 2 naming the option:
    logging would raise a traceback for a name it does not know, and uvicorn knows only these
    five (and its own TRACE)."""
    name = _LOG_ALIASES.get(value.upper(), value.upper())
    if name not in LOG_LEVELS:
        raise typer.BadParameter(f"expected {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, got {value!r}",
                                 param_hint=option)
    return name


def startup_failure(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and one line for an error met while a command sets itself up (an embedded
    Redis that cannot start, a history database that cannot be reached or is no URL), or None
    for anything else (a bug: its traceback is wanted)."""
    import sqlalchemy.exc

    if isinstance(exc, (InvalidRequest, NotConfigured)):
        return EXIT_INVALID, f"invalid: {exc}"
    if isinstance(exc, AllocatorError):
        return EXIT_REFUSED, f"refused: {exc}"
    if isinstance(exc, sqlalchemy.exc.ArgumentError):  # not a database URL
        return EXIT_INVALID, f"invalid: history database URL: {str(exc).splitlines()[0]}"
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        return EXIT_REFUSED, f"refused: history database unavailable ({type(orig).__name__}): {first}"
    return None


def fail(code: int, error_code: str, message: str, field: Optional[str] = None, *, as_json: bool = False) -> NoReturn:
    """Reports an error (stderr; also stdout as JSON with --json) and exits with ``code``."""
    if as_json:
        print_json({"success": False, "error": {"code": error_code, "message": message, "field": field}})
    label = "invalid" if code == EXIT_INVALID else "refused"
    err.print(f"[bold red]{label}:[/] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


@contextmanager
def reporting(as_json: bool = False, url: Optional[str] = None, options: Optional[dict[str, str]] = None) -> Iterator[None]:
    """Maps allocator errors to messages and exit codes (2 invalid, 1 refused/unavailable);
    ``options``: see ``option_for``."""
    try:
        yield
    except InvalidRequest as exc:
        field = option_for(exc.field, options)
        fail(EXIT_INVALID, exc.code, f"{field}: {exc.reason}", exc.field, as_json=as_json)
    except (Refused, NotFound) as exc:
        fail(EXIT_REFUSED, exc.code, exc.message, as_json=as_json)
    except AllocatorError as exc:
        fail(EXIT_REFUSED, exc.code, exc.message, as_json=as_json)
    except redis.RedisError as exc:
        where = f" at {redacted(url)}" if url else ""
        if isinstance(exc, REDIS_UNAVAILABLE):
            fail(EXIT_REFUSED, "BACKEND_UNAVAILABLE", f"Redis unavailable{where}: {exc}", as_json=as_json)
        fail(EXIT_REFUSED, "BACKEND_ERROR", f"Redis error{where} ({type(exc).__name__}): {exc}", as_json=as_json)


@contextmanager
def listen_failure_exits_1(host: str, port: int) -> Iterator[None]:
    """uvicorn exits 3 when it cannot listen (port in use, address not allowed), after logging
    why; every command's codes are 0, 1 and 2, and such a failure is a refusal: 1."""
    try:
        yield
    except SystemExit as exc:
        if exc.code == 3:
            err.print(f"[red]error:[/] cannot listen on {escape(host)}:{port} (see the log line above)")
            raise SystemExit(EXIT_REFUSED) from None
        raise
