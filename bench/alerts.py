"""Alert rules and webhooks: what they cost ingest, and how soon an alert reaches a receiver, in one run.

Part 1, ingest. Each round starts a fresh gateway twice, with the alert
rules on and one webhook endpoint that never answers (it accepts the
connection, reads the request, and says nothing: every attempt holds a
delivery slot for ``webhooks.timeout_s``), and with the rules off and no
endpoint; rounds are interleaved (the order alternates) and the median of
each is reported. One ``mosquitto_pub -l`` per car and measurement
publishes battery, location and doors messages for the fleet's cars at
QoS 1 with current timestamps (at most a few seconds old on arrival, so
the rules take them as news, not replays); some cars drive away from their
station and back with no trip, several times, so ``moved_without_trip``
opens and resolves and the events queue for the dead endpoint. The rate is
timed from the first publish until every message is a row in InfluxDB
(counted in each of the three measurements); what never arrives is lost.

Part 2, latency. A fresh gateway, rules on, one endpoint of types ``*``
served by ``device_sim.receiver.Receiver`` (which verifies every
signature). A second process publishes ``--rate`` msg/s of telemetry for
the other cars of the fleet (parked at their stations) at QoS 1. For each
sample a car (rotating over the first ``--sample-cars`` of the fleet)
publishes one location message 2 km from its station at 48 km/h; the
figure is the time from that publish to the ``alert.opened`` webhook
received. Then the car is sent home, parked, and its ``alert.resolved``
awaited, and the next sample follows ``--gap`` later: one alert at a time,
as they come in real life. The same message is also received by a plain
MQTT subscriber (subscribed to the sampled cars' locations) on the same
broker, under the same load: the broker's share of the latency, and the
yardstick of a shared, noisy machine.

    python -m bench.alerts [--messages 300000] [--cars 29] [--rounds 2] [--samples 100] [--rate 5000]

Prints msg/s with the rules on and off and their ratio (target: at least
0.9x; also per round, from the two runs next to each other in time), then
p50/p99 of the webhook latency, of the broker's, and their ratio (target:
p99 under 1 s). Exits 1 if a message was lost or a sample timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import random
import secrets
import socketserver
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    API_KEY,
    REPO,
    broker_and_database,
    gateway_env,
    percentile,
    start_gateway,
    wait_until,
)
from device_sim.receiver import Answer, Delivery, Receiver
from gateway.fleet import Fleet, load_fleet
from gateway.mqtt.codec import Message
from gateway.mqtt.link import MqttLink
from gateway.settings import MqttSettings
from scripts import services
from scripts.services import service_errors_exit_2

KINDS = ("battery", "location", "doors")
# One field each measurement always has: count(field) is its number of rows.
COUNTED = {"battery": "soc_pct", "location": "lat", "doors": "locked"}
AWAY_DEG = 0.018  # about 2 km north of the station: well past the rule's 500 m
QUIET = "ERROR"  # every alert opened is a WARNING line of the gateway's: hundreds a run
TIMEOUT_S = 10.0  # a sample (or a resolve) not seen within this is missing


def now_ms() -> int:
    return int(time.time() * 1000)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def count_rows(influx_port: int, db: str) -> dict[str, int]:
    """Rows in each of battery, location and doors (0 while the database does not exist yet)."""
    q = "; ".join(f"SELECT count({f}) FROM {m}" for m, f in COUNTED.items())
    url = f"http://127.0.0.1:{influx_port}/query?{urllib.parse.urlencode({'db': db, 'q': q})}"
    counts = dict.fromkeys(COUNTED, 0)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        for m, result in zip(COUNTED, body["results"], strict=True):
            series = result.get("series")
            counts[m] = int(series[0]["values"][0][1]) if series else 0
    except (OSError, KeyError, ValueError):
        pass
    return counts


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api_get(http_port: int, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def fleet_cars(fleet: Fleet) -> list[tuple[str, float, float]]:
    """(vehicle_id, home lat, home lon) of every car, in the registry's order."""
    return [(v.id, fleet.stations[v.station].lat, fleet.stations[v.station].lon) for v in fleet.vehicles.values()]


# -- part 1: ingest with the rules on and a dead endpoint, against the rules off --


