"""bench/first_fit.py on a few hosts: server µs per first-fit placement at each step of full
hosts in front, for CPU-only, GPU-memory and whole-GPU requests, against the trivial script; it leaves nothing
behind."""

import json
import sys
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import first_fit  # noqa: E402


def test_the_first_fit_benchmark_reports_each_step_of_each_shape_against_the_trivial_script(redis_url, tmp_path):
    out = tmp_path / "ff.json"
    assert first_fit.main(["--hosts", "6", "--step", "2", "--probes", "3", "--redis-url", redis_url,
                           "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [run["shape"] for run in runs] == ["cpu", "gpu", "whole"]
    for run in runs:
        assert [row["full_hosts_before"] for row in run["results"]] == [0, 2]
        assert run["trivial_us"] > 0
        assert run["results"][0]["vs_first_step"] == 1.0
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match="*bench-ff*"))


@pytest.mark.parametrize("args", [["--hosts", "5", "--step", "4"], ["--shapes", "disk"], ["--probes", "0"]])
def test_the_first_fit_benchmark_refuses_what_it_cannot_measure(redis_url, args):
    with pytest.raises(SystemExit):
        first_fit.main([*args, "--redis-url", redis_url])
