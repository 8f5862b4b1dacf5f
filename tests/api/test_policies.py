"""Policy plug-ins over the WebSocket: a good one (node and GPUs chosen), the seed input shape
and injected clients, one that raises, wrong outputs, a slow one, and conflicts (retried, or a
clear error), plus loading by entry point."""

from __future__ import annotations

import json
from typing import Any

import pytest

from allocator.api.policies import BUILTINS, PolicyLoader, check_output
from allocator.api.errors import PolicyError

from .conftest import LiveApi
from .test_ws import closed_code, message, open_ws, recv, until

PLUGINS = "tests.api.policy_plugins"


def run(api: LiveApi, msg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    with open_ws(api) as ws:
        ws.send(json.dumps(msg))
        frames = []
        while True:
            m = recv(ws)
            frames.append(m)
            if m["type"] in ("placed", "error"):
                return m, frames, closed_code(ws)


def test_good_policy_chooses_node_and_gpus(api: LiveApi) -> None:
    msg = message(f"{PLUGINS}:PickNode", {"resources": {"gpus": 1, "gpu_memory_mb": "8Gi", "cpu_cores": 2}},
                  parameters={"node": "gpu-b", "gpus": ["1"]})
    last, frames, code = run(api, msg)
    assert [f["type"] for f in frames] == ["accepted", "placed"] and code == 1000
    assert last["placement"] == {"cluster_id": "lab", "node_id": "gpu-b", "gpus": ["1"]}
    assert last["attempts"] == 1
    held = api.allocator.get(last["allocation"]["allocation_id"])
    assert held.host_id == "gpu-b" and [g.index for g in held.gpus] == [1] and len(held.cpu_cores) == 2
    # GPUs by uuid work too, and the policy's context persists across requests.
    msg["parameters"] = {"node": "gpu-a", "gpus": ["gpu-a-gpu1"]}
    last, _, _ = run(api, msg)
    assert last["placement"]["gpus"] == ["1"] and last["placement"]["node_id"] == "gpu-a"
    assert api.client().get("/v1/capacity").json()["gpus_idle"] == 3
    ctx = next(iter(v for k, v in _contexts(api).items() if k.endswith("PickNode")))
    assert ctx["runs"] == 2


def _contexts(api: LiveApi) -> dict[str, dict[str, Any]]:
    return api.app.state.api.policies._contexts


def test_policy_sees_seed_input_and_clients(api: LiveApi) -> None:
    msg = message(f"{PLUGINS}:SeesClusters", {"resources": {"gpus": 1}, "note": "for the policy"})
    last, _, code = run(api, msg)
    assert code == 1000 and last["placement"]["cluster_id"] == "edge"  # sorted(["edge", "lab"])[0]


def test_builtins_through_the_same_interface(api: LiveApi) -> None:
    for name in ("first_fit", "most_free_memory", "allocator.api.policies:WorstFit"):
        last, _, code = run(api, message(name, {"resources": {"gpus": 1, "gpu_memory_mb": "1Gi"}}))
        assert code == 1000 and last["type"] == "placed", (name, last)
    placements = [a.host_id for a in api.allocator.list(state="active")]
    assert len(placements) == 3


@pytest.mark.parametrize("policy, params, field, text", [
    ("Raising", {}, "policy_rule_uri", "RuntimeError: policy exploded"),
    ("WrongOutput", {"output": "gpu-a"}, "policy_output", "returned str"),
    ("WrongOutput", {"output": [{}, {}]}, "policy_output", "returned 2 placements"),
    ("WrongOutput", {"output": {"node_id": "gpu-z"}}, "policy_output.node_id", "not one of the candidate hosts"),
    ("WrongOutput", {"output": {"node_id": "gpu-a", "cluster_id": "edge"}}, "policy_output.cluster_id", "is in cluster 'lab'"),
    ("WrongOutput", {"output": {"node_id": "gpu-a", "gpus": [7]}}, "policy_output.gpus", "has no GPU 7"),
    ("WrongOutput", {"output": {"node_id": "gpu-a", "gpus": [0, 1]}}, "policy_output.gpus", "needs 1"),
    ("WrongOutput", {"output": {"gpus": [0]}}, "policy_output.gpus", "without a node_id"),
    ("WrongOutput", {"output": {"strategy": "random"}}, "policy_output.strategy", "expected one of"),
    ("WrongOutput", {"output": {"node_id": "gpu-a", "gpus": ["²"]}}, "policy_output.gpus", "has no GPU"),
])
def test_bad_policy_allocates_nothing(api: LiveApi, policy: str, params: dict[str, Any], field: str, text: str) -> None:
    before = api.ledger()
    last, _, code = run(api, message(f"{PLUGINS}:{policy}", parameters=params))
    assert last["type"] == "error" and code == 4422
    assert last["error"]["code"] == "POLICY_ERROR" and last["error"]["field"] == field
    assert text in last["error"]["message"], last
    assert api.ledger() == before


def test_slow_policy_times_out(api_factory) -> None:
    api = api_factory(policy_timeout_s=0.2)
    api.register_fleet()
    before = api.ledger()
    last, _, code = run(api, message(f"{PLUGINS}:Slow", parameters={"seconds": 1.0}))
    assert last["error"]["code"] == "POLICY_ERROR" and "did not answer within 0.2 s" in last["error"]["message"]
    assert code == 4422 and api.ledger() == before


def test_a_built_in_strategy_places_while_overrunning_policies_hold_every_policy_thread(api_factory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api = api_factory(policy_timeout_s=0.2)
    api.register_fleet()
    state = api.app.state.api
    state.policy_threads.shutdown(wait=False)
    state.policy_threads = ThreadPoolExecutor(max_workers=1)  # one thread, as if all 16 were held
    last, _, _ = run(api, message(f"{PLUGINS}:Slow", parameters={"seconds": 1.0}))
    assert last["error"]["code"] == "POLICY_ERROR"  # it overran, and keeps the thread for a while
    placed, _, code = run(api, message("best_fit", {"resources": {"gpus": 1, "gpu_memory_mb": "10Gi"}}))
    assert placed["type"] == "placed" and code == 1000


def test_conflict_is_retried_with_fresh_capacity(api: LiveApi, redis_url: str) -> None:
    params = {"node": "gpu-a", "redis_url": redis_url, "namespace": api.allocator.keys.namespace, "rival_id": "rival-1"}
    last, _, code = run(api, message(f"{PLUGINS}:Racing", {"resources": {"gpus": 1, "gpu_model": "A100"}}, parameters=params))
    assert code == 1000 and last["attempts"] == 2
    assert last["placement"] == {"cluster_id": "lab", "node_id": "gpu-a", "gpus": ["1"]}
    rival = api.allocator.get("rival-1")
    assert rival.host_id == "gpu-a" and [g.index for g in rival.gpus] == [0]
    # Never oversubscribed: each A100 has exactly one holder.
    assert [g.holders for g in api.allocator.capacity().hosts[0].gpus] == [1, 1]


@pytest.mark.parametrize("on_busy", ["fail", "queue"])
def test_a_session_whose_named_id_another_client_took_meanwhile_never_cancels_it(api: LiveApi, on_busy: str) -> None:
    import asyncio

    from allocator.api.placing import PolicyRun
    from allocator.api.ws import Session

    a = api.allocator
    session = Session(api.app.state.api, ws=None)
    session.allocation_id = "job-42"  # the id the client named, free when the session claimed it

    def evaluate(data: dict[str, Any]) -> dict[str, Any]:
        a.allocate({"gpus": 1}, allocation_id="job-42")  # another client (REST, the CLI) takes it meanwhile
        return {}

    async def client_left_while_the_policy_ran() -> None:
        session.stop.set()
        alloc = await session.place(run)  # the attempt ends, then what the session made is undone
        if alloc is not None:
            await session.deliver(alloc, run)

    run = PolicyRun(a, a.build_request({"gpus": 1}, allocation_id="job-42"), "job-42", None, {}, evaluate,
                    on_busy=on_busy, needs_candidates=False)
    asyncio.run(client_left_while_the_policy_ran())
    assert a.get("job-42").state == "active"  # the other client's grant stands
    assert not session.owned


def test_persistent_conflict_fails_clearly_or_waits_for_the_node(api: LiveApi) -> None:
    c = api.client()
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}, "allocation_id": "hog"})
    before = api.ledger()
    msg = message(f"{PLUGINS}:AlwaysNode", {"resources": {"gpus": 1}}, parameters={"node": "gpu-a"},
                  settings={"on_busy": "fail", "max_attempts": 2})
    last, _, code = run(api, msg)
    assert code == 4409 and last["error"]["code"] == "POLICY_CONFLICT"
    assert "did not fit on any of 2 attempt(s)" in last["error"]["message"]
    assert last["error"]["details"] == {"last_code": "INSUFFICIENT_GPUS", "node_id": "gpu-a"}
    assert api.ledger() == before
    # Queue mode: the request waits pinned to the policy's node, although gpu-b has idle GPUs.
    msg["settings"] = {"max_attempts": 2}
    with open_ws(api) as ws:
        ws.send(json.dumps(msg))
        accepted = recv(ws)
        queued = recv(ws)
        assert queued["type"] == "queued" and queued["node_id"] == "gpu-a"
        c.delete("/v1/allocations/hog")
        placed, _ = until(ws, "placed")
        assert placed["placement"]["node_id"] == "gpu-a"
    assert api.allocator.get(accepted["allocation_id"]).host_id == "gpu-a"


