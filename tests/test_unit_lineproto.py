"""Unit tests for gateway.ingest.lineproto: hand-written InfluxDB line protocol."""

from __future__ import annotations

import pytest

from gateway.ingest.lineproto import excerpt, field_value, fields, line, reading_line, tag
from gateway.ingest.telemetry import Reading

TS = 1795683600123


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ("a,b", r"a\,b"),
        ("a=b", r"a\=b"),
        ("a b", r"a\ b"),
        ("a, =b", r"a\,\ \=b"),
        ("line\nbreak\r", "linebreak"),  # newlines can never be part of a tag
        ("Renault Zoé", r"Renault\ Zoé"),
    ],
)
def test_tag_escaping(raw: str, escaped: str) -> None:
    assert tag(raw) == escaped


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (81.5, "81.5"),
        (0.0, "0.0"),
        (-40.0, "-40.0"),
        (212, "212i"),
        (0, "0i"),
        (-3, "-3i"),
        ("2.4.1", '"2.4.1"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("a\nb", r'"a\nb"'),
        ("comma, space=x", '"comma, space=x"'),  # only quotes and backslashes matter inside a string
        ("", '""'),
    ],
)
def test_field_values(value: object, text: str) -> None:
    assert field_value(value) == text


def test_bool_is_not_written_as_int() -> None:
    # bool is a subclass of int: it must be tested first
    assert field_value(True) != "1i"
    assert field_value(1) == "1i"


def test_float_round_trips_exactly() -> None:
    for v in (0.1, 48.4306, 18231.4, 1e-7, 123456789.123456):
        assert float(field_value(v)) == v


def test_fields_keys_are_escaped_and_ordered() -> None:
    assert fields({"a": 1.0, "b c": True, "d": "x"}) == r'a=1.0,b\ c=true,d="x"'


def test_line_shape() -> None:
    out = line("commands", {"vehicle_id": "ZOE-017", "action": "unlock", "result": "done"}, {"latency_ms": 12.5}, TS)
    assert out == b"commands,vehicle_id=ZOE-017,action=unlock,result=done latency_ms=12.5 1795683600123\n"


def test_line_escapes_tags_and_skips_empty_tag_values() -> None:
    out = line("rejected", {"reason": "bad json", "kind": "", "k=1": "a,b"}, {"excerpt": 'x "y"'}, TS)
    assert out == b'rejected,reason=bad\\ json,k\\=1=a\\,b excerpt="x \\"y\\"" 1795683600123\n'


def test_line_is_utf8_and_single_line() -> None:
    out = line("rejected", {"reason": "x\ny"}, {"topic": "fleet/É\n/battery"}, TS)
    assert out.decode("utf-8").count("\n") == 1
    assert out.endswith(b" 1795683600123\n")


def test_reading_line_battery() -> None:
    r = Reading("battery", "ZOE-017", TS, {"soc_pct": 81.5, "range_km": 212.0, "charging": False, "plugged": True})
    assert reading_line(r, "zoe") == (
        b"battery,model=zoe,vehicle_id=ZOE-017 soc_pct=81.5,range_km=212.0,charging=false,plugged=true 1795683600123\n"
    )


def test_reading_line_escapes_model() -> None:
    r = Reading("doors", "KANGOO-03", TS, {"locked": True})
    assert reading_line(r, "kangoo ze") == b"doors,model=kangoo\\ ze,vehicle_id=KANGOO-03 locked=true 1795683600123\n"


def test_reading_line_status_drops_firmware() -> None:
    r = Reading("status", "ZOE-017", TS, {"online": True, "firmware": "2.4.1"})
    out = reading_line(r, "zoe")
    assert out == b"status,model=zoe,vehicle_id=ZOE-017 online=true 1795683600123\n"
    assert b"firmware" not in out


def test_reading_line_nothing_stored_is_none() -> None:
    assert reading_line(Reading("status", "ZOE-017", TS, {"firmware": "2.4.1"}), "zoe") is None
    assert reading_line(Reading("battery", "ZOE-017", TS, {}), "zoe") is None


def test_reading_line_ignores_fields_outside_the_schema() -> None:
    r = Reading("location", "ZOE-017", TS, {"lat": 48.4, "lon": 0.09, "altitude": 200.0})
    assert reading_line(r, "zoe") == b"location,model=zoe,vehicle_id=ZOE-017 lat=48.4,lon=0.09 1795683600123\n"


def test_excerpt_short_payload_unchanged() -> None:
    assert excerpt(b'{"soc_pct": 1}') == '{"soc_pct": 1}'


def test_excerpt_is_at_most_200_chars() -> None:
    assert excerpt(b"x" * 1000) == "x" * 200
    assert len(excerpt("é".encode() * 1000)) <= 200


def test_excerpt_of_invalid_utf8_is_text() -> None:
    out = excerpt(b"\xff\xfe" * 500)
    assert len(out) <= 200
    assert set(out) == {"\ufffd"}
    out.encode("utf-8")  # always storable


def test_excerpt_cut_inside_a_multibyte_character() -> None:
    payload = b"a" * 199 + "€".encode()  # the euro sign straddles the 200-byte cut
    out = excerpt(payload)
    assert len(out) <= 200
    assert out.startswith("a" * 199)
    out.encode("utf-8")


def test_excerpt_custom_limit() -> None:
    assert excerpt(b"abcdef", limit=3) == "abc"


def test_distinct_times_never_repeat_per_key() -> None:
    from gateway.ingest.lineproto import DistinctTimes

    t = DistinctTimes()
    assert [t.next("a", 100), t.next("a", 100), t.next("a", 100), t.next("b", 100)] == [100, 101, 102, 100]
    assert t.next("a", 50) == 103  # a clock step back never reuses a time
    assert t.next("a", 500) == 500
