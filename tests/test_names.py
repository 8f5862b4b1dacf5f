"""A request for a GPU model or a label no registered host has is refused at once, from the
count of the hosts' models and labels (keys.names), instead of after a walk to the scan cap."""

import json

import pytest

from allocator import InsufficientResources, invariants


def fleet(a, n: int = 4, model: str = "T4", cluster: str = "lab") -> None:
    for i in range(n):
        a.register_host(id=f"h{i}", labels={"cluster": cluster}, cpu_cores=4, ram_mb="16Gi",
                        gpus=[{"index": g, "model": model, "memory_mb": "16Gi"} for g in range(2)])


def refusal(a, resources: dict, **fields) -> InsufficientResources:
    with pytest.raises(InsufficientResources) as exc:
        a.allocate(resources, **fields)
    return exc.value


def summary_reads(a, resources: dict) -> int:
    """Host summaries read (GETs) while resources is refused: a walk reads the hosts it meets."""
    before = a.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0)
    refusal(a, resources)
    return a.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0) - before


def test_a_gpu_model_no_host_has_is_refused_at_once_naming_it(alloc_any):
    fleet(alloc_any)
    alloc_any.scan_cap = 2  # a walk would stop at the cap and say so
    e = refusal(alloc_any, {"gpus": 1, "gpu_model": "A10O|H200"})
    assert e.message == "no registered host has a GPU of model A10O or H200"
    assert e.details == {"unknown_gpu_models": ["A10O", "H200"]}


def test_a_selector_no_host_matches_is_refused_at_once_naming_the_label(alloc_any):
    fleet(alloc_any)
    alloc_any.scan_cap = 2
    e = refusal(alloc_any, {"gpus": 1}, selector="cluster=prod|edge")
    assert e.message == "no registered host has the label cluster=prod|edge"


def test_a_model_only_a_drained_host_has_is_refused_by_the_walk_not_as_absent(alloc_any):
    fleet(alloc_any)
    alloc_any.register_host(id="a100", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi"}])
    alloc_any.drain_host("a100")
    e = refusal(alloc_any, {"gpus": 1, "gpu_model": "A100"})
    assert "no registered host" not in e.message
    alloc_any.resume_host("a100")
    assert alloc_any.allocate({"gpus": 1, "gpu_model": "A100"}).host_id == "a100"


def test_the_count_follows_registrations_and_removals(alloc_any):
    fleet(alloc_any, n=2)
    alloc_any.register_host(id="h1", labels={"cluster": "gpu"}, cpu_cores=4, ram_mb="16Gi",
                            gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi"}])  # h1 changes
    assert alloc_any.allocate({"gpus": 1, "gpu_model": "A100"}, selector="cluster=gpu").host_id == "h1"
    assert alloc_any.allocate({"gpus": 1, "gpu_model": "T4"}, selector="cluster=lab").host_id == "h0"
    alloc_any.remove_host("h0", force=True)
    assert refusal(alloc_any, {"gpus": 1, "gpu_model": "T4"}).message == "no registered host has a GPU of model T4"
    assert alloc_any.redis.hgetall(alloc_any.keys.names) == {
        "hosts": "1", "mhosts": "1", "lhosts": "1", "m:A100": "1", "l:cluster=gpu": "1",
        "stamp": alloc_any.redis.hget(alloc_any.keys.seq, "cver")}  # the registration counter the sets follow
    assert alloc_any.redis.smembers(alloc_any.keys.model_hosts("A100")) == {"h1"}
    assert not alloc_any.redis.exists(alloc_any.keys.model_hosts("T4"))
    assert invariants.check(alloc_any.snapshot()) == []


def test_a_host_registered_before_the_count_existed_turns_the_quick_refusal_off_until_it_registers_again(alloc):
    fleet(alloc, n=2)
    # As a ledger written before the count: no count, no host marked.
    alloc.redis.delete(alloc.keys.names)
    for h in ("h0", "h1"):
        alloc.redis.hdel(alloc.keys.host(h), "named")
    alloc.scan_cap = 2
    assert "no registered host" not in refusal(alloc, {"gpus": 1, "gpu_model": "A100"}).message  # the walk's
    alloc.register_host(id="h0", labels={"cluster": "lab"}, cpu_cores=4, ram_mb="16Gi",
                        gpus=[{"index": 0, "model": "T4", "memory_mb": "16Gi"}])
    assert "no registered host" not in refusal(alloc, {"gpus": 1, "gpu_model": "A100"}).message  # h1 not counted yet
    alloc.register_host(id="h1", labels={"cluster": "lab"}, cpu_cores=4, ram_mb="16Gi",
                        gpus=[{"index": 0, "model": "T4", "memory_mb": "16Gi"}])
    assert refusal(alloc, {"gpus": 1, "gpu_model": "A100"}).message == "no registered host has a GPU of model A100"
    assert invariants.check(alloc.snapshot()) == []


def test_the_checker_reports_a_count_out_of_step_with_the_hosts(alloc):
    fleet(alloc, n=1)
    alloc.redis.hincrby(alloc.keys.names, "m:T4", 1)
    assert any("names count" in v for v in invariants.check(alloc.snapshot()))


def test_a_registration_heals_a_host_an_earlier_release_changed_after_it_was_counted(alloc):
    fleet(alloc, n=2)
    # What a release without the count does on a re-registration: new fields, the mark kept.
    alloc.redis.hset(alloc.keys.host("h1"), mapping={"labels": '{"cluster": "gpu"}', "g0:model": "A100", "g1:model": "A100"})
    assert any("not its own" in v for v in invariants.check(alloc.snapshot()))
    alloc.register_host(id="h1", labels={"cluster": "gpu"}, cpu_cores=4, ram_mb="16Gi",
                        gpus=[{"index": g, "model": "A100", "memory_mb": "16Gi"} for g in range(2)])
    assert invariants.check(alloc.snapshot()) == []
    assert alloc.allocate({"gpus": 1, "gpu_model": "A100"}, selector="cluster=gpu").host_id == "h1"


def test_recount_rebuilds_a_count_an_earlier_release_left_behind(alloc):
    fleet(alloc, n=2)
    # A release without the count removed h0 and registered h2: the count still has h0.
    alloc.redis.delete(alloc.keys.host("h0"))
    alloc.redis.zrem(alloc.keys.hosts, "h0")
    alloc.redis.hset(alloc.keys.host("h2"), mapping={"labels": '{"cluster": "edge"}', "ngpu": 1, "g0:model": "L4"})
    alloc.redis.zadd(alloc.keys.hosts, {"h2": 3})
    assert invariants.check(alloc.snapshot()) != []
    assert alloc.recount_names() == 2
    assert alloc.redis.hgetall(alloc.keys.names) == {"hosts": "2", "mhosts": "2", "lhosts": "2", "m:T4": "2", "m:L4": "1",
                                                     "l:cluster=lab": "1", "l:cluster=edge": "1",
                                                     "stamp": alloc.redis.hget(alloc.keys.seq, "cver")}
    assert alloc.redis.smembers(alloc.keys.model_hosts("T4")) == {"h1"}
    assert alloc.redis.smembers(alloc.keys.model_hosts("L4")) == {"h2"}
    assert not any("names" in v or "model host" in v for v in invariants.check(alloc.snapshot()))


# -- a model a few hosts have, none of which can take the request now ----------------------------

def a100_hosts(a, n: int = 2) -> None:
    for i in range(n):
        a.register_host(id=f"a{i}", cpu_cores=4, ram_mb="16Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi"}])


