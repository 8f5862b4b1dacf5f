"""bench/cpus.py: which CPUs a benchmark's server and clients run on (Linux CPU affinity)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpus, ledger  # noqa: E402


@pytest.mark.parametrize(("text", "expected"), [("0", {0}), ("0-0", {0}), (" 0 , 0 ", {0})])
def test_a_cpu_list_names_cpus_and_ranges(text, expected):
    assert cpus.parse_cpus(text, "--client-cpus") == expected


@pytest.mark.parametrize(("text", "why"), [
    ("x", "'x' is not a CPU number"),
    ("1-0", "'1-0' is not a CPU range"),
    ("", "no CPU given"),
    ("100000", "this machine has no CPU 100000"),
])
def test_a_bad_cpu_list_names_the_option_and_why(text, why):
    with pytest.raises(cpus.CpuError) as err:
        cpus.parse_cpus(text, "--redis-cpus")
    assert str(err.value).startswith("--redis-cpus: ") and why in str(err.value)


def test_only_a_server_on_this_machine_can_be_pinned(redis_url):
    r = redis.Redis.from_url(redis_url)
    with pytest.raises(cpus.CpuError, match="not on this machine"):
        cpus.local_server_pid(r, "redis://redis.example.org:6379/0")
    if (urlparse(redis_url).hostname or "") not in cpus.LOCAL_HOSTS:
        pytest.skip("the test Redis runs on another machine")
    assert cpus.local_server_pid(r, redis_url) == int(r.info("server")["process_id"])


def test_pinning_a_process_sets_its_cpus_and_returns_the_ones_it_had():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        had = os.sched_getaffinity(child.pid)
        assert cpus.pin(child.pid, {0}) == had
        assert os.sched_getaffinity(child.pid) == {0}
    finally:
        child.kill()
        child.wait()


def test_the_header_says_whether_server_and_clients_share_cpus():
    assert cpus.describe(None, None) == "server and clients share every CPU"
    assert cpus.describe({0}, {0}) == "server on CPU 0, clients on CPU 0 (sharing CPU 0)"
    if len(os.sched_getaffinity(0)) > 1:
        other = max(os.sched_getaffinity(0))
        assert cpus.describe({0}, {other}) == f"server on CPU 0, clients on CPU {other} (apart)"


def test_the_ledger_benchmark_runs_its_clients_on_the_cpus_given_and_gives_its_own_back(redis_url, tmp_path):
    out = tmp_path / "ledger.json"
    had = os.sched_getaffinity(0)
    rc = ledger.main(["--seconds", "0.2", "--fleets", "small", "--small-hosts", "4", "--clients", "1",
                      "--window", "4", "--no-script-only", "--client-cpus", "0", "--redis-url", redis_url,
                      "--json", str(out)])
    assert rc == 0
    assert os.sched_getaffinity(0) == had
    doc = json.loads(out.read_text())
    assert doc["cpus"]["clients"] == [0] and doc["cpus"]["redis"] is None
