"""REST endpoints against a real uvicorn server and the real Redis: each route, errors, auth."""

from __future__ import annotations

import httpx
import pytest
from rq.job import Job

from allocator.queue import host_queue_name

from .conftest import TOKEN, LiveApi, wait_until


def err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "field"} <= set(body["error"])
    return body["error"]


# -- auth -----------------------------------------------------------------------------------


def test_routes_need_the_token_but_health_and_metrics_stay_open(api: LiveApi) -> None:
    anon = api.client(auth=False)
    for method, path in [("GET", "/v1/capacity"), ("GET", "/v1/hosts"), ("POST", "/v1/allocations"),
                         ("GET", "/v1/allocations"), ("GET", "/v1/tasks"), ("DELETE", "/v1/allocations/x")]:
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        assert err(r)["code"] == "UNAUTHORIZED"
        assert r.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(api.url + "/v1/capacity", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    basic = httpx.get(api.url + "/v1/capacity", headers={"Authorization": "Basic " + TOKEN})
    assert basic.status_code == 401
    assert TOKEN not in wrong.text
    assert anon.get("/health").json() == {"status": "ok", "redis": True, "namespace": api.allocator.keys.namespace}
    assert anon.get("/metrics").status_code == 200
    assert api.client().get("/v1/capacity").status_code == 200


def test_a_malformed_body_without_the_token_is_unauthorized_and_counts_nothing(api: LiveApi) -> None:
    def refusals() -> dict[str, str]:
        # (Only the refusal counters: the server's outbox tally writes the same hash on its own.)
        stats = api.allocator.redis.hgetall(api.allocator.keys.api_stats)
        return {k: v for k, v in stats.items() if k.startswith("refusals|")}

    before = (api.ledger(), refusals())
    r = httpx.post(api.url + "/v1/allocations", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 401 and err(r)["code"] == "UNAUTHORIZED" and r.headers["www-authenticate"] == "Bearer"
    assert (api.ledger(), refusals()) == before
    # The same body with the token is counted: the check above would have seen it.
    assert api.client().post("/v1/allocations", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert wait_until(lambda: refusals() != before[1], what="the refusal counted")


def test_no_token_configured_means_open(api_factory) -> None:
    api = api_factory(token=None)
    assert api.client(auth=False).get("/v1/capacity").status_code == 200


def test_openapi_schema_documents_routes_and_bearer_auth(api: LiveApi) -> None:
    schema = api.client(auth=False).get("/openapi.json").json()
    paths = schema["paths"]
    for p in ["/v1/capacity", "/v1/hosts", "/v1/hosts/{host_id}", "/v1/allocations", "/v1/allocations/{allocation_id}",
              "/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/position", "/v1/tasks/registry", "/health", "/metrics"]:
        assert p in paths, p
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "ErrorBody" in schema["components"]["schemas"]


# -- capacity and hosts ---------------------------------------------------------------------


def test_capacity_and_hosts(api: LiveApi) -> None:
    c = api.client()
    cap = c.get("/v1/capacity").json()
    assert cap["host_count"] == 3 and cap["gpu_count"] == 5
    assert cap["gpu_memory_mb"]["total"] == 2 * 40960 + 3 * 16384
    hosts = c.get("/v1/hosts").json()
    assert [h["host_id"] for h in hosts] == ["gpu-a", "gpu-b", "gpu-c"]
    assert hosts[2]["cluster"] == "edge" and hosts[0]["heartbeat_age_s"] is None
    api.allocator.redis.zadd(api.allocator.keys.heartbeats, {"gpu-a": 0})
    h = c.get("/v1/hosts/gpu-a").json()
    assert h["gpus"][1]["model"] == "A100" and h["heartbeat_age_s"] > 0
    r = c.get("/v1/hosts/nope")
    assert r.status_code == 404 and err(r)["code"] == "HOST_NOT_FOUND"


@pytest.mark.parametrize("body", [
    {"resources": {"gpus": True}}, {"resources": {"cpu_cores": 1, "ram_mb": True}}, {"priority": True},
    {"ttl_seconds": True}, {"resources": {"cpu_cores": False}},
])
def test_json_booleans_are_no_numbers(api: LiveApi, body: dict) -> None:
    before = api.allocator.redis.zcard(api.allocator.keys.allocs)
    r = api.client().post("/v1/allocations", json=body)
    assert r.status_code == 422, r.text
    assert api.allocator.redis.zcard(api.allocator.keys.allocs) == before


def test_whole_numbers_written_as_floats_are_still_numbers(api: LiveApi) -> None:
    c = api.client()
    r = c.post("/v1/allocations", json={"resources": {"gpus": 1.0, "ram_mb": 512.0, "cpu_cores": 1.0}})
    assert r.status_code == 201, r.text
    assert c.put("/v1/hosts/f", json={"cpu_cores": 4.0, "ram_mb": "8Gi"}).status_code == 200


def test_booleans_in_free_json_stay_allowed(api: LiveApi) -> None:
    r = api.client().post("/v1/allocations", json={"resources": {"cpu_cores": 1}, "metadata": {"debug": True}})
    assert r.status_code == 201, r.text


def test_a_host_put_carries_its_worker_slots_and_service_ports(api: LiveApi) -> None:
    c = api.client()
    r = c.put("/v1/hosts/w", json={"cpu_cores": 16, "ram_mb": "64Gi", "worker_slots": 2, "service_ports": "7000-7001"})
    assert r.status_code == 200, r.text
    assert r.json()["worker_slots"]["total"] == 2
    assert api.allocator.redis.hmget(api.allocator.keys.host("w"), "port_lo", "port_hi") == ["7000", "7001"]
    bad = c.put("/v1/hosts/w", json={"cpu_cores": True})
    assert bad.status_code == 422
    bad = c.put("/v1/hosts/w", json={"cpu_cores": [0, True]})
    assert bad.status_code == 422
    assert c.put("/v1/hosts/w", json={"cpu_cores": 2, "service_ports": None}).status_code == 200


def test_a_gpu_uuid_holding_a_comma_answers_422_naming_it(api: LiveApi) -> None:
    before = api.ledger()
    r = api.client().put("/v1/hosts/gpu-d", json={"cpu_cores": 4, "ram_mb": "8Gi", "gpus": [
        {"index": 0, "uuid": "GPU-aaaa,GPU-bbbb", "memory_mb": "24Gi"}]})
    assert r.status_code == 422 and err(r)["field"] == "gpus.0.uuid", r.text
    assert api.ledger() == before


def test_register_drain_resume_remove_host(api: LiveApi) -> None:
    c = api.client()
    r = c.put("/v1/hosts/gpu-d", json={"labels": {"cluster": "edge"}, "cpu_cores": 4, "ram_mb": "8Gi",
                                       "gpus": [{"index": 0, "model": "L4", "memory_mb": "24Gi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["gpu_memory_mb"]["total"] == 24576 and r.json()["cluster"] == "edge"
    bad = c.put("/v1/hosts/gpu-d", json={"gpus": [{"index": 0, "memory_mb": "lots"}]})
    assert bad.status_code == 422 and err(bad)["field"].startswith("gpus.0.memory_mb")
    assert c.post("/v1/hosts/gpu-d/drain").json()["state"] == "draining"
    assert c.post("/v1/hosts/gpu-d/resume").json()["state"] == "ready"
    a = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "L4"}}).json()
    busy = c.delete("/v1/hosts/gpu-d")
    assert busy.status_code == 409 and err(busy)["code"] == "HOST_BUSY"
    forced = c.delete("/v1/hosts/gpu-d", params={"force": "true"})
    assert forced.json() == {"host_id": "gpu-d", "released": [a["allocation_id"]]}
    assert c.get("/v1/hosts/gpu-d").status_code == 404
    assert c.post("/v1/hosts/nope/drain").status_code == 404


# -- allocations ----------------------------------------------------------------------------


def test_allocate_get_list_release(api: LiveApi) -> None:
    c = api.client()
    r = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"},
                                        "priority": "high", "task_id": "train-1", "metadata": {"team": "vision"}})
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["state"] == "active" and a["host_id"] == "gpu-a" and a["gpus"][0]["memory_mb"] == 20480
    assert a["priority"] == "high" and len(a["cpu_cores"]) == 4 and a["metadata"] == {"team": "vision"}
    assert api.allocator.get(a["allocation_id"]).host_id == "gpu-a"
    assert c.get(f"/v1/allocations/{a['allocation_id']}").json()["task_id"] == "train-1"
    listed = c.get("/v1/allocations", params={"state": "active"}).json()
    assert [x["allocation_id"] for x in listed] == [a["allocation_id"]]
    assert c.get("/v1/allocations", params={"host_id": "gpu-b"}).json() == []
    rel = c.delete(f"/v1/allocations/{a['allocation_id']}").json()
    assert rel["state"] == "released" and rel["released_now"] is True
    again = c.delete(f"/v1/allocations/{a['allocation_id']}").json()
    assert again["state"] == "released" and again["released_now"] is False
    assert api.allocator.capacity().gpu_memory_mb.allocated == 0
    missing = c.get("/v1/allocations/alloc-nope")
    assert missing.status_code == 404 and err(missing)["code"] == "ALLOCATION_NOT_FOUND"
    assert c.delete("/v1/allocations/alloc-nope").status_code == 404


def test_allocate_is_idempotent_by_allocation_id(api: LiveApi) -> None:
    c = api.client()
    body = {"resources": {"gpu_memory_mb": "4Gi"}, "allocation_id": "my-lease-1"}
    first, second = c.post("/v1/allocations", json=body).json(), c.post("/v1/allocations", json=body).json()
    assert first["allocation_id"] == second["allocation_id"] == "my-lease-1"
    assert first["gpus"] == second["gpus"] and len(api.allocator.list(state="active")) == 1


def test_a_repeat_of_an_allocation_that_has_ended_is_not_answered_created(api: LiveApi) -> None:
    c = api.client()
    body = {"resources": {"gpu_memory_mb": "4Gi"}, "allocation_id": "my-lease-2"}
    assert c.post("/v1/allocations", json=body).status_code == 201
    assert c.delete("/v1/allocations/my-lease-2").status_code == 200
    again = c.post("/v1/allocations", json=body)
    assert again.status_code == 200 and again.json()["state"] == "released"


def test_a_function_task_over_rest_may_have_no_time_limit_as_in_rq(api: LiveApi) -> None:
    c = api.client()
    r = c.post("/v1/tasks", json={"task": "add", "args": [1, 2], "job_timeout": -1, "result_ttl": -1})
    assert r.status_code == 202, r.text
    zero = c.post("/v1/tasks", json={"task": "add", "args": [1, 2], "job_timeout": 0})
    assert zero.status_code == 422 and err(zero)["field"] == "job_timeout" and "-1 for none" in err(zero)["message"]


def test_refusal_and_invalid_input_change_nothing(api: LiveApi) -> None:
    c = api.client()
    before = api.ledger()
    r = c.post("/v1/allocations", json={"resources": {"gpu_memory_mb": "48Gi"}})
    assert r.status_code == 409
    e = err(r)
    assert e["code"] == "INSUFFICIENT_GPU_MEMORY" and "largest free 40960 MiB" in e["message"]
    for body, field in [({"resources": {"gpus": -1}}, "resources.gpus"),
                        ({"resources": {"ram_mb": "12 parsecs"}}, "resources.ram_mb"),
                        ({"resources": {"gpus": 1}, "priority": "urgent"}, "priority"),
                        ({"resources": {"cpu_cores": "0.0001"}}, "resources.cpu_cores"),
                        ({"resources": {}, "surprise": 1}, "surprise"),
                        ({"selector": "cluster"}, "selector"),
                        ({"ttl_seconds": -5}, "ttl_seconds")]:
        r = c.post("/v1/allocations", json=body)
        assert r.status_code == 422, (body, r.text)
        assert err(r)["field"] == field, (body, r.json())
    r = c.post("/v1/allocations", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and err(r)["code"] == "MALFORMED_JSON"
    deep = b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"  # beyond what the JSON parser nests
    r = c.post("/v1/allocations", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and err(r)["code"] == "MALFORMED_JSON"
    assert api.ledger() == before


@pytest.mark.parametrize("body, field, limit", [
    ({"selector": {f"l{i}": "x" for i in range(65)}}, "selector", "64"),
    ({"selector": ",".join(f"l{i}=x" for i in range(65))}, "selector", "64"),
    ({"selector": {"cluster": [f"c{i}" for i in range(257)]}}, "selector.cluster", "256"),
    ({"resources": {"gpus": 1, "gpu_model": [f"M{i}" for i in range(257)]}}, "resources.gpu_model", "256"),
])
def test_too_many_selector_or_gpu_model_values_answer_422_naming_the_field(api: LiveApi, body: dict, field: str,
                                                                            limit: str) -> None:
    before = api.ledger()
    r = api.client().post("/v1/allocations", json={**body, "on_busy": "queue"})
    assert r.status_code == 422, r.text
    assert err(r)["field"] == field and limit in err(r)["message"], r.json()
    assert api.ledger() == before


def test_allocate_queue_then_placed_on_release(api: LiveApi) -> None:
    c = api.client()
    big = c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}}).json()
    r = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue"})
    assert r.status_code == 202
    q = r.json()
    assert q["state"] == "pending" and q["queue_position"] == 1
    pos = c.get(f"/v1/tasks/{q['allocation_id']}/position").json()
    assert pos["position"] == 1 and pos["state"] == "pending" and pos["allocation"] is None
    assert [e["task_id"] for e in c.get("/v1/tasks").json()] == [q["allocation_id"]]
    c.delete(f"/v1/allocations/{big['allocation_id']}")
    placed = c.get(f"/v1/tasks/{q['allocation_id']}").json()
    assert placed["state"] == "active" and placed["position"] == 0 and placed["allocation"]["host_id"] == "gpu-a"


def test_would_fit_changes_nothing(api: LiveApi) -> None:
    c = api.client()
    before = api.ledger()
    fit = c.post("/v1/allocations/check", json={"resources": {"gpus": 1, "gpu_memory_mb": "30Gi"}}).json()
    assert fit["fits"] is True and fit["host_id"] == "gpu-a"
    assert c.post("/v1/allocations/check", json={"resources": {"gpus": 3}}).json() == {"fits": False, "host_id": None,
                                                                                       "gpus": [], "cores": []}
    assert api.ledger() == before


# -- queued function tasks ------------------------------------------------------------------


def test_a_lease_whose_metadata_names_a_task_reports_no_task(api: LiveApi) -> None:
    c = api.client()
    r = c.post("/v1/allocations", json={"allocation_id": "m1", "resources": {"cpu_cores": 1}, "metadata": {"allocator_task": 5}})
    assert r.status_code == 201, r.text
    got = c.get("/v1/tasks/m1")
    assert got.status_code == 200 and got.json()["task"] is None
    assert c.delete("/v1/tasks/m1").status_code == 200


def test_a_bad_task_id_is_reported_under_task_id(api: LiveApi) -> None:
    r = api.client().get("/v1/tasks/a%00")
    assert r.status_code == 422 and "task_id" in r.text and "allocation_id" not in r.text


def test_a_task_kwarg_that_is_no_python_name_is_refused(api: LiveApi) -> None:
    r = api.client().post("/v1/tasks", json={"task": "add", "kwargs": {"x y": 1}})
    assert r.status_code == 422 and "kwargs.x y" in r.text


def test_submit_registered_task_position_and_cancel(api: LiveApi) -> None:
    c = api.client()
    reg = {t["name"]: t for t in c.get("/v1/tasks/registry").json()}
    assert "add" in reg and "function" not in reg["add"] and "target" not in reg["add"]
    r = c.post("/v1/tasks", json={"task": "add", "args": [2, 3], "resources": {"gpus": 1, "gpu_model": "T4"},
                                  "job_id": "add-1"})
    assert r.status_code == 202, r.text
    t = r.json()
    assert t["task_id"] == "add-1" and t["task"] == "add" and t["state"] == "active" and t["position"] == 0
    # Best fit takes gpu-c's only T4 rather than breaking up gpu-b's two idle ones.
    assert t["allocation"]["host_id"] == "gpu-c" and t["job_status"] == "queued"
    job = Job.fetch("add-1", connection=api.allocator.rq_connection)
    assert job.func_name == "tests.api.task_funcs.add" and job.args == (2, 3)
    assert job.origin == host_queue_name(api.allocator.keys.namespace, "gpu-c")
    # The same job id again returns the task as it is (no second job).
    assert c.post("/v1/tasks", json={"task": "add", "args": [9, 9], "job_id": "add-1"}).json()["task_id"] == "add-1"
    # A task that must wait: every A100 is taken.
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}})
    w = c.post("/v1/tasks", json={"task": "add", "kwargs": {"x": 1, "y": 2}, "resources": {"gpus": 1, "gpu_model": "A100"},
                                  "priority": "low"}).json()
    assert w["state"] == "pending" and w["position"] == 1 and w["job_status"] == "queued"
    assert c.get(f"/v1/tasks/{w['task_id']}/position").json()["position"] == 1
    cancelled = c.delete(f"/v1/tasks/{w['task_id']}").json()
    assert cancelled["state"] == "cancelled" and cancelled["position"] is None  # it left the line unplaced
    assert api.allocator.redis.zcard(api.allocator.keys.pending) == 0
    assert c.delete("/v1/tasks/nope").status_code == 404
    assert c.get("/v1/tasks/nope").status_code == 404


