"""Shared named services ("MCP servers"): catalog, ledger accounting, the agent's supervisor with
tiny real services, failures, port pool exhaustion, and seed 000's examples on AllocationManager.

Real processes and a real Redis throughout; waits poll with timeouts (tests/service_helpers.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from allocator import Allocator
from allocator.agent import Agent, StaticProvider
from allocator.agent.services import ServiceSupervisor, port_is_free
from allocator.errors import InsufficientResources, InvalidRequest
from allocator.invariants import check
from allocator.keys import SVC_WAKE_TTL_MS
from allocator.seeds import AllocationManager
from allocator.services import ServiceCatalog, ServiceFailed, publish_catalog

from .agent.helpers import InventoryFile
from .conftest import ledger_dump
from .service_helpers import (FAILING_SERVICE, HTTP_SERVICE, SEED_SERVERS, TCP_SERVICE, catalog, free_ports, listening,
                              register_with_services, wait_until)


def entry(a: Allocator, host: str, name: str) -> dict | None:
    raw = a.redis.hget(a.keys.svc(host), name)
    return json.loads(raw) if raw else None


def ok(a: Allocator) -> None:
    assert check(a.snapshot()) == []


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def supervisors() -> Iterator[list[ServiceSupervisor]]:
    made: list[ServiceSupervisor] = []
    yield made
    for s in made:
        s.close(withdraw=False)


def supervised(a: Allocator, made: list[ServiceSupervisor], host: str = "h1", cat: ServiceCatalog | None = None,
               **kw: object) -> ServiceSupervisor:
    sup = ServiceSupervisor(a, host, cat or catalog(), **kw)  # type: ignore[arg-type]
    made.append(sup)
    sup.publish()
    return sup


def host(a: Allocator, host_id: str = "h1", ports: tuple[int, int] | None = None, **kw: object) -> tuple[int, int]:
    ports = ports or free_ports(8)
    a.register_host(id=host_id, cpu_cores=kw.pop("cpu_cores", 8), ram_mb=kw.pop("ram_mb", 16384),  # type: ignore[arg-type]
                    service_ports=ports, **kw)
    return ports


# -- catalog ----------------------------------------------------------------------------------------


def test_catalog_loads_yaml_and_json_and_publishes_no_commands(tmp_path: Path, alloc):
    y = tmp_path / "services.yaml"
    y.write_text("services:\n  filesystem:\n    command: python -m http.server {port} --bind 127.0.0.1\n"
                 "    health: http://127.0.0.1:{port}/\n    idle_timeout_s: 60\n    env: {TOKEN: s3cret}\n"
                 "  github: [my-mcp, --port, '{port}']\n")
    j = tmp_path / "services.json"
    j.write_text(json.dumps({"database": {"command": ["db-mcp", "{port}"], "start_timeout_s": 5}}))
    cat = ServiceCatalog.load(str(y))
    assert cat.names() == ["filesystem", "github"]
    assert cat.get("filesystem").argv(9000, "h") == ["python", "-m", "http.server", "9000", "--bind", "127.0.0.1"]
    assert cat.get("github").argv(9001, "h") == ["my-mcp", "--port", "9001"]
    assert ServiceCatalog.load(j).get("database").start_timeout_s == 5
    host(alloc)
    publish_catalog(alloc, "h1", cat)
    published = alloc.redis.hgetall(alloc.keys.svc_catalog("h1"))
    assert set(published) == {"filesystem", "github"}
    assert "s3cret" not in json.dumps(published) and "http.server" not in json.dumps(published)
    assert alloc.redis.zscore(alloc.keys.svc_names, "filesystem") == 1


@pytest.mark.parametrize(("data", "field"), [
    ({"fs": {"command": []}}, "services.fs.command"),
    ({"fs": {"command": "x", "health": "ping"}}, "services.fs.health"),
    ({"fs": {"command": "x", "shell": True}}, "services.fs.shell"),
    ({"bad name": "x"}, "services.bad name.name"),
    ({"fs": 3}, "services.fs"),
    ({"fs": {"command": "x", "idle_timeout_s": float("inf")}}, "services.fs.idle_timeout_s"),
    ({"fs": {"command": "x", "health": "tcp://127.0.0.1:{port}x"}}, "services.fs.health"),
])
def test_catalog_errors_name_the_entry(data, field):
    with pytest.raises(InvalidRequest) as e:
        ServiceCatalog.load(data)
    assert e.value.field == field


def test_a_catalog_the_ledger_cannot_store_changes_nothing(alloc):
    import redis as redis_py

    host(alloc)
    before = ledger_dump(alloc)
    with pytest.raises(redis_py.ResponseError):
        alloc._call("service_catalog", "h1", '{"fs": {"idle_timeout_s": Infinity}}')
    assert ledger_dump(alloc) == before


def test_a_health_check_that_cannot_be_read_is_unhealthy_not_an_error():
    import socket

    from allocator.agent.services import healthy
    from allocator.services import ServiceSpec

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def answer_garbage() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"\x00\x01 not http\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer_garbage, daemon=True)
    t.start()
    spec = ServiceSpec(name="x", command=["true"], health="http://127.0.0.1:{port}/")
    assert healthy(spec, port, "127.0.0.1", timeout_s=2) is False
    t.join(2)
    srv.close()


@pytest.mark.parametrize("names", [["rm -rf /"], [{"name": "fs", "command": "sh -c 'id'"}], "filesystem", [""]])
def test_requests_carry_names_only(alloc, names):
    host(alloc)
    with pytest.raises(InvalidRequest) as e:
        alloc.allocate({"cpu_cores": 1}, services=names)
    assert e.value.field == "services"


# -- ledger: references, ports, refusals ----------------------------------------------------------------


def test_unknown_service_is_refused_and_changes_nothing(alloc):
    host(alloc)
    publish_catalog(alloc, "h1", catalog(["filesystem"]))
    before = ledger_dump(alloc)
    for on_busy in ("fail", "queue"):
        with pytest.raises(InvalidRequest) as e:
            alloc.allocate({"cpu_cores": 1}, services=["filesystem", "githib"], on_busy=on_busy)
        assert e.value.field == "services" and "unknown service 'githib'" in e.value.message
    assert ledger_dump(alloc) == before


def test_services_no_single_host_offers_together_are_refused_and_change_nothing(alloc):
    host(alloc)
    host(alloc, "h2")
    publish_catalog(alloc, "h1", catalog(["filesystem", "github"]))
    publish_catalog(alloc, "h2", catalog(["database"]))
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as e:
        alloc.allocate({"cpu_cores": 1}, services=["filesystem", "database"], on_busy="queue")
    assert e.value.field == "services" and "together" in e.value.message
    assert ledger_dump(alloc) == before


def test_a_port_freed_by_a_stopped_service_goes_to_the_line_at_once(alloc):
    lo, _ = host(alloc, ports=(19001, 19001))  # one port
    publish_catalog(alloc, "h1", catalog(["filesystem", "github"]))
    first = alloc.allocate({"cpu_cores": 1}, services=["filesystem"])
    waiting = alloc.allocate({"cpu_cores": 1}, services=["github"], on_busy="queue")
    alloc.release(first.allocation_id)  # filesystem idles on the only port
    assert alloc.get(waiting.allocation_id).state == "pending"

    def state(action: str) -> dict:
        return json.loads(alloc.scripts["service_state"](
            keys=alloc.keys.ledger_keys(),
            args=[alloc.keys.prefix, alloc._now_arg(), "h1", "filesystem", action,
                  json.dumps({"port": lo, "idle_ms": 0}), alloc.pass_depth, alloc.scan_cap]))

    assert state("stop")["ok"] and state("stopped")["state"] == "stopped"
    assert alloc.get(waiting.allocation_id).state == "active"


def test_a_grant_takes_one_reference_per_service_and_a_port_per_new_instance(alloc):
    lo, _ = host(alloc)
    publish_catalog(alloc, "h1", catalog(["fs", "gh"]))
    a = alloc.allocate({"cpu_cores": 1}, services=["fs", "gh"])
    b = alloc.allocate({"cpu_cores": 1}, services=["gh"])
    assert (a.services, b.services) == (["fs", "gh"], ["gh"])
    assert [(s.name, s.port, s.refs, s.state) for s in alloc.services()] == [
        ("fs", lo, 1, "starting"), ("gh", lo + 1, 2, "starting")]
    assert alloc.redis.hgetall(alloc.keys.svc_ports("h1")) == {str(lo): "fs", str(lo + 1): "gh"}
    ok(alloc)
    alloc.release(a.allocation_id)
    assert [(s.name, s.refs) for s in alloc.services()] == [("fs", 0), ("gh", 1)]
    alloc.release(a.allocation_id)  # a repeat drops nothing more
    assert [(s.name, s.refs) for s in alloc.services()] == [("fs", 0), ("gh", 1)]
    ok(alloc)


def test_placement_goes_to_a_host_whose_catalog_has_the_services(alloc):
    host(alloc, "plain", cpu_cores=32)
    host(alloc, "tools", cpu_cores=4)
    publish_catalog(alloc, "tools", catalog(["fs"]))
    got = alloc.allocate({"cpu_cores": 2}, services=["fs"], strategy="worst_fit")  # worst fit would pick "plain"
    assert got.host_id == "tools"


def test_port_pool_exhaustion_is_refused_cleanly(alloc):
    lo, hi = free_ports(2)
    host(alloc, ports=(lo, hi))
    publish_catalog(alloc, "h1", catalog(["a", "b", "c"]))
    alloc.allocate({"cpu_cores": 1}, services=["a", "b"])
    before = ledger_dump(alloc)
    with pytest.raises(InsufficientResources) as e:
        alloc.allocate({"cpu_cores": 1}, services=["a", "c"])
    assert e.value.code == "INSUFFICIENT_SERVICE_PORTS"
    assert "no free service port" in e.value.message and e.value.details["largest_free_service_ports"] == 0
    assert ledger_dump(alloc) == before
    shared = alloc.allocate({"cpu_cores": 1}, services=["b", "a"])  # instances that exist need no port
    assert shared.services == ["b", "a"]
    ok(alloc)


def test_port_pool_exhaustion_through_the_manager_is_a_failed_result(alloc):
    host(alloc, "local", ports=free_ports(1), worker_slots=4)
    publish_catalog(alloc, "local", catalog(["a", "b"]))
    m = AllocationManager(allocator=alloc, service_wait_s=0)
    m.request_resources("job-1", ["a"])
    r = m.request_resources("job-2", ["b"], workers=1)
    assert r["status"] == "failed" and r["error_code"] == "INSUFFICIENT_SERVICE_PORTS" and "port" in r["error"]
    assert m.get_capacity()["allocated_workers"] == 0


def test_register_host_recounts_references_from_active_allocations(alloc):
    host(alloc)
    publish_catalog(alloc, "h1", catalog(["fs"]))
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    e = entry(alloc, "h1", "fs")
    alloc.redis.hset(alloc.keys.svc("h1"), "fs", json.dumps({**e, "refs": 7}))  # corrupt it
    assert any("counts 7 reference(s)" in v for v in check(alloc.snapshot()))
    host(alloc, ports=(e["port"], e["port"] + 7))
    assert entry(alloc, "h1", "fs")["refs"] == 1
    ok(alloc)


def test_removing_a_host_withdraws_its_catalog_and_forgets_its_services(alloc):
    host(alloc, "h1")
    host(alloc, "h2")
    publish_catalog(alloc, "h1", catalog(["fs"]))
    publish_catalog(alloc, "h2", catalog(["fs", "gh"]))
    alloc.allocate({"cpu_cores": 1}, services=["gh"])
    assert alloc.redis.zscore(alloc.keys.svc_names, "fs") == 2
    alloc.remove_host("h2", force=True)
    assert alloc.redis.zscore(alloc.keys.svc_names, "fs") == 1 and alloc.redis.zscore(alloc.keys.svc_names, "gh") is None
    assert not alloc.redis.exists(alloc.keys.svc("h2"), alloc.keys.svc_ports("h2"), alloc.keys.svc_catalog("h2"))
    with pytest.raises(InvalidRequest):
        alloc.allocate({"cpu_cores": 1}, services=["gh"])
    ok(alloc)


def test_a_queued_request_takes_its_services_when_it_is_placed(alloc):
    host(alloc, cpu_cores=2)
    publish_catalog(alloc, "h1", catalog(["fs"]))
    first = alloc.allocate({"cpu_cores": 2})
    queued = alloc.allocate({"cpu_cores": 2}, services=["fs"], on_busy="queue")
    assert queued.state == "pending" and alloc.services() == []
    alloc.release(first.allocation_id)
    assert alloc.get(queued.allocation_id).state == "active"
    assert [(s.name, s.refs) for s in alloc.services()] == [("fs", 1)]
    ok(alloc)


# -- the supervisor with tiny real services ---------------------------------------------------------------


def test_an_agent_runs_the_named_services_of_one_host_only(alloc, tmp_path):
    lo, _ = free_ports(8)
    inv = InventoryFile(tmp_path / "fleet.yaml")
    inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])
    agent = Agent(alloc, StaticProvider(inv.path), services=catalog(["filesystem"]), service_ports=(lo, lo + 7))
    try:
        agent.run_once()
        inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []},
                   {"id": "h2", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])  # a second host appears
        agent.run_once()
        assert list(agent.supervisors) == ["h1"]  # h2's would be handed the same ports on this machine
        assert alloc.redis.hkeys(alloc.keys.svc_catalog("h2")) == []
    finally:
        agent.shutdown()


def test_an_agent_stopping_on_a_host_an_operator_drained_leaves_no_service_listed_running(alloc, tmp_path):
    lo, _ = free_ports(8)
    inv = InventoryFile(tmp_path / "fleet.yaml")
    inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])
    agent = Agent(alloc, StaticProvider(inv.path), services=catalog(["fs"]), service_ports=(lo, lo + 7), drain_timeout_s=0)
    agent.run_once()
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: agent.supervisors["h1"].reconcile().running)
    alloc.drain_host("h1")
    agent.shutdown()  # the host stays registered (lost, the operator's drain kept)
    assert alloc.redis.hget(alloc.keys.host("h1"), "state") == "lost"
    assert all(e.state != "running" for e in alloc.services()), alloc.services()
    ok(alloc)


def test_a_real_service_is_started_shared_kept_and_stopped_after_the_idle_timeout(live, tmp_path, supervisors):
    """The issue's scenario: python -m http.server, a real agent thread, the Redis clock, 0.5 s idle."""
    lo, _ = free_ports(8)
    inv = InventoryFile(tmp_path / "fleet.yaml")
    inv.write([{"id": "h1", "cpu_cores": 8, "ram_mb": "16Gi", "gpus": []}])
    cat = catalog(["filesystem"], HTTP_SERVICE, health="http://127.0.0.1:{port}/", idle_timeout_s=0.5)
    agent = Agent(live, StaticProvider(inv.path), interval_s=0.2, services=cat, service_address="127.0.0.1",
                  service_ports=(lo, lo + 7))
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_until(lambda: live.redis.zscore(live.keys.svc_names, "filesystem"), what="the agent's catalog")
        t0 = time.monotonic()
        a = live.allocate({"cpu_cores": 1}, services=["filesystem"], task_id="job-a")
        [svc] = live.service_endpoints(a.allocation_id, wait_s=10)
        started_s = time.monotonic() - t0
        assert (svc.state, svc.port, svc.endpoint) == ("running", lo, f"http://127.0.0.1:{lo}")
        assert urllib.request.urlopen(svc.endpoint, timeout=2).status == 200
        b = live.allocate({"cpu_cores": 1}, services=["filesystem"], task_id="job-b")
        [shared] = live.service_endpoints(b.allocation_id, wait_s=10)
        assert (shared.endpoint, shared.pid, shared.refs) == (svc.endpoint, svc.pid, 2)  # the same process
        ok(live)
        live.release(a.allocation_id)
        assert entry(live, "h1", "filesystem")["refs"] == 1
        assert urllib.request.urlopen(svc.endpoint, timeout=2).status == 200  # b still holds it
        live.release(b.allocation_id)
        released = time.monotonic()
        assert entry(live, "h1", "filesystem")["state"] == "running"  # kept through the idle timeout
        wait_until(lambda: entry(live, "h1", "filesystem") is None, what="the idle stop")
        idle_s = time.monotonic() - released
        assert idle_s >= 0.5
        assert pid_gone(svc.pid) and not listening(lo)
        assert live.redis.hgetall(live.keys.svc_ports("h1")) == {}
        ok(live)
        print(f"\nstart-to-running {started_s * 1000:.0f} ms, stopped {idle_s:.2f} s after the last release")
    finally:
        stop.set()
        t.join(timeout=10)
        agent.shutdown()
    assert live.redis.zscore(live.keys.svc_names, "filesystem") is None


