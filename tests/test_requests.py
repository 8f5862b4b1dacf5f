"""Request validation: every invalid value names its field and the reason."""

import pytest

from allocator import InvalidRequest, Priority, Resources, Strategy
from allocator.models import AllocationRequest, HostSpec, parse, parse_selector

from .conftest import ledger_dump


def test_gpu_memory_without_gpu_count_means_one_gpu():
    r = parse(Resources, {"gpu_memory_mb": "20Gi", "cpu_cores": 4, "ram_mb": "32Gi"})
    assert (r.gpus, r.gpu_memory_mb, r.cpu_millis, r.ram_mb) == (1, 20480, 4000, 32768)


def test_gpus_without_memory_means_whole_gpus():
    r = parse(Resources, {"gpus": 2})
    assert r.gpus == 2 and r.gpu_memory_mb is None


def test_integer_cores_are_exclusive_and_fractions_shared():
    assert parse(Resources, {"cpu_cores": 2}).exclusive_cores
    assert not parse(Resources, {"cpu_cores": "0.5"}).exclusive_cores


def test_gpu_model_constraint_accepts_alternatives():
    assert parse(Resources, {"gpus": 1, "gpu_model": "V100M16|V100M32"}).gpu_model == ["V100M16", "V100M32"]


def test_zero_gpu_memory_without_gpus_is_a_cpu_task():
    r = parse(Resources, {"gpu_memory_mb": 0, "cpu_cores": 2})
    assert r.gpus == 0 and r.gpu_memory_mb is None


@pytest.mark.parametrize(
    ("data", "field", "reason_part"),
    [
        ({"gpus": -1}, "resources.gpus", "greater than or equal"),
        ({"gpus": 1.5}, "resources.gpus", "whole number"),
        ({"gpus": 65}, "resources.gpus", "less than or equal"),
        ({"gpus": 1, "gpu_memory_mb": 0}, "resources.gpu_memory_mb", "omit it"),
        ({"gpus": 0, "gpu_memory_mb": "1Gi"}, "resources.gpus", "leave gpus out"),
        ({"gpu_memory_mb": "lots"}, "resources.gpu_memory_mb", "cannot read"),
        ({"ram_mb": "-3Gi"}, "resources.ram_mb", "cannot read"),
        ({"cpu_cores": "-1"}, "resources.cpu_cores", "negative"),
        ({"gpu_model": "A100"}, "resources.gpu_model", "no GPUs"),
        ({"gpu_model": 7, "gpus": 1}, "resources.gpu_model", "model name"),
        ({"cores": 2}, "resources.cores", "unknown field"),
    ],
)
def test_bad_resources_name_the_field(data, field, reason_part):
    with pytest.raises(InvalidRequest) as exc:
        parse(Resources, data, "resources.")
    assert exc.value.field == field
    assert reason_part in exc.value.reason


@pytest.mark.parametrize(("value", "expected"), [("low", 0), ("HIGH", 2), (3, 3), ("1", 1), (Priority.NORMAL, 1)])
def test_priority_by_name_or_number(value, expected):
    assert Priority.parse(value) == expected


@pytest.mark.parametrize("value", [4, -1, "urgent", True, 1.5, None, "\u00b2", "\u0663"])
def test_bad_priority_is_refused(value):
    with pytest.raises(InvalidRequest) as exc:
        Priority.parse(value)
    assert exc.value.field == "priority"


def test_strategy_spread_is_worst_fit():
    assert Strategy.parse("spread") is Strategy.WORST_FIT
    assert Strategy.parse("best-fit") is Strategy.BEST_FIT


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"strategy": "random"}, "strategy"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": -5}, "ttl_seconds"),
        ({"ttl_seconds": "soon"}, "ttl_seconds"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata": {"f": object()}}, "metadata"),
        ({"allocation_id": "bad id#"}, "allocation_id"),
        ({"allocation_id": "trailing-newline\n"}, "allocation_id"),
        ({"task_id": ""}, "task_id"),
        ({"selector": {"cluster": []}}, "selector.cluster"),
        ({"selector": "cluster"}, "selector"),
        ({"selector": {"k=v": "w"}}, "selector"),
    ],
)
def test_bad_request_fields_name_the_field(data, field):
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, **data})
    assert exc.value.field == field


@pytest.mark.parametrize("field", ["ttl_seconds", "expected_duration"])
def test_a_time_beyond_ten_years_is_refused_saying_the_limit_not_that_it_is_not_positive(field):
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, field: 1e12})
    assert exc.value.field == field and "at most 315360000 seconds" in exc.value.reason
    assert "positive" not in exc.value.reason


def test_selector_string_form():
    assert parse_selector("cluster=a|b, zone=z1") == {"cluster": ["a", "b"], "zone": ["z1"]}


def test_a_label_given_twice_in_a_selector_string_is_refused_pointing_to_alternatives():
    with pytest.raises(InvalidRequest) as exc:
        parse_selector("cluster=other,cluster=lab")
    assert exc.value.field == "selector" and "cluster=x|y" in exc.value.reason


