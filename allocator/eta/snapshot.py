"""One consistent read of the ledger for the simulation, with per-id caches of what does not
change while a task waits or an allocation runs."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import redis

from .fleet import Snapshot, _ALLOC_FIELDS, _Req, _TASK_FIELDS, _front_score

if TYPE_CHECKING:
    from ..client import Allocator


class _Cache:
    """Per-id caches of what does not change: payloads of pending tasks, records of running ones."""

    def __init__(self, limit: int = 200_000) -> None:
        # payload, kind, seq, line score, when RQ discards the job (ms; None: never)
        self.tasks: dict[str, tuple[str, str, int, float, int | None]] = {}
        self.reqs: dict[str, _Req] = {}
        self.allocs: dict[str, tuple[float, dict[str, Any], str | None]] = {}  # byprio score, record, host cver
        self.jobs: dict[str, tuple[str, int, float]] = {}  # running function tasks: payload, seq, byprio score
        self.limit = limit

    def trim(self, pending: set[str], active: set[str]) -> None:
        if len(self.tasks) > self.limit:
            self.tasks = {k: v for k, v in self.tasks.items() if k in pending}
            self.reqs = {k: v for k, v in self.reqs.items() if k in pending}
        if len(self.allocs) > self.limit:
            self.allocs = {k: v for k, v in self.allocs.items() if k in active}
        if len(self.jobs) > self.limit:
            self.jobs = {k: v for k, v in self.jobs.items() if k in active}


def _parse_alloc(aid: str, f: dict[str, Any], score: float) -> dict[str, Any] | None:
    """An active allocation record as the simulation needs it (None if it is not active)."""
    if f.get("state") != "active" or not f.get("host"):
        return None
    try:
        gpus = json.loads(f.get("gpus") or "[]")
        cores = json.loads(f.get("cores") or "[]")
    except ValueError:
        return None
    try:
        grants = [(int(g["pos"]), str(g["uuid"]), int(g["memory_mb"])) for g in gpus]
    except (TypeError, KeyError, ValueError):
        return None
    return {
        "id": aid, "host": f["host"], "grants": grants,
        "cores": len(cores) if isinstance(cores, list) else 0, "core_ids": cores if isinstance(cores, list) else [],
        "shared": int(f.get("shared_millis") or 0),
        "ram": int(f.get("ram_mb") or 0), "priority": int(f.get("priority") or 1), "kind": f.get("kind"),
        "start": int(f.get("activated") or 0) or int(10**13 - 1 - (score - int(score // 10**13) * 10**13)),
        "task_type": f.get("task_type"), "slots": int(f.get("slots") or 0),
        "hinted": int(f.get("expected_ms") or 0) > 0, "unbounded": f.get("unbounded") == "1",
    }


def read_snapshot(a: Allocator, *, cache: _Cache | None = None, attempts: int = 5) -> Snapshot:
    """A consistent read of what the simulation needs (``WATCH`` on the outbox stream; every
    ledger script appends to it, so an unchanged stream means an unchanged ledger)."""
    t0 = time.perf_counter()
    k = a.keys
    cache = cache if cache is not None else _Cache()
    reread: set[str] = set()
    for attempt in range(attempts):
        pipe = a.redis.pipeline(transaction=True)
        try:
            if attempt < attempts - 1:
                pipe.watch(k.events)
                reader: Any = pipe
            else:
                reader = a.redis  # last try: no isolation; inconsistencies are tolerated below
            host_ids = reader.zrange(k.hosts, 0, -1)
            pending = reader.zrange(k.pending, 0, -1, withscores=True)
            delayed = reader.zrange(k.delayed, 0, -1, withscores=True)
            byprio = reader.zrange(k.byprio, 0, -1, withscores=True)
            if reader is pipe:
                pipe.multi()
            else:
                pipe = a.redis.pipeline(transaction=False)
            for h in host_ids:
                pipe.hgetall(k.host(h))
            new_allocs = [aid for aid, score in byprio
                          if aid in reread or cache.allocs.get(aid, (None,))[0] != score]
            for aid in new_allocs:
                pipe.hmget(k.alloc(aid), *_ALLOC_FIELDS)
            # By id and line score: the score holds the submission's sequence number, so an id
            # submitted again (after its record was purged) is read again.
            new_tasks = [tid for tid, score in pending if cache.tasks.get(tid, (None,) * 4)[3] != score]
            for tid in new_tasks:
                pipe.hmget(k.task(tid), *_TASK_FIELDS)
                pipe.pttl(k.rq_job(tid))  # RQ's ttl: a job RQ discards while it waits never starts
            pipe.zrange(k.ends, 0, -1, withscores=True)
            pipe.zrange(k.expiry, 0, -1, withscores=True)  # a worker's claim moves a deadline
            pipe.hgetall(k.durations)
            pipe.hget(k.seq, "recovering")
            pipe.time()
            pipe.hkeys(k.preempting)
            # Whether the walk may take the list of the hosts a request allows (the host sets in step).
            pipe.hmget(k.names, "hosts", "mhosts", "lhosts", "stamp")
            pipe.hget(k.seq, "cver")
            res = pipe.execute()
        except redis.WatchError:
            continue
        finally:
            pipe.reset()
        # A registration rewrites the grants of the host's allocations (a whole GPU's grant grows,
        # GPUs renumber): records read under another registration of their host are read again.
        cver = {h: (res[i] or {}).get("cver") for i, h in enumerate(host_ids)}
        fresh = set(new_allocs)
        stale = {aid for aid, _ in byprio if aid not in fresh and aid in cache.allocs
                 and cache.allocs[aid][2] != cver.get(cache.allocs[aid][1]["host"])}
        if not stale or attempt == attempts - 1:
            break
        reread |= stale
    i = len(host_ids)
    hosts: dict[str, dict[str, str]] = {h: res[j] for j, h in enumerate(host_ids) if res[j]}
    byprio_score = dict(byprio)
    for aid in new_allocs:
        rec = _parse_alloc(aid, dict(zip(_ALLOC_FIELDS, res[i])), byprio_score[aid])
        i += 1
        if rec is not None:
            cache.allocs[aid] = (byprio_score[aid], rec, cver.get(rec["host"]))
    pending_score = dict(pending)
    new_pttl: dict[str, int] = {}
    for tid in new_tasks:
        f = dict(zip(_TASK_FIELDS, res[i]))
        new_pttl[tid] = int(res[i + 1])
        i += 2
        if f.get("payload") and f.get("state") in ("pending", None):
            cache.tasks[tid] = (f["payload"], f.get("kind") or "lease", int(f.get("seq") or 0), pending_score[tid], None)
        else:
            cache.tasks.pop(tid, None)
    ends = dict(res[i])
    expiry = dict(res[i + 1])
    durations_raw = res[i + 2] or {}
    recovering = res[i + 3] == "1"
    srv = res[i + 4]
    stopping = res[i + 5] or []
    counted, n_hosts = res[i + 6], len(host_ids)
    base = int(counted[0] or -1) == n_hosts and counted[3] == (res[i + 7] or "0")
    name_sets = (base and int(counted[1] or -1) == n_hosts, base and int(counted[2] or -1) == n_hosts)
    if a.clock is not None:
        now = int(a.clock() * 1000)
    else:
        now = int(srv[0]) * 1000 + int(srv[1]) // 1000
    for tid, pttl in new_pttl.items():
        t = cache.tasks.get(tid)
        if t is not None and t[1] == "job" and pttl != -1:  # -1: kept for good; -2: gone already
            cache.tasks[tid] = (*t[:4], now + max(0, pttl))
    durations: dict[str, dict[str, Any]] = {}
    for t, v in durations_raw.items():
        try:
            e = json.loads(v)
        except ValueError:
            continue
        if isinstance(e, dict):
            durations[t] = e
    allocs = []
    for aid, score in byprio:
        rec = cache.allocs.get(aid, (None, None))[1]
        if rec is None:
            continue
        allocs.append({**rec, "end": ends.get(aid), "expires": int(expiry.get(aid) or 0)})
    pend = []
    rq_gone: dict[str, int] = {}
    for tid, score in pending:
        t = cache.tasks.get(tid)
        if t is not None:
            pend.append((tid, score, t[0], t[1], t[2]))
            if t[4] is not None:
                rq_gone[tid] = t[4]
    # Preempted jobs whose worker is stopping the run go back to the front of their priority when
    # it reports (requeue_task): in line already, as far as start times go.
    if stopping:
        pipe = a.redis.pipeline(transaction=False)
        for tid in stopping:
            pipe.hmget(k.task(tid), *_TASK_FIELDS)
        in_line = {p[0] for p in pend}
        for tid, (kind, payload, seq, state) in zip(stopping, pipe.execute()):
            if state == "preempting" and payload and tid not in in_line:
                try:
                    prio = int(json.loads(payload).get("priority", 1))
                except (ValueError, TypeError, AttributeError):
                    continue
                pend.append((tid, _front_score(prio, int(seq or 0)), payload, kind or "job", int(seq or 0)))
    # Running function tasks' requests, for a simulated preemption to put back in line: only when a
    # task in line may preempt; they do not change while they run (cached by id).
    jobs: dict[str, tuple[str, int]] = {}
    if any('"preempt":true' in p[2].replace(" ", "") for p in pend):
        running = [x["id"] for x in allocs if x.get("kind") == "job"]
        # By id and placement (byprio score): an id placed again is another run, maybe of another request.
        unread = [aid for aid in running if cache.jobs.get(aid, (None,) * 3)[2] != byprio_score[aid]]
        if unread:
            pipe = a.redis.pipeline(transaction=False)
            for aid in unread:
                pipe.hmget(k.task(aid), "payload", "seq")
            for aid, (payload, seq) in zip(unread, pipe.execute()):
                if payload:
                    cache.jobs[aid] = (payload, int(seq or 0), byprio_score[aid])
        jobs = {aid: cache.jobs[aid][:2] for aid in running if aid in cache.jobs}
    catalogs: dict[str, set[str]] = {}
    if any('"services"' in p[2] for p in pend):
        # Which host can run which shared named service (changes only with the host's agent).
        pipe = a.redis.pipeline(transaction=False)
        for h in hosts:
            pipe.hkeys(k.svc_catalog(h))
        catalogs = {h: set(names) for h, names in zip(hosts, pipe.execute())}
    cache.trim({p[0] for p in pend}, {x["id"] for x in allocs})
    return Snapshot(now=now, hosts=hosts, allocs=allocs, pending=pend, durations=durations, catalogs=catalogs,
                    pass_depth=a.pass_depth, scan_cap=a.scan_cap, recovering=recovering, name_sets=name_sets,
                    read_ms=(time.perf_counter() - t0) * 1000,
                    delayed={tid: int(nb) for tid, nb in delayed if nb > now}, jobs=jobs, rq_gone=rq_gone)
