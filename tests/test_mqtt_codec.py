"""The gateway's MQTT 5 codec against byte layouts from the MQTT 5 specification."""

from __future__ import annotations

import pytest

from gateway.mqtt import codec


def test_varint_round_trip_and_spec_examples() -> None:
    # MQTT 5 section 1.5.5: boundaries of 1 to 4 byte encodings.
    cases = {0: b"\x00", 127: b"\x7f", 128: b"\x80\x01", 16383: b"\xff\x7f", 16384: b"\x80\x80\x01"}
    for n, enc in cases.items():
        assert codec.varint(n) == enc
        assert codec.read_varint(enc, 0) == (n, len(enc))
    assert codec.read_varint(b"\x80", 0) is None  # incomplete
    with pytest.raises(codec.ProtocolError):
        codec.read_varint(b"\xff\xff\xff\xff\x01", 0)


def test_connect_carries_session_expiry_receive_maximum_and_credentials() -> None:
    pkt = codec.connect("gw", 30, False, 3600, 500, "user", "pw")
    assert pkt[0] == 0x10
    length, start = codec.read_varint(pkt, 1) or (0, 0)
    body = pkt[start:]
    assert len(body) == length
    assert body[:7] == b"\x00\x04MQTT\x05"
    assert body[7] == 0x80 | 0x40  # username + password, no clean start
    assert body[8:10] == b"\x00\x1e"
    props_len = body[10]
    props = body[11 : 11 + props_len]
    assert b"\x11\x00\x00\x0e\x10" in props  # session expiry 3600
    assert b"\x21\x01\xf4" in props  # receive maximum 500
    assert body[11 + props_len :] == b"\x00\x02gw\x00\x04user\x00\x02pw"


def test_publish_round_trip_with_expiry_and_split_across_chunks() -> None:
    a = codec.publish("fleet/ZOE-001/commands", b'{"x":1}', 1, 7, expiry_s=10)
    b = codec.publish("fleet/ZOE-002/battery", b"{}", 0, 0)
    stream = bytearray(a + b)
    half = bytearray(stream[: len(a) - 3])
    packets, used = codec.split_packets(half)
    assert (packets, used) == ([], 0)  # an incomplete packet waits for more bytes
    packets, used = codec.split_packets(stream)
    assert used == len(stream)
    m1 = codec.parse_publish(*packets[0])
    m2 = codec.parse_publish(*packets[1])
    assert (m1.topic, m1.payload, m1.qos, m1.mid) == ("fleet/ZOE-001/commands", b'{"x":1}', 1, 7)
    assert (m2.topic, m2.payload, m2.qos, m2.mid) == ("fleet/ZOE-002/battery", b"{}", 0, 0)
    assert b"\x02\x00\x00\x00\x0a" in a  # message expiry property, 10 s


def test_subscribe_options_and_batched_pubacks() -> None:
    pkt = codec.subscribe(3, [("fleet/#", 1, True), ("$share/g/fleet/#", 1, False)])
    assert pkt[0] == 0x82
    assert pkt.endswith(b"\x00\x10$share/g/fleet/#\x11")  # QoS 1, retained only for a new subscription
    assert b"\x00\x07fleet/#\x15" in pkt  # QoS 1 + no local + retain handling 1
    assert codec.pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


# -- strict parsing: each case is something a sloppy receiver accepts and the specification forbids --


def _publish_body(topic: bytes, mid: int | None, props: bytes = b"\x00", payload: bytes = b"{}") -> bytes:
    return len(topic).to_bytes(2, "big") + topic + (b"" if mid is None else mid.to_bytes(2, "big")) + props + payload


@pytest.mark.parametrize(
    ("first", "body", "reason"),
    [
        pytest.param(0x32, _publish_body(b"fleet/a", 0), codec.PROTOCOL_ERROR, id="packet id 0 at QoS 1"),
        pytest.param(0x30, _publish_body(b"fleet/\xff", None), codec.MALFORMED, id="invalid UTF-8 topic"),
        pytest.param(0x30, _publish_body(b"fleet/\xed\xa0\x80", None), codec.MALFORMED, id="UTF-16 surrogate"),
        pytest.param(0x30, _publish_body(b"fleet/a\x00b", None), codec.MALFORMED, id="U+0000 in topic"),
        pytest.param(0x30, _publish_body(b"fleet/+", None), codec.MALFORMED, id="wildcard in topic"),
        pytest.param(0x30, _publish_body(b"", None), codec.PROTOCOL_ERROR, id="empty topic, no alias allowed"),
        pytest.param(
            0x30, _publish_body(b"fleet/a", None, b"\x03\x23\x00\x01"), codec.TOPIC_ALIAS_INVALID, id="topic alias"
        ),
        pytest.param(
            0x30,
            _publish_body(b"fleet/a", None, b"\x09\x02\x00\x00\x00\x0a", b""),
            codec.MALFORMED,
            id="property length past the packet",
        ),
        pytest.param(0x30, _publish_body(b"fleet/a", None, b"\x02\x11\x00"), codec.PROTOCOL_ERROR, id="CONNACK prop"),
        pytest.param(0x38, _publish_body(b"fleet/a", None), codec.MALFORMED, id="DUP at QoS 0"),
        pytest.param(0x36, _publish_body(b"fleet/a", 1), codec.MALFORMED, id="QoS 3"),
        pytest.param(0x32, b"\x00\x07fleet/a\x00", codec.MALFORMED, id="packet id cut short"),
        pytest.param(0x30, b"\x00\x09fleet/a", codec.MALFORMED, id="topic longer than the packet"),
    ],
)
def test_parse_publish_refuses_what_the_specification_forbids(first: int, body: bytes, reason: int) -> None:
    with pytest.raises(codec.ProtocolError) as e:
        codec.parse_publish(first, body)
    assert e.value.reason == reason


