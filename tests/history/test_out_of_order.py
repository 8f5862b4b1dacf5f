"""Events that reach the recorder out of stream order (a dead consumer's entries claimed after
newer ones were written) fold into the same rows as in order."""

from __future__ import annotations

import itertools
import json
import time

from allocator import Allocator
from allocator.agent.fencing import claim_grant
from allocator.history.projection import (
    OutboxEvent,
    fold_allocation,
    fold_host,
    fold_placement,
    new_allocation,
    new_host,
    placement_key,
)
from allocator.history.recorder import Recorder

from .. import jobs
from .fleet import allocation_row

GRANT = {"host": "h1", "host_gen": 1, "gpus": [{"pos": 0, "index": 0, "uuid": "u0", "model": "T4", "memory_mb": 16384}],
         "cores": [0, 1], "shared_millis": 0, "ram_mb": 1024, "created": 1_000, "ttl_ms": 0, "expires": 0}


def ev(n: int, kind: str, data: dict, ts: int | None = None) -> OutboxEvent:
    return OutboxEvent.parse(f"{n}-0", {"type": kind, "id": "a1", "ts": str(ts if ts is not None else n), "data": json.dumps(data)})


def folded(order: list[OutboxEvent]) -> dict:
    row = new_allocation("ns", "a1")
    for e in order:
        fold_allocation(row, e)
    return {k: v for k, v in row.items() if k not in ("updated_at",)}


def host_folded(order: list[OutboxEvent]) -> dict:
    row = new_host("ns", "h1")
    for e in order:
        fold_host(row, e)
    return row


def same_in_every_order(fold, evs: list[OutboxEvent]):
    """fold(evs) in stream order, asserted to be what every other order of the events folds to."""
    in_order = fold(evs)
    for order in itertools.permutations(evs):
        assert fold(list(order)) == in_order, [e.type for e in order]
    return in_order


def test_a_running_job_is_active_in_every_order_of_its_events():
    evs = [ev(1_000, "submitted", {"priority": 1}), ev(1_001, "allocated", GRANT), ev(1_002, "started", {"started": 1_002})]
    in_order = same_in_every_order(folded, evs)
    assert (in_order["state"], in_order["gpu_count"], in_order["host_id"]) == ("active", 1, "h1")


def test_a_released_allocation_keeps_its_grant_when_its_release_came_first():
    evs = [ev(1_001, "allocated", GRANT),
           ev(2_000, "released", {"host": "h1", "state": "released", "reason": "released", "activated": 1_001, "created": 1_000})]
    in_order = same_in_every_order(folded, evs)
    assert (in_order["state"], in_order["gpu_count"], in_order["cpu_millis"], in_order["ram_mb"]) == ("released", 1, 2000, 1024)


def test_a_requeued_and_placed_again_task_shows_its_latest_placement_in_every_order():
    second = {**GRANT, "host": "h2", "gpus": []}
    evs = [ev(1_001, "allocated", GRANT),
           ev(2_000, "released", {"host": "h1", "state": "released", "reason": "preempted", "activated": 1_001, "created": 1_000}),
           ev(2_001, "requeued", {"front": True}),
           ev(3_000, "allocated", second)]
    in_order = same_in_every_order(folded, evs)
    assert (in_order["state"], in_order["host_id"], in_order["gpu_count"], in_order["requeues"]) == ("active", "h2", 0, 1)


def placements_folded(order: list[OutboxEvent]) -> dict[int, dict]:
    """The placements rows, folded as the recorder does (each after its allocation's row)."""
    row, rows = new_allocation("ns", "a1"), {}
    for e in order:
        fold_allocation(row, e)
        key = placement_key(e)
        if key is not None:
            rows[key] = fold_placement(rows.get(key), e, row, key)
    return rows


def test_each_placement_keeps_its_own_grant_in_every_order_of_its_events():
    second = {**GRANT, "host": "h2", "gpus": [], "cores": [], "shared_millis": 500, "ram_mb": 2048}
    evs = [ev(1_001, "allocated", GRANT),
           ev(2_000, "released", {"host": "h1", "state": "released", "reason": "preempted", "activated": 1_001, "created": 1_000}),
           ev(2_001, "requeued", {"front": True}),
           ev(3_000, "allocated", second)]
    in_order = same_in_every_order(placements_folded, evs)
    assert (in_order[1_001]["host_id"], in_order[1_001]["gpu_count"], in_order[1_001]["cpu_millis"]) == ("h1", 1, 2000)
    assert (in_order[3_000]["host_id"], in_order[3_000]["gpu_count"], in_order[3_000]["cpu_millis"]) == ("h2", 0, 500)


def test_a_requeued_task_cancelled_in_line_is_cancelled_in_every_order():
    evs = [ev(1_001, "allocated", GRANT),
           ev(2_000, "released", {"host": "h1", "state": "released", "reason": "preempted", "activated": 1_001, "created": 1_000}),
           ev(2_001, "requeued", {"front": True}),
           ev(2_500, "cancelled", {"reason": "cancelled"})]
    in_order = same_in_every_order(folded, evs)
    assert (in_order["state"], in_order["release_reason"]) == ("cancelled", "cancelled")


def test_a_task_failed_by_its_hosts_loss_keeps_its_release_when_the_failure_came_first():
    evs = [ev(1_001, "allocated", GRANT),
           ev(2_000, "released", {"host": "h1", "state": "released", "reason": "host_lost", "activated": 1_001, "created": 1_000}),
           ev(2_001, "finished", {"host": "h1", "outcome": "failed", "state": "failed", "reason": "host_lost"})]
    in_order = same_in_every_order(folded, evs)
    assert (in_order["state"], in_order["release_reason"], in_order["run_ms"]) == ("failed", "host_lost", 999)


