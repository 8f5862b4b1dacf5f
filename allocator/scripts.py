"""Loads the Lua scripts of ``allocator/lua`` and registers them once per Redis client.

Scripts may include shared helpers with a line ``--- @include "name"`` (file
``lua/includes/<name>.lua``), as BullMQ's scripts do; each include is inlined once, and only
with the definitions the script uses. Redis runs a script's whole text at every EVALSHA, so each
``local function`` of an include becomes a new closure on every call whether the call needs it or
not (about 0.3-0.5 µs each, bench/script_entry.py): a heartbeat that uses 4 of the library's 63
definitions should not pay for the other 59.
A script may also name, with ``--- @lazy name ...``, helpers it needs only on rare paths (the
scheduling pass when nothing waits, the reaper when nothing expired, a refusal): the definitions
that only those helpers need are then built inside one function on the first call of one of
them, and the rest of the script reaches them through stubs. A ``release`` that frees capacity
no one waits for then does not define the placement and queue code at all.
redis-py's ``Script`` objects run EVALSHA and reload the source on NOSCRIPT, so a Redis restart
or ``SCRIPT FLUSH`` is transparent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Callable
from functools import lru_cache
from typing import Any
from importlib import resources

import redis

_INCLUDE = re.compile(r'^---[ \t]*@include[ \t]+"([\w-]+)"[ \t]*$', re.MULTILINE)
# A top-level definition of an include: "local function name" or "local a, b = ...".
_DEFINITION = re.compile(r"^local[ \t]+(?:function[ \t]+([A-Za-z_]\w*)|([A-Za-z_][\w \t,]*?)[ \t]*=)")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_LAZY = re.compile(r"^---[ \t]*@lazy[ \t]+([A-Za-z_][\w \t]*?)[ \t]*$", re.MULTILINE)
# Lua tokens in which an identifier-like word is no reference (comments, long ones first, and
# string literals), and identifiers; whatever else the text holds is skipped.
_TOKENS = re.compile(
    r"--\[(?P<lc>=*)\[.*?\](?P=lc)\]"  # --[[ long comment ]], any level
    r"|--[^\n]*"  # line comment
    r"|\[(?P<ls>=*)\[.*?\](?P=ls)\]"  # [[ long string ]], any level
    r'|"(?:\\.|[^"\\\n])*"'  # "short string"
    r"|'(?:\\.|[^'\\\n])*'"  # 'short string'
    r"|(?<![^.]\.)(?<!:)(?P<id>[A-Za-z_]\w*)"  # an identifier, not a field after "." or ":"
    r"|[A-Za-z_]\w*",  # a field name (t.name, t:name): the table's key, no reference to a local
    re.DOTALL,
)
_LONG_BRACKET = re.compile(r"\[=*\[")
_END = re.compile(r"end\b")

SCRIPT_NAMES = (
    "register_host",
    "drain_host",
    "remove_host",
    "place",
    "place_many",
    "release",
    "release_many",
    "expire",
    "snapshot",
    "recount_names",
    "noop",
    "submit",
    "schedule",
    "cancel",
    "recovery",
    "restore_allocation",
    "trim_outbox",
    "heartbeat",
    "mark_lost",
    "grant_check",
    "claim_grant",  # workers: one run per placement
    "finish_job",  # workers: after the job, release (or requeue) and record its end in one call
    "place_on",  # allocator/api: commit a policy's choice
    "tally_outbox",  # allocator/api: outbox counts for /metrics
    "service_catalog",  # allocator/services: what a host's agent can run
    "service_state",  # allocator/agent/services: a named service started, failed, stopped
)


def _read(rel: str) -> str:
    return resources.files("allocator").joinpath("lua", rel).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Definition:
    """One top-level definition of an include, with the comment lines just above it."""

    names: tuple[str, ...]
    text: str


def definitions(text: str) -> list[Definition] | None:
    """The top-level definitions of an include's text, in order, or None when the text is not
    made of definitions only (a top-level statement, a long string): such an include is inlined
    whole, since leaving part of it out could change what runs."""
    lines = text.split("\n")
    starts: list[tuple[int, tuple[str, ...]]] = []
    in_comment = False
    for i, line in enumerate(lines):
        if in_comment:
            in_comment = "]]" not in line
            continue
        if line.startswith("--[["):
            in_comment = "]]" not in line
            continue
        if _LONG_BRACKET.search(line):
            return None
        m = _DEFINITION.match(line)
        if m:
            names = (m.group(1),) if m.group(1) else tuple(n.strip() for n in m.group(2).split(","))
            first = i
            while first > 0 and lines[first - 1].startswith("--") and not lines[first - 1].startswith("--[["):
                first -= 1
            starts.append((first, names))
        elif line and not line[0].isspace() and not line.startswith(("--", "}", ")")) and not _END.match(line):
            return None
    bounds = [s for s, _ in starts] + [len(lines)]
    return [Definition(names, "\n".join(lines[bounds[j]:bounds[j + 1]])) for j, (_, names) in enumerate(starts)]


def _reached(defs: list[Definition], text: str, names: Callable[[str], set[str]],
             stop: frozenset[str] = frozenset()) -> set[int]:
    """Indexes of the definitions ``text`` names (``names`` reads the names of a text), with those
    they name in turn; a name in ``stop`` is not followed."""
    by_name = {n: i for i, d in enumerate(defs) for n in d.names}
    reached: set[int] = set()
    todo = [by_name[n] for n in names(text) if n in by_name and n not in stop]
    while todo:
        i = todo.pop()
        if i not in reached:
            reached.add(i)
            todo.extend(by_name[n] for n in names(defs[i].text) if n in by_name and n not in stop)
    return reached


def _any_names(text: str) -> set[str]:
    return set(_IDENT.findall(text))


def used_definitions(defs: list[Definition], text: str) -> list[Definition]:
    """The definitions ``text`` names, with those they name in turn, in their order in ``defs``.
    A name is any identifier, in code, comments or strings alike: a stray mention keeps a
    definition that is not needed, never the other way round."""
    keep = _reached(defs, text, _any_names)
    return [d for i, d in enumerate(defs) if i in keep]


def code_names(text: str) -> set[str]:
    """The identifiers of Lua code, leaving out comments, string literals and field names after
    "." or ":" (``s.reserve`` reads a key of ``s``, not the helper ``reserve``; ``'a' ..x`` still
    names ``x``). A key in a table constructor (``{reserve = 1}``) still counts: a name too many
    keeps a definition eager, never the other way round."""
    return {m.group("id") for m in _TOKENS.finditer(text) if m.group("id")}


def lazy_definitions(defs: list[Definition], text: str, roots: set[str]) -> list[Definition]:
    """Of ``defs`` (those a script keeps), the ones the script's code ``text`` reaches only
    through the helpers ``roots``: every root, and what only roots (and those) name. Code here
    means comments and strings left out, so the split follows real references; each root must be
    a function of its own definition."""
    by_name = {n: i for i, d in enumerate(defs) for n in d.names}
    for root in roots:
        i = by_name.get(root)
        if i is None or defs[i].names != (root,) or f"local function {root}(" not in defs[i].text:
            raise ValueError(f"@lazy {root}: not a helper function this script keeps")
    eager = _reached(defs, text, code_names, frozenset(roots))
    return [d for i, d in enumerate(defs) if i not in eager]


def _lazy_group(texts: list[str], roots: list[str]) -> str:
    """The Lua of a lazy group: the definitions' texts inside one function, run on the first call
    of a root, and a stub per root (the roots are declared before the library, see ``source``).
    A definition in the group that names a root defined after it reaches that root's stub."""
    body = "\n".join(texts)
    exports = ", ".join(f"{r} = {r}" for r in roots)
    stubs = "\n".join(f"{r} = function(...) return __lazy().{r}(...) end" for r in roots)
    return (f"local __lazy_lib\nlocal function __lazy()\n  if __lazy_lib == nil then\n{body}\n"
            f"    __lazy_lib = {{{exports}}}\n  end\n  return __lazy_lib\nend\n{stubs}")


