"""MQTT 5 packets the gateway sends and receives. Pure functions over bytes.

Only what the gateway needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH and
PUBACK both ways, PINGREQ/PINGRESP, DISCONNECT. The gateway never offers
topic aliases, so incoming PUBLISH packets always carry their topic.

Parsing is strict, as the specification asks of a receiver: anything
malformed raises :class:`ProtocolError` carrying the DISCONNECT reason code
to answer with, and nothing else escapes (``tests/test_mqtt_codec.py``
fuzzes this). The checks cost a few comparisons per packet; a PUBLISH without
properties, which is what cars' messages are, takes the short path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

# Property identifiers (MQTT 5, section 2.2.2.2)
PAYLOAD_FORMAT = 0x01
MESSAGE_EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION_DATA = 0x09
SUBSCRIPTION_ID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_CLIENT_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
AUTH_METHOD = 0x15
AUTH_DATA = 0x16
RESPONSE_INFO = 0x1A
SERVER_REFERENCE = 0x1C
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23
MAXIMUM_QOS = 0x24
RETAIN_AVAILABLE = 0x25
USER_PROPERTY = 0x26
MAXIMUM_PACKET_SIZE = 0x27
WILDCARD_AVAILABLE = 0x28
SUBSCRIPTION_IDS_AVAILABLE = 0x29
SHARED_AVAILABLE = 0x2A

# Reason codes this client sends in its own DISCONNECT (section 2.4).
NORMAL = 0x00
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

# What each property is made of, to walk a property list (section 2.2.2.2).
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_KIND = {
    PAYLOAD_FORMAT: _BYTE, MESSAGE_EXPIRY: _FOUR, CONTENT_TYPE: _UTF8, RESPONSE_TOPIC: _UTF8,
    CORRELATION_DATA: _BINARY, SUBSCRIPTION_ID: _VARINT, SESSION_EXPIRY: _FOUR, ASSIGNED_CLIENT_ID: _UTF8,
    SERVER_KEEP_ALIVE: _TWO, AUTH_METHOD: _UTF8, AUTH_DATA: _BINARY, RESPONSE_INFO: _UTF8,
    SERVER_REFERENCE: _UTF8, REASON_STRING: _UTF8, RECEIVE_MAXIMUM: _TWO, TOPIC_ALIAS_MAXIMUM: _TWO,
    TOPIC_ALIAS: _TWO, MAXIMUM_QOS: _BYTE, RETAIN_AVAILABLE: _BYTE, USER_PROPERTY: _PAIR,
    MAXIMUM_PACKET_SIZE: _FOUR, WILDCARD_AVAILABLE: _BYTE, SUBSCRIPTION_IDS_AVAILABLE: _BYTE,
    SHARED_AVAILABLE: _BYTE,
}  # fmt: skip
# Which properties each packet a client receives may carry; any other is a protocol error.
_ALLOWED = {
    PUBLISH: frozenset(
        {PAYLOAD_FORMAT, MESSAGE_EXPIRY, TOPIC_ALIAS, RESPONSE_TOPIC, CORRELATION_DATA, USER_PROPERTY,
         SUBSCRIPTION_ID, CONTENT_TYPE}
    ),
    CONNACK: frozenset(
        {SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_QOS, RETAIN_AVAILABLE, MAXIMUM_PACKET_SIZE, ASSIGNED_CLIENT_ID,
         TOPIC_ALIAS_MAXIMUM, REASON_STRING, USER_PROPERTY, WILDCARD_AVAILABLE, SUBSCRIPTION_IDS_AVAILABLE,
         SHARED_AVAILABLE, SERVER_KEEP_ALIVE, RESPONSE_INFO, SERVER_REFERENCE, AUTH_METHOD, AUTH_DATA}
    ),
    PUBACK: frozenset({REASON_STRING, USER_PROPERTY}),
    SUBACK: frozenset({REASON_STRING, USER_PROPERTY}),
    DISCONNECT: frozenset({SESSION_EXPIRY, REASON_STRING, USER_PROPERTY, SERVER_REFERENCE}),
}  # fmt: skip
_REPEATABLE = frozenset({USER_PROPERTY, SUBSCRIPTION_ID})


class ProtocolError(Exception):
    """The broker sent something this client cannot accept; ``reason`` is the DISCONNECT reason to answer."""

    def __init__(self, message: str, reason: int = MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connack:
    """A CONNACK, with the broker's limits (the specification's defaults where a property is absent)."""

    reason: int
    session_present: bool
    session_expiry_s: int | None = None  # None: the broker keeps what we asked for
    receive_maximum: int = 65535  # our unacknowledged QoS 1 PUBLISHes it accepts
    maximum_packet_size: int | None = None  # None: no limit beyond the protocol's
    maximum_qos: int = 2
    retain_available: bool = True
    shared_available: bool = True
    server_keep_alive: int | None = None  # overrides the keepalive we asked for
    reason_string: str = ""
    server_reference: str = ""


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int
    reason_string: str = ""
    server_reference: str = ""


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """(value, position after it), or None if the buffer ends first."""
    value = shift = 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        b = buf[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if i and not b:  # e.g. 0x80 0x00 for 0: the specification asks for the shortest encoding
                raise ProtocolError("variable byte integer not in its shortest form")
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("malformed variable byte integer")


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(
    client_id: str,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
    max_packet_size: int = 1 << 20,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    props = (
        bytes([SESSION_EXPIRY])
        + struct.pack("!I", session_expiry)
        + bytes([RECEIVE_MAXIMUM])
        + struct.pack("!H", receive_maximum)
        + bytes([MAXIMUM_PACKET_SIZE])
        + struct.pack("!I", max_packet_size)
    )
    var = _str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + varint(len(props)) + props
    payload = _str(client_id)
    if username is not None:
        payload += _str(username)
    if password is not None:
        payload += _str(password)
    return _packet(CONNECT, var + payload)


def subscribe(packet_id: int, filters: Iterable[tuple[str, int, bool]]) -> bytes:
    """`filters`: (topic filter, max QoS, no_local).

    Retain handling 1: retained messages come only with a new subscription,
    not again at every reconnect of a persistent session.
    """
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic, qos, no_local in filters:
        body += _str(topic) + bytes([qos | (0x04 if no_local else 0) | 0x10])
    return _packet(SUBSCRIBE, body)


def publish(topic: str, payload: bytes, qos: int, packet_id: int, expiry_s: int | None = None) -> bytes:
    props = b"" if expiry_s is None else bytes([MESSAGE_EXPIRY]) + struct.pack("!I", expiry_s)
    var = _str(topic) + (struct.pack("!H", packet_id) if qos else b"") + varint(len(props)) + props
    return _packet(PUBLISH | (qos << 1), var + payload)


def pubacks(mids: Iterable[int]) -> bytes:
    """PUBACKs for many messages in one buffer (one socket write)."""
    return b"".join(b"\x40\x02" + struct.pack("!H", m) for m in mids)


def disconnect(reason: int) -> bytes:
    return DISCONNECT_PACKET if reason == NORMAL else bytes([DISCONNECT, 1, reason])


def parse_publish(first: int, body: bytes) -> Message:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if not qos and first & 0x08:
        raise ProtocolError("PUBLISH with DUP set at QoS 0")
    n = len(body)
    if n < 3:
        raise ProtocolError("PUBLISH too short")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > n:
        raise ProtocolError("PUBLISH topic runs past the packet")
    try:
        topic = body[2:pos].decode()
    except UnicodeDecodeError:
        raise ProtocolError("PUBLISH topic is not valid UTF-8") from None
    if not topic:  # an empty topic would need a topic alias, and we allow none
        raise ProtocolError("PUBLISH without a topic", PROTOCOL_ERROR)
    if "\x00" in topic or "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic holds U+0000 or a wildcard")
    mid = 0
    if qos:
        if pos + 2 > n:
            raise ProtocolError("PUBLISH packet id missing")
        mid = (body[pos] << 8) | body[pos + 1]
        if not mid:
            raise ProtocolError("PUBLISH with packet id 0", PROTOCOL_ERROR)
        pos += 2
    if pos < n and not body[pos]:  # no properties: every message a car sends
        return Message(topic, body[pos + 1 :], qos, mid, bool(first & 0x01))
    parsed = read_varint(body, pos)
    if parsed is None:
        raise ProtocolError("PUBLISH properties truncated")
    plen, pos = parsed
    end = pos + plen
    if end > n:
        raise ProtocolError("PUBLISH properties run past the packet")
    if TOPIC_ALIAS in parse_properties(body, pos, end, PUBLISH):
        raise ProtocolError("PUBLISH with a topic alias, which this client never allowed", TOPIC_ALIAS_INVALID)
    return Message(topic, body[end:], qos, mid, bool(first & 0x01))


def parse_properties(body: bytes, pos: int, end: int, packet: int) -> dict[int, Any]:
    """The properties in ``body[pos:end]`` by identifier (repeatable ones as lists)."""
    allowed = _ALLOWED[packet]
    out: dict[int, Any] = {}
    while pos < end:
        ident = body[pos]
        pos += 1
        kind = _KIND.get(ident)
        if kind is None or ident not in allowed:
            raise ProtocolError(f"property 0x{ident:02x} not allowed in this packet", PROTOCOL_ERROR)
        value: Any
        if kind == _BYTE:
            if pos + 1 > end:
                raise ProtocolError("property truncated")
            value = body[pos]
            pos += 1
        elif kind in (_TWO, _FOUR):
            size = 2 if kind == _TWO else 4
            if pos + size > end:
                raise ProtocolError("property truncated")
            value = int.from_bytes(body[pos : pos + size], "big")
            pos += size
        elif kind == _VARINT:
            parsed = read_varint(body[:end], pos)
            if parsed is None:
                raise ProtocolError("property truncated")
            value, pos = parsed
        else:
            parts: list[Any] = []
            for _ in range(2 if kind == _PAIR else 1):
                if pos + 2 > end:
                    raise ProtocolError("property truncated")
                stop = pos + 2 + ((body[pos] << 8) | body[pos + 1])
                if stop > end:
                    raise ProtocolError("property runs past its list")
                raw = body[pos + 2 : stop]
                if kind == _BINARY:
                    parts.append(raw)
                else:
                    try:
                        parts.append(raw.decode())
                    except UnicodeDecodeError:
                        raise ProtocolError("property is not valid UTF-8") from None
                pos = stop
            value = tuple(parts) if kind == _PAIR else parts[0]
        if ident in _REPEATABLE:
            out.setdefault(ident, []).append(value)
        elif ident in out:
            raise ProtocolError(f"property 0x{ident:02x} given twice", PROTOCOL_ERROR)
        else:
            out[ident] = value
    return out


def _properties_at(body: bytes, pos: int, packet: int) -> tuple[dict[int, Any], int]:
    parsed = read_varint(body, pos)
    if parsed is None:
        raise ProtocolError("properties truncated")
    plen, pos = parsed
    end = pos + plen
    if end > len(body):
        raise ProtocolError("properties run past the packet")
    return parse_properties(body, pos, end, packet), end


def parse_connack(body: bytes) -> Connack:
    if len(body) < 3:
        raise ProtocolError("CONNACK too short")
    if body[0] & 0xFE:
        raise ProtocolError("CONNACK with reserved flags set")
    props, end = _properties_at(body, 2, CONNACK)
    if end != len(body):
        raise ProtocolError("CONNACK longer than its properties")
    maximum_qos = props.get(MAXIMUM_QOS, 1)  # absent means 2; we never use QoS 2, so 1 is all we need to know
    receive_maximum = props.get(RECEIVE_MAXIMUM, 65535)
    maximum_packet_size = props.get(MAXIMUM_PACKET_SIZE)
    if maximum_qos > 1 or props.get(RETAIN_AVAILABLE, 1) > 1 or not receive_maximum or maximum_packet_size == 0:
        raise ProtocolError("CONNACK with an invalid limit", PROTOCOL_ERROR)
    return Connack(
        reason=body[1],
        session_present=bool(body[0] & 1),
        session_expiry_s=props.get(SESSION_EXPIRY),
        receive_maximum=receive_maximum,
        maximum_packet_size=maximum_packet_size,
        maximum_qos=maximum_qos,
        retain_available=bool(props.get(RETAIN_AVAILABLE, 1)),
        shared_available=bool(props.get(SHARED_AVAILABLE, 1)),
        server_keep_alive=props.get(SERVER_KEEP_ALIVE),
        reason_string=props.get(REASON_STRING, ""),
        server_reference=props.get(SERVER_REFERENCE, ""),
    )


def parse_puback(body: bytes) -> tuple[int, int]:
    """(packet id, reason code)."""
    if len(body) < 2:
        raise ProtocolError("PUBACK too short")
    mid = (body[0] << 8) | body[1]
    if not mid:
        raise ProtocolError("PUBACK with packet id 0", PROTOCOL_ERROR)
    reason = body[2] if len(body) > 2 else 0
    if len(body) > 3:
        _properties_at(body, 3, PUBACK)
    return mid, reason


def parse_suback(body: bytes) -> tuple[int, bytes]:
    """(packet id, one reason code per filter)."""
    if len(body) < 3:
        raise ProtocolError("SUBACK too short")
    _, end = _properties_at(body, 2, SUBACK)
    codes = body[end:]
    if not codes:
        raise ProtocolError("SUBACK without reason codes")
    return (body[0] << 8) | body[1], codes


def parse_disconnect(body: bytes) -> Disconnect:
    if not body:
        return Disconnect(NORMAL)
    props: dict[int, Any] = _properties_at(body, 1, DISCONNECT)[0] if len(body) > 1 else {}
    return Disconnect(body[0], props.get(REASON_STRING, ""), props.get(SERVER_REFERENCE, ""))


def split_packets(buf: bytearray, max_size: int = 1 << 28) -> tuple[list[tuple[int, bytes]], int]:
    """Complete packets at the start of `buf` as (first byte, body), and how many bytes they used.

    A packet declaring more than `max_size` bytes (what we advertised as our
    Maximum Packet Size) raises at once, before any of it is buffered.
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        parsed = read_varint(buf, pos + 1)
        if parsed is None:
            break
        length, start = parsed
        end = start + length
        if end - pos > max_size:
            raise ProtocolError(f"packet of {end - pos} bytes, above our maximum of {max_size}", PACKET_TOO_LARGE)
        if end > n:
            break
        out.append((buf[pos], bytes(buf[start:end])))
        pos = end
    return out, pos