def test_parse_publish_keeps_properties_it_allows_apart_from_the_payload() -> None:
    props = b"\x02\x00\x00\x00\x0a" + b"\x26\x00\x01k\x00\x01v" + b"\x01\x01"  # expiry, user property, format
    body = _publish_body(b"fleet/a", 9, bytes([len(props)]) + props, b"payload")
    m = codec.parse_publish(0x33, body)
    assert (m.topic, m.payload, m.qos, m.mid, m.retain) == ("fleet/a", b"payload", 1, 9, True)


def test_variable_byte_integers_must_be_in_their_shortest_form() -> None:
    with pytest.raises(codec.ProtocolError):
        codec.read_varint(b"\x80\x00", 0)  # 0 in two bytes
    with pytest.raises(codec.ProtocolError):
        codec.read_varint(b"\xff\x80\x00", 0)  # 127 in three bytes
    assert codec.read_varint(b"\x80\x01", 0) == (128, 2)


def test_a_packet_declaring_more_than_our_maximum_is_refused_before_it_is_buffered() -> None:
    huge = bytearray(b"\x30\xff\xff\xff\x7f")  # 268,435,455 bytes declared, none of them sent
    with pytest.raises(codec.ProtocolError) as e:
        codec.split_packets(huge, 1 << 20)
    assert e.value.reason == codec.PACKET_TOO_LARGE
    exact = bytearray(codec.publish("t", b"x" * 90, 0, 0))
    assert codec.split_packets(exact, len(exact))[1] == len(exact)
    with pytest.raises(codec.ProtocolError):
        codec.split_packets(exact, len(exact) - 1)


def test_connack_properties_are_read_with_the_specifications_defaults() -> None:
    props = (
        b"\x11\x00\x00\x0e\x10"  # session expiry 3600
        b"\x21\x00\x0a"  # receive maximum 10
        b"\x27\x00\x00\x01\x00"  # maximum packet size 256
        b"\x13\x00\x04"  # server keep alive 4
        b"\x2a\x00"  # no shared subscriptions
        b"\x1f\x00\x02ok"  # reason string
    )
    c = codec.parse_connack(b"\x01\x00" + bytes([len(props)]) + props)
    assert c.session_present and c.reason == 0
    assert (c.session_expiry_s, c.receive_maximum, c.maximum_packet_size) == (3600, 10, 256)
    assert (c.server_keep_alive, c.shared_available, c.reason_string) == (4, False, "ok")
    bare = codec.parse_connack(b"\x00\x00\x00")
    assert not bare.session_present
    assert (bare.session_expiry_s, bare.receive_maximum, bare.maximum_packet_size) == (None, 65535, None)
    assert bare.server_keep_alive is None and bare.shared_available


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x00", id="too short"),
        pytest.param(b"\x02\x00\x00", id="reserved flag"),
        pytest.param(b"\x00\x00\x03\x21\x00\x00", id="receive maximum 0"),
        pytest.param(b"\x00\x00\x02\x24\x02", id="maximum QoS 2 stated"),
        pytest.param(b"\x00\x00\x06\x11\x00\x00\x00\x01\x11", id="property twice, truncated"),
        pytest.param(b"\x00\x00\x0a\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02", id="property twice"),
        pytest.param(b"\x00\x00\x02\x23\x00", id="topic alias in CONNACK"),
        pytest.param(b"\x00\x00\x00\x00", id="bytes after the properties"),
    ],
)
def test_malformed_connacks_are_refused(body: bytes) -> None:
    with pytest.raises(codec.ProtocolError):
        codec.parse_connack(body)


def test_suback_puback_and_disconnect() -> None:
    assert codec.parse_suback(b"\x00\x05\x00\x01\x87") == (5, b"\x01\x87")
    with pytest.raises(codec.ProtocolError):
        codec.parse_suback(b"\x00\x05\x00")  # no reason code
    assert codec.parse_puback(b"\x00\x07") == (7, 0)
    assert codec.parse_puback(b"\x00\x07\x97\x00") == (7, 0x97)
    with pytest.raises(codec.ProtocolError):
        codec.parse_puback(b"\x00\x00")
    assert codec.parse_disconnect(b"") == codec.Disconnect(0)
    d = codec.parse_disconnect(b"\x9c\x08\x1c\x00\x05other")
    assert (d.reason, d.server_reference) == (0x9C, "other")
    assert codec.disconnect(codec.PACKET_TOO_LARGE) == b"\xe0\x01\x95"
