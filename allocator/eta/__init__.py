"""Estimated start times: the pending line simulated against the expected releases.

The engine reads one snapshot of the ledger (hosts, active allocations with their start times and
expected ends, the pending line with each task's place request, the duration estimates) and runs
a discrete-event simulation of what the scheduler will do: a scheduling pass now, then after each
expected release a pass again, each pass being a Python mirror of the Lua pass
(``lua/includes/queue.lua``) over a Python mirror of the placement walk
(``lua/includes/placement.lua``):

- the walk: best fit over the free-GPU-memory index from the requested memory up (whole GPUs over
  the hosts by idle GPU count), comparing the first ``BEST_WINDOW`` hosts that fit by the GPU
  capacity they would strand, the idle GPUs they would break up and the CPU they would leave;
  worst fit from the top down, first fit in registration order over the schedulable hosts (falling
  back to best fit when the bounded walk stops at ``scan_cap``, and for CPU-only requests when it
  finds nothing), whole GPUs over the idle-GPU index, CPU-only requests over the CPU index;
  parking (a host with no free CPU or RAM leaves the indexes); a host's k best GPUs by the same
  rule; GPU models; label selectors; the critical reserve of idle GPUs;
- the pass: the first ``pass_depth`` tasks in line (priority, then front, then arrival); the first
  task that does not fit (after trying preemption when its strategy is ``priority``) gets an EASY
  reservation from the allocations' expected ends (the ``ends`` index, first 256); later tasks start
  on other hosts, or on the reserved host only when their expected end is before the shadow time;
  a pass that placed something is repeated at the same instant (what the scheduler's tick does a
  moment later), so a pass depth of 1 is strict FIFO without backfill; within a pass a refused
  request shape is not tried again (the Lua's memo; cleared by a preemption);
- worker slots, shared services (the host's catalog), requests pinned to one host;
- tasks waiting for a retry's interval (``{ns}:delayed``): skipped by every pass until then, and a
  pass at that time (the scheduler's tick).

``tests/test_eta.py`` checks on random fleets and lines that the simulated starts are exactly what
the real ledger then does when every allocation runs for exactly its expected duration.

Two notions of duration are kept apart. The pass's own view (reservation order, shadow time,
backfill test) is exactly what the Lua reads: the ``ends`` index for running allocations, and for
tasks the history's p80 per task type, else the hint, else the TTL. The *simulated release* of a
running allocation or of a task started in the simulation uses the engine's estimate: the history
estimate for the task type (``Keys.durations``, statistic ``stat``, p50 by default: it predicted
starts best in the OpenB replay), else the task's hint (``expected_ms``), else the prior (the
n-weighted median of that statistic over all task types), else its TTL, never beyond its TTL
deadline. An allocation already past its expected end is assumed to overrun as long again as it
has so far (``overdue_factor``): long-running outliers of a heavy-tailed type keep running.
Allocations with no estimate at all never end in the simulation, and tasks that only they could
make room for get no estimate (``None``). Not modelled: tasks that will arrive later (a
higher-priority arrival delays a waiting task beyond its estimate) and free service ports.

Cost: the snapshot is one pipelined read (consistent: ``WATCH`` on the outbox stream, retried);
payloads of pending tasks and records of active allocations are cached per id, since they do not
change while a task waits or an allocation runs. The simulation keeps the free-capacity indexes in
``SortedList`` s, so a walk costs O(log n) plus the members it looks at; and a request shape that
fitted nowhere is not walked again until a host it could use gains capacity and keeps it (the
freed hosts it could use are kept as suspects: once taken again, the no-fit holds again). A pass
asks each shape behind the blocked task once whether it fits nowhere and drops its tasks in one
sweep, and does not try a task whose every attempt its memo of refusals already refuses. The
reservation is not a walk over ``ends`` but the least of the hosts' fit points, kept per request
shape and host and recomputed only for hosts that changed (``_reserve_fit``). A pass after a
release is not run when it provably places nothing (``_still_quiet``). Each of these shortcuts is
exact: ``tests/test_eta.py`` checks them against the work they skip, and ``bench/eta_cost.py
--compare`` / ``bench/eta_replay.py --compare`` the estimates of two versions on the same line.
See ``docs/architecture.md`` (ETA, Cost) for the measured cost at 10,000 pending tasks on 1,213
hosts.
"""

from __future__ import annotations

from .engine import EtaEngine, EtaResult, engine_for
from .fleet import (BEST_WINDOW, DEFAULT_MAX_AGE_S, DEFAULT_OVERDUE_FACTOR, DEFAULT_STAT, PREEMPT_LIMIT,
                    RESERVE_LIMIT, Snapshot, to_datetime)
from .simulation import Simulation
from .snapshot import read_snapshot

__all__ = ["BEST_WINDOW", "DEFAULT_MAX_AGE_S", "DEFAULT_OVERDUE_FACTOR", "DEFAULT_STAT", "PREEMPT_LIMIT",
           "RESERVE_LIMIT", "EtaEngine", "EtaResult", "Simulation", "Snapshot", "engine_for", "read_snapshot",
           "to_datetime"]
