"""The booking system's side of the gateway: reservations, unlock and lock, the start-time unlock.

HTTP handlers (routes.py) call :class:`Booking`; it applies the rules of
reservations.py, keeps reservations in the store, and sends commands
through the dispatcher. Outcomes map onto the contract's status codes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson

from gateway.booking.dispatcher import Action, CommandDispatcher, Outcome
from gateway.errors import ApiError, BrokerUnavailable
from gateway.fleet import Fleet
from gateway.ingest.journal import Journal
from gateway.ingest.lineproto import line
from gateway.rules.reservations import Reservation, StartUnlock, check_opens, merge_update, parse_body, to_json
from gateway.store.sqlite import Store

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


def outcome_answer(o: Outcome) -> tuple[int, dict[str, Any]]:
    """The contract's HTTP answer for a command outcome."""
    if o.result == "done":
        body: dict[str, Any] = {"command_id": o.command_id, "status": "done", "latency_ms": round(o.latency_ms, 1)}
        if o.locked is not None:
            body["locked"] = o.locked
        return 200, body
    if o.result == "timeout":
        msg = f"{o.vehicle_id} did not answer within the timeout; the command has expired and will not run later"
        return 504, {"error": {"code": "vehicle_timeout", "message": msg, "command_id": o.command_id}}
    code = "command_rejected" if o.result == "rejected" else "command_failed"
    verb = "refused" if o.result == "rejected" else "could not carry out"
    msg = f"{o.vehicle_id} {verb} the {o.action}: {o.reason or 'no reason given'}"
    return 502, {"error": {"code": code, "message": msg, "reason": o.reason, "command_id": o.command_id}}


