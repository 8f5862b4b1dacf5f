"""``allocator allocate-many``: requests from a file or stdin, placed in batches, one row each."""

from __future__ import annotations

import json

import pytest

from .conftest import ledger_dump
from .test_cli import as_json, cli, real  # noqa: F401  (fixtures)

REQ = {"resources": {"gpus": 1, "gpu_memory_mb": "4Gi", "cpu_cores": 2}}


def test_requests_as_json_lines_on_stdin_are_placed_in_order(cli, real):
    lines = "\n".join(json.dumps({**REQ, "allocation_id": f"s-{i}"}) for i in range(2)) + "\n\n"
    res = cli("allocate-many", "-", "--json", input=lines)
    assert res.exit_code == 0, res.output
    doc = as_json(res)
    assert (doc["placed"], doc["not_placed"]) == (2, 0)
    assert [x["allocation"]["allocation_id"] for x in doc["results"]] == ["s-0", "s-1"]
    assert [x["allocation"]["cpu_cores"] for x in doc["results"]] == [[0, 1], [2, 3]]
    assert {x.allocation_id for x in real.list(state="active")} == {"s-0", "s-1"}


def test_a_refused_request_exits_1_and_the_others_are_placed(cli, real, tmp_path):
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps([REQ, {"resources": {"gpu_memory_mb": "9Gi"}}, REQ]))
    res = cli("allocate-many", str(f), "--chunk-size", "2", "--json")
    assert res.exit_code == 1, res.output
    doc = as_json(res)
    assert [x["ok"] for x in doc["results"]] == [True, False, True]
    assert doc["results"][1]["error"]["code"] == "INSUFFICIENT_GPU_MEMORY"
    assert len(real.list(state="active")) == 2


def test_a_repeated_id_whose_allocation_has_ended_is_not_counted_as_placed(cli, real):
    x = real.allocate(REQ["resources"], allocation_id="s-0")
    real.release(x.allocation_id)
    res = cli("allocate-many", "-", input=json.dumps({**REQ, "allocation_id": "s-0"}))
    assert res.exit_code == 1, res.output
    assert "0 of 1 placed" in res.stdout and "released" in res.stdout


def test_a_json_array_after_a_byte_order_mark_is_read(cli, tmp_path):
    f = tmp_path / "sweep.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps([REQ]).encode())
    assert cli("allocate-many", str(f), "--json").exit_code == 0


def test_the_table_names_each_request_and_what_it_got(cli, tmp_path):
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps([REQ, {"resources": {"cpu_cores": 64}}]))
    res = cli("allocate-many", str(f))
    assert res.exit_code == 1
    assert "1 of 2 placed" in res.stdout and "h1 GPU0 (T4, 4 GiB) cores [0, 1]" in res.stdout
    assert "insufficient_cpu" in res.stdout


@pytest.mark.parametrize("text, field", [
    ('[{"resources": {"gpus": -1}}]', "requests.0.resources.gpus"),
    ('{"resources": {}}\nnot json\n', "file"),
    ('[{"resources": ', "file"),
])
def test_an_invalid_file_exits_2_and_places_nothing(cli, real, text, field):
    before = ledger_dump(real)
    res = cli("allocate-many", "-", "--json", input=text)
    assert res.exit_code == 2, res.output
    assert as_json(res)["error"]["field"] == field
    assert ledger_dump(real) == before


def test_a_missing_file_exits_2(cli, tmp_path):
    res = cli("allocate-many", str(tmp_path / "nope.json"))
    assert res.exit_code == 2 and "cannot read" in res.stderr


def test_a_chunk_size_out_of_range_exits_2_naming_the_option(cli):
    res = cli("allocate-many", "-", "--chunk-size", "0", input=json.dumps([REQ]))
    assert res.exit_code == 2 and "--chunk-size" in res.stderr


# -- allocator release ID ID ... ------------------------------------------------------------------

def test_several_ids_are_released_in_one_command_and_an_unknown_one_exits_1(cli, real):
    held = [real.allocate(REQ["resources"]).allocation_id for _ in range(2)]
    res = cli("release", held[0], "alloc-nope", held[1], "--json")
    assert res.exit_code == 1, res.output
    doc = as_json(res)
    assert (doc["released"], doc["not_found"]) == (2, 1)
    assert [x["ok"] for x in doc["results"]] == [True, False, True]
    assert doc["results"][1]["error"]["code"] == "ALLOCATION_NOT_FOUND"
    assert real.list(state="active") == []


def test_ids_on_stdin_are_released_and_a_repeat_is_harmless(cli, real):
    held = [real.allocate(REQ["resources"]).allocation_id for _ in range(2)]
    real.release(held[0])
    res = cli("release", "-", input=f"{held[0]}\n{held[1]} \n")
    assert res.exit_code == 0, res.output
    assert "1 of 2 released now" in res.stdout and "already released" in res.stdout


def test_a_malformed_id_among_several_releases_nothing_and_exits_2(cli, real):
    aid = real.allocate(REQ["resources"]).allocation_id
    before = ledger_dump(real)
    res = cli("release", aid, "", "--json")
    assert res.exit_code == 2, res.output
    assert as_json(res)["error"]["field"] == "allocation_ids.1"
    assert cli("release", aid, "-").exit_code == 2
    assert ledger_dump(real) == before


def test_one_id_keeps_the_single_release_output(cli, real):
    aid = real.allocate(REQ["resources"]).allocation_id
    doc = as_json(cli("release", aid, "--json"))
    assert doc["allocation_id"] == aid and doc["released_now"] is True


def test_a_queued_allocation_among_several_shows_as_withdrawn(cli, real):
    held = real.allocate({"gpus": 1}).allocation_id
    waiting = real.allocate({"gpus": 1}, on_busy="queue").allocation_id
    res = cli("release", waiting, held)
    assert res.exit_code == 0, res.output
    assert "withdrawn" in res.stdout and real.get(waiting).activated_at is None


def test_chunk_size_is_checked_with_one_id_too(cli, real):
    aid = real.allocate(REQ["resources"]).allocation_id
    res = cli("release", aid, "--chunk-size", "0")
    assert res.exit_code == 2 and "--chunk-size" in res.output
    assert real.get(aid).state == "active"


def test_only_spaces_and_new_lines_separate_ids_on_stdin(cli, real):
    held = [real.allocate(REQ["resources"]).allocation_id for _ in range(2)]
    res = cli("release", "-", "--json", input=f"{held[0]}\x1e{held[1]}")
    assert res.exit_code == 2, res.output
    assert as_json(res)["error"]["field"] == "allocation_ids.0"
    assert len(real.list(state="active")) == 2


def test_a_closed_stdin_is_invalid_input_not_a_traceback(monkeypatch):
    from allocator import cli_batch
    from allocator.errors import InvalidRequest

    monkeypatch.setattr(cli_batch.sys, "stdin", None)
    with pytest.raises(InvalidRequest) as exc:
        cli_batch.read_stdin("allocation_ids")
    assert exc.value.field == "allocation_ids"
