"""The main job: broker, database, gateway and simulated fleet, with a live summary.

Starts Mosquitto and InfluxDB on loopback unless something already listens
on their ports, then the gateway and the simulated reference fleet, and
prints one summary line every two seconds until Ctrl-C (or ``--duration``).
Then it stops what it started, and only that.

Incidents: every ``--incidents`` seconds the simulator gives a parked car
one of the alert conditions and clears it ``--incident-hold`` seconds later
(device_sim/incidents.py); the gateway's alert thresholds are shortened to
fit, unless set in the environment. ``--webhook URL`` sends every event
there, signed with ``--webhook-secret``; ``kill -USR1 $(cat
.run/device_sim.pid)`` plays a moved_without_trip at once.

Several gateways: ``--instances N`` (N >= 2) also starts a private PostgreSQL
(in .run/postgres, removed at the end) and N gateways on ``--http-port``,
+1, ..., named gw1, gw2, ..., all on that database and in one MQTT shared
subscription group, so that the broker splits the cars' messages between
them (docs/operations.md, "Several gateways, one fleet"). The cars and the
renters talk to the first; the summary shows each one's share.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts import services
from scripts.postgresql import start_postgres

REPO = Path(__file__).resolve().parent.parent
DEMO_MASTER_KEY = "demo-master-key-not-for-production"
DEMO_API_KEY = "demo-api-key-not-for-production"
# whsec_ + base64 of 32 bytes, like a real one; fixed so that a receiver started earlier keeps working.
DEMO_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"demo-webhook-secret-not-for-prod").decode()
PID_FILE = "device_sim.pid"  # in .run/
RUN_DIR = REPO / ".run"
# The MQTT shared subscription group of --instances N >= 2 ($share/demo/fleet/...).
SHARED_GROUP = "demo"
MAX_INSTANCES = 16


def read_metrics(port: int) -> tuple[dict[str, float], dict[str, float]]:
    """Every metric summed by name, and the public bookings staff displaced, by action."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return parse_metrics(text), labelled(text, "gateway_reservations_displaced_total", "action")


def labelled(text: str, name: str, label: str) -> dict[str, float]:
    """One labelled family's samples by the value of `label`: ``{"reassigned": 3.0, …}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            key = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[key] = float(line.rpartition(" ")[2])
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {metric name: value}; a labelled metric's series are summed under its bare name
    (``gateway_alerts_open{type="…"}`` → ``gateway_alerts_open``, every type together)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
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


def summary(
    m: dict[str, float],
    prev: dict[str, float],
    dt: float,
    total: int,
    trips: list[dict[str, Any]],
    displaced: dict[str, float] | None = None,
    shares: list[tuple[str, float]] | None = None,
) -> str:
    """One line; `shares` is each instance's received messages per second, when there are several."""
    displaced = displaced or {}
    rate = (m.get("gateway_messages_received_total", 0) - prev.get("gateway_messages_received_total", 0)) / dt
    ended = [t for t in trips if t.get("ended_at")]
    revenue = sum(float(t.get("amount_eur") or 0) for t in ended)
    return (
        f"{rate:6.0f} msg/s | stored {m.get('gateway_points_written_total', 0):7.0f}"
        f" | rejected {m.get('gateway_messages_rejected_total', 0):4.0f}"
        f" | online {m.get('gateway_vehicles_online', 0):.0f}/{total}"
        f" | trips {len(trips) - len(ended)} driving, {len(ended)} ended"
        f" ({sum(t.get('kind') == 'staff' for t in ended)} staff) | revenue {revenue:6.2f} EUR"
        f" | staff moved {displaced.get('reassigned', 0):.0f}, bumped {displaced.get('cancelled', 0):.0f}"
        f" | alerts {m.get('gateway_alerts_open', 0):.0f}"
        f" | queue {m.get('gateway_queue_depth', 0):.0f}"
        f" | influx {'ok' if m.get('gateway_influx_healthy') else 'FAILING'}"
        + (" | " + ", ".join(f"{name} {r:.0f}" for name, r in shares) + " msg/s" if shares else "")
    )


