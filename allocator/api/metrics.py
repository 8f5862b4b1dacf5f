"""Prometheus metrics of the fleet, read from Redis when /metrics is scraped.

What each metric counts and where it comes from (docs/api.md has the same table):

* ``allocator_queue_depth{priority}``: tasks waiting in line (ZCOUNT of the pending set per
  priority band).
* ``allocator_outbox_events_total{type}``, ``allocator_placements_total{kind,strategy}``,
  ``allocator_releases_total{reason}``: ledger events, counted from the outbox stream by
  ``tally_outbox.lua`` (reads from a cursor; never consumes, acknowledges or trims). Every
  placement by any client, scheduler pass or API counts, once, however many API replicas run.
* ``allocator_placement_latency_seconds``: submit -> grant per placement, from the
  ``allocated`` event (0 for a request placed at once, the wait in line otherwise).
* ``allocator_refusals_total{reason}``: allocation attempts through this API (any replica) that
  ended without an allocation, by error code (``insufficient_gpu_memory``, ``no_fit``,
  ``policy_conflict``, ``policy_error``, ``invalid_request``, ``timeout``, ...). Refusals of the
  library or CLI are not counted: a refusal writes nothing to the ledger.
* ``allocator_api_placement_seconds{interface}``: in this API process, request received ->
  answered with a grant (REST allocate, WebSocket incl. its wait in line).
* per host: ``allocator_gpu_memory_capacity_bytes`` / ``_allocated_bytes``,
  ``allocator_cpu_cores_capacity`` / ``_allocated``, ``allocator_ram_capacity_bytes`` /
  ``_allocated_bytes``, ``allocator_active_allocations``, ``allocator_host_ready``: the ledger's
  host hashes (``Allocator.capacity()``).
* ``allocator_heartbeat_age_seconds{host}``: now minus the host's last agent heartbeat.
* ``allocator_recorder_backlog_events`` / ``allocator_recorder_oldest_event_age_seconds``: outbox
  entries the history recorder has not written yet (``Recorder.backlog()``'s definition).
* ``allocator_eta_error_seconds``: |actual start - first ETA reported| of tasks that started,
  for tasks whose ETA the API reported (``Keys.eta_predictions``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..client import Allocator
from ..models import Priority

log = logging.getLogger(__name__)

MIB = 1 << 20
LATENCY_BUCKETS_MS = [5, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 900000, 3600000]
ETA_BUCKETS_MS = [1000, 5000, 15000, 30000, 60000, 300000, 900000, 1800000, 3600000, 7200000, 21600000]
BAND = 1 << 42  # pending score band per priority (see includes/queue.lua)


def tally(a: Allocator, *, batch: int = 1000, max_batches: int = 100) -> int:
    """Counts outbox events not yet counted; returns how many. Safe from any number of replicas."""
    keys = [*a.keys.ledger_keys(), a.keys.api_stats, a.keys.eta_predictions]
    args = [a.keys.prefix, "", batch, json.dumps(LATENCY_BUCKETS_MS), json.dumps(ETA_BUCKETS_MS)]
    total = 0
    for _ in range(max_batches):
        n = int(json.loads(a.scripts["tally_outbox"](keys=keys, args=args))["counted"])
        total += n
        if n < batch:
            break
    return total


def count_refusal(a: Allocator, reason: str) -> None:
    """One allocation attempt through the API ended without an allocation (fleet-wide counter)."""
    count_refusals(a, [reason])


def count_refusals(a: Allocator, reasons: list[str]) -> None:
    """``count_refusal`` for each of ``reasons`` (a batch's refused requests), in one round trip."""
    if not reasons:
        return
    try:
        pipe = a.redis.pipeline(transaction=False)
        for reason, n in Counter(reasons).items():
            pipe.hincrby(a.keys.api_stats, "refusals|" + reason.lower(), n)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not count refusals: %s", exc)


def _histogram(name: str, doc: str, stats: dict[str, str], prefix: str, bounds_ms: list[int]) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for b in bounds_ms:
        cumulative += int(stats.get(f"{prefix}|le|{b}", 0))
        buckets.append((repr(b / 1000), cumulative))
    cumulative += int(stats.get(f"{prefix}|le|+Inf", 0))
    buckets.append(("+Inf", cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=int(stats.get(f"{prefix}|sum_ms", 0)) / 1000)


def recorder_backlog(a: Allocator) -> tuple[int, float | None] | None:
    """(entries not yet written, age of the oldest) as the history recorder defines them."""
    try:
        from ..history.recorder import Recorder

        b = Recorder.backlog(SimpleNamespace(redis=a.redis, keys=a.keys, group=a.keys.recorder_group))  # type: ignore[arg-type]
        return int(b.total), b.oldest_age_s
    except ImportError:
        pass
    except redis.RedisError:
        raise
    except Exception as exc:  # the recorder's internals changed: fall back to the stream itself
        log.debug("Recorder.backlog unavailable (%s); using XINFO", exc)
    if not a.redis.exists(a.keys.events):
        return 0, None
    for g in a.redis.xinfo_groups(a.keys.events):
        if g["name"] == a.keys.recorder_group:
            return int(g["pending"]) + int(g.get("lag") or 0), None
    return int(a.redis.xlen(a.keys.events)), None


class LedgerCollector(Collector):
    """Reads the fleet from Redis on every scrape (nothing is cached between scrapes)."""

    def __init__(self, allocator: Allocator) -> None:
        self.a = allocator

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("allocator_redis_up", "Whether the ledger's Redis answered this scrape")
        try:
            families = list(self._collect())
        except redis.RedisError as exc:
            log.warning("metrics scrape could not read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _collect(self) -> Iterator[Metric]:
        a = self.a
        tally(a)
        pipe = a.redis.pipeline(transaction=False)
        pipe.hgetall(a.keys.api_stats)
        for p in Priority:
            lo = (3 - int(p)) * BAND
            pipe.zcount(a.keys.pending, lo, f"({lo + BAND}")
        pipe.zrange(a.keys.heartbeats, 0, -1, withscores=True)
        pipe.time()
        replies = pipe.execute()
        stats: dict[str, str] = replies[0]
        depth = GaugeMetricFamily("allocator_queue_depth", "Tasks waiting in line", labels=["priority"])
        for i, p in enumerate(Priority):
            depth.add_metric([p.label], int(replies[1 + i]))
        yield depth

        events = CounterMetricFamily("allocator_outbox_events", "Ledger events counted from the outbox stream", labels=["type"])
        placements = CounterMetricFamily("allocator_placements", "Grants made by the ledger", labels=["kind", "strategy"])
        releases = CounterMetricFamily("allocator_releases", "Allocations ended, by reason", labels=["reason"])
        refusals = CounterMetricFamily("allocator_refusals", "Allocation attempts through the API that got no allocation, by reason",
                                       labels=["reason"])
        for k, v in sorted(stats.items()):
            parts = k.split("|")
            if parts[0] == "events" and len(parts) == 2:
                events.add_metric([parts[1]], int(v))
            elif parts[0] == "placements" and len(parts) == 3:
                placements.add_metric(parts[1:], int(v))
            elif parts[0] == "releases" and len(parts) == 2:
                releases.add_metric([parts[1]], int(v))
            elif parts[0] == "refusals" and len(parts) == 2:
                refusals.add_metric([parts[1]], int(v))
        yield from (events, placements, releases, refusals)
        yield _histogram("allocator_placement_latency_seconds", "Submit to grant per placement (0 when placed at once)",
                         stats, "lat", LATENCY_BUCKETS_MS)
        yield _histogram("allocator_eta_error_seconds", "Absolute error of the first reported ETA of tasks that started",
                         stats, "eta", ETA_BUCKETS_MS)

        beats: list[tuple[str, float]] = replies[-2]
        sec, usec = replies[-1]
        now_ms = int(a.clock() * 1000) if a.clock is not None else int(sec) * 1000 + int(usec) // 1000
        age = GaugeMetricFamily("allocator_heartbeat_age_seconds", "Seconds since the host's agent last heartbeated", labels=["host"])
        for host, ms in beats:
            age.add_metric([host], max(0.0, (now_ms - ms) / 1000))
        yield age

        yield from self._hosts()
        backlog = recorder_backlog(a)
        if backlog is not None:
            yield GaugeMetricFamily("allocator_recorder_backlog_events", "Outbox entries not yet written to the history database",
                                    value=backlog[0])
            if backlog[1] is not None:
                yield GaugeMetricFamily("allocator_recorder_oldest_event_age_seconds",
                                        "Age of the oldest outbox entry not yet written", value=backlog[1])

    def _hosts(self) -> Iterator[Metric]:
        cap = self.a.capacity()
        specs: list[tuple[str, str, Any]] = [
            ("allocator_gpu_memory_capacity_bytes", "GPU memory of the host", lambda h: h.gpu_memory_mb.total * MIB),
            ("allocator_gpu_memory_allocated_bytes", "GPU memory granted on the host", lambda h: h.gpu_memory_mb.allocated * MIB),
            ("allocator_gpu_memory_available_bytes", "GPU memory of the host free to grant",
             lambda h: h.gpu_memory_mb.available * MIB),
            ("allocator_gpu_memory_unmanaged_bytes", "GPU memory of the host held by processes the allocator does not manage",
             lambda h: h.gpu_memory_mb.unmanaged * MIB),
            ("allocator_gpus", "GPUs of the host", lambda h: len(h.gpus)),
            ("allocator_gpus_idle", "GPUs of the host with no holder and some memory free", lambda h: h.gpus_idle),
            ("allocator_cpu_cores_capacity", "CPU cores the allocator may grant on the host", lambda h: h.cpu_cores.total),
            ("allocator_cpu_cores_allocated", "CPU cores granted on the host (pinned + shared)", lambda h: h.cpu_cores.allocated),
            ("allocator_ram_capacity_bytes", "RAM the allocator may grant on the host", lambda h: h.ram_mb.total * MIB),
            ("allocator_ram_allocated_bytes", "RAM granted on the host", lambda h: h.ram_mb.allocated * MIB),
            ("allocator_active_allocations", "Active allocations on the host", lambda h: h.active_allocations),
            ("allocator_host_ready", "1 when the host's state is ready (it takes new work unless parked)", lambda h: 1 if h.state == "ready" else 0),
            ("allocator_host_parked", "1 when the host is ready but takes no new work: no free core or no free RAM",
             lambda h: 1 if h.parked else 0),
        ]
        for name, doc, fn in specs:
            g = GaugeMetricFamily(name, doc, labels=["host"])
            for h in cap.hosts:
                g.add_metric([h.host_id], float(fn(h)))
            yield g


def build_registry(allocator: Allocator) -> tuple[CollectorRegistry, Histogram]:
    """A registry of its own per app (the agent's metrics live in the default one)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(LedgerCollector(allocator))
    api_latency = Histogram("allocator_api_placement_seconds", "Request received to answered with a grant, in this API process",
                            ["interface"], registry=reg,
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300, 1800))
    return reg, api_latency
