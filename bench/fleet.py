"""Benchmark of the simulated fleet: connect time, memory per car, sustained messages/s.

    python -m bench.fleet [--sizes 1000 10000] [--seconds 8]

Starts its own Mosquitto (scripts/services.py) in a temporary directory. The
machine is noisy, so every figure is also printed as a ratio against a
baseline measured in the same run:

- connect time of N cars  vs  N raw TCP connections to the same broker
  (same concurrency): the MQTT handshake, will, subscription and first four
  messages per car cost this many times a bare TCP connect;
- sustained msgs/s (QoS 1, counted by PUBACK)  vs  one bare paho client
  publishing QoS 1 as fast as it can over one connection.

Each fleet runs in a child process so its resident memory is its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts import services
from scripts.services import service_errors_exit_2

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 256


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


# ---- baselines -----------------------------------------------------------------------------


async def raw_tcp_connect(port: int, n: int) -> float:
    """Seconds to open `n` plain TCP connections to the broker, CONCURRENCY at a time."""
    sem = asyncio.Semaphore(CONCURRENCY)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with sem:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            writers.append(w)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    dt = time.perf_counter() - t0
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return dt


def paho_publisher(port: int, seconds: float) -> float:
    """QoS 1 messages/s that one bare paho client gets acknowledged (paho's own blocking loop, one thread)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-paho")
    c.max_inflight_messages_set(1000)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    payload = json.dumps({"ts": "2026-11-26T09:00:00.123Z", "soc_pct": 81.5, "range_km": 212.0}).encode()
    sent = 0
    t0 = time.perf_counter()
    start_acked = 0
    while time.perf_counter() - t0 < seconds:
        if sent - acked < 1000:
            for _ in range(100):
                c.publish("bench/PAHO-001/battery", payload, qos=1)
                sent += 1
        c.loop(timeout=0.001)
        if time.perf_counter() - t0 < 1.0:  # warm-up second not counted
            start_acked, t1 = acked, time.perf_counter()
    rate = (acked - start_acked) / (time.perf_counter() - t1)
    c.disconnect()
    return rate


# ---- one fleet, in a child process ---------------------------------------------------------


async def worker(port: int, n: int, connections: int, seconds: float) -> dict[str, Any]:
    from device_sim import SimConfig, SimFleet

    rss0 = rss_bytes()
    cfg = SimConfig(port=port, prefix=f"bench{n}x{connections}", vehicles=n, connections=connections, seed=1,
                    master_key="bench-master-key-0123456789", connect_concurrency=CONCURRENCY)  # fmt: skip
    t0 = time.perf_counter()
    async with SimFleet(cfg) as sim:
        await sim.wait_ready(120)
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(2)  # settle: first reports spread over their interval
        rss1 = rss_bytes()
        sent0, t1 = sim.stats.sent, time.perf_counter()
        await asyncio.sleep(seconds / 2)
        telemetry = (sim.stats.sent - sent0) / (time.perf_counter() - t1)
    # now the same fleet pushed as fast as the sockets take it
    cfg = SimConfig(port=port, prefix=f"bench{n}x{connections}", vehicles=n, connections=connections, seed=1,
                    connect_concurrency=CONCURRENCY, rate=float("inf"))  # fmt: skip
    async with SimFleet(cfg) as sim:
        await sim.wait_ready(120)

        def acked() -> int:
            return sum({id(c.client): c.client.acked for c in sim.cars.values() if c.client is not None}.values())

        await asyncio.sleep(1)
        a0, t2 = acked(), time.perf_counter()
        await asyncio.sleep(seconds)
        sustained = (acked() - a0) / (time.perf_counter() - t2)
        connected = sim.stats.connected
    return {
        "cars": n,
        "connected": connected,
        "connect_s": connect_s,
        "rss_per_car_kb": (rss1 - rss0) / n / 1024,
        "rss_mb": rss1 / 2**20,
        "telemetry_msgs_s": telemetry,
        "sustained_msgs_s": sustained,
    }


def run_worker(port: int, n: int, connections: int, seconds: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.fleet", "--worker", str(port), str(n), str(connections), str(seconds)]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    if out.returncode != 0:
        raise RuntimeError(f"worker for {n} cars failed:\n{out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="fleet sizes (default 1000 10000)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each throughput window (default 8)")
    p.add_argument("--mux", type=int, default=8, help="connections for the multiplexed run of the largest fleet")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        port, n, k, secs = int(a.worker[0]), int(a.worker[1]), int(a.worker[2]), float(a.worker[3])
        print(json.dumps(asyncio.run(worker(port, n, k, secs))))
        return 0

    services.raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        broker = services.start_mosquitto(Path(tmp) / "mosquitto")
        try:
            progress(f"mosquitto on port {broker.port}; baseline: one bare paho publisher, QoS 1")
            paho_rate = paho_publisher(broker.port, a.seconds / 2 + 1)
            progress(f"paho baseline {paho_rate:,.0f} msgs/s")
            rows = []
            for n in a.sizes:
                tcp_s = min(asyncio.run(raw_tcp_connect(broker.port, n)) for _ in range(2))  # best of two
                progress(f"{n} raw TCP connects in {tcp_s:.2f} s; now {n} simulated cars, one connection each")
                r = run_worker(broker.port, n, 0, a.seconds)
                r.update(tcp_s=tcp_s, mode="per-car")
                rows.append(r)
                progress(f"{n} cars: connected in {r['connect_s']:.2f} s, {r['sustained_msgs_s']:,.0f} msgs/s")
            n = max(a.sizes)
            progress(f"{n} cars multiplexed over {a.mux} connections")
            r = run_worker(broker.port, n, a.mux, a.seconds)
            r.update(tcp_s=rows[-1]["tcp_s"], mode=f"{a.mux} conns")
            rows.append(r)
        finally:
            broker.stop()
    print(f"\nbaseline: one bare paho client, QoS 1: {paho_rate:,.0f} msgs/s (acknowledged)\n")
    head = (f"{'cars':>6} {'mode':>8} {'conn':>6} {'connect s':>9} {'x raw TCP':>9} {'KiB/car':>8} {'RSS MiB':>8} "
            f"{'telemetry/s':>11} {'max msgs/s':>10} {'x paho':>7}")  # fmt: skip
    print(head)
    for r in rows:
        print(
            f"{r['cars']:>6} {r['mode']:>8} {r['connected']:>6} {r['connect_s']:>9.2f} "
            f"{r['connect_s'] / r['tcp_s']:>9.1f} {r['rss_per_car_kb']:>8.1f} {r['rss_mb']:>8.0f} "
            f"{r['telemetry_msgs_s']:>11.0f} {r['sustained_msgs_s']:>10.0f} {r['sustained_msgs_s'] / paho_rate:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
