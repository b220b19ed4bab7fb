"""Incidents on demand: each condition the gateway raises an alert for, caused in a simulated car, then cleared.

``await sim.cause(vehicle_id, condition)`` and ``await sim.clear(vehicle_id, condition)`` (``SimFleet``)
return once the car's reports show the change and the broker has acknowledged them. Conditions are
named like the alert types they open (docs/simulator.md, the contract's alerts table):

- ``vehicle_silent``: the car stays connected and publishes nothing at all (no report, no ack).
  Clear: it reports at once.
- ``moved_without_trip``: parked at its station, it drives off 1-2 km at 30-50 km/h, doors as they
  were, reporting at driving intervals, and parks there; cause returns at the first moving report.
  Clear: it drives back to its station and parks; returns once parked there.
- ``left_service_area``: it drives to 2 km beyond the nearest edge of the fleet's ``service_area``
  and parks there; cause returns once a reported position is outside. Clear: it drives home.
- ``unlocked_unattended``: unlocked where it is parked. Clear: locked and closed.
- ``charging_fault``: at its station, plugged, under 80 %, ``charging: false``: the charger gives
  no current, so the physics charges nothing. Clear: charging resumes.
- ``low_battery_before_reservation``: down to about 10 %, unplugged, not charging. Clear: its
  charge before (at least 80 %), plugged in if at its station.
- ``not_returned``: it stays away: from its station it drives off to another town and stays there;
  on its way home it turns off to the nearest other town; parked away, it stays. Clear: it drives
  home.

With ``drive=False`` a place condition (moved, left, not returned) moves the car at once instead:
brought there, brought back, parked. Charge taken away is taken as a previous driver would have:
the odometer rises by the distance that energy drives (``physics.drained``).

While a condition holds, the car makes no decision of its own (no departure, no drive home), the
renters leave it alone, and its periodic reports, made from its state, carry the condition. One
condition at a time per car. The scheduler below is the command line's ``--incidents``.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import Callable, Collection
from dataclasses import replace
from enum import StrEnum
from typing import TYPE_CHECKING

from device_sim import physics
from device_sim.config import Behaviour
from device_sim.physics import Mode
from gateway.fleet import ServiceArea

if TYPE_CHECKING:
    from device_sim.car import Car
    from device_sim.fleet import SimFleet

__all__ = ["CYCLE", "Condition", "Incidents", "beyond_edge", "cause", "clear", "refusal"]

KM_PER_DEG_LAT = 110.574
KM_PER_DEG_LON_EQUATOR = 111.320
OUTSIDE_KM = 2.0  # how far beyond the service area's edge left_service_area parks
FULL_ENOUGH_PCT = 80.0  # the gateway's charging_fault needs a car under this
LOW_PCT = 10.0
ACK_TIMEOUT_S = 10.0


class Condition(StrEnum):
    VEHICLE_SILENT = "vehicle_silent"
    MOVED_WITHOUT_TRIP = "moved_without_trip"
    LEFT_SERVICE_AREA = "left_service_area"
    UNLOCKED_UNATTENDED = "unlocked_unattended"
    CHARGING_FAULT = "charging_fault"
    LOW_BATTERY_BEFORE_RESERVATION = "low_battery_before_reservation"
    NOT_RETURNED = "not_returned"


# What --incidents goes through, in order (not_returned needs a renter's trip: not on a parked car).
CYCLE: tuple[Condition, ...] = (
    Condition.MOVED_WITHOUT_TRIP,
    Condition.UNLOCKED_UNATTENDED,
    Condition.CHARGING_FAULT,
    Condition.VEHICLE_SILENT,
    Condition.LEFT_SERVICE_AREA,
    Condition.LOW_BATTERY_BEFORE_RESERVATION,
)
PLACES = frozenset({Condition.MOVED_WITHOUT_TRIP, Condition.LEFT_SERVICE_AREA, Condition.NOT_RETURNED})


# ---- where to go (pure) ---------------------------------------------------------------------------


def beyond_edge(point: tuple[float, float], area: ServiceArea, km: float = OUTSIDE_KM) -> tuple[float, float]:
    """The point `km` outside the edge of `area` nearest to `point`, straight across from it."""
    lat, lon = point
    kx = KM_PER_DEG_LON_EQUATOR * max(math.cos(math.radians(lat)), 1e-6)
    ky = KM_PER_DEG_LAT
    options = [
        ((lat - area.lat_min) * ky, (max(-90.0, area.lat_min - km / ky), lon)),
        ((area.lat_max - lat) * ky, (min(90.0, area.lat_max + km / ky), lon)),
        ((lon - area.lon_min) * kx, (lat, max(-180.0, area.lon_min - km / kx))),
        ((area.lon_max - lon) * kx, (lat, min(180.0, area.lon_max + km / kx))),
    ]
    return min(options)[1]


def nearby(
    home: tuple[float, float], rng: random.Random, area: ServiceArea | None, km: tuple[float, float] = (1.0, 2.0)
) -> tuple[float, float]:
    """A point 1-2 km from `home` in a random direction, inside `area` when one is given."""
    p = home
    for _ in range(16):
        p = physics.destination(home, rng.uniform(0.0, 360.0), rng.uniform(*km))
        if area is None or area.contains(*p):
            return p
    return p


# ---- cause and clear ------------------------------------------------------------------------------


def refusal(car: Car, condition: Condition, area: ServiceArea | None) -> str | None:
    """Why `condition` cannot be caused in `car` now, or None."""
    s = car.state
    if car.held:
        return f"{car.id} already has {', '.join(sorted(car.held))}"
    at_home = (Condition.MOVED_WITHOUT_TRIP, Condition.LEFT_SERVICE_AREA, Condition.CHARGING_FAULT)
    if condition in at_home and not car.at_home:
        return f"{car.id} is not parked at its station"
    parked = (Condition.UNLOCKED_UNATTENDED, Condition.LOW_BATTERY_BEFORE_RESERVATION)
    if condition in parked and s.mode is not Mode.PARKED:
        return f"{car.id} is not parked"
    if condition is Condition.MOVED_WITHOUT_TRIP and s.soc_pct < physics.soc_drop_pct(10.0, car.model):
        return f"{car.id} has {s.soc_pct:.0f} %: too little to drive anywhere"
    if condition is Condition.LEFT_SERVICE_AREA:
        if area is None:
            return "the fleet has no service_area"
        road = physics.road_km((s.lat, s.lon), beyond_edge((s.lat, s.lon), area))
        if s.soc_pct < physics.soc_drop_pct(2 * road, car.model) + 10.0:
            return f"{car.id} has {s.soc_pct:.0f} %: too little to drive {road:.0f} km out of the area and back"
    if condition is Condition.NOT_RETURNED and car.at_home and not car.reachable(10.0):
        return f"{car.id} has {s.soc_pct:.0f} %: too little to drive to another town and back"
    return None


async def _acked(futs: list[asyncio.Future[None]]) -> None:
    if futs:
        await asyncio.wait_for(asyncio.gather(*futs), ACK_TIMEOUT_S)


async def cause(car: Car, condition: Condition, area: ServiceArea | None, *, drive: bool = True) -> None:
    """Cause `condition` in `car` (see the module docstring); ValueError if it cannot be now."""
    why = refusal(car, condition, area)
    if why is not None:
        raise ValueError(why)
    car.held.add(condition)  # first: bringing the car up to now must not start a drive of its own
    car.stats.incidents += 1
    car.update()  # the physics up to now, then the change
    rng, s, home = car.rng, car.state, (car.home.lat, car.home.lon)
    futs: list[asyncio.Future[None]] = []
    if condition is Condition.VEHICLE_SILENT:
        car.muted = True
    elif condition is Condition.MOVED_WITHOUT_TRIP:
        target = nearby(home, rng, area)
        if drive:  # a tow truck or a thief: the doors stay as they were
            futs = car.drive_to(target, "", rng.uniform(30.0, 50.0), locked=s.locked)
        else:
            futs = car.put(target, "", plugged=False)
    elif condition is Condition.LEFT_SERVICE_AREA:
        assert area is not None  # refusal() checked
        target = beyond_edge((s.lat, s.lon), area)
        if not drive:
            futs = car.put(target, "", plugged=False)
        else:
            await _acked(car.drive_to(target, "", rng.uniform(55.0, 85.0), locked=s.locked))
            await car.until(lambda: not area.contains(car.state.lat, car.state.lon))
            futs = car.report_now()
    elif condition is Condition.UNLOCKED_UNATTENDED:
        car.state = replace(s, locked=False)
        futs = car.report_now()
    elif condition is Condition.CHARGING_FAULT:
        if s.soc_pct >= FULL_ENOUGH_PCT:
            s = physics.drained(s, round(rng.uniform(40.0, 70.0), 1), car.model)
        car.state = replace(s, plugged=True, charger_fault=True)
        futs = car.report_now()
    elif condition is Condition.LOW_BATTERY_BEFORE_RESERVATION:
        car.before["soc_pct"] = s.soc_pct
        low = physics.drained(s, round(rng.uniform(LOW_PCT - 1, LOW_PCT + 1), 1), car.model)
        car.state = replace(low, plugged=False)
        futs = car.report_now()
    elif condition is Condition.NOT_RETURNED:
        futs = _stay_away(car, drive)
    await _acked(futs)


def _stay_away(car: Car, drive: bool) -> list[asyncio.Future[None]]:
    s, rng = car.state, car.rng
    if car.at_home:  # off with someone, to another town
        dest = rng.choice(car.reachable(10.0) or car.stations or [car.home])
        if not drive:
            return car.put((dest.lat, dest.lon), dest.id, plugged=False)
        return car.drive_to((dest.lat, dest.lon), dest.id, rng.uniform(55.0, 85.0))
    if s.mode is Mode.DRIVING and s.trip is not None and s.trip.dest_station == car.home.id:
        here = (s.lat, s.lon)
        other = min(car.stations, key=lambda st: physics.haversine_km(here, (st.lat, st.lon)), default=None)
        if other is not None:  # the driver turns off to another town
            return car.drive_to((other.lat, other.lon), other.id, s.trip.cruise_kmh, locked=s.locked)
    return car.report_now()


async def clear(car: Car, condition: Condition, *, drive: bool = True) -> None:
    """Undo `condition` in `car` (see the module docstring), whether or not it was caused."""
    car.update()
    s = car.state
    futs: list[asyncio.Future[None]] = []
    if condition is Condition.VEHICLE_SILENT:
        car.muted = False
        futs = car.report_now()
    elif condition in PLACES:
        home = (car.home.lat, car.home.lon)
        if car.at_home:
            futs = car.report_now()
        elif not drive:
            futs = car.put(home, car.home.id, plugged=True, locked=True)
        else:
            slow = condition is Condition.MOVED_WITHOUT_TRIP
            cruise = car.rng.uniform(30.0, 50.0) if slow else car.rng.uniform(55.0, 85.0)
            locked = None if condition is Condition.NOT_RETURNED else s.locked  # a renter drives it, or staff
            car.held.discard(condition)
            await _acked(car.drive_to(home, car.home.id, cruise, locked=locked))
            await car.until(lambda: car.at_home)
            futs = car.report_now()
    elif condition is Condition.UNLOCKED_UNATTENDED:
        jammed = car.behaviour is Behaviour.FAIL  # its door cannot close (Behaviour.FAIL)
        car.state = replace(s, locked=True, closed=not jammed)
        futs = car.report_now()
    elif condition is Condition.CHARGING_FAULT:
        car.state = replace(s, charger_fault=False)
        futs = car.report_now()
    elif condition is Condition.LOW_BATTERY_BEFORE_RESERVATION:
        soc = max(car.before.pop("soc_pct", FULL_ENOUGH_PCT), FULL_ENOUGH_PCT)
        car.state = replace(s, soc_pct=soc, plugged=s.plugged or car.at_home)
        futs = car.report_now()
    car.held.discard(condition)
    await _acked(futs)


# ---- the command line's incidents -----------------------------------------------------------------


def _say(line: str) -> None:
    print(f"device_sim: {line}", file=sys.stderr, flush=True)


class Incidents:
    """Every ``every_s`` the next condition of `CYCLE` on a car parked at its station and not rented,
    held ``hold_s``, then cleared; :meth:`start` plays one now (SIGUSR1). A line for each cause and clear."""

    def __init__(
        self,
        sim: SimFleet,
        *,
        hold_s: float = 60.0,
        in_use: Callable[[], Collection[str]] = frozenset,
        say: Callable[[str], None] = _say,
    ) -> None:
        self.sim = sim
        self.hold_s = hold_s
        self.in_use = in_use
        self.say = say
        self.rng = random.Random(f"{sim.seed}:incidents")
        self.caused = 0
        self.cleared = 0
        self._next = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._playing: set[str] = set()  # cars picked, from the pick to the clear

    def candidates(self, condition: Condition) -> list[str]:
        """The cars `condition` can be caused in now: ready, connected, parked at their station, not rented."""
        busy = set(self.in_use()) | self._playing
        out = []
        for vid, car in self.sim.cars.items():
            client = car.client
            if (
                car.ready.is_set() and client is not None and client.is_connected and car.at_home
                and vid not in busy and self.sim.cannot_cause(vid, condition) is None
            ):  # fmt: skip
                out.append(vid)
        return out

    def start(self, condition: Condition | str | None = None) -> asyncio.Task[None] | None:
        """Play one incident now, in the background: `condition`, or the next of the cycle. None if no car is free."""
        if condition is None:
            cond = CYCLE[self._next % len(CYCLE)]
            self._next += 1
        else:
            cond = Condition(condition)
        ids = self.candidates(cond)
        if not ids:
            self.say(f"incident {cond}: no car free for it now (parked at its station, not rented); skipped")
            return None
        vid = self.rng.choice(sorted(ids))
        self._playing.add(vid)
        task = asyncio.get_running_loop().create_task(self._play(vid, cond), name=f"incident {cond} {vid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _play(self, vid: str, cond: Condition) -> None:
        try:
            try:
                await self.sim.cause(vid, cond)
            except (ValueError, TimeoutError) as e:
                self.say(f"incident {cond} on {vid}: not caused ({e or 'the broker did not acknowledge'})")
                return
            self.caused += 1
            self.say(f"incident {cond} on {vid}: caused; clearing in {self.hold_s:g} s")
            await asyncio.sleep(self.hold_s)
            try:
                await self.sim.clear(vid, cond)
            except TimeoutError:
                self.say(f"incident {cond} on {vid}: cleared, but the broker did not acknowledge the car's reports")
                return
            self.cleared += 1
            self.say(f"incident {cond} on {vid}: cleared")
        finally:
            self._playing.discard(vid)

    async def run(self, every_s: float) -> None:
        """One incident every `every_s` wall seconds, the first after `every_s`."""
        while True:
            await asyncio.sleep(every_s)
            self.start()

    async def close(self) -> None:
        """Stop the incidents under way (the cars stay as they are; the fleet says goodbye)."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
