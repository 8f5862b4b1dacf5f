"""Security: Redis AUTH and TLS URLs work end to end; credentials never reach a log or an error
message; the API wants its bearer token; nothing a caller sends is imported, evaluated or
unpickled."""

from __future__ import annotations

import ast
import datetime
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy.engine import URL

from allocator import Allocator
from allocator.embedded import find_redis_server

from . import jobs
from .conftest import url_text
from .helpers import ROOT, Procs, alloc_state, assert_consistent, host_entry, ledger_dump, starts, wait_for, write_inventory

SECRET = "s3cr3t-" + uuid.uuid4().hex[:12]        # the Redis password
WRONG = "wr0ng-" + uuid.uuid4().hex[:12]          # a wrong password someone typed (a credential too)
PG_SECRET = "pgs3cr3t-" + uuid.uuid4().hex[:12]   # the Postgres password (trust auth on the test server ignores it)
TOKEN = "tok-" + uuid.uuid4().hex                 # the API's bearer token
CREDENTIALS = (SECRET, WRONG, PG_SECRET, TOKEN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli_here(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``allocator ARGS`` run in this process (CliRunner: the same code as the installed command,
    without paying a Python start-up per call), as a CompletedProcess."""
    from typer.testing import CliRunner

    from allocator.cli import app

    keep = ("ALLOCATOR_REDIS_URL", "ALLOCATOR_NAMESPACE", "ALLOCATOR_DATABASE_URL")
    r = CliRunner().invoke(app, list(args), input=stdin, env={k: (env or {}).get(k) for k in keep})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(r.exception))
        return subprocess.CompletedProcess(list(args), 99, r.stdout, r.stderr + "\nTraceback:\n" + tb)
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def _no_credentials(text: str, where: str) -> None:
    for c in CREDENTIALS:
        assert c not in text, f"a credential appears in {where}: ...{text[max(0, text.find(c) - 200):text.find(c) + 50]}"


def test_redis_auth_end_to_end_and_no_credential_in_any_log_or_error(private_redis, tmp_path: Path, pg_url: URL) -> None:
    """Redis requires a password (``--requirepass``); Postgres is given one in its URL. An agent,
    a worker, a scheduler with its recorder and the HTTP API run with those URLs (from the
    environment) and a job runs end to end. Then the error paths: a wrong password, no password,
    an unreachable Postgres, the tool JSON against a Redis it cannot log in to, the library's
    own exceptions. Expected: the good path works; every failure is a clear message (exit 1 or
    2, no traceback); and none of the passwords or the API token appears in any process log, any
    command's output or any exception text."""
    server = private_redis(["--requirepass", SECRET])
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    wrong_url = f"redis://:{WRONG}@127.0.0.1:{port}/0"
    db = url_text(pg_url.set(password=PG_SECRET))
    ns = "rel-" + uuid.uuid4().hex[:10]
    a = Allocator(url, namespace=ns)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    procs = Procs(logs, url, ns)
    outputs: list[str] = []
    try:
        procs.agent(write_inventory(tmp_path / "fleet.yaml", [host_entry("h1")]), "agent", "--log-level", "DEBUG")
        procs.scheduler(database_url=db)
        procs.worker("h1")
        api_port = _free_port()
        procs.start("api", "api", "--port", str(api_port), "--log-level", "debug", env=procs.env(ALLOCATOR_API_TOKEN=TOKEN))
        wait_for(lambda: a.redis.zscore(a.keys.heartbeats, "h1"), what="agent heartbeat with AUTH")
        job = a.enqueue(jobs.record_run, str(runs_dir), "j", resources={"cpu_cores": 1}, task_type="sec")
        wait_for(lambda: alloc_state(a, job.id)[0] == "released", timeout=30, what="job run with AUTH")
        assert len(starts(runs_dir, "j")) == 1

        base = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: _get(base + "/health") == 200, timeout=30, what="API up")
        assert _get(base + "/v1/capacity") == 401
        assert _get(base + "/v1/capacity", {"Authorization": f"Bearer {WRONG}"}) == 401
        assert _get(base + "/v1/capacity", {"Authorization": f"Bearer {TOKEN}"}) == 200

        with_db = procs.env(ALLOCATOR_DATABASE_URL=db)
        calls = [  # (args, env, stdin, expected exit codes): the good paths, then the failures
            (["hosts", "--json"], None, None, (0,)),
            (["db", "current"], with_db, None, (0,)),
            (["recorder", "--status"], with_db, None, (0,)),
            (["history", "--json"], with_db, None, (0,)),
            (["hosts"], procs.env(ALLOCATOR_REDIS_URL=wrong_url), None, (1, 2)),
            (["hosts"], procs.env(ALLOCATOR_REDIS_URL=f"redis://127.0.0.1:{port}/0"), None, (1, 2)),
            (["allocate", "t1", "--cpu-cores", "1"], procs.env(ALLOCATOR_REDIS_URL=wrong_url), None, (1, 2)),
            (["allocate", "t1", "--cpu-cores", "1", "--json"], procs.env(ALLOCATOR_REDIS_URL=wrong_url), None, (1, 2)),
            (["history"], procs.env(ALLOCATOR_DATABASE_URL=f"postgresql+psycopg://postgres:{PG_SECRET}@127.0.0.1:1/test"),
             None, (1, 2)),
            (["tool"], procs.env(ALLOCATOR_REDIS_URL=wrong_url), json.dumps({"tool": "get_capacity", "params": {}}), (1, 2)),
        ]
        results = [_cli_here(*c[0], env=c[1] or procs.env(), stdin=c[2]) for c in calls]
        for (args, _, _, codes), r in zip(calls, results):
            text = r.stdout + r.stderr
            assert r.returncode in codes, (args, text)
            assert "Traceback" not in text, (args, text)
            outputs.append(text)
        assert "BACKEND_UNAVAILABLE" in results[-1].stdout

        wrong = Allocator(wrong_url, namespace=ns)
        with pytest.raises(redis.AuthenticationError) as exc:
            wrong.allocate({"cpu_cores": 1})
        outputs += [str(exc.value), repr(exc.value), repr(wrong.redis), repr(a.redis), repr(a.redis.connection_pool)]
        procs.scheduler("scheduler-wrong-password", env=procs.env(ALLOCATOR_REDIS_URL=wrong_url))
        wait_for(lambda: "failed" in procs.log("scheduler-wrong-password") or "rror" in procs.log("scheduler-wrong-password"),
                 timeout=30, what="the scheduler reporting the refused login")
        assert_consistent(a)
    finally:
        procs.stop_all()
    for text in outputs:
        _no_credentials(text, "a command's output or an error message")
    for log in sorted(logs.glob("*.log")):
        _no_credentials(log.read_text(errors="replace"), log.name)
    assert "invalid username-password pair" in procs.logs() + "".join(outputs) or "WRONGPASS" in "".join(outputs)


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        return httpx.get(url, headers=headers or {}, timeout=5).status_code
    except httpx.HTTPError:
        return 0


# -- TLS ---------------------------------------------------------------------------------------


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key), made with ``cryptography`` when it is
    installed, else with the ``openssl`` command."""
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("the TLS test needs `cryptography` or the `openssl` command to make a certificate")
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", str(key_path), "-out", str(cert_path), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A private redis-server that speaks only TLS (and wants a password); (port, CA file, an
    unrelated CA file)."""
    exe = find_redis_server()
    if exe is None:
        pytest.skip("no redis-server binary for a private Redis")
    cert, key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "other")
    port = _free_port()
    data = tmp_path / "redis-data"
    data.mkdir()
    proc = subprocess.Popen([exe, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
                             str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", SECRET,
                             "--bind", "127.0.0.1", "--save", "", "--dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s, ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                break
        except OSError:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                if "TLS" in out or "tls" in out:
                    pytest.skip(f"this redis-server has no TLS support: {out.strip()[-200:]}")
                raise
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield port, cert, other
    proc.kill()
    proc.wait(10)
    shutil.rmtree(data, ignore_errors=True)


def test_rediss_url_with_auth_end_to_end(tls_redis: tuple[int, Path, Path], tmp_path: Path) -> None:
    """A Redis that accepts only TLS connections and a password, reached with a ``rediss://`` URL
    (CA file and certificate check in the query string). Expected: the library, an agent, a
    worker and a scheduler all work over it (a job runs and is released); a plaintext client is
    turned away; a client that does not trust the server's certificate gets a certificate error,
    and the password is in no message."""
    port, ca, other_ca = tls_redis
    url = f"rediss://:{SECRET}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    ns = "rel-" + uuid.uuid4().hex[:10]
    a = Allocator(url, namespace=ns)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    procs = Procs(logs, url, ns)
    try:
        procs.agent(write_inventory(tmp_path / "fleet.yaml", [host_entry("h1")]))
        procs.scheduler()
        procs.worker("h1")
        wait_for(lambda: a.redis.zscore(a.keys.heartbeats, "h1"), timeout=30, what="agent heartbeat over TLS")
        job = a.enqueue(jobs.record_run, str(runs_dir), "j", resources={"cpu_cores": 1}, task_type="sec")
        wait_for(lambda: alloc_state(a, job.id)[0] == "released", timeout=30, what="job run over TLS")
        assert len(starts(runs_dir, "j")) == 1
        assert_consistent(a)
    finally:
        procs.stop_all()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, password=SECRET, socket_timeout=2).ping()  # plaintext to a TLS-only port
    untrusting = Allocator(f"rediss://:{SECRET}@127.0.0.1:{port}/0?ssl_ca_certs={other_ca}&ssl_cert_reqs=required",
                           namespace=ns)
    with pytest.raises(redis.ConnectionError) as exc:
        untrusting.capacity()
    assert "certificate" in str(exc.value).lower()
    _no_credentials(str(exc.value) + repr(untrusting.redis), "the TLS error")
    for log in sorted(logs.glob("*.log")):
        _no_credentials(log.read_text(errors="replace"), log.name)


# -- no code from untrusted input ------------------------------------------------------------

ALLOWED_IMPORTERS = {  # where a module is imported by name, and where the name comes from
    "allocator/task_registry.py": "ALLOCATOR_TASK_MODULES (operator configuration) and the built-in demo tasks",
    "allocator/api/tasks.py": "ALLOCATOR_TASKS / ALLOCATOR_TASKS_FILE (operator configuration), at start-up",
    "allocator/api/policies.py": "policy_rule_uri, only under the module prefixes the operator allows",
}
FORBIDDEN_CALLS = {("pickle", "loads"), ("pickle", "load"), ("marshal", "loads"), ("marshal", "load"),
                   ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("dill", "loads"),
                   ("cloudpickle", "loads"), ("jsonpickle", "decode")}


def test_the_code_never_unpickles_evaluates_or_imports_what_it_receives() -> None:
    """A static scan of ``allocator/`` and ``workers/``: no unpickling (pickle, marshal, dill),
    no unsafe YAML, no eval/exec/compile/__import__, and modules imported by name only where the
    name is operator configuration or an operator allowlist (the task registries, the policy
    loader). RQ itself pickles a job's arguments; remote callers' arguments are JSON values the
    server pickles, and the server never unpickles anything a caller sent."""
    problems: list[str] = []
    for path in sorted([*ROOT.glob("allocator/**/*.py"), *ROOT.glob("workers/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                    problems.append(f"{rel}:{node.lineno}: {f.id}()")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    if (f.value.id, f.attr) in FORBIDDEN_CALLS:
                        problems.append(f"{rel}:{node.lineno}: {f.value.id}.{f.attr}()")
                    if (f.value.id, f.attr) == ("importlib", "import_module") and rel not in ALLOWED_IMPORTERS:
                        problems.append(f"{rel}:{node.lineno}: importlib.import_module() outside the allowlist")
                if isinstance(f, ast.Attribute) and f.attr == "loads" and isinstance(f.value, ast.Attribute) \
                        and f.value.attr in ("pickle", "marshal"):
                    problems.append(f"{rel}:{node.lineno}: {f.value.attr}.loads()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [n.name for n in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                if any(n.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle", "jsonpickle") for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports a pickle library")
    assert problems == []


@pytest.fixture(scope="module")
def small_fleet() -> Iterator[Allocator]:
    from allocator.embedded import start_redis_server, stop_redis_server

    if find_redis_server() is None:
        pytest.skip("no redis-server binary for a private Redis")
    url, proc, data_dir = start_redis_server()
    a = Allocator(url, namespace="rel-sec-" + uuid.uuid4().hex[:8])
    a.register_host(host_entry("h1"))
    yield a
    stop_redis_server(proc, data_dir)


@pytest.fixture(scope="module")
def api(small_fleet: Allocator) -> Iterator[object]:
    from starlette.testclient import TestClient

    from allocator.api.app import create_app
    from allocator.api.config import ApiConfig
    from allocator.api.tasks import TaskRegistry

    app = create_app(small_fleet, ApiConfig(token=TOKEN), TaskRegistry({"add": "tests.jobs:add"}))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.mark.parametrize("name", ["os.system", "os:system", "subprocess.Popen", "tests.jobs:add", "tests.jobs.add",
                                  "__import__", "builtins:eval", "demo.sleep ", "../demo.sleep"])
def test_tool_and_http_run_only_registered_task_names(small_fleet: Allocator, api: object, name: str) -> None:
    """A task named by a dotted path, a builtin, or anything not registered is refused as invalid
    input (tool: INVALID_REQUEST on field ``task``; HTTP: 4xx), and no RQ job or ledger entry is
    created."""
    from allocator.tool import INVALID, ToolContext, run_tool

    a = small_fleet
    rq_jobs = lambda: sorted(a.rq_connection.scan_iter(match="rq:job:*", count=1000))  # noqa: E731
    before, jobs_before = ledger_dump(a), rq_jobs()
    out = run_tool("submit_task", {"task": name, "args": [["id"]], "kwargs": {}}, ToolContext(a))
    assert out.status == INVALID and out.payload["error"]["field"] == "task", out.payload
    r = api.post("/v1/tasks", json={"task": name, "args": ["id"]})  # type: ignore[attr-defined]
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"], r.text
    assert ledger_dump(a) == before and rq_jobs() == jobs_before


@pytest.mark.parametrize("uri", ["os:system", "subprocess:Popen", "builtins.eval", "tests.jobs:add",
                                 "allocator.api.policiesx:Evil"])
def test_websocket_policies_load_only_from_allowed_modules(small_fleet: Allocator, api: object, uri: str) -> None:
    """A seed-003 request naming a policy outside the built-ins, the installed entry points and
    the operator's module prefixes is refused; nothing is imported or placed."""
    a = small_fleet
    before = ledger_dump(a)
    mod = uri.replace(":", ".").rsplit(".", 1)[0]
    was_loaded = mod in sys.modules
    msg = {"adhoc": True, "policy_rule_uri": uri, "inputs": {"resources": {"cpu_cores": 1}}}
    with api.websocket_connect("/ws/allocate", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:  # type: ignore[attr-defined]
        ws.send_json(msg)
        reply = ws.receive_json()
    assert reply.get("type") == "error" or "error" in reply, reply
    assert "not allowed" in json.dumps(reply) or "unknown policy" in json.dumps(reply), reply
    assert (mod in sys.modules) == was_loaded
    assert ledger_dump(a) == before
