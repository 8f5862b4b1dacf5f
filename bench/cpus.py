"""Where a benchmark's processes run: the Redis server on CPUs of its own, the load generator on
the others.

In deployment Redis runs on a machine (or at least cores) of its own and its clients elsewhere.
On a small benchmark machine, four Python clients and the server otherwise share the same few
CPUs: the figures then measure how the kernel shares them as much as what a script costs, and a
server call waits whenever a client holds the CPU it would run on. Pinning the server to one set
of CPUs and the clients to the rest (Linux CPU affinity, as ``taskset`` sets it) measures the
system as deployed; both layouts are worth reporting, and the benchmarks say which one they ran.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import redis

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")
SERVER_NAMES = ("redis-server", "redis-stack-server", "valkey-server")  # what a server process is called
DEFAULT_PORT = 6379  # of a redis:// URL without one


class CpuError(ValueError):
    """A CPU list that cannot be used, or a server that cannot be pinned from here."""


def parse_cpus(text: str, option: str) -> set[int]:
    """``"0"``, ``"1,3"`` or ``"2-3"`` as a set of CPU numbers, each one this machine has."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise CpuError(f"{option}: {part!r} is not a CPU number or range such as 0 or 2-3") from None
        if first < 0 or last < first:
            raise CpuError(f"{option}: {part!r} is not a CPU range with 0 <= first <= last")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise CpuError(f"{option}: no CPU given")
    available = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    missing = sorted(cpus - available)
    if missing:
        raise CpuError(f"{option}: this machine has no CPU {missing[0]} (CPUs 0-{(os.cpu_count() or 1) - 1})")
    return cpus


def process_names(pid: int) -> tuple[str, str]:
    """What this machine calls process ``pid``: its ``comm`` (the executable's name, 15 characters
    at most) and the first word of its command line (Redis rewrites its argv into a title such as
    ``redis-server 127.0.0.1:6379``); empty where it cannot be read."""
    def read(name: str) -> str:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    words = read("cmdline").replace("\0", " ").split()
    return read("comm").strip(), os.path.basename(words[0]) if words else ""


def _is_server_name(name: str) -> bool:
    # comm keeps 15 characters: "redis-stack-server" reads "redis-stack-ser" there.
    return any(name in (s, s[:15]) for s in SERVER_NAMES)


def local_server_pid(r: redis.Redis, url: str) -> int:
    """The process id of the Redis server behind ``url``, which must run on this machine (a TCP
    URL to a local address or a Unix socket) for its CPUs to be set from here.

    The pid comes from the server's INFO, in the server's own pid namespace: a server in another
    container may report a pid that here belongs to an unrelated process, which pinning would
    then move. So the local process must also be a Redis server (by its name) and, for a TCP URL,
    the server must listen on the URL's port (INFO's tcp_port); otherwise CpuError says which
    did not match."""
    parsed = urlparse(url)
    tcp = parsed.scheme in ("redis", "rediss")
    if tcp and (parsed.hostname or "") not in LOCAL_HOSTS:
        raise CpuError(f"--redis-cpus: the server at {parsed.hostname} is not on this machine")
    info = r.info("server")
    pid = int(info.get("process_id") or 0)
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise CpuError(f"--redis-cpus: no local process {pid} for the server (another machine or container?)")
    comm, argv0 = process_names(pid)
    if not (_is_server_name(comm) or _is_server_name(argv0)):
        raise CpuError(f"--redis-cpus: the server reports process {pid}, but process {pid} here is "
                       f"{comm or argv0 or 'unreadable'!r}, not a Redis server (another container?)")
    if tcp:
        port, served = parsed.port or DEFAULT_PORT, int(info.get("tcp_port") or 0)
        if served != port:
            raise CpuError(f"--redis-cpus: the server reports tcp_port {served}, not the URL's port {port} "
                           f"(a forwarded port of another container?), so local process {pid} need not be it")
    return pid


def pin(pid: int, cpus: set[int]) -> set[int]:
    """Sets the CPUs of process ``pid`` (0: this one; children forked later inherit them) and
    returns the ones it had. Redis's background threads keep theirs: the benchmarks write no
    snapshots or AOF, so the main thread is all that serves them."""
    before = os.sched_getaffinity(pid)
    try:
        os.sched_setaffinity(pid, cpus)
    except PermissionError:
        raise CpuError(f"not allowed to set the CPUs of process {pid}; start it with taskset instead") from None
    return before


def overlap(redis_cpus: set[int] | None, client_cpus: set[int] | None) -> set[int]:
    """CPUs both would use (all of this machine's CPUs stand for an unset side)."""
    every = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    return (redis_cpus or every) & (client_cpus or every)


def describe(redis_cpus: set[int] | None, client_cpus: set[int] | None) -> str:
    """One line for a benchmark's header: which CPUs the server and the clients run on."""
    if redis_cpus is None and client_cpus is None:
        return "server and clients share every CPU"
    fmt = lambda c: "every CPU" if c is None else "CPU " + ",".join(str(x) for x in sorted(c))  # noqa: E731
    shared = overlap(redis_cpus, client_cpus)
    tail = f" (sharing CPU {','.join(str(x) for x in sorted(shared))})" if shared else " (apart)"
    return f"server on {fmt(redis_cpus)}, clients on {fmt(client_cpus)}{tail}"
