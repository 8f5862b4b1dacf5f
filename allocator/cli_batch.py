"""``allocator allocate-many FILE``: many direct requests from a file, placed in batches.

The file (``-``: standard input) holds a JSON array of requests or one JSON object per line,
each the body of ``POST /v1/allocations`` (``resources``, ``priority``, ``strategy``,
``ttl_seconds``, ``selector``, ``metadata``, ``task_id``, ``task_type``, ``owner``,
``allocation_id``; ``on_busy`` only as ``"fail"``). An ``allocation_id`` given twice is
idempotent: both entries show, and count, the one allocation. Every request is checked before any is placed; then they go
``--chunk-size`` per script call (``Allocator.allocate_many``), each placed on its own.
Exit codes as in ``cli_common``: 0 every request holds an active allocation, 1 some do not (a
refusal, or a repeated id whose allocation waits in line or has ended; the table or the JSON says
which), 2 the file or a request is invalid (nothing placed).

``allocator release ID ID ...`` (or ``-``: the ids from standard input, separated by spaces or
new lines) releases several allocations the same way (``Allocator.release_many``): 0 when every
id names an allocation (released now, or ended before: a release is idempotent), 1 when some id
names none, 2 when an id is malformed (nothing released).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from . import batch, views
from .cli_common import AS_JSON, EXIT_OK, EXIT_REFUSED, NAMESPACE, REDIS_URL, err, open_allocator, out, print_json, reporting, settings_url
from .api.errors import error_body  # (no FastAPI: allocator.api imports nothing itself)
from .errors import AllocationNotFound, AllocatorError, InvalidRequest
from .models import Allocation


def read_stdin(field: str) -> str:
    """Standard input as text; ``InvalidRequest`` naming ``field`` when there is none to read (a
    closed descriptor) or it is not UTF-8."""
    if sys.stdin is None:
        raise InvalidRequest(field, "no standard input to read from (it is closed)")
    try:
        return sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(field, f"cannot read standard input: {type(exc).__name__}: {exc}") from None


def read_requests(text: str) -> list[Any]:
    """A JSON array, or JSON lines (blank lines skipped); ``InvalidRequest`` (field ``file``)
    naming the line that is not JSON. A byte order mark at the start is skipped."""
    text = text.removeprefix("\ufeff")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest("file", f"not a valid JSON array ({type(exc).__name__}: {str(exc)[:120]})") from None
        if not isinstance(items, list):
            raise InvalidRequest("file", "expected a JSON array of requests or one JSON object per line")
        return items
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except (ValueError, RecursionError) as exc:
                raise InvalidRequest("file", f"line {n} is not valid JSON ({type(exc).__name__})") from None
    return items


def _active(x: Allocation | AllocatorError) -> bool:
    """Whether the request holds an active allocation now (a repeated id may name one that waits
    in line or has ended)."""
    return isinstance(x, Allocation) and x.state == "active"


def _entry(x: Allocation | AllocatorError) -> dict[str, Any]:
    if isinstance(x, Allocation):
        return {"ok": _active(x), "allocation": x.model_dump(mode="json"), "error": None}
    return {"ok": False, "allocation": None, "error": error_body(x)["error"]}


def allocate_many(
    file: str = typer.Argument(..., help="JSON array or JSON lines of requests; '-' reads standard input."),
    chunk_size: int = typer.Option(batch.DEFAULT_CHUNK, "--chunk-size", help=f"Requests per script call (1-{batch.MAX_CHUNK})."),
    as_json: bool = AS_JSON,
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Place many requests now, each on its own, in batches (refusals do not stop the others)."""
    with reporting(as_json, settings_url(redis_url), options={"chunk_size": "--chunk-size"}):
        try:
            text = read_stdin("file") if file == "-" else Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest("file", f"cannot read {file!r}: {type(exc).__name__}: {exc}") from None
        items = read_requests(text)
        a = open_allocator(redis_url, namespace, as_json=as_json)
        with Progress(TextColumn("placing"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar:
            task = bar.add_task("place", total=len(items))
            results = batch.allocate_many(a, items, chunk_size=chunk_size,
                                          progress=lambda done, total: bar.update(task, completed=done))
    placed = sum(_active(x) for x in results)
    if as_json:
        print_json({"results": [_entry(x) for x in results], "placed": placed, "not_placed": len(results) - placed})
    else:
        t = Table(title=f"{placed} of {len(results)} placed")
        for col in ("#", "result", "allocation", "grant or reason"):
            t.add_column(col)
        for i, x in enumerate(results):
            if _active(x):
                t.add_row(str(i), "[green]placed[/]", escape(x.allocation_id), escape(views.grant_text(x)))
            elif isinstance(x, Allocation):  # a repeated id: the allocation as it stands
                t.add_row(str(i), f"[yellow]{escape(x.state)}[/]", escape(x.allocation_id),
                          "an earlier request with this id " + ("waits in line" if x.state == "pending" else f"has ended ({escape(x.release_reason or '-')})"))
            else:
                t.add_row(str(i), f"[red]{escape(x.code.lower())}[/]", "-", escape(x.message))
        out.print(t)
    raise typer.Exit(EXIT_OK if placed == len(results) else EXIT_REFUSED)


def release_many(ids: list[str], *, chunk_size: int, as_json: bool, redis_url: Optional[str],
                 namespace: Optional[str]) -> None:
    """``allocator release`` of several ids, or of ``-``: see the module's docstring."""
    with reporting(as_json, settings_url(redis_url), options={"chunk_size": "--chunk-size"}):
        if ids == ["-"]:
            # Spaces and new lines separate ids; any other character is part of one (and check_id
            # refuses a control character), as it would be in a single id.
            ids = [x for x in re.split(r"[ \t\r\n]+", read_stdin("allocation_ids")) if x]
        elif "-" in ids:
            raise InvalidRequest("allocation_ids", "'-' (read the ids from standard input) must be the only id given")
        a = open_allocator(redis_url, namespace, as_json=as_json)
        with Progress(TextColumn("releasing"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar:
            task = bar.add_task("release", total=len(ids))
            results = batch.release_many(a, ids, chunk_size=chunk_size,
                                         progress=lambda done, total: bar.update(task, completed=done))
    found = sum(isinstance(x, Allocation) for x in results)
    released = sum(isinstance(x, Allocation) and bool(x.released_now) for x in results)
    if as_json:
        print_json({"results": [_release_entry(x) for x in results], "released": released,
                    "not_found": sum(isinstance(x, AllocationNotFound) for x in results)})
    else:
        t = Table(title=f"{released} of {len(results)} released now")
        for col in ("allocation", "result", "state or reason"):
            t.add_column(col)
        for aid, x in zip(ids, results):
            if isinstance(x, Allocation):
                done = "[green]withdrawn[/]" if x.state == "cancelled" else "[green]released[/]"
                t.add_row(escape(aid), done if x.released_now else f"already {escape(x.state)}",
                          escape(x.state if x.release_reason in (None, x.state) else f"{x.state} ({x.release_reason})"))
            else:
                t.add_row(escape(aid), f"[red]{escape(x.code.lower())}[/]", escape(x.message))
        out.print(t)
    raise typer.Exit(EXIT_OK if found == len(results) else EXIT_REFUSED)


def _release_entry(x: Allocation | AllocatorError) -> dict[str, Any]:
    if isinstance(x, Allocation):
        return {"ok": True, "allocation": x.model_dump(mode="json", exclude={"allocation_time_ms"}), "error": None}
    return {"ok": False, "allocation": None, "error": error_body(x)["error"]}


def register(app: typer.Typer) -> None:
    app.command("allocate-many")(allocate_many)
