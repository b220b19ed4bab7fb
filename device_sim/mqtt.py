"""A minimal MQTT 3.1.1 client on an asyncio ``Protocol``, just what a simulated car needs.

Why not paho: one paho ``Client`` per car means one Python object graph with
its own locks, buffers and a ``loop_read``/``loop_write``/``loop_misc`` call
chain per socket event; at 10,000 cars on two cores that costs more CPU per
message than the broker itself (see docs/simulator.md for the measurements).
A car needs only CONNECT (with a will), PUBLISH QoS 0/1 both ways, SUBSCRIBE,
PINGREQ and DISCONNECT, so this is a few hundred bytes of state per connection
and one ``transport.write`` per message, all on the one event loop.

Errors::

    MqttError                   anything that went wrong with the connection
     └── MqttConnectError       the broker refused CONNECT, or it timed out
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["MqttClient", "MqttConnectError", "MqttError", "Will"]

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

MessageHandler = Callable[[str, bytes], None]


class MqttError(Exception):
    """The connection failed or was lost."""


class MqttConnectError(MqttError):
    """The broker refused the connection (``rc`` is the CONNACK return code, -1 for a timeout)."""

    def __init__(self, rc: int, detail: str = "") -> None:
        super().__init__(f"CONNECT refused (rc={rc}){': ' + detail if detail else ''}")
        self.rc = rc


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


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


def decode_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Cut every complete packet off the front of `buf`: (first byte, body). Pure, leaves the rest in `buf`."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    n = len(buf)
    while pos + 2 <= n:
        mult, length, i = 1, 0, pos + 1
        while True:
            if i >= n:
                del buf[:pos]
                return out
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if mult > 128**3:
                raise MqttError("malformed remaining length from broker")
        if i + length > n:
            break
        out.append((buf[pos], bytes(buf[i : i + length])))
        pos = i + length
    del buf[:pos]
    return out


class MqttClient(asyncio.Protocol):
    """One MQTT connection. ``await MqttClient.connect(...)`` returns it connected.

    ``on_message(topic, payload)`` is called for every PUBLISH received (QoS 1
    ones are acknowledged first). ``closed`` is a future that resolves when
    the connection is gone, whichever side ended it.
    """

    def __init__(self, on_message: MessageHandler | None = None) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._next_id = 0
        self._inflight: dict[int, asyncio.Future[None] | None] = {}
        self._pending_sub: dict[int, asyncio.Future[bytes]] = {}
        self._ping: asyncio.TimerHandle | None = None
        self._keepalive = 60
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self.sent = 0
        self.acked = 0

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            packets = decode_packets(self._buf)
        except MqttError:
            self.abort()
            return
        for head, body in packets:
            kind = head & 0xF0
            if kind == PUBLISH:
                self._on_publish(head, body)
            elif kind == PUBACK:
                fut = self._inflight.pop(struct.unpack_from("!H", body)[0], None)
                self.acked += 1
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == CONNACK:
                if not self._connack.done():
                    self._connack.set_result(body[1] if len(body) > 1 else 255)
            elif kind == SUBACK:
                sub = self._pending_sub.pop(struct.unpack_from("!H", body)[0], None)
                if sub is not None and not sub.done():
                    sub.set_result(body[2:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._ping is not None:
            self._ping.cancel()
        err = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        futs: list[asyncio.Future[Any]] = [self._connack, *self._pending_sub.values()]
        futs += [f for f in self._inflight.values() if f is not None]
        for fut in futs:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting any more
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    # ---- client API -------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        client_id: str,
        *,
        will: Will | None = None,
        keepalive: int = 60,
        clean: bool = True,
        timeout: float = 30.0,
        on_message: MessageHandler | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> MqttClient:
        loop = asyncio.get_running_loop()
        proto: MqttClient | None = None
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(lambda: cls(on_message), host, port)
                proto._keepalive = keepalive
                proto._write(encode_connect(client_id, keepalive, clean, will, username, password))
                rc = await proto._connack
        except BaseException as e:
            if proto is not None:
                proto.abort()
            if isinstance(e, TimeoutError):
                raise MqttConnectError(-1, f"no CONNACK within {timeout:.0f} s") from None
            if isinstance(e, OSError):
                raise MqttError(f"cannot connect to {host}:{port}: {e}") from e
            raise
        if rc != 0:
            proto.abort()
            raise MqttConnectError(rc)
        proto._schedule_ping()
        return proto

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and not self.closed.done()

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, track: bool = False
    ) -> asyncio.Future[None] | None:
        """Send a PUBLISH. With ``track``, return a future resolved by the PUBACK (QoS 1) or at once (QoS 0)."""
        if not self.is_connected:
            raise MqttError("not connected")
        pid = 0
        fut: asyncio.Future[None] | None = None
        if track:
            fut = self._loop.create_future()
        if qos:
            pid = self._packet_id()
            self._inflight[pid] = fut
        elif fut is not None:
            fut.set_result(None)
        self._write(encode_publish(topic, payload, qos, retain, pid))
        self.sent += 1
        return fut

    async def subscribe(self, topics: list[tuple[str, int]], timeout: float = 30.0) -> bytes:
        """Subscribe to (topic filter, qos) pairs; return the SUBACK return codes."""
        pid = self._packet_id()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._pending_sub[pid] = fut
        self._write(encode_subscribe(pid, topics))
        async with asyncio.timeout(timeout):
            return await fut

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark."""
        if self._paused and self.is_connected:
            self._resume = self._loop.create_future()
            await self._resume

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def disconnect(self) -> None:
        """Clean DISCONNECT: the broker discards the will."""
        if self.transport is not None:
            self._write(bytes([DISCONNECT, 0]))
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the will."""
        if self.transport is not None:
            self.transport.abort()

    # ---- internals --------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._pending_sub:
                return self._next_id
        raise MqttError("no free packet id: 65535 messages in flight")

    def _schedule_ping(self) -> None:
        if self._keepalive and self.is_connected:
            self._ping = self._loop.call_later(self._keepalive * 0.5, self._send_ping)

    def _send_ping(self) -> None:
        self._write(bytes([PINGREQ, 0]))
        self._schedule_ping()

    def _on_publish(self, head: int, body: bytes) -> None:
        qos = (head >> 1) & 0x03
        (tlen,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + tlen].decode(errors="replace")
        pos = 2 + tlen
        if qos:
            (pid,) = struct.unpack_from("!H", body, pos)
            pos += 2
            self._write(bytes([PUBACK, 2]) + struct.pack("!H", pid))
        if self.on_message is not None:
            self.on_message(topic, body[pos:])
