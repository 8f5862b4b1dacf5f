"""Static inventory files: formats, the OpenB CSV, clear errors naming the field, live reload."""

from __future__ import annotations

import json
from pathlib import Path

import re

import pytest

from allocator.agent import InvalidInventory, StaticProvider, load_inventory_file
from allocator.agent.static import parse_inventory

from .helpers import host
from bench.fleets import openb_dir

OPENB_CSV = openb_dir() / "openb_node_list_gpu_node.csv"


def test_yaml_file_gives_hosts_with_units_and_defaults(inventory):
    inventory.write({"defaults": {"labels": {"cluster": "sim", "zone": "z1"}},
                     "hosts": [host("a", labels={"zone": "z2"}), host("b", gpus=[])]})
    a, b = load_inventory_file(inventory.path)
    assert (a.host_id, a.cpu_cores, a.ram_mb) == ("a", list(range(8)), 32768)
    assert a.labels == {"cluster": "sim", "zone": "z2"}
    assert [(g.index, g.uuid, g.memory_mb) for g in a.gpus] == [(0, "a-gpu0", 16384)]
    assert b.gpus == [] and b.labels == {"cluster": "sim", "zone": "z1"}


def test_json_file_is_read_like_yaml(tmp_path):
    p = tmp_path / "fleet.json"
    p.write_text(json.dumps([host("a")]))
    assert [h.host_id for h in load_inventory_file(p)] == ["a"]


def test_listed_processes_count_in_gpu_used_memory():
    (h,) = parse_inventory([host("a", gpus=[{"index": 0, "memory_mb": "16Gi", "used_mb": "1Gi",
                                              "processes": [{"pid": 10, "used_mb": "2Gi"}, {"pid": 11}]}])])
    g = h.gpus[0]
    assert g.used_mb == 3072 and [(p.pid, p.used_mb) for p in g.processes] == [(10, 2048), (11, None)]


def test_mig_devices_become_units_with_their_own_index_and_uuid():
    (h,) = parse_inventory([host("a", gpus=[{"index": 1, "model": "A100", "memory_mb": "40Gi", "mig_devices": [
        {"uuid": "MIG-x", "profile": "3g.20gb", "memory_mb": "20Gi"}, {"profile": "2g.10gb", "memory_mb": "10Gi"}]}])])
    assert [(g.index, g.uuid, g.model, g.memory_mb, g.parent_uuid) for g in h.gpus] == [
        (200, "MIG-x", "A100 MIG 3g.20gb", 20480, "a-gpu1"), (201, "a-gpu1-mig1", "A100 MIG 2g.10gb", 10240, "a-gpu1")]


@pytest.mark.parametrize("line, shown", [("rack: 12", "int 12"), ("cuda: 12.10", "float 12.1"), ("ib: yes", "bool True"),
                                         ("since: 2026-01-05", "date datetime.date(2026, 1, 5)"),
                                         ("at: 2026-01-05 10:00:00", "datetime datetime.datetime(2026, 1, 5, 10, 0)")])
def test_a_label_value_yaml_reads_as_a_number_boolean_or_date_is_refused_with_a_hint_to_quote_it(tmp_path, line, shown):
    p = tmp_path / "fleet.yaml"
    p.write_text(f"hosts:\n  - id: a\n    cpu_cores: 2\n    ram_mb: 1Gi\n    labels: {{{line}}}\n")
    with pytest.raises(InvalidInventory, match=re.escape(f"got {shown}; quote it")) as e:
        load_inventory_file(p)
    assert e.value.field == "hosts[0].labels"


@pytest.mark.parametrize("entry, field", [("cpu_cores: yes", "hosts[0].cpu_cores"), ("cpu_cores: [0, on]", "hosts[0].cpu_cores"),
                                          ("gpus: [{index: on, memory_mb: 16Gi}]", "hosts[0].gpus[0].index"),
                                          ("gpus: [{index: 0, memory_mb: 16Gi, utilization_pct: yes}]", "hosts[0].gpus[0].utilization_pct"),
                                          ("gpus: [{index: 0, memory_mb: 16Gi, processes: [{pid: yes}]}]", "hosts[0].gpus[0].processes[0].pid")])
def test_a_yaml_boolean_where_a_number_belongs_is_refused_not_read_as_1(tmp_path, entry, field):
    p = tmp_path / "fleet.yaml"
    p.write_text("hosts:\n  - id: a\n    ram_mb: 1Gi\n" + ("    cpu_cores: 2\n" if "cpu_cores" not in entry else "") + f"    {entry}\n")
    with pytest.raises(InvalidInventory, match="expected a number, got") as e:
        load_inventory_file(p)
    assert e.value.field == field


