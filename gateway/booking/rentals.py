"""The rental from unlock to return: trips, the end of a rental, the automatic end, the usage statement.

A trip starts when its reservation's first unlock is ``done`` (asked
through the API or sent at the start); :meth:`Rentals.end` checks the car,
locks it and closes the trip; :meth:`Rentals.run_auto_end` closes trips whose
car came back, locked, long enough after the booked end. Each closed trip is
written to the `trips` measurement. The rules are in ``gateway/rules/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from gateway.booking.service import Booking
from gateway.errors import EndChecksFailed, InvalidQuery, NoTrip, ReservationNotActive, StoreError, UnknownVehicle
from gateway.fleet import Fleet
from gateway.ingest.lineproto import line
from gateway.ingest.state import FleetState
from gateway.notify.events import EventLog
from gateway.rules.billing import Tariff, hours_in_month, month_bounds, month_of
from gateway.rules.commands import Outcome
from gateway.rules.events import trip_doc
from gateway.rules.reservations import Reservation, user_id_problem
from gateway.rules.trips import (
    Check,
    EndedBy,
    Place,
    Readings,
    Trip,
    end_trip,
    failed_checks,
    may_auto_end,
    start_trip,
)
from gateway.rules.usage import usage_report
from gateway.store.base import Store
from gateway.times import now_ms

log = logging.getLogger(__name__)

__all__ = ["Rentals", "readings_from"]

AUTO_END_EVERY_S = 30.0
STARTED_MEMORY = 100_000


def readings_from(state: FleetState) -> Callable[[str], Readings]:
    """What the end checks and the trip figures read: the car's latest reading of each kind."""

    def readings(vehicle_id: str) -> Readings:
        rs = state.vehicles[vehicle_id].readings
        loc, doors, bat = rs.get("location"), rs.get("doors"), rs.get("battery")
        lf = loc.fields if loc else {}
        df = doors.fields if doors else {}
        bf = bat.fields if bat else {}
        return Readings(
            location_ms=loc.ts_ms if loc else None,
            lat=lf.get("lat"),
            lon=lf.get("lon"),
            speed_kmh=lf.get("speed_kmh"),
            odometer_km=lf.get("odometer_km"),
            doors_ms=doors.ts_ms if doors else None,
            locked=df.get("locked"),
            closed=df.get("closed"),
            soc_pct=bf.get("soc_pct"),
            plugged=bf.get("plugged"),
        )

    return readings


