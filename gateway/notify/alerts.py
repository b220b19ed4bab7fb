"""The alert monitor: follows every car, opens and resolves alerts, records each change once.

Two ways in, one rule book (``gateway/rules/alerts.py``):

- :meth:`AlertMonitor.observe`, called by ingest with each reading that
  became a car's latest, decides the alerts a reading is news for (moving
  with no trip, leaving the service area) at once. A reading older than
  ``alerts.replay_after_s`` when it arrives was buffered by the car: it is
  stored, but the monitor does not see it, so a replay never opens or
  resolves anything.
- :meth:`AlertMonitor.check`, run every few seconds by one task, decides
  the alerts that need time to pass (silent, unattended, charging fault,
  not returned, low battery before a reservation).

Decisions are taken in memory, synchronously, against the alerts already
open (so a burst of readings opens one alert, not one per reading), and
queued; one task writes them to the store, each with its event, in order.
The store's unique index on open alerts is the last guard.

``vehicle_silent`` waits: not while the gateway has no broker connection,
and not for ``silent_after_s`` after it (re)connects, so the gateway's own
outage never reads as every car falling silent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from gateway.errors import StoreError
from gateway.fleet import Fleet
from gateway.ingest.lineproto import DistinctTimes, line
from gateway.ingest.state import FleetState
from gateway.ingest.telemetry import Reading
from gateway.notify.events import EventLog
from gateway.rules.alerts import (
    ALERT_TYPES,
    PER_MESSAGE,
    SCHEDULED,
    Alert,
    AlertKey,
    AlertType,
    CarView,
    Context,
    Open,
    Thresholds,
    Upcoming,
    evaluate,
    location_is_news,
)
from gateway.rules.events import Event, alert_doc
from gateway.store.base import Store
from gateway.times import now_ms

__all__ = ["AlertMonitor"]

log = logging.getLogger(__name__)

QUEUE_MAX = 10_000
STORE_RETRY_S = 1.0
LATEST_MS = 2**62


@dataclass(frozen=True, slots=True)
class _Change:
    alert: Alert
    opened: bool  # False: resolved
    why: str = ""
    resolved_ms: int = 0  # when the resolution was decided


BrokerState = Callable[[], tuple[bool, int]]
"""(connected now, connections made so far)"""


class AlertMonitor:
    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        state: FleetState,
        events: EventLog,
        points: Callable[[bytes], object],
        thresholds: Thresholds,
        replay_after_s: float,
        check_every_s: float | None = None,
        clock: Callable[[], int] = now_ms,
        views_file: Path | None = None,
    ) -> None:
        self.store = store
        # What the monitor knows of each car (streaks included) is saved here, so that a restart
        # neither forgets how long a door has been open nor takes the saved vehicle state (which
        # keeps replays too) for current.
        self.views_file = views_file
        self.fleet = fleet
        self.state = state
        self.events = events
        self._points = points
        self.th = thresholds
        self.replay_ms = int(replay_after_s * 1000)
        shortest = min(
            thresholds.silent_after_ms, thresholds.unattended_after_ms or 10_000,
            thresholds.charging_fault_after_ms or 10_000, thresholds.return_grace_ms or 10_000,
        )  # fmt: skip
        self.check_every_s = check_every_s or max(1.0, min(15.0, shortest / 10_000))
        self.clock = clock
        # What the monitor knows of each car: the latest current reading of each kind, and two streaks.
        self.cars = {vid: CarView(vid) for vid in fleet.vehicles}
        self.open: dict[str, dict[AlertKey, Alert]] = {vid: {} for vid in fleet.vehicles}  # by car
        # Each car's running trips, by reservation: a late trip may still run when the next one starts.
        self.trips: dict[str, set[str]] = {}
        self.replayed = 0  # readings too old on arrival to count
        self.dropped = 0  # changes not queued: the queue was full (decided again later)
        self.quiet_until_ms = LATEST_MS  # until the broker connection is first seen
        self._connects = -1
        self._queue: asyncio.Queue[_Change] = asyncio.Queue(QUEUE_MAX)
        self._times = DistinctTimes()
        self._contexts = {vid: self._context(vid) for vid in fleet.vehicles}
        events.listen(self._on_event)

    def _context(self, vid: str) -> Context:
        v = self.fleet.vehicles[vid]
        home, model, area = self.fleet.stations[v.station], self.fleet.models[v.model], self.fleet.service_area
        return Context(
            home_lat=home.lat,
            home_lon=home.lon,
            home_radius_m=home.radius_m,
            area=None if area is None else (area.lat_min, area.lat_max, area.lon_min, area.lon_max),
            ac_charge_kw=model.ac_charge_kw,
            battery_kwh=model.battery_kwh,
            thresholds=self.th,
        )

    # -- start-up --

    async def load(self) -> None:
        """The open alerts and running trips from the store, and the cars as the saved state has them."""
        n = 0
        for a in await self.store.list_alerts("open", None, None, 1_000_000):
            if a.vehicle_id in self.open:
                self.open[a.vehicle_id][a.key] = a
                n += 1
        for t in await self.store.running_trips(LATEST_MS):
            self.trips.setdefault(t.vehicle_id, set()).add(t.reservation_id)
        self._restore()
        # The saved vehicle state may know newer readings (saved later, or while the alerts were off). It
        # keeps replays too, so a newer reading is taken only if it was current when the car was last heard.
        for vid, st in self.state.vehicles.items():
            car = self.cars[vid]
            known = {"location": car.location_ms, "doors": car.doors_ms, "battery": car.battery_ms}
            heard = st.last_seen_ms
            for kind, r in st.readings.items():
                if kind not in known:
                    continue
                seen = known[kind]
                current = heard is not None and heard - r.ts_ms <= self.replay_ms
                if seen is None or (r.ts_ms > seen and current):
                    self._take(car, r)
        if n:
            log.info("alerts: %d open from before the restart", n)

    def save(self) -> None:
        if self.views_file is None:
            return
        doc = {vid: dataclasses.asdict(c) for vid, c in self.cars.items()}
        tmp = self.views_file.with_suffix(".tmp")
        try:
            tmp.write_bytes(orjson.dumps(doc))
            os.replace(tmp, self.views_file)
        except OSError as e:
            log.warning("cannot save the alert monitor's view of the cars to %s: %s", self.views_file, e)

    def _restore(self) -> bool:
        if self.views_file is None:
            return False
        try:
            doc = orjson.loads(self.views_file.read_bytes())
            cars = {vid: CarView(**fields) for vid, fields in doc.items() if vid in self.cars}
        except FileNotFoundError:
            return False
        except (OSError, orjson.JSONDecodeError, TypeError, AttributeError) as e:
            log.warning("ignoring %s (%s): the alert monitor starts from the saved vehicle state", self.views_file, e)
            return False
        self.cars.update(cars)
        return True

    # -- ingest's side: every new latest reading, on the event loop, cheap --

    def observe(self, r: Reading, received_ms: int) -> None:
        if received_ms - r.ts_ms > self.replay_ms:
            self.replayed += 1
            return
        car = self.cars.get(r.vehicle_id)
        if car is None:
            return
        self._take(car, r)
        if r.kind != "location":
            return
        vid = r.vehicle_id
        # Most positions are a parked car at its station: no news, and no need for the full rules.
        if self.open[vid] or location_is_news(
            self._contexts[vid], r.fields["lat"], r.fields["lon"], r.fields.get("speed_kmh"), bool(self.trips.get(vid))
        ):
            self._decide(vid, PER_MESSAGE, (), received_ms)

    @staticmethod
    def _take(car: CarView, r: Reading) -> None:
        f = r.fields
        if r.kind == "location":
            car.location_ms, car.lat, car.lon, car.speed_kmh = r.ts_ms, f["lat"], f["lon"], f.get("speed_kmh")
        elif r.kind == "doors":
            car.doors_ms, car.locked, car.closed = r.ts_ms, f["locked"], f.get("closed")
            if car.locked is False or car.closed is False:
                if car.open_since_ms is None:
                    car.open_since_ms = r.ts_ms
            else:
                car.open_since_ms = None
        elif r.kind == "battery":
            car.battery_ms, car.soc_pct = r.ts_ms, f["soc_pct"]
            car.charging, car.plugged = f.get("charging"), f.get("plugged")
            if car.plugged is True and car.charging is False and car.soc_pct < 80:
                if car.stalled_since_ms is None:
                    car.stalled_since_ms = r.ts_ms
            else:
                car.stalled_since_ms = None

    def _view(self, vid: str) -> CarView:
        """The car as of now: when it was last heard of, and whether a trip of it runs."""
        c = self.cars[vid]
        c.heard_ms = self.state.vehicles[vid].last_seen_ms
        c.trip_running = bool(self.trips.get(vid))
        return c

    def _decide(self, vid: str, types: Iterable[AlertType], reservations: Iterable[Upcoming], now: int) -> None:
        mine = self.open[vid]
        changes = evaluate(
            self._view(vid), self._contexts[vid], now, mine, types, tuple(reservations), self.quiet_until_ms
        )
        for change in changes:
            if isinstance(change, Open):
                a = Alert(
                    self.events.new_id("alr_", now), change.type, vid, change.reservation_id, now, change.message,
                    change.details,
                )  # fmt: skip
                item = _Change(a, True)
            else:
                a, item = change.alert, _Change(change.alert, False, change.why, now)
            try:
                self._queue.put_nowait(item)
            except asyncio.QueueFull:
                self.dropped += 1  # nothing changed in memory either: the next look decides again
                continue
            if item.opened:
                mine[a.key] = a
            else:
                mine.pop(a.key, None)

    def _on_event(self, e: Event) -> None:
        if e.type not in ("trip.started", "trip.ended"):
            return
        data = e.doc()["data"]
        vid, rid = data["vehicle_id"], data["reservation_id"]
        running = self.trips.setdefault(vid, set())
        if e.type == "trip.started":
            running.add(rid)
            return
        running.discard(rid)
        car = self.cars.get(vid)
        if car is not None and car.open_since_ms is not None and not running:
            # Left unlocked at the end of the trip: unattended from now, not from when the renter opened it.
            car.open_since_ms = max(car.open_since_ms, e.ts_ms)

    # -- the scheduled side --

    def broker(self, connected: bool, connects: int) -> None:
        """The telemetry connection as of now: no silence counts while it is down or just back."""
        now = self.clock()
        if not connected:
            self.quiet_until_ms = LATEST_MS
        elif connects != self._connects or self.quiet_until_ms == LATEST_MS:
            self.quiet_until_ms = now + self.th.silent_after_ms
        self._connects = connects

    async def check(self) -> None:
        """Decide every car's alerts that need time to pass."""
        now = self.clock()
        th = self.th
        upcoming: dict[str, list[Upcoming]] = {}
        for r in await self.store.list_reservations(None, now, now + th.battery_horizon_ms, 100_000):
            if r.live(now) and r.starts_ms > now:
                upcoming.setdefault(r.vehicle_id, []).append(Upcoming(r.id, r.starts_ms, r.ends_ms, False))
        for t in await self.store.running_trips(now - th.return_grace_ms):
            upcoming.setdefault(t.vehicle_id, []).append(Upcoming(t.reservation_id, t.booked_start_ms,
                                                                  t.booked_end_ms, True))  # fmt: skip
        for vid in self.cars:
            self._decide(vid, SCHEDULED, _one_per_id(upcoming.get(vid, ())), now)

    async def run_checks(self, broker: BrokerState) -> None:
        """The one scheduled task: every `check_every_s`, look at every car."""
        while True:
            self.broker(*broker())
            try:
                await self.check()
            except StoreError as e:
                log.error("alerts: %s; checking again", e)
            await asyncio.sleep(self.check_every_s)

    async def run_writer(self) -> None:
        """Write every decision to the store, with its event, in the order taken."""
        while True:
            change = await self._queue.get()
            while True:
                try:
                    await self._record(change)
                    break
                except StoreError as e:
                    log.error("alerts: %s; trying again", e)
                    await asyncio.sleep(STORE_RETRY_S)
            self._queue.task_done()
            await asyncio.sleep(0)  # a burst of decisions (the end of the quiet window) must not stall the loop

    async def drain(self, deadline_s: float) -> None:
        """At shutdown: wait (a little) for the decisions taken to be written. What is left is decided again
        at the next start, since its condition still holds."""
        try:
            await asyncio.wait_for(self._queue.join(), deadline_s)
        except TimeoutError:
            log.warning("alerts: %d decisions not recorded at shutdown", self._queue.qsize())

    async def _record(self, c: _Change) -> None:
        a = c.alert
        if c.opened:
            e = self.events.new("alert.opened", alert_doc(a), a.opened_ms)
            if not await self.store.open_alert(a, e):
                # One of this key is open in the store already (recorded by another instance, or a commit
                # that reported an error): follow that one, so that it is the one resolved.
                stored = await self._stored(a)
                mine = self.open[a.vehicle_id]
                if stored is not None and mine.get(a.key) is a:
                    mine[a.key] = stored
                log.info("alerts: %s of %s was open already", a.type, a.vehicle_id)
                return
            self._line(a, "opened", a.opened_ms)
            log.warning("alert opened: %s (%s)", a.message, a.type)
        else:
            resolved = c.resolved_ms
            e = self.events.new("alert.resolved", alert_doc(replace(a, resolved_ms=resolved)), resolved)
            if not await self.store.resolve_alert(a, resolved, e):
                stored = await self._stored(a)
                if stored is not None and stored.id != a.id:  # the store had another open: it is over too
                    await self._record(_Change(stored, False, c.why, resolved))
                return
            self._line(a, "resolved", resolved)
            log.info("alert resolved: %s of %s: %s", a.type, a.vehicle_id, c.why)
        self.events.recorded(e)

    async def _stored(self, a: Alert) -> Alert | None:
        for s in await self.store.list_alerts("open", a.vehicle_id, a.type, 1000):
            if s.key == a.key:
                return s
        return None

    def _line(self, a: Alert, state: str, ts: int) -> None:
        tags = {"vehicle_id": a.vehicle_id, "type": a.type, "severity": a.severity, "state": state}
        # `open` (1 or 0) beside the contract's fields: InfluxQL cannot take the last value of a tag, and the
        # dashboards' "Open alerts" table needs each alert's latest state.
        values = {"alert_id": a.id, "message": a.message, "open": 1.0 if state == "opened" else 0.0}
        # Distinct per series (the tags), not per alert: two alerts of one type and car (two reservations)
        # changing in the same millisecond would otherwise overwrite each other's point.
        self._points(line("alerts", tags, values, self._times.next((a.vehicle_id, a.type, state), ts)))

    def open_by_type(self) -> dict[str, int]:
        counts: Counter[str] = Counter(a.type for mine in self.open.values() for a in mine.values())
        return {t: counts.get(t, 0) for t in ALERT_TYPES}


def _one_per_id(rs: Iterable[Upcoming]) -> list[Upcoming]:
    by_id: dict[str, Upcoming] = {}
    for r in rs:
        old = by_id.get(r.reservation_id)
        by_id[r.reservation_id] = r if old is None or r.trip_running else old
    return list(by_id.values())
