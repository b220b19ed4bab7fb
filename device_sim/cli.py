"""``python -m device_sim``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from device_sim.commands import load_key_file
from device_sim.config import DEFAULT_FLEET, Intervals, SimConfig
from device_sim.faults import Fault
from device_sim.fleet import SimFleet, sized_fleet
from device_sim.incidents import Condition, Incidents
from device_sim.mqtt import tls_context
from device_sim.renters import Renters
from gateway.errors import ConfigError
from gateway.fleet import load_fleet

MASTER_KEY_ENV = "GATEWAY__COMMANDS__MASTER_KEY"
API_KEY_ENV = "DEVICE_SIM_API_KEY"
PASSWORD_ENV = "DEVICE_SIM_PASSWORD"

EPILOG = """\
examples:
  python -m device_sim --host 127.0.0.1 --port 1883                  the 29 reference cars, real time
  python -m device_sim --port 1883 --speed 720 --seed 7              a day in two minutes, repeatable
  python -m device_sim --port 1883 --vehicles 10000                  10,000 cars, one connection each
  python -m device_sim --port 1883 --vehicles 10000 --connections 8 --rate inf   pure throughput load
  python -m device_sim --vehicles 300 --write-fleet /tmp/fleet-300.yaml          registry for the gateway
  python -m device_sim --port 1883 --fault drop --fault malformed --fault-share 0.1 --fault-every 20
  python -m device_sim --port 1883 --per-car-credentials --master-key "$KEY"     against config/mosquitto/
  python -m device_sim --port 1883 --incidents 120 --pid-file /tmp/sim.pid      an alert's condition every 2 min
  kill -USR1 "$(cat /tmp/sim.pid)"                                               ... and one now

