"""The least ``place`` could cost the server while running the Redis commands it runs now.

``place`` runs about 30 Redis commands per allocation (the scan's index pages and host summaries,
the chosen host's fields, its index entries, the record, its five index entries, the outbox
event). This benchmark asks how much of ``place``'s server time those commands account for
once the logic that chooses and builds them is gone. It registers a fleet (5,000 hosts x 8 GPUs
by default), holds ``--held`` allocations of the ledger benchmark's mix, and records with
``MONITOR`` the commands of ``--requests`` real ``place`` calls. For each call it then builds a
script that issues exactly those commands with their arguments written into its text, and
measures, in interleaved rounds (server µs per call from ``INFO commandstats``):

- **noop**: the trivial script, with ``place``'s KEYS and ARGV;
- **place**: the real script, on the same requests under new ids (each round's allocations are
  released after the round, outside the measurement);
- **commands**: the recorded commands, nothing else;
- **commands + JSON**: the same, plus decoding the request and encoding a reply of the real
  reply's shape (decoded from ARGV, which adds a decode the real script does not pay).

and how many of their µs Redis counted under the commands' own names. The recorded allocations
stay held: a round of the recorded scripts rewrites, in order, what their calls wrote, so each
round ends with the ledger as it was.
``MONITOR`` shows every client's commands: the recording keeps the calls this client sent
(by its address), so others may share the server, though their load makes the timings noisier.

    .venv/bin/python bench/place_floor.py --redis-url redis://127.0.0.1:6390/4 --json floor.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from allocator.client import Allocator, new_allocation_id  # noqa: E402

try:
    from bench import fleets  # python -m bench.place_floor
    from bench.ledger import make_requests, server_stats
    from bench.scan_cost import fill, fleet_arguments, report
except ImportError:  # python bench/place_floor.py
    import fleets  # type: ignore[no-redef]
    from ledger import make_requests, server_stats  # type: ignore[no-redef]
    from scan_cost import fill, fleet_arguments, report  # type: ignore[no-redef]

console = Console(width=None if sys.stdout.isatty() else 160)

_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8, ord('"'): 34, ord("\\"): 92}


def parse_monitor_line(line: bytes) -> tuple[bytes, list[bytes]] | None:
    """(client, argv) of one MONITOR line: ``<ts> [<db> <client>] "arg" "arg" ...``, each argument
    quoted with C escapes and \\xHH for other bytes; None for a line of another form."""
    head, sep, rest = line.partition(b"] ")
    if not sep or b" [" not in head:
        return None
    client = head.split(b" ")[-1]
    args: list[bytes] = []
    i, n = 0, len(rest)
    while i < n:
        if rest[i] == 32:  # a space between arguments
            i += 1
            continue
        if rest[i] != 34:
            return None
        i += 1
        buf = bytearray()
        while i < n and rest[i] != 34:
            c = rest[i]
            if c == 92 and i + 1 < n:
                e = rest[i + 1]
                if e == ord("x"):
                    buf.append(int(rest[i + 2:i + 4], 16))
                    i += 4
                    continue
                buf.append(_ESCAPES.get(e, e))
                i += 2
                continue
            buf.append(c)
            i += 1
        i += 1
        args.append(bytes(buf))
    return client, args


def lua_literal(b: bytes) -> str:
    """b as a Lua string literal (decimal escapes for everything that is not plain ASCII text)."""
    return '"' + "".join(f"\\{x}" if x < 32 or x > 126 or x in (34, 92) else chr(x) for x in b) + '"'


def literal_script(commands: list[list[bytes]], with_json: bool) -> str:
    lines = ["local req = cjson.decode(ARGV[3])"] if with_json else []
    lines += ["redis.call(" + ", ".join(lua_literal(a) for a in cmd) + ")" for cmd in commands]
    lines.append("return cjson.encode(cjson.decode(ARGV[6]))" if with_json else "return 1")
    return "\n".join(lines)


def place_calls(lines: list[bytes], sha: bytes, addr: bytes) -> list[list[list[bytes]]]:
    """The commands of each EVALSHA of ``sha`` that client ``addr`` sent, from MONITOR lines.

    A script runs alone, so the "lua" lines right after its EVALSHA are its commands. MONITOR
    shows every client of the server, and other clients may run the same script meanwhile
    (on other databases too): their calls are skipped by their address."""
    current: list[list[bytes]] | None = None
    seen: list[list[list[bytes]]] = []
    for line in lines:
        parsed = parse_monitor_line(line)
        if parsed is None:
            continue
        client, argv = parsed
        if client == b"lua":
            if current is not None:
                current.append(argv)
        elif client == addr and argv and argv[0].upper() == b"EVALSHA" and argv[1] == sha:
            current = []
            seen.append(current)
        else:
            current = None
    return seen


def capture(alloc: Allocator, redis_url: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Places each request with the real script (the path of Allocator.allocate) while a MONITOR
    connection records what the script runs; returns per call its ARGV and reply and the commands."""
    r: redis.Redis = alloc.redis
    mon = redis.Redis(connection_pool=redis.ConnectionPool.from_url(redis_url))
    conn = mon.connection_pool.get_connection()
    conn.send_command("MONITOR")
    if conn.read_response() not in (b"OK", "OK"):
        raise SystemExit("MONITOR was refused")
    calls: list[dict[str, Any]] = []
    marker = f"place-floor-{uuid.uuid4().hex}".encode()
    addr = str(r.client_info()["addr"]).encode()
    for q in requests:
        req = alloc.build_request(q, strategy="best_fit")
        args = [alloc._prefix_arg, alloc._now_arg(), *alloc.place_args(req, new_allocation_id())]
        reply = alloc.scripts["place"](keys=alloc._ledger_keys, args=args)
        calls.append({"args": args, "reply": reply, "commands": []})
    r.echo(marker)
    lines: list[bytes] = []
    while True:
        line = conn.read_response()
        line = line if isinstance(line, bytes) else line.encode()
        parsed = parse_monitor_line(line)
        if parsed and parsed[1][:1] and parsed[1][0].upper() == b"ECHO" and parsed[1][1:] == [marker]:
            break
        lines.append(line)
    seen = place_calls(lines, alloc.scripts["place"].sha.encode(), addr)
    mon.connection_pool.disconnect()
    if len(seen) != len(calls):
        raise SystemExit(f"recorded {len(seen)} place calls, made {len(calls)}: is another client running scripts?")
    for call, commands in zip(calls, seen):
        call["commands"] = commands
        call["id"] = json.loads(call["reply"])["alloc"]["id"]
    return calls


