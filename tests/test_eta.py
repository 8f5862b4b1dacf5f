"""Estimated start times (allocator/eta.py) on small scenarios whose answers can be worked out by
hand, and a check that the engine's simulation matches what the real ledger then does."""

import copy
import heapq
import json
import random
import threading
from datetime import datetime, timezone

import pytest

from allocator import Allocator
from allocator.api.placing import submit_to_line
from allocator.eta import RESERVE_LIMIT, EtaEngine, Simulation, read_snapshot
from allocator.worker_cli import run_scheduler

T0 = 1_800_000_000.0  # the FakeClock's start (tests/conftest.py)
WHOLE = {"gpus": 1, "cpu_cores": 1}


def at(seconds: float) -> datetime:
    """T0 + seconds, as the estimates are returned."""
    return datetime.fromtimestamp(T0 + seconds, tz=timezone.utc)


def gpu_host(a, host_id="h1", n=1, mem="16Gi", model="GPU", **kw):
    a.register_host(id=host_id, cpu_cores=16, ram_mb="64Gi",
                    gpus=[{"index": i, "memory_mb": mem, "model": model} for i in range(n)], **kw)


def queued(a, resources=WHOLE, **kw):
    x = a.allocate(resources, on_busy="queue", **kw)
    assert x.state == "pending"
    return x.allocation_id


def eta(a, task_id):
    return a.estimated_start_time(task_id)


def test_a_waiting_task_starts_when_the_holder_is_expected_to_end(alloc):
    gpu_host(alloc)
    holder = alloc.allocate(WHOLE, expected_duration=100)
    first = queued(alloc, expected_duration=50)
    second = queued(alloc, expected_duration=50)
    assert eta(alloc, holder.allocation_id) == at(0)  # running: its activation
    assert eta(alloc, first) == at(100)
    assert eta(alloc, second) == at(150)  # after first's 50 s
    assert alloc.estimated_start_times() == {first: at(100), second: at(150)}
    assert alloc.task(second).estimated_start_time == at(150)


def test_history_estimate_outranks_the_hint(alloc):
    alloc.redis.hset(alloc.keys.durations, "train", json.dumps({"p50_ms": 30000, "p80_ms": 45000, "mean_ms": 40000, "n": 9}))
    gpu_host(alloc, "h1")
    gpu_host(alloc, "h2")
    alloc.allocate(WHOLE, task_type="train", expected_duration=1000, selector="host=h1")
    alloc.allocate(WHOLE, task_type="new", ttl_seconds=600, selector="host=h2")
    on_h1 = queued(alloc, selector="host=h1")
    on_h2 = queued(alloc, selector="host=h2")
    assert eta(alloc, on_h1) == at(30)  # history p50 of "train", not the 1000 s hint
    assert EtaEngine(alloc, stat="p80").compute_one(on_h1) == (T0 + 45) * 1000
    # A type with no history and no hint: the estimate over all types (30 s), within its TTL.
    assert eta(alloc, on_h2) == at(30)
    assert EtaEngine(alloc, use_prior=False).compute_one(on_h2) == (T0 + 600) * 1000


def test_with_no_history_and_no_hint_the_ttl_is_the_last_resort(alloc):
    gpu_host(alloc)
    alloc.allocate(WHOLE, ttl_seconds=600)
    assert eta(alloc, queued(alloc)) == at(600)


def test_the_prior_over_all_types_is_their_n_weighted_median(alloc):
    alloc.redis.hset(alloc.keys.durations, mapping={
        "a": json.dumps({"p50_ms": 10000, "n": 1}), "b": json.dumps({"p50_ms": 50000, "n": 5}),
        "c": json.dumps({"p50_ms": 900000, "n": 3})})
    gpu_host(alloc)
    alloc.allocate(WHOLE, ttl_seconds=None, task_type="unseen")
    assert eta(alloc, queued(alloc)) == at(50)


@pytest.fixture(autouse=True)
def _host_label(monkeypatch):
    """Hosts get a label host=<id> so tests can pin requests with a selector."""
    real = Allocator.register_host

    def register(self, host=None, **fields):
        spec = dict(host or fields)
        spec.setdefault("labels", {})["host"] = spec["id"]
        return real(self, spec)

    monkeypatch.setattr(Allocator, "register_host", register)


def test_an_allocation_past_its_expected_end_is_assumed_to_overrun_as_long_again(alloc, clock):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    clock.advance(150)  # 50 s late
    waiting = queued(alloc)
    assert eta(alloc, waiting) == at(200)


def test_higher_priority_goes_first_whatever_the_arrival(alloc):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    normal = queued(alloc, expected_duration=50)
    high = queued(alloc, priority="high", expected_duration=50)
    assert (eta(alloc, high), eta(alloc, normal)) == (at(100), at(150))


def test_gpu_memory_is_shared_whole_gpus_are_not(alloc):
    gpu_host(alloc)
    alloc.allocate({"gpu_memory_mb": "12Gi"}, expected_duration=100)
    a = queued(alloc, {"gpu_memory_mb": "8Gi"}, expected_duration=100)
    b = queued(alloc, {"gpu_memory_mb": "8Gi"}, expected_duration=100)
    whole = queued(alloc, WHOLE, expected_duration=10)
    assert (eta(alloc, a), eta(alloc, b)) == (at(100), at(100))  # both fit in 16 GiB together
    assert eta(alloc, whole) == at(200)  # needs the GPU with no holder