def test_quoted_label_values_are_kept_as_written(tmp_path):
    p = tmp_path / "fleet.yaml"
    p.write_text("defaults:\n  labels: {rack: '012'}\nhosts:\n  - {id: a, cpu_cores: 2, ram_mb: 1Gi, labels: {cuda: '12.10'}}\n")
    (a,) = load_inventory_file(p)
    assert a.labels == {"rack": "012", "cuda": "12.10"}


def test_a_null_label_value_is_refused_with_the_label_named():
    with pytest.raises(InvalidInventory, match="label 'zone': a label value must be text, got null"):
        parse_inventory([host("a", labels={"zone": None})])


def test_openb_csv_gives_the_1213_hosts():
    if not OPENB_CSV.is_file():
        pytest.skip(f"OpenB data not found at {OPENB_CSV}")
    hosts = load_inventory_file(OPENB_CSV)
    assert len(hosts) == 1213
    first = hosts[0]
    assert (first.host_id, len(first.cpu_cores), first.ram_mb, len(first.gpus), first.gpus[0].model,
            first.gpus[0].memory_mb) == ("openb-node-0000", 64, 262144, 2, "P100", 16384)


@pytest.mark.parametrize("doc, field", [
    ([host("a", gpus=[{"index": 0, "memory_mb": "lots"}])], "hosts[0].gpus[0].memory_mb"),
    ([host("a"), host("b", gpus=[{"index": 0}])], "hosts[1].gpus[0].memory_mb"),
    ([host("a", cpus=4)], "hosts[0].cpus"),
    ([{"id": "a", "ram_mb": "1Gi"}], "hosts[0].cpu_cores"),
    ([host("bad id")], "hosts[0].id"),
    ([host("a"), host("a")], "hosts[1].id"),
    ([host("a", gpus=[{"index": 0, "memory_mb": 100}, {"index": 0, "memory_mb": 100}])], "hosts[0].gpus"),
    ([host("a", gpus=[{"index": 0, "memory_mb": 100, "processes": [{"pid": 0}]}])], "hosts[0].gpus[0].processes[0].pid"),
    ([host("a", gpus=[{"index": 0, "memory_mb": 100, "used_mb": 200}])], "hosts[0].gpus"),
    ({"servers": []}, "hosts"),
    ([{"id": "a", "cpu_cores": 10_000_000, "ram_mb": "1Gi"}], "hosts[0].cpu_cores"),
    ([{"id": "a", "cpu_cores": 2**62, "ram_mb": "1Gi"}], "hosts[0].cpu_cores"),
    ([{"id": "a", "cpu_cores": [0, 2**40], "ram_mb": "1Gi"}], "hosts[0].cpu_cores"),
    ([host("a", labels={"zone": None})], "hosts[0].labels"),
    ([host("a", labels={"zone": ["z1", "z2"]})], "hosts[0].labels"),
    ({"defaults": {"labels": {"zone": {"a": 1}}}, "hosts": [host("a")]}, "defaults.labels"),
    ([host("a", labels={None: "gpu"})], "hosts[0].labels"),
    ([host("a", gpus=[{"index": 0, "memory_mb": "40Gi", "mig_devices": [
        {"memory_mb": "20Gi"}, {"memory_mb": "20Gi"}, {"memory_mb": "10Gi"}]}])], "hosts[0].gpus[0]"),
    ([host("a", gpus=[{"index": 0, "uuid": "GPU-aaaa,GPU-bbbb", "memory_mb": 100}])], "hosts[0].gpus[0].uuid"),
    ([host("a", gpus=[{"index": 0, "memory_mb": "40Gi", "mig_devices": [
        {"memory_mb": "20Gi"}, {"uuid": "MIG-a,MIG-b", "memory_mb": "20Gi"}]}])], "hosts[0].gpus[0].mig_devices[1].uuid"),
])
def test_malformed_inventory_names_the_field(doc, field):
    with pytest.raises(InvalidInventory) as e:
        parse_inventory(doc, "fleet.yaml")
    assert e.value.field == field
    assert str(e.value).startswith(f"fleet.yaml: {field}: ")


def test_unparsable_yaml_names_the_line(tmp_path):
    p = tmp_path / "fleet.yaml"
    p.write_text("hosts:\n  - id: a\n    labels: {zone: [\n")
    with pytest.raises(InvalidInventory, match=r"fleet.yaml: line \d+ column \d+: not valid YAML"):
        load_inventory_file(p)


