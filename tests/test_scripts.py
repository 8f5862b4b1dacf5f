"""The script loader: includes are inlined with only the definitions a script uses, so a call
pays to define only the helpers it may run (docs/architecture.md, "Scripts")."""

import re

import pytest
import redis

from allocator.scripts import (
    _INCLUDE,
    _WRAP_CLOSE,
    SCRIPT_NAMES,
    _read,
    _wrappable,
    code_names,
    definitions,
    lazy_definitions,
    source,
    used_definitions,
)

LIBRARY = """--[[ a tiny include ]]
local rcall = redis.call
local A, B = KEYS[1], KEYS[2]

-- the key of x
local function key(x) return A .. x end

local function read(x)
  return rcall('GET', key(x))
end

local function unused(x)
  return rcall('DEL', B .. x)
end
end_marker_is_not_a_definition = 1
"""


def test_an_include_splits_into_its_definitions_each_with_the_comment_above_it():
    defs = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", ""))
    assert [d.names for d in defs] == [("rcall",), ("A", "B"), ("key",), ("read",), ("unused",)]
    assert defs[2].text.startswith("-- the key of x\nlocal function key(x)")


def test_a_script_keeps_what_it_names_and_what_that_names_in_turn():
    defs = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", ""))
    kept = used_definitions(defs, "return read(ARGV[1])")
    assert [d.names for d in kept] == [("rcall",), ("A", "B"), ("key",), ("read",)]


def test_an_include_with_a_top_level_statement_is_not_split():
    assert definitions(LIBRARY) is None


def test_an_include_with_a_long_string_is_not_split():
    assert definitions("local s = [[\nlocal function fake() end\n]]\n") is None


def test_a_small_script_leaves_out_the_helpers_it_never_calls():
    heartbeat = source("heartbeat")
    assert "local function try_place" in source("place")
    assert "local function try_place" not in heartbeat
    assert heartbeat.count("local function ") < 10


def test_without_used_only_every_include_is_inlined_whole():
    assert "local function reindex_host" not in source("heartbeat")
    assert "local function reindex_host" in source("heartbeat", used_only=False)


def test_every_script_compiles_and_holds_every_helper_it_names(redis_url):
    r = redis.Redis.from_url(redis_url)
    for name in SCRIPT_NAMES:
        text = source(name)
        r.script_load(text)  # a syntax error would raise here
        named = set(re.findall(r"[A-Za-z_]\w*", text))
        missing = [n for inc in _INCLUDE.findall(_read(f"{name}.lua"))
                   for d in definitions(_read(f"includes/{inc}.lua"))
                   for n in d.names if n in named and d.text not in text]
        assert missing == [], name


def test_every_script_also_compiles_with_the_whole_library_inlined(redis_url):
    # bench/script_entry.py measures that text; Lua allows a chunk 200 locals, and the library's
    # top-level definitions count against it there.
    r = redis.Redis.from_url(redis_url)
    for name in SCRIPT_NAMES:
        for wrap in (True, False):
            r.script_load(source(name, used_only=False, wrap=wrap))


def test_names_in_comments_and_strings_are_no_references():
    text = """-- see unused(x)
local s = "key(x) -- not code" .. 'read(y)' .. [==[ unused ]==]
--[[ read ]] return rcall(s)"""
    assert code_names(text) == {"local", "s", "return", "rcall"}


def test_a_lazy_helper_takes_what_only_it_needs_and_leaves_what_the_script_uses():
    defs = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", ""))
    kept = used_definitions(defs, "if ARGV[2] then return read(ARGV[1]) end return key('x')")
    lazy = lazy_definitions(kept, "if ARGV[2] then return read(ARGV[1]) end return key('x')", {"read"})
    # key is used by the script itself, and A by key: both stay eager; read is lazy, and so is
    # rcall, which only read names.
    assert [d.names for d in lazy] == [("rcall",), ("read",)]


def test_a_lazy_name_must_be_a_helper_function_the_script_keeps():
    defs = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", ""))
    for bad in ("A", "nosuch"):
        with pytest.raises(ValueError, match=bad):
            lazy_definitions(defs, "return read(1)", {bad})


