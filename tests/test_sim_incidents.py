"""Incidents: each alert's condition caused in a simulated car and cleared (device_sim/incidents.py).

Against the real Mosquitto, each test on its own prefix, a subscriber watching what the cars
publish; at the end, the gateway in-process sending its alerts to a webhook receiver.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_sim import Intervals, SimConfig, SimFleet
from device_sim.car import Car
from device_sim.incidents import CYCLE, Condition, Incidents, beyond_edge, nearby
from device_sim.mqtt import MqttClient
from device_sim.physics import CarState, Mode, advance, destination, drained, haversine_km, soc_drop_pct
from device_sim.receiver import Delivery, Receiver
from gateway.fleet import ServiceArea, load_fleet
from gateway.signing import sign, vehicle_key
from tests.conftest import Stack, Unique
from tests.helpers import MASTER_KEY, REPO, async_wait_for
from tests.test_booking_integration import sim_config, start_env
from tests.test_sim_integration import Observer, subscribed

integration = pytest.mark.integration

FLEET = load_fleet(REPO / "config" / "fleet.yaml")
AREA = FLEET.service_area
SECRET = "whsec_" + base64.b64encode(b"incident-tests-webhook-secret-32").decode()
VID = "ZOE-001"


# ---- pure parts --------------------------------------------------------------------------------


def test_beyond_edge_is_just_outside_the_nearest_edge() -> None:
    area = ServiceArea(48.0, 49.0, 0.0, 1.0)
    p = beyond_edge((48.1, 0.5), area, 2.0)  # nearest edge: the south one, 11 km away
    assert p[1] == 0.5 and not area.contains(*p)
    assert haversine_km((48.0, 0.5), p) == pytest.approx(2.0, rel=0.01)
    q = beyond_edge((48.5, 0.95), area, 2.0)  # the east edge, 3.7 km away
    assert q[0] == 48.5 and q[1] > 1.0 and not area.contains(*q)
    assert AREA is not None
    for s in FLEET.stations.values():
        out = beyond_edge((s.lat, s.lon), AREA)
        assert not AREA.contains(*out) and haversine_km((s.lat, s.lon), out) < 45


def test_nearby_is_1_to_2_km_away_inside_the_area() -> None:
    rng = random.Random(3)
    home = (48.4318, 0.0949)
    for _ in range(50):
        p = nearby(home, rng, AREA)
        assert 1.0 - 1e-6 <= haversine_km(home, p) <= 2.0 + 1e-6
        assert AREA is not None and AREA.contains(*p)
    assert haversine_km(home, destination(home, 90.0, 1.5)) == pytest.approx(1.5, rel=1e-6)


def test_a_faulty_charger_charges_nothing_and_drained_rolls_the_odometer() -> None:
    model = FLEET.models["zoe"]
    s = CarState(lat=48.0, lon=0.0, soc_pct=50.0, odometer_km=1000.0, station="x", plugged=True)
    assert s.charging and advance(s, model, 3600).soc_pct > 50.0
    broken = CarState(lat=48.0, lon=0.0, soc_pct=50.0, odometer_km=1000.0, station="x", charger_fault=True)
    assert not broken.charging and advance(broken, model, 3600).soc_pct == 50.0
    low = drained(s, 10.0, model)
    assert low.soc_pct == 10.0
    assert low.odometer_km - 1000.0 == pytest.approx(40.0 / soc_drop_pct(1.0, model))  # 40 % of 52 kWh at 17/100
    assert drained(low, 20.0, model) is low  # never up


# ---- the cars on the broker --------------------------------------------------------------------


class Watch(Observer):
    """The observer, plus what a car published after a mark."""

    def after(self, mark: int, vid: str, suffix: str) -> list[dict[str, Any]]:
        topic = f"{self.prefix}/{vid}/{suffix}"
        return [orjson.loads(p) for t, p in self.msgs[mark:] if t == topic]

    def last(self, vid: str, suffix: str) -> dict[str, Any]:
        return self.docs(vid, suffix)[-1]

    def count(self, vid: str) -> int:
        return sum(1 for t, _ in self.msgs if t.startswith(f"{self.prefix}/{vid}/"))


@pytest.fixture
async def watch(stack: Stack, unique: Unique) -> AsyncIterator[Watch]:
    async with subscribed(Watch(unique.prefix), stack.broker.port) as obs:
        yield obs


@contextlib.asynccontextmanager
async def small_fleet(stack: Stack, unique: Unique, speed: float, **kw: Any) -> AsyncIterator[SimFleet]:
    """Three cars of Alençon at 3 a.m., `speed` times faster, making no departure of their own."""
    cfg = SimConfig(port=stack.broker.port, prefix=unique.prefix, fleet=FLEET, vehicles=3, seed=11,
                    start_hour=3.0, speed=speed, master_key=MASTER_KEY, **kw)  # fmt: skip
    async with SimFleet(cfg) as sim:
        for car in sim.cars.values():
            car.autonomous = False
        await sim.wait_ready(10)
        yield sim


def from_home_km(car: Car, doc: dict[str, Any]) -> float:
    return haversine_km((car.home.lat, car.home.lon), (doc["lat"], doc["lon"]))


async def periodic(car: Car, watch: Watch, suffix: str) -> dict[str, Any]:
    """Make every regular report of the car due now, as its own timers would; return the next `suffix` one."""
    mark = len(watch.msgs)
    car.next_battery = car.next_location = car.next_doors = 0.0
    car.poke()
    got: list[dict[str, Any]] = await async_wait_for(lambda: watch.after(mark, car.id, suffix), 5, "a report")
    return got[-1]


async def visit_over(car: Car) -> None:
    """The car's own plans (a visit, a charge) end now: a free car would leave; a held one stays."""
    car.next_event = car.clock.now()
    car.poke()
    await asyncio.sleep(0.2)


