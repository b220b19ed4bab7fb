"""``SimFleet``: the cars, their connections, the load pump and the progress line, as one async context manager."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import resource
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from types import TracebackType

from device_sim import faults, incidents
from device_sim.car import Car, SimClock, Stats
from device_sim.commands import vehicle_key
from device_sim.config import Behaviour, SimConfig
from device_sim.faults import Fault
from device_sim.incidents import Condition
from device_sim.mqtt import MqttClient, MqttError, MqttSubscribeError, Will
from device_sim.physics import rfc3339_ms
from gateway.fleet import Fleet, load_fleet
from gateway.provision import mqtt_password

WILL_PAYLOAD = b'{"online": false}'
SUBSCRIBE_BATCH = 200
CAR_WINDOW = 20  # QoS 1 messages in flight per car connection before the load pump skips it
MUX_WINDOW = 2000


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one: one socket per car."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(target, 1_048_576)), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def sized_fleet(fleet: Fleet, n: int | None) -> Fleet:
    """`fleet` grown with generated cars, or cut to its first `n` cars."""
    if n is None or n == len(fleet.vehicles):
        return fleet
    if n > len(fleet.vehicles):
        return fleet.with_generated(n)
    return Fleet(fleet.models, fleet.stations, dict(list(fleet.vehicles.items())[:n]), fleet.service_area)


def assign_behaviours(ids: list[str], cfg: SimConfig, rng: random.Random) -> dict[str, Behaviour]:
    """Pick the misbehaving cars: the configured shares of a seeded shuffle, then the per-car overrides."""
    order = sorted(ids)
    rng.shuffle(order)
    out = dict.fromkeys(ids, Behaviour.NORMAL)
    i = 0
    for share, b in ((cfg.no_ack_share, Behaviour.NO_ACK), (cfg.fail_share, Behaviour.FAIL),
                     (cfg.slow_ack_share, Behaviour.SLOW_ACK)):  # fmt: skip
        k = round(share * len(ids))
        for vid in order[i : i + k]:
            out[vid] = b
        i += k
    out.update({k: v for k, v in cfg.behaviours.items() if k in out})
    return out


class SimFleet:
    """The simulated fleet. See the package docstring for the API."""

    def __init__(self, config: SimConfig, *, tls: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.tls = tls  # MQTT over TLS with this context (device_sim.mqtt.tls_context), plain if None
        base = config.fleet if config.fleet is not None else load_fleet(config.fleet_path)
        self.fleet = sized_fleet(base, config.vehicles)
        self.seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "big")
        self.stats = Stats()
        self.clock = SimClock(config.speed, config.start_hour)
        self.cars: dict[str, Car] = {}
        self._offline_until: dict[str, float] = {}
        self._clients: list[MqttClient | None] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._all_ready = asyncio.Event()
        self._sem = asyncio.Semaphore(max(1, config.connect_concurrency))
        self._tag = re.sub(r"[^A-Za-z0-9]+", "-", config.prefix).strip("-")
        stations = list(self.fleet.stations.values())
        behaviours = assign_behaviours(list(self.fleet.vehicles), config, random.Random(f"{self.seed}:behaviour"))
        for v in self.fleet.vehicles.values():
            key = config.keys.get(v.id) or config.keys.get("*")
            if key is None and config.master_key:
                key = vehicle_key(config.master_key, v.id)
            car = Car(
                v.id, self.fleet.models[v.model], self.fleet.stations[v.station], stations,
                topic_base=f"{config.prefix}/{v.id}", clock=self.clock, stats=self.stats,
                rng=random.Random(f"{self.seed}:{v.id}"), intervals=config.intervals, key=key,
                behaviour=behaviours[v.id], qos=config.qos, firmware=config.firmware,
                slow_ack_s=config.slow_ack_s, buffer_size=config.buffer_size,
            )  # fmt: skip
            car.on_ready = self._car_ready
            self.cars[v.id] = car

    # ---- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> SimFleet:
        raise_fd_limit()
        spawn = asyncio.get_running_loop().create_task
        try:
            if self.config.connections:
                groups = self._groups()
                self._clients = [None] * len(groups)
                self._tasks += [spawn(self._mux_link(i, g)) for i, g in enumerate(groups)]
            else:
                self._tasks += [spawn(self._car_link(c)) for c in self.cars.values()]
            self._tasks += [spawn(c.run()) for c in self.cars.values()]
            if self.config.rate > 0:
                self._tasks.append(spawn(self._pump()))
            if not self.config.quiet:
                self._tasks.append(spawn(self._progress()))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel every task, then say goodbye: a retained offline status and a clean DISCONNECT per connection."""
        live = [(car, car.client) for car in self.cars.values() if car.client is not None and car.client.is_connected]
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        clients: dict[int, MqttClient] = {}
        for car in self.cars.values():
            car.cancel_timers()
        for car, client in live:
            car.muted = False  # a car muted by vehicle_silent still says goodbye
            if client.is_connected:
                car.client = client
                car.status(False)
                car.detach()
                clients[id(client)] = client
        for c in clients.values():
            c.disconnect()
        if clients:
            await asyncio.wait([c.closed for c in clients.values()], timeout=5.0)
        for c in clients.values():
            c.abort()

    # ---- API for tests and demos ------------------------------------------------------
    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every car's first full state (status, battery, location, doors) has been acknowledged."""
        async with asyncio.timeout(timeout):
            await self._all_ready.wait()

    def doors(self, vehicle_id: str) -> tuple[bool, bool]:
        """(locked, closed) as the car knows them."""
        s = self.cars[vehicle_id].state
        return s.locked, s.closed

    async def act(self, vehicle_id: str, **changes: object) -> None:
        """What a driver does to a parked car (``plugged``, ``closed``, ``locked``, ``lat``/``lon``,
        ``odometer_km``, ``soc_pct``, ``speed_kmh``); the car reports its new state at once and this
        returns once the broker has it."""
        car = self.cars[vehicle_id]
        car.state = replace(car.state, **changes)  # type: ignore[arg-type]
        futs = car.report_now()
        if futs:
            await asyncio.wait_for(asyncio.gather(*futs), timeout=10)

    async def cause(self, vehicle_id: str, condition: Condition | str, *, drive: bool = True) -> None:
        """Cause the condition of an alert type in the car (``device_sim.incidents`` lists what each does);
        return once the car's reports show it and the broker has them. ValueError if the car cannot have it
        now (:meth:`cannot_cause` says why). With ``drive=False`` a car that would drive somewhere is brought
        there at once."""
        await incidents.cause(self.cars[vehicle_id], Condition(condition), self.fleet.service_area, drive=drive)

    async def clear(self, vehicle_id: str, condition: Condition | str, *, drive: bool = True) -> None:
        """Clear the condition (whether or not it was caused); return once the car's reports show it cleared.
        A car away drives home first (``drive=False``: brought home at once)."""
        await incidents.clear(self.cars[vehicle_id], Condition(condition), drive=drive)

    def cannot_cause(self, vehicle_id: str, condition: Condition | str) -> str | None:
        """Why the condition cannot be caused in the car now, or None if it can."""
        return incidents.refusal(self.cars[vehicle_id], Condition(condition), self.fleet.service_area)

    def held(self, vehicle_id: str) -> set[str]:
        """The conditions caused in the car and not cleared."""
        return set(self.cars[vehicle_id].held)

    def set_behaviour(self, vehicle_id: str, behaviour: Behaviour) -> None:
        car = self.cars[vehicle_id]
        car.behaviour = behaviour
        if behaviour is Behaviour.FAIL:
            car.state = replace(car.state, closed=False)

    def pick(self, share: float, rng: random.Random | None = None) -> list[str]:
        """A share of the cars, chosen with the fleet's seed unless `rng` is given."""
        ids = sorted(self.cars)
        k = max(1, round(share * len(ids))) if share > 0 else 0
        return (rng or random.Random(f"{self.seed}:pick")).sample(ids, k)

    async def inject(
        self,
        fault: Fault | str,
        vehicle_ids: Iterable[str] | None = None,
        *,
        old_age_s: float = 7200.0,
        skew_s: float = 600.0,
        offline_s: float = 2.0,
    ) -> list[str]:
        """Make the given cars (default: all) commit `fault` now; return their ids. See ``device_sim.faults``."""
        fault = Fault(fault)
        ids = list(vehicle_ids) if vehicle_ids is not None else list(self.cars)
        now = time.time()
        for vid in ids:
            car = self.cars[vid]
            self.stats.faults += 1
            if fault is Fault.MALFORMED:
                car.send("battery", faults.malformed_payload(car.ts()))
            elif fault is Fault.OUT_OF_RANGE:
                car.send("battery", faults.out_of_range_payload(car.ts()))
            elif fault is Fault.DUPLICATE:
                if "battery" not in car.last_sent:
                    car.battery()
                car.send("battery", car.last_sent["battery"])
            elif fault is Fault.OLD_TS:
                car.send("battery", faults.restamped(_last(car, "battery"), _stamp(now + car.skew_s - old_age_s)))
            elif fault is Fault.OUT_OF_ORDER:
                car.battery()
                car.send("battery", faults.restamped(car.last_sent["battery"], _stamp(now + car.skew_s - 30.0)))
            elif fault is Fault.CLOCK_SKEW:
                car.skew_s = skew_s
            elif fault in (Fault.DROP, Fault.STORM):
                self._offline_until[vid] = time.monotonic() + offline_s
        if fault in (Fault.DROP, Fault.STORM):
            for vid in ids:
                client = self.cars[vid].client
                if client is not None:
                    client.abort()
        return ids

    # ---- connections ------------------------------------------------------------------
    def _car_ready(self, car: Car) -> None:
        if self.stats.ready >= len(self.cars):
            self._all_ready.set()

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return float(min(c.reconnect_max_s, c.reconnect_min_s * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0))

    async def _stay_offline(self, vid: str) -> bool:
        wait = self._offline_until.pop(vid, 0.0) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
            return True
        return False

    async def _connect(
        self,
        client_id: str,
        on_message: Callable[[str, bytes], None],
        topics: list[str],
        will: Will | None,
        username: str | None,
        password: str | None,
    ) -> MqttClient:
        """Connect and subscribe, retrying with back-off until it works."""
        c = self.config
        attempt = 0
        while True:
            client: MqttClient | None = None
            try:
                async with self._sem:
                    client = await MqttClient.connect(
                        c.host, c.port, client_id, will=will, keepalive=c.keepalive,
                        on_message=on_message, username=username, password=password, tls=self.tls,
                    )  # fmt: skip
                    subs = [(t, 1) for t in topics]
                    for i in range(0, len(subs), SUBSCRIBE_BATCH):
                        await client.subscribe(subs[i : i + SUBSCRIBE_BATCH])
                return client
            except (MqttError, TimeoutError) as e:
                if client is not None:
                    # A refused subscription leaves a working connection: close it cleanly, so the broker does
                    # not publish the car's offline will at every retry (a will storm under a strict ACL).
                    if isinstance(e, MqttSubscribeError):
                        client.disconnect()
                    else:
                        client.abort()
                self.stats.connect_failures += 1
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))

    async def _car_link(self, car: Car) -> None:
        c = self.config
        client_id = f"{c.client_id_prefix}-{self._tag}-{car.id}"
        will = Will(f"{car.topic_base}/status", WILL_PAYLOAD, qos=c.qos, retain=True)
        username, password = c.username, c.password
        if c.per_car_credentials and c.master_key:
            username, password = car.id, mqtt_password(c.master_key, car.id)
        while True:
            client = await self._connect(
                client_id, car.on_message, [f"{car.topic_base}/commands"], will, username, password
            )
            await self._serve(client, [car])
            if not await self._stay_offline(car.id):
                await asyncio.sleep(self._backoff(0))

    async def _mux_link(self, index: int, cars: list[Car]) -> None:
        c = self.config
        by_topic = {f"{car.topic_base}/commands": car for car in cars}

        def dispatch(topic: str, payload: bytes) -> None:
            car = by_topic.get(topic)
            if car is not None:
                car.on_command(payload)

        client_id = f"{c.client_id_prefix}-{self._tag}-mux{index}"
        while True:
            client = await self._connect(client_id, dispatch, list(by_topic), None, c.username, c.password)
            self._clients[index] = client
            await self._serve(client, cars)
            self._clients[index] = None
            offline = [await self._stay_offline(car.id) for car in cars]
            if not any(offline):
                await asyncio.sleep(self._backoff(0))

    async def _serve(self, client: MqttClient, cars: list[Car]) -> None:
        self.stats.connects += 1
        self.stats.connected += len(cars)
        try:
            for car in cars:
                car.attach(client)
            await asyncio.shield(client.closed)  # cancelling us must not mark the connection closed
            self.stats.disconnects += 1
        finally:
            self.stats.connected -= len(cars)
            for car in cars:
                if car.client is client:
                    car.detach()

    def _groups(self) -> list[list[Car]]:
        k = min(self.config.connections, len(self.cars))
        groups: list[list[Car]] = [[] for _ in range(k)]
        for i, car in enumerate(self.cars.values()):
            groups[i % k].append(car)
        return groups

    # ---- load and progress ------------------------------------------------------------
    async def _pump(self) -> None:
        """Extra battery reports at `rate` msgs/s over the fleet (as fast as the sockets take them if infinite)."""
        cars = list(self.cars.values())
        window = MUX_WINDOW if self.config.connections else CAR_WINDOW
        rate = self.config.rate
        tick = 0.02
        credit = 0.0
        i = 0
        while True:
            credit = 512.0 if math.isinf(rate) else credit + rate * tick
            sent = 0
            for _ in range(len(cars)):
                if credit < 1:
                    break
                car = cars[i]
                i = (i + 1) % len(cars)
                client = car.client
                if client is None or not client.is_connected or client.inflight >= window:
                    continue
                car.battery()
                credit -= 1
                sent += 1
            if math.isinf(rate):
                await asyncio.sleep(0 if sent else 0.001)
            else:
                credit = min(credit, rate)  # do not bank more than a second of backlog
                await asyncio.sleep(tick)

    async def _progress(self) -> None:
        s = self.stats
        n = len(self.cars)
        mode = f"{self.config.connections} shared connections" if self.config.connections else "one connection per car"
        print(f"device_sim: {n} cars, {mode}, seed {self.seed}, speed x{self.config.speed:g}", file=sys.stderr)
        last_sent, last_t = s.sent, time.monotonic()
        links = min(self.config.connections, n) if self.config.connections else n
        while True:
            await asyncio.sleep(self.config.progress_s)
            now = time.monotonic()
            rate = (s.sent - last_sent) / (now - last_t)
            last_sent, last_t = s.sent, now
            print(
                f"device_sim: {s.connected}/{n} connected, {s.ready} ready | {s.sent} msgs, {rate:.0f} msg/s | "
                f"commands {s.commands}: {s.done} done, {s.rejected} rejected, {s.failed} failed, "
                f"{s.unanswered} unanswered | reconnects {max(0, s.connects - links)}",
                file=sys.stderr,
                flush=True,
            )


def _last(car: Car, suffix: str) -> bytes:
    if suffix not in car.last_sent:
        car.battery()
    return car.last_sent[suffix]


def _stamp(epoch_s: float) -> str:
    return rfc3339_ms(epoch_s)
