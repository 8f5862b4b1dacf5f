"""A real uvicorn server on loopback per test (own namespace of the real Redis), and clients.

The server runs in a thread of the test process, bound to a socket on 127.0.0.1 port 0, so tests
can reach the same ``Allocator`` to set up fleets and check the ledger directly.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from allocator import Allocator
from allocator.api.app import create_app
from allocator.api.config import ApiConfig
from allocator.api.tasks import TaskRegistry
from tests.conftest import ledger_dump

TOKEN = "test-token-" + uuid.uuid4().hex[:8]
AUTH = {"Authorization": f"Bearer {TOKEN}"}

FLEET: list[dict[str, Any]] = [
    {"id": "gpu-a", "labels": {"cluster": "lab", "zone": "z1"}, "cpu_cores": 16, "ram_mb": "128Gi",
     "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}, {"index": 1, "model": "A100", "memory_mb": "40Gi"}]},
    {"id": "gpu-b", "labels": {"cluster": "lab", "zone": "z2"}, "cpu_cores": 8, "ram_mb": "64Gi",
     "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}, {"index": 1, "model": "T4", "memory_mb": "16Gi"}]},
    {"id": "gpu-c", "labels": {"cluster": "edge"}, "cpu_cores": 4, "ram_mb": "16Gi",
     "gpus": [{"index": 0, "model": "T4", "memory_mb": "16Gi"}]},
]


@dataclass
class LiveApi:
    url: str
    allocator: Allocator
    config: ApiConfig
    server: uvicorn.Server
    thread: threading.Thread
    app: Any = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/allocate"

    def client(self, auth: bool = True) -> httpx.Client:
        c = httpx.Client(base_url=self.url, headers=AUTH if auth else {}, timeout=10)
        self.clients.append(c)
        return c

    def register_fleet(self, fleet: list[dict[str, Any]] = FLEET) -> None:
        for h in fleet:
            self.allocator.register_host(h)

    def ledger(self) -> dict[bytes, bytes]:
        """The ledger's keys (without the API's own statistics) to prove nothing changed."""
        skip = {self.allocator.keys.api_stats.encode(), self.allocator.keys.eta_predictions.encode()}
        return {k: v for k, v in ledger_dump(self.allocator).items() if k not in skip}

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.server.should_exit = True
        self.thread.join(10)


def start_server(a: Allocator, config: ApiConfig, tasks: TaskRegistry | None = None) -> LiveApi:
    app = create_app(a, config, tasks)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="websockets-sansio", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    return LiveApi(f"http://127.0.0.1:{port}", a, config, server, thread, app)


@pytest.fixture
def api_factory(redis_url: str) -> Iterator[Callable[..., LiveApi]]:
    """Starts servers on demand: ``api_factory(token=..., policy_timeout_s=..., ...)``."""
    live: list[LiveApi] = []

    def start(*, token: str | None = TOKEN, tasks: dict[str, Any] | None = None, **cfg: Any) -> LiveApi:
        a = Allocator(redis_url, namespace="test-api-" + uuid.uuid4().hex[:10])
        cfg.setdefault("policy_modules", ("tests.api.policy_plugins",))
        cfg.setdefault("poll_interval_s", 0.02)
        cfg.setdefault("tally_interval_s", 0.2)
        config = ApiConfig(token=token, **cfg)
        registry = TaskRegistry(tasks if tasks is not None else {"add": "tests.api.task_funcs:add"})
        server = start_server(a, config, registry)
        live.append(server)
        return server

    yield start
    for s in live:
        s.stop()
        s.allocator.destroy()
        s.allocator.redis.close()


@pytest.fixture
def api(api_factory: Callable[..., LiveApi]) -> LiveApi:
    server = api_factory()
    server.register_fleet()
    return server


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Polls ``predicate`` until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
