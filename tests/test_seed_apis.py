"""The seed-compatible layers (allocator/seeds.py): the seeds' examples, result shapes and refusals."""

from __future__ import annotations

import asyncio
import json
import inspect
import time
from datetime import datetime, timezone

import pytest

from allocator import seeds
from allocator.errors import InsufficientResources, InvalidRequest
from allocator.seeds import AllocationManager, ResourceAllocator, allocate_resources

from .conftest import ledger_dump
from .service_helpers import catalog, free_ports

TOOL_SUCCESS_KEYS = {"success", "allocation_id", "task_id", "resources", "queue_position", "estimated_start_time", "metadata"}
TOOL_RESOURCE_KEYS = {"gpu_id", "gpu_memory_mb", "cpu_cores", "ram_mb"}
TOOL_FAILURE_KEYS = {"success", "task_id", "allocation_id", "error", "queue_position", "estimated_start_time"}
SEED_REQUIREMENTS = {"gpu_memory_mb": 2048, "cpu_cores": 2, "ram_mb": 4096, "priority": 1}


def iso(clock) -> str:
    """The seeds' timestamp text for ``clock()`` (any callable returning epoch seconds)."""
    return datetime.fromtimestamp(clock(), tz=timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def seed_tool_host(a) -> None:
    """Sized so that seed 004's example leaves exactly its printed available_resources."""
    a.register_host(id="h1", cpu_cores=10, ram_mb=20480, gpus=[{"index": 0, "model": "T4", "memory_mb": 10240}])


def quick_start_manager(a) -> AllocationManager:
    """The seed's quick start, with a catalog of tiny real services for its MCP server names
    (filesystem, github, database) run by the manager on a free port range."""
    return AllocationManager(allocator=a, total_cpu=16.0, total_memory=32768, total_workers=10,
                             services=catalog(), service_ports=free_ports(10))


# -- allocate_resources (seed 004) ------------------------------------------------------------------


def test_tool_seed_example_returns_the_seed_result(alloc, clock):
    seed_tool_host(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, "best_fit", allocator=alloc)
    assert r["success"] is True and r["task_id"] == "task_123"
    assert {k: r["resources"][k] for k in TOOL_RESOURCE_KEYS} == {
        "gpu_id": "gpu_0", "gpu_memory_mb": 2048, "cpu_cores": [0, 1], "ram_mb": 4096,
    }
    assert r["queue_position"] == 0
    assert r["estimated_start_time"] == iso(clock)
    assert r["metadata"]["available_resources"] == {"gpu_memory_mb": 8192, "cpu_cores": 8, "ram_mb": 16384}


def test_tool_success_has_every_seed_key(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, allocator=alloc)
    assert TOOL_SUCCESS_KEYS <= r.keys()
    assert TOOL_RESOURCE_KEYS <= r["resources"].keys()
    assert {"allocation_time_ms", "available_resources"} <= r["metadata"].keys()
    assert isinstance(r["metadata"]["allocation_time_ms"], float)


def test_tool_records_task_id_and_task_type_on_the_allocation(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("task_123", "rendering", SEED_REQUIREMENTS, allocator=alloc)
    a = alloc.get(r["allocation_id"])
    assert (a.task_id, a.task_type, a.priority) == ("task_123", "rendering", "normal")


def test_tool_accepts_a_priority_name(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("t", "processing", {"cpu_cores": 1, "priority": "critical"}, allocator=alloc)
    assert alloc.get(r["allocation_id"]).priority == "critical"


def test_tool_without_gpu_memory_reports_no_gpu(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("t", "processing", {"cpu_cores": 2, "ram_mb": 1024}, allocator=alloc)
    assert r["resources"]["gpu_id"] is None and r["resources"]["gpu_memory_mb"] == 0


def test_tool_fractional_cpu_reports_the_shared_amount_and_no_core_ids(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("t", "processing", {"cpu_cores": 0.5}, allocator=alloc)
    assert (r["resources"]["cpu_cores"], r["resources"]["cpu_shared"]) == ([], 0.5)  # a list, as for pinned cores
    assert r["metadata"]["available_resources"]["cpu_cores"] == 9.5


def test_tool_refusal_is_a_structured_error(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("task_9", "ml_inference", {"cpu_cores": 1, "ram_mb": 999_999}, allocator=alloc)
    assert r.keys() == TOOL_FAILURE_KEYS
    assert r["success"] is False and r["allocation_id"] is None and r["task_id"] == "task_9"
    assert r["queue_position"] is None and r["estimated_start_time"] is None
    assert r["error"]["code"] == "INSUFFICIENT_RAM"
    assert r["error"]["field"] == "resource_requirements.ram_mb"
    assert "999999 MiB" in r["error"]["message"]


def test_tool_refusal_changes_nothing(alloc):
    seed_tool_host(alloc)
    before = ledger_dump(alloc)
    allocate_resources("t", "ml_inference", {"gpu_memory_mb": 99_999}, allocator=alloc)
    assert ledger_dump(alloc) == before


def test_tool_unknown_requirement_is_a_structured_error(alloc):
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1, "vram": 4}, allocator=alloc)
    assert r["success"] is False
    assert r["error"] == {"code": "INVALID_REQUEST", "message": "resource_requirements.vram: unknown field",
                          "field": "resource_requirements.vram"}


def test_tool_bad_memory_string_names_its_field(alloc):
    r = allocate_resources("t", "ml_inference", {"gpu_memory_mb": "lots"}, allocator=alloc)
    assert r["error"]["field"] == "resource_requirements.gpu_memory_mb"


def test_tool_error_message_names_the_field_as_the_caller_wrote_it(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1e308}, allocator=alloc)
    assert r["error"]["field"] == "resource_requirements.cpu_cores"
    assert r["error"]["message"].startswith("resource_requirements.cpu_cores: ")


def test_tool_bad_priority_names_its_field(alloc):
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1, "priority": 7}, allocator=alloc)
    assert r["error"]["field"] == "resource_requirements.priority"


def test_tool_bad_strategy_names_allocation_strategy(alloc):
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1}, "random_fit", allocator=alloc)
    assert r["error"]["field"] == "allocation_strategy"


def test_tool_requirements_that_are_not_a_dict_are_a_structured_error(alloc):
    r = allocate_resources("t", "ml_inference", ["cpu", 2], allocator=alloc)  # type: ignore[arg-type]
    assert r["success"] is False and r["error"]["field"] == "resource_requirements"