def test_idle_timeout_follows_the_ledger_clock(alloc, clock, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"], idle_timeout_s=60))
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: "fs" in sup.reconcile().running or entry(alloc, "h1", "fs")["state"] == "running")
    pid = entry(alloc, "h1", "fs")["pid"]
    alloc.release(a.allocation_id)
    clock.advance(59.9)
    sup.reconcile()
    assert entry(alloc, "h1", "fs")["state"] == "running" and not pid_gone(pid)
    clock.advance(0.1)
    assert sup.reconcile().stopped == ["fs"]
    assert entry(alloc, "h1", "fs") is None and pid_gone(pid)
    ok(alloc)


def test_a_grant_while_the_service_stops_starts_it_again_on_the_same_port(alloc, clock, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"], idle_timeout_s=0))
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    port = entry(alloc, "h1", "fs")["port"]
    alloc.release(a.allocation_id)
    assert sup._state("fs", "stop", port=port, idle_ms=0)["ok"]  # the supervisor claims it...
    b = alloc.allocate({"cpu_cores": 1}, services=["fs"])  # ...and a grant arrives before it is gone
    assert entry(alloc, "h1", "fs")["refs"] == 1
    assert sup._state("fs", "stopped", port=port) == {"ok": True, "restart": True, "state": "starting"}
    sup.stop_all()
    wait_until(lambda: sup.reconcile().running)
    [svc] = alloc.service_endpoints(b.allocation_id)
    assert svc.port == port and svc.state == "running"
    ok(alloc)


def test_a_failing_service_fails_its_allocations_and_frees_everything(alloc, supervisors):
    host(alloc, worker_slots=4)
    sup = supervised(alloc, supervisors, cat=ServiceCatalog.load({
        "good": {"command": TCP_SERVICE}, "broken": {"command": FAILING_SERVICE}}))
    keep = alloc.allocate({"cpu_cores": 1}, services=["good"])
    wait_until(lambda: sup.reconcile().running)
    a = alloc.allocate({"cpu_cores": 2, "ram_mb": 1024, "workers": 2}, services=["good", "broken"])
    wait_until(lambda: sup.reconcile().failed)
    failed = alloc.get(a.allocation_id)
    assert failed.state == "failed" and failed.release_reason == "failed"
    assert "service broken failed on host h1" in failed.error and "exited with code 3" in failed.error
    assert "no config for" in failed.error  # the service's own output
    assert entry(alloc, "h1", "broken") is None and entry(alloc, "h1", "good")["refs"] == 1
    cap = alloc.capacity()
    assert (cap.cpu_cores.allocated, cap.ram_mb.allocated, cap.worker_slots.allocated) == (1, 0, 0)
    assert alloc.get(keep.allocation_id).state == "active"
    with pytest.raises(ServiceFailed):
        alloc.service_endpoints(a.allocation_id)
    ok(alloc)


def test_a_service_that_never_gets_healthy_fails_after_its_start_timeout(alloc, supervisors):
    host(alloc)
    sleeper = [TCP_SERVICE[0], "-S", "-c", "import time; time.sleep(60)", "{port}"]
    sup = supervised(alloc, supervisors, cat=catalog(["slow"], sleeper, start_timeout_s=0.3))
    a = alloc.allocate({"cpu_cores": 1}, services=["slow"])
    wait_until(lambda: sup.reconcile().failed)
    assert "not healthy within 0.3 s" in alloc.get(a.allocation_id).error
    assert sup.procs == {}
    ok(alloc)


def test_a_port_taken_by_another_program_fails_the_service_with_that_reason(alloc, supervisors):
    lo, hi = free_ports(2)
    host(alloc, ports=(lo, hi))
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]))
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lo))
        squatter.listen()
        a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
        wait_until(lambda: sup.reconcile().failed)
    assert f"port {lo} is in use by another process" in alloc.get(a.allocation_id).error
    ok(alloc)


