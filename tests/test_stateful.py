"""Hypothesis drives the ledger and a plain-Python model of it side by side.

The model knows nothing about indexes or scan order: it only says whether *some* host could take
a request. The ledger must then grant it (no false refusals on a small fleet), the grant must be
legal in the model (nothing oversubscribed, no core twice), and every figure must agree. Beside
allocations, releases and expiry, the operator's host changes play too: drains and resumes, a
registration of the same or a larger inventory, a host added later, and removal (refused while the
host holds grants, or forced, which ends them).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from allocator import Allocator, InsufficientResources
from allocator.errors import AllocationNotFound, HostBusy
from allocator.invariants import check

from .conftest import FakeClock


@dataclass
class MGpu:
    uuid: str
    model: str
    total: int
    used: int = 0
    holders: int = 0

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass
class MHost:
    id: str
    cores: list[int]
    ram: int
    gpus: list[MGpu]
    taken: set[int] = field(default_factory=set)
    shared: int = 0
    ram_used: int = 0
    drained: bool = False

    @property
    def cpu_free(self) -> int:
        return (len(self.cores) - len(self.taken)) * 1000 - self.shared

    def gpu_candidates(self, req: dict) -> list[MGpu]:
        models = req.get("gpu_model")
        ok = []
        for g in self.gpus:
            if models and g.model not in models.split("|"):
                continue
            if "gpu_memory_mb" in req and g.free >= req["gpu_memory_mb"]:
                ok.append(g)
            elif "gpu_memory_mb" not in req and g.holders == 0 and g.free > 0:
                ok.append(g)
        return ok

    def fits(self, req: dict) -> bool:
        if self.drained:
            return False
        if self.cpu_free <= 0 or self.ram - self.ram_used <= 0:
            return False  # a host with no free CPU or RAM takes no new work (it is parked)
        if self.cpu_free < req["cpu_millis"] or self.ram - self.ram_used < req["ram_mb"]:
            return False
        return len(self.gpu_candidates(req)) >= req.get("gpus", 0)


MODELS = ["T4", "A100"]
requests = st.fixed_dictionaries(
    {"cpu_millis": st.sampled_from([500, 1000, 2000, 3000, 250]), "ram_mb": st.integers(1, 6).map(lambda x: x * 1024)},
    optional={"gpus": st.integers(1, 2), "gpu_memory_mb": st.integers(1, 16).map(lambda x: x * 1024),
              "gpu_model": st.sampled_from(["T4", "A100", "T4|A100"])},
)


class LedgerMachine(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.a = Allocator(REDIS_URL, namespace="test-sm-" + uuid.uuid4().hex[:10], clock=self.clock)
        self.hosts: dict[str, MHost] = {}
        self.grants: dict[str, dict] = {}
        self.next_host = 0

    @initialize(n_hosts=st.integers(1, 3), data=st.data())
    def fleet(self, n_hosts: int, data: st.DataObject) -> None:
        for _ in range(n_hosts):
            self.add_host(data)

    def _register(self, h: MHost) -> None:
        self.a.register_host(id=h.id, cpu_cores=h.cores, ram_mb=h.ram,
                             gpus=[{"index": k, "uuid": g.uuid, "model": g.model, "memory_mb": g.total} for k, g in enumerate(h.gpus)])

    @rule(data=st.data())
    def add_host(self, data: st.DataObject) -> None:
        i, self.next_host = self.next_host, self.next_host + 1
        ngpu = data.draw(st.integers(0, 3))
        gpus = [MGpu(f"h{i}-gpu{g}", data.draw(st.sampled_from(MODELS)), data.draw(st.sampled_from([8192, 16384]))) for g in range(ngpu)]
        h = MHost(f"h{i}", list(range(data.draw(st.integers(1, 4)))), data.draw(st.sampled_from([4096, 8192])), gpus)
        self.hosts[h.id] = h
        self._register(h)

    def _pick(self, data: st.DataObject) -> MHost:
        return self.hosts[data.draw(st.sampled_from(sorted(self.hosts)), label="host")]

    @precondition(lambda self: self.hosts)
    @rule(data=st.data(), drained=st.booleans())
    def drain_or_resume(self, data: st.DataObject, drained: bool) -> None:
        h = self._pick(data)
        if drained:
            self.a.drain_host(h.id)
        else:
            self.a.resume_host(h.id)
        h.drained = drained

    @precondition(lambda self: self.hosts)
    @rule(data=st.data(), more_ram=st.sampled_from([0, 0, 2048]))
    def register_again(self, data: st.DataObject, more_ram: int) -> None:
        """The same inventory again, or more RAM: grants stay, figures follow, a drain stays."""
        h = self._pick(data)
        h.ram += more_ram
        self._register(h)

    @precondition(lambda self: len(self.hosts) > 1)
    @rule(data=st.data(), force=st.booleans())
    def remove(self, data: st.DataObject, force: bool) -> None:
        """Mostly a host that holds grants, the case that matters; one host always stays."""
        holding = sorted({g["host"] for g in self.grants.values()})
        h = self.hosts[data.draw(st.sampled_from(holding), label="host")] if holding else self._pick(data)
        held = {aid for aid, g in self.grants.items() if g["host"] == h.id}
        try:
            released = self.a.remove_host(h.id, force=force)
        except HostBusy:
            assert held and not force, f"removal of {h.id} refused, holding {held}"
            return
        assert not held or force, f"{h.id} removed while it held {held}"
        assert set(released) == held
        for aid in held:
            self._free(aid)
        del self.hosts[h.id]

    @rule(target=held, req=requests, strategy=st.sampled_from(["best_fit", "first_fit", "worst_fit", "priority"]),
          ttl=st.sampled_from([None, 30, 120]))
    def allocate(self, req: dict, strategy: str, ttl: int | None):
        resources = self._resources(req)
        feasible = any(h.fits(req) for h in self.hosts.values())
        try:
            x = self.a.allocate(resources, strategy=strategy, ttl_seconds=ttl)
        except InsufficientResources:
            assert not feasible, f"refused although a host fits {req}"
            return multiple()  # nothing to hand on
        assert feasible, f"granted {req} although no host fits"
        self._apply(x, req)
        return x.allocation_id

    @rule(target=held, reqs=st.lists(requests, min_size=1, max_size=4),
          strategy=st.sampled_from(["best_fit", "first_fit", "worst_fit"]), chunk_size=st.sampled_from([1, 3, 32]))
    def allocate_many(self, reqs: list[dict], strategy: str, chunk_size: int):
        """Each request of a batch is placed as if allocated alone after the ones before it."""
        batch = [{"resources": self._resources(req), "strategy": strategy} for req in reqs]
        placed = []
        for req, x in zip(reqs, self.a.allocate_many(batch, chunk_size=chunk_size), strict=True):
            feasible = any(h.fits(req) for h in self.hosts.values())
            if isinstance(x, InsufficientResources):
                assert not feasible, f"refused although a host fits {req}"
                continue
            assert feasible, f"granted {req} although no host fits"
            self._apply(x, req)
            placed.append(x.allocation_id)
        return multiple(*placed)

    @staticmethod
    def _resources(req: dict) -> dict:
        """The request as ``allocate`` takes it (and ``req`` completed with its implied GPU count)."""
        resources = {"cpu_cores": req["cpu_millis"] / 1000, "ram_mb": req["ram_mb"]}
        for k in ("gpus", "gpu_memory_mb", "gpu_model"):
            if k in req:
                resources[k] = req[k]
        if "gpu_model" in req and "gpus" not in req and "gpu_memory_mb" not in req:
            resources["gpus"] = req["gpus"] = 1
        if "gpu_memory_mb" in req and "gpus" not in req:
            req["gpus"] = 1
        return resources

    def _apply(self, x, req: dict) -> None:
        h = self.hosts[x.host_id]
        assert h.fits(req)
        assert len(x.gpus) == req.get("gpus", 0)
        for g in x.gpus:
            mg = next(m for m in h.gpus if m.uuid == g.uuid)
            assert mg in h.gpu_candidates(req)
            mg.used += g.memory_mb
            mg.holders += 1
        assert not (set(x.cpu_cores) & h.taken) and set(x.cpu_cores) <= set(h.cores)
        h.taken |= set(x.cpu_cores)
        h.shared += round(x.cpu_shared * 1000)
        h.ram_used += x.ram_mb
        self.grants[x.allocation_id] = {"host": h.id, "gpus": [(g.uuid, g.memory_mb) for g in x.gpus],
                                        "cores": set(x.cpu_cores), "shared": round(x.cpu_shared * 1000), "ram": x.ram_mb,
                                        "expires": x.expires_at.timestamp() if x.expires_at else None}

    def _free(self, aid: str) -> None:
        g = self.grants.pop(aid, None)
        if g is None:
            return
        h = self.hosts[g["host"]]
        for u, mem in g["gpus"]:
            mg = next(m for m in h.gpus if m.uuid == u)
            mg.used -= mem
            mg.holders -= 1
        h.taken -= g["cores"]
        h.shared -= g["shared"]
        h.ram_used -= g["ram"]

    @rule(aid=consumes(held))
    def release(self, aid):
        self.a.release(aid)
        self.a.release(aid)
        self._free(aid)

    @rule(aids=st.lists(consumes(held), min_size=1, max_size=4, unique=True), chunk_size=st.sampled_from([1, 3, 32]))
    def release_many(self, aids: list[str], chunk_size: int):
        """A batch of releases, with a repeat and an unknown id among them, ends each once."""
        res = self.a.release_many([*aids, aids[0], "alloc-unknown"], chunk_size=chunk_size)
        assert [x.released_now for x in res[:len(aids)]] == [aids[i] in self.grants for i in range(len(aids))]
        assert res[len(aids)].released_now is False and isinstance(res[-1], AllocationNotFound)
        for aid in aids:
            self._free(aid)

    @rule(seconds=st.sampled_from([10, 60, 200]))
    def time_passes(self, seconds: int):
        self.clock.advance(seconds)
        expired = set(self.a.expire())
        due = {aid for aid, g in self.grants.items() if g["expires"] is not None and g["expires"] <= self.clock.now}
        assert expired == due
        for aid in due:
            self._free(aid)

    @invariant()
    def figures_agree(self):
        cap = self.a.capacity()
        by_id = {h.host_id: h for h in cap.hosts}
        for h in self.hosts.values():
            c = by_id[h.id]
            assert c.cpu_cores.available == max(0, h.cpu_free) / 1000
            assert c.ram_mb.available == h.ram - h.ram_used
            assert [g.memory.available for g in c.gpus] == [m.free for m in h.gpus]
        assert cap.active_allocations == len(self.grants)
        assert check(self.a.snapshot()) == []

    def teardown(self):
        self.a.destroy()
        self.a.redis.close()


REDIS_URL = ""


def test_ledger_matches_a_plain_python_model(redis_url):
    global REDIS_URL
    REDIS_URL = redis_url
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=60, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
