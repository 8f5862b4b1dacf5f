"""bench/first_fit_cpu.py on a few hosts: server µs per first-fit CPU-only placement at each step
of full hosts in front, against the trivial script; it leaves nothing behind."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import first_fit_cpu  # noqa: E402


def test_the_first_fit_benchmark_reports_each_step_against_the_trivial_script(redis_url, tmp_path):
    out = tmp_path / "ff.json"
    assert first_fit_cpu.main(["--hosts", "12", "--step", "4", "--redis-url", redis_url, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [row["full_hosts_before"] for row in doc["results"]] == [0, 4]
    assert doc["trivial_us"] > 0
    assert doc["results"][0]["vs_first_step"] == 1.0


def test_the_first_fit_benchmark_refuses_a_fleet_too_small_for_two_steps(redis_url):
    with pytest.raises(SystemExit):
        first_fit_cpu.main(["--hosts", "5", "--step", "4", "--redis-url", redis_url])