def test_a_policy_choice_only_the_lines_reserved_room_would_hold_is_refused_when_the_request_must_not_wait(api: LiveApi) -> None:
    c = api.client()
    c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "ttl_seconds": 600})
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}, "on_busy": "queue", "expected_duration": 600})
    before = api.ledger()
    msg = message(f"{PLUGINS}:PickNode", {"resources": {"gpus": 1, "gpu_model": "A100"}, "expected_duration": 3600},
                  parameters={"node": "gpu-a"}, settings={"on_busy": "fail"})
    last, _, code = run(api, msg)
    assert code == 4409 and last["error"]["code"] == "QUEUE_AHEAD", last  # as REST and the built-in strategies
    assert api.ledger() == before


def test_candidates_say_which_hosts_take_no_new_work(api: LiveApi) -> None:
    from allocator.api.placing import read_candidates

    api.client().post("/v1/allocations", json={"resources": {"gpus": 0, "cpu_cores": 4, "ram_mb": "1Gi"}, "selector": "cluster=edge"})
    cands = read_candidates(api.allocator, None)
    assert {n: c.metrics()["schedulable"] for n, c in cands.items()} == {"gpu-a": True, "gpu-b": True, "gpu-c": False}


def test_policy_choice_yields_to_the_line(api: LiveApi) -> None:
    """A waiting task of the same priority is not overtaken by a policy's immediate commit."""
    c = api.client()
    c.post("/v1/allocations", json={"resources": {"gpus": 2, "gpu_model": "A100"}, "allocation_id": "hog"})
    waiting = c.post("/v1/allocations", json={"resources": {"gpus": 1, "gpu_model": "A100"}, "on_busy": "queue"}).json()
    msg = message(f"{PLUGINS}:PickNode", {"resources": {"gpus": 1, "gpu_model": "T4"}}, parameters={"node": "gpu-b"})
    with open_ws(api) as ws:
        ws.send(json.dumps(msg))
        recv(ws)
        queued = recv(ws)
        # gpu-b has room, but a task is waiting ahead: this request joins the line behind it and
        # the pass (EASY backfill: gpu-b is not the waiting task's host) starts it right away.
        assert queued["type"] in ("queued", "placed")
        placed = queued if queued["type"] == "placed" else until(ws, "placed")[0]
        assert placed["placement"]["node_id"] == "gpu-b"
    assert api.allocator.get(waiting["allocation_id"]).state == "pending"