def test_easy_backfill_lets_short_tasks_ahead_but_never_delays_the_reservation(alloc):
    gpu_host(alloc, n=2)
    alloc.allocate(WHOLE, expected_duration=100)
    alloc.allocate(WHOLE, expected_duration=300)
    big = queued(alloc, {"gpus": 2, "cpu_cores": 2}, priority="high", expected_duration=200)
    short = queued(alloc, expected_duration=150)  # 100 + 150 <= 300: backfills at 100
    long = queued(alloc, expected_duration=1000)  # would delay big: waits until big is done
    assert (eta(alloc, big), eta(alloc, short), eta(alloc, long)) == (at(300), at(100), at(500))


def test_gpu_models_and_selectors_are_respected(alloc):
    gpu_host(alloc, "fast", model="A100", mem="40Gi")
    gpu_host(alloc, "slow", model="T4")
    alloc.allocate(WHOLE, expected_duration=500, selector="host=fast")
    alloc.allocate(WHOLE, expected_duration=100, selector="host=slow")
    needs_a100 = queued(alloc, {"gpus": 1, "gpu_model": "A100"})
    anything = queued(alloc, WHOLE)
    pinned = queued(alloc, WHOLE, selector="host=fast", priority="low")
    # The T4 frees first, but the A100 task holds out for the A100; the next one takes the T4.
    assert (eta(alloc, needs_a100), eta(alloc, anything)) == (at(500), at(100))
    assert eta(alloc, pinned) == at(500 + 3600)  # after needs_a100's TTL (1 h, no hint)


def test_the_critical_reserve_is_kept_idle_for_critical_work(alloc):
    gpu_host(alloc, n=2, reserve_gpus=1)
    alloc.allocate(WHOLE, expected_duration=100)
    normal = queued(alloc, WHOLE, expected_duration=10)
    assert eta(alloc, normal) == at(100)  # GPU 1 is idle but reserved
    crit = alloc.allocate(WHOLE, on_busy="queue", priority="critical")
    assert crit.state == "active" and eta(alloc, crit.allocation_id) == at(0)


def test_pass_depth_one_is_strict_fifo_with_head_of_line_blocking(alloc, clock):
    fifo = Allocator(client=alloc.redis, namespace=alloc.keys.namespace, clock=clock, pass_depth=1)
    gpu_host(fifo, n=2)
    fifo.allocate(WHOLE, expected_duration=100)
    big = queued(fifo, {"gpus": 2, "cpu_cores": 2}, expected_duration=50)
    small = fifo.allocate(WHOLE, on_busy="queue", expected_duration=10)
    assert small.state == "pending"  # a GPU is free, but the head of the line is blocked
    assert (eta(fifo, big), eta(fifo, small.allocation_id)) == (at(100), at(150))
    # A pass with the default depth lets the small task backfill at once (it ends before the head
    # can start), which pass depth 1 never does.
    assert fifo.schedule() == []
    assert alloc.schedule() == [small.allocation_id]


def test_the_simulation_preempts_like_the_priority_strategy(alloc, clock):
    gpu_host(alloc, n=2)
    high = alloc.allocate(WHOLE, priority="high", expected_duration=100)
    low = alloc.allocate(WHOLE, priority="low", expected_duration=1000)
    urgent = queued(alloc, {"gpus": 2, "cpu_cores": 2}, priority="high", strategy="priority")
    # Preempting the low task alone is not enough now; once the high one ends, it is.
    assert eta(alloc, urgent) == at(100)
    clock.advance(100)
    alloc.release(high.allocation_id)
    assert alloc.get(urgent).activated_at == at(100)
    assert alloc.get(low.allocation_id).release_reason == "preempted"


def test_the_simulation_preempts_nothing_for_a_request_the_critical_reserve_refuses(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", reserve_gpus=1,
                        gpus=[{"index": 0, "memory_mb": "16Gi"}, {"index": 1, "memory_mb": "16Gi"}])
    low = alloc.allocate(WHOLE, priority="low", expected_duration=1000)
    urgent = queued(alloc, {"gpus": 2, "cpu_cores": 2}, priority="high", strategy="priority")
    # Preemption cannot help (one of the two GPUs is the reserve), nor can the low task's end.
    assert eta(alloc, urgent) is None
    assert alloc.get(low.allocation_id).state == "active"


def test_the_simulation_preempts_nothing_on_a_host_whose_ram_shrank_below_what_is_granted(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="32Gi")
    low = alloc.allocate({"cpu_cores": 1, "ram_mb": "16Gi"}, priority="low", expected_duration=1000)
    alloc.allocate({"cpu_cores": 1, "ram_mb": "16Gi"}, priority="critical", expected_duration=2000)
    alloc.register_host(id="h1", cpu_cores=4, ram_mb="24Gi")  # 32 GiB granted on 24
    urgent = queued(alloc, {"cpu_cores": 1, "ram_mb": "16Gi"}, priority="critical", strategy="priority")
    small = queued(alloc, {"cpu_cores": 1, "ram_mb": "8Gi"}, expected_duration=10)
    # Ending the low task would leave 8 GiB: no preemption; the task starts when the critical
    # one ends as well, and the small one fits in what the low one leaves at its end.
    assert alloc.get(low.allocation_id).state == "active"
    assert eta(alloc, urgent) == at(2000)
    assert eta(alloc, small) == at(1000)


