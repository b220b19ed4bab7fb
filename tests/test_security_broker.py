"""Threat: a stolen car credential. The production broker configuration, in a real Mosquitto.

Mosquitto runs ``config/mosquitto/mosquitto.conf`` and ``acl`` as shipped, with
the password file written by ``python -m gateway provision --all --passwd-file``
for the gateway and every car of the registry. With car A's credential (user
name, password and command key, all a thief can read out of A's telematics box)
nobody can publish as car B, read B's commands, send any command, sign one B
would obey, or knock B or the gateway off the broker by reusing their client id;
and the gateway (on its own listener) and the cars (over plain MQTT and TLS)
still do their work through it.

A refused publish is dropped by the broker without telling the publisher
(MQTT 3.1.1), so every negative check ends with a message that *is* allowed
from the same client (a marker): messages from one client arrive in order, so
once the marker is there, anything sent before it would have arrived too.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_sim import SimConfig, SimFleet
from device_sim.mqtt import MqttClient, MqttConnectError, MqttError
from device_sim.physics import rfc3339_ms
from gateway.app import init_app
from gateway.fleet import load_fleet
from gateway.provision import mqtt_password
from gateway.signing import sign, vehicle_key
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, MASTER_KEY, REPO, Parts, async_wait_for, both_links_up, gateway_settings, influx_query
from tests.secure_broker import SecureBroker, provision_passwd_file, start_secure_broker

pytestmark = pytest.mark.integration

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
GATEWAY_PASSWORD = secrets.token_urlsafe(24)
A, B = "ZOE-001", "ZOE-002"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    # The accounts as Compose writes them: the gateway's and one per car of the registry.
    tmp = tmp_path_factory.mktemp("secure-broker")
    passwd = provision_passwd_file(tmp / "provisioned-passwd", MASTER_KEY, "gateway", GATEWAY_PASSWORD)
    b = start_secure_broker(tmp / "broker", passwd_file=passwd)
    yield b
    b.stop()


class Client:
    """One MQTT connection that records what it receives."""

    def __init__(self, mqtt: MqttClient, client_id: str) -> None:
        self.mqtt = mqtt
        self.client_id = client_id
        self.msgs: list[tuple[str, bytes]] = []

    def on_message(self, topic: str, payload: bytes) -> None:
        self.msgs.append((topic, payload))

    def topics(self) -> list[str]:
        return [t for t, _ in self.msgs]

    async def marker(self, topic: str, observer: Client) -> None:
        """Publish an allowed message and wait until `observer` has it."""
        payload = orjson.dumps({"marker": uuid.uuid4().hex, "soc_pct": 50})
        self.mqtt.publish(topic, payload, 1)
        await async_wait_for(lambda: (topic, payload) in observer.msgs, 5, f"the marker on {topic}")


@pytest.fixture
async def connect(broker: SecureBroker) -> AsyncIterator[Callable[..., Any]]:
    """Log in over plain MQTT: the gateway on its listener, a car on the cars' (unless `port` says otherwise)."""
    opened: list[MqttClient] = []

    async def _connect(
        user: str | None, password: str | None = None, subscribe: tuple[str, ...] = (), port: int | None = None
    ) -> Client:
        if user is not None and password is None:
            password = GATEWAY_PASSWORD if user == "gateway" else mqtt_password(MASTER_KEY, user)
        if port is None:
            port = broker.gateway_port if user == "gateway" else broker.port
        client_id = f"t-{user}-{uuid.uuid4().hex[:6]}"
        mqtt = await MqttClient.connect("127.0.0.1", port, client_id, username=user, password=password)
        opened.append(mqtt)
        c = Client(mqtt, client_id)
        mqtt.on_message = c.on_message
        if subscribe:
            await mqtt.subscribe([(t, 1) for t in subscribe])
        return c

    yield _connect
    for m in opened:
        m.disconnect()


