"""The real rq-dashboard, pointed at the test Redis, shows each job where it really is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from allocator.queue import host_queue_name

from . import jobs
from .test_worker import gpu_host, run_worker, start_worker, wait_until

pytest.importorskip("rq_dashboard", reason="pip install rq-dashboard six")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/0/data/{path}", timeout=5) as r:
        return json.loads(r.read())


def start_dashboard(a) -> tuple[subprocess.Popen, int]:
    port = free_port()
    url = "redis://{host}:{port}/{db}".format(**a.redis.connection_pool.connection_kwargs)
    exe = Path(sys.executable).parent / "rq-dashboard"
    proc = subprocess.Popen([str(exe), "--redis-url", url, "-b", "127.0.0.1", "-p", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 20
    while True:
        try:
            get(port, "queues.json")
            return proc, port
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "rq-dashboard did not start"
            time.sleep(0.1)


def test_dashboard_lists_pending_running_finished_and_failed_jobs(alloc, tmp_path):
    gpu_host(alloc)
    ns = alloc.keys.namespace
    hq = host_queue_name(ns, "h1")
    ok = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    bad = alloc.enqueue(jobs.fail, resources={"cpu_cores": 1})
    run_worker(alloc, "h1")
    running = alloc.enqueue(jobs.sleep_until_file, str(tmp_path / "stop"), resources={"gpus": 2})
    first = alloc.enqueue(jobs.add, 1, 1, resources={"gpus": 1}, priority="high")
    second = alloc.enqueue(jobs.add, 2, 2, resources={"gpus": 1}, priority="high")
    worker = start_worker(alloc, "h1")
    dash, port = start_dashboard(alloc)
    try:
        wait_until(lambda: running.job.get_status() == "started")
        queues = {q["name"]: q for q in get(port, "queues.json")["queues"]}
        assert queues[f"{ns}.high"]["count"] == 2
        assert hq in queues
        pending = get(port, f"jobs/{ns}.high/queued/20/asc/1.json")["jobs"]
        assert [j["id"] for j in pending] == [first.id, second.id]
        started = get(port, f"jobs/{hq}/started/20/asc/1.json")["jobs"]
        assert [j["id"] for j in started] == [running.id]
        assert [j["id"] for j in get(port, f"jobs/{hq}/finished/20/asc/1.json")["jobs"]] == [ok.id]
        assert [j["id"] for j in get(port, f"jobs/{hq}/failed/20/asc/1.json")["jobs"]] == [bad.id]
        mine = [w for w in get(port, "workers.json")["workers"] if hq in w["queues"]]
        assert len(mine) == 1 and mine[0]["state"] == "busy"
        assert mine[0]["current_job"]["job_id"] == running.id
        detail = get(port, f"job/{running.id}.json")
        assert detail["origin"] == hq and detail["status"] == "started"
    finally:
        (tmp_path / "stop").touch()
        dash.terminate()
        worker.terminate()
        dash.wait(10)
        worker.wait(10)
