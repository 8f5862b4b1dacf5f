"""``ResourceWorker``: an RQ worker for one host's queue that runs each job inside its grant.

Run it as ``allocator worker --host ID [-n N]`` or with plain RQ:
``rq worker --worker-class workers.ResourceWorker <namespace>.host.<host_id>`` (every rq worker
flag still works; the namespace and host come from the queue name).

In the parent, before forking the work horse: claim the grant (``claim_grant``): it must still be
current (active, on this host, host not lost since, same host generation) and this placement must
not have been claimed by another run already. In the horse: CUDA_VISIBLE_DEVICES, CPU affinity,
thread counts and ALLOCATOR_* variables (see ``workers.pinning``). In the parent after the job, on
every outcome (success, exception, timeout, stop, killed horse): release the allocation, or
requeue the task when it was preempted. The release names the placement it claimed, so a run that
outlived its grant (host declared lost meanwhile, task placed again) frees nothing it no longer
holds.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job

from allocator.agent.fencing import PLACEMENT_FIELDS, GrantStatus, claim_grant, placement_token
from allocator.client import Allocator
from allocator.models import Allocation
from allocator.queue import parse_host_queue

from .pinning import Grant, apply

log = logging.getLogger(__name__)


class ResourceWorker(Worker):
    """Runs jobs of ``<namespace>.host.<host_id>`` with the GPUs and cores they were granted."""

    def __init__(self, queues: Any, *args: Any, allocator: Allocator | None = None, **kwargs: Any) -> None:
        super().__init__(queues, *args, **kwargs)
        parsed = parse_host_queue(self.queues[0].name)
        if parsed is None:
            raise ValueError(f"ResourceWorker listens on a host queue '<namespace>.host.<host_id>', got {self.queues[0].name!r}")
        self.namespace, self.host_id = parsed
        self.allocator = allocator or Allocator(client=_text_client(self.connection), namespace=self.namespace)
        self._grant: Grant | None = None
        self._pid_recorded = 0

    # -- parent side ---------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        claim = claim_grant(self.allocator, job.id, self.name, self.host_id)
        alloc = self.allocator.get(job.id) if claim.current else None
        if alloc is None:
            self._refuse(job, queue, claim)
            return
        self._grant = self._grant_for(alloc)
        self.allocator.record_event("started", job.id, {"host": self.host_id, "worker": self.name,
                                                        "started": self.allocator.now_ms()})
        try:
            super().execute_job(job, queue)
        finally:
            self._grant = None
            self._after(job, claim.token)

    def _refuse(self, job: Job, queue: Queue, claim: GrantStatus) -> None:
        """The job does not start here: its grant is stale, moved, or this placement already runs."""
        log.warning("job %s not started: %s (allocation %s on %s)", job.id, claim.reason, claim.state or "missing",
                    claim.host_id or "no host")
        # RQ moved the id to the queue's intermediate list when it popped it; a job that does not
        # start here must not linger there (RQ's maintenance would later mark it failed).
        queue.intermediate_queue.remove(job.id)
        if claim.reason == "already_claimed" or claim.state in ("pending", "active"):
            # Another run holds this placement, or the task waits in line again, or it is placed
            # elsewhere: this copy of the queue entry is dropped and the job itself left alone.
            return
        try:
            if job.get_status(refresh=True) in ("queued", "deferred", "scheduled"):
                job.cancel()  # its allocation ended (cancelled, expired, failed): it will not run
        except Exception:  # noqa: BLE001 - best effort: the job may already be gone
            log.exception("could not cancel job %s", job.id)

    def _grant_for(self, alloc: Allocation) -> Grant:
        cores = list(alloc.cpu_cores)
        if not cores and alloc.cpu_shared > 0:
            cores = self._shared_pool()
        return Grant(
            allocation_id=alloc.allocation_id,
            host_id=self.host_id,
            gpu_uuids=[g.uuid for g in alloc.gpus],
            gpu_indexes=[g.index for g in alloc.gpus],
            gpu_memory_mb=[g.memory_mb for g in alloc.gpus],
            cores=cores,
            cpu_amount=alloc.cpu_total,
        )

    def _shared_pool(self) -> list[int]:
        """Cores nobody holds exclusively right now: where fractional grants run."""
        cores, cmap = self.allocator.redis.hmget(self.allocator.keys.host(self.host_id), "cores", "cmap")
        ids = json.loads(cores or "[]") or []
        return [c for c, flag in zip(ids, cmap or "") if flag == "1"]

    def _after(self, job: Job, placement: str | None = None) -> None:
        """Release (or requeue when preempted) whatever the job's outcome was; only the placement
        this run claimed (``placement``) is released."""
        a = self.allocator
        if self._pid_recorded:
            # RQ has reset horse_pid by now: use the pid recorded right after the fork.
            a.redis.hdel(a.keys.host_pids(self.host_id), str(self._pid_recorded))
            self._pid_recorded = 0
        task_state = a.redis.hget(a.keys.task(job.id), "state")
        if task_state == "preempting":
            a._call("requeue", job.id, a.pass_depth, a.scan_cap)
            return
        state, *current = a.redis.hmget(a.keys.alloc(job.id), "state", *PLACEMENT_FIELDS)
        if state != "active" or current[0] != self.host_id:
            return  # released meanwhile (cancelled, expired, host lost and requeued elsewhere)
        if placement and placement_token(*current) != placement:
            log.warning("job %s: its host was declared lost while it ran and the task was placed again; "
                        "this run releases nothing", job.id)
            return
        try:
            status = job.get_status(refresh=True)
        except Exception:  # noqa: BLE001 - the job hash is gone (Redis lost its data): still release
            status = None
        a.record_event("finished", job.id, {"host": self.host_id, "status": str(status),
                                            "outcome": "ok" if status == "finished" else str(status)})
        reason = "released" if status == "finished" else "failed"
        a.release(job.id, reason=reason, placement=placement)

    # -- work horse side -----------------------------------------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if self._grant is not None:
            apply(self._grant)
        super().main_work_horse(job, queue)

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        super().fork_work_horse(job, queue)  # only the parent returns here
        if self._grant is not None and self.horse_pid:
            # The GPU memory watchdog maps processes to grants through this hash; the parent
            # writes it on its open connection (the horse would need a new one).
            self._pid_recorded = self.horse_pid
            self.allocator.redis.hset(self.allocator.keys.host_pids(self.host_id), str(self.horse_pid),
                                      self._grant.allocation_id)


def _text_client(connection: redis.Redis) -> redis.Redis:
    """A decoding client on the same server as RQ's (which must return bytes)."""
    pool = connection.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