def test_a_service_that_dies_while_held_is_restarted_on_its_port(alloc, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]))
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    before = entry(alloc, "h1", "fs")
    psutil.Process(before["pid"]).kill()
    wait_until(lambda: (sup.reconcile() and (e := entry(alloc, "h1", "fs")) and e["state"] == "running"
                        and e["pid"] != before["pid"]), what="the restart")
    after = entry(alloc, "h1", "fs")
    assert after["port"] == before["port"] and alloc.get(a.allocation_id).state == "active"
    ok(alloc)


def crash_and_reconcile(alloc, sup) -> dict:
    """Kills the service's running process and reconciles until it is running again or failed."""
    before = entry(alloc, "h1", "fs")
    psutil.Process(before["pid"]).kill()
    wait_until(lambda: (sup.reconcile() and ((e := entry(alloc, "h1", "fs")) is None
                                             or (e["state"] == "running" and e["pid"] != before["pid"]))),
               what="a restart or a failure")
    return entry(alloc, "h1", "fs")


def test_crashes_of_a_service_that_ran_well_between_them_are_not_in_a_row(alloc, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]), max_restarts=1, restart_reset_s=0.0)
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    for _ in range(3):  # each crash comes after a healthy run: a new row every time
        assert crash_and_reconcile(alloc, sup)["state"] == "running"
    assert alloc.get(a.allocation_id).state == "active"
    ok(alloc)