def test_a_request_may_not_bring_the_seed_apis_metadata_key():
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, "metadata": {"_seed": {"workers": "many"}}})
    assert exc.value.field == "metadata._seed"


def test_host_spec_defaults_cluster_label_and_gpu_uuids():
    h = parse(HostSpec, {"id": "h1", "cpu_cores": 4, "ram_mb": "16Gi", "gpus": [{"index": 1, "memory_mb": "16Gi"}, {"index": 0, "memory_mb": "16Gi"}]})
    assert h.labels == {"cluster": "default"}
    assert h.cpu_cores == [0, 1, 2, 3]
    assert [g.uuid for g in h.gpus] == ["h1-gpu0", "h1-gpu1"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"id": "a#b"}, "id"),
        ({"id": "h", "cpu_cores": [1, 1]}, "cpu_cores"),
        ({"id": "h", "gpus": [{"index": 0, "memory_mb": 0}]}, "memory_mb"),
        ({"id": "h", "gpus": [{"index": 0, "memory_mb": 10}, {"index": 0, "memory_mb": 10}]}, "gpus"),
        ({"id": "h", "ram_mb": "x"}, "ram_mb"),
    ],
)
def test_bad_host_specs_name_the_field(data, field):
    with pytest.raises(InvalidRequest) as exc:
        parse(HostSpec, data)
    assert exc.value.field.endswith(field)


def test_a_namespace_longer_than_64_characters_is_refused_up_front():
    from allocator import Allocator

    with pytest.raises(InvalidRequest) as e:
        Allocator("redis://127.0.0.1:6379/0", namespace="n" * 65)  # the history's columns hold 64
    assert e.value.field == "namespace"
    assert Allocator("redis://127.0.0.1:6379/0", namespace="n" * 64).keys.namespace == "n" * 64


@pytest.mark.parametrize("namespace", ["team.host.x", "team.host"])
def test_a_namespace_holding_the_host_queue_separator_is_refused(namespace):
    from allocator import Allocator

    with pytest.raises(InvalidRequest) as e:
        Allocator("redis://127.0.0.1:6379/0", namespace=namespace)
    assert e.value.field == "namespace" and ".host" in e.value.reason


def test_a_worker_refuses_a_namespace_holding_the_host_queue_separator():
    from typer.testing import CliRunner

    from allocator.cli import app

    res = CliRunner().invoke(app, ["worker", "--host", "h1", "--namespace", "team.host.x", "--burst",
                                   "--redis-url", "redis://127.0.0.1:1/0"])
    assert res.exit_code == 2 and "--namespace" in res.stderr


@pytest.mark.parametrize("count", [4, 4.0, "4", " 4 "])
def test_a_host_core_count_written_as_a_float_or_text_is_that_count(count):
    assert parse(HostSpec, {"id": "h1", "cpu_cores": count, "ram_mb": 1}).cpu_cores == [0, 1, 2, 3]


@pytest.mark.parametrize("count", ["x", "4.5", None, {"a": 1}])
def test_a_host_core_count_that_is_no_count_or_list_says_what_it_takes(count):
    with pytest.raises(InvalidRequest) as exc:
        parse(HostSpec, {"id": "h1", "cpu_cores": count, "ram_mb": 1})
    assert exc.value.field == "cpu_cores" and "a list of core ids" in exc.value.reason


@pytest.mark.parametrize("field", ["task_id", "task_type", "owner"])
@pytest.mark.parametrize("text", ["t\x1b]0;pwned\x07", "a\x1b[2J", "line\nbreak", "del\x7f", "c1\x9b"])
def test_text_printed_in_an_operators_terminal_may_not_hold_control_characters(field, text):
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, field: text})
    assert exc.value.field == field and "control character" in exc.value.reason


@pytest.mark.parametrize("labels, field", [({"rack": "r\x1b[31m1"}, "labels.rack"), ({"ra\x1bck": "r1"}, "labels")])
def test_host_labels_may_not_hold_control_characters(labels, field):
    with pytest.raises(InvalidRequest) as exc:
        parse(HostSpec, {"id": "h1", "cpu_cores": 1, "ram_mb": 1, "labels": labels})
    assert exc.value.field == field


def test_text_in_other_scripts_is_not_a_control_character():
    req = parse(AllocationRequest, {"resources": {}, "task_id": "entraînement-1", "owner": "日本", "task_type": "ml infer"})
    assert (req.task_id, req.owner) == ("entraînement-1", "日本")


def test_a_refused_selector_value_is_quoted_short_in_the_error():
    with pytest.raises(InvalidRequest) as e:
        parse_selector({"cluster": [["x" * 100_000]]})
    assert e.value.field == "selector.cluster" and len(str(e.value)) < 200