Commands are verified with each car's own key: derived from the master key
(--master-key or $GATEWAY__COMMANDS__MASTER_KEY, the gateway's variable) or
read from --key-file. Without either, every command is rejected bad_signature.

Incidents (device_sim/incidents.py, docs/simulator.md): with --incidents S, every
S wall seconds a car parked at its station and not in a renter's hands gets the
condition of one of the gateway's alerts, in turn: moved_without_trip (drives off
1-2 km and parks there), unlocked_unattended (left unlocked), charging_fault
(plugged, under 80 %, not charging), vehicle_silent (connected, publishes
nothing), left_service_area (drives out of the fleet's service_area),
low_battery_before_reservation (down to 10 %, unplugged). The condition is held
--incident-hold S (60) seconds, then cleared (the car reports it, or drives home).
Each cause and clear is logged on stderr. SIGUSR1 plays moved_without_trip on
such a car now, held as long, with or without --incidents: an operator's "try
it now". --pid-file PATH writes the process id there for `kill -USR1`.
"""


def _positive(v: str) -> float:
    f = float(v)
    if not f > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return f


def _non_negative(v: str) -> float:
    f = float(v)
    if not f >= 0 or math.isinf(f):
        raise argparse.ArgumentTypeError("must be a number of seconds, 0 or more")
    return f


def _share(v: str) -> float:
    f = float(v)
    if not 0 <= f <= 1:
        raise argparse.ArgumentTypeError("a share is between 0 and 1")
    return f


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m device_sim",
        description="Simulated electric cars for the fleet gateway: telemetry over MQTT, signed commands, faults.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("broker and fleet")
    g.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="MQTT broker port (default 1883, or 8883 with TLS)")
    g.add_argument("--prefix", default="fleet", help="topic prefix, as the gateway's (default fleet)")
    g.add_argument("--fleet", type=Path, default=DEFAULT_FLEET, help="fleet registry YAML (default config/fleet.yaml)")
    g.add_argument("--vehicles", type=int, help="number of cars: more than the registry adds generated SIM-nnnnn cars")
    g.add_argument("--write-fleet", type=Path, metavar="PATH", help="write the (grown) fleet YAML to PATH and exit")
    g.add_argument("--qos", type=int, choices=(0, 1), default=1, help="QoS of the car's messages (default 1)")
    g.add_argument("--client-id-prefix", default="sim", help="MQTT client ids are PREFIX-<topic prefix>-<vehicle id>")
    g.add_argument("--username", help="broker user name, the same for every car")
    g.add_argument("--password", help=f"broker password for --username (default ${PASSWORD_ENV})")
    g.add_argument("--per-car-credentials", action="store_true",
                   help="each car logs in as itself: user = vehicle id, password derived from the master key "
                        "as `python -m gateway provision` prints it (what config/mosquitto/acl expects)")  # fmt: skip
    g.add_argument("--tls", action="store_true", help="MQTT over TLS (8883); implied by the three options below")
    g.add_argument("--ca-file", type=Path, help="CA certificate to check the broker's against (default: the system's)")
    g.add_argument("--cert-file", type=Path, help="client certificate (PEM), for a broker that asks for one")
    g.add_argument("--tls-key-file", type=Path,
                   help="the key of --cert-file if not in it (--key-file is the cars' command keys)")  # fmt: skip

    g = p.add_argument_group("time")
    g.add_argument("--speed", type=_positive, default=1.0, help="simulated time runs X times faster (default 1)")
    g.add_argument("--duration", type=_positive, metavar="S", help="stop after S wall-clock seconds (default: run)")
    g.add_argument("--seed", type=int, help="seed for a repeatable run (default: random, printed at start)")
    g.add_argument("--start-hour", type=float, default=7.0, help="simulated time of day at start (default 7.0)")

    g = p.add_argument_group("reporting intervals, in simulated seconds")
    d = Intervals()
    g.add_argument("--battery-parked", type=_positive, default=d.battery_parked_s, help="default %(default)s")
    g.add_argument("--battery-driving", type=_positive, default=d.battery_driving_s, help="default %(default)s")
    g.add_argument("--location-driving", type=_positive, default=d.location_driving_s, help="default %(default)s")
    g.add_argument("--location-parked", type=_positive, default=d.location_parked_s, help="default %(default)s")
    g.add_argument("--doors-every", type=_positive, default=d.doors_s, help="plus on every change; default %(default)s")

    g = p.add_argument_group("commands")
    g.add_argument("--master-key", help=f"the gateway's master key (default ${MASTER_KEY_ENV})")
    g.add_argument("--key-file", type=Path, help="file of 'VEHICLE_ID HEXKEY' lines (or one hex key for every car)")
    g.add_argument("--no-ack-share", type=_share, default=0.0, help="share of cars that never ack (out of coverage)")
    g.add_argument("--fail-share", type=_share, default=0.0, help="share of cars answering failed/door_open")
    g.add_argument("--slow-ack-share", type=_share, default=0.0, help="share of cars that ack late")
    g.add_argument("--slow-ack", type=_positive, default=3.0, metavar="S", help="delay of a slow ack (default 3 s)")

    g = p.add_argument_group("faults (see device_sim/faults.py)")
    g.add_argument("--fault", action="append", default=[], choices=[f.value for f in Fault],
                   help="inject this fault periodically (repeatable)")  # fmt: skip
    g.add_argument("--fault-share", type=_share, default=0.05, help="share of cars hit each time (default 0.05)")
    g.add_argument("--fault-every", type=_positive, default=30.0, metavar="S", help="wall seconds between (default 30)")
    g.add_argument("--old-age", type=_positive, default=7200.0, metavar="S", help="age of old_ts reports (default 2 h)")
    g.add_argument("--skew", type=float, default=600.0, metavar="S", help="clock_skew offset (default 600 s ahead)")
    g.add_argument("--offline", type=_positive, default=5.0, metavar="S", help="offline time of drop/storm (default 5)")

    g = p.add_argument_group("renters: a booking day through the gateway's API (device_sim/renters.py)")
    g.add_argument("--renters", metavar="URL",
                   help="book, unlock, drive and end rentals through the gateway at URL")  # fmt: skip
    g.add_argument("--api-key", help=f"the booking API key for --renters (default ${API_KEY_ENV})")
    g.add_argument("--forget-plug-share", type=_share, default=0.2,
                   help="share of renters who forget the cable and fix it after the 409 (default 0.2)")  # fmt: skip
    g.add_argument("--max-rentals", type=_count, default=6, help="rentals running at once at most (default 6)")

    g = p.add_argument_group("incidents: alert conditions on demand (device_sim/incidents.py)")
    g.add_argument("--incidents", type=_non_negative, default=0.0, metavar="S",
                   help="every S wall seconds, cause the next alert condition in a free car parked at its "
                        "station (default 0: off); SIGUSR1 causes moved_without_trip now")  # fmt: skip
    g.add_argument("--incident-hold", type=_positive, default=60.0, metavar="S",
                   help="wall seconds a condition is held before it is cleared (default 60)")  # fmt: skip
    g.add_argument("--pid-file", type=Path, metavar="PATH",
                   help="write the process id to PATH (for kill -USR1), removed on exit")  # fmt: skip

    g = p.add_argument_group("scale and output")
    g.add_argument("--connections", type=int, default=0, metavar="K",
                   help="multiplex the cars over K connections (no per-car will) instead of one each")  # fmt: skip
    g.add_argument("--rate", type=float, default=0.0, metavar="R",
                   help="extra battery reports per second over the fleet ('inf': as fast as possible)")  # fmt: skip
    g.add_argument("--connect-concurrency", type=int, default=256, help="connection handshakes at once (default 256)")
    g.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    g.add_argument("--progress-every", type=_positive, default=5.0, metavar="S", help="progress period (default 5)")
    return p


def config_from_args(a: argparse.Namespace) -> SimConfig:
    keys = {}
    if a.key_file is not None:
        try:
            keys = load_key_file(a.key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--key-file: {e}") from None
    try:
        return SimConfig(
            host=a.host, port=a.port or (8883 if _wants_tls(a) else 1883), prefix=a.prefix,
            fleet=load_fleet(a.fleet), fleet_path=a.fleet,
            vehicles=a.vehicles, speed=a.speed, seed=a.seed, start_hour=a.start_hour,
            master_key=a.master_key or os.environ.get(MASTER_KEY_ENV) or None, keys=keys, qos=a.qos,
            username=a.username, password=(a.password or os.environ.get(PASSWORD_ENV)) if a.username else a.password,
            per_car_credentials=a.per_car_credentials,
            intervals=Intervals(a.battery_parked, a.battery_driving, a.location_driving, a.location_parked,
                                a.doors_every),
            no_ack_share=a.no_ack_share, fail_share=a.fail_share, slow_ack_share=a.slow_ack_share,
            slow_ack_s=a.slow_ack, connections=a.connections, connect_concurrency=a.connect_concurrency,
            rate=a.rate, client_id_prefix=a.client_id_prefix, progress_s=a.progress_every, quiet=a.quiet,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _wants_tls(a: argparse.Namespace) -> bool:
    return bool(a.tls or a.ca_file or a.cert_file or a.tls_key_file)


def tls_from_args(a: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context of --tls/--ca-file/--cert-file/--tls-key-file, None for plain MQTT."""
    if not _wants_tls(a):
        return None
    try:
        return tls_context(a.ca_file, a.cert_file, a.tls_key_file)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a file that is not a certificate or key
        raise ConfigError(f"--tls: {e}") from None


async def _probe(host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
    # With TLS, the handshake itself: a CA or host name that does not match would otherwise leave every car
    # retrying in silence.
    try:
        async with asyncio.timeout(5):
            _, w = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None)
    except ssl.SSLError as e:
        raise ConfigError(f"--ca-file/--host: TLS with the broker at {host}:{port} failed ({e})") from None
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"--host/--port: cannot reach the broker at {host}:{port} ({e or 'timeout'})") from None
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()