def test_a_service_that_crashes_again_before_it_ran_well_fails_after_max_restarts(alloc, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]), max_restarts=1, restart_reset_s=3600.0)
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    assert crash_and_reconcile(alloc, sup)["state"] == "running"
    assert crash_and_reconcile(alloc, sup) is None  # the second crash in a row: failed
    assert "after 1 restarts" in alloc.get(a.allocation_id).error
    ok(alloc)


def test_a_restarted_supervisor_adopts_running_services_and_only_one_acts(alloc, supervisors):
    host(alloc)
    first = supervised(alloc, supervisors, cat=catalog(["fs"]))
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: first.reconcile().running)
    pid = entry(alloc, "h1", "fs")["pid"]
    second = supervised(alloc, supervisors, cat=catalog(["fs"]))
    assert second.reconcile().owner is False  # the first one holds the host's lease
    first.procs.clear()  # the first agent dies, leaving its service running
    alloc.redis.delete(alloc.keys.svc_owner("h1"))  # ...and its lease runs out
    assert second.reconcile().adopted == ["fs"]
    assert second.procs["fs"].pid == pid and entry(alloc, "h1", "fs")["state"] == "running"


@pytest.fixture
def unrelated() -> Iterator[subprocess.Popen]:
    """A process that is no service: what a recorded pid may name after a reboot."""
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield other
    other.kill()
    other.wait()


