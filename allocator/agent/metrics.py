"""Prometheus metrics of the agent, watchdog and reaper (prefix ``allocator_``, base units).

They live in the default registry; ``allocator agent --metrics-port`` and ``allocator reaper
--metrics-port`` serve them. Labels are low-cardinality (host, signal), never allocation ids or
pids: those go in the outbox event that goes with each count.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

AGENT_HOSTS = Gauge("allocator_agent_hosts", "Hosts this agent process serves")
AGENT_ROUND = Histogram(
    "allocator_agent_round_seconds", "Duration of one agent round (inventory, registration, heartbeat, watchdog)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AGENT_REGISTRATIONS = Counter("allocator_agent_registrations", "Host registrations and capacity updates sent", ["reason"])
AGENT_LAST_HEARTBEAT = Gauge("allocator_agent_last_heartbeat_timestamp_seconds", "When this agent last heartbeated (server time)")

GPU_MEMORY_EXCEEDED = Counter(
    "allocator_gpu_memory_exceeded", "Times an allocation was seen using more GPU memory than granted", ["host"]
)
GPU_MEMORY_OVER_GRANT = Gauge(
    "allocator_gpu_memory_over_grant_bytes", "GPU memory used beyond their grants by allocations on the host", ["host"]
)
GPU_PROCESSES_STOPPED = Counter(
    "allocator_gpu_processes_stopped", "Processes the watchdog stopped for exceeding their GPU memory grant", ["host", "signal"]
)

HOSTS_LOST = Counter("allocator_hosts_lost", "Hosts the reaper declared lost (missed heartbeats)")
ALLOCATIONS_RECLAIMED = Counter("allocator_allocations_reclaimed", "Allocations released because their host was lost")
REAPER_PASSES = Counter("allocator_reaper_passes", "Reaper passes completed")