class Booking:
    def __init__(
        self, store: Store, fleet: Fleet, commands: CommandDispatcher, journal: Journal, early_grace_s: float
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.commands = commands
        self.journal = journal
        self.early_grace_ms = int(early_grace_s * 1000)
        self._wake = asyncio.Event()
        # (caller, key) -> (request fingerprint, the first call's answer to come)
        self._in_flight: dict[tuple[str, str], tuple[str, asyncio.Future[tuple[int, bytes]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reservations --

    def put(self, reservation_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        now = now_ms()
        new = parse_body(reservation_id, body, self.fleet.vehicles)
        old = self.store.get(reservation_id)
        if old is not None and old.cancelled:
            raise ApiError(409, "reservation_cancelled", f"reservation {reservation_id} was cancelled; use a new id")
        stored = merge_update(old, new, now) if old is not None else _created(new, now)
        clash = self.store.put_checked(stored, now)
        if clash is not None:
            raise ApiError(
                409,
                "reservation_conflict",
                f"{stored.vehicle_id} is already reserved by {clash.id} from {to_json(clash)['starts_at']} "
                f"to {to_json(clash)['ends_at']}",
            )
        if old is not None and (old.starts_ms, old.vehicle_id, old.kind) != (new.starts_ms, new.vehicle_id, new.kind):
            self._record(old, cancelled=True)  # the old point would otherwise still count in the usage dashboard
        self._record(stored, cancelled=False)
        self._wake.set()
        return (200 if old is not None else 201), to_json(stored)

    def get(self, reservation_id: str) -> Reservation:
        r = self.store.get(reservation_id)
        if r is None:
            raise ApiError(404, "unknown_reservation", f"no reservation {reservation_id[:64]!r}")
        return r

    def cancel(self, reservation_id: str) -> None:
        r = self.get(reservation_id)
        if not r.cancelled:
            self.store.cancel(reservation_id, now_ms())
            self._record(r, cancelled=True)

    def _record(self, r: Reservation, cancelled: bool) -> None:
        v = self.fleet.vehicles[r.vehicle_id]
        tags = {"vehicle_id": r.vehicle_id, "model": v.model, "station": v.station, "kind": r.kind}
        values = {"reservation_id": r.id, "duration_h": round(r.duration_h, 4), "cancelled": cancelled}
        self.journal.append(line("reservations", tags, values, r.starts_ms))

    # -- unlock / lock --

    async def command(
        self, vehicle_id: str, action: Action, reservation_id: str | None, caller: str, idem_key: str | None
    ) -> tuple[int, bytes]:
        """Check, send and wait; with an Idempotency-Key, the first answer is replayed and nothing resent."""
        if vehicle_id not in self.fleet.vehicles:
            raise ApiError(404, "unknown_vehicle", f"no vehicle {vehicle_id[:40]!r} in the fleet registry")

        async def run() -> tuple[int, bytes]:
            status, body = await self._command(vehicle_id, action, reservation_id)
            return status, orjson.dumps(body)

        if idem_key is None:
            return await run()
        fingerprint = hashlib.sha256(f"{action}|{vehicle_id}|{reservation_id}".encode()).hexdigest()
        return await self._idempotent(caller, idem_key, fingerprint, run)

    async def _command(self, vehicle_id: str, action: Action, reservation_id: str | None) -> tuple[int, dict[str, Any]]:
        if reservation_id is not None:
            r = self.get(reservation_id)
            if action == "unlock":
                check_opens(r, vehicle_id, now_ms(), self.early_grace_ms)
            elif r.vehicle_id != vehicle_id or r.cancelled:
                # Locking never lets anyone in, so it is allowed after the reservation ends.
                check_opens(r, vehicle_id, r.starts_ms, self.early_grace_ms)
        elif action == "unlock":
            raise ApiError(422, "invalid_body", "reservation_id: is required to unlock")
        outcome = await self.commands.send(vehicle_id, action, reservation_id)
        return outcome_answer(outcome)

    async def _idempotent(
        self, caller: str, key: str, fingerprint: str, run: Callable[[], Awaitable[tuple[int, bytes]]]
    ) -> tuple[int, bytes]:
        # Printable ASCII only: HTTP lets a header carry other bytes, which would reach SQLite half-decoded.
        if not 0 < len(key) <= 200 or not (key.isascii() and key.isprintable()):
            raise ApiError(400, "bad_idempotency_key", "Idempotency-Key must be 1 to 200 printable ASCII characters")
        saved = self.store.idempotent_answer(caller, key)
        if saved is not None:
            if saved[0] != fingerprint:
                raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used for another request")
            return saved[1], saved[2]
        pending = self._in_flight.get((caller, key))
        if pending is not None:  # a retry while the first call still waits for the car
            first_fingerprint, first = pending
            if first_fingerprint != fingerprint:
                raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key is in use for another request")
            return await asyncio.shield(first)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._in_flight[(caller, key)] = (fingerprint, fut)
        try:
            try:
                status, body = await run()
            except ApiError as e:
                status, body = e.status, orjson.dumps({"error": {"code": e.code, "message": e.message}})
            # Only answers that involved a car are replayed; a 409 may become valid later.
            if status in (200, 502, 504):
                self.store.save_idempotent_answer(caller, key, fingerprint, status, body, now_ms())
        except BaseException as e:
            # Retries waiting on this call get the same failure instead of hanging.
            fut.set_exception(e if isinstance(e, Exception) else BrokerUnavailable("request cancelled"))
            fut.exception()  # marks it retrieved: maybe nobody is waiting
            raise
        finally:
            self._in_flight.pop((caller, key), None)
        fut.set_result((status, body))
        return status, body

    # -- the start-time unlock --

    async def run_start_unlocks(self) -> None:
        """Unlock each ``unlock_at_start`` reservation once, at its start (or at restart if it passed)."""
        for r in self.store.interrupted_start_unlocks():
            # We crashed between claiming and recording: the car may or may not have opened.
            # Unlocking twice is harmless; not opening for a waiting user is not.
            log.warning("start unlock of %s was interrupted by a restart; sending it again", r.id)
            self.store.set_start_unlock(r.id, None)
        while True:
            try:
                self._start_due()
                nxt = self.store.next_start_unlock_ms(now_ms())
            except sqlite3.Error as e:
                log.error("start unlocks: the reservations database failed (%s); trying again", e)
                nxt = now_ms()
            # Overdue ones left unclaimed (broker down) are retried every second.
            wait = 5.0 if nxt is None else min(5.0, max(1.0 if nxt <= now_ms() else 0.01, (nxt - now_ms()) / 1000))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _start_due(self) -> None:
        for r in self.store.due_start_unlocks(now_ms()):
            if self.store.set_start_unlock(r.id, StartUnlock("pending", now_ms()), only_if_unset=True):
                task = asyncio.create_task(self._start_unlock(r), name=f"start-unlock-{r.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _start_unlock(self, r: Reservation) -> None:
        try:
            o = await self.commands.send(r.vehicle_id, "unlock", r.id)
        except BrokerUnavailable:
            # Not sent: release the claim so the scheduler tries again while the reservation runs.
            self.store.set_start_unlock(r.id, None)
            return
        su = StartUnlock(o.result, now_ms(), o.command_id, o.reason)
        self.store.set_start_unlock(r.id, su)
        log.info("start unlock of reservation %s on %s: %s", r.id, r.vehicle_id, su.status)

    async def close(self) -> None:
        """Cancel start unlocks still waiting for a car; they are sent again at the next start."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _created(r: Reservation, now: int) -> Reservation:
    return replace(r, created_ms=now, updated_ms=now)