def _pid_now_names(a: Allocator, name: str, pid: int) -> None:
    e = entry(a, "h1", name)
    assert e is not None
    # The entry keeps the start time of the process it recorded, an hour before this one started.
    e["pid"], e["created"] = pid, psutil.Process(pid).create_time() - 3600
    a.redis.hset(a.keys.svc("h1"), name, json.dumps(e))


def test_a_stop_left_by_a_dead_supervisor_spares_a_process_that_took_the_pid_since(alloc, supervisors, unrelated):
    host(alloc)
    first = supervised(alloc, supervisors, cat=catalog(["fs"], idle_timeout_s=0))
    x = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: first.reconcile().running)
    alloc.release(x.allocation_id)
    assert first._state("fs", "stop", port=entry(alloc, "h1", "fs")["port"], idle_ms=0).get("ok")
    gone = first.procs.pop("fs")  # the first agent dies mid-stop, and its service with it (a reboot)
    gone.popen.kill()
    gone.popen.wait()
    alloc.redis.delete(alloc.keys.svc_owner("h1"))
    _pid_now_names(alloc, "fs", unrelated.pid)
    second = supervised(alloc, supervisors, cat=catalog(["fs"], idle_timeout_s=0))
    assert second.reconcile().stopped == ["fs"]
    assert unrelated.poll() is None


