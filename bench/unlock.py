"""Unlock latency and throughput through the gateway, against the bare MQTT round trip, in one run.

Starts Mosquitto and InfluxDB, the gateway (a process of its own) and a
simulated fleet whose cars answer at once. For concurrency 1, 10 and 100,
idle and then under 5,000 telemetry messages/s from a second simulator, it
measures:

* gateway: ``POST /v1/vehicles/{id}/unlock`` (and lock, alternately) from
  an HTTP client until the car's ack comes back in the answer;
* baseline: the same signed command published straight to the car and its
  ack received, by an MQTT client in this process — the floor any gateway
  adds its work to.

    python -m bench.unlock [--requests 2000] [--cars 100]

Prints p50/p95/p99 latency and requests/s for each, and the gateway's p99
minus the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import API_KEY, MASTER, REPO, broker_and_database, gateway_env, start_gateway
from gateway.fleet import Fleet, load_fleet
from gateway.mqtt.codec import Message
from gateway.mqtt.link import MqttLink
from gateway.rules.commands import build_command
from gateway.settings import MqttSettings
from scripts import services

PREFIX = "fleet"


@dataclass
class Result:
    latencies_ms: list[float]
    seconds: float
    errors: int

    def line(self, name: str) -> str:
        q = statistics.quantiles(self.latencies_ms, n=100, method="inclusive")
        rate = len(self.latencies_ms) / self.seconds
        return (
            f"{name:9s} p50 {q[49]:6.2f} ms  p95 {q[94]:6.2f} ms  p99 {q[98]:6.2f} ms  {rate:7.0f} req/s"
            f"  errors {self.errors}"
        )

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[98]


async def run_workers(concurrency: int, total: int, one: Any) -> Result:
    """`concurrency` workers share `total` calls; worker w always drives car w."""
    lat: list[float] = []
    errors = 0
    counter = iter(range(total))

    async def worker(w: int) -> None:
        nonlocal errors
        for n, _ in enumerate(counter):
            t0 = time.perf_counter()
            ok = await one(w, "unlock" if n % 2 == 0 else "lock")
            lat.append((time.perf_counter() - t0) * 1000)
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Result(lat, time.perf_counter() - t0, errors)


class Baseline:
    """Publishes signed commands directly and waits for the cars' acks."""

    def __init__(self, port: int, cars: list[str]) -> None:
        self.cars = cars
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        settings = MqttSettings(port=port, client_id="bench-roundtrip", session_expiry_s=0, topic_prefix=PREFIX)
        self.link = MqttLink(settings, self._on_message, [f"{PREFIX}/+/commands/ack"])

    def _on_message(self, msg: Message, token: int) -> None:
        self.link.ack([token])
        cid = orjson.loads(msg.payload).get("command_id")
        fut = self.waiting.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.payload)

    async def one(self, w: int, action: str) -> bool:
        car = self.cars[w]
        cmd = build_command(MASTER, car, action, f"RB-{car}", datetime.now(UTC), 10)  # type: ignore[arg-type]
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[cmd["command_id"]] = fut
        self.link.publish(f"{PREFIX}/{car}/commands", orjson.dumps(cmd), 1, 10)
        try:
            async with asyncio.timeout(10):
                return b'"done"' in await fut
        except TimeoutError:
            return False


class Gateway:
    def __init__(self, http: aiohttp.ClientSession, port: int, cars: list[str]) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{port}"
        self.cars = cars

    async def one(self, w: int, action: str) -> bool:
        car = self.cars[w]
        async with self.http.post(f"{self.base}/v1/vehicles/{car}/{action}", json={"reservation_id": f"RB-{car}"}) as r:
            await r.read()
            return r.status == 200


