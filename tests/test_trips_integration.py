"""Trips and the end of a rental end to end: real Mosquitto and InfluxDB, the gateway in-process, simulated cars.

The cars are parked, locked and plugged in at their stations (3 a.m. in the
simulator); each test plays the driver through ``SimFleet.act``.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from device_sim import SimFleet
from gateway.rules.billing import month_of
from gateway.times import rfc3339_ms
from tests.conftest import Stack, Unique
from tests.helpers import AUTH, async_wait_for, mosquitto_pub
from tests.test_booking_integration import FLEET, Env, body, sim_config, start_env

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Env]:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        yield await start_env(stack, unique, tmp_path, aiohttp_client, sim)


async def rent(env: Env, rid: str, vehicle: str, **extra: Any) -> dict[str, Any]:
    """Book `vehicle` from 5 minutes ago for an hour, walk up to it (it reports) and unlock it: the trip starts."""
    assert (await env.put(rid, body(vehicle, **extra)))[0] == 201
    await env.sim.act(vehicle)
    status, answer = await env.post(f"/v1/vehicles/{vehicle}/unlock", {"reservation_id": rid})
    assert status == 200, answer
    return dict(answer)


def last_sent(env: Env, vehicle: str, kind: str) -> dict[str, Any]:
    return dict(orjson.loads(env.sim.cars[vehicle].last_sent[kind]))


async def end(env: Env, rid: str, data: Any = None) -> tuple[int, Any]:
    r = await env.client.post(f"/v1/reservations/{rid}/end", json=data, headers=AUTH)
    return r.status, await r.json()


async def get(env: Env, path: str, **params: str) -> tuple[int, Any]:
    r = await env.client.get(path, params=params, headers=AUTH)
    return r.status, await r.json()


async def test_a_trip_from_unlock_to_return(env: Env) -> None:
    await rent(env, "R-t1", "ZOE-001")
    odometer = last_sent(env, "ZOE-001", "location")["odometer_km"]
    soc = last_sent(env, "ZOE-001", "battery")["soc_pct"]
    status, running = await get(env, "/v1/reservations/R-t1/trip")
    assert status == 200 and running["ended_at"] is None and running["end"] is None and running["amount_eur"] is None
    assert running["start"] == {"odometer_km": odometer, "soc_pct": soc}
    # The drive: 12.3 km and 10 % of the battery, then back, parked, closed, plugged in.
    await env.sim.act("ZOE-001", odometer_km=round(odometer + 12.3, 1), soc_pct=soc - 10, plugged=True)
    status, trip = await end(env, "R-t1")
    assert status == 200, trip
    assert trip["ended_by"] == "user" and trip["forced"] is False and trip["end"]["at_station"] is True
    assert trip["distance_km"] == 12.3
    assert trip["energy_kwh"] == pytest.approx(
        (soc - last_sent(env, "ZOE-001", "battery")["soc_pct"]) / 100 * 52, abs=0.01
    )
    # Booked for 65 minutes, back within them: the booked span, rounded up to 75, at 1.50 EUR an hour.
    assert (trip["billed_min"], trip["amount_eur"], trip["late_min"]) == (75, 1.88, 0.0)
    assert env.sim.doors("ZOE-001")[0] is True  # locked by the end of the rental

    status, r = await get(env, "/v1/reservations/R-t1")
    assert r["status"] == "completed"
    status, answer = await env.post("/v1/vehicles/ZOE-001/unlock", {"reservation_id": "R-t1"})
    assert (status, answer["error"]["code"]) == (409, "reservation_not_active")  # ended is ended
    status, answer = await end(env, "R-t1")
    assert (status, answer["error"]["code"]) == (409, "reservation_not_active")  # ending twice
    status, listed = await get(env, "/v1/trips", vehicle_id="ZOE-001")
    assert [t["reservation_id"] for t in listed["trips"]] == ["R-t1"] and listed["trips"][0] == trip
    status, audit = await get(env, "/v1/vehicles/ZOE-001/commands")
    assert [(c["action"], c["source"]) for c in audit["commands"]] == [("lock", "end_of_rental"), ("unlock", "api")]
    rows = await async_wait_for(lambda: env.q("SELECT * FROM trips"), what="the trips point")
    (row,) = rows
    assert (row["reservation_id"], row["kind"], row["station"]) == ("R-t1", "public", "alencon-cd61")
    assert (row["billed_min"], row["amount_eur"], row["ended_by"]) == (75, 1.88, "user")


@pytest.mark.parametrize(
    ("vehicle", "change", "failed"),
    [
        ("ZOE-002", {"plugged": False}, ["plugged"]),
        ("ZOE-005", {"closed": False}, ["doors_closed"]),
        ("ZOE-006", {"speed_kmh": 20.0}, ["parked"]),
        ("ZOE-007", {"lat": 48.3853}, ["at_station"]),  # 1.1 km from Bellême's station
    ],
)
async def test_each_end_check_failing_alone_is_named_and_sends_nothing(
    env: Env, vehicle: str, change: dict[str, Any], failed: list[str]
) -> None:
    rid = f"R-{vehicle}"
    await rent(env, rid, vehicle)
    await env.sim.act(vehicle, **change)
    status, answer = await end(env, rid)
    assert status == 409 and answer["error"]["code"] == "end_checks_failed", answer
    assert answer["error"]["failed"] == failed and answer["error"]["message"]
    _, audit = await get(env, f"/v1/vehicles/{vehicle}/commands")
    assert [c["action"] for c in audit["commands"]] == ["unlock"]  # no lock was sent
    home = FLEET.stations[FLEET.vehicles[vehicle].station]
    # The driver fixes it, as after the app showed the 409; then the rental ends.
    await env.sim.act(vehicle, plugged=True, closed=True, speed_kmh=0.0, lat=home.lat, lon=home.lon)
    status, trip = await end(env, rid)
    assert status == 200 and trip["forced"] is False, trip


async def test_force_skips_the_checks_and_says_so(env: Env) -> None:
    await rent(env, "R-force", "ZOE-008")
    await env.sim.act("ZOE-008", plugged=False)
    status, trip = await end(env, "R-force", {"force": True})
    assert status == 200 and trip["forced"] is True
    status, answer = await end(env, "R-bad-body", {"force": "yes"})
    assert (status, answer["error"]["code"]) == (422, "invalid_body")


async def test_a_trip_that_never_started(env: Env) -> None:
    assert (await env.put("R-never", body("ZOE-009")))[0] == 201
    status, answer = await end(env, "R-never")
    assert (status, answer["error"]["code"]) == (409, "reservation_not_active")
    status, answer = await get(env, "/v1/reservations/R-never/trip")
    assert (status, answer["error"]["code"]) == (404, "no_trip")
    status, answer = await get(env, "/v1/reservations/R-nope/trip")
    assert (status, answer["error"]["code"]) == (404, "unknown_reservation")


async def test_a_car_that_will_not_lock_keeps_the_trip_running(env: Env) -> None:
    await rent(env, "R-stuck", "ZOE-010")
    await env.sim.act("ZOE-010", closed=False)  # a door ajar: the car refuses to lock
    status, answer = await end(env, "R-stuck", {"force": True})
    assert (status, answer["error"]["code"], answer["error"]["reason"]) == (502, "command_failed", "door_open")
    _, trip = await get(env, "/v1/reservations/R-stuck/trip")
    assert trip["ended_at"] is None


async def test_the_automatic_end(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim, trips__auto_end_after_s=0)
        await rent(env, "R-auto", "ZOE-011", end=3 / 60)  # ends in 3 s
        await rent(env, "R-open", "ZOE-012", end=3 / 60)
        await sim.act("ZOE-011", locked=True)  # the driver locked it with the key card
        await sim.act("ZOE-012", locked=False)  # left unlocked: not ended by itself

        async def auto_ended() -> Any:
            _, t = await get(env, "/v1/reservations/R-auto/trip")
            return t["ended_at"] and t

        trip = await async_wait_for(auto_ended, timeout=15, what="the automatic end")
        assert trip["ended_by"] == "auto" and trip["forced"] is False
        await asyncio.sleep(1.5)  # a tick of the automatic end later
        _, other = await get(env, "/v1/reservations/R-open/trip")
        assert other["ended_at"] is None
        _, audit = await get(env, "/v1/vehicles/ZOE-011/commands")
        assert [c["action"] for c in audit["commands"]] == ["unlock"]  # no command sent


async def test_the_usage_statement_adds_up(env: Env) -> None:
    renters = [
        ("ZOE-013", "public", "U-a"),
        ("ZOE-014", "staff", "U-b"),
        ("ZOE-015", "public", "U-a"),
        ("ZOE-016", "public", "=cmd|' /C calc'!A0"),
    ]
    for i, (vehicle, kind, user) in enumerate(renters):
        await rent(env, f"R-u{i}", vehicle, kind=kind, user_id=user)
        status, trip = await end(env, f"R-u{i}")
        assert status == 200, trip
    month = month_of(rfc3339_ms(trip["started_at"]), "Europe/Paris")
    status, report = await get(env, "/v1/reports/usage", month=month)
    assert status == 200, report
    if report["totals"]["trips"] != 4:
        pytest.skip("the four trips straddle midnight at the end of a month in Europe/Paris")
    total = sum(round(u["total_eur"] * 100) for u in report["users"])
    assert total == round((report["totals"]["amount_eur"] + report["totals"]["fees_eur"]) * 100)
    users = {u["user_id"]: u for u in report["users"]}
    assert users["U-a"]["trips"] == 2 and users["U-a"]["fee_eur"] == 4.0 and users["U-a"]["amount_eur"] == 3.76
    assert users["U-b"]["fee_eur"] == 0.0 and users["U-b"]["amount_eur"] == 0.0  # staff only
    assert report["by_kind"]["staff"]["trips"] == 1 and len(report["by_vehicle"]) == len(FLEET.vehicles)
    r = await env.client.get("/v1/reports/usage", params={"month": month, "format": "csv"}, headers=AUTH)
    assert r.status == 200 and r.content_type == "text/csv"
    parsed = list(csv.reader(io.StringIO(await r.text())))
    assert parsed[0][0] == "user_id" and "'=cmd|' /C calc'!A0" in [p[0] for p in parsed[1:]]
    for bad in ("2026-13", "", "nov"):
        status, answer = await get(env, "/v1/reports/usage", month=bad)
        assert (status, answer["error"]["code"]) == (422, "invalid_month"), bad


async def test_stale_readings_fail_fresh(
    stack: Stack, unique: Unique, tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    async with SimFleet(sim_config(stack, unique)) as sim:
        await sim.wait_ready(timeout=15)
        env = await start_env(stack, unique, tmp_path, aiohttp_client, sim, trips__max_state_age_s=1)
        await rent(env, "R-stale", "ZOE-017")
        await asyncio.sleep(1.5)  # the car has said nothing since: its readings are older than a second
        status, answer = await end(env, "R-stale")
        assert (status, answer["error"]["failed"]) == (409, ["fresh"]), answer
        await sim.act("ZOE-017")
        status, trip = await end(env, "R-stale")
        assert status == 200, trip


async def test_a_car_that_reports_no_odometer(env: Env) -> None:
    await rent(env, "R-odo", "ZOE-018")
    home = FLEET.stations[FLEET.vehicles["ZOE-018"].station]
    await mosquitto_pub(
        env.stack.broker.port,
        f"{env.unique.prefix}/ZOE-018/location",
        orjson.dumps({"lat": home.lat, "lon": home.lon, "speed_kmh": 0}),  # a box with no odometer
    )
    await async_wait_for(
        lambda: env.rt.state.vehicles["ZOE-018"].readings["location"].fields.get("odometer_km") is None,
        what="the reading without odometer",
    )
    status, trip = await end(env, "R-odo")
    assert status == 200, trip
    assert trip["distance_km"] is None and trip["end"]["odometer_km"] is None and trip["billed_min"] == 75
