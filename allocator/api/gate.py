"""``RequestGate``: what the API refuses before it reads a request's body.

FastAPI reads and parses a route's whole body before any dependency runs, so the token check of
the routes came after the body was in memory: a caller without the token could make the server
hold a body of any size (a 200 MiB body took 1.3 GB before its 401). This ASGI middleware, in
front of the app, refuses a ``/v1`` request without the token (401) and a body larger than
``max_body_bytes`` (413 ``TOO_LARGE``), by its Content-Length or, for a streamed body, as soon as
the bytes read pass the limit. WebSocket connections pass through (they check the token at the
handshake, and uvicorn caps their frames).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from ..errors import AllocatorError
from .errors import error_body, status_of
from .state import ApiState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (ALLOCATOR_API_MAX_BODY_BYTES)"


class RequestGate:
    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = self.state.config.max_body_bytes
        if scope["path"].startswith("/v1/"):
            try:
                self.state.check_token(headers.get("authorization"))
            except AllocatorError as denied:
                await _reply(send, status_of(denied), error_body(denied), {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _reply(send, 413, {"error": {"code": "TOO_LARGE", "message": too_large(limit), "field": None}})
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:  # a body sent without its length (chunked), or longer than it said
                    raise HTTPException(413, too_large(limit))
            return message

        await self.app(scope, counted, send)


async def _reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})
