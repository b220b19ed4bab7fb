"""The booking system's side of the gateway: reservations, unlock and lock, and the command audit.

:class:`Booking` applies the pure rules of ``gateway/rules/reservations.py``,
keeps what is durable in the :class:`~gateway.store.base.Store`, and sends
commands through a :class:`CommandSender`. It raises domain errors and
returns outcomes; it knows nothing of HTTP. Every command it sends, or
could not send, is written to the audit with the caller's name.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from gateway.errors import (
    BrokerUnavailable,
    IdempotencyKeyReused,
    InvalidBody,
    InvalidIdempotencyKey,
    InvalidQuery,
    ReservationCancelled,
    ReservationConflict,
    ReservationNotActive,
    StaleRead,
    StoreError,
    UnknownReservation,
    UnknownVehicle,
)
from gateway.fleet import Fleet
from gateway.ids import IDEMPOTENCY_KEY, RESERVATION_ID
from gateway.ingest.lineproto import line
from gateway.notify.events import EventLog
from gateway.rules.commands import Action, CommandRecord, Outcome, Source, fingerprint
from gateway.rules.events import Event, EventType, command_doc
from gateway.rules.priority import Move, Plan, Refusal, free_vehicles
from gateway.rules.reservations import (
    MAX_SPAN_MS,
    Reservation,
    ReservationRequest,
    check_locks,
    check_opens,
    merge_update,
    new_reservation,
)
from gateway.store.base import Room, Store
from gateway.times import iso_ms, now_ms

log = logging.getLogger(__name__)

__all__ = ["Booking", "CommandSender"]

# A reservation changed under a PUT is read and merged again this many times before the PUT fails (503).
PUT_ATTEMPTS = 3
# A retry whose key another gateway is running waits for its outcome this long (past the longest ack timeout
# of a usual configuration), looking every IDEMPOTENCY_POLL_S.
IDEMPOTENCY_WAIT_S = 30.0
IDEMPOTENCY_POLL_S = 0.1
AVAILABILITY_SPAN_MS = 3_600_000  # GET /v1/availability without `to`: the hour from `from`
MAX_OVERLAPPING = 1_000_000  # every reservation over a span: a fleet's bookings of a month are thousands


class CommandSender(Protocol):
    """Sends one signed command and waits for the car; raises BrokerUnavailable if it cannot be sent."""

    async def send(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str, command_id: str
    ) -> Outcome: ...


class Booking:
    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        sender: CommandSender,
        points: Callable[[bytes], object],
        early_grace_s: float,
        clock: Callable[[], int] = now_ms,
        on_change: Callable[[], None] = lambda: None,
        events: EventLog | None = None,
        preempt_notice_s: float = 86400,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.sender = sender
        self._points = points  # InfluxDB line protocol, for the `reservations` measurement
        self.early_grace_ms = int(early_grace_s * 1000)
        self.clock = clock
        self.on_change = on_change  # wakes the start-unlock scheduler
        self.events = events or EventLog()
        self.preempt_notice_ms = int(preempt_notice_s * 1000)
        self.displaced: Counter[str] = Counter()  # public reservations a staff one moved or cancelled, by action
        # Told of every `done` unlock of a reservation (its first starts the trip).
        self.on_unlocked: Callable[[Reservation], Awaitable[None]] | None = None
        # (caller, key) -> (request fingerprint, the first call's outcome to come)
        self._in_flight: dict[tuple[str, str], tuple[str, asyncio.Future[Outcome]]] = {}
        # Who claims Idempotency-Keys in the store: this process, whatever its instance name.
        self._holder = uuid.uuid4().hex

    # -- reservations --

    async def put(
        self, reservation_id: str, req: ReservationRequest, caller: str
    ) -> tuple[Reservation, bool, tuple[Move, ...]]:
        """Create or update; returns the stored reservation, whether it is new, and (staff) what it displaced."""
        now = self.clock()
        new = new_reservation(reservation_id, req, self.fleet.vehicles, now, caller)
        # The update is merged with the stored row, and written only if that row is unchanged when the write
        # commits: between the read and the write another request (or, on PostgreSQL, another gateway) may
        # cancel it or claim its start unlock, which a blind write would undo.
        for attempt in range(1, PUT_ATTEMPTS + 1):
            old = await self.store.get_reservation(reservation_id)
            if old is not None and old.cancelled:
                raise ReservationCancelled(f"reservation {reservation_id} was cancelled; use a new id")
            if old is not None and old.completed:
                raise ReservationNotActive(f"the rental of reservation {reservation_id} has ended; use a new id")
            stored = merge_update(old, new, now) if old is not None else new
            moves: tuple[Move, ...] = ()
            made: list[Event] = []  # the displacement's events, told once the transaction has committed
            try:
                if stored.kind == "staff":
                    decision = await self.store.put_with_priority(stored, now, self._room(stored, now, made), old)
                    if isinstance(decision, Refusal):
                        raise ReservationConflict(f"{stored.vehicle_id}: {decision.why}", decision.blocking.id)
                    moves = decision.moves
                else:
                    clash = await self.store.put_reservation(stored, now, old)
                    if clash is not None:
                        raise ReservationConflict(
                            f"{stored.vehicle_id} is already reserved by {clash.id} from {iso_ms(clash.starts_ms)} "
                            f"to {iso_ms(clash.ends_ms)}",
                            clash.id,
                        )
            except StaleRead:
                if attempt == PUT_ATTEMPTS:
                    raise
                continue
            break
        if old is not None and (old.starts_ms, old.vehicle_id, old.kind) != (new.starts_ms, new.vehicle_id, new.kind):
            self._record(old, cancelled=True)  # the old point would otherwise still count in the usage dashboard
        self._record(stored, cancelled=False)
        for m in moves:
            self.displaced[m.action] += 1
            self._record(m.reservation, cancelled=True)
            if m.action == "reassigned":
                self._record(replace(m.reservation, vehicle_id=m.vehicle_id), cancelled=False)
            log.info(
                "staff reservation %s on %s: public reservation %s %s%s", stored.id, stored.vehicle_id,
                m.reservation_id, m.action, f" to {m.vehicle_id}" if m.action == "reassigned" else "",
            )  # fmt: skip
        for e in made:
            self.events.recorded(e)
        self.on_change()
        return stored, old is None, moves

    def _room(self, staff: Reservation, now: int, made: list[Event]) -> Room:
        """What a staff reservation may do to make room: the cars of its model at its station, and events."""
        home = self.fleet.vehicles[staff.vehicle_id]
        candidates = tuple(
            v.id for v in self.fleet.vehicles.values()
            if v.model == home.model and v.station == home.station and v.id != staff.vehicle_id
        )  # fmt: skip

        def events(plan: Plan) -> list[Event]:
            out = []
            for m in plan.moves:
                r = m.reservation
                data = {
                    "reservation_id": r.id,
                    "user_id": r.user_id,
                    "from_vehicle_id": r.vehicle_id,
                    "to_vehicle_id": m.vehicle_id if m.action == "reassigned" else None,
                    "by_reservation_id": staff.id,
                }
                type_: EventType = "reservation.reassigned" if m.action == "reassigned" else "reservation.preempted"
                out.append(self.events.new(type_, data, now))
            made[:] = out
            return out

        return Room(candidates, self.preempt_notice_ms, events, self.early_grace_ms)

    async def get(self, reservation_id: str) -> Reservation:
        if not RESERVATION_ID.matches(reservation_id):  # none was ever stored; PostgreSQL refuses some (U+0000)
            raise UnknownReservation(reservation_id)
        r = await self.store.get_reservation(reservation_id)
        if r is None:
            raise UnknownReservation(reservation_id)
        return r

    async def cancel(self, reservation_id: str) -> None:
        r = await self.get(reservation_id)
        if await self.store.cancel_reservation(reservation_id, self.clock()):
            self._record(r, cancelled=True)

    async def find(
        self, vehicle_id: str | None, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[Reservation]:
        if vehicle_id is not None:
            self.vehicle(vehicle_id)
        return await self.store.list_reservations(vehicle_id, from_ms, to_ms, limit)

    async def available(
        self, station: str | None, model: str | None, from_ms: int | None, to_ms: int | None
    ) -> list[str]:
        """The cars (of a station, of a model) with no live reservation overlapping ``[from, to)``."""
        now = self.clock()
        start = now if from_ms is None else from_ms
        end = start + AVAILABILITY_SPAN_MS if to_ms is None else to_ms
        if end <= start:
            raise InvalidQuery("to", "must be after from")
        if station is not None and station not in self.fleet.stations:
            raise InvalidQuery("station", f"{station[:40]!r} is not a station of the fleet")
        if model is not None and model not in self.fleet.models:
            raise InvalidQuery("model", f"{model[:40]!r} is not a model of the fleet ({', '.join(self.fleet.models)})")
        if end - start > MAX_SPAN_MS:
            raise InvalidQuery("to", "a span of at most 31 days")
        cars = [
            v.id for v in self.fleet.vehicles.values()
            if (station is None or v.station == station) and (model is None or v.model == model)
        ]  # fmt: skip
        overlapping = await self.store.list_reservations(None, start, end, MAX_OVERLAPPING)
        overdue = {t.vehicle_id for t in await self.store.running_trips(now)}
        return free_vehicles(cars, overlapping, start, end, now, overdue)

    def vehicle(self, vehicle_id: str) -> None:
        if vehicle_id not in self.fleet.vehicles:
            raise UnknownVehicle(vehicle_id)

    def _record(self, r: Reservation, cancelled: bool) -> None:
        v = self.fleet.vehicles[r.vehicle_id]
        tags = {"vehicle_id": r.vehicle_id, "model": v.model, "station": v.station, "kind": r.kind}
        values = {"reservation_id": r.id, "duration_h": round(r.duration_h, 4), "cancelled": cancelled}
        self._points(line("reservations", tags, values, r.starts_ms))

    # -- unlock / lock --

    async def command(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str, idem_key: str | None = None
    ) -> Outcome:
        """Check, send and wait; with an Idempotency-Key the first outcome is replayed and nothing resent."""
        self.vehicle(vehicle_id)
        if idem_key is None:
            return await self._checked_command(vehicle_id, action, reservation_id, caller)
        if not IDEMPOTENCY_KEY.matches(idem_key):
            raise InvalidIdempotencyKey("Idempotency-Key", IDEMPOTENCY_KEY.describe)
        fp = fingerprint(action, vehicle_id, reservation_id)
        # Looked up and claimed before any await, so that two calls with one key never both send.
        pending = self._in_flight.get((caller, idem_key))
        if pending is not None:  # a retry while the first call still runs
            first_fp, first = pending
            if first_fp != fp:
                raise IdempotencyKeyReused("this Idempotency-Key is in use for another request")
            return await asyncio.shield(first)
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._in_flight[(caller, idem_key)] = (fp, fut)
        try:
            saved = await self._claim(caller, idem_key, fp)
            if saved is not None:
                if saved[0] != fp:
                    raise IdempotencyKeyReused("this Idempotency-Key was used for another request")
                outcome = saved[1]
            else:
                try:
                    outcome = await self._checked_command(vehicle_id, action, reservation_id, caller)
                except BaseException:
                    await self._unclaim(caller, idem_key)  # a refusal (409, 404) may not hold later: retry anew
                    raise
                # Only outcomes that involved a car are kept; saving also ends the claim.
                try:
                    await self.store.save_idempotent_outcome(caller, idem_key, fp, outcome, self.clock())
                except StoreError as e:
                    # The car has acted: its answer goes back all the same; only a retry is unprotected.
                    log.error("Idempotency-Key of %s on %s not saved: %s", action, vehicle_id, e)
                    await self._unclaim(caller, idem_key)
        except BaseException as e:
            # Retries waiting on this call get the same failure instead of hanging.
            fut.set_exception(e if isinstance(e, Exception) else BrokerUnavailable("request cancelled"))
            fut.exception()  # marks it retrieved: maybe nobody is waiting
            raise
        finally:
            self._in_flight.pop((caller, idem_key), None)
        fut.set_result(outcome)
        return outcome

    async def _claim(self, caller: str, key: str, fp: str) -> tuple[str, Outcome] | None:
        """The key's first outcome, or None once this process may run the request.

        Claimed in the store, so that a retry reaching another gateway while the first call still runs
        waits for its answer instead of sending the command again."""
        deadline = self.clock() + int(IDEMPOTENCY_WAIT_S * 1000)
        while True:
            got = await self.store.claim_idempotency_key(caller, key, fp, self._holder, self.clock())
            if got == "claimed":
                return None
            if isinstance(got, tuple):
                return got
            if self.clock() >= deadline:
                raise StoreError("a request with this Idempotency-Key is still running on another gateway; retry")
            await asyncio.sleep(IDEMPOTENCY_POLL_S)

    async def _unclaim(self, caller: str, key: str) -> None:
        try:
            await self.store.release_idempotency_key(caller, key, self._holder)
        except StoreError as e:  # it expires by itself; until then a retry waits
            log.warning("Idempotency-Key claim not released: %s", e)

    async def _checked_command(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str
    ) -> Outcome:
        r = None
        if reservation_id is not None:
            r = await self.get(reservation_id)
            if action == "unlock":
                check_opens(r, vehicle_id, self.clock(), self.early_grace_ms)
            else:
                check_locks(r, vehicle_id)
        elif action == "unlock":
            raise InvalidBody("reservation_id", "is required to unlock")
        return await self.send_command(vehicle_id, action, r, caller, "api")

    async def send_command(
        self,
        vehicle_id: str,
        action: Action,
        reservation: Reservation | None,
        caller: str,
        source: Source,
        audit_not_sent: bool = True,
    ) -> Outcome:
        """Send with no checks, and audit it: the outcome, that the broker was down, or that we stopped waiting."""
        reservation_id = None if reservation is None else reservation.id
        command_id = str(uuid.uuid4())
        issued = self.clock()
        try:
            outcome = await self.sender.send(vehicle_id, action, reservation_id, caller, command_id)
        except BrokerUnavailable:
            if audit_not_sent:
                rec = CommandRecord.not_sent(command_id, vehicle_id, action, reservation_id, caller, source, issued)
                await self._audit(rec)
            raise
        except asyncio.CancelledError:
            # Shutting down while the car had the command: it may yet act on it before it expires.
            rec = CommandRecord(command_id, vehicle_id, action, reservation_id, caller, source, issued, "timeout",
                                "gateway_stopped", None)  # fmt: skip
            await self._audit(rec)
            raise
        await self._audit(CommandRecord.of(outcome, reservation_id, caller, source))
        if outcome.result == "done" and action == "unlock" and reservation is not None and self.on_unlocked:
            try:
                await self.on_unlocked(reservation)
            except StoreError as e:
                log.error("the trip of %s could not be started: %s", reservation_id, e)
        log.info(
            "%s %s for %s by %s (%s): %s%s",
            action,
            vehicle_id,
            reservation_id or "no reservation",
            caller,
            source,
            outcome.result,
            f" ({outcome.reason})" if outcome.reason and outcome.result != "done" else "",
        )
        return outcome

    async def _audit(self, rec: CommandRecord) -> None:
        e = self.events.new("command.completed", {**command_doc(rec), "vehicle_id": rec.vehicle_id})
        try:
            await self.store.record_command(rec, e)
        except StoreError as err:
            # Never turn what the car did into an error: the answer stands, the log keeps the record.
            log.error("command %s not audited (%s): %s", rec.command_id, err, rec)
            return
        self.events.recorded(e)

    async def commands_of(
        self, vehicle_id: str, from_ms: int | None, to_ms: int | None, limit: int
    ) -> list[CommandRecord]:
        self.vehicle(vehicle_id)
        return await self.store.list_commands(vehicle_id, from_ms, to_ms, limit)
