"""The service supervisor: runs a host's shared named services as the ledger asks.

One ``ServiceSupervisor`` per host (the agent makes one per host it serves when it has a catalog;
``AllocationManager(services=...)`` makes one for its own host). It reconciles the host's
service entries (``Keys.svc(host)``, written by the placement) with the processes it runs:

* ``starting`` with references: check the port is free, start the catalog's command on it (its
  own session, output to a log file), health-check it until ``start_timeout_s``; then
  ``service_state.lua running`` (endpoint ``http://<address>:<port>``), or ``failed`` with the
  reason (exit code and the log's tail, or the timeout): the allocations holding it fail and
  free everything they hold.
* ``starting`` without references (its holders ended before it started): dropped, port freed.
* ``running`` with no references for the catalog's ``idle_timeout_s`` (ledger clock): claimed
  (``stop``), SIGTERM to its process group, SIGKILL after ``stop_timeout_s``, then ``stopped``
  (the port is free again, or it starts again if a grant took it meanwhile).
* ``running`` whose process died: started again on the same port while it is held (at most
  ``max_restarts`` times in a row, then ``failed``; a crash after ``restart_reset_s`` healthy
  starts a new row); dropped when not held.
* entries this supervisor does not run (a previous agent's): adopted when the recorded pid is
  alive and healthy, else restarted or dropped as above.
* processes whose entry is gone (the host was removed, the entry failed): stopped.

Only one supervisor acts per host at a time (a lease ``Keys.svc_owner(host)``); another waits.
It wakes when the placement pushes a token on ``Keys.svc_wake(host)`` (BLPOP), when a health
check or an idle deadline is due, and at least every ``poll_s`` seconds.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis

from ..client import Allocator
from ..keys import SVC_WAKE_TTL_MS
from ..services import ServiceCatalog, ServiceSpec, publish_catalog
from . import _redis

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 1.0
LEASE_MS = 10_000
MAX_RESTARTS = 3
#: A service that stayed healthy this long before it died starts a new run of restarts: "in a
#: row" counts crashes of a service that keeps failing, not crashes far apart over an agent's life.
RESTART_RESET_S = 60.0
_LIVE: weakref.WeakSet[ServiceSupervisor] = weakref.WeakSet()


@dataclass
class _Proc:
    """A service process this supervisor runs (``popen``) or adopted from a previous one (pid only)."""

    name: str
    port: int
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    log_path: str | None = None
    deadline: float = 0.0  # monotonic: healthy by then, or failed
    healthy: bool = False
    healthy_since: float = 0.0  # monotonic: when it was found healthy
    next_check: float = 0.0
    check_delay: float = 0.01

    def exit_code(self) -> int | None:
        """None while the process runs; its exit code (or -1 if unknown) once it is gone."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            p = psutil.Process(self.pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return -1
            return None
        except psutil.Error:
            return -1

    def log_tail(self, n: int = 400) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""


@dataclass
class ReconcileReport:
    started: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    owner: bool = True
    host_gone: bool = False
    wait_s: float = DEFAULT_POLL_S


