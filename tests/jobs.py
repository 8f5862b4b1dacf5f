"""Functions the worker tests run as RQ jobs (importable by worker subprocesses)."""

from __future__ import annotations

import os
import signal
import time


def report_environment() -> dict:
    return {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "ALLOCATOR_ALLOCATION_ID": os.environ.get("ALLOCATOR_ALLOCATION_ID"),
        "affinity": sorted(os.sched_getaffinity(0)),
    }


def add(x: int, y: int) -> int:
    return x + y


def fail() -> None:
    raise RuntimeError("task failed on purpose")


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def kill_own_horse() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_until_file(path: str, limit: float = 30.0) -> str:
    """Runs until ``path`` exists (or ``limit`` seconds): a job the test can preempt mid-run."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


def sleep_then_touch(seconds: float, done: str) -> str:
    """Sleeps, then creates ``done``: a job that was stopped leaves no file behind."""
    time.sleep(seconds)
    open(done, "w").close()
    return "done"


def fail_until(counter: str, failures: int) -> int:
    """Fails its first ``failures`` runs (counted in the file ``counter``), then returns the run count."""
    runs = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as f:
        f.write(str(runs + 1))
    if runs < failures:
        raise RuntimeError(f"run {runs + 1} fails")
    return runs + 1


def leave_a_child_behind(pid_file: str) -> str:
    """Starts a long subprocess, writes its pid to ``pid_file`` and returns without waiting for it."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    return "done"


def log_run(path: str, seconds: float) -> str:
    """Appends "start", sleeps, appends "end": the file tells which runs were stopped midway."""
    with open(path, "a") as f:
        f.write("start\n")
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write("end\n")
    return "done"


def report_cpu() -> dict:
    """The CPU the run got: its scheduling policy (os.SCHED_*), affinity and granted core list."""
    return {
        "policy": os.sched_getscheduler(0),
        "affinity": sorted(os.sched_getaffinity(0)),
        "ALLOCATOR_CPU_CORES": os.environ.get("ALLOCATOR_CPU_CORES"),
    }


def leave_a_detached_child_behind(pid_file: str) -> str:
    """As ``leave_a_child_behind``, but the subprocess starts a session (and process group) of its own."""
    import subprocess

    child = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    return "done"