def test_a_host_is_registered_at_its_first_registration_in_every_order():
    reg = OutboxEvent.parse("1-0", {"type": "host_registered", "id": "h1", "ts": "1",
                                    "data": json.dumps({"cores": [0], "ram_mb": 1024, "gpus": [], "labels": {}})})
    upd = OutboxEvent.parse("5-0", {"type": "host_updated", "id": "h1", "ts": "5",
                                    "data": json.dumps({"cores": [0, 1], "ram_mb": 1024, "gpus": [], "labels": {}})})
    assert same_in_every_order(host_folded, [reg, upd])["registered_at"] == reg.ts


def test_a_host_keeps_its_inventory_when_a_drain_was_folded_before_its_registration():
    reg = OutboxEvent.parse("1-0", {"type": "host_registered", "id": "h1", "ts": "1",
                                    "data": json.dumps({"cores": [0, 1, 2, 3], "ram_mb": 4096, "gpus": [], "labels": {}})})
    drain = OutboxEvent.parse("2-0", {"type": "host_draining", "id": "h1", "ts": "2", "data": "{}"})
    row = same_in_every_order(host_folded, [reg, drain])
    assert (row["state"], row["cpu_cores"], row["ram_mb"]) == ("draining", 4, 4096)


def test_a_drain_an_operator_took_over_from_the_agent_is_recorded_as_the_operators():
    by_agent = OutboxEvent.parse("2-0", {"type": "host_draining", "id": "h1", "ts": "2", "data": '{"by":"agent"}'})
    by_operator = OutboxEvent.parse("3-0", {"type": "host_draining", "id": "h1", "ts": "3", "data": '{"by":"operator"}'})
    row = same_in_every_order(host_folded, [by_agent, by_operator])
    assert (row["state"], row["drained_by"]) == ("draining", "operator")


def _host_event(n: int, kind: str, data: dict) -> OutboxEvent:
    return OutboxEvent.parse(f"{n}-0", {"type": kind, "id": "h1", "ts": str(n), "data": json.dumps(data)})


HOST_SPEC = {"cores": [0, 1], "ram_mb": 1024, "gpus": [], "labels": {}}


def test_a_drain_claimed_late_is_not_hidden_by_a_registration_that_came_after_it():
    evs = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_draining", {"by": "agent"}),
           _host_event(3, "host_draining", {"by": "operator"}), _host_event(4, "host_updated", HOST_SPEC)]
    row = same_in_every_order(host_folded, evs)
    assert (row["state"], row["drained_by"]) == ("draining", "operator")


def test_an_agents_drain_ends_at_the_registration_after_a_loss_and_an_operators_outlives_it():
    # register_host announces both: host_resumed for an agent's drain, host_draining again for an operator's.
    agent = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_draining", {"by": "agent"}),
             _host_event(3, "host_lost", {}), _host_event(4, "host_updated", HOST_SPEC), _host_event(5, "host_resumed", {})]
    assert same_in_every_order(host_folded, agent)["state"] == "ready"  # the ledger: back ready
    operator = [*agent[:1], _host_event(2, "host_draining", {"by": "operator"}), *agent[2:4],
                _host_event(5, "host_draining", {"by": "operator"})]
    row = same_in_every_order(host_folded, operator)
    assert (row["state"], row["drained_by"]) == ("draining", "operator")


def test_a_lost_host_keeps_its_operators_drain_whatever_order_the_events_come_in():
    evs = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_draining", {"by": "operator"}),
           _host_event(3, "host_lost", {})]
    row = same_in_every_order(host_folded, evs)
    assert (row["state"], row["drained_by"]) == ("lost", "operator")


def test_a_removal_ends_a_drain_whatever_order_the_events_come_in():
    evs = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_draining", {"by": "operator"}),
           _host_event(3, "host_removed", {})]
    row = same_in_every_order(host_folded, evs)
    assert (row["state"], row["drained_by"]) == ("removed", None)


def test_a_registration_brings_a_host_back_only_from_a_loss_before_it():
    evs = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_updated", HOST_SPEC),
           _host_event(3, "host_lost", {})]
    assert same_in_every_order(host_folded, evs)["state"] == "lost"
    evs = [_host_event(1, "host_registered", HOST_SPEC), _host_event(2, "host_lost", {}),
           _host_event(3, "host_updated", HOST_SPEC)]
    assert same_in_every_order(host_folded, evs)["state"] == "ready"


def test_a_job_started_while_its_placement_was_with_a_dead_recorder_is_recorded_active(alloc: Allocator, engine) -> None:
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="32Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    task = alloc.enqueue(jobs.add, 1, 2, resources={"gpus": 1, "cpu_cores": 2})
    dead = Recorder(alloc, engine, consumer="dead", block_ms=0, estimates_every_s=0)
    dead.read(0)  # took the registration, the submission and the placement, then died
    claim_grant(alloc, task.id, "w1", "h1", start=True)  # the worker starts the job: "started"
    live = Recorder(alloc, engine, consumer="live", block_ms=0, claim_idle_ms=60_000, estimates_every_s=0)
    assert live.step(block_ms=0).written == 1  # "started", before what the dead recorder holds
    live.claim_idle_ms = 1
    time.sleep(0.01)
    live.drain()  # now the dead recorder's entries, claimed
    assert live.backlog().total == 0
    row = allocation_row(engine, alloc, task.id)
    assert (row["state"], row["host_id"], row["gpu_count"]) == ("active", "h1", 1)
