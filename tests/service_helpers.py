"""Tiny real services for the tests of worker slots and shared named services.

``TCP_SERVICE`` is a Python one-liner that listens on ``{port}`` (starts in ~20 ms); ``HTTP_SERVICE``
is ``python -m http.server {port}``. Port pools are taken from free random ranges so test runs
(and other programs) on the same machine do not collide on 9000-9099.
"""

from __future__ import annotations

import random
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from allocator.services import ServiceCatalog

_LISTEN = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(64)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.close()\n"
)
TCP_SERVICE = [sys.executable, "-S", "-c", _LISTEN, "{port}"]
HTTP_SERVICE = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
FAILING_SERVICE = [sys.executable, "-S", "-c", "import sys; print('no config for', sys.argv[1]); sys.exit(3)", "{port}"]
SEED_SERVERS = ("filesystem", "github", "database")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_ports(n: int = 8) -> tuple[int, int]:
    """A range of n consecutive ports nothing listens on now (from 20000-59999)."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 60000 - n)
        if all(_bindable(p) for p in range(lo, lo + n)):
            return lo, lo + n - 1
    raise RuntimeError("no free port range found")


def catalog(names: tuple[str, ...] | list[str] = SEED_SERVERS, command: list[str] | None = None,
            **fields: Any) -> ServiceCatalog:
    """A catalog with the same tiny command under each name."""
    entry = {"command": command or TCP_SERVICE, "start_timeout_s": 10, **fields}
    return ServiceCatalog.load({n: dict(entry) for n in names})


def wait_until(cond: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Polls cond until it returns something truthy; fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False



def serve_services(a: Any, host_id: str = "local", names: tuple[str, ...] | list[str] = SEED_SERVERS,
                   command: list[str] | None = None, **fields: Any) -> Any:
    """Gives a registered host a catalog of tiny services and runs its supervisor in a thread (it
    stops its processes and exits once the host, or the test's namespace, is gone). Register the
    host with ``service_ports=free_ports()`` so that parallel test runs do not share 9000-9099."""
    from allocator.agent.services import ServiceSupervisor

    sup = ServiceSupervisor(a, host_id, catalog(names, command, **fields), exit_when_host_gone=True)
    sup.publish()
    sup.start()
    return sup


def register_with_services(a: Any, names: tuple[str, ...] | list[str] = SEED_SERVERS, **host: Any) -> Any:
    """``a.register_host(**host)`` on a free port range, then ``serve_services`` for it, e.g.
    ``register_with_services(alloc, id="local", cpu_cores=16, ram_mb=32768)``."""
    host.setdefault("service_ports", free_ports(max(8, 2 * len(names))))
    a.register_host(**host)
    return serve_services(a, host["id"], names)
