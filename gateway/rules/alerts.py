"""The alert rules: which alerts should open and which should resolve, for one car, now. Pure.

Input is a :class:`CarView` — what the alert monitor knows of a car from
readings that were current when they arrived (a replayed old reading never
reaches it) — with the car's upcoming reservations and running trip, and
the alerts of that car already open. :func:`evaluate` returns the changes;
the monitor (``gateway/notify/alerts.py``) records them. Each type opens
and resolves on its own condition (the contract's table), so a car at the
edge of one does not open and resolve it on every reading: a car that
moved opens ``moved_without_trip`` beyond 500 m and resolves it only back
within its station's radius, parked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.rules.geo import distance_m

__all__ = [
    "ALERT_TYPES",
    "PER_MESSAGE",
    "SCHEDULED",
    "SEVERITY",
    "Alert",
    "AlertKey",
    "AlertType",
    "CarView",
    "Context",
    "Open",
    "Resolve",
    "Severity",
    "Thresholds",
    "Upcoming",
    "evaluate",
    "location_is_news",
    "projected_soc",
]

AlertType = Literal[
    "vehicle_silent",
    "low_battery_before_reservation",
    "not_returned",
    "unlocked_unattended",
    "moved_without_trip",
    "left_service_area",
    "charging_fault",
]
Severity = Literal["info", "warning", "critical"]
SEVERITY: dict[AlertType, Severity] = {
    "vehicle_silent": "warning",
    "low_battery_before_reservation": "warning",
    "not_returned": "warning",
    "unlocked_unattended": "warning",
    "moved_without_trip": "critical",
    "left_service_area": "warning",
    "charging_fault": "info",
}
ALERT_TYPES: tuple[AlertType, ...] = tuple(SEVERITY)
# Decided when a reading arrives: the reading itself is the news.
PER_MESSAGE: frozenset[AlertType] = frozenset({"moved_without_trip", "left_service_area"})
# Decided by the scheduled check: they need time to pass (or a reservation to come near).
SCHEDULED: frozenset[AlertType] = frozenset(ALERT_TYPES) - PER_MESSAGE

MOVING_KMH = 10.0
AWAY_M = 500.0
# Back inside the service area means inside by this much: a car parked on its edge, with GPS noise,
# would otherwise open and resolve it on every reading.
AREA_MARGIN_M = 200.0
M_PER_DEG_LAT = 111_320.0
FULL_ENOUGH_PCT = 80.0  # a car charged to this is not in need of charging

AlertKey = tuple[str, str, str]  # (type, vehicle_id, reservation_id or "")


@dataclass(frozen=True)
class Thresholds:
    silent_after_ms: int = 900_000
    battery_horizon_ms: int = 7_200_000
    min_soc_at_start_pct: float = 30.0
    return_grace_ms: int = 900_000
    unattended_after_ms: int = 600_000
    charging_fault_after_ms: int = 1_800_000


@dataclass(frozen=True)
class Alert:
    id: str
    type: AlertType
    vehicle_id: str
    reservation_id: str | None
    opened_ms: int
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    resolved_ms: int | None = None

    @property
    def severity(self) -> Severity:
        return SEVERITY[self.type]

    @property
    def key(self) -> AlertKey:
        return (self.type, self.vehicle_id, self.reservation_id or "")


@dataclass(slots=True)  # not frozen: built for every location message, and a frozen init costs 4x
class CarView:
    """A car as the alert rules see it; each time is the reading's own ``ts`` (ms)."""

    vehicle_id: str
    heard_ms: int | None = None  # when anything was last received from it
    location_ms: int | None = None
    lat: float | None = None
    lon: float | None = None
    speed_kmh: float | None = None
    doors_ms: int | None = None
    locked: bool | None = None
    closed: bool | None = None
    open_since_ms: int | None = None  # unlocked or not closed, without a break, since
    battery_ms: int | None = None
    soc_pct: float | None = None
    charging: bool | None = None
    plugged: bool | None = None
    stalled_since_ms: int | None = None  # plugged, under 80 %, not charging, without a break, since
    trip_running: bool = False


@dataclass(frozen=True)
class Upcoming:
    """A reservation of the car, as far as the rules need it."""

    reservation_id: str
    starts_ms: int
    ends_ms: int
    trip_running: bool = False  # its trip started and has not ended


