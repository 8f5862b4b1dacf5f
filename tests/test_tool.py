"""``allocator tool``: the seed 004 envelope and the seed 000 operations as JSON tools, their
errors and exit statuses, the published schemas (native, OpenAI strict, Anthropic), and fuzzed
malformed input that must never raise or change the ledger."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from allocator.tool import INVALID, OK, REFUSED, TOOLS, ToolContext, definitions, run_document, run_tool
from allocator.tool_schema import OPENAI_STRICT_KEYWORDS, to_strict_arguments

from .conftest import ledger_dump

ROOT = Path(__file__).resolve().parent.parent
SEED004_ENVELOPE = {
    "tool": "resource_allocator",
    "params": {"task_id": "task_123", "task_type": "ml_inference",
               "resource_requirements": {"gpu_memory_mb": 2048, "cpu_cores": 2, "ram_mb": 4096}},
}
#: One valid call per tool (ids are filled in by ``examples``).
EXAMPLES = {
    "resource_allocator": SEED004_ENVELOPE["params"],
    "request_resources": {"job_id": "feature-dev-001", "mcp_servers": [], "workers": 4,
                          "priority": "high", "ttl_seconds": 7200, "metadata": {"task_type": "feature"}},
    "release_resources": {"allocation_id": "ALLOC"},
    "get_capacity": {},
    "get_allocation": {"allocation_id": "ALLOC"},
    "list_allocations": {"state": "active"},
    "cleanup_expired": {},
    "submit_task": {"task": "demo.etl", "args": [0.1], "priority": "low", "resources": {"cpu_cores": 1, "ram_mb": "1Gi"}},
    "get_task": {"task_id": "ALLOC"},
    "cancel_task": {"task_id": "ALLOC"},
    "get_queue": {"limit": 10},
}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def seed_host(a) -> None:
    """Sized so seed 004's example leaves exactly the seed's available_resources."""
    a.register_host(id="h1", cpu_cores=10, ram_mb=20480, gpus=[{"index": 0, "model": "T4", "memory_mb": 10240}])


def call(a, tool: str, params: dict | None = None):
    return run_tool(tool, params if params is not None else {}, ToolContext(a))


def doc(a, text):
    return run_document(text, ToolContext(a))


def examples(a) -> dict[str, dict]:
    x = call(a, "resource_allocator", EXAMPLES["resource_allocator"]).payload["allocation_id"]
    return {k: json.loads(json.dumps(v).replace("ALLOC", x)) for k, v in EXAMPLES.items()}


# -- seed 004 ---------------------------------------------------------------------------------


def test_seed004_example_returns_exactly_the_seed_result(alloc, clock):
    seed_host(alloc)
    out = doc(alloc, json.dumps(SEED004_ENVELOPE))
    assert out.status == OK
    r = out.payload
    assert re.fullmatch(r"alloc-[0-9a-f]{16}", r.pop("allocation_id"))
    assert isinstance(r["metadata"].pop("allocation_time_ms"), float)
    assert r == {
        "success": True,
        "task_id": "task_123",
        "resources": {"gpu_id": "gpu_0", "gpu_memory_mb": 2048, "cpu_cores": [0, 1], "ram_mb": 4096, "host_id": "h1",
                      "gpus": [{"index": 0, "uuid": "h1-gpu0", "model": "T4", "memory_mb": 2048}], "cpu_shared": 0},
        "queue_position": 0,
        "estimated_start_time": iso(clock()),
        "metadata": {"available_resources": {"gpu_memory_mb": 8192, "cpu_cores": 8, "ram_mb": 16384},
                     "task_type": "ml_inference", "expires_at": iso(clock() + 3600), "state": "active"},
    }


def test_seed004_request_that_must_wait_is_queued_with_its_position(alloc):
    seed_host(alloc)
    call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"gpu_memory_mb": 9000}})
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "task_id": "t2",
                                              "resource_requirements": {"gpu_memory_mb": 4096}})
    assert out.status == OK
    assert (out.payload["queue_position"], out.payload["metadata"]["state"]) == (1, "pending")
    assert out.payload["resources"]["gpu_id"] is None and "estimated_start_time" in out.payload


def test_seed004_on_busy_fail_is_refused_with_exit_status_1(alloc):
    seed_host(alloc)
    call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"gpu_memory_mb": 9000}})
    before = ledger_dump(alloc)
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "on_busy": "fail"})
    assert out.status == REFUSED and out.payload["error"]["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert ledger_dump(alloc) == before


def test_seed004_request_no_host_could_ever_hold_is_refused_at_once(alloc):
    seed_host(alloc)
    before = ledger_dump(alloc)
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"ram_mb": "1Ti"}})
    assert out.status == REFUSED
    assert out.payload["error"]["field"] == "resource_requirements.ram_mb"
    assert ledger_dump(alloc) == before


def test_seed004_invalid_params_use_the_seed_failure_shape(alloc):
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"vram": 4}})
    assert out.status == INVALID
    assert out.payload == {"success": False, "task_id": "task_123", "allocation_id": None, "queue_position": None,
                           "estimated_start_time": None,
                           "error": {"code": "INVALID_REQUEST", "message": "resource_requirements.vram: unknown field",
                                     "field": "resource_requirements.vram"}}


def test_seed004_bad_memory_string_names_its_field(alloc):
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"ram_mb": "lots"}})
    assert out.status == INVALID and out.payload["error"]["field"] == "resource_requirements.ram_mb"


@pytest.mark.parametrize("requirements, field", [
    ({"gpus": 1, "gpu_model": [f"M{i}" for i in range(257)]}, "resource_requirements.gpu_model"),
    ({"gpus": 1, "gpu_model": "|".join(f"M{i}" for i in range(257))}, "resource_requirements.gpu_model"),
    ({"selector": ",".join(f"l{i}=x" for i in range(65))}, "resource_requirements.selector"),
    ({"selector": "cluster=" + "|".join(f"c{i}" for i in range(257))}, "resource_requirements.selector.cluster"),
])
def test_seed004_too_many_gpu_models_or_selector_values_are_invalid_and_change_nothing(alloc, requirements, field):
    seed_host(alloc)
    before = ledger_dump(alloc)
    out = call(alloc, "resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": requirements})
    assert out.status == INVALID and out.payload["error"]["field"] == field, out.payload
    assert "at most" in out.payload["error"]["message"]
    assert ledger_dump(alloc) == before


@pytest.mark.parametrize("tool, params, field", [
    ("request_resources", {**EXAMPLES["request_resources"], "gpus": 1, "gpu_model": [f"M{i}" for i in range(257)]},
     "gpu_model"),
    ("submit_task", {**EXAMPLES["submit_task"], "resources": {"gpus": 1, "gpu_model": [f"M{i}" for i in range(257)]}},
     "resources.gpu_model"),
])
def test_more_than_256_gpu_models_are_invalid_in_every_tool(alloc, tool, params, field):
    seed_host(alloc)
    before = ledger_dump(alloc)
    out = call(alloc, tool, params)
    assert out.status == INVALID and out.payload["error"]["field"] == field, out.payload
    assert ledger_dump(alloc) == before


def test_the_tool_schemas_publish_the_gpu_model_limit():
    schemas = {
        "resource_allocator": TOOLS["resource_allocator"].schema["properties"]["resource_requirements"]["properties"],
        "request_resources": TOOLS["request_resources"].schema["properties"],
        "submit_task": TOOLS["submit_task"].schema["properties"]["resources"]["anyOf"][0]["properties"],
    }
    for name, props in schemas.items():
        arrays = [s for s in props["gpu_model"]["anyOf"] if s.get("type") == "array"]
        assert [a["maxItems"] for a in arrays] == [256], name


# -- seed 000 ---------------------------------------------------------------------------------


def quick_start_host(a) -> None:
    a.register_host(id="local", cpu_cores=16, ram_mb=32768)


def test_seed000_request_resources_returns_the_seed_shape(alloc, clock):
    quick_start_host(alloc)
    out = call(alloc, "request_resources", EXAMPLES["request_resources"])
    assert out.status == OK
    r = out.payload
    assert re.fullmatch(r"alloc-[0-9a-f]{16}", r.pop("allocation_id"))
    workers = [{"worker_id": f"worker-feature-dev-001-00{i}", "worker_type": "cortex-worker", "cpu": 1.0, "memory": 2048,
                "status": "active", "endpoint": None, "host_id": "local"} for i in range(4)]
    assert r == {
        "status": "active", "job_id": "feature-dev-001",
        "mcp_servers": [],
        "workers_allocated": workers,
        "resources": {"cpu": 4.0, "memory": 8192, "workers": 4, "gpus": [], "gpu_memory_mb": 0,
                      "cpu_core_ids": [0, 1, 2, 3], "host_id": "local"},
        "ttl_seconds": 7200, "created_at": iso(clock()), "expires_at": iso(clock() + 7200),
    }


def test_seed000_services_no_host_offers_are_invalid_where_hosts_run_services(alloc):
    """MCP server names must be in some host's service catalog (docs/services.md)."""
    from allocator.services import ServiceCatalog, publish_catalog

    quick_start_host(alloc)
    publish_catalog(alloc, "local", ServiceCatalog.load({"github": {"command": ["true", "{port}"]}}))
    before = ledger_dump(alloc)
    out = call(alloc, "request_resources", {**EXAMPLES["request_resources"], "mcp_servers": ["filesystem"]})
    assert out.status == INVALID and out.payload["error"]["field"] == "mcp_servers"
    assert ledger_dump(alloc) == before


