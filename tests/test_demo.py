"""``allocator demo`` end to end with no services configured: it starts its own Redis, history,
scheduler and workers, runs the whole mix, prints the summary, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _processes_with(namespace: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("ALLOCATOR_NAMESPACE") == namespace:
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def test_demo_runs_everything_and_cleans_up_with_no_services_configured(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCATOR_")}
    (tmp_path / "tmp").mkdir()
    env.update(PYTHONPATH=str(ROOT), ALLOCATOR_STATE_DIR=str(tmp_path / "state"), HOME=str(tmp_path),
               TMPDIR=str(tmp_path / "tmp"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "allocator", "demo", "--speed", "6", "--plain"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=180)
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # it used the embedded defaults
    assert "private redis-server" in out and "temporary SQLite file" in out
    # the live view: placements, positions and ETAs, the fleet with its GPUs, the line
    for text in ("placed", "queued", "ETA", "sim-a100", "GPU0", "A100", "queue", "#1"):
        assert text in out, text
    assert re.search(r"refused\s+train-huge .*no host could ever hold 4 GPUs", out)
    # the summary, from the ledger and from the history database
    assert "17 of 17 tasks finished, 0 failed" in out
    assert re.search(r"history \(\d+ events recorded\)", out)
    for task_type in ("finetune", "rendering", "ml_inference", "processing"):
        assert task_type in out
    # everything it started is gone
    port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/0", out).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    namespace = re.search(r"demo-[0-9a-f]{8}", out).group(0)
    assert _processes_with(namespace) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # its Redis data dir, SQLite file and logs
    assert not (tmp_path / "state").exists()
    assert elapsed < 120


def _demo_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCATOR_")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(PYTHONPATH=str(ROOT), ALLOCATOR_STATE_DIR=str(tmp_path / "state"), HOME=str(tmp_path),
               TMPDIR=str(tmp_path / "tmp"))
    return env


def test_a_demo_whose_history_url_is_no_url_says_so_in_one_line_and_cleans_up(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "allocator", "demo", "--plain", "--database-url", "foo"],
                          capture_output=True, text=True, env=_demo_env(tmp_path), cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "invalid: history database URL" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # its private Redis and temporary files are gone


def test_a_demo_whose_history_database_is_out_of_reach_is_refused_in_one_line(tmp_path):
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nothing"
    proc = subprocess.run([sys.executable, "-m", "allocator", "demo", "--plain", "--database-url", url],
                          capture_output=True, text=True, env=_demo_env(tmp_path), cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "refused: history database unavailable" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_startup_errors_of_any_command_read_as_one_line_with_their_exit_code():
    import sqlalchemy.exc

    from allocator.cli_common import startup_failure
    from allocator.errors import AllocatorError, NotConfigured

    assert startup_failure(NotConfigured("no Redis URL configured")) == (2, "invalid: no Redis URL configured")
    assert startup_failure(AllocatorError("the embedded redis-server did not start")) == (
        1, "refused: the embedded redis-server did not start")
    assert startup_failure(sqlalchemy.exc.ArgumentError("Could not parse"))[0] == 2
    assert startup_failure(KeyError("a bug")) is None  # keeps its traceback