def test_the_simulation_counts_only_the_cores_a_release_gives_back(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=[0, 1, 2, 3], ram_mb="32Gi")
    alloc.allocate({"cpu_cores": 2}, priority="low", expected_duration=1000)  # cores 0 and 1
    alloc.allocate({"cpu_cores": 2}, priority="critical", expected_duration=2000)  # cores 2 and 3
    alloc.register_host(id="h1", cpu_cores=[2, 3], ram_mb="32Gi")  # 0 and 1 are gone
    urgent = queued(alloc, {"cpu_cores": 2}, priority="critical", strategy="priority")
    # Neither preempting the low task nor its end frees a listed core: only the critical one's end.
    assert eta(alloc, urgent) == at(2000)


def test_a_lease_is_expected_to_end_by_its_ttl_when_its_hint_is_longer(alloc, clock):
    gpu_host(alloc, n=2)
    alloc.allocate(WHOLE, ttl_seconds=60, expected_duration=1000)  # reaped at 60 at the latest
    head = queued(alloc, {"gpus": 2, "cpu_cores": 1}, priority="high", ttl_seconds=None, expected_duration=100)
    long = queued(alloc, WHOLE, priority="low", ttl_seconds=None, expected_duration=500)
    # The head's reservation is at 60: a 500 s task on the free GPU would delay it, so it waits.
    assert alloc.get(long).state == "pending"
    assert eta(alloc, head) == at(60)
    assert eta(alloc, long) == at(160)


@pytest.mark.parametrize("pinned_to, starts", [("h1", 160), ("h2", 60)])
def test_leases_due_at_the_same_instant_end_together_before_one_pass(alloc, clock, pinned_to, starts):
    for h in ("h1", "h2"):
        gpu_host(alloc, h, labels={"host": h})
    alloc.allocate(WHOLE, ttl_seconds=60, selector="host=h2")  # both end by their TTL at 60
    alloc.allocate(WHOLE, ttl_seconds=60, selector="host=h1")
    first = queued(alloc, WHOLE, ttl_seconds=None, expected_duration=100)
    pinned = queued(alloc, WHOLE, ttl_seconds=None, expected_duration=100, selector=f"host={pinned_to}")
    # The reaper frees both GPUs before its pass: the first task takes h1 (the first host), and
    # the pinned one starts at once on h2 or waits for h1.
    assert (eta(alloc, first), eta(alloc, pinned)) == (at(60), at(starts))
    clock.advance(60)
    alloc.expire()
    assert alloc.get(first).activated_at == at(60)
    assert (alloc.get(pinned).state == "active") == (starts == 60)


def test_leases_due_together_end_together_when_a_hinted_end_falls_at_the_same_instant(alloc, clock):
    gpu_host(alloc, "h1", mem="24Gi", labels={"host": "h1"})
    for h in ("h2", "h3"):
        gpu_host(alloc, h, labels={"host": h})
    # Ended in this order by the simulation's heap: L1 and L2 by their TTL, X by its hint, at 60.
    alloc.allocate(WHOLE, selector="host=h1", ttl_seconds=60, priority="low")
    x = alloc.allocate(WHOLE, selector="host=h3", expected_duration=60, ttl_seconds=None)
    alloc.allocate(WHOLE, selector="host=h2", ttl_seconds=60, priority="high")
    share = queued(alloc, {"gpus": 1, "gpu_memory_mb": "8Gi", "cpu_cores": 1}, expected_duration=100, ttl_seconds=None)
    pinned = queued(alloc, WHOLE, selector="host=h1", expected_duration=100, ttl_seconds=None)
    # The reaper frees h1 and h2 in one call: the share packs onto h2, leaving h1 to the pinned task.
    assert (eta(alloc, share), eta(alloc, pinned)) == (at(60), at(60))
    clock.advance(60)
    alloc.expire()
    alloc.release(x.allocation_id)
    assert [alloc.get(t).activated_at for t in (share, pinned)] == [at(60), at(60)]


def test_no_estimate_for_unknown_cancelled_or_unplaceable_tasks(alloc):
    gpu_host(alloc)
    alloc.allocate(WHOLE, ttl_seconds=None)  # no hint, no TTL, no history: no expected end
    assert eta(alloc, "nope") is None
    stuck = queued(alloc)
    assert eta(alloc, stuck) is None
    too_big = queued(alloc, {"gpus": 4})
    assert eta(alloc, too_big) is None
    alloc.cancel(stuck)
    assert eta(alloc, stuck) is None


def test_the_scheduler_tick_caches_estimates_and_readers_use_them_while_fresh(alloc, clock):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    waiting = queued(alloc)
    run_scheduler(alloc, 1.0, threading.Event(), once=True, grace_s=None)
    cache = alloc.redis.hgetall(alloc.keys.eta)
    assert cache[waiting] == str(int((T0 + 100) * 1000)) and cache["_at"] == str(int(T0 * 1000))
    assert float(cache["_cost_ms"]) >= 0 and cache["_pending"] == "1"
    # Readers take the cached value while it is fresh (proved by planting a different one) ...
    alloc.redis.hset(alloc.keys.eta, waiting, str(int((T0 + 42) * 1000)))
    assert eta(alloc, waiting) == at(42)
    assert alloc.estimated_start_times() == {waiting: at(42)}
    # ... and compute it again once it is older than the engine's max age (5 s).
    clock.advance(6)
    assert eta(alloc, waiting) == at(100)


def test_estimated_start_is_the_activation_once_placed(alloc, clock):
    gpu_host(alloc)
    holder = alloc.allocate(WHOLE, expected_duration=100)
    waiting = queued(alloc)
    clock.advance(80)  # ends early
    alloc.release(holder.allocation_id)
    assert eta(alloc, waiting) == at(80)
    assert eta(alloc, holder.allocation_id) == at(0)


# -- the simulation mirrors the ledger ------------------------------------------------------------

