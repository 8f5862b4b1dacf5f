"""bench/cpus.py: which CPUs a benchmark's server and clients run on (Linux CPU affinity)."""

import json
import os
import shutil
import subprocess
import sys
import time
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


class FakeInfo:
    """A server's INFO, as another container's Redis would answer it: only what the check reads."""

    def __init__(self, process_id: int, tcp_port: int = 6379) -> None:
        self.server = {"process_id": process_id, "tcp_port": tcp_port}

    def info(self, section: str | None = None) -> dict:
        return self.server


@pytest.fixture
def fake_server():
    """A local process whose command line names redis-server (its comm stays sleep's): what the
    pid of a server may look like here, without a server."""
    child = subprocess.Popen(["redis-server", "30"], executable=shutil.which("sleep"))
    try:
        # Until the exec, the child is a copy of this process and carries its name.
        deadline = time.monotonic() + 10
        while cpus.process_names(child.pid)[1] != "redis-server" and time.monotonic() < deadline:
            time.sleep(0.005)
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_a_pid_that_is_no_redis_server_here_is_not_pinned():
    # Another container's server may report the pid of an unrelated local process: this one.
    with pytest.raises(cpus.CpuError, match=f"process {os.getpid()} here is 'python.*', not a Redis server"):
        cpus.local_server_pid(FakeInfo(os.getpid()), "redis://127.0.0.1:6379/0")


def test_a_server_that_listens_on_another_port_than_the_urls_is_not_pinned(fake_server):
    assert cpus.local_server_pid(FakeInfo(fake_server, 6379), "redis://127.0.0.1/0") == fake_server
    with pytest.raises(cpus.CpuError, match="reports tcp_port 6379, not the URL's port 6390"):
        cpus.local_server_pid(FakeInfo(fake_server, 6379), "redis://127.0.0.1:6390/0")
    # A Unix socket has no port to compare: the process's name is the check.
    assert cpus.local_server_pid(FakeInfo(fake_server, 0), "unix:///tmp/redis.sock") == fake_server


def test_the_local_test_server_is_recognised_by_its_name_and_port(redis_url):
    if (urlparse(redis_url).hostname or "") not in cpus.LOCAL_HOSTS:
        pytest.skip("the test Redis runs on another machine")
    info = redis.Redis.from_url(redis_url).info("server")
    pid = int(info["process_id"])
    if not cpus.process_names(pid)[0]:
        pytest.skip(f"the test Redis's process {pid} is not visible here (another container)")
    fake = FakeInfo(pid, int(info["tcp_port"]))
    assert cpus.local_server_pid(fake, redis_url) == pid


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
