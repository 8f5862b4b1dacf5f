"""The host agent: publishes inventory and heartbeats, keeps the ledger's capacity truthful.

One ``Agent`` serves the hosts of one provider: this machine (``LocalProvider``) or a simulated
fleet (``StaticProvider``, e.g. all 1,213 OpenB hosts from one process). Each round it:

1. reads the inventory (NVML/psutil or the file);
2. maps GPU processes to allocations (``watchdog.read_grants`` / ``attribute``), which gives each
   GPU's unmanaged memory (used by processes the allocator does not manage) and any overuse;
3. registers a host whose capacity changed (``register_host``: grants stay intact, unmanaged
   memory is not grantable); unchanged hosts cost nothing here;
4. heartbeats every host in batches (server time, ``heartbeat.lua``) with its inventory JSON; a
   host the reaper declared lost, or that was removed, is registered again (a lost one under a
   new generation, so its stale grants are refused) and heartbeated;
5. hands overuse to the watchdog (event, metric, and with ``--enforce`` SIGTERM/SIGKILL);
6. with a service catalog (``services``): publishes it for each host and runs the host's named
   services (``agent/services.py``; in ``run`` each host's supervisor is a thread woken by the
   placement, in ``run_once`` it reconciles once);
7. every ``orphan_check_s``, frees the grants of runs whose worker died on this machine while
   their host stayed alive (``orphans.py``; the reaper acts only on lost hosts).

Worker slots registered per host: ``worker_slots`` when given, else the number of RQ workers
listening on the host's queue (``allocator worker -n N``) when there are any, else one per core.

``shutdown`` (SIGTERM) drains every host (no new placements), keeps heartbeating while running
work finishes, for at most ``drain_timeout_s``, then deregisters: the host is removed and what
still runs there is released with reason ``host_removed``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from ..client import Allocator
from ..errors import AllocatorError, HostNotFound, InvalidRequest, OperatorDrained
from ..queue import host_queue_name
from ..services import ServiceCatalog
from . import _redis
from .inventory import HostInventory, host_spec
from .metrics import AGENT_HOSTS, AGENT_LAST_HEARTBEAT, AGENT_REGISTRATIONS, AGENT_ROUND
from .orphans import DEFAULT_ORPHAN_CHECK_S, OrphanReaper
from .providers import InventoryProvider
from .reaper import mark_lost
from .services import ServiceSupervisor
from .watchdog import Attribution, Watchdog, attribute, read_grants

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
#: Unmanaged GPU memory is rounded up to this many MiB before it is compared and registered.
DEFAULT_GRANULARITY_MB = 256
HEARTBEAT_BATCH = 500


@dataclass
class RoundReport:
    """What one agent round did, with its timings in milliseconds."""

    hosts: int = 0
    registered: list[str] = field(default_factory=list)
    reregistered: list[str] = field(default_factory=list)  # were lost or missing
    overuse: int = 0
    events: int = 0
    orphans_released: list[str] = field(default_factory=list)  # runs whose worker died
    inventory_ms: float = 0.0
    register_ms: float = 0.0
    heartbeat_ms: float = 0.0
    total_ms: float = 0.0


def _operators_drain(state_by: tuple[str | None, str | None] | None) -> bool:
    """Whether a host (state, drained_by) drains for an operator: marked so, or drained before
    drains were marked; or lost while an operator drained it (the drain comes back with its
    registration). Such a host stays registered when its agent stops."""
    if state_by is None:
        return False
    state, by = state_by
    return (state == "draining" and by != "agent") or (state == "lost" and by == "operator")


class Agent:
    """Publishes the inventory and heartbeat of a provider's hosts; see the module docstring."""

    def __init__(
        self,
        allocator: Allocator,
        provider: InventoryProvider,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        labels: dict[str, str] | None = None,
        granularity_mb: int = DEFAULT_GRANULARITY_MB,
        watchdog: Watchdog | None = None,
        drain_timeout_s: float | None = DEFAULT_DRAIN_TIMEOUT_S,
        heartbeat_batch: int = HEARTBEAT_BATCH,
        services: ServiceCatalog | None = None,
        service_address: str | None = None,
        worker_slots: int | None = None,
        service_ports: tuple[int, int] | None = None,
        orphan_check_s: float = DEFAULT_ORPHAN_CHECK_S,
    ) -> None:
        self.allocator = allocator
        self.provider = provider
        self.interval_s = interval_s
        self.labels = dict(labels or {})
        self.granularity_mb = granularity_mb
        self.watchdog = watchdog if watchdog is not None else Watchdog(allocator)
        self.drain_timeout_s = drain_timeout_s
        self.heartbeat_batch = heartbeat_batch
        self.orphans = OrphanReaper(allocator, every_s=orphan_check_s)
        self._registered: dict[str, dict[str, Any]] = {}  # host -> payload last registered
        self._inventory: dict[str, str] = {}  # host -> inventory JSON of the last round
        self._cache: dict[str, tuple[HostInventory, dict[str, Any]]] = {}  # host -> (inventory, spec)
        self.hosts: list[str] = []
        self.services = services if services is not None and len(services) else None
        self.service_address = service_address or socket.gethostname()
        self.worker_slots = worker_slots
        self.service_ports = service_ports
        self.supervisors: dict[str, ServiceSupervisor] = {}
        self._unsupervised: set[str] = set()  # hosts refused named services (one host's per agent)
        self._threaded = False

    # -- one round ---------------------------------------------------------------------------

    def run_once(self) -> RoundReport:
        """One round: inventory, attribution, registration of changes, heartbeat, watchdog."""
        rep = RoundReport()
        t0 = time.perf_counter()
        invs = self.provider.hosts()
        rep.hosts = len(invs)
        self.hosts = [i.host_id for i in invs]
        AGENT_HOSTS.set(len(invs))
        watched = {i.host_id for i in invs if i.has_processes} | self.watchdog.tracked_hosts
        maps, grants = read_grants(self.allocator, [h for h in self.hosts if h in watched])
        attributions = {i.host_id: attribute(i, maps.get(i.host_id, {}), grants) for i in invs if i.host_id in watched}
        t1 = time.perf_counter()
        specs: dict[str, dict[str, Any]] = {}
        for inv in invs:
            att = attributions.get(inv.host_id)
            cached = self._cache.get(inv.host_id)
            if att is None and cached is not None and cached[0] is inv:
                specs[inv.host_id] = cached[1]  # same inventory object as last round (static file unchanged)
                continue
            specs[inv.host_id] = host_spec(inv, unmanaged_mb=att.unmanaged_mb if att else None,
                                           labels=self.labels, granularity_mb=self.granularity_mb)
            self._inventory[inv.host_id] = self._inventory_json(inv, att, specs[inv.host_id])
            self._cache[inv.host_id] = (inv, specs[inv.host_id])
        for h, extra in self._host_extras(list(specs)).items():
            specs[h] = {**specs[h], **extra}  # a new dict: cached specs stay as they were
        invalid: set[str] = set()
        for h, spec in specs.items():
            if self._registered.get(h) != spec:
                reason = self._register(h, spec, "changed" if h in self._registered else "new")
                if reason is None:
                    invalid.add(h)
                else:
                    (rep.reregistered if reason == "returned" else rep.registered).append(h)
        t2 = time.perf_counter()
        again = self._heartbeat(self.hosts)
        for h in again:
            if h not in invalid and self._register(h, specs[h], "returned") is not None:
                rep.reregistered.append(h)
        if rep.reregistered:
            self._heartbeat(rep.reregistered)
        if self.services is not None:
            self._supervise(set(rep.registered) | set(rep.reregistered), invalid)
        t3 = time.perf_counter()
        for inv in invs:
            if inv.host_id in watched:
                over = attributions[inv.host_id].overuse
                rep.overuse += len(over)
                rep.events += len(self.watchdog.observe(inv.host_id, over))
        orphans = self.orphans.maybe_check(self.hosts)
        if orphans is not None:
            rep.orphans_released = orphans.released + orphans.requeued
        t4 = time.perf_counter()
        rep.inventory_ms = round((t1 - t0) * 1000, 3)
        rep.register_ms = round((t2 - t1) * 1000, 3)
        rep.heartbeat_ms = round((t3 - t2) * 1000, 3)
        rep.total_ms = round((t4 - t0) * 1000, 3)
        AGENT_ROUND.observe(t4 - t0)
        return rep

    def _host_extras(self, hosts: list[str]) -> dict[str, dict[str, Any]]:
        """Worker slots and service port pool to register per host (see the module docstring)."""
        out: dict[str, dict[str, Any]] = {h: {} for h in hosts}
        if self.service_ports is not None:
            for h in hosts:
                out[h]["service_ports"] = list(self.service_ports)
        if self.worker_slots is not None:
            for h in hosts:
                out[h]["worker_slots"] = self.worker_slots
        elif hosts:
            ns = self.allocator.keys.namespace
            pipe = self.allocator.redis.pipeline(transaction=False)
            for h in hosts:
                pipe.scard("rq:workers:" + host_queue_name(ns, h))
            for h, n in zip(hosts, pipe.execute()):
                if n:
                    out[h]["worker_slots"] = int(n)
        return {h: x for h, x in out.items() if x}

    def _supervise(self, registered: set[str], invalid: set[str]) -> None:
        """Publishes the catalog of newly (re)registered hosts and runs their service supervisors."""
        assert self.services is not None
        for h in self.hosts:
            if h in invalid:
                continue
            sup = self.supervisors.get(h)
            if sup is None and self.supervisors:
                # Named services run as processes of this machine, on ports of one pool: a second
                # host served from here would be handed the same ports. One host's services only.
                if h not in self._unsupervised:
                    self._unsupervised.add(h)
                    log.error("host %s: no named services (they run on this machine, which already runs those "
                              "of host %s; serve them with an agent of one host)", h, next(iter(self.supervisors)))
                continue
            if sup is None:
                sup = self.supervisors[h] = ServiceSupervisor(self.allocator, h, self.services,
                                                              address=self.service_address)
                registered.add(h)
            if h in registered:
                sup.publish()
            if self._threaded:
                sup.start()
            else:
                sup.reconcile()

    def _register(self, host_id: str, spec: dict[str, Any], reason: str) -> str | None:
        """Registers ``spec``; returns the reason it counts under, or None where it was refused. A
        change registered as the host comes back (lost or removed meanwhile) counts as returned:
        the heartbeat that would have said so comes after it."""
        try:
            res = self.allocator.register_host(spec, heartbeat=True)
        except InvalidRequest as exc:
            log.error("host %s not registered, its inventory is invalid: %s", host_id, exc)
            return None
        if reason == "changed" and (res.get("created") or res.get("was_lost")):
            reason = "returned"
        if reason == "new" and res.get("state") == "draining":
            # Drained by an agent that stopped before it deregistered the host (killed while it
            # waited for running work): that drain was the agent's own, not an operator's, which
            # the script checks as it resumes. (Before the host counts as registered: a resume
            # that fails is tried again next round.)
            if self.allocator.resume_host(host_id, by_agent=True) == "ready":
                log.warning("host %s was left draining by a previous agent; resumed it", host_id)
        self._registered[host_id] = spec
        AGENT_REGISTRATIONS.labels(reason=reason).inc()
        if reason == "returned":
            log.warning("host %s was declared lost or removed; registered again (generation %s)", host_id, res.get("gen"))
        return reason

    def _inventory_json(self, inv: HostInventory, att: Attribution | None, spec: dict[str, Any]) -> str:
        un = att.unmanaged_mb if att else {}
        return json.dumps({"host": inv.host_id, "labels": spec["labels"], "cpu_cores": len(inv.cpu_cores),
                           "ram_mb": inv.ram_mb, "gpus": [g.describe(un.get(g.uuid)) for g in inv.gpus], **inv.info},
                          separators=(",", ":"))

    def _heartbeat(self, hosts: list[str]) -> list[str]:
        """Heartbeats ``hosts`` in batches; returns those that must be registered again."""
        ttl_ms = int(max(3 * self.interval_s, 1.0) * 1000)
        again: list[str] = []
        for i in range(0, len(hosts), self.heartbeat_batch):
            args: list[object] = [ttl_ms]
            for h in hosts[i: i + self.heartbeat_batch]:
                args += [h, self._inventory.get(h, "")]
            r = _redis.call(self.allocator, "heartbeat", [self.allocator.keys.heartbeats], *args)
            again += _redis.as_list(r.get("lost")) + _redis.as_list(r.get("missing"))
            AGENT_LAST_HEARTBEAT.set(int(r["now"]) / 1000)
        return again

    # -- the daemon --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Rounds every ``interval_s`` until ``stop`` is set. Redis and provider errors are logged
        and the next round retries: an agent that exits on a blip would get its host declared lost."""
        self._threaded = True
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                rep = self.run_once()
                log.debug("round: %s", rep)
            except (redis.RedisError, AllocatorError, OSError) as exc:
                log.error("agent round failed: %s", exc)
            except Exception:  # a bug in one round must not stop the heartbeats: the fleet would be declared lost
                log.exception("agent round failed unexpectedly")
            stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def shutdown(self, abort: threading.Event | None = None) -> list[str]:
        """Drain, wait for running work (heartbeating) up to ``drain_timeout_s`` (None = no limit)
        or until ``abort`` is set, then deregister every host. Returns the allocation ids released
        because they were still running."""
        hosts = list(self.hosts)
        undrained = self._drain(hosts)
        deadline = None if self.drain_timeout_s is None else time.monotonic() + self.drain_timeout_s
        abort = abort or threading.Event()
        last_beat = float("-inf")
        while not abort.is_set() and self._busy(hosts):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now - last_beat >= self.interval_s:  # still alive: the reaper must not reclaim running work
                try:
                    self._heartbeat(hosts)
                except redis.RedisError as exc:
                    log.error("heartbeat while draining failed: %s", exc)
                if undrained:  # a drain that met a Redis error: new work must not keep landing there
                    undrained = self._drain(undrained)
                last_beat = now
            left = float("inf") if deadline is None else deadline - time.monotonic()
            abort.wait(max(0.0, min(0.2, self.interval_s, left)))
        released: list[str] = []
        states = self._host_states(hosts)
        for h, sup in self.supervisors.items():
            # Stops the host's services. The removal below drops their entries; a host that stays
            # registered (an operator's drain) must hear they are gone, or it lists them running.
            sup.close(withdraw=True, report=_operators_drain(states.get(h)))
        self.supervisors.clear()
        for h in hosts:
            try:
                # Whether an operator drains it is decided in the removal's script, so that a drain
                # made after the states above were read is seen.
                released += self.allocator.remove_host(h, force=True, keep_operator_drain=True)
            except OperatorDrained:
                # An operator's drain (marked, or from before drains were marked), or a host lost
                # while one drained it: removing the host would drop the drain. It is declared lost
                # instead, now (no agent serves it, what still runs is reclaimed, and nobody can
                # resume it without one), and keeps the drain when an agent registers it again.
                log.warning("host %s stays registered and is declared lost: an operator drained it", h)
                try:
                    if self.allocator.redis.hget(self.allocator.keys.host(h), "drained_by") is None:
                        self.allocator.drain_host(h)  # marks it the operator's, as drains are now
                    lost = mark_lost(self.allocator, h, 0.0, limit=1 << 20)
                    released += lost.released if lost else []
                except (AllocatorError, redis.RedisError) as exc:
                    log.error("could not declare %s lost: %s", h, exc)
            except HostNotFound:
                pass
            except (AllocatorError, redis.RedisError) as exc:  # deregister the others all the same
                log.error("could not remove %s: %s", h, exc)
            self._registered.pop(h, None)
        if released:
            log.warning("deregistered with %d allocation(s) still running; released (reason host_removed)", len(released))
        self.provider.close()
        return released

    def _host_states(self, hosts: list[str]) -> dict[str, tuple[str | None, str | None]]:
        """Each host's state and who drains it, in one round trip (a Redis error reads as none
        known: the deregistration reads each again)."""
        try:
            pipe = self.allocator.redis.pipeline(transaction=False)
            for h in hosts:
                pipe.hmget(self.allocator.keys.host(h), "state", "drained_by")
            rows = pipe.execute()
        except redis.RedisError:
            return {}
        return {h: (state, by) for h, (state, by) in zip(hosts, rows)}

    def _drain(self, hosts: list[str]) -> list[str]:
        """Drains ``hosts`` as this agent's own drain; returns those to try again (a Redis error).
        A host that is gone or was declared lost is left as it is: the others are drained."""
        again: list[str] = []
        for h in hosts:
            try:
                self.allocator.drain_host(h, by_agent=True)
            except HostNotFound:
                pass
            except AllocatorError as exc:
                log.error("could not drain %s: %s", h, exc)
            except redis.RedisError as exc:
                log.error("could not drain %s yet: %s", h, exc)
                again.append(h)
        return again

    def _busy(self, hosts: list[str]) -> bool:
        """Whether work still runs on ``hosts``; while Redis cannot say, it may."""
        try:
            pipe = self.allocator.redis.pipeline(transaction=False)
            for h in hosts:
                pipe.scard(self.allocator.keys.host_allocs(h))
            return any(n > 0 for n in pipe.execute()) if hosts else False
        except redis.RedisError as exc:
            log.error("could not read the running work of %s: %s", ", ".join(hosts), exc)
            return True
