"""bench/scan_cost.py on a tiny fleet: it measures the placement scan of place's own library per
request shape and window, next to one summary GET, and leaves nothing behind."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import scan_cost  # noqa: E402


def test_the_scan_benchmark_reports_every_shape_and_window_next_to_a_summary_get(redis_url, tmp_path):
    out = tmp_path / "scan.json"
    rc = scan_cost.main(["--hosts", "16", "--held", "20", "--requests", "4", "--rounds", "1", "--repeat", "1",
                         "--redis-url", redis_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["held"] == 20
    rows = {row["shape"]: row for row in doc["results"]}
    assert set(rows) == set(scan_cost.SHAPES)
    for row in rows.values():
        assert row["get_us"] > 0
        for mode, window in scan_cost.CASES:
            assert f"{mode}{window}_us" in row


def test_the_scan_benchmark_runs_the_shipped_library_with_only_the_window_changed():
    shipped = scan_cost.scan_script(8)
    narrow = scan_cost.scan_script(2)
    assert scan_cost.WINDOW_LINE in shipped and scan_cost.WINDOW_LINE not in narrow
    assert narrow.replace("local BEST_WINDOW = 2", scan_cost.WINDOW_LINE) == shipped


def test_the_scan_benchmark_leaves_no_keys(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    before = {k for k in r.scan_iter(match="*bench-scan-*")}
    scan_cost.main(["--hosts", "4", "--held", "2", "--requests", "2", "--rounds", "1", "--repeat", "1",
                    "--redis-url", redis_url])
    assert {k for k in r.scan_iter(match="*bench-scan-*")} == before
