"""The gateway's MQTT connection fed bytes directly: what it does with each kind of packet.

A transport that records what is written stands in for the socket, so any
byte sequence can be played, including the malformed ones no real broker
sends. What the link does against real brokers is in test_mqtt_*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import BrokerUnavailable
from gateway.metrics import health
from gateway.mqtt import codec, reasons
from gateway.mqtt.link import MAX_INCOMING_PACKET, MqttLink, _Protocol
from gateway.settings import MqttSettings
from tests.test_unit_metrics import make_journal, snap


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _link(**over: Any) -> tuple[MqttLink, list[codec.Message]]:
    got: list[codec.Message] = []
    link = MqttLink(MqttSettings(client_id="t", **over), lambda m, _t: got.append(m), ["fleet/#"])
    return link, got


def _connected(link: MqttLink, connack_props: bytes = b"", flags: int = 0) -> tuple[_Protocol, RecordingTransport]:
    proto = _Protocol(link)
    transport = RecordingTransport()
    proto.connection_made(transport)
    proto.data_received(bytes([0x20, 3 + len(connack_props), flags, 0, len(connack_props)]) + connack_props)
    assert link.connected and not transport.closed
    return proto, transport


def _publish(topic: str, mid: int, payload: bytes = b"{}") -> bytes:
    return codec.publish(topic, payload, 1, mid)


async def test_a_packet_above_our_maximum_is_answered_with_disconnect_0x95() -> None:
    link, _got = _link()
    proto, transport = _connected(link)
    transport.written.clear()
    proto.data_received(b"\x30\xff\xff\xff\x7f")  # declares 268,435,455 bytes
    assert transport.written == b"\xe0\x01\x95" and transport.closed
    assert not proto.buf and link.stats.protocol_errors == 1
    proto.connection_lost(None)
    assert link.stats.disconnects == {"refused_by_us": 1}


async def test_a_topic_alias_we_never_allowed_is_answered_with_0x94() -> None:
    link, got = _link()
    proto, transport = _connected(link)
    transport.written.clear()
    alias = codec.PUBLISH.to_bytes(1, "big")
    body = b"\x00\x07fleet/a" + b"\x03\x23\x00\x01" + b"{}"
    proto.data_received(alias + bytes([len(body)]) + body)
    assert transport.written == b"\xe0\x01\x94" and transport.closed and not got


async def test_messages_before_a_malformed_packet_in_the_same_chunk_are_delivered() -> None:
    link, got = _link()
    proto, transport = _connected(link)
    proto.data_received(_publish("fleet/a/battery", 1) + b"\x40\x02\x00\x00")  # then PUBACK with packet id 0
    assert [m.topic for m in got] == ["fleet/a/battery"]
    assert transport.written.endswith(b"\xe0\x01\x82") and transport.closed


async def test_server_keep_alive_replaces_ours() -> None:
    link, _ = _link(keepalive_s=120)
    proto, _ = _connected(link, b"\x13\x00\x04")
    assert proto.keepalive == 4


async def test_a_command_larger_than_the_brokers_maximum_fails_alone() -> None:
    link, _ = _link()
    _proto, transport = _connected(link, b"\x27" + struct.pack("!I", 256))
    with pytest.raises(BrokerUnavailable, match="up to 256 bytes"):
        link.publish("fleet/a/commands", b"x" * 400)
    link.publish("fleet/a/commands", b"x" * 100)
    assert link.connected and not transport.closed
    assert transport.written.count(b"fleet/a/commands") == 1


async def test_publications_beyond_the_brokers_receive_maximum_wait_for_pubacks() -> None:
    link, _ = _link()
    proto, transport = _connected(link, b"\x21\x00\x02")
    transport.written.clear()
    for i in range(5):
        link.publish(f"fleet/c{i}/commands", b"{}")
    assert transport.written.count(b"/commands") == 2
    proto.data_received(b"\x40\x02\x00\x01")  # PUBACK of the first
    assert transport.written.count(b"/commands") == 3
    proto.data_received(b"\x40\x02\x00\x02\x40\x02\x00\x03\x40\x02\x00\x04\x40\x02\x00\x05")
    assert transport.written.count(b"/commands") == 5
    assert [t in transport.written for t in (b"c0", b"c4")] == [True, True]


async def test_a_lost_session_and_a_capped_expiry_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    link, _ = _link(session_expiry_s=604800)
    proto, _ = _connected(link, b"\x11\x00\x00\x0e\x10")  # first connection: no session, 3600 s granted
    assert link.stats.session_expiry_s == 3600 and link.stats.sessions_lost == 0
    assert "keeps our session for 3600 s only" in caplog.text
    proto.connection_lost(None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _connected(link, b"\x11\x00\x00\x0e\x10")  # again no session: what the broker held is gone
    assert link.stats.sessions_lost == 1
    assert "kept no session" in caplog.text
    assert "keeps our session for" not in caplog.text  # said once per value, not at every reconnect
    _proto2, _ = _connected(link, flags=1)  # session present, expiry as asked
    assert link.stats.sessions_lost == 1 and link.stats.session_expiry_s == 604800


async def test_a_refused_subscription_degrades_healthz(tmp_path: Path) -> None:
    link, _ = _link()
    link._subscribe_ids = {7: ["fleet/#"]}
    proto, _ = _connected(link)
    proto.data_received(b"\x90\x04\x00\x07\x00\x87")  # SUBACK: not authorized
    assert link.stats.refused == {"fleet/#": "0x87 not_authorized"}
    assert not link.subscribed
    ok, body = health(snap(make_journal(tmp_path), links={"telemetry": link.stats}))
    assert not ok and "fleet/# (0x87 not_authorized)" in body["degraded"]["subscriptions"]


async def test_a_broker_disconnect_sets_the_reason_and_its_floor() -> None:
    link, _ = _link()
    proto, _ = _connected(link)
    proto.data_received(b"\xe0\x01\x8e")  # session taken over
    assert proto.why.label == "session_taken_over"
    assert reasons.wait_s(proto.why, 0.3, 30.0) == reasons.CONFIG_FLOOR_S
    assert reasons.wait_s(proto.why, 0.3, 2.0) == 2.0  # the floor never exceeds mqtt.reconnect_max_s
    proto.connection_lost(None)
    assert link.stats.disconnects == {"session_taken_over": 1}


def test_every_reason_has_advice_and_unknown_ones_get_a_default() -> None:
    assert reasons.advice(None) is reasons.LOST
    assert reasons.advice(0x8B).floor_s < reasons.advice(0x86).floor_s  # a restart is rejoined sooner
    assert reasons.advice(0xFE).label == "0xfe"
    assert "other.example" in reasons.advice(0x9D, "other.example").text


# -- fuzzing: any bytes, in any chunking, give messages or a clean refusal --

_VALID = st.sampled_from(
    [
        _publish("fleet/a/battery", 1),
        codec.publish("fleet/b/doors", b"[]", 0, 0),
        b"\x40\x02\x00\x01",
        b"\xd0\x00",
        b"\x90\x03\x00\x01\x00\x01",
        b"\xe0\x00",
    ]
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.one_of(_VALID, st.binary(max_size=40)), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_fuzz_any_bytes_in_any_chunks(parts: list[bytes], cuts: list[int]) -> None:
    async def play() -> None:
        link, _ = _link()
        proto, transport = _connected(link)
        for chunk in _chunks(b"".join(parts), cuts):
            if transport.closed:
                break
            proto.data_received(chunk)  # anything but a clean refusal propagates and fails the test
            assert len(proto.buf) <= MAX_INCOMING_PACKET + 5
        if transport.closed and link.stats.protocol_errors:
            assert transport.written[-3:-1] == b"\xe0\x01" or transport.written.endswith(b"\xe0\x00")

    asyncio.run(play())


@settings(max_examples=300, deadline=None)
@given(first=st.integers(min_value=0, max_value=255), body=st.binary(max_size=60))
def test_fuzz_every_parser_raises_only_protocol_errors(first: int, body: bytes) -> None:
    for parse in (
        lambda: codec.parse_publish(first | 0x30, body),
        lambda: codec.parse_connack(body),
        lambda: codec.parse_suback(body),
        lambda: codec.parse_puback(body),
        lambda: codec.parse_disconnect(body),
    ):
        with contextlib.suppress(codec.ProtocolError):
            parse()


async def test_a_publication_held_for_the_window_and_lost_with_the_connection_is_reported() -> None:
    link, _ = _link()
    proto, _ = _connected(link, b"\x21\x00\x01")  # receive maximum 1
    dropped: list[BrokerUnavailable] = []
    link.publish("fleet/a/commands", b"{}", on_dropped=dropped.append)  # sent
    link.publish("fleet/b/commands", b"{}", on_dropped=dropped.append)  # held back
    proto.connection_lost(None)
    assert len(dropped) == 1 and "lost before the command could be sent" in str(dropped[0])


async def test_a_broker_disconnect_ends_the_connection_at_once() -> None:
    link, _ = _link()
    proto, transport = _connected(link)
    proto.data_received(b"\xe0\x01\x8b")  # server shutting down
    assert transport.closed and proto.why.label == "server_shutting_down"


async def test_a_broker_taking_qos_0_only_gets_commands_at_qos_0() -> None:
    link, _ = _link()
    _, transport = _connected(link, b"\x24\x00")  # Maximum QoS 0
    transport.written.clear()
    link.publish("fleet/a/commands", b"{}", qos=1)
    assert transport.written[0] == codec.PUBLISH  # QoS bits 0: no packet id, nothing for the broker to refuse


async def test_our_own_close_is_not_counted_as_a_lost_connection() -> None:
    link, _ = _link()
    proto, _ = _connected(link)
    close = asyncio.create_task(link.close())
    await asyncio.sleep(0)
    proto.connection_lost(None)
    await close
    assert link.stats.disconnects == {"closed": 1}