def _created(pid: int) -> float:
    """When process ``pid`` started (psutil's create_time), 0 when it is gone: with the pid, it
    names one process even after the pid is reused."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _same_process(pid: int, e: dict[str, Any]) -> bool:
    """Whether ``pid`` is still the process the entry recorded: alive, with the start time kept
    beside it (an entry without one cannot tell, and is not trusted)."""
    created = float(e.get("created") or 0)
    return bool(created) and abs(_created(pid) - created) <= 0.05  # (stored with 14 digits)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (any address); TIME_WAIT leftovers do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def healthy(spec: ServiceSpec, port: int, address: str, timeout_s: float = 0.5) -> bool:
    """One health check: a TCP connect, or an HTTP GET answered below 500. Whatever goes wrong
    in the check (a service answering something that is not HTTP, a URL that does not parse)
    counts as not healthy: the start timeout then fails the service, and the supervisor goes on."""
    check = spec.render(spec.health, port, address)
    try:
        if check == "tcp" or check.startswith("tcp://"):
            host, p = "127.0.0.1", port
            if check.startswith("tcp://"):
                u = urlsplit(check)
                host, p = u.hostname or "127.0.0.1", u.port or port
            with socket.create_connection((host, p), timeout=timeout_s):
                return True
        with urllib.request.urlopen(check, timeout=timeout_s) as r:  # noqa: S310 - operator's URL
            return r.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except Exception:  # noqa: BLE001 - see the docstring
        return False


class ServiceSupervisor:
    """Runs the named services of one host; see the module docstring."""

    def __init__(
        self,
        allocator: Allocator,
        host_id: str,
        catalog: ServiceCatalog,
        *,
        address: str = "localhost",
        poll_s: float = DEFAULT_POLL_S,
        log_dir: str | None = None,
        max_restarts: int = MAX_RESTARTS,
        restart_reset_s: float = RESTART_RESET_S,
        exit_when_host_gone: bool = False,
    ) -> None:
        self.allocator = allocator
        self.host_id = host_id
        self.catalog = catalog
        self.address = address
        self.poll_s = poll_s
        self.max_restarts = max_restarts
        self.restart_reset_s = restart_reset_s
        self.exit_when_host_gone = exit_when_host_gone
        self.procs: dict[str, _Proc] = {}
        self._restarts: dict[str, int] = {}
        self._log_dir = log_dir
        self._own_log_dir = log_dir is None  # a temporary one, made on first use and removed on close
        self._token = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keys = allocator.keys
        _LIVE.add(self)

    # -- ledger calls ------------------------------------------------------------------------

    def publish(self) -> dict[str, Any]:
        """Publishes this host's catalog (names and timeouts) to the ledger."""
        return publish_catalog(self.allocator, self.host_id, self.catalog)

    def withdraw(self) -> None:
        try:
            publish_catalog(self.allocator, self.host_id, ServiceCatalog())
        except redis.RedisError as exc:
            log.warning("could not withdraw the service catalog of %s: %s", self.host_id, exc)

    def _state(self, name: str, action: str, **args: Any) -> dict[str, Any]:
        a = self.allocator
        return json.loads(a.scripts["service_state"](
            keys=a.keys.ledger_keys(),
            args=[a.keys.prefix, _redis.now_arg(a), self.host_id, name, action, json.dumps(args),
                  a.pass_depth, a.scan_cap]))

    def _own(self) -> bool:
        r = self.allocator.redis
        key = self._keys.svc_owner(self.host_id)
        if r.set(key, self._token, nx=True, px=LEASE_MS):
            return True
        if r.get(key) == self._token:
            r.pexpire(key, LEASE_MS)
            return True
        return False

    # -- processes ---------------------------------------------------------------------------

    def _log_path(self, name: str, port: int) -> str:
        if self._log_dir is None:
            self._log_dir = tempfile.mkdtemp(prefix=f"allocator-services-{self.host_id}-")
        return os.path.join(self._log_dir, f"{name}-{port}.log")

    def _launch(self, name: str, port: int, spec: ServiceSpec) -> _Proc | str:
        """Starts the service; returns its process, or why it could not start."""
        if not port_is_free(port):
            return f"port {port} is in use by another process"
        path = self._log_path(name, port)
        env = {**os.environ, **{k: spec.render(v, port, self.address) for k, v in spec.env.items()},
               "ALLOCATOR_SERVICE_NAME": name, "ALLOCATOR_SERVICE_PORT": str(port)}
        try:
            with open(path, "ab") as out:
                popen = subprocess.Popen(spec.argv(port, self.address), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=spec.cwd, start_new_session=True,
                                         close_fds=True)
        except OSError as exc:
            return f"cannot run {spec.command[0]!r}: {exc}"
        log.info("service %s on %s: started pid %d on port %d", name, self.host_id, popen.pid, port)
        now = time.monotonic()
        return _Proc(name, port, popen.pid, popen, path, deadline=now + spec.start_timeout_s, next_check=now)

    def _terminate(self, p: _Proc, grace_s: float) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace_s``; waits until it is gone."""
        def signal_all(sig: signal.Signals) -> None:
            try:
                if os.getpgid(p.pid) == p.pid:
                    os.killpg(p.pid, sig)
                else:
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

        if p.exit_code() is None:
            signal_all(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while p.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        signal_all(signal.SIGKILL)
        if p.popen is not None:
            try:
                p.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.error("service %s (pid %d) did not exit after SIGKILL", p.name, p.pid)

    def stop_all(self) -> None:
        """Stops every process this supervisor runs (the ledger is not changed)."""
        with self._lock:
            for p in list(self.procs.values()):
                spec = self.catalog.get(p.name)
                self._terminate(p, spec.stop_timeout_s if spec else 2.0)
            self.procs.clear()

    # -- one pass ----------------------------------------------------------------------------

    def reconcile(self) -> ReconcileReport:
        """One pass over the host's service entries; returns what it did and when to come back."""
        with self._lock:
            return self._reconcile()

    def _reconcile(self) -> ReconcileReport:
        rep = ReconcileReport(wait_s=self.poll_s)
        a = self.allocator
        pipe = a.redis.pipeline(transaction=True)
        pipe.exists(self._keys.host(self.host_id))
        pipe.hgetall(self._keys.svc(self.host_id))
        exists, raw = pipe.execute()
        entries = {n: json.loads(v) for n, v in raw.items()}
        if not exists:
            rep.host_gone = True
            entries = {}  # the host left the ledger: nothing of it may keep running
        elif not self._own():
            rep.owner = False
            return rep
        now_ms = _redis.now_ms(a)
        # Processes whose entry is gone, or moved to another port: stop them.
        for name, p in list(self.procs.items()):
            e = entries.get(name)
            if e is None or int(e["port"]) != p.port:
                self._terminate(p, 2.0)
                del self.procs[name]
                rep.stopped.append(name)
        wake_at = time.monotonic() + self.poll_s
        for name, e in entries.items():
            at = self._one(name, e, now_ms, rep)
            if at is not None:
                wake_at = min(wake_at, at)
        rep.wait_s = max(0.005, wake_at - time.monotonic())
        return rep

    def _one(self, name: str, e: dict[str, Any], now_ms: int, rep: ReconcileReport) -> float | None:
        """Handles one entry; returns the monotonic time it wants another look, if sooner than poll."""
        state, port, refs = e.get("state"), int(e["port"]), int(e.get("refs") or 0)
        spec = self.catalog.get(name)
        p = self.procs.get(name)
        if state == "starting":
            if refs <= 0:
                if p is not None:
                    self._terminate(p, 2.0)
                    del self.procs[name]
                if self._state(name, "drop", port=port).get("ok"):
                    rep.stopped.append(name)
                return None
            if spec is None:
                self._fail(name, port, f"not in the service catalog of host {self.host_id}", rep)
                return None
            if p is None:
                self._stop_orphan(name, e)  # started by a supervisor that died before it was healthy
                got = self._launch(name, port, spec)
                if isinstance(got, str):
                    self._fail(name, port, got, rep)
                    return None
                p = self.procs[name] = got
                self._state(name, "launched", port=port, pid=p.pid, created=_created(p.pid))
                rep.started.append(name)
            return self._check_start(name, p, spec, rep)
        if state == "running":
            if p is None:
                return self._adopt(name, e, spec, rep)
            code = p.exit_code()
            if code is not None:
                del self.procs[name]
                if p.healthy and time.monotonic() - p.healthy_since >= self.restart_reset_s:
                    self._restarts.pop(name, None)  # it ran well for a while: not a crash loop
                if refs > 0:
                    return self._restart(name, port, f"exited with code {code}: {p.log_tail()}".rstrip(": "), rep)
                self._state(name, "drop", port=port)
                rep.stopped.append(name)
                return None
            if refs > 0:
                return None
            idle_ms = int((spec.idle_timeout_s if spec else 0) * 1000)
            due_ms = int(e.get("idle_since") or now_ms) + idle_ms
            if now_ms < due_ms:
                return time.monotonic() + (due_ms - now_ms) / 1000
            if not self._state(name, "stop", port=port, idle_ms=idle_ms).get("ok"):
                return None  # a grant took it meanwhile
            self._terminate(p, spec.stop_timeout_s if spec else 2.0)
            del self.procs[name]
            res = self._state(name, "stopped", port=port)
            self._restarts.pop(name, None)
            rep.stopped.append(name)
            log.info("service %s on %s: stopped after %.1f s idle", name, self.host_id, idle_ms / 1000)
            return time.monotonic() if res.get("restart") else None
        if state == "stopping":
            if p is not None:
                self._terminate(p, spec.stop_timeout_s if spec else 2.0)
                self.procs.pop(name, None)
            else:  # left over from a supervisor that died while stopping it: only the very process
                self._stop_orphan(name, e)
            res = self._state(name, "stopped", port=port)
            rep.stopped.append(name)
            return time.monotonic() if res.get("restart") else None
        return None

    def _check_start(self, name: str, p: _Proc, spec: ServiceSpec, rep: ReconcileReport) -> float | None:
        now = time.monotonic()
        if now < p.next_check:
            return p.next_check
        code = p.exit_code()
        if code is not None:
            del self.procs[name]
            self._fail(name, p.port, f"exited with code {code} before it was healthy: {p.log_tail()}".rstrip(": "), rep)
            return None
        if healthy(spec, p.port, self.address):
            res = self._state(name, "running", port=p.port, pid=p.pid, created=_created(p.pid),
                              endpoint=spec.render(spec.endpoint, p.port, self.address))
            if res.get("ok"):
                p.healthy, p.healthy_since = True, now
                rep.running.append(name)
                log.info("service %s on %s: running on port %d", name, self.host_id, p.port)
                return None
            # Dropped meanwhile (its holders ended): the next pass stops it.
            return time.monotonic()
        if now >= p.deadline:
            self._terminate(p, 1.0)
            del self.procs[name]
            self._fail(name, p.port, f"not healthy within {spec.start_timeout_s:g} s ({spec.health}): {p.log_tail()}"
                       .rstrip(": "), rep)
            return None
        p.next_check = now + p.check_delay
        p.check_delay = min(p.check_delay * 1.5, 0.2)
        return p.next_check

    def _fail(self, name: str, port: int, why: str, rep: ReconcileReport) -> None:
        log.error("service %s on %s failed: %s", name, self.host_id, why)
        self._restarts.pop(name, None)
        res = self._state(name, "failed", port=port, error=why)
        rep.failed.append(name)
        if res.get("failed"):
            log.error("allocations failed with service %s: %s", name, ", ".join(res["failed"]))

    def _restart(self, name: str, port: int, why: str, rep: ReconcileReport) -> float | None:
        n = self._restarts.get(name, 0) + 1
        if n > self.max_restarts:
            self._fail(name, port, f"{why} (after {self.max_restarts} restarts)", rep)
            return None
        self._restarts[name] = n
        log.warning("service %s on %s died (%s); restart %d", name, self.host_id, why, n)
        self._state(name, "restart", port=port, error=why)
        return time.monotonic()

    def _adopt(self, name: str, e: dict[str, Any], spec: ServiceSpec | None, rep: ReconcileReport) -> float | None:
        """A running entry this supervisor did not start: keep its process if it is alive, is the
        very process recorded (a pid reused since has another start time) and is healthy."""
        port, refs, pid = int(e["port"]), int(e.get("refs") or 0), int(e.get("pid") or 0)
        p = _Proc(name, port, pid, healthy=True)
        if (pid and spec is not None and _same_process(pid, e) and p.exit_code() is None
                and healthy(spec, port, self.address)):
            self.procs[name] = p
            rep.adopted.append(name)
            return time.monotonic()
        self._stop_orphan(name, e)  # alive but not healthy: it would hold the port the restart needs
        if refs > 0:
            return self._restart(name, port, "its process is gone (agent restarted)", rep)
        self._state(name, "drop", port=port)
        rep.stopped.append(name)
        return None

    def _stop_orphan(self, name: str, e: dict[str, Any]) -> None:
        """Stops the process an entry records (pid and start time) that this supervisor does not
        run: one left by a supervisor that died. Only the very process recorded: a pid reused by
        another process since (other start time) is left alone."""
        pid = int(e.get("pid") or 0)
        if pid <= 0 or not _same_process(pid, e):
            return
        log.warning("service %s on %s: stopping pid %d left by an earlier supervisor", name, self.host_id, pid)
        self._terminate(_Proc(name, int(e["port"]), pid), 2.0)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Reconciles until ``stop`` (or ``close``); Redis errors are logged and retried."""
        stop = stop or self._stop
        wake = self._keys.svc_wake(self.host_id)
        while not stop.is_set() and not self._stop.is_set():
            wait = self.poll_s
            try:
                rep = self.reconcile()
                if rep.host_gone and self.procs == {} and self.exit_when_host_gone:
                    log.info("host %s is gone: service supervisor exits", self.host_id)
                    return
                wait = rep.wait_s
                if not stop.is_set() and not self._stop.is_set():
                    self.allocator.redis.blpop([wake], timeout=max(0.01, min(wait, self.poll_s)))
            except (redis.RedisError, OSError) as exc:
                log.error("service supervisor of %s: %s", self.host_id, exc)
                stop.wait(min(1.0, self.poll_s))

    def start(self) -> threading.Thread:
        """Runs ``run`` in a daemon thread."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name=f"services-{self.host_id}", daemon=True)
            self._thread.start()
        return self._thread

    def close(self, *, withdraw: bool = True, report: bool = True) -> None:
        """Stops the loop and every service process; withdraws the catalog and gives up the lease.

        ``report``: tell the ledger the instances are gone, so that it does not keep listing
        them as running with their ports held: an unreferenced one is dropped, one still held
        fails its holders (their service is gone). An agent that removes the host next passes
        False (the removal drops them all)."""
        self._stop.set()
        try:
            wake = self._keys.svc_wake(self.host_id)
            self.allocator.redis.pipeline(transaction=False).lpush(wake, "1").pexpire(wake, SVC_WAKE_TTL_MS).execute()
        except redis.RedisError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        ran = [(p.name, p.port) for p in self.procs.values()]
        self.stop_all()
        if withdraw:
            # First: reporting frees ports and capacity, and the pass that follows must not place
            # a task needing these services on this host, where no one would start them now.
            self.withdraw()
        if report:
            for name, port in ran:
                try:
                    if not (self._state(name, "stop", port=port, idle_ms=0).get("ok")
                            and self._state(name, "stopped", port=port).get("ok")):
                        self._state(name, "failed", port=port, error="its supervisor stopped")
                except redis.RedisError as exc:
                    log.warning("could not report service %s of %s as stopped: %s", name, self.host_id, exc)
        if self._own_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
        try:
            r = self.allocator.redis
            key = self._keys.svc_owner(self.host_id)
            if r.get(key) == self._token:
                r.delete(key)
        except redis.RedisError:
            pass


@atexit.register
def _stop_everything() -> None:  # no service outlives the process that started it
    for sup in list(_LIVE):
        try:
            sup._stop.set()
            for p in list(sup.procs.values()):
                if p.popen is not None:
                    sup._terminate(p, 1.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


__all__ = ["ReconcileReport", "ServiceSupervisor", "healthy", "port_is_free"]
