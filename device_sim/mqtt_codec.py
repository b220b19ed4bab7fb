"""What goes over the wire between a simulated car and its broker: MQTT 3.1.1 packets, pure.

Encoders for what a car sends, and ``PacketDecoder``, which frames and size-checks what it receives
(pure, so it can be fuzzed on its own); ``parse_publish`` checks a PUBLISH's body. Everything a
3.1.1 broker may not send is an ``MqttProtocolError``. The client (``device_sim/mqtt.py``) holds the
connection; its error tree starts here, since the codec raises its first branch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
SUBACK_FAILURE = 0x80

# A car receives commands of a few hundred bytes; an observer in the tests, the
# cars' reports. 256 KiB is far above both and still bounds what a broken or
# hostile peer can make us buffer by declaring a huge remaining length.
MAX_PACKET_SIZE = 256 * 1024
FIXED_HEADER_MAX = 5  # the type byte and up to four bytes of remaining length

SIZED = {CONNACK: "CONNACK", PUBACK: "PUBACK", SUBACK: "SUBACK", PINGRESP: "PINGRESP"}  # bodies of fixed size

Packet = tuple[int, bytes]  # (first byte: type and flags, body after the remaining length)


class MqttError(Exception):
    """The connection failed or was lost."""


class MqttConnectError(MqttError):
    """The broker refused the connection (``rc`` is the CONNACK return code, -1 for a timeout)."""

    def __init__(self, rc: int, detail: str = "") -> None:
        super().__init__(f"CONNECT refused (rc={rc}){': ' + detail if detail else ''}")
        self.rc = rc


class MqttProtocolError(MqttError):
    """The peer sent what MQTT 3.1.1 does not allow it to: malformed, oversized or unexpected."""


class MqttSubscribeError(MqttError):
    """The broker refused some of the topic filters of a SUBSCRIBE (the others are subscribed)."""

    def __init__(self, refused: list[str], codes: bytes) -> None:
        super().__init__(f"subscription refused by the broker: {', '.join(refused)}")
        self.refused = refused
        self.codes = codes


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


# ---- encoding -----------------------------------------------------------------------------


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_connect(
    client_id: str,
    keepalive: int,
    clean: bool,
    will: Will | None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _str(will.topic) + struct.pack("!H", len(will.payload)) + will.payload
    if username is not None:
        flags |= 0x80
        payload += _str(username)
        if password is not None:  # MQTT 3.1.1 allows a password only with a user name
            flags |= 0x40
            payload += _str(password)
    var = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    body = var + payload
    return bytes([CONNECT]) + _remaining_length(len(body)) + body


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int, dup: bool = False) -> bytes:
    head = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    var = _str(topic) + (struct.pack("!H", packet_id) if qos else b"")
    return bytes([head]) + _remaining_length(len(var) + len(payload)) + var + payload


def encode_subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_str(t) + bytes([q]) for t, q in topics)
    return bytes([SUBSCRIBE]) + _remaining_length(len(body)) + body


# ---- decoding -----------------------------------------------------------------------------


def _long_length(data: bytes | bytearray, i: int, n: int) -> tuple[int, int]:
    """The remaining length starting at data[i] and where the body starts; (-1, -1) if not all here yet."""
    length, shift = 0, 0
    for k in range(i, min(i + 4, n)):
        b = data[k]
        length |= (b & 0x7F) << shift
        if b < 0x80:
            return length, k + 1
        shift += 7
    if n >= i + 4:
        raise MqttProtocolError("malformed remaining length: more than four bytes")
    return -1, -1


def _split(data: bytes | bytearray, max_size: int) -> tuple[list[Packet], int]:
    """The complete packets at the front of `data`, and how many bytes of it they take."""
    out: list[Packet] = []
    pos, n = 0, len(data)
    while pos + 2 <= n:
        b = data[pos + 1]
        if b < 0x80:  # the usual case: a body under 128 bytes, a one-byte length, no loop
            length, start = b, pos + 2
        elif pos + 2 < n and data[pos + 2] < 0x80:  # under 16 KiB: two bytes, still no loop
            length, start = (b & 0x7F) | (data[pos + 2] << 7), pos + 3
        else:
            length, start = _long_length(data, pos + 1, n)
            if start < 0:
                break
        if length > max_size:  # refused on the header, before any of the body is buffered
            raise MqttProtocolError(f"packet body of {length} bytes is over the limit of {max_size} bytes")
        end = start + length
        if end > n:
            break
        out.append((data[pos], bytes(data[start:end])))
        pos = end
    return out, pos


def decode_packets(buf: bytearray, max_size: int = MAX_PACKET_SIZE) -> list[Packet]:
    """Cut every complete packet off the front of `buf`: (first byte, body). Pure, leaves the rest in `buf`.

    MqttProtocolError for a malformed remaining length or a packet body over `max_size` bytes."""
    packets, used = _split(buf, max_size)
    del buf[:used]
    return packets


class PacketDecoder:
    """Cuts a byte stream into packets, however it is split into reads.

    What it keeps between reads is one incomplete packet: at most `max_size` +
    ``FIXED_HEADER_MAX`` bytes. After an MqttProtocolError the stream is out of
    step and the connection must be closed."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = MAX_PACKET_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        if not buf:  # the read starts on a packet boundary: cut it directly, nothing copied to the buffer
            packets, used = _split(data, self.max_size)
            if used < len(data):
                buf += memoryview(data)[used:]
            return packets
        buf += data
        try:
            packets, used = _split(buf, self.max_size)
        except MqttProtocolError:
            buf.clear()  # the stream is out of step for good: keep none of it
            raise
        del buf[:used]
        return packets


def parse_publish(head: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet id or 0, payload) of a PUBLISH; MqttProtocolError if its body does not add up."""
    qos = (head >> 1) & 0x03
    if qos == 3:
        raise MqttProtocolError("PUBLISH with QoS 3")
    n = len(body)
    if n < 2:
        raise MqttProtocolError(f"PUBLISH of {n} bytes has no topic length")
    end = 2 + ((body[0] << 8) | body[1])
    pos = end + 2 if qos else end
    if pos > n:
        raise MqttProtocolError(f"PUBLISH topic{' and packet id' if qos else ''} do not fit its {n}-byte body")
    if end == 2:
        raise MqttProtocolError("PUBLISH with an empty topic")
    pid = ((body[end] << 8) | body[end + 1]) if qos else 0
    if qos and not pid:
        raise MqttProtocolError("PUBLISH with packet id 0")
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:  # lenient (replaced): no car has such a topic, so it is merely not for us
        topic = body[2:end].decode(errors="replace")
    return topic, qos, pid, body[pos:]
