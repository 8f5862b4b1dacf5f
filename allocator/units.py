"""Parsing of memory sizes and CPU amounts as users write them.

Memory is kept in MiB (integers, rounded up so a request never gets less than it asked for).
A bare number is MiB. Binary suffixes Ki/Mi/Gi/Ti (optionally followed by "B") are powers of 1024;
decimal suffixes K/M/G/T (optionally "B") are powers of 1000 bytes, as in Kubernetes. A lower-case
"m" alone is refused: in Kubernetes quantities it means "milli", which makes no sense for memory.

CPU is kept in millicores. Numbers and numeric strings are cores ("2", "0.5"); "500m" is
millicores, as in Kubernetes. Text is plain ASCII decimal digits (no exponent, no "_", no other
script's digits). The smallest unit is one millicore.
"""

from __future__ import annotations

import math
import re
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal

from .errors import InvalidRequest

_MEM = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]*)\s*$")
#: CPU as text: ASCII decimal digits (a sign and a point allowed), then "m" for millicores.
_CPU = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(m?)\s*")
_MIB = 1024 * 1024
#: Largest memory amount accepted (1 EiB in MiB). The ledger's Lua scripts hold numbers as
#: doubles and print them with 14 significant digits, so every amount must stay far below 1e14.
MAX_MEMORY_MB = 1 << 40
#: Largest CPU amount accepted (about a million cores), for the same reason.
MAX_CPU_MILLIS = 1_000_000_000
_FACTORS_BYTES = {
    "": _MIB,
    "KI": 1024, "KIB": 1024, "MI": _MIB, "MIB": _MIB, "GI": 1024**3, "GIB": 1024**3,
    "TI": 1024**4, "TIB": 1024**4,
    "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
    "T": 1000**4, "TB": 1000**4,
}


#: Decimal arithmetic that never rounds (nor underflows to 0) what the parsers compute.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _show(value: object) -> str:
    """The value as messages quote it, cut short: error messages never echo kilobytes of input."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "...'"


def parse_memory_mb(value: object, field: str = "memory") -> int:
    """MiB in ``value`` (int/float MiB or a unit string), rounded up; errors name ``field``."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(field, f"expected a size such as 4096, '512Mi' or '4Gi', got {_show(value)}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(field, f"must be a finite number, got {_show(value)}")
        if value < 0:
            raise InvalidRequest(field, f"must not be negative, got {_show(value)}")
        return _bounded_mb(int(math.ceil(value)), value, field)
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a number or a string, got {type(value).__name__}")
    m = _MEM.match(value)
    if not m:
        raise InvalidRequest(field, f"cannot read {_show(value)} as a size; use e.g. 512Mi, 4Gi, 2G, 1.5GiB or a number of MiB")
    number, unit = m.group(1), m.group(2)
    if unit == "m":
        raise InvalidRequest(field, f"{_show(value)}: 'm' means milli; write Mi (MiB) or M (megabytes)")
    factor = _FACTORS_BYTES.get(unit.upper())
    if factor is None:
        raise InvalidRequest(field, f"unknown unit {unit!r} in {_show(value)}; use Ki, Mi, Gi, Ti, K, M, G or T")
    # Exact: the default context keeps 28 digits and would round 1.000000000000000000000000000001
    # MiB down to 1 (dividing by 2**20 always terminates, so the quotient is exact too).
    mib = _EXACT.divide(_EXACT.multiply(Decimal(number), factor), _MIB)
    return _bounded_mb(int(math.ceil(mib)), value, field)


def _bounded_mb(mb: int, value: object, field: str) -> int:
    if mb > MAX_MEMORY_MB:
        raise InvalidRequest(field, f"{_show(value)} is more than the largest size accepted ({MAX_MEMORY_MB} MiB)")
    return mb


def parse_cpu_millis(value: object, field: str = "cpu_cores") -> int:
    """Millicores in ``value`` (cores as number/string, or '500m'); errors name ``field``."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(field, f"expected a number of cores such as 2 or '0.5', got {_show(value)}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(field, f"must be a finite number, got {_show(value)}")
        cores = Decimal(str(value))
    elif isinstance(value, str):
        # Checked before Decimal, which also reads other scripts' digits ('٢', '２'), '_' between
        # digits and exponents ('1e3'), none of which the memory sizes take either.
        m = _CPU.fullmatch(value)
        if not m:
            raise InvalidRequest(field, f"cannot read {_show(value)} as CPU cores; write plain decimal digits, "
                                        "e.g. 2, '0.5' or '500m'")
        cores = Decimal(m.group(1))
        if m.group(2):
            cores = cores.scaleb(-3, _EXACT)
    else:
        raise InvalidRequest(field, f"expected a number or a string, got {type(value).__name__}")
    if cores < 0:
        raise InvalidRequest(field, f"must not be negative, got {_show(value)}")
    if cores > Decimal(MAX_CPU_MILLIS) / 1000:  # compared first: 1e999999 * 1000 would overflow
        raise InvalidRequest(field, f"{_show(value)} is more than the largest CPU amount accepted ({MAX_CPU_MILLIS // 1000} cores)")
    # Exact, whatever the digits: the default context would round
    # 0.0010000000000000000000000000001 cores to 1 millicore.
    millis = cores.scaleb(3, _EXACT)
    if millis != millis.to_integral_value(context=_EXACT):
        raise InvalidRequest(field, f"{_show(value)} is finer than one millicore (0.001 cores)")
    return int(millis)


def format_mb(mb: int) -> str:
    """Human form of a MiB amount, for messages and tables."""
    if mb >= 1024 and mb % 1024 == 0:
        return f"{mb // 1024}Gi"
    return f"{mb}Mi"


def duration_ms(seconds: float | None) -> int:
    """A run-time hint in whole milliseconds as the scripts take it (``expected_ms``), 0 for none.

    One conversion for a placement and for a record rebuilt from the history, so a restored
    allocation gets the same expected end as the placement gave it."""
    return int(seconds * 1000) if seconds and seconds > 0 else 0
