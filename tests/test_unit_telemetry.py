"""Unit tests for gateway.ingest.telemetry: topic parsing, payload decoding and validation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import PayloadError
from gateway.ingest.telemetry import (
    ACK,
    SPECS,
    STORED,
    Limits,
    Reading,
    Topic,
    check_vehicle_id,
    decode_object,
    parse_topic,
    parse_ts,
    validate,
)

LIMITS = Limits()
# 2026-11-26T09:00:00.123Z, the contract's example instant.
EXAMPLE_MS = 1795683600123
NOW = EXAMPLE_MS + 10_000  # the gateway's clock: 10 s after the example readings
VID = "ZOE-017"
MINUTE = 60_000
DAY = 86_400_000


def check(kind: str, payload: bytes | str | dict[str, Any], vehicle_id: str = VID, now: int = NOW) -> Reading:
    """decode + validate, the way ingest does it."""
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return validate(kind, vehicle_id, decode_object(payload, LIMITS), now, LIMITS)


def reason_of(kind: str, payload: bytes | str | dict[str, Any], now: int = NOW) -> str:
    with pytest.raises(PayloadError) as ei:
        check(kind, payload, now=now)
    return ei.value.reason


# --- topics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("fleet/ZOE-017/battery", "fleet", Topic("ZOE-017", "battery")),
        ("fleet/ZOE-017/location", "fleet", Topic("ZOE-017", "location")),
        ("fleet/KANGOO-03/doors", "fleet", Topic("KANGOO-03", "doors")),
        ("fleet/ZOE-017/status", "fleet", Topic("ZOE-017", "status")),
        ("fleet/ZOE-017/commands/ack", "fleet", Topic("ZOE-017", ACK)),
        # our own command topic (we may see it echoed back when subscribed with a wildcard)
        ("fleet/ZOE-017/commands", "fleet", Topic("ZOE-017", "commands")),
        # an unknown leaf keeps its name; deeper paths are "unknown"
        ("fleet/ZOE-017/tyres", "fleet", Topic("ZOE-017", "tyres")),
        ("fleet/ZOE-017/battery/extra", "fleet", Topic("ZOE-017", "unknown")),
        ("fleet/ZOE-017/commands/nack", "fleet", Topic("ZOE-017", "unknown")),
        ("fleet/ZOE-017/commands/ack/x", "fleet", Topic("ZOE-017", "unknown")),
        ("fleet/ZOE-017", "fleet", Topic("ZOE-017", "unknown")),
        # multi-level prefixes
        ("t1/fleet/ZOE-017/battery", "t1/fleet", Topic("ZOE-017", "battery")),
        ("t1/fleet/ZOE-017/commands/ack", "t1/fleet", Topic("ZOE-017", ACK)),
    ],
)
def test_parse_topic_forms(topic: str, prefix: str, expected: Topic) -> None:
    assert parse_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    ("topic", "prefix"),
    [
        ("other/ZOE-017/battery", "fleet"),
        ("fleets/ZOE-017/battery", "fleet"),  # a prefix is a whole topic level, not a string prefix
        ("fleet", "fleet"),
        ("xfleet/ZOE-017/battery", "fleet"),
        ("fleet/ZOE-017/battery", "t1/fleet"),
        ("$SYS/broker/uptime", "fleet"),
    ],
)
def test_parse_topic_other_prefixes_are_none(topic: str, prefix: str) -> None:
    assert parse_topic(topic, prefix) is None


@pytest.mark.parametrize("vid", ["ZOE-017", "KANGOO-03", "A1", "9" * 32, "SIM-00030"])
def test_check_vehicle_id_accepts(vid: str) -> None:
    check_vehicle_id(vid)  # raises PayloadError if refused


@pytest.mark.parametrize("vid", ["", "Z", "zoe-017", "-ZOE", "ZOE_017", "ZOE 017", "A" * 33, "ÉZOE", "\nZOE"])
def test_check_vehicle_id_rejects(vid: str) -> None:
    with pytest.raises(PayloadError) as ei:
        check_vehicle_id(vid)
    assert ei.value.reason == "bad_vehicle_id"


def test_check_vehicle_id_rejects_trailing_newline() -> None:
    with pytest.raises(PayloadError) as ei:
        check_vehicle_id("ZOE-017\n")
    assert ei.value.reason == "bad_vehicle_id"


# --- contract examples ----------------------------------------------------------------------------


def test_contract_battery_example() -> None:
    r = check(
        "battery",
        '{"ts": "2026-11-26T09:00:00.123Z", "soc_pct": 81.5, "range_km": 212, "charging": false, "plugged": true}',
    )
    assert r == Reading(
        "battery", VID, EXAMPLE_MS, {"soc_pct": 81.5, "range_km": 212.0, "charging": False, "plugged": True}
    )
    assert type(r.fields["range_km"]) is float


def test_contract_location_example() -> None:
    r = check(
        "location",
        '{"ts": 1795683600123, "lat": 48.4306, "lon": 0.0931, "speed_kmh": 0, "heading_deg": 0, '
        '"odometer_km": 18231.4}',
    )
    assert r.ts_ms == EXAMPLE_MS
    assert r.kind == "location" and r.vehicle_id == VID
    assert r.fields == {"lat": 48.4306, "lon": 0.0931, "speed_kmh": 0.0, "heading_deg": 0.0, "odometer_km": 18231.4}
    # ints are stored as floats, so `0` then `0.5` never conflicts in InfluxDB
    assert all(type(v) is float for v in r.fields.values())


def test_contract_doors_example() -> None:
    r = check("doors", '{"ts": "2026-11-26T09:00:01Z", "locked": true, "closed": true}')
    assert r.ts_ms == 1795683601000
    assert r.fields == {"locked": True, "closed": True}


def test_status_with_firmware_and_will_message() -> None:
    r = check("status", {"online": True, "firmware": "2.4.1", "ts": EXAMPLE_MS})
    assert r.fields == {"online": True, "firmware": "2.4.1"}
    # the MQTT will: no ts at all
    will = check("status", b'{"online": false}')
    assert will.fields == {"online": False}
    assert will.ts_ms == NOW


def test_rfc3339_with_offset_is_converted_to_utc() -> None:
    r = check("doors", {"ts": "2026-11-26T10:00:00.123+01:00", "locked": False})
    assert r.ts_ms == EXAMPLE_MS


def test_missing_or_null_ts_means_now() -> None:
    assert check("battery", {"soc_pct": 50}).ts_ms == NOW
    assert check("battery", {"soc_pct": 50, "ts": None}).ts_ms == NOW


def test_unknown_extra_fields_are_ignored() -> None:
    r = check("battery", {"soc_pct": 50, "ts": EXAMPLE_MS, "tyre_bar": [2.1, 2.2], "note": {"x": 1}, "vin": "VF1"})
    assert r.fields == {"soc_pct": 50.0}


def test_matching_vehicle_id_in_payload_is_accepted() -> None:
    r = check("battery", {"soc_pct": 50, "vehicle_id": VID})
    assert r.vehicle_id == VID
    assert "vehicle_id" not in r.fields


def test_only_present_optional_fields_are_kept() -> None:
    r = check("location", {"lat": 1, "lon": 2, "speed_kmh": None})
    assert r.fields == {"lat": 1.0, "lon": 2.0}


def test_a_nul_in_a_string_field_is_dropped_so_every_store_takes_the_state() -> None:
    r = check("status", {"online": True, "firmware": "2.4\u00001", "ts": EXAMPLE_MS})
    assert r.fields == {"online": True, "firmware": "2.41"}


def test_stored_fields_exclude_firmware() -> None:
    assert "firmware" not in STORED["status"]
    assert STORED["battery"] == {"soc_pct", "range_km", "charging", "plugged", "temp_c"}


# --- decoding rejections --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload", [b"", b"{", b"{'soc_pct': 1}", b'{"soc_pct": 1,}', b"soc_pct=1", b"NaN", b'{"a": 1e400}']
)
def test_bad_json(payload: bytes) -> None:
    assert reason_of("battery", payload) == "bad_json"


@pytest.mark.parametrize("payload", [b'{"soc_pct": 50, "x": "\xff"}', b"\xfe\xff{}", '{"a": "é"}'.encode("latin-1")])
def test_bad_encoding(payload: bytes) -> None:
    assert reason_of("battery", payload) == "bad_encoding"


@pytest.mark.parametrize("payload", [b"[]", b'[{"soc_pct": 1}]', b"1", b'"x"', b"null", b"true"])
def test_not_object(payload: bytes) -> None:
    assert reason_of("battery", payload) == "not_object"


def test_oversized_boundary() -> None:
    base = b'{"soc_pct": 50, "pad": "'
    exact = base + b"x" * (16 * 1024 - len(base) - 2) + b'"}'
    assert len(exact) == 16 * 1024
    assert check("battery", exact).fields == {"soc_pct": 50.0}
    over = base + b"x" * (16 * 1024 - len(base) - 1) + b'"}'
    assert len(over) == 16 * 1024 + 1
    assert reason_of("battery", over) == "oversized"


def test_oversized_is_checked_before_decoding() -> None:
    # invalid JSON and invalid UTF-8 too, but the size is what is reported
    assert reason_of("battery", b"\xff" * (16 * 1024 + 1)) == "oversized"


def test_limits_are_configurable() -> None:
    small = Limits(max_payload_bytes=64)
    with pytest.raises(PayloadError) as ei:
        decode_object(b'{"soc_pct": 50, "pad": "' + b"x" * 60 + b'"}', small)
    assert ei.value.reason == "oversized"


# --- field rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        ("battery", {"range_km": 1}),
        ("battery", {"soc_pct": None}),
        ("location", {"lat": 1}),
        ("location", {"lon": 1}),
        ("doors", {"closed": True}),
        ("status", {"firmware": "1.0"}),
        ("status", {}),
    ],
)
def test_missing_field(kind: str, doc: dict[str, Any]) -> None:
    assert reason_of(kind, doc) == "missing_field"


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        ("battery", {"soc_pct": True}),  # bool where a number is expected
        ("battery", {"soc_pct": False}),
        ("battery", {"soc_pct": "81.5"}),  # number as string
        ("battery", {"soc_pct": [81]}),
        ("battery", {"soc_pct": {"v": 81}}),
        ("battery", {"soc_pct": 50, "range_km": "212"}),
        ("battery", {"soc_pct": 50, "charging": "false"}),  # string where a bool is expected
        ("battery", {"soc_pct": 50, "plugged": 1}),  # number where a bool is expected
        ("battery", {"soc_pct": 50, "temp_c": True}),
        ("location", {"lat": "48.4", "lon": 0.09}),
        ("location", {"lat": 48.4, "lon": 0.09, "odometer_km": "1"}),
        ("doors", {"locked": "true"}),
        ("doors", {"locked": 1}),
        ("doors", {"locked": True, "closed": 0}),
        ("status", {"online": "yes"}),
        ("status", {"online": True, "firmware": 2}),
        ("status", {"online": True, "firmware": True}),
    ],
)
def test_bad_type(kind: str, doc: dict[str, Any]) -> None:
    assert reason_of(kind, doc) == "bad_type"


BOUNDS = [
    # kind, field, low, high, required-companions
    ("battery", "soc_pct", 0, 100, {}),
    ("battery", "range_km", 0, None, {"soc_pct": 50}),
    ("battery", "temp_c", -40, 85, {"soc_pct": 50}),
    ("location", "lat", -90, 90, {"lon": 0}),
    ("location", "lon", -180, 180, {"lat": 0}),
    ("location", "speed_kmh", 0, 250, {"lat": 0, "lon": 0}),
    ("location", "heading_deg", 0, 360, {"lat": 0, "lon": 0}),
    ("location", "odometer_km", 0, None, {"lat": 0, "lon": 0}),
]


@pytest.mark.parametrize(("kind", "name", "low", "high", "base"), BOUNDS)
def test_bounds_inclusive_and_out_of_range(
    kind: str, name: str, low: float, high: float | None, base: dict[str, Any]
) -> None:
    assert check(kind, {**base, name: low}).fields[name] == low
    assert reason_of(kind, {**base, name: low - 0.001}) == "out_of_range"
    assert reason_of(kind, {**base, name: low - 1}) == "out_of_range"
    if high is None:
        assert check(kind, {**base, name: 1e12}).fields[name] == 1e12
    else:
        assert check(kind, {**base, name: high}).fields[name] == high
        assert reason_of(kind, {**base, name: high + 0.001}) == "out_of_range"
        assert reason_of(kind, {**base, name: high + 1}) == "out_of_range"


def test_nan_and_infinity_never_pass() -> None:
    # not expressible in JSON (orjson refuses them), and refused if they ever reach validate
    assert reason_of("battery", b'{"soc_pct": NaN}') == "bad_json"
    assert reason_of("battery", b'{"soc_pct": Infinity}') == "bad_json"
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(PayloadError) as ei:
            validate("battery", VID, {"soc_pct": 50, "range_km": bad}, NOW, LIMITS)
        assert ei.value.reason == "out_of_range"


def test_long_firmware_is_cut_not_rejected() -> None:
    # The contract sets no limit; rejecting would lose the message's `online`.
    r = check("status", {"online": True, "firmware": "x" * 500})
    assert r.fields == {"online": True, "firmware": "x" * 64}


def test_a_two_level_ack_topic_is_not_an_ack() -> None:
    assert parse_topic("fleet/ZOE-017/ack", "fleet") == Topic("ZOE-017", "unknown")


@pytest.mark.parametrize(
    "ts",
    ["2026-W48-4T09:00Z", "20261126T090000Z", "09:00Z", "2026-11-26T09:00:00", "2026-11-26 09:00:00Z",
     "2026-11-26T09:00:00,5Z", "2026-11-26T09:00:00+05", "2026-11-26"],
)  # fmt: skip
def test_only_rfc3339_date_times_are_timestamps(ts: str) -> None:
    assert reason_of("doors", {"locked": True, "ts": ts}) == "bad_timestamp"


def test_rfc3339_forms_and_the_leap_second() -> None:
    assert check("doors", {"locked": True, "ts": "2026-11-26t09:00:00.123z"}).ts_ms == 1795683600123
    assert check("doors", {"locked": True, "ts": "2026-11-26T10:00:00.123+01:00"}).ts_ms == 1795683600123
    assert check("doors", {"locked": True, "ts": "2026-11-26T08:59:60Z"}).ts_ms == 1795683599999


@pytest.mark.parametrize("claimed", ["ZOE-018", "zoe-017", "", 17, ["ZOE-017"]])
def test_vehicle_mismatch(claimed: Any) -> None:
    assert reason_of("battery", {"soc_pct": 50, "vehicle_id": claimed}) == "vehicle_mismatch"


# --- timestamps -----------------------------------------------------------------------------------


def test_clock_skew_boundary() -> None:
    assert check("battery", {"soc_pct": 1, "ts": NOW + 5 * MINUTE}).ts_ms == NOW + 5 * MINUTE
    assert reason_of("battery", {"soc_pct": 1, "ts": NOW + 5 * MINUTE + 1}) == "clock_skew"
    assert reason_of("battery", {"soc_pct": 1, "ts": "2027-01-01T00:00:00Z"}) == "clock_skew"


def test_too_old_boundary_default_seven_days() -> None:
    assert check("battery", {"soc_pct": 1, "ts": NOW - 7 * DAY}).ts_ms == NOW - 7 * DAY
    # buffered replay a few days old is fine
    assert check("battery", {"soc_pct": 1, "ts": "2026-11-22T09:00:00Z"}).ts_ms == EXAMPLE_MS - 123 - 4 * DAY
    assert reason_of("battery", {"soc_pct": 1, "ts": NOW - 7 * DAY - 1}) == "too_old"
    assert reason_of("battery", {"soc_pct": 1, "ts": 0}) == "too_old"


def test_max_age_and_future_are_configurable() -> None:
    limits = Limits(max_age_ms=1000, max_future_ms=0)
    assert parse_ts(NOW - 1000, NOW, limits) == NOW - 1000
    with pytest.raises(PayloadError, match="too_old"):
        parse_ts(NOW - 1001, NOW, limits)
    with pytest.raises(PayloadError, match="clock_skew"):
        parse_ts(NOW + 1, NOW, limits)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-26T09:00:00",  # no offset
        "2026-11-26T09:00:00.123",  # no offset
        "2026-11-26",  # a date only
        "09:00:00Z",
        "garbage",
        "",
        "1795683600123",  # integer milliseconds as a string
        True,
        False,
        1795683600123.0,  # float milliseconds
        [1795683600123],
        {"ms": 1795683600123},
    ],
)
def test_bad_timestamp(ts: Any) -> None:
    assert reason_of("doors", {"locked": True, "ts": ts}) == "bad_timestamp"


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-26T09:00:00.123Z", EXAMPLE_MS),
        ("2026-11-26t09:00:00.123Z", EXAMPLE_MS),
        ("2026-11-26T09:00:00.123+00:00", EXAMPLE_MS),
        ("2026-11-26T04:30:00.123-04:30", EXAMPLE_MS),
        ("2026-11-26T09:00:00Z", EXAMPLE_MS - 123),
        ("2026-11-26T09:00:00.001Z", EXAMPLE_MS - 122),
        ("2026-11-26T09:00:00.999Z", EXAMPLE_MS + 876),
        (EXAMPLE_MS, EXAMPLE_MS),
    ],
)
def test_timestamp_forms(ts: Any, expected: int) -> None:
    assert parse_ts(ts, NOW, LIMITS) == expected


def test_lowercase_z_is_rfc3339() -> None:
    assert parse_ts("2026-11-26T09:00:00.123z", NOW, LIMITS) == EXAMPLE_MS


def test_every_millisecond_survives_rfc3339_parsing() -> None:
    # int(float seconds * 1000) could truncate x.999999 to the ms below
    for ms in range(1000):
        assert parse_ts(f"2026-11-26T09:00:00.{ms:03d}Z", NOW, LIMITS) == EXAMPLE_MS - 123 + ms


def test_timestamp_is_checked_after_fields() -> None:
    # a bad field is reported as such even when the timestamp is also bad
    assert reason_of("battery", {"soc_pct": 101, "ts": "garbage"}) == "out_of_range"


# --- property -------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = [name for spec in SPECS.values() for name, *_ in spec]
interesting_keys = st.sampled_from([*FIELD_NAMES, "ts", "vehicle_id"])
interesting_values = (
    json_values
    | st.integers(min_value=NOW - 8 * DAY, max_value=NOW + 10 * MINUTE)
    | st.sampled_from([VID, "2026-11-26T09:00:00.123Z", "2026-11-26T09:00:00", "0001-01-01T00:00:00+23:59"])
    | st.floats(min_value=-200, max_value=400)
)
json_objects = st.dictionaries(interesting_keys | st.text(max_size=8), interesting_values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_objects, kind=st.sampled_from(["battery", "location", "doors", "status"]))
def test_any_json_object_validates_or_raises_payload_error(doc: dict[str, Any], kind: str) -> None:
    payload = json.dumps(doc).encode()
    try:
        r = validate(kind, VID, decode_object(payload, LIMITS), NOW, LIMITS)
    except PayloadError as e:
        assert e.reason in {
            "bad_json",
            "oversized",
            "missing_field",
            "bad_type",
            "out_of_range",
            "vehicle_mismatch",
            "clock_skew",
            "too_old",
            "bad_timestamp",
        }
    else:
        assert r.kind == kind and r.vehicle_id == VID
        assert NOW - LIMITS.max_age_ms <= r.ts_ms <= NOW + LIMITS.max_future_ms
        assert set(r.fields) <= {name for name in doc}