def combine(per_instance: list[dict[str, float]]) -> dict[str, float]:
    """Several gateways' metrics as one: counters (``…_total``) summed, gauges the highest
    (each instance sees every car and evaluates every alert), Influx healthy only if all are."""
    out: dict[str, float] = {}
    for m in per_instance:
        for name, value in m.items():
            if name not in out:
                out[name] = value
            elif name.endswith("_total"):
                out[name] += value
            elif name == "gateway_influx_healthy":
                out[name] = min(out[name], value)
            else:
                out[name] = max(out[name], value)
    return out


def received_rate(m: dict[str, float], prev: dict[str, float], dt: float) -> float:
    name = "gateway_messages_received_total"
    return (m.get(name, 0) - prev.get(name, 0)) / dt


def _seconds(v: str) -> float:
    f = float(v)
    if not 0 <= f < float("inf"):
        raise argparse.ArgumentTypeError("a number of seconds, 0 or more")
    return f


def _hold(v: str) -> float:
    f = _seconds(v)
    if f <= 0:
        raise argparse.ArgumentTypeError("more than 0 seconds")
    return f


def _url(v: str) -> str:
    if not v.startswith(("http://", "https://")) or any(c.isspace() for c in v):
        raise argparse.ArgumentTypeError("an http:// or https:// URL")
    return v


def _secret(v: str) -> str:
    try:
        raw = base64.b64decode(v.removeprefix("whsec_"), validate=True)
    except ValueError:
        raw = b""
    if not v.startswith("whsec_") or not 24 <= len(raw) <= 64:
        raise argparse.ArgumentTypeError("whsec_ followed by base64 of 24 to 64 random bytes")
    return v


def _instances(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_INSTANCES:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {MAX_INSTANCES}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/run.sh",
        description=__doc__.split("\n\n")[0],
        epilog="A receiver for --webhook: python -m device_sim.receiver --port 9000 --secret <the secret>",
    )
    p.add_argument("--vehicles", type=int, default=29, help="simulated cars (default: the 29 of the reference fleet)")
    p.add_argument("--speed", type=float, default=60.0, help="simulated time runs this many times faster (default 60)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--http-port", type=_port, default=8080,
                   help="the (first) gateway's HTTP port (default 8080); --instances N: N ports from it")  # fmt: skip
    p.add_argument("--mqtt-port", type=_port, default=1883)
    p.add_argument("--influx-port", type=_port, default=8086)
    p.add_argument("--webhook", action="append", default=[], type=_url, metavar="URL",
                   help="an operator's endpoint that receives every event (repeatable)")  # fmt: skip
    p.add_argument("--webhook-secret", type=_secret, default=DEMO_WEBHOOK_SECRET, metavar="WHSEC",
                   help="the endpoints' signing secret (default: a fixed demo secret, printed at start)")  # fmt: skip
    p.add_argument("--incidents", type=_seconds, default=120.0, metavar="S",
                   help="an alert condition on a parked car every S seconds (default 120; 0: none)")  # fmt: skip
    p.add_argument("--incident-hold", type=_hold, default=60.0, metavar="S",
                   help="seconds each incident lasts before it is cleared (default 60)")  # fmt: skip
    p.add_argument("--instances", type=_instances, default=1, metavar="N",
                   help="gateways sharing the fleet (default 1). With N >= 2: a private PostgreSQL as their store,"
                        " HTTP on --http-port, +1, ..., instances gw1..gwN, one MQTT shared group"
                        f" ({SHARED_GROUP!r}) that splits the cars' messages; cars and renters use the first;"
                        " the once-only work (start-time unlocks, automatic ends, alert checks, webhooks) runs"
                        " on whichever holds the lease")  # fmt: skip
    return p


def instance_name(index: int) -> str:
    """gw1, gw2, …: gw1's MQTT client id is fleet-gateway, the others' fleet-gateway-<name>."""
    return f"gw{index + 1}"


def gateway_envs(
    args: argparse.Namespace, env: dict[str, str], run_dir: Path, store_url: str | None = None
) -> list[dict[str, str]]:
    """The environment of each of the ``--instances`` gateways, from the demo's common `env`.

    One instance: `env` itself, as before. Several: each its own instance name, HTTP port and
    state dir (journal), all on `store_url` and in one shared subscription group.
    """
    if args.instances == 1:
        return [dict(env)]
    if store_url is None:
        raise ValueError("several gateways need a store URL (PostgreSQL)")
    out = []
    for i in range(args.instances):
        name = instance_name(i)
        e = dict(env)
        e.update(
            GATEWAY__INSTANCE=name,
            GATEWAY__HTTP__PORT=str(args.http_port + i),
            GATEWAY__STATE__DIR=str(run_dir / ("state" if i == 0 else f"state-{name}")),
            GATEWAY__STORE__URL=store_url,
            GATEWAY__MQTT__SHARED_GROUP=SHARED_GROUP,
        )
        e.pop("GATEWAY__MQTT__CLIENT_ID", None)  # derived from the instance, distinct for each
        out.append(e)
    return out


