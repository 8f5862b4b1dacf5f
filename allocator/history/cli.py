"""Typer commands for the history: ``db``, ``history``, ``usage``, ``recover``, ``recorder``, ``estimates``.

``register(app)`` adds them to the main CLI (allocator/cli.py). SQLAlchemy and Alembic are
imported inside the commands so the rest of the CLI starts without them.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..models import ALLOCATION_STATES, shown

console = Console()
err = Console(stderr=True)

db_app = typer.Typer(help="History database schema (Alembic migrations shipped in the package).", no_args_is_help=True)

DB_URL = typer.Option(None, "--database-url", envvar="ALLOCATOR_DATABASE_URL",
                      help="postgresql+psycopg://user@host/db; unset = SQLite file (ALLOCATOR_STATE_DIR).")
REDIS_URL = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help="Redis URL (required).")
NAMESPACE = typer.Option("alloc", "--namespace", envvar="ALLOCATOR_NAMESPACE", help="Ledger namespace.")
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")

_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str | None, *, now: datetime | None = None, option: str | None = None) -> datetime | None:
    """"24h", "7d", "90m" (that long ago) or an ISO date/time (UTC unless it says otherwise).
    ``option``: the option it came from, named in the error."""
    if text is None:
        return None
    if not text.strip():  # (a script's empty variable: refused, not read as "no bound")
        raise typer.BadParameter("expected e.g. 24h, 7d, 30m or an ISO date/time, got an empty value", param_hint=option)
    try:
        return _when(text, now or datetime.now(timezone.utc))
    except typer.BadParameter as exc:
        exc.param_hint = option
        raise


def _when(text: str, now: datetime) -> datetime:
    m = _REL.match(text)
    if m:
        try:
            return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
        except OverflowError:
            raise typer.BadParameter(f"{text!r}: further back than a date can go") from None
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected e.g. 24h, 7d, 30m or an ISO date/time") from None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    try:
        # The database keeps UTC: a time that has no UTC form (year 1 east of Greenwich, year 9999
        # west of it) is refused here, naming the option, rather than when the query is built.
        return dt.astimezone(timezone.utc)
    except OverflowError:
        raise typer.BadParameter(f"{text!r}: outside the dates UTC can hold") from None


def _engine(url: str | None) -> Any:
    from .migrate import open_engine

    return open_engine(url)


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(_short(exc))}")
    return typer.Exit(1)


def _short(exc: Exception) -> str:
    """The error without the SQL statement and parameters SQLAlchemy appends to database errors."""
    from sqlalchemy.exc import StatementError

    if isinstance(exc, StatementError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {str(exc.orig).strip().splitlines()[0]}"
    return str(exc)


@contextmanager
def _reported() -> Iterator[None]:
    """Allocator, database and Redis errors end the command with exit 1 and one line, not a
    traceback; a migration revision that does not exist is invalid input (exit 2)."""
    import redis
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from ..errors import AllocatorError, InvalidRequest

    try:
        yield
    except InvalidRequest as exc:
        err.print(f"[red]invalid:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except CommandError as exc:
        err.print(f"[red]invalid:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except (AllocatorError, SQLAlchemyError) as exc:
        raise _fail(exc) from None
    except redis.RedisError as exc:
        raise _fail(RuntimeError(f"Redis unavailable: {exc}")) from None


def _jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def _dump(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=_jsonable, indent=2, sort_keys=True))


# -- db ------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head"), database_url: str = DB_URL) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from .db import redacted
    from .migrate import current, upgrade

    with _reported():
        upgrade(database_url, revision)
        typer.echo(f"{redacted(database_url)} is at revision {current(database_url)}")


# "-1" is a revision, not an option: Click reads an argument that starts with a dash as an
# unknown option unless the command lets unknown options through to its arguments.
@db_app.command("downgrade", context_settings={"ignore_unknown_options": True})
def db_downgrade(revision: str = typer.Argument(..., help='e.g. "-1" or "base" (drops every history table)'),
                 database_url: str = DB_URL) -> None:
    """Revert migrations down to REVISION."""
    from .db import redacted
    from .migrate import current, downgrade

    with _reported():
        downgrade(database_url, revision)
        typer.echo(f"{redacted(database_url)} is at revision {current(database_url) or 'base (empty)'}")


@db_app.command("current")
def db_current(database_url: str = DB_URL) -> None:
    """Show the database's revision and the newest one the code has."""
    from .db import redacted
    from .migrate import current, head, known

    with _reported():
        cur = current(database_url)
    advice = "" if cur == head() else " — run `allocator db upgrade`" if known(cur) else " — newer than this code: run a release that has it"
    typer.echo(f"{redacted(database_url)}: revision {cur or 'none (empty)'}; code head {head()}{advice}")


@db_app.command("revision")
def db_revision(message: str = typer.Option(..., "-m", "--message"), database_url: str = DB_URL) -> None:
    """(Developers) autogenerate a new migration from the models against an up-to-date database."""
    from .migrate import revision

    revision(message, database_url)


# -- history ------------------------------------------------------------------------------