def test_tool_bad_task_id_is_a_structured_error(alloc):
    r = allocate_resources(["not", "an", "id"], "ml_inference", {"cpu_cores": 1}, allocator=alloc)  # type: ignore[arg-type]
    assert r["success"] is False and r["error"]["field"] == "task_id"


def test_tool_ttl_seconds_expires_the_allocation(alloc, clock):
    seed_tool_host(alloc)
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 2, "ttl_seconds": 60}, allocator=alloc)
    clock.advance(61)
    assert alloc.expire() == [r["allocation_id"]]
    assert alloc.get(r["allocation_id"]).release_reason == "expired"


def test_tool_uses_the_default_allocator_when_none_is_given(alloc, monkeypatch):
    seed_tool_host(alloc)
    monkeypatch.setattr(seeds, "_default", alloc)
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1})
    assert alloc.get(r["allocation_id"]) is not None


def fill_the_gpu(a, **fields) -> str:
    """Takes 9000 of the seed host's 10240 MiB of GPU memory."""
    return a.allocate({"gpu_memory_mb": 9000, "cpu_cores": 1}, **fields).allocation_id


def test_tool_queues_a_request_that_must_wait_by_default(alloc):
    seed_tool_host(alloc)
    fill_the_gpu(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, allocator=alloc)
    assert r["success"] is True and r["queue_position"] == 1
    assert r["resources"]["gpu_id"] is None and r["resources"]["cpu_cores"] == []
    assert r["resources"]["gpu_memory_mb"] == 2048 and r["metadata"]["state"] == "pending"
    assert alloc.get(r["allocation_id"]).state == "pending"


def test_manager_release_of_a_queued_request_cancels_it_and_frees_nothing(alloc):
    seed_tool_host(alloc)
    fill_the_gpu(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, allocator=alloc)
    released = AllocationManager(allocator=alloc).release_resources(r["allocation_id"])
    assert (released["status"], released["already_released"]) == ("released", False)
    assert (released["cpu_freed"], released["memory_freed"], released["gpu_memory_freed"]) == (0.0, 0, 0)
    assert alloc.get(r["allocation_id"]).state == "cancelled"


def test_tool_queued_request_reports_its_estimated_start_time(alloc, clock):
    seed_tool_host(alloc)
    fill_the_gpu(alloc, expected_duration=60)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, allocator=alloc)
    assert r["estimated_start_time"] == iso(lambda: clock() + 60)


def test_tool_queued_request_is_granted_when_capacity_frees(alloc, clock):
    seed_tool_host(alloc)
    busy = fill_the_gpu(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, allocator=alloc)
    clock.advance(5)
    alloc.release(busy)
    placed = seeds.tool_result(alloc, alloc.get(r["allocation_id"]))
    assert (placed["queue_position"], placed["resources"]["gpu_id"], placed["metadata"]["state"]) == (0, "gpu_0", "active")
    assert placed["estimated_start_time"] == iso(clock)


def test_tool_on_busy_fail_refuses_what_does_not_fit_now(alloc):
    seed_tool_host(alloc)
    fill_the_gpu(alloc)
    before = ledger_dump(alloc)
    r = allocate_resources("task_123", "ml_inference", SEED_REQUIREMENTS, on_busy="fail", allocator=alloc)
    assert r["success"] is False and r["error"]["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert "largest free 1240 MiB" in r["error"]["message"]
    assert ledger_dump(alloc) == before


def test_tool_refuses_at_once_what_no_host_could_ever_hold(alloc):
    seed_tool_host(alloc)
    before = ledger_dump(alloc)
    r = allocate_resources("t", "ml_inference", {"gpus": 2, "cpu_cores": 1}, allocator=alloc)
    assert r["success"] is False and r["error"]["code"] == "INSUFFICIENT_GPUS"
    assert r["error"]["message"] == "no host could ever hold 2 GPUs: at most 1 on one host"
    assert ledger_dump(alloc) == before


def test_tool_refuses_at_once_gpus_a_host_keeps_for_critical_work(alloc):
    alloc.register_host(id="h", cpu_cores=8, ram_mb=16384, reserve_gpus=1,
                        gpus=[{"index": 0, "memory_mb": 16384}, {"index": 1, "memory_mb": 16384}])
    before = ledger_dump(alloc)
    r = allocate_resources("t1", "train", {"gpus": 2, "cpu_cores": 1}, allocator=alloc)
    assert r["success"] is False and r["error"]["code"] == "INSUFFICIENT_GPUS"
    assert "at most 1 on one host" in r["error"]["message"] and "critical" in r["error"]["message"]
    assert ledger_dump(alloc) == before
    critical = allocate_resources("t2", "train", {"gpus": 2, "cpu_cores": 1, "priority": "critical"}, allocator=alloc)
    assert critical["success"] is True


def test_tool_queues_shares_of_gpus_others_hold_on_a_host_with_a_reserve(alloc):
    alloc.register_host(id="h", cpu_cores=8, ram_mb=16384, reserve_gpus=1,
                        gpus=[{"index": 0, "memory_mb": 16384}, {"index": 1, "memory_mb": 16384}])
    alloc.allocate({"gpus": 1, "gpu_memory_mb": "1Gi", "cpu_cores": 1})
    alloc.allocate({"gpus": 1, "gpu_memory_mb": "1Gi", "cpu_cores": 1}, priority="critical", strategy="worst_fit")
    r = allocate_resources("t1", "train", {"gpus": 2, "gpu_memory_mb": 1024, "cpu_cores": 1}, allocator=alloc)
    assert r["success"] is True


def test_tool_with_no_host_registered_is_refused(alloc):
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1}, allocator=alloc)
    assert r["success"] is False and r["error"]["message"] == "no host is registered"


def test_tool_bad_on_busy_names_its_field(alloc):
    r = allocate_resources("t", "ml_inference", {"cpu_cores": 1}, on_busy="wait", allocator=alloc)  # type: ignore[arg-type]
    assert r["error"]["field"] == "on_busy"


# -- AllocationManager (seed 000) -------------------------------------------------------------------


def test_manager_quick_start_allocates_and_releases(alloc):
    manager = quick_start_manager(alloc)
    allocation = manager.request_resources(
        job_id="feature-dev-001", mcp_servers=["filesystem", "github", "database"], workers=4,
        priority="high", ttl_seconds=7200,
    )
    assert allocation["status"] == "active"
    assert {k: allocation["resources"][k] for k in ("cpu", "memory", "workers")} == {"cpu": 4.0, "memory": 8192, "workers": 4}
    released = manager.release_resources(allocation["allocation_id"])
    assert (released["status"], released["workers_released"], released["cpu_freed"], released["memory_freed"]) == (
        "released", 4, 4.0, 8192,
    )


