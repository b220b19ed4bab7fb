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
exponential back-off and jitter, under a floor that depends on why the
broker let us go (``reasons.py``). The session is persistent (fixed client
id, no clean start, a session expiry), so the broker keeps QoS 1 messages
for us while we are away and re-sends those we had not acknowledged.

What the broker says in its CONNACK is obeyed: its keepalive, its maximum
packet size (a command too large fails alone, the link stays), its receive
maximum (our QoS 1 publications beyond it wait for PUBACKs), and a session
it did not keep or keeps for less than we asked is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.errors import BrokerUnavailable, StartupError
from gateway.mqtt import codec, reasons
from gateway.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[codec.Message, int], None]
"""Called for every incoming message with an ack token (0 for QoS 0)."""
Dropped = Callable[[BrokerUnavailable], None]

CLOSED = reasons.Advice("closed", "we closed the connection", logging.INFO, 0.0)

# A connection that lasted this long (or a keepalive period) was healthy: back-off starts afresh after it.
STABLE_AFTER_S = 30.0
# What we advertise as our Maximum Packet Size: a car message is at most a few kB (ingest.max_payload_bytes
# caps it at 16 kB by default); a larger packet is refused with DISCONNECT 0x95 before it is buffered.
MAX_INCOMING_PACKET = 1 << 20
# Our QoS 1 publications held back while the broker's receive maximum is reached; beyond it, publish fails.
MAX_WAITING = 10_000


@dataclass
class LinkStats:
    """What one connection has been through, for /metrics and /healthz."""

    connects: int = 0
    sessions_lost: int = 0  # a CONNACK without the session we had
    session_expiry_s: int = 0  # what the broker grants (it may cap what we ask)
    disconnects: Counter[str] = field(default_factory=Counter)  # by reasons.Advice.label
    refused: dict[str, str] = field(default_factory=dict)  # topic filter -> why the broker refused it
    publish_refused: int = 0  # PUBACKs with a failure reason
    protocol_errors: int = 0  # packets from the broker we refused
    connects_refused: Counter[str] = field(default_factory=Counter)  # refused CONNACKs, by reason label
    subacks: int = 0  # SUBACKs received: the broker has answered our subscriptions this many times


