"""bench/screened_walk.py on a tiny fleet: it measures placements with and without models or
selectors, a refusal and a release next to the trivial script, and leaves nothing behind."""

import json
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import screened_walk  # noqa: E402


def test_the_screened_walk_benchmark_reports_each_call_next_to_the_trivial_call(redis_url, tmp_path):
    out = tmp_path / "screened.json"
    r = redis.Redis.from_url(redis_url)
    before = set(r.scan_iter(match="*bench-screened-*"))
    rc = screened_walk.main(["--hosts", "40", "--gpus", "2", "--rare-hosts", "2", "--mid-hosts", "3", "--rounds", "2",
                             "--repeat", "1", "--redis-url", redis_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = {row["what"]: row for row in doc["results"]}
    assert set(rows) == {"trivial", *(f"place: {k}" for k in screened_walk.PLACEMENTS),
                         "place: zone=rare, host sets out of step", "refusal: zone=rare, its hosts taken",
                         "release, a task for zone=rare heads the line"}
    assert rows["trivial"]["vs_trivial"] == 1
    assert all(row["server_us"] > 0 and row["refused"] == 0 for row in rows.values())  # a fleet short of the bound
    assert set(r.scan_iter(match="*bench-screened-*")) == before