def test_a_model_whose_hosts_are_all_taken_is_refused_without_the_walk(alloc_any):
    fleet(alloc_any, n=33)  # 66 T4 GPUs ahead in the walk: more than the 64 the test needs
    a100_hosts(alloc_any)
    held = [alloc_any.allocate({"gpus": 1, "gpu_model": "A100"}).allocation_id for _ in range(2)]
    alloc_any.scan_cap = 2  # a walk would stop at the cap and say so
    e = refusal(alloc_any, {"gpus": 1, "gpu_memory_mb": "8Gi", "gpu_model": "A100"})
    assert e.message == "no host has 1 GPU(s) (8192 MiB free), 1 cores, 0 MiB RAM free at once on the requested GPU models"
    assert not (e.details or {}).get("scan_cap_reached")
    alloc_any.release(held[0])
    assert alloc_any.allocate({"gpus": 1, "gpu_memory_mb": "8Gi", "gpu_model": "A100"}).host_id == "a0"


def test_a_model_whose_hosts_are_drained_is_refused_without_the_walk(alloc_any):
    fleet(alloc_any, n=33)
    a100_hosts(alloc_any)
    for h in ("a0", "a1"):
        alloc_any.drain_host(h)
    alloc_any.scan_cap = 2
    e = refusal(alloc_any, {"gpus": 1, "gpu_model": "A100"})
    assert e.message == ("no host has 1 GPU(s) (whole), 1 cores, 0 MiB RAM free at once on the requested GPU models; "
                         "2 of 35 host(s) take no new work now (draining, lost, or no free core or RAM)")
    alloc_any.resume_host("a1")
    assert alloc_any.allocate({"gpus": 1, "gpu_model": "A100"}).host_id == "a1"


