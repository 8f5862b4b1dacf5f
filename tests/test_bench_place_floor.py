"""bench/place_floor.py: it records the commands of real place calls, replays them as literal
scripts next to place and the trivial script, and leaves nothing behind."""

import json
import sys
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator import Allocator  # noqa: E402
from bench import fleets, place_floor  # noqa: E402


def test_a_monitor_line_is_split_into_its_client_and_exact_argument_bytes():
    line = b'1796607815.672890 [4 lua] "SET" "{ns}:hsum:h1" "\\x00\\xf0?a\\"b\\\\c\\n"'
    assert place_floor.parse_monitor_line(line) == (b"lua", [b"SET", b"{ns}:hsum:h1", b'\x00\xf0?a"b\\c\n'])
    line = b'1796607815.672185 [4 127.0.0.1:54040] "EVALSHA" "abc" "0"'
    assert place_floor.parse_monitor_line(line) == (b"127.0.0.1:54040", [b"EVALSHA", b"abc", b"0"])


def test_a_line_of_another_form_is_not_taken_for_a_command():
    assert place_floor.parse_monitor_line(b"OK") is None


def test_a_lua_literal_gives_back_the_same_bytes(redis_url):
    r = redis.Redis.from_url(redis_url)
    raw = bytes(range(256)) + "GPU \u00e9".encode()
    assert r.eval("return " + place_floor.lua_literal(raw), 0) == raw


def test_the_floor_benchmark_reports_place_its_recorded_commands_and_the_trivial_script(redis_url, tmp_path):
    out = tmp_path / "floor.json"
    rc = place_floor.main(["--hosts", "8", "--held", "10", "--requests", "4", "--rounds", "1", "--repeat", "1",
                           "--redis-url", redis_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["held"] == 10 and doc["requests"] == 4
    assert doc["commands_per_place"] > 5
    assert set(doc["us_per_call"]) == {"noop", "place", "commands", "commands_json"}
    assert all(v > 0 for v in doc["us_per_call"].values())


def test_the_floor_benchmark_leaves_no_keys(redis_url):
    r = redis.Redis.from_url(redis_url)
    before = set(r.scan_iter(match="*bench-floor-*"))
    place_floor.main(["--hosts", "4", "--held", "2", "--requests", "2", "--rounds", "1", "--repeat", "1",
                      "--redis-url", redis_url])
    assert set(r.scan_iter(match="*bench-floor-*")) == before


def test_only_the_own_clients_place_calls_are_recorded_when_others_run_the_same_script():
    lines = [
        b'1.0 [4 127.0.0.1:5000] "EVALSHA" "abc" "16"',
        b'1.1 [4 lua] "GET" "mine-1"',
        b'1.2 [11 127.0.0.1:6000] "EVALSHA" "abc" "16"',
        b'1.3 [11 lua] "GET" "theirs"',
        b'1.4 [4 127.0.0.1:5000] "EVALSHA" "abc" "16"',
        b'1.5 [4 lua] "GET" "mine-2"',
        b'1.6 [4 lua] "SET" "mine-2" "x"',
    ]
    assert place_floor.place_calls(lines, b"abc", b"127.0.0.1:5000") == [
        [[b"GET", b"mine-1"]], [[b"GET", b"mine-2"], [b"SET", b"mine-2", b"x"]]]


def test_the_recorded_place_calls_carry_the_arguments_allocate_sends(redis_url):
    """The floor's place figures are those of the real call: request, metadata and all."""
    alloc = Allocator(redis_url, namespace=f"bench-floor-{uuid.uuid4().hex[:8]}")
    try:
        for h in fleets.small_fleet(1):
            alloc.register_host(h)
        request = {"gpus": 1, "gpu_memory_mb": 2048, "cpu_cores": 2, "ram_mb": 4096}
        (call,) = place_floor.capture(alloc, redis_url, [request])
        req = alloc.build_request(request, strategy="best_fit")
        assert [a if isinstance(a, str) else a.decode() for a in call["args"]] == [
            alloc.keys.prefix, alloc._now_arg(), *alloc.place_args(req, call["id"])]
        assert alloc.redis.hget(alloc.keys.alloc(call["id"]), "request") == req.model_dump_json()
    finally:
        alloc.destroy()