@integration
async def test_a_silent_car_publishes_nothing_until_cleared(stack: Stack, unique: Unique, watch: Watch) -> None:
    async with small_fleet(stack, unique, speed=120) as sim:
        car = sim.cars[VID]
        await sim.cause(VID, "vehicle_silent")
        assert sim.held(VID) == {"vehicle_silent"}
        await asyncio.sleep(0.2)  # what was in flight lands
        before, others, sent = watch.count(VID), watch.count("ZOE-002"), dict(car.last_sent)
        client: MqttClient = watch.client  # type: ignore[attr-defined]
        cmd: dict[str, Any] = {"command_id": str(uuid.uuid4()), "vehicle_id": VID, "action": "unlock",
                               "reservation_id": None, "issued_at": "2020-01-01T00:00:00Z",
                               "expires_at": "2099-01-01T00:00:00Z"}  # fmt: skip
        cmd["signature"] = sign(cmd, vehicle_key(MASTER_KEY, VID))
        client.publish(f"{unique.prefix}/{VID}/commands", orjson.dumps(cmd), 1)
        car.next_battery = car.next_location = car.next_doors = 0.0  # its reports are due: none goes out
        car.poke()
        await asyncio.sleep(1.5)  # three minutes of the car's time: a battery report a minute, normally
        assert watch.count(VID) == before + 1  # the command we sent, and nothing from the car, no ack
        assert watch.count("ZOE-002") >= others + 2 and car.last_sent == sent and sim.stats.silenced >= 3
        assert car.state.locked is True  # a hung box obeys nothing either
        mark = len(watch.msgs)
        await sim.clear(VID, "vehicle_silent")
        assert {t.rsplit("/", 1)[1] for t, _ in watch.msgs[mark:] if f"/{VID}/" in t} >= {
            "battery",
            "location",
            "doors",
        }
        assert sim.held(VID) == set()


