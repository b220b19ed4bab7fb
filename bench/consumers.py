"""The two baselines bench/ingest.py measures the gateway against, run as subprocesses.

``bare``:  a paho-mqtt 2.x subscriber that only counts messages — the
           ceiling of any Python consumer of this broker on this machine.
``naive``: the script a user writes first — a paho callback that
           ``json.loads`` each message, builds ``influxdb_client.Point``s and
           posts batches of 5,000 (or every second) with the synchronous client.

Both print ``ready`` once subscribed; ``bare`` prints ``done`` after N messages.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def _client(args: argparse.Namespace, on_message: Any) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(0)

    def on_connect(client: paho.Client, *_: Any) -> None:
        client.subscribe(f"{args.prefix}/#", qos=args.qos)

    def on_subscribe(*_: Any) -> None:
        print("ready", flush=True)

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect("127.0.0.1", args.port, keepalive=60)
    return c


def bare(args: argparse.Namespace) -> None:
    n = 0

    def on_message(client: paho.Client, _ud: Any, _msg: paho.MQTTMessage) -> None:
        nonlocal n
        n += 1
        if n == args.count:
            print("done", flush=True)

    _client(args, on_message).loop_forever()


def naive(args: argparse.Namespace) -> None:
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.client.write.point import Point
    from influxdb_client.client.write_api import SYNCHRONOUS

    influx = InfluxDBClient(url=args.influx_url, token="", org="-")
    write = influx.write_api(write_options=SYNCHRONOUS)
    batch: list[Point] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal batch, last_flush
        if batch:
            write.write(bucket=args.database, record=batch, write_precision="ms")  # type: ignore[arg-type]
            batch = []
        last_flush = time.monotonic()

    def on_message(client: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        _, vehicle, kind = msg.topic.split("/")[-3:]
        data = json.loads(msg.payload)
        p = Point(kind).tag("vehicle_id", vehicle).time(data.pop("ts"), write_precision="ms")  # type: ignore[no-untyped-call]
        for k, v in data.items():
            p = p.field(k, float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
        batch.append(p)
        if len(batch) >= 5000 or time.monotonic() - last_flush > 1.0:
            flush()

    c = _client(args, on_message)
    while True:
        c.loop(timeout=0.2)
        if time.monotonic() - last_flush > 1.0:
            flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=["bare", "naive"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--client-id", default="bench-consumer")
    p.add_argument("--influx-url", default="")
    p.add_argument("--database", default="")
    args = p.parse_args()
    try:
        (bare if args.kind == "bare" else naive)(args)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
