"""``ResourceWorker``: an RQ worker for one host's queue that runs each job inside its grant.

Run it as ``allocator worker --host ID [-n N]`` or with plain RQ:
``rq worker --worker-class workers.ResourceWorker <namespace>.host.<host_id>`` (every rq worker
flag still works; the namespace and host come from the queue name).

In the parent, before forking the work horse: check the grant is still current (active, host not
lost since, same host generation). In the horse: CUDA_VISIBLE_DEVICES, CPU affinity, thread
counts and ALLOCATOR_* variables (see ``workers.pinning``). In the parent after the job, on every
outcome (success, exception, timeout, stop, killed horse): release the allocation, or requeue the
task when it was preempted.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job

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

    # -- parent side ---------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        alloc = self.allocator.get(job.id)
        if not self._grant_is_current(alloc):
            self._refuse(job, alloc)
            return
        assert alloc is not None
        self._grant = self._grant_for(alloc)
        self.allocator.record_event("started", job.id, {"host": self.host_id, "worker": self.name,
                                                        "started": self.allocator.now_ms()})
        try:
            super().execute_job(job, queue)
        finally:
            self._grant = None
            self._after(job)

    def _grant_is_current(self, alloc: Allocation | None) -> bool:
        """Refuses stale grants: released meanwhile, or made before this host was declared lost."""
        if alloc is None or alloc.state != "active" or alloc.host_id != self.host_id:
            return False
        check = getattr(self.allocator, "grant_is_current", None)
        if check is not None:
            return bool(check(alloc.allocation_id))
        return True

    def _refuse(self, job: Job, alloc: Allocation | None) -> None:
        state = alloc.state if alloc else "missing"
        log.warning("job %s not started: its allocation is %s (stale or moved)", job.id, state)
        if state != "pending":  # a requeued task waits again; anything else will not run here
            try:
                job.cancel()
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

    def _after(self, job: Job) -> None:
        """Release (or requeue when preempted) whatever the job's outcome was."""
        a = self.allocator
        if self.horse_pid:
            a.redis.hdel(a.keys.host_pids(self.host_id), str(self.horse_pid))
        task_state = a.redis.hget(a.keys.task(job.id), "state")
        if task_state == "preempting":
            a._call("requeue", job.id, a.pass_depth, a.scan_cap)
            return
        current = a.get(job.id)
        if current is None or current.state != "active" or current.host_id != self.host_id:
            return  # released meanwhile (cancelled, expired, host lost and requeued elsewhere)
        status = job.get_status(refresh=True)
        a.record_event("finished", job.id, {"host": self.host_id, "status": str(status),
                                            "outcome": "ok" if status == "finished" else str(status)})
        reason = "released" if status == "finished" else "failed"
        a.release(job.id, reason=reason)

    # -- work horse side -----------------------------------------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if self._grant is not None:
            apply(self._grant)
            # The GPU memory watchdog maps processes to grants through this hash.
            keys = self.allocator.keys
            self.allocator.redis.hset(keys.host_pids(self.host_id), str(os.getpid()), self._grant.allocation_id)
        super().main_work_horse(job, queue)


def _text_client(connection: redis.Redis) -> redis.Redis:
    """A decoding client on the same server as RQ's (which must return bytes)."""
    pool = connection.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