@integration
async def test_moved_without_trip_drives_off_stays_away_and_comes_back(
    stack: Stack, unique: Unique, watch: Watch
) -> None:
    async with small_fleet(stack, unique, speed=240) as sim:
        car = sim.cars[VID]
        car.update()  # charged up to now
        odo, soc = car.state.odometer_km, car.state.soc_pct
        mark = len(watch.msgs)
        await sim.cause(VID, "moved_without_trip")
        first = watch.after(mark, VID, "location")[-1]
        assert first["speed_kmh"] > 10 and from_home_km(car, first) < 0.2  # the first moving report, at once
        await car.until(lambda: car.state.mode is Mode.PARKED)
        parked = await periodic(car, watch, "location")
        assert parked["speed_kmh"] == 0 and 1.0 <= from_home_km(car, parked) <= 2.0
        moving = [d for d in watch.after(mark, VID, "location") if d["speed_kmh"] > 0]
        assert len(moving) >= 5 and all(d["speed_kmh"] > 10 for d in moving)  # reported at driving intervals
        assert all(d["locked"] for d in watch.after(mark, VID, "doors"))  # towed or stolen: locked throughout
        assert parked["odometer_km"] - odo == pytest.approx(car.state.odometer_km - odo, abs=0.1)
        assert parked["odometer_km"] - odo >= from_home_km(car, parked)  # the road is no shorter than the crow
        used = soc_drop_pct(car.state.odometer_km - odo, car.model)
        assert car.state.soc_pct == pytest.approx(soc - used, abs=0.01)  # the energy the drive took
        battery = watch.last(VID, "battery")
        assert battery["plugged"] is False and battery["charging"] is False
        await visit_over(car)
        again = await periodic(car, watch, "location")
        assert again["speed_kmh"] == 0 and again["lat"] == parked["lat"]  # held: no drive home of its own
        mark = len(watch.msgs)
        await sim.clear(VID, "moved_without_trip")
        back = watch.after(mark, VID, "location")
        assert any(d["speed_kmh"] > 10 for d in back)  # driven back
        home = FLEET.stations[car.home.id]
        assert back[-1]["speed_kmh"] == 0 and from_home_km(car, back[-1]) * 1000 <= home.radius_m
        assert watch.last(VID, "battery")["plugged"] is True and car.at_home and sim.held(VID) == set()


@integration
@pytest.mark.parametrize("drive", [True, False])
async def test_left_service_area_goes_outside_and_home_again(
    stack: Stack, unique: Unique, watch: Watch, drive: bool
) -> None:
    assert AREA is not None
    iv = Intervals(battery_parked_s=600, battery_driving_s=120, location_driving_s=30, location_parked_s=600)
    async with small_fleet(stack, unique, speed=3000, intervals=iv) as sim:
        car = sim.cars[VID]
        mark = len(watch.msgs)
        await sim.cause(VID, "left_service_area", drive=drive)
        out = watch.after(mark, VID, "location")
        assert not AREA.contains(out[-1]["lat"], out[-1]["lon"])
        assert [AREA.contains(d["lat"], d["lon"]) for d in out[:-1]].count(True) >= (3 if drive else 0)
        await car.until(lambda: car.state.mode is Mode.PARKED)
        await visit_over(car)
        there = await periodic(car, watch, "location")
        assert there["speed_kmh"] == 0 and not AREA.contains(there["lat"], there["lon"])
        await sim.clear(VID, "left_service_area", drive=drive)
        home = watch.last(VID, "location")
        assert home["speed_kmh"] == 0 and from_home_km(car, home) < 0.01 and car.at_home
        odo = home["odometer_km"] - out[0]["odometer_km"]
        assert odo > 50 if drive else odo == 0  # driven out and back, or carried


