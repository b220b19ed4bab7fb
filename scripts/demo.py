"""The main job: broker, database, gateway and simulated fleet, with a live summary.

Starts Mosquitto and InfluxDB on loopback unless something already listens
on their ports, then the gateway and the simulated reference fleet, and
prints one summary line every two seconds until Ctrl-C (or ``--duration``).
Then it stops what it started, and only that.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts import services

REPO = Path(__file__).resolve().parent.parent
DEMO_MASTER_KEY = "demo-master-key-not-for-production"
DEMO_API_KEY = "demo-api-key-not-for-production"


def read_metrics(port: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            out[base] = out.get(base, 0.0) + float(value)
    return out


def read_trips(port: int, since: str) -> list[dict[str, object]]:
    """The trips started since the demo began, through the booking API like any client."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/trips?limit=5000&from={urllib.parse.quote(since)}",
        headers={"Authorization": f"Bearer {DEMO_API_KEY}"},
    )
    with urllib.request.urlopen(req, timeout=2) as r:
        return list(json.load(r)["trips"])


def summary(m: dict[str, float], prev: dict[str, float], dt: float, total: int, trips: list[dict[str, Any]]) -> str:
    rate = (m.get("gateway_messages_received_total", 0) - prev.get("gateway_messages_received_total", 0)) / dt
    ended = [t for t in trips if t.get("ended_at")]
    revenue = sum(float(t.get("amount_eur") or 0) for t in ended)
    return (
        f"{rate:6.0f} msg/s | stored {m.get('gateway_points_written_total', 0):7.0f}"
        f" | rejected {m.get('gateway_messages_rejected_total', 0):4.0f}"
        f" | online {m.get('gateway_vehicles_online', 0):.0f}/{total}"
        f" | trips {len(trips) - len(ended)} driving, {len(ended)} ended"
        f" ({sum(t.get('kind') == 'staff' for t in ended)} staff) | revenue {revenue:6.2f} EUR"
        f" | queue {m.get('gateway_queue_depth', 0):.0f}"
        f" | influx {'ok' if m.get('gateway_influx_healthy') else 'FAILING'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/run.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--vehicles", type=int, default=29, help="simulated cars (default: the 29 of the reference fleet)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated time runs this many times faster (default 60)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--influx-port", type=int, default=8086)
    args = p.parse_args(argv)

    run_dir = REPO / ".run"
    run_dir.mkdir(exist_ok=True)
    started: list[services.Service] = []
    children: list[subprocess.Popen[bytes]] = []
    fleet_file = REPO / "config" / "fleet.yaml"
    try:
        for name, port, start in (
            ("mosquitto", args.mqtt_port, services.start_mosquitto),
            ("influxd", args.influx_port, services.start_influxd),
        ):
            if services.port_open(port):
                print(f"{name}: already listening on {port}, using it")
            else:
                svc = start(run_dir / name, port)
                started.append(svc)
                print(f"{name}: started on 127.0.0.1:{port} (logs in {svc.workdir})")
        env = dict(os.environ)
        env.update(
            GATEWAY__MQTT__PORT=str(args.mqtt_port),
            GATEWAY__INFLUX__URL=f"http://127.0.0.1:{args.influx_port}",
            GATEWAY__HTTP__PORT=str(args.http_port),
            GATEWAY__STATE__DIR=str(run_dir / "state"),
            GATEWAY__COMMANDS__MASTER_KEY=DEMO_MASTER_KEY,
            GATEWAY__API__KEYS=f"demo:{DEMO_API_KEY}",
        )
        if args.vehicles != 29:
            fleet_file = run_dir / f"fleet-{args.vehicles}.yaml"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "device_sim",
                    "--write-fleet",
                    str(fleet_file),
                    "--vehicles",
                    str(args.vehicles),
                ],
                check=True,
                cwd=REPO,
            )
        env["GATEWAY__FLEET__FILE"] = str(fleet_file)
        children.append(_spawn("gateway", [sys.executable, "-m", "gateway"], env, run_dir))
        sim_argv = [sys.executable, "-m", "device_sim", "--host", "127.0.0.1", "--port", str(args.mqtt_port)]
        sim_argv += ["--vehicles", str(args.vehicles), "--speed", str(args.speed), "--fleet", str(fleet_file)]
        # The booking day: renters book, drive and return the cars through the API, from a Monday at 7:30.
        sim_argv += [
            "--renters",
            f"http://127.0.0.1:{args.http_port}",
            "--api-key",
            DEMO_API_KEY,
            "--start-hour",
            "7.5",
        ]
        children.append(_spawn("device_sim", sim_argv, env, run_dir))
        print(f"gateway: http://127.0.0.1:{args.http_port} (API key {DEMO_API_KEY}); logs in .run/gateway.log")
        print(f"fleet: {args.vehicles} simulated cars at {args.speed:g}x; logs in .run/device_sim.log")
        print("Ctrl-C to stop.")
        return _watch(args, children)
    except KeyboardInterrupt:
        return 0
    except services.ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
        for svc in reversed(started):
            svc.stop()
        print("\nstopped everything this run started")


def _spawn(name: str, argv: list[str], env: dict[str, str], run_dir: Path) -> subprocess.Popen[bytes]:
    with open(run_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)


def _watch(args: argparse.Namespace, children: list[subprocess.Popen[bytes]]) -> int:
    t_start = time.monotonic()
    since = datetime.now(UTC).isoformat(timespec="seconds")
    prev: dict[str, float] = {}
    t_prev = time.monotonic()
    while not args.duration or time.monotonic() - t_start < args.duration:
        time.sleep(2)
        for name, child in zip(("gateway", "device_sim"), children, strict=False):
            if child.poll() is not None:
                print(f"\n{name} exited with {child.returncode}; see .run/{name}.log", file=sys.stderr)
                return 1
        try:
            m = read_metrics(args.http_port)
            trips = read_trips(args.http_port, since)
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            print("\rwaiting for the gateway ...", end="", flush=True)
            continue
        now = time.monotonic()
        line = summary(m, prev, now - t_prev, args.vehicles, trips)
        print(f"\r[{now - t_start:5.0f} s] {line}", end="" if sys.stdout.isatty() else "\n", flush=True)
        prev, t_prev = m, now
    return 0


if __name__ == "__main__":
    sys.exit(main())