def test_a_running_entry_whose_pid_another_process_took_since_is_not_adopted_even_if_its_port_answers(alloc, supervisors):
    host(alloc)
    first = supervised(alloc, supervisors, cat=catalog(["fs"]))
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: first.reconcile().running)
    port = entry(alloc, "h1", "fs")["port"]
    first.close(withdraw=False, report=False)  # a reboot: the agent and its service go; the entry stays running
    # Another program now has the recorded pid and listens on the port: alive and "healthy".
    other = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                              "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                              f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(300)"], start_new_session=True)
    try:
        wait_until(lambda: not port_is_free(port), what="the other program's listener")
        _pid_now_names(alloc, "fs", other.pid)
        second = supervised(alloc, supervisors, cat=catalog(["fs"]))
        assert second.reconcile().adopted == []  # adopting it would stop that program when the service idles
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_catalog_timeout_beyond_ten_years_is_refused_naming_it():
    with pytest.raises(InvalidRequest) as exc:
        ServiceCatalog.load({"fs": {"command": ["true"], "idle_timeout_s": 1e306}})
    assert "idle_timeout_s" in exc.value.field


def test_a_supervisor_that_died_while_its_service_started_leaves_no_process_holding_the_port(alloc, supervisors):
    host(alloc)
    # It listens at once but never answers the HTTP health check: it stays "starting".
    first = supervised(alloc, supervisors, cat=catalog(["fs"], start_timeout_s=60, health="http://127.0.0.1:{port}/"))
    a = alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: first.reconcile() and not port_is_free(entry(alloc, "h1", "fs")["port"]), what="the launch")
    orphan = entry(alloc, "h1", "fs")["pid"]
    assert entry(alloc, "h1", "fs")["state"] == "starting" and orphan
    first.procs.clear()  # the first agent is killed: its process lives on, holding the port
    alloc.redis.delete(alloc.keys.svc_owner("h1"))
    second = supervised(alloc, supervisors, cat=catalog(["fs"]))
    wait_until(lambda: second.reconcile() and entry(alloc, "h1", "fs")["state"] == "running", what="the service")
    assert entry(alloc, "h1", "fs")["pid"] != orphan
    assert not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE
    assert alloc.get(a.allocation_id).state == "active"


