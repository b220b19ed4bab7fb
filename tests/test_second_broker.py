"""The second MQTT 5 broker, ejabberd's mod_mqtt, as ``scripts.start_ejabberd`` runs it.

It serves to check the gateway against a broker that is not Mosquitto. These
tests pin what it does where MQTT 5 brokers differ, so that a test written
against it knows what to expect:

* a QoS 1 message reaches a QoS 1 subscriber;
* CONNACK grants the Session Expiry Interval asked for (up to our cap),
  echoes the client's keepalive as Server Keep Alive and says that shared
  subscriptions are not available;
* a CONNECT without a password is refused (0x87), whatever the user name;
* a plain subscription gets the retained message; a ``$share/...``
  subscription is refused with DISCONNECT 0x9E (no SUBACK, no retained);
* a persistent session comes back with Session Present and the QoS 1
  messages published while the client was away;
* a second connection with the same user name and client id takes the
  session over (DISCONNECT 0x8E to the first); with another user name it is
  another session and nobody is disconnected;
* one QoS 1 message is in flight to a client at a time, whatever Receive
  Maximum the client announces.
"""

from __future__ import annotations

import queue
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from scripts import services

pytestmark = pytest.mark.integration

SESSION_TAKEN_OVER = 0x8E
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
NOT_AUTHORIZED = 0x87


# The broker is conftest's session-wide `ejabberd`: it fails rather than skips when ejabberd is missing.


