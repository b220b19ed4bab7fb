"""Rows of both backends' tables read back into the rules' types: one reading, so they cannot drift apart.

Both backends select the same columns in the same order (the ``*_COLUMNS`` here); SQLite hands
integers where PostgreSQL hands booleans, hence the conversions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import orjson

from gateway.rules.alerts import Alert, AlertType
from gateway.rules.commands import CommandRecord
from gateway.rules.reservations import Reservation, StartUnlock
from gateway.rules.trips import Trip

RESERVATION_COLUMNS = (
    "id, vehicle_id, user_id, starts_ms, ends_ms, kind, unlock_at_start, cancelled, created_ms, updated_ms, "
    "su_status, su_at_ms, su_command_id, su_reason, created_by, completed, cancel_reason"
)
COMMAND_COLUMNS = (
    "command_id, vehicle_id, action, reservation_id, caller, source, issued_ms, result, reason, latency_ms"
)
ALERT_COLUMNS = "id, type, vehicle_id, reservation_id, opened_ms, message, details, resolved_ms"
TRIP_FIELDS = [f.name for f in fields(Trip)]
TRIP_COLUMNS = ", ".join(TRIP_FIELDS)
ENDED_AT = TRIP_FIELDS.index("ended_ms")  # the fields from here on are what ending a trip sets


def listing(
    select: str, filters: list[tuple[str, object | None]], order: str, limit: int, mark: str = "?"
) -> tuple[str, list[object]]:
    """`select` with the conditions whose value is given, in `order`, at most `limit` rows.

    `mark` is the driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg). A condition without one
    takes no argument: its value only says whether it applies."""
    used = [(cond, value) for cond, value in filters if value is not None]
    where = " WHERE " + " AND ".join(cond for cond, _ in used) if used else ""
    args = [value for cond, value in used if mark in cond]
    return f"{select}{where} ORDER BY {order} LIMIT {mark}", [*args, limit]


def to_reservation(r: Sequence[Any]) -> Reservation:
    su = None if r[10] is None else StartUnlock(r[10], int(r[11]), r[12], r[13])
    return Reservation(
        id=r[0],
        vehicle_id=r[1],
        user_id=r[2],
        starts_ms=int(r[3]),
        ends_ms=int(r[4]),
        kind="staff" if r[5] == "staff" else "public",
        unlock_at_start=bool(r[6]),
        cancelled=bool(r[7]),
        created_ms=int(r[8]),
        updated_ms=int(r[9]),
        start_unlock=su,
        created_by=r[14],
        completed=bool(r[15]),
        cancel_reason=r[16],
    )


def to_command(r: Sequence[Any]) -> CommandRecord:
    return CommandRecord(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), r[7], r[8], r[9])


def to_alert(r: Sequence[Any]) -> Alert:
    at: AlertType = r[1]
    return Alert(r[0], at, r[2], r[3] or None, int(r[4]), r[5], orjson.loads(r[6]), r[7])


def to_trip(r: Sequence[Any]) -> Trip:
    t = Trip(*r)
    at = None if t.end_at_station is None else bool(t.end_at_station)
    return replace(t, forced=bool(t.forced), end_at_station=at)
