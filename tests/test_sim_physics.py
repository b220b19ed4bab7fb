"""Unit tests of the simulator's pure physics: battery, charging, driving, odometer, timestamps."""

from __future__ import annotations

import random

import pytest

from device_sim import physics
from device_sim.car import NIGHT_END_H, NIGHT_START_H, plan_departure
from device_sim.physics import CarState, Mode, Trip
from gateway.fleet import Model

ZOE = Model("zoe", "Renault Zoé", 52.0, 17.0, 22.0)
KANGOO = Model("kangoo", "Renault Kangoo Z.E.", 33.0, 20.0, 7.4)
ALENCON = (48.4318, 0.0949)
ARGENTAN = (48.7444, -0.0203)


def parked(soc: float = 50.0, plugged: bool = True) -> CarState:
    return CarState(lat=ALENCON[0], lon=ALENCON[1], soc_pct=soc, odometer_km=1000.0, station="home", plugged=plugged)


@pytest.mark.parametrize(("model", "per_100km"), [(ZOE, 17 / 52 * 100), (KANGOO, 20 / 33 * 100)])
def test_soc_drop_follows_the_models_consumption(model: Model, per_100km: float) -> None:
    assert physics.soc_drop_pct(100.0, model) == pytest.approx(per_100km)
    assert physics.soc_drop_pct(10.0, model) == pytest.approx(per_100km / 10)


def test_range_is_the_energy_left_over_the_consumption() -> None:
    assert physics.range_km(100.0, ZOE) == pytest.approx(52 / 17 * 100)
    assert physics.range_km(50.0, KANGOO) == pytest.approx(16.5 / 20 * 100)


@pytest.mark.parametrize("model", [ZOE, KANGOO])
def test_charging_at_the_models_power_below_80_percent(model: Model) -> None:
    # one hour at full AC power adds ac_charge_kw / battery_kwh of the battery
    expected = 20.0 + model.ac_charge_kw / model.battery_kwh * 100.0
    assert expected < physics.TAPER_FROM_PCT
    assert physics.charge(20.0, 1.0, model) == pytest.approx(expected)


def test_charging_tapers_above_80_and_stops_at_100() -> None:
    assert physics.charge_power_kw(50.0, ZOE) == ZOE.ac_charge_kw
    assert physics.charge_power_kw(90.0, ZOE) < ZOE.ac_charge_kw
    assert physics.charge_power_kw(100.0, ZOE) == 0.0
    assert physics.charge(95.0, 10.0, ZOE) == 100.0


def test_a_parked_plugged_car_charges_and_an_unplugged_one_does_not() -> None:
    assert physics.advance(parked(40.0), KANGOO, 3600.0).soc_pct == pytest.approx(40 + 7.4 / 33 * 100)
    assert physics.advance(parked(40.0, plugged=False), KANGOO, 3600.0).soc_pct == 40.0
    assert parked(40.0).charging and not parked(100.0).charging


def test_driving_moves_the_car_raises_the_odometer_and_drains_the_battery() -> None:
    km = physics.road_km(ALENCON, ARGENTAN)
    assert 40 < km < 50  # 35 km as the crow flies, times the road factor
    trip = Trip(ALENCON, ARGENTAN, "argentan", km, cruise_kmh=60.0)
    s = physics.start_trip(parked(80.0), trip)
    assert s.mode is Mode.DRIVING and not s.locked and not s.plugged and s.speed_kmh == 60.0
    s = physics.advance(s, ZOE, 600.0)  # ten minutes at 60 km/h
    assert s.odometer_km == pytest.approx(1010.0)
    assert s.soc_pct == pytest.approx(80.0 - physics.soc_drop_pct(10.0, ZOE))
    assert ALENCON[0] < s.lat < ARGENTAN[0]
    assert s.mode is Mode.DRIVING


def test_arrival_parks_locks_and_plugs_in_only_at_home() -> None:
    km = physics.road_km(ALENCON, ARGENTAN)
    out = physics.start_trip(parked(80.0), Trip(ALENCON, ARGENTAN, "argentan", km, 60.0))
    away = physics.advance(out, ZOE, 3 * 3600.0, home="home")
    assert (away.mode, away.station, away.locked, away.plugged, away.speed_kmh) == (
        Mode.PARKED, "argentan", True, False, 0.0
    )  # fmt: skip
    assert away.odometer_km == pytest.approx(1000.0 + km)  # no further than the trip
    assert (away.lat, away.lon) == ARGENTAN
    back = physics.start_trip(away, Trip(ARGENTAN, ALENCON, "home", km, 60.0))
    home = physics.advance(back, ZOE, 3 * 3600.0, home="home")
    assert home.station == "home" and home.plugged and home.locked


def test_an_empty_battery_stops_the_car() -> None:
    s = physics.start_trip(parked(1.0), Trip(ALENCON, ARGENTAN, "argentan", 45.0, 60.0))
    s = physics.advance(s, ZOE, 3600.0)
    assert s.soc_pct == pytest.approx(0.0, abs=1e-9)
    assert s.odometer_km - 1000.0 == pytest.approx(1.0 / physics.soc_drop_pct(1.0, ZOE))


def test_heading_points_to_the_destination() -> None:
    assert physics.bearing_deg((48.0, 0.0), (49.0, 0.0)) == pytest.approx(0.0)
    assert physics.bearing_deg((48.0, 0.0), (48.0, 1.0)) == pytest.approx(90.0, abs=0.5)
    assert physics.bearing_deg(ALENCON, ARGENTAN) > 270  # north-north-west


def test_rfc3339_with_milliseconds_and_z() -> None:
    assert physics.rfc3339_ms(1795683600.123) == "2026-11-26T09:00:00.123Z"  # the contract's example
    assert physics.rfc3339_ms(1.9996) == "1970-01-01T00:00:02.000Z"  # rounding carries into the seconds


def test_payloads_carry_the_contract_fields() -> None:
    s = parked(81.53)
    assert physics.battery_payload(s, ZOE, "T") == {
        "ts": "T", "soc_pct": 81.5, "range_km": 249.4, "charging": True, "plugged": True, "temp_c": 12.0
    }  # fmt: skip
    assert set(physics.location_payload(s, "T")) == {"ts", "lat", "lon", "speed_kmh", "heading_deg", "odometer_km"}
    assert physics.doors_payload(s, "T") == {"ts": "T", "locked": True, "closed": True}


def test_departures_avoid_the_night() -> None:
    rng = random.Random(3)
    for i in range(500):
        t = plan_departure(rng, i * 977.0)
        hour = (t % 86400) / 3600
        assert NIGHT_END_H <= hour < NIGHT_START_H + 2, hour
