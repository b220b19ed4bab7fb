"""Staff priority and availability: how a staff booking makes room, and which cars are free. Pure.

When a staff reservation overlaps live public reservations of its car that
have not started, each of them, earliest first, is

1. moved to another car of the same model at the same station that is free
   for its whole span (counting the moves already planned), or else
2. cancelled, if it starts more than the notice (``booking.preempt_notice_s``)
   from now, or else
3. the staff reservation is refused, and nothing changes.

A public reservation whose car may be opened for it (from the early unlock
grace before its start), or whose trip has started, is never touched, and
staff never displace staff: either refuses the staff reservation. :func:`make_room` decides; the store applies
the decision in the same transaction as the staff reservation.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.rules.reservations import Reservation

__all__ = ["PREEMPTED_BY_STAFF", "Move", "Plan", "Refusal", "free_vehicles", "make_room"]

PREEMPTED_BY_STAFF = "preempted_by_staff"

Action = Literal["reassigned", "cancelled"]


@dataclass(frozen=True)
class Move:
    reservation: Reservation  # as it was
    action: Action
    vehicle_id: str  # the car it is moved to, or (cancelled) the car it had

    @property
    def reservation_id(self) -> str:
        return self.reservation.id


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...] = ()


@dataclass(frozen=True)
class Refusal:
    blocking: Reservation  # the reservation that cannot be moved out of the way
    why: str


def _free(spans: Iterable[tuple[int, int]], starts_ms: int, ends_ms: int) -> bool:
    return all(not (s < ends_ms and starts_ms < e) for s, e in spans)


def make_room(
    staff: Reservation,
    in_the_way: Sequence[Reservation],
    others: Mapping[str, Sequence[Reservation]],
    started: Collection[str],
    now_ms: int,
    notice_ms: int,
    early_grace_ms: int = 0,
) -> Plan | Refusal:
    """What to do with `in_the_way` (the live reservations of the staff car overlapping `staff`).

    `others`: for each other car of the same model at the same station, in the order to try them, its
    live reservations. `started`: the ids of reservations whose trip has started. `early_grace_ms`: how
    long before its start a reservation may open its car (its user may be unlocking it right now).
    """
    taken: dict[str, list[tuple[int, int]]] = {
        vid: [(r.starts_ms, r.ends_ms) for r in rs] for vid, rs in others.items()
    }
    moves: list[Move] = []
    for r in sorted(in_the_way, key=lambda r: (r.starts_ms, r.id)):
        if r.kind == "staff":
            return Refusal(r, f"staff reservation {r.id} has the car; staff never displace staff")
        if r.starts_ms - early_grace_ms <= now_ms or r.id in started:
            return Refusal(r, f"public reservation {r.id} has started (or may open its car now); it is never moved")
        to = next((vid for vid, spans in taken.items() if _free(spans, r.starts_ms, r.ends_ms)), None)
        if to is not None:
            taken[to].append((r.starts_ms, r.ends_ms))
            moves.append(Move(r, "reassigned", to))
        elif r.starts_ms - now_ms > notice_ms:
            moves.append(Move(r, "cancelled", r.vehicle_id))
        else:
            return Refusal(
                r, f"public reservation {r.id} starts within the notice and no other car of its model is free"
            )
    return Plan(tuple(moves))


def free_vehicles(
    vehicles: Iterable[str],
    reservations: Iterable[Reservation],
    from_ms: int,
    to_ms: int,
    now_ms: int,
    out_overdue: Collection[str] = (),
) -> list[str]:
    """The cars of `vehicles` (in their order) with no reservation overlapping ``[from_ms, to_ms)`` that
    is still to be used (not cancelled, not ended by its rental). A car in `out_overdue` (its trip runs
    past its booked end) is not free for a span that has begun: it is not back."""
    busy = {
        r.vehicle_id
        for r in reservations
        if not r.cancelled and not r.completed and r.starts_ms < to_ms and from_ms < r.ends_ms
    }
    if from_ms <= now_ms:
        busy |= set(out_overdue)
    return [v for v in vehicles if v not in busy]
