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
    python -m bench.unlock --instances 2 --store postgresql

Prints p50/p95/p99 latency and requests/s for each, and the gateway's p99
minus the baseline's.

With ``--instances N`` (N > 1) or ``--store postgresql``, the same run
measures two setups one after the other, with the same broker, InfluxDB
and answering cars: first the single gateway on its SQLite file, then N
gateways (gw1, gw2, ...) on one PostgreSQL the bench starts in its
temporary directory, splitting the cars' traffic through the MQTT shared
subscription group ``g``, each with its own state dir, HTTP port and client
id; successive requests alternate between the instances' HTTP ports. Each
setup gets the idle and the loaded rounds (its own load simulator), and
the p99s under load are printed side by side at the end. In this mode every
gateway's MQTT session ends with its connection (``session_expiry_s`` 0),
so that a stopped gateway's session does not keep queueing the next
setup's load in the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import (
    API_KEY,
    MASTER,
    REPO,
    broker_and_database,
    create_pg_database,
    percentile,
    postgres_if,
    start_gateways,
    stop_all,
)
from gateway.fleet import Fleet, load_fleet
from gateway.mqtt.codec import Message
from gateway.mqtt.link import MqttLink
from gateway.rules.commands import build_command
from gateway.settings import MqttSettings
from scripts import services
from scripts.postgresql import PostgresService
from scripts.services import service_errors_exit_2

PREFIX = "fleet"


@dataclass
class Result:
    latencies_ms: list[float]
    seconds: float
    errors: int

    def line(self, name: str) -> str:
        p50, p95, p99 = (percentile(self.latencies_ms, q) for q in (50, 95, 99))
        rate = len(self.latencies_ms) / self.seconds
        return (
            f"{name:9s} p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  p99 {p99:6.2f} ms  {rate:7.0f} req/s"
            f"  errors {self.errors}"
        )

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


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
    """Calls the gateway's HTTP API; with several instances' ports, successive calls alternate between them."""

    def __init__(self, http: aiohttp.ClientSession, ports: list[int], cars: list[str]) -> None:
        self.http = http
        self.bases = [f"http://127.0.0.1:{port}" for port in ports]
        self.turn = itertools.cycle(self.bases)
        self.cars = cars

    async def one(self, w: int, action: str) -> bool:
        car = self.cars[w]
        base = next(self.turn)
        async with self.http.post(f"{base}/v1/vehicles/{car}/{action}", json={"reservation_id": f"RB-{car}"}) as r:
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


@dataclass
class Setup:
    """The gateways of one measurement: how many, on which store, in which shared group."""

    label: str
    instances: int
    database: str  # InfluxDB's, and PostgreSQL's if `store_url`
    store_url: str | None = None
    group: str | None = None


async def measure(
    args: argparse.Namespace,
    work: Path,
    broker: services.Service,
    influx: services.Service,
    pg: PostgresService | None = None,
) -> int:
    cars_file, load_file, cars = write_fleets(work, args.cars, 400)
    multi = args.instances > 1 or args.store == "postgresql"
    setups = [Setup("1 gw sqlite", 1, "bench")]
    extra = {"GATEWAY__FLEET__FILE": str(work / "fleet-all.yaml"), "GATEWAY__API__RATE_LIMIT_PER_MIN": "1000000"}
    if multi:
        store_url = create_pg_database(pg, "bench_shared") if pg is not None else None
        group = "g" if args.instances > 1 else None
        setups.append(Setup(f"{args.instances} gw {args.store}", args.instances, "bench_shared", store_url, group))
        extra["GATEWAY__MQTT__SESSION_EXPIRY_S"] = "0"
    procs = [sim(broker.port, cars_file, [])]
    baseline = Baseline(broker.port, cars)
    link_task = asyncio.create_task(baseline.link.run())
    headers = {"Authorization": f"Bearer {API_KEY}"}
    loaded: dict[str, dict[int, tuple[Result, Result]]] = {}  # setup -> concurrency -> (baseline, gateway)
    try:
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=200)) as http:
            while not baseline.link.connected:  # noqa: ASYNC110 - the link has no event to wait on
                await asyncio.sleep(0.05)
            for setup in setups:
                if multi:
                    print(f"\n=== {setup.label} ===", flush=True)
                loaded[setup.label] = await measure_setup(
                    args, work, broker, influx, setup, extra, http, baseline, cars, load_file
                )
    finally:
        link_task.cancel()
        await baseline.link.close()
        stop_all(procs)
    for label, by_c in loaded.items():
        if 10 in by_c:
            b, g = by_c[10]
            print(
                f"\n{f'{label}: ' if multi else ''}under load at concurrency 10: gateway p99 {g.p99:.2f} ms, "
                f"{g.p99 - b.p99:+.2f} ms over the bare round trip"
            )
    if multi:
        print(f"\nunder {args.rate} telemetry msg/s, gateway p99 (minus the bare round trip's):")
        print("  concurrency  " + "".join(f"{label:>28s}" for label in loaded))
        for c in sorted(next(iter(loaded.values()))):
            cells = []
            for by_c in loaded.values():
                b, g = by_c[c]
                cells.append(f"{g.p99:9.2f} ms ({g.p99 - b.p99:+7.2f} ms)")
            print(f"  {c:11d}  " + "".join(f"{cell:>28s}" for cell in cells))
    return 0