def _random_scenario(a, rng, hosts=5, tasks=40, gpu_counts=(1, 2, 4),
                     strategies=("best_fit", "first_fit", "worst_fit", "priority"), zones=("x", "y")):
    models = ["A", "B"]
    for i in range(hosts):
        n = rng.choice(gpu_counts)
        a.register_host(id=f"h{i}", cpu_cores=rng.choice([4, 8, 16]), ram_mb=rng.choice([16384, 65536]),
                        labels={"zone": rng.choice(zones)}, worker_slots=rng.choice([None, 3, 6]),
                        gpus=[{"index": g, "memory_mb": rng.choice([16384, 24576]), "model": models[i % 2]}
                              for g in range(n)])
    hints: dict[str, int] = {}
    for j in range(tasks):
        kind = rng.random()
        if kind < 0.45:
            res = {"gpus": 1, "gpu_memory_mb": rng.choice([4096, 8192, 12288]), "cpu_cores": rng.choice([0.5, 1, 2])}
        elif kind < 0.8:
            res = {"gpus": rng.choice([1, 1, 2, 4]), "cpu_cores": rng.choice([1, 2, 3])}
        else:
            res = {"gpus": 0, "cpu_cores": rng.choice([1, 2.5, 4]), "ram_mb": rng.choice([1024, 8192])}
        if res["gpus"] and rng.random() < 0.2:
            res["gpu_model"] = rng.choice(models)
        res.setdefault("ram_mb", rng.choice([0, 2048, 8192]))
        if rng.random() < 0.3:
            res["workers"] = rng.choice([1, 2])
        hint_ms = rng.randint(5_000, 400_000) * 10 + j % 10  # distinct ends, almost surely
        fields = dict(expected_duration=hint_ms / 1000, ttl_seconds=None, priority=rng.choice(["low", "normal", "high"]),
                      strategy=rng.choice(strategies),
                      selector=("zone=x" if rng.random() < 0.15 else None), allocation_id=f"t{j:02d}")
        if rng.random() < 0.1:  # pinned to one host, as the API's policies submit
            submit_to_line(a, a.build_request(res, **fields), fields["allocation_id"], only=f"h{rng.randrange(hosts)}")
        else:
            a.allocate(res, on_busy="queue", **fields)
        hints[fields["allocation_id"]] = int(hint_ms / 1000 * 1000)  # what the client sends, truncated to ms
    return hints


@pytest.mark.parametrize("fleet", ["small", "wide"])
@pytest.mark.parametrize("scan_cap", [2048, 3])
@pytest.mark.parametrize("seed", range(1, 7))
def test_simulated_starts_are_what_the_ledger_does_when_durations_are_exact(alloc, clock, seed, scan_cap, fleet):
    _replay(alloc, clock, seed, scan_cap, fleet)


@pytest.mark.parametrize("sets", ["in step", "out of step"])
@pytest.mark.parametrize("scan_cap", [2048, 3])
@pytest.mark.parametrize("seed", range(1, 4))
def test_simulated_starts_match_walks_that_pass_over_many_hosts_a_selector_or_model_rules_out(alloc, clock, seed,
                                                                                              scan_cap, sets):
    # 70 hosts, zone=x on about one in eight, the host sets in step or not (the snapshot reads
    # which): walks for zone=x or a model pass over many hosts. (Each request's walk, list and
    # bound included, is compared with the ledger's in tests/test_screened_walk.py.)
    _replay(alloc, clock, seed, scan_cap, "many", break_sets=sets == "out of step")


def _replay(alloc, clock, seed, scan_cap, fleet, break_sets=False):
    # scan_cap 3: the bounded walk stops early (first fit falls back to best fit, refusals say
    # "stopped after"), which the simulation must reproduce too. "wide": more hosts than best
    # fit's window of fitting hosts, with up to 8 GPUs, so the comparison of candidates
    # (stranded capacity, idle GPUs broken up) and the walk by idle GPU count decide. Not with
    # preemption and a scan cap of 3 together: there a preemption can free a host the bounded walk
    # then does not reach, so each further pass preempts again without placing anything, and this
    # playback runs one pass more per release than the simulation assumes.
    alloc = Allocator(client=alloc.redis, namespace=alloc.keys.namespace, clock=clock, scan_cap=scan_cap)
    rng = random.Random(seed)
    if fleet == "small":
        hints = _random_scenario(alloc, rng)
    elif fleet == "wide":
        strategies = ("best_fit", "first_fit", "worst_fit") + (("priority",) if scan_cap > 100 else ())
        hints = _random_scenario(alloc, rng, hosts=14, tasks=70, gpu_counts=(1, 2, 4, 8), strategies=strategies)
    else:
        strategies = ("best_fit", "first_fit", "worst_fit") + (("priority",) if scan_cap > 100 else ())
        hints = _random_scenario(alloc, rng, hosts=70, tasks=70, gpu_counts=(1, 2, 4, 8), strategies=strategies,
                                 zones=("x",) + ("y",) * 7)
        if break_sets:
            alloc.redis.hset(alloc.keys.names, "stamp", "out of step")  # as after a rollback's registration
    while alloc.schedule():
        pass
    predicted = alloc.estimated_start_times()
    assert predicted, "the scenario should leave tasks waiting"
    # Play it forward: every allocation ends exactly at activation + hint; after each release
    # the scheduler runs until it places nothing more (as the tick would).
    import heapq

    started: dict[str, int] = {}
    ends: list[tuple[int, str]] = []

    def collect():
        for tid in hints:
            if tid not in started:
                rec = alloc.get(tid)
                if rec.state == "active":
                    started[tid] = round(rec.activated_at.timestamp() * 1000)
                    heapq.heappush(ends, (started[tid] + hints[tid], tid))

    collect()
    while ends:
        t, tid = heapq.heappop(ends)
        clock.now = (t + 0.25) / 1000  # the allocator truncates clock() * 1000 to whole ms
        alloc.release(tid)
        while alloc.schedule():
            pass
        collect()
    actual = {tid: (None if tid not in started else at((started[tid] - T0 * 1000) / 1000)) for tid in predicted}
    assert actual == predicted