def log_name(index: int) -> str:
    """gateway (.run/gateway.log) for the first, gateway-gw2, … for the others."""
    return "gateway" if index == 0 else f"gateway-{instance_name(index)}"


def webhook_endpoints(urls: list[str], secret: str) -> str:
    """``GATEWAY__WEBHOOKS__ENDPOINTS``: every event to every URL."""
    return json.dumps([{"url": u, "secret": secret, "types": ["*"]} for u in urls])


def alert_thresholds(speed: float, hold_s: float) -> dict[str, str]:
    """Alert thresholds short enough for an incident held `hold_s` to open its alert: a third of the hold.
    Silence waits at least five battery reports of a parked car (one a minute, simulated)."""
    third = max(1, round(hold_s / 3))
    return {
        "GATEWAY__ALERTS__UNATTENDED_AFTER_S": str(third),
        "GATEWAY__ALERTS__CHARGING_FAULT_AFTER_S": str(third),
        "GATEWAY__ALERTS__SILENT_AFTER_S": str(max(third, math.ceil(5 * 60 / speed))),
    }


def sim_command(args: argparse.Namespace, fleet_file: Path, pid_file: Path) -> list[str]:
    argv = [sys.executable, "-m", "device_sim", "--host", "127.0.0.1", "--port", str(args.mqtt_port)]
    argv += ["--vehicles", str(args.vehicles), "--speed", str(args.speed), "--fleet", str(fleet_file)]
    # The booking day: renters book, drive and return the cars through the API, from a Monday at 7:30.
    argv += ["--renters", f"http://127.0.0.1:{args.http_port}", "--api-key", DEMO_API_KEY, "--start-hour", "7.5"]
    argv += ["--pid-file", str(pid_file)]
    if args.incidents:
        argv += ["--incidents", f"{args.incidents:g}", "--incident-hold", f"{args.incident_hold:g}"]
    return argv


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port}: a port is from 1 to 65535")
    return port


