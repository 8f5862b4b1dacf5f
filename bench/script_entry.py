"""What a ledger script pays on every call before it does any work: defining its helper library.

Redis runs a script's whole text at each EVALSHA, so every ``local function`` of the inlined
includes (``allocator/lua/includes``) becomes a new Lua closure on every call, whether or not the
call uses it. This benchmark cuts each script just before its own first statement (after the
includes) and returns there, so what is measured is the library's definition alone: once as
the loader builds it (only the definitions the script uses, ``allocator/scripts.py``) and once
with every include inlined whole, as it was built before. The trivial script (``noop.lua``),
measured in the same run, is the baseline. Every text, the baseline included, gets the ledger's
16 KEYS and, as ARGV, only the key prefix and an empty clock (what ``Allocator`` sends without an
injected clock): a library reads no other argument before the script's own code runs, so the
difference to the baseline is the library's definition alone. The absolute µs are not what a
whole call costs, which also carries the script's own ARGV and does its work (for ``place``,
see ``bench/place_floor.py``). Server time comes from
``INFO commandstats`` (deltas around each measurement; ``*`` marks one where the server's call
count disagreed with ours, i.e. another client ran scripts meanwhile).

    .venv/bin/python bench/script_entry.py --calls 20000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from allocator.keys import Keys  # noqa: E402
from allocator.scripts import _INCLUDE, _LAZY, _WRAP_CLOSE, SCRIPT_NAMES, _read, code_names, definitions, source  # noqa: E402
from bench.ledger import evalsha_us  # noqa: E402

DEFAULT_SCRIPTS = ("place", "release", "claim_grant", "finish_job", "schedule", "heartbeat", "grant_check", "tally_outbox")


def prelude(name: str, full: str) -> str:
    """``full`` (script ``name`` as built) up to the script's own first statement, returning the
    trivial script's answer there."""
    own = _LAZY.sub("", _read(f"{name}.lua"))  # the loader drops the @lazy lines
    last = list(_INCLUDE.finditer(own))
    body = own[last[-1].end():] if last else own
    close = _WRAP_CLOSE if full.endswith(_WRAP_CLOSE) else ""  # the script runs inside one function
    full = full[: len(full) - len(close)]
    assert full.endswith(body), name
    return full[: len(full) - len(body)] + "\nreturn '1'\n" + close


def closures(text: str) -> int:
    """How many functions the text defines at its top level, each one a closure per call: a lazy
    group (allocator/scripts.py, ``@lazy``) counts as its one function and its stubs."""
    start, end = text.find("local function __lazy()"), text.find("__lazy_lib = {")
    if start >= 0 and end > start:
        text = text[:start] + "local function __lazy()\n" + text[end:]
    return len(re.findall(r"^local function |^\w+ = function\(", text, re.MULTILINE))


def skeleton(pre: str, captures: bool) -> str | None:
    """``pre`` (a prelude) with each library function's body replaced by a return of the library
    names it uses: the same closures capturing the same upvalues, without their code
    (``captures``), or capturing nothing. Measured beside ``pre``, it tells what a closure's
    creation costs and what capturing its upvalues adds. None when the library cannot be split."""
    start = pre.find("local rcall")
    end = pre.find("local __lazy_lib")
    if end < 0:
        end = pre.rindex("return '1'")
    defs = definitions(pre[start:end]) if start >= 0 else None
    if defs is None:
        return None
    # The lazy roots are declared before the library (allocator/scripts.py) and captured as any local.
    seen = {n.strip() for line in pre[:start].splitlines() if line.startswith("local ")
            for n in line[len("local "):].split(",")}
    out = []
    for d in defs:
        header = next(line for line in d.text.split("\n") if line.startswith("local"))
        if header.startswith("local function"):
            refs = sorted(n for n in code_names(d.text) if n in seen and n not in d.names) if captures else []
            out.append(f"local function {d.names[0]}() return {', '.join(refs) or 'nil'} end")
        else:
            out.append(d.text)
        seen.update(d.names)
    return pre[:start] + "\n".join(out) + "\n" + pre[end:]