def test_release_defines_the_scheduling_pass_only_when_a_task_waits():
    text = source("release")
    group = text.index("local function __lazy()")
    assert text.index("local function run_pass(") > group  # built inside the group
    assert text.index("local function try_place(") > group
    assert text.index("local function schedule_pass(") < group  # its early exits stay eager
    assert text.index("local function reindex_host(") < group  # what every release runs
    assert "run_pass = function(...) return __lazy().run_pass(...) end" in text
    assert "@lazy" not in text
    assert "local function __lazy()" not in source("release", used_only=False)


def test_a_release_that_frees_capacity_for_a_waiting_task_places_it_through_the_lazy_pass(alloc):
    alloc.register_host(id="h1", cpu_cores=2, ram_mb="4Gi")
    first = alloc.allocate({"cpu_cores": 2})
    waiting = alloc.allocate({"cpu_cores": 2}, on_busy="queue")
    assert waiting.state == "pending"
    alloc.release(first.allocation_id)
    assert alloc.get(waiting.allocation_id).state == "active"


def test_a_field_name_is_no_reference_but_a_concatenated_name_is():
    text = "local x = s.reserve + t:grant(1) .. 'a' ..host_state(y); local w = {expected_ms = 1}"
    names = code_names(text)
    assert "reserve" not in names and "grant" not in names  # keys of s and t
    assert {"host_state", "expected_ms"} <= names  # a call after "..", and a constructor key (kept to be safe)


def _code(text: str) -> str:
    """Lua text with comments and string literals blanked out."""
    return re.sub(r"--\[(=*)\[.*?\]\1\]|--[^\n]*|\[(=*)\[.*?\]\2\]|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'",
                  " ", text, flags=re.DOTALL)


def test_no_local_parameter_or_table_key_is_named_like_a_helper_function():
    # The loader goes by names: a local, a parameter or a table key named like a helper counts as
    # a use of it, and keeps that helper (and what it calls) built eagerly on every call. A
    # parameter named scan once kept the whole placement scan eager in release and finish_job.
    texts = {inc: _read(f"includes/{inc}.lua") for inc in ("ledger", "placement", "queue", "fencing")}
    helpers = {n for t in texts.values() for d in definitions(_INCLUDE.sub("", t)) or []
               for n in d.names if f"local function {n}(" in d.text}
    clashes = set()
    for name in [*texts, *SCRIPT_NAMES]:
        code = _code(texts[name] if name in texts else _read(f"{name}.lua"))
        for m in re.finditer(r"\blocal\s+(?!function\b)([\w\s,]+?)\s*(?:=|\n|$)", code):
            clashes |= {v.strip() for v in m.group(1).split(",")} & helpers
        for m in re.finditer(r"\bfunction\b[\w.:\s]*\(([^)]*)\)", code):
            clashes |= {v.strip() for v in m.group(1).split(",")} & helpers
        for m in re.finditer(r"\bfor\s+([\w\s,]+?)\s+(?:=|in)\b", code):
            clashes |= {v.strip() for v in m.group(1).split(",")} & helpers
        clashes |= set(re.findall(r"[{,]\s*([A-Za-z_]\w*)\s*=(?!=)", code)) & helpers
    assert clashes == set()


def test_the_hot_scripts_run_their_library_inside_one_function_after_its_values():
    for name in ("place", "release", "finish_job", "schedule"):
        text = source(name)
        assert text.endswith(_WRAP_CLOSE), name
        assert text.index("local K_HOSTS") < text.index("return (function(...)") < text.index("local function now_ms(")
    assert not source("place", wrap=False).endswith(_WRAP_CLOSE)


def test_a_library_whose_values_need_its_functions_is_not_wrapped():
    own = '--- @include "tiny"\nreturn read(ARGV[1])'
    defs = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", ""))
    assert _wrappable(own, defs, [], "return read(ARGV[1])")
    uses_key = definitions(LIBRARY.replace("end_marker_is_not_a_definition = 1\n", "local C = key('c')\n"))
    assert not _wrappable(own, uses_key, [], "return read(ARGV[1])")  # C would run before key exists
    code_between = '--- @include "a"\nlocal x = 1\n--- @include "b"\nreturn x'
    assert not _wrappable(code_between, defs, [], "return x")
