"""Duration estimates per task type, usage per owner/task type, and the read commands."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.engine import URL
from typer.testing import CliRunner

from allocator import Allocator
from allocator.cli import app
from allocator.history.estimates import duration_estimates, percentile, read_estimates, refresh_estimates
from allocator.history.queries import usage
from allocator.history.recorder import Recorder

from ..conftest import FakeClock
from .fleet import register_fleet


def _now(clock: FakeClock) -> datetime:
    return datetime.fromtimestamp(clock.now, tz=timezone.utc)


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([10, 20, 30, 40], 0.5) == 25 and percentile([5], 0.8) == 5 and percentile([0, 100], 0.8) == 80


def test_estimates_use_recent_normal_completions_per_task_type(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    for seconds in range(10, 101, 10):
        x = alloc.allocate({"cpu_cores": 1}, task_type="train")
        clock.advance(seconds)
        alloc.release(x.allocation_id)
    lease = alloc.allocate({"cpu_cores": 1}, task_type="train", ttl_seconds=5)  # expiry says nothing about run time
    clock.advance(1000)
    alloc.expire()
    failed = alloc.allocate({"cpu_cores": 1}, task_type="infer")
    alloc.release(failed.allocation_id, reason="failed")
    x = alloc.allocate({"cpu_cores": 1}, task_type="infer")
    clock.advance(3)
    alloc.release(x.allocation_id)
    recorder.drain()
    assert lease.allocation_id
    refresh_estimates(engine, alloc)
    stored = read_estimates(alloc.redis, alloc.keys)
    assert {k: (v["n"], v["p50_ms"], v["p80_ms"], v["max_ms"]) for k, v in stored.items()} == {
        "train": (10, 55_000, 82_000, 100_000), "infer": (1, 3000, 3000, 3000)}


def test_estimates_window_keeps_only_the_most_recent(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    for seconds in (500, 500, 1, 2, 3):
        x = alloc.allocate({"cpu_cores": 1}, task_type="t")
        clock.advance(seconds)
        alloc.release(x.allocation_id)
    recorder.drain()
    est = duration_estimates(engine, alloc.keys.namespace, window=3)["t"]
    assert (est.n, est.p50_ms, est.max_ms) == (3, 2000, 3000)


def test_usage_counts_held_resources_per_owner_clipped_to_the_period(
    alloc: Allocator, recorder: Recorder, engine, clock: FakeClock
) -> None:
    register_fleet(alloc)
    t0 = _now(clock)
    a = alloc.allocate({"gpus": 1, "gpu_memory_mb": "10Gi", "cpu_cores": 2, "ram_mb": "4Gi"}, owner="alice", task_type="train")
    b = alloc.allocate({"gpus": 2, "cpu_cores": 1}, owner="bob", task_type="train", ttl_seconds=None)
    clock.advance(1800)
    alloc.release(b.allocation_id)
    clock.advance(5400)
    alloc.release(a.allocation_id)
    recorder.drain()
    rows = {r.key: r for r in usage(engine, alloc.keys.namespace, since=t0, until=_now(clock), by="owner")}
    # alice's 10 GiB slice goes to the 16 GiB T4 (best fit): 0.625 of a GPU for 2 h.
    assert a.host_id == "gpu-b"
    assert round(rows["alice"].gpu_hours, 6) == 1.25 and round(rows["alice"].gpu_memory_gib_hours, 6) == 20.0
    assert round(rows["alice"].cpu_hours, 6) == 4.0 and round(rows["alice"].ram_gib_hours, 6) == 8.0
    assert round(rows["bob"].gpu_hours, 6) == 1.0 and rows["bob"].allocations_placed == 1
    later = {r.key: r for r in usage(engine, alloc.keys.namespace, since=t0 + timedelta(hours=1), until=_now(clock))}
    assert round(later["alice"].gpu_hours, 6) == 0.625 and "bob" not in later


def test_usage_counts_allocations_still_held_up_to_now(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    t0 = _now(clock)
    alloc.allocate({"gpus": 1, "cpu_cores": 1}, task_type="serve")
    recorder.drain()
    rows = usage(engine, alloc.keys.namespace, since=t0, by="task_type", now=t0 + timedelta(minutes=30))
    assert [(r.key, round(r.gpu_hours, 6)) for r in rows] == [("serve", 0.5)]


def test_usage_reports_queue_wait(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    alloc.register_host(id="one", cpu_cores=2, ram_mb=1024)
    t0 = _now(clock)
    blocker = alloc.allocate({"cpu_cores": 2}, owner="first")
    alloc.allocate({"cpu_cores": 2}, on_busy="queue", owner="second")
    clock.advance(120)
    alloc.release(blocker.allocation_id)
    recorder.drain()
    rows = {r.key: r for r in usage(engine, alloc.keys.namespace, since=t0, until=_now(clock) + timedelta(seconds=1))}
    assert rows["second"].mean_wait_s == 120 and rows["first"].mean_wait_s == 0


def test_a_requeued_allocation_is_charged_for_every_placement(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    _requeued_job(alloc, clock)  # placed for 1 h, preempted, placed again for 2 h
    recorder.drain()
    (row,) = usage(engine, alloc.keys.namespace, since=_now(clock), until=_now(clock) + timedelta(hours=5))
    assert (row.key, row.placements, round(row.gpu_hours, 6)) == ("carol", 2, 3.0)


def test_cli_history_filters_and_prints_json(alloc: Allocator, recorder: Recorder, engine, database_url: URL) -> None:
    register_fleet(alloc)
    keep = alloc.allocate({"cpu_cores": 1}, owner="alice", task_type="train")
    alloc.allocate({"cpu_cores": 1}, owner="bob", task_type="train")
    done = alloc.allocate({"cpu_cores": 1}, owner="alice", task_type="etl")
    alloc.release(done.allocation_id)
    recorder.drain()
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False), "ALLOCATOR_NAMESPACE": alloc.keys.namespace}
    r = CliRunner().invoke(app, ["history", "--owner", "alice", "--state", "active", "--json"], env=env)
    assert r.exit_code == 0, r.output
    assert [x["allocation_id"] for x in json.loads(r.output)] == [keep.allocation_id]
    r = CliRunner().invoke(app, ["history", done.allocation_id, "--json"], env=env)
    assert [e["type"] for e in json.loads(r.output)["events"]] == ["allocated", "released"]
    r = CliRunner().invoke(app, ["history", "--task-type", "train", "--since", "1h"], env=env)
    assert r.exit_code == 0 and keep.allocation_id in r.output


def test_cli_history_prints_a_release_reason_that_looks_like_markup_as_written(
        alloc: Allocator, recorder: Recorder, database_url: URL) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1})
    alloc.release(x.allocation_id, reason="oom [/bold]")
    recorder.drain()
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False), "ALLOCATOR_NAMESPACE": alloc.keys.namespace}
    r = CliRunner().invoke(app, ["history"], env=env)
    assert r.exit_code == 0 and r.exception is None, r.output  # it raised rich's MarkupError


def test_cli_usage_prints_json_per_task_type(alloc: Allocator, recorder: Recorder, engine, database_url: URL, clock: FakeClock) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"gpus": 1, "cpu_cores": 1}, task_type="train")
    clock.advance(3600)
    alloc.release(x.allocation_id)
    recorder.drain()
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False), "ALLOCATOR_NAMESPACE": alloc.keys.namespace}
    since = datetime.fromtimestamp(clock.now - 7200, tz=timezone.utc).isoformat()
    until = datetime.fromtimestamp(clock.now, tz=timezone.utc).isoformat()
    r = CliRunner().invoke(app, ["usage", "--by", "task_type", "--since", since, "--until", until, "--json"], env=env)
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert [(row["key"], round(row["gpu_hours"], 6)) for row in rows] == [("train", 1.0)]


@pytest.mark.parametrize("since", ["99999999999d", "", "0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"])
def test_cli_usage_refuses_a_period_start_it_cannot_read_with_exit_2(database_url: URL, since: str) -> None:
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False)}
    r = CliRunner().invoke(app, ["usage", "--since", since], env=env)
    assert r.exit_code == 2 and "Invalid value" in r.stderr


@pytest.mark.parametrize("command", [["history"], ["usage"], ["estimates"], ["recover"], ["recorder", "--once"],
                                     ["db", "current"], ["db", "upgrade"], ["scheduler"]])
@pytest.mark.parametrize("url", ["foo", "mysql://db/x"])
def test_a_history_database_url_that_is_no_url_it_can_use_is_invalid_input_on_every_command(command, url) -> None:
    r = CliRunner().invoke(app, [*command, "--database-url", url], env={"ALLOCATOR_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert r.exit_code == 2 and "database" in r.output.lower() and "Traceback" not in r.output, r.output


def test_cli_db_upgrade_to_an_unknown_revision_is_invalid_input(database_url: URL) -> None:
    r = CliRunner().invoke(app, ["db", "upgrade", "bogus", "--database-url", database_url.render_as_string(hide_password=False)])
    assert r.exit_code == 2 and "bogus" in r.stderr


def test_cli_recover_recorder_and_estimates_need_a_shared_redis(database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    for command in (["recover"], ["recorder", "--once"], ["estimates"]):
        r = CliRunner().invoke(app, [*command, "--database-url", url], env={"ALLOCATOR_REDIS_URL": ""})
        assert r.exit_code == 2 and "no Redis configured" in r.stderr, (command, r.output)


def test_cli_recorder_and_estimates_report_an_unreachable_redis_with_exit_1(engine, database_url: URL) -> None:
    url = database_url.render_as_string(hide_password=False)
    for command in (["recorder", "--once"], ["estimates"], ["recover"]):
        r = CliRunner().invoke(app, [*command, "--redis-url", "redis://127.0.0.1:1/0", "--database-url", url])
        assert r.exit_code == 1 and "Redis unavailable" in r.stderr, command


def _requeued_job(alloc: Allocator, clock: FakeClock) -> int:
    """job-1 of carol: submitted and placed at t0, preempted at t0+1h, placed again at t0+2h,
    released at t0+4h. Returns t0 in ms."""
    t0 = round(clock.now * 1000)
    h = 3_600_000

    def ev(kind: str, ts: int, data: dict) -> None:
        alloc.redis.xadd(alloc.keys.events, {"type": kind, "id": "job-1", "ts": ts, "data": json.dumps(data)})

    grant = {"host": "h", "gpus": [{"pos": 0, "index": 0, "uuid": "u", "model": "A100", "memory_mb": 40960, "whole": True}],
             "cores": [], "shared_millis": 0, "ram_mb": 0, "owner": "carol", "task_type": "train", "created": t0}
    ev("submitted", t0, {"owner": "carol", "task_type": "train", "priority": 0})
    ev("allocated", t0, grant)
    ev("released", t0 + h, {"host": "h", "state": "released", "reason": "preempted", "activated": t0, "created": t0})
    ev("requeued", t0 + h, {"front": True})
    ev("allocated", t0 + 2 * h, grant)
    ev("released", t0 + 4 * h, {"host": "h", "state": "released", "reason": "released", "activated": t0 + 2 * h, "created": t0})
    return t0


def test_each_placement_waits_from_when_its_task_entered_the_line_again(
        alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    _requeued_job(alloc, clock)
    recorder.drain()
    t0 = _now(clock)
    (row,) = usage(engine, alloc.keys.namespace, since=t0, until=t0 + timedelta(hours=5))
    # Placed at once, then again an hour after its preemption: 1 h of wait, not the 2 h since submission.
    assert (row.allocations_placed, row.wait_hours, row.mean_wait_s) == (2, 1.0, 1800.0)
    (first,) = usage(engine, alloc.keys.namespace, since=t0, until=t0 + timedelta(hours=1.5))
    assert (first.allocations_placed, first.wait_hours) == (1, 0.0)  # its first placement is in this period
    (second,) = usage(engine, alloc.keys.namespace, since=t0 + timedelta(hours=1.5), until=t0 + timedelta(hours=2.75))
    assert (second.allocations_placed, second.wait_hours) == (1, 1.0)


def test_gpu_memory_slices_are_charged_their_share_of_the_gpu(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="16Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi"}])
    t0 = _now(clock)
    slices = [alloc.allocate({"gpu_memory_mb": "8Gi", "cpu_cores": 0.5}, owner="team") for _ in range(4)]
    clock.advance(3600)
    for x in slices:
        alloc.release(x.allocation_id)
    recorder.drain()
    (row,) = usage(engine, alloc.keys.namespace, since=t0, until=_now(clock), by="host")
    assert (row.gpu_hours, row.gpu_memory_gib_hours, row.cpu_hours) == (0.8, 32.0, 2.0)  # four fifths of one GPU for 1 h


def test_usage_figures_are_exact_on_either_database(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    t0 = _now(clock)
    x = alloc.allocate({"gpus": 1, "cpu_cores": 2}, owner="alice")
    clock.advance(7200)
    alloc.release(x.allocation_id)
    recorder.drain()
    (row,) = usage(engine, alloc.keys.namespace, since=t0, until=_now(clock))
    assert (row.gpu_hours, row.cpu_hours) == (2.0, 4.0)  # not 1.9999999925 (SQLite's julianday is a double)


def test_an_empty_period_holds_nothing(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    alloc.allocate({"gpus": 1, "cpu_cores": 1})  # still held
    recorder.drain()
    t0 = _now(clock)
    assert usage(engine, alloc.keys.namespace, since=t0 + timedelta(hours=2), until=t0 + timedelta(hours=1)) == []
    # A period after "now": the allocation held up to now holds nothing in it.
    assert usage(engine, alloc.keys.namespace, since=t0 + timedelta(hours=1), until=t0 + timedelta(hours=2), now=t0) == []


@pytest.mark.parametrize("args, option", [
    (["usage", "--since", "24h", "--until", "bogus"], "--until"),
    (["usage", "--since", "2026-13-01"], "--since"),
    (["usage", "--since", "1h", "--until", "2h"], "--until"),  # the end before the start
    (["history", "--since", "yesterday"], "--since"),
    (["history", "--since", ""], "--since"),  # an empty variable: refused, not "the whole history"
    (["usage", "--since", "24h", "--until", ""], "--until"),
    (["history", "--state", "bogus"], "--state"),
])
def test_cli_history_and_usage_name_the_option_a_bad_value_came_from(database_url: URL, args: list[str], option: str) -> None:
    env = {"ALLOCATOR_DATABASE_URL": database_url.render_as_string(hide_password=False)}
    r = CliRunner().invoke(app, args, env=env)
    assert r.exit_code == 2 and option in r.output, r.output
