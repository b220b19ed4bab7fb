"""Command line: ``python -m gateway [--config PATH] [run | check-config | provision ...]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from gateway.errors import ConfigError, StartupError
from gateway.fleet import Fleet, load_fleet
from gateway.settings import Settings
from gateway.settings_source import load_settings

log = logging.getLogger("gateway")

DESCRIPTION = """\
Telematics gateway for shared electric cars. Cars publish battery, location,
door and status messages over MQTT; the gateway validates them, stores them in
InfluxDB, keeps each car's latest state, and serves the booking system's HTTP
API (reservations, signed unlock/lock commands).

Settings come from the YAML file, then from environment variables
GATEWAY__<SECTION>__<KEY> (e.g. GATEWAY__MQTT__HOST, GATEWAY__INFLUX__URL,
GATEWAY__API__KEYS, GATEWAY__COMMANDS__MASTER_KEY). See config/gateway.yaml.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gateway", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", type=Path, default=Path("config/gateway.yaml"), help="YAML settings (default %(default)s)"
    )
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the gateway (the default)")
    sub.add_parser("check-config", help="validate the settings and the fleet file, print a summary, and exit")
    prov = sub.add_parser(
        "provision",
        help="print a car's broker credential and command key, or write the broker's password file",
        description=PROVISION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prov.add_argument("vehicle_ids", nargs="*", metavar="VEHICLE_ID", help="vehicles of the fleet registry")
    prov.add_argument("--all", action="store_true", help="every vehicle of the fleet registry")
    prov.add_argument("--exclude", action="append", default=[], metavar="VEHICLE_ID",
                      help="leave this vehicle out (a stolen or retired box); repeatable")  # fmt: skip
    prov.add_argument("--passwd-file", type=Path, metavar="PATH",
                      help="write Mosquitto's password file (gateway and car accounts), print nothing")  # fmt: skip
    return p.parse_args(argv)


PROVISION_HELP = """\
For the person fitting a telematics box: prints the car's broker user name
(its vehicle id) and password, the matching line of Mosquitto's password file,
its command key (64 hex digits: the contract's vehicle key, to verify signed
commands) and the topics the broker lets it use. All of it derives from the
master key (GATEWAY__COMMANDS__MASTER_KEY), so running this again prints the
same values; the master key itself is never printed. Give each box only its
own values.

With --passwd-file, writes the broker's password file instead (mode 0600):
the gateway's account (mqtt.username / mqtt.password) and every listed car;
with --all, the whole registry. Cars left out (--exclude, or removed from the
registry) can no longer log in once the broker reloads the file.

examples:
  python -m gateway provision ZOE-017
  python -m gateway provision --all --passwd-file /mosquitto/data/passwd
  python -m gateway provision --all --exclude ZOE-017 --passwd-file passwd
"""


def load(args: argparse.Namespace) -> tuple[Settings, Fleet]:
    settings = load_settings(args.config)
    fleet = load_fleet(settings.fleet.file)
    return settings, fleet


async def serve(settings: Settings, fleet: Fleet) -> None:
    from gateway.app import init_app

    app = init_app(settings, fleet)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()  # runs the cleanup contexts' start-up halves
        site = web.TCPSite(runner, settings.http.host, settings.http.port)
        try:
            await site.start()
        except OSError as e:
            where = f"{settings.http.host}:{settings.http.port}"
            raise StartupError(f"http.port: cannot listen on {where}: {e.strerror or e}") from e
    except BaseException:
        await runner.cleanup()  # closes whatever was opened, in reverse order
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            # An operator's second signal must work even if shutdown is stuck: nothing acknowledged is lost
            # by leaving now (the journal is on disk, unacknowledged messages are still the broker's).
            log.warning("second stop signal: exiting at once; the journal is replayed at the next start")
            logging.shutdown()
            os._exit(1)
        stop.set()

    # Before saying "up": a supervisor may send SIGTERM the moment it reads that line.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    log.info("API keys: %s", ", ".join(k.name for k in settings.api.keys) or "none")
    log.info(
        "gateway %s up: HTTP on %s:%d, MQTT %s:%d prefix %r, InfluxDB v%d at %s, %d vehicles",
        settings.instance,
        settings.http.host,
        settings.http.port,
        settings.mqtt.host,
        settings.mqtt.port,
        settings.mqtt.topic_prefix,
        settings.influx.api_version,
        settings.influx.url,
        len(fleet.vehicles),
    )
    await stop.wait()
    log.info("shutting down: no new messages, sealing the journal, draining to InfluxDB")
    await runner.cleanup()
    log.info("stopped")


def provision(args: argparse.Namespace) -> int:
    from gateway.provision import car_credentials, passwd_line, render, write_passwd_file

    # Provisioning needs the master key, not the booking system's API keys: a
    # placeholder stands in for them, so every other check (a missing, example
    # or short master key outside dev_mode) still applies.
    environ = {**os.environ, "GATEWAY__API__KEYS": "provision-needs-no-api-key"}
    settings = load_settings(args.config, environ=environ)
    fleet = load_fleet(settings.fleet.file)
    if settings.commands.master_key is None or not settings.commands.master_key.get_secret_value():
        raise ConfigError(
            "commands.master_key: not set (GATEWAY__COMMANDS__MASTER_KEY); every credential derives from it"
        )
    master = settings.commands.master_key.get_secret_value()
    if args.all == bool(args.vehicle_ids):
        raise ConfigError("provision: name the vehicles, or give --all (not both)")
    ids = list(fleet.vehicles) if args.all else list(dict.fromkeys(args.vehicle_ids))
    unknown = [v for v in ids + args.exclude if v not in fleet.vehicles]
    if unknown:
        raise ConfigError(f"provision: not in the fleet registry {settings.fleet.file}: {', '.join(unknown[:5])}")
    ids = [v for v in ids if v not in set(args.exclude)]
    creds = [car_credentials(master, v) for v in ids]
    if args.passwd_file is None:
        print("\n".join(render(c, settings.mqtt.topic_prefix) for c in creds), end="")
        return 0
    lines = []
    m = settings.mqtt
    if m.username and m.password is not None:
        if m.username in fleet.vehicles:
            raise ConfigError(f"mqtt.username: {m.username!r} is also a vehicle id; the gateway needs its own account")
        lines.append(passwd_line(m.username, m.password.get_secret_value()))
    else:
        print("gateway: mqtt.username/mqtt.password not set: the file holds the cars only", file=sys.stderr)
    lines += [passwd_line(c.username, c.password) for c in creds]
    n = write_passwd_file(args.passwd_file, lines)
    print(f"wrote {n} broker account(s) to {args.passwd_file}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "provision":
        try:
            return provision(args)
        except ConfigError as e:
            print(f"gateway: configuration error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"gateway: cannot write {args.passwd_file}: {e}", file=sys.stderr)
            return 1
    try:
        settings, fleet = load(args)
    except ConfigError as e:
        print(f"gateway: configuration error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check-config":
        print(
            f"configuration OK: {len(fleet.vehicles)} vehicles, MQTT {settings.mqtt.host}:{settings.mqtt.port}, "
            f"InfluxDB v{settings.influx.api_version} {settings.influx.url}"
        )
        return 0
    try:
        asyncio.run(serve(settings, fleet))
    except StartupError as e:
        print(f"gateway: cannot start: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