def _busy_line(a, rng, hosts=8, small=120, large=120):
    """A line that no policy pins and with no task that may preempt: small one-core tasks ahead
    (they fill the hosts' cores), larger ones behind. When a small task ends, its host still lacks
    the cores of every waiting task, and the pass after it provably places nothing."""
    for i in range(hosts):
        a.register_host(id=f"h{i}", cpu_cores=rng.choice([8, 16]), ram_mb=rng.choice([65536, 131072]),
                        gpus=[{"index": g, "memory_mb": 24576} for g in range(rng.choice([2, 4, 8]))])
    for j in range(small + large):
        if j < small:
            res = {"cpu_cores": 1, "ram_mb": 2048, "gpus": rng.choice([0, 1])}
            if res["gpus"]:
                res["gpu_memory_mb"] = 4096
            priority = "high"
        else:
            res = rng.choice([{"gpus": 1, "gpu_memory_mb": rng.choice([4096, 12288])},
                              {"gpus": rng.choice([1, 2, 4])}, {"gpus": 0, "ram_mb": 4096}])
            res["cpu_cores"] = rng.choice([2, 4, 6])
            res.setdefault("ram_mb", rng.choice([2048, 16384]))
            priority = rng.choice(["low", "normal"])
        a.allocate(res, on_busy="queue", expected_duration=rng.randint(5_000, 400_000) / 100 + j / 1000,
                   ttl_seconds=None, priority=priority, strategy=rng.choice(["best_fit", "first_fit", "worst_fit"]),
                   allocation_id=f"t{j:03d}")


@pytest.mark.parametrize("line", ["mixed", "busy"])
@pytest.mark.parametrize("scan_cap", [2048, 3])
@pytest.mark.parametrize("seed", range(1, 4))
def test_the_simulations_shortcuts_agree_with_the_work_they_skip(alloc, clock, seed, scan_cap, line):
    # The simulation skips work it can prove unneeded: the reservation is kept per request shape
    # and host instead of walking `ends`, a shape known to fit nowhere is not walked, and a pass
    # known to place nothing is not run. Each shortcut is checked here against the work it
    # stands for, on a line long enough to keep tasks waiting through many releases.
    alloc = Allocator(client=alloc.redis, namespace=alloc.keys.namespace, clock=clock, scan_cap=scan_cap)
    if line == "mixed":  # pinned tasks, preemption: no pass is skipped there
        _random_scenario(alloc, random.Random(seed), hosts=10, tasks=160, gpu_counts=(1, 2, 4, 8))
    else:
        _busy_line(alloc, random.Random(seed))
    while alloc.schedule():
        pass
    checked = {"reserve": 0, "nowhere": 0, "quiet": 0}

    class Checked(Simulation):
        def _reserve(self, req, now):
            r = super()._reserve(req, now)
            walk = self._first_fit_after(req, iter(self.ends), RESERVE_LIMIT)
            assert r == (None if walk is None else (walk[0], max(walk[2], now)))
            checked["reserve"] += 1
            return r

        def _fits_nowhere(self, req, exclude=None):
            r = super()._fits_nowhere(req, exclude)
            if r:
                found, capped = self._scan(req, req.mode, exclude, None)
                if found is None and req.mode == "first" and capped:
                    found, _ = self._scan(req, "best", exclude, None)
                assert found is None
                if exclude is None and req.pin is None and req.cpu_millis > 0 and req.ram > 0:
                    # what the pass relies on to skip such a task: no single host takes it either
                    assert all(self._scan(req, req.mode, None, h)[0] is None for h in self.hosts)
                checked["nowhere"] += 1
            return r

        def _still_quiet(self, al):
            r = super()._still_quiet(al)
            if r:  # the pass it saves, run on a copy, places nothing
                assert copy.deepcopy(self)._pass(int(al.release)) == 0
                checked["quiet"] += 1
            return r

    snap = read_snapshot(alloc)
    starts = Checked(snap).run()
    assert starts == Simulation(snap).run()
    assert checked["reserve"] and checked["nowhere"] and (checked["quiet"] or line == "mixed")


def _delay(a, tid: str, not_before_ms: int) -> None:
    """What finish_job writes for a retry with an interval (see K_DELAYED in lua/includes/queue.lua)."""
    a.redis.hset(a.keys.task(tid), "not_before", not_before_ms)
    a.redis.hset(a.keys.alloc(tid), "not_before", not_before_ms)
    a.redis.zadd(a.keys.delayed, {tid: not_before_ms})


