"""Events as values: their ids, their JSON, and what each type carries. Pure.

An event id is ``evt_`` and a ULID: 48 bits of milliseconds then 80 bits
that count up within one millisecond, in Crockford's base 32. Ids sort as
the events were recorded (in one process), so ``GET /v1/events?after=``
is a comparison on the id and works for an id already pruned. The body is
built once, when the event is recorded, and is the exact bytes every
webhook attempt signs and sends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

from gateway.rules.alerts import Alert
from gateway.rules.commands import CommandRecord
from gateway.rules.trips import Trip
from gateway.times import iso_ms

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventType",
    "UlidSource",
    "alert_doc",
    "command_doc",
    "make_event",
    "trip_doc",
    "ulid_floor",
    "wanted_by",
]

EventType = Literal[
    "command.completed",
    "trip.started",
    "trip.ended",
    "reservation.reassigned",
    "reservation.preempted",
    "alert.opened",
    "alert.resolved",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # every 10-bit value as two digits
_RANDOM_BITS = 80


class UlidSource:
    """Monotonic ULIDs: within one millisecond (or a clock stepping back) the random part counts up."""

    def __init__(self) -> None:
        self._ms = -1
        self._rand = 0

    def new(self, ms: int) -> str:
        if ms <= self._ms:
            ms, rand = self._ms, self._rand + 1
            if rand >> _RANDOM_BITS:  # 2**80 ids in one millisecond: move on to the next
                ms, rand = ms + 1, 0
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up within the millisecond
        self._ms, self._rand = ms, rand
        # 130 bits (two leading zeros), two base-32 digits at a time: on every command's path, and three
        # times faster than a digit at a time.
        return _encode((ms << _RANDOM_BITS) | rand)


def ulid_floor(ms: int) -> str:
    """The smallest ULID of millisecond `ms`: every id made before `ms` sorts below it."""
    return _encode(ms << _RANDOM_BITS)


def _encode(n: int) -> str:
    """130 bits as 26 Crockford digits, two at a time."""
    return "".join([_PAIRS[(n >> shift) & 1023] for shift in range(120, -1, -10)])


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    type: EventType
    ts_ms: int
    body: bytes  # ``{"id", "type", "timestamp", "data"}`` as JSON, exactly as listed and signed
    targets: tuple[str, ...] = ()  # the webhook endpoints (by URL) that want it

    def doc(self) -> dict[str, Any]:
        d: dict[str, Any] = orjson.loads(self.body)
        return d


def make_event(event_id: str, type_: EventType, ts_ms: int, data: dict[str, Any], targets: Iterable[str]) -> Event:
    body = orjson.dumps({"id": event_id, "type": type_, "timestamp": iso_ms(ts_ms), "data": data})
    return Event(event_id, type_, ts_ms, body, tuple(targets))


def wanted_by(types: Iterable[str], type_: str) -> bool:
    """Whether an endpoint subscribed to `types` (``["*"]`` for all) gets events of `type_`."""
    return any(t == "*" or t == type_ for t in types)


def command_doc(c: CommandRecord) -> dict[str, Any]:
    """A line of the command audit as the API shows it (``GET /v1/vehicles/{id}/commands``)."""
    return {
        "command_id": c.command_id,
        "action": c.action,
        "reservation_id": c.reservation_id,
        "caller": c.caller,
        "source": c.source,
        "issued_at": iso_ms(c.issued_ms),
        "result": c.result,
        "reason": c.reason,
        "latency_ms": c.latency_ms,
    }


def trip_doc(t: Trip) -> dict[str, Any]:
    """A trip as the API shows it (``GET /v1/reservations/{id}/trip``)."""
    end = None
    if t.ended_ms is not None:
        end = {"odometer_km": t.end_odometer_km, "soc_pct": t.end_soc_pct, "at_station": bool(t.end_at_station)}
    return {
        "reservation_id": t.reservation_id,
        "vehicle_id": t.vehicle_id,
        "user_id": t.user_id,
        "kind": t.kind,
        "started_at": iso_ms(t.started_ms),
        "ended_at": None if t.ended_ms is None else iso_ms(t.ended_ms),
        "ended_by": t.ended_by,
        "forced": t.forced,
        "start": {"odometer_km": t.start_odometer_km, "soc_pct": t.start_soc_pct},
        "end": end,
        "distance_km": t.distance_km,
        "energy_kwh": t.energy_kwh,
        "duration_min": t.duration_min,
        "late_min": t.late_min,
        "billed_min": t.billed_min,
        "amount_eur": t.amount_eur,
    }


def alert_doc(a: Alert) -> dict[str, Any]:
    """An alert as the API shows it (``GET /v1/alerts``)."""
    return {
        "id": a.id,
        "type": a.type,
        "severity": a.severity,
        "vehicle_id": a.vehicle_id,
        "reservation_id": a.reservation_id,
        "opened_at": iso_ms(a.opened_ms),
        "resolved_at": None if a.resolved_ms is None else iso_ms(a.resolved_ms),
        "message": a.message,
        "details": a.details,
    }
