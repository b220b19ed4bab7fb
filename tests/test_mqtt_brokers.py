"""The gateway on two real MQTT 5 brokers: Mosquitto and ejabberd (issue 14).

The two read the specification differently where it leaves room, which is
the point: ejabberd keeps one QoS 1 message in flight per client, keys a
session by user name and client id, tells a taken-over session with
DISCONNECT 0x8E (Mosquitto just closes it), and has no shared subscriptions
at all. The gateway must work on both and say clearly what it cannot do.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from device_sim import SimConfig, SimFleet
from gateway.app import init_app
from gateway.fleet import load_fleet
from gateway.mqtt import codec
from gateway.mqtt.link import MqttLink
from gateway.settings import MqttSettings
from scripts import services
from scripts.ejabberd import start_ejabberd
from tests.conftest import Broker, Stack, Unique
from tests.helpers import (
    AUTH,
    MASTER_KEY,
    REPO,
    Parts,
    async_wait_for,
    gateway_settings,
    influx_query,
    mosquitto_pub,
)

pytestmark = pytest.mark.integration

FLEET = load_fleet(REPO / "config" / "fleet.yaml")


async def _gateway(
    broker: Broker, stack: Stack, unique: Unique, state: Path, aiohttp_client: Callable[..., Any], **mqtt: Any
) -> TestClient[Any, Any]:
    settings = gateway_settings(
        broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database, state,
        mqtt=broker.mqtt(topic_prefix=unique.prefix, client_id=f"gw-{state.name}-{unique.database}", **mqtt),
        commands__ack_timeout_s=3,
    )  # fmt: skip
    client: TestClient[Any, Any] = await aiohttp_client(init_app(settings, FLEET))
    return client


def _sim(broker: Broker, unique: Unique) -> SimConfig:
    return SimConfig(
        port=broker.port, prefix=unique.prefix, master_key=MASTER_KEY, speed=1, seed=3, start_hour=3.0,
        vehicles=4, username=broker.username, password=broker.password,
    )  # fmt: skip


async def test_the_gateway_ingests_and_unlocks_through_either_broker(
    any_broker: Broker, stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    client = await _gateway(any_broker, stack, unique, tmp_path / "gw", aiohttp_client)
    parts = Parts(client.app)
    await async_wait_for(lambda: parts.link.connected and parts.command_link.connected, 10, "connected")
    async with SimFleet(_sim(any_broker, unique)) as sim:
        await sim.wait_ready(timeout=15)
        await async_wait_for(lambda: parts.state.reporting_count() >= 4, 20, "every car's state")
        now = datetime.now(UTC)
        body = {
            "vehicle_id": "ZOE-001", "user_id": "U-1", "kind": "public",
            "starts_at": (now - timedelta(minutes=1)).isoformat(), "ends_at": (now + timedelta(hours=1)).isoformat(),
        }  # fmt: skip
        assert (await client.put("/v1/reservations/R-1", json=body, headers=AUTH)).status in (200, 201)
        r = await client.post("/v1/vehicles/ZOE-001/unlock", json={"reservation_id": "R-1"}, headers=AUTH)
        answer = await r.json()
        assert r.status == 200 and answer["status"] == "done", answer
        assert sim.doors("ZOE-001")[0] is False  # the car opened

    def stored() -> bool:
        rows = influx_query(stack.influx.port, unique.database, "SELECT count(soc_pct) FROM battery GROUP BY *")
        return len(rows) >= 4  # one series per car

    await async_wait_for(stored, 15, "every car's battery in InfluxDB")
    assert parts.link.stats.disconnects == {} and parts.command_link.stats.disconnects == {}


async def test_a_taken_over_session_is_told_apart_and_waits_its_floor(ejabberd: services.Service) -> None:
    broker = Broker("ejabberd", ejabberd, "gateway", "pw")
    settings = MqttSettings.model_validate(
        broker.mqtt(client_id="taken", reconnect_min_s=0.05, reconnect_max_s=1.5, session_expiry_s=0)
    )
    links = [MqttLink(settings, lambda m, t: None, ["taken/#"], auto_ack=True) for _ in range(2)]
    tasks = [asyncio.create_task(link.run()) for link in links]
    try:
        await asyncio.sleep(5)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        for link in links:
            await link.close()
    taken = sum(link.stats.disconnects["session_taken_over"] for link in links)
    assert taken >= 1
    # Each takeover waits at least its floor (capped at reconnect_max_s, 1.5 s), not the 0.05 s back-off floor.
    assert sum(link.connects for link in links) <= 5 / 1.5 + 4


async def test_without_shared_subscriptions_the_gateway_says_so_and_still_takes_statuses(
    ejabberd: services.Service, stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    broker = Broker("ejabberd", ejabberd, "gateway", "pw")
    # A car's retained status, left before the gateway starts (as a will would be).
    status = {"ts": int(time.time() * 1000), "online": True}
    await _publish_retained(broker, f"{unique.prefix}/ZOE-002/status", json.dumps(status).encode())
    client = await _gateway(broker, stack, unique, tmp_path / "gw", aiohttp_client, shared_group="gw")
    parts = Parts(client.app)

    async def degraded() -> dict[str, Any]:
        r = await client.get("/healthz")
        body: dict[str, Any] = await r.json()
        # Both links up: the command link connects on its own, and may still be on its way when the
        # telemetry link has already reported the refusal.
        up = body["broker"] == "connected"
        return body if up and "subscriptions" in body.get("degraded", {}) else {}

    body = await async_wait_for(degraded, 10, "/healthz degraded by the missing shared subscriptions, both links up")
    assert "shared_subscriptions_not_supported" in body["degraded"]["subscriptions"]
    assert set(body["degraded"]) == {"subscriptions"}
    await async_wait_for(lambda: parts.ingest.stats.accepted >= 1, 10, "the retained status, on its own subscription")
    # Not a disconnect loop: ejabberd answers a $share subscription by disconnecting with 0x9E.
    assert (parts.link.connects, parts.command_link.connects) == (1, 1)


async def _publish_retained(broker: Broker, topic: str, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write(codec.connect("retainer", 30, True, 0, 10, broker.username, broker.password))
        await reader.read(256)  # CONNACK
        packet = bytearray(codec.publish(topic, payload, 1, 1))
        packet[0] |= 0x01  # RETAIN
        writer.write(bytes(packet))
        assert (await reader.read(256))[:1] == b"\x40"  # PUBACK
    finally:
        writer.close()


async def test_a_capped_session_and_a_session_the_broker_lost_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its own ejabberd, at its default cap of 5 minutes per session: restarting it forgets every session.
    service = start_ejabberd(tmp_path / "ejabberd", extra={"session_expiry": 300})
    try:
        broker = Broker("ejabberd", service, "gateway", "pw")
        link = MqttLink(
            MqttSettings.model_validate(broker.mqtt(client_id="lost", reconnect_min_s=0.1, reconnect_max_s=0.5)),
            lambda m, t: None,
            ["lost/#"],
        )
        task = asyncio.create_task(link.run())
        await async_wait_for(lambda: link.connected, 10, "connected")
        assert link.stats.session_expiry_s == 300  # asked for a week
        assert "broker keeps our session for 300 s only" in caplog.text
        await async_wait_for(lambda: link.stats.subacks >= 1, 5, "subscribed")
        service.restart()
        await async_wait_for(lambda: link.connects >= 2 and link.connected, 20, "reconnected")
        assert link.stats.sessions_lost == 1
        task.cancel()
        await asyncio.wait([task])
        await link.close()
    finally:
        service.stop()


async def test_under_a_shared_group_every_instance_gets_every_status(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    # Telemetry is split between the instances; a car's status (online, and its will) must reach each of them,
    # on a subscription of its own: through the shared one only one instance would hear it, and on brokers that
    # follow the specification a retained status would reach none.
    broker = Broker("mosquitto", stack.broker)
    clients = [
        await _gateway(broker, stack, unique, tmp_path / name, aiohttp_client, shared_group="g")
        for name in ("gw1", "gw2")
    ]
    parts = [Parts(c.app) for c in clients]
    await async_wait_for(lambda: all(p.link.stats.subacks >= 1 for p in parts), 10, "subscribed")
    now = int(time.time() * 1000)
    for i in range(1, 5):
        doc = json.dumps({"ts": now, "online": i % 2 == 0})
        await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-00{i}/status", doc)
    await async_wait_for(lambda: all(p.state.online_count() == 2 for p in parts), 10, "every status on both")
    battery = json.dumps({"ts": now, "soc_pct": 50.0, "range_km": 150.0, "charging": False})
    await mosquitto_pub(stack.broker.port, f"{unique.prefix}/ZOE-001/battery", *[battery] * 10)
    await async_wait_for(lambda: sum(p.ingest.stats.accepted for p in parts) == 2 * 4 + 10, 10, "the batteries")


async def test_a_refused_login_is_counted_by_its_reason(ejabberd: services.Service) -> None:
    # ejabberd refuses a CONNECT without a password (0x87): a configuration error, retried at its floor.
    settings = MqttSettings(host="127.0.0.1", port=ejabberd.port, client_id="nopw", username="gateway",
                            reconnect_min_s=0.05, reconnect_max_s=0.5)  # fmt: skip
    link = MqttLink(settings, lambda m, t: None, ["x/#"])
    task = asyncio.create_task(link.run())
    try:
        await async_wait_for(lambda: link.stats.connects_refused["not_authorized"] >= 2, 10, "refusals")
        assert not link.connected and link.connects == 0
    finally:
        task.cancel()
        await asyncio.wait([task])
