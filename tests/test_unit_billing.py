"""Billing, the end checks, trip figures and the usage statement, as tables of cases. Pure, no I/O."""

from __future__ import annotations

import csv
import io
from datetime import datetime

import pytest

from gateway.errors import InvalidMonth
from gateway.http.schemas import UsageReport
from gateway.rules.billing import Tariff, amount_cents, billed_minutes, hours_in_month, month_bounds, month_of
from gateway.rules.reservations import Reservation
from gateway.rules.trips import CHECKS, Place, Readings, end_trip, failed_checks, may_auto_end, start_trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle, usage_report, users_csv

MIN = 60_000
T = Tariff()
HOME = Place(48.4318, 0.0949, 150)
NOW = 1_795_680_000_000


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


@pytest.mark.parametrize(
    ("booked_min", "actual_min", "billed"),
    [
        (60, 47, 60),  # early return: the booked span
        (60, 61, 75),  # late by a minute: the next increment
        (60, 60, 60),  # exactly on the increment
        (60, 60.001, 75),  # a millisecond over rounds up
        (45, 0, 45),
        (10, 5, 15),  # below one increment
        (0, 0, 0),
        (120, 134.5, 135),
        (120, 135, 135),
        (120, 135.01, 150),
    ],
)
def test_billed_minutes(booked_min: float, actual_min: float, billed: int) -> None:
    assert billed_minutes(int(booked_min * MIN), int(actual_min * MIN), 15) == billed


@pytest.mark.parametrize(
    ("billed", "kind", "tariff", "cents"),
    [
        (60, "public", T, 150),
        (75, "public", T, 188),  # 1.875 rounds half up to 1.88
        (15, "public", T, 38),  # 0.375 -> 0.38
        (45, "public", T, 113),  # 1.125 -> 1.13
        (60, "staff", T, 0),  # staff ride free...
        (60, "staff", Tariff(staff_billed=True), 150),  # ...unless billed
        (90, "public", Tariff(hourly_rate_eur=2.0), 300),
    ],
)
def test_amount(billed: int, kind: str, tariff: Tariff, cents: int) -> None:
    assert amount_cents(billed, kind, tariff) == cents


@pytest.mark.parametrize(
    ("month", "start", "end", "hours"),
    [
        ("2026-11", "2026-11-01T00:00:00+01:00", "2026-12-01T00:00:00+01:00", 720),
        ("2026-03", "2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", 743),  # to summer time
        ("2026-10", "2026-10-01T00:00:00+02:00", "2026-11-01T00:00:00+01:00", 745),  # back to winter
        ("2026-12", "2026-12-01T00:00:00+01:00", "2027-01-01T00:00:00+01:00", 744),  # across the year
    ],
)
def test_months_in_europe_paris(month: str, start: str, end: str, hours: float) -> None:
    assert month_bounds(month, "Europe/Paris") == (ms(start), ms(end))
    assert hours_in_month(month, "Europe/Paris") == hours


@pytest.mark.parametrize(
    ("iso", "month"),
    [
        ("2026-11-30T22:59:59.999+00:00", "2026-11"),
        ("2026-11-30T23:00:00+00:00", "2026-12"),  # midnight in Paris
        ("2026-03-31T21:59:59+00:00", "2026-03"),
        ("2026-03-31T22:00:00+00:00", "2026-04"),  # midnight in Paris, summer time
    ],
)
def test_a_moment_counts_in_its_paris_month(iso: str, month: str) -> None:
    assert month_of(ms(iso), "Europe/Paris") == month


@pytest.mark.parametrize("bad", ["", "2026-13", "2026-1", "26-11", "2026-11-01", "1999-12", "2026-00", "２０２６-11"])
def test_a_bad_month_is_refused(bad: str) -> None:
    with pytest.raises(InvalidMonth):
        month_bounds(bad, "Europe/Paris")


# ---- the end checks ---------------------------------------------------------------------------------

