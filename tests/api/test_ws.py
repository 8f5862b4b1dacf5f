"""WebSocket /ws/allocate: seed-003 messages, waiting in line with position updates, placement,
cancellation by disconnect, auth, and bad messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .conftest import AUTH, LiveApi, wait_until


def message(policy: str = "best_fit", inputs: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    msg = {"adhoc": True, "policy_rule_uri": policy, "clusters": [], "filter": {}, "search": {},
           "inputs": inputs if inputs is not None else {"resources": {"gpus": 1}}, "parameters": {}, "settings": {}}
    msg.update(fields)
    return msg


def open_ws(api: LiveApi, auth: bool = True) -> ClientConnection:
    return connect(api.ws_url, additional_headers=AUTH if auth else {}, open_timeout=5)


def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def until(ws: ClientConnection, kind: str, timeout: float = 5.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Frames up to and including the first of type ``kind``."""
    seen = []
    while True:
        m = recv(ws, timeout)
        seen.append(m)
        if m["type"] == kind:
            return m, seen
        assert m["type"] != "error", m


def closed_code(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=5)
    return info.value.rcvd.code if info.value.rcvd else -1


def fill_a100s(api: LiveApi) -> str:
    a = api.client().post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}, "expected_duration": 120})
    assert a.status_code == 201
    return a.json()["allocation_id"]


def test_builtin_strategy_places_at_once(api: LiveApi) -> None:
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_memory_mb": "10Gi"}, "task_id": "infer-1"},
                                   clusters=["lab"])))
        accepted = recv(ws)
        assert accepted["type"] == "accepted" and accepted["policy"] == "best_fit"
        placed = recv(ws)
        assert placed["type"] == "placed"
        assert placed["placement"] == {"cluster_id": "lab", "node_id": "gpu-b", "gpus": ["0"]}
        alloc = placed["allocation"]
        assert alloc["state"] == "active" and alloc["allocation_id"] == accepted["allocation_id"]
        assert alloc["task_id"] == "infer-1" and alloc["metadata"]["policy_rule_uri"] == "best_fit"
        assert closed_code(ws) == 1000
    held = api.allocator.get(accepted["allocation_id"])
    assert held.state == "active" and held.host_id == "gpu-b" and held.gpus[0].memory_mb == 10240


def test_filter_restricts_candidates(api: LiveApi) -> None:
    with open_ws(api) as ws:
        ws.send(json.dumps(message("worst_fit", {"resources": {"gpus": 1, "gpu_memory_mb": "1Gi"}}, filter={"cluster": "edge"})))
        placed, _ = until(ws, "placed")
        assert placed["placement"]["node_id"] == "gpu-c" and placed["placement"]["cluster_id"] == "edge"


def test_request_waits_streams_position_then_is_placed(api: LiveApi) -> None:
    blocker = fill_a100s(api)
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}},
                                   settings={"progress_interval_s": 0.2})))
        accepted = recv(ws)
        queued = recv(ws)
        assert queued["type"] == "queued" and queued["position"] == 1
        assert queued["allocation_id"] == accepted["allocation_id"]
        assert queued["estimated_start_time"].endswith("Z")  # as REST writes times (the blocker's expected end)
        assert api.allocator.get(accepted["allocation_id"]).state == "pending"
        # A keep-alive position frame arrives while nothing changes.
        assert recv(ws)["type"] == "position"
        # A lower-priority request joining behind does not move this one.
        api.client().post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue",
                                                   "priority": "low"})
        api.client().delete(f"/v1/allocations/{blocker}")
        placed, frames = until(ws, "placed")
        assert placed["placement"]["node_id"] == "gpu-a" and placed["allocation"]["state"] == "active"
        assert all(f["position"] == 1 for f in frames if f["type"] == "position")
        assert closed_code(ws) == 1000
    assert api.allocator.get(accepted["allocation_id"]).state == "active"


def test_disconnect_before_placement_cancels(api: LiveApi) -> None:
    blocker = fill_a100s(api)
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}})))
        accepted = recv(ws)
        assert recv(ws)["type"] == "queued"
    a = api.allocator
    wait_until(lambda: a.get(accepted["allocation_id"]).state == "cancelled", what="the request to be cancelled")
    assert a.redis.zcard(a.keys.pending) == 0
    api.client().delete(f"/v1/allocations/{blocker}")
    assert a.get(accepted["allocation_id"]).state == "cancelled"
    assert a.capacity().gpu_memory_mb.allocated == 0


