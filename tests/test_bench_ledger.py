"""bench/ledger.py on a tiny fleet: every phase runs against the real Redis, its figures come out
and it leaves nothing behind. The full run is the benchmark (docs/benchmarks.md, "Ledger")."""

import json
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ledger  # noqa: E402


def test_the_ledger_benchmark_measures_bursts_steady_state_and_the_trivial_call(redis_url, tmp_path):
    out = tmp_path / "ledger.json"
    md = tmp_path / "ledger.md"
    rc = ledger.main(["--seconds", "0.3", "--fleets", "small", "--small-hosts", "4", "--clients", "1,2",
                      "--window", "4", "--redis-url", redis_url, "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [row["clients"] for row in doc["results"]] == [1, 2]
    for row in doc["results"]:
        burst, steady, trivial = row["burst"], row["ledger"], row["trivial"]
        assert burst["rounds"] >= 1 and burst["allocs"] > 0 and burst["refusals"] == 0
        assert burst["releases"] == burst["allocs"]  # every round gives back what it took
        assert burst["allocs_per_s"] > 0 and burst["releases_per_s"] > 0 and trivial["calls_per_s"] > 0
        assert row["ratio"] == burst["allocs_per_s"] / trivial["calls_per_s"]
        assert steady["allocs"] > 0 and row["steady_ratio"] > 0
        assert row["script"]["allocs"] > 0
    assert "allocs/s ÷ trivial" in md.read_text()
    r = redis.Redis.from_url(redis_url)
    assert not list(r.scan_iter(match=f"*{doc['fleets'][0]['namespace']}*"))


def test_repeated_runs_judge_the_goals_on_the_medians(redis_url, tmp_path):
    out = tmp_path / "ledger.json"
    rc = ledger.main(["--seconds", "0.2", "--fleets", "small", "--small-hosts", "4", "--clients", "1",
                      "--window", "4", "--repeat", "3", "--no-script-only", "--redis-url", redis_url,
                      "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    runs = row["runs"]
    assert len(runs) == 3
    assert row["ratio"] == sorted(x["ratio"] for x in runs)[1]
    assert row["p99_median_ms"] == sorted(x["a_p99_ms"] for x in runs)[1]
    assert row["steady_p99_median_ms"] == sorted(x["steady_a_p99_ms"] for x in runs)[1]
    assert row["p50_median_ms"] == sorted(x["a_p50_ms"] for x in runs)[1]  # what the scale goal is judged on


def test_the_trivial_script_answers_json_like_every_ledger_script(alloc):
    assert alloc._call("noop") == 1


def test_server_figures_count_the_commands_a_script_runs_inside_it(alloc):
    key = alloc.keys.prefix + "bench-inner"
    before = ledger.server_stats(alloc.redis)
    alloc.redis.eval("for i = 1, 2000 do redis.call('ZADD', KEYS[1], i, 'm' .. i) end", 1, key)
    after = ledger.server_stats(alloc.redis)
    alloc.redis.delete(key)
    assert after["inner_usec"] > before["inner_usec"]  # 2,000 ZADDs take the server some µs


def test_slow_calls_are_those_past_a_bucket_of_the_latency_histogram(alloc):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")  # at least one EVALSHA so far
    over_none, over_all = ledger._evalsha_over(alloc.redis, 10**9), ledger._evalsha_over(alloc.redis, 0)
    if over_none != over_none:  # NaN: a server without the histogram (Redis 6.2)
        assert over_all != over_all
        return
    assert over_none == 0.0  # no call takes longer than every bucket
    assert over_all >= 1.0  # every call takes longer than 0 µs


def test_percentiles_are_nearest_rank():
    from bench.ledger import pct

    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert (pct(values, 50), pct(values, 99), pct(values, 100)) == (50.0, 99.0, 100.0)
    assert pct(values[:3], 50) == 2.0