GOOD = Readings(
    location_ms=NOW - 10_000, lat=48.4319, lon=0.0950, speed_kmh=0, odometer_km=100.0, doors_ms=NOW - 5_000,
    locked=True, closed=True, soc_pct=70.0, plugged=True,
)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "fails"),
    [
        ({}, []),
        ({"location_ms": NOW - 121_000}, ["fresh"]),
        ({"doors_ms": None}, ["fresh"]),
        ({"speed_kmh": 12.0}, ["parked"]),
        ({"speed_kmh": None}, []),  # absent is parked
        ({"closed": False}, ["doors_closed"]),
        ({"closed": None}, ["doors_closed"]),
        ({"lat": 48.4400}, ["at_station"]),  # ~900 m north
        ({"lat": None, "lon": None}, ["at_station"]),
        ({"plugged": False}, ["plugged"]),
        ({"plugged": None}, ["plugged"]),
        ({"plugged": False, "closed": False, "speed_kmh": 5.0}, ["parked", "doors_closed", "plugged"]),
    ],
)
def test_each_end_check_fails_alone(change: dict[str, object], fails: list[str]) -> None:
    r = Readings(**{**GOOD.__dict__, **change})
    assert failed_checks(r, HOME, NOW, 120_000, CHECKS) == fails


def test_only_the_configured_checks_apply() -> None:
    r = Readings(**{**GOOD.__dict__, "plugged": False})
    assert failed_checks(r, HOME, NOW, 120_000, ("fresh", "parked")) == []


def reservation(kind: str = "public", start_min: int = 0, end_min: int = 60) -> Reservation:
    return Reservation("R-1", "ZOE-001", "U-9", NOW + start_min * MIN, NOW + end_min * MIN, kind, False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "ended_after_min", "billed", "amount", "late"),
    [
        ("public", 47, 60, 1.5, 0.0),  # the contract's example
        ("public", 70, 75, 1.88, 10.0),  # late
        ("public", 20, 60, 1.5, 0.0),  # early
        ("staff", 70, 75, 0.0, 10.0),
    ],
)
def test_trip_figures(kind: str, ended_after_min: int, billed: int, amount: float, late: float) -> None:
    start = start_trip(reservation(kind), "alencon-cd61", GOOD, NOW)
    back = Readings(**{**GOOD.__dict__, "odometer_km": 112.3, "soc_pct": 60.0})
    t = end_trip(start, back, HOME, 52, T, NOW + ended_after_min * MIN, "user")
    assert (t.billed_min, t.amount_eur, t.late_min) == (billed, amount, late)
    assert (t.distance_km, t.energy_kwh, t.duration_min) == (12.3, 5.2, float(ended_after_min))
    assert t.end_at_station is True and not t.running


def test_a_car_that_reports_no_odometer_has_no_distance() -> None:
    blind = Readings(**{**GOOD.__dict__, "odometer_km": None})
    t = end_trip(start_trip(reservation(), "s", blind, NOW), blind, HOME, 52, T, NOW + 30 * MIN, "user")
    assert t.distance_km is None and t.billed_min == 60


def test_charging_on_the_trip_uses_no_energy() -> None:
    fuller = Readings(**{**GOOD.__dict__, "soc_pct": 90.0})
    t = end_trip(start_trip(reservation(), "s", GOOD, NOW), fuller, HOME, 52, T, NOW + 30 * MIN, "user")
    assert t.energy_kwh == 0.0


def test_the_automatic_end_needs_the_grace_every_check_and_a_lock() -> None:
    t = start_trip(reservation(end_min=60), "s", GOOD, NOW)
    later = NOW + 90 * MIN
    fresh = Readings(**{**GOOD.__dict__, "location_ms": later, "doors_ms": later})
    assert may_auto_end(t, fresh, HOME, later, 120_000, CHECKS, 30 * MIN)
    assert not may_auto_end(t, fresh, HOME, later - 1, 120_000, CHECKS, 30 * MIN)  # grace not over
    unlocked = Readings(**{**fresh.__dict__, "locked": False})
    assert not may_auto_end(t, unlocked, HOME, later, 120_000, CHECKS, 30 * MIN)
    away = Readings(**{**fresh.__dict__, "lat": 48.5})
    assert not may_auto_end(t, away, HOME, later, 120_000, CHECKS, 30 * MIN)