@integration
async def test_unlocked_unattended_stays_unlocked_until_cleared(stack: Stack, unique: Unique, watch: Watch) -> None:
    async with small_fleet(stack, unique, speed=120) as sim:
        car = sim.cars[VID]
        await sim.cause(VID, "unlocked_unattended")
        assert watch.last(VID, "doors")["locked"] is False
        await visit_over(car)
        assert (await periodic(car, watch, "doors"))["locked"] is False and car.at_home
        await sim.clear(VID, "unlocked_unattended")
        d = watch.last(VID, "doors")
        assert d["locked"] is True and d["closed"] is True


@integration
async def test_a_charging_fault_charges_nothing_until_cleared(stack: Stack, unique: Unique, watch: Watch) -> None:
    async with small_fleet(stack, unique, speed=600) as sim:
        car = sim.cars[VID]
        odo = car.state.odometer_km
        car.state = replace(car.state, soc_pct=95.0)  # full: the fault needs it under 80
        await sim.cause(VID, "charging_fault")
        b = watch.last(VID, "battery")
        assert b["plugged"] is True and b["charging"] is False and b["soc_pct"] < 80
        assert car.state.odometer_km > odo  # the charge a previous driver used shows on the odometer
        await asyncio.sleep(1.0)  # ten minutes plugged in: 3.7 kWh at 22 kW, had it worked
        later = await periodic(car, watch, "battery")
        assert later["soc_pct"] == b["soc_pct"] and later["charging"] is False and later["plugged"] is True
        await sim.clear(VID, "charging_fault")
        assert watch.last(VID, "battery")["charging"] is True
        await asyncio.sleep(0.5)
        assert (await periodic(car, watch, "battery"))["soc_pct"] > b["soc_pct"]


@integration
async def test_low_battery_drops_to_ten_percent_until_cleared(stack: Stack, unique: Unique, watch: Watch) -> None:
    async with small_fleet(stack, unique, speed=600) as sim:
        car = sim.cars[VID]
        car.update()  # charged up to now
        odo, soc = car.state.odometer_km, car.state.soc_pct
        await sim.cause(VID, "low_battery_before_reservation")
        b = watch.last(VID, "battery")
        assert 9 <= b["soc_pct"] <= 11 and b["charging"] is False and b["plugged"] is False
        km = (soc - car.state.soc_pct) / soc_drop_pct(1.0, car.model)  # what a previous driver used
        assert car.state.odometer_km - odo == pytest.approx(km, abs=0.01)
        await asyncio.sleep(0.5)
        assert (await periodic(car, watch, "battery"))["soc_pct"] == b["soc_pct"]
        await sim.clear(VID, "low_battery_before_reservation")
        b = watch.last(VID, "battery")
        assert b["soc_pct"] >= 80 and b["plugged"] is True and b["charging"] is (b["soc_pct"] < 100)


@integration
async def test_not_returned_stays_in_another_town_until_cleared(stack: Stack, unique: Unique, watch: Watch) -> None:
    iv = Intervals(battery_parked_s=600, battery_driving_s=120, location_driving_s=30, location_parked_s=600)
    async with small_fleet(stack, unique, speed=3000, intervals=iv) as sim:
        car = sim.cars[VID]
        mark = len(watch.msgs)
        await sim.cause(VID, "not_returned")
        assert watch.after(mark, VID, "location")[-1]["speed_kmh"] > 10
        await car.until(lambda: car.state.mode is Mode.PARKED)
        town = FLEET.stations[car.state.station or ""]
        assert town.id != car.home.id
        await visit_over(car)
        there = await periodic(car, watch, "location")
        assert there["speed_kmh"] == 0 and haversine_km((town.lat, town.lon), (there["lat"], there["lon"])) < 0.01
        await sim.clear(VID, "not_returned")
        assert car.at_home and watch.last(VID, "location")["speed_kmh"] == 0

        # On its way home, the driver turns off to another town instead.
        car.put((town.lat, town.lon), town.id)
        await visit_over(car)
        assert car.state.mode is Mode.DRIVING and car.state.trip is not None
        assert car.state.trip.dest_station == car.home.id
        await sim.cause(VID, "not_returned")
        assert car.state.trip is not None and car.state.trip.dest_station != car.home.id
        await sim.clear(VID, "not_returned", drive=False)
        assert car.at_home and watch.last(VID, "location")["speed_kmh"] == 0


