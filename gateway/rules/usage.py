"""The monthly usage statement, from the store's per-user and per-car sums. Pure.

Trips count in the month (in the billing time zone) where they started,
ended trips only. Money stays in whole cents until the very end, so the
users' totals add up to ``totals.amount_eur + totals.fees_eur`` exactly.
A user's monthly fee is counted at the station of their first public trip
of the month, and under ``by_kind.public``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.rules.billing import Tariff, cents


@dataclass(frozen=True)
class UsageUser:
    """One user's ended trips of a month, summed."""

    user_id: str
    trips: int
    billed_min: int
    distance_km: float
    amount_cents: int
    public_trips: int
    first_public_station: str | None  # where the month's fee is counted


@dataclass(frozen=True)
class UsageVehicle:
    """One car's ended trips of a month at one station and of one kind, summed."""

    vehicle_id: str
    station: str
    kind: str
    trips: int
    duration_min: float
    distance_km: float
    energy_kwh: float
    amount_cents: int


@dataclass(frozen=True)
class UsageRows:
    users: list[UsageUser]
    vehicles: list[UsageVehicle]


USER_COLUMNS = ("user_id", "trips", "billed_min", "distance_km", "amount_eur", "fee_eur", "total_eur")


@dataclass
class _Sum:
    trips: int = 0
    minutes: float = 0.0
    distance_km: float = 0.0
    energy_kwh: float = 0.0
    amount_cents: int = 0
    fees_cents: int = 0

    def out(self) -> dict[str, Any]:
        return {
            "trips": self.trips,
            "hours": round(self.minutes / 60, 2),
            "distance_km": round(self.distance_km, 1),
            "energy_kwh": round(self.energy_kwh, 2),
            "amount_eur": self.amount_cents / 100,
            "fees_eur": self.fees_cents / 100,
        }


@dataclass
class _Car:
    trips: int = 0
    minutes: float = 0.0
    kinds: dict[str, _Sum] = field(default_factory=dict)


def usage_report(
    month: str,
    rows: UsageRows,
    tariff: Tariff,
    vehicles: Iterable[str],
    stations: Iterable[str],
    hours_in_month: float,
) -> dict[str, Any]:
    fee = cents(tariff.monthly_fee_eur)
    totals, kinds = _Sum(), {"staff": _Sum(), "public": _Sum()}
    by_station: dict[str, _Sum] = {s: _Sum() for s in stations}
    by_vehicle: dict[str, _Car] = {v: _Car() for v in vehicles}
    for g in rows.vehicles:
        for s in (totals, kinds.setdefault(g.kind, _Sum()), by_station.setdefault(g.station, _Sum())):
            s.trips += g.trips
            s.minutes += g.duration_min
            s.distance_km += g.distance_km
            s.energy_kwh += g.energy_kwh
            s.amount_cents += g.amount_cents
        car = by_vehicle.setdefault(g.vehicle_id, _Car())
        car.trips += g.trips
        car.minutes += g.duration_min
    users = []
    for u in rows.users:
        fee_cents = fee if u.public_trips > 0 else 0
        if fee_cents:
            totals.fees_cents += fee_cents
            kinds["public"].fees_cents += fee_cents
            if u.first_public_station is not None:
                by_station.setdefault(u.first_public_station, _Sum()).fees_cents += fee_cents
        users.append(
            {
                "user_id": u.user_id,
                "trips": u.trips,
                "billed_min": u.billed_min,
                "distance_km": round(u.distance_km, 1),
                "amount_eur": u.amount_cents / 100,
                "fee_eur": fee_cents / 100,
                "total_eur": (u.amount_cents + fee_cents) / 100,
            }
        )
    return {
        "month": month,
        "currency": "EUR",
        "totals": totals.out(),
        "by_kind": {k: s.out() for k, s in kinds.items()},
        "by_station": [{"station": st, **s.out()} for st, s in sorted(by_station.items())],
        "by_vehicle": [
            {
                "vehicle_id": vid,
                "trips": c.trips,
                "hours": round(c.minutes / 60, 2),
                "utilisation_pct": round(c.minutes / 60 / hours_in_month * 100, 2) if hours_in_month else 0.0,
            }
            for vid, c in sorted(by_vehicle.items())
        ],
        "users": users,
    }


def _cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula gets a leading apostrophe."""
    text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def users_csv(report: dict[str, Any]) -> str:
    """The report's ``users`` table as CSV (RFC 4180 quoting), header first."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(USER_COLUMNS)
    for u in report["users"]:
        w.writerow([_cell(u["user_id"]), *(u[c] for c in USER_COLUMNS[1:])])
    return out.getvalue()