def test_manager_quick_start_as_the_seed_writes_it_records_mcp_servers_where_no_host_runs_services(alloc):
    manager = AllocationManager(allocator=alloc, total_cpu=16.0, total_memory=32768, total_workers=10)
    allocation = manager.request_resources(job_id="feature-dev-001", mcp_servers=["filesystem", "github", "database"],
                                           workers=4, priority="high", ttl_seconds=7200)
    assert allocation["status"] == "active" and len(allocation["workers_allocated"]) == 4
    assert [(s["name"], s["status"], s["endpoint"]) for s in allocation["mcp_servers"]] == [
        ("filesystem", "not_started", None), ("github", "not_started", None), ("database", "not_started", None)]
    assert manager.get_allocation(allocation["allocation_id"])["mcp_servers"] == allocation["mcp_servers"]
    assert manager.get_capacity()["running_mcp_servers"] == []
    r = manager.request_resources(job_id="job-002", mcp_servers=["filesystem"], workers=20)  # the seed's error example
    assert r["error"] == "Insufficient workers: requested 20, available 6"
    assert manager.release_resources(allocation["allocation_id"])["workers_released"] == 4


def test_manager_request_result_has_every_seed_key(alloc, clock):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=2, priority="high", ttl_seconds=7200)
    assert {"allocation_id", "status", "job_id", "mcp_servers", "workers_allocated", "resources", "ttl_seconds",
            "created_at"} <= r.keys()
    assert (r["job_id"], r["ttl_seconds"], r["created_at"]) == ("job-001", 7200, iso(clock))


def test_manager_names_workers_after_the_job(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=2)
    assert [w["worker_id"] for w in r["workers_allocated"]] == ["worker-job-001-000", "worker-job-001-001"]
    first = r["workers_allocated"][0]
    assert {k: first[k] for k in ("cpu", "memory", "status", "host_id")} == {
        "cpu": 1.0, "memory": 2048, "status": "active", "host_id": "local",
    }


def test_manager_starts_mcp_servers_and_returns_their_endpoints(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem", "github"])
    first = int(alloc.redis.hget(alloc.keys.host("local"), "port_lo"))  # the pool's lowest port
    assert [(s["name"], s["status"], s["endpoint"]) for s in r["mcp_servers"]] == [
        ("filesystem", "running", f"http://localhost:{first}"),
        ("github", "running", f"http://localhost:{first + 1}"),
    ]


def test_manager_capacity_matches_the_seed_example(alloc):
    manager = quick_start_manager(alloc)
    manager.request_resources("job-001", ["filesystem"], workers=4)
    cap = manager.get_capacity()
    assert {k: cap[k] for k in ("total_cpu", "total_memory", "total_workers", "allocated_cpu", "allocated_memory",
                                 "allocated_workers", "available_cpu", "available_memory", "available_workers",
                                 "running_mcp_servers", "active_allocations")} == {
        "total_cpu": 16.0, "total_memory": 32768, "total_workers": 10, "allocated_cpu": 4.0,
        "allocated_memory": 8192, "allocated_workers": 4, "available_cpu": 12.0, "available_memory": 24576,
        "available_workers": 6, "running_mcp_servers": ["filesystem"], "active_allocations": 1,
    }


def test_manager_without_arguments_has_the_seed_default_capacity(alloc, monkeypatch):
    monkeypatch.setattr(seeds, "_default", alloc)  # the default ledger, with no host yet
    manager = AllocationManager()
    allocation = manager.request_resources(job_id="job-001", mcp_servers=[], workers=4, priority="high")
    cap = manager.get_capacity()
    assert allocation["status"] == "active"
    assert (cap["total_cpu"], cap["total_memory"], cap["total_workers"], cap["available_workers"]) == (16.0, 32768, 10, 6)


def test_manager_without_arguments_registers_no_host_beside_a_fleet(alloc, monkeypatch):
    alloc.register_host(id="g1", cpu_cores=8, ram_mb=16384)
    monkeypatch.setattr(seeds, "_default", alloc)
    manager = AllocationManager()
    assert [h.host_id for h in alloc.capacity().hosts] == ["g1"]
    assert (manager.get_capacity()["total_cpu"], manager.get_capacity()["total_memory"]) == (8.0, 16384)


@pytest.mark.parametrize("given, expected", [
    ({"total_cpu": 8.0}, (8.0, 32768, 10)),
    ({"total_memory": 65536}, (16.0, 65536, 10)),
    ({"total_workers": 4}, (16.0, 32768, 4)),
])
def test_manager_with_some_totals_takes_the_seed_defaults_for_the_others(alloc, given, expected):
    manager = AllocationManager(allocator=alloc, **given)
    cap = manager.get_capacity()
    assert (cap["total_cpu"], cap["total_memory"], cap["total_workers"]) == expected
    assert manager.request_resources(job_id="j", mcp_servers=[], workers=2)["status"] == "active"


@pytest.mark.parametrize("given, field", [
    ({"total_cpu": -4}, "total_cpu"), ({"total_cpu": "abc"}, "total_cpu"),
    ({"total_memory": "lots"}, "total_memory"), ({"total_workers": "3"}, "total_workers"),
    ({"total_workers": 2.5}, "total_workers"),
])
def test_manager_with_a_bad_total_names_it_and_registers_nothing(alloc, given, field):
    with pytest.raises(InvalidRequest) as exc:
        AllocationManager(allocator=alloc, **given)
    assert exc.value.field == field
    assert alloc.capacity().host_count == 0


def test_resource_allocator_without_arguments_registers_no_host_beside_a_fleet(alloc, monkeypatch):
    alloc.register_host(id="g1", cpu_cores=8, ram_mb=16384)
    monkeypatch.setattr(seeds, "_default", alloc)
    ResourceAllocator()
    assert [h.host_id for h in alloc.capacity().hosts] == ["g1"]


@pytest.mark.parametrize("given, field", [({"total_cpu": "abc"}, "total_cpu"), ({"total_memory_gb": "8"}, "total_memory_gb")])
def test_resource_allocator_with_a_bad_total_names_it(alloc, given, field):
    with pytest.raises(InvalidRequest) as exc:
        ResourceAllocator(allocator=alloc, register=True, **given)
    assert exc.value.field == field


def test_a_request_without_a_job_id_is_refused_naming_job_id(alloc):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=8192, total_workers=2)
    for job_id in (None, ""):
        r = manager.request_resources(job_id=job_id, mcp_servers=[], workers=1)
        assert (r["status"], r["error_field"]) == ("failed", "job_id")