class DeadEndpoint:
    """An HTTP endpoint that accepts every connection, reads whatever comes and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        outer = self

        class Hang(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                with contextlib.suppress(OSError):
                    while self.request.recv(65536):
                        pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Hang)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="dead-endpoint", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class Stream:
    topic: str  # after the prefix: CAR/kind
    path: Path


def make_streams(
    work: Path, cars: Sequence[tuple[str, float, float]], per_stream: int, moving: int, excursions: int
) -> list[Stream]:
    """Files of `per_stream` messages for each car and kind, ts ending about now (1 ms apart, distinct per
    series). The first `moving` cars drive `excursions` times away from their station and back home."""
    base = now_ms() - per_stream
    cycle = per_stream // excursions
    streams = []
    for i, (car, lat, lon) in enumerate(cars):
        lines: dict[str, list[bytes]] = {k: [] for k in KINDS}
        for n in range(per_stream):
            ts = base + n
            soc = 90 - (n % 600) / 10
            lines["battery"].append(
                orjson.dumps(
                    {"ts": ts, "soc_pct": soc, "range_km": round(soc * 3, 1), "charging": True, "plugged": True}
                )
            )
            lines["doors"].append(orjson.dumps({"ts": ts, "locked": n % 7 != 0, "closed": True}))
            phase = n % cycle if cycle else 0
            if i < moving and n < cycle * excursions and phase < cycle // 2:  # away, driving
                loc = {"lat": lat + AWAY_DEG + phase * 1e-5, "lon": lon, "speed_kmh": 30.0 + phase % 40}
            else:  # parked at its station
                loc = {"lat": lat + (n % 5) * 1e-5, "lon": lon, "speed_kmh": 0.0}
            lines["location"].append(orjson.dumps({"ts": ts, **loc, "heading_deg": 0, "odometer_km": 1000 + n / 100}))
        for kind, ls in lines.items():
            path = work / f"{car}-{kind}.jsonl"
            path.write_bytes(b"\n".join(ls) + b"\n")
            streams.append(Stream(f"{car}/{kind}", path))
    return streams


def publish_streams(broker_port: int, prefix: str, streams: Sequence[Stream]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for s in streams:
        with open(s.path, "rb") as stdin:
            argv = ["mosquitto_pub", "-p", str(broker_port), "-q", "1", "-M", "1000", "-l"]
            argv += ["-t", f"{prefix}/{s.topic}", "-i", f"pub-{prefix}-{s.topic}".replace("/", "-")]
            procs.append(subprocess.Popen(argv, stdin=stdin))
    return procs


@dataclass
class IngestResult:
    rate: float
    lost: int
    cpu_us: float  # the gateway's CPU time per message: far less noisy than the rate on a shared machine
    note: str = ""


class Ingest:
    def __init__(
        self, args: argparse.Namespace, fleet: Fleet, work: Path, broker: services.Service, influx: services.Service
    ):
        self.args = args
        self.work = work
        self.broker = broker
        self.influx = influx
        self.cars = fleet_cars(fleet)[: args.cars]
        self.per_stream: int = max(1, args.messages // (len(self.cars) * len(KINDS)))
        self.total = self.per_stream * len(self.cars) * len(KINDS)
        self.moving: int = min(args.moving, len(self.cars))
        self.excursions: int = max(1, min(args.excursions, self.per_stream // 2))
        self.n = 0

    def run(self, rules: bool) -> IngestResult:
        self.n += 1
        kind = "on" if rules else "off"
        prefix, db = f"i{self.n}{kind}/fleet", f"bench_alerts_{self.n}_{kind}"
        http_port = services.free_port()
        dead = DeadEndpoint() if rules else None
        extra = {"GATEWAY__MQTT__TOPIC_PREFIX": prefix, "GATEWAY__MQTT__CLIENT_ID": f"gw-{self.n}-{kind}"}
        extra["GATEWAY__INFLUX__DATABASE"] = db
        extra["GATEWAY__LOG_LEVEL"] = QUIET
        if dead is not None:
            extra["GATEWAY__ALERTS__ENABLED"] = "true"
            extra["GATEWAY__WEBHOOKS__ENDPOINTS"] = json.dumps(
                [{"url": dead.url, "secret": new_secret(), "types": ["*"]}]
            )
        else:
            extra["GATEWAY__ALERTS__ENABLED"] = "false"
        env = gateway_env(self.broker.port, self.influx.port, http_port, self.work / f"state-{db}", **extra)
        gw = start_gateway(env, http_port)
        try:
            files = self.work / f"msgs-{self.n}"
            files.mkdir()
            # Written just before publishing, so each ts is at most a few seconds old when it arrives.
            streams = make_streams(files, self.cars, self.per_stream, self.moving, self.excursions)

            def rows() -> int:
                return sum(count_rows(self.influx.port, db).values())

            cpu0, t0 = cpu_s(gw.pid), time.perf_counter()
            pubs = publish_streams(self.broker.port, prefix, streams)
            finished = wait_until(lambda: rows() >= self.total, self.args.timeout, poll=0.1)
            elapsed, cpu = time.perf_counter() - t0, cpu_s(gw.pid) - cpu0
            for p in pubs:
                p.wait()
            if not finished:  # a last chance for stragglers before calling them lost
                wait_until(lambda: rows() >= self.total, 10)
            counts = count_rows(self.influx.port, db)
            result = IngestResult(self.total / elapsed, self.total - sum(counts.values()), cpu / self.total * 1e6)
            if result.lost:
                short = {m: self.total // len(KINDS) - n for m, n in counts.items()}
                result.note = "missing rows: " + ", ".join(f"{m} {n}" for m, n in short.items())
            if dead is not None:
                result.note = "; ".join(x for x in (result.note, self._alerts_note(http_port, dead)) if x)
            return result
        finally:
            gw.terminate()
            gw.wait()
            if dead is not None:
                dead.close()

    def _alerts_note(self, http_port: int, dead: DeadEndpoint) -> str:
        """What the rules made of the round: alerts opened and resolved, against what the messages call for."""
        want = self.moving * self.excursions
        got: dict[str, int] = {}

        def counts() -> bool:
            alerts = api_get(http_port, "/v1/alerts?status=all&type=moved_without_trip&limit=5000")["alerts"]
            got["opened"] = len(alerts)
            got["resolved"] = sum(1 for a in alerts if a["resolved_at"] is not None)
            return got["opened"] >= want and got["resolved"] >= want

        try:
            wait_until(counts, 10, poll=0.5)  # the alert writer may be a little behind ingest
        except (OSError, ValueError) as e:
            return f"cannot list the alerts: {e}"
        return (
            f"moved_without_trip opened {got['opened']}/{want}, resolved {got['resolved']}/{want}; "
            f"{got['opened'] + got['resolved']} events for the dead endpoint, {dead.connections} attempts held open"
        )


# -- part 2: latency of moved_without_trip to the webhook, under load --


def load_publisher(
    port: int,
    prefix: str,
    cars: list[tuple[str, float, float]],
    rate: float,
    sent: Synchronized[int],
    acked: Synchronized[int],
    ready: MpEvent,
    stop: MpEvent,
) -> None:
    """In a process of its own: `rate` msg/s of parked-car telemetry at QoS 1, until `stop`."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-load-{prefix}", protocol=paho.MQTTv311)
    c.max_inflight_messages_set(2000)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    n_acked = 0

    def on_connect(*_: Any) -> None:
        connected.set()

    def on_publish(*_: Any) -> None:
        nonlocal n_acked
        n_acked += 1

    c.on_connect = on_connect
    c.on_publish = on_publish
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    connected.wait(10)
    streams = [(car, kind, lat, lon) for car, lat, lon in cars for kind in KINDS]
    last: dict[tuple[str, str], int] = {}
    n = 0
    ready.set()
    t0 = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - t0) * rate)
        while n < due:
            car, kind, lat, lon = streams[n % len(streams)]
            ts = last[(car, kind)] = max(now_ms(), last.get((car, kind), 0) + 1)  # distinct per series
            doc: dict[str, Any]
            if kind == "battery":
                doc = {"ts": ts, "soc_pct": 60 + n % 30, "range_km": 200.0, "charging": True, "plugged": True}
            elif kind == "location":
                doc = {"ts": ts, "lat": lat + (n % 7) * 1e-5, "lon": lon, "speed_kmh": 0.0, "odometer_km": 5000.0}
            else:
                doc = {"ts": ts, "locked": True, "closed": True}
            c.publish(f"{prefix}/{car}/{kind}", orjson.dumps(doc), qos=1)
            n += 1
        sent.value, acked.value = n, n_acked
        time.sleep(0.005)
    deadline = time.monotonic() + 10
    while n_acked < n and time.monotonic() < deadline:
        time.sleep(0.05)
    sent.value, acked.value = n, n_acked
    c.loop_stop()
    c.disconnect()


