"""Functions the fault tests run as RQ jobs (imported by worker subprocesses).

``record_run`` appends one JSON line when it starts and one when it ends to ``<log_dir>/<label>.runs``
(pid, allocation id, host, pinned cores), so a test can count how often a task ran and where, and
can hold a run open until the file ``<log_dir>/<go>`` exists (``{pid}`` in ``go`` is replaced by
the run's pid, so two runs of one task can be let go one at a time).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record_run(log_dir: str, label: str, go: str | None = None, limit: float = 60.0) -> str:
    d = Path(log_dir)
    base = {"label": label, "pid": os.getpid(), "allocation": os.environ.get("ALLOCATOR_ALLOCATION_ID"),
            "host": os.environ.get("ALLOCATOR_HOST_ID"), "cores": sorted(os.sched_getaffinity(0)),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    _append(d / f"{label}.runs", {**base, "event": "start", "t": time.time()})
    if go is not None:
        flag = d / go.format(pid=os.getpid())
        deadline = time.monotonic() + limit
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    _append(d / f"{label}.runs", {**base, "event": "end", "t": time.time()})
    return f"{label} done"