@integration
async def test_a_condition_is_refused_when_the_car_cannot_have_it(stack: Stack, unique: Unique) -> None:
    async with small_fleet(stack, unique, speed=120) as sim:
        await sim.cause(VID, "unlocked_unattended")
        with pytest.raises(ValueError, match="already has unlocked_unattended"):
            await sim.cause(VID, "charging_fault")
        await sim.clear(VID, "unlocked_unattended")
        await sim.cause("ZOE-002", "moved_without_trip")
        assert "already has moved_without_trip" in (sim.cannot_cause("ZOE-002", "vehicle_silent") or "")
        away = sim.cars["ZOE-003"]
        away.put(nearby((away.home.lat, away.home.lon), away.rng, AREA), "")
        for cond in ("charging_fault", "left_service_area", "moved_without_trip"):
            assert "not parked at its station" in (sim.cannot_cause("ZOE-003", cond) or "")
        assert sim.cannot_cause("ZOE-003", "unlocked_unattended") is None
        with pytest.raises(ValueError):
            await sim.cause("ZOE-002", "no_such_condition")
        await sim.clear("ZOE-002", "moved_without_trip", drive=False)
        assert sim.cars["ZOE-002"].at_home and sim.cannot_cause("ZOE-002", "left_service_area") is None


@integration
async def test_the_incident_cycle_causes_holds_and_clears_each_condition(stack: Stack, unique: Unique) -> None:
    iv = Intervals(battery_parked_s=600, battery_driving_s=120, location_driving_s=30, location_parked_s=600)
    cfg = SimConfig(port=stack.broker.port, prefix=unique.prefix, fleet=FLEET, vehicles=8, seed=5,
                    start_hour=3.0, speed=1500, intervals=iv)  # fmt: skip
    async with SimFleet(cfg) as sim:
        for car in sim.cars.values():
            car.autonomous = False
            car.state = replace(car.state, soc_pct=90.0)  # enough to leave the area and back
        await sim.wait_ready(10)
        lines: list[str] = []
        incidents = Incidents(sim, hold_s=0.3, in_use=lambda: {"ZOE-001"}, say=lines.append)
        tasks = [incidents.start() for _ in CYCLE]
        assert all(t is not None for t in tasks)
        await asyncio.wait_for(asyncio.gather(*(t for t in tasks if t is not None)), 20)
        caused = [line for line in lines if ": caused" in line]
        assert sorted(c.split()[1] for c in caused) == sorted(CYCLE), lines  # each once, at the same time
        assert incidents.caused == incidents.cleared == len(CYCLE)
        cars = {c.split()[3].rstrip(":") for c in caused}
        assert len(cars) == len(CYCLE) and "ZOE-001" not in cars  # one car each, never the rented one
        assert all(car.at_home and not car.held and not car.muted for car in sim.cars.values())
        assert incidents.candidates(Condition.MOVED_WITHOUT_TRIP)