@dataclass
class LatencyResult:
    gateway_ms: list[float]
    broker_ms: list[float]
    resolve_ms: list[float]  # from the message home to the alert.resolved webhook
    missing: int
    unresolved: int
    load_rate: float
    load_lost: int
    refused: int = 0  # deliveries whose signature did not verify


class Latency:
    def __init__(
        self, args: argparse.Namespace, fleet: Fleet, work: Path, broker: services.Service, influx: services.Service
    ):
        self.args = args
        self.work = work
        self.broker = broker
        self.influx = influx
        cars = fleet_cars(fleet)
        self.samplers, self.others = cars[: args.sample_cars], cars[args.sample_cars :]
        self.prefix, self.db = "lat/fleet", "bench_alerts_latency"
        self.secret = new_secret()
        # What the sample loop waits for: the broker's copy of a message, a car's next opened / resolved alert.
        self.on_sub: dict[bytes, asyncio.Future[float]] = {}
        self.on_open: dict[str, asyncio.Future[float]] = {}
        self.on_resolve: dict[str, asyncio.Future[float]] = {}
        self.seen: set[str] = set()

    def _plan(self, d: Delivery) -> Answer:
        """Every verified delivery, as it arrives (d.received_s is its arrival)."""
        if d.id not in self.seen:
            self.seen.add(d.id)
            alert = d.event.get("data", {})
            waiting = {"alert.opened": self.on_open, "alert.resolved": self.on_resolve}.get(d.type)
            if waiting is not None and alert.get("type") == "moved_without_trip":
                fut = waiting.pop(alert.get("vehicle_id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(d.received_s)
        return Answer()

    def _on_message(self, msg: Message, token: int) -> None:
        t = time.time()
        fut = self.on_sub.pop(bytes(msg.payload), None)
        if fut is not None and not fut.done():
            fut.set_result(t)

    async def run(self) -> LatencyResult:
        loop = asyncio.get_running_loop()
        receiver = await Receiver(self.secret, plan=self._plan).start(services.free_port())
        http_port = services.free_port()
        env = gateway_env(
            self.broker.port,
            self.influx.port,
            http_port,
            self.work / "state-latency",
            GATEWAY__MQTT__TOPIC_PREFIX=self.prefix,
            GATEWAY__MQTT__CLIENT_ID="gw-latency",
            GATEWAY__INFLUX__DATABASE=self.db,
            GATEWAY__ALERTS__ENABLED="true",
            GATEWAY__LOG_LEVEL=QUIET,
            GATEWAY__WEBHOOKS__ENDPOINTS=json.dumps([{"url": receiver.url, "secret": self.secret, "types": ["*"]}]),
        )
        gw = await asyncio.to_thread(start_gateway, env, http_port)
        mp = multiprocessing.get_context("spawn")
        sent, acked = mp.Value("q", 0), mp.Value("q", 0)
        ready, stop = mp.Event(), mp.Event()
        load = mp.Process(
            target=load_publisher,
            args=(self.broker.port, self.prefix, self.others, self.args.rate, sent, acked, ready, stop),
            daemon=True,
        )
        settings = MqttSettings(port=self.broker.port, session_expiry_s=0, topic_prefix=self.prefix)
        # Two connections: a link never hears its own publications (no_local). The publisher's one
        # subscription is to a topic nobody uses.
        pub_settings = settings.model_copy(update={"client_id": "bench-sampler"})
        pub = MqttLink(pub_settings, lambda m, t: None, ["bench-sampler/none"], auto_ack=True, shared=False)
        topics = [f"{self.prefix}/{car}/location" for car, _, _ in self.samplers]
        sub_settings = settings.model_copy(update={"client_id": "bench-plain-sub"})
        sub = MqttLink(sub_settings, self._on_message, topics, auto_ack=True, shared=False)
        tasks = [asyncio.create_task(pub.run()), asyncio.create_task(sub.run())]
        try:
            while not (pub.connected and sub.connected):  # noqa: ASYNC110 - the links have no event to wait on
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the subscription is in place
            load.start()
            await asyncio.to_thread(ready.wait, 30)
            await asyncio.sleep(3)  # the load at its rate, the gateway at its pace under it
            result = await self._samples(loop, pub, sent, acked)
            stop.set()
            await asyncio.to_thread(load.join, 30)
            # Every message of the run (the load and the samples' two each) should be a row by now.
            total = sent.value + 2 * (self.args.warmup + self.args.samples)

            def rows() -> int:
                return sum(count_rows(self.influx.port, self.db).values())

            await asyncio.to_thread(wait_until, lambda: rows() >= total, 30, 0.5)
            result.load_lost = total - rows()
            result.refused = len(receiver.refused)
            return result
        finally:
            stop.set()
            if load.is_alive():
                load.join(5)
            if load.is_alive():
                load.kill()
            for t in tasks:
                t.cancel()
            await pub.close()
            await sub.close()
            gw.terminate()
            await asyncio.to_thread(gw.wait)
            await receiver.stop()

    async def _samples(
        self, loop: asyncio.AbstractEventLoop, pub: MqttLink, sent: Synchronized[int], acked: Synchronized[int]
    ) -> LatencyResult:
        gw_ms: list[float] = []
        broker_ms: list[float] = []
        resolve_ms: list[float] = []
        missing = unresolved = 0
        last_ts: dict[str, int] = {}
        rate_from: tuple[float, int] | None = None

        def ts_for(car: str) -> int:
            ts = last_ts[car] = max(now_ms(), last_ts.get(car, 0) + 1)
            return ts

        for i in range(self.args.warmup + self.args.samples):
            if i == self.args.warmup:
                rate_from = (time.monotonic(), acked.value)
            car, lat, lon = self.samplers[i % len(self.samplers)]
            topic = f"{self.prefix}/{car}/location"
            away = {"lat": lat + AWAY_DEG, "lon": lon, "speed_kmh": 48.0, "heading_deg": 0, "odometer_km": 100.0}
            payload = orjson.dumps({"ts": ts_for(car), **away})
            opened = self.on_open[car] = loop.create_future()
            heard = self.on_sub[payload] = loop.create_future()
            t_pub = time.time()
            pub.publish(topic, payload, 1)
            try:
                t_sub = await asyncio.wait_for(heard, TIMEOUT_S)
                t_hook = await asyncio.wait_for(opened, TIMEOUT_S)
            except TimeoutError:
                missing += 1
                self.on_sub.pop(payload, None)
                self.on_open.pop(car, None)
            else:
                if i >= self.args.warmup:
                    broker_ms.append((t_sub - t_pub) * 1000)
                    gw_ms.append((t_hook - t_pub) * 1000)
            # Home, parked: the alert resolves, and the car is free for its next turn.
            resolved = self.on_resolve[car] = loop.create_future()
            back = {"lat": lat, "lon": lon, "speed_kmh": 0.0, "heading_deg": 0, "odometer_km": 102.0}
            t_back = time.time()
            pub.publish(topic, orjson.dumps({"ts": ts_for(car), **back}), 1)
            try:
                t_resolved = await asyncio.wait_for(resolved, TIMEOUT_S)
            except TimeoutError:
                unresolved += 1
                self.on_resolve.pop(car, None)
            else:
                if i >= self.args.warmup:
                    resolve_ms.append((t_resolved - t_back) * 1000)
            # Each sample on its own, as an alert comes in real life: nothing of the last one still in flight,
            # and not in step with any of the gateway's timers.
            await asyncio.sleep(random.uniform(0.5, 1.5) * self.args.gap)
        assert rate_from is not None
        load_rate = (acked.value - rate_from[1]) / (time.monotonic() - rate_from[0])
        return LatencyResult(gw_ms, broker_ms, resolve_ms, missing, unresolved, load_rate, 0)


# -- the run --


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.alerts",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--messages", type=int, default=300_000, help="messages per ingest run (default 300000)")
    p.add_argument("--cars", type=int, default=29, help="cars publishing in part 1 (default 29: the whole fleet)")
    p.add_argument("--moving", type=int, default=10, help="of those, cars moving with no trip (default 10)")
    p.add_argument("--excursions", type=int, default=10, help="away-and-back drives per moving car (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of rules on / off (default 2)")
    p.add_argument("--samples", type=int, default=100, help="latency samples (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="latency samples taken first and not counted (default 5)")
    p.add_argument(
        "--gap", type=float, default=0.2, help="seconds between samples, at random from 0.5x to 1.5x (default 0.2)"
    )
    p.add_argument("--sample-cars", type=int, default=8, help="cars the samples rotate over (default 8)")
    p.add_argument("--rate", type=float, default=5000, help="background telemetry in msg/s in part 2 (default 5000)")
    p.add_argument("--timeout", type=float, default=120, help="give up on one ingest run after this long")
    p.add_argument("--only", choices=["ingest", "latency"], help="run one part only")
    args = p.parse_args(argv)
    fleet = load_fleet(REPO / "config" / "fleet.yaml")
    if not 1 <= args.sample_cars < len(fleet.vehicles):
        p.error(f"--sample-cars: from 1 to {len(fleet.vehicles) - 1} (the others carry the load)")
    if not 1 <= args.cars <= len(fleet.vehicles):
        p.error(f"--cars: from 1 to {len(fleet.vehicles)}")

    ok = True
    t_start = time.monotonic()
    with broker_and_database("alerts") as (work, broker, influx):
        if args.only != "latency":
            ing = Ingest(args, fleet, work, broker, influx)
            print(
                f"part 1: ingest at QoS 1, {ing.total:,} messages (battery, location, doors) from {len(ing.cars)} "
                f"cars, {ing.moving} of them driving away and back {ing.excursions} times with no trip; "
                f"{args.rounds} round(s)",
                flush=True,
            )
            results: dict[bool, list[IngestResult]] = {True: [], False: []}
            for r in range(args.rounds):
                for rules in (True, False) if r % 2 == 0 else (False, True):
                    res = ing.run(rules)
                    results[rules].append(res)
                    name = "rules on, dead webhook" if rules else "rules off, no webhook "
                    note = f"  ({res.note})" if res.note else ""
                    print(
                        f"  round {r + 1}: {name} {res.rate:9,.0f} msg/s  gateway CPU {res.cpu_us:5.1f} us/msg  "
                        f"lost {res.lost}{note}",
                        flush=True,
                    )
            paired = [a.rate / b.rate for a, b in zip(results[True], results[False], strict=True)]
            on = statistics.median(x.rate for x in results[True])
            off = statistics.median(x.rate for x in results[False])
            cpu_on = statistics.median(x.cpu_us for x in results[True])
            cpu_off = statistics.median(x.cpu_us for x in results[False])
            lost = sum(x.lost for v in results.values() for x in v)
            ok &= lost == 0
        if args.only != "ingest":
            print(
                f"part 2: latency of moved_without_trip, MQTT publish -> webhook received, {args.samples} samples "
                f"over {args.sample_cars} cars, under {args.rate:,.0f} msg/s of telemetry from "
                f"{len(fleet.vehicles) - args.sample_cars} other cars",
                flush=True,
            )
            lat = asyncio.run(Latency(args, fleet, work, broker, influx).run())
            ok &= lat.missing == 0 and lat.load_lost == 0 and lat.refused == 0
    print(f"\nresults ({time.monotonic() - t_start:.0f} s):")
    if args.only != "latency":
        print(f"  ingest, median msg/s from first publish until every message is a row ({args.rounds} rounds each):")
        print(f"    rules on, dead webhook endpoint  {on:9,.0f}")
        print(f"    rules off, no endpoint           {off:9,.0f}")
        print(f"    on / off = {on / off:.2f}x (target >= 0.90x); lost messages: {lost}")
        print(f"    on / off within each round (adjacent runs): {', '.join(f'{x:.2f}x' for x in paired)}")
        print(
            f"    gateway CPU per message: on {cpu_on:.1f} us, off {cpu_off:.1f} us; "
            f"off / on = {cpu_off / cpu_on:.2f}x (the rate ratio if the gateway's CPU is the limit)"
        )
    if args.only != "ingest":
        if len(lat.gateway_ms) >= 2:
            g50, g99 = percentile(lat.gateway_ms, 50), percentile(lat.gateway_ms, 99)
            b50, b99 = percentile(lat.broker_ms, 50), percentile(lat.broker_ms, 99)
            print(f"  latency over {len(lat.gateway_ms)} samples, background load achieved {lat.load_rate:,.0f} msg/s:")
            print(f"    gateway, publish -> webhook   p50 {g50:7.1f} ms  p99 {g99:7.1f} ms  (target p99 < 1000 ms)")
            print(f"    broker, publish -> subscriber p50 {b50:7.1f} ms  p99 {b99:7.1f} ms")
            print(f"    gateway / broker              p50 {g50 / b50:7.1f}x    p99 {g99 / b99:7.1f}x")
            if len(lat.resolve_ms) >= 2:
                r50, r99 = percentile(lat.resolve_ms, 50), percentile(lat.resolve_ms, 99)
                print(f"    (back home -> alert.resolved  p50 {r50:7.1f} ms  p99 {r99:7.1f} ms)")
        print(
            f"    samples missing {lat.missing}, alerts not resolved in time {lat.unresolved}, "
            f"messages lost under load {lat.load_lost}, webhooks refused (bad signature) {lat.refused}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
