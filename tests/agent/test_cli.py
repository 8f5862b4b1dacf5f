"""``allocator agent --once``, ``allocator hosts`` and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from allocator.cli import app

from .helpers import host

runner = CliRunner()


def _args(a, redis_url):
    return ["--redis-url", redis_url, "--namespace", a.keys.namespace]


def test_agent_once_registers_the_inventory_and_prints_the_round(live_alloc, inventory, redis_url):
    inventory.write([host("c1"), host("c2")])
    r = runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path), "--labels", "cluster=lab,zone=z1",
                            *_args(live_alloc, redis_url)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["registered"] == ["c1", "c2"]
    assert live_alloc.capacity().hosts[0].labels["zone"] == "z1"


def test_hosts_lists_state_heartbeat_and_free_capacity(live_alloc, inventory, redis_url):
    inventory.write([host("c1")])
    runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path), *_args(live_alloc, redis_url)])
    live_alloc.register_host(id="manual", cpu_cores=2, ram_mb="4Gi")
    live_alloc.allocate({"gpu_memory_mb": "4Gi", "cpu_cores": 2}, selector="gpu_model=T4")
    r = runner.invoke(app, ["hosts", "--json", *_args(live_alloc, redis_url)])
    assert r.exit_code == 0, r.output
    c1, manual = json.loads(r.stdout)
    assert (c1["host_id"], c1["state"], c1["gen"], c1["gpus"], c1["gpu_models"]) == ("c1", "ready", 1, 1, "T4")
    assert 0 <= c1["heartbeat_age_s"] < 60 and manual["heartbeat_age_s"] is None
    assert (c1["gpu_memory_free_mb"], c1["cpu_free"], c1["allocations"]) == (12288, 6, 1)
    table = runner.invoke(app, ["hosts", *_args(live_alloc, redis_url)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "c1" in table.stdout and "no agent" in table.stdout


def test_malformed_inventory_exits_2_naming_the_field(live_alloc, inventory, redis_url):
    inventory.write([host("c1", gpus=[{"index": 0, "memory_mb": "16Gx"}])])
    r = runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path), *_args(live_alloc, redis_url)])
    assert r.exit_code == 2
    assert "hosts[0].gpus[0].memory_mb" in r.output
    assert live_alloc.capacity().host_count == 0


def test_bad_label_exits_2(live_alloc, inventory, redis_url):
    inventory.write([host("c1")])
    r = runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path), "--labels", "zone",
                            *_args(live_alloc, redis_url)])
    assert r.exit_code == 2 and "labels" in r.output


def test_agent_without_a_redis_url_exits_2(inventory):
    inventory.write([host("c1")])
    r = runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path)], env={"ALLOCATOR_REDIS_URL": ""})
    assert r.exit_code == 2 and "Redis URL" in r.output


def test_host_rows_show_a_lost_host_and_since_when(alloc, make_agent, clock):
    from allocator.agent import reap_lost_hosts
    from allocator.agent.hosts import host_rows

    make_agent([host("c1")]).run_once()
    clock.advance(2)
    reap_lost_hosts(alloc, 1.0)
    clock.advance(3)
    (row,) = host_rows(alloc)
    assert (row.state, row.heartbeat_age_s, row.lost_since_s, row.gen) == ("lost", None, 3.0, 1)


@pytest.mark.parametrize("args, field", [(["--labels", "k=x\x07"], "labels.k"), (["--worker-slots", "99999999999"], "worker_slots")])
def test_labels_and_worker_slots_a_registration_refuses_are_refused_at_start_up(tmp_path, args, field):
    inv = tmp_path / "one.yaml"
    inv.write_text("hosts:\n  - {id: h1, cpu_cores: 2, ram_mb: 1Gi}\n")
    res = CliRunner().invoke(app, ["agent", "--once", "--inventory", str(inv), "--redis-url", "redis://127.0.0.1:1/0", *args])
    assert res.exit_code == 2 and field in res.output, res.output


def test_the_agent_applies_the_operators_pass_depth_to_the_pass_its_registration_runs(live_alloc, inventory,
                                                                                       redis_url):
    waiting = [live_alloc.allocate({"cpu_cores": 1}, on_busy="queue").allocation_id for _ in range(3)]
    inventory.write([host("c1")])
    r = runner.invoke(app, ["agent", "--once", "--inventory", str(inventory.path), *_args(live_alloc, redis_url)],
                      env={"ALLOCATOR_PASS_DEPTH": "1"})
    assert r.exit_code == 0, r.output
    assert [live_alloc.get(i).state for i in waiting] == ["active", "pending", "pending"]


def test_json_of_hosts_and_of_an_agent_round_stays_plain_json_where_colour_is_forced(live_alloc, inventory, redis_url):
    import os
    import subprocess
    import sys
    from pathlib import Path

    inventory.write([host("c1")])
    env = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def run(*args: str) -> object:
        out = subprocess.run([sys.executable, "-m", "allocator", *args, *_args(live_alloc, redis_url)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert run("agent", "--once", "--inventory", str(inventory.path))["registered"] == ["c1"]
    assert run("hosts", "--json")[0]["host_id"] == "c1"


@pytest.mark.parametrize("grace, interval, ok", [(None, 10, True), (None, 11, False), ("60", 30, True), ("60", 31, False)])
def test_an_agent_interval_above_half_the_reapers_grace_is_invalid_input(grace, interval, ok, monkeypatch):
    from allocator.agent import cli as agent_cli

    if grace is None:
        monkeypatch.delenv("ALLOCATOR_HOST_GRACE_S", raising=False)
    else:
        monkeypatch.setenv("ALLOCATOR_HOST_GRACE_S", grace)
    if ok:
        agent_cli._check_interval_against_grace(interval)
    else:
        with pytest.raises(Exception, match="more than half the reaper's grace"):
            agent_cli._check_interval_against_grace(interval)
        r = runner.invoke(app, ["agent", "--once", "--interval", str(interval), "--redis-url", "redis://127.0.0.1:1/0"])
        assert r.exit_code == 2 and "--interval" in r.output