def test_a_seed_004_request_without_a_task_id_is_refused_naming_task_id(alloc):
    seed_tool_host(alloc)
    r = allocate_resources(None, "x", SEED_REQUIREMENTS, allocator=alloc)
    assert (r["success"], r["error"]["field"]) == (False, "task_id")


def test_seed_004_refusals_name_the_selector_or_the_gpu_model(alloc):
    seed_tool_host(alloc)
    r = allocate_resources("t", "x", {"cpu_cores": 1, "selector": {"cluster": "nope"}}, allocator=alloc)
    assert r["error"]["field"] == "resource_requirements.selector"
    r = allocate_resources("t", "x", {"gpus": 1, "gpu_model": "A100"}, allocator=alloc)
    assert r["error"]["field"] == "resource_requirements.gpu_model"


def test_manager_capacity_reports_gpu_totals(alloc):
    alloc.register_host(id="g1", cpu_cores=8, ram_mb=16384, gpus=[{"index": 0, "memory_mb": 16384}, {"index": 1, "memory_mb": 16384}])
    manager = AllocationManager(allocator=alloc)
    manager.request_resources("job-1", workers=1, gpus=1, gpu_memory_mb=4096)
    cap = manager.get_capacity()
    assert (cap["total_gpus"], cap["total_gpu_memory"], cap["allocated_gpu_memory"], cap["available_gpu_memory"]) == (
        2, 32768, 4096, 28672,
    )


def test_manager_refuses_workers_beyond_total_workers_with_the_seed_message(alloc):
    manager = quick_start_manager(alloc)
    manager.request_resources("job-001", ["filesystem"], workers=4)
    r = manager.request_resources("job-002", ["filesystem"], workers=10)
    assert r["status"] == "failed"
    assert r["error"] == "Insufficient workers: requested 10, available 6"
    assert r["allocation_id"].startswith("alloc-") and manager.get_allocation(r["allocation_id"]) is None


def test_manager_seed_error_example_reports_all_ten_workers_available(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=20)
    assert r["error"] == "Insufficient workers: requested 20, available 10"


def test_manager_counts_available_workers_on_the_largest_single_host(alloc):
    alloc.register_host(id="a", cpu_cores=4, ram_mb=16384)
    alloc.register_host(id="b", cpu_cores=4, ram_mb=16384)
    manager = AllocationManager(allocator=alloc)
    r = manager.request_resources("job-001", workers=6)
    assert r["error"] == "Insufficient workers: requested 6, available 4"
    assert manager.get_capacity()["available_workers"] == 4


def test_manager_worker_slots_are_bounded_by_memory_too(alloc):
    alloc.register_host(id="a", cpu_cores=8, ram_mb=4096)
    manager = AllocationManager(allocator=alloc)
    r = manager.request_resources("job-001", workers=3)
    assert r["error"] == "Insufficient workers: requested 3, available 2"


def test_manager_fractional_worker_cpu_adds_up_in_millicores(alloc):
    alloc.register_host(id="a", cpu_cores=4, ram_mb=8192)
    manager = AllocationManager(allocator=alloc, worker_cpu=0.1, worker_memory=256)
    r = manager.request_resources("job-001", workers=3)
    assert r["resources"]["cpu"] == 0.3 and r["resources"]["memory"] == 768


def test_manager_adds_explicit_resources_to_the_workers(alloc):
    alloc.register_host(id="g1", cpu_cores=8, ram_mb=16384, gpus=[{"index": 0, "memory_mb": 16384}])
    manager = AllocationManager(allocator=alloc)
    r = manager.request_resources("job-1", workers=2, gpus=1, gpu_memory_mb=4096, cpu_cores=1, ram_mb="1Gi")
    assert (r["resources"]["cpu"], r["resources"]["memory"], r["resources"]["gpu_memory_mb"]) == (3.0, 5120, 4096)
    assert r["resources"]["gpus"][0]["index"] == 0


def test_manager_invalid_request_names_the_field(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=1, cpu_cores="lots")
    assert (r["status"], r["error_code"], r["error_field"]) == ("failed", "INVALID_REQUEST", "cpu_cores")


