"""Checks that a ledger snapshot is consistent: nothing oversubscribed, nothing held twice,
indexes in step with the hosts. Used by the tests, the soak run and operators (after an incident).

It works on ``Allocator.snapshot()`` (one atomic read) so concurrent writers cannot produce
false alarms. It returns the violations found instead of raising, so a checker can report all;
a record or host hash too damaged to read (a key lost, a field missing, JSON that does not parse)
is one of them. A host whose re-registration lowered its totals below what its grants hold
(field ``overcommitted``, see register_host.lua) is held to its accounting, not its capacity.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from .keys import gpu_ffc_score, gpu_ord_score


def _list(text: str | None) -> list[Any]:
    v = json.loads(text) if text else []
    return v if isinstance(v, list) else []


def _scalars(items: list[Any], field: str) -> list[Any]:
    """``items`` when each is a number or a string (core ids, service names); a list or an object
    among them is a damaged record, which would otherwise fail as a key."""
    for x in items:
        if isinstance(x, (list, dict)) or x is None:
            raise TypeError(f"{field} holds {json.dumps(x)}, not an id or a name")
    return items


def _overcommitted(f: dict[str, str]) -> bool:
    """Whether the host's last registration left its grants above its totals: legal, see
    register_host.lua; its capacity bounds are then not checked."""
    return f.get("overcommitted") == "1"


def _gpu_members(hosts: dict[str, dict[str, str]]) -> set[str]:
    """The index members of every GPU the registered hosts have ("<host>#<pos>")."""
    out: set[str] = set()
    for h, f in hosts.items():
        try:
            out.update(f"{h}#{pos}" for pos in range(int(f.get("ngpu") or 0)))
        except ValueError:
            pass  # reported with the host
    return out


def check(snap: dict[str, Any]) -> list[str]:
    """All violations of the ledger invariants in ``snap`` (empty when consistent)."""
    bad: list[str] = []
    hosts: dict[str, dict[str, str]] = snap["hosts"] or {}
    allocs: dict[str, dict[str, str]] = snap["allocs"] or {}
    gpu_mem: dict[tuple[str, str], int] = defaultdict(int)
    gpu_n: dict[tuple[str, str], int] = defaultdict(int)
    cores_by_host: dict[str, dict[int, str]] = defaultdict(dict)
    shared: dict[str, int] = defaultdict(int)
    ram: dict[str, int] = defaultdict(int)
    on_host: dict[str, set[str]] = defaultdict(set)
    slots: dict[str, int] = defaultdict(int)
    svc_refs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    granted_gpus: dict[str, set[str]] = defaultdict(set)
    for aid, a in allocs.items():
        h = (a or {}).get("host")
        if not h:
            bad.append(f"{aid}: in the active set but its record is gone or names no host")
            continue
        on_host[h].add(aid)
        if a.get("state") != "active":
            bad.append(f"{aid}: in the active set but state is {a.get('state')}")
        try:
            grants = [(g["uuid"], int(g["memory_mb"])) for g in _list(a.get("gpus"))]
            held = _scalars(_list(a.get("cores")), "cores")
            numbers = (int(a.get("shared_millis") or 0), int(a.get("ram_mb") or 0), int(a.get("slots") or 0))
            names = _scalars(_list(a.get("services")), "services")
            expires = int(a.get("expires") or 0)
        except (ValueError, TypeError, KeyError) as exc:
            bad.append(f"{aid}: unreadable record ({type(exc).__name__}: {exc})")
            continue
        uuids = [u for u, _ in grants]
        if len(set(uuids)) != len(uuids):
            bad.append(f"{aid}: holds the same GPU more than once {sorted(uuids)}")
        for uuid, mb in grants:
            gpu_mem[(h, uuid)] += mb
            gpu_n[(h, uuid)] += 1
            granted_gpus[h].add(uuid)
        for c in held:
            if c in cores_by_host[h]:
                bad.append(f"{h}: core {c} held by {cores_by_host[h][c]} and {aid}")
            cores_by_host[h][c] = aid
        shared[h] += numbers[0]
        ram[h] += numbers[1]
        slots[h] += numbers[2]
        for name in names:
            svc_refs[h][name] += 1
        in_expiry = aid in (snap["expiry"] or {})
        if (expires > 0) != in_expiry:
            bad.append(f"{aid}: expiry index out of step (expires={expires}, indexed={in_expiry})")
    for name in ("byprio", "ends"):
        extra = set(snap.get(name) or {}) - set(allocs)
        if extra:
            bad.append(f"{name} index holds allocations that are not active: {sorted(extra)[:5]}")
    missing = set(allocs) - set(snap.get("byprio") or {})
    if missing:
        bad.append(f"active allocations missing from byprio: {sorted(missing)[:5]}")
    stray_expiry = set(snap.get("expiry") or {}) - set(allocs)
    if stray_expiry:
        bad.append(f"expiry index holds allocations that are not active: {sorted(stray_expiry)[:5]}")
    for name in ("idle_hosts", "cpu_ord", "cpu_idx", "ram_idx"):
        stray = set(snap.get(name) or {}) - set(hosts)
        if stray:
            bad.append(f"{name} index holds hosts that are not registered: {sorted(stray)[:5]}")
    members = _gpu_members(hosts)
    for name in ("gpu_idx", "gpu_ord", "gpu_idle", "gpu_idle_ord", "gpu_ffc"):
        stray = set(snap.get(name) or {}) - members
        if stray:
            bad.append(f"{name} index holds GPUs no registered host has: {sorted(stray)[:5]}")
    for name, of in (("gpu_ffc", "gpu_ord"), ("gpu_idle_ord", "gpu_idle")):
        stray = set(snap.get(name) or {}) - set(snap.get(of) or {})
        if stray:
            bad.append(f"{name} holds GPUs that {of} does not: {sorted(stray)[:5]}")
    for tid, state in (snap.get("pending") or {}).items():
        if state != "pending":
            bad.append(f"{tid}: in the pending line but its allocation is {state}")
    for h, f in hosts.items():
        try:
            bad.extend(_check_host(h, f, snap, gpu_mem, gpu_n, cores_by_host[h], shared[h], ram[h]))
            bad.extend(_check_unlisted_gpus(h, f, granted_gpus[h]))
            bad.extend(_check_slots_and_services(h, f, snap, slots[h], svc_refs[h]))
            bad.extend(_check_summary(h, f, (snap.get("summaries") or {}).get(h)))
        except (KeyError, ValueError, TypeError) as exc:
            bad.append(f"{h}: unreadable host hash ({type(exc).__name__}: {exc})")
        held = set(snap["host_allocs"].get(h) or [])
        if held != on_host[h]:
            bad.append(f"{h}: host allocation set {sorted(held)} != active allocations {sorted(on_host[h])}")
    bad.extend(_check_names(hosts, snap.get("names") or {}))
    bad.extend(_check_name_sets(hosts, snap.get("names") or {}, snap.get("model_hosts") or {}, "m"))
    bad.extend(_check_name_sets(hosts, snap.get("names") or {}, snap.get("label_hosts") or {}, "l"))
    return bad


def _check_name_sets(hosts: dict[str, dict[str, str]], names: dict[str, str], sets: dict[str, Any],
                     kind: str) -> list[str]:
    """Each model's (kind ``m``) or label's (kind ``l``) set of hosts (``keys.model_hosts``,
    ``keys.label_hosts``) is the hosts marked ``mhosts`` (``lhosts``) whose counted list names
    it, and the count's ``mhosts`` (``lhosts``) their number: a host missing from its model's set
    would let a request for that model be refused while the host could take it, and one missing
    from a label's set would be passed over by a walk for that label."""
    mark, what = f"{kind}hosts", {"m": "model", "l": "label"}[kind]
    marked = {h: f for h, f in hosts.items() if f.get(mark) == "1"}
    want: dict[str, set[str]] = {}
    for h, f in marked.items():
        try:
            listed = json.loads(f.get("named") or "[]")
        except ValueError:
            continue  # reported by _check_names
        for name in listed if isinstance(listed, list) else []:
            if isinstance(name, str) and name.startswith(f"{kind}:"):
                want.setdefault(name[2:], set()).add(h)
    got = {m: set(v) for m, v in sets.items() if isinstance(v, list) and v}
    bad = []
    if got != want:
        diff = sorted((m, sorted(got.get(m, set()) ^ want.get(m, set()))) for m in set(got) | set(want)
                      if got.get(m, set()) != want.get(m, set()))[:5]
        bad.append(f"{what} host sets differ from what the hosts list: {diff} (Allocator.recount_names() rebuilds them)")
    if int(names.get(mark) or 0) != len(marked):
        bad.append(f"names count has {names.get(mark) or 0} hosts in the {what} sets, {len(marked)} are marked "
                   f"{mark} (Allocator.recount_names() rebuilds it)")
    return bad