def test_seed000_services_are_recorded_not_started_where_no_host_runs_services(alloc):
    quick_start_host(alloc)
    out = call(alloc, "request_resources", {**EXAMPLES["request_resources"], "mcp_servers": ["filesystem"]})
    assert out.status == OK
    assert [(s["name"], s["status"], s["endpoint"]) for s in out.payload["mcp_servers"]] == [("filesystem", "not_started", None)]


def test_seed000_failure_example_reports_the_workers_available(alloc):
    alloc.register_host(id="local", cpu_cores=10, ram_mb=20480)
    before = ledger_dump(alloc)
    out = call(alloc, "request_resources", {"job_id": "job-001", "mcp_servers": [], "workers": 100})
    assert out.status == REFUSED
    assert (out.payload["status"], out.payload["error"]) == ("failed", "Insufficient workers: requested 100, available 10")
    assert ledger_dump(alloc) == before


def test_seed000_release_returns_the_seed_shape(alloc, clock):
    quick_start_host(alloc)
    made = call(alloc, "request_resources", EXAMPLES["request_resources"]).payload
    clock.advance(60)
    out = call(alloc, "release_resources", {"allocation_id": made["allocation_id"]})
    assert out.status == OK
    assert out.payload == {"status": "released", "allocation_id": made["allocation_id"], "job_id": "feature-dev-001",
                           "workers_released": 4, "cpu_freed": 4.0, "memory_freed": 8192, "gpu_memory_freed": 0,
                           "released_at": iso(clock()), "duration_seconds": 60.0, "already_released": False,
                           "reason": "released"}


