"""The pure physics of a simulated car: battery, charging, driving, odometer. No I/O, no clock, no randomness.

A car's state is a frozen ``CarState``; ``advance(state, model, dt_s)`` returns
the state ``dt_s`` simulated seconds later. Decisions (when to leave, where to
go, how fast) are made by the caller (``device_sim.car``) with its own seeded
random generator and passed in as a ``Trip``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway.fleet import Model

ROAD_FACTOR = 1.25  # road distance over straight-line distance, typical for rural Normandy
TAPER_FROM_PCT = 80.0  # AC charging slows down above this state of charge
TAPER_MIN_SHARE = 0.2  # ... to this share of the model's power at 100 %
AMBIENT_C = 12.0
EARTH_RADIUS_KM = 6371.0


class Mode(StrEnum):
    PARKED = "parked"
    DRIVING = "driving"


@dataclass(frozen=True, slots=True)
class Trip:
    origin: tuple[float, float]
    dest: tuple[float, float]
    dest_station: str
    road_km: float
    cruise_kmh: float
    done_km: float = 0.0


@dataclass(frozen=True, slots=True)
class CarState:
    lat: float
    lon: float
    soc_pct: float
    odometer_km: float
    station: str | None  # where it is parked, None while driving
    plugged: bool = True
    locked: bool = True
    closed: bool = True
    mode: Mode = Mode.PARKED
    speed_kmh: float = 0.0
    heading_deg: float = 0.0
    temp_c: float = AMBIENT_C
    trip: Trip | None = None
    charger_fault: bool = False  # plugged in, but the charger gives no current (device_sim.incidents)

    @property
    def charging(self) -> bool:
        return self.plugged and not self.charger_fault and self.soc_pct < 100.0


# ---- geometry ------------------------------------------------------------------------------


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h))


def bearing_deg(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (a[0], a[1], b[0], b[1]))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return (math.degrees(math.atan2(y, x)) + 360.0) % 360.0


def interpolate(a: tuple[float, float], b: tuple[float, float], frac: float) -> tuple[float, float]:
    frac = min(max(frac, 0.0), 1.0)
    return (a[0] + (b[0] - a[0]) * frac, a[1] + (b[1] - a[1]) * frac)


def road_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    return haversine_km(a, b) * ROAD_FACTOR


def destination(origin: tuple[float, float], bearing: float, km: float) -> tuple[float, float]:
    """The point `km` from `origin` along the great circle leaving it at `bearing` degrees."""
    lat1, lon1, b = math.radians(origin[0]), math.radians(origin[1]), math.radians(bearing)
    d = km / EARTH_RADIUS_KM
    lat2 = math.asin(math.sin(lat1) * math.cos(d) + math.cos(lat1) * math.sin(d) * math.cos(b))
    lon2 = lon1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(lat1), math.cos(d) - math.sin(lat1) * math.sin(lat2))
    return (math.degrees(lat2), math.degrees(lon2))


# ---- battery -------------------------------------------------------------------------------


def soc_drop_pct(km: float, model: Model) -> float:
    """State of charge (percentage points) used to drive `km` at the model's consumption."""
    return km * model.consumption_kwh_per_100km / 100.0 / model.battery_kwh * 100.0


def drained(state: CarState, soc_pct: float, model: Model) -> CarState:
    """The car with its charge down to `soc_pct` and the odometer up by the distance that energy drives:
    what a previous driver's trip leaves behind. Unchanged if it holds no more than that."""
    if state.soc_pct <= soc_pct:
        return state
    km = (state.soc_pct - soc_pct) / soc_drop_pct(1.0, model)
    return replace(state, soc_pct=soc_pct, odometer_km=state.odometer_km + km)


def range_km(soc_pct: float, model: Model) -> float:
    return soc_pct / 100.0 * model.battery_kwh / model.consumption_kwh_per_100km * 100.0


def charge_power_kw(soc_pct: float, model: Model) -> float:
    """AC power taken at this state of charge: the model's full power up to 80 %, tapering to 20 % at 100 %."""
    if soc_pct >= 100.0:
        return 0.0
    if soc_pct <= TAPER_FROM_PCT:
        return model.ac_charge_kw
    share = 1.0 - (1.0 - TAPER_MIN_SHARE) * (soc_pct - TAPER_FROM_PCT) / (100.0 - TAPER_FROM_PCT)
    return model.ac_charge_kw * share