def test_only_registered_tasks_and_plain_arguments(api: LiveApi) -> None:
    c = api.client()
    before = api.ledger()
    for body, code, field in [
        ({"task": "os.system", "args": ["true"]}, "UNKNOWN_TASK", "task"),
        ({"task": "tests.api.task_funcs:add", "args": [1, 2]}, "UNKNOWN_TASK", "task"),
        ({"task": "add", "kwargs": {"priority": 1}}, "INVALID_REQUEST", "kwargs.priority"),
        ({"task": "add", "kwargs": {"job_timeout": 1}}, "INVALID_REQUEST", "kwargs.job_timeout"),
        ({"task": "add", "kwargs": {"on_host_lost": "fail"}}, "INVALID_REQUEST", "kwargs.on_host_lost"),
        ({"task": "add", "resources": {"gpus": "two"}}, "INVALID_REQUEST", "resources.gpus"),
    ]:
        r = c.post("/v1/tasks", json=body)
        assert r.status_code == 422, (body, r.text)
        e = err(r)
        assert (e["code"], e["field"]) == (code, field), e
    assert "registered tasks: " in c.post("/v1/tasks", json={"task": "nope"}).json()["error"]["message"]
    assert api.ledger() == before


def test_a_task_with_the_id_of_a_direct_allocation_is_refused(api: LiveApi) -> None:
    c = api.client()
    assert c.post("/v1/allocations", json={"allocation_id": "lease1", "resources": {"gpus": 1}}).status_code == 201
    r = c.post("/v1/tasks", json={"task": "add", "job_id": "lease1", "args": [1, 2]})
    assert r.status_code == 422 and err(r)["field"] == "job_id", r.text