@pytest.mark.parametrize("ties", [True, False], ids=["shared-times", "distinct-times"])
@pytest.mark.parametrize("seed", range(1, 16))
def test_estimates_with_retry_intervals_are_what_the_ledger_then_does(alloc, clock, seed, ties):
    # Random fleet and line; most waiting tasks then wait out a retry interval (several ending at
    # the same moment, or each at its own), and the ledger is played: each release at its
    # expected end and a pass (the scheduler's tick) when an interval ends.
    a = alloc
    rng = random.Random(seed)
    hints = _random_scenario(a, rng)
    while a.schedule():
        pass
    now_ms = int(clock.now * 1000)
    events = []
    for tid in a.redis.zrange(a.keys.pending, 0, -1):
        if rng.random() < 0.7:
            nb = now_ms + (rng.choice([5_000, 5_000, 200_000]) if ties else rng.randint(1, 2_000_000))
            _delay(a, tid, nb)
            events.append((nb, 1, tid))
    while a.schedule():  # as finish_job's own pass after a requeue: others may start meanwhile
        pass
    predicted = a.estimated_start_times()
    started: dict[str, int] = {}

    def collect() -> None:
        for tid in hints:
            rec = a.get(tid)
            if tid not in started and rec.state == "active":
                started[tid] = round(rec.activated_at.timestamp() * 1000)
                heapq.heappush(events, (started[tid] + hints[tid], 0, tid))

    heapq.heapify(events)
    collect()
    while events:
        t, kind, tid = heapq.heappop(events)
        clock.now = (t + 0.25) / 1000
        if kind == 0:
            a.release(tid)
        while a.schedule():
            pass
        collect()
    actual = {tid: at((started[tid] - T0 * 1000) / 1000) if tid in started else None for tid in predicted}
    assert {t: (predicted[t], actual[t]) for t in predicted if predicted[t] != actual[t]} == {}


def test_a_cache_whose_computation_took_long_stays_fresh_until_the_next_one_lands(alloc, clock):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    waiting = queued(alloc)
    run_scheduler(alloc, 1.0, threading.Event(), once=True, grace_s=None)
    # A tick that took 3 s refreshes every 6 s and lands 3 s later: up to 9 s old, still read.
    alloc.redis.hset(alloc.keys.eta, mapping={"_cost_ms": "3000", waiting: str(int((T0 + 42) * 1000))})
    clock.advance(9)
    assert eta(alloc, waiting) == at(42)
    clock.advance(2)  # older than 3 x its cost and a second: computed again
    assert eta(alloc, waiting) == at(100)


def test_cached_estimates_list_only_what_waits_now(alloc, clock):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    first = queued(alloc)
    run_scheduler(alloc, 1.0, threading.Event(), once=True, grace_s=None)
    alloc.cancel(first)
    later = queued(alloc)  # queued since the tick
    assert alloc.estimated_start_times() == {later: at(100)}


def test_a_refresh_from_an_older_snapshot_does_not_replace_a_newer_cache(alloc, clock):
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=100)
    waiting = queued(alloc)
    alloc.redis.hset(alloc.keys.eta, mapping={"_at": str(int((T0 + 1) * 1000)), waiting: "123"})  # a faster replica
    alloc.refresh_estimated_start_times()  # this one's snapshot is at T0
    assert alloc.redis.hget(alloc.keys.eta, waiting) == "123"


def _tick(a, clock, seconds: float, *release: str) -> None:
    """Moves the clock to T0 + seconds, releases what ends then, and runs passes as the tick does."""
    clock.now = T0 + seconds
    for r in release:
        a.release(r)
    while a.schedule():
        pass


def test_a_running_job_the_simulation_preempts_goes_back_in_line_ahead_of_later_tasks(alloc, clock):
    from . import jobs

    gpu_host(alloc, n=2)
    alloc.allocate(WHOLE, priority="high", expected_duration=100, allocation_id="H")
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, priority="low", expected_duration=1000)
    queued(alloc, {"gpus": 2, "cpu_cores": 2}, priority="high", strategy="priority", expected_duration=200,
           allocation_id="P")
    queued(alloc, {"gpus": 2, "cpu_cores": 2}, priority="low", expected_duration=50, allocation_id="L")
    # At 100 P preempts the job, which goes back to the front of its priority: it runs again from
    # 300 to 1300, before L, which needs both GPUs.
    assert eta(alloc, "L") == at(1300)
    _tick(alloc, clock, 100, "H")
    _tick(alloc, clock, 300, "P")
    _tick(alloc, clock, 1300, job.id)
    assert alloc.get("L").activated_at == at(1300)


def test_a_job_the_simulation_preempts_is_placed_before_later_tasks_of_the_same_pass(alloc, clock):
    from . import jobs

    cpu2 = {"cpu_cores": 2, "ram_mb": "1Gi"}
    alloc.register_host(id="h0", cpu_cores=3, ram_mb="4Gi", gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="4Gi")
    job = alloc.enqueue(jobs.add, 1, 2, resources=cpu2, priority="normal", strategy="first_fit",
                        expected_duration=500)
    alloc.allocate({"gpus": 1, "cpu_cores": 1}, priority="critical", allocation_id="X", ttl_seconds=100)
    alloc.allocate(cpu2, allocation_id="B", ttl_seconds=100)
    queued(alloc, {"gpus": 1, "cpu_cores": 2}, priority="critical", strategy="priority", expected_duration=1000,
           allocation_id="C")
    queued(alloc, cpu2, priority="low", expected_duration=10, allocation_id="L2")
    # At 100 the reaper frees X and B in one pass: C preempts the job, which goes back in line
    # ahead of L2 and runs on h1 from 100 to 600; then L2 has h1.
    assert eta(alloc, "L2") == at(600)
    clock.now = T0 + 100
    alloc.expire()
    while alloc.schedule():
        pass
    assert (alloc.get(job.id).host_id, alloc.get("L2").state) == ("h1", "pending")
    _tick(alloc, clock, 600, job.id)
    assert alloc.get("L2").activated_at == at(600)