class _Protocol(asyncio.Protocol):
    def __init__(self, link: MqttLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[codec.Connack] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_rx = loop.time()
        self.keepalive = link.settings.keepalive_s
        self.why: reasons.Advice = reasons.LOST  # why this connection ended, once it has

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.last_rx = asyncio.get_running_loop().time()
        try:
            packets, used = codec.split_packets(self.buf, MAX_INCOMING_PACKET)
            del self.buf[:used]
            link = self.link
            on_message = link._deliver
            for first, body in packets:
                kind = first & 0xF0
                if kind == codec.PUBLISH:
                    on_message(codec.parse_publish(first, body))
                    continue
                if first & 0x0F:  # only PUBLISH has flags in its first byte among what a client receives
                    raise codec.ProtocolError(f"reserved flags set in packet type 0x{kind:02x}")
                if kind == codec.PUBACK:
                    link._on_puback(*codec.parse_puback(body))
                elif kind == codec.CONNACK:
                    if self.connack.done():
                        raise codec.ProtocolError("a second CONNACK", codec.PROTOCOL_ERROR)
                    connack = codec.parse_connack(body)
                    if connack.reason < 0x80:
                        # Switch generation now: PUBLISH packets may follow in this very chunk.
                        link._on_connack(self, connack)
                    self.connack.set_result(connack)
                elif kind == codec.SUBACK:
                    link._on_suback(*codec.parse_suback(body))
                elif kind == codec.PINGRESP:
                    if body:
                        raise codec.ProtocolError("PINGRESP with a body")
                elif kind == codec.DISCONNECT:
                    d = codec.parse_disconnect(body)
                    self.why = reasons.advice(d.reason, d.server_reference)
                    detail = f": {d.reason_string}" if d.reason_string else ""
                    log.log(self.why.level, "broker disconnected us (reason 0x%02x): %s%s", d.reason, self.why.text,
                            detail)  # fmt: skip
                    # The connection is over (nothing may follow a DISCONNECT): do not wait for the broker
                    # or a middlebox to close it, and send nothing more on it.
                    assert self.transport is not None
                    self.transport.close()
                    return
                else:
                    # CONNECT, SUBSCRIBE, PINGREQ; PUBREC/PUBREL/PUBCOMP (we never use QoS 2); UNSUBACK (we
                    # never unsubscribe); AUTH (we never start an exchange).
                    raise codec.ProtocolError(f"unexpected packet type 0x{kind:02x}", codec.PROTOCOL_ERROR)
        except codec.ProtocolError as e:
            self._refuse(e)

    def _refuse(self, e: codec.ProtocolError) -> None:
        """Answer a packet we cannot accept with DISCONNECT and its reason, as the specification asks."""
        self.link.stats.protocol_errors += 1
        log.error("refusing what the broker sent (%s); disconnecting with reason 0x%02x", e, e.reason)
        self.why = reasons.Advice("refused_by_us", str(e), logging.ERROR, 1.0)
        self.buf.clear()
        assert self.transport is not None
        self.transport.write(codec.disconnect(e.reason))
        self.transport.close()  # flushes the DISCONNECT; no more data_received after this

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(BrokerUnavailable(f"connection closed before CONNACK ({exc})"))
            self.connack.exception()  # retrieved: nobody may be waiting any more
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
        unshared_filters: Iterable[str] = (),
    ) -> None:
        """`topic_filters` go through ``$share/<group>/`` when mqtt.shared_group is set and `shared`;
        `unshared_filters` never do, so every instance gets them (and their retained messages)."""
        self.settings = settings
        self.client_id = settings.client_id or "fleet-gateway"
        self._on_message = on_message
        self._shared = shared and settings.shared_group is not None
        prefix = f"$share/{settings.shared_group}/" if self._shared else ""
        # no_local keeps our own command publications away from us; MQTT 5
        # forbids it on shared subscriptions, where ingest ignores them instead.
        self._filters = [(prefix + f, 1, not self._shared) for f in topic_filters]
        self._filters += [(f, 1, True) for f in unshared_filters]
        # auto_ack: acknowledge each message as soon as it is handled, for traffic with nothing to make durable.
        self._auto_ack = auto_ack
        _ssl_context(settings)  # built now to stop start-up on a bad file; again at every connect
        self.connected = False
        self.stats = LinkStats()
        # Packet ids only mean something within one connection's window of
        # unacknowledged messages; an ack token carries the connection
        # generation so a stale ack never reaches a newer connection.
        self.generation = 0
        self._proto: _Protocol | None = None
        self._next_id = 0
        self._subscribe_ids: dict[int, list[str]] = {}
        # The broker's limits on what we send, from its CONNACK.
        self._max_out: int | None = None
        self._quota = 65535
        self._inflight: set[int] = set()  # our QoS 1 PUBLISHes not yet PUBACKed
        self._waiting: deque[tuple[str, bytes, int | None, Dropped | None]] = deque()
        self._granted = 0  # the session expiry the broker granted last time, to warn once per change
        self._max_qos = 1

    @property
    def connects(self) -> int:
        return self.stats.connects

    @property
    def subscribed(self) -> bool:
        """False while the broker refuses one of our subscriptions: connected, but some traffic never comes."""
        return not self.stats.refused

    # -- called by the protocol --

    def _deliver(self, msg: codec.Message) -> None:
        token = (self.generation << 16) | msg.mid if msg.qos else 0
        self._on_message(msg, token)
        if self._auto_ack and token:
            self.ack([token])

    def _on_suback(self, packet_id: int, codes: bytes) -> None:
        self.stats.subacks += 1
        filters = self._subscribe_ids.pop(packet_id, [])
        for topic, code in zip(filters, codes, strict=False):
            if code >= 0x80:
                why = reasons.advice(code)
                self.stats.refused[topic] = f"0x{code:02x} {why.label}"
                log.error("broker refused the subscription to %s (0x%02x): %s", topic, code, why.text)
            elif self.stats.refused.pop(topic, None) is not None:
                log.warning("broker accepts the subscription to %s again", topic)

    def _on_connack(self, proto: _Protocol, c: codec.Connack) -> None:
        s = self.settings
        self._proto = proto
        self.generation += 1
        self.connected = True
        first = self.stats.connects == 0
        self.stats.connects += 1
        if c.server_keep_alive is not None and c.server_keep_alive != s.keepalive_s:
            # The specification makes the broker's value binding; ignoring it gets us dropped for silence.
            log.info("broker sets the keepalive to %d s (mqtt.keepalive_s asks %d)", c.server_keep_alive,
                     s.keepalive_s)  # fmt: skip
            proto.keepalive = c.server_keep_alive
        self._max_out = c.maximum_packet_size
        self._quota = c.receive_maximum
        if c.maximum_qos < 1 and self._max_qos >= 1:
            log.error("broker takes QoS 0 only: commands go at QoS 0, and the cars' messages come without acks, so "
                      "what arrives while the gateway is down is lost")  # fmt: skip
        self._max_qos = c.maximum_qos
        self._inflight.clear()
        granted = s.session_expiry_s if c.session_expiry_s is None else c.session_expiry_s
        self.stats.session_expiry_s = granted
        if granted < s.session_expiry_s and (first or granted != self._granted):
            log.warning(
                "broker keeps our session for %d s only (mqtt.session_expiry_s asks %d): an outage longer than "
                "that loses the cars' messages sent meanwhile",
                granted,
                s.session_expiry_s,
            )
        self._granted = granted
        if s.session_expiry_s and not c.session_present:
            if first:
                log.info("the broker had no session for %s (a first start, or the session expired)", self.client_id)
            else:
                self.stats.sessions_lost += 1
                log.warning(
                    "the broker kept no session for %s: QoS 1 messages sent while we were away are lost "
                    "(a broker restart without persistence, or a session expiry it capped)",
                    self.client_id,
                )

    def _on_puback(self, mid: int, reason: int) -> None:
        self._inflight.discard(mid)
        if reason >= 0x80:
            self.stats.publish_refused += 1
            log.warning("broker refused a publication (0x%02x): %s", reason, reasons.advice(reason).text)
        while self._waiting and len(self._inflight) < self._quota and self.connected:
            topic, payload, expiry, _ = self._waiting.popleft()
            self._send(topic, payload, self._qos(1), expiry)

    def _on_lost(self, proto: _Protocol) -> None:
        if proto is self._proto:
            self.connected = False
            self.generation += 1
            self.stats.disconnects[proto.why.label] += 1
            if self._waiting:
                log.warning("%d publication(s) waiting for the broker's window dropped with the connection",
                            len(self._waiting))  # fmt: skip
                waiting, self._waiting = self._waiting, deque()
                for *_, on_dropped in waiting:
                    if on_dropped is not None:
                        on_dropped(BrokerUnavailable("the MQTT connection was lost before the command could be sent"))

    # -- public --

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge messages by token; tokens from an earlier connection are skipped."""
        proto = self._proto
        if not self.connected or proto is None or proto.transport is None or not tokens:
            return
        gen = self.generation
        proto.transport.write(codec.pubacks(t & 0xFFFF for t in tokens if t >> 16 == gen))

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        expiry_s: float | None = None,
        on_dropped: Dropped | None = None,
    ) -> None:
        """Send now, or once the broker's receive maximum allows; raises BrokerUnavailable if it cannot.

        `on_dropped` is told if a publication held back for the broker's window is lost with the connection.
        """
        if not self.connected or self._proto is None or self._proto.transport is None:
            raise BrokerUnavailable("the MQTT broker is not connected")
        expiry = None if expiry_s is None else max(1, int(expiry_s))
        qos = self._qos(qos)
        if qos and len(self._inflight) >= self._quota:
            if len(self._waiting) >= MAX_WAITING:
                raise BrokerUnavailable(f"{MAX_WAITING} publications already wait for the broker's PUBACKs")
            self._check_size(len(codec.publish(topic, payload, qos, 1, expiry)))
            self._waiting.append((topic, payload, expiry, on_dropped))
            return
        self._send(topic, payload, qos, expiry)

    def _qos(self, qos: int) -> int:
        # A broker that takes no QoS 1 (Maximum QoS 0) would disconnect us (0x9B) for every command.
        return min(qos, self._max_qos)

    def _send(self, topic: str, payload: bytes, qos: int, expiry: int | None) -> None:
        mid = self._packet_id() if qos else 0
        packet = codec.publish(topic, payload, qos, mid, expiry)
        self._check_size(len(packet))
        if qos:
            self._inflight.add(mid)
        assert self._proto is not None and self._proto.transport is not None
        self._proto.transport.write(packet)

    def _check_size(self, size: int) -> None:
        # Sending it anyway would get the whole connection dropped (DISCONNECT 0x95), every command with it.
        if self._max_out is not None and size > self._max_out:
            raise BrokerUnavailable(f"the broker accepts packets of up to {self._max_out} bytes; this is {size}")

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight:
                return self._next_id

    async def run(self) -> None:
        """Stay connected until cancelled: connect, subscribe, wait for loss, back off, repeat."""
        s = self.settings
        delay = s.reconnect_min_s
        failing = False
        loop = asyncio.get_running_loop()
        while True:
            try:
                proto = await self._connect_once()
            except _Refused as e:
                log.log(e.why.level, "MQTT broker %s:%d refused the connection: %s", s.host, s.port, e.why.text)
                failing = True
                await asyncio.sleep(reasons.wait_s(e.why, delay * (0.5 + random.random()), s.reconnect_max_s))
                delay = min(delay * 2, s.reconnect_max_s)
                continue
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
                self.client_id,
            )
            failing = False
            up_since = loop.time()
            pinger = asyncio.create_task(self._keepalive(proto), name="mqtt-keepalive")
            try:
                # shielded: cancelling run() must not cancel the future close() waits on
                await asyncio.shield(proto.lost)
            finally:
                pinger.cancel()
                # asyncio.wait, not `await pinger` under suppress(CancelledError): a cancellation of run()
                # arriving just then would be swallowed with the pinger's, and the link would reconnect
                # instead of stopping, holding up shutdown for good.
                await asyncio.wait([pinger])
            # A CONNACK is no proof of health: a broker may accept and drop us at once (a client id taken
            # over by another instance, a quota, an ACL), and reconnecting at once would loop hot. The
            # back-off starts again from its floor only after a connection that stayed up.
            if loop.time() - up_since >= max(STABLE_AFTER_S, s.keepalive_s):
                delay = s.reconnect_min_s
            wait = reasons.wait_s(proto.why, delay * (0.5 + random.random()), s.reconnect_max_s)
            log.warning("MQTT connection lost (%s); reconnecting in %.1f s", proto.why.label, wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, s.reconnect_max_s)

    async def _connect_once(self) -> _Protocol:
        s = self.settings
        loop = asyncio.get_running_loop()
        # Loaded afresh at every attempt, so renewed certificates (short-lived ones, a rotated CA) are used
        # without a restart.
        try:
            tls = _ssl_context(s)
        except StartupError as e:
            raise BrokerUnavailable(str(e)) from None
        server_hostname = (s.server_name or s.host) if tls else None
        async with asyncio.timeout(10):
            _, proto = await loop.create_connection(
                lambda: _Protocol(self), s.host, s.port, ssl=tls, server_hostname=server_hostname
            )
        assert proto.transport is not None
        password = s.password.get_secret_value() if s.password else None
        proto.transport.write(
            codec.connect(
                self.client_id, s.keepalive_s, False, s.session_expiry_s, s.receive_maximum, s.username, password,
                MAX_INCOMING_PACKET,
            )
        )  # fmt: skip
        try:
            async with asyncio.timeout(10):
                connack = await proto.connack
        except TimeoutError:
            proto.transport.abort()
            raise BrokerUnavailable("no CONNACK within 10 s") from None
        except asyncio.CancelledError:
            proto.transport.abort()  # shutting down mid-handshake: no half-open connection left behind
            raise
        if connack.reason >= 0x80:
            proto.transport.abort()
            why = reasons.advice(connack.reason, connack.server_reference)
            self.stats.connects_refused[why.label] += 1
            raise _Refused(why)
        filters = self._filters
        if self._shared and not connack.shared_available:
            # Subscribing anyway gets us disconnected (0x9E) and back in a loop; refusing them here keeps the
            # link up for the rest (the cars' statuses) and says in /healthz why telemetry does not come.
            why = reasons.advice(0x9E)
            shared = [f for f, _, _ in filters if f.startswith("$share/")]
            for f in shared:
                self.stats.refused[f] = f"0x9e {why.label}"
            log.error("broker %s:%d: %s (mqtt.shared_group is %r)", s.host, s.port, why.text, s.shared_group)
            filters = [x for x in filters if not x[0].startswith("$share/")]
        if filters:  # a SUBSCRIBE without filters is malformed: a link that only publishes sends none
            packet_id = self._packet_id()
            self._subscribe_ids = {packet_id: [f for f, _, _ in filters]}
            proto.transport.write(codec.subscribe(packet_id, filters))
        return proto

    async def _keepalive(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        # A broker that switches keepalive off (0) still answers PINGREQ: we keep our own check of a dead link.
        interval = proto.keepalive or self.settings.keepalive_s
        while True:
            await asyncio.sleep(interval / 2)
            if loop.time() - proto.last_rx > interval * 1.5:
                log.warning("no answer from the broker for %.0f s", loop.time() - proto.last_rx)
                if proto.why is reasons.LOST:
                    proto.why = reasons.UNANSWERED
                assert proto.transport is not None
                proto.transport.abort()
                return
            assert proto.transport is not None
            proto.transport.write(codec.PINGREQ_PACKET)

    async def close(self) -> None:
        """Disconnect cleanly (the session, and what the broker keeps for it, survive)."""
        proto = self._proto
        if self.connected and proto is not None and proto.transport is not None:
            proto.why = CLOSED
            proto.transport.write(codec.DISCONNECT_PACKET)
            proto.transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await proto.lost
        self.connected = False


class _Refused(Exception):
    def __init__(self, why: reasons.Advice) -> None:
        super().__init__(why.text)
        self.why = why


def _ssl_context(s: MqttSettings) -> ssl.SSLContext | None:
    """Built at start, where a certificate that cannot be loaded stops start-up with its setting's name, and
    again at every connect (renewed files are used without a restart)."""
    if not s.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"mqtt.ca_file: cannot load {s.ca_file}: {e}") from None
    if s.cert_file is not None and s.key_file is not None:
        try:
            ctx.load_cert_chain(s.cert_file, s.key_file)
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"mqtt.cert_file, mqtt.key_file: cannot load the client certificate: {e}") from None
    if s.alpn:
        try:
            ctx.set_alpn_protocols(list(s.alpn))
        except (ValueError, ssl.SSLError, NotImplementedError) as e:
            raise StartupError(f"mqtt.alpn: {e}") from None
    return ctx