def test_a_session_naming_an_existing_allocation_never_cancels_it(api: LiveApi) -> None:
    fill_a100s(api)
    first = api.client().post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"},
                                                       "allocation_id": "theirs", "on_busy": "queue"})
    assert first.status_code == 202  # someone else's request, waiting in line
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}, "allocation_id": "theirs"},
                                   settings={"timeout_s": 0.3})))
        assert recv(ws)["type"] == "accepted"
        error, frames = until(ws, "error")
        assert frames[0]["type"] == "queued" and {f["type"] for f in frames[1:-1]} <= {"position"}
        assert error["error"]["code"] == "TIMEOUT"
        assert closed_code(ws) == 4409  # the session gave up; what it named but did not make stays in line
    assert api.allocator.get("theirs").state == "pending"


def test_cancel_message_cancels(api: LiveApi) -> None:
    fill_a100s(api)
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}})))
        accepted = recv(ws)
        assert recv(ws)["type"] == "queued"
        ws.send(json.dumps({"type": "cancel"}))
        wait_until(lambda: api.allocator.get(accepted["allocation_id"]).state == "cancelled", what="cancel")
        with pytest.raises(ConnectionClosed) as info:
            while True:  # position frames sent before the cancel arrived, then the close
                assert recv(ws)["type"] == "position"
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


def test_a_frame_nested_too_deep_after_the_request_is_ignored_not_taken_as_a_disconnect(api: LiveApi) -> None:
    holder = fill_a100s(api)
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}})))
        accepted = recv(ws)
        assert recv(ws)["type"] == "queued"
        ws.send("[" * 100_000)
        api.allocator.release(holder)
        placed, _ = until(ws, "placed")  # the session went on waiting
        assert placed["allocation"]["allocation_id"] == accepted["allocation_id"]


def test_fail_when_busy_and_timeout_settings(api: LiveApi) -> None:
    fill_a100s(api)
    before = api.ledger()
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}}, settings={"on_busy": "fail"})))
        err, _ = until(ws, "error")
        assert err["error"]["code"] == "NO_FIT"
        assert closed_code(ws) == 4409
    assert api.ledger() == before
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}}, settings={"timeout_s": 0.3})))
        accepted = recv(ws)
        err, frames = until(ws, "error")
        assert frames[0]["type"] == "queued" and {f["type"] for f in frames[1:-1]} <= {"position"}
        assert err["error"]["code"] == "TIMEOUT"
        assert closed_code(ws) == 4409
    assert api.allocator.get(accepted["allocation_id"]).state == "cancelled"


def test_redis_failing_after_the_grant_closes_4503_backend_unavailable(api_factory: Callable[..., LiveApi],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    import allocator.api.ws as ws_module

    api = api_factory(cancel_retry_s=0.2)
    api.register_fleet()

    def down(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(ws_module, "placement_of", down)  # Redis goes away once the grant is made...
    monkeypatch.setattr(api.allocator, "cancel", down)  # ...and stays away for the cancel that follows
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1}})))
        assert recv(ws)["type"] == "accepted"
        err = recv(ws)
        assert err["type"] == "error" and err["error"]["code"] == "BACKEND_UNAVAILABLE", err
        assert closed_code(ws) == 4503


