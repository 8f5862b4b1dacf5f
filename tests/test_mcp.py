"""``allocator mcp``: every tool called through the MCP SDK's client — in memory against the server
object, and once over stdio against the real ``allocator mcp`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from allocator.mcp_server import build_server
from allocator.tool import TOOLS

from .conftest import ledger_dump
from .test_tool import EXAMPLES, SEED004_ENVELOPE, quick_start_host, seed_host

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(alloc):
    async with Client(build_server(alloc), raise_exceptions=True) as c:
        yield c


async def test_lists_every_tool_with_the_published_input_schema(client):
    listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == set(TOOLS)
    for name, tool in listed.items():
        assert tool.input_schema == TOOLS[name].schema
        assert tool.description


async def test_resource_allocator_returns_the_seed_result_as_structured_content(alloc, client):
    seed_host(alloc)
    r = await client.call_tool("resource_allocator", SEED004_ENVELOPE["params"])
    assert not r.is_error
    assert r.structured_content["success"] is True
    assert r.structured_content["resources"]["cpu_cores"] == [0, 1]
    assert r.structured_content["metadata"]["available_resources"] == {"gpu_memory_mb": 8192, "cpu_cores": 8, "ram_mb": 16384}


async def test_a_refusal_is_a_tool_error_with_its_message(alloc, client):
    seed_host(alloc)
    before = ledger_dump(alloc)
    r = await client.call_tool("resource_allocator", {**EXAMPLES["resource_allocator"], "resource_requirements": {"gpu_memory_mb": "64Gi"}})
    assert r.is_error
    assert r.content[0].text == "no GPU could ever hold 65536 MiB: the largest has 10240 MiB"
    assert r.structured_content["error"]["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert ledger_dump(alloc) == before


async def test_invalid_arguments_are_a_tool_error_naming_the_field(alloc, client):
    r = await client.call_tool("request_resources", {"job_id": "j", "mcp_servers": [], "workers": "four"})
    assert r.is_error and r.structured_content["error"]["field"] == "workers"


async def test_seed000_tools_work_end_to_end(alloc, client, clock):
    quick_start_host(alloc)
    made = await client.call_tool("request_resources", EXAMPLES["request_resources"])
    assert not made.is_error and made.structured_content["status"] == "active"
    aid = made.structured_content["allocation_id"]
    cap = await client.call_tool("get_capacity", {})
    assert cap.structured_content["allocated_workers"] == 4
    got = await client.call_tool("get_allocation", {"allocation_id": aid})
    assert got.structured_content["state"] == "active"
    listed = await client.call_tool("list_allocations", {"state": "active"})
    assert [x["allocation_id"] for x in listed.structured_content["allocations"]] == [aid]
    released = await client.call_tool("release_resources", {"allocation_id": aid})
    assert released.structured_content["workers_released"] == 4
    short = await client.call_tool("request_resources", {"job_id": "j2", "mcp_servers": [], "workers": 1, "ttl_seconds": 5})
    clock.advance(6)
    cleaned = await client.call_tool("cleanup_expired", {})
    assert cleaned.structured_content == {"expired": [short.structured_content["allocation_id"]], "count": 1}


async def test_get_allocation_of_an_unknown_id_is_a_tool_error(client):
    r = await client.call_tool("get_allocation", {"allocation_id": "alloc-nope"})
    assert r.is_error and r.content[0].text == "allocation alloc-nope not found"


async def test_task_tools_submit_show_queue_and_cancel(alloc, client):
    alloc.register_host(id="h1", cpu_cores=1, ram_mb="4Gi")
    first = await client.call_tool("submit_task", EXAMPLES["submit_task"])
    second = await client.call_tool("submit_task", {**EXAMPLES["submit_task"], "task_id": "second"})
    assert first.structured_content["state"] == "active"
    assert second.structured_content["queue_position"] == 1
    queue = await client.call_tool("get_queue", {})
    assert [r["task_id"] for r in queue.structured_content["pending"]] == ["second"]
    task = await client.call_tool("get_task", {"task_id": "second"})
    assert task.structured_content["state"] == "pending"
    cancelled = await client.call_tool("cancel_task", {"task_id": "second"})
    assert cancelled.structured_content["state"] == "cancelled"


async def test_unregistered_task_names_are_refused(alloc, client):
    r = await client.call_tool("submit_task", {"task": "subprocess.run", "args": [["rm", "-rf", "/"]]})
    assert r.is_error and r.structured_content["error"]["field"] == "task"


def _env(alloc) -> dict[str, str]:
    url = "redis://{host}:{port}/{db}".format(**alloc.redis.connection_pool.connection_kwargs)
    return {**os.environ, "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": alloc.keys.namespace, "PYTHONPATH": str(ROOT)}


async def test_the_mcp_command_serves_the_tools_over_stdio(alloc):
    seed_host(alloc)
    params = StdioServerParameters(command=sys.executable, args=["-m", "allocator", "mcp"], env=_env(alloc), cwd=str(ROOT))
    async with Client(params) as c:
        assert {t.name for t in (await c.list_tools()).tools} == set(TOOLS)
        r = await c.call_tool("resource_allocator", SEED004_ENVELOPE["params"])
        assert r.structured_content["resources"]["gpu_id"] == "gpu_0"
    assert alloc.capacity().active_allocations == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_mcp_command_serves_streamable_http(alloc):
    seed_host(alloc)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "allocator", "mcp", "--http", "--port", str(port)], env=_env(alloc),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "allocator mcp --http did not start"
                time.sleep(0.1)
        async with Client(f"http://127.0.0.1:{port}/mcp") as c:
            r = await c.call_tool("get_capacity", {})
            assert r.structured_content["total_cpu"] == 10.0
    finally:
        proc.terminate()
        proc.wait(10)


def test_mcp_with_a_task_module_that_cannot_be_imported_exits_2_naming_it(redis_url, monkeypatch):
    from typer.testing import CliRunner

    from allocator import task_registry
    from allocator.cli import app

    monkeypatch.setattr(task_registry, "registry", task_registry.TaskRegistry())
    for cached in ("schema", "validator"):  # built on first use in a process; this one has used them
        monkeypatch.delitem(TOOLS["submit_task"].__dict__, cached, raising=False)
    res = CliRunner().invoke(app, ["mcp", "--redis-url", redis_url],
                             env={"ALLOCATOR_TASK_MODULES": "no_such_module_anywhere"}, input="")
    assert res.exit_code == 2, res.output
    assert "no_such_module_anywhere" in res.output


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.mark.parametrize("sent, status", [(None, 401), ("Bearer wrong", 401), ("s3cret", 401), ("Basic s3cret", 401),
                                          ("Bearer s3cret", 200), ("bearer s3cret", 200)])
def test_mcp_over_http_with_a_token_answers_only_requests_that_carry_it(alloc, sent, status):
    from starlette.testclient import TestClient

    from allocator.mcp_server import http_app

    headers = dict(MCP_HEADERS, **({"authorization": sent} if sent else {}))
    with TestClient(http_app(alloc, token="s3cret"), base_url="http://127.0.0.1:8765") as c:
        assert c.post("/mcp", json=INITIALIZE, headers=headers).status_code == status


@pytest.mark.parametrize("variable, value, named", [("ALLOCATOR_SCAN_CAP", "0", "ALLOCATOR_SCAN_CAP"),
                                                     ("ALLOCATOR_REDIS_URL", "http://127.0.0.1:6379", "redis://"),
                                                     ("ALLOCATOR_NAMESPACE", "x" * 70, "namespace")])
def test_mcp_with_a_bad_setting_exits_2_at_start_up_naming_it(redis_url, variable, value, named):
    from typer.testing import CliRunner

    from allocator.cli import app

    env = {"ALLOCATOR_REDIS_URL": redis_url, variable: value}
    res = CliRunner().invoke(app, ["mcp"], env=env, input="")
    assert res.exit_code == 2, res.output
    assert named in res.output
