"""The gateway's one MQTT 5 connection, on an asyncio ``Protocol``.

Why our own client rather than aiomqtt or paho (measured, see README):
the gateway must acknowledge a QoS 1 message only once it is on disk (see
journal.py), which aiomqtt does not allow; and paho, driven from asyncio,
reads each packet with several one-byte ``recv`` calls and parses MQTT 5
properties into objects, which capped ingest at about a third of what a
bare paho v3.1.1 subscriber receives. Here ``data_received`` gets large
chunks and splits every complete packet out of them in one loop, and the
acknowledgements of a whole batch leave in one write.

Reconnection is a plain loop owned by :meth:`MqttLink.run`, with capped
exponential back-off and jitter. The session is persistent (fixed client
id, no clean start, a session expiry), so the broker keeps QoS 1 messages
for us while we are away and re-sends those we had not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Iterable

from gateway.errors import BrokerUnavailable
from gateway.mqtt import codec
from gateway.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[codec.Message, int], None]
"""Called for every incoming message with an ack token (0 for QoS 0)."""

# A connection that lasted this long (or a keepalive period) was healthy: back-off starts afresh after it.
STABLE_AFTER_S = 30.0

CONNACK_REASONS = {
    0x84: "unsupported protocol version (the broker needs MQTT 5)",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
}


class _Protocol(asyncio.Protocol):
    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.connack: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.last_rx = asyncio.get_running_loop().time()
        try:
            packets, used = codec.split_packets(self.buf)
            del self.buf[:used]
            on_message = self.link._deliver
            for first, body in packets:
                kind = first & 0xF0
                if kind == codec.PUBLISH:
                    on_message(codec.parse_publish(first, body))
                elif kind == codec.PUBACK:
                    pass  # our commands are fire-and-forget at the MQTT level; the car's ack is what counts
                elif kind == codec.CONNACK:
                    if body[1] < 0x80:
                        # Switch generation now: PUBLISH packets may follow in this very chunk.
                        self.link._on_connack(self)
                    if not self.connack.done():
                        self.connack.set_result((body[1], bool(body[0] & 1)))
                elif kind == codec.SUBACK:
                    self.link._on_suback(body)
                elif kind == codec.DISCONNECT:
                    reason = body[0] if body else 0
                    log.warning("broker closed the connection (reason 0x%02x)", reason)
        except (codec.ProtocolError, IndexError) as e:
            log.error("unparseable data from the broker (%s); reconnecting", e)
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(BrokerUnavailable(f"connection closed before CONNACK ({exc})"))
        if not self.lost.done():
            self.lost.set_result(None)
        self.link._on_lost(self)


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        on_message: MessageHandler,
        topic_filters: Iterable[str],
        *,
        auto_ack: bool = False,
        shared: bool = True,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._filters = list(topic_filters)
        # auto_ack: acknowledge each message as soon as it is handled, for traffic with nothing to make durable.
        self._auto_ack = auto_ack
        self._shared = shared and settings.shared_group is not None
        self.connected = False
        self.connects = 0
        # Packet ids only mean something within one connection's window of
        # unacknowledged messages; an ack token carries the connection
        # generation so a stale ack never reaches a newer connection.
        self.generation = 0
        self._proto: _Protocol | None = None
        self._next_id = 0

    # -- called by the protocol --

    def _deliver(self, msg: codec.Message) -> None:
        token = (self.generation << 16) | msg.mid if msg.qos else 0
        self._on_message(msg, token)
        if self._auto_ack and token:
            self.ack([token])

    def _on_suback(self, body: bytes) -> None:
        parsed = codec.read_varint(body, 2)  # packet id, then the properties' length
        codes = body[parsed[0] + parsed[1] :] if parsed else b""
        failed = [b for b in codes if b >= 0x80]
        if failed:
            log.error(
                "broker refused %d subscription(s) (reason 0x%02x): check the broker's ACL", len(failed), failed[0]
            )

    def _on_connack(self, proto: _Protocol) -> None:
        self._proto = proto
        self.generation += 1
        self.connected = True
        self.connects += 1

    def _on_lost(self, proto: _Protocol) -> None:
        if proto is self._proto:
            self.connected = False
            self.generation += 1

    # -- public --

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge messages by token; tokens from an earlier connection are skipped."""
        proto = self._proto
        if not self.connected or proto is None or proto.transport is None or not tokens:
            return
        gen = self.generation
        proto.transport.write(codec.pubacks(t & 0xFFFF for t in tokens if t >> 16 == gen))

    def publish(self, topic: str, payload: bytes, qos: int = 1, expiry_s: float | None = None) -> None:
        proto = self._proto
        if not self.connected or proto is None or proto.transport is None:
            raise BrokerUnavailable("the MQTT broker is not connected")
        expiry = None if expiry_s is None else max(1, int(expiry_s))
        proto.transport.write(codec.publish(topic, payload, qos, self._packet_id() if qos else 0, expiry))

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def run(self) -> None:
        """Stay connected until cancelled: connect, subscribe, wait for loss, back off, repeat."""
        s = self.settings
        delay = s.reconnect_min_s
        failing = False
        while True:
            try:
                proto = await self._connect_once()
            except (OSError, BrokerUnavailable, TimeoutError, ValueError) as e:  # ValueError: e.g. a bad host name
                if not failing:
                    log.warning("MQTT broker %s:%d unreachable (%s); retrying with back-off", s.host, s.port, e)
                    failing = True
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, s.reconnect_max_s)
                continue
            log.log(
                logging.WARNING if failing else logging.INFO,
                "connected to MQTT broker %s:%d as %s",
                s.host,
                s.port,
                s.client_id,
            )
            failing = False
            up_since = asyncio.get_running_loop().time()
            pinger = asyncio.create_task(self._keepalive(proto), name="mqtt-keepalive")
            try:
                # shielded: cancelling run() must not cancel the future close() waits on
                await asyncio.shield(proto.lost)
            finally:
                pinger.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pinger
            # A CONNACK is no proof of health: a broker may accept and drop us at once (a client id taken
            # over by another instance, a quota, an ACL), and reconnecting at once would loop hot. The
            # back-off starts again from its floor only after a connection that stayed up.
            if asyncio.get_running_loop().time() - up_since >= max(STABLE_AFTER_S, s.keepalive_s):
                delay = s.reconnect_min_s
            wait = delay * (0.5 + random.random())
            log.warning("MQTT connection lost; reconnecting in %.1f s", wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, s.reconnect_max_s)

    async def _connect_once(self) -> _Protocol:
        s = self.settings
        loop = asyncio.get_running_loop()
        ctx = None
        if s.tls:
            ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
        async with asyncio.timeout(10):
            _, proto = await loop.create_connection(lambda: _Protocol(self), s.host, s.port, ssl=ctx)
        assert proto.transport is not None
        password = s.password.get_secret_value() if s.password else None
        proto.transport.write(
            codec.connect(
                s.client_id, s.keepalive_s, False, s.session_expiry_s, s.receive_maximum, s.username, password
            )
        )
        try:
            async with asyncio.timeout(10):
                rc, _session_present = await proto.connack
        except TimeoutError:
            proto.transport.abort()
            raise BrokerUnavailable("no CONNACK within 10 s") from None
        except asyncio.CancelledError:
            proto.transport.abort()  # shutting down mid-handshake: no half-open connection left behind
            raise
        if rc >= 0x80:
            proto.transport.abort()
            raise BrokerUnavailable(f"broker refused the connection: {CONNACK_REASONS.get(rc, hex(rc))}")
        shared = f"$share/{s.shared_group}/" if self._shared else ""
        # no_local keeps our own command publications away from us; MQTT 5
        # forbids it on shared subscriptions, where ingest ignores them instead.
        filters = [(shared + f, 1, not self._shared) for f in self._filters]
        proto.transport.write(codec.subscribe(self._packet_id(), filters))
        return proto

    async def _keepalive(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.keepalive_s
        while True:
            await asyncio.sleep(interval / 2)
            if loop.time() - proto.last_rx > interval * 1.5:
                log.warning("no answer from the broker for %.0f s", loop.time() - proto.last_rx)
                assert proto.transport is not None
                proto.transport.abort()
                return
            assert proto.transport is not None
            proto.transport.write(codec.PINGREQ_PACKET)

    async def close(self) -> None:
        """Disconnect cleanly (the session, and what the broker keeps for it, survive)."""
        proto = self._proto
        if self.connected and proto is not None and proto.transport is not None:
            proto.transport.write(codec.DISCONNECT_PACKET)
            proto.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await proto.lost
        self.connected = False
