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