def _count(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def renters_key(a: argparse.Namespace) -> str | None:
    """The booking API key of --renters; ConfigError if it is missing or given without --renters."""
    key = a.api_key or os.environ.get(API_KEY_ENV)
    if a.renters and not key:
        raise ConfigError(f"--renters: needs --api-key or ${API_KEY_ENV}")
    if a.api_key and not a.renters:
        raise ConfigError("--api-key: only used with --renters URL")
    return key


async def _probe_api(url: str, key: str) -> None:
    """Before the fleet starts: the gateway answers at `url` and takes the key."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"{url.rstrip('/')}/v1/vehicles", headers={"Authorization": f"Bearer {key}"}) as r,
        ):
            if r.status == 401:
                raise ConfigError(f"--api-key: the gateway at {url} refuses it (401)")
            if r.status != 200 or "vehicles" not in await r.json(content_type=None):
                raise ConfigError(f"--renters: {url} does not answer like the gateway (HTTP {r.status})")
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise ConfigError(f"--renters: cannot reach the gateway at {url} ({e or 'timeout'})") from None


async def run(cfg: SimConfig, a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    incidents: Incidents | None = None

    def try_it_now() -> None:
        if incidents is None:
            print("device_sim: SIGUSR1: the fleet is not up yet; ignored", file=sys.stderr, flush=True)
        else:
            incidents.start(Condition.MOVED_WITHOUT_TRIP)

    # Before the pid file exists: whoever reads it may signal at once, and SIGUSR1 would otherwise end us.
    loop.add_signal_handler(signal.SIGUSR1, try_it_now)
    with _pid_file(a.pid_file):
        tls = tls_from_args(a)
        await _probe(cfg.host, cfg.port, tls)
        key = renters_key(a)
        if a.renters and key:
            await _probe_api(a.renters, key)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with SimFleet(cfg, tls=tls) as sim:
            renting: asyncio.Task[None] | None = None
            renters: Renters | None = None
            if a.renters and key:
                renters = Renters(sim, a.renters, key, forget_plug_share=a.forget_plug_share,
                                  max_active=a.max_rentals, seed=sim.seed)  # fmt: skip
                renting = loop.create_task(renters.run())
            in_use = (lambda: renters.active) if renters is not None else frozenset
            incidents = Incidents(sim, hold_s=a.incident_hold, in_use=in_use)
            scheduled = loop.create_task(incidents.run(a.incidents)) if a.incidents else None
            if a.incidents:
                print(f"device_sim: an incident every {a.incidents:g} s, held {a.incident_hold:g} s; "
                      f"kill -USR1 {os.getpid()} for one now", file=sys.stderr, flush=True)  # fmt: skip
            deadline = time.monotonic() + a.duration if a.duration else math.inf
            next_fault = time.monotonic() + a.fault_every
            while not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(deadline, next_fault) - time.monotonic())):
                        await stop.wait()
                if a.fault and time.monotonic() >= next_fault:
                    next_fault += a.fault_every
                    for f in a.fault:
                        ids = sim.pick(a.fault_share, None)
                        await sim.inject(f, ids, old_age_s=a.old_age, skew_s=a.skew, offline_s=a.offline)
                        if not a.quiet:
                            print(f"device_sim: fault {f} on {len(ids)} cars", file=sys.stderr)
            for task in (renting, scheduled):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            await incidents.close()
            if not a.quiet:
                s = sim.stats
                print(f"device_sim: stopping after {s.sent} messages, {s.commands} commands, "
                      f"{incidents.caused} incidents", file=sys.stderr)  # fmt: skip
                if renters is not None:
                    r = renters.stats
                    print(f"device_sim: renters booked {r.booked}, ended {r.ended} ({r.refused_409} after a 409), "
                          f"{r.failed} refused or failed", file=sys.stderr)  # fmt: skip


@contextlib.contextmanager
def _pid_file(path: Path | None) -> Iterator[None]:
    """Our process id in `path` while the block runs; removed after, if it is still ours."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pid + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--pid-file: cannot write {path}: {e.strerror or e}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8").strip() == pid:
                path.unlink()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        if a.write_fleet is not None:
            assert cfg.fleet is not None
            fleet = sized_fleet(cfg.fleet, cfg.vehicles)
            a.write_fleet.write_text(fleet.to_yaml(), encoding="utf-8")
            print(f"wrote {len(fleet.vehicles)} cars to {a.write_fleet}", file=sys.stderr)
            return 0
        if cfg.master_key is None and not cfg.keys and not a.quiet:
            print(f"device_sim: no key (--master-key, ${MASTER_KEY_ENV}, --key-file): commands will be rejected",
                  file=sys.stderr)  # fmt: skip
        asyncio.run(run(cfg, a))
    except ConfigError as e:
        print(f"device_sim: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