def history_cmd(
    allocation_id: str = typer.Argument(None, help="Show one allocation with its events."),
    task_type: str = typer.Option(None, "--task-type"),
    host: str = typer.Option(None, "--host"),
    state: str = typer.Option(None, "--state", help="pending, active, released, failed, cancelled"),
    owner: str = typer.Option(None, "--owner"),
    since: str = typer.Option(None, "--since", help="24h, 7d, or an ISO time: allocations alive since then"),
    limit: int = typer.Option(50, "--limit", min=1),
    as_json: bool = AS_JSON,
    database_url: str = DB_URL,
    namespace: str = NAMESPACE,
) -> None:
    """Allocations from the durable history (newest first), or one allocation's events."""
    from .queries import allocation, allocation_events, history

    if state is not None and state not in ALLOCATION_STATES:
        raise typer.BadParameter(f"expected one of {', '.join(ALLOCATION_STATES)}, got {state!r}", param_hint="--state")

    with _reported():
        engine = _engine(database_url)
        if allocation_id:
            row = allocation(engine, namespace, allocation_id)
            evs = allocation_events(engine, namespace, allocation_id)
            if row is None and not evs:
                err.print(Text(f"allocation {allocation_id} is not in the history of namespace {namespace!r}"))
                raise typer.Exit(1)
            if as_json:
                _dump({"allocation": row, "events": evs})
                return
            _allocation_table([row] if row else [])
            t = Table("stream id", "type", "ts", "data", title=f"events of {allocation_id}")
            for e in evs:
                t.add_row(e["stream_id"], e["type"], _fmt_ts(e["ts"]), Text(json.dumps(e["data"])[:120]))
            console.print(t)
            return
        rows = history(engine, namespace, task_type=task_type, host=host, state=state, owner=owner,
                       since=parse_when(since, option="--since"), limit=limit)
    if as_json:
        _dump(rows)
    else:
        _allocation_table(rows)


def _fmt_ts(v: datetime | None) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S") if v else ""


def _fmt_ms(v: int | None) -> str:
    if v is None:
        return ""
    s = v / 1000
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _allocation_table(rows: list[dict[str, Any]]) -> None:
    t = Table()
    t.add_column("allocation", no_wrap=True, min_width=max([10, *(len(r["allocation_id"]) for r in rows)]))
    for name in ("task type", "owner", "host", "GPUs", "cores", "state", "reason", "placed", "wait", "run"):
        t.add_column(name)
    for r in rows:
        gpus = f"{r['gpu_count']}×{r['gpu_memory_mb'] // max(1, r['gpu_count'])}MiB" if r["gpu_count"] else "-"
        t.add_row(Text(r["allocation_id"]), Text(r["task_type"] or ""), Text(r["owner"] or ""), Text(r["host_id"] or ""), gpus,
                  f"{r['cpu_millis'] / 1000:g}", Text(r["state"]), Text(r["release_reason"] or r["outcome"] or ""),
                  _fmt_ts(r["placed_at"]), _fmt_ms(r["wait_ms"]), _fmt_ms(r["run_ms"]))
    console.print(t)


# -- usage --------------------------------------------------------------------------------


def usage_cmd(
    by: str = typer.Option("owner", "--by", help="owner, task_type or host"),
    since: str = typer.Option("30d", "--since", help="start of the period: 24h, 7d, or an ISO time"),
    until: str = typer.Option(None, "--until", help="end of the period (default now)"),
    as_json: bool = AS_JSON,
    database_url: str = DB_URL,
    namespace: str = NAMESPACE,
) -> None:
    """GPU-hours, GPU-memory-hours, CPU-hours, RAM-hours and queue wait per owner/task type/host."""
    from .queries import usage

    if by not in ("owner", "task_type", "host"):
        raise typer.BadParameter("--by must be owner, task_type or host")
    now = datetime.now(timezone.utc)
    start, end = parse_when(since, now=now, option="--since"), parse_when(until, now=now, option="--until")
    assert start is not None  # (--since has a default, and an empty value is refused)
    if end is not None and end <= start:
        raise typer.BadParameter(f"{until!r} is not after --since ({start:%Y-%m-%d %H:%M:%S} UTC)", param_hint="--until")
    with _reported():
        rows = usage(_engine(database_url), namespace, since=start, until=end, by=by)  # type: ignore[arg-type]
    if as_json:
        _dump({"by": by, "since": start, "until": end or datetime.now(timezone.utc), "rows": [r.as_dict() for r in rows]})
        return
    t = Table(by, "placements", "GPU-h", "GPU-mem GiB-h", "CPU-h", "RAM GiB-h", "placed", "wait h", "mean wait",
              title=f"usage since {start:%Y-%m-%d %H:%M} UTC" + (f" until {end:%Y-%m-%d %H:%M} UTC" if end else ""))
    for r in rows:
        t.add_row(Text(str(r.key)), str(r.placements), f"{r.gpu_hours:.2f}", f"{r.gpu_memory_gib_hours:.1f}", f"{r.cpu_hours:.2f}",
                  f"{r.ram_gib_hours:.1f}", str(r.allocations_placed), f"{r.wait_hours:.2f}",
                  "" if r.mean_wait_s is None else f"{r.mean_wait_s:.1f}s")
    console.print(t)


