"""/metrics scraped from the live server and parsed with prometheus-client's own parser."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from allocator.api.metrics import tally

from .conftest import LiveApi, wait_until
from .test_ws import message, open_ws, until

MIB = 1 << 20


def scrape(api: LiveApi) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = api.client(auth=False).get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def test_metrics_read_the_fleet_from_redis(api: LiveApi) -> None:
    c = api.client()
    a = api.allocator
    train = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"},
                                            "priority": "high"}).json()
    c.post("/v1/allocations", json={"resources": {"gpu_memory_mb": "30Gi"}, "strategy": "first_fit"})
    c.post("/v1/allocations", json={"resources": {"gpu_memory_mb": "64Gi"}})  # refused: no GPU that large
    c.post("/v1/allocations", json={"resources": {"gpus": "x"}})  # refused: invalid
    hog = c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "T4"}}).json()
    c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "T4", "cpu_cores": 1}, "on_busy": "queue",
                                    "priority": "low", "selector": {"cluster": "lab"}})
    c.post("/v1/tasks", json={"task": "add", "args": [1, 2], "resources": {"gpus": 2, "gpu_model": "T4"}, "priority": "low"})
    sec, usec = a.redis.time()
    a.redis.zadd(a.keys.heartbeats, {"gpu-a": sec * 1000 + usec // 1000 - 5000})

    m = scrape(api)
    assert value(m, "allocator_redis_up") == 1
    assert value(m, "allocator_queue_depth", priority="low") == 2
    assert value(m, "allocator_queue_depth", priority="high") == 0
    assert value(m, "allocator_gpu_memory_capacity_bytes", host="gpu-a") == 2 * 40960 * MIB
    assert value(m, "allocator_gpu_memory_allocated_bytes", host="gpu-a") == (20480 + 30720) * MIB
    assert value(m, "allocator_gpu_memory_allocated_bytes", host="gpu-b") == 2 * 16384 * MIB
    assert value(m, "allocator_cpu_cores_capacity", host="gpu-b") == 8
    assert value(m, "allocator_cpu_cores_allocated", host="gpu-a") == 5
    assert value(m, "allocator_ram_capacity_bytes", host="gpu-a") == 128 * 1024 * MIB
    assert value(m, "allocator_ram_allocated_bytes", host="gpu-a") == 32 * 1024 * MIB
    assert value(m, "allocator_active_allocations", host="gpu-a") == 2
    assert value(m, "allocator_host_ready", host="gpu-c") == 1
    assert value(m, "allocator_host_parked", host="gpu-c") == 0
    assert 4.5 <= value(m, "allocator_heartbeat_age_seconds", host="gpu-a") < 60
    assert ("allocator_heartbeat_age_seconds", (("host", "gpu-b"),)) not in m
    assert value(m, "allocator_placements_total", kind="lease", strategy="best_fit") == 2
    assert value(m, "allocator_placements_total", kind="lease", strategy="first_fit") == 1
    assert value(m, "allocator_refusals_total", reason="insufficient_gpu_memory") == 1
    assert value(m, "allocator_refusals_total", reason="invalid_request") == 1
    assert value(m, "allocator_outbox_events_total", type="submitted") == 2
    assert value(m, "allocator_outbox_events_total", type="host_registered") == 3
    assert value(m, "allocator_placement_latency_seconds_count") == 3
    assert value(m, "allocator_api_placement_seconds_count", interface="rest") == 3
    # No recorder group yet: everything in the stream is backlog.
    assert value(m, "allocator_recorder_backlog_events") == a.redis.xlen(a.keys.events)

    # The queued request starts when the hog is released: placements, latency and releases move.
    c.delete(f"/v1/allocations/{hog['allocation_id']}")
    c.delete(f"/v1/allocations/{train['allocation_id']}")
    m2 = scrape(api)
    assert value(m2, "allocator_queue_depth", priority="low") == 1
    assert value(m2, "allocator_releases_total", reason="released") == 2
    assert value(m2, "allocator_placement_latency_seconds_count") == 4
    assert value(m2, "allocator_placement_latency_seconds_bucket", le="+Inf") == 4
    assert value(m2, "allocator_placement_latency_seconds_sum") >= 0


def test_gpu_memory_other_processes_hold_is_neither_available_nor_idle(api: LiveApi) -> None:
    api.allocator.register_host({"id": "u", "cpu_cores": 4, "ram_mb": "16Gi", "gpus": [
        {"index": 0, "memory_mb": "40Gi", "used_mb": "40Gi"}, {"index": 1, "memory_mb": "40Gi", "used_mb": "30Gi"}]})
    m = scrape(api)
    assert value(m, "allocator_gpu_memory_capacity_bytes", host="u") == 80 * 1024 * MIB
    assert value(m, "allocator_gpu_memory_allocated_bytes", host="u") == 0
    assert value(m, "allocator_gpu_memory_available_bytes", host="u") == 10 * 1024 * MIB
    assert value(m, "allocator_gpu_memory_unmanaged_bytes", host="u") == 70 * 1024 * MIB
    assert value(m, "allocator_gpus_idle", host="u") == 1  # the full GPU cannot be granted whole


def test_counts_survive_several_replicas_and_are_counted_once(api: LiveApi) -> None:
    c = api.client()
    for _ in range(5):
        c.post("/v1/allocations", json={"resources": {"cpu_cores": 0.5}})
    # Two more "replicas" tallying the same stream at once: nothing is counted twice.
    tally(api.allocator)
    tally(api.allocator, batch=2)
    m = scrape(api)
    assert value(m, "allocator_placements_total", kind="lease", strategy="best_fit") == 5


def test_eta_error_of_started_tasks(api: LiveApi) -> None:
    c = api.client()
    a = api.allocator
    hog = c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}}).json()
    w = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue"}).json()
    sec, usec = a.redis.time()
    now_ms = sec * 1000 + usec // 1000
    # The prediction the API keeps when it first reports an ETA (here: 30 s from now).
    a.redis.hdel(a.keys.eta_predictions, w["allocation_id"])
    a.redis.hset(a.keys.eta_predictions, w["allocation_id"], now_ms + 30_000)
    c.delete(f"/v1/allocations/{hog['allocation_id']}")
    m = scrape(api)
    assert value(m, "allocator_eta_error_seconds_count") == 1
    assert value(m, "allocator_eta_error_seconds_bucket", le="15.0") == 0
    assert value(m, "allocator_eta_error_seconds_bucket", le="30.0") == 1
    assert 25 <= value(m, "allocator_eta_error_seconds_sum") <= 30
    assert not a.redis.hexists(a.keys.eta_predictions, w["allocation_id"])


def test_websocket_placements_are_timed(api: LiveApi) -> None:
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit")))
        until(ws, "placed")
    wait_until(lambda: ("allocator_api_placement_seconds_count", (("interface", "ws"),)) in scrape(api), what="ws timing")
    m = scrape(api)
    assert value(m, "allocator_api_placement_seconds_count", interface="ws") == 1


def test_background_tally_counts_without_scrapes(api: LiveApi) -> None:
    api.client().post("/v1/allocations", json={"resources": {"cpu_cores": 1}})
    a = api.allocator
    wait_until(lambda: a.redis.hget(a.keys.api_stats, "placements|lease|best_fit") == "1", what="the tally loop")