def command(vid: str, signer: str | None = None, action: str = "unlock") -> dict[str, Any]:
    now = time.time()
    cmd: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "vehicle_id": vid,
        "action": action,
        "reservation_id": "R-000001",
        "issued_at": rfc3339_ms(now - 1),
        "expires_at": rfc3339_ms(now + 30),
    }
    cmd["signature"] = sign(cmd, vehicle_key(MASTER_KEY, signer or vid))
    return cmd


# ---- who may log in -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (None, None),  # anonymous
        (A, "not-the-password"),
        (B, mqtt_password(MASTER_KEY, A)),  # A's password does not open B's account
        (A, mqtt_password("another-master-key-0123", A)),  # derived from the wrong master key
        ("NOPE-999", mqtt_password(MASTER_KEY, "NOPE-999")),  # not provisioned
        ("gateway", mqtt_password(MASTER_KEY, "gateway")),
    ],
    ids=["anonymous", "wrong-password", "other-cars-password", "other-master", "unprovisioned", "gateway-guess"],
)
@pytest.mark.parametrize("listener", ["cars", "gateway"])
async def test_only_provisioned_accounts_log_in(
    broker: SecureBroker, user: str | None, password: str | None, listener: str
) -> None:
    port = broker.gateway_port if listener == "gateway" else broker.port
    with pytest.raises(MqttConnectError) as e:
        await MqttClient.connect("127.0.0.1", port, f"t-{uuid.uuid4().hex[:6]}", username=user,
                                 password=password)  # fmt: skip
    assert e.value.rc in (4, 5)  # bad user name or password / not authorised


# ---- what a car may do ------------------------------------------------------------------------------


async def test_car_a_cannot_publish_as_car_b(connect: Callable[..., Any]) -> None:
    gateway = await connect("gateway", subscribe=("fleet/#",))
    a = await connect(A)
    for suffix in ("battery", "location", "doors", "status", "commands/ack"):
        a.mqtt.publish(f"fleet/{B}/{suffix}", b'{"soc_pct": 1, "lat": 0, "lon": 0, "locked": false}', 1)
    a.mqtt.publish(f"fleet/{B}", b"{}", 1)
    a.mqtt.publish("fleet/everyone", b"{}", 1)
    await a.marker(f"fleet/{A}/battery", gateway)
    assert [t for t in gateway.topics() if not t.startswith(f"fleet/{A}/")] == []


async def test_car_a_can_publish_each_of_its_own_topics(connect: Callable[..., Any]) -> None:
    gateway = await connect("gateway", subscribe=("fleet/#",))
    a = await connect(A)
    suffixes = ("battery", "location", "doors", "status", "commands/ack")
    for suffix in suffixes:
        a.mqtt.publish(f"fleet/{A}/{suffix}", b"{}", 1)
    expected = {f"fleet/{A}/{s}" for s in suffixes}
    await async_wait_for(lambda: expected <= set(gateway.topics()), 5, "every own topic at the gateway")


async def test_car_a_cannot_read_car_bs_commands(connect: Callable[..., Any]) -> None:
    gateway = await connect("gateway")
    b = await connect(B, subscribe=(f"fleet/{B}/commands",))
    a = await connect(A, subscribe=(f"fleet/{A}/commands", f"fleet/{B}/commands", "fleet/+/commands", "fleet/#", "#"))
    for_b = orjson.dumps(command(B))
    gateway.mqtt.publish(f"fleet/{B}/commands", for_b, 1)
    await async_wait_for(lambda: (f"fleet/{B}/commands", for_b) in b.msgs, 5, "B's command at B")
    for_a = orjson.dumps(command(A))
    gateway.mqtt.publish(f"fleet/{A}/commands", for_a, 1)
    await async_wait_for(lambda: (f"fleet/{A}/commands", for_a) in a.msgs, 5, "A's own command at A")
    assert a.msgs == [(f"fleet/{A}/commands", for_a)], "car A received what is not its own"


