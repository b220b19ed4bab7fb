"""The gateway's one MQTT connection: paho-mqtt 2.x driven by the asyncio loop.

Why not aiomqtt: it acknowledges QoS 1 messages on receipt, and the
gateway must acknowledge only once a message is on disk (see journal.py);
paho 2.x has manual acknowledgements. Like aiomqtt, we hand paho's socket
to the event loop (``add_reader``/``add_writer``) and never start paho's
network thread. ``connect()`` itself is paho's blocking call, bounded by a
5 s timeout; it is instant on the loopback or LAN brokers this runs beside.

Reconnection is a plain loop owned by :meth:`MqttLink.run`, with capped
exponential back-off and jitter. The session is persistent (fixed client
id, no clean start, a session expiry), so the broker keeps QoS 1 messages
for us while we are away and re-sends the ones we had not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.errors import BrokerUnavailable
from gateway.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[paho.MQTTMessage, int], None]
"""Called for every incoming message with an ack token (0 for QoS 0)."""


class MqttLink:
    def __init__(self, settings: MqttSettings, on_message: MessageHandler, topic_filters: Iterable[str]) -> None:
        self.settings = settings
        self._on_message_cb = on_message
        self._filters = list(topic_filters)
        self.connected = False
        self.connects = 0
        # Packet ids are only meaningful within one connection's window of
        # unacknowledged messages; an ack token carries the connection
        # generation so a stale ack is never sent on a newer connection.
        self.generation = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        s = self.settings
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if s.username:
            c.username_pw_set(s.username, s.password.get_secret_value() if s.password else None)
        if s.tls:
            c.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None, cert_reqs=ssl.CERT_REQUIRED)
        c.connect_timeout = 5.0
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        return c

    # -- paho callbacks (called from loop callbacks, on the loop's thread) --

    def _on_socket_open(self, client: paho.Client, _ud: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, client.loop_read)
        self._misc = self._loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _on_socket_close(self, client: paho.Client, _ud: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        if sock.fileno() > -1:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()

    def _on_register_write(self, client: paho.Client, _ud: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, _ud: Any, sock: paho.SocketLike) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    async def _misc_loop(self) -> None:
        # paho's keepalive pings and timeouts need a tick; there is no event to wait for.
        while self._client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1)

    def _on_connect(self, _c: paho.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        # Switch generation here, not after the awaiting coroutine resumes:
        # queued messages may be read before it does.
        if not rc.is_failure:
            self.generation += 1
            self.connected = True
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_disconnect(self, _c: paho.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
        self.connected = False
        self.generation += 1
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_message(self, _c: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        token = (self.generation << 16) | msg.mid if msg.qos else 0
        self._on_message_cb(msg, token)

    # -- public --

    def ack(self, tokens: list[int]) -> None:
        """Acknowledge messages by token; tokens from an earlier connection are skipped."""
        gen = self.generation
        if not self.connected:
            return
        client = self._client
        for t in tokens:
            if t >> 16 == gen:
                client.ack(t & 0xFFFF, 1)

    def publish(self, topic: str, payload: bytes, qos: int = 1, expiry_s: float | None = None) -> None:
        if not self.connected:
            raise BrokerUnavailable("the MQTT broker is not connected")
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, int(expiry_s))
        info = self._client.publish(topic, payload, qos=qos, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish failed: {paho.error_string(info.rc)}")

    async def run(self, on_up: Callable[[], None] | None = None) -> None:
        """Stay connected until cancelled: connect, subscribe, wait for loss, back off, repeat."""
        self._loop = asyncio.get_running_loop()
        s = self.settings
        delay = s.reconnect_min_s
        failing = False
        while True:
            try:
                await self._connect_once()
            except (OSError, BrokerUnavailable) as e:
                if not failing:
                    log.warning("MQTT broker %s:%d unreachable (%s); retrying with back-off", s.host, s.port, e)
                    failing = True
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, s.reconnect_max_s)
                continue
            if failing:
                log.warning("MQTT broker %s:%d reachable again", s.host, s.port)
            else:
                log.info("connected to MQTT broker %s:%d as %s", s.host, s.port, s.client_id)
            failing = False
            delay = s.reconnect_min_s
            if on_up is not None:
                on_up()
            assert self._lost is not None
            await self._lost
            log.warning("MQTT connection lost; reconnecting")

    async def _connect_once(self) -> None:
        assert self._loop is not None
        s = self.settings
        self._connack = self._loop.create_future()
        self._lost = self._loop.create_future()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.session_expiry_s
        props.ReceiveMaximum = s.receive_maximum
        self._client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props)
        try:
            async with asyncio.timeout(10):
                rc = await self._connack
        except TimeoutError:
            self._client.disconnect()
            raise BrokerUnavailable("no CONNACK within 10 s") from None
        if rc.is_failure:
            self._client.disconnect()
            raise BrokerUnavailable(f"broker refused the connection: {rc}")
        self.connects += 1
        shared = f"$share/{s.shared_group}/" if s.shared_group else ""
        # no_local keeps our own command publications away from us; MQTT 5
        # forbids it on shared subscriptions, where ingest ignores them instead.
        opts = SubscribeOptions(qos=1, noLocal=not s.shared_group)
        self._client.subscribe([(shared + f, opts) for f in self._filters])

    async def close(self) -> None:
        """Disconnect cleanly (the session, and what the broker keeps for it, survive)."""
        if self.connected:
            self._client.disconnect()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(2):
                    if self._lost is not None:
                        await self._lost
        self.connected = False