class Rentals:
    def __init__(
        self,
        store: Store,
        booking: Booking,
        fleet: Fleet,
        readings: Callable[[str], Readings],
        points: Callable[[bytes], object],
        tariff: Tariff,
        checks: Iterable[Check],
        max_state_age_s: float,
        auto_end_after_s: float,
        clock: Callable[[], int] = now_ms,
        events: EventLog | None = None,
    ) -> None:
        self.store = store
        self.booking = booking
        self.events = events or EventLog()
        self.fleet = fleet
        self.readings = readings
        self._points = points
        self.tariff = tariff
        self.checks = tuple(checks)
        self.max_age_ms = int(max_state_age_s * 1000)
        self.auto_end_after_ms = int(auto_end_after_s * 1000)
        self.clock = clock
        self._ending: set[str] = set()  # reservations whose end is under way in this process
        # Reservations known to have a trip: a car unlocked again during its trip costs no store call.
        self._started: set[str] = set()

    def _home(self, vehicle_id: str) -> Place:
        s = self.fleet.stations[self.fleet.vehicles[vehicle_id].station]
        return Place(s.lat, s.lon, s.radius_m)

    async def unlocked(self, r: Reservation) -> None:
        """Called after every ``done`` unlock of a reservation: the first one starts its trip."""
        if r.completed or r.id in self._started:
            return
        station = self.fleet.vehicles[r.vehicle_id].station
        trip = start_trip(r, station, self.readings(r.vehicle_id), self.clock())
        e = self.events.new("trip.started", trip_doc(trip), trip.started_ms)
        if await self.store.start_trip(trip, e):
            self.events.recorded(e)
            log.info("trip of %s started on %s (user %s)", r.id, r.vehicle_id, r.user_id)
        if len(self._started) >= STARTED_MEMORY:
            self._started.clear()
        self._started.add(r.id)

    async def trip(self, reservation_id: str) -> Trip:
        await self.booking.get(reservation_id)
        t = await self.store.get_trip(reservation_id)
        if t is None:
            raise NoTrip(f"reservation {reservation_id} has no trip: its car was never unlocked")
        return t

    async def trips(
        self, from_ms: int | None, to_ms: int | None, vehicle_id: str | None, user_id: str | None, limit: int
    ) -> list[Trip]:
        if vehicle_id is not None and vehicle_id not in self.fleet.vehicles:
            raise UnknownVehicle(vehicle_id)
        if user_id is not None and (why := user_id_problem(user_id)) is not None:
            raise InvalidQuery("user_id", why)
        return await self.store.list_trips(from_ms, to_ms, vehicle_id, user_id, limit)

    async def end(self, reservation_id: str, force: bool, caller: str) -> Trip | Outcome:
        """Check the car, lock it, close the trip: the trip when ended, the lock's outcome if the car did not lock."""
        r = await self.booking.get(reservation_id)
        t = await self.store.get_trip(reservation_id)
        if t is None:
            raise ReservationNotActive(f"the trip of reservation {reservation_id} never started")
        if not t.running or reservation_id in self._ending:
            raise ReservationNotActive(f"the rental of reservation {reservation_id} has already ended")
        self._ending.add(reservation_id)
        try:
            home = self._home(r.vehicle_id)
            if not force:
                failed = failed_checks(self.readings(r.vehicle_id), home, self.clock(), self.max_age_ms, self.checks)
                if failed:
                    raise EndChecksFailed(list(failed))
            o = await self.booking.send_command(r.vehicle_id, "lock", r, caller, "end_of_rental")
            if o.result != "done":
                return o
            return await self._close(t, "user", force)
        finally:
            self._ending.discard(reservation_id)

    async def _close(self, t: Trip, ended_by: EndedBy, forced: bool) -> Trip:
        battery_kwh = self.fleet.models[self.fleet.vehicles[t.vehicle_id].model].battery_kwh
        ended = end_trip(
            t, self.readings(t.vehicle_id), self._home(t.vehicle_id), battery_kwh, self.tariff, self.clock(),
            ended_by, forced,
        )  # fmt: skip
        e = self.events.new("trip.ended", trip_doc(ended), ended.ended_ms)
        if not await self.store.end_trip(ended, month_of(t.started_ms, self.tariff.timezone), e):
            raise ReservationNotActive(f"the rental of reservation {t.reservation_id} has already ended")
        self.events.recorded(e)
        self._record(ended)
        log.info(
            "trip of %s on %s ended (%s): %s min, %s km, %.2f EUR",
            t.reservation_id, t.vehicle_id, ended_by, ended.duration_min, ended.distance_km, ended.amount_eur or 0,
        )  # fmt: skip
        return ended

    def _record(self, t: Trip) -> None:
        v = self.fleet.vehicles[t.vehicle_id]
        tags = {"vehicle_id": t.vehicle_id, "model": v.model, "station": t.station, "kind": t.kind}
        values = {
            "reservation_id": t.reservation_id,
            "duration_min": t.duration_min,
            "distance_km": t.distance_km,
            "energy_kwh": t.energy_kwh,
            "billed_min": None if t.billed_min is None else float(t.billed_min),
            "amount_eur": t.amount_eur,
            "late_min": t.late_min,
            "ended_by": t.ended_by,
        }
        self._points(line("trips", tags, {k: v for k, v in values.items() if v is not None}, t.started_ms))

    async def auto_end_due(self) -> int:
        """End every trip whose car is back, checked and locked, past its grace; return how many."""
        now = self.clock()
        n = 0
        for t in await self.store.running_trips(now - self.auto_end_after_ms):
            if t.reservation_id in self._ending:
                continue
            r = self.readings(t.vehicle_id)
            if may_auto_end(t, r, self._home(t.vehicle_id), now, self.max_age_ms, self.checks, self.auto_end_after_ms):
                with contextlib.suppress(ReservationNotActive):  # ended by the user meanwhile
                    await self._close(t, "auto", False)
                    n += 1
        return n

    async def run_auto_end(self) -> None:
        # A quarter of the grace, so a short grace (in tests) is kept closely; at least a second.
        every = max(1.0, min(AUTO_END_EVERY_S, self.auto_end_after_ms / 4000))
        while True:
            try:
                await self.auto_end_due()
            except StoreError as e:
                log.error("automatic end of trips: %s; trying again", e)
            await asyncio.sleep(every)

    async def usage(self, month: str) -> dict[str, Any]:
        month_bounds(month, self.tariff.timezone)  # refuses a bad month
        rows = await self.store.usage(month)
        return usage_report(
            month,
            rows,
            self.tariff,
            self.fleet.vehicles,
            self.fleet.stations,
            hours_in_month(month, self.tariff.timezone),
        )