def _redis_away_for(calls: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, failing as a Redis that does not answer for its first ``calls`` calls (all when < 0)."""
    import redis

    failed = [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if calls < 0 or failed[0] < calls:
            failed[0] += 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real(*args, **kwargs)

    return flaky


def test_a_cancel_that_meets_redis_away_for_a_moment_is_tried_again(api_factory: Callable[..., LiveApi],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    api = api_factory(cancel_retry_s=5)
    api.register_fleet()
    fill_a100s(api)
    monkeypatch.setattr(api.allocator, "cancel", _redis_away_for(2, api.allocator.cancel))
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}})))
        accepted = recv(ws)
        assert recv(ws)["type"] == "queued"
        ws.send(json.dumps({"type": "cancel"}))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                assert recv(ws)["type"] == "position"
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    assert api.allocator.get(accepted["allocation_id"]).state == "cancelled"


def test_a_cancel_message_that_cannot_reach_redis_is_answered_4503_not_a_normal_close(
        api_factory: Callable[..., LiveApi], monkeypatch: pytest.MonkeyPatch) -> None:
    api = api_factory(cancel_retry_s=0.3)
    api.register_fleet()
    fill_a100s(api)
    monkeypatch.setattr(api.allocator, "cancel", _redis_away_for(-1, api.allocator.cancel))
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1, "gpu_model": "A100"}})))
        accepted = recv(ws)
        assert recv(ws)["type"] == "queued"
        ws.send(json.dumps({"type": "cancel"}))
        err, _ = _error_after_positions(ws)
        assert err["error"]["code"] == "BACKEND_UNAVAILABLE"
        assert "was not cancelled at the client's request" in err["error"]["message"]
        assert accepted["allocation_id"] in err["error"]["message"]
        assert closed_code(ws) == 4503
    assert api.allocator.get(accepted["allocation_id"]).state == "pending"


def _error_after_positions(ws: ClientConnection) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = []
    while True:
        m = recv(ws)
        seen.append(m)
        if m["type"] == "error":
            return m, seen
        assert m["type"] == "position", m


def test_a_message_naming_an_allocation_that_has_ended_is_refused_not_placed(api: LiveApi) -> None:
    c = api.client()
    assert c.post("/v1/allocations", json={"resources": {"gpus": 1}, "allocation_id": "ended-1"}).status_code == 201
    assert c.delete("/v1/allocations/ended-1").status_code == 200
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", {"resources": {"gpus": 1}, "allocation_id": "ended-1"})))
        assert recv(ws)["type"] == "accepted"
        err = recv(ws)
        assert err["type"] == "error" and err["error"]["code"] == "ALLOCATION_ENDED", err
        assert closed_code(ws) == 4409
    assert api.allocator.get("ended-1").state == "released"


def test_auth_is_required_on_the_socket(api: LiveApi) -> None:
    with pytest.raises(InvalidStatus) as info:
        open_ws(api, auth=False)
    assert info.value.response.status_code == 403
    with pytest.raises(InvalidStatus):
        connect(api.ws_url, additional_headers={"Authorization": "Bearer wrong"}, open_timeout=5)


def test_without_a_token_a_socket_opened_from_another_origin_is_refused(api_factory) -> None:
    """Any web page can open a WebSocket to a local server; without a token only its own origin
    (or a client that sends none, as programs do) may use it."""
    api = api_factory(token=None)
    api.register_fleet()
    with pytest.raises(InvalidStatus) as info:
        connect(api.ws_url, origin="https://evil.example", open_timeout=5)
    assert info.value.response.status_code == 403
    own = api.url.replace("http://", "")
    behind_a_proxy = {"origin": "https://gpu.example", "x-forwarded-host": "gpu.example"}  # Host rewritten by it
    for headers in ({"origin": f"http://{own}"}, {}, behind_a_proxy):
        with connect(api.ws_url, additional_headers=headers, open_timeout=5) as ws:
            ws.send(json.dumps(message(inputs={"resources": {"gpus": 1}, "ttl_seconds": 60})))
            assert recv(ws)["type"] in ("placed", "accepted", "position"), headers


@pytest.mark.parametrize("raw, code, field, close", [
    ("{not json", "MALFORMED_JSON", None, 4400),
    (json.dumps(message(adhoc=False)), "INVALID_REQUEST", "adhoc", 4422),
    (json.dumps(message(adhoc="true")), "INVALID_REQUEST", "adhoc", 4422),
    (json.dumps(message(adhoc=1)), "INVALID_REQUEST", "adhoc", 4422),
    (json.dumps(message(settings={"progress_interval_s": 1e-6})), "INVALID_REQUEST", "settings.progress_interval_s", 4422),
    (json.dumps(message(policy="   ")), "INVALID_REQUEST", "policy_rule_uri", 4422),
    (json.dumps({k: v for k, v in message().items() if k != "inputs"}), "INVALID_REQUEST", "inputs", 4422),
    (json.dumps(message(inputs={"resources": {"gpus": "many"}})), "INVALID_REQUEST", "inputs.resources.gpus", 4422),
    (json.dumps(message(inputs={"resources": {"ram_mb": "3 bananas"}})), "INVALID_REQUEST", "inputs.resources.ram_mb", 4422),
    (json.dumps(message(search={"q": "fast gpus"})), "INVALID_REQUEST", "search", 4422),
    (json.dumps(message(settings={"on_busy": "panic"})), "INVALID_REQUEST", "settings.on_busy", 4422),
    (json.dumps(message(filter="zone")), "INVALID_REQUEST", "filter", 4422),
    (json.dumps(message(clusters=["mars"])), "NO_CANDIDATES", "clusters", 4422),
    (json.dumps(message(policy="no_such_policy")), "POLICY_ERROR", "policy_rule_uri", 4422),
    (json.dumps(message(policy="os:system")), "POLICY_ERROR", "policy_rule_uri", 4422),
    (json.dumps(message(policy="subprocess.Popen")), "POLICY_ERROR", "policy_rule_uri", 4422),
    (json.dumps(message(policy="tests.api.policy_plugins:Missing")), "POLICY_ERROR", "policy_rule_uri", 4422),
])
def test_bad_messages_get_a_clear_error_and_change_nothing(api: LiveApi, raw: str, code: str, field: str | None,
                                                           close: int) -> None:
    before = api.ledger()
    with open_ws(api) as ws:
        ws.send(raw)
        err = recv(ws)
        assert err["type"] == "error", err
        assert err["error"]["code"] == code and err["error"]["field"] == field, err
        assert closed_code(ws) == close
    assert api.ledger() == before


def test_disallowed_module_is_never_imported(api: LiveApi) -> None:
    """A dotted path outside ALLOCATOR_POLICY_MODULES is refused before anything is imported
    (the server runs in this process, so sys.modules would show the import)."""
    import sys

    name = "tests.api.forbidden_policy"
    assert name not in sys.modules
    with open_ws(api) as ws:
        ws.send(json.dumps(message(policy=f"{name}:Policy")))
        err = recv(ws)
        assert err["error"]["code"] == "POLICY_ERROR" and err["error"]["field"] == "policy_rule_uri"
        assert "not allowed" in err["error"]["message"] and "ALLOCATOR_POLICY_MODULES" in err["error"]["message"]
    assert name not in sys.modules


def test_binary_frame_is_read_as_json_text(api: LiveApi) -> None:
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit")).encode())
        placed, _ = until(ws, "placed")
        assert placed["allocation"]["state"] == "active"


def test_of_two_sessions_naming_the_same_new_id_at_once_only_the_first_owns_it(alloc) -> None:
    import asyncio

    from allocator.api.app import create_app
    from allocator.api.config import ApiConfig
    from allocator.api.ws import Session

    alloc.register_host(id="h0", cpu_cores=4, ram_mb="8Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    st = create_app(alloc, ApiConfig(token=None)).state.api
    text = json.dumps(message("best_fit", {"resources": {"gpus": 1}, "allocation_id": "job-42"}))
    first, second = Session(st, None), Session(st, None)  # type: ignore[arg-type]
    runs = first.prepare(text), second.prepare(text)  # both before either places
    assert (first.owned, second.owned) == (True, False)
    assert runs[0].run().allocation_id == runs[1].run().allocation_id == "job-42"
    asyncio.run(second.cancel())  # the second client leaves: what the first made stays
    assert alloc.get("job-42").state == "active"


def test_a_retry_under_the_id_of_a_refused_attempt_owns_what_it_makes(api: LiveApi) -> None:
    fill_a100s(api)
    inputs = {"resources": {"gpus": 1, "gpu_model": "A100"}, "allocation_id": "mine"}
    with open_ws(api) as ws:
        ws.send(json.dumps(message("best_fit", inputs, settings={"on_busy": "fail"})))
        err, _ = until(ws, "error")  # refused: nothing made under "mine"
    with open_ws(api) as ws:  # the same client tries again, willing to wait a little
        ws.send(json.dumps(message("best_fit", inputs, settings={"timeout_s": 0.3})))
        err, _ = until(ws, "error")
        assert err["error"]["code"] == "TIMEOUT" and "the request was cancelled" in err["error"]["message"]
    assert api.allocator.get("mine").state == "cancelled"
