"""Hypothesis strategies for hostile input: what JSON, a CLI or a careless caller can send.

Beyond hypothesis' usual text, numbers and nesting, the generators lean on what has broken
parsers before: lone UTF-16 surrogates (valid in JSON as "\\ud800", not valid Unicode), NUL,
Unicode digits ("٣", "²"), exponents ("1e400"), NaN and infinities, huge integers, unit
suffixes in every case, whitespace, and deeply nested arrays.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import strategies as st


def examples(n: int) -> int:
    """``n`` examples, scaled by ``ALLOCATOR_FUZZ_SCALE`` (e.g. 20 for a long run before a release)."""
    return max(1, int(n * float(os.environ.get("ALLOCATOR_FUZZ_SCALE") or 1)))


SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
ODD_TEXT = st.sampled_from(["", " ", "\x00", "a\x00b", "٣", "²", "½", "1e400", "-0", "NaN", "sNaN", "inf", "-inf",
                            "1_000", "0x10", "1,5", "１２", "\u202e", "\ufeff1", "🙂", "null", "true", "[]", "{}",
                            "__import__('os')", "os.system", "tests.jobs:add", "../../etc/passwd", "$(id)", "' OR 1=1 --"])
SIZE_TEXT = st.builds(
    lambda sign, num, frac, exp, space, unit: f"{sign}{num}{frac}{exp}{space}{unit}",
    st.sampled_from(["", "-", "+", " "]),
    st.sampled_from(["0", "1", "2", "16", "512", "4096", "99999999999999999999999", "0000001"]),
    st.sampled_from(["", ".5", ".0001", "."]),
    st.sampled_from(["", "e3", "e400", "E-3"]),
    st.sampled_from(["", " ", "\t"]),
    st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "K", "M", "G", "T", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "m",
                     "mi", "gi", "Pi", "B", "b", "GiBB", "m ", " Gi", "%"]),
)
TEXT = st.one_of(st.text(max_size=20), SURROGATES, ODD_TEXT, SIZE_TEXT)
NUMBERS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 0.5, 0.0001, 1e-300, 1e300, 2**53 + 1, 2**63, 10**400]))
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)


def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    return st.recursive(LEAVES, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                        max_leaves=max_leaves)


def deep(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


DEEP = st.sampled_from([deep(70), deep(300), {"a": deep(100)}])  # deeper: see test_deep_nesting_is_refused
VALUES = st.one_of(json_values(), DEEP)

RESOURCE_KEYS = ["gpus", "gpu_memory_mb", "gpu_model", "cpu_cores", "ram_mb"]
REQUEST_KEYS = ["priority", "strategy", "ttl_seconds", "expected_duration", "selector", "metadata", "task_id",
                "task_type", "owner", "allocation_id"]


@st.composite
def resources(draw: st.DrawFn) -> Any:
    """A resources mapping: mostly the real keys with odd values, sometimes junk."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    keys = draw(st.lists(st.sampled_from([*RESOURCE_KEYS, "workers", "cpu", "memory", "bogus"]), max_size=5, unique=True))
    out: dict[str, Any] = {}
    for k in keys:
        out[k] = draw(st.one_of(SIZE_TEXT, NUMBERS, TEXT, st.sampled_from([0, 1, 2, "1Gi", "0.5", "500m"]), VALUES))
    return out


@st.composite
def request_fields(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(REQUEST_KEYS), max_size=4, unique=True))
    good = {"priority": st.sampled_from(["low", "normal", "high", "critical", 0, 3, "2"]),
            "strategy": st.sampled_from(["first_fit", "best_fit", "worst_fit", "priority", "spread"]),
            "ttl_seconds": st.sampled_from([None, 1, 60, 3600.5]),
            "selector": st.sampled_from([{"cluster": "default"}, "cluster=default|x", {"zone": ["a", "b"]}])}
    out = {}
    for k in keys:
        out[k] = draw(st.one_of(good[k], VALUES)) if k in good else draw(VALUES)
    return out