# ---- the usage statement ------------------------------------------------------------------------------


def rows() -> UsageRows:
    return UsageRows(
        users=[
            UsageUser("U-1", 2, 135, 20.0, 338, 2, "alencon-cd61"),
            UsageUser("U-2", 1, 60, 5.0, 0, 0, None),  # staff only: no fee
            UsageUser("U-3", 2, 75, 8.0, 188, 1, "belleme"),  # staff and public: the fee
        ],
        vehicles=[
            UsageVehicle("ZOE-001", "alencon-cd61", "public", 2, 120.0, 20.0, 5.2, 338),
            UsageVehicle("ZOE-007", "belleme", "public", 1, 70.0, 6.0, 1.0, 188),
            UsageVehicle("ZOE-007", "belleme", "staff", 2, 100.0, 7.0, 2.0, 0),
        ],
    )


def test_the_statement_adds_up() -> None:
    r = usage_report("2026-11", rows(), T, ["ZOE-001", "ZOE-007", "ZOE-009"], ["alencon-cd61", "belleme"], 720)
    assert sum(round(u["total_eur"] * 100) for u in r["users"]) == round(
        (r["totals"]["amount_eur"] + r["totals"]["fees_eur"]) * 100
    )
    assert r["totals"] == {"trips": 5, "hours": 4.83, "distance_km": 33.0, "energy_kwh": 8.2, "amount_eur": 5.26,
                           "fees_eur": 8.0}  # fmt: skip
    assert [u["fee_eur"] for u in r["users"]] == [4.0, 0.0, 4.0]
    assert r["by_kind"]["staff"]["fees_eur"] == 0 and r["by_kind"]["public"]["fees_eur"] == 8.0
    stations = {s["station"]: s for s in r["by_station"]}
    assert stations["belleme"]["trips"] == 3 and stations["belleme"]["fees_eur"] == 4.0
    cars = {v["vehicle_id"]: v for v in r["by_vehicle"]}
    assert cars["ZOE-009"] == {"vehicle_id": "ZOE-009", "trips": 0, "hours": 0.0, "utilisation_pct": 0.0}
    assert cars["ZOE-001"]["utilisation_pct"] == round(2 / 720 * 100, 2)
    # The answer of GET /v1/reports/usage is this dict as it is: it must be what the OpenAPI model says.
    assert UsageReport.model_validate(r).model_dump() == r


def test_a_month_with_no_trips() -> None:
    r = usage_report("2026-11", UsageRows([], []), T, ["ZOE-001"], ["alencon-cd61"], 720)
    assert r["totals"]["trips"] == 0 and r["totals"]["amount_eur"] == 0 and r["users"] == []
    assert r["by_vehicle"] == [{"vehicle_id": "ZOE-001", "trips": 0, "hours": 0.0, "utilisation_pct": 0.0}]


def test_csv_quotes_what_needs_it_and_defuses_formulas() -> None:
    users = [
        UsageUser('U,"quoted"', 1, 60, 1.0, 150, 1, "s"),
        UsageUser("=HYPERLINK(1)", 1, 60, 1.0, 150, 1, "s"),
        UsageUser("+33 6", 1, 60, 1.0, 150, 1, "s"),
        UsageUser("-1", 1, 60, 1.0, 150, 1, "s"),
        UsageUser("@SUM", 1, 60, 1.0, 150, 1, "s"),
        UsageUser("plain", 1, 60, 1.0, 150, 1, "s"),
    ]
    text = users_csv(usage_report("2026-11", UsageRows(users, []), T, [], [], 720))
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["user_id", "trips", "billed_min", "distance_km", "amount_eur", "fee_eur", "total_eur"]
    assert [p[0] for p in parsed[1:]] == ['U,"quoted"', "'=HYPERLINK(1)", "'+33 6", "'-1", "'@SUM", "plain"]
    assert parsed[1][1:] == ["1", "60", "1.0", "1.5", "4.0", "5.5"]
    assert text.endswith("\r\n")