def _include_order(text: str, seen: set[str], out: list[str]) -> list[str]:
    """The includes ``text`` names, each once, an include's own includes before it."""
    for inc in _INCLUDE.findall(text):
        if inc not in seen:
            seen.add(inc)
            _include_order(_read(f"includes/{inc}.lua"), seen, out)
            out.append(inc)
    return out


#: Lua 5.1 (Redis) allows a function at most this many upvalues.
_MAX_UPVALUES = 60
_WRAP_OPEN = ("-- The library's functions and the script run inside one function (allocator/scripts.py):\n"
              "-- the values above are its upvalues.\nreturn (function(...)")
_WRAP_CLOSE = "\nend)(...)\n"


def _is_function(d: Definition) -> bool:
    return next(line for line in d.text.split("\n") if line.startswith("local")).startswith("local function")


def _wrappable(own: str, defs: list[Definition], roots: list[str], inner: str) -> bool:
    """Whether the script may run as its values, then one function holding its library's
    functions, its lazy group and its own code (``inner``, without the values). Redis runs the
    whole text at every call, and each ``local function`` is a closure made anew. A closure that
    uses a local of the chunk searches the chunk's open upvalues for it, a list that holds every
    local captured so far; an upvalue of the enclosing function it copies. With the library's
    keys and constants as upvalues of one function, place's entry costs about a quarter less
    (bench/script_entry.py --anatomy). Only when it changes nothing that runs: the include lines
    come before any code of the script, no value uses a function, no function names a value
    defined after it (that name would be a global where it stands), and the function takes at
    most the upvalues Lua allows."""
    lines = own.split("\n")
    marks = [i for i, line in enumerate(lines) if _INCLUDE.match(line)]
    between = lines[marks[0]:marks[-1]] if marks else []
    if any(line.strip() and not line.startswith("--") for line in between):
        return False
    funcs = {n for d in defs if _is_function(d) for n in d.names}
    values_after: set[str] = {n for d in defs if not _is_function(d) for n in d.names}
    for d in defs:
        if _is_function(d):
            if code_names(d.text) & values_after - set(d.names):
                return False
        else:
            values_after -= set(d.names)
            if code_names(d.text) & funcs:
                return False
    hoisted = set(roots) | {n for d in defs if not _is_function(d) for n in d.names}
    return len(hoisted & code_names(inner)) <= _MAX_UPVALUES


