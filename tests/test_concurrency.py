"""Several processes allocating and releasing at once never oversubscribe anything."""

from __future__ import annotations

import multiprocessing as mp
import random
import uuid

from allocator import Allocator, InsufficientResources
from allocator.invariants import check
from allocator.models import Allocation

FLEET = [
    {"id": f"h{i}", "cpu_cores": 8, "ram_mb": "64Gi", "labels": {"cluster": "c" + str(i % 2)},
     "gpus": [{"index": g, "model": "A100" if g % 2 else "T4", "memory_mb": "40Gi"} for g in range(4)]}
    for i in range(4)
] + [{"id": "cpu-only", "cpu_cores": 16, "ram_mb": "32Gi"}]


def random_request(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.15:
        return {"cpu_cores": rng.choice([1, 2, "0.5", "0.25"]), "ram_mb": rng.randint(1, 8) * 1024}
    if kind < 0.25:
        return {"gpus": rng.choice([1, 2]), "cpu_cores": rng.randint(1, 2), "ram_mb": "4Gi"}
    return {"gpus": rng.choice([1, 1, 1, 2]), "gpu_memory_mb": rng.randint(1, 24) * 1024,
            "cpu_cores": rng.choice([1, 2, 4, "1.5"]), "ram_mb": rng.randint(1, 16) * 1024}


def client(url: str, namespace: str, seed: int, ops: int, out: mp.Queue) -> None:
    rng = random.Random(seed)
    a = Allocator(url, namespace=namespace)
    held: list[str] = []
    stats = {"allocated": 0, "refused": 0, "released": 0, "repeats": 0}
    for _ in range(ops):
        if len(held) > 2 and rng.random() < 0.1:  # a few releases at once, each on its own
            some = [held.pop(rng.randrange(len(held))) for _ in range(rng.randint(2, len(held)))]
            assert all(x.released_now for x in a.release_many(some, chunk_size=rng.choice([1, 2, 32])))
            stats["released"] += len(some)
            continue
        if held and (rng.random() < 0.45 or len(held) > 12):
            aid = held.pop(rng.randrange(len(held)))
            a.release(aid)
            if rng.random() < 0.1:
                a.release(aid)  # a retry must change nothing
            stats["released"] += 1
            continue
        if rng.random() < 0.15:  # a few requests at once, each placed on its own
            batch = [{"resources": random_request(rng), "allocation_id": f"c{seed}-{uuid.uuid4().hex[:8]}"}
                     for _ in range(rng.randint(2, 5))]
            for x in a.allocate_many(batch, chunk_size=rng.choice([1, 2, 32])):
                if isinstance(x, Allocation):
                    held.append(x.allocation_id)
                    stats["allocated"] += 1
                else:
                    assert isinstance(x, InsufficientResources), x
                    stats["refused"] += 1
            continue
        aid = f"c{seed}-{uuid.uuid4().hex[:8]}"
        try:
            a.allocate(random_request(rng), allocation_id=aid, strategy=rng.choice(["best_fit", "first_fit", "worst_fit"]))
        except InsufficientResources:
            stats["refused"] += 1
            continue
        if rng.random() < 0.1:
            a.allocate(random_request(rng), allocation_id=aid)  # a retried allocate returns the first grant
            stats["repeats"] += 1
        held.append(aid)
        stats["allocated"] += 1
    for aid in held:
        a.release(aid)
        stats["released"] += 1
    out.put(stats)


def test_four_processes_never_oversubscribe_and_leave_everything_free(redis_url):
    namespace = "test-conc-" + uuid.uuid4().hex[:8]
    a = Allocator(redis_url, namespace=namespace)
    try:
        for h in FLEET:
            a.register_host(h)
        ctx = mp.get_context("fork")
        out: mp.Queue = ctx.Queue()
        procs = [ctx.Process(target=client, args=(redis_url, namespace, seed, 1500, out)) for seed in range(4)]
        for p in procs:
            p.start()
        checks = 0
        while any(p.is_alive() for p in procs):
            violations = check(a.snapshot())
            assert violations == [], violations[:5]
            checks += 1
        for p in procs:
            p.join()
            assert p.exitcode == 0
        stats = [out.get(timeout=5) for _ in procs]
        assert sum(s["allocated"] for s in stats) > 1000
        assert sum(s["refused"] for s in stats) > 0, "the fleet should fill up at times"
        assert checks > 5
        assert check(a.snapshot()) == []
        cap = a.capacity()
        assert cap.active_allocations == 0
        assert cap.gpu_memory_mb.allocated == 0 and cap.cpu_cores.allocated == 0 and cap.ram_mb.allocated == 0
        assert cap.gpus_idle == cap.gpu_count
    finally:
        a.destroy()


def queue_client(url: str, namespace: str, seed: int, ops: int, out: mp.Queue) -> None:
    rng = random.Random(seed)
    a = Allocator(url, namespace=namespace)
    mine: list[str] = []
    counts = {"queued": 0, "cancelled": 0, "released": 0}
    for _ in range(ops):
        r = rng.random()
        if mine and r < 0.35:
            aid = mine.pop(rng.randrange(len(mine)))
            a.release(aid)  # releases a placed one, cancels a pending one
            counts["released"] += 1
        elif mine and r < 0.45:
            a.cancel(mine.pop(rng.randrange(len(mine))))
            counts["cancelled"] += 1
        else:
            x = a.allocate(random_request(rng), on_busy="queue", priority=rng.choice(["low", "normal", "high", "critical"]),
                           strategy=rng.choice(["best_fit", "first_fit", "priority"]), expected_duration=rng.choice([None, 5, 50]))
            mine.append(x.allocation_id)
            counts["queued"] += 1
    for aid in mine:
        a.release(aid)
    out.put(counts)


def scheduler_replica(url: str, namespace: str, stop: mp.Event) -> None:
    a = Allocator(url, namespace=namespace)
    while not stop.is_set():
        a.schedule()


def test_queue_clients_and_two_schedulers_keep_the_ledger_consistent(redis_url):
    namespace = "test-qconc-" + uuid.uuid4().hex[:8]
    a = Allocator(redis_url, namespace=namespace)
    try:
        for h in FLEET:
            a.register_host(h)
        ctx = mp.get_context("fork")
        out: mp.Queue = ctx.Queue()
        stop = ctx.Event()
        schedulers = [ctx.Process(target=scheduler_replica, args=(redis_url, namespace, stop)) for _ in range(2)]
        clients = [ctx.Process(target=queue_client, args=(redis_url, namespace, seed, 400, out)) for seed in range(3)]
        for p in schedulers + clients:
            p.start()
        while any(p.is_alive() for p in clients):
            violations = check(a.snapshot())
            assert violations == [], violations[:5]
        stop.set()
        for p in clients + schedulers:
            p.join(30)
            assert p.exitcode == 0
        counts = [out.get(timeout=5) for _ in clients]
        assert sum(c["queued"] for c in counts) > 300
        assert check(a.snapshot()) == []
        cap = a.capacity()
        assert cap.active_allocations == 0 and a.redis.zcard(a.keys.pending) == 0
        assert cap.gpus_idle == cap.gpu_count and cap.cpu_cores.allocated == 0
    finally:
        a.destroy()
