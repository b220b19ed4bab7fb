"""People renting the simulated cars through the gateway's booking API, for the demo and the tests.

A believable day in the Orne department: staff take cars on weekdays during
office hours, the public in the evenings and at weekends. Each renter books
a car at its station (``PUT /v1/reservations/…``), unlocks it through the
API, drives to another town and back, parks, closes the doors and usually
plugs the cable in, then ends the rental (``POST …/end``). A share forget the
cable: the gateway answers 409 ``end_checks_failed`` naming ``plugged``, and
they go back and plug it in, as the app would tell them to.

Bookings are also made ahead: members of the public book a car for one of
the coming days, and now and then a member of staff books the same car over
one of them. The gateway then moves the public booking to another car of
the model at that station, or cancels it with enough notice, or refuses the
staff booking (see docs/booking-api.md, Staff priority); the renters count
each outcome. A booking made ahead (public or staff) that is still there an
hour (of simulated time) before it starts is cancelled by its user: plans
change, and the demo's cars stay free for the renters of the day.

Times sent to the gateway are wall-clock times: at ``--speed 60`` a two-hour
booking lasts two real minutes, and is billed as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from device_sim.car import Car
    from device_sim.fleet import SimFleet

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass
class RenterStats:
    booked: int = 0
    started: int = 0
    ended: int = 0
    refused_409: int = 0  # ends the gateway refused (a check failed), fixed and tried again
    failed: int = 0  # bookings or unlocks the gateway refused
    ahead: int = 0  # bookings made for a coming day
    reassigned: int = 0  # public bookings a staff one moved to another car
    preempted: int = 0  # public bookings a staff one cancelled
    staff_refused: int = 0  # staff bookings the gateway refused (no room could be made)


@dataclass
class Ahead:
    """A booking made for a coming day: its id, car and span (wall-clock epoch seconds)."""

    rid: str
    car: str
    starts_s: float
    ends_s: float
    kind: str


def wants_a_car(sim_time_s: float, rng: random.Random) -> str | None:
    """Whether someone books now, and who: 'staff' on weekday office hours, 'public' evenings and weekends."""
    day = int(sim_time_s // DAY) % 7  # day 0 of the simulation is a Monday
    hour = (sim_time_s % DAY) / 3600
    weekend = day >= 5
    if not weekend and 8 <= hour < 17:
        return "staff" if rng.random() < 0.6 else ("public" if rng.random() < 0.2 else None)
    if (weekend and 9 <= hour < 21) or (not weekend and 17 <= hour < 22):
        return "public" if rng.random() < 0.5 else None
    return None


class Renters:
    def __init__(
        self,
        sim: SimFleet,
        api: str,
        api_key: str,
        *,
        forget_plug_share: float = 0.2,
        max_active: int = 6,
        every_sim_s: float = 900.0,
        seed: int = 0,
    ) -> None:
        self.sim = sim
        self.api = api.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.forget_plug_share = forget_plug_share
        self.max_active = max_active
        self.every_sim_s = every_sim_s
        self.rng = random.Random(f"{seed}:renters")
        self.stats = RenterStats()
        self._active: set[str] = set()
        self._ahead: list[Ahead] = []
        self._n = 0
        for car in sim.cars.values():
            car.autonomous = False

    async def run(self) -> None:
        async with aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=30)) as http:
            rentals: set[asyncio.Task[None]] = set()
            try:
                while True:
                    kind = wants_a_car(self.sim.clock.now(), self.rng)
                    if kind and len(self._active) < self.max_active:
                        car = self._free_car()
                        if car is not None:
                            self._active.add(car.id)
                            task = asyncio.create_task(self._rental(http, car, kind))
                            rentals.add(task)
                            task.add_done_callback(rentals.discard)
                    await self._plan_ahead(http)
                    await asyncio.sleep(self.sim.clock.wall_delay(self.every_sim_s))
            finally:
                for t in list(rentals):
                    t.cancel()
                await asyncio.gather(*rentals, return_exceptions=True)

    async def _plan_ahead(self, http: aiohttp.ClientSession) -> None:
        """Book ahead, let staff book over it, and let the bookings nobody needs any more go."""
        now = time.time()
        sim_h = self.sim.clock.wall_delay(3600.0)  # one simulated hour, in wall seconds
        for a in [a for a in self._ahead if a.starts_s - now < sim_h]:
            self._ahead.remove(a)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                await self._call(http, "DELETE", f"/v1/reservations/{a.rid}")
        try:
            # Often enough to be seen within a few minutes of the main job.
            if self.rng.random() < 0.6:
                await self._book_ahead(http, now, sim_h)
            public = [a for a in self._ahead if a.kind == "public"]
            if public and self.rng.random() < 0.4:
                await self._staff_over(http, self.rng.choice(public), sim_h)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("renters: booking ahead: no usable answer from the gateway (%r)", e)

    async def _book_ahead(self, http: aiohttp.ClientSession, now: float, sim_h: float) -> None:
        car = self.rng.choice(list(self.sim.cars))
        start = now + self.rng.uniform(12, 60) * sim_h
        end = start + self.rng.choice((2, 3, 4)) * sim_h
        self._n += 1
        a = Ahead(f"SIM-AHEAD-{int(now)}-{self._n}", car, start, end, "public")
        user = f"U-{self.rng.randrange(1, 400):04d}"
        status, _ = await self._call(http, "PUT", f"/v1/reservations/{a.rid}", _body(car, user, start, end, "public"))
        if status == 201:
            self.stats.ahead += 1
            self._ahead.append(a)

    async def _staff_over(self, http: aiohttp.ClientSession, public: Ahead, sim_h: float) -> None:
        """A member of staff needs that very car, for a span around the public booking."""
        self._n += 1
        s = Ahead(f"SIM-STAFF-{int(time.time())}-{self._n}", public.car, public.starts_s - sim_h,
                  public.ends_s + sim_h, "staff")  # fmt: skip
        user = f"S-{self.rng.randrange(1, 60):04d}"
        status, answer = await self._call(
            http, "PUT", f"/v1/reservations/{s.rid}", _body(s.car, user, s.starts_s, s.ends_s, "staff")
        )
        if status == 409:
            self.stats.staff_refused += 1
            return
        if status != 201:
            return
        self._ahead.append(s)
        for d in answer.get("displaced", []):
            moved = next((a for a in self._ahead if a.rid == d["reservation_id"]), None)
            if d["action"] == "reassigned":
                self.stats.reassigned += 1
                if moved is not None:
                    moved.car = d["vehicle_id"]
            else:
                self.stats.preempted += 1
                if moved is not None:
                    self._ahead.remove(moved)
        log.info("renters: staff booking %s of %s displaced %s", s.rid, s.car, answer.get("displaced"))

    @property
    def active(self) -> frozenset[str]:
        """The cars in a renter's hands now (booked, driven or being returned)."""
        return frozenset(self._active)

    def _free_car(self) -> Car | None:
        free = [
            c
            for c in self.sim.cars.values()
            if c.id not in self._active and c.at_home and c.state.soc_pct > 80 and not c.held
        ]  # a car with an incident (device_sim.incidents) is not offered
        return self.rng.choice(free) if free else None

    async def _call(self, http: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with http.request(method, f"{self.api}{path}", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def _rental(self, http: aiohttp.ClientSession, car: Car, kind: str) -> None:
        try:
            await self._rent(http, car, kind)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            # No answer, or not the gateway's: this rental is given up, the day goes on.
            log.warning("renter of %s: no usable answer from the gateway (%r)", car.id, e)
            self.stats.failed += 1
        finally:
            self._active.discard(car.id)

    async def _rent(self, http: aiohttp.ClientSession, car: Car, kind: str) -> None:
        self._n += 1
        rid = f"SIM-{int(time.time())}-{self._n}"
        booked_sim_s = self.rng.choice((2, 3, 3, 4)) * 3600.0
        now = datetime.now(UTC)
        user = f"S-{self.rng.randrange(1, 60):04d}" if kind == "staff" else f"U-{self.rng.randrange(1, 400):04d}"
        body = {
            "vehicle_id": car.id,
            "user_id": user,
            "starts_at": (now - timedelta(seconds=1)).isoformat(timespec="milliseconds"),
            "ends_at": (now + timedelta(seconds=self.sim.clock.wall_delay(booked_sim_s))).isoformat(
                timespec="milliseconds"
            ),
            "kind": kind,
        }
        status, answer = await self._call(http, "PUT", f"/v1/reservations/{rid}", body)
        if status != 201:
            self.stats.failed += 1
            log.warning("renter: booking %s refused: %s", car.id, answer)
            return
        self.stats.booked += 1
        await self.sim.act(car.id)  # walking up to the car: it reports
        status, answer = await self._call(http, "POST", f"/v1/vehicles/{car.id}/unlock", {"reservation_id": rid})
        if status != 200:
            self.stats.failed += 1
            log.warning("renter: unlock of %s refused: %s", car.id, answer)
            await self._call(http, "DELETE", f"/v1/reservations/{rid}")
            return
        self.stats.started += 1
        if car.drive_off():
            await car.home_again.wait()  # there, a visit, and back
        forgot = self.rng.random() < self.forget_plug_share
        await self.sim.act(car.id, closed=True, speed_kmh=0.0, plugged=not forgot)
        for _ in range(5):
            status, answer = await self._call(http, "POST", f"/v1/reservations/{rid}/end")
            if status == 200:
                self.stats.ended += 1
                return
            if status == 409 and answer["error"]["code"] == "end_checks_failed":
                self.stats.refused_409 += 1
                # What the app tells them to fix: plug the cable in, close the door, or wait for a report.
                await self.sim.act(car.id, plugged=True, closed=True, speed_kmh=0.0)
                continue
            log.info("renter: ending %s failed: %s", rid, answer)
            await asyncio.sleep(1.0)
        self.stats.failed += 1


def _body(car: str, user: str, starts_s: float, ends_s: float, kind: str) -> dict[str, Any]:
    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")

    return {"vehicle_id": car, "user_id": user, "starts_at": iso(starts_s), "ends_at": iso(ends_s), "kind": kind}