def test_seed000_release_of_an_unknown_allocation_is_refused(alloc):
    out = call(alloc, "release_resources", {"allocation_id": "alloc-nope"})
    assert out.status == REFUSED
    assert out.payload == {"status": "error", "error": "Allocation alloc-nope not found"}


def test_seed000_get_capacity_has_the_seed_keys(alloc):
    quick_start_host(alloc)
    call(alloc, "request_resources", EXAMPLES["request_resources"])
    cap = call(alloc, "get_capacity").payload
    assert {k: cap[k] for k in ("total_cpu", "total_memory", "allocated_cpu", "allocated_memory", "allocated_workers",
                                "available_cpu", "available_memory", "running_mcp_servers", "active_allocations")} == {
        "total_cpu": 16.0, "total_memory": 32768, "allocated_cpu": 4.0, "allocated_memory": 8192, "allocated_workers": 4,
        "available_cpu": 12.0, "available_memory": 24576, "running_mcp_servers": [], "active_allocations": 1,
    }


def test_seed000_get_allocation_has_the_seed_shape(alloc, clock):
    quick_start_host(alloc)
    made = call(alloc, "request_resources", EXAMPLES["request_resources"]).payload
    r = call(alloc, "get_allocation", {"allocation_id": made["allocation_id"]}).payload
    assert {"allocation_id", "job_id", "state", "priority", "resources", "mcp_servers", "workers", "timestamps",
            "ttl_seconds", "is_expired", "metadata"} <= r.keys()
    assert (r["state"], r["priority"], r["metadata"], r["timestamps"]["created_at"]) == (
        "active", "high", {"task_type": "feature"}, iso(clock()))