def test_unparsable_json_names_the_line(tmp_path):
    p = tmp_path / "fleet.json"
    p.write_text('{"hosts": [\n  {"id": "a",}\n]}')
    with pytest.raises(InvalidInventory, match=r"fleet.json: line 2 column \d+: not valid JSON"):
        load_inventory_file(p)


def test_csv_without_the_openb_columns_is_refused(tmp_path):
    p = tmp_path / "nodes.csv"
    p.write_text("name,cpus\nx,4\n")
    with pytest.raises(InvalidInventory, match="header: missing column"):
        load_inventory_file(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInventory, match="no such file"):
        StaticProvider(tmp_path / "nope.yaml")


def test_provider_rereads_the_file_when_it_changes(inventory):
    inventory.write([host("a")])
    p = StaticProvider(inventory.path)
    assert [h.host_id for h in p.hosts()] == ["a"]
    inventory.write([host("a"), host("b")])
    assert [h.host_id for h in p.hosts()] == ["a", "b"]


def test_a_bad_edit_keeps_the_last_good_inventory(inventory, caplog):
    inventory.write([host("a")])
    p = StaticProvider(inventory.path)
    inventory.write([host("a", gpus=[{"index": 0}])])
    assert [h.host_id for h in p.hosts()] == ["a"]
    assert "hosts[0].gpus[0].memory_mb" in caplog.text


def test_the_example_inventory_is_valid():
    hosts = load_inventory_file(Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml")
    assert [h.host_id for h in hosts] == ["sim-a100", "sim-mig", "sim-t4"]
    assert [g.index for g in hosts[1].gpus] == [100, 101, 102]


def _touch_newer(path: Path) -> None:
    import os
    import time

    t = time.time_ns() + 2_000_000_000
    os.utime(path, ns=(t, t))


def test_an_edit_that_is_not_utf8_keeps_the_last_good_inventory(inventory, caplog):
    inventory.write([host("a")])
    p = StaticProvider(inventory.path)
    inventory.path.write_bytes(inventory.path.read_bytes().replace(b"hosts:", b"hosts: # caf\xe9\n#", 1))
    _touch_newer(inventory.path)
    assert [h.host_id for h in p.hosts()] == ["a"]
    assert "not UTF-8" in caplog.text


def test_an_inventory_that_is_not_utf8_at_start_up_names_the_file(tmp_path):
    p = tmp_path / "fleet.yaml"
    p.write_bytes(b"hosts:\n- id: caf\xe9\n")
    with pytest.raises(InvalidInventory, match="not UTF-8"):
        load_inventory_file(p)


def test_a_truncated_openb_row_names_its_line(tmp_path):
    p = tmp_path / "nodes.csv"
    p.write_text("sn,cpu_milli,memory_mib,gpu,model\nnode-1,32000,262144,2,V100M16\nnode-2,4000\n", encoding="utf-8")
    with pytest.raises(InvalidInventory, match="line 3"):
        load_inventory_file(p)


def test_an_inventory_that_could_not_be_read_is_read_again_next_round(inventory, monkeypatch):
    from allocator.agent import static

    inventory.write([host("a")])
    p = StaticProvider(inventory.path)
    inventory.write([host("a"), host("b")])
    real = static.load_inventory_file

    def unreadable_once(path):
        monkeypatch.setattr(static, "load_inventory_file", real)
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(static, "load_inventory_file", unreadable_once)
    assert [h.host_id for h in p.hosts()] == ["a"]  # kept the last good one
    assert [h.host_id for h in p.hosts()] == ["a", "b"]  # and read it again, though the file did not change


@pytest.mark.parametrize("row, what", [
    ("h1,,2000000000000,1024,0,", "cpu_cores"),
    ("h1,T4,4000,1024,3000000000,", "gpu: at most"),
    ("h1,,4000,-5,0,", "memory_mib: must not be negative"),
    ("h1,,-4000,1024,0,", "cpu_milli: must not be negative"),
    ("bad id|x,,4000,1024,0,", "id"),
])
def test_an_openb_row_a_yaml_host_could_not_be_is_refused_naming_its_line(tmp_path, row, what):
    p = tmp_path / "fleet.csv"
    p.write_text("sn,model,cpu_milli,memory_mib,gpu,first_time\n" + row + "\n")
    with pytest.raises(InvalidInventory) as e:
        load_inventory_file(p)
    assert e.value.field == "line 2" and what in e.value.reason


def test_an_openb_host_listed_twice_is_refused():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fleet.csv"
        p.write_text("sn,model,cpu_milli,memory_mib,gpu,first_time\nh1,,4000,1024,0,\nh1,,8000,1024,0,\n")
        with pytest.raises(InvalidInventory, match="again") as e:
            load_inventory_file(p)
        assert e.value.field == "line 3"