async def test_car_a_cannot_publish_commands_not_even_its_own(connect: Callable[..., Any]) -> None:
    gateway = await connect("gateway", subscribe=("fleet/#",))
    b = await connect(B, subscribe=(f"fleet/{B}/commands",))
    a = await connect(A, subscribe=(f"fleet/{A}/commands",))
    a.mqtt.publish(f"fleet/{B}/commands", orjson.dumps(command(B, signer=A)), 1)
    a.mqtt.publish(f"fleet/{A}/commands", orjson.dumps(command(A)), 1)
    await a.marker(f"fleet/{A}/battery", gateway)
    await b.marker(f"fleet/{B}/battery", gateway)  # B's own flow is in order too
    assert not [t for t in gateway.topics() if t.endswith("/commands")]
    assert b.msgs == [] and a.msgs == []


async def test_a_car_sending_a_packet_over_the_brokers_limit_is_disconnected(connect: Callable[..., Any]) -> None:
    # max_packet_size 1048576 in mosquitto.conf: the broker drops the connection.
    # Payloads over 16 KiB but under that limit reach the gateway, which rejects
    # and counts them (tests/test_ingest_integration.py, reason "oversized").
    gateway = await connect("gateway", subscribe=("fleet/#",))
    a = await connect(A)
    a.mqtt.publish(f"fleet/{A}/battery", b'{"soc_pct": 1, "pad": "' + b"x" * (1024 * 1024) + b'"}', 1)
    async with asyncio.timeout(10):
        await a.mqtt.closed
    assert not [t for t in gateway.topics() if t.startswith(f"fleet/{A}/")]


async def test_on_the_gateway_listener_a_car_account_has_only_its_own_acl(
    broker: SecureBroker, connect: Callable[..., Any]
) -> None:
    # 1884 is reachable inside the Compose network only; a car that got there anyway has its ACL, no more.
    gateway = await connect("gateway", subscribe=("fleet/#",))
    b = await connect(B, subscribe=(f"fleet/{B}/commands",))
    a = await connect(A, subscribe=(f"fleet/{A}/commands", f"fleet/{B}/commands"), port=broker.gateway_port)
    a.mqtt.publish(f"fleet/{B}/battery", b'{"soc_pct": 1}', 1)
    a.mqtt.publish(f"fleet/{B}/commands", orjson.dumps(command(B, signer=A)), 1)
    await a.marker(f"fleet/{A}/battery", gateway)
    assert [t for t in gateway.topics() if not t.startswith(f"fleet/{A}/")] == []
    for_b, for_a = orjson.dumps(command(B)), orjson.dumps(command(A))
    gateway.mqtt.publish(f"fleet/{B}/commands", for_b, 1)
    gateway.mqtt.publish(f"fleet/{A}/commands", for_a, 1)
    await async_wait_for(lambda: (f"fleet/{A}/commands", for_a) in a.msgs, 5, "A's own command at A")
    await async_wait_for(lambda: b.msgs, 5, "B's command at B")
    assert a.msgs == [(f"fleet/{A}/commands", for_a)], "car A received what is not its own"
    assert b.msgs == [(f"fleet/{B}/commands", for_b)]


# ---- client ids: on the cars' listeners a car's client id is its user name ---------------------------


