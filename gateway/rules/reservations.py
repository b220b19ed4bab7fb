"""Reservation rules: what a valid reservation is, overlaps, and when a car may be opened. Pure.

A reservation is *live* while it is not cancelled and has not ended. Two
live reservations of one car may not overlap. A reservation opens its car
from ``early_grace`` before ``starts_at`` until ``ends_at``. Every function
takes the time it needs as an argument; none does I/O.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, replace
from typing import Literal

from gateway.errors import InvalidReservation, ReservationNotActive
from gateway.ids import RESERVATION_ID
from gateway.times import iso_ms

Kind = Literal["staff", "public"]
KINDS: tuple[Kind, ...] = ("staff", "public")
StartUnlockStatus = Literal["pending", "done", "rejected", "failed", "timeout"]
# Outside this window a time cannot be shown back in UTC or stored in InfluxDB.
EARLIEST_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
LATEST_MS = 7_258_118_400_000  # 2200-01-01T00:00:00Z
MAX_SPAN_MS = 31 * 86_400_000
USER_ID_MAX = 128


@dataclass(frozen=True)
class StartUnlock:
    """What the gateway did at ``starts_at`` for an ``unlock_at_start`` reservation."""

    status: StartUnlockStatus
    at_ms: int
    command_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ReservationRequest:
    """What the booking system asks for in a PUT, already of the right types."""

    vehicle_id: str
    user_id: str
    starts_ms: int
    ends_ms: int
    kind: Kind
    unlock_at_start: bool = False


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
    created_by: str | None = None  # the API key name that created it; the caller of its start unlock
    completed: bool = False  # its rental was ended: it opens nothing and blocks nothing any more
    cancel_reason: str | None = None  # why it was cancelled ("preempted_by_staff", "cancelled")

    def live(self, now_ms: int) -> bool:
        return not self.cancelled and not self.completed and self.ends_ms > now_ms

    def overlaps(self, other: Reservation) -> bool:
        return self.starts_ms < other.ends_ms and other.starts_ms < self.ends_ms

    @property
    def duration_h(self) -> float:
        return (self.ends_ms - self.starts_ms) / 3_600_000


def check_time(ms: int, field: str) -> int:
    if not EARLIEST_MS <= ms < LATEST_MS:
        raise InvalidReservation(field, "must be between the years 2000 and 2199")
    return ms


def check_id(reservation_id: str) -> None:
    if not RESERVATION_ID.matches(reservation_id):
        raise InvalidReservation("reservation_id", RESERVATION_ID.describe)


def user_id_problem(user_id: str) -> str | None:
    """Why `user_id` can be no stored reservation's user, or None: for a new reservation and a query alike."""
    if not 0 < len(user_id) <= USER_ID_MAX:
        return f"must be a string of 1 to {USER_ID_MAX} characters"
    if "\x00" in user_id:  # PostgreSQL stores no U+0000 in text: a 503 for what is the caller's error
        return "must not contain U+0000"
    return None


def new_reservation(
    reservation_id: str, req: ReservationRequest, vehicles: Container[str], now_ms: int, caller: str | None = None
) -> Reservation:
    """A valid reservation from a request, or InvalidReservation naming the first bad field."""
    check_id(reservation_id)
    if req.vehicle_id not in vehicles:
        raise InvalidReservation("vehicle_id", f"{req.vehicle_id[:40]!r} is not a vehicle of the fleet")
    if (why := user_id_problem(req.user_id)) is not None:
        raise InvalidReservation("user_id", why)
    check_time(req.starts_ms, "starts_at")
    check_time(req.ends_ms, "ends_at")
    if req.ends_ms <= req.starts_ms:
        raise InvalidReservation("ends_at", "must be after starts_at")
    if req.ends_ms - req.starts_ms > MAX_SPAN_MS:
        raise InvalidReservation("ends_at", "a reservation lasts at most 31 days")
    return Reservation(
        reservation_id,
        req.vehicle_id,
        req.user_id,
        req.starts_ms,
        req.ends_ms,
        req.kind,
        req.unlock_at_start,
        created_ms=now_ms,
        updated_ms=now_ms,
        created_by=caller,
    )


def merge_update(old: Reservation, new: Reservation, now_ms: int) -> Reservation:
    """The stored reservation after a PUT over `old`: keeps history, re-arms the start unlock if moved."""
    su = old.start_unlock
    moved = new.starts_ms != old.starts_ms or new.vehicle_id != old.vehicle_id or not new.unlock_at_start
    # An unlock in flight right now keeps its record; otherwise a moved start is armed again.
    keep = su is not None and (su.status == "pending" or not moved)
    return replace(
        new,
        created_ms=old.created_ms,
        updated_ms=now_ms,
        start_unlock=su if keep else None,
        created_by=old.created_by or new.created_by,
        completed=old.completed,
    )


def conflict(candidate: Reservation, others: Iterable[Reservation], now_ms: int) -> Reservation | None:
    """The first live reservation of the same car that `candidate` overlaps, if any."""
    for o in others:
        if o.id != candidate.id and o.vehicle_id == candidate.vehicle_id and o.live(now_ms) and o.overlaps(candidate):
            return o
    return None


def check_opens(r: Reservation, vehicle_id: str, now_ms: int, early_grace_ms: int) -> None:
    """Raise ReservationNotActive unless `r` may open `vehicle_id` at `now_ms`."""
    if r.vehicle_id != vehicle_id:
        raise ReservationNotActive(f"reservation {r.id} is for {r.vehicle_id}, not {vehicle_id}")
    if r.cancelled:
        raise ReservationNotActive(f"reservation {r.id} was cancelled")
    if r.completed:
        raise ReservationNotActive(f"the rental of reservation {r.id} has ended")
    if now_ms < r.starts_ms - early_grace_ms:
        grace_min = early_grace_ms // 60000
        raise ReservationNotActive(
            f"reservation {r.id} starts at {iso_ms(r.starts_ms)}; the car opens from {grace_min} min before"
        )
    if now_ms >= r.ends_ms:
        raise ReservationNotActive(f"reservation {r.id} ended at {iso_ms(r.ends_ms)}")


def check_locks(r: Reservation, vehicle_id: str) -> None:
    """Locking never lets anyone in, so a reservation may lock its car at any time, even after it ended."""
    if r.vehicle_id != vehicle_id:
        raise ReservationNotActive(f"reservation {r.id} is for {r.vehicle_id}, not {vehicle_id}")
    if r.cancelled:
        raise ReservationNotActive(f"reservation {r.id} was cancelled")


def status(r: Reservation) -> Literal["active", "cancelled", "completed"]:
    return "cancelled" if r.cancelled else "completed" if r.completed else "active"
