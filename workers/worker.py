"""``ResourceWorker``: an RQ worker for one host's queue that runs each job inside its grant.

Run it as ``allocator worker --host ID [-n N]`` or with plain RQ:
``rq worker --worker-class workers.ResourceWorker <namespace>.host.<host_id>`` (every rq worker
flag still works; the namespace and host come from the queue name).

In the parent, before forking the work horse: claim the grant (``claim_grant``): it must still be
current (active, on this host, host not lost since, same host generation) and this placement must
not have been claimed by another run already. The same call returns the grant, records the
``started`` event and makes the grant last as long as RQ lets the run go on (``run_lease_s``).
In the horse: CUDA_VISIBLE_DEVICES, CPU affinity, thread counts and ALLOCATOR_* variables (see
``workers.pinning``). In the parent after the fork: the horse's pid into the host's
pid map (for the GPU memory watchdog). In the parent after the job, on every outcome (success,
exception, timeout, stop, killed horse), one call (``finish_job``): the pid leaves the map, and
the allocation is released (with its ``finished`` event) or the task requeued when it was
preempted. The release names the placement it claimed, so a run that outlived its grant (host
declared lost meanwhile, task placed again) frees nothing it no longer holds. Before it, what the
run left behind is killed: the horse's process group, and processes in a session of their own
whose environment names the run. From before the claim to the end of the release the worker
counts as busy, so RQ's warm shutdown (SIGINT, SIGTERM) lets both complete and stops the worker
after them. Each script call is
one round trip, and per-job round trips are what separates this worker's throughput from plain
RQ's on trivial jobs: three per job, where one call per step took fourteen.

Preemption stops a running job with RQ's ``stop-job`` command on the worker's channel. RQ ignores
that command until the job's execution is set up, and one that arrives between that and the fork
would kill the worker's own process group; this worker takes it from the moment it claims the
grant and stops the horse as soon as it exists. A lost command (the channel was down) is caught
at the next monitoring tick (``--job-monitoring-interval``), where the task's state is read
(preempting or cancelled: stop).
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import threading
from typing import Any

import redis
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.worker import WorkerStatus

from allocator.agent.fencing import ClaimedGrant, GrantStatus, claim_grant, finish_job, signal_run
from allocator.client import Allocator
from allocator.queue import parse_host_queue, run_lease_s

from .pinning import Grant, apply, kill_processes_of

log = logging.getLogger(__name__)


class ResourceWorker(Worker):
    """Runs jobs of ``<namespace>.host.<host_id>`` with the GPUs and cores they were granted."""

    def __init__(self, queues: Any, *args: Any, allocator: Allocator | None = None, **kwargs: Any) -> None:
        super().__init__(queues, *args, **kwargs)
        parsed = parse_host_queue(self.queues[0].name)
        if parsed is None:
            raise ValueError(f"ResourceWorker listens on a host queue '<namespace>.host.<host_id>', got {self.queues[0].name!r}")
        if len(self.queues) != 1:
            # Every job it takes is claimed for that one host: another host's task would be
            # refused and dropped, and a plain RQ job cancelled.
            raise ValueError("ResourceWorker listens on exactly one host queue; got "
                             + ", ".join(repr(q.name) for q in self.queues) + " (run one worker per queue)")
        self.namespace, self.host_id = parsed
        # The operator's settings (ALLOCATOR_PASS_DEPTH, _SCAN_CAP, _RECORD_RETENTION_S) apply to the
        # passes and releases a worker runs, as to every other process of the fleet.
        self.allocator = allocator or Allocator.from_env(client=_text_client(self.connection), namespace=self.namespace)
        self._grant: Grant | None = None
        self._claimed = ""  # the placement token of the run in hand
        self._pid_recorded = 0
        # The job between its claim and the end of its run, and a stop asked before its horse
        # existed (the signal to send once it does); the lock orders that with the fork.
        self._job_in_hand: str | None = None
        self._kill_pending: int | None = None
        self._horse_lock = threading.Lock()
        # Bytes the horse writes and the parent reads (an anonymous mapping is shared across the
        # fork): [0] how the run ended, for the release when RQ has already deleted the job's hash;
        # [1] whether the horse took the job id off the queue's intermediate list.
        self._outcome_cell = mmap.mmap(-1, 2)
        # A job in hand, from before its claim to the end of its release (see get_state).
        self._holding = False

    # -- command channel -------------------------------------------------------------------------

    #: Seconds the command-channel thread (stop-job and other RQ commands) waits per read; RQ uses 60.
    #: redis-py 8.2's PubSubWorkerThread.stop() waits for the thread to end, and RQ's teardown
    #: unsubscribes before it stops the thread: a thread that has already read the unsubscribe
    #: waits up to this long for a new subscription before it sees the stop, so with 60 s a burst
    #: or SIGTERM'd worker sat a minute at exit. One read a second costs nothing.
    PUBSUB_POLL_S = 1.0

    def subscribe(self) -> None:
        """RQ's subscribe, with the short read timeout above."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.PUBSUB_POLL_S, daemon=True,
            exception_handler=getattr(self, "_pubsub_exception_handler", None),
        )

    # -- parent side ---------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        # One round trip before the fork: the claim also returns the grant and records "started".
        # From then on a preemption may send stop-job for this job (see get_current_job_id).
        self._job_in_hand = job.id
        self._holding = True
        try:
            claim = claim_grant(self.allocator, job.id, self.name, self.host_id, start=True,
                                run_lease_s=self.run_lease_s(job))
            if not claim.current or claim.grant is None:
                self._refuse(job, queue, claim)
                return
            self._grant = self._grant_for(job.id, claim.grant, claim.token or "")
            self._claimed = claim.token or ""
            self._outcome_cell[0], self._outcome_cell[1] = _UNKNOWN, 0
            try:
                super().execute_job(job, queue)
            finally:
                self._grant = None
                self._after(job, claim.token, queue)
        finally:
            self._holding = False
            self._claimed = ""
            with self._horse_lock:
                self._job_in_hand, self._kill_pending = None, None
                # A stop that came after the horse had ended (a preemption just after the run):
                # RQ clears its mark only in its failure handler, and the mark would make the
                # next run of this job (a retry, the task placed again) count as stopped.
                if self._stopped_job_id == job.id:
                    self._stopped_job_id = None

    def get_state(self) -> str:
        """RQ's, but busy while a job is in hand, from before its claim to the end of its release.
        RQ's warm shutdown (SIGINT, SIGTERM) lets a busy worker finish and stop at its next loop,
        and raises StopRequested wherever an idle one is; RQ counts a worker busy only from the
        execution it sets up after the claim until the horse ends, before the release. A stop
        raised in the claim would leave a claimed job that never runs and holds its grant (for
        ever without a time limit); in the release, an allocation never released."""
        if self._holding:
            return WorkerStatus.BUSY
        return super().get_state()

    def run_lease_s(self, job: Job) -> float:
        """How long the job's run may hold its grant (``allocator.queue.run_lease_s`` with this
        worker's monitoring interval): the horse stops itself at the job's timeout and the parent
        kills it once it is 60 s past it, at a monitoring tick; ``math.inf`` for timeout -1. The
        claim moves the deadline of an allocation with a TTL to the claim time plus this when that
        is later, or removes it for a job without a time limit, so a TTL never frees GPUs the run
        still uses."""
        return run_lease_s(job.timeout, self.job_monitoring_interval)

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
        if claim.reason == "expired":
            # The claim itself released the allocation: what waits for its resources is placed
            # now rather than at the scheduler's next tick (the claim script runs no pass, which
            # would put the queue's scripts on every job start).
            try:
                self.allocator.schedule()
            except Exception:  # noqa: BLE001 - the scheduler's tick places them anyway
                log.exception("scheduling pass after the expired allocation %s failed", job.id)

    def _grant_for(self, allocation_id: str, g: ClaimedGrant, placement: str) -> Grant:
        """The grant as the work horse applies it; a grant without exclusive cores (a share of
        the CPU, or none) runs only on the host's cores nobody held exclusively at the claim, and
        at idle priority when there were none (see ``workers.pinning.apply``)."""
        return Grant(
            allocation_id=allocation_id,
            host_id=self.host_id,
            gpu_uuids=[x["uuid"] for x in g.gpus],
            gpu_indexes=[int(x["index"]) for x in g.gpus],
            gpu_memory_mb=[int(x["memory_mb"]) for x in g.gpus],
            cores=list(g.cores or g.pool),
            cpu_amount=g.cpu_amount,
            shared_pool=not g.cores,
            placement=placement,
        )

    def _after(self, job: Job, placement: str | None = None, queue: Queue | None = None) -> None:
        """Release (or requeue when preempted) whatever the job's outcome was; only the placement
        this run claimed (``placement``) is released. One script call (``finish_job``) also drops
        the horse from the host's pid map and records the ``finished`` event; the job's status is
        read inside it, since after a normal horse exit the parent's copy of the job is stale. The
        horse's own word on the outcome goes along for a job whose hash RQ deleted on success
        (``result_ttl=0``): without it the script could only count the run as failed."""
        pid, self._pid_recorded = self._pid_recorded, 0
        if pid:
            # Whatever the run started and left behind (a subprocess after a timeout or a killed
            # horse) still runs pinned to the grant: it goes before the grant is handed on. The
            # horse led its own process group; its children are in it, unless they started one
            # of their own (a new session): those are found by the grant in their environment.
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            kill_processes_of(job.id, placement or "")
        if queue is not None:
            if not self._outcome_cell[1]:
                self._leave_intermediate_list(job, queue)
            self._fail_abandoned(job, queue)
        outcome = _OUTCOMES.get(self._outcome_cell[0])
        end = finish_job(self.allocator, job.id, self.host_id, placement, horse_pid=pid, outcome=outcome,
                         job_key=job.key)
        if end.stale:
            log.warning("job %s: its host was declared lost while it ran and the task was placed again; "
                        "this run releases nothing", job.id)

    def _leave_intermediate_list(self, job: Job, queue: Queue) -> None:
        """A run stopped before its horse took the job id off the queue's intermediate list (a
        preemption or cancel right after the claim kills it sooner): RQ's maintenance would fail
        the job it finds there later, a run of it that succeeded meanwhile included. (One more
        round trip, for such a run only; removing an id that is gone does nothing.)"""
        try:
            queue.intermediate_queue.remove(job.id)
        except redis.RedisError:  # the release below must still be tried
            log.exception("job %s: could not remove it from %s's intermediate list", job.id, queue.name)

    def _fail_abandoned(self, job: Job, queue: Queue) -> None:
        """A run still "started" once its horse is gone was ended by no one: a cold shutdown
        (a second Ctrl+C, SIGTERM twice) kills the horse and leaves the job as it was, where RQ
        would later find it abandoned and retry it, by then with its grant released as failed.
        Its failure is handled here, so that a Retry puts the task back in line now."""
        try:
            if job.get_status(refresh=True) != JobStatus.STARTED:
                return
            if self.allocator.redis.hget(self.allocator.keys.task(job.id), "state") in ("preempting", "cancelled"):
                # Its stop was on its way (a preemption, a cancel): a stopped run, which RQ does
                # not retry and finish_job puts back in line (preempted) or leaves ended.
                self._stopped_job_id = job.id
            self.handle_job_failure(job, queue, exc_string="the worker shut down while the job ran (cold shutdown)")
        except InvalidJobOperation:
            return  # RQ deleted the job's hash (a success kept with result_ttl=0): it ended
        except Exception:  # noqa: BLE001 - the release below must happen whatever this does
            log.exception("job %s: could not record the end of its run", job.id)

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "",
                           execution: Any = None) -> None:
        """RQ's, but a run stopped because its task runs again (preempted, or its host declared
        lost: back in line, or placed again) is not filed as failed. RQ's filing would apply the
        job's failure_ttl to its hash, an expiry, or at 0 its deletion, and the job would be gone
        before its next run (its grant then held by a stub no worker runs)."""
        if job.id != self._job_in_hand and self._stuck_before_its_claim(job, queue):
            return
        saved = self.disable_default_exception_handler
        if self._stopped_job_id == job.id and self._runs_again(job.id):
            self.disable_default_exception_handler = True  # (RQ's switch for exactly that filing)
        try:
            super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string,
                                       execution=execution)
        finally:
            self.disable_default_exception_handler = saved

    def _stuck_before_its_claim(self, job: Job, queue: Queue) -> bool:
        """RQ's maintenance fails a job left in a queue's intermediate list by a worker that died
        after taking it and before its claim. Its grant is still placed for it on this host and
        nobody claimed it: it goes back to the head of the host queue for a live worker (RQ then
        drops it from the intermediate list), where failing it left the grant held until its TTL."""
        state, host, claim = self.allocator.redis.hmget(self.allocator.keys.alloc(job.id), "state", "host", "claim")
        if state != "active" or host != self.host_id or claim:
            return False
        log.warning("job %s was taken by a worker that died before starting it; back to the head of %s",
                    job.id, queue.name)
        queue.connection.lpush(queue.key, job.id)
        return True

    def _runs_again(self, job_id: str) -> bool:
        """Whether the task goes back in line (preempted, or its host declared lost) or was placed
        again under another placement than this run's claim (elsewhere, or on this host anew)."""
        task_state, state, host, host_gen, requeues = self._standing(job_id)
        if task_state in ("preempting", "pending"):
            return True
        return state == "active" and bool(self._claimed) and (
            host != self.host_id or _placed_again(self._claimed, host_gen, requeues))

    def _standing(self, job_id: str) -> tuple[str | None, ...]:
        """The task's state, and its allocation's state, host, host generation and requeue count."""
        k = self.allocator.keys
        pipe = self.allocator.redis.pipeline(transaction=False)
        pipe.hget(k.task(job_id), "state")
        pipe.hmget(k.alloc(job_id), "state", "host", "host_gen", "requeues")
        task_state, fields = pipe.execute()
        return (task_state, *fields)

    # -- stopping a running job -------------------------------------------------------------------

    def get_current_job_id(self) -> str | None:
        """The claimed job as soon as it is claimed: RQ's stop-job handler compares against this,
        and a preemption can come right after the claim recorded "started"."""
        return self._job_in_hand or super().get_current_job_id()

    def kill_horse(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """RQ's kill_horse, safe before the horse exists: the signal is kept and sent right after the
        fork (RQ would signal the worker's own process group, since a missing horse's pid is 0)."""
        with self._horse_lock:
            pid = self.horse_pid
            if not pid:
                if self._job_in_hand is not None:
                    self._kill_pending = sig
                return
        self._signal_horse(pid, sig)

    def _signal_horse(self, pid: int, sig: int) -> None:
        try:
            signal_run(pid, sig)
            self.log.info("Worker %s: killed horse pid %s", self.name, pid)
        except ProcessLookupError:
            self.log.debug("Worker %s: horse already dead", self.name)

    def maintain_heartbeats(self, job: Job, execution: Any) -> None:
        """RQ's heartbeat at each monitoring tick, plus the backstop for a stop-job command this worker
        never received: a job whose task was preempted or cancelled, or whose allocation is no
        longer active on this host, is stopped as the command would have."""
        super().maintain_heartbeats(job, execution)
        if self._pid_recorded:
            # Again at every tick: after Redis lost its data (allocator recover) the map is back
            # within one tick, and the agent's watchdog tells this run's GPU memory from others'.
            self._record_pid()
        if self._stopped_job_id == job.id:
            return
        state, alloc_state, host, host_gen, requeues = self._standing(job.id)
        why = None
        if state in ("preempting", "cancelled"):
            why = f"its task is {state}"
        elif alloc_state is not None and (alloc_state != "active" or host != self.host_id):
            # Its grant ended (a user's release, a preemption, an expiry) with no task hash to mark
            # or no worker to tell: a run restored by `allocator recover` has neither. A record
            # that is missing (Redis lost its data, not yet recovered) stops nothing.
            why = f"its allocation is {alloc_state}" + (f" on {host}" if alloc_state == "active" else "")
        elif alloc_state is not None and self._claimed and _placed_again(self._claimed, host_gen, requeues):
            # Its host was declared lost while it ran, and the task placed again on the same host
            # once it came back: that placement's run gets the grant, this one holds nothing.
            why = "its task was placed again on this host since this run's claim (the host was declared lost)"
        if why:
            log.warning("job %s: %s but the stop command did not arrive; stopping it now", job.id, why)
            self._stopped_job_id = job.id
            self.kill_horse()

    # -- work horse side -----------------------------------------------------------------------

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if self._grant is not None:
            apply(self._grant)
        super().main_work_horse(job, queue)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's (in the horse), which tells the parent when it took the id off the intermediate list."""
        super().prepare_job_execution(job, remove_from_intermediate_queue)
        if remove_from_intermediate_queue:
            self._outcome_cell[1] = 1

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        """RQ's perform_job (in the horse), which tells the parent how it ended (see ``_after``)."""
        ok = super().perform_job(job, queue, execution)
        self._outcome_cell[0] = _FINISHED if ok else _FAILED
        return ok

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        super().fork_work_horse(job, queue)  # only the parent returns here
        with self._horse_lock:
            sig, self._kill_pending = self._kill_pending, None
        if sig is not None and self.horse_pid:
            self._signal_horse(self.horse_pid, sig)  # stopped before it existed (see kill_horse)
        if self._grant is not None and self.horse_pid:
            self._pid_recorded = self.horse_pid
            self._record_pid()

    def _record_pid(self) -> None:
        """The running horse in the host's pid map, through which the GPU memory watchdog maps
        processes to grants; the parent writes it on its open connection (the horse would need a
        new one)."""
        assert self._grant is not None
        self.allocator.redis.hset(self.allocator.keys.host_pids(self.host_id), str(self._pid_recorded),
                                  self._grant.allocation_id)


_UNKNOWN, _FINISHED, _FAILED = 0, 1, 2
_OUTCOMES = {_FINISHED: "finished", _FAILED: "failed"}


def _placed_again(claimed: str, host_gen: str | None, requeues: str | None) -> bool:
    """Whether the record's placement is a later one than the claimed token's (see
    ``placement_token``): a new host generation or one more requeue. (Its placement time is not
    compared: ``allocator recover`` restores it from the history, to the millisecond it keeps.)"""
    _, gen, _, n = claimed.split("|")
    return (host_gen or "1", requeues or "0") != (gen, n)


def _text_client(connection: redis.Redis) -> redis.Redis:
    """A decoding client on the same server as RQ's (which must return bytes)."""
    pool = connection.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