def _check_names(hosts: dict[str, dict[str, str]], names: dict[str, str]) -> list[str]:
    """The count of GPU models and labels (``keys.names``) is what the hosts marked ``named``
    list, and each list is the host's models and labels as its fields stand: a model or label
    missing from the count would be refused at once while a host has it. (A count out of step
    is rebuilt by ``Allocator.recount_names()``.)"""
    want: Counter[str] = Counter()
    bad = []
    counted = 0
    for h, f in hosts.items():
        if "named" not in f:
            continue
        counted += 1
        try:
            listed = json.loads(f["named"])
            labels = json.loads(f.get("labels") or "{}")
            now = [f"l:{k}={v}" for k, v in labels.items()]
            now += [f"m:{f[f'g{pos}:model']}" for pos in range(int(f.get("ngpu") or 0))]
        except (KeyError, ValueError, AttributeError, TypeError) as exc:
            bad.append(f"{h}: unreadable models or labels ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(listed, list) or Counter(map(str, listed)) != Counter(now):
            bad.append(f"{h}: counted models and labels {listed} are not its own {sorted(now)} "
                       "(Allocator.recount_names() rebuilds the count)")
        want.update(map(str, listed) if isinstance(listed, list) else [])
    got = {k: int(v) for k, v in names.items() if k not in ("hosts", "mhosts", "lhosts", "stamp")}
    if got != dict(want):
        diff = sorted(set(got.items()) ^ set(want.items()))[:5]
        bad.append(f"names count differs from what the hosts list: {diff} (Allocator.recount_names() rebuilds it)")
    if int(names.get("hosts") or 0) != counted:
        bad.append(f"names count covers {names.get('hosts') or 0} hosts, {counted} are marked named "
                   "(Allocator.recount_names() rebuilds it)")
    if names.get("stamp") == "stale":
        bad.append("the label and model host sets are stale since a registration by a release that does not keep "
                   "them; walks do not use them (Allocator.recount_names() rebuilds them)")
    return bad


def _check_host(h: str, f: dict[str, str], snap: dict[str, Any], gpu_mem: dict[tuple[str, str], int],
                gpu_n: dict[tuple[str, str], int], held_cores: dict[int, str], shared: int, ram: int) -> list[str]:
    bad: list[str] = []
    over = _overcommitted(f)
    cfree, sh = int(f["cfree"]), int(f["shared"])
    cpu_free = max(0, cfree * 1000 - sh)
    ram_free = max(0, int(f["ram"]) - int(f["ram_used"]))
    schedulable = f["state"] == "ready" and cpu_free > 0 and ram_free > 0
    if sh != shared:
        bad.append(f"{h}: shared pool lends {sh} millicores, allocations hold {shared}")
    if sh > cfree * 1000 and not over:
        bad.append(f"{h}: shared pool {sh} exceeds free cores {cfree}")
    if int(f["ram_used"]) != ram:
        bad.append(f"{h}: ram_used {f['ram_used']} != allocations' {ram}")
    if ram > int(f["ram"]) and not over:
        bad.append(f"{h}: RAM oversubscribed {ram} > {f['ram']}")
    cores = _list(f.get("cores"))
    cmap = f.get("cmap", "")
    taken = {c for c, ch in zip(cores, cmap) if ch == "0"}
    if taken != {c for c in held_cores if c in set(cores)}:
        bad.append(f"{h}: core map marks {sorted(taken)} taken, allocations hold {sorted(held_cores)}")
    if cmap.count("1") != cfree:
        bad.append(f"{h}: cfree {cfree} != free cores in map {cmap.count('1')}")
    idle = gidle = gfree = 0
    for pos in range(int(f["ngpu"])):
        p = f"g{pos}:"
        uuid, total, ext = f[p + "uuid"], int(f[p + "total"]), int(f[p + "ext"])
        used, n = int(f[p + "used"]), int(f[p + "n"])
        if used != gpu_mem[(h, uuid)] or n != gpu_n[(h, uuid)]:
            bad.append(f"{h} GPU {pos}: used {used}/{n} holders != allocations {gpu_mem[(h, uuid)]}/{gpu_n[(h, uuid)]}")
        if used + ext > total and not over:
            bad.append(f"{h} GPU {pos}: oversubscribed {used}+{ext} > {total}")
        free = max(0, total - ext - used)
        m = f"{h}#{pos}"
        want_idx = free if schedulable and free > 0 else None
        if (snap["gpu_idx"] or {}).get(m) != want_idx:
            bad.append(f"{h} GPU {pos}: gpu_idx has {(snap['gpu_idx'] or {}).get(m)}, expected {want_idx}")
        want_idle = free if schedulable and free > 0 and n == 0 else None
        idle += want_idle is not None
        gidle += free > 0 and n == 0
        gfree += free * 1000 // (total - ext) if total > ext else 0
        if (snap["gpu_idle"] or {}).get(m) != want_idle:
            bad.append(f"{h} GPU {pos}: gpu_idle has {(snap['gpu_idle'] or {}).get(m)}, expected {want_idle}")
        want_idle_ord = None if want_idle is None else float(gpu_ord_score(int(f.get("ord") or 0), pos))
        if (snap.get("gpu_idle_ord") or {}).get(m) != want_idle_ord:
            bad.append(f"{h} GPU {pos}: gpu_idle_ord has {(snap.get('gpu_idle_ord') or {}).get(m)}, "
                       f"expected {want_idle_ord}")
        if (m in (snap["gpu_ord"] or {})) != (want_idx is not None):
            bad.append(f"{h} GPU {pos}: gpu_ord membership out of step")
        want_ffc = None if want_idx is None else float(gpu_ffc_score(int(f.get("ord") or 0), pos, free))
        if (snap.get("gpu_ffc") or {}).get(m) != want_ffc:
            bad.append(f"{h} GPU {pos}: gpu_ffc has {(snap.get('gpu_ffc') or {}).get(m)}, expected {want_ffc}")
    if "gfree" in f and (int(f["gfree"]), int(f["gidle"])) != (gfree, gidle):
        bad.append(f"{h}: GPU totals gfree/gidle {f['gfree']}/{f['gidle']} != {gfree}/{gidle} from its GPUs")
    have = (snap.get("idle_hosts") or {}).get(h)
    if have != (idle or None):
        bad.append(f"{h}: idle_hosts has {have}, expected {idle or None} idle GPU(s)")
    want_cpu = cpu_free if schedulable else None
    if (snap["cpu_idx"] or {}).get(h) != want_cpu:
        bad.append(f"{h}: cpu_idx has {(snap['cpu_idx'] or {}).get(h)}, expected {want_cpu}")
    want_ord = float(f.get("ord") or 0) if schedulable else None
    if (snap.get("cpu_ord") or {}).get(h) != want_ord:
        bad.append(f"{h}: cpu_ord has {(snap.get('cpu_ord') or {}).get(h)}, expected {want_ord}")
    want_ram = ram_free if schedulable else None
    if (snap["ram_idx"] or {}).get(h) != want_ram:
        bad.append(f"{h}: ram_idx has {(snap['ram_idx'] or {}).get(h)}, expected {want_ram}")
    return bad


def _check_unlisted_gpus(h: str, f: dict[str, str], granted: set[str]) -> list[str]:
    """A grant on a GPU its host no longer lists holds memory the host's totals leave out: the
    registration that dropped the GPU marks the host overcommitted (register_host.lua), and
    capacity counts that memory as allocated."""
    listed = {f.get(f"g{pos}:uuid") for pos in range(int(f.get("ngpu") or 0))}
    unlisted = sorted(granted - listed)
    if unlisted and not _overcommitted(f):
        return [f"{h}: grants hold GPUs the host does not list {unlisted[:5]}, and it is not marked overcommitted"]
    return []


def _check_summary(h: str, f: dict[str, str], summary: list[float] | None) -> list[str]:
    """The host's scan summary (what placement reads), where it has one, holds the same values as
    its hash. A host without one is valid: placement reads its hash instead (a ledger written
    before summaries existed), and its next change writes one."""
    if summary is None:
        return []
    ngpu = int(f["ngpu"])
    ncores = int(f["ncores"]) if "ncores" in f else len(f.get("cmap", ""))
    want: list[float] = [1 if f["state"] == "ready" else 0, int(f["cfree"]), int(f["shared"]), int(f["ram"]),
                         int(f["ram_used"]), ngpu, 1 if f.get("parked") == "1" else 0, int(f.get("gen") or 1),
                         int(f.get("reserve_gpus") or 0), int(f["gfree"]), int(f["gidle"]), ncores]
    for pos in range(ngpu):
        p = f"g{pos}:"
        if p + "total" in f:
            want += [int(f[p + "total"]), int(f[p + "ext"]), int(f[p + "used"]), int(f[p + "n"])]
        else:
            want += [-1, 0, 0, 0]
    if [float(x) for x in summary] != [float(x) for x in want]:
        return [f"{h}: scan summary {summary} != host fields {want}"]
    return []


def _check_slots_and_services(h: str, f: dict[str, str], snap: dict[str, Any], slots: int,
                              refs: dict[str, int]) -> list[str]:
    """Worker slots held = the allocations' slots <= the host's; each service instance is referenced
    exactly by the active allocations naming it, and holds one port of the pool, held by no other
    (a pool narrowed by a re-registration may leave a running instance outside it until it stops)."""
    bad: list[str] = []
    used, total = int(f.get("slots_used") or 0), int(f.get("slots") or 0)
    if used != slots:
        bad.append(f"{h}: slots_used {used} != allocations' {slots}")
    if slots > total and not _overcommitted(f):
        bad.append(f"{h}: worker slots oversubscribed {slots} > {total}")
    entries = {n: json.loads(v) for n, v in ((snap.get("services") or {}).get(h) or {}).items()}
    for name, e in list(entries.items()):
        if not isinstance(e, dict):
            bad.append(f"{h}: service {name}: unreadable instance {json.dumps(e)}")
            del entries[name]
    ports = dict((snap.get("service_ports") or {}).get(h) or {})
    for name, n in refs.items():
        if name not in entries:
            bad.append(f"{h}: service {name} is held by {n} allocation(s) but has no instance")
    for name, e in entries.items():
        if int(e.get("refs") or 0) != refs.get(name, 0):
            bad.append(f"{h}: service {name} counts {e.get('refs')} reference(s), allocations hold {refs.get(name, 0)}")
        if e.get("state") not in ("starting", "running", "stopping"):
            bad.append(f"{h}: service {name} in unknown state {e.get('state')}")
        port = str(e.get("port"))
        if ports.pop(port, None) != name:
            bad.append(f"{h}: service {name} on port {port}, which the port pool does not assign to it")
    if ports:
        bad.append(f"{h}: ports {sorted(ports)} assigned to no service instance")
    return bad