def measure(r: redis.Redis, text: str, keys: list[str], args: list[str], calls: int) -> tuple[float, bool]:
    """Server µs per EVALSHA of ``text`` over ``calls`` calls, and whether the counts agreed."""
    sha = r.script_load(text)
    us, counted = evalsha_us(r, calls, lambda: r.evalsha(sha, len(keys), *keys, *args))
    return us, counted == calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scripts", default=",".join(DEFAULT_SCRIPTS), help="comma list of ledger scripts")
    ap.add_argument("--calls", type=int, default=20000, help="EVALSHA calls per measurement")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each measures every script once, in turn")
    ap.add_argument("--redis-url", default=os.environ.get("ALLOCATOR_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    ap.add_argument("--anatomy", action="store_true",
                    help="also measure each used prelude as it was before the loader ran scripts inside one function, "
                         "and that text with its function bodies gone (upvalues kept, then none)")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.scripts.split(",") if n.strip()]
    for n in names:
        if n not in SCRIPT_NAMES or n == "noop":
            ap.error(f"--scripts: {n!r} is not a ledger script (one of {', '.join(SCRIPT_NAMES)})")
    if a.calls < 1 or a.repeat < 1:
        ap.error("--calls and --repeat must be at least 1")
    r = redis.Redis.from_url(a.redis_url)
    keys = Keys(f"bench-entry-{uuid.uuid4().hex[:8]}")
    kl, args = keys.ledger_keys(), [keys.prefix, ""]  # the preludes read no key: nothing is written
    texts = {("noop", "used"): source("noop")}
    for n in names:
        texts[(n, "whole")] = prelude(n, source(n, used_only=False))
        texts[(n, "used")] = prelude(n, source(n))
        if a.anatomy:
            flat = prelude(n, source(n, wrap=False))  # the same library, not run inside one function
            for kind, variant in (("flat", flat), ("captures", skeleton(flat, True)), ("bare", skeleton(flat, False))):
                if variant is not None and variant != texts[(n, "used")]:
                    texts[(n, kind)] = variant
    runs: dict[tuple[str, str], list[float]] = {k: [] for k in texts}
    clean = {k: True for k in texts}
    for _ in range(a.repeat):
        for k, text in texts.items():
            us, ok = measure(r, text, kl, args, a.calls)
            runs[k].append(us)
            clean[k] = clean[k] and ok
    med = {k: statistics.median(xs) for k, xs in runs.items()}
    base = med[("noop", "used")]
    rows: list[dict[str, Any]] = []
    print(f"noop (the baseline): {base:.1f} µs per call (median of {a.repeat}; '*' = counts disagreed)")
    print(f"{'script':<14} {'closures':>15} {'µs/call':>15} {'÷ noop':>13} {'extra µs':>15} {'saved':>6}")
    print(f"{'':<14} {'whole → used':>15} {'whole → used':>15} {'whole → used':>13} {'whole → used':>15}")
    for n in names:
        w, u = (n, "whole"), (n, "used")
        row = {"script": n, "closures_whole": closures(texts[w]), "closures_used": closures(texts[u]),
               "us_whole": med[w], "us_used": med[u], "extra_us_whole": med[w] - base,
               "extra_us_used": med[u] - base, "ratio_whole": med[w] / base, "ratio_used": med[u] / base,
               "runs_whole": runs[w], "runs_used": runs[u], "clean": clean[w] and clean[u]}
        rows.append(row)
        mark = "" if row["clean"] else "*"
        print(f"{n:<14} {row['closures_whole']:>7} → {row['closures_used']:>4} {med[w]:>7.1f} → {med[u]:>5.1f}{mark}"
              f" {med[w] / base:>5.1f} → {med[u] / base:>4.1f} {med[w] - base:>7.1f} → {med[u] - base:>5.1f}"
              f" {1 - (med[u] - base) / (med[w] - base) if med[w] > base else 0:>6.0%}")
    if a.anatomy:
        print(f"\n{'script':<14} {'µs/call: used':>14} {'not wrapped':>12} {'bodies gone':>12} {'no upvalues':>12}"
              "  (extra over noop; the last two from the unwrapped text)")
        for row in rows:
            n = row["script"]
            parts = [med[(n, "used")] - base] + [med[(n, k)] - base if (n, k) in med else float("nan")
                                                 for k in ("flat", "captures", "bare")]
            row["extra_us_not_wrapped"], row["extra_us_bodies_gone"], row["extra_us_no_upvalues"] = parts[1:]
            row["runs_not_wrapped"], row["runs_bodies_gone"], row["runs_no_upvalues"] = (
                runs.get((n, "flat")), runs.get((n, "captures")), runs.get((n, "bare")))
            print(f"{n:<14} {parts[0]:>14.1f} {parts[1]:>12.1f} {parts[2]:>12.1f} {parts[3]:>12.1f}")
    if a.json_path:
        Path(a.json_path).write_text(json.dumps({"calls": a.calls, "repeat": a.repeat, "noop_us": base,
                                                 "noop_runs": runs[("noop", "used")], "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