def test_loader_unit_rules() -> None:
    loader = PolicyLoader(("allocator.api.policies", PLUGINS))
    assert loader.resolve("best_fit") is BUILTINS["best_fit"]
    with pytest.raises(PolicyError, match="not allowed"):
        loader.resolve("tests.conftest:FakeClock")
    with pytest.raises(PolicyError, match="no eval"):
        loader.instantiate(f"{PLUGINS}:SeedShaped", {}, {})
    assert check_output(None, {}, 0).node_id is None  # None/{} = let the ledger decide


@pytest.mark.parametrize("attr", ["NotAPolicy", "Allocator"])  # Allocator(): an embedded redis-server for nothing
def test_a_class_of_an_allowed_module_that_is_no_policy_is_refused_without_being_built(attr: str) -> None:
    from tests.api import policy_plugins

    loader = PolicyLoader(("allocator.api.policies", PLUGINS))
    before = policy_plugins.NotAPolicy.built
    with pytest.raises(PolicyError, match="has no eval"):
        loader.instantiate(f"{PLUGINS}:{attr}", {}, {})
    assert policy_plugins.NotAPolicy.built == before


def test_a_padded_policy_uri_names_the_same_policy_and_context() -> None:
    from allocator.api.schemas import AllocateMessage

    assert AllocateMessage.model_validate(message(f"  {PLUGINS}:PickNode ")).policy_rule_uri == f"{PLUGINS}:PickNode"