async def measure_setup(
    args: argparse.Namespace,
    work: Path,
    broker: services.Service,
    influx: services.Service,
    setup: Setup,
    extra: dict[str, str],
    http: aiohttp.ClientSession,
    baseline: Baseline,
    cars: list[str],
    load_file: Path,
) -> dict[int, tuple[Result, Result]]:
    """Idle, then loaded rounds through `setup`'s gateways; the loaded (baseline, gateway) results per concurrency."""
    procs, ports = await asyncio.to_thread(  # it waits for each gateway: keep the baseline's link served meanwhile
        start_gateways,
        broker.port,
        influx.port,
        work / ("state" if setup.instances == 1 and setup.store_url is None else f"state-{setup.database}"),
        "fleet-gateway",
        setup.instances,
        setup.store_url,
        setup.group,
        GATEWAY__INFLUX__DATABASE=setup.database,
        **extra,
    )
    out: dict[int, tuple[Result, Result]] = {}
    try:
        now = datetime.now(UTC)
        for car in cars:
            body = {
                "vehicle_id": car,
                "user_id": "bench",
                "kind": "staff",
                "starts_at": (now - timedelta(minutes=5)).isoformat(),
                "ends_at": (now + timedelta(hours=3)).isoformat(),
            }
            async with http.put(f"http://127.0.0.1:{ports[0]}/v1/reservations/RB-{car}", json=body) as r:
                assert r.status in (200, 201), await r.text()
        gw = Gateway(http, ports, cars)
        await run_workers(10, 100, gw.one)  # warm-up: cars connected, caches and connections open
        await run_workers(10, 100, baseline.one)
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
                if load:
                    out[c] = (b, g)
    finally:
        stop_all(procs)
    return out


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unlock", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="calls per measurement (default 2000)")
    p.add_argument("--cars", type=int, default=100, help="cars answering commands (default 100)")
    p.add_argument("--rate", type=int, default=5000, help="telemetry load in msg/s (default 5000)")
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="gateways in one MQTT shared group, measured after the single SQLite gateway in the same run; "
        "requests alternate between their HTTP ports (default 1: the single gateway only)",
    )
    p.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="store of those gateways (default sqlite, for one instance only): postgresql is started by the "
        "bench in its temporary directory; with postgresql, even one instance is measured besides the SQLite one",
    )
    args = p.parse_args(argv)
    if args.instances < 1:
        p.error("--instances must be at least 1")
    if args.instances > 1 and args.store == "sqlite":
        p.error("several instances need a shared store: --store postgresql")
    with (
        broker_and_database("unlock") as (work, broker, influx),
        postgres_if(args.store == "postgresql", work / "postgres") as pg,
    ):
        return asyncio.run(measure(args, work, broker, influx, pg))


if __name__ == "__main__":
    sys.exit(main())
