"""A minimal MQTT 3.1.1 client on an asyncio ``Protocol``, just what a simulated car needs.

Why not paho: one paho ``Client`` per car means one Python object graph with
its own locks, buffers and a ``loop_read``/``loop_write``/``loop_misc`` call
chain per socket event; at 10,000 cars on two cores that costs more CPU per
message than the broker itself (see docs/simulator.md for the measurements).
A car needs only CONNECT (with a will), PUBLISH QoS 0/1 both ways, SUBSCRIBE,
PINGREQ and DISCONNECT, so this is a few hundred bytes of state per connection
and one ``transport.write`` per message, all on the one event loop.

What comes in is checked before it is believed: framing and packet sizes by
``PacketDecoder`` (``mqtt_codec.py``, pure, so it can be fuzzed on its own), every
packet's body by its handler. Anything a 3.1.1 broker may not send us ends the connection with an
``MqttProtocolError`` in ``MqttClient.error``; so does a broker that stops
answering PINGREQs. Optional TLS: ``connect(..., tls=tls_context(ca_file))``.

Errors::

    MqttError                   anything that went wrong with the connection
     ├── MqttConnectError       the broker refused CONNECT, or it timed out
     ├── MqttProtocolError      the broker sent what MQTT 3.1.1 forbids (malformed, oversized, unexpected)
     └── MqttSubscribeError     the broker refused a subscription (SUBACK return code 0x80)
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from typing import Any

from device_sim.mqtt_codec import (
    CONNACK,
    DISCONNECT,
    MAX_PACKET_SIZE,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SIZED,
    SUBACK,
    SUBACK_FAILURE,
    MqttConnectError,
    MqttError,
    MqttProtocolError,
    MqttSubscribeError,
    PacketDecoder,
    Will,
    encode_connect,
    encode_publish,
    encode_subscribe,
    parse_publish,
)

# The codec is re-exported: the simulator and the tests know this module as the MQTT one.
__all__ = [
    "MAX_PACKET_SIZE",
    "SILENT_TICKS",
    "MqttClient",
    "MqttConnectError",
    "MqttError",
    "MqttProtocolError",
    "MqttSubscribeError",
    "PacketDecoder",
    "Will",
    "encode_connect",
    "encode_publish",
    "encode_subscribe",
    "parse_publish",
    "tls_context",
]

# The keepalive timer ticks every keepalive/2 and sends a PINGREQ each time. After
# this many ticks without a byte from the broker, 1.5 x keepalive have passed since
# the last PINGREQ that went out while the link was known to be alive: it is dead.
SILENT_TICKS = 3

MessageHandler = Callable[[str, bytes], None]
PathLike = str | os.PathLike[str]


def tls_context(
    ca_file: PathLike | None = None, cert_file: PathLike | None = None, key_file: PathLike | None = None
) -> ssl.SSLContext:
    """A client TLS context: the broker's certificate and name checked against `ca_file` (the system's
    CAs if None), TLS 1.2 at least, and our own certificate (`key_file` if its key is not in it too)."""
    if key_file is not None and cert_file is None:
        raise ValueError("key_file: the key of a client certificate, needs cert_file")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # what config/mosquitto/mosquitto.conf demands
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


# ---- the connection -----------------------------------------------------------------------


class MqttClient(asyncio.Protocol):
    """One MQTT connection. ``await MqttClient.connect(...)`` returns it connected.

    ``on_message(topic, payload)`` is called for every PUBLISH received (QoS 1
    ones are acknowledged first). ``closed`` is a future that resolves when
    the connection is gone, whichever side ended it; ``error`` then says why.
    """

    def __init__(self, on_message: MessageHandler | None = None, *, max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._decoder = PacketDecoder(max_packet_size)
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.error: MqttError | None = None  # why the connection ended (None while it is up)
        self._next_id = 0
        self._inflight: dict[int, asyncio.Future[None] | None] = {}
        self._pending_sub: dict[int, tuple[asyncio.Future[bytes], int]] = {}  # pid -> (SUBACK, number of filters)
        self._ping: asyncio.TimerHandle | None = None
        self._keepalive = 60
        self._heard = True  # a byte arrived since the last keepalive tick
        self._silent = 0  # keepalive ticks in a row without a byte from the broker
        self._paused = False
        self._resume: asyncio.Future[None] | None = None  # shared by every drain() waiting for resume_writing
        self.sent = 0
        self.acked = 0

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.error is not None:  # closing after a fault: what still comes is noise
            return
        self._heard = True
        try:
            for head, body in self._decoder.feed(data):
                if head == PUBACK and len(body) == 2:  # the hot path of a publishing car, inline
                    fut = self._inflight.pop((body[0] << 8) | body[1], None)
                    self.acked += 1
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif head & 0xF0 == PUBLISH:
                    self._on_publish(head, body)
                else:
                    self._on_control(head, body)
        except MqttProtocolError as e:
            self._fail(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._ping is not None:
            self._ping.cancel()
        if self.error is None:
            self.error = MqttError(f"connection lost: {exc}" if exc else "connection closed")
        err = self.error
        futs: list[asyncio.Future[Any]] = [self._connack, *(f for f, _ in self._pending_sub.values())]
        futs += [f for f in self._inflight.values() if f is not None]
        for fut in futs:
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting any more
        self._wake_drainers()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers()

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
        tls: ssl.SSLContext | None = None,
        ca_file: PathLike | None = None,
        cert_file: PathLike | None = None,
        key_file: PathLike | None = None,
        server_hostname: str | None = None,
        max_packet_size: int = MAX_PACKET_SIZE,
    ) -> MqttClient:
        """Connect, over TLS if `tls` or any of the files is given (``tls_context`` builds the context from
        them; `server_hostname` is the name the broker's certificate must carry, default `host`)."""
        if tls is None and (ca_file or cert_file or key_file):
            tls = tls_context(ca_file, cert_file, key_file)
        loop = asyncio.get_running_loop()
        proto: MqttClient | None = None
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: cls(on_message, max_packet_size=max_packet_size), host, port,
                    ssl=tls, server_hostname=server_hostname if tls is not None else None,
                )  # fmt: skip
                proto._keepalive = keepalive
                proto._write(encode_connect(client_id, keepalive, clean, will, username, password))
                rc = await proto._connack
        except BaseException as e:
            if proto is not None:
                proto.abort()
            if isinstance(e, TimeoutError):
                raise MqttConnectError(-1, f"no CONNACK within {timeout:.0f} s") from None
            if isinstance(e, OSError):  # ssl.SSLError too: a certificate that does not check out
                raise MqttError(f"cannot connect to {host}:{port}: {e}") from e
            raise
        if rc != 0:
            proto.abort()
            raise MqttConnectError(rc)
        proto._schedule_ping()
        return proto

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and self.error is None

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
            if qos != 1:
                raise ValueError("qos: 0 or 1 (QoS 2 is not implemented, see _on_publish)")
            pid = self._packet_id()
            self._inflight[pid] = fut
        elif fut is not None:
            fut.set_result(None)
        self._write(encode_publish(topic, payload, qos, retain, pid))
        self.sent += 1
        return fut

    async def subscribe(self, topics: list[tuple[str, int]], timeout: float = 30.0) -> bytes:
        """Subscribe to (topic filter, qos 0 or 1) pairs; return the SUBACK return codes (the granted QoS).

        MqttSubscribeError if the broker refused any filter (return code 0x80); the others stay subscribed."""
        if not topics or any(q not in (0, 1) for _, q in topics):
            raise ValueError("topics: one or more (filter, qos) pairs, qos 0 or 1 (see _on_publish)")
        if not self.is_connected:
            raise MqttError("not connected")
        pid = self._packet_id()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._pending_sub[pid] = (fut, len(topics))
        self._write(encode_subscribe(pid, topics))
        try:
            async with asyncio.timeout(timeout):
                codes = await fut
        finally:
            self._pending_sub.pop(pid, None)  # a SUBACK that never came must not hold its packet id
        refused = [t for (t, _), rc in zip(topics, codes, strict=True) if rc == SUBACK_FAILURE]
        if refused:
            raise MqttSubscribeError(refused, codes)
        return codes

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark; MqttError if the connection goes.

        Any number of publishers may wait at once: they share one future, each through a shield so that a
        cancelled waiter does not cancel it for the others, and each looks again when woken because the
        transport may have paused again before it ran."""
        while self._paused and self.is_connected:
            if self._resume is None:
                self._resume = self._loop.create_future()
            await asyncio.shield(self._resume)
        if not self.is_connected:
            raise MqttError(f"not connected ({self.error})" if self.error else "not connected")

    @property
    def paused(self) -> bool:
        """The transport's write buffer is over its high-water mark: drain() waits."""
        return self._paused

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

    def _fail(self, err: MqttError) -> None:
        """End the connection because of `err`: connection_lost hands it to every waiter, as for any loss."""
        if self.error is None:
            self.error = err
        self.abort()

    def _wake_drainers(self) -> None:
        fut, self._resume = self._resume, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._pending_sub:
                return self._next_id
        raise MqttError("no free packet id: 65535 messages in flight")

    def _schedule_ping(self) -> None:
        if self._keepalive and self.is_connected:
            self._ping = self._loop.call_later(self._keepalive * 0.5, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        # A half-open link (the broker frozen, a NAT that forgot us) stays "connected" for TCP until
        # the kernel gives up, minutes later; silence after our PINGREQs is the only sign of it.
        if self._heard:
            self._heard, self._silent = False, 0
        else:
            self._silent += 1
            if self._silent >= SILENT_TICKS:
                waited = self._keepalive * 0.5 * SILENT_TICKS
                self._fail(MqttError(f"no answer from the broker for {waited:g} s (keepalive {self._keepalive} s)"))
                return
        self._write(bytes([PINGREQ, 0]))
        self._schedule_ping()

    def _on_publish(self, head: int, body: bytes) -> None:
        topic, qos, pid, payload = parse_publish(head, body)
        if qos == 2:
            # We subscribe at QoS 1 at most (subscribe() refuses 2), and a 3.1.1 broker delivers at the
            # granted QoS or lower, so a QoS 2 PUBLISH is the broker's error. Answering it needs the
            # PUBREC/PUBREL/PUBCOMP exchange and its per-packet state, which no car uses; a PUBACK (what
            # this client used to send) is wrong, so close the connection instead.
            raise MqttProtocolError("QoS 2 PUBLISH, but every subscription is at QoS 1 at most")
        if qos:
            self._write(bytes([PUBACK, 2, pid >> 8, pid & 0xFF]))
        if self.on_message is not None:
            self.on_message(topic, payload)

    def _on_control(self, head: int, body: bytes) -> None:
        """Every packet but PUBLISH and a well-formed PUBACK; MqttProtocolError for what may not come."""
        n = len(body)
        if head == SUBACK and n >= 3:
            self._on_suback(body)
        elif head == PINGRESP and n == 0:
            pass  # its arrival is what counts, noted in data_received
        elif head == CONNACK and n == 2:
            if self._connack.done():
                raise MqttProtocolError("a second CONNACK")
            self._connack.set_result(body[1])
        elif head in SIZED:
            raise MqttProtocolError(f"{SIZED[head]} with a body of {n} bytes, which it cannot have")
        else:  # PUBREC/PUBREL/PUBCOMP (no QoS 2 here), UNSUBACK (we never unsubscribe), client packets
            raise MqttProtocolError(f"unexpected packet 0x{head:02x} from the broker")

    def _on_suback(self, body: bytes) -> None:
        pid, codes = (body[0] << 8) | body[1], body[2:]
        if codes.translate(None, b"\x00\x01\x02\x80"):  # what is left once the valid codes are gone
            raise MqttProtocolError(f"SUBACK with a return code other than 0, 1, 2 or 0x80: {codes.hex()}")
        pending = self._pending_sub.get(pid)
        if pending is None:
            return  # a SUBACK for a subscribe() that timed out
        fut, count = pending
        if len(codes) != count:  # still pending: connection_lost hands the waiter this error
            raise MqttProtocolError(f"SUBACK with {len(codes)} return codes for {count} topic filters")
        del self._pending_sub[pid]
        if not fut.done():
            fut.set_result(codes)
