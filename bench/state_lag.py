"""How far behind the other gateways answer ``GET /v1/vehicles``, against the one that heard the car, in one run.

Starts Mosquitto, InfluxDB and PostgreSQL, then ``--instances`` gateways
(gw1, gw2, ...) on one PostgreSQL database, splitting the cars' traffic
through the MQTT shared subscription group ``g``, and a simulator
publishing ``--rate`` telemetry messages/s for 400 other cars (the load the
unlock benchmark uses). Then, ``--samples`` times, one car of the fleet
(rotating over ``--sample-cars`` cars nobody else publishes for) sends one
battery reading with a new state of charge, at QoS 1, from an MQTT client
in this process, and every instance's ``GET /v1/vehicles/{id}`` is polled
every ``--poll-ms`` until it shows that reading.

* baseline: the first instance to show it, the one the broker handed the
  message to (MQTT, validation and the HTTP answer within one process);
* other instances: the last instance to show it, the reading having gone
  through the store (written by one instance's state sync, read by the
  other's: ``ha.state_sync_s`` each).

    python -m bench.state_lag [--instances 2] [--samples 60] [--rate 5000]

Prints p50/p95/p99/max of both, the other instances' p99 over the
baseline's, and how many samples were later than the contract's 1 s
("at most 1 s behind"). Exits 1 if a sample never showed on every instance.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from bench.common import (
    API_KEY,
    broker_and_database,
    create_pg_database,
    percentile,
    postgres_if,
    start_gateways,
    stop_all,
)
from bench.unlock import PREFIX, sim, write_fleets
from gateway.mqtt.link import MqttLink
from gateway.settings import HaSettings, MqttSettings
from scripts import services
from scripts.postgresql import PostgresService
from scripts.services import service_errors_exit_2

PROMISE_S = 1.0  # CONTRACT.md, "Several gateways, one fleet"
SAMPLE_TIMEOUT_S = 10.0


def quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {"max": max(values)}


def line(name: str, values_s: list[float]) -> str:
    q = quantiles(values_s)
    return f"{name:>16s}: " + "  ".join(f"{k} {v * 1000:7.1f} ms" for k, v in q.items())


async def shown_after(http: aiohttp.ClientSession, base: str, car: str, soc: float, t0: float, poll_s: float) -> float:
    """Seconds from `t0` until the instance at `base` shows `car` at `soc` %."""
    while True:
        async with http.get(f"{base}/v1/vehicles/{car}") as r:
            doc = orjson.loads(await r.read())
        battery = doc.get("battery") or {}
        if battery.get("soc_pct") == soc:
            return time.perf_counter() - t0
        await asyncio.sleep(poll_s)


async def measure(args: argparse.Namespace, work: Path, broker: services.Service, influx: services.Service,
                  pg: PostgresService) -> int:  # fmt: skip
    _, load_file, cars = write_fleets(work, args.sample_cars, 400)
    procs, ports = await asyncio.to_thread(
        start_gateways,
        broker.port,
        influx.port,
        work / "state",
        "fleet-gateway",
        args.instances,
        create_pg_database(pg, "bench_lag"),
        "g",
        GATEWAY__FLEET__FILE=str(work / "fleet-all.yaml"),
        GATEWAY__INFLUX__DATABASE="bench",
        GATEWAY__MQTT__SESSION_EXPIRY_S="0",
        GATEWAY__HA__STATE_SYNC_S=str(args.sync_s),
    )
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    settings = MqttSettings(port=broker.port, client_id="bench-state-lag", session_expiry_s=0, topic_prefix=PREFIX)
    link = MqttLink(settings, lambda m, t: None, [], auto_ack=True)
    link_task = asyncio.create_task(link.run())
    first: list[float] = []
    last: list[float] = []
    missing = 0
    rng = random.Random(7)
    try:
        if args.rate:
            procs.append(sim(broker.port, load_file, ["--connections", "4", "--rate", str(args.rate)]))
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            while not link.connected:  # noqa: ASYNC110 - the link has no event to wait on
                await asyncio.sleep(0.05)
            await asyncio.sleep(5)  # let the load reach its rate
            print(
                f"{args.instances} gateways on PostgreSQL, ha.state_sync_s {args.sync_s}, under {args.rate} "
                f"telemetry msg/s; {args.samples} samples over {len(cars)} cars",
                flush=True,
            )
            previous: dict[str, float] = {}
            for i in range(args.warmup + args.samples):
                car = cars[i % len(cars)]
                soc = previous.get(car)
                while soc == previous.get(car):  # the car's value before would show at once
                    soc = round(5 + 90 * rng.random(), 1)
                assert soc is not None
                previous[car] = soc
                doc = {"ts": int(time.time() * 1000), "soc_pct": soc, "range_km": 42.0}
                t0 = time.perf_counter()
                link.publish(f"{PREFIX}/{car}/battery", orjson.dumps(doc), 1, 10)
                polls = [shown_after(http, b, car, soc, t0, args.poll_ms / 1000) for b in bases]
                try:
                    async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                        took = await asyncio.gather(*polls)
                except TimeoutError:
                    missing += 1
                    print(f"  sample {i}: {car} at {soc} % not shown everywhere within {SAMPLE_TIMEOUT_S:.0f} s")
                    continue
                if i >= args.warmup:
                    first.append(min(took))
                    last.append(max(took))
                    n = len(first)
                    if n % 20 == 0 or n == args.samples:
                        print(f"  {n}/{args.samples} samples, last one {max(took) * 1000:.0f} ms", flush=True)
                await asyncio.sleep(args.gap * (0.5 + rng.random()))
    finally:
        link_task.cancel()
        await link.close()
        stop_all(procs)
    if len(first) < 2:
        print("too few samples to report", file=sys.stderr)
        return 1
    print()
    print(line("baseline", first))
    print(line("other instances", last))
    ratio = quantiles(last)["p99"] / quantiles(first)["p99"]
    late = sum(t > PROMISE_S for t in last)
    print(f"other instances p99 / baseline p99 = {ratio:.1f}x")
    print(f"later than {PROMISE_S:.0f} s on some instance: {late} of {len(last)} samples; never shown: {missing}")
    return 1 if missing else 0


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.state_lag",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:4]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--instances", type=int, default=2, help="gateways sharing one PostgreSQL (default 2)")
    p.add_argument("--samples", type=int, default=60, help="readings measured (default 60)")
    p.add_argument("--warmup", type=int, default=3, help="readings sent first and not counted (default 3)")
    p.add_argument("--sample-cars", type=int, default=10, help="cars the samples rotate over (default 10)")
    p.add_argument("--rate", type=int, default=5000, help="background telemetry in msg/s, 0 for none (default 5000)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between samples, 0.5x to 1.5x (default 0.3)")
    p.add_argument("--poll-ms", type=float, default=10, help="each instance is asked this often (default 10)")
    sync_s = HaSettings().state_sync_s
    p.add_argument(
        "--sync-s", type=float, default=sync_s, help=f"ha.state_sync_s of the gateways (default {sync_s}, theirs)"
    )
    args = p.parse_args(argv)
    if args.instances < 2:
        p.error("--instances: at least 2 (the lag is between instances)")
    if args.samples < 2 or args.sample_cars < 1:
        p.error("--samples: at least 2; --sample-cars: at least 1")
    if not 0 < args.sync_s <= 60 or args.poll_ms <= 0 or args.rate < 0:
        p.error("--sync-s: above 0 and at most 60 (ha.state_sync_s); --poll-ms above 0; --rate at least 0")
    with (
        broker_and_database("state-lag") as (work, broker, influx),
        postgres_if(True, work / "postgres") as pg,
    ):
        assert pg is not None
        return asyncio.run(measure(args, work, broker, influx, pg))


if __name__ == "__main__":
    sys.exit(main())
