"""The ETA simulation alone, offline, on a ledger snapshot pickled by ``bench/eta_cost.py
--snapshot``: times the full refresh and the on-demand estimates (head, middle, end of the line,
each on the line read up to its rank + pass depth, as ``EtaEngine.compute_one`` reads it; CPU
time of the simulation, snapshot read excluded), and
with ``--compare OTHER_ETA`` checks that another version of the package ``allocator/eta/`` (a copy
of the directory, e.g. ``git archive``'d from an earlier commit, or of the single module
``allocator/eta.py`` it was before) gives exactly the same estimates on the same snapshot.

  .venv/bin/python bench/eta_replay.py SNAPSHOT.pkl [--compare /tmp/old/allocator/eta] [--sample 20] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import pickle
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator import eta  # noqa: E402


def load_module(path: str) -> ModuleType:
    """Another version of the estimates, imported under a name of its own: a copy of the package
    ``allocator/eta/`` (a directory), or of the single module ``allocator/eta.py`` it was before.
    It is loaded as a part of ``allocator``, so that its relative imports (``..keys``, ``.keys``)
    resolve to this checkout's modules."""
    import allocator  # noqa: F401  (the parent package must be imported first)

    name = "allocator._eta_other"
    p = Path(path)
    if p.is_dir():
        spec = importlib.util.spec_from_file_location(name, p / "__init__.py",
                                                      submodule_search_locations=[str(p)])
    else:
        spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--compare: {path} is neither a Python file nor a package directory")
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cases(snap: Any, sample: int = 0) -> list[tuple[str, Any, set[str] | None]]:
    """(label, snapshot, targets): the whole line, then one task at the head, middle and end
    (and at ``sample`` more ranks, evenly spread)."""
    out: list[tuple[str, Any, set[str] | None]] = [("all", snap, None)]
    n = len(snap.pending)
    ranks = [("head", 0), ("middle", n // 2), ("end", n - 1)]
    ranks += [(f"#{r}", r) for r in range(n // (sample + 1), n, n // (sample + 1))][:sample] if sample else []
    for label, rank in ranks:
        part = dataclasses.replace(snap, pending=snap.pending[:rank + snap.pass_depth + 1])
        out.append((label, part, {snap.pending[rank][0]}))
    return out


def simulate(mod: ModuleType, snap: Any, targets: set[str] | None
             ) -> tuple[dict[str, int | None], float, int, int, int]:
    """One simulation: estimates, CPU ms, events, passes (those skipped included), skipped."""
    # CPU time of this process: steadier than the wall clock on a shared machine; garbage of
    # the previous run collected first, so that no run pays for another's.
    gc.collect()
    t0 = time.process_time()
    sim = mod.Simulation(snap)
    starts = sim.run(targets)
    return starts, (time.process_time() - t0) * 1000, sim.events, sim.passes, getattr(sim, "skipped", 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot")
    ap.add_argument("--compare", default=None, help="another version of allocator/eta/ (a directory) or of the former allocator/eta.py: its estimates must be the same")
    ap.add_argument("--profile", action="store_true", help="cProfile the full refresh (top 25 by own time)")
    ap.add_argument("--only", default=None, help="run only this case (all, head, middle, end)")
    ap.add_argument("--repeat", type=int, default=1, help="time each case this many times, report the fastest")
    ap.add_argument("--sample", type=int, default=0, help="also estimate one task at this many more ranks")
    args = ap.parse_args(argv)
    snap = pickle.loads(Path(args.snapshot).read_bytes())
    other = load_module(args.compare) if args.compare else None
    bad = 0
    for label, part, targets in cases(snap, args.sample):
        if args.only and label != args.only:
            continue
        if args.profile and label == "all":
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(simulate, eta, part, targets)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        starts, ms, events, passes, skipped = simulate(eta, part, targets)
        if other is not None:
            ref, ref_ms, ref_events, ref_passes, _ = simulate(other, part, targets)
        for _ in range(args.repeat - 1):  # alternated, so that both see the same load
            ms = min(ms, simulate(eta, part, targets)[1])
            if other is not None:
                ref_ms = min(ref_ms, simulate(other, part, targets)[1])
        row = f"{label:6} {ms:8.0f} ms  {events:6} events {passes:6} passes ({skipped} skipped)"
        if other is not None:
            diff = [t for t in ref if ref[t] != starts.get(t)] + [t for t in starts if t not in ref]
            bad += len(diff)
            row += (f"   | other {ref_ms:8.0f} ms {ref_events:6} events {ref_passes:6} passes"
                    f"   {len(ref)} estimates, {len(diff)} differ")
        print(row, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
