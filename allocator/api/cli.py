"""``allocator api``: serve the HTTP/WebSocket API with uvicorn.

FastAPI and uvicorn are imported only when the command runs, so the rest of the CLI starts fast.
Scale out by running more replicas behind a load balancer: every replica is stateless (waiting
WebSocket requests live in Redis; a replica that dies cancels nothing, and the request's TTL
bounds a lease nobody collects).
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from ..cli_common import listen_failure_exits_1, redacted
from ..cli_common import log_level as check_log_level
from ..config import Settings


def api_command(
    bind: str = typer.Option("127.0.0.1", "--bind", envvar="ALLOCATOR_API_BIND", help="Address to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, "--port", envvar="ALLOCATOR_API_PORT", min=1, max=65535, help="TCP port."),
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="ALLOCATOR_REDIS_URL", help="Redis URL of the ledger; unset = embedded."),
    namespace: Optional[str] = typer.Option(None, "--namespace", envvar="ALLOCATOR_NAMESPACE", help="Key namespace (default alloc)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="ALLOCATOR_API_TOKEN", show_default=False,
                                        help="Bearer token required on /v1 and /ws (prefer the variable: flags show in ps)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", envvar="ALLOCATOR_TASKS", help="Task registry: name=module:function,..."),
    tasks_file: Optional[str] = typer.Option(None, "--tasks-file", envvar="ALLOCATOR_TASKS_FILE", help="Task registry file (YAML or JSON)."),
    policy_modules: Optional[str] = typer.Option(None, "--policy-modules", envvar="ALLOCATOR_POLICY_MODULES",
                                                 help="Module prefixes policies may be loaded from by dotted path (comma-separated)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
    check: bool = typer.Option(False, "--check", help="Build the app (tasks, Redis), print its routes and exit."),
) -> None:
    """Serve the HTTP + WebSocket API and /metrics."""
    import uvicorn

    from ..client import Allocator
    from .app import create_app
    from .config import ApiConfig
    from ..errors import TaskRegistryError

    log_level = check_log_level(log_level, "--log-level")
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = Settings.from_env()
    url = redis_url or s.redis_url
    allocator = Allocator.from_env(**{k: v for k, v in {"redis_url": url, "namespace": namespace}.items() if v})
    config = ApiConfig.from_env(token=token, tasks=tasks, tasks_file=tasks_file, policy_modules=policy_modules)
    try:
        app = create_app(allocator, config)
        task_names = ", ".join(t["name"] for t in app.state.api.tasks.listing()) or "none"
    except TaskRegistryError as exc:  # a task that cannot be imported, a malformed entry
        raise typer.BadParameter(
            str(exc), param_hint="--tasks / --tasks-file (ALLOCATOR_TASKS, ALLOCATOR_TASKS_FILE, ALLOCATOR_TASK_MODULES)") from None
    log = logging.getLogger("allocator.api")
    log.info("namespace %r on Redis %s; token %s; tasks: %s; policy modules: %s", allocator.keys.namespace, redacted(url) if url else "(embedded)",
             "required" if config.token else "NOT required (set ALLOCATOR_API_TOKEN)", task_names,
             ", ".join(config.allowed_policy_modules))
    if check:
        allocator.redis.ping()
        from .ws import router as ws_router

        for path, ops in app.openapi()["paths"].items():
            typer.echo(f"{','.join(m.upper() for m in ops)} {path}")
        for r in ws_router.routes:
            typer.echo(f"WS {getattr(r, 'path', r)}")
        return
    from uvicorn.config import WS_PROTOCOLS

    ws = "websockets-sansio" if "websockets-sansio" in WS_PROTOCOLS else "auto"
    with listen_failure_exits_1(bind, port):
        uvicorn.run(app, host=bind, port=port, log_level=log_level.lower(), proxy_headers=True, ws=ws)


def register(app: typer.Typer) -> None:
    """Adds ``allocator api`` to the main CLI."""
    app.command("api")(api_command)
