"""``create_app``: the FastAPI application of ``allocator api``.

One ``Allocator`` (a redis-py client with its pool) serves every request; REST handlers run in
FastAPI's thread pool, the WebSocket handler offloads Redis calls and policy evaluation to
threads. Two background loops live in the app's lifespan: the waiters' poll (status of requests
waiting in line) and the outbox tally for /metrics (so events are counted even when Prometheus
scrapes rarely and the recorder trims the stream in between).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..client import Allocator
from ..errors import REDIS_UNAVAILABLE, AllocatorError
from .config import ApiConfig
from .errors import BackendUnavailable, error_body, from_validation_errors, status_of
from .gate import RequestGate
from .metrics import build_registry, count_refusal, tally
from .policies import PolicyLoader
from .routes import open_router, v1
from .state import ApiState
from .tasks import TaskRegistry
from .waiters import Waiters
from .ws import router as ws_router

log = logging.getLogger(__name__)

DESCRIPTION = """GPU memory, CPU cores and RAM for queued tasks, over HTTP.

* REST under `/v1`: capacity, hosts, allocations (allocate / get / list / release) and queued
  function tasks (submit a registered task by name, position, ETA, cancel).
* WebSocket `/ws/allocate`: seed 003's message with a pluggable placement policy; streams the
  place in line and ETA while the request waits, ends with `{cluster_id, node_id, gpus}`.
* `/metrics`: Prometheus, read from Redis at scrape time. `/health`: liveness.

Errors: `{"error": {"code", "message", "field"}}`. With `ALLOCATOR_API_TOKEN` set, every route
but `/health` and `/metrics` needs `Authorization: Bearer <token>`.
"""

HTTP_CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED",
              413: "TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}


async def _tally_loop(state: ApiState) -> None:
    failing = False
    while True:
        try:
            await asyncio.to_thread(tally, state.allocator)
            failing = False
        except (redis.RedisError, AllocatorError) as exc:
            if not failing:
                log.warning("outbox tally failed (metrics counts wait until Redis answers): %s", exc)
            failing = True
        await asyncio.sleep(state.config.tally_interval_s)


def create_app(allocator: Allocator | None = None, config: ApiConfig | None = None,
               tasks: TaskRegistry | None = None) -> FastAPI:
    """The app; by default everything comes from ``ALLOCATOR_*`` variables."""
    config = config or ApiConfig.from_env()
    allocator = allocator or Allocator.from_env()
    tasks = tasks if tasks is not None else TaskRegistry.from_config(config.tasks, config.tasks_file)
    registry, api_latency = build_registry(allocator)
    state = ApiState(allocator=allocator, config=config, tasks=tasks,
                     policies=PolicyLoader(config.allowed_policy_modules),
                     waiters=Waiters(allocator, config.poll_interval_s), registry=registry, api_latency=api_latency,
                     policy_threads=ThreadPoolExecutor(max_workers=16, thread_name_prefix="policy"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loops = [asyncio.create_task(state.waiters.run()), asyncio.create_task(_tally_loop(state))]
        try:
            yield
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            state.policy_threads.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rq-allocator", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.api = state
    app.include_router(open_router)
    app.include_router(v1)
    app.include_router(ws_router)
    app.add_middleware(RequestGate, state=state)

    @app.exception_handler(AllocatorError)
    async def _allocator_error(request: Request, exc: AllocatorError) -> JSONResponse:
        status = status_of(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(exc), status_code=status, headers=headers)

    # (A /v1 request without the token never gets here: RequestGate refuses it before its body.)
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_errors(list(exc.errors()))
        if request.method == "POST" and request.url.path in ("/v1/allocations", "/v1/allocations/batch"):
            await asyncio.to_thread(count_refusal, state.allocator, err.code)  # an allocation attempt refused
        return JSONResponse(error_body(err), status_code=status_of(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "HTTP_ERROR")
        if exc.status_code == 400 and "error parsing the body" in str(exc.detail):
            code = "MALFORMED_JSON"  # FastAPI's answer to a body its JSON parser gave up on (nesting too deep)
        body: dict[str, Any] = {"error": {"code": code, "message": str(exc.detail), "field": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def _backend_error(conn: Request | WebSocket, exc: Exception) -> JSONResponse | None:
        # Not a bug of the server: the client should retry (503), and the log needs no traceback.
        log.warning("Redis unavailable on %s %s: %s: %s", getattr(conn, "method", "WS"), conn.url.path,
                    type(exc).__name__, exc)
        err = BackendUnavailable(f"the ledger's Redis is unavailable ({type(exc).__name__}); try again shortly")
        if isinstance(conn, WebSocket):  # (a session reports its own; this is what escaped it)
            try:
                await conn.close(code=4000 + status_of(err))
            except Exception:
                pass
            return None
        return JSONResponse(error_body(err), status_code=status_of(err))

    for kind in REDIS_UNAVAILABLE:
        app.add_exception_handler(kind, _backend_error)  # any other Redis error is a bug: the 500 below

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc,
                  exc_info=exc)
        return JSONResponse({"error": {"code": "INTERNAL", "message": "internal server error", "field": None}},
                            status_code=500)

    return app