def test_entry_point_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    import allocator.api.policies as mod

    class EP:
        name = "team.pick"

        def load(self) -> type:
            from tests.api.policy_plugins import PickNode

            return PickNode

    monkeypatch.setattr(mod, "entry_points", lambda group: [EP()] if group == mod.POLICY_GROUP else [])
    loader = PolicyLoader(("allocator.api.policies",))
    assert loader.resolve("team.pick").__name__ == "PickNode"


def test_a_request_pinned_to_a_node_is_not_backfilled_elsewhere(alloc) -> None:
    from allocator.api.placing import submit_to_line

    alloc.register_host({"id": "A", "labels": {"n": "A"}, "cpu_cores": 8, "ram_mb": "8Gi",
                         "gpus": [{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}]})
    alloc.register_host({"id": "B", "labels": {"n": "B"}, "cpu_cores": 8, "ram_mb": "8Gi", "gpus": [{"index": 0, "memory_mb": "16Gi"}]})
    alloc.allocate({"gpus": 1}, allocation_id="hogA", expected_duration=100, selector={"n": "A"})
    alloc.allocate({"gpus": 1}, allocation_id="hogB", selector={"n": "B"})
    alloc.allocate({"gpus": 2}, on_busy="queue", allocation_id="head")  # blocked: reservation on A
    submit_to_line(alloc, alloc.build_request({"gpus": 1}, expected_duration=10), "pinned", only="B")
    assert alloc.get("pinned").host_id in (None, "B")


def test_most_free_memory_passes_over_a_host_that_takes_no_new_work() -> None:
    policy = BUILTINS["most_free_memory"]()
    big, small = _node("big", 0, [(0, 81920, 0)]), _node("small", 0, [(0, 16384, 0)])
    big["ram_free_mb"] = 0.0  # its RAM is all granted: the ledger parks it
    out = policy.eval({}, {"request": _request(1), "candidates": [big, small]}, {})
    assert out["node_id"] == "small"


def _node(node_id: str, reserve: int, gpus: list[tuple[int, int, int]]) -> dict[str, Any]:
    """A flat candidate: GPUs as (index, free MiB, holders)."""
    return {"node_id": node_id, "cluster_id": "c", "labels": {}, "cpu_free": 8.0, "ram_free_mb": 65536.0,
            "reserve_gpus": reserve, "gpus": [{"index": i, "uuid": f"{node_id}-{i}", "model": "A100", "free_mb": free,
                                               "allocated_mb": 0, "holders": n, "memory_mb": free} for i, free, n in gpus]}


def _request(gpus: int, priority: str = "normal") -> dict[str, Any]:
    return {"gpus": gpus, "gpu_memory_mb": None, "gpu_model": None, "cpu_cores": 1, "ram_mb": 0, "priority": priority}


def test_most_free_memory_leaves_a_nodes_reserved_gpus_to_critical_work() -> None:
    policy = BUILTINS["most_free_memory"]()
    big, small = _node("big", 1, [(0, 81920, 0)]), _node("small", 0, [(0, 16384, 0)])
    out = policy.eval({}, {"request": _request(1), "candidates": [big, small]}, {})
    assert out["node_id"] == "small"
    out = policy.eval({}, {"request": _request(1, "critical"), "candidates": [big, small]}, {})
    assert out["node_id"] == "big"
