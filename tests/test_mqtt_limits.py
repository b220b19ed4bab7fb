"""The gateway's MQTT link obeys what a real broker says in its CONNACK and SUBACK (issue 14).

Each test starts its own Mosquitto with the limit under test, as an
operator's broker would be configured: a maximum keepalive, a maximum packet
size, no persistence, an ACL that refuses the gateway's subscription.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import init_app
from gateway.errors import BrokerUnavailable
from gateway.fleet import load_fleet
from gateway.mqtt import codec
from gateway.mqtt.link import MqttLink
from gateway.settings import MqttSettings
from scripts import services
from tests.conftest import Stack, Unique
from tests.helpers import REPO, async_wait_for, gateway_settings

pytestmark = pytest.mark.integration

DYNSEC = next(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"), Path("/usr/lib/mosquitto_dynamic_security.so"))


@pytest.fixture
def broker_with(tmp_path: Path) -> Iterator[Callable[[str], services.Service]]:
    started: list[services.Service] = []

    def start(extra_conf: str) -> services.Service:
        b = services.start_mosquitto(tmp_path / f"mosquitto{len(started)}", extra_conf=extra_conf)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


def _settings(port: int, **over: Any) -> MqttSettings:
    opts: dict[str, Any] = {"host": "127.0.0.1", "port": port, "client_id": "limits", "reconnect_max_s": 1.0}
    opts.update(over)
    return MqttSettings(**opts)


async def _running(link: MqttLink) -> asyncio.Task[None]:
    task = asyncio.create_task(link.run())
    await async_wait_for(lambda: link.connected, 10, "connected")
    return task


async def _stop(link: MqttLink, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])
    await link.close()


@pytest.mark.slow
async def test_the_brokers_keepalive_overrides_ours(broker_with: Callable[[str], services.Service]) -> None:
    # Mosquitto's max_keepalive 10 answers a keepalive of 120 with Server Keep Alive 10 and drops a
    # client silent for 15 s; pinging on our own 120 s schedule was a keepalive timeout within 25 s.
    broker = broker_with("max_keepalive 10\n")
    link = MqttLink(_settings(broker.port, keepalive_s=120), lambda m, t: None, ["limits/#"])
    task = await _running(link)
    try:
        await asyncio.sleep(17)
        assert link.connected and link.connects == 1, link.stats.disconnects
    finally:
        await _stop(link, task)


async def test_a_command_above_the_brokers_maximum_packet_size_fails_alone(
    broker_with: Callable[[str], services.Service],
) -> None:
    broker = broker_with("max_packet_size 256\n")
    got: list[codec.Message] = []
    sender = MqttLink(_settings(broker.port, client_id="sender"), lambda m, t: None, [])
    receiver = MqttLink(_settings(broker.port, client_id="receiver"), lambda m, t: got.append(m), ["limits/#"],
                        auto_ack=True)  # fmt: skip
    tasks = [await _running(sender), await _running(receiver)]
    try:
        await async_wait_for(lambda: receiver.stats.subacks >= 1, 5, "the receiver's SUBACK")
        with pytest.raises(BrokerUnavailable, match="up to 256 bytes"):
            sender.publish("limits/ZOE-001/commands", b"x" * 400)
        sender.publish("limits/ZOE-001/commands", b"small")
        await async_wait_for(lambda: got, 5, "the small command")
        await asyncio.sleep(0.3)
        # Sent anyway, the large one made Mosquitto drop the whole connection (DISCONNECT 0x95).
        assert sender.connected and sender.connects == 1, sender.stats.disconnects
        assert [m.payload for m in got] == [b"small"]
    finally:
        for link, task in zip((sender, receiver), tasks, strict=True):
            await _stop(link, task)


async def test_a_session_the_broker_did_not_keep_is_counted(broker_with: Callable[[str], services.Service]) -> None:
    broker = broker_with("persistence false\n")  # a restart forgets every session
    link = MqttLink(_settings(broker.port, reconnect_min_s=0.1), lambda m, t: None, ["limits/#"])
    task = await _running(link)
    try:
        assert link.stats.sessions_lost == 0  # the first connection finds no session: nothing was lost
        broker.restart()
        await async_wait_for(lambda: link.connects == 2 and link.connected, 15, "reconnected")
        assert link.stats.sessions_lost == 1
        assert link.stats.session_expiry_s == 7 * 24 * 3600
    finally:
        await _stop(link, task)


async def test_a_refused_subscription_shows_in_healthz(
    broker_with: Callable[[str], services.Service],
    tmp_path: Path,
    unique: Unique,
    stack: Stack,
    aiohttp_client: Callable[..., Any],
) -> None:
    # Mosquitto's acl_file grants every subscription and filters messages later; its dynamic security
    # plugin refuses a subscription outright (SUBACK 0x87), as EMQX's and HiveMQ's ACLs do.
    dynsec = tmp_path / "dynsec.json"
    access = {"publishClientSend": True, "publishClientReceive": True, "subscribe": False, "unsubscribe": True}
    dynsec.write_text(json.dumps({"defaultACLAccess": access, "clients": [], "groups": [], "roles": []}))
    if not DYNSEC.exists():
        pytest.skip(f"{DYNSEC} is missing (Debian's mosquitto package ships it)")
    broker = broker_with(f"plugin {DYNSEC}\nplugin_opt_config_file {dynsec}\n")
    settings = gateway_settings(
        broker.port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database, tmp_path / "state"
    )
    client = await aiohttp_client(init_app(settings, load_fleet(REPO / "config" / "fleet.yaml")))

    async def degraded() -> dict[str, Any]:
        r = await client.get("/healthz")
        body: dict[str, Any] = await r.json()
        # The command link connects on its own and may still be on its way when the SUBACK has come.
        up = body["broker"] == "connected"
        return body if r.status == 503 and up and "subscriptions" in body.get("degraded", {}) else {}

    # Connected, yet nothing would ever be ingested: only the subscription is named.
    body = await async_wait_for(degraded, 10, "/healthz degraded by the refused subscription, both links up")
    assert set(body["degraded"]) == {"subscriptions"}
    assert f"{unique.prefix}/#" in body["degraded"]["subscriptions"]
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_mqtt_subscriptions_refused{link="telemetry"} 1.0' in metrics