def write_fleets(work: Path, cars: int, load_cars: int) -> tuple[Path, Path, list[str]]:
    base = load_fleet(REPO / "config" / "fleet.yaml").with_generated(cars + load_cars)
    ids = list(base.vehicles)
    answering = Fleet(base.models, base.stations, {v: base.vehicles[v] for v in ids[:cars]})
    load = Fleet(base.models, base.stations, {v: base.vehicles[v] for v in ids[cars:]})
    (work / "fleet-all.yaml").write_text(base.to_yaml())
    (work / "fleet-cars.yaml").write_text(answering.to_yaml())
    (work / "fleet-load.yaml").write_text(load.to_yaml())
    return work / "fleet-cars.yaml", work / "fleet-load.yaml", ids[:cars]


def sim(port: int, fleet: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "device_sim", "--port", str(port), "--prefix", PREFIX, "--fleet", str(fleet)]
    argv += ["--master-key", MASTER, "--start-hour", "3", "--quiet", *extra]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)


async def measure(args: argparse.Namespace, work: Path, broker: services.Service, influx: services.Service) -> int:
    cars_file, load_file, cars = write_fleets(work, args.cars, 400)
    http_port = services.free_port()
    env = gateway_env(
        broker.port,
        influx.port,
        http_port,
        work / "state",
        GATEWAY__INFLUX__DATABASE="bench",
        GATEWAY__FLEET__FILE=str(work / "fleet-all.yaml"),
        GATEWAY__API__RATE_LIMIT_PER_MIN="1000000",
    )
    procs = [start_gateway(env, http_port)]
    procs.append(sim(broker.port, cars_file, []))
    baseline = Baseline(broker.port, cars)
    link_task = asyncio.create_task(baseline.link.run())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=200)) as http:
            now = datetime.now(UTC)
            for car in cars:
                body = {
                    "vehicle_id": car,
                    "user_id": "bench",
                    "kind": "staff",
                    "starts_at": (now - timedelta(minutes=5)).isoformat(),
                    "ends_at": (now + timedelta(hours=3)).isoformat(),
                }
                async with http.put(f"http://127.0.0.1:{http_port}/v1/reservations/RB-{car}", json=body) as r:
                    assert r.status in (200, 201), await r.text()
            gw = Gateway(http, http_port, cars)
            while not baseline.link.connected:  # noqa: ASYNC110 - the link has no event to wait on
                await asyncio.sleep(0.05)
            await run_workers(10, 100, gw.one)  # warm-up: cars connected, caches and connections open
            await run_workers(10, 100, baseline.one)
            worst = 0.0
            for load in (False, True):
                if load:
                    procs.append(sim(broker.port, load_file, ["--connections", "4", "--rate", str(args.rate)]))
                    await asyncio.sleep(5)  # let the load reach its rate
                print(f"\n{f'under {args.rate} telemetry msg/s' if load else 'idle'}:", flush=True)
                for c in (1, 10, 100):
                    if c > len(cars):
                        continue
                    total = max(args.requests, c * 4)
                    b = await run_workers(c, total, baseline.one)
                    g = await run_workers(c, total, gw.one)
                    print(f"  concurrency {c}:", flush=True)
                    print("    " + b.line("baseline"), flush=True)
                    print("    " + g.line("gateway"), flush=True)
                    print(f"    gateway p99 - baseline p99 = {g.p99 - b.p99:+.2f} ms", flush=True)
                    if load and c == 10:
                        worst = g.p99
                        gap = g.p99 - b.p99
            print(f"\nunder load at concurrency 10: gateway p99 {worst:.2f} ms, {gap:+.2f} ms over the bare round trip")
    finally:
        link_task.cancel()
        await baseline.link.close()
        for p in reversed(procs):
            p.terminate()
            p.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unlock", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="calls per measurement (default 2000)")
    p.add_argument("--cars", type=int, default=100, help="cars answering commands (default 100)")
    p.add_argument("--rate", type=int, default=5000, help="telemetry load in msg/s (default 5000)")
    args = p.parse_args(argv)
    with broker_and_database("unlock") as (work, broker, influx):
        return asyncio.run(measure(args, work, broker, influx))


if __name__ == "__main__":
    sys.exit(main())