@dataclass(frozen=True)
class Context:
    """What does not change between two looks at a car: its station, its model, the thresholds."""

    home_lat: float
    home_lon: float
    home_radius_m: float
    # lat_min, lat_max, lon_min, lon_max; None: no service area configured
    area: tuple[float, float, float, float] | None
    ac_charge_kw: float
    battery_kwh: float
    thresholds: Thresholds
    # lat_min, lat_max, lon_min, lon_max of a square around the station inside the AWAY_M circle
    near_home: tuple[float, float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        half_m = AWAY_M / math.sqrt(2)
        dlat = half_m / M_PER_DEG_LAT
        dlon = half_m / (M_PER_DEG_LAT * max(0.01, math.cos(math.radians(self.home_lat))))
        box = (self.home_lat - dlat, self.home_lat + dlat, self.home_lon - dlon, self.home_lon + dlon)
        object.__setattr__(self, "near_home", box)


@dataclass(frozen=True)
class Open:
    type: AlertType
    vehicle_id: str
    reservation_id: str | None
    message: str
    details: dict[str, Any]


@dataclass(frozen=True)
class Resolve:
    alert: Alert
    why: str


Change = Open | Resolve


def location_is_news(ctx: Context, lat: float, lon: float, speed_kmh: float | None, trip_running: bool) -> bool:
    """Whether a position could open a per-message alert; False for the common case — parked or slow near
    its station (or on a trip), inside the service area — with a few comparisons instead of a distance.
    Only for a car with no alert open (an open one needs :func:`evaluate` to see if it resolves)."""
    if not trip_running:
        lat_min, lat_max, lon_min, lon_max = ctx.near_home
        if (speed_kmh or 0.0) > MOVING_KMH or not (lat_min <= lat <= lat_max and lon_min <= lon <= lon_max):
            return True
    if ctx.area is not None:
        a_lat_min, a_lat_max, a_lon_min, a_lon_max = ctx.area
        return not (a_lat_min <= lat <= a_lat_max and a_lon_min <= lon <= a_lon_max)
    return False


def projected_soc(soc_pct: float, charging: bool, ac_charge_kw: float, battery_kwh: float, hours: float) -> float:
    """The state of charge `hours` from now: the latest, plus the model's AC charging power while charging."""
    if not charging or battery_kwh <= 0:
        return soc_pct
    return min(100.0, soc_pct + ac_charge_kw * max(0.0, hours) / battery_kwh * 100)


def _from_home_m(car: CarView, ctx: Context) -> float | None:
    if car.lat is None or car.lon is None:
        return None
    return distance_m(car.lat, car.lon, ctx.home_lat, ctx.home_lon)


def _outside(car: CarView, ctx: Context, margin_m: float = 0.0) -> bool | None:
    """Outside the service area (shrunk by `margin_m` on every side); None if unknown or no area."""
    if ctx.area is None or car.lat is None or car.lon is None:
        return None
    lat_min, lat_max, lon_min, lon_max = ctx.area
    dlat = margin_m / M_PER_DEG_LAT
    dlon = margin_m / (M_PER_DEG_LAT * max(0.01, math.cos(math.radians(car.lat))))
    return not (lat_min + dlat <= car.lat <= lat_max - dlat and lon_min + dlon <= car.lon <= lon_max - dlon)


def _s(ms: int) -> str:
    return f"{ms / 60_000:.0f} min" if ms >= 60_000 else f"{ms / 1000:.0f} s"


def _car_rules(
    car: CarView, ctx: Context, now: int, quiet_until_ms: int, type_: AlertType, is_open: bool
) -> Open | str | None:
    """For an alert of the car itself: the Open if it should open, the reason if it should resolve, else None."""
    th = ctx.thresholds
    vid = car.vehicle_id
    if type_ == "vehicle_silent":
        quiet = now - car.heard_ms if car.heard_ms is not None else None
        silent = (quiet is None or quiet > th.silent_after_ms) and now >= quiet_until_ms
        if not is_open and silent:
            heard = "never heard since the gateway started" if quiet is None else f"nothing heard for {_s(quiet)}"
            return Open(type_, vid, None, f"{vid}: {heard}", {"last_heard_ms": car.heard_ms})
        if is_open and quiet is not None and quiet <= th.silent_after_ms:
            return "heard again"
        return None
    if type_ == "moved_without_trip":
        away = _from_home_m(car, ctx)
        if not is_open:
            if car.trip_running or away is None:
                return None
            speed = car.speed_kmh or 0.0
            if speed > MOVING_KMH or away > AWAY_M:
                what = f"is moving with no trip at {speed:.0f} km/h" if speed > MOVING_KMH else "is away with no trip"
                return Open(
                    type_, vid, None,
                    f"{vid} {what}, {away:.0f} m from its station",
                    {"speed_kmh": speed, "distance_m": round(away), "lat": car.lat, "lon": car.lon},
                )  # fmt: skip
            return None
        if away is not None and away <= ctx.home_radius_m and not car.speed_kmh:
            return "back at its station, parked"
        return None
    if type_ == "left_service_area":
        if not is_open:
            if _outside(car, ctx):
                return Open(type_, vid, None, f"{vid} is outside the service area", {"lat": car.lat, "lon": car.lon})
            return None
        if _outside(car, ctx, AREA_MARGIN_M) is False:
            return "back inside the service area"
        return None
    if type_ == "unlocked_unattended":
        if not is_open:
            since = car.open_since_ms
            if since is not None and not car.trip_running and now - since >= th.unattended_after_ms:
                what = "unlocked" if car.locked is False else "not closed"
                return Open(
                    type_, vid, None, f"{vid} has stood {what} for {_s(now - since)} with no trip",
                    {"locked": car.locked, "closed": car.closed, "since_ms": since},
                )  # fmt: skip
            return None
        if car.locked is True and car.closed is not False:
            return "locked and closed"
        return None
    if type_ == "charging_fault":
        if not is_open:
            since = car.stalled_since_ms
            away = _from_home_m(car, ctx)
            at_home = away is not None and away <= ctx.home_radius_m
            if since is not None and at_home and now - since >= th.charging_fault_after_ms:
                return Open(
                    type_, vid, None,
                    f"{vid} is plugged in at its station but has not charged for {_s(now - since)} "
                    f"({car.soc_pct:.0f} %)",
                    {"soc_pct": car.soc_pct, "since_ms": since},
                )  # fmt: skip
            return None
        if car.charging or car.plugged is False or (car.soc_pct is not None and car.soc_pct >= FULL_ENOUGH_PCT):
            return "charging, unplugged or charged"
        return None
    raise ValueError(f"{type_} is not a per-car alert")


def _reservation_rule(
    car: CarView, ctx: Context, now: int, type_: AlertType, r: Upcoming | None, is_open: bool
) -> Open | str | None:
    """For an alert about a reservation of the car; `r` is None when it is no longer among the car's."""
    th = ctx.thresholds
    vid = car.vehicle_id
    if type_ == "low_battery_before_reservation":
        if r is None or now >= r.starts_ms:
            return "the reservation started or was cancelled" if is_open else None
        if car.soc_pct is None:
            return None
        projected = projected_soc(
            car.soc_pct, bool(car.charging), ctx.ac_charge_kw, ctx.battery_kwh, (r.starts_ms - now) / 3_600_000
        )
        low = projected < th.min_soc_at_start_pct
        if not is_open and low and r.starts_ms - now <= th.battery_horizon_ms:
            return Open(
                type_, vid, r.reservation_id,
                f"{vid} is expected at {projected:.0f} % when reservation {r.reservation_id} starts "
                f"in {_s(r.starts_ms - now)}",
                {"soc_pct": car.soc_pct, "charging": bool(car.charging), "projected_soc_pct": round(projected, 1),
                 "starts_ms": r.starts_ms},
            )  # fmt: skip
        if is_open and not low:
            return f"expected at {projected:.0f} % at the start"
        return None
    if type_ == "not_returned":
        if r is None or not r.trip_running:
            return "the trip ended" if is_open else None
        late = now - r.ends_ms
        if not is_open and late >= th.return_grace_ms:
            return Open(
                type_, vid, r.reservation_id,
                f"{vid} is not back: reservation {r.reservation_id} ended {_s(late)} ago",
                {"ends_ms": r.ends_ms},
            )  # fmt: skip
        return None
    raise ValueError(f"{type_} is not a reservation alert")


_PER_RESERVATION: frozenset[AlertType] = frozenset({"low_battery_before_reservation", "not_returned"})


def evaluate(
    car: CarView,
    ctx: Context,
    now_ms: int,
    open_alerts: Mapping[AlertKey, Alert],
    types: Iterable[AlertType],
    reservations: Sequence[Upcoming] = (),
    quiet_until_ms: int = 0,
) -> list[Change]:
    """The changes to `car`'s alerts of `types` at `now_ms`: what opens, what resolves, at most one open per key.

    No ``vehicle_silent`` opens before `quiet_until_ms`: the gateway itself was not listening."""
    changes: list[Change] = []
    vid = car.vehicle_id
    by_id = {r.reservation_id: r for r in reservations}
    for type_ in types:
        if type_ not in _PER_RESERVATION:
            alert = open_alerts.get((type_, vid, ""))
            got = _car_rules(car, ctx, now_ms, quiet_until_ms, type_, alert is not None)
            _collect(changes, alert, got)
            continue
        rids = set(by_id) | {k[2] for k in open_alerts if k[0] == type_ and k[1] == vid}
        for rid in sorted(rids):
            alert = open_alerts.get((type_, vid, rid))
            got = _reservation_rule(car, ctx, now_ms, type_, by_id.get(rid), alert is not None)
            _collect(changes, alert, got)
    return changes


def _collect(changes: list[Change], alert: Alert | None, got: Open | str | None) -> None:
    if isinstance(got, Open) and alert is None:
        changes.append(got)
    elif isinstance(got, str) and alert is not None:
        changes.append(Resolve(alert, got))
