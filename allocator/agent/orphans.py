"""Runs orphaned by a dead worker: the agent frees their grants.

A worker parent releases a job's allocation after its work horse ends. If the parent itself dies
(``kill -9``, the OOM killer, a crash) nobody would: the grant stays held until its TTL (an hour
by default, never for ``ttl_seconds=None``), although the host and its agent are fine, so the
reaper never steps in. The agent runs on the worker's machine and can see its processes, so it
closes that gap.

A worker claims each placement before it starts the job (``claim_grant.lua``); the claim records
the worker's machine and pid. Each check, for the allocations of the agent's hosts that a worker
on this machine claimed, and the work horses in ``Keys.host_pids(host)`` (pid -> allocation id):

- the worker parent alive: nothing to do;
- the parent dead and a work horse of the run alive: it keeps running, and keeps its grant,
  until it exits; but once its grant has ended (its task preempted or cancelled, its allocation
  released, or placed again), the agent kills it, as the stop its worker can no longer take
  would have, so that nothing runs on what the ledger has handed on;
- neither alive: the run is over and nobody will release it. The agent does what the worker
  would have done after the run, in the same script (``finish_job.lua``), with the placement the
  worker claimed (so a newer placement of the same task is never touched): a ``finished`` outbox
  event (with ``worker_lost: true``) and the release, reason ``released`` when the RQ job finished, ``failed`` otherwise (a
  job hash that is gone counts as ``lost``); a failed run that RQ's ``Retry`` put back goes back
  in line (reason ``retried``); a task that was being preempted is requeued, or done when its
  run had finished. Dead horses leave the pid map.

A pid that exists is taken as alive (a reused pid only delays the release). Zombies count as
dead. Claims made on another machine are left to that machine's agent. A run killed with its
worker (the OOM killer, ``docker kill``) leaves its RQ job ``started``: with retries left, the
same script retries it as RQ retries an abandoned job (one retry fewer, RQ's interval), since
RQ's own maintenance would do so later, with the grant already released, and the worker would
then refuse the claim and cancel the job. RQ's ``on_failure`` callback, which its maintenance
calls for an abandoned job, is not called: the agent runs no code of the job's. Without retries
left the job stays ``started`` until RQ's maintenance moves it to the failed registry.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from ..client import Allocator
from .fencing import PLACEMENT_FIELDS, finish_job, node_name, placement_token, signal_run

log = logging.getLogger(__name__)

DEFAULT_ORPHAN_CHECK_S = 5.0


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this machine (zombies are dead)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.ZombieProcess:
        return False
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclass
class OrphanReport:
    released: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    running_without_worker: list[str] = field(default_factory=list)  # horse alive, parent dead
    stopped: list[str] = field(default_factory=list)  # such a horse killed: its grant had ended


class OrphanReaper:
    """Finds and frees runs whose worker died on this machine (see the module docstring)."""

    def __init__(self, allocator: Allocator, *, every_s: float = DEFAULT_ORPHAN_CHECK_S, node: str | None = None) -> None:
        self.allocator = allocator
        self.every_s = every_s
        self.node = node or node_name()
        self._next = 0.0
        self._not_jobs: set[str] = set()  # leases: never claimed by a worker, skipped after one look

    def maybe_check(self, hosts: Iterable[str]) -> OrphanReport | None:
        """``check`` at most every ``every_s`` seconds (``every_s`` <= 0: never)."""
        if self.every_s <= 0 or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every_s
        return self.check(hosts)

    def check(self, hosts: Iterable[str]) -> OrphanReport:
        a = self.allocator
        hosts = list(hosts)
        rep = OrphanReport()
        if not hosts:
            return rep
        pipe = a.redis.pipeline(transaction=False)
        for h in hosts:
            pipe.smembers(a.keys.host_allocs(h))
            pipe.hgetall(a.keys.host_pids(h))
        replies = pipe.execute()
        horses: dict[str, list[tuple[str, int]]] = {}  # allocation id -> [(host, pid)]
        active: set[str] = set()
        for i, h in enumerate(hosts):
            active.update(replies[2 * i])
            for pid, aid in replies[2 * i + 1].items():
                if pid.isdigit():
                    horses.setdefault(aid, []).append((h, int(pid)))
        self._not_jobs &= active
        ids = sorted((active - self._not_jobs) | set(horses))
        if not ids:
            return rep
        fields = ("state", *PLACEMENT_FIELDS, "kind", "claim", "claimed_node", "claimed_pid")
        pipe = a.redis.pipeline(transaction=False)
        for aid in ids:
            pipe.hmget(a.keys.alloc(aid), *fields)
            pipe.hget(a.keys.task(aid), "state")
        rows = pipe.execute()
        for n, aid in enumerate(ids):
            rec = dict(zip(fields, rows[2 * n]))
            task_state = rows[2 * n + 1]
            if rec["kind"] != "job" and rec["state"] is not None and aid not in horses:
                self._not_jobs.add(aid)
                continue
            if not rec["claim"] or rec["claimed_node"] != self.node:
                continue  # not started by a worker, or by one on another machine
            worker_pid = int(rec["claimed_pid"]) if (rec["claimed_pid"] or "").isdigit() else 0
            if pid_alive(worker_pid):
                continue
            runs = horses.get(aid, [])
            if any(pid_alive(pid) for _, pid in runs):
                if _grant_ended(rec, task_state):
                    _kill(runs)  # no worker is left to take the stop its grant's end sent
                    rep.stopped.append(aid)
                    log.warning("job %s on %s: its worker died and its grant ended (%s); its run was stopped",
                                aid, rec["host"], task_state or rec["state"])
                else:
                    rep.running_without_worker.append(aid)
                continue
            self._settle(aid, rec, task_state, runs, rep)
        return rep

    def _settle(self, aid: str, rec: dict[str, str | None], task_state: str | None, runs: list[tuple[str, int]],
                rep: OrphanReport) -> None:
        """The worker and every horse of the run are gone: do what the worker would have done."""
        a = self.allocator
        for h, pid in runs:
            a.redis.hdel(a.keys.host_pids(h), str(pid))
        if task_state != "preempting":
            if not _holds_its_claim(rec):
                return  # already ended, or placed again since that run: not this run's to release
        # What the worker itself does after a run (finish_job.lua): a preempted task back in line,
        # a failed run RQ's Retry put back ("queued"/"scheduled") in line again, else the release,
        # "released" for a finished job and "failed" otherwise. A job hash that is gone (a
        # success kept with result_ttl=0, known only to the dead worker) counts as lost.
        end = finish_job(a, aid, rec["host"] or "", rec["claim"], outcome="lost", job_key=a.keys.rq_job(aid),
                         worker_lost=True)
        if end.requeued:
            rep.requeued.append(aid)
        if end.released and not end.requeued:
            rep.released.append(aid)
        if end.requeued or end.released:
            log.warning("job %s on %s: its worker (pid %s) died; %s (job %s)", aid, rec["host"], rec["claimed_pid"],
                        "back in line" if end.requeued else "allocation released", end.status or "gone")


def _grant_ended(rec: dict[str, str | None], task_state: str | None) -> bool:
    """Whether a run's grant has ended: its task is preempted or cancelled, or its allocation is
    no longer active under the placement the run claimed. A record that is missing (Redis lost
    its data, not yet recovered) ends nothing."""
    if task_state in ("preempting", "cancelled"):
        return True
    return rec["state"] is not None and not _holds_its_claim(rec)


def _holds_its_claim(rec: dict[str, str | None]) -> bool:
    """Whether the allocation is active under the placement its run claimed."""
    return rec["state"] == "active" and placement_token(*(rec[f] for f in PLACEMENT_FIELDS)) == rec["claim"]


def _kill(runs: list[tuple[str, int]]) -> None:
    """SIGKILL to each horse and what it started (a horse leads its own process group), as the
    worker's stop would have sent. Only to a process that still looks like a work horse (a fork
    of its worker, whose command line names the worker): a pid reused by another process
    meanwhile is left alone."""
    for _, pid in runs:
        try:
            if not any("worker" in part for part in psutil.Process(pid).cmdline()):
                continue
            signal_run(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