@integration
async def test_sigusr1_plays_moved_without_trip_now(stack: Stack, unique: Unique, watch: Watch, tmp_path: Path) -> None:
    pid_file = tmp_path / "run" / "sim.pid"
    argv = [sys.executable, "-m", "device_sim", "--port", str(stack.broker.port), "--prefix", unique.prefix,
            "--vehicles", "3", "--speed", "600", "--start-hour", "22", "--seed", "3", "--quiet",
            "--incident-hold", "0.5", "--pid-file", str(pid_file), "--duration", "60"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []

    async def read() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode().rstrip())

    reader = asyncio.create_task(read())
    try:
        await async_wait_for(pid_file.exists, 10, "the pid file")
        assert int(pid_file.read_text()) == proc.pid
        ids = list(FLEET.vehicles)[:3]
        await async_wait_for(lambda: all(watch.docs(v, "doors") for v in ids), 10, "every car's state")
        os.kill(int(pid_file.read_text()), signal.SIGUSR1)
        line = await async_wait_for(lambda: next((x for x in lines if "moved_without_trip" in x), None), 10, "it")
        assert line.startswith("device_sim: incident moved_without_trip on ") and ": caused" in line
        vid = line.split()[4].rstrip(":")
        await async_wait_for(lambda: any(d["speed_kmh"] > 10 for d in watch.docs(vid, "location")), 5, "moving")
        await async_wait_for(lambda: any(x.endswith(f"{vid}: cleared") for x in lines), 10, "the clear")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert not pid_file.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


# ---- end to end: the gateway's alerts reach a webhook ---------------------------------------------


def alert_of(type_: str, vid: str, event: str) -> Callable[[Receiver], list[Delivery]]:
    def find(r: Receiver) -> list[Delivery]:
        return [
            d for d in r.accepted(event) if d.event["data"]["type"] == type_ and d.event["data"]["vehicle_id"] == vid
        ]

    return find


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver(SECRET).start()
    yield r
    await r.stop()


@integration
async def test_moved_without_trip_reaches_the_webhook_and_resolves(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any], receiver: Receiver
) -> None:
    vid = "ZOE-005"
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        await start_env(stack, unique, tmp_path, aiohttp_client, sim, alerts__check_every_s=0.2,
                        webhooks__endpoints=[{"url": receiver.url, "secret": SECRET}])  # fmt: skip
        await sim.cause(vid, "moved_without_trip")
        t0 = time.time()  # the reading published: from here the alert is due within a second (docs/operations.md)
        assert orjson.loads(sim.cars[vid].last_sent["location"])["speed_kmh"] > 10
        (opened,) = await receiver.wait(alert_of("moved_without_trip", vid, "alert.opened"), 5, what="alert.opened")
        assert opened.received_s - t0 < 1.0, opened.received_s - t0
        alert = opened.event["data"]
        assert alert["severity"] == "critical" and alert["resolved_at"] is None and alert["reservation_id"] is None
        assert alert["details"]["speed_kmh"] > 10
        await sim.clear(vid, "moved_without_trip")
        (resolved,) = await receiver.wait(alert_of("moved_without_trip", vid, "alert.resolved"), 5, what="resolved")
        assert resolved.event["data"]["id"] == alert["id"] and resolved.event["data"]["resolved_at"]
        assert len(alert_of("moved_without_trip", vid, "alert.opened")(receiver)) == 1  # opened once, not per report
        assert receiver.refused == []


@integration
async def test_unlocked_unattended_reaches_the_webhook_and_resolves(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any], receiver: Receiver
) -> None:
    vid = "ZOE-006"
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        await start_env(stack, unique, tmp_path, aiohttp_client, sim, alerts__check_every_s=0.2,
                        alerts__unattended_after_s=1,
                        webhooks__endpoints=[{"url": receiver.url, "secret": SECRET}])  # fmt: skip
        t0 = time.time()
        await sim.cause(vid, "unlocked_unattended")
        (opened,) = await receiver.wait(alert_of("unlocked_unattended", vid, "alert.opened"), 5, what="opened")
        assert 1.0 <= opened.received_s - t0 < 2.5, opened.received_s - t0
        alert = opened.event["data"]
        assert alert["severity"] == "warning" and alert["details"]["locked"] is False
        await sim.clear(vid, "unlocked_unattended")
        (resolved,) = await receiver.wait(alert_of("unlocked_unattended", vid, "alert.resolved"), 5, what="resolved")
        assert resolved.event["data"]["id"] == alert["id"]
        assert receiver.refused == []
