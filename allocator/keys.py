"""Every Redis key name of the allocator is built here and nowhere else.

All keys of one namespace share the hash tag ``{<namespace>}`` so that each ledger script touches a
single Redis Cluster slot; several fleets (or test runs) share one Redis by using different
namespaces.
"""

from __future__ import annotations

from dataclasses import dataclass

# The scores of a GPU in first fit's orders (reindex_gpu in lua/includes/ledger.lua): gpu_ord and
# gpu_idle_ord by its host's registration ordinal, then its position; gpu_ffc by its free-memory
# class first.
FF_CLASSES = 9
FF_SHIFT = 2**40


#: Most GPUs a host may have: a GPU's position is kept in the low 10 bits of its ordinal scores.
MAX_GPUS_PER_HOST = 1024

#: Lifetime of a wake token for a host's service supervisor (lua/includes/ledger.lua has the
#: same figure): long enough for a busy supervisor to read it, short enough not to outlive one.
SVC_WAKE_TTL_MS = 300_000


def gpu_ord_score(ord_: int, pos: int) -> int:
    """The gpu_ord (and gpu_idle_ord) score of the GPU at position pos of the host with ordinal ord_."""
    return ord_ * MAX_GPUS_PER_HOST + pos


def ff_class(free_mb: int) -> int:
    """A GPU's free-memory class: 0 below 1 GiB free, c for 2^(c-1) GiB <= free < 2^c GiB, at most 8.
    First fit for m MiB walks the classes from ff_class(m) up."""
    c, at = 0, 1024
    while c < FF_CLASSES - 1 and free_mb >= at:
        c, at = c + 1, at * 2
    return c


def gpu_ffc_score(ord_: int, pos: int, free_mb: int) -> int:
    """The gpu_ffc score of the GPU at position pos of the host with ordinal ord_."""
    return ff_class(free_mb) * FF_SHIFT + gpu_ord_score(ord_, pos)