@lru_cache(maxsize=None)
def source(name: str, used_only: bool = True, wrap: bool = True) -> str:
    """The script ``name`` with its includes inlined, each once (an include's own includes before
    it), at the line that first names it. With ``used_only``, each include keeps only the
    definitions that the script's own text uses, directly or through other definitions; with
    ``wrap`` as well, the library's values come first and its functions and the script's own
    code run inside one function, where the script allows it (``_wrappable``)."""
    own = _read(f"{name}.lua")
    order = _include_order(own, set(), [])
    texts = {inc: _INCLUDE.sub("", _read(f"includes/{inc}.lua")) for inc in order}
    parsed = {inc: definitions(t) if used_only else None for inc, t in texts.items()}
    library = [d for inc in order for d in (parsed[inc] or [])]
    body = _LAZY.sub("", _INCLUDE.sub("", own))
    kept = used_definitions(library, body)
    roots = [r for line in _LAZY.findall(own) for r in line.split()] if used_only else []
    lazy = {id(d) for d in lazy_definitions(kept, body, set(roots))} if roots else set()
    eager = {id(d) for d in kept} - lazy
    includes = len(_INCLUDE.findall(own))
    group = _lazy_group([d.text for d in kept if id(d) in lazy], roots) if roots else ""
    ordered = [d for d in library if id(d) in eager]
    wrapped = (used_only and wrap and order != [] and all(parsed[inc] is not None for inc in order)
               and _wrappable(own, ordered, roots, "\n".join([d.text for d in ordered if _is_function(d)] + [group, body])))
    done: set[str] = set()
    seen = 0

    def inline(match: re.Match[str]) -> str:
        nonlocal seen
        seen += 1
        parts = [f"local {', '.join(roots)}"] if roots and seen == 1 else []
        if wrapped:
            if seen == 1:
                parts.append("\n".join(d.text for d in ordered if not _is_function(d)))
                parts.append(_WRAP_OPEN)
                parts.append("\n".join(d.text for d in ordered if _is_function(d)))
        else:
            for inc in _include_order(match.group(0), done, []):
                defs = parsed[inc]
                parts.append(texts[inc] if defs is None else "\n".join(d.text for d in defs if id(d) in eager))
        if roots and seen == includes:
            parts.append(group)
        return "\n".join(parts)

    built = _LAZY.sub("", _INCLUDE.sub(inline, own))
    return built + _WRAP_CLOSE if wrapped else built


class Scripts:
    """The registered scripts for one Redis client, by name."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:  # a redis.commands.core.Script
        script = self._scripts.get(name)
        if script is None:
            if name not in SCRIPT_NAMES:
                raise KeyError(f"unknown ledger script {name!r}")
            script = self._scripts[name] = self._client.register_script(source(name))
        return script