def test_a_body_too_deep_to_parse_without_the_token_gets_401(api: LiveApi) -> None:
    deep = b"[" * 3000 + b"]" * 3000
    r = api.client(auth=False).post("/v1/allocations", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"


def test_a_request_without_the_token_gets_401_before_its_body_is_read(api_factory) -> None:
    """FastAPI reads a route's whole body before its dependencies: a server that did would wait
    here for a body that never comes."""
    import socket
    from urllib.parse import urlsplit

    api = api_factory()
    u = urlsplit(api.url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/allocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n{")
        head = sock.recv(4096)  # a timeout here: the server waits for the body
    assert head.startswith(b"HTTP/1.1 401") and b"www-authenticate: bearer" in head.lower()
    r = api.client(auth=False).post("/v1/allocations", content=b"{" * 100, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"


def test_a_body_over_the_limit_is_refused_with_413(api_factory) -> None:
    api = api_factory(max_body_bytes=4096)
    api.register_fleet()
    before = api.ledger()
    big = {"resources": {"gpus": 1}, "metadata": {"blob": "x" * 5000}}
    r = api.client().post("/v1/allocations", json=big)
    assert r.status_code == 413 and err(r)["code"] == "TOO_LARGE", r.text
    r = api.client().post("/v1/allocations", content=iter([b'{"resources": {"gpus": 1}, "metadata": {"blob": "', b"x" * 5000, b'"}}']),
                          headers={"content-type": "application/json"})  # chunked: no length given
    assert r.status_code == 413 and err(r)["code"] == "TOO_LARGE", r.text
    assert api.ledger() == before
    assert api.client().post("/v1/allocations", json={"resources": {"gpus": 1}}).status_code == 201


def test_unknown_route_and_method_use_the_error_shape(api: LiveApi) -> None:
    c = api.client()
    assert err(c.get("/v1/nothing-here"))["code"] == "NOT_FOUND"
    r = c.patch("/v1/capacity")
    assert r.status_code == 405 and err(r)["code"] == "METHOD_NOT_ALLOWED"


@pytest.mark.parametrize("path", ["/v1/allocations/a%2Fb", "/v1/tasks/%20"])
def test_odd_ids_are_not_found_not_errors(api: LiveApi, path: str) -> None:
    assert api.client().get(path).status_code == 404


def test_eta_is_reported_and_recorded_for_pending_tasks(api: LiveApi) -> None:
    c = api.client()
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}, "expected_duration": 60})
    w = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue"}).json()
    status = c.get(f"/v1/tasks/{w['allocation_id']}").json()
    if getattr(api.allocator, "estimated_start_time", None) is None:
        assert status["estimated_start_time"] is None
        return
    eta = wait_until(lambda: c.get(f"/v1/tasks/{w['allocation_id']}").json()["estimated_start_time"], what="an ETA")
    assert eta is not None
    assert api.allocator.redis.hget(api.allocator.keys.eta_predictions, w["allocation_id"]) is not None


def test_health_reports_degraded_redis() -> None:
    from allocator import Allocator
    from allocator.api.config import ApiConfig

    from .conftest import start_server

    a = Allocator("redis://127.0.0.1:1/0", namespace="unreachable")
    server = start_server(a, ApiConfig(token=None, tally_interval_s=30))
    try:
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["redis"] is False
        m = httpx.get(server.url + "/metrics")
        assert m.status_code == 200 and "allocator_redis_up 0.0" in m.text
    finally:
        server.stop()


@pytest.mark.parametrize("variable, value", [("ALLOCATOR_POLICY_ATTEMPTS", "0"), ("ALLOCATOR_POLICY_TIMEOUT_S", "abc"),
                                              ("ALLOCATOR_API_POLL_S", "-1"), ("ALLOCATOR_API_PROGRESS_S", "nan"),
                                              ("ALLOCATOR_POLICY_TIMEOUT_S", "1e10"), ("ALLOCATOR_API_TALLY_S", "inf"),
                                              ("ALLOCATOR_API_MAX_BODY_BYTES", "100"), ("ALLOCATOR_API_MAX_BODY_BYTES", "1.5")])
def test_an_api_setting_out_of_range_is_refused_naming_the_variable(variable: str, value: str) -> None:
    from allocator.api.config import ApiConfig
    from allocator.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as e:
        ApiConfig.from_env({variable: value})
    assert e.value.field == variable


def test_routes_answer_503_backend_unavailable_while_redis_is_down() -> None:
    from allocator import Allocator
    from allocator.api.config import ApiConfig

    from .conftest import start_server

    server = start_server(Allocator("redis://127.0.0.1:1/0", namespace="unreachable"), ApiConfig(token=None, tally_interval_s=30))
    try:
        for r in (httpx.get(server.url + "/v1/capacity"), httpx.get(server.url + "/v1/tasks"),
                  httpx.post(server.url + "/v1/allocations", json={"resources": {"cpu_cores": 1}})):
            assert r.status_code == 503 and r.json()["error"]["code"] == "BACKEND_UNAVAILABLE", r.text
    finally:
        server.stop()


def test_a_redis_reply_that_shows_a_bug_is_a_500_not_a_retry(api: LiveApi) -> None:
    api.allocator.redis.delete(api.allocator.keys.hosts)
    api.allocator.redis.set(api.allocator.keys.hosts, "not a sorted set")  # a key clash: WRONGTYPE
    r = api.client().get("/v1/capacity")
    assert r.status_code == 500 and r.json()["error"]["code"] == "INTERNAL"


def test_a_task_placed_at_once_reports_its_start_as_the_tool_does(api: LiveApi) -> None:
    c = api.client()
    x = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue"}).json()
    status = c.get(f"/v1/tasks/{x['allocation_id']}").json()
    assert status["state"] == "active" and status["estimated_start_time"] == x["activated_at"]
    assert api.allocator.redis.hget(api.allocator.keys.eta_predictions, x["allocation_id"]) is None  # no prediction


def test_function_task_placed_by_the_pass_keeps_kind_job(api: LiveApi) -> None:
    t = api.client().post("/v1/tasks", json={"task": "add", "args": [1, 1], "resources": {"gpus": 1}}).json()
    assert t["state"] == "active"
    assert api.allocator.get(t["task_id"]).kind == "job"


def test_a_batch_places_each_request_in_order_and_answers_each_with_its_status(api: LiveApi) -> None:
    c = api.client()
    edge_only = {"resources": {"gpus": 1, "gpu_memory_mb": "30Gi"}, "selector": {"cluster": "edge"}}
    r = c.post("/v1/allocations/batch", json={"requests": [
        edge_only,
        {"resources": {"gpus": 1, "gpu_memory_mb": "30Gi"}, "task_type": "sweep", "allocation_id": "sweep-2"},
        {"resources": {"gpu_memory_mb": "48Gi"}},
    ]})
    assert r.status_code == 200, r.text
    body = r.json()
    first, second, third = body["results"]
    alone = c.post("/v1/allocations", json=edge_only)
    assert first["status"] == alone.status_code == 409 and first["allocation"] is None
    assert first["error"] == err(alone)
    assert second["status"] == 201 and second["allocation"]["allocation_id"] == "sweep-2"
    assert second["allocation"]["host_id"] == "gpu-a" and second["allocation"]["task_type"] == "sweep"
    assert third["status"] == 409 and "largest free 40960 MiB" in third["error"]["message"]
    assert body["allocated"] == 1
    assert [x.allocation_id for x in api.allocator.list(state="active")] == ["sweep-2"]


def test_a_batch_repeated_answers_as_its_allocations_stand(api: LiveApi) -> None:
    c = api.client()
    body = {"requests": [{"resources": {"gpu_memory_mb": "4Gi"}, "allocation_id": f"s-{i}"} for i in range(3)],
            "chunk_size": 2}
    first = c.post("/v1/allocations/batch", json=body).json()
    c.delete("/v1/allocations/s-1")
    again = c.post("/v1/allocations/batch", json=body).json()
    assert [x["status"] for x in first["results"]] == [201, 201, 201]
    assert [x["status"] for x in again["results"]] == [201, 200, 201]
    assert again["results"][1]["allocation"]["state"] == "released" and again["allocated"] == 2
    assert len(api.allocator.list(state="active")) == 2


def test_a_batch_answers_a_repeat_of_a_queued_request_202_as_the_single_route_does(api: LiveApi) -> None:
    c = api.client()
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}})
    queued = {"resources": {"gpus": 2, "gpu_model": "A100"}, "allocation_id": "wait-1"}
    assert c.post("/v1/allocations", json={**queued, "on_busy": "queue"}).status_code == 202
    r = c.post("/v1/allocations/batch", json={"requests": [queued]}).json()
    assert r["results"][0]["status"] == 202 and r["results"][0]["allocation"]["state"] == "pending"
    assert r["allocated"] == 0