def test_seed000_get_allocation_of_an_unknown_id_is_not_found(alloc):
    out = call(alloc, "get_allocation", {"allocation_id": "alloc-nope"})
    assert out.status == REFUSED
    assert out.payload["error"] == {"code": "ALLOCATION_NOT_FOUND", "message": "allocation alloc-nope not found",
                                    "field": "allocation_id"}


def test_seed000_list_allocations_filters_by_state(alloc):
    quick_start_host(alloc)
    made = call(alloc, "request_resources", EXAMPLES["request_resources"]).payload
    assert call(alloc, "list_allocations", {"state": "active"}).payload["count"] == 1
    row = call(alloc, "list_allocations", {"job_id": "feature-dev-001"}).payload["allocations"][0]
    assert row.keys() == {"allocation_id", "job_id", "state", "priority", "workers", "age_seconds", "is_expired"}
    assert row["allocation_id"] == made["allocation_id"]
    assert call(alloc, "list_allocations", {"state": "released"}).payload == {"allocations": [], "count": 0}


def test_seed000_cleanup_expired_releases_allocations_past_their_ttl(alloc, clock):
    quick_start_host(alloc)
    made = call(alloc, "request_resources", {"job_id": "j", "mcp_servers": [], "workers": 1, "ttl_seconds": 60}).payload
    clock.advance(61)
    assert call(alloc, "cleanup_expired").payload == {"expired": [made["allocation_id"]], "count": 1}


# -- registered tasks and the queue -----------------------------------------------------------