def test_metadata_larger_than_64_kib_as_json_is_refused_naming_it(alloc):
    from allocator.models import MAX_METADATA_BYTES

    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as e:
        alloc.allocate({"cpu_cores": 0}, metadata={"blob": "x" * MAX_METADATA_BYTES})
    assert e.value.field == "metadata" and "more than the 65536" in str(e.value)
    assert ledger_dump(alloc) == before
    alloc.build_request({"cpu_cores": 0}, metadata={"blob": "x" * (MAX_METADATA_BYTES - 20)})  # just under: taken



@pytest.mark.parametrize("selector", [{f"l{i}": "x" for i in range(65)}, ",".join(f"l{i}=x" for i in range(65))])
def test_a_selector_of_more_than_64_labels_is_refused_saying_the_limit(selector):
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, "selector": selector})
    assert exc.value.field == "selector" and "at most 64 labels, got 65" in exc.value.reason


@pytest.mark.parametrize("values", [[f"c{i}" for i in range(257)], "|".join(f"c{i}" for i in range(257))])
def test_a_selector_label_of_more_than_256_values_is_refused_naming_the_label(values):
    selector = {"cluster": values} if isinstance(values, list) else f"cluster={values}"
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, {"resources": {}, "selector": selector})
    assert exc.value.field == "selector.cluster" and "at most 256 values, got 257" in exc.value.reason


def test_a_selector_at_its_limits_is_taken():
    selector = {f"l{i}": [f"v{j}" for j in range(256)] for i in range(64)}
    assert parse(AllocationRequest, {"resources": {}, "selector": selector}).selector == selector


@pytest.mark.parametrize("models", [[f"M{i}" for i in range(257)], "|".join(f"M{i}" for i in range(257))])
def test_more_than_256_gpu_models_are_refused_saying_the_limit(models):
    with pytest.raises(InvalidRequest) as exc:
        parse(Resources, {"gpus": 1, "gpu_model": models}, "resources.")
    assert exc.value.field == "resources.gpu_model" and "at most 256 GPU models, got 257" in exc.value.reason


def test_256_gpu_models_are_taken():
    assert len(parse(Resources, {"gpus": 1, "gpu_model": [f"M{i}" for i in range(256)]}).gpu_model) == 256


@pytest.mark.parametrize("fields", [
    {"selector": {"cluster": [f"c{i}" for i in range(8000)]}},
    {"selector": {f"l{i}": "x" for i in range(8000)}},
    {"resources": {"gpus": 1, "gpu_model": [f"M{i}" for i in range(8000)]}},
])
def test_a_request_with_too_many_selector_or_model_values_is_refused_before_it_waits_in_line(alloc, fields):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb=1024)
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest):
        alloc.allocate(fields.pop("resources", {"cpu_cores": 1}), on_busy="queue", **fields)
    assert ledger_dump(alloc) == before


def test_a_resources_instance_changed_after_it_was_built_is_checked_again(alloc):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb=1024)
    r = Resources(cpu_cores=1)
    r.ram_mb = -4096
    before = ledger_dump(alloc)
    with pytest.raises(InvalidRequest) as exc:
        alloc.allocate(r)
    assert exc.value.field == "resources.ram_mb" and "negative" in exc.value.reason
    assert ledger_dump(alloc) == before


def test_an_allocation_request_changed_after_it_was_built_is_checked_again():
    req = parse(AllocationRequest, {"resources": {"gpus": 1}, "selector": {"cluster": "a"}})
    req.selector["cluster"] = []
    with pytest.raises(InvalidRequest) as exc:
        parse(AllocationRequest, req)
    assert exc.value.field == "selector.cluster"


def test_a_list_changed_inside_a_resources_instance_is_checked_again():
    r = Resources(gpus=1, gpu_model=["A100"])
    r.gpu_model.extend(f"M{i}" for i in range(300))
    with pytest.raises(InvalidRequest) as exc:
        parse(Resources, r, "resources.")
    assert exc.value.field == "resources.gpu_model" and "at most 256" in exc.value.reason


def test_gpu_memory_set_on_an_instance_that_left_gpus_out_asks_for_one_gpu():
    r = Resources(cpu_cores=1)
    r.gpu_memory_mb = 1024
    assert (parse(Resources, r).gpus, parse(Resources, r).gpu_memory_mb) == (1, 1024)


def test_gpu_memory_set_on_an_instance_that_asked_for_0_gpus_is_refused():
    r = Resources(gpus=0, cpu_cores=1)
    r.gpu_memory_mb = 1024
    with pytest.raises(InvalidRequest) as exc:
        parse(Resources, r)
    assert exc.value.field == "gpus"


def test_a_valid_instance_checked_again_is_unchanged():
    req = parse(AllocationRequest, {"resources": {"gpu_memory_mb": "4Gi", "gpu_model": "A100|H100", "cpu_cores": "500m"},
                                    "priority": "high", "strategy": "spread", "selector": "cluster=a|b",
                                    "metadata": {"k": [1, {"x": None}]}, "task_id": "t1", "ttl_seconds": None})
    again = parse(AllocationRequest, req)
    assert again == req and again is not req
    assert again.resources.model_fields_set == req.resources.model_fields_set
