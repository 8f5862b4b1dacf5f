"""Memory and CPU amounts as users write them."""

import pytest

from allocator import InvalidRequest
from allocator.units import duration_ms, parse_cpu_millis, parse_memory_mb


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        (2048, 2048),
        (0, 0),
        (1.5, 2),  # rounded up: never grant less than asked
        ("512Mi", 512),
        ("512MiB", 512),
        ("4Gi", 4096),
        ("1.5GiB", 1536),
        ("1Ti", 1024 * 1024),
        ("2G", 1908),  # 2e9 bytes = 1907.35 MiB, rounded up
        ("2GB", 1908),
        ("1000M", 954),  # 1e9 bytes
        ("1024Ki", 1),
        (" 8 Gi ", 8192),
        ("300", 300),
        ("1.000000000000000000000000000001", 2),  # 31 digits: still rounded up, not down to 1
    ],
)
def test_memory_sizes_parse_to_mib(text, mib):
    assert parse_memory_mb(text) == mib


@pytest.mark.parametrize(
    ("value", "reason_part"),
    [
        ("-1Gi", "cannot read"),
        (-5, "negative"),
        ("4Xi", "unknown unit"),
        ("512m", "milli"),
        ("lots", "cannot read"),
        ("", "cannot read"),
        (None, "expected a size"),
        (True, "expected a size"),
        (float("nan"), "finite"),
        ([1], "expected a number or a string"),
    ],
)
def test_bad_memory_sizes_name_the_field_and_reason(value, reason_part):
    with pytest.raises(InvalidRequest) as exc:
        parse_memory_mb(value, "ram_mb")
    assert exc.value.field == "ram_mb"
    assert reason_part in exc.value.reason


@pytest.mark.parametrize(
    ("value", "millis"),
    [(2, 2000), (0.5, 500), ("0.5", 500), ("2.5", 2500), ("500m", 500), ("1", 1000), (0, 0), ("0.001", 1)],
)
def test_cpu_amounts_parse_to_millicores(value, millis):
    assert parse_cpu_millis(value) == millis


@pytest.mark.parametrize(
    ("value", "reason_part"),
    [
        ("-1", "negative"),
        (-0.5, "negative"),
        ("0.0005", "millicore"),
        ("0.0010000000000000000000000000001", "millicore"),  # past 28 digits: not rounded to 1
        ("1.5m", "millicore"),
        ("two", "cannot read"),
        ("inf", "cannot read"),
        (None, "expected a number of cores"),
        ({"n": 1}, "expected a number or a string"),
    ],
)
def test_bad_cpu_amounts_name_the_field_and_reason(value, reason_part):
    with pytest.raises(InvalidRequest) as exc:
        parse_cpu_millis(value, "cpu_cores")
    assert exc.value.field == "cpu_cores"
    assert reason_part in exc.value.reason


@pytest.mark.parametrize("value", [
    "\u0662",  # Arabic-Indic 2
    "\uff12",  # fullwidth 2
    "\U0001d7d0",  # mathematical bold 2
    "\u0661\u0660\u0660m",  # Arabic-Indic 100, millicores
    "0.\u0665",  # an ASCII point between other digits
    "1_000",
    "1_0m",
    "1e3",
    "1E3",
    "5e2m",
    "1e-3",
    "1e-2000000000",
])
def test_cpu_amounts_other_than_plain_ascii_decimal_text_are_refused(value):
    with pytest.raises(InvalidRequest) as exc:
        parse_cpu_millis(value, "cpu_cores")
    assert exc.value.field == "cpu_cores" and "plain decimal" in exc.value.reason


@pytest.mark.parametrize(("value", "millis"), [(" 2 ", 2000), ("500 m", 500), (".5", 500), ("2.", 2000), ("+1", 1000)])
def test_plain_decimal_cpu_text_keeps_its_other_forms(value, millis):
    assert parse_cpu_millis(value) == millis


@pytest.mark.parametrize(("seconds", "ms"), [(1.5, 1500), (3600, 3_600_000), (0.0004, 0), (None, 0), (0, 0), (-2, 0)])
def test_a_run_time_hint_becomes_whole_milliseconds_and_none_or_nonpositive_means_no_hint(seconds, ms):
    assert duration_ms(seconds) == ms
