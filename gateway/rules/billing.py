"""What a trip costs, and which month it counts in. Pure.

``billed_min`` is the longer of the booked span and the actual span, rounded
up to the increment; ``amount_eur`` is that at the hourly rate, rounded to
the cent (half up), and nothing for staff unless staff are billed. Money is
computed in whole cents, so sums never drift by a rounding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from gateway.errors import InvalidMonth

MONTH_RE = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")


@dataclass(frozen=True)
class Tariff:
    hourly_rate_eur: float = 1.50
    monthly_fee_eur: float = 4.00
    increment_min: int = 15
    timezone: str = "Europe/Paris"
    staff_billed: bool = False


def billed_minutes(booked_ms: int, actual_ms: int, increment_min: int) -> int:
    """The longer span, rounded up to a whole number of increments (integer milliseconds: no float edge)."""
    span = max(booked_ms, actual_ms, 0)
    inc = increment_min * 60_000
    return -(-span // inc) * increment_min


def cents(eur: float | Decimal) -> int:
    return int((Decimal(str(eur)) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def amount_cents(billed_min: int, kind: str, t: Tariff) -> int:
    if kind == "staff" and not t.staff_billed:
        return 0
    return cents(Decimal(billed_min) / 60 * Decimal(str(t.hourly_rate_eur)))


def month_bounds(month: str, tz: str) -> tuple[int, int]:
    """``YYYY-MM`` in the billing time zone -> [first ms, first ms of the next month); InvalidQuery if bad."""
    m = MONTH_RE.fullmatch(month)
    if m is None:
        raise InvalidMonth("month", "must be YYYY-MM, e.g. 2026-11")
    year, mon = int(m.group(1)), int(m.group(2))
    if not 2000 <= year < 2200:
        raise InvalidMonth("month", "must be between the years 2000 and 2199")
    zone = ZoneInfo(tz)
    start = datetime(year, mon, 1, tzinfo=zone)
    nxt = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=zone)
    return int(start.timestamp() * 1000), int(nxt.timestamp() * 1000)


def month_of(ts_ms: int, tz: str) -> str:
    """The billing month a moment falls in."""
    dt = datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(tz))
    return f"{dt.year:04d}-{dt.month:02d}"


def hours_in_month(month: str, tz: str) -> float:
    """Real hours, so a month with the change to summer time has one hour fewer."""
    start, end = month_bounds(month, tz)
    return (end - start) / 3_600_000


__all__ = [
    "Tariff",
    "amount_cents",
    "billed_minutes",
    "cents",
    "hours_in_month",
    "month_bounds",
    "month_of",
]