def test_a_preempted_run_being_stopped_is_in_line_for_the_estimates(alloc, clock):
    from allocator.agent.fencing import claim_grant

    from . import jobs

    gpu_host(alloc, n=2)
    alloc.allocate(WHOLE, priority="low", expected_duration=100, allocation_id="A")
    clock.advance(1)  # the job is newer: preemption ends it rather than A
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, priority="low", expected_duration=1000)
    assert claim_grant(alloc, job.id, "w1", "h1", start=True).current  # a worker runs it
    alloc.allocate(WHOLE, on_busy="queue", priority="high", strategy="priority", expected_duration=50)  # preempts it
    assert alloc.redis.hget(alloc.keys.task(job.id), "state") == "preempting"
    queued(alloc, WHOLE, priority="low", expected_duration=10, allocation_id="L")
    # The stopped run goes back to the front of "low" once its worker reports: ahead of L, it
    # takes the GPU that frees first (at 51), and L the next one (at 100).
    assert eta(alloc, job.id) == at(51) and eta(alloc, "L") == at(100)


@pytest.mark.parametrize("hint_s, ttl_s, ends", [(3600, 3600, 3600), (1000, 600, 600)])
def test_a_lease_hinted_to_run_at_least_its_ttl_is_expected_to_end_at_its_ttl_not_after_the_prior(
        alloc, clock, hint_s, ttl_s, ends):
    alloc.redis.hset(alloc.keys.durations, "other", json.dumps({"p50_ms": 30000, "p80_ms": 40000, "n": 5}))
    gpu_host(alloc)
    alloc.allocate(WHOLE, expected_duration=hint_s, ttl_seconds=ttl_s)
    assert eta(alloc, queued(alloc, expected_duration=10, ttl_seconds=None)) == at(ends)


def test_a_job_without_time_limit_is_expected_to_run_its_hint_before_and_after_a_worker_claims_it(alloc, clock):
    from allocator.agent.fencing import claim_grant
    from allocator.queue import run_lease_s

    from . import jobs

    gpu_host(alloc)
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_timeout=-1, expected_duration=7200)
    waiting = queued(alloc, expected_duration=60, ttl_seconds=None)
    assert eta(alloc, waiting) == at(7200)  # its TTL (1 h) bounds only its wait for a worker
    claim_grant(alloc, job.id, "w1", "h1", start=True, run_lease_s=run_lease_s(-1))  # the deadline goes
    clock.advance(30)
    assert eta(alloc, waiting) == at(7200)


def test_a_deadline_a_worker_claim_moved_is_read_again(alloc, clock):
    from allocator.agent.fencing import claim_grant
    from allocator.queue import run_lease_s

    from . import jobs

    gpu_host(alloc)
    lease = run_lease_s(7200)  # its time limit and a margin
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, job_timeout=7200)  # no hint, no history
    waiting = queued(alloc, expected_duration=60, ttl_seconds=None)
    assert eta(alloc, waiting) == at(lease)  # the deadline of its placement
    clock.advance(100)
    claim_grant(alloc, job.id, "w1", "h1", start=True, run_lease_s=lease)  # a worker takes it 100 s later
    assert eta(alloc, waiting) == at(100 + lease)


def test_a_job_rq_discards_while_it_waits_never_starts_and_those_behind_it_do(alloc, clock):
    from . import jobs

    gpu_host(alloc)
    holder = alloc.allocate(WHOLE, expected_duration=1000, ttl_seconds=None)
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, expected_duration=100, ttl=600)  # RQ drops it after 600 s
    waiting = queued(alloc, expected_duration=10, ttl_seconds=None)
    assert (eta(alloc, job.id), eta(alloc, waiting)) == (None, at(1000))
    clock.advance(1000)
    alloc.redis.delete(alloc.keys.rq_job(job.id))  # what RQ's expiry does (in real time, not the test's clock)
    alloc.release(holder.allocation_id)
    assert (alloc.get(job.id).release_reason, alloc.get(waiting).activated_at) == ("job_gone", at(1000))


def test_a_job_started_then_preempted_is_not_discarded_by_its_rq_ttl_when_it_waits_again(alloc, clock):
    from . import jobs

    gpu_host(alloc)
    alloc.allocate(WHOLE, priority="high", expected_duration=100, ttl_seconds=None)
    urgent = queued(alloc, priority="high", strategy="priority", expected_duration=50, ttl_seconds=None)
    nb = int((T0 + 500) * 1000)  # it waits out a retry interval until 500 (as finish_job writes one)
    alloc.redis.hset(alloc.keys.task(urgent), "not_before", nb)
    alloc.redis.hset(alloc.keys.alloc(urgent), "not_before", nb)
    alloc.redis.zadd(alloc.keys.delayed, {urgent: nb})
    job = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, priority="low", expected_duration=1000, ttl=300)
    last = queued(alloc, priority="low", expected_duration=10, ttl_seconds=None)
    # The job starts at 100 (RQ then keeps it), is preempted at 500 and runs again from 550.
    assert (eta(alloc, job.id), eta(alloc, urgent), eta(alloc, last)) == (at(100), at(500), at(1550))


def test_a_whole_gpu_grant_that_grew_since_the_estimates_read_it_frees_what_it_holds_now(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "4Gi"}])
    alloc.allocate(WHOLE, expected_duration=100, ttl_seconds=None)  # granted the 12 GiB left
    waiting = queued(alloc, {"gpus": 1, "gpu_memory_mb": "14Gi", "cpu_cores": 1}, ttl_seconds=None)
    assert eta(alloc, waiting) is None  # 12 GiB freed at 100 and 4 GiB used by others: never 14
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": 0}])
    assert eta(alloc, waiting) == at(100)  # the grant grew to 16 GiB, all of it freed at its end


