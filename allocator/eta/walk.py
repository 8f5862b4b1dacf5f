"""The placement walk, mirrored from the Lua (``Simulation`` is built from it)."""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from ..keys import ff_class
from .fleet import (BEST_WINDOW, FIRST_PAGE, _Alloc, _Gpu, _HOST, _Host, _ID, _POS, _Req, _milli_free,
                    _stranded)


class Walk:
    """The free-capacity indexes and the placement walk of the simulation: a mirror of
    ``reindex_host`` / ``reindex_gpu`` (``lua/includes/ledger.lua``) and of ``placement.lua``.
    A part of ``Simulation``, which holds the state these methods read."""

    # -- indexes (reindex_host / reindex_gpu of ledger.lua) --------------------------------------

    def _reindex(self, h: _Host, touched: Iterable[_Gpu] | None) -> None:
        schedulable = h.ready and h.cpu > 0 and h.ramf > 0
        if schedulable != h.indexed:
            touched = None
        h.indexed = schedulable
        hid = h.id
        # Index entries are (score, member, host, position): ordered like the Lua ZSETs (score,
        # then member), with the host and position at hand for the walk.
        for g in (h.gpus if touched is None else touched):
            m = g.member
            free = g.free
            old = self._gidx.pop(m, None)
            if old is not None:
                self.gpu_idx.remove((old, m, hid, g.pos))
            old = self._gidle.pop(m, None)
            if old is not None:
                self.gpu_idle.remove((old, m, hid, g.pos))
                self.gpu_idle_ord.remove((g.ordscore, m, hid, g.pos))
            cls = self._gord.get(m)
            if schedulable and free > 0:
                self._gidx[m] = free
                self.gpu_idx.add((free, m, hid, g.pos))
                c = ff_class(free)
                if cls != c:
                    if cls is None:
                        self.gpu_ord.add((g.ordscore, m, hid, g.pos))
                    else:
                        self.gpu_ffc[cls].remove((g.ordscore, m, hid, g.pos))
                    self._gord[m] = c
                    self.gpu_ffc[c].add((g.ordscore, m, hid, g.pos))
                if g.n == 0:
                    self._gidle[m] = free
                    self.gpu_idle.add((free, m, hid, g.pos))
                    self.gpu_idle_ord.add((g.ordscore, m, hid, g.pos))
            elif cls is not None:
                del self._gord[m]
                self.gpu_ord.remove((g.ordscore, m, hid, g.pos))
                self.gpu_ffc[cls].remove((g.ordscore, m, hid, g.pos))
        old = self._idle.pop(hid, None)
        if old is not None:
            self.idle_hosts.remove((old, hid))
        if schedulable:
            n_idle = sum(1 for g in h.gpus if g.n == 0 and g.cap > g.used)
            self._idle[hid] = n_idle
            self.idle_hosts.add((n_idle, hid))
        old = self._cpu.pop(h.id, None)
        if old is not None:
            self.cpu_idx.remove((old, h.id))
        if schedulable:
            self._cpu[h.id] = h.cpu
            self.cpu_idx.add((h.cpu, h.id))

    # -- placement (placement.lua) -----------------------------------------------------------------

    @staticmethod
    def _gpu_fits(req: _Req, free: int, n: int, model: str) -> bool:
        if req.gpu_mem == 0:
            if n != 0 or free <= 0:
                return False
        elif free < req.gpu_mem:
            return False
        if req.models is not None:
            return model in req.models
        return True

    @staticmethod
    def _labels_match(selector: dict[str, list[str]], labels: dict[str, Any]) -> bool:
        for key, allowed in selector.items():
            v = labels.get(key)
            if v is None or str(v) not in allowed:
                return False
        return True

    def _eligible(self, req: _Req, h: _Host | None, exclude: str | None, only: str | None) -> bool:
        if h is None or not h.ready:
            return False
        if exclude is not None and h.id == exclude:
            return False
        if only is not None and h.id != only:
            return False
        if req.selector and not self._labels_match(req.selector, h.labels):
            return False
        return True

    @staticmethod
    def _allowance(req: _Req, h: _Host) -> int | None:
        if h.reserve <= 0 or req.priority >= 3:
            return None
        return sum(1 for g in h.gpus if g.n == 0 and g.free > 0) - h.reserve

    def _pick(self, req: _Req, h: _Host, pos: int | None, mode: str) -> list[_Gpu] | None:
        k = req.gpus
        allowance = self._allowance(req, h)
        if k == 1 and pos is not None:
            g = h.gpus[pos] if pos < len(h.gpus) else None
            if g is None or not self._gpu_fits(req, g.free, g.n, g.model):
                return None
            if allowance is not None and g.n == 0 and allowance < 1:
                return None
            return [g]
        cands = [g for g in h.gpus if self._gpu_fits(req, g.free, g.n, g.model)]
        if len(cands) < k:
            return None
        if mode == "best":
            cands.sort(key=lambda g: (g.free, g.pos))
        elif mode == "worst":
            cands.sort(key=lambda g: (-g.free, g.pos))
        out: list[_Gpu] = []
        idle_used = 0
        for g in cands:
            if allowance is None or g.n > 0 or idle_used < allowance:
                if g.n == 0:
                    idle_used += 1
                out.append(g)
                if len(out) == k:
                    return out
        return None

    def _foreign(self, req: _Req, hid: str) -> bool:
        """Whether req's GPU models or selector rule host hid out: a walk passes over such a
        host's candidates without counting them toward the cap (scan() in placement.lua)."""
        h = self.hosts.get(hid)
        if h is None:
            return False
        if req.selector and not self._labels_match(req.selector, h.labels):
            return True
        return bool(req.gpus and req.models is not None and not any(g.model in req.models for g in h.gpus))

    def _window(self, req: _Req, mode: str, only: str | None) -> tuple[list[str], list[int | None], bool]:
        """The candidates a walk looks at, in its order, at most ``scan_cap`` of them: hosts and
        GPU positions (None for CPU-only requests), and whether the walk stopped at the cap.
        Candidates on hosts the request's GPU models or selector rule out are passed over and not
        counted (``_screened_window``)."""
        k = req.gpus
        cap = self.cap
        if only is not None:
            if k == 0:
                return [only], [None], 1 >= cap
            h = self.hosts.get(only)
            poss: list[int | None] = [g.pos for g in h.gpus][:cap] if h else []
            return [only] * len(poss), poss, len(poss) >= cap
        if req.selector or (k and req.models is not None):
            return self._screened_window(req, mode)
        if k > 0:
            if req.gpu_mem == 0 and mode == "best":
                # Whole GPUs, best fit: hosts by idle GPU count, from k up (the idle_hosts ZSET).
                ents = list(islice(self.idle_hosts.irange((k,)), cap))
                return list(map(_ID, ents)), [None] * len(ents), len(ents) >= cap
            if req.gpu_mem == 0:
                idx, lo = self.gpu_idle, 1
            else:
                idx, lo = self.gpu_idx, req.gpu_mem
            if mode == "best":
                i = idx.bisect_left((lo,))
                win = list(idx.islice(i, i + cap))
            elif mode == "worst":
                i, n = idx.bisect_left((lo,)), len(idx)
                win = list(idx.islice(max(i, n - cap), n))
                win.reverse()
            elif req.gpu_mem == 0:  # whole GPUs: gpu_idle_ord
                win = list(self.gpu_idle_ord.islice(0, cap))
            elif lo < 1024:  # requests under 1 GiB: gpu_ord
                win = list(self.gpu_ord.islice(0, cap))
            else:  # gpu_ord's first page, then the classes of gpu_ffc that can hold it, merged (ff_page)
                win = list(self.gpu_ord.islice(0, min(FIRST_PAGE, cap)))
                win += islice(heapq.merge(*self.gpu_ffc[ff_class(lo):]), cap - len(win))
            return list(map(_HOST, win)), list(map(_POS, win)), len(win) >= cap
        if mode == "first":  # the cpu_ord ZSET: schedulable hosts in registration order
            hosts = list(islice((h.id for h in self.by_ord if h.indexed), cap))
        else:
            i, n = self.cpu_idx.bisect_left((req.cpu_millis,)), len(self.cpu_idx)
            if mode == "best":
                hosts = [e[1] for e in self.cpu_idx.islice(i, i + cap)]
            else:
                hosts = [e[1] for e in self.cpu_idx.islice(max(i, n - cap), n)]
                hosts.reverse()
        return hosts, [None] * len(hosts), len(hosts) >= cap

    def _listable(self, req: _Req, limit: int, mode: str) -> bool:
        """Whether the walk goes on from the list of the hosts req may use (allowed_hosts and
        listed() in placement.lua): the host sets in step, at most ``limit`` hosts allowed as
        bounded by the sets' sizes (each constraint's, the smallest: the sum over a label's values,
        or over the models), and at most 4,096 members to list."""
        models_ok, labels_ok = self.name_sets
        by_model = bool(req.gpus and req.models is not None)
        if (by_model and not models_ok) or (req.selector and not labels_ok):
            return False
        key = (req.models if by_model else None, repr(req.selector))
        got = self._allowed_n.get(key)
        if got is None:  # (the hosts and their labels and models do not change in a simulation)
            hosts = self.hosts.values()
            sizes = [sum(sum(1 for h in hosts if k in h.labels and str(h.labels[k]) == v) for v in vals)
                     for k, vals in (req.selector or {}).items()]
            if by_model:
                sizes.append(sum(sum(1 for h in hosts if any(g.model == m for g in h.gpus)) for m in req.models))
            allowed = [h for h in hosts if not self._foreign(req, h.id)]
            got = self._allowed_n[key] = (min(sizes), len(allowed), sum(len(h.gpus) for h in allowed))
        bound, n_hosts, n_gpus = got
        if bound > limit:
            return False
        return (n_hosts if not req.gpus or (req.gpu_mem == 0 and mode == "best") else n_gpus) <= 4096

    def _screened_window(self, req: _Req, mode: str) -> tuple[list[str], list[int | None], bool]:
        """_window for a request with GPU models or a selector: the same orders, less the
        candidates on hosts they rule out, which do not count toward the cap. Once it has met 32
        such hosts it goes on from the list of the allowed ones (which has no others) when
        ``_listable`` with at most 64 hosts, else it passes over at most 2 x the cap of their
        members in all, then goes on from the list when ``_listable`` with at most 512, else stops
        as at the cap."""
        k, cap = req.gpus, self.cap
        ruled: dict[str, bool] = {}
        st = {"passed": 0, "hosts": 0, "listed": False}

        def take(entries: Iterable[Any], host_of: Any, limit: int) -> tuple[list[Any], bool]:
            out: list[Any] = []
            if limit <= 0:
                return out, True
            for e in entries:
                hid = host_of(e)
                v = ruled.get(hid)
                new = v is None
                if new:
                    v = ruled[hid] = self._foreign(req, hid)
                if v:
                    if st["listed"]:
                        continue  # (the list holds none of them)
                    if new:
                        st["hosts"] += 1
                        if st["hosts"] == 32 and self._listable(req, 64, mode):
                            st["listed"] = True
                    st["passed"] += 1
                    if st["passed"] > 2 * cap and st["hosts"] >= 32 and not st["listed"]:
                        if not self._listable(req, 512, mode):
                            return out, True
                        st["listed"] = True
                    continue
                out.append(e)
                if len(out) >= limit:
                    return out, True
            return out, False

        if k > 0:
            if req.gpu_mem == 0 and mode == "best":
                ents, capped = take(self.idle_hosts.irange((k,)), _ID, cap)
                return list(map(_ID, ents)), [None] * len(ents), capped
            if req.gpu_mem == 0:
                idx, lo = self.gpu_idle, 1
            else:
                idx, lo = self.gpu_idx, req.gpu_mem
            i = idx.bisect_left((lo,))
            if mode == "best":
                win, capped = take(idx.islice(i, len(idx)), _HOST, cap)
            elif mode == "worst":
                win, capped = take(idx.islice(i, len(idx), reverse=True), _HOST, cap)
            elif req.gpu_mem == 0:
                win, capped = take(self.gpu_idle_ord, _HOST, cap)
            elif lo < 1024:
                win, capped = take(self.gpu_ord, _HOST, cap)
            else:
                win, capped = take(self.gpu_ord.islice(0, FIRST_PAGE), _HOST, cap)
                if not capped:
                    more, capped = take(heapq.merge(*self.gpu_ffc[ff_class(lo):]), _HOST, cap - len(win))
                    win += more
            return list(map(_HOST, win)), list(map(_POS, win)), capped
        if mode == "first":
            hosts, capped = take((h.id for h in self.by_ord if h.indexed), lambda x: x, cap)
        else:
            i, n = self.cpu_idx.bisect_left((req.cpu_millis,)), len(self.cpu_idx)
            ents, capped = take(self.cpu_idx.islice(i, n, reverse=mode != "best"), lambda e: e[1], cap)
            hosts = [e[1] for e in ents]
        return hosts, [None] * len(hosts), capped

    def _host_ok(self, req: _Req, hid: str, exclude: str | None, only: str | None) -> _Host | None:
        h = self.hosts.get(hid)
        if (h is not None and self._eligible(req, h, exclude, only) and h.cpu >= req.cpu_millis
                and h.ramf >= req.ram and h.cpu > 0 and h.ramf > 0 and self._extras_fit(req, h)):
            return h
        return None

    @staticmethod
    def _cost(req: _Req, h: _Host, gs: list[_Gpu]) -> tuple[int, int, int]:
        """placement_cost of placement.lua, compared as a tuple: thousandths of a GPU that
        placing req on h (GPUs gs) leaves stranded beyond what h strands already (negative: it
        puts stranded capacity to use), how much it breaks up h's idle GPUs (taking j of i costs
        i^2 - (i-j)^2), and the millicores left free on h."""
        gm = idle = 0
        for g in h.gpus:
            gm += _milli_free(g.cap, g.free)
            if g.n == 0 and g.cap > g.used:
                idle += 1
        after, j = gm, 0
        for g in gs:
            mem = req.gpu_mem if req.gpu_mem else g.free
            after += _milli_free(g.cap, g.free - mem) - _milli_free(g.cap, g.free)
            if g.n == 0:
                j += 1
        cpu, ram = h.cpu - req.cpu_millis, h.ramf - req.ram
        return _stranded(h, after, cpu, ram) - _stranded(h, gm, h.cpu, h.ramf), j * (2 * idle - j), cpu

    def _scan(self, req: _Req, mode: str, exclude: str | None, only: str | None
              ) -> tuple[tuple[_Host, list[_Gpu]] | None, bool]:
        """scan() of placement.lua: first and worst fit take the first candidate that fits; best
        fit the cheapest (``_cost``, the earliest on a tie) of the first ``BEST_WINDOW`` hosts
        that fit. None and whether the walk stopped at the cap (it then looked at exactly
        ``scan_cap`` candidates) when nothing fits."""
        hosts, poss, capped = self._window(req, mode, only)
        window = BEST_WINDOW if mode == "best" and only is None else 1
        best: tuple[_Host, list[_Gpu]] | None = None
        best_cost = (0, 0, 0)
        fits = 0
        for cand in self._fitting(req, mode, exclude, only, hosts, poss):
            if window == 1:
                return cand, False
            cost = self._cost(req, *cand)
            if best is None or cost < best_cost:
                best, best_cost = cand, cost
            fits += 1
            if fits >= window:
                return best, False
        return (best, False) if best is not None else (None, capped)

    def _fitting(self, req: _Req, mode: str, exclude: str | None, only: str | None, hosts: list[str],
                 poss: list[int | None]) -> Iterator[tuple[_Host, list[_Gpu]]]:
        """The placements the walk finds, in its order, one per host (the candidates' loop of
        scan() in placement.lua)."""
        k = req.gpus
        if k != 1 or poss[:1] == [None]:
            # Each host is looked at once, at its first candidate (its GPUs are then chosen by
            # the strategy, whatever candidate led to it).
            need_idle = k if req.gpu_mem == 0 else 0
            idle = self._idle
            for hid in dict.fromkeys(hosts):
                if need_idle and idle.get(hid, 0) < need_idle and only is None:
                    continue  # fewer idle GPUs than whole GPUs asked: pick_on_host would fail
                s = self._host_ok(req, hid, exclude, only)
                if s is None:
                    continue
                gs = [] if k == 0 else self._pick(req, s, None, mode)
                if gs is not None:
                    yield s, gs
            return
        # One GPU: each candidate GPU is tried where it is; a host is left once it fitted (the
        # walk compares hosts) or cannot take the request at all.
        tried: set[str] = set()
        ok: dict[str, _Host | None] = {}
        for hid, pos in zip(hosts, poss):
            if hid in tried:
                continue
            if hid in ok:
                s = ok[hid]
            else:
                s = ok[hid] = self._host_ok(req, hid, exclude, only)
            if s is None:
                tried.add(hid)
                continue
            gs = self._pick(req, s, pos, mode)
            if gs:
                yield s, gs
                tried.add(hid)

    @staticmethod
    def _extras_fit(req: _Req, h: _Host) -> bool:
        """Worker slots, and services in the host's catalog (free service ports are not modelled)."""
        if req.slots and h.slotf < req.slots:
            return False
        if req.services and not h.catalog.issuperset(req.services):
            return False
        return True

    def _could_ever_fit(self, req: _Req, h: _Host) -> bool:
        """Whether req fits on h empty (its whole capacity): static, cached per shape and host."""
        key = (req.shape, h.id)
        v = self._ever.get(key)
        if v is None:
            v = (h.ncores * 1000 >= req.cpu_millis and h.ram >= req.ram and (not req.slots or h.slots >= req.slots)
                 and sum(1 for g in h.gpus if self._gpu_fits(req, g.cap, 0, g.model)) >= req.gpus)
            self._ever[key] = v
        return v

    def _could_fit(self, req: _Req, h: _Host) -> bool:
        """A necessary condition for a walk (not a single-host try) to find h for req, used to
        revalidate a no-fit: h is in the indexes (every walk goes over indexed hosts), eligible,
        and has the capacity free."""
        if not h.indexed:
            return False
        if (not self._eligible(req, h, None, None) or h.cpu < req.cpu_millis or h.ramf < req.ram
                or not self._extras_fit(req, h)):
            return False
        return sum(1 for g in h.gpus if self._gpu_fits(req, g.free, g.n, g.model)) >= req.gpus

    def _somewhere(self, req: _Req, exclude: str | None) -> bool:
        """Whether some host other than exclude could take req now (_could_fit)."""
        if req.gpus > 0 and req.gpu_mem == 0:
            cands: Iterable[_Host] = (self.hosts[hid] for _, hid in self.idle_hosts.irange((req.gpus,)))
        else:
            cands = self.hosts.values()
        return any(self._could_fit(req, h) for h in cands if h.id != exclude)

    def _fits_nowhere(self, req: _Req, exclude: str | None = None) -> bool:
        """Whether a walk for req (skipping host exclude) is known to find nothing: it found
        nothing before, and no host it may use has gained capacity it could fit in since.
        (Placements only take capacity away, so a walk that ran out of candidates stays empty.)

        The hosts that gained capacity since are looked at once each, in order (``_nofit`` holds
        how far); those that could fit are kept as suspects and looked at again on the next call,
        rather than forgetting the no-fit: a suspect that no longer could fit (a placement took
        what it had gained) cannot come back without gaining capacity again, i.e. without
        reappearing in ``freed``. So once the task that fitted on the freed host has taken it, the
        next task of the shape is known to fit nowhere without a walk. A suspect is not looked at
        again while its version (``_touch``) is the same: ``_could_fit`` depends only on the
        request and the host's own state."""
        if exclude is not None and self._fits_nowhere(req):
            return True
        key = (self._skid.get(req.id, req.shape), exclude)
        at = self._nofit.get(key)
        if at is None:
            return False
        freed = self.freed
        n = len(freed)
        sus = self._suspect.get(key)
        if at == n and not sus:
            return True
        hosts = self.hosts
        hver = self._hver
        could = self._could_fit
        mode = req.mode
        if sus:
            for i, s in enumerate(sus):
                hid = s[0]
                v = hver.get(hid, 0)
                if (s[1] == v and s[2] == mode) or could(req, hosts[hid]):
                    s[1], s[2] = v, mode
                    del sus[:i]  # those before it no longer could fit
                    return False
            sus.clear()
        cpu, ram = req.cpu_millis, req.ram
        for i in range(at, n):
            hid = freed[i]
            if hid != exclude:
                h = hosts.get(hid)
                # (A host short of the CPU or RAM cannot take req: a quick no before _could_fit.)
                if h is not None and h.cpu >= cpu and h.ramf >= ram and could(req, h):
                    self._nofit[key] = i + 1
                    self._suspect.setdefault(key, []).append([hid, hver.get(hid, 0), mode])
                    return False
        self._nofit[key] = n
        return True

    def _memo(self, req: _Req, exclude: str | None, only: str | None) -> tuple[Any, ...]:
        """The key of try_place(req, exclude, only) in the pass's memo of refusals (the shape by
        its number, ``_skid``: quicker to hash than the shape)."""
        sk = self._skid.get(req.id, req.shape)
        return sk, req.mode, req.priority, exclude, (only if only is not None else req.pin)

    def try_place(self, req: _Req, exclude: str | None = None, only: str | None = None
                  ) -> tuple[_Host, list[_Gpu]] | None:
        """try_place of placement.lua, through the pass's memo of refused shapes (``attempt``
        in queue.lua): a shape refused once in a pass is refused again in it."""
        only = only if only is not None else req.pin
        sk = self._skid.get(req.id, req.shape)
        memo = (sk, req.mode, req.priority, exclude, only)  # _memo
        if memo in self._refused:
            return None
        if only is not None:
            self._unproven = True  # a one-host try: no no-fit memo speaks for its refusal
        elif self._fits_nowhere(req, exclude):
            self._refused.add(memo)
            return None
        mode = req.mode
        found, capped = self._scan(req, mode, exclude, only)
        if found is None and mode == "first":
            found, capped = self._scan(req, "best", exclude, only)
        if found is None:
            self._refused.add(memo)
            if only is None and (not capped or not self._somewhere(req, exclude)):
                # The walk ran out of candidates, or stopped at the cap where no host could take
                # req anyway: placements only take capacity away, so it finds nothing until some
                # host it could use gains capacity (see _fits_nowhere).
                self._nofit[(sk, exclude)] = len(self.freed)
                self._suspect.pop((sk, exclude), None)
            else:
                self._unproven = True
        return found

    def _grant(self, req: _Req, placement: tuple[_Host, list[_Gpu]], now: int) -> None:
        self._changes += 1
        h, gs = placement
        if h.reserve > 0 and req.priority >= 3 and any(g.n == 0 for g in gs):
            # A critical grant on an idle GPU of a host with a reserve: that GPU is now in use,
            # and GPUs in use are no reserve, so shares below critical may go there. The one
            # grant that gives capacity: the no-fit memos must look at this host again.
            self._touch(h.id)
            self.freed.append(h.id)
        grants = []
        for g in gs:
            mem = req.gpu_mem if req.gpu_mem else g.free
            g.used += mem
            g.n += 1
            grants.append((g.pos, g.uuid, mem))
        cores = shared = 0
        if req.exclusive:
            if req.cpu_millis > 0:
                cores = req.cpu_millis // 1000
                h.cfree -= cores
        else:
            shared = req.cpu_millis
            h.shared += shared
        h.ram_used += req.ram
        h.slots_used += req.slots
        self._reindex(h, gs)
        pe = self.pass_ms(req)
        run = self.run_ms(req.task_type, req.expected_ms, req.ttl_ms)
        al = _Alloc(req.id, h.id, grants, cores, shared, req.ram, req.priority, req.kind, now,
                    None if run is None else now + run, None if pe is None else now + pe)
        al.slots = req.slots
        al.by_ttl = run is not None and req.ttl_ms > 0 and run == req.ttl_ms
        self._track(al)

    def _finish(self, aid: str) -> _Alloc | None:
        al = self.allocs.pop(aid, None)
        if al is None or not al.alive:
            return None
        self._changes += 1
        al.alive = False
        if al.pass_end is not None:
            e = (al.pass_end, aid)
            self.ends.discard(e)
            mine = self._hends.get(al.host)
            if mine:
                i = bisect_left(mine, e)
                if i < len(mine) and mine[i] == e:
                    del mine[i]
        self._touch(al.host)
        if self._byprio_on:
            self.byprio.discard((al.byprio, aid))
        h = self.hosts.get(al.host)
        if h is None:
            return al
        touched = []
        for pos, uuid, mem in al.grants:
            if not (pos < len(h.gpus) and h.gpus[pos].uuid == uuid):
                # return_grant: a grant recorded where its GPU no longer is is found by uuid.
                pos = next((x.pos for x in h.gpus if x.uuid == uuid), len(h.gpus))
            if pos < len(h.gpus):
                g = h.gpus[pos]
                g.used = max(0, g.used - mem)
                g.n = max(0, g.n - 1)
                touched.append(g)
        h.cfree += al.cores
        h.shared = max(0, h.shared - al.shared)
        h.ram_used = max(0, h.ram_used - al.ram)
        h.slots_used = max(0, h.slots_used - al.slots)
        self._reindex(h, touched)
        self.freed.append(h.id)
        return al
