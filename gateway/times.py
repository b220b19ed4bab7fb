"""Time in the contract's forms: RFC 3339 with offset in and out, milliseconds since the epoch inside. Pure."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["iso_ms", "now_ms", "rfc3339_ms"]


def now_ms() -> int:
    """The wall clock in ms; rules take the time as an argument, services get it from here."""
    return int(time.time() * 1000)


_SECONDS: dict[int, str] = {}  # second -> "YYYY-MM-DDTHH:MM:SS": times come in runs, often two at once


def iso_ms(ts_ms: int) -> str:
    """``2026-11-26T09:00:00.123Z``: what the API answers for every time."""
    second, ms = divmod(int(ts_ms), 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= 64:
            _SECONDS.clear()
        d = datetime.fromtimestamp(second, UTC)
        prefix = _SECONDS[second] = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
    return f"{prefix}.{ms:03d}Z"


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})\Z")


def rfc3339_ms(value: str) -> int:
    """RFC 3339 date-time -> ms since the epoch; ValueError for anything else.

    Stricter than ``datetime.fromisoformat``, which also takes ISO week dates
    and times without a date. A leap second (``:60``) counts as ``:59.999``.
    """
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(f"{value[:40]!r} is not an RFC 3339 date-time with offset")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    leap = second == "60"
    dt = datetime(
        int(year), int(month), int(day), int(hour), int(minute), 59 if leap else int(second),
        int(((frac or ".0")[1:] + "000000")[:6]) if not leap else 999_000,
        tzinfo=UTC if offset in ("Z", "z") else datetime.strptime(offset, "%z").tzinfo,
    )  # fmt: skip
    return int(dt.timestamp() * 1000)
