"""Trips and the end of a rental: the checks on the car, and the trip's figures. Pure.

A trip starts at the first ``done`` unlock of its reservation and ends when
the rental is ended — by the user (``POST …/end``, after the checks and a
lock) or by the gateway itself after ``trips.auto_end_after_s``. Its figures
come from the car's latest readings at those two moments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from gateway.rules.billing import Tariff, amount_cents, billed_minutes
from gateway.rules.geo import distance_m
from gateway.rules.reservations import Kind, Reservation

Check = Literal["fresh", "parked", "doors_closed", "at_station", "plugged"]
CHECKS: tuple[Check, ...] = ("fresh", "parked", "doors_closed", "at_station", "plugged")
EndedBy = Literal["user", "auto"]


@dataclass(frozen=True)
class Readings:
    """What the gateway last heard from a car, as far as ending a rental needs it."""

    location_ms: int | None = None
    lat: float | None = None
    lon: float | None = None
    speed_kmh: float | None = None
    odometer_km: float | None = None
    doors_ms: int | None = None
    locked: bool | None = None
    closed: bool | None = None
    soc_pct: float | None = None
    plugged: bool | None = None


@dataclass(frozen=True)
class Place:
    """The car's home station as the checks see it."""

    lat: float
    lon: float
    radius_m: float


def at_station(r: Readings, home: Place) -> bool:
    if r.lat is None or r.lon is None:
        return False
    return distance_m(r.lat, r.lon, home.lat, home.lon) <= home.radius_m


def failed_checks(r: Readings, home: Place, now_ms: int, max_age_ms: int, checks: Iterable[Check]) -> list[Check]:
    """The checks (in the contract's order) the car does not pass now; empty when it may be returned."""
    wanted = set(checks)
    failed: list[Check] = []
    for check in CHECKS:
        if check not in wanted:
            continue
        if check == "fresh":
            ok = all(ts is not None and now_ms - ts <= max_age_ms for ts in (r.location_ms, r.doors_ms))
        elif check == "parked":
            ok = r.speed_kmh is None or r.speed_kmh == 0
        elif check == "doors_closed":
            ok = r.closed is True
        elif check == "at_station":
            ok = at_station(r, home)
        else:
            ok = r.plugged is True
        if not ok:
            failed.append(check)
    return failed


@dataclass(frozen=True)
class Trip:
    reservation_id: str
    vehicle_id: str
    user_id: str
    kind: Kind
    station: str
    booked_start_ms: int
    booked_end_ms: int
    started_ms: int
    start_odometer_km: float | None
    start_soc_pct: float | None
    ended_ms: int | None = None
    ended_by: EndedBy | None = None
    forced: bool = False
    end_odometer_km: float | None = None
    end_soc_pct: float | None = None
    end_at_station: bool | None = None
    distance_km: float | None = None
    energy_kwh: float | None = None
    duration_min: float | None = None
    late_min: float | None = None
    billed_min: int | None = None
    amount_cents: int | None = None

    @property
    def running(self) -> bool:
        return self.ended_ms is None

    @property
    def amount_eur(self) -> float | None:
        return None if self.amount_cents is None else self.amount_cents / 100


def start_trip(r: Reservation, station: str, readings: Readings, now_ms: int) -> Trip:
    return Trip(
        reservation_id=r.id,
        vehicle_id=r.vehicle_id,
        user_id=r.user_id,
        kind=r.kind,
        station=station,
        booked_start_ms=r.starts_ms,
        booked_end_ms=r.ends_ms,
        started_ms=now_ms,
        start_odometer_km=readings.odometer_km,
        start_soc_pct=readings.soc_pct,
    )


def end_trip(
    t: Trip,
    readings: Readings,
    home: Place,
    battery_kwh: float,
    tariff: Tariff,
    now_ms: int,
    ended_by: EndedBy,
    forced: bool = False,
) -> Trip:
    """The trip closed now, with every figure the contract defines."""
    distance = None
    if t.start_odometer_km is not None and readings.odometer_km is not None:
        distance = round(max(0.0, readings.odometer_km - t.start_odometer_km), 1)
    energy = None
    if t.start_soc_pct is not None and readings.soc_pct is not None:
        energy = round(max(0.0, t.start_soc_pct - readings.soc_pct) / 100 * battery_kwh, 2)
    actual_ms = max(0, now_ms - t.started_ms)
    billed = billed_minutes(t.booked_end_ms - t.booked_start_ms, actual_ms, tariff.increment_min)
    return replace(
        t,
        ended_ms=now_ms,
        ended_by=ended_by,
        forced=forced,
        end_odometer_km=readings.odometer_km,
        end_soc_pct=readings.soc_pct,
        end_at_station=at_station(readings, home),
        distance_km=distance,
        energy_kwh=energy,
        duration_min=round(actual_ms / 60_000, 1),
        late_min=round(max(0, now_ms - t.booked_end_ms) / 60_000, 1),
        billed_min=billed,
        amount_cents=amount_cents(billed, t.kind, tariff),
    )


def may_auto_end(
    t: Trip, r: Readings, home: Place, now_ms: int, max_age_ms: int, checks: Iterable[Check], after_ms: int
) -> bool:
    """Past ``ends_at`` by `after_ms`, every check passes and the car is locked: the gateway ends it itself."""
    return (
        t.running
        and now_ms >= t.booked_end_ms + after_ms
        and r.locked is True
        and not failed_checks(r, home, now_ms, max_age_ms, checks)
    )