def test_manager_unknown_resource_keyword_fails_without_raising(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-1", workers=1, disk_gb=10)
    assert r["status"] == "failed" and "disk_gb" in r["error"]


def test_manager_bad_priority_fails_without_raising(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-1", ["filesystem"], workers=1, priority="urgent")
    assert r["status"] == "failed" and r["error"].startswith("priority:")


def test_manager_negative_workers_fail_without_raising(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-1", workers=-1)
    assert r["status"] == "failed" and r["error"].startswith("workers:")


def test_manager_records_the_task_type_from_metadata(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("task-feature-auth", ["filesystem"], workers=2,
                                  metadata={"master": "development", "task_type": "feature_implementation"})
    assert alloc.get(r["allocation_id"]).task_type == "feature_implementation"


def test_manager_release_of_unknown_allocation_is_an_error_result(alloc):
    manager = quick_start_manager(alloc)
    assert manager.release_resources("nonexistent-id") == {"status": "error", "error": "Allocation nonexistent-id not found"}


def test_manager_release_result_has_every_seed_key(alloc, clock):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=4, ttl_seconds=10_000)
    clock.advance(7200)
    released = manager.release_resources(r["allocation_id"])
    assert {"status", "allocation_id", "job_id", "workers_released", "cpu_freed", "memory_freed", "released_at",
            "duration_seconds"} <= released.keys()
    assert (released["job_id"], released["released_at"], released["duration_seconds"]) == ("job-001", iso(clock), 7200)


def test_manager_second_release_reports_released_and_frees_nothing(alloc):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem"], workers=4)
    manager.release_resources(r["allocation_id"])
    again = manager.release_resources(r["allocation_id"])
    assert again["status"] == "released" and again["already_released"] is True
    assert (again["workers_released"], again["cpu_freed"], again["memory_freed"]) == (0, 0.0, 0)
    assert manager.get_capacity()["available_cpu"] == 16.0


def test_manager_get_allocation_has_the_seed_shape(alloc, clock):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("job-001", ["filesystem", "github"], workers=4, priority="high", ttl_seconds=7200,
                                  metadata={"task_type": "feature"})
    clock.advance(3600)
    d = manager.get_allocation(r["allocation_id"])
    assert {"allocation_id", "job_id", "state", "priority", "resources", "mcp_servers", "workers", "timestamps",
            "ttl_seconds", "is_expired", "metadata"} <= d.keys()
    assert (d["job_id"], d["state"], d["priority"], d["ttl_seconds"], d["is_expired"]) == ("job-001", "active", "high", 7200, False)
    assert {k: d["resources"][k] for k in ("cpu_allocated", "memory_allocated", "workers")} == {
        "cpu_allocated": 4.0, "memory_allocated": 8192, "workers": 4,
    }
    assert d["timestamps"]["age_seconds"] == 3600 and d["timestamps"]["released_at"] is None
    assert d["metadata"] == {"task_type": "feature"} and len(d["workers"]) == 4


def test_manager_get_allocation_of_unknown_id_is_none(alloc):
    assert quick_start_manager(alloc).get_allocation("nonexistent-id") is None


@pytest.mark.parametrize("bad", [None, "", "x" * 300, 5])
def test_manager_get_allocation_of_something_that_is_no_allocation_id_is_none(alloc, bad):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    assert manager.get_allocation(bad) is None


def test_manager_ages_of_whole_seconds_are_integers(alloc, clock):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-001", workers=1)
    clock.advance(3600)
    age = manager.get_allocation(r["allocation_id"])["timestamps"]["age_seconds"]
    listed = manager.list_allocations()[0]["age_seconds"]
    assert (age, type(age), listed, type(listed)) == (3600, int, 3600, int)


def test_manager_ages_keep_their_fractions(alloc, clock):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-001", workers=1)
    clock.advance(2.5)
    assert manager.get_allocation(r["allocation_id"])["timestamps"]["age_seconds"] == 2.5


def test_manager_release_duration_of_whole_seconds_is_an_integer(alloc, clock):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-001", workers=1, ttl_seconds=10_000)
    clock.advance(7200)
    duration = manager.release_resources(r["allocation_id"])["duration_seconds"]
    assert (duration, type(duration)) == (7200, int)  # as seed 000 prints it, not 7200.0


def test_manager_request_repeated_with_its_allocation_id_returns_the_first_allocation(alloc):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    first = manager.request_resources("job-001", workers=1, allocation_id="lease-1")
    again = manager.request_resources("job-001", workers=1, allocation_id="lease-1")  # a retry after a lost reply
    assert (first["status"], first["allocation_id"], again["status"], again["allocation_id"]) == (
        "active", "lease-1", "active", "lease-1")
    assert (manager.get_capacity()["active_allocations"], manager.get_capacity()["allocated_workers"]) == (1, 1)


@pytest.mark.parametrize("bad", ["", "bad id!", "x" * 300, 5])
def test_manager_request_with_an_invalid_allocation_id_fails_naming_it(alloc, bad):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-001", workers=1, allocation_id=bad)
    assert (r["status"], r["error_code"], r["error_field"]) == ("failed", "INVALID_REQUEST", "allocation_id")
    assert alloc.list() == []


def test_manager_request_naming_an_allocation_that_has_ended_fails(alloc):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    manager.request_resources("job-001", workers=1, allocation_id="lease-1")
    manager.release_resources("lease-1")
    r = manager.request_resources("job-001", workers=1, allocation_id="lease-1")
    assert (r["status"], r["error_code"], r["error_field"]) == ("failed", "ALLOCATION_ENDED", "allocation_id")
    assert manager.get_capacity()["allocated_workers"] == 0


def test_manager_lists_allocations_by_state_and_job(alloc):
    manager = quick_start_manager(alloc)
    a = manager.request_resources("job-001", ["filesystem"], workers=1)
    b = manager.request_resources("job-002", ["filesystem"], workers=2)
    manager.release_resources(a["allocation_id"])
    assert [x["allocation_id"] for x in manager.list_allocations(state="active")] == [b["allocation_id"]]
    assert [x["allocation_id"] for x in manager.list_allocations(job_id="job-001")] == [a["allocation_id"]]
    assert manager.list_allocations(job_id="job-002")[0].keys() == {
        "allocation_id", "job_id", "state", "priority", "workers", "age_seconds", "is_expired",
    }


def test_manager_cleanup_releases_allocations_past_their_ttl(alloc, clock):
    manager = quick_start_manager(alloc)
    r = manager.request_resources("security-scan-001", ["filesystem"], workers=4, ttl_seconds=1800)
    clock.advance(1801)
    assert manager.cleanup_expired_allocations() == [r["allocation_id"]]
    d = manager.get_allocation(r["allocation_id"])
    assert d["state"] == "released" and d["is_expired"] is True
    assert manager.get_capacity()["allocated_workers"] == 0


def test_manager_cleanup_leaves_allocations_within_their_ttl(alloc, clock):
    manager = quick_start_manager(alloc)
    manager.request_resources("job-001", ["filesystem"], workers=1, ttl_seconds=1800)
    clock.advance(1799)
    assert manager.cleanup_expired_allocations() == []


def test_manager_without_totals_registers_no_host(alloc):
    AllocationManager(allocator=alloc)
    assert alloc.capacity().host_count == 0


def skew_local_clock(monkeypatch, seconds: float) -> None:
    """This machine's clock runs ``seconds`` ahead of the Redis server's, whose TIME the ledger keeps."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_manager_ages_and_expiry_are_read_on_the_ledger_clock_not_this_machines(live, monkeypatch):
    manager = AllocationManager(allocator=live, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-001", workers=1, ttl_seconds=3600)
    skew_local_clock(monkeypatch, 2 * 86400)
    d = manager.get_allocation(r["allocation_id"])
    assert d["timestamps"]["age_seconds"] < 60 and d["is_expired"] is False
    assert manager.list_allocations()[0]["age_seconds"] < 60 and manager.list_allocations()[0]["is_expired"] is False


# -- ResourceAllocator (seed 002) -------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


def test_resource_allocator_usage_matches_the_seed_example(alloc):
    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    run(ra.allocate_resources({"cpu": "1", "memory": "2Gi"}))
    run(ra.allocate_resources({"cpu": "2", "memory": "4Gi"}))
    assert ra.get_resource_usage() == {
        "total_cpu": 8.0, "allocated_cpu": 3.0, "available_cpu": 5.0, "cpu_utilization": 37.5,
        "total_memory_mb": 16384, "allocated_memory_mb": 6144, "available_memory_mb": 10240,
        "memory_utilization": 37.5, "active_allocations": 2,
    }


def test_resource_allocator_check_availability_is_true_when_it_fits(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    assert run(ra.check_availability({"cpu": "2", "memory": "4Gi"})) is True


def test_resource_allocator_check_availability_is_false_when_it_does_not_fit(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    assert run(ra.check_availability({"cpu": "2", "memory": "9Gi"})) is False


def test_resource_allocator_check_availability_changes_nothing(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    before = ledger_dump(alloc)
    run(ra.check_availability({"cpu": "0.5", "memory": "512Mi"}))
    assert ledger_dump(alloc) == before


def test_resource_allocator_check_availability_reads_invalid_limits_as_false(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    assert run(ra.check_availability({"cpu": "two", "memory": "1Gi"})) is False


def test_resource_allocator_allocation_is_a_dict_of_strings(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    allocation = run(ra.allocate_resources({"cpu": "0.5", "memory": "512Mi"}))
    assert all(isinstance(v, str) for v in allocation.values())
    assert (allocation["cpu"], allocation["memory"], allocation["memory_mb"]) == ("0.5", "512Mi", "512")
    assert alloc.get(allocation["allocation_id"]).cpu_shared == 0.5


def test_resource_allocator_reads_decimal_gigabytes_as_kubernetes_does(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    allocation = run(ra.allocate_resources({"cpu": "1", "memory": "2G"}))
    assert allocation["memory_mb"] == "1908"


def test_resource_allocator_refusal_raises_value_error(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    with pytest.raises(ValueError, match="insufficient CPU") as info:
        run(ra.allocate_resources({"cpu": "5", "memory": "1Gi"}))
    assert isinstance(info.value, InsufficientResources)


def test_resource_allocator_unknown_limit_raises_naming_it(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    with pytest.raises(InvalidRequest, match="resource_limits.gpu"):
        run(ra.allocate_resources({"cpu": "1", "memory": "1Gi", "gpu": "1"}))


def test_resource_allocator_release_frees_the_resources(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    allocation = run(ra.allocate_resources({"cpu": "2", "memory": "4Gi"}))
    run(ra.release_resources(allocation))
    assert ra.get_resource_usage()["allocated_cpu"] == 0.0 and ra.get_active_allocations() == {}


def test_resource_allocator_second_release_is_harmless(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    allocation = run(ra.allocate_resources({"cpu": "2", "memory": "4Gi"}))
    run(ra.release_resources(allocation))
    before = ledger_dump(alloc)
    run(ra.release_resources(allocation))
    assert ledger_dump(alloc) == before


def test_resource_allocator_release_of_unknown_id_is_ignored(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    assert run(ra.release_resources({"allocation_id": "alloc-gone"})) is None


def test_resource_allocator_lists_only_its_own_allocations(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    mine = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    alloc.allocate({"cpu_cores": 1})
    listed = ra.get_active_allocations()
    assert list(listed) == [mine["allocation_id"]]
    assert (listed[mine["allocation_id"]]["cpu"], listed[mine["allocation_id"]]["memory"]) == ("1", "1Gi")


def test_resource_allocator_allocations_have_no_ttl(alloc, clock):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    allocation = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    clock.advance(48 * 3600)
    assert alloc.expire() == [] and alloc.get(allocation["allocation_id"]).state == "active"


def test_resource_allocator_cleanup_releases_only_allocations_older_than_max_age(alloc, clock):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    old = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    clock.advance(23 * 3600)
    young = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    clock.advance(2 * 3600)
    assert run(ra.cleanup_expired_allocations(max_age_hours=24)) == 1
    assert list(ra.get_active_allocations()) == [young["allocation_id"]]
    assert alloc.get(old["allocation_id"]).release_reason == "expired"


@pytest.mark.parametrize("age", [-1, float("nan"), float("inf"), "24", None, True])
def test_resource_allocator_cleanup_refuses_an_age_that_is_not_a_number_of_hours(alloc, age):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc, register=True)
    made = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    with pytest.raises(InvalidRequest) as exc:
        run(ra.cleanup_expired_allocations(max_age_hours=age))
    assert exc.value.field == "max_age_hours"
    assert list(ra.get_active_allocations()) == [made["allocation_id"]]


def test_seed_layers_read_a_record_whose_seed_fields_are_malformed_as_having_none(alloc):
    """A record restored or written by an older version may hold anything under the key."""
    m = AllocationManager(allocator=alloc, total_cpu=8.0, total_memory=8192, total_workers=4)
    ra = ResourceAllocator(allocator=alloc)
    made = m.request_resources("job-1", workers=1)
    alloc.redis.hset(alloc.keys.alloc(made["allocation_id"]), "metadata",
                     '{"_seed": {"api": "ResourceAllocator", "workers": "many", "mcp_servers": 5, "limits": "x"}}')
    assert m.list_allocations()[0]["workers"] == 1  # the record's own worker slots
    assert m.get_allocation(made["allocation_id"])["resources"]["workers"] == 1
    assert ra.get_active_allocations()[made["allocation_id"]]["cpu"] == "1"  # the record's, not the bad limits
    assert m.release_resources(made["allocation_id"])["status"] == "released"


def test_manager_names_resource_fields_as_its_caller_passes_them(alloc):
    m = AllocationManager(allocator=alloc, total_cpu=8.0, total_memory=8192, total_workers=4)
    r = m.request_resources("job-1", gpus="many")
    assert r["status"] == "failed" and r["error_field"] == "gpus"
    r = m.request_resources("job-1", metadata={"task_type": "x" * 300})
    assert r["error_field"] == "metadata.task_type"


def test_manager_listing_refuses_an_unknown_state_naming_it(alloc):
    m = AllocationManager(allocator=alloc, total_cpu=8.0, total_memory=8192, total_workers=4)
    with pytest.raises(InvalidRequest) as exc:
        m.list_allocations(state="ACTIVE")
    assert exc.value.field == "state"
    with pytest.raises(InvalidRequest) as exc:
        m.list_allocations(job_id="")
    assert exc.value.field == "job_id"
    assert m.list_allocations(state="releasing") == []  # seed 000's state, never held: releases are atomic


def test_constructor_totals_are_named_as_the_seeds_pass_them(alloc):
    with pytest.raises(InvalidRequest) as exc:
        AllocationManager(allocator=alloc, total_cpu=8.0, total_memory=8192, total_workers=2**30)
    assert exc.value.field == "total_workers"
    with pytest.raises(InvalidRequest) as exc:
        ResourceAllocator(total_cpu=4.0, total_memory_gb=10**13, allocator=alloc, register=True)
    assert exc.value.field == "total_memory_gb"


def test_resource_allocator_registers_whole_cores_of_a_fractional_total(alloc):
    ra = ResourceAllocator(total_cpu=2.5, total_memory_gb=4, allocator=alloc, register=True)
    assert ra.get_resource_usage()["total_cpu"] == 2.0


def test_resource_allocator_with_an_allocator_registers_no_host_by_default(alloc):
    ResourceAllocator(allocator=alloc)
    assert alloc.capacity().host_count == 0


@pytest.mark.parametrize("given, expected", [
    ({"total_cpu": 8.0, "total_memory_gb": 16}, (8.0, 16384)),
    ({"total_cpu": 8.0}, (8.0, 131072)),
    ({"total_memory_gb": 16}, (32.0, 16384)),
])
def test_resource_allocator_with_totals_registers_its_host_taking_the_seed_defaults_for_the_others(alloc, given, expected):
    ra = ResourceAllocator(allocator=alloc, **given)
    assert (ra.get_resource_usage()["total_cpu"], ra.get_resource_usage()["total_memory_mb"]) == expected


def test_resource_allocator_with_totals_registers_its_host_beside_a_fleet(alloc, monkeypatch):
    alloc.register_host(id="g1", cpu_cores=8, ram_mb=16384)
    monkeypatch.setattr(seeds, "_default", alloc)
    ResourceAllocator(total_cpu=4.0, total_memory_gb=8)
    assert {h.host_id: (h.cpu_cores.total, h.ram_mb.total) for h in alloc.capacity().hosts} == {
        "g1": (8, 16384), "local": (4, 8192)}


def test_resource_allocator_with_totals_updates_the_host_an_earlier_one_registered(alloc, monkeypatch):
    monkeypatch.setattr(seeds, "_default", alloc)
    ResourceAllocator(total_cpu=4.0, total_memory_gb=8)
    ra = ResourceAllocator(total_cpu=16.0, total_memory_gb=64)  # the operator raised TOTAL_CPU_CORES and TOTAL_MEMORY_GB
    assert (ra.get_resource_usage()["total_cpu"], ra.get_resource_usage()["total_memory_mb"]) == (16.0, 65536)


def test_resource_allocator_without_totals_uses_its_host_as_it_is(alloc, monkeypatch):
    monkeypatch.setattr(seeds, "_default", alloc)
    ResourceAllocator(total_cpu=4.0, total_memory_gb=8)
    ra = ResourceAllocator()
    assert (ra.get_resource_usage()["total_cpu"], ra.get_resource_usage()["total_memory_mb"]) == (4.0, 8192)


def test_resource_allocator_reads_a_bare_memory_number_as_mib_not_bytes(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc)
    allocation = run(ra.allocate_resources({"cpu": "1", "memory": "512"}))
    assert allocation["memory_mb"] == "512"  # the project's rule; Kubernetes would read 512 bytes


def test_resource_allocator_cleanup_measures_age_on_the_ledger_clock_not_this_machines(live, monkeypatch):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=live)
    made = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}))
    skew_local_clock(monkeypatch, 2 * 86400)
    assert run(ra.cleanup_expired_allocations(max_age_hours=24)) == 0
    assert list(ra.get_active_allocations()) == [made["allocation_id"]]


def test_resource_allocator_allocation_repeated_with_its_allocation_id_returns_the_first(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc)
    first = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}, allocation_id="lab-1"))
    again = run(ra.allocate_resources({"cpu": "1", "memory": "1Gi"}, allocation_id="lab-1"))  # a retry after a lost reply
    assert first == again and first["allocation_id"] == "lab-1"
    assert ra.get_resource_usage()["allocated_cpu"] == 1.0


@pytest.mark.parametrize("bad", ["", "bad id!", "x" * 300, 5])
def test_resource_allocator_allocation_with_an_invalid_allocation_id_raises_naming_it(alloc, bad):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc)
    with pytest.raises(InvalidRequest) as exc:
        run(ra.allocate_resources({"cpu": "1"}, allocation_id=bad))
    assert exc.value.field == "allocation_id" and isinstance(exc.value, ValueError)
    assert alloc.list() == []


def test_resource_allocator_allocation_naming_one_that_has_ended_raises_value_error(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc)
    run(ra.release_resources(run(ra.allocate_resources({"cpu": "1"}, allocation_id="lab-1"))))
    with pytest.raises(ValueError) as exc:
        run(ra.allocate_resources({"cpu": "1"}, allocation_id="lab-1"))
    assert exc.value.code == "ALLOCATION_ENDED"
    assert ra.get_resource_usage()["allocated_cpu"] == 0.0


def test_resource_allocator_allocation_naming_a_request_waiting_in_line_raises_naming_allocation_id(alloc):
    ra = ResourceAllocator(total_cpu=4.0, total_memory_gb=8, allocator=alloc)
    alloc.allocate({"cpu_cores": 4})
    alloc.allocate({"cpu_cores": 1}, on_busy="queue", allocation_id="lab-1")  # queued by another entry point
    with pytest.raises(InvalidRequest) as exc:
        run(ra.allocate_resources({"cpu": "1"}, allocation_id="lab-1"))
    assert exc.value.field == "allocation_id"


def test_the_seed_signatures_take_allocation_id_by_keyword_only():
    for method in (AllocationManager.request_resources, ResourceAllocator.allocate_resources):
        assert inspect.signature(method).parameters["allocation_id"].kind is inspect.Parameter.KEYWORD_ONLY


# -- agreement, reach and refusals across the seed layers -------------------------------------------


def test_check_availability_counts_a_lease_past_its_ttl_as_free_as_the_allocation_then_does(alloc, clock):
    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    alloc.allocate({"cpu_cores": 8}, ttl_seconds=60)  # another client holds every core...
    clock.advance(61)  # ...for a lease that has ended
    assert run(ra.check_availability({"cpu": "2", "memory": "4Gi"})) is True
    run(ra.allocate_resources({"cpu": "2", "memory": "4Gi"}))


def test_check_availability_says_no_when_a_waiting_task_takes_what_an_expired_lease_frees(alloc, clock):
    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    alloc.allocate({"cpu_cores": 4}, ttl_seconds=60)
    alloc.allocate({"cpu_cores": 6}, priority="low", on_busy="queue")  # waits for the lease's cores
    clock.advance(61)
    assert run(ra.check_availability({"cpu": "4"})) is False
    with pytest.raises(InsufficientResources):
        run(ra.allocate_resources({"cpu": "4"}))


def test_the_seed_listings_and_cleanup_reach_past_the_newest_thousand(alloc, clock):
    alloc.register_host(id="big", cpu_cores=8, ram_mb=1 << 20)
    ra = ResourceAllocator(allocator=alloc)
    old = run(ra.allocate_resources({"cpu": "0.001"}))
    clock.advance(25 * 3600)
    for _ in range(1000):
        alloc.allocate({"cpu_cores": 0.001})
    manager = AllocationManager(allocator=alloc)
    assert len(manager.list_allocations(state="active")) == manager.get_capacity()["active_allocations"] == 1001
    assert old["allocation_id"] in ra.get_active_allocations()
    assert run(ra.cleanup_expired_allocations(24)) == 1
    assert alloc.get(old["allocation_id"]).state == "released"


def test_two_cleanups_at_once_count_each_release_once(alloc, clock):
    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    for _ in range(5):
        run(ra.allocate_resources({"cpu": "0.5"}))
    clock.advance(25 * 3600)

    async def both() -> list[int]:
        return list(await asyncio.gather(ra.cleanup_expired_allocations(24), ra.cleanup_expired_allocations(24)))

    assert sum(run(both())) == 5


def test_a_cleanup_age_beyond_ten_years_is_refused_naming_it(alloc):
    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    with pytest.raises(InvalidRequest) as exc:
        run(ra.cleanup_expired_allocations(max_age_hours=10**400))
    assert exc.value.field == "max_age_hours"


def test_while_the_ledger_is_rebuilt_the_seed_layers_answer_in_their_own_shapes(alloc):
    from allocator.history import recover

    ra = ResourceAllocator(total_cpu=8.0, total_memory_gb=16, allocator=alloc, register=True)
    manager = AllocationManager(allocator=alloc)
    recover.begin(alloc)
    r = manager.request_resources("job-1", workers=0, cpu_cores=1)
    assert r["status"] == "failed" and r["error_code"] == "RECOVERING"
    with pytest.raises(ValueError) as exc:  # seed 002's controllers catch ValueError
        run(ra.allocate_resources({"cpu": "1"}))
    assert exc.value.code == "RECOVERING"


def test_the_manager_takes_the_seeds_totals_by_position(alloc):
    manager = AllocationManager(8.0, 8192, 4, allocator=alloc)
    assert (manager.get_capacity()["total_cpu"], manager.get_capacity()["total_workers"]) == (8.0, 4)


@pytest.mark.parametrize("bad", [None, 5, "", "x" * 300, "bad id!"])
def test_releasing_something_that_is_no_allocation_id_answers_the_seeds_error_shape(alloc, bad):
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.release_resources(bad)
    assert r["status"] == "error" and r["error"]


def test_seed_timestamps_are_whole_seconds_whatever_the_clock_reads(alloc, clock):
    clock.advance(0.797)
    manager = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=4096, total_workers=2)
    r = manager.request_resources("job-1", workers=1)
    created = manager.get_allocation(r["allocation_id"])["timestamps"]["created_at"]
    assert created == iso(clock)
    datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")


def test_the_tool_call_naming_an_allocation_that_has_ended_fails_instead_of_reporting_it_placed(alloc):
    seed_tool_host(alloc)
    first = allocate_resources("task_1", "ml_inference", SEED_REQUIREMENTS, allocator=alloc, allocation_id="lease-y")
    alloc.release(first["allocation_id"])
    again = allocate_resources("task_1", "ml_inference", SEED_REQUIREMENTS, allocator=alloc, allocation_id="lease-y")
    assert again["success"] is False and again["error"]["code"] == "ALLOCATION_ENDED"
    assert again["error"]["field"] == "allocation_id"


def test_a_request_only_hosts_without_cpu_or_ram_could_take_is_refused_not_left_waiting_for_ever(alloc):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb=0)  # as an agent run with --no-psutil may register it
    r = allocate_resources("t", "processing", {"cpu_cores": 1, "ram_mb": 0}, allocator=alloc)
    assert r["success"] is False and "no host has CPU cores and RAM" in r["error"]["message"], r
    assert alloc.list() == []



def test_resource_allocator_totals_change_the_cpu_and_ram_of_a_host_and_keep_its_gpus_labels_and_slots(alloc):
    alloc.register_host(id="local", labels={"zone": "z1"}, cpu_cores=4, ram_mb="8Gi", worker_slots=3,
                        service_ports=(20000, 20010), gpus=[{"index": 0, "uuid": "GPU-a", "memory_mb": "16Gi"}])
    ResourceAllocator(8, 16, allocator=alloc)
    h = alloc.capacity().hosts[0]
    assert (h.cpu_cores.total, h.ram_mb.total) == (8, 16384)
    assert [g.uuid for g in h.gpus] == ["GPU-a"] and h.labels["zone"] == "z1" and h.worker_slots.total == 3
    assert alloc.redis.hmget(alloc.keys.host("local"), "port_lo", "port_hi") == ["20000", "20010"]


def test_manager_totals_change_the_cpu_ram_and_slots_of_a_host_and_keep_its_gpus(alloc):
    alloc.register_host(id="local", cpu_cores=4, ram_mb="8Gi", gpus=[{"index": 0, "uuid": "GPU-a", "memory_mb": "16Gi"}])
    AllocationManager(total_cpu=8.0, total_memory=4096, total_workers=2, allocator=alloc)
    h = alloc.capacity().hosts[0]
    assert (h.cpu_cores.total, h.ram_mb.total, h.worker_slots.total) == (8, 4096, 2)
    assert [g.uuid for g in h.gpus] == ["GPU-a"]


def test_seed_totals_keep_a_hosts_own_core_ids_as_its_core_count_changes(alloc):
    alloc.register_host(id="local", cpu_cores=[8, 9, 10, 11], ram_mb="8Gi")
    ResourceAllocator(6, 8, allocator=alloc)
    assert json.loads(alloc.redis.hget(alloc.keys.host("local"), "cores")) == [8, 9, 10, 11, 0, 1]
    ResourceAllocator(3, 8, allocator=alloc)
    assert json.loads(alloc.redis.hget(alloc.keys.host("local"), "cores")) == [8, 9, 10]
