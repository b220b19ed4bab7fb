"""MQTT 5 packets the gateway sends and receives. Pure functions over bytes.

Only what the gateway needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH and
PUBACK both ways, PINGREQ/PINGRESP, DISCONNECT. The gateway never offers
topic aliases, so incoming PUBLISH packets always carry their topic.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

# Property identifiers (MQTT 5, section 2.2.2.2)
MESSAGE_EXPIRY = 0x02
SESSION_EXPIRY = 0x11
RECEIVE_MAXIMUM = 0x21
MAXIMUM_PACKET_SIZE = 0x27

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"


class ProtocolError(Exception):
    """The broker sent something this client cannot parse."""


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming PUBLISH."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool


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


def parse_publish(first: int, body: bytes) -> Message:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    tlen = (body[0] << 8) | body[1]
    topic = bytes(body[2 : 2 + tlen]).decode("utf-8", errors="replace")
    pos = 2 + tlen
    mid = 0
    if qos:
        mid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    parsed = read_varint(body, pos)
    if parsed is None:
        raise ProtocolError("PUBLISH properties truncated")
    plen, pos = parsed
    return Message(topic, bytes(body[pos + plen :]), qos, mid, bool(first & 0x01))


def split_packets(buf: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Complete packets at the start of `buf` as (first byte, body), and how many bytes they used."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        parsed = read_varint(buf, pos + 1)
        if parsed is None:
            break
        length, start = parsed
        end = start + length
        if end > n:
            break
        out.append((buf[pos], bytes(buf[start:end])))
        pos = end
    return out, pos
