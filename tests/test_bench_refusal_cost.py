"""bench/refusal_cost.py on a tiny fleet: it measures refusals and releases next to the trivial
script, and leaves nothing behind."""

import json
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import refusal_cost  # noqa: E402


def test_the_refusal_benchmark_reports_each_refusal_and_release_next_to_the_trivial_call(redis_url, tmp_path):
    out = tmp_path / "refusal.json"
    r = redis.Redis.from_url(redis_url)
    before = set(r.scan_iter(match="*bench-refusal-*"))
    rc = refusal_cost.main(["--hosts", "8", "--gpus", "2", "--model-hosts", "2", "--rounds", "2", "--repeat", "1",
                            "--redis-url", redis_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = {row["what"]: row for row in doc["results"]}
    assert set(rows) == {"trivial", *(f"refusal: {k}" for k in refusal_cost.REFUSALS), "release, nothing in line",
                         "release, a task for the taken model heads the line"}
    assert rows["trivial"]["vs_trivial"] == 1
    assert all(row["server_us"] > 0 for row in rows.values())
    assert set(r.scan_iter(match="*bench-refusal-*")) == before
