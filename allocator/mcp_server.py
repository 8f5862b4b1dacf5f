"""``allocator mcp``: the agent tools (``allocator.tool``) served over MCP with the SDK's ``MCPServer``.

Each tool's ``inputSchema`` is the same JSON Schema ``allocator tool --schema`` publishes, and each
call runs through ``tool.run_tool``, so validation, results and errors are identical to the
JSON-on-stdin path. A result is structured content (the result document) plus its JSON text; a
refusal or invalid input is an MCP tool error (``isError``) whose text is the message and whose
structured content is the error document. stdio by default; streamable HTTP with ``--http``.
"""

from __future__ import annotations

import hmac
import logging
import sys
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.tools.base import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import ConfigDict

from . import __version__
from .client import Allocator
from .tool import TOOLS, ToolContext, ToolSpec, dumps, run_tool

INSTRUCTIONS = (
    "Allocates GPU memory, CPU cores and RAM on a fleet of hosts for tasks. Use resource_allocator to get "
    "resources for a task (placed now, or queued with its position and estimated start), release_resources "
    "when done, get_capacity / get_queue to see the fleet and the line. Memory is MiB or a size string ('4Gi')."
)
READ_ONLY = {"get_capacity", "get_allocation", "list_allocations", "get_task", "get_queue"}


class _RawArguments(ArgModelBase):
    """Takes the arguments as they came: ``run_tool`` validates them against the published schema."""

    model_config = ConfigDict(extra="allow")

    def model_dump_one_level(self) -> dict[str, Any]:
        return {"arguments": dict(self.model_extra or {})}


def _tool(spec: ToolSpec, ctx: ToolContext) -> Tool:
    def call(arguments: dict[str, Any]) -> CallToolResult:
        outcome = run_tool(spec.name, arguments, ctx)
        if outcome.is_error:
            return CallToolResult(content=[TextContent(type="text", text=outcome.message)],
                                  structured_content=outcome.payload, is_error=True)
        return CallToolResult(content=[TextContent(type="text", text=dumps(outcome.payload))],
                              structured_content=outcome.payload)

    call.__name__ = spec.name
    return Tool(
        fn=call,
        name=spec.name,
        description=spec.description,
        parameters=spec.schema,
        fn_metadata=FuncMetadata(arg_model=_RawArguments),
        is_async=False,
        annotations=ToolAnnotations(read_only_hint=spec.name in READ_ONLY,
                                    idempotent_hint=spec.name in READ_ONLY | {"release_resources", "cancel_task"}),
    )


def build_server(allocator: Allocator | Callable[[], Allocator]) -> MCPServer:
    """An MCP server whose tools act on ``allocator`` (or on the one the factory makes on first use)."""
    ctx = ToolContext(allocator)
    return MCPServer("rq-allocator", version=__version__, instructions=INSTRUCTIONS,
                     tools=[_tool(spec, ctx) for spec in TOOLS.values()])


class BearerAuth:
    """An HTTP request without ``Authorization: Bearer <token>`` is answered 401 before it reaches
    the tools (as the HTTP API guards /v1 with ``ALLOCATOR_API_TOKEN``); the lifespan passes."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = token.encode()

    def _allowed(self, header: bytes) -> bool:
        # The scheme is case-insensitive (RFC 7235), as the API reads it.
        scheme, _, given = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._expected)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if not self._allowed(dict(scope.get("headers") or ()).get(b"authorization", b"")):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body",
                            "body": b'{"error": "a bearer token is required (ALLOCATOR_MCP_TOKEN)"}'})
                return
        await self.app(scope, receive, send)


def http_app(allocator: Allocator | Callable[[], Allocator], *, token: str | None = None, host: str = "127.0.0.1",
             path: str = "/mcp") -> Any:
    """The streamable-HTTP ASGI app (stateless, JSON responses), behind ``BearerAuth`` when a
    token is given."""
    app = build_server(allocator).streamable_http_app(streamable_http_path=path, stateless_http=True,
                                                      json_response=True, host=host)
    return BearerAuth(app, token) if token else app


def serve(allocator: Allocator | Callable[[], Allocator], *, http: bool = False, host: str = "127.0.0.1",
          port: int = 8765, path: str = "/mcp", token: str | None = None) -> None:
    """Runs the server until interrupted (stdio: stdout is the wire, so logs go to stderr)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if http:
        import uvicorn

        if not token:
            logging.getLogger("allocator.mcp").warning(
                "serving MCP over HTTP on %s:%s with NO token: anyone who reaches the port can allocate, "
                "release and cancel (set ALLOCATOR_MCP_TOKEN)", host, port)
        uvicorn.run(http_app(allocator, token=token, host=host, path=path), host=host, port=port, log_level="warning")
    else:
        build_server(allocator).run()