class PahoCar:
    """A car's connection over plain MQTT or TLS, with paho (an independent client), counting its logins.

    No automatic reconnect: a connection the broker closes stays closed.
    """

    def __init__(self, broker: SecureBroker, user: str, client_id: str, tls: bool) -> None:
        self.port = broker.tls_port if tls else broker.port
        self.msgs: list[tuple[str, bytes]] = []
        self.connects = self.disconnects = self.subacks = 0
        self.refused: Any = None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, reconnect_on_failure=False)
        c.username_pw_set(user, mqtt_password(MASTER_KEY, user))
        if tls:
            c.tls_set(ca_certs=str(broker.certs / "ca.crt"))
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused = reason
        else:
            self.connects += 1

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.disconnects += 1

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
        self.subacks += 1

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.msgs.append((msg.topic, bytes(msg.payload)))

    async def start(self) -> None:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        await async_wait_for(lambda: self.connects or self.refused or self.disconnects, 10, "the car's CONNACK")
        assert self.connects == 1, f"the car could not log in: {self.refused}"

    async def subscribe(self, topic: str) -> None:
        before = self.subacks
        self.client.subscribe(topic, 1)
        await async_wait_for(lambda: self.subacks > before, 5, f"the SUBACK for {topic}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def paho_car(broker: SecureBroker) -> AsyncIterator[Callable[..., Any]]:
    opened: list[PahoCar] = []

    async def _car(user: str, client_id: str, tls: bool) -> PahoCar:
        car = PahoCar(broker, user, client_id, tls)
        opened.append(car)
        await car.start()
        return car

    yield _car
    for car in opened:
        car.stop()


@pytest.mark.parametrize("victim", ["car-b", "gateway"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_car_reusing_another_clients_id_knocks_nobody_off(
    connect: Callable[..., Any], paho_car: Callable[..., Any], tls: bool, victim: str
) -> None:
    # Mosquitto closes a connection when another logs in with its client id. On the
    # cars' listeners (use_username_as_clientid) car A's login is renamed to "ZOE-001".
    gateway = await connect("gateway", subscribe=(f"fleet/{A}/battery", f"fleet/{B}/battery"))
    b = await paho_car(B, B, tls)  # a box would use its vehicle id
    await b.subscribe(f"fleet/{B}/commands")
    a = await paho_car(A, B if victim == "car-b" else gateway.client_id, tls)
    # A is logged in and works (so its CONNECT, and any takeover, is behind us)...
    from_a = orjson.dumps({"soc_pct": 40, "n": uuid.uuid4().hex})
    a.client.publish(f"fleet/{A}/battery", from_a, 1)
    await async_wait_for(
        lambda: (f"fleet/{A}/battery", from_a) in gateway.msgs,
        5,
        "A's message at the gateway (was the gateway knocked off?)",
    )
    # ...and so are B and the gateway: a command reaches B, B's report reaches the gateway.
    cmd = orjson.dumps(command(B))
    gateway.mqtt.publish(f"fleet/{B}/commands", cmd, 1)
    await async_wait_for(lambda: (f"fleet/{B}/commands", cmd) in b.msgs, 5, "B's command at B (was B knocked off?)")
    from_b = orjson.dumps({"soc_pct": 60, "n": uuid.uuid4().hex})
    b.client.publish(f"fleet/{B}/battery", from_b, 1)
    await async_wait_for(lambda: (f"fleet/{B}/battery", from_b) in gateway.msgs, 5, "B's message at the gateway")
    assert (b.connects, b.disconnects) == (1, 0), "car A's login knocked car B off the broker"
    assert not gateway.mqtt.closed.done(), "car A's login knocked the gateway off the broker"
    assert (a.connects, a.disconnects) == (1, 0)


# ---- the command keys: a car's own key signs nothing another car obeys -------------------------------


@pytest.fixture
async def cars(broker: SecureBroker) -> AsyncIterator[SimFleet]:
    cfg = SimConfig(port=broker.port, prefix="fleet", fleet=FLEET, vehicles=3, master_key=MASTER_KEY,
                    per_car_credentials=True, seed=3, start_hour=3.0)  # fmt: skip
    async with SimFleet(cfg) as sim:
        await sim.wait_ready(timeout=15)
        yield sim


async def test_a_command_signed_with_car_as_key_is_refused_by_car_b(
    cars: SimFleet, connect: Callable[..., Any]
) -> None:
    # Even if a forged command reached B's topic (only the gateway may publish
    # there, see above), B checks it against its own key.
    gateway = await connect("gateway", subscribe=(f"fleet/{B}/commands/ack",))

    async def ack_of(cmd: dict[str, Any]) -> dict[str, Any]:
        gateway.mqtt.publish(f"fleet/{B}/commands", orjson.dumps(cmd), 1)

        def found() -> dict[str, Any] | None:
            docs = [orjson.loads(p) for _, p in gateway.msgs]
            return next((d for d in docs if d.get("command_id") == cmd["command_id"]), None)

        ack: dict[str, Any] = await async_wait_for(found, 5, "B's ack")
        return ack

    forged = await ack_of(command(B, signer=A))
    assert (forged["status"], forged["reason"]) == ("rejected", "bad_signature")
    assert cars.doors(B) == (True, True)
    genuine = await ack_of(command(B))
    assert genuine["status"] == "done" and cars.doors(B)[0] is False


# ---- the gateway works through the secured broker, on its own listener --------------------------------


@pytest.mark.parametrize("listener", ["plain", "tls"])
async def test_the_gateway_and_the_cars_work_through_the_secured_broker(
    broker: SecureBroker,
    cars: SimFleet,
    stack: Stack,
    unique: Unique,
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    listener: str,
) -> None:
    # The gateway's two connections (<client_id> and <client_id>-cmd) share one account, so it
    # logs in on 1884 (or 8884, TLS, from another host), where client ids are its own; the cars are on 1883.
    tls = listener == "tls"
    mqtt: dict[str, Any] = {
        "host": "127.0.0.1", "port": broker.gateway_tls_port if tls else broker.gateway_port, "topic_prefix": "fleet",
        "client_id": f"gw-{unique.database}", "username": "gateway", "password": GATEWAY_PASSWORD,
    }  # fmt: skip
    if tls:
        mqtt |= {"tls": True, "ca_file": str(broker.certs / "ca.crt"), "server_name": "localhost"}
    settings = gateway_settings(
        broker.gateway_port, f"http://127.0.0.1:{stack.influx.port}", "fleet", unique.database, tmp_path, mqtt=mqtt
    )
    client = await aiohttp_client(init_app(settings, FLEET))
    rt = Parts(client.app)
    await async_wait_for(lambda: both_links_up(rt), 10, "the gateway logged in to the broker")
    # Telemetry: the cars' retained statuses and their reports reach InfluxDB.
    await async_wait_for(
        lambda: influx_query(stack.influx.port, unique.database, f"SELECT * FROM status WHERE vehicle_id = '{A}'"),
        20,
        "a status row of car A in InfluxDB",
    )
    # A signed unlock through the API: the car obeys and acks through the broker.
    start = rfc3339_ms(time.time() - 60)
    end = rfc3339_ms(time.time() + 3600)
    rid = f"R-{uuid.uuid4().hex[:8].upper()}"
    body = {"vehicle_id": A, "user_id": "U-1", "starts_at": start, "ends_at": end, "kind": "public"}
    r = await client.put(f"/v1/reservations/{rid}", json=body, headers=AUTH)
    assert r.status == 201, await r.text()
    r = await client.post(f"/v1/vehicles/{A}/unlock", json={"reservation_id": rid}, headers=AUTH)
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "done"
    assert cars.doors(A)[0] is False


async def test_tls_listener_refuses_a_client_that_does_not_trust_its_ca(broker: SecureBroker) -> None:
    default = ssl.create_default_context()  # the system's CAs, not ours
    with pytest.raises(ssl.SSLCertVerificationError):
        async with asyncio.timeout(10):
            await asyncio.open_connection("127.0.0.1", broker.tls_port, ssl=default)
    trusting = ssl.create_default_context(cafile=str(broker.certs / "ca.crt"))
    async with asyncio.timeout(10):
        _, w = await asyncio.open_connection("127.0.0.1", broker.tls_port, ssl=trusting)
    w.close()
    # Plain MQTT on the TLS port gets nowhere either.
    with pytest.raises(MqttError):
        await MqttClient.connect("127.0.0.1", broker.tls_port, "t-plain", timeout=3, username=A,
                                 password=mqtt_password(MASTER_KEY, A))  # fmt: skip