def test_removing_the_host_stops_its_services(alloc, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]))
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    pid = entry(alloc, "h1", "fs")["pid"]
    alloc.remove_host("h1", force=True)
    assert sup.reconcile().host_gone and pid_gone(pid) and sup.procs == {}


def test_a_host_removed_after_its_supervisor_stopped_leaves_no_wake_token_for_good(alloc, supervisors):
    host(alloc)
    sup = supervised(alloc, supervisors, cat=catalog(["fs"]))
    alloc.allocate({"cpu_cores": 1}, services=["fs"])
    wait_until(lambda: sup.reconcile().running)
    sup.close(withdraw=False, report=False)  # as an agent that removes its host next
    alloc.remove_host("h1", force=True)
    assert 0 < alloc.redis.pttl(alloc.keys.svc_wake("h1")) <= SVC_WAKE_TTL_MS


# -- seed 000 on AllocationManager ------------------------------------------------------------------------


@pytest.fixture
def manager(alloc) -> Iterator[AllocationManager]:
    lo, hi = free_ports(100)
    m = AllocationManager(allocator=alloc, total_cpu=16.0, total_memory=32768, total_workers=10, services=catalog(),
                          service_ports=(lo, hi))
    yield m
    m.close()


def test_seed_quick_start_starts_the_three_servers_and_returns_their_endpoints(manager, alloc):
    allocation = manager.request_resources(job_id="feature-dev-001", mcp_servers=["filesystem", "github", "database"],
                                           workers=4, priority="high", ttl_seconds=7200)
    lo = int(alloc.redis.hget(alloc.keys.host("local"), "port_lo"))
    assert allocation["status"] == "active"
    assert [{k: s[k] for k in ("name", "endpoint", "status")} for s in allocation["mcp_servers"]] == [
        {"name": n, "endpoint": f"http://localhost:{lo + i}", "status": "running"} for i, n in enumerate(SEED_SERVERS)]
    assert all(listening(s["port"]) for s in allocation["mcp_servers"])
    assert [w["worker_id"] for w in allocation["workers_allocated"]] == [f"worker-feature-dev-001-00{i}" for i in range(4)]
    assert {k: allocation["resources"][k] for k in ("cpu", "memory", "workers")} == {"cpu": 4.0, "memory": 8192, "workers": 4}
    cap = manager.get_capacity()
    assert {k: cap[k] for k in ("total_workers", "allocated_workers", "available_workers", "running_mcp_servers",
                                 "allocated_cpu", "available_memory")} == {
        "total_workers": 10, "allocated_workers": 4, "available_workers": 6,
        "running_mcp_servers": ["filesystem", "github", "database"], "allocated_cpu": 4.0, "available_memory": 24576}
    released = manager.release_resources(allocation["allocation_id"])
    assert (released["status"], released["workers_released"], released["cpu_freed"], released["memory_freed"]) == (
        "released", 4, 4.0, 8192)
    ok(alloc)


def test_seed_mcp_server_reuse_across_allocations(manager, alloc):
    a = manager.request_resources("task-feature-auth", ["filesystem", "github"], workers=2, metadata={"master": "development"})
    b = manager.request_resources("security-scan-001", ["filesystem", "github"], workers=4, priority="high", ttl_seconds=1800)
    assert [s["endpoint"] for s in a["mcp_servers"]] == [s["endpoint"] for s in b["mcp_servers"]]
    assert [s.refs for s in alloc.services()] == [2, 2]
    # Development master: receives the allocation id, reads the endpoints.
    details = manager.get_allocation(a["allocation_id"])
    assert [(s["server_name"], s["status"]) for s in details["mcp_servers"]] == [("filesystem", "running"), ("github", "running")]
    assert len(details["workers"]) == 2 and details["resources"]["workers"] == 2
    manager.release_resources(a["allocation_id"])
    assert manager.get_allocation(a["allocation_id"])["mcp_servers"][0]["status"] == "released"
    assert manager.get_capacity()["running_mcp_servers"] == ["filesystem", "github"]  # b still holds them


