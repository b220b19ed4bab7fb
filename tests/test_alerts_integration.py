"""Every alert opens and resolves through the real broker, reaches a real webhook receiver, and is stored.

The gateway runs in-process with short thresholds; the tests play the cars
by publishing with Debian's ``mosquitto_pub`` (and, where a car must answer
an unlock, with the simulator). Each change must arrive at the receiver as a
signed event, be listed by ``GET /v1/alerts`` and ``GET /v1/events``, and be
written to the `alerts` measurement.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from device_sim import SimFleet
from device_sim.receiver import Receiver
from gateway.app import init_app
from gateway.fleet import Fleet
from scripts import services
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, Parts, async_wait_for, both_links_up, gateway_settings, influx_query, mosquitto_pub
from tests.test_booking_integration import FLEET, body, sim_config

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"alerts-integration-test-secret-32").decode()
CHECK_S = 0.2
HOME = {"ZOE-001": (48.4318, 0.0949), "ZOE-002": (48.4318, 0.0949), "ZOE-003": (48.4318, 0.0949)}
AWAY = (48.4318 + 0.018, 0.0949)  # 2 km north of Alençon


def stamp(ago_s: float = 0.0) -> str:
    return (datetime.now(UTC) - timedelta(seconds=ago_s)).isoformat(timespec="milliseconds")


@dataclass
class Env:
    client: TestClient[Any, Any]
    receiver: Receiver
    broker_port: int
    stack: Stack
    unique: Unique

    @property
    def rt(self) -> Any:
        return Parts(self.client.app)

    async def send(self, vehicle: str, kind: str, ago_s: float = 0.0, **fields: Any) -> None:
        doc = {"ts": stamp(ago_s), **fields}
        await mosquitto_pub(self.broker_port, f"{self.unique.prefix}/{vehicle}/{kind}", orjson.dumps(doc))

    async def at(self, vehicle: str, where: tuple[float, float], speed: float = 0.0, ago_s: float = 0.0) -> None:
        await self.send(vehicle, "location", ago_s, lat=where[0], lon=where[1], speed_kmh=speed)

    async def get(self, path: str, **params: str) -> Any:
        r = await self.client.get(path, params=params, headers=AUTH)
        assert r.status == 200, await r.text()
        return await r.json()

    async def alerts(self, **params: str) -> list[dict[str, Any]]:
        return list((await self.get("/v1/alerts", **params))["alerts"])

    async def settle(self) -> None:
        """Long enough for the scheduled check to have run a few times, and every decision to be written."""
        await asyncio.sleep(CHECK_S * 4)
        await self.rt.alerts._queue.join()

    async def delivered(self, type_: str, vehicle: str, alert_type: str, n: int = 1) -> list[dict[str, Any]]:
        def got(r: Receiver) -> list[dict[str, Any]]:
            found = [
                d.event["data"]
                for d in r.accepted(type_)
                if d.event["data"]["vehicle_id"] == vehicle and d.event["data"]["type"] == alert_type
            ]
            return found if len(found) >= n else []

        found: list[dict[str, Any]] = await self.receiver.wait(got, 10, f"{n} {type_} {alert_type} of {vehicle}")
        return found

    def q(self, query: str) -> list[dict[str, Any]]:
        return influx_query(self.stack.influx.port, self.unique.database, query)


async def start(
    stack: Stack,
    unique: Unique,
    tmp_path: Path,
    aiohttp_client: Callable[..., Any],
    broker_port: int | None = None,
    fleet: Fleet = FLEET,
    **over: Any,
) -> Env:
    receiver = await Receiver(SECRET).start()
    opts: dict[str, Any] = {
        "alerts__silent_after_s": 3600,  # every car of the fleet would fall silent otherwise
        "alerts__unattended_after_s": 1,
        "alerts__charging_fault_after_s": 1,
        "alerts__return_grace_s": 1,
        "alerts__check_every_s": CHECK_S,
        "webhooks__endpoints": [{"url": receiver.url, "secret": SECRET}],
        "webhooks__first_retry_s": 0.2,
        "commands__ack_timeout_s": 2,
    }
    opts.update(over)
    port = broker_port or stack.broker.port
    settings = gateway_settings(port, f"http://127.0.0.1:{stack.influx.port}", unique.prefix, unique.database,
                                tmp_path / "state", **opts)  # fmt: skip
    client = await aiohttp_client(init_app(settings, fleet))
    env = Env(client, receiver, port, stack, unique)
    await async_wait_for(lambda: both_links_up(env.rt), what="gateway connected")
    return env


@pytest.fixture
async def env(stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Env]:
    e = await start(stack, unique, tmp_path, aiohttp_client)
    yield e
    await e.receiver.stop()


async def test_moved_without_trip_opens_once_and_resolves_back_at_its_station(env: Env) -> None:
    await env.at("ZOE-001", HOME["ZOE-001"])
    await env.at("ZOE-001", HOME["ZOE-001"], speed=35)  # leaving: over 10 km/h with no trip
    [opened] = await env.delivered("alert.opened", "ZOE-001", "moved_without_trip")
    assert opened["severity"] == "critical" and opened["resolved_at"] is None
    for _ in range(3):  # it goes on moving: still the one alert
        await env.at("ZOE-001", AWAY, speed=50)
    await env.settle()
    assert [a["id"] for a in await env.alerts(vehicle_id="ZOE-001")] == [opened["id"]]

    await env.at("ZOE-001", HOME["ZOE-001"], speed=5)  # at its station but not yet parked
    await env.settle()
    assert len(await env.alerts(vehicle_id="ZOE-001")) == 1
    await env.at("ZOE-001", HOME["ZOE-001"])
    [resolved] = await env.delivered("alert.resolved", "ZOE-001", "moved_without_trip")
    assert resolved["id"] == opened["id"] and resolved["resolved_at"] is not None
    assert await env.alerts(vehicle_id="ZOE-001") == []
    [listed] = await env.alerts(vehicle_id="ZOE-001", status="resolved")
    assert listed == resolved
    events = (await env.get("/v1/events", type="alert.opened"))["events"]
    assert [e["data"]["id"] for e in events] == [opened["id"]]

    def points() -> list[dict[str, Any]]:
        return env.q("SELECT alert_id, message, open, severity, state FROM alerts WHERE vehicle_id = 'ZOE-001'")

    rows = await async_wait_for(lambda: len(points()) == 2 and points(), what="two alerts points")
    assert [(r["state"], r["open"], r["alert_id"]) for r in rows] == [
        ("opened", 1, opened["id"]),
        ("resolved", 0, opened["id"]),
    ]


async def test_far_from_its_station_and_out_of_the_service_area(env: Env) -> None:
    await env.at("ZOE-002", (49.3, 0.0949))  # parked, but 97 km north: beyond lat_max 49.0
    await env.delivered("alert.opened", "ZOE-002", "left_service_area")
    await env.delivered("alert.opened", "ZOE-002", "moved_without_trip")
    await env.at("ZOE-002", (48.9, 0.0949))  # back in the area, still far from its station
    await env.delivered("alert.resolved", "ZOE-002", "left_service_area")
    await env.settle()
    assert [a["type"] for a in await env.alerts(vehicle_id="ZOE-002")] == ["moved_without_trip"]
    await env.at("ZOE-002", HOME["ZOE-002"])
    await env.delivered("alert.resolved", "ZOE-002", "moved_without_trip")


async def test_unlocked_unattended_after_its_delay(env: Env) -> None:
    await env.send("ZOE-003", "doors", locked=False, closed=True)
    await env.settle()  # 0.8 s: not yet
    [opened] = await env.delivered("alert.opened", "ZOE-003", "unlocked_unattended")
    assert opened["details"]["locked"] is False
    await env.send("ZOE-003", "doors", locked=True, closed=False)  # locked but a door open: not resolved
    await env.settle()
    assert len(await env.alerts(vehicle_id="ZOE-003")) == 1
    await env.send("ZOE-003", "doors", locked=True, closed=True)
    await env.delivered("alert.resolved", "ZOE-003", "unlocked_unattended")


async def test_charging_fault_at_the_station(env: Env) -> None:
    await env.at("ZOE-001", HOME["ZOE-001"])
    await env.send("ZOE-001", "battery", soc_pct=52.0, plugged=True, charging=False)
    [opened] = await env.delivered("alert.opened", "ZOE-001", "charging_fault")
    assert opened["severity"] == "info"
    await env.send("ZOE-001", "battery", soc_pct=52.5, plugged=True, charging=True)
    await env.delivered("alert.resolved", "ZOE-001", "charging_fault")


async def test_low_battery_before_a_reservation_resolves_when_charged_or_cancelled(env: Env) -> None:
    await env.send("ZOE-002", "battery", soc_pct=12.0, plugged=False, charging=False)
    r = await env.client.put("/v1/reservations/R-lb1", json=body("ZOE-002", start=30, end=90), headers=AUTH)
    assert r.status == 201
    [opened] = await env.delivered("alert.opened", "ZOE-002", "low_battery_before_reservation")
    assert opened["reservation_id"] == "R-lb1" and opened["details"]["projected_soc_pct"] == 12.0
    await env.send("ZOE-002", "battery", soc_pct=88.0, plugged=True, charging=False)
    await env.delivered("alert.resolved", "ZOE-002", "low_battery_before_reservation")

    await env.send("ZOE-002", "battery", soc_pct=11.0, plugged=False, charging=False)
    await env.delivered("alert.opened", "ZOE-002", "low_battery_before_reservation", n=2)
    r = await env.client.delete("/v1/reservations/R-lb1", headers=AUTH)
    assert r.status == 204
    await env.delivered("alert.resolved", "ZOE-002", "low_battery_before_reservation", n=2)
    assert await env.alerts(vehicle_id="ZOE-002") == []


async def test_a_replayed_reading_opens_and_resolves_nothing(env: Env) -> None:
    # What the car buffered offline ten minutes ago: fast and far, with no trip. Stored, not alerted on.
    await env.at("ZOE-003", AWAY, speed=60, ago_s=600)
    await async_wait_for(lambda: env.rt.alerts.replayed >= 1, what="the replay seen")
    await env.settle()
    assert await env.alerts(vehicle_id="ZOE-003", status="all") == []
    rows = await async_wait_for(
        lambda: env.q("SELECT speed_kmh FROM location WHERE vehicle_id = 'ZOE-003'"), what="the replay stored"
    )
    assert rows[0]["speed_kmh"] == 60


async def test_a_replay_newer_than_the_live_reading_resolves_nothing(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    # A 2 s replay window makes the case real in seconds: a live reading that opens the alert, then,
    # arriving later, a buffered one that is newer than it (so it becomes the car's latest) but was
    # already 2 s old on arrival.
    env = await start(stack, unique, tmp_path, aiohttp_client, alerts__replay_after_s=2)
    try:
        await env.at("ZOE-003", AWAY, speed=40, ago_s=1.0)  # a second to spare under the window, to be live
        await env.delivered("alert.opened", "ZOE-003", "moved_without_trip")
        await asyncio.sleep(1.5)  # so that the one 2.2 s old is still newer than it
        await env.send("ZOE-003", "location", ago_s=2.2, lat=HOME["ZOE-003"][0], lon=HOME["ZOE-003"][1], speed_kmh=0)
        await async_wait_for(lambda: env.rt.alerts.replayed >= 1, what="the replay seen")
        car = await env.get("/v1/vehicles/ZOE-003")
        assert car["location"]["speed_kmh"] == 0  # it is the car's latest position...
        await env.settle()
        assert [a["type"] for a in await env.alerts(vehicle_id="ZOE-003")] == ["moved_without_trip"]  # ...not news
        await env.at("ZOE-003", HOME["ZOE-003"])  # a live one is
        await env.delivered("alert.resolved", "ZOE-003", "moved_without_trip")
    finally:
        await env.receiver.stop()


async def test_not_returned_and_no_movement_alert_during_a_trip(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        env = await start(stack, unique, tmp_path, aiohttp_client)
        try:
            r = await env.client.put("/v1/reservations/R-nr", json=body("ZOE-005", end=0.05), headers=AUTH)
            assert r.status == 201
            await sim.act("ZOE-005")
            r = await env.client.post("/v1/vehicles/ZOE-005/unlock", json={"reservation_id": "R-nr"}, headers=AUTH)
            assert r.status == 200, await r.text()
            await async_wait_for(lambda: env.rt.alerts.trips.get("ZOE-005"), what="the trip seen by the monitor")
            [cmd] = await env.receiver.wait(lambda r: r.accepted("command.completed"), what="the unlock's event")
            assert set(cmd.event["data"]) == {"command_id", "action", "reservation_id", "caller", "source",
                                              "issued_at", "result", "reason", "latency_ms", "vehicle_id"}  # fmt: skip
            assert {k: cmd.event["data"][k] for k in ("vehicle_id", "action", "reservation_id", "source", "result")} \
                == {"vehicle_id": "ZOE-005", "action": "unlock", "reservation_id": "R-nr", "source": "api",
                    "result": "done"}  # fmt: skip
            listed = (await env.get("/v1/vehicles/ZOE-005/commands"))["commands"]
            assert {k: v for k, v in cmd.event["data"].items() if k != "vehicle_id"} == listed[0]
            await sim.act("ZOE-005", lat=AWAY[0], lon=AWAY[1], speed_kmh=45.0)  # driven away: a trip runs
            [opened] = await env.delivered("alert.opened", "ZOE-005", "not_returned")
            assert opened["reservation_id"] == "R-nr"
            assert [a["type"] for a in await env.alerts(vehicle_id="ZOE-005")] == ["not_returned"]
            r = await env.client.post("/v1/reservations/R-nr/end", json={"force": True}, headers=AUTH)
            assert r.status == 200, await r.text()
            await env.delivered("alert.resolved", "ZOE-005", "not_returned")
            # The trip has ended and the car is still away from its station: that is news now.
            await sim.act("ZOE-005", speed_kmh=0.0)
            await env.delivered("alert.opened", "ZOE-005", "moved_without_trip")
            trips = [d.type for d in env.receiver.accepted() if d.type.startswith("trip.")]
            assert trips == ["trip.started", "trip.ended"]
        finally:
            await env.receiver.stop()


# -- the gateway's own outage ------------------------------------------------------------------------------

SILENT_S = 2.0
QUIET_FLEET = Fleet(FLEET.models, FLEET.stations, {v: FLEET.vehicles[v] for v in ("ZOE-001", "ZOE-002", "ZOE-003")})


async def _chatter(env: Env, cars: list[str], stop: asyncio.Event) -> None:
    """Cars that report twice a second, whatever the broker does."""
    while not stop.is_set():
        for vid in cars:
            with contextlib.suppress(AssertionError):  # broker down: the car's message is lost, it goes on
                await env.send(vid, "battery", soc_pct=70.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def test_silence_and_no_storm_after_a_broker_restart(
    unique: Unique, stack: Stack, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    broker = services.start_mosquitto(tmp_path / "mosquitto")
    env = await start(
        stack, unique, tmp_path, aiohttp_client, broker.port, QUIET_FLEET,
        alerts__silent_after_s=SILENT_S, mqtt__reconnect_max_s=0.5,
    )  # fmt: skip
    stop = asyncio.Event()
    chatter = asyncio.create_task(_chatter(env, ["ZOE-001", "ZOE-002"], stop))
    try:
        await env.send("ZOE-003", "battery", soc_pct=70.0)  # ZOE-003 says one thing, then nothing
        [opened] = await env.delivered("alert.opened", "ZOE-003", "vehicle_silent")
        await env.send("ZOE-003", "battery", soc_pct=70.0)
        await env.delivered("alert.resolved", "ZOE-003", "vehicle_silent")

        # The broker goes away for longer than silent_after_s: from the gateway, every car is silent.
        broker.stop()
        await async_wait_for(lambda: not env.rt.link.connected, what="the gateway sees the broker gone")
        await asyncio.sleep(SILENT_S * 1.5)
        assert len(env.receiver.accepted("alert.opened")) == 1
        broker.restart()
        await async_wait_for(lambda: both_links_up(env.rt), what="the gateway back on the broker")
        back = time.monotonic()
        # Every car's will arrives at once, as when the broker restarts under a fleet.
        for vid in QUIET_FLEET.vehicles:
            await mosquitto_pub(broker.port, f"{unique.prefix}/{vid}/status", b'{"online": false}')
        # Within silent_after_s of the reconnection nothing opens, though ZOE-003 has been silent for long.
        # Looked at by 0.8 of it, settling included: ZOE-003 may rightly be told from silent_after_s on.
        await asyncio.sleep(max(0.0, SILENT_S * 0.8 - CHECK_S * 4 - (time.monotonic() - back)))
        await env.settle()
        assert [d.event["data"]["id"] for d in env.receiver.accepted("alert.opened")] == [opened["id"]]
        assert await env.alerts() == []
        # Then the car that really is silent is told; the chattering ones never are.
        await env.delivered("alert.opened", "ZOE-003", "vehicle_silent", n=2)
        await env.settle()
        assert [a["vehicle_id"] for a in await env.alerts()] == ["ZOE-003"]
    finally:
        stop.set()
        await chatter
        await env.receiver.stop()
        broker.stop()
