"""compose.yaml against the Compose specification (offline, check-jsonschema's vendored schema),
the services the stack needs, every service command against the real CLI, and the Dockerfile's
shape. No Docker engine runs here; this is what can be checked without one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SERVICES = {"redis", "postgres", "migrate", "scheduler", "api", "agent", "worker", "rq-dashboard"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    res = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_services(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert SERVICES <= set(s)
    assert "version" not in compose
    redis = s["redis"]
    assert redis["command"][:1] == ["redis-server"]
    flags = " ".join(redis["command"])
    assert "--appendonly yes" in flags and "--appendfsync everysec" in flags
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["migrate"]["restart"] == "no" and s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("scheduler", "api"):
        assert s[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert s[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("agent", "worker"):
        dev = s[name]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    # The agent finds runs whose worker died by the claim's node name and the worker's pid, and maps
    # NVML's pids to work horses: both need the same node name and the host's pid namespace.
    assert s["agent"]["pid"] == s["worker"]["pid"] == "host"
    assert s["agent"]["environment"]["ALLOCATOR_NODE"] == s["worker"]["environment"]["ALLOCATOR_NODE"] \
        == "${ALLOCATOR_HOST_ID:-gpu-host-1}"
    assert "hostname" not in s["agent"]  # the agent's services are reached at its container's name
    assert any(str(p).endswith(":8000") for p in s["api"]["ports"])
    # Prometheus outside the compose network scrapes each agent's --metrics-port (docs/deploy.md).
    assert "--metrics-port" in s["agent"]["command"]
    port = s["agent"]["command"][s["agent"]["command"].index("--metrics-port") + 1]
    assert any(str(p).endswith(f":{port}") for p in s["agent"]["ports"])
    assert "ALLOCATOR_API_TOKEN" in s["api"]["environment"]


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "get_command") and hasattr(cmd, "list_commands")


def _resolve(group: Any, words: list[str]) -> tuple[Any, list[str]]:
    """The (typer or click) command that ``words`` name, and the words left (its arguments)."""
    cmd = group
    rest = list(words)
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(None, rest[0])
        assert sub is not None, f"no command {rest[0]!r} under {cmd.name!r}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def _check_options(cmd: Any, args: list[str], where: str) -> None:
    known = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    for a in args:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, f"{where}: {cmd.name} has no option {a}"


def test_every_service_command_exists_in_the_cli(compose: dict[str, Any]) -> None:
    import typer

    from allocator.cli import app

    root = typer.main.get_command(app)
    assert _is_group(root)
    image = compose["x-app"]["image"]
    checked = 0
    for name, svc in compose["services"].items():
        if svc.get("image") != image:
            continue  # redis, postgres: upstream images
        command = [re.sub(r"\$\{[^}]*\}", "x", str(w)) for w in svc["command"]]
        if command[0] == "allocator":
            cmd, rest = _resolve(root, command[1:])
            assert not _is_group(cmd), f"{name}: {command} names a group, not a command"
            _check_options(cmd, rest, name)
        elif command[0] == "rq-dashboard":
            from importlib.metadata import entry_points

            eps = [e for e in entry_points(group="console_scripts") if e.name == "rq-dashboard"]
            assert eps, "rq-dashboard is not installed (the image installs the 'dashboard' extra)"
            from rq_dashboard.cli import run

            _check_options(run, command[1:], name)
        else:
            pytest.fail(f"{name}: unexpected command {command[0]!r}")
        checked += 1
    assert checked >= 6


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, flags=re.MULTILINE | re.IGNORECASE)
    assert len(froms) >= 2 and froms[-1][1] == "runtime"
    assert "slim" in re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)  # type: ignore[union-attr]
    user = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "COPY --from=build" in text
    ignore = (ROOT / ".dockerignore").read_text()
    assert "**" in ignore.splitlines() and "!allocator/" in ignore


def test_api_command_check_mode(redis_url: str) -> None:
    """`allocator api --check` builds the app against Redis and lists its routes (the entry the
    compose service runs), without serving."""
    exe = Path(sys.executable).parent / "allocator"
    res = subprocess.run([str(exe), "api", "--check", "--redis-url", redis_url, "--namespace", "test-api-check"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "/ws/allocate" in res.stdout and "/v1/allocations" in res.stdout
    assert "password" not in res.stderr.lower() or "***" in res.stderr


def test_api_command_with_a_task_module_that_cannot_be_imported_exits_2_naming_it(redis_url: str) -> None:
    exe = Path(sys.executable).parent / "allocator"
    env = {**os.environ, "ALLOCATOR_TASK_MODULES": "no_such_module_anywhere"}
    res = subprocess.run([str(exe), "api", "--check", "--redis-url", redis_url, "--namespace", "test-api-check"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2, res.stderr
    assert "no_such_module_anywhere" in res.stderr and "Traceback" not in res.stderr
