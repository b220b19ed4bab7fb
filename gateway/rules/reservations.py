"""Reservation rules: parsing a request body, overlaps, and when a car may be opened. Pure.

A reservation is *live* while it is not cancelled and has not ended. Two
live reservations of one car may not overlap. A reservation opens its car
from ``early_grace`` before ``starts_at`` until ``ends_at``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.errors import ApiError
from gateway.ingest.telemetry import rfc3339_ms

RESERVATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
Kind = Literal["staff", "public"]
EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z


@dataclass(frozen=True)
class StartUnlock:
    """What the gateway did at ``starts_at`` for an ``unlock_at_start`` reservation."""

    status: str  # pending | done | rejected | failed | timeout
    at_ms: int
    command_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Reservation:
    id: str
    vehicle_id: str
    user_id: str
    starts_ms: int
    ends_ms: int
    kind: Kind
    unlock_at_start: bool
    cancelled: bool = False
    created_ms: int = 0
    updated_ms: int = 0
    start_unlock: StartUnlock | None = None

    def live(self, now_ms: int) -> bool:
        return not self.cancelled and self.ends_ms > now_ms

    def overlaps(self, other: Reservation) -> bool:
        return self.starts_ms < other.ends_ms and other.starts_ms < self.ends_ms

    @property
    def duration_h(self) -> float:
        return (self.ends_ms - self.starts_ms) / 3_600_000


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: Any, field: str) -> int:
    if not isinstance(value, str):
        raise invalid(field, "must be an RFC 3339 date-time string with offset")
    try:
        ms = rfc3339_ms(value)
    except ValueError as e:
        raise invalid(field, f"{e}, e.g. 2026-11-26T09:00:00Z") from None
    # Outside this window a time cannot be shown back in UTC or stored in InfluxDB.
    if not EARLIEST_MS <= ms < LATEST_MS:
        raise invalid(field, "must be between the years 2000 and 2199")
    return ms


def invalid(field: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_reservation", f"{field}: {problem}")


def check_id(reservation_id: str) -> None:
    if not RESERVATION_ID_RE.match(reservation_id):
        raise invalid("reservation_id", "1 to 64 characters: letters, digits and . _ : - (not first)")


def parse_body(reservation_id: str, body: dict[str, Any], vehicles: set[str] | dict[str, Any]) -> Reservation:
    """A validated reservation from a PUT body; 422 naming the first bad field."""
    check_id(reservation_id)
    for f in ("vehicle_id", "user_id", "starts_at", "ends_at", "kind"):
        if f not in body or body[f] is None:
            raise invalid(f, "is required")
    vehicle_id = body["vehicle_id"]
    if not isinstance(vehicle_id, str) or vehicle_id not in vehicles:
        raise invalid("vehicle_id", f"{str(vehicle_id)[:40]!r} is not a vehicle of the fleet")
    user_id = body["user_id"]
    if not isinstance(user_id, str) or not 0 < len(user_id) <= 128:
        raise invalid("user_id", "must be a string of 1 to 128 characters")
    starts = parse_time(body["starts_at"], "starts_at")
    ends = parse_time(body["ends_at"], "ends_at")
    if ends <= starts:
        raise invalid("ends_at", "must be after starts_at")
    if ends - starts > 31 * 86_400_000:
        raise invalid("ends_at", "a reservation lasts at most 31 days")
    kind = body["kind"]
    if kind not in ("staff", "public"):
        raise invalid("kind", 'must be "staff" or "public"')
    unlock = body.get("unlock_at_start", False)
    if not isinstance(unlock, bool):
        raise invalid("unlock_at_start", "must be true or false")
    return Reservation(reservation_id, vehicle_id, user_id, starts, ends, kind, unlock)


def merge_update(old: Reservation, new: Reservation, now_ms: int) -> Reservation:
    """The stored reservation after a PUT over `old`: keeps history, re-arms the start unlock if moved."""
    su = old.start_unlock
    moved = new.starts_ms != old.starts_ms or new.vehicle_id != old.vehicle_id or not new.unlock_at_start
    # An unlock in flight right now keeps its record; otherwise a moved start is armed again.
    keep = su is not None and (su.status == "pending" or not moved)
    return replace(new, created_ms=old.created_ms, updated_ms=now_ms, start_unlock=su if keep else None)


def conflict(candidate: Reservation, others: list[Reservation], now_ms: int) -> Reservation | None:
    """The first live reservation of the same car that `candidate` overlaps, if any."""
    for o in others:
        if o.id != candidate.id and o.vehicle_id == candidate.vehicle_id and o.live(now_ms) and o.overlaps(candidate):
            return o
    return None


def check_opens(r: Reservation, vehicle_id: str, now_ms: int, early_grace_ms: int) -> None:
    """Raise 409 reservation_not_active unless `r` may open `vehicle_id` now."""
    if r.vehicle_id != vehicle_id:
        raise ApiError(409, "reservation_not_active", f"reservation {r.id} is for {r.vehicle_id}, not {vehicle_id}")
    if r.cancelled:
        raise ApiError(409, "reservation_not_active", f"reservation {r.id} was cancelled")
    if now_ms < r.starts_ms - early_grace_ms:
        raise ApiError(
            409,
            "reservation_not_active",
            f"reservation {r.id} starts at {iso(r.starts_ms)}; the car opens from {early_grace_ms // 60000} min before",
        )
    if now_ms >= r.ends_ms:
        raise ApiError(409, "reservation_not_active", f"reservation {r.id} ended at {iso(r.ends_ms)}")


def to_json(r: Reservation) -> dict[str, Any]:
    su = r.start_unlock
    return {
        "reservation_id": r.id,
        "vehicle_id": r.vehicle_id,
        "user_id": r.user_id,
        "starts_at": iso(r.starts_ms),
        "ends_at": iso(r.ends_ms),
        "kind": r.kind,
        "unlock_at_start": r.unlock_at_start,
        "status": "cancelled" if r.cancelled else "active",
        "created_at": iso(r.created_ms),
        "updated_at": iso(r.updated_ms),
        "start_unlock": None
        if su is None
        else {
            "status": su.status,
            "at": iso(su.at_ms),
            "command_id": su.command_id,
            "reason": su.reason,
        },
    }
