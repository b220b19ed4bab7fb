"""The `Store` protocol: everything durable on the booking side.

One protocol, one contract suite (``tests/test_store_contract.py``) that
every backend passes unchanged. Methods are coroutines so that a networked
backend (PostgreSQL) fits behind the same calls as the embedded SQLite one.
Each method is one transaction: what it changes is all there or not at all
after a crash. A backend turns its driver's errors into
:class:`~gateway.errors.StoreError` (and into
:class:`~gateway.errors.StartupError` when it cannot be opened).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.rules.alerts import Alert
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event
from gateway.rules.priority import Plan, Refusal
from gateway.rules.reservations import Reservation, StartUnlock
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle
from gateway.rules.webhooks import Attempt, Delivery

__all__ = [
    "AUDIT_RETENTION_MS",
    "IDEMPOTENCY_RETENTION_MS",
    "UNCHECKED",
    "AlertStatus",
    "DeliveryEnd",
    "Room",
    "Store",
    "Unchecked",
    "UsageRows",
    "UsageUser",
    "UsageVehicle",
]

# The contract keeps the command audit at least 400 days; a little more covers a leap year's report.
AUDIT_RETENTION_MS = 410 * 86_400_000
# A retry comes within minutes; a day is plenty.
IDEMPOTENCY_RETENTION_MS = 86_400_000

AlertStatus = Literal["open", "resolved", "all"]


class Unchecked:
    """The default of `expected`: write whatever is stored now (the caller read nothing it relies on)."""


UNCHECKED = Unchecked()


@dataclass(frozen=True)
class Room:
    """How a staff reservation may make room: the other cars of its model at its station (in the order to
    try them), the notice a public booking is owed before it may be cancelled, and the events of a plan."""

    candidates: tuple[str, ...]
    notice_ms: int
    events: Callable[[Plan], list[Event]]
    early_grace_ms: int = 0


DeliveryEnd = Literal["delivered", "expired", "gone", "dropped"]


class Store(Protocol):
    # -- reservations --

    async def get_reservation(self, reservation_id: str) -> Reservation | None: ...

    async def put_reservation(
        self, r: Reservation, now_ms: int, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Reservation | None:
        """Store `r` (insert or replace) unless a live reservation of its car overlaps it; return that one.

        With `expected` (what the caller read, None for "not there"), the write happens only if the stored
        row is still exactly that, checked in the same transaction; else :class:`StaleRead`, nothing written."""
        ...

    async def put_with_priority(
        self, r: Reservation, now_ms: int, room: Room, expected: Reservation | Unchecked | None = UNCHECKED
    ) -> Plan | Refusal:
        """Store a staff reservation, making room as ``rules/priority.py`` decides, in one transaction:
        the moves, the reservation and the events of ``room.events(plan)``, or (refused) nothing.
        `expected` as for :meth:`put_reservation`."""
        ...

    async def cancel_reservation(self, reservation_id: str, now_ms: int, reason: str = "cancelled") -> bool:
        """Mark it cancelled, with why; False if it was not there or already cancelled."""
        ...

    async def list_reservations(
        self, vehicle_id: str | None, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[Reservation]:
        """By ``starts_ms`` then id; `from`/`to` select those overlapping ``[from, to)``."""
        ...

    # -- the start-time unlock --

    async def due_start_unlocks(self, now_ms: int) -> list[Reservation]:
        """``unlock_at_start`` reservations whose start has come, unclaimed, not cancelled, not ended."""
        ...

    async def next_start_unlock_ms(self, now_ms: int) -> int | None:
        """The earliest start of an unclaimed ``unlock_at_start`` reservation that has not ended."""
        ...

    async def pending_start_unlocks(self) -> list[Reservation]:
        """Claimed but never recorded: a crash came between sending and recording."""
        ...

    async def claim_start_unlock(self, reservation_id: str, claim: StartUnlock) -> bool:
        """Set the start unlock only if none is set; False if another call (or instance) has it."""
        ...

    async def set_start_unlock(self, reservation_id: str, su: StartUnlock | None) -> None: ...

    # -- idempotency --

    async def idempotent_outcome(self, caller: str, key: str) -> tuple[str, Outcome] | None:
        """The request fingerprint and the outcome saved under (caller, key), if any."""
        ...

    async def save_idempotent_outcome(
        self, caller: str, key: str, fingerprint: str, outcome: Outcome, now_ms: int
    ) -> None: ...

    # -- the command audit --

    async def record_command(self, rec: CommandRecord, event: Event | None = None) -> None:
        """Add to the audit, with its ``command.completed`` event. A backend may write both behind
        (SQLite: within 50 ms, batched, the two in one transaction), but :meth:`list_commands`,
        :meth:`list_events`, :meth:`due_deliveries` and :meth:`close` always see every record added
        before them."""
        ...

    async def list_commands(
        self, vehicle_id: str, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[CommandRecord]:
        """Newest first; `from` inclusive, `to` exclusive, on ``issued_ms``."""
        ...

    # -- trips --

    async def start_trip(self, t: Trip, event: Event | None = None) -> bool:
        """Record a trip that started, and its event; False (and nothing changed) if its reservation
        has one already."""
        ...

    async def get_trip(self, reservation_id: str) -> Trip | None: ...

    async def running_trips(self, booked_end_before_ms: int) -> list[Trip]:
        """Trips not ended whose reservation ends before the given time, earliest end first."""
        ...

    async def end_trip(self, t: Trip, month: str, event: Event | None = None) -> bool:
        """Close a running trip, count it in `month`'s usage, complete its reservation and record the
        event, in one transaction; False (and nothing changed) if it had ended already."""
        ...

    async def list_trips(
        self, from_ms: int | None, to_ms: int | None, vehicle_id: str | None, user_id: str | None, limit: int
    ) -> list[Trip]:
        """By ``started_ms``; `from` inclusive, `to` exclusive."""
        ...

    async def usage(self, month: str) -> UsageRows:
        """The ended trips counted in `month`, summed per user and per car, station and kind."""
        ...

    # -- events and the webhook outbox --
    # Recording an event also queues one delivery per endpoint in ``event.targets``, in the same
    # transaction: an event in the store is an event that will be delivered. Event ids are ULIDs of
    # the event's time (``gateway/rules/events.py``): a backend may order and prune by id.

    async def add_event(self, e: Event) -> None: ...

    async def list_events(self, after: str | None, type_: str | None, limit: int) -> list[Event]:
        """Oldest first, those with an id greater than `after` (which need not exist any more)."""
        ...

    async def due_deliveries(self, endpoint: str, now_ms: int, limit: int) -> list[Delivery]:
        """Pending deliveries to `endpoint` due by `now_ms`, the earliest first."""
        ...

    async def next_delivery_ms(self, endpoint: str, after_ms: int) -> int | None:
        """When the earliest pending delivery to `endpoint` due after `after_ms` is due."""
        ...

    async def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        """What became of these deliveries, in one transaction: due again later, or finished. A delivery
        already finished is left as it is."""
        ...

    async def give_up_deliveries(self, endpoint: str | None, keep: Collection[str], end: DeliveryEnd,
                                 now_ms: int, why: str) -> int:  # fmt: skip
        """Finish every pending delivery to `endpoint` (None: to any endpoint not in `keep`) as `end`;
        return how many."""
        ...

    async def expire_deliveries(self, endpoint: str, events_before_ms: int, now_ms: int) -> int:
        """Give up, untried, the pending deliveries to `endpoint` of events recorded before `events_before_ms`
        (past their maximum age, found after an outage); return how many."""
        ...

    async def webhook_backlog(self) -> int:
        """Deliveries still pending."""
        ...

    # -- alerts --

    async def open_alert(self, a: Alert, e: Event) -> bool:
        """Record the alert and its ``alert.opened`` event; False (nothing changed) if one of its type,
        car and reservation is open already."""
        ...

    async def resolve_alert(self, a: Alert, resolved_ms: int, e: Event) -> bool:
        """Resolve it and record ``alert.resolved``; False (nothing changed) if it was not open."""
        ...

    async def list_alerts(
        self, status: AlertStatus, vehicle_id: str | None, type_: str | None, limit: int
    ) -> list[Alert]:
        """Newest opened first."""
        ...

    # -- housekeeping --

    async def prune(self, now_ms: int, events_before_ms: int | None = None) -> int:
        """Forget idempotency keys and audit records past their retention, and events (with their
        deliveries) recorded before `events_before_ms`; return how many rows went."""
        ...

    async def close(self) -> None: ...
