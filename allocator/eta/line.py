"""Reservations, preemption and the pass, mirrored from the Lua, and the event loop."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from .fleet import PREEMPT_LIMIT, RESERVE_LIMIT, _Alloc, _Gpu, _Host, _ID, _Req, _front_score


class Line:
    """The line's side of the simulation: EASY reservations, preemption and the scheduling
    pass (``lua/includes/queue.lua``), and the event loop that runs them after each expected
    release. A part of ``Simulation``, which holds the state these methods read."""

    # -- reservation and preemption (queue.lua) ----------------------------------------------------

    def _first_fit_after(self, req: _Req, ids: Iterable[tuple[float, str]], limit: int
                         ) -> tuple[str, list[str], float] | None:
        sims: dict[str, Any] = {}
        freed: dict[str, list[str]] = {}
        for i, (score, aid) in enumerate(ids):
            if i >= limit:
                break
            al = self.allocs.get(aid)
            if al is None:
                continue
            hid = al.host
            if hid not in sims:
                h = self.hosts.get(hid)
                sims[hid] = self._sim_host_to_free(req, h)
                freed[hid] = []
            sim = sims[hid]
            if sim is None:
                continue
            self._sim_give(sim, al)
            freed[hid].append(aid)
            if self._sim_fits(req, sim[4], sim[0], sim[1], sim[3], sim[2].values()):
                return hid, freed[hid], score
        return None

    def _sim_host(self, req: _Req, h: _Host | None) -> list[Any] | None:
        """sim_host of queue.lua: [cpu, ram, {uuid: [free, holders, model]}, slots, reserve] free
        now, or None for a host req could never take (ineligible, too small, its catalog lacks
        a service req names)."""
        if not (self._eligible(req, h, None, req.pin) and self._could_ever_fit(req, h)):  # type: ignore[arg-type]
            return None
        assert h is not None
        if req.services and not h.catalog.issuperset(req.services):
            return None
        # Not floored at 0, as in queue.lua: on an overcommitted host a grant ended frees only
        # what it holds beyond the excess.
        return [h.cfree * 1000 - h.shared, h.ram - h.ram_used, {g.uuid: [g.cap - g.used, g.n, g.model] for g in h.gpus},
                h.slots - h.slots_used, h.reserve]

    def _sim_host_to_free(self, req: _Req, h: _Host | None) -> list[Any] | None:
        """_sim_host, or None also where req fits before anything is freed: first_fit_after of
        queue.lua passes over such a host (the placement refused req there for what the
        simulation does not see, such as the scan cap), for reservations and preemption alike."""
        sim = self._sim_host(req, h)
        if sim is not None and self._sim_fits(req, sim[4], sim[0], sim[1], sim[3], sim[2].values()):
            return None
        return sim

    @staticmethod
    def _sim_give(sim: list[Any], al: Any) -> None:
        """sim_give of queue.lua: what allocation al holds, back to the simulated host."""
        for _pos, uuid, mem in al.grants:
            sg = sim[2].get(uuid)
            if sg is not None:
                sg[0] += mem
                sg[1] -= 1
        sim[0] += al.cores * 1000 + al.shared
        sim[1] += al.ram
        sim[3] += al.slots

    def _fewest_victims(self, req: _Req, hid: str, victims: list[str]) -> list[str]:
        """fewest_victims of queue.lua: each victim, from the last gathered to the first, is
        spared when the others still make room for req on host hid."""
        if len(victims) <= 1:
            return victims
        base = self._sim_host(req, self.hosts.get(hid))
        assert base is not None
        keep = [True] * len(victims)
        for i in range(len(victims) - 1, -1, -1):
            keep[i] = False
            sim = [base[0], base[1], {u: list(g) for u, g in base[2].items()}, base[3], base[4]]
            for j, aid in enumerate(victims):
                if keep[j]:
                    self._sim_give(sim, self.allocs[aid])
            if not self._sim_fits(req, sim[4], sim[0], sim[1], sim[3], sim[2].values()):
                keep[i] = True
        return [aid for aid, k in zip(victims, keep) if k]

    def _sim_fits(self, req: _Req, reserve: int, cpu: int, ram: int, slots: int,
                  gpus: Iterable[list[Any]]) -> bool:
        """sim_fits of queue.lua: CPU, RAM and slots, no parked host (no free CPU or RAM), and
        GPUs that fit ([free, holders, model] each), idle ones only beyond the critical reserve
        for work below critical."""
        if cpu < req.cpu_millis or ram < req.ram or cpu <= 0 or ram <= 0 or (req.slots and slots < req.slots):
            return False
        busy = idle_fit = idle = 0
        for f, c, m in gpus:
            if c <= 0 and f > 0:
                idle += 1
            if self._gpu_fits(req, f, c, m):
                if c <= 0:
                    idle_fit += 1
                else:
                    busy += 1
        if reserve > 0 and req.priority < 3:
            idle_fit = min(idle_fit, max(0, idle - reserve))
        return busy + idle_fit >= req.gpus

    def _touch(self, hid: str) -> None:
        """Notes that host hid's capacity or its entries in `ends` changed (see _reserve)."""
        self._hver[hid] = self._hver.get(hid, 0) + 1
        self._hlog.append(hid)

    def _fit_point(self, req: _Req, hid: str) -> tuple[float, str] | None:
        """The entry of `ends` at which first_fit_after finds that req fits on host hid: the
        host's own entries, in order, added back one by one to what it has free now; None when
        it never does (or is not eligible)."""
        h = self.hosts.get(hid)
        sim = self._sim_host_to_free(req, h)
        if sim is None:
            return None
        assert h is not None
        cpu, ram, gpus, slots = sim[0], sim[1], sim[2], sim[3]
        allocs = self.allocs
        for e in self._hends.get(hid, ()):
            al = allocs[e[1]]
            for _pos, uuid, mem in al.grants:
                sg = gpus.get(uuid)
                if sg is not None:
                    sg[0] += mem
                    sg[1] -= 1
            cpu += al.cores * 1000 + al.shared
            ram += al.ram
            slots += al.slots
            if self._sim_fits(req, h.reserve, cpu, ram, slots, gpus.values()):
                return e
        return None

    def _reserve(self, req: _Req, now: int) -> tuple[str, float] | None:
        """reservation(req, now, 256) of queue.lua: the host and the shadow time (see _reserve_fit)."""
        fit = self._last_fit = self._reserve_fit(req)
        return None if fit is None else (fit[0], max(fit[1], now))

    def _reserve_fit(self, req: _Req) -> tuple[str, float] | None:
        """first_fit_after(req, ends, 256) of queue.lua (its host and score), computed without
        walking the first 256 entries of `ends`. A host's simulation in first_fit_after only adds
        back the host's own entries, so the walk returns at min over hosts of the host's fit point
        (``_fit_point``), when that entry is among the first 256. Fit points are kept per request
        shape in a heap of exact values and lower bounds (a host's first entry in `ends`), each at
        a host version, and recomputed only for hosts whose version changed since (``_hlog``):
        between two passes only a few hosts change, and hosts behind the answer are never looked
        at. Exactly what the walk returns (see tests/test_eta.py and bench/eta_replay.py)."""
        if not self._resv_exact:
            r = self._first_fit_after(req, iter(self.ends), RESERVE_LIMIT)
            return None if r is None else (r[0], r[2])
        key = (self._skid.get(req.id, req.shape), req.pin)
        hends, hver = self._hends, self._hver
        st = self._resv_heap.get(key)
        if st is None or len(st[0]) > 4 * len(hends) + 1024:
            heap = [(es[0], 0, hver.get(hid, 0), hid) for hid, es in hends.items() if es]
            heapq.heapify(heap)
            st = self._resv_heap[key] = (heap, [len(self._hlog)])
        else:
            heap, pos = st
            log = self._hlog
            if pos[0] < len(log):
                for hid in set(log[pos[0]:]):
                    es = hends.get(hid)
                    if es:
                        heapq.heappush(heap, (es[0], 0, hver.get(hid, 0), hid))
                pos[0] = len(log)
        n = len(self.ends)
        last = self.ends[RESERVE_LIMIT - 1] if n >= RESERVE_LIMIT else None
        while heap:
            at, exact, ver, hid = heap[0]
            if ver != hver.get(hid, 0):
                heapq.heappop(heap)  # stale: the host changed, a fresh lower bound was pushed
                continue
            if last is not None and at > last:
                return None  # every fit point is beyond the first 256 entries
            if exact:
                return hid, at[0]
            heapq.heappop(heap)
            p = self._fit_point(req, hid)
            if p is not None:
                heapq.heappush(heap, (p, 1, ver, hid))
        return None

    def _preempt_for(self, req: _Req, now: int) -> tuple[bool, bool]:
        """preempt_for of queue.lua: whether it made room, and whether a victim went back in line."""
        self._refused = set()  # capacity comes back: the pass's memo of refusals is void
        back = False
        bound = req.priority * 10**13
        cands = self._byprio_index().irange(maximum=(bound, ""), inclusive=(True, False))
        r = self._first_fit_after(req, ((s, a) for s, a in cands if s < bound), PREEMPT_LIMIT)
        if r is None:
            return False, False
        for victim in self._fewest_victims(req, r[0], r[1]):
            al = self._finish(victim)
            if al is not None and al.kind == "job":
                t = self._job_task(victim)
                if t is not None:  # back to the front of its priority, original sequence kept
                    self.score[victim] = _front_score(t.priority, t.seq)
                    self.pending.add((self.score[victim], victim))
                    self._pver += 1
                    back = True
        return True, back

    # -- the pass ------------------------------------------------------------------------------

    def _pass(self, now: int) -> int:
        """schedule_pass of queue.lua over the first ``pass_depth`` tasks in line."""
        self.passes += 1
        self._refused = set()
        self._quiet = None
        self._unproven = False
        pver = self._pver
        seen = self._window_seen
        if seen is not None and seen[0] == pver:
            ids = seen[1]
        else:
            ids = list(map(_ID, self.pending.islice(0, self.depth)))
            seen = self._window_seen = (pver, ids, None)
        tasks = self.tasks
        placed = 0
        blocked: _Req | None = None
        i = 0
        hold = self.hold
        gone = self.rq_gone
        dropped = False
        for i, tid in enumerate(ids):
            if hold and tid in hold:
                continue  # may not start yet: in no one's way
            req = tasks[tid]
            p = self.try_place(req)
            requeued = False
            if p is None and req.preempt:
                self._unproven = True  # (another pass may find what to preempt)
                if gone and self._drop_gone(tid, now):  # (checked before a preemption too)
                    dropped = True
                    continue
                made_room, requeued = self._preempt_for(req, now)
                if made_room:
                    p = self.try_place(req)
            if p is None:
                blocked = req
                break
            if gone and self._drop_gone(tid, now):
                dropped = True
                continue
            self._start(tid, req, p, now)
            placed += 1
            if requeued:
                # A victim went back in line, maybe ahead of tasks this walk has yet to reach:
                # run_pass starts a new pass over the line as it now stands (_settle does).
                return placed
        if blocked is None:
            return placed + dropped  # a drop shifts the window: the scheduler's next tick looks again
        # Blocked: from here on nothing frees capacity (preemption happens only before), so a
        # shape that fits nowhere keeps fitting nowhere for the rest of the pass. Each shape is
        # asked once, for its first task, and its tasks are dropped in one sweep: most of the
        # line behind a blocked head is tasks that fit nowhere. (Asking earlier than the task's
        # turn changes only what the no-fit memo has looked at: its answer True is final.)
        # A shape known to fit nowhere with nothing freed since still does (the pass before at
        # the same instant only placed).
        nwk = self._nwkey
        if placed == 0 and seen[2] is not None:
            rest, keys, firsts = seen[2]
        else:
            rest = ids[i + 1:]
            if hold:
                rest = [tid for tid in rest if tid not in hold]
            keys = list(map(nwk.__getitem__, rest))
            firsts = list(dict(zip(reversed(keys), reversed(rest))).items())  # shape -> its first task
            if placed == 0:
                self._window_seen = (pver, ids, (rest, keys, firsts))
        nowhere: set[int | None] = set()
        n_freed, known = len(self.freed), self._nw_known
        for k, tid in firsts:
            if k is not None and (known.get(k) == n_freed or self._fits_nowhere(tasks[tid])):
                known[k] = n_freed
                nowhere.add(k)
        if nowhere:
            rest = [tid for tid, k in zip(rest, keys) if k not in nowhere]
        resv: tuple[str, float] | None = None
        resv_done = False
        rhost, shadow = "", 0.0  # the reservation's host and shadow time, once asked for
        # What the pass's memo of refusals already says, by task signature (shape, strategy,
        # priority, pin): 0, its attempt on the hosts other than the reserved one is refused (only
        # the backfill onto the reserved host is left to try, for tasks short enough); 1, every
        # attempt it can make is. The memo only grows once the line is blocked, so a later task of
        # the signature is refused those attempts again without asking. (A task of signature 0
        # whose shape fits nowhere tries the reserved host rather than being skipped: a shape that
        # fits nowhere fits on no single host either, so the try fails, as skipping it would.)
        sigs = self._sig
        known_sig: dict[int, int] = {}
        refused = self._refused  # (only a preemption replaces it, and none happens from here on)
        pms = self._pass_ms
        for tid in rest:
            sig = sigs[tid]
            st = known_sig.get(sig)
            if st is not None:
                if st:
                    continue
                pe = pms.get(tid, -1)
                if pe == -1:
                    pe = self.pass_ms(tasks[tid])
                if pe is None or now + pe > shadow:
                    continue
                req = tasks[tid]
                p = self.try_place(req, only=rhost)
                if p is None:
                    if self._memo(req, None, rhost) in refused:
                        known_sig[sig] = 1
                    continue
                if gone and self._drop_gone(tid, now):
                    dropped = True
                    continue
                self._start(tid, req, p, now)
                placed += 1
                continue
            req = tasks[tid]
            k = nwk[tid]
            if k is not None:
                if k in nowhere:
                    continue
                if self._fits_nowhere(req):
                    nowhere.add(k)
                    continue  # cannot start anywhere, reserved host included
            if not resv_done:
                resv, resv_done = self._reserve(blocked, now), True
                rhost, shadow = resv if resv is not None else ("", 0.0)
            if resv is None:
                p = self.try_place(req)
                if p is None and self._memo(req, None, None) in refused:
                    known_sig[sig] = 1
            else:
                p = self.try_place(req, exclude=rhost)
                if p is None and (req.pin is None or req.pin == rhost):
                    a_refused = self._memo(req, rhost, None) in refused
                    pe = self.pass_ms(req)
                    if pe is not None and now + pe <= shadow:
                        p = self.try_place(req, only=rhost)
                        if p is None and a_refused:
                            known_sig[sig] = 1 if self._memo(req, None, rhost) in refused else 0
                    elif a_refused:
                        known_sig[sig] = 0
                elif p is None and self._memo(req, rhost, None) in refused:
                    known_sig[sig] = 1  # pinned elsewhere: no backfill onto the reserved host
            if p is not None:
                if gone and self._drop_gone(tid, now):
                    dropped = True
                    continue
                self._start(tid, req, p, now)
                placed += 1
        if dropped:
            return placed + 1  # the window moved: not a quiet pass, and the next tick looks again
        if placed == 0 and not self._unproven:
            self._quiet = (self._changes, blocked, resv_done, self._last_fit if resv_done else None, ids, None)
        return placed

    def _due_with(self, t: float) -> list[str]:
        """Takes from the release heap every other allocation that ends by its deadline at t: the
        reaper frees them all in one call. Those that end at t by their expected end (a worker's
        report, a release) stay in the heap: each is an event of its own."""
        out, keep = [], []
        while self.releases and self.releases[0][0] == t:
            item = heapq.heappop(self.releases)
            al = self.allocs.get(item[2])
            if al is None or not al.alive or al.release != t:
                continue  # an entry the allocation's end has made stale
            if al.by_ttl:
                out.append(al.id)
            else:
                keep.append(item)
        for item in keep:
            heapq.heappush(self.releases, item)
        return out

    def _still_quiet(self, al: _Alloc | None) -> bool:
        """Whether the pass due after allocation al ended is known to place nothing, so that it
        need not run: the pass before placed nothing and every refusal in it was proven by a
        no-fit memo (no one-host try, no preemption), al's end is the only change since, its host
        still lacks the CPU or RAM of every task in the pass's window (so every no-fit holds), and
        the reservation is the same host and score (a later pass lets no task backfill onto it
        that the one before did not: ``now + ends <= shadow`` only gets harder)."""
        q = self._quiet
        if q is None or al is None or self._changes != q[0] + 1:
            return False
        need = q[5]
        if need is None:  # the least CPU and RAM a task in the window asks for
            need = (min(map(self._cpu_need.__getitem__, q[4])), min(map(self._ram_need.__getitem__, q[4])))
        h = self.hosts.get(al.host)
        if h is not None and h.cpu >= need[0] and h.ramf >= need[1]:
            return False
        if q[2] and self._reserve_fit(q[1]) != q[3]:
            return False
        self._quiet = (self._changes,) + q[1:5] + (need,)
        return True

    def _start(self, tid: str, req: _Req, p: tuple[_Host, list[_Gpu]], now: int) -> None:
        # RQ keeps a job that has started (it persists the hash): preempted and back in line, it
        # is no longer discarded by its ttl.
        self.rq_gone.pop(tid, None)
        self._grant(req, p, now)
        self.pending.discard((self.score[tid], tid))
        self._pver += 1
        if tid not in self.started:  # a preempted and restarted job keeps its first start
            self.started[tid] = now
            self._started_order.append(tid)

    def _drop_gone(self, tid: str, now: int) -> bool:
        """job_gone of queue.lua: a function task whose RQ job has expired by the time the pass
        would place it (or preempt for it) leaves the line and never starts."""
        at = self.rq_gone.get(tid)
        if at is None or at > now:
            return False
        self.pending.discard((self.score[tid], tid))
        self.dropped.add(tid)
        self._pver += 1
        self._changes += 1
        return True

    def _arrive(self, tid: str) -> None:
        """Task tid may start from now on: the line's window and a quiet pass no longer hold."""
        self.hold.pop(tid, None)
        self._pver += 1
        self._changes += 1
        self._quiet = None

    def _settle(self, now: int) -> None:
        for _ in range(10_000):
            if not self.pending or self._pass(now) == 0:
                return

    def run(self, targets: set[str] | None = None, *, max_events: int | None = None) -> dict[str, int | None]:
        """Simulates until every target (default: every pending task) has started or nothing
        more is expected to end; returns id -> simulated start ms (None: no estimate)."""
        want = set(self.tasks) if targets is None else {t for t in targets if t in self.tasks}
        left = set(want)
        budget = max_events if max_events is not None else 20 * (len(self.allocs) + len(self.tasks)) + 1000
        now = self.now
        # Allocations expected to end by now (TTL due, overdue handled at load) end first.
        while self.releases and self.releases[0][0] <= now:
            _, _, aid = heapq.heappop(self.releases)
            self._finish(aid)
        self._settle(now)
        left -= self.started.keys()
        left -= self.dropped
        while left and (self.releases or self.arrivals) and budget > 0:
            if self.arrivals and (not self.releases or self.arrivals[0][0] < self.releases[0][0]):
                # A task's retry interval is over: the next pass (the scheduler's tick) sees it.
                # (A release at the same instant comes first: its pass already sees the task.)
                t_due, tid = heapq.heappop(self.arrivals)
                budget -= 1
                self.events += 1
                now = t_due
                self._arrive(tid)
                while self.arrivals and self.arrivals[0][0] == t_due:  # due together: one pass sees all
                    self._arrive(heapq.heappop(self.arrivals)[1])
                n = len(self.started)
                self._settle(now)
                if len(self.started) != n:
                    left.difference_update(self._started_order[n:])
                left.difference_update(self.dropped)
                continue
            t, _, aid = heapq.heappop(self.releases)
            al = self.allocs.get(aid)
            if al is None or not al.alive or al.release != t:
                continue
            budget -= 1
            self.events += 1
            now = int(t)
            while self.arrivals and self.arrivals[0][0] <= now:  # due at this instant: its pass sees them
                self._arrive(heapq.heappop(self.arrivals)[1])
            # Leases due at the same instant are reaped together, before one pass (expire.lua,
            # the scheduler's tick); a worker's end of a job runs its own pass.
            together = self._due_with(t) if al.by_ttl else []
            ended = self._finish(aid)
            for other in together:
                self._finish(other)
            if not together and self._still_quiet(ended):
                self.passes += 1
                self.skipped += 1
                continue
            n = len(self.started)
            self._settle(now)
            if len(self.started) != n:
                left.difference_update(self._started_order[n:])
            left.difference_update(self.dropped)
        return {tid: self.started.get(tid) for tid in want}
