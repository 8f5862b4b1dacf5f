"""bench/script_entry.py on a few calls: it measures each script's library prelude as loaded and
as it would be with every include inlined whole, next to the trivial script, and writes nothing."""

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import script_entry  # noqa: E402


def test_the_entry_benchmark_compares_used_and_whole_libraries_with_the_trivial_script(redis_url, tmp_path):
    out = tmp_path / "entry.json"
    rc = script_entry.main(["--calls", "20", "--repeat", "1", "--scripts", "heartbeat,place",
                            "--redis-url", redis_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = {row["script"]: row for row in doc["results"]}
    assert set(rows) == {"heartbeat", "place"}
    assert doc["noop_us"] > 0
    assert rows["heartbeat"]["closures_used"] < rows["heartbeat"]["closures_whole"]
    for row in rows.values():
        assert row["us_used"] > 0 and row["us_whole"] > 0


def test_the_entry_benchmark_refuses_a_name_that_is_no_ledger_script(redis_url):
    with pytest.raises(SystemExit):
        script_entry.main(["--scripts", "nosuch", "--redis-url", redis_url])


def test_the_anatomy_keeps_each_library_closure_and_its_upvalues_without_the_bodies():
    pre = script_entry.prelude("release", script_entry.source("release", wrap=False))
    kept, bare = script_entry.skeleton(pre, True), script_entry.skeleton(pre, False)
    assert script_entry.closures(kept) == script_entry.closures(bare) == script_entry.closures(pre)
    assert "local function return_grant() return " in kept and "local function return_grant() return nil end" in bare
    library = kept[: kept.index("local __lazy_lib")]  # the lazy group (built on first use) stays as it is
    assert "rcall('HMGET'" not in library  # no body is left


def test_the_anatomy_measures_both_skeletons(redis_url, tmp_path):
    out = tmp_path / "entry.json"
    assert script_entry.main(["--calls", "20", "--repeat", "1", "--scripts", "place", "--anatomy",
                              "--redis-url", redis_url, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["runs_not_wrapped"] and row["runs_bodies_gone"] and row["runs_no_upvalues"]


@pytest.mark.parametrize("name", script_entry.DEFAULT_SCRIPTS)
def test_a_prelude_reads_no_argument_beyond_the_prefix_and_clock_the_benchmark_sends(name):
    # The benchmark sends [prefix, ""] to every prelude and to noop alike; were a library to read
    # a script's own ARGV before the script's code, that would not be the library's real cost.
    pre = script_entry.prelude(name, script_entry.source(name))
    code = re.sub(r"--[^\n]*", "", re.sub(r"--\[\[.*?\]\]", "", pre, flags=re.DOTALL))
    assert set(re.findall(r"ARGV\[(\d+)\]", code)) <= {"1", "2"}