def test_a_batch_of_releases_answers_each_id_as_delete_would(api: LiveApi) -> None:
    c = api.client()
    for i in range(3):
        assert c.post("/v1/allocations", json={"resources": {"gpu_memory_mb": "4Gi"}, "allocation_id": f"r-{i}"}).status_code == 201
    c.delete("/v1/allocations/r-1")
    r = c.post("/v1/allocations/batch/release", json={"allocation_ids": ["r-0", "r-1", "nowhere", "r-2"], "chunk_size": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["status"] for x in body["results"]] == [200, 200, 404, 200]
    assert [x["allocation"]["released_now"] for x in body["results"] if x["allocation"]] == [True, False, True]
    assert body["results"][2]["error"] == err(c.delete("/v1/allocations/nowhere"))
    assert body["released"] == 2
    assert api.allocator.list(state="active") == []


@pytest.mark.parametrize("route, body, field", [
    ("batch", {"requests": [{"resources": {"gpus": 1}}, {"resources": {"gpus": -1}}]}, "requests.1.resources.gpus"),
    ("batch", {"requests": [{"resources": {"ram_mb": "12 parsecs"}}]}, "requests.0.resources.ram_mb"),
    ("batch", {"requests": [{"resources": {}, "on_busy": "queue"}]}, "requests.0.on_busy"),
    ("batch", {"requests": [{"resources": {}}] * 1001}, "requests"),
    ("batch", {"requests": [{"resources": {}}], "chunk_size": 0}, "chunk_size"),
    ("batch", {"requests": [{"resources": {}}], "chunk_size": 300}, "chunk_size"),
    ("batch/release", {"allocation_ids": ["ok-1", "not ok"]}, "allocation_ids.1"),
    ("batch/release", {"allocation_ids": "ok-1"}, "allocation_ids"),
    ("batch/release", {"allocation_ids": ["ok-1"] * 1001}, "allocation_ids"),
    ("batch/release", {"allocation_ids": ["ok-1"], "chunk_size": 0}, "chunk_size"),
    ("batch/release", {"allocation_ids": ["ok-1"], "reason": "failed"}, "reason"),
])
def test_a_malformed_batch_changes_nothing_and_names_the_field(api: LiveApi, route: str, body: dict, field: str) -> None:
    c = api.client()
    assert c.post("/v1/allocations", json={"resources": {"gpu_memory_mb": "4Gi"}, "allocation_id": "ok-1"}).status_code == 201
    before = api.ledger()
    r = c.post(f"/v1/allocations/{route}", json=body)
    assert r.status_code == 422, r.text
    assert err(r)["field"] == field
    assert api.ledger() == before


def test_a_batch_while_the_ledger_is_recovering_answers_503_for_each_request(api: LiveApi) -> None:
    c = api.client()
    api.allocator.redis.hset(api.allocator.keys.seq, "recovering", "1")
    r = c.post("/v1/allocations/batch", json={"requests": [{"resources": {"cpu_cores": 1}}] * 2})
    assert r.status_code == 200
    assert [(x["status"], x["error"]["code"]) for x in r.json()["results"]] == [(503, "RECOVERING")] * 2
