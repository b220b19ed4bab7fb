"""The alert rules (gateway/rules/alerts.py), as pure functions of the car, its reservations and the time."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.rules.alerts import (
    PER_MESSAGE,
    SCHEDULED,
    Alert,
    AlertKey,
    AlertType,
    CarView,
    Context,
    Open,
    Resolve,
    Thresholds,
    Upcoming,
    evaluate,
    location_is_news,
    projected_soc,
)

NOW = 1_795_683_600_000
HOME = (48.4318, 0.0949)
AWAY_600M = (48.4318 + 0.0054, 0.0949)  # about 600 m north
NEAR_300M = (48.4318 + 0.0027, 0.0949)  # about 300 m: past the 150 m radius, within 500 m
CTX = Context(
    home_lat=HOME[0],
    home_lon=HOME[1],
    home_radius_m=150.0,
    area=(48.15, 49.0, -0.9, 1.0),
    ac_charge_kw=7.4,
    battery_kwh=52.0,
    thresholds=Thresholds(),
)


def car(**kw: object) -> CarView:
    base: dict[str, object] = {"vehicle_id": "ZOE-001", "heard_ms": NOW, "lat": HOME[0], "lon": HOME[1],
                               "speed_kmh": 0.0, "locked": True, "closed": True}  # fmt: skip
    base.update(kw)
    return CarView(**base)  # type: ignore[arg-type]


def opened(t: AlertType, rid: str | None = None) -> dict[AlertKey, Alert]:
    a = Alert("alr_x", t, "ZOE-001", rid, NOW - 1000, "m")
    return {a.key: a}


def kinds(changes: list[Open | Resolve]) -> list[tuple[str, str]]:
    return [("open", c.type) if isinstance(c, Open) else ("resolve", c.alert.type) for c in changes]


def test_a_parked_car_at_home_raises_nothing() -> None:
    assert evaluate(car(), CTX, NOW, {}, [*PER_MESSAGE, *SCHEDULED]) == []


@pytest.mark.parametrize(
    ("where", "speed", "opens"),
    [(HOME, 11.0, True), (HOME, 10.0, False), (AWAY_600M, 0.0, True), (NEAR_300M, 0.0, False)],
)
def test_moved_without_trip_opens_over_10_kmh_or_past_500_m(
    where: tuple[float, float], speed: float, opens: bool
) -> None:
    changes = evaluate(car(lat=where[0], lon=where[1], speed_kmh=speed), CTX, NOW, {}, ["moved_without_trip"])
    assert kinds(changes) == ([("open", "moved_without_trip")] if opens else [])


def test_moved_without_trip_never_during_a_trip() -> None:
    assert (
        evaluate(car(lat=AWAY_600M[0], speed_kmh=80.0, trip_running=True), CTX, NOW, {}, ["moved_without_trip"]) == []
    )


def test_moved_without_trip_resolves_only_back_within_the_radius_and_parked() -> None:
    open_ = opened("moved_without_trip")
    assert evaluate(car(lat=NEAR_300M[0]), CTX, NOW, open_, ["moved_without_trip"]) == []  # 300 m: not back yet
    assert evaluate(car(speed_kmh=4.0), CTX, NOW, open_, ["moved_without_trip"]) == []  # home but rolling
    [r] = evaluate(car(), CTX, NOW, open_, ["moved_without_trip"])
    assert isinstance(r, Resolve) and r.alert is open_[("moved_without_trip", "ZOE-001", "")]


def test_an_open_alert_is_not_opened_again() -> None:
    assert evaluate(car(speed_kmh=50.0), CTX, NOW, opened("moved_without_trip"), ["moved_without_trip"]) == []


def test_left_service_area_and_back() -> None:
    out = car(lat=49.2)
    assert kinds(evaluate(out, CTX, NOW, {}, ["left_service_area"])) == [("open", "left_service_area")]
    assert kinds(evaluate(car(lat=48.9), CTX, NOW, opened("left_service_area"), ["left_service_area"])) == [
        ("resolve", "left_service_area")
    ]
    assert evaluate(out, replace(CTX, area=None), NOW, {}, ["left_service_area"]) == []  # no area configured
    assert evaluate(car(lat=None, lon=None), CTX, NOW, {}, ["left_service_area"]) == []  # position unknown


def test_vehicle_silent_after_its_threshold_and_not_in_the_quiet_window() -> None:
    th = CTX.thresholds.silent_after_ms
    assert evaluate(car(heard_ms=NOW - th), CTX, NOW, {}, ["vehicle_silent"]) == []
    assert kinds(evaluate(car(heard_ms=NOW - th - 1), CTX, NOW, {}, ["vehicle_silent"])) == [("open", "vehicle_silent")]
    # The gateway has just reconnected:
    assert evaluate(car(heard_ms=NOW - 10 * th), CTX, NOW, {}, ["vehicle_silent"], quiet_until_ms=NOW + 1) == []
    assert kinds(evaluate(car(heard_ms=None), CTX, NOW, {}, ["vehicle_silent"])) == [("open", "vehicle_silent")]
    assert kinds(evaluate(car(), CTX, NOW, opened("vehicle_silent"), ["vehicle_silent"])) == [
        ("resolve", "vehicle_silent")
    ]


def test_unlocked_unattended_needs_its_delay_and_no_trip() -> None:
    th = CTX.thresholds.unattended_after_ms
    since = NOW - th
    assert kinds(evaluate(car(locked=False, open_since_ms=since), CTX, NOW, {}, ["unlocked_unattended"])) == [
        ("open", "unlocked_unattended")
    ]
    assert evaluate(car(locked=False, open_since_ms=since + 1), CTX, NOW, {}, ["unlocked_unattended"]) == []
    assert (
        evaluate(car(locked=False, open_since_ms=since, trip_running=True), CTX, NOW, {}, ["unlocked_unattended"]) == []
    )
    open_ = opened("unlocked_unattended")
    assert evaluate(car(locked=True, closed=False), CTX, NOW, open_, ["unlocked_unattended"]) == []
    assert kinds(evaluate(car(), CTX, NOW, open_, ["unlocked_unattended"])) == [("resolve", "unlocked_unattended")]


def test_charging_fault_only_at_the_station() -> None:
    since = NOW - CTX.thresholds.charging_fault_after_ms
    stalled = car(soc_pct=40.0, plugged=True, charging=False, stalled_since_ms=since)
    assert kinds(evaluate(stalled, CTX, NOW, {}, ["charging_fault"])) == [("open", "charging_fault")]
    away = replace(stalled, lat=AWAY_600M[0])
    assert evaluate(away, CTX, NOW, {}, ["charging_fault"]) == []
    assert evaluate(replace(stalled, stalled_since_ms=since + 1), CTX, NOW, {}, ["charging_fault"]) == []
    open_ = opened("charging_fault")
    for fixed in (replace(stalled, charging=True), replace(stalled, plugged=False), replace(stalled, soc_pct=80.0)):
        assert kinds(evaluate(fixed, CTX, NOW, open_, ["charging_fault"])) == [("resolve", "charging_fault")]


def test_projected_charge_adds_ac_power_while_charging() -> None:
    assert projected_soc(20.0, False, 7.4, 52.0, 2.0) == 20.0
    assert projected_soc(20.0, True, 7.4, 52.0, 1.0) == pytest.approx(20.0 + 7.4 / 52.0 * 100)
    assert projected_soc(90.0, True, 7.4, 52.0, 5.0) == 100.0


def test_low_battery_before_a_reservation_in_the_horizon() -> None:
    hour = 3_600_000
    soon = Upcoming("R-1", NOW + hour, NOW + 2 * hour)
    low = car(soc_pct=25.0, charging=False)
    [o] = evaluate(low, CTX, NOW, {}, ["low_battery_before_reservation"], [soon])
    assert isinstance(o, Open) and o.reservation_id == "R-1" and o.details["projected_soc_pct"] == 25.0
    # Charging for the hour to come: 25 + 14 % is enough.
    assert evaluate(replace(low, charging=True), CTX, NOW, {}, ["low_battery_before_reservation"], [soon]) == []
    far = Upcoming("R-2", NOW + 3 * hour, NOW + 4 * hour)  # beyond the 2 h horizon
    assert evaluate(low, CTX, NOW, {}, ["low_battery_before_reservation"], [far]) == []
    assert evaluate(car(soc_pct=None), CTX, NOW, {}, ["low_battery_before_reservation"], [soon]) == []


def test_low_battery_resolves_when_charged_started_or_gone() -> None:
    hour = 3_600_000
    soon = Upcoming("R-1", NOW + hour, NOW + 2 * hour)
    open_ = opened("low_battery_before_reservation", "R-1")
    t: list[AlertType] = ["low_battery_before_reservation"]
    assert evaluate(car(soc_pct=25.0), CTX, NOW, open_, t, [soon]) == []
    assert kinds(evaluate(car(soc_pct=30.0), CTX, NOW, open_, t, [soon])) == [("resolve", t[0])]
    started = replace(soon, starts_ms=NOW)
    assert kinds(evaluate(car(soc_pct=25.0), CTX, NOW, open_, t, [started])) == [("resolve", t[0])]
    assert kinds(evaluate(car(soc_pct=25.0), CTX, NOW, open_, t, [])) == [("resolve", t[0])]  # cancelled


def test_one_alert_per_reservation() -> None:
    hour = 3_600_000
    rs = [Upcoming("R-1", NOW + hour, NOW + 2 * hour), Upcoming("R-2", NOW + hour + 1, NOW + 2 * hour)]
    changes = evaluate(car(soc_pct=10.0), CTX, NOW, {}, ["low_battery_before_reservation"], rs)
    assert [c.reservation_id for c in changes if isinstance(c, Open)] == ["R-1", "R-2"]


def test_not_returned_after_the_grace_while_the_trip_runs() -> None:
    grace = CTX.thresholds.return_grace_ms
    late = Upcoming("R-1", NOW - 7_200_000, NOW - grace, trip_running=True)
    t: list[AlertType] = ["not_returned"]
    assert kinds(evaluate(car(), CTX, NOW, {}, t, [late])) == [("open", "not_returned")]
    assert evaluate(car(), CTX, NOW, {}, t, [replace(late, ends_ms=NOW - grace + 1)]) == []
    assert evaluate(car(), CTX, NOW, {}, t, [replace(late, trip_running=False)]) == []  # never picked up: no trip
    open_ = opened("not_returned", "R-1")
    assert evaluate(car(), CTX, NOW, open_, t, [late]) == []
    assert kinds(evaluate(car(), CTX, NOW, open_, t, [])) == [("resolve", "not_returned")]  # the trip ended


def test_per_message_and_scheduled_split_the_types() -> None:
    assert {"moved_without_trip", "left_service_area"} == PER_MESSAGE
    assert not PER_MESSAGE & SCHEDULED and len(PER_MESSAGE | SCHEDULED) == 7


def test_left_service_area_resolves_only_well_inside() -> None:
    lat_max = CTX.area[1] if CTX.area else 0.0
    open_ = opened("left_service_area")
    t: list[AlertType] = ["left_service_area"]
    assert evaluate(car(lat=lat_max - 0.00001), CTX, NOW, open_, t) == []  # a metre inside: GPS noise
    assert evaluate(car(lat=lat_max - 0.0017), CTX, NOW, open_, t) == []  # 190 m
    assert kinds(evaluate(car(lat=lat_max - 0.0019), CTX, NOW, open_, t)) == [("resolve", "left_service_area")]
    assert evaluate(car(lat=lat_max - 0.00001), CTX, NOW, {}, t) == []  # and inside opens nothing


@given(
    dlat=st.floats(-0.05, 0.05),
    dlon=st.floats(-0.05, 0.05),
    speed=st.one_of(st.none(), st.floats(0, 200)),
    trip=st.booleans(),
    area=st.booleans(),
)
def test_the_shortcut_never_hides_what_the_rules_would_open(
    dlat: float, dlon: float, speed: float | None, trip: bool, area: bool
) -> None:
    ctx = CTX if area else replace(CTX, area=None)
    lat, lon = HOME[0] + dlat, HOME[1] + dlon
    view = car(lat=lat, lon=lon, speed_kmh=speed, trip_running=trip)
    opens = evaluate(view, ctx, NOW, {}, sorted(PER_MESSAGE))
    if not location_is_news(ctx, lat, lon, speed, trip):
        assert opens == []


def test_the_shortcut_lets_the_usual_parked_car_through_cheaply() -> None:
    assert not location_is_news(CTX, HOME[0], HOME[1], 0.0, False)
    assert not location_is_news(CTX, NEAR_300M[0], HOME[1], None, False)
    assert location_is_news(CTX, HOME[0], HOME[1], 30.0, False)
    assert not location_is_news(CTX, AWAY_600M[0], HOME[1], 30.0, True)  # on a trip, inside the area
    assert location_is_news(CTX, 49.5, HOME[1], 30.0, True)  # on a trip, out of the area