def test_a_task_waiting_for_a_taken_model_does_not_make_every_release_walk(alloc):
    fleet(alloc, n=33)
    a100_hosts(alloc, n=1)
    alloc.allocate({"gpus": 1, "gpu_model": "A100"})
    waiting = alloc.allocate({"gpus": 1, "gpu_model": "A100"}, on_busy="queue").allocation_id
    lease = alloc.allocate({"gpus": 1, "gpu_model": "T4"}).allocation_id
    alloc.scan_cap = 2
    calls = []
    alloc.redis.config_resetstat()
    alloc.release(lease)  # its pass tries the waiting task first
    stats = alloc.redis.info("commandstats")
    calls = {k: v["calls"] for k, v in stats.items() if k in ("cmdstat_zrangebyscore", "cmdstat_zrange", "cmdstat_get")}
    assert calls.get("cmdstat_get", 0) == 0  # no host summary read: no walk over the T4 GPUs
    assert alloc.get(waiting).state == "pending"


def test_the_quick_test_stays_off_while_a_host_is_not_in_the_model_sets(alloc):
    fleet(alloc, n=33)
    a100_hosts(alloc)
    for h in ("a0", "a1"):
        alloc.drain_host(h)
    # As a ledger written before the model sets: a1 counted, but in no set and not marked.
    alloc.redis.srem(alloc.keys.model_hosts("A100"), "a1")
    alloc.redis.hdel(alloc.keys.host("a1"), "mhosts")
    alloc.redis.hincrby(alloc.keys.names, "mhosts", -1)
    alloc.scan_cap = 2
    assert summary_reads(alloc, {"gpus": 1, "gpu_model": "A100"}) == 32  # the walk's: T4 hosts up to its bound
    alloc.resume_host("a1")
    assert alloc.allocate({"gpus": 1, "gpu_model": "A100"}).host_id == "a1"
    assert alloc.recount_names() == 35
    assert alloc.redis.smembers(alloc.keys.model_hosts("A100")) == {"a0", "a1"}
    assert invariants.check(alloc.snapshot()) == []


def test_the_checker_reports_a_host_missing_from_its_models_set(alloc):
    fleet(alloc, n=2)
    alloc.redis.srem(alloc.keys.model_hosts("T4"), "h1")
    assert any("model host sets" in v for v in invariants.check(alloc.snapshot()))


def test_a_model_more_than_64_hosts_have_is_left_to_the_walk(alloc):
    for i in range(65):
        alloc.register_host(id=f"a{i:02d}", cpu_cores=1, ram_mb="1Gi", gpus=[{"index": 0, "model": "A100", "memory_mb": "40Gi"}])
        alloc.drain_host(f"a{i:02d}")
    fleet(alloc, n=2)
    alloc.scan_cap = 2
    assert summary_reads(alloc, {"gpus": 1, "gpu_model": "A100"}) == 2  # the walk's: the T4 hosts, not the 65


def test_on_a_fleet_whose_walk_is_short_the_walk_refuses(alloc):
    fleet(alloc, n=6)  # 12 GPUs in the walk: fewer to read than the hosts of the model
    a100_hosts(alloc)
    for h in ("a0", "a1"):
        alloc.drain_host(h)
    alloc.scan_cap = 2
    assert summary_reads(alloc, {"gpus": 1, "gpu_model": "A100"}) == 6  # the walk's: the T4 hosts, not the model's


def test_a_label_no_host_has_is_named_before_the_model_test(alloc):
    fleet(alloc, n=33)
    a100_hosts(alloc)
    e = refusal(alloc, {"gpus": 1, "gpu_model": "A100"}, selector="zone=a")
    assert e.message == "no registered host has the label zone=a"


def test_recount_rebuilds_a_models_set_the_count_no_longer_names(alloc):
    fleet(alloc, n=2)
    alloc.redis.hdel(alloc.keys.names, "m:T4")  # a count out of step: the model's set stays
    alloc.redis.sadd(alloc.keys.model_hosts("T4"), "gone-host")
    assert alloc.recount_names() == 2
    assert alloc.redis.smembers(alloc.keys.model_hosts("T4")) == {"h0", "h1"}
    assert invariants.check(alloc.snapshot()) == []


def test_thousands_of_model_names_in_the_script_request_are_refused_by_name_not_by_a_script_error(alloc):
    # The models accept a few hundred names; the script itself must not fail on more (Lua's
    # unpack stops at about 8,000 values), or a request in line would make every pass fail.
    fleet(alloc)
    payload, request, metadata = alloc.place_args(alloc.build_request({"gpus": 1, "gpu_model": "T4"}), "many-models")
    data = json.loads(payload)
    data["models"] = {f"X{i:05d}": True for i in range(9000)}
    reply = alloc._call("place", json.dumps(data), request, metadata)
    assert reply["ok"] is False and reply["code"] == "NO_FIT"
    assert reply["details"]["unknown_gpu_models"][:2] == ["X00000", "X00001"]