def run(args: argparse.Namespace) -> dict[str, Any]:
    ns = f"bench-floor-{uuid.uuid4().hex[:8]}"
    alloc = Allocator(redis_url=args.redis_url, namespace=ns)
    r: redis.Redis = alloc.redis
    try:
        t0 = time.perf_counter()
        for h in fleets.synthetic_fleet(args.hosts, gpus=args.gpus):
            alloc.register_host(h)
        held = fill(alloc, args.held, args.seed)
        console.print(f"{args.hosts:,} hosts x {args.gpus} GPUs, {held:,} allocations held "
                      f"({time.perf_counter() - t0:.1f} s to build)")
        requests = make_requests(random.Random(args.seed + 1), args.requests)
        calls = capture(alloc, args.redis_url, requests)
        n_cmds = statistics.mean(len(c["commands"]) for c in calls)
        # The recorded allocations stay: a round of the recorded scripts rewrites, in the same
        # order, what their calls wrote, so it ends with the ledger as it was.
        keys = alloc._ledger_keys
        noop = r.script_load(alloc.scripts["noop"].script)
        bare = [r.script_load(literal_script(c["commands"], False)) for c in calls]
        full = [r.script_load(literal_script(c["commands"], True)) for c in calls]
        built = [alloc.build_request(q, strategy="best_fit") for q in requests]

        def measure(one: Any) -> tuple[float, float]:
            before = server_stats(r)
            for _ in range(args.rounds):
                for i, c in enumerate(calls):
                    one(i, c)
            after = server_stats(r)
            n = after["evalsha_calls"] - before["evalsha_calls"]
            return ((after["evalsha_usec"] - before["evalsha_usec"]) / n,
                    (after["inner_usec"] - before["inner_usec"]) / n)

        def place_rounds() -> tuple[float, float]:
            """The real script on the recorded requests under new ids; each round's allocations
            are released after it, outside the counted span."""
            usec = inner = n = 0.0
            for _ in range(args.rounds):
                made = [new_allocation_id() for _ in calls]
                before = server_stats(r)
                for req, aid in zip(built, made):
                    alloc.scripts["place"](keys=keys, args=[alloc._prefix_arg, alloc._now_arg(),
                                                            *alloc.place_args(req, aid)])
                after = server_stats(r)
                for aid in made:
                    alloc.release(aid)
                usec += after["evalsha_usec"] - before["evalsha_usec"]
                inner += after["inner_usec"] - before["inner_usec"]
                n += after["evalsha_calls"] - before["evalsha_calls"]
            return usec / n, inner / n

        def run_noop(i: int, c: dict[str, Any]) -> None:
            r.evalsha(noop, len(keys), *keys, *c["args"])

        def run_bare(i: int, c: dict[str, Any]) -> None:
            r.evalsha(bare[i], len(keys), *keys, *c["args"])

        def run_full(i: int, c: dict[str, Any]) -> None:
            r.evalsha(full[i], len(keys), *keys, *c["args"], c["reply"])

        figures: dict[str, list[tuple[float, float]]] = {"noop": [], "place": [], "commands": [], "commands_json": []}
        for _ in range(args.repeat):
            figures["noop"].append(measure(run_noop))
            figures["place"].append(place_rounds())
            figures["commands"].append(measure(run_bare))
            figures["commands_json"].append(measure(run_full))
        med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for k, v in figures.items()}
        return {"hosts": args.hosts, "gpus": args.gpus, "held": held, "requests": args.requests,
                "commands_per_place": n_cmds, "rounds": args.rounds, "repeat": args.repeat,
                "redis_version": r.info("server")["redis_version"],
                "us_per_call": {k: v[0] for k, v in med.items()},
                "inner_us_per_call": {k: v[1] for k, v in med.items()},
                "runs": {k: [list(x) for x in v] for k, v in figures.items()}}
    finally:
        alloc.destroy()


def show(doc: dict[str, Any]) -> None:
    us, inner = doc["us_per_call"], doc["inner_us_per_call"]
    place = us["place"]
    t = Table(title=f"Server µs per call, median of {doc['repeat']} rounds "
                    f"({doc['commands_per_place']:.1f} Redis commands per place)")
    for col in ("script", "µs per call", "÷ place", "of which Redis commands µs"):
        t.add_column(col, justify="left" if col == "script" else "right")
    names = {"noop": "noop (place's KEYS and ARGV)", "place": "place (real)", "commands": "recorded commands only",
             "commands_json": "recorded commands + JSON"}
    for key, label in names.items():
        t.add_row(label, f"{us[key]:.1f}", f"{us[key] / place:.2f}", "" if key == "noop" else f"{inner[key]:.1f}")
    console.print(t)
    console.print(f"place's logic beyond its commands and JSON: {place - us['commands_json']:.1f} µs "
                  f"({(place - us['commands_json']) / place:.0%} of place)")


def main(argv: list[str] | None = None) -> int:
    args = fleet_arguments(__doc__.split("\n\n")[0], rounds=10, requests_help="place calls recorded").parse_args(argv)
    return report(run(args), show, args.json_path)


if __name__ == "__main__":
    sys.exit(main())