# -- recover, recorder, estimates -------------------------------------------------------


def _allocator(redis_url: str | None, namespace: str, *, as_json: bool = False) -> Any:
    """The ledger these commands work on: a shared Redis is required, as for every command but
    the demo (an embedded server would be a private, empty one: recover would rebuild a ledger
    nobody uses and leave the real one's gate closed)."""
    from ..cli_common import open_allocator

    return open_allocator(redis_url, namespace, as_json=as_json)


def recover_cmd(
    hosts: bool = typer.Option(True, "--hosts/--no-hosts", help="Also re-register hosts the history knows and the ledger lacks."),
    watch_hosts: bool = typer.Option(False, "--watch-hosts", help="Every host has an agent: give each host it re-registers a "
                                     "heartbeat now, so one whose agent never reports is declared lost after the grace."),
    as_json: bool = AS_JSON,
    database_url: str = DB_URL,
    redis_url: str = REDIS_URL,
    namespace: str = NAMESPACE,
) -> None:
    """After Redis lost its data: rebuild the active allocations from the history (placements refused meanwhile)."""
    from ..errors import AllocatorError
    from .recover import recover

    with _reported():
        try:
            report = recover(_allocator(redis_url, namespace), _engine(database_url), with_hosts=hosts,
                             watch_hosts=watch_hosts)
        except AllocatorError as exc:
            if as_json:
                _dump({"ok": False, "error": exc.to_dict()})
            raise
    if as_json:
        _dump({"ok": True, **report.as_dict()})
        return
    console.print(f"restored {len(report.restored)} allocation(s), {len(report.deferred)} waiting for their host to "
                  f"register, {len(report.existing)} already present; hosts re-registered: {len(report.hosts_restored)}")
    # Ids and reasons come from the history, where an earlier release may have let control
    # characters in: written as escapes, never acted on by the terminal.
    if report.drains_restored:
        console.print("drained again as their operator had: " + escape(shown(", ".join(report.drains_restored))))
    for h in report.hosts_refused:
        console.print(f"[yellow]host not restored[/] {escape(shown(h['host_id']))}: {escape(shown(h['reason']))} "
                      "(left to its agent, if its inventory is valid now)")
    for c in report.conflicts:
        what = shown(f"{c.get('id')}: {c.get('reason')}")
        console.print(f"[yellow]conflict[/] {escape(what)} (closed as recovery_conflict)")
    console.print("placements are open again")


def recorder_cmd(
    once: bool = typer.Option(False, "--once", help="Write the current backlog, refresh estimates, and exit."),
    status: bool = typer.Option(False, "--status", help="Print the backlog and exit."),
    batch_size: int = typer.Option(500, "--batch-size", min=1, max=10_000),
    trim: bool = typer.Option(True, "--trim/--no-trim", help="Trim acknowledged entries from the stream."),
    database_url: str = DB_URL,
    redis_url: str = REDIS_URL,
    namespace: str = NAMESPACE,
) -> None:
    """Copy the outbox stream into the history database (runs until interrupted)."""
    from .estimates import refresh_estimates
    from .recorder import Recorder

    with _reported():
        a = _allocator(redis_url, namespace)
        rec = Recorder(a, _engine(database_url), batch_size=batch_size, trim=trim)
        if status:
            _dump(rec.backlog().as_dict() | {"stats": a.redis.hgetall(a.keys.recorder)})
            return
        if once:
            total = rec.drain(timeout_s=3600)
            rec.close()
            est = refresh_estimates(rec.engine, a)
            _dump({"written": total.written, "duplicates": total.duplicates, "trimmed": total.trimmed,
                   "estimates": len(est), "backlog": rec.backlog().as_dict()})
            return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    err.print(f"recording {a.keys.events} as consumer {rec.consumer} of group {rec.group}; Ctrl-C stops")
    rec.run(stop)


def estimates_cmd(
    as_json: bool = AS_JSON,
    database_url: str = DB_URL,
    redis_url: str = REDIS_URL,
    namespace: str = NAMESPACE,
) -> None:
    """Recompute run-time estimates per task type (p50/p80) and store them in Redis for the scheduler."""
    from .estimates import refresh_estimates

    with _reported():
        est = refresh_estimates(_engine(database_url), _allocator(redis_url, namespace))
    if as_json:
        _dump({t: e.__dict__ for t, e in est.items()})
        return
    t = Table("task type", "n", "p50", "p80", "mean", "max")
    for e in sorted(est.values(), key=lambda e: e.task_type):
        t.add_row(Text(e.task_type), str(e.n), _fmt_ms(e.p50_ms), _fmt_ms(e.p80_ms), _fmt_ms(e.mean_ms), _fmt_ms(e.max_ms))
    console.print(t)


def register(app: typer.Typer) -> None:
    """Adds the history commands to the main CLI."""
    app.add_typer(db_app, name="db")
    app.command("history")(history_cmd)
    app.command("usage")(usage_cmd)
    app.command("recover")(recover_cmd)
    app.command("recorder")(recorder_cmd)
    app.command("estimates")(estimates_cmd)