def test_submit_task_queues_a_registered_task_with_its_position(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    first = call(alloc, "submit_task", EXAMPLES["submit_task"])
    second = call(alloc, "submit_task", {**EXAMPLES["submit_task"], "task_id": "etl-2"})
    assert (first.status, first.payload["state"], first.payload["task"]) == (OK, "active", "demo.etl")
    assert (second.payload["state"], second.payload["queue_position"]) == ("pending", 1)
    assert second.payload["task_id"] == "etl-2"
    assert second.payload["allocation"]["task_type"] == "processing"


def test_submit_task_refuses_a_name_that_is_not_registered(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    before = ledger_dump(alloc)
    out = call(alloc, "submit_task", {"task": "os.system", "args": ["echo pwned"]})
    assert out.status == INVALID and out.payload["error"]["field"] == "task"
    assert ledger_dump(alloc) == before


def test_a_task_module_that_cannot_be_imported_is_invalid_configuration_not_an_internal_error(alloc, monkeypatch):
    from allocator import task_registry

    monkeypatch.setenv("ALLOCATOR_TASK_MODULES", "no_such_module_anywhere")
    monkeypatch.setattr(task_registry, "registry", task_registry.TaskRegistry())
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    out = call(alloc, "submit_task", {"task": "demo.etl"})
    assert out.status == INVALID and out.payload["error"]["code"] == "TASK_REGISTRY"
    assert "no_such_module_anywhere" in out.payload["error"]["message"]


def test_submit_task_refuses_kwargs_reserved_for_the_allocator(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    out = call(alloc, "submit_task", {"task": "demo.etl", "kwargs": {"priority": "critical"}})
    assert out.status == INVALID and out.payload["error"]["field"] == "kwargs.priority"


@pytest.mark.parametrize("key", ["on_host_lost", "func", "self", "job_id"])
def test_submit_task_refuses_kwargs_that_enqueue_takes_itself(alloc, key):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    before = ledger_dump(alloc)
    out = call(alloc, "submit_task", {"task": "demo.etl", "kwargs": {key: "fail"}})
    assert (out.status, out.payload["error"]["field"]) == (INVALID, f"kwargs.{key}")
    assert ledger_dump(alloc) == before


def test_submit_task_with_an_id_already_submitted_changes_nothing(alloc):
    from rq.job import Job

    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    first = call(alloc, "submit_task", {"task": "demo.etl", "task_id": "blk", "args": [1]})
    again = call(alloc, "submit_task", {"task": "demo.etl", "task_id": "blk", "args": [99], "priority": "low"})
    assert (first.payload["state"], again.status, again.payload["state"]) == ("active", OK, "active")
    job = Job.fetch("blk", connection=alloc.rq_connection)
    assert (job.args, job.origin) == ((1,), f"{alloc.keys.namespace}.host.h1")
    assert alloc.rq_connection.llen(f"rq:queue:{alloc.keys.namespace}.low") == 0


def test_submit_task_with_the_id_of_a_direct_allocation_is_refused(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    lease = alloc.allocate({"cpu_cores": 0.5})
    out = call(alloc, "submit_task", {"task": "demo.etl", "task_id": lease.allocation_id})
    assert (out.status, out.payload["error"]["field"]) == (INVALID, "task_id")
    assert not alloc.rq_connection.exists(f"rq:job:{lease.allocation_id}")


def test_submit_task_does_not_rewrite_an_rq_job_it_does_not_own(alloc):
    from rq import Queue

    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    theirs = Queue("elsewhere", connection=alloc.rq_connection).enqueue("builtins.len", [1, 2], job_id="shared-id")
    try:
        out = call(alloc, "submit_task", {"task": "demo.etl", "task_id": "shared-id", "args": [5]})
        assert (out.status, out.payload["error"]["field"]) == (INVALID, "task_id")
        theirs.refresh()
        assert (theirs.args, theirs.origin) == (([1, 2],), "elsewhere")
    finally:
        theirs.delete()
        alloc.rq_connection.delete("rq:queue:elsewhere")
        alloc.rq_connection.srem("rq:queues", "rq:queue:elsewhere")


@pytest.mark.parametrize("task_id", ["a b/c", "run.1", "a/b", "a:b", "me@x"])
def test_submit_task_with_an_id_rq_cannot_take_names_task_id(alloc, task_id):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    before = ledger_dump(alloc)
    out = call(alloc, "submit_task", {"task": "demo.etl", "task_id": task_id})
    assert (out.status, out.payload["error"]["field"]) == (INVALID, "task_id")
    assert ledger_dump(alloc) == before


def test_list_allocations_takes_the_seeds_releasing_state(alloc):
    out = call(alloc, "list_allocations", {"state": "releasing"})
    assert out.status == OK and out.payload["allocations"] == []


def test_a_whole_number_sent_as_a_float_is_the_integer(alloc):
    quick_start_host(alloc)
    out = call(alloc, "resource_allocator", {**SEED004_ENVELOPE["params"],
                                             "resource_requirements": {"cpu_cores": 1, "priority": 1.0}})
    assert out.status == OK, out.payload
    assert call(alloc, "get_queue", {"limit": 10.0}).status == OK
    made = call(alloc, "request_resources", {**EXAMPLES["request_resources"], "workers": 2.0})
    assert (made.status, made.payload["resources"]["workers"]) == (OK, 2), made.payload


def test_a_redis_error_that_is_not_an_outage_is_not_reported_as_one(alloc, monkeypatch):
    import redis

    def broken(*args, **kwargs):
        raise redis.ResponseError("ERR value is not an integer or out of range")

    monkeypatch.setattr("allocator.views.pending_tasks", broken)
    out = call(alloc, "get_queue", {"limit": 5})
    assert out.payload["error"]["code"] == "INTERNAL_ERROR"


def test_a_result_holding_a_number_that_is_not_finite_is_written_as_null():
    from allocator.tool import dumps

    assert json.loads(dumps({"x": float("inf"), "y": [float("nan"), 1.5]})) == {"x": None, "y": [None, 1.5]}
    assert json.loads(dumps({"x": float("inf")}, indent=2)) == {"x": None}


def test_submit_task_that_no_host_could_ever_hold_is_refused(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    before = ledger_dump(alloc)
    out = call(alloc, "submit_task", {"task": "demo.train"})
    assert out.status == REFUSED and out.payload["error"]["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert ledger_dump(alloc) == before


def test_get_queue_lists_pending_tasks_in_order(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    call(alloc, "submit_task", EXAMPLES["submit_task"])
    call(alloc, "submit_task", {**EXAMPLES["submit_task"], "task_id": "later", "priority": "low"})
    call(alloc, "submit_task", {**EXAMPLES["submit_task"], "task_id": "urgent", "priority": "critical"})
    rows = call(alloc, "get_queue").payload["pending"]
    assert [(r["position"], r["task_id"]) for r in rows] == [(1, "urgent"), (2, "later")]
    assert {"estimated_start_time", "resources", "priority", "waiting_s"} <= rows[0].keys()


def test_cancel_task_takes_a_pending_task_out_of_line(alloc):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    call(alloc, "submit_task", EXAMPLES["submit_task"])
    call(alloc, "submit_task", {**EXAMPLES["submit_task"], "task_id": "waiting"})
    out = call(alloc, "cancel_task", {"task_id": "waiting"})
    assert (out.status, out.payload["state"]) == (OK, "cancelled")
    assert call(alloc, "get_task", {"task_id": "waiting"}).payload["state"] == "cancelled"


def test_cancel_of_an_unknown_task_is_refused(alloc):
    assert call(alloc, "cancel_task", {"task_id": "nope"}).status == REFUSED


# -- the envelope and its errors --------------------------------------------------------------


@pytest.mark.parametrize("text, code, field", [
    ("{not json", "INVALID_JSON", None),
    ('{"tool": "get_capacity", "params": {"x": NaN}}', "INVALID_JSON", None),
    ("[1, 2]", "INVALID_REQUEST", None),
    ('{"params": {}}', "INVALID_REQUEST", "tool"),
    ('{"tool": "get_capacity", "extra": 1}', "INVALID_REQUEST", "extra"),
    ('{"tool": "format_disk"}', "UNKNOWN_TOOL", "tool"),
    ('{"tool": 7}', "UNKNOWN_TOOL", "tool"),
    ('{"tool": "get_allocation", "params": {}}', "INVALID_REQUEST", "allocation_id"),
    ('{"tool": "get_allocation", "params": []}', "INVALID_REQUEST", "params"),
    ('{"tool": "list_allocations", "params": {"state": "zombie"}}', "INVALID_REQUEST", "state"),
    ('{"tool": "request_resources", "params": {"job_id": "j", "mcp_servers": [], "workers": -1}}', "INVALID_REQUEST", "workers"),
    ('{"tool": "request_resources", "params": {"job_id": "j", "mcp_servers": [], "cpu_cores": "lots"}}', "INVALID_REQUEST", "cpu_cores"),
    ('{"tool": "request_resources", "params": {"job_id": "j", "mcp_servers": [], "metadata": "[1]"}}', "INVALID_REQUEST", "metadata"),
])
def test_malformed_requests_are_invalid_and_name_the_field(alloc, text, code, field):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    before = ledger_dump(alloc)
    out = doc(alloc, text)
    assert out.status == INVALID
    assert (out.payload["success"], out.payload["error"]["code"], out.payload["error"]["field"]) == (False, code, field)
    assert out.payload["error"]["message"]
    assert ledger_dump(alloc) == before


def test_non_utf8_input_is_invalid_json(alloc):
    assert doc(alloc, b'{"tool": "\xff"}').payload["error"]["code"] == "INVALID_JSON"


def test_strict_mode_arguments_give_the_same_results(alloc):
    """Every property present (null = not given) and free-form JSON as text, as OpenAI strict sends them."""
    quick_start_host(alloc)
    for name in ("request_resources", "list_allocations", "get_queue"):
        strict = to_strict_arguments(EXAMPLES[name], TOOLS[name].schema)
        assert set(strict) == set(TOOLS[name].schema["properties"])
        out = call(alloc, name, strict)
        assert out.status == OK, out.payload
    made = call(alloc, "request_resources", to_strict_arguments(EXAMPLES["request_resources"], TOOLS["request_resources"].schema))
    assert call(alloc, "get_allocation", {"allocation_id": made.payload["allocation_id"]}).payload["metadata"] == {"task_type": "feature"}


# -- schemas ----------------------------------------------------------------------------------


def test_every_schema_format_is_valid_json_schema():
    for fmt, key in (("native", None), ("anthropic", "input_schema"), ("openai", None)):
        defs = definitions(fmt)
        tools = defs["tools"] if fmt == "native" else defs
        for t in tools:
            schema = t["parameters"] if fmt == "native" else t[key] if key else t["function"]["parameters"]
            Draft202012Validator.check_schema(schema)
            assert schema["type"] == "object"
    Draft202012Validator.check_schema(definitions("native")["envelope"])


def test_anthropic_definitions_follow_the_messages_api_rules():
    for t in definitions("anthropic"):
        assert set(t) == {"name", "description", "input_schema"}
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", t["name"])


def _check_strict(schema: dict, path: str = "$") -> None:
    assert set(schema) <= OPENAI_STRICT_KEYWORDS, f"{path}: {set(schema) - OPENAI_STRICT_KEYWORDS}"
    if schema.get("type") == "object" or "properties" in schema:
        assert schema["additionalProperties"] is False, path
        assert schema["required"] == list(schema["properties"]), path
    for name, sub in schema.get("properties", {}).items():
        _check_strict(sub, f"{path}.{name}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        _check_strict(sub, f"{path}.anyOf[{i}]")
    if isinstance(schema.get("items"), dict):
        _check_strict(schema["items"], f"{path}[]")
    if schema.get("type") == "array":
        assert schema.get("items"), f"{path}: arrays need typed items in strict mode"


def test_openai_definitions_are_valid_for_strict_mode():
    for t in definitions("openai"):
        assert t["type"] == "function" and t["function"]["strict"] is True
        params = t["function"]["parameters"]
        assert "anyOf" not in params  # no union at the root
        _check_strict(params)


def test_the_examples_validate_against_every_schema_format(alloc):
    native = {t["name"]: t["parameters"] for t in definitions("native")["tools"]}
    anthropic = {t["name"]: t["input_schema"] for t in definitions("anthropic")}
    openai = {t["function"]["name"]: t["function"]["parameters"] for t in definitions("openai")}
    assert set(native) == set(EXAMPLES) == set(anthropic) == set(openai)
    envelope = Draft202012Validator(definitions("native")["envelope"])
    for name, params in EXAMPLES.items():
        Draft202012Validator(native[name]).validate(params)
        Draft202012Validator(anthropic[name]).validate(params)
        Draft202012Validator(openai[name]).validate(to_strict_arguments(params, native[name]))
        envelope.validate({"tool": name, "params": params})
    Draft202012Validator(native["resource_allocator"]).validate(SEED004_ENVELOPE["params"])


def test_every_tool_runs_its_example(alloc):
    quick_start_host(alloc)
    seed_host(alloc)
    ex = examples(alloc)
    for name in ["get_capacity", "get_allocation", "list_allocations", "get_task", "get_queue", "cleanup_expired",
                 "request_resources", "submit_task", "release_resources", "cancel_task"]:
        out = call(alloc, name, ex[name])
        assert out.status == OK, (name, out.payload)


# -- fuzzing ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def invalid_params(draw):
    """A tool's example with one property replaced by a value its schema rejects, or an unknown key."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    params = dict(EXAMPLES[name])
    props = sorted(TOOLS[name].schema["properties"])
    if props and draw(st.booleans()):
        params[draw(st.sampled_from(props))] = draw(json_values)
    else:
        params[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in props))] = draw(json_values)
    return name, params


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.text(max_size=200).map(lambda t: ("text", t)),
    st.binary(max_size=100).map(lambda b: ("bytes", b)),
    json_values.map(lambda v: ("text", json.dumps(v))),
    st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(lambda d: ("text", json.dumps({"tool": "get_capacity", **d}))),
    invalid_params().map(lambda np: ("call", np)),
))
def test_fuzzed_malformed_input_is_invalid_and_changes_nothing(fuzz_alloc, case):
    a, events_before = fuzz_alloc
    kind, value = case
    if kind == "call":
        name, params = value
        if TOOLS[name].validator.is_valid(params):
            return  # the mutation happened to be valid (e.g. a null for an optional field)
        out = run_tool(name, params, ToolContext(a))
    else:
        out = run_document(value, ToolContext(a))
        if out.status == OK and kind == "text":
            assert json.loads(value).get("tool") == "get_capacity"  # a read that happened to be well-formed
            return
    assert out.status == INVALID, out.payload
    assert out.payload["success"] is False and out.payload["error"]["message"]
    assert out.payload["error"]["code"] != "INTERNAL_ERROR"
    json.dumps(out.payload, allow_nan=False)
    assert a.redis.xlen(a.keys.events) == events_before  # every ledger change appends an event


@pytest.fixture
def fuzz_alloc(alloc):
    """The fuzz test's ledger; after all examples, every key must be exactly as before."""
    seed_host(alloc)
    call(alloc, "resource_allocator", EXAMPLES["resource_allocator"])
    before = ledger_dump(alloc)
    yield alloc, alloc.redis.xlen(alloc.keys.events)
    assert ledger_dump(alloc) == before


# -- the command ------------------------------------------------------------------------------


def run_cli(alloc, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": alloc.keys.namespace, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "allocator", "tool", *args], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=60)


def test_tool_command_reads_stdin_and_writes_one_json_document(alloc):
    seed_host(alloc)
    proc = run_cli(alloc, stdin=json.dumps(SEED004_ENVELOPE).encode())
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is True and result["resources"]["cpu_cores"] == [0, 1]


def test_tool_command_exit_statuses_and_no_traceback(alloc, tmp_path):
    seed_host(alloc)
    bad = run_cli(alloc, stdin=b"\x00{garbage")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "INVALID_JSON"
    assert b"Traceback" not in bad.stderr
    request = tmp_path / "req.json"
    request.write_text(json.dumps({"tool": "get_allocation", "params": {"allocation_id": "alloc-nope"}}))
    missing = run_cli(alloc, "--file", str(request))
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]["code"] == "ALLOCATION_NOT_FOUND"


def test_tool_schema_command_prints_each_format():
    from typer.testing import CliRunner

    from allocator.cli import app

    runner = CliRunner()
    for fmt in ("native", "openai", "anthropic"):
        res = runner.invoke(app, ["tool", "--schema", fmt])
        assert res.exit_code == 0
        assert json.loads(res.stdout) == json.loads(json.dumps(definitions(fmt)))
    assert json.loads(runner.invoke(app, ["tool", "--schema"]).stdout)["format"] == "rq-allocator-tools/1"
    assert runner.invoke(app, ["tool", "--schema", "yaml"]).exit_code == 2


@pytest.mark.parametrize("name", ["x y", "", "1x"])
def test_submit_task_refuses_a_kwarg_that_is_no_python_name(alloc, name):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    before = ledger_dump(alloc)
    out = call(alloc, "submit_task", {"task": "demo.etl", "kwargs": {name: 1}})
    assert (out.status, out.payload["error"]["field"]) == (INVALID, f"kwargs.{name}")
    assert ledger_dump(alloc) == before


def test_get_task_reports_a_bad_id_under_task_id(alloc):
    out = call(alloc, "get_task", {"task_id": "a\u0000"})
    assert (out.status, out.payload["error"]["field"]) == (INVALID, "task_id")
