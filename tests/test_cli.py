"""The command line: every command, its --json output and its exit codes (0 done, 1 refused or
not found, 2 invalid input), through typer's runner; ``python -m allocator`` through a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allocator import Allocator, InvalidRequest
from allocator.cli import app

from .conftest import ledger_dump

ROOT = Path(__file__).resolve().parent.parent
SEED = ["allocate", "task_123", "--task-type", "ml_inference", "--gpu-memory", "2048", "--cpu-cores", "2", "--ram", "4Gi",
        "--priority", "high", "--strategy", "best_fit"]


@pytest.fixture
def real(redis_url: str) -> Iterator[Allocator]:
    """An Allocator on its own namespace with the server's clock (the CLI uses the server's clock too)."""
    a = Allocator(redis_url, namespace="test-" + uuid.uuid4().hex[:12])
    a.register_host(id="h1", cpu_cores=10, ram_mb=20480, gpus=[{"index": 0, "model": "T4", "memory_mb": 10240}])
    yield a
    a.destroy()
    a.redis.close()


@pytest.fixture
def cli(real: Allocator):
    runner = CliRunner()
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    env = {"ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": real.keys.namespace, "COLUMNS": "200"}

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), env=env, input=input)

    return invoke


def as_json(res) -> object:
    return json.loads(res.stdout)


# -- allocate -----------------------------------------------------------------------------------


def test_allocate_prints_the_seed_004_result(cli):
    res = cli(*SEED, "--json")
    assert res.exit_code == 0, res.output
    r = as_json(res)
    assert (r["success"], r["task_id"], r["queue_position"]) == (True, "task_123", 0)
    assert {k: r["resources"][k] for k in ("gpu_id", "gpu_memory_mb", "cpu_cores", "ram_mb")} == {
        "gpu_id": "gpu_0", "gpu_memory_mb": 2048, "cpu_cores": [0, 1], "ram_mb": 4096}
    assert r["metadata"]["available_resources"] == {"gpu_memory_mb": 8192, "cpu_cores": 8, "ram_mb": 16384}


def test_allocate_summarises_the_placement_without_json(cli):
    res = cli(*SEED)
    assert res.exit_code == 0 and "placed task_123 -> h1 GPU0" in res.stdout


def test_allocate_that_does_not_fit_is_refused_with_exit_1_and_changes_nothing(cli, real):
    cli("allocate", "a", "--gpu-memory", "9000")
    before = ledger_dump(real)
    res = cli("allocate", "b", "--gpu-memory", "4096")
    assert res.exit_code == 1
    assert "insufficient GPU memory" in res.stderr
    assert ledger_dump(real) == before


def test_allocate_queue_waits_in_line_and_reports_its_position(cli):
    cli("allocate", "a", "--gpu-memory", "9000")
    res = cli("allocate", "b", "--gpu-memory", "4096", "--queue", "--json")
    assert res.exit_code == 0
    r = as_json(res)
    assert (r["queue_position"], r["metadata"]["state"]) == (1, "pending")
    assert "queued c at position 2" in cli("allocate", "c", "--gpu-memory", "4096", "--queue").stdout


def test_allocate_wait_blocks_until_placed(cli, real):
    first = as_json(cli("allocate", "a", "--gpu-memory", "9000", "--json"))
    threading.Timer(0.5, real.release, args=(first["allocation_id"],)).start()
    started = time.monotonic()
    res = cli("allocate", "b", "--gpu-memory", "4096", "--wait", "--timeout", "20", "--json")
    assert res.exit_code == 0, res.output
    assert as_json(res)["queue_position"] == 0 and as_json(res)["resources"]["gpu_id"] == "gpu_0"
    assert time.monotonic() - started >= 0.4


def test_allocate_wait_timeout_exits_1_and_leaves_the_request_queued(cli, real):
    cli("allocate", "a", "--gpu-memory", "9000")
    res = cli("allocate", "b", "--gpu-memory", "4096", "--wait", "--timeout", "0.3")
    assert res.exit_code == 1 and "stays in line at position 1" in res.stderr
    assert real.redis.zcard(real.keys.pending) == 1


def test_allocate_that_no_host_could_ever_hold_is_refused_even_with_queue(cli, real):
    before = ledger_dump(real)
    res = cli("allocate", "big", "--gpus", "2", "--queue")
    assert res.exit_code == 1 and "no host could ever hold 2 GPUs" in res.stderr
    assert ledger_dump(real) == before


@pytest.mark.parametrize("args, option", [
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--cpu-cores", "-2"], "--cpu-cores"),
    (["--ram", "4 parsecs"], "--ram"),
    (["--priority", "urgent"], "--priority"),
    (["--strategy", "random"], "--strategy"),
    (["--metadata", "{oops"], "--metadata"),
    (["--metadata", "[1, 2]"], "metadata"),
    (["--selector", "no-equals-sign"], "--selector"),
    (["--selector", "cluster=a,cluster=b"], "--selector"),
    (["--owner", " "], "--owner"),
    (["--metadata", '{"_seed": {}}'], "--metadata (_seed)"),
])
def test_invalid_allocate_options_exit_2_naming_the_option(cli, real, args, option):
    before = ledger_dump(real)
    res = cli("allocate", "t", *args)
    assert res.exit_code == 2, res.output
    assert option in res.stderr
    assert ledger_dump(real) == before


def test_invalid_input_with_json_prints_the_error_document(cli):
    res = cli("allocate", "t", "--gpu-memory", "lots", "--json")
    assert res.exit_code == 2
    assert as_json(res)["error"]["field"] == "resource_requirements.gpu_memory_mb"


def test_typer_usage_errors_exit_2(cli):
    assert cli("allocate").exit_code == 2
    assert cli("allocate", "t", "--gpus", "two").exit_code == 2


def test_no_redis_configured_is_invalid_input(real):
    res = CliRunner().invoke(app, ["capacity"], env={"ALLOCATOR_REDIS_URL": ""})
    assert res.exit_code == 2 and "no Redis configured" in res.stderr


@pytest.mark.parametrize("command", ["capacity", "list", "queue", "hosts"])
def test_a_read_view_with_json_and_no_redis_configured_prints_the_error_document(real, command):
    res = CliRunner().invoke(app, [command, "--json"], env={"ALLOCATOR_REDIS_URL": ""})
    assert res.exit_code == 2
    assert json.loads(res.stdout)["error"]["code"] == "NOT_CONFIGURED"


def test_unreachable_redis_is_refused_with_exit_1():
    res = CliRunner().invoke(app, ["capacity", "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 1 and "Redis unavailable" in res.stderr


def test_a_redis_url_without_a_scheme_is_invalid_input_and_not_echoed(real):
    res = CliRunner().invoke(app, ["capacity", "--redis-url", "user:secret@127.0.0.1:6379", "--json"])
    assert res.exit_code == 2 and json.loads(res.stdout)["error"]["field"] == "redis_url"
    assert "redis://" in res.stderr and "secret" not in res.stderr + res.stdout


@pytest.mark.parametrize("command", [["worker", "--host", "h1", "--burst"], ["scheduler", "--once", "--no-recorder"]])
def test_service_commands_report_an_unreachable_redis_in_one_line_with_exit_1(command):
    res = CliRunner().invoke(app, [*command, "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 1 and "Redis unavailable" in res.stderr and "Traceback" not in res.output


def test_the_agent_once_reports_an_unreachable_redis_in_one_line_with_exit_1(tmp_path):
    inv = tmp_path / "fleet.json"
    inv.write_text(json.dumps([{"id": "h1", "cpu_cores": 2, "ram_mb": 1024}]))
    res = CliRunner().invoke(app, ["agent", "--inventory", str(inv), "--once", "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 1 and "Redis unavailable" in res.stderr


@pytest.mark.parametrize("command", [
    ["scheduler", "--grace", "-1"], ["scheduler", "--interval", "0"], ["reaper", "--grace", "0"],
    ["reaper", "--interval", "-2"], ["agent", "--interval", "0"], ["agent", "--kill-grace", "nan"],
    ["agent", "--kill-grace", "-5"], ["agent", "--kill-grace", "1e308"], ["agent", "--granularity-mb", "-5"],
    ["agent", "--drain-timeout", "nan"], ["agent", "--drain-timeout", "inf"], ["agent", "--orphan-check", "nan"],
    ["agent", "--orphan-check", "-1"],
])
def test_periods_that_are_not_above_zero_are_invalid_input(command):
    res = CliRunner().invoke(app, [*command, "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and command[1] in res.stderr


@pytest.mark.parametrize("command", [["hosts"], ["worker", "--host", "h1"], ["agent", "--once"]])
def test_service_commands_refuse_a_redis_url_without_a_scheme_with_exit_2(command):
    res = CliRunner().invoke(app, [*command, "--redis-url", "127.0.0.1:6379"])
    assert res.exit_code == 2 and "redis://" in res.stderr


def test_a_bad_redis_url_met_before_a_command_reports_errors_is_invalid_input_without_a_traceback(real):
    proc = subprocess.run([sys.executable, "-m", "allocator", "scheduler", "--once", "--redis-url", "localhost:6379"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "redis://" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("variable, value", [("ALLOCATOR_SCAN_CAP", "abc"), ("ALLOCATOR_SCAN_CAP", "0"),
                                              ("ALLOCATOR_PASS_DEPTH", "-1"), ("ALLOCATOR_RECORD_RETENTION_S", "1.5"),
                                              ("ALLOCATOR_RECORD_RETENTION_S", "99999999999999999999")])
def test_an_operator_setting_out_of_range_is_invalid_input_naming_the_variable(variable, value):
    env = {**os.environ, variable: value, "ALLOCATOR_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "allocator", "capacity"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and variable in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_an_unreachable_redis_met_outside_a_commands_reporting_is_refused_without_a_traceback():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "allocator", "api", "--check", "--redis-url",
                           "redis://127.0.0.1:1/0?password=s3cret"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "Redis unavailable" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr  # the start-up log line names the URL with its password masked
    assert "password=***" in proc.stderr


def test_a_task_registry_file_that_cannot_be_read_is_refused_with_exit_2(real, tmp_path):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    bad = tmp_path / "tasks.yaml"
    bad.write_text("train: [unclosed\n")
    for path in (str(tmp_path / "missing.yaml"), str(bad)):
        res = CliRunner().invoke(app, ["api", "--check", "--redis-url", url, "--namespace", real.keys.namespace,
                                       "--tasks-file", path])
        assert res.exit_code == 2 and "cannot be read" in res.stderr, res.output


@pytest.mark.parametrize("ttl", ["-5", "nan", "inf", "1e12"])
def test_a_ttl_that_is_no_positive_number_on_the_command_line_is_refused_naming_the_option(real, ttl):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, ["allocate", "t1", "--ttl", ttl, "--redis-url", url, "--namespace", real.keys.namespace])
    assert res.exit_code == 2 and "--ttl" in res.stderr and "0 for no expiry" in res.stderr, res.output


@pytest.mark.parametrize("grace", ["inf", "1e308"])
@pytest.mark.parametrize("command", [["scheduler", "--once", "--no-recorder"], ["reaper"]])
def test_an_infinite_or_overflowing_host_grace_is_refused(real, command, grace):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, [*command, "--redis-url", url, "--namespace", real.keys.namespace],
                             env={"ALLOCATOR_HOST_GRACE_S": grace})
    assert res.exit_code == 2 and "--grace" in res.stderr and "at most 315360000 s" in res.stderr, res.output


@pytest.mark.parametrize("command", [["reaper", "--interval", "1e308"], ["agent", "--once", "--interval", "1e16"]])
def test_a_period_past_ten_years_is_refused_naming_the_option(real, command):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, [*command, "--redis-url", url, "--namespace", real.keys.namespace])
    assert res.exit_code == 2 and "--interval" in res.stderr and "Traceback" not in res.output, res.output


def test_the_scheduler_reads_the_host_grace_from_the_environment_as_the_reaper_does(real):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    real.register_host(id="h1", cpu_cores=4, ram_mb="8Gi")
    real.redis.zadd(real.keys.heartbeats, {"h1": real.now_ms() - 3000})  # its agent went quiet 3 s ago
    res = CliRunner().invoke(app, ["scheduler", "--once", "--no-recorder", "--redis-url", url, "--namespace",
                                   real.keys.namespace], env={"ALLOCATOR_HOST_GRACE_S": "1"})
    assert res.exit_code == 0, res.output
    assert real.redis.hget(real.keys.host("h1"), "state") == "lost"


def test_api_refuses_a_task_registry_it_cannot_import_with_exit_2(real):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, ["api", "--check", "--redis-url", url, "--namespace", real.keys.namespace],
                             env={"ALLOCATOR_TASKS": "train=no_such_package.jobs:train"})
    assert res.exit_code == 2 and "no_such_package" in res.stderr


def test_tool_schema_usage_names_the_formats(cli):
    res = cli("tool", "--schema", "bogus")
    assert res.exit_code == 2 and "[native|openai|anthropic]" in res.stderr


def test_zero_gpus_with_gpu_memory_is_invalid_input(cli, real):
    before = ledger_dump(real)
    res = cli("allocate", "t", "--gpus", "0", "--gpu-memory", "1Gi")
    assert res.exit_code == 2 and "--gpus" in res.stderr
    assert ledger_dump(real) == before


# -- release, show, list, cancel ----------------------------------------------------------------


def test_release_frees_the_allocation_and_a_repeat_is_harmless(cli, real):
    aid = as_json(cli(*SEED, "--json"))["allocation_id"]
    res = cli("release", aid, "--json")
    assert res.exit_code == 0 and as_json(res)["state"] == "released" and as_json(res)["released_now"] is True
    again = cli("release", aid)
    assert again.exit_code == 0 and "already released" in again.stdout
    assert real.capacity().active_allocations == 0


def test_release_of_an_unknown_allocation_exits_1(cli):
    res = cli("release", "alloc-nope")
    assert res.exit_code == 1 and "not found" in res.stderr


def test_show_prints_one_allocation(cli):
    aid = as_json(cli(*SEED, "--json"))["allocation_id"]
    d = as_json(cli("show", aid, "--json"))
    assert (d["allocation_id"], d["state"], d["host_id"], d["cpu_cores"]) == (aid, "active", "h1", [0, 1])
    assert d["estimated_start_time"]
    table = cli("show", aid)
    assert table.exit_code == 0 and "ml_inference" in table.stdout


def test_show_of_a_queued_request_gives_its_position(cli):
    cli("allocate", "a", "--gpu-memory", "9000")
    aid = as_json(cli("allocate", "b", "--gpu-memory", "4096", "--queue", "--json"))["allocation_id"]
    d = as_json(cli("show", aid, "--json"))
    assert (d["state"], d["queue_position"]) == ("pending", 1)
    assert "queue_position" in cli("show", aid).stdout


def test_show_of_an_unknown_id_exits_1(cli):
    assert cli("show", "alloc-nope").exit_code == 1
    assert as_json(cli("show", "alloc-nope", "--json"))["error"]["code"] == "ALLOCATION_NOT_FOUND"


def test_list_filters_by_state(cli):
    aid = as_json(cli(*SEED, "--json"))["allocation_id"]
    cli("allocate", "other", "--cpu-cores", "1")
    cli("release", aid)
    rows = as_json(cli("list", "--state", "released", "--json"))
    assert [r["allocation_id"] for r in rows] == [aid]
    assert len(as_json(cli("list", "--json"))) == 2
    assert "2 allocation(s)" in cli("list").stdout


def test_list_with_an_unknown_state_exits_2(cli):
    assert cli("list", "--state", "zombie").exit_code == 2


def test_cancel_takes_a_queued_request_out_of_line(cli, real):
    cli("allocate", "a", "--gpu-memory", "9000")
    aid = as_json(cli("allocate", "b", "--gpu-memory", "4096", "--queue", "--json"))["allocation_id"]
    res = cli("cancel", aid, "--json")
    assert res.exit_code == 0 and as_json(res)["state"] == "cancelled"
    assert real.redis.zcard(real.keys.pending) == 0


def test_cancel_of_an_unknown_task_exits_1(cli):
    assert cli("cancel", "nope").exit_code == 1


# -- capacity, queue, top -----------------------------------------------------------------------


def test_capacity_reports_fleet_and_hosts(cli):
    cli(*SEED)
    cap = as_json(cli("capacity", "--json"))
    assert (cap["host_count"], cap["gpu_memory_mb"]["allocated"], cap["cpu_cores"]["available"]) == (1, 2048, 8)
    table = cli("capacity")
    assert table.exit_code == 0 and "h1" in table.stdout and "1 active allocation" in table.stdout


def test_queue_lists_pending_tasks_with_positions_and_etas(cli):
    cli("allocate", "a", "--gpu-memory", "9000", "--expected-duration", "60")
    cli("allocate", "low", "--gpu-memory", "4096", "--priority", "low", "--queue")
    cli("allocate", "high", "--gpu-memory", "4096", "--priority", "high", "--queue")
    q = as_json(cli("queue", "--json"))
    assert q["count"] == 2
    assert [(r["position"], r["name"], r["priority"]) for r in q["pending"]] == [(1, "high", "high"), (2, "low", "low")]
    assert q["pending"][0]["estimated_start_time"] is not None  # after the running lease's expected end
    table = cli("queue")
    assert table.exit_code == 0 and "2 pending" in table.stdout


def test_top_once_renders_hosts_gpus_and_the_queue_head(cli):
    cli(*SEED)
    cli("allocate", "waiting", "--gpu-memory", "9000", "--queue")
    res = cli("top", "--once")
    assert res.exit_code == 0
    for text in ("h1", "GPU0", "T4", "%", "queue", "waiting"):
        assert text in res.stdout
    snap = as_json(cli("top", "--json"))
    assert snap["pending_total"] == 1 and snap["capacity"]["gpu_count"] == 1


def test_top_refreshes_until_interrupted(cli, monkeypatch):
    import allocator.live as live

    calls = {"n": 0}
    real_sleep = time.sleep

    def sleep(s: float) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        real_sleep(0.01)

    monkeypatch.setattr(live.time, "sleep", sleep)
    res = cli("top", "--interval", "0.1")
    assert res.exit_code == 0 and calls["n"] == 3


# -- tool, services, python -m ------------------------------------------------------------------


def test_tool_reads_the_request_on_stdin(cli):
    req = {"tool": "resource_allocator", "params": {"task_id": "task_123", "task_type": "ml_inference",
                                                    "resource_requirements": {"gpu_memory_mb": 2048, "cpu_cores": 2, "ram_mb": 4096}}}
    res = cli("tool", input=json.dumps(req))
    assert res.exit_code == 0 and as_json(res)["resources"]["gpu_id"] == "gpu_0"
    bad = cli("tool", input='{"tool": "nope"}')
    assert bad.exit_code == 2 and as_json(bad)["error"]["code"] == "UNKNOWN_TOOL"


@pytest.mark.parametrize("command", ["worker", "scheduler", "agent", "mcp", "demo", "top", "queue", "tool"])
def test_service_and_interactive_commands_have_help(command):
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0 and "Usage" in res.stdout


def test_python_m_allocator_is_the_same_cli(real):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "ALLOCATOR_REDIS_URL": url, "ALLOCATOR_NAMESPACE": real.keys.namespace, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "allocator", *SEED, "--json"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["resources"]["cpu_cores"] == [0, 1]
    helptext = subprocess.run([sys.executable, "-m", "allocator", "--help"], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60).stdout
    for command in ("allocate", "release", "show", "list", "capacity", "queue", "top", "cancel", "tool", "mcp", "demo",
                    "worker", "scheduler", "agent"):
        assert command in helptext


# -- text that looks like markup ------------------------------------------------------------------

MARKUP = "job [/bold] [red]x"


@pytest.mark.parametrize("command", [["list"], ["queue"], ["top", "--once"], ["capacity"]])
def test_names_that_look_like_markup_are_printed_as_they_are(cli, real, command):
    real.allocate({"cpu_cores": 1}, task_id=MARKUP, task_type="[/x]")
    real.allocate({"gpus": 1}, task_id=MARKUP + " 2", task_type="[/x]")
    real.allocate({"gpus": 1}, task_id="q[/x]", task_type="[/x]", on_busy="queue")
    res = cli(*command)
    assert res.exit_code == 0, res.output
    if command[0] in ("list", "queue"):
        assert "[/x]" in res.stdout


def test_show_and_release_print_a_name_that_looks_like_markup(cli, real):
    x = real.allocate({"cpu_cores": 1}, task_id=MARKUP, metadata={"note": "[/bold]"})
    shown = cli("show", x.allocation_id)
    assert shown.exit_code == 0, shown.output
    assert MARKUP in shown.stdout and "[/bold]" in shown.stdout
    released = cli("release", x.allocation_id)
    assert released.exit_code == 0, released.output
    assert MARKUP in released.stdout


def test_an_error_message_holding_markup_is_printed_as_it_is(cli):
    res = cli("show", "[red]x")
    assert res.exit_code in (1, 2)
    assert "[red]x" in res.output


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1:x/0", "redis://u:p@[::1", "redis://:9999#tPW@127.0.0.1:6379/11"])
def test_a_malformed_redis_url_is_invalid_input(url):
    res = CliRunner().invoke(app, ["list", "--redis-url", url])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output


def test_a_password_given_as_a_url_parameter_is_not_echoed():
    from allocator.cli_common import redacted

    assert "hunter2" not in redacted("redis://127.0.0.1:1/0?password=hunter2")
    assert "hunter2" not in redacted("redis://user:hunter2@127.0.0.1:1/0")
    assert redacted("unix:///tmp/r.sock?db=1") == "unix:///tmp/r.sock?db=1"  # nothing to hide: as given
    assert redacted("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert redacted("unix://:pw@/tmp/r.sock") == "unix://:***@/tmp/r.sock"
    for cut in ("#", "?", "/"):  # a password not percent-encoded, cut where the host part ends
        assert redacted(f"redis://:9999{cut}tPW@127.0.0.1:6379/11") == "redis://***"
    assert redacted("unix:///tmp/r.sock?password=pw") == "unix:///tmp/r.sock?password=***"
    res = CliRunner().invoke(app, ["list", "--redis-url", "redis://127.0.0.1:1/0?password=hunter2"])
    assert res.exit_code == 1 and "hunter2" not in res.output


def test_top_with_no_queue_rows_shows_no_task(cli, real):
    real.allocate({"gpus": 1})
    real.allocate({"gpus": 1}, on_busy="queue")
    res = cli("top", "--json", "--queue-rows", "0")
    assert res.exit_code == 0, res.output
    assert as_json(res)["pending"] == []


def test_list_with_a_host_id_that_is_not_text_is_invalid_input(cli):
    res = cli("list", "--host", "\udcff", "--state", "active")
    assert res.exit_code == 2, res.output


def test_show_gives_no_queue_position_to_a_task_cancelled_before_it_was_placed(cli, real):
    real.allocate({"gpus": 1})
    waiting = real.allocate({"gpus": 1}, on_busy="queue")
    real.cancel(waiting.allocation_id)
    res = cli("show", waiting.allocation_id, "--json")
    assert res.exit_code == 0, res.output
    assert as_json(res)["queue_position"] is None


def test_the_agent_refuses_named_services_for_an_inventory_of_several_hosts(tmp_path):
    inv = tmp_path / "fleet.json"
    inv.write_text(json.dumps([{"id": "h1", "cpu_cores": 2, "ram_mb": 1024}, {"id": "h2", "cpu_cores": 2, "ram_mb": 1024}]))
    svc = tmp_path / "services.json"
    svc.write_text(json.dumps({"fs": {"command": ["true"]}}))
    res = CliRunner().invoke(app, ["agent", "--inventory", str(inv), "--services", str(svc), "--once",
                                   "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and "services" in res.stderr


def test_a_bad_task_id_filter_of_list_is_named_by_its_option(real):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, ["list", "--task-id", "", "--redis-url", url, "--namespace", real.keys.namespace])
    assert res.exit_code == 2 and "--task-id:" in res.stderr and "TASK_ID" not in res.stderr, res.output


@pytest.mark.parametrize("args, option", [(["--host", ""], "--host"), (["--host", "h 1"], "--host"),
                                          (["--host", "h\x1b]0;x\x07"], "--host"),
                                          (["--host", "h1", "--logging-level", "bogus"], "--logging-level")])
def test_a_worker_with_a_host_or_log_level_it_cannot_use_is_invalid_input_naming_the_option(real, args, option):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, ["worker", *args, "--burst", "--redis-url", url, "--namespace", real.keys.namespace])
    assert res.exit_code == 2 and option in res.output and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("command", [["agent", "--once"], ["reaper"], ["api", "--check"], ["tool", "--schema"]])
def test_an_unknown_log_level_is_invalid_input_naming_the_option(command):
    res = CliRunner().invoke(app, [*command, "--log-level", "bogus", "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and "--log-level" in res.output and "Traceback" not in res.output, res.output


def test_log_levels_go_by_logging_s_other_names_too(real):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    res = CliRunner().invoke(app, ["worker", "--host", "h1", "--burst", "--logging-level", "warn", "--redis-url", url,
                                   "--namespace", real.keys.namespace])
    assert res.exit_code == 0, res.output


def test_a_scheduler_without_a_database_url_starts_where_the_default_history_file_cannot_be_made(real, tmp_path):
    url = "redis://{host}:{port}/{db}".format(**real.redis.connection_pool.connection_kwargs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLOCATOR_STATE_DIR": "/proc/no/such/dir"}
    env.pop("ALLOCATOR_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "allocator", "scheduler", "--redis-url", url, "--namespace",
                             real.keys.namespace, "--interval", "0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "recorder not started" not in line:  # schedules, and the recorder tries again later
            line = proc.stdout.readline()
            assert line, "the scheduler exited"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("host_id", ["", "bad id"])
def test_an_agent_host_id_no_registration_takes_is_invalid_input_before_it_runs(host_id):
    res = CliRunner().invoke(app, ["agent", "--no-nvml", "--once", "--host-id", host_id, "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and "--host-id" in res.output, res.output


@pytest.mark.parametrize("command", [["api", "--port", "99999"], ["mcp", "--http", "--port", "99999"],
                                     ["agent", "--metrics-port", "99999"], ["reaper", "--metrics-port", "70000"]])
def test_a_port_out_of_range_is_invalid_input(command):
    res = CliRunner().invoke(app, [*command, "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and "port" in res.output.lower()


@pytest.mark.parametrize("command, address", [(["reaper", "--metrics-port"], "0.0.0.0"), (["api", "--port"], "127.0.0.1")])
def test_a_port_in_use_is_refused_in_one_line_with_exit_1(live, redis_url, command, address):
    with socket.socket() as busy:
        busy.bind((address, 0))
        busy.listen()
        res = CliRunner().invoke(app, [*command, str(busy.getsockname()[1]), "--redis-url", redis_url,
                                       "--namespace", live.keys.namespace])  # the test's own keys, removed after
    assert res.exit_code == 1 and "cannot listen" in res.stderr and "Traceback" not in res.output


def test_a_setting_out_of_range_shows_its_bounds_as_the_docs_write_them():
    from allocator.config import Settings

    with pytest.raises(InvalidRequest) as exc:
        Settings.from_env({"ALLOCATOR_RECORD_RETENTION_S": "-1"})
    assert "from 0 to 315360000" in str(exc.value)


def test_a_scheduler_without_a_redis_url_starts_no_private_server_before_refusing(monkeypatch):
    from allocator import embedded

    started = []
    monkeypatch.setattr(embedded, "embedded_url", lambda *a, **k: started.append(1) or "redis://127.0.0.1:1/0")
    res = CliRunner().invoke(app, ["scheduler", "--once"], env={"ALLOCATOR_REDIS_URL": ""})
    assert res.exit_code == 2 and "shared Redis" in res.output
    assert started == []
