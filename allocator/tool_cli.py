"""``allocator tool`` (one JSON request on stdin or --file, one JSON result on stdout) and
``allocator mcp`` (the same tools over MCP)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .cli_common import NAMESPACE, REDIS_URL, err, listen_failure_exits_1, settings_url
from .cli_common import log_level as check_log_level
from .client import Allocator, check_namespace, check_redis_url
from .config import Settings
from .errors import InvalidRequest, TaskRegistryError
from .tool import ToolContext, definitions, dumps, run_document
from .tool_schema import SCHEMA_FORMATS


def _allocator_factory(redis_url: Optional[str], namespace: Optional[str]):  # noqa: ANN202
    """Connects on first use, so a malformed request is answered without Redis."""

    def make() -> Allocator:
        url = settings_url(redis_url)
        if not url:
            raise InvalidRequest("redis_url", "no Redis configured: set ALLOCATOR_REDIS_URL or --redis-url")
        return Allocator.from_env(redis_url=url, namespace=namespace or Settings.from_env().namespace)

    return make


def tool(
    fmt: Optional[str] = typer.Argument(None, metavar="[FORMAT]", help="With --schema: native (default), openai or anthropic."),
    schema: bool = typer.Option(False, "--schema", help="Print the tool definitions (JSON Schema) and exit."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the request from FILE instead of stdin ('-' = stdin)."),
    pretty: bool = typer.Option(False, "--pretty", help="Indent the JSON output."),
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
    log_level: str = typer.Option("WARNING", "--log-level", help="Log level (logs go to stderr)."),
) -> None:
    """Run one agent tool call: {"tool": NAME, "params": {...}} in, the result JSON out.

    Exit 0 done, 1 refused (does not fit, not found), 2 invalid input. `--schema [FORMAT]` prints
    the tool definitions for agent frameworks.
    """
    logging.basicConfig(level=check_log_level(log_level, "--log-level"), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if schema or fmt is not None:
        name = fmt or "native"
        if not schema or name not in SCHEMA_FORMATS:
            err.print(f"[bold red]invalid:[/] use `allocator tool --schema \\[{'|'.join(SCHEMA_FORMATS)}]`")
            raise typer.Exit(2)
        try:
            defs = definitions(name)
        except TaskRegistryError as exc:  # the schema lists the registered task names
            err.print(f"[bold red]invalid:[/] {escape(exc.message)}")
            raise typer.Exit(2) from None
        sys.stdout.write(json.dumps(defs, indent=2) + "\n")
        return
    try:
        data = sys.stdin.buffer.read() if file is None or str(file) == "-" else file.read_bytes()
    except OSError as exc:
        sys.stdout.write(dumps({"success": False, "error": {"code": "INVALID_REQUEST", "message": f"cannot read {file}: {exc.strerror}",
                                                             "field": "file"}}) + "\n")
        raise typer.Exit(2) from None
    outcome = run_document(data, ToolContext(_allocator_factory(redis_url, namespace)))
    text = dumps(outcome.payload, indent=2 if pretty else None)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if outcome.is_error:
        logging.getLogger("allocator.tool").info("%s", outcome.message)
    raise typer.Exit(outcome.status)


def mcp(
    http: bool = typer.Option(False, "--http", help="Serve streamable HTTP instead of stdio."),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP bind address."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="HTTP port."),
    path: str = typer.Option("/mcp", "--path", help="HTTP endpoint path."),
    token: Optional[str] = typer.Option(None, "--token", envvar="ALLOCATOR_MCP_TOKEN", show_default=False,
                                        help="With --http: bearer token every request must carry (prefer the variable: flags show in ps)."),
    redis_url: Optional[str] = REDIS_URL,
    namespace: Optional[str] = NAMESPACE,
) -> None:
    """Serve the allocator tools over MCP (stdio for a local agent host, --http for remote clients,
    with --token / ALLOCATOR_MCP_TOKEN)."""
    from .mcp_server import serve

    url = settings_url(redis_url)
    if not url:
        err.print("[bold red]invalid:[/] no Redis configured: set ALLOCATOR_REDIS_URL or --redis-url")
        raise typer.Exit(2)
    try:
        # The operator's settings and URL are checked now: an error in them is the operator's, not
        # the invalid input of every tool call that would meet it later.
        settings = Settings.from_env()
        check_redis_url(url)
        check_namespace(namespace or settings.namespace)
    except InvalidRequest as exc:
        err.print(f"[bold red]invalid:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    try:
        with listen_failure_exits_1(host, port):
            serve(_allocator_factory(redis_url, namespace), http=http, host=host, port=port, path=path, token=token)
    except TaskRegistryError as exc:  # the tools' schemas list the registered task names
        err.print(f"[bold red]invalid:[/] {escape(exc.message)}")
        raise typer.Exit(2) from None


def register(app: typer.Typer) -> None:
    app.command("tool")(tool)
    app.command("mcp")(mcp)