class Client:
    """A paho MQTT 5 client on its own network thread, with what it got in queues."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        *,
        user: str = "tester",
        password: str | None = "any",
        clean_start: bool = True,
        session_expiry: int | None = None,
        receive_maximum: int | None = None,
        keepalive: int = 60,
        manual_ack: bool = False,
    ) -> None:
        self.client_id = client_id or f"t{uuid.uuid4().hex[:10]}"
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack
        )
        self.paho.username_pw_set(user, password)
        # Never reconnect on its own within a test: a refused connection stays refused.
        self.paho.reconnect_delay_set(300, 300)
        self.messages: queue.Queue[Any] = queue.Queue()
        self.connacks: queue.Queue[tuple[Any, Any, Any]] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.paho.on_message = lambda c, u, msg: self.messages.put(msg)
        self.paho.on_connect = lambda c, u, flags, rc, props: self.connacks.put((flags, rc, props))
        self.paho.on_disconnect = lambda c, u, flags, rc, props: self.disconnects.put(rc)
        self.paho.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put(codes)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry is not None:
            props.SessionExpiryInterval = session_expiry
        if receive_maximum is not None:
            props.ReceiveMaximum = receive_maximum
        self.paho.connect("127.0.0.1", port, keepalive=keepalive, clean_start=clean_start, properties=props)
        self.paho.loop_start()
        self.flags, self.reason, self.properties = self.connacks.get(timeout=5)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.paho.subscribe(topic, options=SubscribeOptions(qos=qos))
        codes = self.subacks.get(timeout=5)
        assert [c.value for c in codes] == [qos], codes

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def receive(self, timeout: float = 3.0) -> Any:
        return self.messages.get(timeout=timeout)

    def nothing_more(self, wait: float = 0.5) -> bool:
        time.sleep(wait)
        return self.messages.empty()

    def close(self) -> None:
        if self.paho.is_connected():
            self.paho.disconnect()
        self.paho.loop_stop()
        # loop_start's wake-up socket pair is otherwise only closed when the
        # client is collected, which pytest reports as an unclosed socket.
        self.paho._reset_sockets()


def topic() -> str:
    return f"t{uuid.uuid4().hex[:10]}/fleet/car1"


def test_a_qos1_message_is_delivered(ejabberd: services.Service) -> None:
    t = topic()
    sub, pub = Client(ejabberd.port), Client(ejabberd.port)
    try:
        sub.subscribe(f"{t}/#")
        pub.publish(f"{t}/telemetry", b'{"soc": 81}')
        msg = sub.receive()
        assert (msg.topic, msg.payload, msg.qos) == (f"{t}/telemetry", b'{"soc": 81}', 1)
    finally:
        sub.close()
        pub.close()


def test_connack_grants_the_session_expiry_and_keepalive_and_has_no_shared_subscriptions(
    ejabberd: services.Service,
) -> None:
    c = Client(ejabberd.port, session_expiry=604800, keepalive=30)
    try:
        assert c.reason.value == 0
        assert c.properties.SessionExpiryInterval == 604800
        assert c.properties.ServerKeepAlive == 30
        assert c.properties.SharedSubscriptionAvailable == 0
        assert c.properties.TopicAliasMaximum == 100
        # Not announced, so the MQTT 5 defaults hold: QoS 2, retain, wildcards, no size limit.
        for absent in ("MaximumQoS", "RetainAvailable", "MaximumPacketSize", "ReceiveMaximum"):
            assert not hasattr(c.properties, absent), absent
    finally:
        c.close()


def test_a_connect_without_password_is_refused(ejabberd: services.Service) -> None:
    c = Client(ejabberd.port, password=None)
    try:
        assert c.reason.value == NOT_AUTHORIZED
    finally:
        c.close()


def test_retained_reaches_a_plain_subscription_and_a_shared_one_is_refused(ejabberd: services.Service) -> None:
    t = topic()
    pub, plain, shared = Client(ejabberd.port), Client(ejabberd.port), Client(ejabberd.port)
    try:
        pub.publish(f"{t}/status", b"parked", retain=True)
        plain.subscribe(f"{t}/#")
        msg = plain.receive()
        assert (msg.payload, msg.retain) == (b"parked", True)

        shared.paho.subscribe(f"$share/gw/{t}/#", options=SubscribeOptions(qos=1))
        assert shared.disconnects.get(timeout=3).value == SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
        assert shared.subacks.empty()
        assert shared.messages.empty()  # nothing delivered through the refused subscription
    finally:
        for c in (pub, plain, shared):
            c.close()
        # Clear the retained message so that it outlives no test.
        cleaner = Client(ejabberd.port)
        cleaner.publish(f"{t}/status", b"", retain=True)
        cleaner.close()


def test_a_persistent_session_comes_back_with_what_was_published_meanwhile(ejabberd: services.Service) -> None:
    t = topic()
    client_id = f"gw-{uuid.uuid4().hex[:8]}"
    first = Client(ejabberd.port, client_id, clean_start=False, session_expiry=3600)
    assert not first.flags.session_present
    first.subscribe(f"{t}/#")
    first.close()
    pub = Client(ejabberd.port)
    again = None
    try:
        for i in range(3):
            pub.publish(f"{t}/telemetry", f"m{i}".encode())
        again = Client(ejabberd.port, client_id, clean_start=False, session_expiry=3600)
        assert again.flags.session_present
        assert [again.receive().payload for _ in range(3)] == [b"m0", b"m1", b"m2"]
    finally:
        pub.close()
        if again:
            again.close()
        Client(ejabberd.port, client_id, clean_start=True, session_expiry=0).close()


def test_the_same_user_and_client_id_take_the_session_over(ejabberd: services.Service) -> None:
    client_id = f"car-{uuid.uuid4().hex[:8]}"
    first = Client(ejabberd.port, client_id, user="car")
    second = Client(ejabberd.port, client_id, user="car")
    other_user = None
    try:
        assert first.disconnects.get(timeout=3).value == SESSION_TAKEN_OVER
        # The session is (user name, client id): the same client id under
        # another user name is another session, and nobody is disconnected.
        other_user = Client(ejabberd.port, client_id, user="someone-else")
        assert other_user.reason.value == 0  # let in: a session of its own
        time.sleep(0.3)  # a takeover would disconnect `second` within this
        assert second.disconnects.empty()
        assert second.paho.is_connected()
    finally:
        for c in (first, second, other_user):
            if c:
                c.close()


def test_one_qos1_message_is_in_flight_whatever_receive_maximum_says(ejabberd: services.Service) -> None:
    t = topic()
    sub = Client(ejabberd.port, receive_maximum=5, manual_ack=True)
    pub = Client(ejabberd.port)
    try:
        sub.subscribe(f"{t}/#")
        for i in range(4):
            pub.publish(f"{t}/telemetry", f"m{i}".encode())
        first = sub.receive()
        assert first.payload == b"m0"
        assert sub.nothing_more(0.4), "ejabberd sent a second QoS 1 message before the first was acknowledged"
        sub.paho.ack(first.mid, first.qos)
        assert sub.receive().payload == b"m1"
    finally:
        sub.close()
        pub.close()