def _glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN glob."""
    return text.replace("[", "\\[").replace("*", "\\*").replace("?", "\\?")


@dataclass(frozen=True)
class Keys:
    """Key names for one namespace."""

    namespace: str = "alloc"

    @property
    def prefix(self) -> str:
        """Prefix of every key; scripts build per-host and per-allocation keys from it."""
        return "{" + self.namespace + "}:"

    def _k(self, name: str) -> str:
        return self.prefix + name

    @property
    def hosts(self) -> str:
        return self._k("hosts")

    @property
    def gpu_idx(self) -> str:
        return self._k("gpu_idx")

    @property
    def gpu_idle(self) -> str:
        return self._k("gpu_idle")

    @property
    def idle_hosts(self) -> str:
        """ZSET host -> number of its GPUs with no holder, schedulable hosts with at least one:
        best fit for whole GPUs takes the host with the fewest idle GPUs that still has enough."""
        return self._k("idle_hosts")

    @property
    def gpu_ord(self) -> str:
        return self._k("gpu_ord")

    @property
    def gpu_ffc(self) -> str:
        """ZSET "<host>#<pos>" -> gpu_ffc_score, the members of gpu_ord by free-memory class first:
        first fit for GPU memory walks it from the request's class up, so it skips the GPUs with
        less than half the request free (the scripts build it from the prefix; it is not among
        their KEYS)."""
        return self._k("gpu_ffc")

    @property
    def gpu_idle_ord(self) -> str:
        """ZSET "<host>#<pos>" -> ord*1024+pos, the members of gpu_idle (no holder) in registration
        order: first fit for whole GPUs walks it, so GPUs that hold shares are not walked (the
        scripts build it from the prefix; it is not among their KEYS)."""
        return self._k("gpu_idle_ord")

    @property
    def cpu_idx(self) -> str:
        return self._k("cpu_idx")

    @property
    def drain_on_register(self) -> str:
        """HASH host -> "operator": drains allocator recover found in the history for hosts no
        agent had registered again yet; register_host applies one when it creates the host (the
        scripts build it from the prefix)."""
        return self._k("drain_on_register")

    @property
    def cpu_ord(self) -> str:
        """ZSET host -> registration ordinal, schedulable hosts only: the order first fit walks
        for CPU-only requests (the scripts build it from the prefix; it is not among their KEYS)."""
        return self._k("cpu_ord")

    @property
    def ram_idx(self) -> str:
        return self._k("ram_idx")

    @property
    def allocs(self) -> str:
        return self._k("allocs")

    @property
    def active(self) -> str:
        return self._k("active")

    @property
    def expiry(self) -> str:
        return self._k("expiry")

    @property
    def done(self) -> str:
        return self._k("done")

    @property
    def events(self) -> str:
        """The outbox stream: one entry per ledger change, written by the same script."""
        return self._k("events")

    @property
    def seq(self) -> str:
        return self._k("seq")

    @property
    def ends(self) -> str:
        """Active allocations by expected end (the history's p80 for the task type, else the duration
        hint, else the TTL): backfill and ETA."""
        return self._k("ends")

    @property
    def byprio(self) -> str:
        """Active allocations by priority, newest first within one: preemption candidates."""
        return self._k("byprio")

    @property
    def pending(self) -> str:
        """Queued tasks in global order: priority, then requeued-at-front, then arrival."""
        return self._k("pending")

    @property
    def names(self) -> str:
        """HASH of what the registered hosts have: ``m:<model>`` -> GPUs of that model,
        ``l:<label>=<value>`` -> hosts with that label, ``hosts`` -> hosts counted (each lists in
        its field ``named`` what was counted for it), ``mhosts`` -> hosts in the model sets
        (``model_hosts``; each marked by its field ``mhosts``), ``lhosts`` -> hosts in the label
        sets (``label_hosts``; each marked by its field ``lhosts``). A request for a model or label
        none has is refused without a walk (the scripts build it from the prefix; it is not among
        their KEYS)."""
        return self._k("names")

    def model_hosts(self, model: str) -> str:
        """SET of the registered hosts with a GPU of ``model``, kept with ``names``: a request for
        a model that few hosts have is refused without a walk when none of them can take it now
        (the scripts build it from the prefix)."""
        return self._k(f"mhosts:{model}")

    def label_hosts(self, label: str, value: str) -> str:
        """SET of the registered hosts with ``label=value``, kept with ``names``: a walk for a
        request with a selector passes over the hosts it rules out by a lookup in these sets
        (the scripts build it from the prefix)."""
        return self._k(f"lhosts:{label}={value}")

    @property
    def delayed(self) -> str:
        """ZSET task id -> not-before ms: tasks in line that may not start yet (a retry's interval).
        They keep their place in ``pending``; passes skip them until then (the scripts build it
        from the prefix; it is not among their KEYS)."""
        return self._k("delayed")

    @property
    def preempting(self) -> str:
        """HASH task id -> host id: preempted function tasks whose worker on that host is
        stopping the run; when the host is lost first, the reaper applies their on_host_lost
        policy from here (the scripts build it from the prefix; it is not among their KEYS)."""
        return self._k("preempting")

    @property
    def eta(self) -> str:
        """HASH: pending task id -> estimated start ms ("" = none), written by the scheduler tick
        (``allocator.eta``), plus ``_at`` (when computed, ms), ``_cost_ms`` and ``_pending``."""
        return self._k("eta")

    def task(self, task_id: str) -> str:
        """A queued task's scheduling fields (plain hash, readable by Lua)."""
        return self._k("task:" + task_id)

    def host(self, host_id: str) -> str:
        return self._k("host:" + host_id)

    def host_summary(self, host_id: str) -> str:
        """STRING: the host's scan summary, packed doubles (see includes/ledger.lua, write_summary)."""
        return self._k("hsum:" + host_id)

    def host_allocs(self, host_id: str) -> str:
        return self._k("host_allocs:" + host_id)

    def alloc(self, allocation_id: str) -> str:
        return self._k("alloc:" + allocation_id)

    def ledger_keys(self) -> list[str]:
        """The fixed KEYS every ledger script receives, in the order includes/ledger.lua expects."""
        return [
            self.hosts,
            self.gpu_idx,
            self.gpu_idle,
            self.gpu_ord,
            self.cpu_idx,
            self.ram_idx,
            self.allocs,
            self.active,
            self.expiry,
            self.done,
            self.events,
            self.seq,
            self.ends,
            self.byprio,
            self.pending,
            self.idle_hosts,
        ]

    def pattern(self) -> str:
        """Glob matching every key of the namespace (for SCAN in cleanup and tests)."""
        return "{" + _glob_escape(self.namespace) + "}:*"

    # -- RQ's keys for this namespace's tasks (RQ names them; they are listed here for cleanup) --

    def rq_queue_pattern(self) -> str:
        """Glob matching RQ's keys for this namespace's queues (``<ns>.<priority>``,
        ``<ns>.host.<id>``): the queues and their registries, ``rq:<kind>:<queue>``."""
        return "rq:*:" + _glob_escape(self.rq_queue_name_prefix()) + "*"

    @staticmethod
    def rq_job(job_id: str) -> str:
        """RQ's hash of one job (a task's id is its RQ job id)."""
        return f"rq:job:{job_id}"

    @staticmethod
    def rq_job_keys(job_id: str) -> list[str]:
        """RQ's keys for one job: its hash, results, dependents, dependencies and its runs' registry
        (``rq:executions:<id>``, which RQ itself leaves behind)."""
        job = Keys.rq_job(job_id)
        return [job, f"rq:results:{job_id}", f"{job}:dependents", f"{job}:dependencies", f"rq:executions:{job_id}"]

    #: RQ's set of every queue's key.
    RQ_QUEUES = "rq:queues"
    #: RQ's set of every registered worker's key (``rq:worker:<name>``, a hash with ``queues``).
    RQ_WORKERS = "rq:workers"

    def rq_queue_name_prefix(self) -> str:
        """The start of the name of every RQ queue of this namespace (``<ns>.``)."""
        return f"{self.namespace}."

    def rq_queue_prefix(self) -> str:
        """The start of the key of every RQ queue of this namespace (members of ``RQ_QUEUES``)."""
        return "rq:queue:" + self.rq_queue_name_prefix()

    # -- durable history (allocator/history) -------------------------------------------------

    @property
    def recorder_group(self) -> str:
        """Consumer group of the history recorder on the outbox stream (a group name, not a key)."""
        return "recorder"

    @property
    def recorder(self) -> str:
        """HASH: the recorder's progress (last commit, events written, last error) for operators."""
        return self._k("recorder")

    @property
    def durations(self) -> str:
        """HASH: task_type -> JSON {p50_ms, p80_ms, mean_ms, n, updated_ms}, from the history."""
        return self._k("durations")

    # -- host agent and reaper (allocator/agent) --------------------------------------------

    @property
    def heartbeats(self) -> str:
        """ZSET host id -> last heartbeat ms (Redis server time); only hosts an agent serves."""
        return self._k("heartbeats")

    @property
    def reclaim(self) -> str:
        """ZSET host id -> ms: lost (or returned) hosts still holding grants the reaper must free."""
        return self._k("reclaim")

    def host_pids(self, host_id: str) -> str:
        """HASH pid -> allocation id of the work horses on a host (written by the worker)."""
        return self._k("host_pids:" + host_id)

    def host_inventory(self, host_id: str) -> str:
        """STRING JSON: the host's last published inventory (names, utilisation, MIG), with a TTL."""
        return self._k("inventory:" + host_id)

    # -- HTTP/WebSocket API and its metrics (allocator/api) ---------------------------------

    @property
    def api_stats(self) -> str:
        """HASH: outbox counts for /metrics (tally_outbox.lua: cursor, events, placements,
        releases, latency and ETA-error buckets) and refusals|<reason> counted by the API."""
        return self._k("api_stats")

    def ws_claim(self, allocation_id: str) -> str:
        """STRING with a TTL: the WebSocket session that named ``allocation_id`` first owns what
        it makes (SET NX), so a second session naming the same id at once cannot cancel it."""
        return self._k("ws_claim:" + allocation_id)

    @property
    def eta_predictions(self) -> str:
        """HASH task id -> first predicted start ms the API reported, until the task starts
        (then its error is counted in api_stats) or leaves the line."""
        return self._k("eta_predictions")

    # -- worker slots and shared named services (allocator/services.py, agent/services.py) ----

    def svc(self, host_id: str) -> str:
        """HASH service name -> JSON {port, refs, state, since, idle_since, pid, endpoint, error}:
        the named service instances of a host (state starting|running|stopping)."""
        return self._k("svc:" + host_id)

    def svc_ports(self, host_id: str) -> str:
        """HASH port -> service name: the ports of the host's service pool handed out."""
        return self._k("svc_ports:" + host_id)

    def svc_catalog(self, host_id: str) -> str:
        """HASH service name -> JSON {idle_timeout_s, start_timeout_s}: what the host's agent can run."""
        return self._k("svc_catalog:" + host_id)

    def svc_wake(self, host_id: str) -> str:
        """LIST (at most one token): pushed when the host's service supervisor has work to do;
        expires after ``SVC_WAKE_TTL_MS`` (the supervisor polls anyway)."""
        return self._k("svc_wake:" + host_id)

    def svc_owner(self, host_id: str) -> str:
        """STRING with a TTL: the token of the one service supervisor acting for the host."""
        return self._k("svc_owner:" + host_id)

    @property
    def svc_names(self) -> str:
        """ZSET service name -> number of hosts whose catalog offers it (unknown names are refused)."""
        return self._k("svc_names")