@services.service_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.http_port <= 65536 - args.instances:
        parser.error(f"--http-port: {args.instances} port(s) from it must fit below 65536")
    if threading.current_thread() is threading.main_thread():
        # A SIGTERM or a closed terminal stops the run as Ctrl-C does, so what it started is stopped too.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)

    run_dir = RUN_DIR
    run_dir.mkdir(exist_ok=True)
    started: list[services.Service] = []
    children: list[subprocess.Popen[bytes]] = []
    fleet_file = REPO / "config" / "fleet.yaml"
    try:
        for i in range(args.instances):  # checked first: else a taken port passes for a gateway that answers
            if services.port_open(args.http_port + i):
                raise services.ServiceError(f"port {args.http_port + i} is taken; choose another --http-port")
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
        store_url: str | None = None
        if args.instances > 1:
            pg = start_postgres(run_dir / "postgres")
            started.append(pg)
            store_url = pg.url
            print(f"postgres: started on 127.0.0.1:{pg.port} for {args.instances} gateways (removed at the end)")
        env = dict(os.environ)
        env.update(
            GATEWAY__MQTT__PORT=str(args.mqtt_port),
            GATEWAY__INFLUX__URL=f"http://127.0.0.1:{args.influx_port}",
            GATEWAY__HTTP__PORT=str(args.http_port),
            GATEWAY__STATE__DIR=str(run_dir / "state"),
            GATEWAY__COMMANDS__MASTER_KEY=DEMO_MASTER_KEY,
            GATEWAY__API__KEYS=f"demo:{DEMO_API_KEY}",
        )
        if args.webhook:
            env["GATEWAY__WEBHOOKS__ENDPOINTS"] = webhook_endpoints(args.webhook, args.webhook_secret)
        # A day's notice for cancelling a public booking, in the demo's time: at 60x, 24 real minutes.
        env.setdefault("GATEWAY__BOOKING__PREEMPT_NOTICE_S", str(round(86400 / args.speed)))
        if args.incidents:
            for name, value in alert_thresholds(args.speed, args.incident_hold).items():
                env.setdefault(name, value)  # the user's own setting wins
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
        names: list[str] = []
        for i, gw_env in enumerate(gateway_envs(args, env, run_dir, store_url)):
            names.append(log_name(i))
            children.append(_spawn(names[-1], [sys.executable, "-m", "gateway"], gw_env, run_dir))
            # The renters check the API before the fleet starts; the first gateway migrates the schema.
            _wait_gateway(children[-1], args.http_port + i, log=names[-1])
        pid_file = run_dir / PID_FILE
        names.append("device_sim")
        children.append(_spawn("device_sim", sim_command(args, fleet_file, pid_file), env, run_dir))
        for i in range(args.instances):
            name = f"gateway {instance_name(i)}" if args.instances > 1 else "gateway"
            print(f"{name}: http://127.0.0.1:{args.http_port + i} (API key {DEMO_API_KEY});"
                  f" logs in .run/{log_name(i)}.log")  # fmt: skip
        if args.instances > 1:
            print(f"  one MQTT shared group {SHARED_GROUP!r}, one PostgreSQL; cars and renters use the first")
        print(f"fleet: {args.vehicles} simulated cars at {args.speed:g}x; logs in .run/device_sim.log")
        if args.incidents:
            print(
                f"incidents: an alert condition every {args.incidents:g} s, cleared after {args.incident_hold:g} s"
                f" (alerts open after: unattended {env['GATEWAY__ALERTS__UNATTENDED_AFTER_S']} s, charging fault"
                f" {env['GATEWAY__ALERTS__CHARGING_FAULT_AFTER_S']} s, silent {env['GATEWAY__ALERTS__SILENT_AFTER_S']}"
                " s); see .run/device_sim.log"
            )
        if args.webhook:
            port = urllib.parse.urlsplit(args.webhook[0]).port or 9000
            print(f"webhooks: every event to {', '.join(args.webhook)}, secret {args.webhook_secret}")
            print(f"  a receiver: python -m device_sim.receiver --port {port} --secret {args.webhook_secret}")
            print(f"  an incident now: kill -USR1 $(cat .run/{PID_FILE})")
        print("Ctrl-C to stop.")
        return _watch(args, children, names)
    except KeyboardInterrupt:
        return 0
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _wait_gateway(proc: subprocess.Popen[bytes], port: int, timeout: float = 60.0, log: str = "gateway") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise services.ServiceError(f"the gateway exited with {proc.returncode}; see .run/{log}.log")
        if services.port_open(port):
            return
        time.sleep(0.1)
    raise services.ServiceError(f"the gateway did not open port {port} within {timeout:.0f} s; see .run/{log}.log")


def _spawn(name: str, argv: list[str], env: dict[str, str], run_dir: Path) -> subprocess.Popen[bytes]:
    with open(run_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)


def _watch(args: argparse.Namespace, children: list[subprocess.Popen[bytes]], names: list[str]) -> int:
    t_start = time.monotonic()
    since = datetime.now(UTC).isoformat(timespec="seconds")
    prev: list[dict[str, float]] = [{} for _ in range(args.instances)]
    t_prev = time.monotonic()
    while not args.duration or time.monotonic() - t_start < args.duration:
        time.sleep(2)
        for name, child in zip(names, children, strict=True):
            if child.poll() is not None:
                print(f"\n{name} exited with {child.returncode}; see .run/{name}.log", file=sys.stderr)
                return 1
        try:
            read = [read_metrics(args.http_port + i) for i in range(args.instances)]
            trips = read_trips(args.http_port, since)  # one store: every gateway has every trip
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            print("\rwaiting for the gateway ...", end="", flush=True)
            continue
        now = time.monotonic()
        ms = [m for m, _ in read]
        shares = None
        if args.instances > 1:
            dt = now - t_prev
            rates = [received_rate(m, p, dt) for m, p in zip(ms, prev, strict=True)]
            shares = [(instance_name(i), r) for i, r in enumerate(rates)]
        line = summary(combine(ms), combine(prev), now - t_prev, args.vehicles, trips, read[0][1], shares)
        print(f"\r[{now - t_start:5.0f} s] {line}", end="" if sys.stdout.isatty() else "\n", flush=True)
        prev, t_prev = ms, now
    return 0


if __name__ == "__main__":
    sys.exit(main())