def test_an_id_submitted_again_after_its_record_was_purged_is_estimated_with_its_new_request(alloc, clock):
    gpu_host(alloc, n=2)
    holder = alloc.allocate({"gpus": 2, "cpu_cores": 2}, expected_duration=100, ttl_seconds=None)
    queued(alloc, allocation_id="nightly", expected_duration=50, ttl_seconds=None)
    assert eta(alloc, "nightly") == at(100)
    clock.advance(100)
    alloc.release(holder.allocation_id)
    alloc.release("nightly")
    clock.advance(86400 + 1)
    alloc.expire()  # the records of a day ago are purged
    assert alloc.get("nightly") is None
    alloc.allocate(WHOLE, expected_duration=100, ttl_seconds=None)
    alloc.allocate(WHOLE, expected_duration=500, ttl_seconds=None)
    queued(alloc, {"gpus": 2, "cpu_cores": 2}, allocation_id="nightly", expected_duration=50, ttl_seconds=None)
    assert eta(alloc, "nightly") == at(100 + 86400 + 1 + 500)  # both GPUs now: after the second ends


def test_a_critical_share_on_a_reserved_gpu_makes_room_for_shares_below_critical(alloc, clock):
    alloc.register_host(id="h1", cpu_cores=8, ram_mb="64Gi", reserve_gpus=1, gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.allocate({"cpu_cores": 8}, expected_duration=10, allocation_id="R")
    share = {"gpus": 1, "gpu_memory_mb": 4096, "cpu_cores": 1}
    queued(alloc, share, priority="critical", expected_duration=200, allocation_id="C")
    queued(alloc, share, expected_duration=100, allocation_id="N")
    _delay(alloc, "C", int((T0 + 50) * 1000))  # C waits out a retry interval until 50
    # Until C takes the GPU it is the reserve, which N may not touch; from then on it is in use.
    assert (eta(alloc, "C"), eta(alloc, "N")) == (at(50), at(50))
    _tick(alloc, clock, 10, "R")
    _tick(alloc, clock, 50)
    assert alloc.get("C").activated_at == alloc.get("N").activated_at == at(50)


def test_one_tasks_estimate_sees_a_task_far_behind_it_that_backfills(alloc, clock):
    a = Allocator(client=alloc.redis, namespace=alloc.keys.namespace, clock=clock, pass_depth=3)
    for h, n in (("A", 2), ("B", 2), ("C", 0)):
        a.register_host(id=h, cpu_cores=4, ram_mb="64Gi", labels={"host": h},
                        gpus=[{"index": i, "memory_mb": "16Gi"} for i in range(n)])
    one = {"gpus": 1, "cpu_cores": 1}
    a.allocate(one, expected_duration=100, selector="host=A")
    a.allocate(one, expected_duration=200, selector="host=B")
    a.allocate(one, expected_duration=11, selector="host=B")
    a.allocate({"cpu_cores": 4}, expected_duration=10, selector="host=C")
    two = {"gpus": 2, "cpu_cores": 1}
    queued(a, two, expected_duration=50, selector="host=A", allocation_id="H")
    queued(a, two, expected_duration=50, selector="host=B", allocation_id="X")
    for i in range(3):
        queued(a, {"cpu_cores": 1}, expected_duration=5 + i / 10, selector="host=C", allocation_id=f"Z{i}")
    queued(a, one, expected_duration=1000, selector="host=B", allocation_id="Y")  # beyond X's pass window
    # Once the Z tasks start, Y comes into the window and backfills B's GPU, which X needs.
    assert a.estimated_start_time("X") == a.estimated_start_times()["X"] == at(1011)


def test_a_run_being_stopped_that_may_preempt_still_puts_running_jobs_back_in_line(alloc, clock):
    from allocator.agent.fencing import claim_grant

    from . import jobs

    alloc.register_host(id="h1", cpu_cores=16, ram_mb="64Gi", labels={"host": "h1"}, gpus=[{"index": 0, "memory_mb": "16Gi"}])
    alloc.register_host(id="h2", cpu_cores=16, ram_mb="64Gi", labels={"host": "h2"}, gpus=[{"index": 0, "memory_mb": "16Gi"}])
    low = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, priority="low", expected_duration=1000, selector="host=h1")
    clock.advance(1)
    may = alloc.enqueue(jobs.add, 1, 2, resources=WHOLE, strategy="priority", expected_duration=1000)  # on h2
    for t, h in ((low, "h1"), (may, "h2")):
        assert claim_grant(alloc, t.id, "w-" + h, h, start=True).current
    alloc.allocate(WHOLE, priority="high", strategy="priority", on_busy="queue", expected_duration=50, selector="host=h2")
    assert alloc.redis.hget(alloc.keys.task(may.id), "state") == "preempting"
    queued(alloc, WHOLE, priority="low", expected_duration=10, selector="host=h1", allocation_id="L")
    # Back in line, the stopped run may preempt: it takes h1 from the low job at once (until
    # 1001), and the low job goes back in line ahead of L, which then waits for it (until 2001).
    assert eta(alloc, "L") == at(2001)
    assert set(alloc.estimated_start_times()) == {"L", may.id}
    alloc.refresh_estimated_start_times()
    assert set(alloc.estimated_start_times()) == {"L", may.id}
