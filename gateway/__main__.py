"""Command line: ``python -m gateway [--config PATH] [run | check-config]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from gateway.errors import ConfigError
from gateway.fleet import Fleet, load_fleet
from gateway.settings import Settings, load_settings

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
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Settings, Fleet]:
    settings = load_settings(args.config)
    fleet = load_fleet(settings.fleet.file)
    return settings, fleet


async def serve(settings: Settings, fleet: Fleet) -> None:
    from gateway.app import init_app

    app = init_app(settings, fleet)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()  # runs the cleanup contexts' start-up halves
    site = web.TCPSite(runner, settings.http.host, settings.http.port)
    await site.start()
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new messages, sealing the journal, draining to InfluxDB")
    await runner.cleanup()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    except OSError as e:  # e.g. the HTTP port is taken
        log.error("cannot start: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
