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

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.errors import StoreError
from gateway.rules.alerts import Alert
from gateway.rules.commands import CommandRecord, Outcome
from gateway.rules.events import Event
from gateway.rules.priority import Plan, Refusal
from gateway.rules.reservations import Reservation, StartUnlock
from gateway.rules.trips import Trip
from gateway.rules.usage import UsageRows, UsageUser, UsageVehicle
from gateway.rules.webhooks import Attempt, Delivery

__all__ = [
    "AUDIT_FLUSH_S",
    "AUDIT_MAX_PENDING",
    "AUDIT_RETENTION_MS",
    "AUDIT_RETRY_S",
    "IDEMPOTENCY_CLAIM_TTL_MS",
    "IDEMPOTENCY_RETENTION_MS",
    "UNCHECKED",
    "AlertStatus",
    "Claim",
    "DeliveryEnd",
    "Room",
    "Store",
    "StoredReading",
    "Unchecked",
    "UsageRows",
    "UsageUser",
    "UsageVehicle",
    "audit_refused",
]

log = logging.getLogger(__name__)

# The contract keeps the command audit at least 400 days; a little more covers a leap year's report.
AUDIT_RETENTION_MS = 410 * 86_400_000
# The command audit of both backends is written behind: rows gather this long, then go in one transaction.
AUDIT_FLUSH_S = 0.05
# While the store refuses them, at most this many wait in memory (retried every AUDIT_RETRY_S); then the
# oldest go.
AUDIT_MAX_PENDING = 100_000
AUDIT_RETRY_S = 1.0


def audit_refused(error: StoreError, records: list[Any], events: list[Any], cap: int = AUDIT_MAX_PENDING) -> None:
    """A flush of the audit failed: say so, and drop the oldest records (and events) beyond `cap`, in place;
    the rest wait for the next try."""
    log.error("%s; %d audit records kept in memory, retrying", error, len(records))
    dropped = max(0, len(records) - cap)
    del records[:dropped]
    del events[: max(0, len(events) - cap)]
    if dropped:
        log.error("the store has refused the audit for too long: %d oldest records dropped", dropped)


# A retry comes within minutes; a day is plenty.
IDEMPOTENCY_RETENTION_MS = 86_400_000
# How long a claimed Idempotency-Key stays claimed if its holder neither saves an outcome nor releases it
# (it crashed): longer than a command takes (ack_timeout_s is at most 300 s), so a slow car is not sent twice.
IDEMPOTENCY_CLAIM_TTL_MS = 330_000

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


@dataclass(frozen=True)
class StoredReading:
    """The newest reading of one kind of one car, as shared between gateways (``ingest.telemetry.Reading``
    without the import: the store sits below ingest)."""

    vehicle_id: str
    kind: str
    ts_ms: int
    fields: dict[str, Any]


def newest_of(readings: Sequence[StoredReading], seen: Mapping[str, int]) -> tuple[list[StoredReading], dict[str, int]]:
    """A batch as one write per row: the newest reading per car and kind (equal times: the later one,
    as if written one after another), each car's latest last-seen time. A batch statement may touch a
    row only once (PostgreSQL's ON CONFLICT refuses a second time)."""
    newest: dict[tuple[str, str], StoredReading] = {}
    for r in readings:
        old = newest.get((r.vehicle_id, r.kind))
        if old is None or r.ts_ms >= old.ts_ms:
            newest[(r.vehicle_id, r.kind)] = r
    return list(newest.values()), dict(seen)


# What claiming an Idempotency-Key found: "claimed" (the caller runs the request, then saves its outcome or
# releases the claim), the (fingerprint, outcome) saved by whoever ran it, or "pending" (another holder runs
# it now: wait and ask again).
Claim = Literal["claimed", "pending"] | tuple[str, Outcome]


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

    async def save_idempotent_outcome(
        self, caller: str, key: str, fingerprint: str, outcome: Outcome, now_ms: int
    ) -> None:
        """Keep the outcome under (caller, key), and end any claim of the key, in one transaction."""
        ...

    async def claim_idempotency_key(
        self, caller: str, key: str, fingerprint: str, holder: str, now_ms: int,
        ttl_ms: int = IDEMPOTENCY_CLAIM_TTL_MS,
    ) -> Claim:  # fmt: skip
        """The saved outcome of (caller, key) if there is one; else claim the key for `holder` until
        ``now_ms + ttl_ms`` ("claimed") unless another holder's claim is still live ("pending"). A holder
        claiming again renews its claim. At most one holder has a live claim, across instances."""
        ...

    async def release_idempotency_key(self, caller: str, key: str, holder: str) -> None:
        """End `holder`'s claim (the request failed, nothing to save): a retry may claim it at once."""
        ...

    # -- leases: work done once across instances --

    async def take_lease(self, name: str, holder: str, now_ms: int, ttl_ms: int) -> bool:
        """If lease `name` is free, expired (``expires_ms <= now_ms``) or held by `holder`: make it
        `holder`'s until ``now_ms + ttl_ms`` and return True; else False. Atomic across instances."""
        ...

    async def release_lease(self, name: str, holder: str) -> None:
        """Free the lease if `holder` has it (expired or not); else nothing."""
        ...

    # -- the shared latest state of the cars --

    async def put_states(self, readings: Sequence[StoredReading], seen: Mapping[str, int]) -> int:
        """In one transaction: each reading replaces the stored one of its car and kind unless that one is
        newer (equal times: the new one wins); each car's last seen time becomes the later of the two.
        Every row changed gets this batch's change number, beyond every one before, which is returned
        (0: nothing to write; see :meth:`states_changed_since`)."""
        ...

    async def states_changed_since(self, cursor: int, own: int = 0) -> tuple[list[StoredReading], dict[str, int], int]:
        """The readings and last-seen times changed after `cursor` (0: all), and the cursor to ask with
        next time. Nothing committed is ever skipped: a change not yet visible now comes in a later call.

        `own` is the number :meth:`put_states` returned to this caller for its last batch: the rows
        still carrying it are what the caller wrote, so they are left out, and the cursor moves past it."""
        ...

    # -- the command audit --

    async def record_command(self, rec: CommandRecord, event: Event | None = None) -> None:
        """Add to the audit, with its ``command.completed`` event. A backend may write both behind
        (both do: within AUDIT_FLUSH_S, batched, the two in one transaction), but :meth:`list_commands`,
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
