"""The recorder turns the outbox into rows: each lifecycle step, exactly once, on Postgres and SQLite."""

from __future__ import annotations

import json
from typing import Any
from datetime import datetime, timezone

import pytest

from allocator import Allocator
from allocator.errors import Recovering
from allocator.history.recorder import Recorder

from ..conftest import FakeClock
from .conftest import wait_until
from .fleet import all_rows, allocation_row, allocations, count, events, hosts, placements, register_fleet


def _at(clock: FakeClock) -> datetime:
    return datetime.fromtimestamp(round(clock.now * 1000) / 1000, tz=timezone.utc)


def test_allocate_records_an_active_row_with_the_placement(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"gpus": 1, "gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"}, task_type="finetune",
                       owner="alice", priority="high", metadata={"run": 7}, task_id="train-1")
    recorder.drain()
    row = allocation_row(engine, alloc, x.allocation_id)
    assert row is not None
    assert (row["state"], row["host_id"], row["task_type"], row["owner"], row["priority"]) == ("active", x.host_id, "finetune", "alice", 2)
    assert row["gpu_count"] == 1 and row["gpu_memory_mb"] == 20480 and row["gpus"][0]["uuid"] == x.gpus[0].uuid
    assert row["cores"] == x.cpu_cores and row["cpu_millis"] == 4000 and row["ram_mb"] == 32768
    assert row["placed_at"] == _at(clock) and row["submitted_at"] == _at(clock) and row["wait_ms"] == 0
    assert row["metadata"] == {"run": 7} and row["request"]["resources"]["gpus"] == 1
    assert row["released_at"] is None and row["run_ms"] is None


def test_release_records_end_time_and_run_time(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 2}, task_type="etl")
    clock.advance(90)
    alloc.release(x.allocation_id)
    recorder.drain()
    row = allocation_row(engine, alloc, x.allocation_id)
    assert (row["state"], row["release_reason"], row["run_ms"]) == ("released", "released", 90_000)
    assert row["released_at"] == _at(clock)
    (p,) = all_rows(engine, alloc, placements)
    assert p["allocation_id"] == x.allocation_id and p["released_at"] == _at(clock) and p["cpu_millis"] == 2000


def test_release_as_failed_records_the_failed_state(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1})
    alloc.release(x.allocation_id, reason="failed")
    recorder.drain()
    assert allocation_row(engine, alloc, x.allocation_id)["state"] == "failed"


def test_expiry_records_reason_expired(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1}, ttl_seconds=30)
    clock.advance(31)
    assert alloc.expire() == [x.allocation_id]
    recorder.drain()
    row = allocation_row(engine, alloc, x.allocation_id)
    assert (row["state"], row["release_reason"], row["run_ms"]) == ("released", "expired", 31_000)
    assert row["expires_at"] is not None and row["ttl_ms"] == 30_000


def test_forced_host_removal_records_reason_and_host_state(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1}, selector={"cluster": "default"})
    alloc.remove_host(x.host_id, force=True)
    recorder.drain()
    assert allocation_row(engine, alloc, x.allocation_id)["release_reason"] == "host_removed"
    by_id = {h["host_id"]: h for h in all_rows(engine, alloc, hosts)}
    assert by_id[x.host_id]["state"] == "removed" and by_id[x.host_id]["removed_at"] is not None


