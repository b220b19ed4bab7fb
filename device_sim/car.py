"""One simulated car: its day (parked, charging, trips), its reports and its answers to commands.

The car does not own a connection: the fleet attaches an ``MqttClient`` (its
own, or a shared one in multiplexed mode) when one is up and detaches it when
it drops. While detached the car keeps living and buffers its reports, then
replays them after its fresh full state on the next attach, which is exactly
how real telematics boxes produce old and out-of-order timestamps.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson

from device_sim import physics
from device_sim.commands import SeenCommands, ack_payload, parse_command, verify_command
from device_sim.config import Behaviour, Intervals
from device_sim.mqtt import MqttClient, MqttError
from device_sim.physics import CarState, Mode, Trip
from gateway.fleet import Model, Station

DAY = 86400.0
NIGHT_END_H, NIGHT_START_H = 7.0, 21.0
MEAN_WAIT_S = 6 * 3600.0

Fut = asyncio.Future[None] | None


@dataclass
class Stats:
    """Counters for the whole fleet, read by the progress line and by tests."""

    sent: int = 0
    connected: int = 0
    ready: int = 0  # cars whose first full state the broker has acknowledged
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    commands: int = 0
    done: int = 0
    rejected: int = 0
    failed: int = 0
    unanswered: int = 0
    buffered_dropped: int = 0
    faults: int = 0
    silenced: int = 0  # messages muted cars did not publish (device_sim.incidents: vehicle_silent)
    incidents: int = 0  # conditions caused (SimFleet.cause)


class SimClock:
    """Simulated seconds since midnight of day 0, running `speed` times faster than the wall clock."""

    def __init__(self, speed: float, start_hour: float) -> None:
        self.speed = speed
        self._t0 = time.monotonic()
        self._start = start_hour * 3600.0

    def now(self) -> float:
        return self._start + (time.monotonic() - self._t0) * self.speed

    def wall_delay(self, sim_seconds: float) -> float:
        return max(0.0, sim_seconds / self.speed)


def plan_departure(rng: random.Random, now: float) -> float:
    """When a car parked at home leaves next: exponential wait, moved out of the night."""
    t = now + rng.expovariate(1.0 / MEAN_WAIT_S)
    hour = (t % DAY) / 3600.0
    if hour < NIGHT_END_H:
        t += (NIGHT_END_H - hour) * 3600.0 + rng.uniform(0, 2 * 3600.0)
    elif hour >= NIGHT_START_H:
        t += (24.0 - hour + NIGHT_END_H) * 3600.0 + rng.uniform(0, 2 * 3600.0)
    return t


class Car:
    def __init__(
        self,
        vehicle_id: str,
        model: Model,
        home: Station,
        stations: list[Station],
        *,
        topic_base: str,
        clock: SimClock,
        stats: Stats,
        rng: random.Random,
        intervals: Intervals,
        key: bytes | None,
        behaviour: Behaviour = Behaviour.NORMAL,
        qos: int = 1,
        firmware: str = "sim-1.0.0",
        slow_ack_s: float = 3.0,
        buffer_size: int = 500,
    ) -> None:
        self.id = vehicle_id
        self.model = model
        self.home = home
        self.stations = [s for s in stations if s.id != home.id]
        self.topic_base = topic_base
        self.clock = clock
        self.stats = stats
        self.rng = rng
        self.iv = intervals
        self.key = key
        self.behaviour = behaviour
        self.qos = qos
        self.firmware = firmware
        self.slow_ack_s = slow_ack_s
        self.seen = SeenCommands()
        self.client: MqttClient | None = None
        self.buffer: deque[tuple[str, bytes]] = deque(maxlen=buffer_size)
        self.skew_s = 0.0
        self.last_sent: dict[str, bytes] = {}
        self.ready = asyncio.Event()
        self.on_ready: Callable[[Car], None] | None = None
        # False: the car leaves home only when a renter drives it off (device_sim.renters).
        self.autonomous = True
        self.home_again = asyncio.Event()  # set when a drive ends at the home station
        # Incidents (device_sim.incidents, SimFleet.cause): a muted car publishes nothing at all; while a
        # condition is held the car makes no decision of its own (no departure, no return home).
        self.muted = False
        self.held: set[str] = set()
        self.before: dict[str, float] = {}  # what a held condition changed, to put back when it clears
        self._reported = asyncio.Event()  # set at every location report, for SimFleet.cause's waits
        self._sleep: asyncio.Future[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        now = clock.now()
        self.state = CarState(
            lat=home.lat,
            lon=home.lon,
            soc_pct=round(rng.uniform(45.0, 100.0), 1),
            odometer_km=round(rng.uniform(3000.0, 60000.0), 1),
            station=home.id,
            closed=behaviour is not Behaviour.FAIL,
        )
        self._last = now
        self.next_event = plan_departure(rng, now)
        self.next_battery = now + rng.uniform(0, intervals.battery_parked_s)
        self.next_location = now + rng.uniform(0, intervals.location_parked_s)
        self.next_doors = now + rng.uniform(0, intervals.doors_s)

    # ---- time and reports -------------------------------------------------------------
    def ts(self) -> str:
        return physics.rfc3339_ms(time.time() + self.skew_s)

    def emit(self, suffix: str, doc: dict[str, object], retain: bool = False, track: bool = False) -> Fut:
        if self.muted:  # last_sent stays what was last published
            self.stats.silenced += 1
            return None
        payload = orjson.dumps(doc)
        self.last_sent[suffix] = payload
        return self.send(suffix, payload, retain, track)

    def send(self, suffix: str, payload: bytes, retain: bool = False, track: bool = False) -> Fut:
        """Publish raw bytes on ``{prefix}/{id}/{suffix}``, or buffer them while offline; nothing while muted."""
        if self.muted:
            self.stats.silenced += 1
            return None
        client = self.client
        if client is not None and client.is_connected:
            self.stats.sent += 1
            return client.publish(f"{self.topic_base}/{suffix}", payload, self.qos, retain, track)
        if suffix != "status":
            if len(self.buffer) == self.buffer.maxlen:
                self.stats.buffered_dropped += 1
            self.buffer.append((suffix, payload))
        return None

    def battery(self, track: bool = False) -> Fut:
        return self.emit("battery", physics.battery_payload(self.state, self.model, self.ts()), track=track)

    def location(self, track: bool = False) -> Fut:
        doc = physics.location_payload(self.state, self.ts())
        if self.state.mode is Mode.DRIVING:
            doc["speed_kmh"] = round(max(0.0, self.state.speed_kmh + self.rng.uniform(-8.0, 8.0)), 1)
        fut = self.emit("location", doc, track=track)
        self._reported.set()
        return fut

    def doors(self, track: bool = False) -> Fut:
        return self.emit("doors", physics.doors_payload(self.state, self.ts()), track=track)

    def status(self, online: bool, track: bool = False) -> Fut:
        doc = {"online": online, "firmware": self.firmware, "ts": self.ts()}
        return self.emit("status", doc, retain=True, track=track)

    def report_now(self) -> list[asyncio.Future[None]]:
        """Send doors, location and battery now; the futures complete when the broker has them."""
        return self._report_all(self.clock.now(), track=True)

    def attach(self, client: MqttClient) -> None:
        """A connection is up: publish the full state, then replay what was buffered offline."""
        self.client = client
        futs = [self.status(True, track=True), self.battery(True), self.location(True), self.doors(True)]
        while self.buffer and client.is_connected:
            suffix, payload = self.buffer.popleft()
            self.send(suffix, payload)
        if not self.ready.is_set():
            asyncio.gather(*(f for f in futs if f is not None)).add_done_callback(self._initial_acked)

    def _initial_acked(self, fut: asyncio.Future[list[None]]) -> None:
        if fut.cancelled() or fut.exception() is not None or self.ready.is_set():
            return
        self.ready.set()
        self.stats.ready += 1
        if self.on_ready is not None:
            self.on_ready(self)

    def detach(self) -> None:
        self.client = None

    # ---- the day ----------------------------------------------------------------------
    def update(self) -> float:
        """Bring the car to the simulated now, send what is due; return the simulated time to wake up."""
        now = self.clock.now()
        prev = self.state
        self.state = physics.advance(prev, self.model, now - self._last, home=self.home.id)
        self._last = now
        if prev.mode is Mode.DRIVING and self.state.mode is Mode.PARKED:
            self._arrived(now)
        elif (
            self.state.mode is Mode.PARKED
            and now >= self.next_event
            and not self.held
            and (self.autonomous or self.state.station != self.home.id)
        ):
            self._depart(now)
        driving = self.state.mode is Mode.DRIVING
        if now >= self.next_battery:
            self.battery()
            self.next_battery = now + (self.iv.battery_driving_s if driving else self.iv.battery_parked_s)
        if now >= self.next_location:
            self.location()
            self.next_location = now + (self.iv.location_driving_s if driving else self.iv.location_parked_s)
        if now >= self.next_doors:
            self.doors()
            self.next_doors = now + self.iv.doors_s
        return min(self.next_battery, self.next_location, self.next_doors, self.next_event)

    def _depart(self, now: float, choices: list[Station] | None = None) -> None:
        """Leave home for another town (or a round trip out of town if there is none), or go back home."""
        if self.state.station == self.home.id:
            if choices or self.stations:
                dest = self.rng.choice(choices or self.stations)
                target, dest_id = (dest.lat, dest.lon), dest.id
            else:
                target, dest_id = (self.home.lat + 0.1, self.home.lon + 0.1), ""
            need = physics.soc_drop_pct(2 * physics.road_km((self.state.lat, self.state.lon), target), self.model)
            if self.state.soc_pct < need + 20.0 or not self.state.closed:
                self.next_event = now + 3600.0  # not enough charge for the round trip: keep charging
                return
        else:
            target, dest_id = (self.home.lat, self.home.lon), self.home.id
        origin = (self.state.lat, self.state.lon)
        trip = Trip(origin, target, dest_id, max(physics.road_km(origin, target), 1.0), self.rng.uniform(55.0, 85.0))
        self.state = physics.start_trip(self.state, trip)
        self.next_event = now + trip.road_km / trip.cruise_kmh * 3600.0
        self._report_all(now)

    def drive_off(self) -> bool:
        """A renter takes the car: off to another town now, back home after the visit there.

        False if it stays (too little charge for the round trip to any town)."""
        self.update()  # the physics up to now, before the drive starts
        reachable = self.reachable()
        if not reachable or not self.state.closed:
            return False
        self.home_again.clear()
        self._depart(self.clock.now(), reachable)
        self.poke()
        return self.state.mode is Mode.DRIVING

    def reachable(self, margin_pct: float = 20.0) -> list[Station]:
        """The other stations this car can drive to and back from here with `margin_pct` to spare."""
        here = (self.state.lat, self.state.lon)
        return [
            s
            for s in self.stations
            if self.state.soc_pct
            >= physics.soc_drop_pct(2 * physics.road_km(here, (s.lat, s.lon)), self.model) + margin_pct
        ]

    def drive_to(
        self, target: tuple[float, float], dest_id: str, cruise_kmh: float, *, locked: bool | None = None
    ) -> list[asyncio.Future[None]]:
        """Drive from where it is now (parked or driving) to `target`, parking there (at station `dest_id`,
        or "" for none). The doors stay as they are if `locked` is given, else unlock as a driver does.
        Reports at once; the futures complete when the broker has the first report."""
        self.update()
        now = self.clock.now()
        origin = (self.state.lat, self.state.lon)
        trip = Trip(origin, target, dest_id, max(physics.road_km(origin, target), 0.01), cruise_kmh)
        self.state = physics.start_trip(self.state, trip)
        if locked is not None:
            self.state = replace(self.state, locked=locked)
        self.home_again.clear()
        self.next_event = now + trip.road_km / trip.cruise_kmh * 3600.0
        futs = self.report_now()
        self.poke()
        return futs

    def put(
        self,
        target: tuple[float, float],
        station: str,
        *,
        plugged: bool | None = None,
        locked: bool | None = None,
        closed: bool | None = None,
    ) -> list[asyncio.Future[None]]:
        """Bring the car to `target` at once (towed, carried: the odometer does not move), parked at `station`
        (or "" for none). Reports at once; the futures complete when the broker has the reports."""
        self.update()
        s = self.state
        self.state = replace(
            s, lat=target[0], lon=target[1], station=station, mode=Mode.PARKED, trip=None, speed_kmh=0.0,
            plugged=s.plugged if plugged is None else plugged, locked=s.locked if locked is None else locked,
            closed=s.closed if closed is None else closed,
        )  # fmt: skip
        now = self.clock.now()
        if station == self.home.id:
            self.home_again.set()
            self.next_event = plan_departure(self.rng, now)
        else:
            self.home_again.clear()
        futs = self.report_now()
        self.poke()
        return futs

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds, looked at after every location report."""
        while not done():
            self._reported.clear()
            await self._reported.wait()

    @property
    def at_home(self) -> bool:
        return self.state.mode is Mode.PARKED and self.state.station == self.home.id

    def _arrived(self, now: float) -> None:
        if self.state.station == self.home.id:
            self.home_again.set()
            self.next_event = plan_departure(self.rng, now)
        else:
            self.next_event = now + self.rng.uniform(30 * 60.0, 3 * 3600.0)  # the booking at the other town
        self._report_all(now)

    def _report_all(self, now: float, track: bool = False) -> list[asyncio.Future[None]]:
        driving = self.state.mode is Mode.DRIVING
        futs = [self.doors(track), self.location(track), self.battery(track)]
        self.next_doors = now + self.iv.doors_s
        self.next_location = now + (self.iv.location_driving_s if driving else self.iv.location_parked_s)
        self.next_battery = now + (self.iv.battery_driving_s if driving else self.iv.battery_parked_s)
        return [f for f in futs if f is not None]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wake = self.update()
            # asyncio.sleep, but poke() ends it early: a change from outside (a drive) reschedules the car.
            self._sleep = fut = loop.create_future()
            handle = loop.call_later(max(0.001, self.clock.wall_delay(wake - self.clock.now())), _wake, fut)
            try:
                await fut
            finally:
                handle.cancel()
                self._sleep = None

    def poke(self) -> None:
        """Wake the car now: its state was changed from outside and its next report may be due sooner."""
        _wake(self._sleep)

    # ---- commands ---------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes) -> None:
        """Handler for the car's own connection: the only subscription is its command topic."""
        self.on_command(payload)

    def on_command(self, payload: bytes) -> None:
        self.stats.commands += 1
        if self.behaviour is Behaviour.NO_ACK or self.muted:
            self.stats.unanswered += 1
            return
        cmd = parse_command(payload)
        if cmd is None:
            self.stats.unanswered += 1
            return
        verdict = verify_command(cmd, self.id, self.key, time.time(), self.seen)
        if not verdict.ok:
            self.stats.rejected += 1
            self._ack(ack_payload(verdict.command_id, "rejected", self.ts(), reason=verdict.reason))
            return
        if self.behaviour is Behaviour.SLOW_ACK:
            loop = asyncio.get_running_loop()
            handle = loop.call_later(self.slow_ack_s, self._execute, verdict.command_id, verdict.action)
            self._timers.add(handle)
            return
        self._execute(verdict.command_id, verdict.action)

    def _execute(self, command_id: str, action: str | None) -> None:
        self._timers = {t for t in self._timers if not t.cancelled() and t.when() > asyncio.get_running_loop().time()}
        reason = None
        if action not in ("unlock", "lock"):
            reason = "unsupported_action"
        elif self.behaviour is Behaviour.FAIL or (action == "lock" and not self.state.closed):
            reason = "door_open"
        if reason is not None:
            self.stats.failed += 1
            self._ack(ack_payload(command_id, "failed", self.ts(), reason=reason))
            return
        self.state = replace(self.state, locked=action == "lock")
        self.stats.done += 1
        self._ack(ack_payload(command_id, "done", self.ts(), locked=self.state.locked))
        self.doors()
        self.next_doors = self.clock.now() + self.iv.doors_s

    def _ack(self, payload: bytes) -> None:
        client = self.client
        if client is not None and client.is_connected:
            try:
                client.publish(f"{self.topic_base}/commands/ack", payload, self.qos)
                self.stats.sent += 1
            except MqttError:
                self.stats.unanswered += 1
        else:
            self.stats.unanswered += 1

    def cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)
