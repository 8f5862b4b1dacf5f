"""bench/ledger.py on a tiny fleet: every phase runs against the real Redis, its figures come out
and it leaves nothing behind. The full run is the benchmark (docs/benchmarks.md, "Ledger")."""

import json
import sys
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleets, ledger  # noqa: E402


def test_the_ledger_benchmark_measures_bursts_steady_state_and_the_trivial_call(redis_url, tmp_path):
    out = tmp_path / "ledger.json"
    md = tmp_path / "ledger.md"
    rc = ledger.main(["--seconds", "0.3", "--fleets", "small", "--small-hosts", "4", "--clients", "1,2",
                      "--window", "4", "--batch", "3", "--redis-url", redis_url, "--json", str(out), "--markdown", str(md)])
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
        batch = row["batch"]  # rounds of allocate_many: 3 requests, then the window's last one
        assert batch["rounds"] >= 1 and batch["allocs"] == 4 * row["clients"] * batch["rounds"] and batch["refusals"] == 0
        assert batch["releases"] == batch["allocs"] and batch["batch"] == 3
        assert row["batch_ratio"] == batch["allocs_per_s"] / trivial["calls_per_s"]
    text = md.read_text()
    assert "allocs/s ÷ trivial" in text and "Batches (`Allocator.allocate_many`" in text
    r = redis.Redis.from_url(redis_url)
    assert not list(r.scan_iter(match=f"*{doc['fleets'][0]['namespace']}*"))


def test_a_batch_size_past_what_one_call_takes_is_refused_before_anything_runs(redis_url, capsys):
    with pytest.raises(SystemExit) as exc:
        ledger.main(["--batch", "300", "--redis-url", redis_url])
    assert exc.value.code == 2 and "--batch" in capsys.readouterr().err


def test_repeated_runs_judge_the_goals_on_the_medians(redis_url, tmp_path):
    out = tmp_path / "ledger.json"
    rc = ledger.main(["--seconds", "0.2", "--fleets", "small", "--small-hosts", "4", "--clients", "1",
                      "--window", "4", "--repeat", "3", "--no-script-only", "--redis-url", redis_url,
                      "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    runs = row["runs"]
    assert len(runs) == 3
    assert row["ratio"] == row["ratio_median"] == sorted(x["ratio"] for x in runs)[1]
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


def _run(ratio: float, p99: float, steady_p99: float, p50: float, server_us: float) -> dict:
    """One run's row as ``measure`` returns it: only the figures ``summarize_repeats`` reads."""
    return {"fleet": "5,000 hosts", "clients": 4, "ratio": ratio, "steady_ratio": ratio / 2,
            "burst": {"a_p99_ms": p99, "a_p50_ms": p50},
            "ledger": {"a_p99_ms": steady_p99, "server_us_per_evalsha": server_us}}


def test_an_even_number_of_runs_shows_one_run_untouched_and_takes_medians_some_run_had():
    reps = [_run(0.4, 1.0, 4.0, 0.30, 90.0), _run(0.1, 4.0, 2.0, 0.10, 60.0),
            _run(0.3, 2.0, 1.0, 0.40, 70.0), _run(0.2, 3.0, 3.0, 0.20, 80.0)]
    row = ledger.summarize_repeats(reps)
    shown = reps[3]  # ratios 0.1, 0.2, 0.3, 0.4: the lower middle run is shown
    assert row["burst"] is shown["burst"] and row["ledger"] is shown["ledger"]
    assert (row["ratio"], row["steady_ratio"]) == (0.2, 0.1)  # its own, not the mean 0.25 of two runs
    assert (row["ratio_median"], row["steady_ratio_median"]) == (0.2, 0.1)
    # Each figure's own lower middle value, whichever run had it.
    assert (row["p99_median_ms"], row["steady_p99_median_ms"], row["p50_median_ms"], row["server_us_median"]) == (
        2.0, 2.0, 0.20, 70.0)
    assert [x["ratio"] for x in row["runs"]] == [0.4, 0.1, 0.3, 0.2]


def test_the_goals_are_judged_on_the_medians_not_on_the_run_shown():
    row = {"fleet": "big", "clients": 4, "ratio": 0.1, "ratio_median": 0.6, "p99_median_ms": 1.5,
           "steady_p99_median_ms": 2.5, "burst": {"a_p99_ms": 9.0}, "ledger": {"a_p99_ms": 0.5}}
    goals = ledger.evaluate_goals([row], "big", "small")
    assert [(g["value"], g["met"]) for g in goals] == [(0.6, True), (1.5, True), (2.5, False)]


class _Recorder:
    """``Allocator.scripts`` that notes each call's script and ARGV before running it."""

    def __init__(self, scripts, seen: list) -> None:
        self.scripts, self.seen = scripts, seen

    def __getitem__(self, name: str):
        script = self.scripts[name]

        def call(keys, args):
            self.seen.append((name, [a.decode() if isinstance(a, bytes) else str(a) for a in args]))
            return script(keys=keys, args=args)

        return call


def _without_ids(name: str, args: list[str], aid: str) -> list[str]:
    """ARGV with the allocation id taken out (the only part that differs from call to call)."""
    if name == "place":
        payload = json.loads(args[2])
        assert payload.pop("id") == aid
        return [args[0], args[1], json.dumps(payload), *args[3:]]
    return [x.replace(aid, "ID") for x in args]


def test_the_script_phase_sends_the_arguments_allocate_and_release_send(alloc):
    for h in fleets.small_fleet(1):
        alloc.register_host(h)
    request = {"gpus": 1, "gpu_memory_mb": 2048, "cpu_cores": 2, "ram_mb": 4096}
    seen: list = []
    alloc.scripts = _Recorder(alloc.scripts, seen)
    api = alloc.allocate(request, strategy="best_fit").allocation_id
    alloc.release(api)
    do_alloc, do_release = ledger.script_ops(alloc, [request], "best_fit")
    direct = do_alloc(0)
    assert direct is not None
    do_release(direct)
    assert [name for name, _ in seen] == ["place", "release", "place", "release"]
    for (name, by_api), (_, by_script) in zip(seen[:2], seen[2:]):
        assert _without_ids(name, by_script, direct) == _without_ids(name, by_api, api), name
    # So place stores what the real call stores: the request and its metadata.
    stored = [alloc.redis.hget(alloc.keys.alloc(x), "request") for x in (api, direct)]
    assert stored[0] is not None and stored[1] == stored[0]


def test_the_client_overhead_times_the_argv_allocate_builds(alloc, monkeypatch):
    built: list = []
    place_args = alloc.place_args

    def counted(*args, **kwargs):
        built.append(args)
        return place_args(*args, **kwargs)

    monkeypatch.setattr(alloc, "place_args", counted)
    ledger.client_overhead(alloc, "best_fit", n=5)
    assert len(built) == 1 + 5  # the sample allocation, then every timed call