def charge(soc_pct: float, hours: float, model: Model, step_h: float = 1 / 60) -> float:
    """State of charge after charging for `hours` (integrated in steps of `step_h`)."""
    left = hours
    while left > 0 and soc_pct < 100.0:
        dt = min(step_h, left)
        soc_pct = min(100.0, soc_pct + charge_power_kw(soc_pct, model) * dt / model.battery_kwh * 100.0)
        left -= dt
    return soc_pct


def battery_temp_c(prev_c: float, working: bool, dt_s: float) -> float:
    """Battery temperature relaxing towards ambient, or ambient + 8 °C while driving or charging."""
    target = AMBIENT_C + (8.0 if working else 0.0)
    k = 1.0 - math.exp(-dt_s / 1800.0)
    return prev_c + (target - prev_c) * k


# ---- driving -------------------------------------------------------------------------------


def start_trip(state: CarState, trip: Trip) -> CarState:
    """Unlock, unplug and drive off."""
    return replace(
        state,
        mode=Mode.DRIVING,
        trip=trip,
        station=None,
        plugged=False,
        locked=False,
        closed=True,
        speed_kmh=trip.cruise_kmh,
        heading_deg=round(bearing_deg(trip.origin, trip.dest), 1),
    )


def advance(state: CarState, model: Model, dt_s: float, home: str | None = None) -> CarState:
    """The state `dt_s` simulated seconds later.

    Driving: along the trip at cruise speed, the odometer rising and the
    battery falling by the model's consumption; on arrival the car parks,
    locks, and is plugged in if it arrived at its `home` station.
    Parked and plugged: charging at the model's AC power, unless the charger is faulty.
    """
    if dt_s <= 0:
        return state
    hours = dt_s / 3600.0
    if state.mode is Mode.DRIVING and state.trip is not None:
        trip = state.trip
        km = min(trip.cruise_kmh * hours, trip.road_km - trip.done_km)
        km = min(km, max(state.soc_pct, 0.0) / max(soc_drop_pct(1.0, model), 1e-9))  # stops when empty
        done = trip.done_km + km
        lat, lon = interpolate(trip.origin, trip.dest, done / trip.road_km if trip.road_km else 1.0)
        soc = max(0.0, state.soc_pct - soc_drop_pct(km, model))
        temp = battery_temp_c(state.temp_c, True, dt_s)
        if done >= trip.road_km - 1e-6:
            return replace(
                state,
                lat=trip.dest[0],
                lon=trip.dest[1],
                soc_pct=soc,
                odometer_km=state.odometer_km + km,
                mode=Mode.PARKED,
                trip=None,
                station=trip.dest_station,
                speed_kmh=0.0,
                locked=True,
                closed=True,
                plugged=trip.dest_station == home,
                temp_c=temp,
            )
        return replace(
            state,
            lat=lat,
            lon=lon,
            soc_pct=soc,
            odometer_km=state.odometer_km + km,
            trip=replace(trip, done_km=done),
            temp_c=temp,
        )
    soc = charge(state.soc_pct, hours, model) if state.charging else state.soc_pct
    return replace(state, soc_pct=soc, temp_c=battery_temp_c(state.temp_c, state.charging, dt_s))


# ---- payloads ------------------------------------------------------------------------------


def rfc3339_ms(epoch_s: float) -> str:
    """``2026-11-26T09:00:00.123Z``."""
    ms = round(epoch_s * 1000)
    t = time.gmtime(ms // 1000)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{ms % 1000:03d}Z"
    )


def battery_payload(s: CarState, model: Model, ts: str) -> dict[str, object]:
    return {
        "ts": ts,
        "soc_pct": round(s.soc_pct, 1),
        "range_km": round(range_km(s.soc_pct, model), 1),
        "charging": s.charging,
        "plugged": s.plugged,
        "temp_c": round(s.temp_c, 1),
    }


def location_payload(s: CarState, ts: str) -> dict[str, object]:
    return {
        "ts": ts,
        "lat": round(s.lat, 6),
        "lon": round(s.lon, 6),
        "speed_kmh": round(s.speed_kmh, 1),
        "heading_deg": round(s.heading_deg, 1) % 360.0,
        "odometer_km": round(s.odometer_km, 1),
    }


def doors_payload(s: CarState, ts: str) -> dict[str, object]:
    return {"ts": ts, "locked": s.locked, "closed": s.closed}