def test_seed_failure_example_and_check_capacity_first(manager):
    manager.request_resources("job-001", ["filesystem"], workers=4)
    capacity = manager.get_capacity()
    assert capacity["available_workers"] == 6
    r = manager.request_resources("job-002", ["filesystem"], workers=10)
    assert r["status"] == "failed" and r["error"] == "Insufficient workers: requested 10, available 6"
    assert r["error_code"] == "INSUFFICIENT_WORKERS"
    r = manager.request_resources("job-003", ["filesystem"], workers=20)
    assert r["error"] == "Insufficient workers: requested 20, available 6"


def test_seed_unknown_server_is_a_failed_result_naming_mcp_servers(manager):
    r = manager.request_resources("job-001", ["filesystem", "slack"], workers=1)
    assert r["status"] == "failed" and r["error_field"] == "mcp_servers"
    assert r["error"] == "mcp_servers: unknown service 'slack': no host's catalog offers it"
    assert manager.get_capacity()["allocated_workers"] == 0


def test_closing_a_manager_leaves_no_service_listed_as_running(alloc):
    lo, hi = free_ports(10)
    m = AllocationManager(allocator=alloc, total_cpu=8.0, total_memory=16384, services=catalog(["filesystem", "github"]),
                          service_ports=(lo, hi))
    held = m.request_resources("job-1", ["filesystem"], workers=1)
    idle = m.request_resources("job-2", ["github"], workers=1)
    assert held["status"] == idle["status"] == "active"
    m.release_resources(idle["allocation_id"])  # github idles, unreferenced
    logs = m._supervisor._log_dir
    assert logs is not None and os.path.isdir(logs)
    m.close()
    assert not os.path.exists(logs)  # its temporary log directory goes with it
    assert alloc.redis.hgetall(alloc.keys.svc("local")) == {}  # nothing listed as running, no port held
    assert m.get_allocation(held["allocation_id"])["state"] == "failed"  # its service is gone
    ok(alloc)


def test_closing_a_manager_places_no_waiting_task_on_its_host_for_its_services(alloc):
    lo, hi = free_ports(10)
    m = AllocationManager(allocator=alloc, total_cpu=2.0, total_memory=4096, services=catalog(["filesystem"]), service_ports=(lo, hi))
    held = m.request_resources("job-1", ["filesystem"], workers=2)
    assert held["status"] == "active"
    waiting = alloc.allocate({"cpu_cores": 2}, services=["filesystem"], on_busy="queue")
    m.close()  # held fails (its service is gone): what it frees must not go to a task needing the service here
    assert alloc.get(waiting.allocation_id).state == "pending"


def test_seed_server_that_fails_to_start_fails_the_request(alloc):
    m = AllocationManager(allocator=alloc, total_cpu=4.0, total_memory=8192, services={"filesystem": {"command": FAILING_SERVICE}},
                          service_ports=free_ports(4))
    try:
        r = m.request_resources("job-001", ["filesystem"], workers=2)
        assert r["status"] == "failed" and r["error_code"] == "SERVICE_FAILED"
        assert "service filesystem failed on host local" in r["error"]
        assert m.get_allocation(r["allocation_id"])["state"] == "failed"
        cap = m.get_capacity()
        assert (cap["allocated_workers"], cap["allocated_cpu"], cap["running_mcp_servers"]) == (0, 0.0, [])
        ok(alloc)
    finally:
        m.close()


def test_request_returns_starting_servers_when_the_wait_runs_out(alloc, supervisors):
    host(alloc, "local")
    publish_catalog(alloc, "local", catalog(["filesystem"]))  # nobody runs it yet
    m = AllocationManager(allocator=alloc, service_wait_s=0.05)
    r = m.request_resources("job-001", ["filesystem"])
    assert r["status"] == "active"
    assert [(s["status"], s["endpoint"]) for s in r["mcp_servers"]] == [("starting", None)]
    sup = supervised(alloc, supervisors, "local", catalog(["filesystem"]), address="10.0.0.5")
    wait_until(lambda: sup.reconcile().running)
    port = entry(alloc, "local", "filesystem")["port"]
    assert m.get_allocation(r["allocation_id"])["mcp_servers"][0]["endpoint"] == f"http://10.0.0.5:{port}"


def test_helper_for_other_tests_serves_a_registered_host(alloc):
    sup = register_with_services(alloc, id="local", cpu_cores=16, ram_mb=32768)
    try:
        r = AllocationManager(allocator=alloc).request_resources("job-001", list(SEED_SERVERS), workers=1)
        assert [s["status"] for s in r["mcp_servers"]] == ["running"] * 3
    finally:
        sup.close()
    assert os.environ.get("ALLOCATOR_SERVICES") is None