def test_host_rows_follow_registration_and_drain(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    alloc.drain_host("gpu-b")
    recorder.drain()
    by_id = {h["host_id"]: h for h in all_rows(engine, alloc, hosts)}
    assert by_id["gpu-a"]["state"] == "ready" and by_id["gpu-a"]["gpu_count"] == 2
    assert by_id["gpu-a"]["gpu_memory_mb"] == 81920 and by_id["gpu-a"]["cpu_cores"] == 16
    assert by_id["gpu-b"]["state"] == "draining" and by_id["gpu-b"]["labels"] == {"cluster": "default"}


def test_queued_request_records_submission_and_wait(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    alloc.register_host(id="one", cpu_cores=2, ram_mb=1024)
    blocker = alloc.allocate({"cpu_cores": 2})
    queued = alloc.allocate({"cpu_cores": 2}, on_busy="queue", task_type="batch", owner="bob")
    recorder.drain()
    assert allocation_row(engine, alloc, queued.allocation_id)["state"] == "pending"
    clock.advance(45)
    alloc.release(blocker.allocation_id)  # the freed cores go to the waiting request in the same call
    recorder.drain()
    row = allocation_row(engine, alloc, queued.allocation_id)
    assert (row["state"], row["owner"], row["wait_ms"]) == ("active", "bob", 45_000)


def test_a_task_whose_rq_job_vanished_while_it_waited_is_recorded_with_that_reason(alloc: Allocator, recorder: Recorder, engine) -> None:
    from rq.job import Job

    from .. import jobs

    alloc.register_host(id="one", cpu_cores=1, ram_mb=1024)
    blocker = alloc.allocate({"cpu_cores": 1})
    task = alloc.enqueue(jobs.add, 1, 2, resources={"cpu_cores": 1})
    alloc.rq_connection.delete(Job.key_for(task.id))
    alloc.release(blocker.allocation_id)  # the pass meets the task and drops it: job_gone
    assert alloc.get(task.id).release_reason == "job_gone"
    recorder.drain()
    row = allocation_row(engine, alloc, task.id)
    assert (row["state"], row["release_reason"]) == ("cancelled", "job_gone")


def test_started_and_finished_events_fill_run_time_and_outcome(alloc: Allocator, recorder: Recorder, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    x = alloc.allocate({"cpu_cores": 1}, task_type="train")
    start_ms = round(clock.now * 1000) + 10_000
    alloc.redis.xadd(alloc.keys.events, {"type": "started", "id": x.allocation_id, "ts": start_ms, "data": json.dumps({"worker": "w1"})})
    clock.advance(70)
    alloc.redis.xadd(alloc.keys.events, {"type": "finished", "id": x.allocation_id, "ts": round(clock.now * 1000),
                                         "data": json.dumps({"outcome": "ok"})})
    alloc.release(x.allocation_id)
    recorder.drain()
    row = allocation_row(engine, alloc, x.allocation_id)
    assert row["outcome"] == "ok" and row["run_ms"] == 60_000  # released - started, not - placed


def test_unknown_event_types_are_kept_in_events_only(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.redis.xadd(alloc.keys.events, {"type": "someday_new", "id": "x-1", "ts": 1, "data": '{"a": [1, 2]}'})
    alloc.redis.xadd(alloc.keys.events, {"type": "garbled", "id": "x-2", "ts": "soon", "data": "not json"})
    recorder.drain()
    rows = sorted(all_rows(engine, alloc, events), key=lambda e: (e["stream_ms"], e["stream_seq"]))
    assert [(e["type"], e["data"]) for e in rows] == [("someday_new", {"a": [1, 2]}), ("garbled", {"raw": "not json"})]
    assert count(engine, alloc, hosts) == 0


def _tables(engine, a: Allocator) -> dict[str, list[str]]:
    """Every row of the namespace, table by table (allocations without their updated_at stamp)."""
    out = {t.name: sorted(map(repr, all_rows(engine, a, t))) for t in (events, hosts, placements)}
    out["allocations"] = sorted(repr({k: v for k, v in r.items() if k != "updated_at"}) for r in all_rows(engine, a, allocations))
    return out


def test_replaying_the_stream_changes_nothing(alloc: Allocator, engine, clock: FakeClock) -> None:
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=0, trim=False, estimates_every_s=0)
    ids = []
    for i in range(5):
        ids.append(alloc.allocate({"cpu_cores": 1}, task_type="t", owner=f"o{i % 2}").allocation_id)
        clock.advance(10)
    for i in ids[:3]:
        alloc.release(i)
    first = rec.drain()
    before = _tables(engine, alloc)
    # Deliver everything again, as after a crash between commit and XACK.
    alloc.redis.xgroup_setid(alloc.keys.events, alloc.keys.recorder_group, "0")
    again = rec.drain()
    assert first.written == alloc.redis.xlen(alloc.keys.events) == again.duplicates and again.written == 0
    assert _tables(engine, alloc) == before


def test_nothing_is_acknowledged_or_trimmed_before_it_is_committed(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=0, estimates_every_s=0)
    n = alloc.redis.xlen(alloc.keys.events)
    entries = rec.read(0)  # delivered, not written
    assert len(entries) == n and rec.trim_stream() == 0 and rec.backlog().pending == n
    rec.drain()
    assert rec.backlog().total == 0 and alloc.redis.xlen(alloc.keys.events) == 0 and count(engine, alloc) == n


def test_trim_keeps_what_another_group_has_not_acknowledged(alloc: Allocator, recorder: Recorder, engine) -> None:
    alloc.redis.xgroup_create(alloc.keys.events, "other-reader", id="0", mkstream=True)
    register_fleet(alloc)
    recorder.drain()
    assert alloc.redis.xlen(alloc.keys.events) == 2 and count(engine, alloc) == 2


def test_trim_keeps_what_the_api_tally_has_not_counted_while_it_runs(alloc: Allocator, recorder: Recorder, engine) -> None:
    from allocator.api.metrics import tally

    tally(alloc)  # an API replica is counting (its cursor is at the head)
    register_fleet(alloc)
    recorder.drain()
    assert alloc.redis.xlen(alloc.keys.events) == 2  # recorded, but not yet counted
    assert tally(alloc) == 2
    recorder.trim_stream()
    assert alloc.redis.xlen(alloc.keys.events) == 0


def test_trim_does_not_wait_for_an_api_tally_that_stopped_long_ago(alloc: Allocator, recorder: Recorder, engine) -> None:
    from allocator.api.metrics import tally

    tally(alloc)
    alloc.redis.hset(alloc.keys.api_stats, "cursor_at", 0)  # its last tally was long ago
    register_fleet(alloc)
    recorder.drain()
    assert alloc.redis.xlen(alloc.keys.events) == 0


def test_backlog_counts_pending_and_undelivered(alloc: Allocator, recorder: Recorder) -> None:
    recorder.ensure_group()
    register_fleet(alloc)
    b = recorder.backlog()
    assert (b.pending, b.undelivered, b.total) == (0, 2, 2) and b.oldest_age_s is not None
    recorder.batch_size = 1
    recorder.read(0)
    assert (recorder.backlog().pending, recorder.backlog().undelivered) == (1, 1)


def test_recorder_recreates_its_group_when_the_stream_vanishes(alloc: Allocator, recorder: Recorder, engine) -> None:
    register_fleet(alloc)
    recorder.drain()
    alloc.destroy()  # Redis lost everything in this namespace, stream and group included
    register_fleet(alloc)
    recorder.drain()
    assert recorder.stream_resets == 1 and count(engine, alloc) == 4


def test_a_vanished_stream_stops_placements_until_recover(alloc: Allocator, recorder: Recorder) -> None:
    register_fleet(alloc)
    recorder.drain()
    alloc.destroy()  # Redis lost its data; agents re-register before anyone notices
    register_fleet(alloc)
    recorder.drain()
    with pytest.raises(Recovering):
        alloc.allocate({"cpu_cores": 1})


def test_a_recorder_started_after_redis_lost_its_data_stops_placements_until_recover(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    Recorder(alloc, engine, block_ms=0, estimates_every_s=0).drain()
    alloc.destroy()  # Redis lost its data, and the recorder's process restarted with it
    register_fleet(alloc)  # agents register again
    restarted = Recorder(alloc, engine, block_ms=0, estimates_every_s=0)
    restarted.drain()
    assert restarted.stream_resets == 1
    with pytest.raises(Recovering):
        alloc.allocate({"cpu_cores": 1})


def test_a_first_recorder_of_a_new_namespace_stops_nothing(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=0, estimates_every_s=0)
    rec.drain()
    assert rec.stream_resets == 0 and alloc.allocate({"cpu_cores": 1}).state == "active"


def test_a_recorder_that_notices_the_loss_after_a_recovery_leaves_placements_open(alloc: Allocator, recorder: Recorder,
                                                                                  engine) -> None:
    from allocator.history import recover

    register_fleet(alloc)
    recorder.drain()
    alloc.destroy()  # Redis lost its data, and an operator recovered before the recorder's next read
    recover.recover(alloc, engine)
    recorder.drain()
    assert recorder.stream_resets == 1
    assert alloc.allocate({"cpu_cores": 1}).state == "active"


def test_the_recorder_decides_to_stop_placements_in_one_step_with_the_recovery_stamp(alloc: Allocator,
                                                                                     recorder: Recorder) -> None:
    # A read of the stamp, then a write of the gate, let a recovery that finished in between be
    # undone (placements refused until recover ran again): the recorder reads nothing itself.
    register_fleet(alloc)
    recorder.drain()
    alloc.destroy()  # Redis lost its data
    hget = recorder.redis.hget

    def no_separate_read(key: str, field: str) -> Any:
        assert field not in ("recovered_at", "recovering"), "decided outside recovery.lua"
        return hget(key, field)

    recorder.redis.hget = no_separate_read  # type: ignore[method-assign]
    try:
        recorder.drain()
    finally:
        recorder.redis.hget = hget  # type: ignore[method-assign]
    assert recorder.stream_resets == 1
    with pytest.raises(Recovering):
        alloc.allocate({"cpu_cores": 1})


def test_stale_entries_of_a_dead_consumer_are_claimed(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    dead = Recorder(alloc, engine, consumer="dead", block_ms=0, estimates_every_s=0)
    dead.read(0)  # took the entries and died
    live = Recorder(alloc, engine, consumer="live", block_ms=0, claim_idle_ms=1, estimates_every_s=0)
    written: list[int] = []  # over as many steps as it takes (the entries must be idle to be claimed)
    wait_until(lambda: written.append(live.step(block_ms=0).written) or sum(written) == 2, timeout_s=10)
    assert live.backlog().total == 0 and count(engine, alloc) == 2


def test_a_drain_waits_for_a_dead_consumers_entries_without_spinning(alloc: Allocator, engine, monkeypatch) -> None:
    register_fleet(alloc)
    Recorder(alloc, engine, consumer="dead", block_ms=0, estimates_every_s=0).read(0)  # took them and died
    live = Recorder(alloc, engine, consumer="live", block_ms=0, claim_idle_ms=600, estimates_every_s=0)
    steps = []
    step = live.step
    monkeypatch.setattr(live, "step", lambda **kw: steps.append(1) or step(**kw))
    live.drain(timeout_s=10)  # the entries become claimable after 0.6 s
    assert count(engine, alloc) == 2
    assert len(steps) < 20  # a few looks, not a read loop with no pause


def test_background_recorder_keeps_up_with_allocations(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=50, estimates_every_s=0)
    thread, stop = rec.start()
    try:
        for _ in range(20):
            alloc.release(alloc.allocate({"cpu_cores": 1}).allocation_id)
        wait_until(lambda: count(engine, alloc) == 42)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive() and rec.backlog().total == 0


def test_start_recorder_embeds_a_recorder_thread(alloc: Allocator, database_url, engine) -> None:
    from allocator.history.recorder import start_recorder

    register_fleet(alloc)
    rec, thread, stop = start_recorder(alloc, database_url.render_as_string(hide_password=False), block_ms=20,
                                       estimates_every_s=0)
    try:
        wait_until(lambda: count(engine, alloc) == 2)
    finally:
        stop.set()
        thread.join(5)
        rec.engine.dispose()


def test_a_stopped_recorder_leaves_the_group_when_it_holds_nothing(alloc: Allocator, engine) -> None:
    register_fleet(alloc)
    rec = Recorder(alloc, engine, block_ms=20, estimates_every_s=0)
    thread, stop = rec.start()
    wait_until(lambda: count(engine, alloc) == 2)
    stop.set()
    thread.join(5)
    assert alloc.redis.xinfo_consumers(alloc.keys.events, alloc.keys.recorder_group) == []
