"""The OpenB replay (bench/replay.py) on a short slice: every policy runs through the real ledger
and queue in virtual time, and its figures come out. The full run is the benchmark
(docs/benchmarks.md, "Scheduling quality on OpenB")."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleets import openb_dir  # noqa: E402
from bench import replay  # noqa: E402
from bench.replay import POLICIES, Replay, eta_accuracy, fleet_of, load_trace, markdown, offered_load  # noqa: E402

needs_trace = pytest.mark.skipif(not (openb_dir() / "openb_pod_list_default.csv").is_file(),
                                reason="the OpenB trace (../shared/data/openb) is not here")


@pytest.fixture(scope="module")
def slice_results(redis_url):
    # 300 tasks from the middle of the trace on 38 hosts (every 32nd), arrivals 200x faster: some wait.
    tasks = load_trace(compress=200, skip=4000, limit=300)
    hosts = fleet_of(32)
    results = {}
    for name in ("fifo", "first_fit", "best_fit", "priority"):
        r = Replay(POLICIES[name], tasks, hosts, redis_url)
        results[name] = (r, r.run())
    return tasks, hosts, results


@needs_trace
def test_the_trace_maps_onto_requests():
    tasks = load_trace(limit=2000)
    by_name = {t.name: t for t in tasks}
    share = by_name["openb-pod-0001"]  # 6 cores, 12 GiB, 46% of one GPU, LS
    assert share.resources == {"gpus": 1, "cpu_cores": 6.0, "ram_mb": 12288, "gpu_memory_mb": 7537}
    assert (share.priority, share.task_type, share.gpu_share) == ("high", "LS/g1x460/c6000/m12288", 0.46)
    whole = by_name["openb-pod-0000"]
    assert whole.resources == {"gpus": 1, "cpu_cores": 12.0, "ram_mb": 16384} and whole.arrival_ms == 0
    assert all(t.duration_ms > 0 for t in tasks)
    assert [t.arrival_ms for t in tasks] == sorted(t.arrival_ms for t in tasks)


@needs_trace
def test_every_policy_replays_the_slice_and_reports_its_figures(slice_results):
    tasks, hosts, results = slice_results
    load = offered_load(tasks, hosts)
    assert load["gpu_peak"] > 1.0  # the slice does make tasks wait
    for name, (replay, res) in results.items():
        assert res["tasks"] == len(tasks) and res["never_started"] == 0, name
        assert res["placements"] >= len(tasks)
        assert res["wait"]["all"]["n"] == len(tasks)
        assert 0 <= res["frag_mem_unalloc_while_waiting"] <= 1
        assert res["makespan_s"] >= res["last_start_s"] > 0
        assert res["placements_per_s"] > 0
        e = res["eta"]
        assert e["all"]["n"] == len(tasks) and e["waited"]["n"] > 0, name
        assert replay.eta_calls == e["waited"]["n"]  # one estimate per task that had to wait
        # Every task placed at once has its true start as its estimate.
        assert e["all"]["within_tol"] >= (len(tasks) - e["waited"]["n"]) / len(tasks)
    assert results["priority"][1]["preemptions"] >= 0
    md = markdown([res for _, res in results.values()], {})
    assert "strict FIFO" in md and "priority + preemption" in md


@needs_trace
def test_strict_fifo_blocks_the_line_behind_its_head(slice_results):
    _, _, results = slice_results
    fifo, best = results["fifo"][1], results["best_fit"][1]
    assert fifo["wait"]["all"]["mean_s"] > best["wait"]["all"]["mean_s"]


def test_eta_accuracy_is_scored_against_the_real_start():
    s = 1000  # ms
    rows = [
        (0, 0, 0, True),  # placed at once
        (0, 100 * s, 130 * s, False),  # wait 100 s, 30 s off: within max(60 s, 20 s)
        (0, 1000 * s, 1150 * s, False),  # wait 1000 s, 150 s off: within 20% (200 s)
        (0, 1000 * s, 1300 * s, False),  # 300 s off: outside, but within 10 min
        (0, 5000 * s, None, False),  # no estimate: a miss
    ]
    e = eta_accuracy(rows)
    assert e["all"] == {"n": 5, "within_tol": 0.6, "within_10min": 0.8, "median_abs_err_s": 150.0, "no_estimate": 1}
    assert e["waited"]["n"] == 4 and e["waited"]["within_tol"] == 0.5


def test_plots_without_matplotlib_are_refused_before_the_replay_starts(monkeypatch, capsys):
    monkeypatch.setattr(replay, "can_plot", lambda: False)
    monkeypatch.setattr(replay, "run_all", lambda args: pytest.fail("the replay ran"))
    with pytest.raises(SystemExit) as exc:
        replay.main(["--limit", "10"])
    assert exc.value.code == 2
    assert "the plots need matplotlib" in capsys.readouterr().err
